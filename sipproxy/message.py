"""SIP requests and responses: parse, inspect, change, serialize (RFC 3261 section 7).

Parsing validates what a proxy relies on (start line, Via, CSeq, Call-ID, From, To,
Max-Forwards, Content-Length, Contact) and keeps every byte of the rest, so an unchanged message
serializes byte-identical and a change touches only the line it changes. Typed views (``vias``,
``cseq``, ``from_`` ...) are parsed once and cached until their header changes.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from typing import Final, cast

from sipproxy.errors import ParseError
from sipproxy.headers import Field, Headers, canonical, parse_header_lines
from sipproxy.uri import (
    URI,
    NameAddr,
    Params,
    check_host,
    check_name_addr,
    format_host,
    parse_name_addr,
    parse_params,
    parse_uri,
    split_header_values,
    strip_brackets,
)

__all__ = [
    "MAGIC_COOKIE",
    "CSeq",
    "Headers",
    "KeepAlive",
    "Limits",
    "Message",
    "ParseError",
    "Request",
    "Response",
    "Source",
    "StreamFramer",
    "Via",
    "new_branch",
    "new_tag",
    "parse_message",
]

MAGIC_COOKIE: Final = "z9hG4bK"
SIP_VERSION: Final = "SIP/2.0"
MAX_UINT32: Final = 2**32 - 1

REASONS: Final[dict[int, str]] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 420: "Bad Extension", 421: "Extension Required",
    423: "Interval Too Brief", 429: "Too Many Requests", 430: "Flow Failed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist", 482: "Loop Detected",
    483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here",
    487: "Request Terminated", 488: "Not Acceptable Here", 491: "Request Pending",
    493: "Undecipherable", 500: "Server Internal Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large", 600: "Busy Everywhere",
    603: "Decline", 604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


class _RandomPool:
    """Random bytes from ``os.urandom``, drawn 4 KiB at a time: one ``getrandom`` system call
    for hundreds of tags and branches instead of one each. Every byte is handed out once; a
    forked child starts with an empty pool (see :func:`_forget_random`), so parent and child
    never share one. Used from the reactor's thread (as the whole message layer is)."""

    __slots__ = ("_bytes", "_pos")

    SIZE: Final = 4096

    def __init__(self) -> None:
        self._bytes = b""
        self._pos = 0

    def hex(self, n: int) -> str:
        """``n`` fresh random bytes, as ``2 * n`` hex digits."""
        pos = self._pos
        end = pos + n
        if end > len(self._bytes):
            self._bytes = os.urandom(self.SIZE)
            pos = 0
            end = n
        self._pos = end
        return self._bytes[pos:end].hex()

    def forget(self) -> None:
        self._bytes = b""
        self._pos = 0


_RANDOM: Final = _RandomPool()


def _forget_random() -> None:
    _RANDOM.forget()


os.register_at_fork(after_in_child=_forget_random)


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie and 64 random bits."""
    return MAGIC_COOKIE + _RANDOM.hex(8)


def new_tag() -> str:
    """A fresh From/To tag: 48 random bits (RFC 3261 19.3 asks for at least 32)."""
    return _RANDOM.hex(6)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on the work hostile input can cause."""

    max_message: int = 65535
    max_headers: int = 256
    max_line: int = 8192
    max_body: int = 60000


DEFAULT_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class Source:
    """Where a message came from: set by the transport that received it."""

    transport: str  # "UDP" | "TCP" | "TLS"
    host: str
    port: int
    local_host: str = ""
    local_port: int = 0
    side: str = ""  # the listener's side ("inside"/"outside"), when the transport knows it


# --------------------------------------------------------------------------------------------
# Via
# --------------------------------------------------------------------------------------------
# possessive quantifiers where what follows cannot continue the run: the same matches as greedy
# ones, without the backtracking state (see sipproxy.uri)
_VIA_FAST: Final = re.compile(
    r"SIP/2\.0/([A-Za-z0-9\-.!%*_+`'~]++) "
    r"([A-Za-z0-9\-.]++|\[[0-9A-Fa-f:.]++\])(?::([0-9]{1,5}))?"
    r"((?:;[A-Za-z0-9\-.!%*_+`'~]++(?:=[A-Za-z0-9\-.!%*_+`'~:]++)?)*+)\Z"
)
_VIA_SLOW: Final = re.compile(
    r"([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*"
    r"([A-Za-z0-9\-.!%*_+`'~]+)\s+([^\s;:\[]+|\[[^\]]*\])\s*(?::\s*([0-9]+))?\s*(;.*)?\Z",
    re.S,
)


