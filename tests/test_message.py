"""Messages: typed accessors, header editing, serialization, limits (sipproxy.message)."""

from __future__ import annotations

import gc
import os

import pytest

from sipproxy.errors import ParseError
from sipproxy.headers import Headers, canonical
from sipproxy.message import (
    MAGIC_COOKIE,
    CSeq,
    KeepAlive,
    Limits,
    Request,
    Response,
    Source,
    Via,
    new_branch,
    new_tag,
    parse_message,
)
from sipproxy.message import parse_via as _parse_via
from sipproxy.uri import parse_name_addr, parse_uri

CRLF = "\r\n"


def raw(*lines: str, body: str = "") -> bytes:
    return (CRLF.join(lines) + CRLF + CRLF + body).encode()


INVITE_LINES = (
    "INVITE sip:bob@example.com SIP/2.0",
    "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds;rport",
    "Via: SIP/2.0/TCP proxy.example.com;branch=z9hG4bKabc, SIP/2.0/UDP [2001:db8::1]:5070"
    ";branch=z9hG4bKdef;received=192.0.2.9;rport=6000;maddr=224.0.0.1;ttl=1",
    "Max-Forwards: 70",
    'To: "Bob" <sip:bob@example.com>',
    'From: "Alice, A." <sip:alice@example.com>;tag=1928301774',
    "Call-ID: a84b4c76e66710@pc33.example.com",
    "CSeq: 314159 INVITE",
    "Contact: <sip:alice@pc33.example.com;transport=tcp>;expires=60, sip:alice@10.0.0.1;q=0.5",
    "Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
    "Record-Route: <sip:rr.example.com;lr>",
    "X-Custom:   keep   this  ",
    "Content-Type: application/sdp",
    "Content-Length: 4",
)


def invite(body: str = "v=0\n") -> Request:
    msg = parse_message(raw(*INVITE_LINES, body=body))
    assert isinstance(msg, Request)
    return msg


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


# -- start line ----------------------------------------------------------------------------------
def test_request_line() -> None:
    msg = invite()
    assert msg.method == "INVITE"
    assert str(msg.uri) == "sip:bob@example.com"
    assert msg.version == "SIP/2.0"
    assert msg.body == b"v=0\n"


def test_response_line() -> None:
    data = raw("SIP/2.0 180 Ringing Now", *INVITE_LINES[1:3], *INVITE_LINES[4:8],
               "Content-Length: 0")
    msg = parse_message(data)
    assert isinstance(msg, Response)
    assert (msg.status, msg.reason, msg.version) == (180, "Ringing Now", "SIP/2.0")
    assert msg.to_bytes() == data
    msg.set_status(183)
    assert msg.to_bytes().startswith(b"SIP/2.0 183 Session Progress\r\n")


def test_request_uri_settable() -> None:
    msg = invite()
    msg.uri = parse_uri("sip:bob@10.0.0.2:5062")
    assert msg.to_bytes().startswith(b"INVITE sip:bob@10.0.0.2:5062 SIP/2.0\r\n")


def test_request_uri_changed_in_place() -> None:
    msg = invite()
    msg.uri.host = "10.0.0.3"
    assert msg.to_bytes().startswith(b"INVITE sip:bob@10.0.0.3 SIP/2.0\r\n")
    msg2 = invite()
    msg2.uri.set_param("transport", "tcp")
    msg2.touch_uri()
    assert msg2.to_bytes().startswith(b"INVITE sip:bob@example.com;transport=tcp SIP/2.0\r\n")


# -- Via -------------------------------------------------------------------------------------------
def test_via_accessors() -> None:
    vias = invite().vias
    assert len(vias) == 3
    a, b, c = vias
    assert (a.protocol, a.transport, a.host, a.port) == ("SIP/2.0", "UDP", "192.0.2.1", 5060)
    assert a.branch == "z9hG4bK776asdhds"
    assert a.rport is True
    assert a.received is None and a.maddr is None
    assert (b.transport, b.host, b.port, b.rport) == ("TCP", "proxy.example.com", None, None)
    assert (c.transport, c.host, c.port) == ("UDP", "2001:db8::1", 5070)
    assert c.sent_by == ("2001:db8::1", 5070)
    assert c.received == "192.0.2.9"
    assert c.rport == 6000
    assert c.maddr == "224.0.0.1"
    assert c.params.get("ttl") == "1"
    assert str(c) == ("SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bKdef;received=192.0.2.9"
                      ";rport=6000;maddr=224.0.0.1;ttl=1")


def test_top_via() -> None:
    msg = invite()
    top = msg.top_via
    assert top is not None and top.branch == "z9hG4bK776asdhds"


