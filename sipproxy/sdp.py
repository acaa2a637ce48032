"""SDP (RFC 8866 / RFC 4566): parse, inspect, change, serialize.

The proxy rewrites the few addresses and ports NAT and the media relay care about and must pass
everything else (codecs, SRTP keys, DTLS fingerprints, attributes nobody has heard of) through
untouched. So the model is a list of lines, each kept as the bytes it arrived as; the typed
accessors read those lines, and a change rewrites only the line it concerns (and within an
``o=``, ``c=`` or ``m=`` line only the fields that change, so odd spacing survives too).
``to_bytes()`` of an unchanged description is the input, byte for byte.

Text outside the structural lines is UTF-8 (or whatever ``a=charset`` says): values are decoded
with ``surrogateescape`` so any byte sequence survives a round trip through ``str``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DIRECTIONS",
    "HOLD_ADDRESSES",
    "ICE_ATTRIBUTES",
    "MAX_BODY_SIZE",
    "MAX_LINES",
    "MAX_LINE_LENGTH",
    "Attribute",
    "Candidate",
    "Connection",
    "Crypto",
    "MediaDescription",
    "Origin",
    "Rtcp",
    "SdpError",
    "SessionDescription",
    "parse_sdp",
]

# Bounds on hostile input: a real offer is a few KiB; these keep parsing cheap and linear.
MAX_BODY_SIZE: Final = 65536
MAX_LINES: Final = 4096
MAX_LINE_LENGTH: Final = 8192

DIRECTIONS: Final = ("sendrecv", "sendonly", "recvonly", "inactive")
# Everything a proxy strips when it takes ICE out of an offer (RFC 8839, RFC 5245).
ICE_ATTRIBUTES: Final = (
    "candidate",
    "remote-candidates",
    "end-of-candidates",
    "ice-ufrag",
    "ice-pwd",
    "ice-options",
    "ice-lite",
    "ice-mismatch",
    "ice-pacing",
)
# RFC 3264 section 8.4 (old-style hold): a connection address that means "send nothing".
HOLD_ADDRESSES: Final = frozenset({("IP4", "0.0.0.0"), ("IP6", "::")})

_CRLF: Final = b"\r\n"
_LF: Final = b"\n"
_TOKEN_RE: Final = re.compile(rb"[^ ]+")
_DIGITS_RE: Final = re.compile(r"[0-9]{1,10}")
_PORT_RE: Final = re.compile(r"([0-9]{1,5})(?:/([0-9]{1,5}))?")


class SdpError(ValueError):
    """A body that is not SDP we can safely model; the only exception ``parse_sdp`` raises."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise ValueError(f"cannot encode {text!r}: {e}") from None


def _infer_addrtype(address: str) -> str:
    return "IP6" if ":" in address else "IP4"


def _strip_brackets(address: str) -> str:
    # SDP writes IPv6 without brackets; accept the URI form from callers for convenience.
    if address.startswith("[") and address.endswith("]"):
        return address[1:-1]
    return address


# --------------------------------------------------------------------------- typed values