class Via:
    """One via-parm (a Via header may hold several, comma-separated).

    An unchanged Via renders as the exact text it was parsed from. Assigning ``host``, ``port``,
    ``transport`` or ``protocol``, or calling ``set_param``/``remove_param``, renders it anew;
    after changing ``params`` in place call ``touch()``.
    """

    __slots__ = ("_host", "_port", "_protocol", "_raw", "_transport", "params")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: Params | None = None,
        protocol: str = SIP_VERSION,
    ) -> None:
        self._protocol = protocol
        self._transport = transport
        self._host = host[1:-1] if host.startswith("[") else host
        self._port = port
        self.params = params if params is not None else Params()
        self._raw: str | None = None

    # Setting any of these makes the Via render anew. Plain properties (not a descriptor
    # factory): mypyc compiles them into native attribute access.
    @property
    def protocol(self) -> str:
        return self._protocol

    @protocol.setter
    def protocol(self, value: str) -> None:
        self._protocol = value
        self._raw = None

    @property
    def transport(self) -> str:
        return self._transport

    @transport.setter
    def transport(self, value: str) -> None:
        self._transport = value
        self._raw = None

    @property
    def host(self) -> str:
        """The sent-by host; an IPv6 address without brackets (given ones are dropped)."""
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

    @classmethod
    def build(
        cls, transport: str, host: str, port: int | None, branch: str, rport: bool = False
    ) -> Via:
        items: list[tuple[str, str | None]] = [("branch", branch)]
        if rport:
            items.append(("rport", None))
        via = cls(transport.upper(), host, port, Params(items))
        host = format_host(via._host)
        hostport = host if port is None else f"{host}:{port}"
        via._raw = f"SIP/2.0/{via._transport} {hostport};branch={branch}{';rport' if rport else ''}"
        return via

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        r = self.params.get("received")
        return r[1:-1] if r and r.startswith("[") else r

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def rport(self) -> int | bool | None:
        """None when absent, True when present without a value, else the port."""
        if "rport" not in self.params:
            return None
        value = self.params.get("rport")
        if value:
            return int(value)
        return cast("int | bool | None", _RPORT_WITHOUT_VALUE)

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self._host, self._port

    def set_param(self, name: str, value: str | None) -> None:
        self.params.set(name, value)
        self._raw = None

    def remove_param(self, name: str) -> None:
        self.params.remove(name)
        self._raw = None

    def touch(self) -> None:
        self._raw = None

    def __str__(self) -> str:
        raw = self._raw
        if raw is not None:
            return raw
        host = format_host(self._host)
        port = "" if self._port is None else f":{self._port}"
        text = f"{self._protocol}/{self._transport} {host}{port}{self.params}"
        self._raw = text
        return text

    def __repr__(self) -> str:
        return f"Via({self!s})"

    def copy(self) -> Via:
        new = Via(self._transport, self._host, self._port, self.params.copy(), self._protocol)
        new._raw = self._raw
        return new


#: ``Via.rport`` of a bare ``;rport``. Typed ``object`` so that the compiled build returns this
#: very ``True``: mypy folds ``int | bool`` into ``int``, and mypyc then returns a ``bool`` literal
#: as the int ``1`` (which callers would take for port 1).
_RPORT_WITHOUT_VALUE: Final[object] = True


def parse_via(text: str) -> Via:
    """Parse one via-parm, tolerating the LWS RFC 3261 allows around '/', ';' and '='."""
    m = _VIA_FAST.match(text)
    if m is None:
        return _parse_via_slow(text)
    # typed, so that the compiled build works on them as str, not as unknown objects
    transport, host, port_text, ptext = cast(tuple[str, str, "str | None", str], m.groups())
    if host[0] == "[":
        host = check_host(host, "Via")
    elif "-" in host or ".." in host or host[0] == ".":
        check_host(host, "Via")  # the fast pattern lets through "-x", "a..b", ".a"
    items: list[tuple[str, str | None]] = []
    if ptext:
        for part in ptext[1:].split(";"):
            name, eq, value = part.partition("=")
            items.append((name, value) if eq else (name, None))
    return _via(text, SIP_VERSION, transport, host, port_text, items)