@pytest.mark.parametrize(
    ("text", "transport", "host", "port"),
    [
        ("SIP/2.0/UDP h.example.com", "UDP", "h.example.com", None),
        ("SIP/2.0/tcp h:1", "TCP", "h", 1),
        ("sip / 2.0 / tls  h ; branch = z9hG4bKx", "TLS", "h", None),
        ("SIP/2.0/UDP [::1]:5060;branch=z9hG4bK1", "UDP", "::1", 5060),
        ("SIP/2.0/WSS 192.0.2.1:443;branch=z9hG4bK1", "WSS", "192.0.2.1", 443),
        ("SIP/2.0/UDP 192.0.2.1;received=[2001:db8::9]", "UDP", "192.0.2.1", None),
    ],
)
def test_parse_via_shapes(text: str, transport: str, host: str, port: int | None) -> None:
    via = _parse_via(text)
    assert (via.transport, via.host, via.port) == (transport, host, port)
    assert str(via) == text  # unchanged: rendered as received


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP",
        "SIP/2.0 host",
        "SIP/2.0/UDP host:99999",
        "SIP/2.0/UDP host;rport=x",
        "SIP/2.0/UDP host;rport=70000",
        "SIP/2.0/UDP host;branch",
        "SIP/2.0/UDP host;received",
        "SIP/2.0/UDP host;ttl=300",
        "SIP/2.0/UDP host;;branch=z9hG4bK1",
        "SIP/2.0/UDP [2001:db8:::1]",
        "SIP/2.0/UDP h<o>st",
        "SIP/2.0/UDP ho$t;branch=z9hG4bK1",
        "SIP/2.0/UDP -bad;branch=z9hG4bK1",
        "SIP/2.0/UDP a..b:5060;branch=z9hG4bK1",
        "SIP/2.0/UDP host;rport=\u0661",
        "HTTP/2.0/UDP host",
    ],
)
def test_bad_via(text: str) -> None:
    with pytest.raises(ParseError):
        _parse_via(text)


def test_via_bad_version_is_505() -> None:
    with pytest.raises(ParseError) as exc:
        _parse_via("SIP/3.0/UDP host")
    assert exc.value.status == 505


def test_via_build_and_params() -> None:
    via = Via.build("udp", "2001:db8::5", 5060, "z9hG4bKnew", rport=True)
    assert str(via) == "SIP/2.0/UDP [2001:db8::5]:5060;branch=z9hG4bKnew;rport"
    assert via.rport is True
    via.set_param("received", "192.0.2.7")
    via.set_param("rport", "4242")
    assert via.rport == 4242
    assert str(via) == ("SIP/2.0/UDP [2001:db8::5]:5060;branch=z9hG4bKnew;rport=4242"
                        ";received=192.0.2.7")
    via.remove_param("received")
    assert via.received is None
    assert str(Via.build("TCP", "h", None, "z9hG4bK1")) == "SIP/2.0/TCP h;branch=z9hG4bK1"


def test_via_attribute_change_renders_anew() -> None:
    via = _parse_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1")
    via.host = "192.0.2.1"
    via.port = 5080
    assert str(via) == "SIP/2.0/UDP 192.0.2.1:5080;branch=z9hG4bK1"
    via.transport = "TCP"
    assert str(via) == "SIP/2.0/TCP 192.0.2.1:5080;branch=z9hG4bK1"
    via.params.set("branch", "z9hG4bK2")
    via.touch()
    assert str(via) == "SIP/2.0/TCP 192.0.2.1:5080;branch=z9hG4bK2"


def test_via_copy_independent() -> None:
    via = _parse_via("SIP/2.0/UDP h;branch=z9hG4bK1")
    other = via.copy()
    other.set_param("received", "1.2.3.4")
    assert str(via) == "SIP/2.0/UDP h;branch=z9hG4bK1"
    assert via.received is None


def test_new_branch_and_tag() -> None:
    b1, b2 = new_branch(), new_branch()
    assert b1.startswith(MAGIC_COOKIE) and b1 != b2 and len(b1) > len(MAGIC_COOKIE) + 8
    assert new_tag() != new_tag()


def test_tags_and_branches_stay_random_and_unique_across_refills() -> None:
    # several times the 4 KiB the random bytes are drawn in at once
    tags = [new_tag() for _ in range(3000)]
    branches = [new_branch() for _ in range(3000)]
    assert len(set(tags)) == len(tags) and len(set(branches)) == len(branches)
    assert all(len(t) == 12 and int(t, 16) >= 0 for t in tags)  # 48 bits, RFC 3261 19.3
    assert all(len(b) == len(MAGIC_COOKIE) + 16 for b in branches)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_draws_other_branches_than_its_parent() -> None:
    new_branch()  # the parent holds unused random bytes when it forks
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write_end, " ".join(new_branch() for _ in range(4)).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as f:
        child = f.read().decode().split()
    parent = [new_branch() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)


# -- push / pop / update Via -----------------------------------------------------------------
def test_push_via_adds_line_above_and_rest_unchanged() -> None:
    msg = invite()
    before = msg.to_bytes()
    via = Via.build("UDP", "198.51.100.1", 5060, "z9hG4bKpushed")
    msg.push_via(via)
    assert msg.top_via is via
    assert len(msg.vias) == 4
    out = msg.to_bytes()
    assert lines_of(out)[1] == b"Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKpushed"
    assert lines_of(out)[:1] + lines_of(out)[2:] == lines_of(before)


