"""``[registrar] store = "sqlite:PATH"``: the state that survives a restart in an SQLite file.

Opening the store reads the whole file (blocking: the proxy opens it while it builds its
service, before the reactor runs and before any listener opens) and drops what has expired.
After that every write is one SQL statement, committed on its own, run in a pool of exactly one
thread (:func:`twisted.internet.threads.deferToThreadPool`): the reactor never waits for the
disk, and the writes reach the file in the order they were made. The file is in WAL mode with
``synchronous=NORMAL``: a committed write survives the process being killed (``kill -9``);
what such a kill loses is at most the writes still queued for the thread, i.e. made in the
last moments before it. A power failure may also lose the last commits before it (NORMAL does
not sync each one), never the file's consistency.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from sipproxy.context import Target
from sipproxy.interfaces import IStateStore, SavedBan, SavedToken
from sipproxy.location import Binding
from sipproxy.state import binding_from_dict, binding_to_dict

__all__ = ["SqliteStateStore", "StateFileError"]

_log = Logger(namespace="sipproxy.state")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT NOT NULL, contact TEXT NOT NULL, expires_at REAL NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (aor, contact));
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY, contact TEXT NOT NULL, transport TEXT NOT NULL, host TEXT NOT NULL,
    port INTEGER NOT NULL, server_name TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bans (
    host TEXT PRIMARY KEY, reason TEXT NOT NULL, until REAL NOT NULL);
"""
_EXPIRED: Final = (
    "DELETE FROM bindings WHERE expires_at <= ?",
    "DELETE FROM tokens WHERE expires_at <= ?",
    "DELETE FROM bans WHERE until <= ?",
)
_SAVE_BINDING: Final = "INSERT OR REPLACE INTO bindings VALUES (?, ?, ?, ?)"
_DELETE_BINDING: Final = "DELETE FROM bindings WHERE aor = ? AND contact = ?"
_SAVE_TOKEN: Final = "INSERT OR REPLACE INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)"
_DELETE_TOKEN: Final = "DELETE FROM tokens WHERE token = ?"
_SAVE_BAN: Final = "INSERT OR REPLACE INTO bans VALUES (?, ?, ?)"
_DELETE_BAN: Final = "DELETE FROM bans WHERE host = ?"


class StateFileError(Exception):
    """The state file cannot be opened or read (its text says why, naming the file)."""


def _connect(path: str) -> sqlite3.Connection:
    """A connection in autocommit mode (each statement its own transaction), WAL journal."""
    db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


@implementer(IStateStore)
class SqliteStateStore:
    """The state in the SQLite file ``path`` (created if missing); see the module docstring.

    :param reactor: runs the writes' callbacks (``callFromThread``).
    :param now: the clock's time at opening: what expired by then is dropped from the file.
    :raises StateFileError: the file cannot be created, opened or read as a state file.
    """

    durable = True

    def __init__(self, path: str, reactor: Any, now: float) -> None:
        self.path = path
        self._reactor = reactor
        self._bindings: list[Binding] = []
        self._tokens: list[SavedToken] = []
        self._bans: list[SavedBan] = []
        self._read(now)
        self._pool: ThreadPool | None = None  # started by the first write
        self._db: sqlite3.Connection | None = None  # the writer thread's own
        self._closed = False

    # -- reading, once --------------------------------------------------------------------

    def _read(self, now: float) -> None:
        try:
            db = _connect(self.path)
            try:
                db.executescript(_SCHEMA)
                for statement in _EXPIRED:
                    db.execute(statement, (now,))
                bindings = db.execute("SELECT aor, contact, expires_at, data FROM bindings")
                for aor, contact, expires_at, data in bindings.fetchall():
                    self._add_binding(aor, contact, expires_at, data)
                tokens = db.execute("SELECT token, contact, transport, host, port, server_name,"
                                    " expires_at FROM tokens")
                for token, contact, transport, host, port, server_name, expires_at in \
                        tokens.fetchall():
                    self._tokens.append(SavedToken(
                        token, contact, Target(transport, host, port, server_name), expires_at))
                for host, reason, until in db.execute("SELECT host, reason, until FROM bans"):
                    self._bans.append(SavedBan(host, reason, until))
            finally:
                db.close()
        except (sqlite3.Error, OSError) as e:
            raise StateFileError(f"cannot use {self.path} as an SQLite state file: {e}") \
                from None

    def _add_binding(self, aor: str, contact: str, expires_at: float, data: str) -> None:
        try:
            binding = binding_from_dict(aor, contact, expires_at, json.loads(data))
        except (ValueError, KeyError, TypeError, IndexError):
            _log.warn("state file {path}: skipped an unreadable binding of {aor}",
                      path=self.path, aor=aor)
            return
        self._bindings.append(binding)

    def saved_bindings(self, now: float) -> list[Binding]:
        return [b for b in self._bindings if b.expires_at > now]

    def saved_tokens(self, now: float) -> list[SavedToken]:
        return [t for t in self._tokens if t.expires_at > now]

    def saved_bans(self, now: float) -> list[SavedBan]:
        return [b for b in self._bans if b.until > now]

    # -- writing, off the reactor thread --------------------------------------------------

    def save_binding(self, binding: Binding) -> Deferred[None]:
        return self._write(_SAVE_BINDING, (
            binding.aor, binding.contact, binding.expires_at,
            json.dumps(binding_to_dict(binding), separators=(",", ":"))))

    def delete_binding(self, aor: str, contact: str) -> Deferred[None]:
        return self._write(_DELETE_BINDING, (aor, contact))

    def save_token(self, token: SavedToken) -> Deferred[None]:
        target = token.target
        return self._write(_SAVE_TOKEN, (
            token.token, token.contact, target.transport, target.host, target.port,
            target.server_name, token.expires_at))

    def delete_token(self, token: str) -> Deferred[None]:
        return self._write(_DELETE_TOKEN, (token,))

    def save_ban(self, ban: SavedBan) -> Deferred[None]:
        return self._write(_SAVE_BAN, (ban.host, ban.reason, ban.until))

    def delete_ban(self, host: str) -> Deferred[None]:
        return self._write(_DELETE_BAN, (host,))

    def _write(self, statement: str, values: tuple[Any, ...]) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        if self._pool is None:
            self._pool = ThreadPool(1, 1, "sipproxy-state")
            self._pool.start()
        done: Deferred[None] = deferToThreadPool(
            self._reactor, self._pool, self._execute, statement, values)
        done.addErrback(self._failed, statement)
        return done

    def _execute(self, statement: str, values: tuple[Any, ...]) -> None:
        """In the writer thread: the only place its connection is used."""
        if self._db is None:
            self._db = _connect(self.path)
        self._db.execute(statement, values)

    def _failed(self, failure: Failure, statement: str) -> None:
        _log.failure("state file {path}: a write failed ({statement})", failure,
                     path=self.path, statement=statement.split(" WHERE")[0])

    def close(self) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        self._closed = True
        pool = self._pool
        if pool is None:
            return succeed(None)
        # queued behind every write: when it has run, they all have
        done: Deferred[None] = deferToThreadPool(self._reactor, pool, self._close_db)
        done.addErrback(self._failed, "close")
        done.addBoth(lambda _: pool.stop())
        return done

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