def _parse_via_slow(text: str) -> Via:
    """:func:`parse_via` for what the fast pattern does not take (LWS, other protocols)."""
    m = _VIA_SLOW.match(text)
    if m is None:
        raise ParseError("malformed Via")
    name, version, transport, host, port_text, ptext = m.groups()
    if name.upper() != "SIP":
        raise ParseError("malformed Via")
    if version != "2.0":
        raise ParseError("SIP version not supported", 505)
    items = list(parse_params(ptext or "", "Via"))
    host = check_host(host, "Via")
    return _via(text, f"{name}/{version}", transport, host, port_text, items)


def _via(text: str, protocol: str, transport: str, host: str, port_text: str | None,
         items: list[tuple[str, str | None]]) -> Via:
    """The parsed Via, once its parts are checked (``text``: what it renders as)."""
    port: int | None = None
    if port_text is not None:
        port = int(port_text)
        if port > 65535:
            raise ParseError("bad port in Via")
    _check_via_params(items)
    via = Via(transport.upper(), host, port, Params(items), protocol)
    via._raw = text
    return via


def _check_via_params(items: list[tuple[str, str | None]]) -> None:
    for name, value in items:
        lname = name.lower()
        if lname == "rport":
            if value is not None and (
                not value.isdigit() or not value.isascii() or int(value) > 65535
            ):
                raise ParseError("bad rport in Via")
        elif lname == "ttl":
            if value is None or not value.isdigit() or not value.isascii() or int(value) > 255:
                raise ParseError("bad ttl in Via")
        elif lname in ("branch", "received", "maddr") and value is None:
            raise ParseError(f"Via {lname} without a value")


# --------------------------------------------------------------------------------------------
# CSeq
# --------------------------------------------------------------------------------------------
class CSeq:
    """A CSeq value; immutable (a plain class, not a frozen dataclass: that one is built
    through ``object.__setattr__``, several times slower than native attributes)."""

    __slots__ = ("_method", "_number")

    def __init__(self, number: int, method: str) -> None:
        self._number = number
        self._method = method

    @property
    def number(self) -> int:
        return self._number

    @property
    def method(self) -> str:
        return self._method

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, CSeq) and self._number == other._number
                and self._method == other._method)

    def __hash__(self) -> int:
        return hash((self._number, self._method))

    def __repr__(self) -> str:
        return f"CSeq(number={self._number!r}, method={self._method!r})"

    def __str__(self) -> str:
        return f"{self._number} {self._method}"


_CSEQ_FAST: Final = re.compile(r"([0-9]{1,10}) ([A-Z]+)\Z")


def _parse_cseq(value: str) -> CSeq:
    m = _CSEQ_FAST.match(value)
    if m is not None:
        number_text, method = cast(tuple[str, str], m.groups())
        number = int(number_text)
        if number <= MAX_UINT32:
            return CSeq(number, method)
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or not parts[0].isascii():
        raise ParseError("malformed CSeq")
    number = int(parts[0])
    if number > MAX_UINT32:
        raise ParseError("CSeq number too large")
    if not _is_method(parts[1]):
        raise ParseError("malformed CSeq method")
    return CSeq(number, parts[1])


_METHOD: Final = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")


def _is_method(text: str) -> bool:
    return _METHOD.match(text) is not None


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
class KeepAlive(enum.Enum):
    """CRLF keepalives seen between messages on a stream (RFC 5626 section 3.5.1)."""

    PING = b"\r\n\r\n"
    PONG = b"\r\n"


_TRANSACTION_KEYS: Final = frozenset(("via", "from", "to", "call-id", "cseq"))
_SINGLE: Final = frozenset(("call-id", "cseq", "from", "to", "max-forwards", "content-length"))
_REQUIRED: Final = ("call-id", "cseq", "from", "to")