def test_push_via_before_cache_filled() -> None:
    msg = invite()
    msg.push_via(Via.build("UDP", "h", None, "z9hG4bKp"))
    assert [v.branch for v in msg.vias][:2] == ["z9hG4bKp", "z9hG4bK776asdhds"]


def test_pop_via_own_line() -> None:
    msg = invite()
    before = lines_of(msg.to_bytes())
    top = msg.pop_via()
    assert top.branch == "z9hG4bK776asdhds"
    assert lines_of(msg.to_bytes()) == before[:1] + before[2:]
    assert [v.branch for v in msg.vias] == ["z9hG4bKabc", "z9hG4bKdef"]


def test_pop_via_from_comma_joined_line() -> None:
    msg = invite()
    msg.pop_via()
    second = msg.pop_via()
    assert second.branch == "z9hG4bKabc"
    (only,) = msg.vias
    assert only.branch == "z9hG4bKdef"
    out = msg.to_bytes()
    assert out.count(b"Via:") == 1
    assert b"Via: SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bKdef;" in out
    reparsed = parse_message(out)
    assert [v.branch for v in reparsed.vias] == ["z9hG4bKdef"]
    msg.pop_via()
    assert msg.vias == [] and msg.top_via is None
    with pytest.raises(ParseError):
        msg.pop_via()


def test_update_top_via_received_rport() -> None:
    msg = invite()
    before = lines_of(msg.to_bytes())
    top = msg.top_via
    assert top is not None
    top.set_param("received", "203.0.113.5")
    top.set_param("rport", "34567")
    msg.update_top_via(top)
    after = lines_of(msg.to_bytes())
    assert after[1] == (b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776asdhds;rport=34567"
                        b";received=203.0.113.5")
    assert after[:1] + after[2:] == before[:1] + before[2:]
    reparsed = parse_message(msg.to_bytes())
    assert reparsed.vias[0].received == "203.0.113.5"
    assert reparsed.vias[0].rport == 34567


def test_update_top_via_in_comma_joined_line() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "v: SIP/2.0/UDP h1;branch=z9hG4bK1 ,SIP/2.0/UDP h2",
               "To: <sip:a@b>", "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS",
               "l: 0")
    msg = parse_message(data)
    top = msg.vias[0]
    top.set_param("received", "192.0.2.1")
    msg.update_top_via(top)
    out = msg.to_bytes()
    assert lines_of(out)[1] == (
        b"v: SIP/2.0/UDP h1;branch=z9hG4bK1;received=192.0.2.1, SIP/2.0/UDP h2")
    assert [v.host for v in parse_message(out).vias] == ["h1", "h2"]


# -- CSeq, Call-ID, Max-Forwards, Content-Length -----------------------------------------------
def test_cseq_call_id() -> None:
    msg = invite()
    assert msg.cseq == CSeq(314159, "INVITE")
    assert str(msg.cseq) == "314159 INVITE"
    assert msg.call_id == "a84b4c76e66710@pc33.example.com"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0 INVITE", CSeq(0, "INVITE")), ("4294967295 INVITE", CSeq(4294967295, "INVITE")),
     ("  12   INVITE ", CSeq(12, "INVITE"))],
)
def test_cseq_values(value: str, expected: CSeq) -> None:
    data = raw("INVITE sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", f"CSeq: {value}")
    assert parse_message(data).cseq == expected


@pytest.mark.parametrize("value", ["4294967296 INVITE", "-1 INVITE", "1", "x INVITE",
                                   "1 INVITE extra", "1 INV<ITE", "\u0661 INVITE"])
def test_bad_cseq(value: str) -> None:
    data = raw("INVITE sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", f"CSeq: {value}")
    with pytest.raises(ParseError) as exc:
        parse_message(data)
    assert exc.value.status == 400


def test_max_forwards() -> None:
    msg = invite()
    assert msg.max_forwards == 70
    msg.max_forwards = 69
    assert msg.max_forwards == 69
    assert b"\r\nMax-Forwards: 69\r\n" in msg.to_bytes()


@pytest.mark.parametrize("value", ["256", "-1", "x", "1 2", "\u0661"])
def test_bad_max_forwards(value: str) -> None:
    lines = [*INVITE_LINES]
    lines[3] = f"Max-Forwards: {value}"
    with pytest.raises(ParseError):
        parse_message(raw(*lines, body="v=0\n"))


def test_content_length_accessor() -> None:
    assert invite().content_length == 4
    data = raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS")
    assert parse_message(data).content_length is None


@pytest.mark.parametrize("value", ["-1", "abc", "1 2", "0x10", "\u0661"])
def test_bad_content_length(value: str) -> None:
    lines = [*INVITE_LINES]
    lines[-1] = f"Content-Length: {value}"
    with pytest.raises(ParseError) as exc:
        parse_message(raw(*lines, body="v=0\n"))
    assert exc.value.status == 400


def test_body_shorter_than_content_length() -> None:
    lines = [*INVITE_LINES]
    lines[-1] = "Content-Length: 5"
    with pytest.raises(ParseError) as exc:
        parse_message(raw(*lines, body="v=0\n"))
    assert exc.value.status == 400


