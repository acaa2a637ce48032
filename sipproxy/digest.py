"""HTTP Digest authentication for SIP (RFC 3261 section 22, RFC 8760): pure functions, no Twisted.

What is here:

- :func:`parse_credentials` / :func:`parse_challenge`: an ``Authorization`` /
  ``Proxy-Authorization`` (or ``WWW-Authenticate``) value, ``Digest`` followed by auth-params
  ``name=token`` or ``name="quoted string"`` (``\\`` escapes one character), separated by
  commas with optional whitespace. Names are case-insensitive (returned lower-cased), a repeated
  name, an empty name, an unterminated quoted string or a stray character is a
  :class:`DigestError`.
- :func:`challenge`: one challenge value per offered algorithm; the caller sends them in the
  order given, SHA-256 first and MD5 last (RFC 8760 section 2.4: most preferred first), all
  with ``qop="auth"``.
- :func:`ha1`, :func:`response`: the RFC 7616/2617 computations for ``qop=auth`` with ``MD5``
  or ``SHA-256``; :func:`verify_response` compares in constant time.
- :class:`NonceFactory`: stateless nonces, ``base64url(timestamp_ms(8) || random(12) ||
  HMAC-SHA256(secret, realm || timestamp || random || client)[:16])``, the secret random per
  process (a restart invalidates every nonce: clients get ``stale=true`` and retry), ``client``
  the address the challenge went to (a nonce is no good from anywhere else, so a UDP source
  forged to be someone else's cannot authenticate). A nonce is *valid* when its HMAC checks
  out for the request's source and *fresh* while younger than ``ttl`` seconds by the clock the
  caller passes in (an injected ``IReactorTime`` in the plugin).
- :class:`NonceCounts`: replay protection. For each nonce in use it remembers the highest
  nonce-count accepted; a request whose ``nc`` is not greater is a replay. Memory is bounded:
  entries go when their nonce expires, and when the table is full the oldest entry is evicted
  and every nonce issued no later than it is refused from then on (the client gets a stale
  challenge and a fresh nonce), so eviction can never re-open a nonce to replay.

Decisions: qop-less (RFC 2069) responses are refused, because without ``nc`` and ``cnonce``
nothing distinguishes a replay; so are ``-sess`` algorithms, ``qop=auth-int`` and
``userhash=true`` (none of them is offered). ``algorithm`` absent means MD5 (RFC 7616 3.3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "ALGORITHMS",
    "Credentials",
    "DigestError",
    "NonceCounts",
    "NonceFactory",
    "NonceState",
    "authorization",
    "challenge",
    "check_fields",
    "format_params",
    "ha1",
    "hash_hex",
    "parse_challenge",
    "parse_credentials",
    "quote",
    "response",
    "verify_response",
]

#: Algorithm names as written on the wire (RFC 8760), to hashlib names.
ALGORITHMS: Final = {"SHA-256": "sha256", "MD5": "md5"}
_HEX_LENGTH: Final = {"SHA-256": 64, "MD5": 32}
_TOKEN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~"
)
_WS: Final = " \t\r\n"
_MAX_PARAMS: Final = 64


class DigestError(ValueError):
    """Credentials or a challenge that cannot be parsed, or an unsupported choice in them."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A parsed Authorization value: the scheme (as sent) and its params (names lower-cased,
    values unquoted)."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name.lower(), default)

    @property
    def is_digest(self) -> bool:
        return self.scheme.lower() == "digest"

    @property
    def algorithm(self) -> str:
        """The algorithm, canonical spelling when known ("MD5" when absent)."""
        value = self.params.get("algorithm", "MD5")
        for name in ALGORITHMS:
            if value.lower() == name.lower():
                return name
        return value


# -- parsing --------------------------------------------------------------------------------------
def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _token(text: str, i: int) -> tuple[str, int]:
    start = i
    n = len(text)
    while i < n and text[i] in _TOKEN_CHARS:
        i += 1
    return text[start:i], i


def _quoted(text: str, i: int) -> tuple[str, int]:
    """A quoted-string starting at ``text[i] == '"'``: its unescaped value and the index after."""
    assert text[i] == '"'
    i += 1
    out: list[str] = []
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    raise DigestError("unterminated quoted string")


def _parse(text: str) -> tuple[str, dict[str, str]]:
    i = _skip_ws(text, 0)
    scheme, i = _token(text, i)
    if not scheme:
        raise DigestError("no authentication scheme")
    if i < len(text) and text[i] not in _WS:
        raise DigestError(f"unexpected {text[i]!r} after the scheme")
    params: dict[str, str] = {}
    n = len(text)
    i = _skip_ws(text, i)
    while i < n:
        name, i = _token(text, i)
        if not name:
            raise DigestError(f"expected a parameter name at offset {i}")
        i = _skip_ws(text, i)
        if i >= n or text[i] != "=":
            raise DigestError(f"parameter {name!r} has no value")
        i = _skip_ws(text, i + 1)
        if i < n and text[i] == '"':
            value, i = _quoted(text, i)
        else:
            value, i = _token(text, i)
            if not value:
                raise DigestError(f"parameter {name!r} has an empty value")
        key = name.lower()
        if key in params:
            raise DigestError(f"parameter {name!r} repeated")
        if len(params) >= _MAX_PARAMS:
            raise DigestError("too many parameters")
        params[key] = value
        i = _skip_ws(text, i)
        if i >= n:
            break
        if text[i] != ",":
            raise DigestError(f"expected ',' at offset {i}, got {text[i]!r}")
        i = _skip_ws(text, i + 1)
        if i >= n:
            raise DigestError("trailing ','")
    return scheme, params


