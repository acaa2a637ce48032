"""SIP, SIPS, TEL and other URIs, and name-addr values (From, To, Contact, Route, ...).

Parsed values remember the text they came from: an object nobody changed serializes to exactly
that text, so a proxy that only inspects a header never alters its bytes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Final, cast
from urllib.parse import unquote_to_bytes

from sipproxy.errors import ParseError

__all__ = [
    "URI",
    "NameAddr",
    "Params",
    "ParseError",
    "check_host",
    "check_name_addr",
    "format_host",
    "parse_name_addr",
    "parse_params",
    "parse_uri",
    "split_header_values",
    "unescape",
]

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")
_TOKEN: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
#: a domain label: letters and digits, hyphens inside
_LABEL = r"[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+"
#: a hostname (or IPv4 address): labels separated by dots, one optional dot at the end
_HOSTNAME_RE = rf"{_LABEL}(?:\.{_LABEL})*+\.?"
_HOSTNAME: Final = re.compile(rf"{_HOSTNAME_RE}\Z")
# user = 1*( unreserved / escaped / user-unreserved ); password adds ':' handling separately
_USER: Final = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+\Z")
_PASSWORD: Final = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*\Z")
_PARAMCHARS: Final = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+\Z")
_HEADERCHARS: Final = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|%[0-9A-Fa-f]{2})*\Z")
_WS: Final = re.compile(r"[ \t\r\n]")
# The fast patterns below use possessive quantifiers (``*+``, ``++``) wherever what follows
# cannot start with what the quantifier repeats (a token is followed by '=', ';', '>', LWS or
# the end, never by a token character): they match exactly what the greedy forms match, but sre
# keeps no backtracking state for them, which makes a From or To match ~30 % faster.
_TOKEN_RE = r"[A-Za-z0-9\-.!%*_+`'~]++"
#: a display name, quoted or tokens separated by LWS, and the LWS after it
_DISPLAY_RE = rf'(?:"[^"\\]*+"|{_TOKEN_RE}(?:[ \t]++{_TOKEN_RE})*+)[ \t]*+'
#: header parameters (``;tag=x;lr``)
_HEADER_PARAMS_RE = rf"(?:;{_TOKEN_RE}(?:={_TOKEN_RE})?)*+"
# name-addr in its usual shape: optional quoted or token display name, <uri>, token params
_NA_FAST: Final = re.compile(rf'({_DISPLAY_RE})?<([^<>"\s]++)>({_HEADER_PARAMS_RE})\Z')
_PARAMS_FAST: Final = re.compile(rf"(?:;{_TOKEN_RE}(?:=(?:{_TOKEN_RE}|\[[0-9A-Fa-f:.]++\]))?)++\Z")


def strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") else host


def unescape(text: str) -> str:
    """Decode %HEX escapes once (``value%2541`` -> ``value%41``, never ``valueA``)."""
    if "%" not in text:
        return text
    return unquote_to_bytes(text).decode("utf-8", "surrogateescape")


def format_host(host: str) -> str:
    """Put brackets around an IPv6 literal, as URIs and Via sent-by need."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _check_host(host: str, what: str) -> str:
    """Validate a host and return it without IPv6 brackets."""
    if host.startswith("["):
        if not host.endswith("]"):
            raise ParseError(f"bad IPv6 reference in {what}")
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ParseError(f"bad IPv6 address in {what}") from None
        return inner
    if not _HOSTNAME.match(host):
        raise ParseError(f"bad host in {what}")
    return host


def check_host(host: str, what: str = "host") -> str:
    """Validate a hostname, IPv4 or [IPv6] host; return it without brackets (ParseError if bad)."""
    return _check_host(host, what)