@dataclass(frozen=True, slots=True)
class Origin:
    """``o=<username> <sess-id> <sess-version> <nettype> <addrtype> <unicast-address>``."""

    username: str
    sess_id: str
    sess_version: str
    nettype: str
    addrtype: str
    address: str

    def fields(self) -> tuple[str, ...]:
        return (
            self.username,
            self.sess_id,
            self.sess_version,
            self.nettype,
            self.addrtype,
            self.address,
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """``c=<nettype> <addrtype> <address>[/<ttl>][/<count>]``.

    For IN IP4 a single suffix is the TTL (multicast); for IN IP6 it is the address count.
    """

    nettype: str
    addrtype: str
    address: str
    ttl: int | None = None
    count: int | None = None

    @classmethod
    def for_address(cls, address: str, addrtype: str | None = None) -> Connection:
        """An ``IN`` connection for a unicast address, the type guessed from the address."""
        address = _strip_brackets(address)
        return cls("IN", addrtype or _infer_addrtype(address), address)

    @property
    def is_hold(self) -> bool:
        """True for 0.0.0.0 (and ``::``): the RFC 2543 way to put a stream on hold."""
        return self.nettype == "IN" and (self.addrtype, self.address) in HOLD_ADDRESSES

    def address_field(self) -> str:
        out = self.address
        if self.ttl is not None:
            out += f"/{self.ttl}"
        if self.count is not None:
            out += f"/{self.count}"
        return out


@dataclass(frozen=True, slots=True)
class Attribute:
    """One ``a=`` line: ``a=name`` (value None) or ``a=name:value``."""

    name: str
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Rtcp:
    """``a=rtcp:<port> [<nettype> <addrtype> <address>]`` (RFC 3605)."""

    port: int
    nettype: str | None = None
    addrtype: str | None = None
    address: str | None = None

    def value(self) -> str:
        if self.address is None:
            return str(self.port)
        return f"{self.port} {self.nettype} {self.addrtype} {self.address}"


@dataclass(frozen=True, slots=True)
class Crypto:
    """``a=crypto`` (RFC 4568), kept as written; the parsed parts are for reading only.

    Fields are None when the value does not follow the grammar: the proxy passes such lines on
    rather than refusing the call.
    """

    value: str
    tag: int | None
    suite: str | None
    key_params: str | None
    session_params: tuple[str, ...]

    @classmethod
    def from_value(cls, value: str) -> Crypto:
        parts = value.split()
        if len(parts) < 3 or not _DIGITS_RE.fullmatch(parts[0]):
            return cls(value, None, None, None, ())
        return cls(value, int(parts[0]), parts[1], parts[2], tuple(parts[3:]))


@dataclass(frozen=True, slots=True)
class Candidate:
    """``a=candidate`` (RFC 8839), kept as written; parsed fields None when malformed."""

    value: str
    foundation: str | None
    component: int | None
    transport: str | None
    priority: int | None
    address: str | None
    port: int | None
    typ: str | None
    extensions: tuple[str, ...]

    @classmethod
    def from_value(cls, value: str) -> Candidate:
        p = value.split()
        if (
            len(p) < 8
            or p[6] != "typ"
            or not _DIGITS_RE.fullmatch(p[1])
            or not _DIGITS_RE.fullmatch(p[3])
            or not _PORT_RE.fullmatch(p[5])
            or "/" in p[5]
        ):
            return cls(value, None, None, None, None, None, None, None, ())
        return cls(value, p[0], int(p[1]), p[2], int(p[3]), p[4], int(p[5]), p[7], tuple(p[8:]))


@dataclass(frozen=True, slots=True)
class _MediaLine:
    media: str
    port: int
    port_count: int | None
    proto: str
    formats: tuple[str, ...]


# --------------------------------------------------------------------------- line parsing

_Parsed = Origin | Connection | _MediaLine | Attribute | None


class _Line:
    """One SDP line: its bytes without the line ending, the ending, and the parsed value."""

    __slots__ = ("eol", "parsed", "raw")

    def __init__(self, raw: bytes, eol: bytes, parsed: _Parsed) -> None:
        self.raw = raw
        self.eol = eol
        self.parsed = parsed

    @property
    def kind(self) -> str:
        return chr(self.raw[0])

    def clone(self) -> _Line:
        return _Line(self.raw, self.eol, self.parsed)


def _spans(raw: bytes) -> list[tuple[int, int]]:
    """Spans of the SP-separated fields after ``x=``."""
    return [m.span() for m in _TOKEN_RE.finditer(raw, 2)]


def _fields(raw: bytes, spans: list[tuple[int, int]], lineno: int, high: bool) -> list[str]:
    out = []
    for s, e in spans:
        tok = raw[s:e]
        # Structural fields are visible characters only (RFC 8866 non-ws-string); o= allows
        # UTF-8 in the username, c= and m= are ASCII.
        if any(b < 0x21 or b == 0x7F or (b > 0x7F and not high) for b in tok):
            raise SdpError("control or non-ASCII character in a structural field", lineno)
        out.append(_text(tok))
    return out


def _parse_origin(raw: bytes, lineno: int) -> Origin:
    f = _fields(raw, _spans(raw), lineno, high=True)
    if len(f) != 6:
        raise SdpError("o= needs 6 fields", lineno)
    if not (f[1].isascii() and f[1].isdigit()):
        raise SdpError("o= sess-id is not a number", lineno)
    if not (f[2].isascii() and f[2].isdigit()):
        raise SdpError("o= sess-version is not a number", lineno)
    if not all(x.isascii() for x in f[3:]):
        raise SdpError("o= address fields must be ASCII", lineno)
    return Origin(*f)


def _parse_connection(raw: bytes, lineno: int) -> Connection:
    f = _fields(raw, _spans(raw), lineno, high=False)
    if len(f) != 3:
        raise SdpError("c= needs 3 fields", lineno)
    nettype, addrtype, field = f
    ttl = count = None
    address = field
    if nettype == "IN" and addrtype in ("IP4", "IP6"):
        parts = field.split("/")
        address = parts[0]
        nums = parts[1:]
        if len(nums) > (2 if addrtype == "IP4" else 1):
            raise SdpError("c= has too many /suffixes", lineno)
        if not all(_DIGITS_RE.fullmatch(n) for n in nums):
            raise SdpError("c= TTL/count is not a number", lineno)
        values = [int(n) for n in nums]
        if addrtype == "IP4":
            if values:
                ttl = values[0]
                if ttl > 255:
                    raise SdpError("c= TTL above 255", lineno)
            if len(values) == 2:
                count = values[1]
        elif values:
            count = values[0]
        if count is not None and count < 1:
            raise SdpError("c= address count must be positive", lineno)
    if not address:
        raise SdpError("c= address is empty", lineno)
    return Connection(nettype, addrtype, address, ttl, count)


def _parse_media(raw: bytes, lineno: int) -> _MediaLine:
    f = _fields(raw, _spans(raw), lineno, high=False)
    if len(f) < 3:
        raise SdpError("m= needs media, port and proto", lineno)
    m = _PORT_RE.fullmatch(f[1])
    if m is None:
        raise SdpError("m= port is not a number", lineno)
    port = int(m.group(1))
    count = None if m.group(2) is None else int(m.group(2))
    if port > 65535 or (count is not None and not 1 <= count <= 65535):
        raise SdpError("m= port out of range", lineno)
    return _MediaLine(f[0], port, count, f[2], tuple(f[3:]))


def _parse_attribute(raw: bytes, lineno: int) -> Attribute:
    body = raw[2:]
    name, sep, value = body.partition(b":")
    if not name:
        raise SdpError("a= without an attribute name", lineno)
    attr = Attribute(_text(name), _text(value) if sep else None)
    if attr.name == "rtcp":
        _parse_rtcp(attr.value, lineno)
    return attr


def _parse_rtcp(value: str | None, lineno: int | None) -> Rtcp:
    parts = (value or "").split(" ")
    if len(parts) not in (1, 4) or not all(parts) or not _PORT_RE.fullmatch(parts[0]):
        raise SdpError("a=rtcp is not <port> [<nettype> <addrtype> <address>]", lineno)
    if "/" in parts[0] or int(parts[0]) > 65535:
        raise SdpError("a=rtcp port out of range", lineno)
    if len(parts) == 1:
        return Rtcp(int(parts[0]))
    if not all(p.isascii() and p.isprintable() for p in parts):
        raise SdpError("a=rtcp address must be ASCII", lineno)
    return Rtcp(int(parts[0]), parts[1], parts[2], parts[3])


def _parse_line(raw: bytes, lineno: int) -> _Parsed:
    if len(raw) > MAX_LINE_LENGTH:
        raise SdpError("line too long", lineno)
    if len(raw) < 2 or raw[1:2] != b"=" or not (chr(raw[0]).isascii() and chr(raw[0]).isalpha()):
        raise SdpError("not a <type>=<value> line", lineno)
    if b"\r" in raw or b"\n" in raw or b"\0" in raw:
        raise SdpError("CR, LF or NUL inside a line", lineno)
    kind = raw[0:1]
    if kind == b"a":
        return _parse_attribute(raw, lineno)
    if kind == b"c":
        return _parse_connection(raw, lineno)
    if kind == b"m":
        return _parse_media(raw, lineno)
    if kind == b"o":
        return _parse_origin(raw, lineno)
    return None


def _make_line(raw: bytes, what: str) -> _Line:
    """A line built from caller values, checked by the same parser the wire uses."""
    try:
        parsed = _parse_line(raw, 0)
    except SdpError as e:
        raise ValueError(f"invalid {what}: {e}") from None
    return _Line(raw, b"", parsed)


def _replace_fields(raw: bytes, new: Iterable[str]) -> bytes:
    """Rewrite the fields of an o=/c=/m= line, keeping the bytes between them as they were."""
    spans = _spans(raw)
    out = bytearray()
    pos = 0
    for (s, e), value in zip(spans, new, strict=False):
        out += raw[pos:s]
        out += _encode(value)
        pos = e
    out += raw[pos:]
    return bytes(out)


# --------------------------------------------------------------------------- blocks


class _Block:
    """Lines shared by the session part and each media part: attributes and c=."""

    _lines: list[_Line]

    def _line_ending(self) -> bytes:
        raise NotImplementedError

    # -- line plumbing

    def _insert(self, index: int, line: _Line) -> None:
        eol = self._line_ending()
        if index == len(self._lines):
            prev = self._lines[-1]
            if prev.eol not in (_CRLF, _LF):
                # The body's last line had no (or a bare CR) ending: give it a proper one and
                # let the new last line inherit the old ending.
                prev.eol, eol = eol, prev.eol
        line.eol = eol
        self._lines.insert(index, line)

    def _replace(self, index: int, line: _Line) -> None:
        old = self._lines[index]
        if old.raw != line.raw:
            self._lines[index] = _Line(line.raw, old.eol, line.parsed)

    def _indexes(self, kind: str) -> list[int]:
        return [i for i, ln in enumerate(self._lines) if ln.kind == kind]

    def _remove_indexes(self, indexes: Iterable[int]) -> None:
        for i in sorted(indexes, reverse=True):
            removed = self._lines.pop(i)
            if i == len(self._lines) and removed.eol not in (_CRLF, _LF) and self._lines:
                self._lines[-1].eol = removed.eol

    def _attr_lines(self) -> Iterator[tuple[int, Attribute]]:
        for i, ln in enumerate(self._lines):
            if isinstance(ln.parsed, Attribute):
                yield i, ln.parsed

    def _connection_insert_index(self) -> int:
        raise NotImplementedError

    # -- attributes

    @property
    def attributes(self) -> list[Attribute]:
        """The a= lines of this part, in order (a snapshot)."""
        return [a for _, a in self._attr_lines()]

    def get_attribute(self, name: str) -> str | None:
        """The value of the first ``a=name``; None when absent or valueless."""
        for _, a in self._attr_lines():
            if a.name == name:
                return a.value
        return None

    def get_attributes(self, name: str) -> list[str | None]:
        return [a.value for _, a in self._attr_lines() if a.name == name]

    def has_attribute(self, name: str) -> bool:
        return any(a.name == name for _, a in self._attr_lines())

    def add_attribute(self, name: str, value: str | None = None) -> None:
        """Append ``a=name[:value]`` at the end of this part."""
        self._insert(len(self._lines), self._attribute_line(name, value))

    def set_attribute(self, name: str, value: str | None = None) -> None:
        """Make ``a=name[:value]`` the only attribute of that name, in place of the first."""
        line = self._attribute_line(name, value)
        found = [i for i, a in self._attr_lines() if a.name == name]
        if not found:
            self._insert(len(self._lines), line)
            return
        self._replace(found[0], line)
        self._remove_indexes(found[1:])

    def remove_attributes(self, *names: str) -> int:
        """Remove every ``a=`` line with one of these names; returns how many went."""
        found = [i for i, a in self._attr_lines() if a.name in names]
        self._remove_indexes(found)
        return len(found)

    def remove_ice(self) -> int:
        """Strip ICE (candidates, credentials, options) from this part."""
        return self.remove_attributes(*ICE_ATTRIBUTES)

    @staticmethod
    def _attribute_line(name: str, value: str | None) -> _Line:
        raw = b"a=" + _encode(name) + (b"" if value is None else b":" + _encode(value))
        line = _make_line(raw, "attribute")
        if line.parsed != Attribute(name, value):
            raise ValueError(f"invalid attribute name {name!r}")
        return line

    # -- direction

    def _own_direction(self) -> str | None:
        for _, a in self._attr_lines():
            if a.name in DIRECTIONS and a.value is None:
                return a.name
        return None

    def _set_direction(self, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"not a direction: {direction!r}")
        line = self._attribute_line(direction, None)
        found = [i for i, a in self._attr_lines() if a.name in DIRECTIONS and a.value is None]
        if not found:
            self._insert(len(self._lines), line)
            return
        self._replace(found[0], line)
        self._remove_indexes(found[1:])

    # -- connection

    @property
    def connection(self) -> Connection | None:
        """This part's own c= (the first, if a multicast media part has several)."""
        for ln in self._lines:
            if isinstance(ln.parsed, Connection):
                return ln.parsed
        return None

    @connection.setter
    def connection(self, conn: Connection | None) -> None:
        found = self._indexes("c")
        if conn is None:
            self._remove_indexes(found)
            return
        if found:
            old = self._lines[found[0]].raw
            raw = _replace_fields(old, (conn.nettype, conn.addrtype, conn.address_field()))
        else:
            raw = b"c=" + _encode(f"{conn.nettype} {conn.addrtype} {conn.address_field()}")
        line = _make_line(raw, "connection")
        if line.parsed != conn:
            raise ValueError(f"connection does not survive serialization: {conn!r}")
        if found:
            self._replace(found[0], line)
        else:
            self._insert(self._connection_insert_index(), line)

    def set_connection_address(self, address: str, addrtype: str | None = None) -> None:
        """Point c= at another address (a relay, the public side of a NAT).

        The address type follows the address unless given. A TTL/count survives only when the
        address type is unchanged. Adds a c= line if this part has none.
        """
        address = _strip_brackets(address)
        addrtype = addrtype or _infer_addrtype(address)
        old = self.connection
        if old is None:
            self.connection = Connection("IN", addrtype, address)
        elif old.addrtype == addrtype:
            self.connection = Connection(old.nettype, addrtype, address, old.ttl, old.count)
        else:
            self.connection = Connection(old.nettype, addrtype, address)


class MediaDescription(_Block):
    """One ``m=`` section and the lines under it."""

    def __init__(self, lines: list[_Line], session: SessionDescription | None = None) -> None:
        if not lines or not isinstance(lines[0].parsed, _MediaLine):
            raise ValueError("a media description starts with its m= line")
        self._lines = lines
        self.session = session

    def __repr__(self) -> str:
        return f"<MediaDescription {self._m.media} {self._m.port} {self._m.proto}>"

    def _line_ending(self) -> bytes:
        return self.session.line_ending if self.session is not None else _CRLF

    def _connection_insert_index(self) -> int:
        # m=, i=, c=, b=, k=, a= (RFC 8866 section 5): after m= and any i=.
        i = 1
        while i < len(self._lines) and self._lines[i].kind == "i":
            i += 1
        return i

    @property
    def _m(self) -> _MediaLine:
        parsed = self._lines[0].parsed
        assert isinstance(parsed, _MediaLine)
        return parsed

    def _set_m(self, port: int, port_count: int | None) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        if port_count is not None and not 1 <= port_count <= 65535:
            raise ValueError(f"port count out of range: {port_count}")
        m = self._m
        field = str(port) if port_count is None else f"{port}/{port_count}"
        old = self._lines[0].raw
        raw = _replace_fields(old, (m.media, field))
        self._replace(0, _make_line(raw, "media port"))

    # -- the m= line

    @property
    def media(self) -> str:
        """``audio``, ``video``, ``application``, ..."""
        return self._m.media

    @property
    def port(self) -> int:
        return self._m.port

    @port.setter
    def port(self, port: int) -> None:
        self._set_m(port, self._m.port_count)

    @property
    def port_count(self) -> int | None:
        """The ``/2`` of ``m=audio 49170/2``; None when not written."""
        return self._m.port_count

    @port_count.setter
    def port_count(self, count: int | None) -> None:
        self._set_m(self._m.port, count)

    @property
    def proto(self) -> str:
        return self._m.proto

    @proto.setter
    def proto(self, proto: str) -> None:
        """Change the transport protocol (``RTP/AVP`` ...); the other fields stay as written."""
        old = self._lines[0].raw
        spans = _spans(old)
        s, e = spans[2]
        line = _make_line(old[:s] + _encode(proto) + old[e:], "media proto")
        parsed = line.parsed
        if not isinstance(parsed, _MediaLine) or parsed.proto != proto:
            raise ValueError(f"invalid media proto {proto!r}")
        self._replace(0, line)

    @property
    def formats(self) -> list[str]:
        return list(self._m.formats)

    @property
    def is_disabled(self) -> bool:
        """Port 0: the stream is rejected or removed (RFC 3264 section 6)."""
        return self._m.port == 0

    # -- connection

    @property
    def connections(self) -> list[Connection]:
        """All media-level c= lines (several only for layered multicast)."""
        return [ln.parsed for ln in self._lines if isinstance(ln.parsed, Connection)]

    @property
    def effective_connection(self) -> Connection | None:
        """Where this stream's media goes: its own c=, else the session's."""
        own = self.connection
        if own is not None or self.session is None:
            return own
        return self.session.connection

    # -- attributes with meaning for the proxy

    @property
    def direction(self) -> str:
        """The media direction: this section's, else the session's, else sendrecv."""
        own = self._own_direction()
        if own is not None:
            return own
        return self.session.direction if self.session is not None else "sendrecv"

    @direction.setter
    def direction(self, direction: str) -> None:
        self._set_direction(direction)

    @property
    def is_hold(self) -> bool:
        """Held by the offerer: sendonly/inactive, or a 0.0.0.0 connection address."""
        if self.direction in ("sendonly", "inactive"):
            return True
        conn = self.effective_connection
        return conn is not None and conn.is_hold

    @property
    def rtcp(self) -> Rtcp | None:
        for _, a in self._attr_lines():
            if a.name == "rtcp":
                return _parse_rtcp(a.value, None)
        return None

    @rtcp.setter
    def rtcp(self, rtcp: Rtcp | None) -> None:
        if rtcp is None:
            self.remove_attributes("rtcp")
            return
        parsed = _parse_rtcp_arg(rtcp.value())
        if parsed != rtcp:
            raise ValueError(f"invalid rtcp attribute: {rtcp!r}")
        self.set_attribute("rtcp", rtcp.value())

    def set_rtcp(self, port: int, address: str | None = None, addrtype: str | None = None) -> None:
        """Set ``a=rtcp``; with an address, as ``PORT IN <addrtype> <address>``."""
        if address is None:
            self.rtcp = Rtcp(port)
        else:
            address = _strip_brackets(address)
            self.rtcp = Rtcp(port, "IN", addrtype or _infer_addrtype(address), address)

    @property
    def rtcp_mux(self) -> bool:
        return self.has_attribute("rtcp-mux")

    @rtcp_mux.setter
    def rtcp_mux(self, on: bool) -> None:
        if not on:
            self.remove_attributes("rtcp-mux")
        elif not self.rtcp_mux:
            self.add_attribute("rtcp-mux")

    @property
    def crypto(self) -> list[Crypto]:
        """SDES keys (a=crypto); the proxy passes them on as written."""
        return [Crypto.from_value(v) for v in self.get_attributes("crypto") if v is not None]

    @property
    def candidates(self) -> list[Candidate]:
        return [Candidate.from_value(v) for v in self.get_attributes("candidate") if v is not None]

    def to_bytes(self) -> bytes:
        return b"".join(ln.raw + ln.eol for ln in self._lines)


def _parse_rtcp_arg(value: str) -> Rtcp:
    try:
        return _parse_rtcp(value, None)
    except SdpError as e:
        raise ValueError(str(e)) from None


class SessionDescription(_Block):
    """A whole SDP body: the session-level lines, then ``media``. Build it with ``parse_sdp``."""

    def __init__(
        self,
        lines: list[_Line],
        media: list[MediaDescription],
        trailer: bytes = b"",
        line_ending: bytes = _CRLF,
    ) -> None:
        self._lines = lines
        self.media = media
        self._trailer = trailer
        # The ending the body uses (CRLF or LF); lines we add get it.
        self.line_ending = line_ending
        for m in media:
            m.session = self

    def __repr__(self) -> str:
        return f"<SessionDescription origin={self.origin!r} media={self.media!r}>"

    def _line_ending(self) -> bytes:
        return self.line_ending

    def _connection_insert_index(self) -> int:
        # v o s i u e p c b t r z k a: before the first of b t r z k a.
        for i, ln in enumerate(self._lines):
            if ln.kind in "btrzka":
                return i
        return len(self._lines)

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def to_bytes(self) -> bytes:
        parts = [ln.raw + ln.eol for ln in self._lines]
        parts.extend(m.to_bytes() for m in self.media)
        parts.append(self._trailer)
        return b"".join(parts)

    def copy(self) -> SessionDescription:
        """An independent copy: changing it leaves this one as it was."""
        media = [MediaDescription([ln.clone() for ln in m._lines]) for m in self.media]
        return SessionDescription(
            [ln.clone() for ln in self._lines], media, self._trailer, self.line_ending
        )

    @property
    def version(self) -> int:
        return 0  # parse_sdp accepts nothing else

    @property
    def session_name(self) -> str | None:
        for ln in self._lines:
            if ln.kind == "s":
                return _text(ln.raw[2:])
        return None

    @property
    def origin(self) -> Origin | None:
        for ln in self._lines:
            if isinstance(ln.parsed, Origin):
                return ln.parsed
        return None

    @origin.setter
    def origin(self, origin: Origin) -> None:
        found = self._indexes("o")
        if found:
            raw = _replace_fields(self._lines[found[0]].raw, origin.fields())
        else:
            raw = b"o=" + _encode(" ".join(origin.fields()))
        line = _make_line(raw, "origin")
        if line.parsed != origin:
            raise ValueError(f"origin does not survive serialization: {origin!r}")
        if found:
            self._replace(found[0], line)
        else:
            self._insert(1, line)

    def set_origin_address(self, address: str, addrtype: str | None = None) -> None:
        """Rewrite the o= address (the type follows the address unless given)."""
        old = self.origin
        if old is None:
            raise ValueError("the description has no o= line")
        address = _strip_brackets(address)
        self.origin = Origin(
            old.username,
            old.sess_id,
            old.sess_version,
            old.nettype,
            addrtype or _infer_addrtype(address),
            address,
        )

    @property
    def direction(self) -> str:
        """The session-level direction attribute (the default for every media), or sendrecv."""
        return self._own_direction() or "sendrecv"

    @direction.setter
    def direction(self, direction: str) -> None:
        self._set_direction(direction)

    def remove_ice_everywhere(self) -> int:
        """Strip ICE from the session level and from every media section."""
        return self.remove_ice() + sum(m.remove_ice() for m in self.media)


# --------------------------------------------------------------------------- parsing


def parse_sdp(body: bytes | bytearray | memoryview) -> SessionDescription:
    """Parse an SDP body; raises ``SdpError`` (and nothing else) on anything malformed.

    Lenient where the wire is (LF or CRLF, a missing final line ending, trailing blank lines,
    missing s=/t=), strict where the proxy must understand a line to rewrite it (o=, c=, m=,
    a=rtcp).
    """
    body = bytes(body)
    if len(body) > MAX_BODY_SIZE:
        raise SdpError(f"body larger than {MAX_BODY_SIZE} bytes")
    if not body.startswith(b"v="):
        raise SdpError("SDP must start with v=", 1)
    pieces = body.split(b"\n")
    if len(pieces) > MAX_LINES + 1:
        raise SdpError(f"more than {MAX_LINES} lines")
    last = len(pieces) - 1  # pieces[last] is what follows the final LF ("" if body ends in LF)
    lines: list[tuple[bytes, bytes]] = []
    for i, piece in enumerate(pieces):
        if i < last:
            if piece.endswith(b"\r"):
                lines.append((piece[:-1], _CRLF))
            else:
                lines.append((piece, _LF))
        elif piece:
            if piece.endswith(b"\r"):
                lines.append((piece[:-1], b"\r"))
            else:
                lines.append((piece, b""))
    # Trailing empty lines are tolerated and kept; empty lines elsewhere are not SDP.
    end = len(lines)
    while end > 0 and not lines[end - 1][0]:
        end -= 1
    trailer = b"".join(eol for _, eol in lines[end:])
    lines = lines[:end]

    session: list[_Line] = []
    media: list[list[_Line]] = []
    seen: set[str] = set()
    for n, (raw, eol) in enumerate(lines, 1):
        parsed = _parse_line(raw, n)
        line = _Line(raw, eol, parsed)
        kind = line.kind
        if n == 1:
            if raw != b"v=0":
                raise SdpError("unsupported SDP version", 1)
        elif kind == "v":
            raise SdpError("second v= line", n)
        if kind == "m":
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            if kind in "osc" and kind in seen:
                raise SdpError(f"more than one session-level {kind}= line", n)
            seen.add(kind)
            session.append(line)
    eol = lines[0][1] if lines[0][1] in (_CRLF, _LF) else _CRLF
    return SessionDescription(session, [MediaDescription(m) for m in media], trailer, eol)