class Message:
    """What requests and responses share: headers, body, typed views, serialization."""

    __slots__ = ("_body", "_body_changed", "_eol", "_start", "headers", "source", "wire_size")

    def __init__(self, headers: Headers | None = None, body: bytes = b"") -> None:
        #: bytes this message had on the wire when parsed (0 for one built here)
        self.wire_size = 0
        self.headers = headers if headers is not None else Headers()
        self._body = body
        self._body_changed = False
        self._eol = "\r\n"
        self._start: str | None = None
        self.source: Source | None = None

    # -- body ------------------------------------------------------------------------------------
    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = value
        self._body_changed = True
        self.wire_size = 0  # no longer the size it had on the wire

    @property
    def body_changed(self) -> bool:
        """True once the body was replaced (Content-Length is then rewritten on output)."""
        return self._body_changed

    # -- typed views -----------------------------------------------------------------------------
    @property
    def vias(self) -> list[Via]:
        cache = self.headers._cache  # hot path: read the cache directly
        cached = cache.get("via")
        if cached is None:
            cached = cache["via"] = [parse_via(v) for v in self.headers.get_all("via")]
        return cached  # type: ignore[return-value]

    @property
    def top_via(self) -> Via | None:
        vias = self.headers._cache.get("via")
        if vias is None:
            vias = self.vias
        return vias[0] if vias else None  # type: ignore[index]

    def push_via(self, via: Via) -> None:
        """Add a new top Via, as its own header line above the others."""
        cached = self.headers.cached("via")
        self.headers.add("Via", str(via), first=True)
        if cached is not None:
            self.headers.store("via", [via, *cached])  # type: ignore[misc]

    def pop_via(self) -> Via:
        """Remove and return the top Via value (also when it shares a line with others)."""
        vias = self.vias
        if not vias:
            raise ParseError("no Via")
        top = vias[0]
        self.headers.remove_first_value("via")
        self.headers.store("via", vias[1:])
        return top

    def update_top_via(self, via: Via) -> None:
        """Write back a changed top Via (e.g. received/rport added) in place."""
        for f in self.headers.fields:
            if f.key == "via":
                values = split_header_values(f.value)
                values[0] = str(via)
                f.value = ", ".join(values)
                f.raw = None
                break
        vias = self.vias
        vias[0] = via
        self.headers.store("via", vias)

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id") or ""

    @property
    def cseq(self) -> CSeq:
        cache = self.headers._cache
        cached = cache.get("cseq")
        if cached is None:
            value = self.headers.get("cseq")
            if value is None:
                raise ParseError("missing CSeq")
            cached = cache["cseq"] = _parse_cseq(value)
        return cached  # type: ignore[return-value]

    def _name_addr(self, key: str) -> NameAddr:
        cached = self.headers.cached(key)
        if cached is None:
            value = self.headers.get(key)
            if value is None:
                raise ParseError(f"missing {key.title()}")
            cached = parse_name_addr(value)
            self.headers.store(key, cached)
        return cached  # type: ignore[return-value]

    @property
    def from_(self) -> NameAddr:
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr:
        return self._name_addr("to")

    def set_name_addr(self, name: str, value: NameAddr) -> None:
        """Store a changed From/To back into its header line."""
        self.headers.set(name, str(value))
        self.headers.store(canonical(name), value)

    @property
    def contacts(self) -> list[NameAddr]:
        cached = self.headers.cached("contact")
        if cached is None:
            cached = [parse_name_addr(v, allow_star=True) for v in self.headers.get_all("contact")]
            self.headers.store("contact", cached)
        return cached  # type: ignore[return-value]

    def set_contacts(self, contacts: list[NameAddr]) -> None:
        self.headers.set("Contact", ", ".join(str(c) for c in contacts))
        self.headers.store("contact", contacts)

    def name_addrs(self, name: str) -> list[NameAddr]:
        """Route, Record-Route, Path ...: every value parsed."""
        return [parse_name_addr(v) for v in self.headers.get_all(name)]

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("max-forwards")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii():
            raise ParseError("malformed Max-Forwards")
        n = int(value)
        if n > 255:
            raise ParseError("Max-Forwards too large")
        return n

    @max_forwards.setter
    def max_forwards(self, value: int | None) -> None:
        # typed as the getter: compiled code (mypyc) passes the value boxed as the getter's
        # type, which a setter taking ``int`` would misread as a native int
        if value is None:
            self.headers.remove("max-forwards")
        else:
            self.headers.set("Max-Forwards", str(value))

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None:
            return None
        if not value.isdigit() or not value.isascii():
            raise ParseError("malformed Content-Length")
        return int(value)

    # -- serialization ---------------------------------------------------------------------------
    def start_line(self) -> str:
        raise TypeError("a Message is a Request or a Response")

    def _current_start(self) -> str:
        """The start line as received while it still holds, else rendered anew."""
        start = self._start
        return start if start is not None else self.start_line()

    def to_bytes(self) -> bytes:
        """Serialize; an unchanged message gives back exactly the bytes it was parsed from."""
        body = self._body
        if self._body_changed:
            cl = self.headers.get("content-length")
            if cl is None:
                if body:
                    self.headers.add("Content-Length", str(len(body)))
            elif cl != str(len(body)):
                self.headers.set("Content-Length", str(len(body)))
            self._body_changed = False
        start = self._current_start()
        eol = self._eol
        head = self.headers.render(eol)
        text = f"{start}{eol}{head}{eol}{eol}" if head else f"{start}{eol}{eol}"
        return text.encode("utf-8", "surrogateescape") + body

    def compact(self) -> None:
        """Keep the header section as one string until it is next read (see
        :meth:`Headers.pack`): for a message kept only to be sent again or matched."""
        self.headers.pack(self._eol)

    def ensure_content_length(self) -> None:
        """Streams need Content-Length (RFC 3261 18.3); add it where a datagram did without."""
        if "content-length" not in self.headers:
            self.headers.add("Content-Length", str(len(self._body)))

    def _copy_headers(self) -> Headers:
        """The headers for a copy, with the views a forwarded copy reads again at once copied
        over (not shared: the copy is changed on its own) rather than parsed anew."""
        headers = self.headers.copy()
        self._copy_views(headers)
        return headers

    def _copy_views(self, headers: Headers) -> None:
        """Give ``headers`` (a copy of this message's Via, CSeq, From and To fields) copies of
        the parsed views of those fields."""
        cache = self.headers._cache
        if cache:
            views = headers._cache
            cseq = cache.get("cseq")
            if cseq is not None:
                views["cseq"] = cseq  # immutable
            vias = cache.get("via")
            if vias is not None:
                views["via"] = [via.copy() for via in cast(list[Via], vias)]
            for key in ("from", "to"):
                name_addr = cache.get(key)
                if name_addr is not None:
                    views[key] = cast(NameAddr, name_addr).copy()

    def _copy_into(self, new: Message) -> None:
        """What a copy takes over besides its start line, headers and body."""
        new._body_changed = self._body_changed
        new._eol = self._eol
        new.source = self.source
        new.wire_size = self.wire_size

    def validate(self) -> dict[str, str]:
        """Check the headers a proxy relies on; raise ParseError with the status to answer.

        Via, CSeq, From and To are parsed (the proxy needs them at once); Contact is only
        checked here and parsed when somebody asks for it. Returns the single-valued headers.
        """
        first: dict[str, str] = {}
        contacts: list[str] = []
        for f in self.headers.fields:
            key = f.key
            if key in _SINGLE:
                if key in first:
                    raise ParseError(f"more than one {f.name} header")
                first[key] = f.value
            elif key == "contact":
                contacts.append(f.value)
        for key in _REQUIRED:
            if key not in first:
                raise ParseError(f"missing {key.title()} header")
        if not first["call-id"]:
            raise ParseError("empty Call-ID")
        self.cseq  # noqa: B018 - parse to validate
        if not self.vias:
            raise ParseError("missing Via header")
        # parsed, not only checked: every receiver reads From and To at once (the transport
        # layer does, to refuse a message whose From or To does not parse)
        cache = self.headers._cache
        cache["from"] = parse_name_addr(first["from"])
        cache["to"] = parse_name_addr(first["to"])
        mf = first.get("max-forwards")
        if mf is not None and (not mf.isdigit() or not mf.isascii() or int(mf) > 255):
            raise ParseError("bad Max-Forwards")
        for value in contacts:
            if value == "*":
                if len(contacts) > 1:
                    raise ParseError("Contact '*' together with other contacts")
                continue
            for one in split_header_values(value) if "," in value else (value,):
                check_name_addr(one)
        return first