def test_extra_bytes_after_body_dropped() -> None:
    msg = parse_message(raw(*INVITE_LINES, body="v=0\nGARBAGE"))
    assert msg.body == b"v=0\n"
    assert not msg.to_bytes().endswith(b"GARBAGE")


# -- name-addr headers -------------------------------------------------------------------------
def test_from_to() -> None:
    msg = invite()
    assert msg.from_.display == '"Alice, A."'
    assert msg.from_.uri.user == "alice"
    assert msg.from_.tag == "1928301774"
    assert msg.to.display == '"Bob"'
    assert msg.to.tag is None


def test_contacts() -> None:
    contacts = invite().contacts
    assert [str(c.uri) for c in contacts] == ["sip:alice@pc33.example.com;transport=tcp",
                                              "sip:alice@10.0.0.1"]
    assert contacts[0].get_param("expires") == "60"
    assert contacts[1].get_param("q") == "0.5"
    assert len(contacts[1].uri.params) == 0


def test_route_record_route() -> None:
    msg = invite()
    assert [r.uri.host for r in msg.name_addrs("Route")] == ["p1.example.com", "p2.example.com"]
    assert all(r.uri.loose_route for r in msg.name_addrs("route"))
    assert [str(r) for r in msg.name_addrs("Record-Route")] == ["<sip:rr.example.com;lr>"]
    assert msg.name_addrs("Path") == []


def test_set_to_tag_changes_only_to_line() -> None:
    msg = invite()
    before = lines_of(msg.to_bytes())
    to = msg.to
    to.tag = "xyz"
    msg.set_name_addr("To", to)
    after = lines_of(msg.to_bytes())
    assert after[4] == b'To: "Bob" <sip:bob@example.com>;tag=xyz'
    assert after[:4] + after[5:] == before[:4] + before[5:]
    assert msg.to.tag == "xyz"


def test_set_name_addr_by_compact_name() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "v: SIP/2.0/UDP h", "t: <sip:a@b>",
               "f: <sip:c@d>;tag=1", "i: x", "CSeq: 1 OPTIONS")
    msg = parse_message(data)
    to = msg.to.copy()
    to.tag = "new"
    msg.set_name_addr("t", to)
    assert msg.to.tag == "new"
    assert b"\r\nt: <sip:a@b>;tag=new\r\n" in msg.to_bytes()


def test_missing_required_headers() -> None:
    base = ["OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
            "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS"]
    for i in range(1, len(base)):
        with pytest.raises(ParseError) as exc:
            parse_message(raw(*base[:i], *base[i + 1 :]))
        assert exc.value.status == 400


@pytest.mark.parametrize("header", ["To: *", "From: *", "To: <sip:a@b", "From: sip:a b@c",
                                    "Call-ID:"])
def test_invalid_single_headers(header: str) -> None:
    base = ["OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "Call-ID: x", "CSeq: 1 OPTIONS"]
    for other in ("To: <sip:a@b>", "From: <sip:c@d>;tag=1"):
        if other[:2] != header[:2]:
            base.append(other)
    if header.startswith("Call-ID"):
        base.remove("Call-ID: x")
    with pytest.raises(ParseError) as exc:
        parse_message(raw(*base, header))
    assert exc.value.status == 400


@pytest.mark.parametrize("header", ["Contact: *, <sip:a@b>",
                                    "Contact: <sip:a@b>,", "To: <sip:a@b", "Max-Forwards: 1",
                                    "CSeq: 2 OPTIONS", "Call-ID: y"])
def test_invalid_or_duplicate_single_headers(header: str) -> None:
    base = ["OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "Max-Forwards: 1", "To: <sip:a@b>",
            "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS"]
    with pytest.raises(ParseError) as exc:
        parse_message(raw(*base, header))
    assert exc.value.status == 400


# -- header names --------------------------------------------------------------------------------
def test_compact_forms_kept_and_understood() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "v: SIP/2.0/UDP h;branch=z9hG4bK1", "t: <sip:a@b>",
               "f: <sip:c@d>;tag=1", "i: cid", "CSeq: 1 OPTIONS", "m: <sip:c@10.0.0.1>",
               "k: path", "l: 0")
    msg = parse_message(data)
    assert msg.call_id == "cid"
    assert msg.to.uri.user == "a"
    assert msg.from_.tag == "1"
    assert msg.vias[0].host == "h"
    assert msg.contacts[0].uri.host == "10.0.0.1"
    assert msg.headers.get("Supported") == "path"
    assert msg.content_length == 0
    assert "Call-ID" in msg.headers and "i" in msg.headers and "CALL-id" in msg.headers
    assert msg.to_bytes() == data
    names = [n for n, _ in msg.headers]
    assert names == ["v", "t", "f", "i", "CSeq", "m", "k", "l"]


def test_case_insensitive_names() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "VIA: SIP/2.0/UDP h", "to: <sip:a@b>",
               "FROM: <sip:c@d>;tag=1", "call-ID: x", "cseq: 1 OPTIONS", "x-FOO: bar")
    msg = parse_message(data)
    assert msg.headers.get("X-Foo") == "bar"
    assert msg.headers.get("via") == "SIP/2.0/UDP h"
    assert msg.headers.count("Via") == 1
    assert canonical("V") == "via" and canonical("Content-LENGTH") == "content-length"
    assert msg.to_bytes() == data


