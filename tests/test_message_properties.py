"""Property tests: generated messages round-trip; hostile bytes only ever raise ParseError;
header rewrites touch only the line they rewrite."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sipproxy.errors import ParseError
from sipproxy.message import (
    Request,
    Response,
    StreamFramer,
    Via,
    parse_message,
)
from sipproxy.uri import parse_name_addr, unescape

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

DATA = Path(__file__).parent / "data"
CORPUS = sorted(
    p.read_bytes()
    for d in ("rfc4475", "rfc5118")
    for p in (DATA / d).iterdir()
    if p.name not in ("EXPECTED.tsv", "SHA256SUMS", "SOURCE.txt") and not p.name.startswith(".")
)

# -- strategies --------------------------------------------------------------------------------
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
TOKEN_CHARS = ALNUM + "-.!%*_+`'~"
token = st.text(TOKEN_CHARS, min_size=1, max_size=12)
LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
label = st.builds(lambda a, mid, b: a + mid + b if mid else a,
                  st.sampled_from(LOWER), st.text(LOWER + "-", max_size=6), st.sampled_from(LOWER))
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a)))
host = st.one_of(hostname, ipv4, ipv6)
port = st.one_of(st.none(), st.integers(1, 65535))
user = st.text(ALNUM + "-_.!~*'()&=+$,;?/", min_size=1, max_size=12) | st.builds(
    lambda a, b: f"{a}%{b:02X}", st.text(ALNUM, min_size=1, max_size=6), st.integers(0, 255))
param_chars = ALNUM + "-_.!~*'()"
uri_param = st.tuples(st.text(param_chars, min_size=1, max_size=8),
                      st.one_of(st.none(), st.text(param_chars, min_size=1, max_size=8)))
header_param = st.tuples(token, st.one_of(st.none(), token))


def fmt_host(h: str) -> str:
    return f"[{h}]" if ":" in h else h


def fmt_params(params: list[tuple[str, str | None]]) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


@dataclass
class GenURI:
    scheme: str
    user: str | None
    host: str
    port: int | None
    params: list[tuple[str, str | None]]

    def text(self) -> str:
        u = f"{self.user}@" if self.user is not None else ""
        p = "" if self.port is None else f":{self.port}"
        return f"{self.scheme}:{u}{fmt_host(self.host)}{p}{fmt_params(self.params)}"


sip_uri = st.builds(GenURI, st.sampled_from(["sip", "sips", "SIP"]), st.one_of(st.none(), user),
                    host, port, st.lists(uri_param, max_size=3))


@dataclass
class GenNameAddr:
    display: str | None
    uri: GenURI
    params: list[tuple[str, str | None]]
    angle: bool

    def text(self) -> str:
        if self.angle or self.display or self.uri.params or (self.uri.user and any(
                c in self.uri.user for c in ";?,")):
            d = f"{self.display} " if self.display else ""
            return f"{d}<{self.uri.text()}>{fmt_params(self.params)}"
        return f"{self.uri.text()}{fmt_params(self.params)}"


display = st.one_of(
    st.none(),
    st.text(ALNUM + " ,;:<>@", max_size=12).map(lambda t: f'"{t}"'),
    st.lists(token, min_size=1, max_size=3).map(" ".join),
)
name_addr = st.builds(GenNameAddr, display, sip_uri,
                      st.lists(header_param.filter(lambda p: p[0].lower() != "tag"), max_size=2),
                      st.booleans())


@dataclass
class GenVia:
    transport: str
    host: str
    port: int | None
    branch: str
    received: str | None
    rport: int | bool | None
    extra: list[tuple[str, str | None]] = field(default_factory=list)

    def text(self) -> str:
        p = "" if self.port is None else f":{self.port}"
        params: list[tuple[str, str | None]] = [("branch", self.branch)]
        if self.received is not None:
            params.append(("received", self.received))
        if self.rport is True:
            params.append(("rport", None))
        elif self.rport is not None and self.rport is not False:
            params.append(("rport", str(self.rport)))
        params += self.extra
        return f"SIP/2.0/{self.transport} {fmt_host(self.host)}{p}{fmt_params(params)}"


via_extra = st.tuples(st.sampled_from(["x", "foo", "comp", "alias"]), st.one_of(st.none(), token))
gen_via = st.builds(
    GenVia,
    st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "WS"]),
    host,
    port,
    token.map(lambda t: "z9hG4bK" + t),
    st.one_of(st.none(), ipv4, ipv6),
    st.one_of(st.none(), st.just(True), st.integers(1, 65535)),
    st.lists(via_extra, max_size=2),
)
METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "MESSAGE", "SUBSCRIBE",
           "NOTIFY", "FOO-BAR"]


@dataclass
class GenMessage:
    method: str
    status: int | None
    reason: str
    ruri: GenURI
    vias: list[GenVia]
    via_join: list[bool]  # join this via onto the previous line with a comma
    from_: GenNameAddr
    from_tag: str
    to: GenNameAddr
    to_tag: str | None
    call_id: str
    cseq: int
    max_forwards: int | None
    contacts: list[GenNameAddr]
    extra: list[tuple[str, str]]
    body: bytes
    compact: bool

    def lines(self) -> list[str]:
        c = self.compact
        if self.status is None:
            start = f"{self.method} {self.ruri.text()} SIP/2.0"
        else:
            start = f"SIP/2.0 {self.status} {self.reason}"
        out = [start]
        for i, v in enumerate(self.vias):
            if i and self.via_join[i]:
                out[-1] += f", {v.text()}"
            else:
                out.append(f"{'v' if c else 'Via'}: {v.text()}")
        out.append(f"{'f' if c else 'From'}: {self.from_.text()};tag={self.from_tag}")
        to_tag = f";tag={self.to_tag}" if self.to_tag else ""
        out.append(f"{'t' if c else 'To'}: {self.to.text()}{to_tag}")
        out.append(f"{'i' if c else 'Call-ID'}: {self.call_id}")
        out.append(f"CSeq: {self.cseq} {self.method}")
        if self.max_forwards is not None:
            out.append(f"Max-Forwards: {self.max_forwards}")
        if self.contacts:
            out.append(f"{'m' if c else 'Contact'}: "
                       + ", ".join(n.text() for n in self.contacts))
        out += [f"{n}: {v}" for n, v in self.extra]
        out.append(f"{'l' if c else 'Content-Length'}: {len(self.body)}")
        return out

    def data(self) -> bytes:
        return ("\r\n".join(self.lines()) + "\r\n\r\n").encode() + self.body


extra_header = st.tuples(
    st.sampled_from(["Subject", "X-Custom", "User-Agent", "Allow", "Supported", "P-Foo"]),
    st.text(ALNUM + " ,;=<>:@/", max_size=20).map(str.strip),
)
gen_message = st.builds(
    GenMessage,
    st.sampled_from(METHODS),
    st.one_of(st.none(), st.integers(100, 699)),
    st.text(ALNUM + " ", max_size=15).map(str.strip).filter(bool),
    sip_uri,
    st.lists(gen_via, min_size=1, max_size=4),
    st.lists(st.booleans(), min_size=4, max_size=4),
    name_addr,
    token,
    name_addr,
    st.one_of(st.none(), token),
    st.builds(lambda w, h: w + h, st.text(ALNUM + ".!%*_+`'~()<>:\\\"/[]?{}-", min_size=1,
                                           max_size=20),
              st.one_of(st.just(""), st.text(ALNUM + ".-", min_size=1, max_size=10).map(
                  lambda t: "@" + t))),
    st.integers(0, 2**32 - 1),
    st.one_of(st.none(), st.integers(0, 255)),
    st.lists(name_addr, max_size=3),
    st.lists(extra_header, max_size=3),
    st.binary(max_size=200),
    st.booleans(),
)


# -- helpers -------------------------------------------------------------------------------------
def touch_everything(msg: Request | Response) -> None:
    """Read every typed view; any error must be a ParseError."""
    for via in msg.vias:
        _ = (via.protocol, via.transport, via.host, via.port, via.branch, via.received,
             via.rport, via.maddr, via.sent_by, str(via))
    _ = (msg.top_via, msg.call_id, msg.cseq, msg.max_forwards, msg.content_length, msg.body)
    for na in (msg.from_, msg.to, *msg.contacts, *msg.name_addrs("Route"),
               *msg.name_addrs("Record-Route")):
        uri = na.uri
        _ = (na.display, na.tag, str(na), uri.user, uri.host, uri.port, uri.transport,
             uri.aor(), uri.headers, list(uri.params), str(uri))
        if uri.user is not None:
            unescape(uri.user)
    if isinstance(msg, Request):
        uri = msg.uri
        _ = (msg.method, uri.scheme, uri.user, uri.host, uri.port, str(uri), uri.aor())
        resp = msg.make_response(400)
        resp.to_bytes()
    else:
        _ = (msg.status, msg.reason)
    for name, value in msg.headers:
        msg.headers.get_all(name)
        _ = value
    dup = msg.copy()
    dup.body = b"x"
    dup.to_bytes()
    msg.to_bytes()


def parse_only_parse_error(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except ParseError:
        return
    try:
        touch_everything(msg)
    except ParseError:
        pass


def field_view(msg: Request | Response) -> tuple[object, ...]:
    start: tuple[object, ...]
    if isinstance(msg, Request):
        start = (msg.method, str(msg.uri), msg.uri.user, msg.uri.host, msg.uri.port,
                 list(msg.uri.params))
    else:
        assert isinstance(msg, Response)
        start = (msg.status, msg.reason)
    vias = [(v.transport, v.host, v.port, v.branch, v.received, v.rport, list(v.params))
            for v in msg.vias]
    nas = [(na.display, str(na.uri), na.tag, list(na.params))
           for na in (msg.from_, msg.to, *msg.contacts)]
    return (start, vias, nas, msg.call_id, msg.cseq, msg.max_forwards, msg.content_length,
            list(msg.headers), msg.body)


# -- round trip ----------------------------------------------------------------------------------
@SETTINGS
@given(gen_message)
def test_generated_messages_round_trip(gen: GenMessage) -> None:
    data = gen.data()
    msg = parse_message(data)
    # the fields are the ones generated
    if gen.status is None:
        assert isinstance(msg, Request)
        assert msg.method == gen.method
        assert msg.uri.host == gen.ruri.host
        assert msg.uri.port == gen.ruri.port
        assert msg.uri.user == gen.ruri.user
        assert list(msg.uri.params) == gen.ruri.params
    else:
        assert isinstance(msg, Response)
        assert (msg.status, msg.reason) == (gen.status, gen.reason)
    assert [(v.transport, v.host, v.port, v.branch, v.received, v.rport) for v in msg.vias] == [
        (g.transport, g.host, g.port, g.branch, g.received, g.rport) for g in gen.vias]
    assert msg.from_.tag == gen.from_tag
    assert msg.to.tag == gen.to_tag
    assert msg.from_.uri.host == gen.from_.uri.host
    assert msg.to.uri.user == gen.to.uri.user
    assert [c.uri.host for c in msg.contacts] == [c.uri.host for c in gen.contacts]
    assert [list(c.params) for c in msg.contacts] == [c.params for c in gen.contacts]
    assert msg.call_id == gen.call_id
    assert (msg.cseq.number, msg.cseq.method) == (gen.cseq, gen.method)
    assert msg.max_forwards == gen.max_forwards
    assert msg.body == gen.body
    # serialize: byte-identical; parse again: the same fields; serialize again: identical
    out = msg.to_bytes()
    assert out == data
    again = parse_message(out)
    assert field_view(again) == field_view(msg)
    assert again.to_bytes() == data


@SETTINGS
@given(gen_message, st.binary(max_size=100))
def test_changed_body_round_trips(gen: GenMessage, body: bytes) -> None:
    msg = parse_message(gen.data())
    msg.body = body
    out = msg.to_bytes()
    again = parse_message(out)
    assert again.body == body
    assert again.content_length == len(body)
    assert again.to_bytes() == out


@SETTINGS
@given(gen_message)
def test_generated_messages_frame_on_a_stream(gen: GenMessage) -> None:
    data = gen.data()
    framer = StreamFramer()
    assert framer.feed(data + data[:7]) == [data]
    assert framer.feed(data[7:]) == [data]


# -- hostile input -------------------------------------------------------------------------------
@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(CORPUS)))
    head = max(1, data.find(b"\r\n\r\n"))  # mostly mutate the header section
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        op = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3, 4, 5]))
        i = draw(st.integers(0, min(head, len(data)) - 1))
        if op == 0:  # replace one byte
            data[i] = draw(st.integers(0, 255))
        elif op == 1:  # insert interesting bytes
            data[i:i] = draw(st.sampled_from(
                [b",", b";", b":", b"<", b">", b'"', b"\\", b"\r\n", b"\r\n ", b" ", b"%",
                 b"[", b"]", b"=", b"@", b"\x00", b"\xff", b"*", b"?", b"SIP/2.0"]))
        elif op == 2:  # delete a slice
            data[i : i + draw(st.integers(1, 4))] = b""
        elif op == 3:  # truncate
            del data[i:]
        elif op == 4:  # duplicate a slice
            j = min(len(data), i + draw(st.integers(1, 40)))
            data[i:i] = data[i:j]
        else:  # swap a digit for a big number
            data[i:i] = str(draw(st.integers(0, 2**40))).encode()
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_corpus_only_raises_parse_error(data: bytes) -> None:
    parse_only_parse_error(data)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_parse_error(data: bytes) -> None:
    parse_only_parse_error(data)
    parse_only_parse_error(b"INVITE sip:a@b SIP/2.0\r\n" + data)


@SETTINGS
@given(gen_message.map(lambda g: g.lines()), st.data())
def test_mutated_generated_header_lines(lines: list[str], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(lines) - 1))
    junk = data.draw(st.text(ALNUM + " ,;:<>\"\\[]@%=?*/\t", max_size=10))
    j = data.draw(st.integers(0, len(lines[i])))
    lines = [*lines]
    lines[i] = lines[i][:j] + junk + lines[i][j:]
    parse_only_parse_error(("\r\n".join(lines) + "\r\n\r\n").encode())


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(CORPUS),
                          st.sampled_from([b"\r\n", b"\r\n\r\n", b"\r", b"\n"])), max_size=8))
def test_stream_framer_only_raises_parse_error(chunks: list[bytes]) -> None:
    framer = StreamFramer()
    try:
        for chunk in chunks:
            for item in framer.feed(chunk):
                if isinstance(item, bytes):
                    parse_only_parse_error(item)
    except ParseError:
        pass


# -- rewrites touch only their own line ---------------------------------------------------------
def other_lines(data: bytes, prefix_names: tuple[bytes, ...]) -> list[bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return [line for line in head.split(b"\r\n")
            if line.split(b":", 1)[0].strip().lower() not in prefix_names] + [body]


@SETTINGS
@given(gen_message, st.one_of(ipv4, ipv6), st.integers(1, 65535))
def test_update_top_via_changes_only_the_top_via(gen: GenMessage, received: str,
                                                 rport: int) -> None:
    data = gen.data()
    msg = parse_message(data)
    top = msg.top_via
    assert top is not None
    top.set_param("received", received)
    top.set_param("rport", str(rport))
    msg.update_top_via(top)
    out = msg.to_bytes()
    before = data.split(b"\r\n")
    after = out.split(b"\r\n")
    k = 1  # the first Via line follows the start line
    assert after[:k] + after[k + 1 :] == before[:k] + before[k + 1 :]
    again = parse_message(out)
    new_top = again.top_via
    assert new_top is not None
    assert (new_top.received, new_top.rport) == (received, rport)
    assert new_top.branch == gen.vias[0].branch
    assert [str(v) for v in again.vias[1:]] == [g.text() for g in gen.vias[1:]]


@SETTINGS
@given(gen_message, st.lists(name_addr, min_size=1, max_size=3))
def test_set_contacts_changes_only_contact(gen: GenMessage, new: list[GenNameAddr]) -> None:
    data = gen.data()
    msg = parse_message(data)
    contacts = [parse_name_addr(n.text()) for n in new]
    msg.set_contacts(contacts)
    out = msg.to_bytes()
    names = (b"contact", b"m")
    assert other_lines(out, names) == other_lines(data, names)
    again = parse_message(out)
    assert [str(c) for c in again.contacts] == [n.text() for n in new]


@SETTINGS
@given(gen_message, gen_via)
def test_push_then_pop_via_restores_message(gen: GenMessage, via: GenVia) -> None:
    data = gen.data()
    msg = parse_message(data)
    pushed = Via.build(via.transport, via.host, via.port, via.branch)
    msg.push_via(pushed)
    assert parse_message(msg.to_bytes()).vias[0].branch == via.branch
    assert msg.pop_via() is pushed
    assert msg.to_bytes() == data


# -- packed header sections (a transaction's kept messages) ---------------------------------------
@SETTINGS
@given(gen_message, st.booleans())
def test_compacted_message_renders_and_reads_back_the_same(gen: GenMessage, lf: bool) -> None:
    data = gen.data()
    if lf:  # an LF-only message packs with its own line end
        head, _, body = data.partition(b"\r\n\r\n")
        assume(b"\r\n\r\n" not in body)  # the parser looks for a CRLF blank line first
        data = head.replace(b"\r\n", b"\n") + b"\n\n" + body
    msg = parse_message(data)
    before = [(f.name, f.key, f.value, f.render()) for f in msg.headers.fields]
    view = field_view(msg)
    msg.compact()
    assert msg.to_bytes() == data  # rendered from the packed text
    assert msg.copy().to_bytes() == data
    assert [(f.name, f.key, f.value, f.render()) for f in msg.headers.fields] == before
    assert field_view(msg) == view
    assert msg.to_bytes() == data


@SETTINGS
@given(gen_message, token)
def test_compacted_message_changes_like_an_unpacked_one(gen: GenMessage, value: str) -> None:
    packed, plain = parse_message(gen.data()), parse_message(gen.data())
    packed.compact()
    for msg in (packed, plain):
        msg.headers.set("Subject", value)
        msg.headers.add("X-Added", value, first=True)
        msg.pop_via()
    assert packed.to_bytes() == plain.to_bytes()


@SETTINGS
@given(gen_message.filter(lambda g: g.status is None))
def test_compacted_request_reads_its_uri_back(gen: GenMessage) -> None:
    msg = parse_message(gen.data())
    assert isinstance(msg, Request)
    text = str(msg.uri)
    msg.compact()
    assert str(msg.uri) == text and msg.uri.host == gen.ruri.host
    msg.uri.set_param("x-changed", None)  # a URI changed in place after compaction still counts
    assert msg.to_bytes().split(b" ", 2)[1] == f"{text};x-changed".encode()


# -- forwarding re-uses the received lines -------------------------------------------------------
def _rendered_anew(msg: Request | Response) -> bytes:
    """The old way: every header line rendered from its name and value."""
    dup = msg.copy()
    for f in dup.headers.fields:
        f.raw = None
    return dup.to_bytes()


@SETTINGS
@given(gen_message.filter(lambda g: g.status is None), gen_via, st.booleans(), st.booleans())
def test_forwarded_copy_equals_a_full_re_serialization(gen: GenMessage, via: GenVia,
                                                       compact: bool, rr: bool) -> None:
    received = parse_message(gen.data())
    assert isinstance(received, Request)
    if compact:  # a transaction's kept request, packed, forwarded again
        received.compact()
    out = received.copy()
    out.push_via(Via.build(via.transport, via.host, via.port, via.branch, rport=True))
    mf = out.max_forwards
    out.max_forwards = mf - 1 if mf else 70
    if rr:
        host = f"[{via.host}]" if ":" in via.host else via.host
        out.headers.add("Record-Route", f"<sip:{host};lr>", first=True)
    edited, anew = parse_message(out.to_bytes()), parse_message(_rendered_anew(out))
    # header by header, the same fields and values; the body and start line untouched
    assert list(edited.headers) == list(anew.headers)
    assert field_view(edited) == field_view(anew)
    assert edited.body == received.body
    # and every line nobody touched is the very line that was received
    received_lines = set(gen.data().split(b"\r\n\r\n")[0].split(b"\r\n")[1:])
    touched = (b"via", b"v", b"max-forwards", b"record-route")
    for line in out.to_bytes().split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        if line.split(b":", 1)[0].strip().lower() not in touched:
            assert line in received_lines