class Request(Message):
    """A request. Assigning ``method``, ``version`` or ``uri`` (or changing ``uri`` through its
    setters) renders the request line anew; otherwise it is sent as it was received."""

    __slots__ = ("_method", "_uri", "_uri_text", "_version")

    def __init__(
        self,
        method: str,
        uri: URI | str,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self._method = method
        self._version = version
        if isinstance(uri, str):
            self._uri: URI | None = None
            self._uri_text = uri
        else:
            self._uri = uri
            self._uri_text = str(uri)

    # Setting these renders the request line anew.
    @property
    def method(self) -> str:
        return self._method

    @method.setter
    def method(self, value: str) -> None:
        self._method = value
        self._start = None

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, value: str) -> None:
        self._version = value
        self._start = None

    @property
    def uri(self) -> URI:
        uri = self._uri
        if uri is None:
            uri = self._uri = parse_uri(self._uri_text)
        return uri

    @uri.setter
    def uri(self, value: URI) -> None:
        self._uri = value
        self._start = None

    def start_line(self) -> str:
        uri = self._uri_text if self._uri is None else str(self._uri)
        return f"{self._method} {uri} {self._version}"

    def _current_start(self) -> str:
        start = self._start
        uri = self._uri
        # a Request-URI changed in place (its setters drop its text) invalidates the line
        if start is None or (uri is not None and uri._raw is not self._uri_text):
            return self.start_line()
        return start

    def compact(self) -> None:
        """Also let go of the parsed Request-URI while it still renders as the request line's
        text (it is parsed again from that text when next read)."""
        super().compact()
        uri = self._uri
        if uri is not None and uri._raw is self._uri_text:
            self._uri = None

    def touch_uri(self) -> None:
        """Call after changing ``uri`` in place so the start line is rendered anew."""
        self._start = None

    def copy(self) -> Request:
        new = Request(self._method, self._uri_text, self._copy_headers(), self._body,
                      self._version)
        self._copy_into(new)
        if self._uri is not None:
            new._uri = self._uri.copy()
        new._start = self._start
        return new

    def essentials(self) -> Request:
        """A copy with only what identifies the request's transaction (Via, From, To,
        Call-ID, CSeq) and its source: for a transaction that outlives its full request."""
        fields = [Field(f.name, f.key, f.value, f.raw)
                  for f in self.headers.fields if f.key in _TRANSACTION_KEYS]
        new = Request(self._method, self._uri_text, Headers(fields), version=self._version)
        new._eol = self._eol
        new._start = self._start
        new.source = self.source
        return new

    def make_response(self, status: int, reason: str | None = None) -> Response:
        """A response per RFC 3261 8.2.6: Via, From, To, Call-ID and CSeq copied as they are."""
        crlf = self._eol == "\r\n"  # folded raw lines of an LF-only request are re-rendered
        fields = [
            Field(f.name, f.key, f.value, f.raw if crlf else None)
            for f in self.headers.fields
            if f.key in _TRANSACTION_KEYS
        ]
        headers = Headers(fields)
        self._copy_views(headers)  # the transport reads the top Via to send the response
        response = Response(status, reason, headers)
        response.headers.add("Content-Length", "0")
        return response

    def __repr__(self) -> str:
        return f"<Request {self.method} {self._uri_text}>"