def test_get_all_splits_list_headers_only() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               'From: "x, y" <sip:c@d>;tag=1', "Call-ID: x", "CSeq: 1 OPTIONS",
               "Subject: hello, world", "Allow: INVITE, ACK", "Allow: BYE",
               'Contact: "Doe, J" <sip:j@x;a=b>, <sip:k@y>')
    msg = parse_message(data)
    assert msg.headers.get_all("Subject") == ["hello, world"]
    assert msg.headers.get_all("Allow") == ["INVITE", "ACK", "BYE"]
    assert msg.headers.get("Allow") == "INVITE, ACK"
    assert msg.headers.get_all("From") == ['"x, y" <sip:c@d>;tag=1']
    assert msg.headers.get_all("Contact") == ['"Doe, J" <sip:j@x;a=b>', "<sip:k@y>"]
    assert [c.display for c in msg.contacts] == ['"Doe, J"', None]
    assert msg.headers.get_all("Nope") == []
    assert msg.headers.get("Nope") is None
    assert msg.headers.get("Nope", "dflt") == "dflt"


def test_headers_editing() -> None:
    h = Headers()
    h.add("X-A", "1")
    h.add("Via", "v2")
    h.add("Via", "v1", first=True)
    h.add("Via", "v3")
    h.add("X-B", "2", first=True)
    assert list(h) == [("X-B", "2"), ("X-A", "1"), ("Via", "v1"), ("Via", "v2"), ("Via", "v3")]
    h.set("via", "only")
    assert list(h) == [("X-B", "2"), ("X-A", "1"), ("Via", "only")]
    h.set("X-New", "n")
    assert list(h)[-1] == ("X-New", "n")
    h.remove("x-a")
    assert "X-A" not in h
    assert len(h) == 3
    assert 3 not in h
    assert h.remove_first_value("Via") == "only"
    with pytest.raises(KeyError):
        h.remove_first_value("Via")
    assert h.render() == "X-B: 2\r\nX-New: n"


# -- changing one header changes one line --------------------------------------------------------
def test_unchanged_message_is_byte_identical() -> None:
    data = raw(*INVITE_LINES, body="v=0\n")
    msg = parse_message(data)
    assert isinstance(msg, Request)
    _ = (msg.vias, msg.cseq, msg.from_, msg.to, msg.contacts, msg.max_forwards, msg.uri,
         msg.name_addrs("Route"))
    assert msg.to_bytes() == data


def test_set_header_changes_only_that_line() -> None:
    msg = invite()
    before = lines_of(msg.to_bytes())
    msg.headers.set("X-Custom", "changed")
    after = lines_of(msg.to_bytes())
    i = before.index(b"X-Custom:   keep   this  ")
    assert after[i] == b"X-Custom: changed"
    assert after[:i] + after[i + 1 :] == before[:i] + before[i + 1 :]


def test_set_contacts_changes_only_contact_line() -> None:
    msg = invite()
    before = lines_of(msg.to_bytes())
    contact = parse_name_addr("<sip:alice@203.0.113.1:40000;transport=tcp>;expires=60")
    msg.set_contacts([contact])
    after = lines_of(msg.to_bytes())
    i = next(k for k, line in enumerate(before) if line.startswith(b"Contact:"))
    assert after[i] == b"Contact: <sip:alice@203.0.113.1:40000;transport=tcp>;expires=60"
    assert after[:i] + after[i + 1 :] == before[:i] + before[i + 1 :]
    assert msg.contacts == [contact]


def test_folded_header_kept_until_changed() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS",
               "Subject: one", "  two", "X: y")
    msg = parse_message(data)
    assert msg.headers.get("Subject") == "one two"
    assert msg.to_bytes() == data
    msg.headers.set("Subject", "three")
    assert msg.to_bytes() == data.replace(b"Subject: one\r\n  two", b"Subject: three")


def test_lf_only_message() -> None:
    data = b"OPTIONS sip:a@b SIP/2.0\nVia: SIP/2.0/UDP h\nTo: <sip:a@b>\nFrom: <sip:c@d>;tag=1\n" \
           b"Call-ID: x\nCSeq: 1 OPTIONS\nContent-Length: 2\n\nhi"
    msg = parse_message(data)
    assert msg.body == b"hi"
    assert msg.to_bytes() == data
    response = msg.make_response(200)  # type: ignore[union-attr]
    out = response.to_bytes()
    assert b"\n" not in out.replace(b"\r\n", b"")


# -- body and Content-Length ---------------------------------------------------------------------
def test_content_length_recomputed_when_body_changes() -> None:
    msg = invite()
    msg.body = b"v=0\r\no=x\r\n"
    out = msg.to_bytes()
    assert b"\r\nContent-Length: 10\r\n" in out
    assert out.endswith(b"\r\n\r\nv=0\r\no=x\r\n")
    assert parse_message(out).body == b"v=0\r\no=x\r\n"
    msg.body = b""
    assert b"\r\nContent-Length: 0\r\n" in msg.to_bytes()