def _split_hostport(text: str, what: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ParseError(f"bad IPv6 reference in {what}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ParseError(f"bad host in {what}")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
    port: int | None = None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
            raise ParseError(f"bad port in {what}")
        port = int(port_text)
        if port > 65535:
            raise ParseError(f"bad port in {what}")
    return _check_host(host, what), port


class Params:
    """Ordered ``;name=value`` parameters; names compare case-insensitively, keep their case."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str | None]] | None = None) -> None:
        self._items: list[tuple[str, str | None]] = items if items is not None else []

    def _index(self, name: str) -> int:
        items = self._items
        for i in range(len(items)):
            if items[i][0] == name:
                return i
        lname = name.lower()
        for i in range(len(items)):
            if items[i][0].lower() == lname:
                return i
        return -1

    def get(self, name: str, default: str | None = None) -> str | None:
        i = self._index(name)
        return self._items[i][1] if i >= 0 else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._index(name) >= 0

    def __getitem__(self, name: str) -> str | None:
        i = self._index(name)
        if i < 0:
            raise KeyError(name)
        return self._items[i][1]

    def set(self, name: str, value: str | None) -> None:
        i = self._index(name)
        if i >= 0:
            self._items[i] = (self._items[i][0], value)
        else:
            self._items.append((name, value))

    def remove(self, name: str) -> None:
        lname = name.lower()
        self._items = [(n, v) for n, v in self._items if n.lower() != lname]

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Params) and self._items == other._items

    def copy(self) -> Params:
        return Params(list(self._items))

    def __str__(self) -> str:
        return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in self._items)

    def __repr__(self) -> str:
        return f"Params({self._items!r})"


def parse_params(text: str, what: str, *, uri_chars: bool = False) -> Params:
    """Parse ``;a=b;c`` (leading ';' included); LWS around ';' and '=' is allowed in headers."""
    items: list[tuple[str, str | None]] = []
    if not text.strip():
        return Params(items)
    if not uri_chars and _PARAMS_FAST.match(text):
        for part in text[1:].split(";"):
            name, eq, value = part.partition("=")
            items.append((name, value if eq else None))
        return Params(items)
    parts = _split_outside_quotes(text, ";")
    if parts[0].strip():
        raise ParseError(f"bad parameters in {what}")
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        name = name.strip()
        if uri_chars:
            if not name or not _PARAMCHARS.match(name):
                raise ParseError(f"bad parameter in {what}")
            if eq and (not value or not _PARAMCHARS.match(value)):
                raise ParseError(f"bad parameter value in {what}")
            items.append((name, value if eq else None))
            continue
        if not name or not _TOKEN.match(name):
            raise ParseError(f"bad parameter in {what}")
        if eq:
            value = value.strip()
            if not value:
                raise ParseError(f"empty parameter value in {what}")
            if value.startswith('"'):
                if len(value) < 2 or not value.endswith('"'):
                    raise ParseError(f"unterminated quoted parameter in {what}")
            elif value.startswith("["):
                if not value.endswith("]"):
                    raise ParseError(f"bad parameter value in {what}")
            elif _WS.search(value):
                raise ParseError(f"bad parameter value in {what}")
            items.append((name, value))
        else:
            items.append((name, None))
    return Params(items)


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (backslash escapes honoured inside quotes)."""
    if '"' not in text:
        return text.split(sep)
    out: list[str] = []
    start = 0
    for i in _unquoted(text, sep):
        out.append(text[start:i])
        start = i + 1
    out.append(text[start:])
    return out


def _unquoted(text: str, ch: str) -> Iterator[int]:
    """Positions of ``ch`` outside double-quoted strings; ParseError if a quote is left open."""
    quoted = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == ch:
            yield i
        i += 1
    if quoted:
        raise ParseError("unterminated quoted string")


def split_header_values(text: str) -> list[str]:
    """Split a list header on commas that are not inside quotes or ``<>``.

    Empty elements (``a,,b``) are kept so that a validator can refuse them.
    """
    if "," not in text:
        return [text.strip()]
    if '"' not in text and "<" not in text:
        return [p.strip() for p in text.split(",")]
    out: list[str] = []
    start = 0
    quoted = False
    angle = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif angle:
            if ch == ">":
                angle = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle = True
        elif ch == ",":
            out.append(text[start:i].strip())
            start = i + 1
        i += 1
    if quoted:
        raise ParseError("unterminated quoted string")
    if angle:
        raise ParseError("unbalanced '<'")
    out.append(text[start:].strip())
    return out


class URI:
    """A URI. ``sip:``/``sips:`` are parsed into parts; other schemes keep their text opaque.

    Setting any part re-renders the URI; an unchanged URI renders as the exact text it came from.
    """

    __slots__ = ("_headers", "_host", "_opaque", "_params", "_password", "_port", "_raw",
                 "_user", "scheme")

    def __init__(
        self,
        scheme: str = "sip",
        user: str | None = None,
        host: str = "",
        port: int | None = None,
        params: Params | None = None,
        headers: str | None = None,
        password: str | None = None,
        opaque: str | None = None,
    ) -> None:
        self.scheme = scheme
        self._user = user
        self._password = password
        self._host = host[1:-1] if host.startswith("[") else host
        self._port = port
        self._params = params if params is not None else Params()
        self._headers = headers
        self._opaque = opaque
        self._raw: str | None = None

    # -- parts ---------------------------------------------------------------------------------
    @property
    def is_sip(self) -> bool:
        """True for sip: and sips: URIs (the ones a proxy can route)."""
        return self.scheme.lower() in ("sip", "sips")

    @property
    def secure(self) -> bool:
        return self.scheme.lower() == "sips"

    # Setting a part (user, host, port, headers) makes the value render anew. These are plain
    # properties, not a descriptor factory: mypyc compiles them into native attribute access.
    @property
    def user(self) -> str | None:
        return self._user

    @user.setter
    def user(self, value: str | None) -> None:
        self._user = value
        self._raw = None

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def host(self) -> str:
        """The host; an IPv6 address without brackets (brackets given when setting are dropped)."""
        return self._host

    @host.setter
    def host(self, value: str) -> None:
        self._host = strip_brackets(value)
        self._raw = None

    @property
    def port(self) -> int | None:
        return self._port

    @port.setter
    def port(self, value: int | None) -> None:
        self._port = value
        self._raw = None

    @property
    def params(self) -> Params:
        """The uri-parameters; after changing them in place call ``touch()``."""
        return self._params

    @property
    def headers(self) -> str | None:
        return self._headers

    @headers.setter
    def headers(self, value: str | None) -> None:
        self._headers = value
        self._raw = None

    @property
    def opaque(self) -> str | None:
        """For non-SIP schemes: everything after ``scheme:``."""
        return self._opaque

    def get_param(self, name: str) -> str | None:
        return self._params.get(name)

    def set_param(self, name: str, value: str | None) -> None:
        self._params.set(name, value)
        self._raw = None

    def remove_param(self, name: str) -> None:
        self._params.remove(name)
        self._raw = None

    def has_param(self, name: str) -> bool:
        return name in self._params

    def touch(self) -> None:
        """Forget the original text after an in-place change to ``params``."""
        self._raw = None

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, upper-cased (``UDP``, ``TCP``, ``TLS``...)."""
        t = self._params.get("transport")
        return t.upper() if t else None

    @property
    def loose_route(self) -> bool:
        return "lr" in self._params

    def hostport(self) -> str:
        host = format_host(self._host)
        return host if self._port is None else f"{host}:{self._port}"

    # -- rendering -----------------------------------------------------------------------------
    def __str__(self) -> str:
        if self._raw is not None:
            return self._raw
        if self._opaque is not None:
            text = f"{self.scheme}:{self._opaque}"
        else:
            userinfo = ""
            if self._user is not None:
                userinfo = self._user
                if self._password is not None:
                    userinfo += ":" + self._password
                userinfo += "@"
            text = f"{self.scheme}:{userinfo}{self.hostport()}{self._params}"
            if self._headers is not None:
                text += "?" + self._headers
        self._raw = text
        return text

    def __repr__(self) -> str:
        return f"URI({self!s})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, URI) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def copy(self) -> URI:
        new = URI(self.scheme, self._user, self._host, self._port, self._params.copy(),
                  self._headers, self._password, self._opaque)
        new._raw = self._raw
        return new

    def aor(self) -> str:
        """The address-of-record key: ``scheme:user@host`` with the host lower-cased."""
        if self._opaque is not None:
            return f"{self.scheme.lower()}:{self._opaque}"
        user = f"{unescape(self._user)}@" if self._user is not None else ""
        return f"{self.scheme.lower()}:{user}{format_host(self._host.lower())}"


_PCHARS = r"[A-Za-z0-9\-_.!~*'()\[\]/:&+$]++"
#: uri-parameters in their usual shape
_URI_PARAMS_RE = rf"(?:;{_PCHARS}(?:={_PCHARS})?)*+"
#: the start of a sip/sips URI in its usual shape: scheme, user, host (no port)
_SCHEME_USER_HOST = (r"[sS][iI][pP][sS]?:(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]++@)?"
                     rf"{_HOSTNAME_RE}")
# The common shape (no escapes, password, IPv6 or headers), checked in one step.
_URI_FAST: Final = re.compile(
    r"([sS][iI][pP][sS]?):(?:([A-Za-z0-9\-_.!~*'()&=+$,;?/]++)@)?"
    rf"({_HOSTNAME_RE})(?::([0-9]{{1,5}}))?({_URI_PARAMS_RE})\Z"
)


#: a name-addr in its usual shape whose URI has the shape of :data:`_URI_FAST`, in one step:
#: display, URI text, the URI's scheme, user, host, port and parameters, header parameters
_NA_FULL: Final = re.compile(
    rf"({_DISPLAY_RE})?"
    r"<(([sS][iI][pP][sS]?):(?:([A-Za-z0-9\-_.!~*'()&=+$,;?/]++)@)?"
    rf"({_HOSTNAME_RE})(?::([0-9]{{1,5}}))?({_URI_PARAMS_RE}))>"
    rf"({_HEADER_PARAMS_RE})\Z"
)
_UriParts = tuple[str, str, "str | None", str, "str | None", str]
_NameAddrGroups = tuple["str | None", str, str, "str | None", str, "str | None", str, str]
#: what a name-addr on the fast path is built from: display name, header parameters, URI parts
#: (only immutable values: shared by every name-addr built from them)
_NameAddrParts = tuple["str | None", tuple[tuple[str, "str | None"], ...], _UriParts]
#: name-addr texts parsed on the fast path, and their parts: every message of a call carries
#: the same From and (mostly) To, so most of them are parsed once per call, not per message
_NA_SEEN: Final[dict[str, _NameAddrParts]] = {}

_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_SIP_URI_BASE = rf"{_SCHEME_USER_HOST}(?::{_PORT})?"
_NA_CHECK: Final = re.compile(
    rf"(?:(?:{_DISPLAY_RE})?<{_SIP_URI_BASE}{_URI_PARAMS_RE}>|{_SIP_URI_BASE})"
    rf"{_HEADER_PARAMS_RE}\Z"
)


#: how many texts each of the memos below holds at most (a full one starts again empty)
_MEMO_SIZE: Final = 4096
#: the longest text the memos keep: longer ones (no phone's From, To or Contact is) are parsed
#: each time, so a peer sending long distinct values cannot pin _MEMO_SIZE x 8 KiB lines per
#: memo (~140 MiB over the three before this bound)
_MEMO_TEXT_MAX: Final = 256
#: name-addr texts that passed :data:`_NA_CHECK`: a phone sends the same Contact in every
#: message, so most checks are a set lookup
_NA_CHECKED: Final[set[str]] = set()


def check_name_addr(text: str, *, allow_star: bool = False) -> None:
    """Raise ParseError unless ``text`` is a valid name-addr; cheap for the usual shapes."""
    if text in _NA_CHECKED or text in _NA_SEEN:
        return
    if _NA_CHECK.match(text) is None:
        parse_name_addr(text, allow_star=allow_star)
        return
    if len(text) <= _MEMO_TEXT_MAX:
        if len(_NA_CHECKED) >= _MEMO_SIZE:
            _NA_CHECKED.clear()
        _NA_CHECKED.add(text)


def parse_uri(text: str, *, allow_headers: bool = True) -> URI:
    """Parse a URI; raise ``ParseError`` (400) when a sip/sips URI is malformed."""
    parts = _URI_SEEN.get(text)
    if parts is None:
        m = _URI_FAST.match(text)
        if m is not None:
            parts = _uri_parts(text, cast(_UriGroups, m.groups()))
    if parts is not None:
        return _built_uri(text, parts)
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME.match(scheme):
        raise ParseError("bad URI scheme")
    if _WS.search(text):
        raise ParseError("whitespace in URI")
    lscheme = scheme.lower()
    if lscheme not in ("sip", "sips"):
        if not rest:
            raise ParseError("empty URI")
        uri = URI(scheme, opaque=rest)
        uri._raw = text
        return uri
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, pcolon, pw = userinfo.partition(":")
        if not user or not _USER.match(user):
            raise ParseError("bad user part in URI")
        if pcolon:
            if not _PASSWORD.match(pw):
                raise ParseError("bad password in URI")
            password = pw
    headers: str | None = None
    q = rest.find("?")
    if q >= 0:
        rest, headers = rest[:q], rest[q + 1 :]
        if not allow_headers:
            raise ParseError("headers not allowed in this URI")
        if not _HEADERCHARS.match(headers.replace("&", "").replace("=", "")):
            raise ParseError("bad URI headers")
    if rest.startswith("["):
        end = rest.find("]")
        semi = rest.find(";", end if end >= 0 else 0)
    else:
        semi = rest.find(";")
    if semi >= 0:
        hostport, ptext = rest[:semi], rest[semi:]
        params = parse_params(ptext, "URI", uri_chars=True)
    else:
        hostport, params = rest, Params()
    if not hostport:
        raise ParseError("URI without host")
    host, port = _split_hostport(hostport, "URI")
    uri = URI(scheme, user, host, port, params, headers, password)
    uri._raw = text
    return uri


_UriGroups = tuple[str, "str | None", str, "str | None", str]


#: what a URI in the shape of :data:`_URI_FAST` is built from: scheme, user, host, port,
#: parameters (immutable values, shared by every URI built from them)
_UriBuilt = tuple[str, "str | None", str, "int | None", tuple[tuple[str, "str | None"], ...]]
#: URI texts parsed on the fast path, and their parts: the same Request-URIs and Contact URIs
#: come back call after call
_URI_SEEN: Final[dict[str, _UriBuilt]] = {}


def _fast_uri(text: str, groups: _UriGroups) -> URI | None:
    """The URI from the groups of :data:`_URI_FAST` (scheme, user, host, port, params), or
    None when the port is out of range (the full parser then says why)."""
    parts = _URI_SEEN.get(text)
    if parts is None:
        parts = _uri_parts(text, groups)
        if parts is None:
            return None
    return _built_uri(text, parts)


def _uri_parts(text: str, groups: _UriGroups) -> _UriBuilt | None:
    """The parts of ``text`` from its :data:`_URI_FAST` groups, remembered in
    :data:`_URI_SEEN`; None when the port is out of range."""
    scheme, user, host, port_text, ptext = groups
    port = int(port_text) if port_text is not None else None
    if port is not None and port > 65535:
        return None
    parts = (scheme, user, host, port, _split_params(ptext))
    if len(text) <= _MEMO_TEXT_MAX:
        if len(_URI_SEEN) >= _MEMO_SIZE:
            _URI_SEEN.clear()
        _URI_SEEN[text] = parts
    return parts


def _split_params(ptext: str) -> tuple[tuple[str, str | None], ...]:
    """``;a=1;b`` (checked by a fast pattern: no LWS, no quotes) as name-value pairs."""
    items: list[tuple[str, str | None]] = []
    if ptext:
        for param in ptext[1:].split(";"):
            name, eq, value = param.partition("=")
            items.append((name, value if eq else None))
    return tuple(items)


def _built_uri(text: str, parts: _UriBuilt) -> URI:
    scheme, user, host, port, items = parts
    uri = URI(scheme, user, host, port, Params(list(items)))
    uri._raw = text
    return uri


def _parse_display_name(text: str) -> str | None:
    """Validate a display-name (quoted-string or tokens separated by LWS)."""
    text = text.strip()
    if not text:
        return None
    if text.startswith('"'):
        i = 1
        n = len(text)
        while i < n:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                break
            i += 1
        else:
            raise ParseError("unterminated quoted display name")
        if text[i + 1 :].strip():
            raise ParseError("text after quoted display name")
        return text
    for word in text.split():
        if not _TOKEN.match(word):
            raise ParseError("bad display name")
    return text


class NameAddr:
    """``"Display" <uri>;params`` or ``uri;params``: From, To, Contact, Route and friends."""

    # ``_raw`` is valid only while the URI still renders as ``_uri_raw`` (the very string it was
    # rendered from): a URI changed in place, even one rendered anew since, invalidates it.
    # A parsed name-addr may leave its URI unbuilt (``_uri`` None): ``_uri_parts`` then holds
    # the text and the checked parts it is built from when first read (most readers want the
    # tag only).
    __slots__ = ("_display", "_params", "_raw", "_uri", "_uri_parts", "_uri_raw", "angle")

    def __init__(
        self,
        uri: URI,
        display: str | None = None,
        params: Params | None = None,
        angle: bool = True,
    ) -> None:
        self._uri: URI | None = uri
        self._uri_parts: _UriParts | None = None
        self._display = display
        self._params = params if params is not None else Params()
        self.angle = angle
        self._raw: str | None = None
        self._uri_raw: str | None = None

    @property
    def uri(self) -> URI:
        """The URI; after changing it in place call ``touch()`` (or assign a new one)."""
        uri = self._uri
        if uri is None:
            uri = self._build_uri()
        return uri

    @uri.setter
    def uri(self, value: URI) -> None:
        self._uri = value
        self._uri_parts = None
        self._raw = None

    def _build_uri(self) -> URI:
        parts = self._uri_parts
        assert parts is not None
        uri = _fast_uri(parts[0], parts[1:])
        assert uri is not None  # the port was checked when the name-addr was parsed
        self._uri = uri
        self._uri_parts = None
        self._uri_raw = uri._raw
        return uri

    @property
    def display(self) -> str | None:
        """The display name as written (quotes kept)."""
        return self._display

    @property
    def params(self) -> Params:
        return self._params

    @property
    def tag(self) -> str | None:
        return self._params.get("tag")

    @tag.setter
    def tag(self, value: str | None) -> None:
        if value is None:
            self._params.remove("tag")
        else:
            self._params.set("tag", value)
        self._raw = None

    def get_param(self, name: str) -> str | None:
        return self._params.get(name)

    def set_param(self, name: str, value: str | None) -> None:
        self._params.set(name, value)
        self._raw = None

    def remove_param(self, name: str) -> None:
        self._params.remove(name)
        self._raw = None

    def touch(self) -> None:
        self._raw = None

    def __str__(self) -> str:
        raw = self._raw
        if raw is not None and (self._uri is None or self._uri._raw is self._uri_raw is not None):
            return raw
        uri = str(self.uri)
        if self.angle or self._display or any(c in uri for c in ",;?"):
            text = f"{self._display} <{uri}>" if self._display else f"<{uri}>"
        else:
            text = uri
        text += str(self._params)
        self._raw = text
        self._uri_raw = self.uri._raw
        return text

    def __repr__(self) -> str:
        return f"NameAddr({self!s})"

    def copy(self) -> NameAddr:
        uri = self._uri
        new = NameAddr(_NO_URI if uri is None else uri.copy(), self._display,
                       self._params.copy(), self.angle)
        if uri is None:
            new._uri = None
        new._uri_parts = self._uri_parts  # immutable: shared
        new._raw = self._raw
        new._uri_raw = self._uri_raw  # URI.copy keeps the same raw string object
        return new


#: what a name-addr whose URI is still unbuilt (``_uri`` None) is constructed with, then
#: dropped: ``NameAddr`` is always built through ``__init__`` (mypyc's compiled classes run it
#: from ``__new__`` too, so filling the slots of a bare ``__new__`` is no shortcut there)
_NO_URI: Final = URI()


def parse_name_addr(text: str, *, allow_star: bool = False) -> NameAddr:
    """Parse one name-addr or addr-spec with header parameters.

    In the addr-spec form (no ``<>``) parameters belong to the header, not the URI, and the URI
    may carry no ``?headers`` (RFC 3261 20.10).
    """
    parts = _NA_SEEN.get(text)
    if parts is None:
        parts = _name_addr_parts(text)
    if parts is not None:
        # the URI is left unbuilt: built from _uri_parts when first read
        display, items, uri_parts = parts
        na = NameAddr(_NO_URI, display, Params(list(items)))
        na._uri = None
        na._uri_parts = uri_parts
        na._raw = text
        return na
    m = _NA_FAST.match(text)
    if m is not None:
        display, uri_text, ptext = m.groups()
        na = NameAddr(
            parse_uri(uri_text),
            display.rstrip() if display else None,
            Params([(n, v if eq else None) for n, eq, v in
                    (p.partition("=") for p in ptext[1:].split(";"))]) if ptext else Params(),
            angle=True,
        )
        na._raw = text
        na._uri_raw = na.uri._raw
        return na
    raw = text
    text = text.strip()
    if not text:
        raise ParseError("empty address")
    lt = _find_unquoted(text, "<")
    if lt >= 0:
        gt = text.find(">", lt)
        if gt < 0:
            raise ParseError("unbalanced '<' in address")
        display = _parse_display_name(text[:lt])
        uri = parse_uri(text[lt + 1 : gt])
        params = parse_params(text[gt + 1 :], "address")
        na = NameAddr(uri, display, params, angle=True)
    else:
        if '"' in text:
            raise ParseError("quoted display name without <uri>")
        semi = text.find(";")
        uri_text, ptext = (text[:semi], text[semi:]) if semi >= 0 else (text, "")
        uri_text = uri_text.strip()
        if allow_star and uri_text == "*":
            uri = URI("*", opaque="")
            uri._raw = "*"
        else:
            if _WS.search(uri_text):
                raise ParseError("whitespace in address")
            uri = parse_uri(uri_text, allow_headers=False)
        na = NameAddr(uri, None, parse_params(ptext, "address"), angle=False)
    na._raw = raw.strip()
    na._uri_raw = uri._raw
    return na


def _name_addr_parts(text: str) -> _NameAddrParts | None:
    """The parts of a name-addr in the shape of :data:`_NA_FULL` (remembered in
    :data:`_NA_SEEN`), or None for any other shape."""
    m = _NA_FULL.match(text)
    if m is None:
        return None
    # typed, so that the compiled build works on them as str, not as unknown objects
    display, uri_text, scheme, user, host, port_text, uparams, ptext = cast(
        _NameAddrGroups, m.groups())
    if port_text is not None and len(port_text) == 5 and int(port_text) > 65535:
        return None
    parts = (display.rstrip() if display else None, _split_params(ptext),
             (uri_text, scheme, user, host, port_text, uparams))
    if len(text) <= _MEMO_TEXT_MAX:
        if len(_NA_SEEN) >= _MEMO_SIZE:
            _NA_SEEN.clear()
        _NA_SEEN[text] = parts
    return parts


def _find_unquoted(text: str, ch: str) -> int:
    if '"' not in text:
        return text.find(ch)
    return next(_unquoted(text, ch), -1)