class Response(Message):
    """A response. Assigning ``status``, ``reason`` or ``version`` renders the status line
    anew; otherwise it is sent as it was received."""

    __slots__ = ("_reason", "_status", "_version")

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body)
        self._status = status
        self._reason = reason if reason is not None else REASONS.get(status, "Unknown")
        self._version = version

    # Setting these renders the status line anew.
    @property
    def status(self) -> int:
        return self._status

    @status.setter
    def status(self, value: int) -> None:
        self._status = value
        self._start = None

    @property
    def reason(self) -> str:
        return self._reason

    @reason.setter
    def reason(self, value: str) -> None:
        self._reason = value
        self._start = None

    @property
    def version(self) -> str:
        return self._version

    @version.setter
    def version(self, value: str) -> None:
        self._version = value
        self._start = None

    def start_line(self) -> str:
        return f"{self._version} {self._status} {self._reason}"

    def set_status(self, status: int, reason: str | None = None) -> None:
        self._status = status
        self._reason = reason if reason is not None else REASONS.get(status, "Unknown")
        self._start = None

    def copy(self) -> Response:
        new = Response(self._status, self._reason, self._copy_headers(), self._body,
                       self._version)
        self._copy_into(new)
        new._start = self._start
        return new

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
_VERSION: Final = re.compile(r"SIP/(\d+)\.(\d+)\Z", re.I)