def test_content_length_compact_name_kept() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS", "l: 0")
    msg = parse_message(data)
    msg.body = b"abc"
    assert msg.to_bytes().endswith(b"\r\nl: 3\r\n\r\nabc")


def test_content_length_added_when_absent() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS")
    msg = parse_message(data)
    msg.ensure_content_length()
    assert msg.to_bytes().endswith(b"\r\nContent-Length: 0\r\n\r\n")
    msg2 = parse_message(data)
    msg2.body = b"xy"
    assert msg2.to_bytes().endswith(b"\r\nContent-Length: 2\r\n\r\nxy")


# -- copy ----------------------------------------------------------------------------------------
def test_copy_independent() -> None:
    msg = invite()
    msg.source = Source("UDP", "192.0.2.1", 5060, "192.0.2.254", 5060)
    original = msg.to_bytes()
    dup = msg.copy()
    assert dup.to_bytes() == original
    assert dup.source == msg.source
    dup.pop_via()
    dup.max_forwards = 1
    dup.uri.host = "elsewhere.example.com"
    dup.headers.add("X-Dup", "1")
    dup.body = b"changed"
    to = dup.to
    to.tag = "t"
    dup.set_name_addr("To", to)
    assert msg.to_bytes() == original
    assert len(msg.vias) == 3
    assert msg.to.tag is None
    assert str(msg.uri) == "sip:bob@example.com"
    resp = parse_message(raw("SIP/2.0 200 OK", *INVITE_LINES[1:3], *INVITE_LINES[4:8]))
    assert isinstance(resp, Response)
    rdup = resp.copy()
    rdup.set_status(486)
    assert resp.status == 200 and resp.to_bytes().startswith(b"SIP/2.0 200 OK")


# -- make_response -------------------------------------------------------------------------------
def test_make_response_copies_the_right_headers() -> None:
    msg = invite()
    resp = msg.make_response(486)
    assert isinstance(resp, Response)
    assert (resp.status, resp.reason) == (486, "Busy Here")
    assert [str(v) for v in resp.vias] == [str(v) for v in msg.vias]
    assert resp.headers.get_all("Via") == msg.headers.get_all("Via")
    assert resp.headers.get("From") == msg.headers.get("From")
    assert resp.headers.get("To") == msg.headers.get("To")
    assert resp.call_id == msg.call_id
    assert resp.cseq == msg.cseq
    for name in ("Contact", "Route", "Record-Route", "Max-Forwards", "Content-Type", "X-Custom"):
        assert name not in resp.headers
    assert resp.content_length == 0
    assert resp.body == b""
    out = resp.to_bytes()
    assert out.startswith(b"SIP/2.0 486 Busy Here\r\n")
    assert out.endswith(b"Content-Length: 0\r\n\r\n")
    reparsed = parse_message(out)
    assert isinstance(reparsed, Response) and reparsed.to.tag is None
    assert msg.make_response(599, "Custom").reason == "Custom"
    assert msg.make_response(299).reason == "Unknown"


def test_make_response_to_tag_left_to_caller() -> None:
    resp = invite().make_response(200)
    to = resp.to
    to.tag = "srv1"
    resp.set_name_addr("To", to)
    assert parse_message(resp.to_bytes()).to.tag == "srv1"


def test_a_response_changes_its_views_without_changing_the_request() -> None:
    msg = invite()
    resp = msg.make_response(200)
    resp.to.tag = "srv1"
    resp.vias[0].set_param("received", "192.0.2.99")
    assert msg.to.tag is None and msg.vias[0].received is None
    assert resp.to.tag == "srv1" and resp.vias[0].received == "192.0.2.99"
    assert [str(v) for v in resp.vias[1:]] == [str(v) for v in msg.vias[1:]]


def test_make_response_keeps_compact_names_and_raw_lines() -> None:
    data = raw("OPTIONS sip:a@b SIP/2.0", "v: SIP/2.0/UDP h ;branch=z9hG4bK1", "t: <sip:a@b>",
               "f: <sip:c@d>;tag=1", "i: x", "CSeq: 1 OPTIONS")
    resp = parse_message(data).make_response(200)  # type: ignore[union-attr]
    out = resp.to_bytes()
    assert b"\r\nv: SIP/2.0/UDP h ;branch=z9hG4bK1\r\nt: <sip:a@b>\r\nf: <sip:c@d>;tag=1" in out


def test_response_built_from_scratch() -> None:
    resp = Response(100)
    assert resp.reason == "Trying"
    assert resp.to_bytes() == b"SIP/2.0 100 Trying\r\n\r\n"
    req = Request("OPTIONS", "sip:a@b")
    assert req.to_bytes() == b"OPTIONS sip:a@b SIP/2.0\r\n\r\n"


