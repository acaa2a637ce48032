"""
Flood protection: per-source rate limits with a temporary ban (like Kamailio's pike), a block
list of scanner User-Agents, and per-source limits on open transactions and connections.

:obj:`FloodGuard` is policy only; the transports and the proxy ask it:

  - :obj:`FloodGuard.allow` for every datagram and every framed stream message, before it is
    parsed: a token bucket per source IP (``messages_per_second``, ``burst``) on the injected
    clock. A source that empties its bucket is banned for ``ban_time`` seconds; while banned, its
    datagrams cost one dict lookup (``host in guard.banned``) and its connections are refused at
    accept. The unban is a timer, so the hot path never reads the clock for a banned source.
  - :obj:`FloodGuard.screen` for every request that parsed: a blocked User-Agent (lower-case
    substring match) is dropped silently (a scanner learns nothing) and counts toward a ban.
  - :obj:`FloodGuard.admit_connection` / :obj:`FloodGuard.connection_closed`: TCP/TLS
    connections per source IP and in all.
  - :obj:`FloodGuard.transaction_started` / :obj:`FloodGuard.transaction_ended`: open server
    transactions per source IP and in all; :obj:`FloodGuard.may_start_dialog` /
    :obj:`FloodGuard.dialog_started` / :obj:`FloodGuard.dialog_ended`: dialogs per source IP (the
    caller's) and in all. The totals count only sources that are not exempt: they bound what
    outsiders (spoofed UDP sources included) can make the proxy hold, and the inside keeps
    working when outsiders fill them.
  - :obj:`FloodGuard.failed`: a separate budget for failures such as wrong digest answers (like
    fail2ban: ``limit`` failures within ``window`` seconds ban the source through the same ban
    list).
  - When the connection table is full, :obj:`FloodGuard.admit_connection` asks the transports to
    make room (close the oldest idle connection that carries no registration or dialog) before
    it refuses a new connection.

Every refusal is counted (:obj:`FloodGuard.counters`) and logged at most once per source per
``log_interval`` (:obj:`sipproxy.refusals.RefusalLog`); a refusal also takes ``refusal_weight``
tokens from the source's bucket, so a source that keeps being refused is banned. Memory is bounded:
at most ``max_sources`` sources are tracked (idle ones are pruned; when the table is full of busy
sources a new one is let through untracked and counted as ``"untracked"``), and at most
``max_sources`` are banned. Sources in ``exempt`` (CIDRs: the inside networks, the provider) skip
every per-source check and the totals of transactions and dialogs; the total connection limit still
applies to them.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from sipproxy.interfaces import SavedBan
from sipproxy.refusals import RefusalLog
from sipproxy.settings import network, setting

if TYPE_CHECKING:
    from sipproxy.interfaces import IStateStore
    from sipproxy.message import Request

__all__ = ["DEFAULT_BLOCKED_USER_AGENTS", "DEFAULT_EXEMPT", "FloodGuard", "LimitsConfig"]

DEFAULT_BLOCKED_USER_AGENTS: Final = (
    "friendly-scanner", "sipvicious", "sipcli", "sip-scan", "sipscan", "sundayddr", "iwar",
    "vaxsipuseragent", "pplsip", "siparmyknife",
)
"""User-Agent substrings of well-known SIP scanners (matched lower case)."""
DEFAULT_EXEMPT: Final = ("127.0.0.0/8", "::1/128")
"""The proxy's own host: local tools, benchmarks and tests are not rate limited by default."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: flood protection and bounds on what one source may hold open
    (:class:`FloodGuard`, the transports' timeouts)."""

    enabled: bool = setting(
        True, doc="False: no rate limit, ban, User-Agent block list, per-source limit or total"
                  " at all (and the auth plugin's failures ban no one).")
    messages_per_second: float = setting(
        100.0, min=0, min_exclusive=True,
        doc="Per source IP: messages (datagrams or framed stream messages, requests and"
            " responses) per second, sustained.")
    burst: int = setting(
        400, min=1, doc="Per source IP: messages it may send at once above the sustained rate.")
    ban_time: float = setting(
        300.0, min=0, min_exclusive=True,
        doc="Seconds a source that went over the rate is ignored.")
    exempt: tuple[str, ...] = setting(
        DEFAULT_EXEMPT, parse=network,
        doc="Networks (CIDR, normalized) that no per-source check applies to: the proxy's host by"
            " default; add the inside networks or the provider.")
    blocked_user_agents: tuple[str, ...] = setting(
        DEFAULT_BLOCKED_USER_AGENTS, parse=str.lower,
        doc="Substrings (lower-cased): a request whose User-Agent contains one is dropped"
            " silently.")
    refusal_weight: int = setting(
        10, min=0, doc="A refused request (blocked User-Agent, over a limit, unparsable) counts"
                       " as this many messages toward the rate limit.")
    max_transactions_per_source: int = setting(
        500, min=0, doc="Open server transactions per source IP (0: no limit); over it requests"
                        " get 503.")
    max_dialogs_per_source: int = setting(
        200, min=0, doc="Dialogs (calls) a source IP may have set up and not ended (0: no"
                        " limit); over it new INVITEs from it get 503.")
    max_connections_per_source: int = setting(
        32, min=1, doc="Incoming TCP/TLS connections per source IP; more are refused at accept.")
    max_connections: int = setting(
        1000, min=1,
        doc="Incoming TCP/TLS connections in all; when they are all open, the oldest idle one"
            " that carries no registration or dialog is closed to make room for a new one.")
    max_transactions: int = setting(
        10_000, min=0,
        doc="Open server transactions from sources that are not exempt, in all (0: no limit);"
            " over it their requests get 503 (spoofed UDP sources cannot fill memory).")
    max_dialogs: int = setting(
        5_000, min=0, doc="Dialogs set up by sources that are not exempt, in all (0: no limit);"
                          " over it their new INVITEs get 503.")
    idle_timeout: float = setting(
        600.0, min=0, min_exclusive=True,
        doc="Seconds without traffic after which a TCP/TLS connection is closed (CRLF"
            " keepalives count only on a connection that carries a registration or a dialog).")
    message_timeout: float = setting(
        30.0, min=0, doc="Seconds a TCP/TLS peer has to finish a message it started"
                         " (slow-loris); 0: no limit.")
    max_sources: int = setting(
        100_000, min=1,
        doc="Sources tracked (and banned) at most: bounds memory under a spoofed-source flood.")
    log_interval: float = setting(
        60.0, min=0, doc="Refusals are logged at most once per source per this many seconds (all"
                         " are counted).")

_PRUNE_INTERVAL: Final = 60.0

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class _Ban:
    reason: str
    since: float
    unban: IDelayedCall
    dropped: int = 0


# Stored in the bucket table for an exempt source: one identity test on the hot path.
_EXEMPT: Final[list[float]] = [0.0, 0.0]


class FloodGuard:
    """
    Per-source limits; see the module docstring. All times come from ``clock``.

    :ivar banned: source IP -> ban; the transports test ``host in guard.banned`` first.
    :ivar counters: refusals and events by reason (``"rate"``, ``"scanner"``, ``"transactions"``,
        ``"connections"``, ``"connections_evicted"``, ``"transactions_total"``, ``"dialogs_total"``,
        ``"banned"`` (bans started), ``"unbanned"``, ``"dropped_banned"`` (counted when a ban
        ends), ``"untracked"`` ...), for a metrics exporter.
    """

    log = Logger(namespace="sipproxy.flood")

    def __init__(
        self,
        clock: IReactorTime,
        *,
        messages_per_second: float = 100.0,
        burst: int = 400,
        ban_time: float = 300.0,
        exempt: Iterable[str] = DEFAULT_EXEMPT,
        blocked_user_agents: Iterable[str] = DEFAULT_BLOCKED_USER_AGENTS,
        refusal_weight: int = 10,
        max_transactions_per_source: int = 500,
        max_dialogs_per_source: int = 200,
        max_connections_per_source: int = 32,
        max_connections: int = 1000,
        max_transactions: int = 10_000,
        max_dialogs: int = 5_000,
        max_sources: int = 100_000,
        log_interval: float = 60.0,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.clock = clock
        self._seconds = clock.seconds
        self.rate = float(messages_per_second)
        self.burst = float(burst)
        self.ban_time = ban_time
        self.exempt: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(net, strict=False) for net in exempt
        )
        patterns = [p.lower() for p in blocked_user_agents if p]
        self.blocked_user_agents = tuple(patterns)
        self._ua = re.compile("|".join(map(re.escape, patterns))) if patterns else None
        self.refusal_weight = refusal_weight
        self.max_transactions_per_source = max_transactions_per_source
        self.max_dialogs_per_source = max_dialogs_per_source
        self.max_connections_per_source = max_connections_per_source
        self.max_connections = max_connections
        self.max_transactions = max_transactions
        self.max_dialogs = max_dialogs
        self.max_sources = max_sources
        self.refusals = refusals or RefusalLog(clock, self.log, log_interval, max_sources)
        self.counters: Counter[str] = self.refusals.counters
        self.banned: dict[str, _Ban] = {}
        # source -> [tokens, time of last update], or _EXEMPT
        self._buckets: dict[str, list[float]] = {}
        self._next_prune = self._seconds() + _PRUNE_INTERVAL
        self._transactions: dict[str, int] = {}
        self._dialogs: dict[str, int] = {}
        self._connections: dict[str, int] = {}
        self.connection_count = 0
        #: open transactions and dialogs of sources that are not exempt, in all
        self.transaction_count = 0
        self.dialog_count = 0
        # (budget, source) -> (window, times of its last failures)
        self._failures: dict[tuple[str, str], tuple[float, deque[float]]] = {}
        self._state: IStateStore | None = None  # where bans are saved (keep_bans_in)

    @classmethod
    def from_config(cls, clock: IReactorTime, config: LimitsConfig) -> FloodGuard:
        """A guard with the limits of ``config``: each of its keys this class takes by name
        (``enabled`` and the transports' timeouts are not the guard's)."""
        taken = inspect.signature(cls).parameters
        return cls(clock, **{f.name: getattr(config, f.name) for f in fields(config)
                             if f.name in taken})

    # -- the hot path ------------------------------------------------------------------------

    def allow(self, host: str) -> bool:
        """Count one message from ``host``; ``False``: drop it unparsed (the source is banned)."""
        ban = self.banned.get(host)
        if ban is not None:
            ban.dropped += 1
            return False
        bucket = self._buckets.get(host)
        if bucket is None:
            return self._new_source(host)
        if bucket is _EXEMPT:
            return True
        now = self._seconds()
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self.ban(host, f"over {self.rate:g} messages/s (burst {self.burst:g})")
            return False
        bucket[0] = tokens - 1.0
        bucket[1] = now
        return True

    def _new_source(self, host: str) -> bool:
        now = self._seconds()
        buckets = self._buckets
        if now >= self._next_prune or len(buckets) >= self.max_sources:
            self._prune(now)
            if len(buckets) >= self.max_sources:
                self.counters["untracked"] += 1
                return True
        if self._is_exempt(host):
            buckets[host] = _EXEMPT
            return True
        buckets[host] = [self.burst - 1.0, now]
        return True

    def _prune(self, now: float) -> None:
        """Forget sources whose bucket has filled up again (they are idle) and exempt ones."""
        self._next_prune = now + _PRUNE_INTERVAL
        rate, burst = self.rate, self.burst
        idle = [
            host for host, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * rate >= burst
        ]
        for host in idle:
            del self._buckets[host]
        # exempt entries satisfy the test above only by chance: drop them too, they come back
        for host in [h for h, b in self._buckets.items() if b is _EXEMPT]:
            del self._buckets[host]

    # -- questions ---------------------------------------------------------------------------

    def is_exempt(self, host: str) -> bool:
        bucket = self._buckets.get(host)
        if bucket is not None:
            return bucket is _EXEMPT
        return self._is_exempt(host)

    def _is_exempt(self, host: str) -> bool:
        if not self.exempt:
            return False
        try:
            ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") else host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.exempt)

    def is_banned(self, host: str) -> bool:
        return host in self.banned

    def blocked_user_agent(self, user_agent: str) -> bool:
        """Whether ``user_agent`` contains one of the blocked substrings (case-insensitive)."""
        return self._ua is not None and self._ua.search(user_agent.lower()) is not None

    def screen(self, request: Request, host: str) -> bool:
        """After parse: ``False`` means drop ``request`` silently (a blocked User-Agent)."""
        if self._ua is None or self._buckets.get(host) is _EXEMPT:
            return True
        user_agent = request.headers.get("User-Agent")
        if user_agent is None or self._ua.search(user_agent.lower()) is None:
            return True
        if self.is_exempt(host):  # exempt but pruned from the table since allow()
            return True
        self.refuse(
            host, "scanner", "dropped requests from {host}: scanner User-Agent {user_agent!r}",
            user_agent=user_agent[:80],
        )
        return False

    # -- refusals and bans -------------------------------------------------------------------

    def refuse(self, host: str, reason: str, message: str, **fields: Any) -> None:
        """Count and (once per source per interval) log one refusal; charge ``host`` for it."""
        self.refusals.refused(reason, host, message, host=host, **fields)
        self.penalize(host)

    def penalize(self, host: str, reason: str | None = None, weight: int | None = None) -> None:
        """Take ``weight`` (default ``refusal_weight``) tokens from ``host``; ban it when empty.
        With ``reason``, also count it (for refusals the caller logged itself)."""
        if reason is not None:
            self.counters[reason] += 1
        if host in self.banned:
            return
        bucket = self._buckets.get(host)
        if bucket is None or bucket is _EXEMPT:
            return
        now = self._seconds()
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        tokens -= self.refusal_weight if weight is None else weight
        bucket[0], bucket[1] = tokens, now
        if tokens < 1.0:
            self.ban(host, f"refused requests (each counts as {self.refusal_weight} messages "
                           f"toward {self.rate:g} messages/s, burst {self.burst:g})")

    def ban(self, host: str, reason: str) -> None:
        """Ban ``host`` for ``ban_time`` seconds (a no-op if banned already or exempt)."""
        if host in self.banned or self.is_exempt(host):
            return
        if len(self.banned) >= self.max_sources:
            self.counters["ban_table_full"] += 1
            return
        unban = self.clock.callLater(self.ban_time, self._unban, host)
        now = self._seconds()
        self.banned[host] = _Ban(reason, now, unban)
        self._buckets.pop(host, None)
        if self._state is not None:
            self._state.save_ban(SavedBan(host, reason, now + self.ban_time))
        self.counters["banned"] += 1
        self.log.warn("banned {host} for {ban_time:g} s: {reason}", host=host,
                      ban_time=self.ban_time, reason=reason)

    def keep_bans_in(self, store: IStateStore) -> int:
        """Bring back the bans ``store`` saved that still run (each ends when it was going to)
        and save every ban and its end there from now on; a store that is not ``durable``
        changes nothing. Returns how many bans came back."""
        if not store.durable:
            return 0
        now = self._seconds()
        restored = 0
        for saved in store.saved_bans(now):
            host = saved.host
            if host in self.banned or self.is_exempt(host) or \
                    len(self.banned) >= self.max_sources:
                continue  # exempt since: [limits] changed before the restart
            unban = self.clock.callLater(saved.until - now, self._unban, host)
            self.banned[host] = _Ban(saved.reason, now, unban)
            restored += 1
        self._state = store
        return restored

    def failed(self, host: str, budget: str, limit: int, window: float) -> bool:
        """One failure of kind ``budget`` (e.g. ``"auth"``: a wrong digest answer) from ``host``.
        ``limit`` of them within ``window`` seconds ban it (:obj:`ban`); ``True``: it is banned now.
        Exempt sources are never banned. A budget of its own, apart from the message rate: a
        phone whose user mistyped once is not punished, a password guesser is stopped."""
        if host in self.banned:
            return True
        if limit <= 0 or self.is_exempt(host):
            return False
        now = self._seconds()
        key = (budget, host)
        entry = self._failures.get(key)
        if entry is None:
            if len(self._failures) >= self.max_sources:
                self._forget_failures(now)
                if len(self._failures) >= self.max_sources:
                    self.counters["untracked"] += 1
                    return False
            entry = (window, deque(maxlen=limit))
            self._failures[key] = entry
        times = entry[1]
        times.append(now)
        if len(times) < limit or now - times[0] > window:
            return False
        del self._failures[key]
        self.ban(host, f"{limit} failed {budget} attempts within {window:g} s")
        return host in self.banned

    def _forget_failures(self, now: float) -> None:
        for key in [k for k, (window, times) in self._failures.items()
                    if now - times[-1] > window]:
            del self._failures[key]

    def unban(self, host: str) -> None:
        ban = self.banned.get(host)
        if ban is not None and ban.unban.active():
            ban.unban.cancel()
        self._unban(host)

    def _unban(self, host: str) -> None:
        ban = self.banned.pop(host, None)
        if ban is None:
            return
        if self._state is not None:
            self._state.delete_ban(host)
        self.counters["unbanned"] += 1
        self.counters["dropped_banned"] += ban.dropped
        self.log.info(
            "unbanned {host} after {seconds:g} s; {dropped} messages dropped while banned",
            host=host, seconds=self._seconds() - ban.since, dropped=ban.dropped,
        )

    # -- connections -------------------------------------------------------------------------

    def admit_connection(
        self, host: str, make_room: Callable[[], bool] | None = None
    ) -> bool:
        """An incoming TCP/TLS connection from ``host``: ``True`` counts it (call
        :obj:`connection_closed` when it goes), ``False`` refuses it. When all ``max_connections``
        are open, ``make_room`` (the transports) may close an idle one first; it returns whether
        it did (and called :obj:`connection_closed` for it, and counted
        ``"connections_evicted"``)."""
        ban = self.banned.get(host)
        if ban is not None:
            ban.dropped += 1
            return False
        exempt = self.is_exempt(host)
        count = 0
        if not exempt:
            count = self._connections.get(host, 0)
            if count >= self.max_connections_per_source:
                self.refuse(host, "connections", "refused a connection from {host}: {count} "
                            "connections open from it", count=count)
                return False
        if self.connection_count >= self.max_connections and (
                make_room is None or not make_room()):
            self.refuse(host, "connections", "refused a connection from {host}: {count} "
                        "connections open in all", count=self.connection_count)
            return False
        if not exempt:
            self._connections[host] = count + 1
        self.connection_count += 1
        return True

    def connection_closed(self, host: str) -> None:
        self.connection_count = max(0, self.connection_count - 1)
        count = self._connections.get(host)
        if count is not None:
            if count <= 1:
                del self._connections[host]
            else:
                self._connections[host] = count - 1

    def connections_from(self, host: str) -> int:
        return self._connections.get(host, 0)

    # -- transactions ------------------------------------------------------------------------

    def transaction_started(self, host: str) -> bool:
        """A new server transaction from ``host``: ``False`` refuses it (too many open from it,
        or from outsiders in all); else it is counted until :obj:`transaction_ended`."""
        limit, total = self.max_transactions_per_source, self.max_transactions
        if not (limit or total) or self.is_exempt(host):
            return True
        count = self._transactions.get(host, 0)
        if limit and count >= limit:
            self.refuse(host, "transactions", "refused requests from {host}: {count} "
                        "transactions open from it", count=count)
            return False
        if total and self.transaction_count >= total:
            self.refuse(host, "transactions_total", "refused requests from {host}: {count} "
                        "transactions open from outside sources in all",
                        count=self.transaction_count)
            return False
        self._transactions[host] = count + 1
        self.transaction_count += 1
        return True

    def transaction_ended(self, host: str) -> None:
        count = self._transactions.get(host)
        if count is not None:
            self.transaction_count = max(0, self.transaction_count - 1)
            if count <= 1:
                del self._transactions[host]
            else:
                self._transactions[host] = count - 1

    def transactions_from(self, host: str) -> int:
        return self._transactions.get(host, 0)

    # -- dialogs -----------------------------------------------------------------------------

    def may_start_dialog(self, host: str) -> bool:
        """An initial INVITE from ``host``: ``False`` refuses it (too many dialogs open from
        it, or from outsiders in all)."""
        limit, total = self.max_dialogs_per_source, self.max_dialogs
        if not (limit or total) or self.is_exempt(host):
            return True
        count = self._dialogs.get(host, 0)
        if limit and count >= limit:
            self.refuse(host, "dialogs", "refused a call from {host}: {count} dialogs open "
                        "from it", count=count)
            return False
        if total and self.dialog_count >= total:
            self.refuse(host, "dialogs_total", "refused a call from {host}: {count} dialogs "
                        "open from outside sources in all", count=self.dialog_count)
            return False
        return True

    def dialog_started(self, host: str) -> bool:
        """A dialog set up by ``host`` exists now; ``True``: it was counted (call
        :obj:`dialog_ended` when it ends)."""
        if not (self.max_dialogs_per_source or self.max_dialogs) or self.is_exempt(host):
            return False
        self._dialogs[host] = self._dialogs.get(host, 0) + 1
        self.dialog_count += 1
        return True

    def dialog_ended(self, host: str) -> None:
        count = self._dialogs.get(host)
        if count is not None:
            self.dialog_count = max(0, self.dialog_count - 1)
            if count <= 1:
                del self._dialogs[host]
            else:
                self._dialogs[host] = count - 1

    def dialogs_from(self, host: str) -> int:
        return self._dialogs.get(host, 0)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Cancel every unban timer (the proxy is stopping; saved bans stay saved)."""
        for ban in self.banned.values():
            if ban.unban.active():
                ban.unban.cancel()
        self.banned.clear()
