"""Digest credentials from a text file: the ``auth`` plugin's default ``ICredentialStore``.

The file is htdigest's format, extended so one line can carry an HA1 per algorithm::

    # user:realm:HA1                          (Apache htdigest: the HA1 is MD5)
    alice:lan.example:5f4dcc3b5aa765d61d8327deb882cf99
    # user:realm:md5=HA1:sha-256=HA1          (either or both, in any order)
    bob:lan.example:md5=0d5c...:sha-256=8a1f...

HA1 is H(user:realm:password) in hex (32 digits for MD5, 64 for SHA-256), so the file holds no
password. Make a line with ``python3 -m sipproxy.plugins.auth hash USER REALM`` (the password
is read from stdin). Blank lines and lines starting with ``#`` are ignored; user and realm may
not contain ``:``; a user/realm pair may appear once. The file is read once, when the proxy
starts (before the reactor runs); a mistake stops it with one line, ``FILE:LINE: problem``.
A user with no HA1 for an algorithm cannot authenticate with that algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from zope.interface import implementer

from sipproxy.interfaces import ICredentialStore

__all__ = ["CredentialsFileError", "FileCredentialStore", "format_line", "parse_credentials_file"]

_LENGTH: Final = {"MD5": 32, "SHA-256": 64}
_LABELS: Final = {"md5": "MD5", "sha-256": "SHA-256", "sha256": "SHA-256"}
_HEX: Final = frozenset("0123456789abcdefABCDEF")

Entries = dict[tuple[str, str], dict[str, str]]


class CredentialsFileError(ValueError):
    """A bad credentials file: ``str()`` is one line, ``FILE:LINE: problem``."""

    def __init__(self, source: str, line: int | None, problem: str) -> None:
        self.source = source
        self.line = line
        self.problem = problem
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {problem}")


def _hex(text: str, algorithm: str) -> bool:
    return len(text) == _LENGTH[algorithm] and all(c in _HEX for c in text)


def parse_credentials_file(text: str, source: str = "<string>") -> Entries:
    """{(user, realm): {algorithm: HA1 (lower-case hex)}}; raises CredentialsFileError."""
    entries: Entries = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split(":")
        if len(fields) < 3:
            raise CredentialsFileError(source, number, "expected user:realm:HA1 or "
                                       "user:realm:md5=HA1:sha-256=HA1")
        user, realm, secrets = fields[0], fields[1], fields[2:]
        if not user:
            raise CredentialsFileError(source, number, "empty user name")
        if not realm:
            raise CredentialsFileError(source, number, "empty realm")
        if any(c.isspace() for c in user):
            raise CredentialsFileError(source, number, f"user name {user!r} contains white space")
        ha1s: dict[str, str] = {}
        if len(secrets) == 1 and "=" not in secrets[0]:
            if not _hex(secrets[0], "MD5"):
                raise CredentialsFileError(
                    source, number, "the HA1 of an htdigest line must be 32 hex digits (MD5)")
            ha1s["MD5"] = secrets[0].lower()
        else:
            for item in secrets:
                label, eq, value = item.partition("=")
                algorithm = _LABELS.get(label.strip().lower())
                if not eq or algorithm is None:
                    raise CredentialsFileError(
                        source, number, f"expected md5=HA1 or sha-256=HA1, got {item!r}")
                if algorithm in ha1s:
                    raise CredentialsFileError(source, number, f"{label} given twice")
                value = value.strip()
                if not _hex(value, algorithm):
                    raise CredentialsFileError(
                        source, number,
                        f"{label}: must be {_LENGTH[algorithm]} hex digits, got {len(value)}"
                        " characters")
                ha1s[algorithm] = value.lower()
        key = (user, realm)
        if key in entries:
            raise CredentialsFileError(source, number, f"{user}:{realm} appears twice")
        entries[key] = ha1s
    return entries


def format_line(user: str, realm: str, ha1s: Mapping[str, str]) -> str:
    """One line of the file for ``ha1s`` ({"MD5": hex, "SHA-256": hex})."""
    if ":" in user or ":" in realm or not user or not realm:
        raise ValueError("user and realm must be non-empty and contain no ':'")
    parts = [f"{name.lower()}={ha1s[name]}" for name in ("MD5", "SHA-256") if name in ha1s]
    return ":".join([user, realm, *parts])


@implementer(ICredentialStore)
class FileCredentialStore:
    """The users of a credentials file, in memory."""

    def __init__(self, entries: Entries, source: str = "<memory>") -> None:
        self.entries = entries
        self.source = source

    @classmethod
    def from_file(cls, path: str) -> FileCredentialStore:
        """Read ``path`` now (at start-up); CredentialsFileError for any problem."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CredentialsFileError(path, None, f"cannot read: {e.strerror or e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise CredentialsFileError(path, line, "not UTF-8 text") from None
        return cls(parse_credentials_file(text, path), path)

    def __len__(self) -> int:
        return len(self.entries)

    def ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        return self.entries.get((username, realm), {}).get(algorithm)