# -- start-line errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("start", "status"),
    [
        ("OPTIONS sip:a@b SIP/3.0", 505),
        ("OPTIONS sip:a@b SIP/2.1", 505),
        ("OPTIONS sip:a@b HTTP/1.1", 400),
        ("OPTIONS  sip:a@b SIP/2.0", 400),
        ("OPTIONS sip:a@b SIP/2.0 ", 400),
        ("OPTIONS <sip:a@b> SIP/2.0", 400),
        ("OPTIONS sip:a@b?X=y SIP/2.0", 400),
        ("OPTIONS sip:a@b", 400),
        ("OPT<IONS sip:a@b SIP/2.0", 400),
        ("OPTIONS sip:a@ SIP/2.0", 400),
    ],
)
def test_bad_request_line(start: str, status: int) -> None:
    data = raw(start, "Via: SIP/2.0/UDP h", "To: <sip:a@b>", "From: <sip:c@d>;tag=1",
               "Call-ID: x", "CSeq: 1 OPTIONS")
    with pytest.raises(ParseError) as exc:
        parse_message(data)
    assert exc.value.status == status
    assert not exc.value.is_response


@pytest.mark.parametrize("start", ["SIP/2.0 2000 OK", "SIP/2.0 700 Nope", "SIP/2.0 OK",
                                   "SIP/2.0", "SIP/3.0 200 OK", "SIP/2.0 099 x"])
def test_bad_status_line_is_dropped(start: str) -> None:
    data = raw(start, "Via: SIP/2.0/UDP h", "To: <sip:a@b>", "From: <sip:c@d>;tag=1",
               "Call-ID: x", "CSeq: 1 OPTIONS")
    with pytest.raises(ParseError) as exc:
        parse_message(data)
    assert exc.value.is_response


def test_bad_header_in_response_is_dropped() -> None:
    data = raw("SIP/2.0 200 OK", "Via: SIP/2.0/UDP h", "To: <sip:a@b>", "From: <sip:c@d>;tag=1",
               "Call-ID: x", "CSeq: x OPTIONS")
    with pytest.raises(ParseError) as exc:
        parse_message(data)
    assert exc.value.is_response


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n",
        b"\r\n\r\n",
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h",  # no blank line
        b"OPTIONS sip:a@b SIP/2.0\r\nVia SIP/2.0/UDP h\r\n\r\n",  # no colon
        b"OPTIONS sip:a@b SIP/2.0\r\n Via: x\r\n\r\n",  # continuation first
        b"OPTIONS sip:a@b SIP/2.0\r\nV(ia: SIP/2.0/UDP h\r\n\r\n",  # bad header name
        b"\xff\xfe\x00\x00\r\n\r\n",
    ],
)
def test_garbage_raises_parse_error(data: bytes) -> None:
    with pytest.raises(ParseError):
        parse_message(data)


def test_keepalive_is_not_a_message() -> None:
    """A CRLF keepalive never reaches the parser as a message: the transports filter it; if it
    does, it is a ParseError (dropped), never anything else."""
    assert KeepAlive.PING.value == b"\r\n\r\n"
    assert KeepAlive.PONG.value == b"\r\n"
    for ka in KeepAlive:
        with pytest.raises(ParseError):
            parse_message(ka.value)


def test_datagram_ending_without_blank_line() -> None:
    """A datagram that ends right after the last header's CRLF has an empty body."""
    data = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nTo: <sip:a@b>\r\n" \
           b"From: <sip:c@d>;tag=1\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
    msg = parse_message(data)
    assert msg.body == b""
    assert msg.call_id == "x"


# -- limits --------------------------------------------------------------------------------------
def _options(*extra: str, body: str = "") -> bytes:
    return raw("OPTIONS sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS", *extra, body=body)


def test_limit_max_message() -> None:
    data = _options("X: " + "a" * 200)
    limits = Limits(max_message=len(data) - 1)
    with pytest.raises(ParseError) as exc:
        parse_message(data, limits)
    assert exc.value.status == 513
    assert parse_message(data, Limits(max_message=len(data))).headers.get("X") == "a" * 200


def test_limit_max_line() -> None:
    data = _options("X: " + "a" * 100)
    with pytest.raises(ParseError) as exc:
        parse_message(data, Limits(max_line=102))
    assert exc.value.status == 513
    parse_message(data, Limits(max_line=103))


def test_limit_max_headers() -> None:
    data = _options(*(f"X-{i}: {i}" for i in range(10)))  # 5 + 10 header lines
    with pytest.raises(ParseError) as exc:
        parse_message(data, Limits(max_headers=14))
    assert exc.value.status == 513
    assert len(parse_message(data, Limits(max_headers=15)).headers) == 15


def test_limit_body_too_large() -> None:
    data = _options("Content-Length: 11", body="x" * 11)
    with pytest.raises(ParseError) as exc:
        parse_message(data, Limits(max_body=10))
    assert exc.value.status == 413
    assert parse_message(data, Limits(max_body=11)).body == b"x" * 11


def test_limit_errors_on_responses_are_dropped() -> None:
    data = raw("SIP/2.0 200 OK", "Via: SIP/2.0/UDP h", "X: " + "a" * 100)
    with pytest.raises(ParseError) as exc:
        parse_message(data, Limits(max_line=50))
    assert exc.value.status == 513 and exc.value.is_response