def _check_version(text: str, is_response: bool) -> None:
    if text == SIP_VERSION:
        return
    m = _VERSION.match(text)
    if m is None:
        raise ParseError("bad SIP version", is_response=is_response)
    if (int(m.group(1)), int(m.group(2))) != (2, 0):
        raise ParseError("SIP version not supported", 505, is_response=is_response)


def parse_message(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Request | Response:
    """Parse one message from a datagram (or one framed by ``StreamFramer``).

    Octets after Content-Length are ignored; with no Content-Length the body is the rest of the
    datagram (RFC 3261 18.3). Raises ParseError; ``is_response`` tells the caller to drop it.
    """
    is_response = data[:4] == b"SIP/"
    if len(data) > limits.max_message:
        raise ParseError("message too large", 513, is_response=is_response)
    end = data.find(b"\r\n\r\n")
    eol = "\r\n"
    if end < 0:
        end = data.find(b"\n\n")
        if end >= 0:
            eol = "\n"
            body_start = end + 2
        elif data.endswith(b"\r\n"):
            end = len(data) - 2  # the datagram ends where the blank line should be
            body_start = len(data)
        else:
            raise ParseError("no empty line after the headers", is_response=is_response)
    else:
        body_start = end + 4
    raw_head = data[:end]
    head = raw_head.decode("utf-8", "surrogateescape")
    lines = head.split(eol)
    breaks = len(lines) - 1
    # The usual case in one step: the line ends are all the CRs and LFs there are (each LF, or
    # each CR and each LF, once per break: the split found that many) and no control character.
    if len(raw_head.translate(None, _CONTROL_CR_LF)) != len(raw_head) - len(eol) * breaks:
        if head.count("\n") != breaks or head.count("\r") != (breaks if eol == "\r\n" else 0):
            # a lone CR or LF would end a line for some peers and not for others (also a CR in
            # a header section whose lines end with LF alone)
            raise ParseError("bare CR or LF in the header section", is_response=is_response)
        if not all(map(_controls_quoted, lines)):
            raise ParseError("control character in the header section", is_response=is_response)
    if len(lines) > limits.max_headers + 1:
        raise ParseError("too many header lines", 513, is_response=is_response)
    if len(head) > limits.max_line and max(map(len, lines)) > limits.max_line:
        raise ParseError("header line too long", 513, is_response=is_response)
    try:
        msg = _parse_head(lines, eol, is_response)
        msg._eol = eol
        single = msg.validate()
        cl_text = single.get("content-length")
        if cl_text is None:
            body = data[body_start:]
        else:
            if not cl_text.isdigit() or not cl_text.isascii():
                raise ParseError("malformed Content-Length")
            cl = int(cl_text)
            if cl > limits.max_body:
                raise ParseError("body too large", 413)
            body = data[body_start : body_start + cl]
            if len(body) < cl:
                raise ParseError("body shorter than Content-Length")
        msg._body = body
        msg.wire_size = body_start + len(body)
        if isinstance(msg, Request):
            if msg.cseq.method != msg.method:
                raise ParseError("CSeq method does not match the request method")
            uri = msg.uri  # a Request-URI that does not parse is refused here
            if uri.is_sip and uri.headers is not None:
                raise ParseError("headers in a SIP Request-URI")
    except ParseError as e:
        e.is_response = is_response
        raise
    except (ValueError, IndexError, UnicodeError) as e:  # defensive: never leak another type
        raise ParseError(f"malformed message ({type(e).__name__})", is_response=is_response) from e
    return msg


#: RFC 3261 25.1: no control character but HTAB (and the CRLFs that end lines) in the header
#: section, except as the escaped character of a quoted-pair (RFC 4475 3.1.1.2's quoted NUL)
_CONTROL: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: the same characters and CR and LF as bytes, for ``bytes.translate``: deleting them from a
#: header section and comparing lengths is ~3x faster than a regex search of the decoded text
_CONTROL_CR_LF: Final = bytes((*range(0x09), *range(0x0A, 0x20), 0x7F))


def _controls_quoted(line: str) -> bool:
    """Is every control character (but HTAB) in ``line`` a quoted-pair in a quoted-string?"""
    if _CONTROL.search(line) is None:
        return True
    quoted = escaped = False
    for c in line:
        if escaped:
            escaped = False
        elif c != "\t" and (c < " " or c == "\x7f"):
            return False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
    return True


def _parse_head(lines: list[str], eol: str, is_response: bool) -> Request | Response:
    """The message of the start line ``lines[0]``, with the header fields of the lines after it
    (parsed once the start line is found good, so its errors come first)."""
    line = lines[0]
    if is_response:
        parts = line.split(" ", 2)
        if len(parts) < 3:
            if len(parts) == 2 and parts[1]:
                parts.append("")  # tolerate a missing SP before an empty reason phrase
            else:
                raise ParseError("malformed status line", is_response=True)
        version, code, reason = parts
        _check_version(version, True)
        if len(code) != 3 or not code.isdigit() or not code.isascii() or code[0] not in "123456":
            raise ParseError("bad status code", is_response=True)
        resp = Response(int(code), reason, parse_header_lines(lines[1:], eol), version=version)
        resp._start = line
        return resp
    parts = line.split(" ")
    if len(parts) != 3:
        if len(parts) > 3 and parts[-1].upper().startswith("SIP/"):
            raise ParseError("whitespace in the Request-URI or between request-line parts")
        raise ParseError("malformed request line")
    method, uri, version = parts
    if not _is_method(method):
        raise ParseError("bad method")
    _check_version(version, False)
    if not uri:
        raise ParseError("empty Request-URI")
    if uri.startswith("<"):
        raise ParseError("Request-URI in angle brackets")
    req = Request(method, uri, parse_header_lines(lines[1:], eol), version=version)
    req._start = line
    return req


# --------------------------------------------------------------------------------------------
# Stream framing
# --------------------------------------------------------------------------------------------
# the value may be folded onto continuation lines (RFC 3261 7.3.1)
_CL_LINE: Final = re.compile(
    rb"\r\n(?:content-length|l)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", re.I
)


class StreamFramer:
    """Cut a TCP/TLS byte stream into messages by Content-Length (RFC 3261 18.3).

    ``feed`` returns whole messages (as bytes, for ``parse_message``) and keepalives; a framing
    error raises ParseError and the connection must be closed (the stream cannot be resynced).
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._buf = bytearray()
        self._need: int | None = None  # total length of the message being received, once known
        self._scanned = 0  # bytes already searched for the blank line (a trickling peer)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | KeepAlive]:
        buf = self._buf
        buf += data
        out: list[bytes | KeepAlive] = []
        while buf:
            if self._need is None:
                if buf[:1] == b"\r" or buf[:1] == b"\n":
                    if buf[:4] == b"\r\n\r\n":
                        out.append(KeepAlive.PING)
                        del buf[:4]
                        continue
                    if buf[:2] == b"\r\n" and buf[2:3] != b"\r":
                        out.append(KeepAlive.PONG)
                        del buf[:2]
                        continue
                    if buf[:1] == b"\n":
                        del buf[:1]
                        continue
                    if len(buf) < 4:
                        break
                end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
                if end < 0:
                    if len(buf) > self.limits.max_message:
                        raise ParseError("header section too large", 513)
                    self._scanned = len(buf)
                    break
                self._scanned = 0
                if end > self.limits.max_message:
                    raise ParseError("header section too large", 513)
                found = _CL_LINE.findall(bytes(buf[: end + 2]))
                if not found:
                    raise ParseError("no Content-Length on a stream")
                if len(found) > 1:
                    raise ParseError("more than one Content-Length")
                text = found[0].strip(b" \t\r\n")
                if not text.isdigit():
                    raise ParseError("malformed Content-Length")
                length = int(text)
                if length > self.limits.max_body:
                    raise ParseError("body too large", 413)
                self._need = end + 4 + length
            need = self._need
            if len(buf) < need:
                break
            out.append(bytes(buf[:need]))
            del buf[:need]
            self._need = None
        return out