def parse_credentials(text: str) -> Credentials:
    """Parse one Authorization / Proxy-Authorization header value."""
    scheme, params = _parse(text)
    return Credentials(scheme, params)


def parse_challenge(text: str) -> Credentials:
    """Parse one WWW-Authenticate / Proxy-Authenticate value (same grammar)."""
    return parse_credentials(text)


def quote(value: str) -> str:
    """``value`` as a quoted-string (``"`` and ``\\`` escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: Params a challenge writes as tokens (unquoted); RFC 7616 3.3 quotes the others.
_UNQUOTED: Final = frozenset({"algorithm", "stale"})
#: The same for credentials (RFC 7616 3.4: qop and nc are tokens there).
_UNQUOTED_CREDENTIALS: Final = frozenset({"algorithm", "nc", "qop"})


def format_params(
    scheme: str, params: Iterable[tuple[str, str]], tokens: frozenset[str] = _UNQUOTED
) -> str:
    """``Scheme name="value", ...``; the names in ``tokens`` stay tokens when they can."""
    parts = []
    for name, value in params:
        if name.lower() in tokens and value and all(c in _TOKEN_CHARS for c in value):
            parts.append(f"{name}={value}")
        else:
            parts.append(f"{name}={quote(value)}")
    return f"{scheme} " + ", ".join(parts)


# -- computing ----------------------------------------------------------------------------------
def hash_hex(algorithm: str, text: str) -> str:
    """H(text) in lower-case hex; ``algorithm`` is "MD5" or "SHA-256"."""
    try:
        name = ALGORITHMS[algorithm]
    except KeyError:
        raise DigestError(f"unsupported algorithm {algorithm!r}") from None
    return hashlib.new(name, text.encode("utf-8")).hexdigest()


def ha1(algorithm: str, username: str, realm: str, password: str) -> str:
    """HA1 = H(username:realm:password), as a credentials file stores it."""
    return hash_hex(algorithm, f"{username}:{realm}:{password}")


def response(
    algorithm: str, ha1_hex: str, nonce: str, nc: str, cnonce: str, qop: str, method: str,
    uri: str,
) -> str:
    """The request-digest for ``qop=auth``: H(HA1:nonce:nc:cnonce:qop:H(method:uri))."""
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    return hash_hex(algorithm, f"{ha1_hex.lower()}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def verify_response(
    credentials: Credentials, ha1_hex: str, method: str
) -> bool:
    """Does ``credentials`` (already checked by :func:`check_fields`) carry the right digest?"""
    algorithm = credentials.algorithm
    expected = response(
        algorithm, ha1_hex, credentials.params["nonce"], credentials.params["nc"],
        credentials.params["cnonce"], credentials.params["qop"], method,
        credentials.params["uri"],
    )
    given = credentials.params["response"].lower()
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii", "replace"))


def check_fields(credentials: Credentials, algorithms: Iterable[str]) -> str | None:
    """Why ``credentials`` cannot be verified (missing field, qop-less, unknown algorithm...),
    or None when they can."""
    if not credentials.is_digest:
        return f"scheme {credentials.scheme!r} is not Digest"
    p = credentials.params
    for name in ("username", "realm", "nonce", "uri", "response"):
        if name not in p:
            return f"no {name}"
    if "qop" not in p:
        return "no qop (RFC 2069 responses are refused: no replay protection)"
    if p["qop"].lower() != "auth":
        return f"qop {p['qop']!r} not offered"
    for name in ("nc", "cnonce"):
        if name not in p:
            return f"no {name}"
    nc = p["nc"]
    if len(nc) != 8 or not all(c in "0123456789abcdefABCDEF" for c in nc):
        return f"bad nc {nc!r}"
    if p.get("userhash", "false").lower() == "true":
        return "userhash is not supported"
    algorithm = credentials.algorithm
    if algorithm not in set(algorithms):
        return f"algorithm {p.get('algorithm', 'MD5')!r} not offered"
    given = p["response"]
    if len(given) != _HEX_LENGTH[algorithm] or not all(
        c in "0123456789abcdefABCDEF" for c in given
    ):
        return "response is not a digest of that algorithm"
    return None


def challenge(
    realm: str, nonce: str, algorithms: Iterable[str], stale: bool = False,
    opaque: str | None = None,
) -> list[str]:
    """The challenge values to send, one per algorithm, in the order given."""
    out = []
    for algorithm in algorithms:
        if algorithm not in ALGORITHMS:
            raise DigestError(f"unsupported algorithm {algorithm!r}")
        params = [("realm", realm), ("nonce", nonce)]
        if opaque is not None:
            params.append(("opaque", opaque))
        params += [("algorithm", algorithm), ("qop", "auth")]
        if stale:
            params.append(("stale", "true"))
        out.append(format_params("Digest", params))
    return out


def authorization(
    challenge_value: str | Credentials, username: str, password: str, method: str, uri: str,
    nc: int = 1, cnonce: str | None = None,
) -> str:
    """The client side: an Authorization value answering ``challenge_value`` (for tests and
    for user agents built on sipproxy)."""
    chal = (challenge_value if isinstance(challenge_value, Credentials)
            else parse_challenge(challenge_value))
    algorithm = chal.algorithm
    realm = chal.params.get("realm", "")
    nonce = chal.params.get("nonce", "")
    cnonce = cnonce if cnonce is not None else os.urandom(8).hex()
    nc_text = f"{nc:08x}"
    digest = response(algorithm, ha1(algorithm, username, realm, password), nonce, nc_text,
                      cnonce, "auth", method, uri)
    params = [("username", username), ("realm", realm), ("nonce", nonce), ("uri", uri),
              ("response", digest), ("algorithm", algorithm), ("cnonce", cnonce),
              ("qop", "auth"), ("nc", nc_text)]
    if "opaque" in chal.params:
        params.append(("opaque", chal.params["opaque"]))
    return format_params("Digest", params, _UNQUOTED_CREDENTIALS)


# -- nonces ---------------------------------------------------------------------------------------
class NonceState:
    """What :meth:`NonceFactory.check` found."""

    INVALID: Final = "invalid"  # not ours (forged, garbled, another process's)
    STALE: Final = "stale"  # ours, but older than the ttl
    FRESH: Final = "fresh"


_NONCE_RAW: Final = 8 + 12 + 16


class NonceFactory:
    """Makes and checks stateless nonces (see the module docstring)."""

    def __init__(self, realm: str, ttl: float, secret: bytes | None = None) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.realm = realm
        self.ttl = ttl
        self._secret = secret if secret is not None else os.urandom(32)

    def _mac(self, payload: bytes, client: str) -> bytes:
        return hmac.new(self._secret, self.realm.encode("utf-8") + b"\x00" + payload
                        + b"\x00" + client.encode("utf-8", "replace"), hashlib.sha256).digest()[:16]

    def make(self, now: float, client: str = "") -> str:
        """A nonce for ``client`` (the address the challenge goes to: only requests from
        there can use it, so a UDP source forged to be a victim's never gets a nonce it can
        answer with; a client whose address changed gets a stale challenge and retries)."""
        payload = struct.pack(">Q", max(0, int(now * 1000))) + os.urandom(12)
        raw = payload + self._mac(payload, client)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    def issued_at(self, nonce: str, client: str = "") -> float | None:
        """When a valid nonce was made for ``client`` (seconds), or None if it is not one of
        ours."""
        if len(nonce) != 48:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "==")
        except (binascii.Error, ValueError):
            return None
        if len(raw) != _NONCE_RAW:
            return None
        payload, mac = raw[:20], raw[20:]
        if not hmac.compare_digest(self._mac(payload, client), mac):
            return None
        (millis,) = struct.unpack(">Q", payload[:8])
        return millis / 1000.0

    def check(self, nonce: str, now: float, client: str = "") -> str:
        issued = self.issued_at(nonce, client)
        if issued is None or issued > now + 1.0:  # from the future: not one we made
            return NonceState.INVALID
        if now - issued > self.ttl:
            return NonceState.STALE
        return NonceState.FRESH


class NonceCounts:
    """The highest nonce-count accepted per nonce; bounded (see the module docstring)."""

    def __init__(self, ttl: float, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self.max_entries = max_entries
        # nonce -> (highest nc, issued at); in order of first use
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._floor = float("-inf")  # nonces issued no later than this are refused
        self._last_purge = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def acceptable(self, nonce: str, nc: int, issued: float) -> bool:
        """Would ``nc`` for ``nonce`` (issued at ``issued``) be accepted now? (No change.)"""
        if nc < 1:
            return False
        entry = self._seen.get(nonce)
        if entry is None:
            return issued > self._floor
        return nc > entry[0]

    def accept(self, nonce: str, nc: int, issued: float, now: float) -> bool:
        """Record ``nc`` if acceptable; False for a replay (or a nonce pushed out by eviction)."""
        if not self.acceptable(nonce, nc, issued):
            return False
        if nonce in self._seen:
            self._seen[nonce] = (nc, issued)
            return True
        if len(self._seen) >= self.max_entries or now - self._last_purge > self.ttl:
            self.purge(now)
        while len(self._seen) >= self.max_entries:
            _, (_, evicted_issued) = self._seen.popitem(last=False)
            self._floor = max(self._floor, evicted_issued)
        if issued <= self._floor:
            return False
        self._seen[nonce] = (nc, issued)
        return True

    def purge(self, now: float) -> int:
        """Forget the nonces that expired (they are refused as stale anyway)."""
        self._last_purge = now
        gone = [n for n, (_, issued) in self._seen.items() if now - issued > self.ttl]
        for n in gone:
            del self._seen[n]
        return len(gone)