def test_source_dataclass() -> None:
    src = Source("TLS", "192.0.2.1", 5061)
    assert (src.local_host, src.local_port, src.side) == ("", 0, "")
    with pytest.raises(AttributeError):
        src.port = 1  # type: ignore[misc]


def test_start_line_attributes_render_anew() -> None:
    msg = invite()
    msg.method = "OPTIONS"
    assert msg.to_bytes().startswith(b"OPTIONS sip:bob@example.com SIP/2.0\r\n")
    data = raw("SIP/2.0 200  Fine", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
               "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS")
    resp = parse_message(data)
    assert isinstance(resp, Response)
    assert resp.reason == " Fine" and resp.to_bytes() == data
    resp.status = 202
    assert resp.to_bytes().startswith(b"SIP/2.0 202  Fine\r\n")
    resp.reason = "Accepted"
    assert resp.to_bytes().startswith(b"SIP/2.0 202 Accepted\r\n")
    dup = resp.copy()
    dup.status = 500
    assert resp.to_bytes().startswith(b"SIP/2.0 202 Accepted\r\n")


def test_code_cannot_inject_header_lines() -> None:
    msg = parse_message(
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:a@b>\r\n"
        b"From: <sip:c@d>;tag=1\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    with pytest.raises(ValueError):
        msg.headers.add("X-Note", "a\r\nVia: SIP/2.0/UDP evil")
    with pytest.raises(ValueError):
        msg.headers.set("Subject", "b\nX: y")
    with pytest.raises(ValueError):
        msg.headers.add("Bad Name", "v")


def test_compact_keeps_the_bytes():
    data = (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        b"From:  <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        b"Call-ID: c1\r\nCSeq: 1 OPTIONS\r\nX-Folded: a\r\n b\r\nContent-Length: 0\r\n\r\n"
    )
    msg = parse_message(data)
    msg.compact()
    assert msg.to_bytes() == data  # odd spacing and folding kept
    assert msg.headers.get("x-folded") == "a b" and msg.to.tag == "2"  # read back on demand
    assert msg.to_bytes() == data


def test_a_compacted_message_leaves_the_collector_nothing_to_scan_in_its_headers():
    # transactions keep their messages compacted for up to 32 s: what the headers then hold
    # is plain text and an empty dict, which CPython's collector does not track
    msg = invite()
    assert msg.vias and msg.from_.tag  # typed views parsed and cached
    msg.compact()
    held = [o for o in gc.get_referents(msg.headers) if not isinstance(o, type)]
    assert held and not any(gc.is_tracked(o) for o in held)
    assert msg.vias[0].branch == "z9hG4bK776asdhds"  # still read back on demand


@pytest.mark.parametrize("bad", [b"To: \r<sip:b@example.com>", b"To: <sip:b@example.com>\nX: 1"])
def test_bare_cr_or_lf_in_a_header_is_refused(bad):
    # found by hypothesis: a lone CR survived into the To of a response and broke the ACK
    data = (
        b"SIP/2.0 404 Not Found\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        b"From: <sip:a@example.com>;tag=1\r\n" + bad + b"\r\n"
        b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == 400 and info.value.is_response


def test_a_cr_in_a_header_section_of_lf_lines_is_refused():
    # found by hypothesis: the last CRLF turned into LF LF, so the header section's lines end
    # with LF and every other line kept its CR, into the To of the ACK
    data = (
        b"SIP/2.0 404 Not Found\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\n"
        b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\n\n\r\n"
    )
    with pytest.raises(ParseError) as info:
        parse_message(data)
    assert info.value.status == 400 and info.value.is_response
    assert parse_message(data.replace(b"\r\n", b"\n")).to.tag is None  # LF alone is fine


@pytest.mark.parametrize("bad", [
    "X-Note: a\x00b",  # issue 11: a NUL was accepted and forwarded
    "Subject: \x07ring",
    "Reply-To: <sip:a@b>\x7f",
    'Reply-To: "a\x00" <sip:a@b>',  # unescaped in a quoted-string
    "X-Note: a\\\x00b",  # a backslash outside a quoted-string escapes nothing
    "X-Folded: a\r\n b\x1b",  # on a continuation line
])
def test_control_characters_in_the_header_section_are_refused(bad: str) -> None:
    """RFC 3261 25.1: header values hold no control character but HTAB."""
    with pytest.raises(ParseError) as info:
        parse_message(_options(bad))
    assert info.value.status == 400 and not info.value.is_response
    with pytest.raises(ParseError):
        parse_message(raw("OPTIONS sip:a\x00@b SIP/2.0", "Via: SIP/2.0/UDP h", "To: <sip:a@b>",
                          "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 1 OPTIONS"))


@pytest.mark.parametrize("good", [
    "X-Note: a\tb",  # HTAB is LWS
    'Reply-To: "BEL:\\\x07 NUL:\\\x00" <sip:a@b>',  # quoted-pairs (RFC 4475 3.1.1.2)
    "X-Folded: a\r\n\tb",
])
def test_htab_and_quoted_pairs_are_accepted(good: str) -> None:
    msg = parse_message(_options(good))
    assert msg.headers.get(good.split(":", 1)[0])
