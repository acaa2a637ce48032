"""RFC 4475 and RFC 5118 torture messages: every file, its expected outcome, its semantic points.

The corpora are read in binary and never normalised. The table below is the contract: a valid
message parses and re-serializes byte-identical (or, where its Content-Length is shorter than the
datagram, to exactly the Content-Length prefix); an invalid one raises ParseError with the status a
proxy answers (``is_response`` set for responses, which the caller drops).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sipproxy.errors import ParseError
from sipproxy.message import Request, Response, parse_message
from sipproxy.uri import unescape

DATA = Path(__file__).parent / "data"

# Outcomes: "ok" = parses, re-serializes byte-identical;
#           "trunc" = parses, re-serializes to the bytes up to the end of the Content-Length body
#                     (the trailing octets of the datagram are dropped, RFC 3261 18.3);
#           an int = ParseError with that status (for a request); ("drop", 400) = ParseError with
#                     is_response=True (an invalid response: nobody to answer, the caller drops it).
OK = "ok"
TRUNC = "trunc"
DROP = "drop"

RFC4475: dict[str, object] = {
    "wsinv.dat": OK,
    "intmeth.dat": OK,
    "esc01.dat": OK,
    "escnull.dat": OK,
    "esc02.dat": OK,
    "lwsdisp.dat": OK,
    "longreq.dat": OK,
    # a second INVITE-looking message after the REGISTER's Content-Length body: ignored, and the
    # forwarded request must not contain it
    "dblreq.dat": TRUNC,
    "semiuri.dat": OK,
    "transports.dat": OK,
    "mpart01.dat": OK,
    "unreason.dat": OK,
    "noreason.dat": OK,
    "badinv01.dat": 400,
    "clerr.dat": 400,  # Content-Length larger than the datagram's body
    "ncl.dat": 400,
    "scalar02.dat": 400,
    "scalarlg.dat": DROP,  # response with CSeq > 2**32-1: dropped silently
    "quotbal.dat": 400,
    "ltgtruri.dat": 400,
    "lwsruri.dat": 400,
    "lwsstart.dat": 400,
    "trws.dat": 400,
    "escruri.dat": 400,
    # Deliberate: a non-GMT Date is tolerated. A proxy never interprets Date, so refusing the
    # request would only break calls; the header is forwarded untouched.
    "baddate.dat": OK,
    "regbadct.dat": 400,
    "badaspec.dat": 400,
    "baddn.dat": 400,
    "badvers.dat": 505,
    "mismatch01.dat": 400,
    # Deliberate: RFC 4475 prefers 501 for an unknown method at a proxy, but the message is
    # malformed (CSeq method != request method) before the method is even looked at; we answer
    # 400 like mismatch01, which the RFC allows.
    "mismatch02.dat": 400,
    "bigcode.dat": DROP,  # status code 4294967301: an invalid response, dropped
    # badbranch's bare "z9hG4bK" branch is syntactically valid: the parser accepts it, the
    # transaction layer decides what to do with it
    "badbranch.dat": OK,
    "insuf.dat": 400,
    # well-formed; the proxy (not the parser) answers 416/420/483 or forwards these
    "unkscm.dat": OK,
    "novelsc.dat": OK,
    "unksm2.dat": OK,
    "bext01.dat": OK,
    "invut.dat": OK,
    "regaut01.dat": OK,
    "multi01.dat": 400,
    "mcl01.dat": 400,
    "bcast.dat": OK,
    "zeromf.dat": OK,
    "cparam01.dat": OK,
    "cparam02.dat": OK,
    "regescrt.dat": OK,
    "sdp01.dat": OK,
    "inv2543.dat": OK,  # no Content-Length over UDP: the body is the rest of the datagram
}

RFC5118: dict[str, object] = {
    "ipv6-good": OK,
    "ipv6-bad": 400,  # IPv6 address in the Request-URI without [ ]
    "port-ambiguous": OK,
    "port-unambiguous": OK,
    "via-received-param-with-delim": OK,  # received=[v6] accepted (RFC 5118 4.5: be robust)
    "via-received-param-no-delim": OK,
    # Deliberate, strict: Content-Length 268 > the 251-byte body (an erratum in the RFC text).
    # Over UDP RFC 3261 18.3 says a short body is an error: 400, the same rule as clerr.dat.
    "ipv6-in-sdp": 400,
    "mult-ip-in-header": OK,
    # Content-Length 181 < 189-byte body (as published): the excess is dropped, deliberately
    "mult-ip-in-sdp": TRUNC,
    # Content-Length 236 < 245-byte body (as published): the excess is dropped, deliberately
    "ipv4-mapped-ipv6": TRUNC,
    # Deliberate: "2001:db8:::192.0.2.1" is not an IPv6 address; we refuse (400) rather than
    # guess which colon is extra
    "ipv6-bug-abnf-3-colons": 400,
    "ipv6-correct-abnf-2-colons": OK,
}

CASES = [("rfc4475", name, outcome) for name, outcome in RFC4475.items()] + [
    ("rfc5118", name, outcome) for name, outcome in RFC5118.items()
]


def _expected_tsv(corpus: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (DATA / corpus / "EXPECTED.tsv").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            name, cls = line.split("\t")[:2]
            out[name] = cls
    return out


def load(corpus: str, name: str) -> bytes:
    return (DATA / corpus / name).read_bytes()


def parsed(corpus: str, name: str) -> Request | Response:
    return parse_message(load(corpus, name))


def req(corpus: str, name: str) -> Request:
    msg = parsed(corpus, name)
    assert isinstance(msg, Request)
    return msg


def _content_length_end(data: bytes) -> int:
    """Where the Content-Length body ends, computed independently of the parser."""
    head_end = data.index(b"\r\n\r\n") + 4
    for line in data[: head_end - 4].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"content-length", b"l"):
            return head_end + int(value.strip())
    raise AssertionError("no Content-Length")


def test_table_covers_every_file() -> None:
    """Every corpus file has an outcome here, and none is listed that does not exist."""
    for corpus, table in (("rfc4475", RFC4475), ("rfc5118", RFC5118)):
        expected = _expected_tsv(corpus)
        assert set(table) == set(expected)
        files = {p.name for p in (DATA / corpus).iterdir()
                 if not p.name.startswith(".")} - {"EXPECTED.tsv", "SHA256SUMS", "SOURCE.txt"}
        assert files == set(table)


@pytest.mark.parametrize(
    ("corpus", "name", "outcome"), CASES, ids=[f"{c}/{n}" for c, n, _ in CASES]
)
def test_outcome(corpus: str, name: str, outcome: object) -> None:
    data = load(corpus, name)
    if outcome == OK:
        msg = parse_message(data)
        assert msg.to_bytes() == data
    elif outcome == TRUNC:
        msg = parse_message(data)
        end = _content_length_end(data)
        assert end < len(data)  # there really are trailing octets
        assert msg.to_bytes() == data[:end]
        assert msg.body == data[data.index(b"\r\n\r\n") + 4 : end]
    elif outcome == DROP:
        with pytest.raises(ParseError) as exc:
            parse_message(data)
        assert exc.value.is_response
        assert exc.value.status == 400
    else:
        assert isinstance(outcome, int)
        with pytest.raises(ParseError) as exc:
            parse_message(data)
        assert exc.value.status == outcome
        assert not exc.value.is_response


def test_dblreq_trailing_request_is_not_forwarded() -> None:
    data = load("rfc4475", "dblreq.dat")
    msg = req("rfc4475", "dblreq.dat")
    assert msg.method == "REGISTER"
    assert data.count(b"INVITE") >= 1
    assert b"INVITE" not in msg.to_bytes()


# -- semantic points ---------------------------------------------------------------------------
def test_escnull_two_contacts_nul_kept() -> None:
    msg = req("rfc4475", "escnull.dat")
    contacts = msg.contacts
    assert [c.uri.user for c in contacts] == ["%00", "%00%00"]
    assert unescape(contacts[0].uri.user or "") == "\x00"
    assert unescape(contacts[1].uri.user or "") == "\x00\x00"
    assert contacts[0].uri != contacts[1].uri
    # the AOR is not truncated at the NUL
    assert msg.to.uri.aor() == "sip:null-\x00-null@example.com"


def test_esc01_unescaped_once_only() -> None:
    msg = req("rfc4475", "esc01.dat")
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert unescape(msg.uri.user or "") == "sips:user@example.com"
    assert msg.uri.host == "example.net"
    assert unescape(msg.to.uri.user or "") == "user"
    assert unescape(msg.from_.uri.user or "") == "I have spaces"
    (contact,) = msg.contacts
    assert unescape(contact.uri.user or "") == "caller"
    params = {unescape(n): unescape(v) if v is not None else None for n, v in contact.uri.params}
    assert params == {"lr": None, "name": "value%41"}  # %2541 -> %41, never A


def test_esc02_percent_is_not_an_escape_in_names() -> None:
    msg = req("rfc4475", "esc02.dat")
    assert msg.method == "RE%47IST%45R"  # an unknown method, not REGISTER
    assert msg.cseq.method == "RE%47IST%45R"
    assert [c.uri.host for c in msg.contacts] == ["host1.example.com", "host3.example.com"]
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert msg.from_.display == '"%Z%45"'


def test_semiuri_user_part() -> None:
    msg = req("rfc4475", "semiuri.dat")
    assert msg.uri.user == "user;par=u%40example.net"
    assert msg.uri.host == "example.com"
    assert len(msg.uri.params) == 0
    assert msg.headers.get_all("Accept") == [
        "application/sdp", "application/pkcs7-mime", "multipart/mixed", "multipart/signed",
        "message/sip", "message/sipfrag"]


def test_transports() -> None:
    msg = req("rfc4475", "transports.dat")
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert [v.host for v in msg.vias] == [f"t{i}.example.com" for i in range(1, 6)]
    assert msg.call_id == "transports.kijh4akdnaqjkwendsasfdj"


def test_wsinv_folding_and_compact_forms() -> None:
    msg = req("rfc4475", "wsinv.dat")
    assert msg.max_forwards == 68
    assert msg.cseq.number == 9 and msg.cseq.method == "INVITE"
    assert msg.content_length == 150
    assert msg.to.tag == "1918181833n"
    assert msg.to.uri.user == "vivekg"
    assert msg.from_.tag == "98asjd8"
    assert msg.from_.display == '"J Rosenberg \\\\\\""'
    # compact forms readable under both names
    assert msg.headers.get("s") == "" and msg.headers.get("Subject") == ""
    assert msg.headers.get("m") == msg.headers.get("Contact")
    assert msg.headers.get("v") is not None
    (contact,) = msg.contacts
    assert contact.uri.user == "jdrosen"
    assert contact.params.get("newparam") == "newvalue"
    assert "secondparam" in contact.params
    assert contact.params.get("q") == "0.33"
    # Via values from the folded lines, the full name and the compact form alike
    assert [(v.transport, v.host, v.branch) for v in msg.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert all(v.protocol == "SIP/2.0" for v in msg.vias)
    # unknown headers preserved, folded value readable
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    (route,) = msg.name_addrs("Route")
    assert route.uri.loose_route and route.uri.get_param("unknownwith") == "value"


def test_cparam01_header_param() -> None:
    (contact,) = req("rfc4475", "cparam01.dat").contacts
    assert "unknownparam" in contact.params
    assert "unknownparam" not in contact.uri.params
    assert str(contact.uri) == "sip:+19725552222@gw1.example.net"


def test_cparam02_uri_param() -> None:
    (contact,) = req("rfc4475", "cparam02.dat").contacts
    assert "unknownparam" not in contact.params
    assert contact.uri.has_param("unknownparam")


def test_regescrt_uri_header_kept() -> None:
    (contact,) = req("rfc4475", "regescrt.dat").contacts
    assert contact.uri.headers == "Route=%3Csip:sip.example.com%3E"


def test_port_ambiguous() -> None:
    msg = req("rfc5118", "port-ambiguous")
    assert msg.uri.host == "2001:db8::10:5070"
    assert msg.uri.port is None


def test_port_unambiguous() -> None:
    msg = req("rfc5118", "port-unambiguous")
    assert msg.uri.host == "2001:db8::10"
    assert msg.uri.port == 5070


@pytest.mark.parametrize("name", ["via-received-param-with-delim", "via-received-param-no-delim"])
def test_via_received_ipv6(name: str) -> None:
    top = req("rfc5118", name).top_via
    assert top is not None
    assert top.received == "2001:db8::9:255"
    assert top.host == "2001:db8::9:1"
    assert top.port is None


def test_mult_ip_in_header() -> None:
    vias = req("rfc5118", "mult-ip-in-header").vias
    assert [(v.transport, v.host, v.port, v.branch, v.received) for v in vias] == [
        ("UDP", "2001:db8::9:1", 6050, "z9hG4bKas3-111", None),
        ("UDP", "192.0.2.1", None, "z9hG4bKjhja8781hjuaij65144", None),
        ("TCP", "2001:db8::9:255", None, "z9hG4bK451jj", "192.0.2.200"),
    ]


def test_ipv6_good() -> None:
    msg = req("rfc5118", "ipv6-good")
    assert msg.uri.host.count(":") >= 2
    top = msg.top_via
    assert top is not None and ":" in top.host and not top.host.startswith("[")
    assert all(":" in c.uri.host for c in msg.contacts)


def test_ipv4_mapped_ipv6() -> None:
    msg = req("rfc5118", "ipv4-mapped-ipv6")
    top = msg.top_via
    assert top is not None
    assert top.host.lower().startswith("::ffff:")
    assert top.port is not None


def test_inv2543_body_is_rest_of_datagram() -> None:
    data = load("rfc4475", "inv2543.dat")
    msg = req("rfc4475", "inv2543.dat")
    assert msg.content_length is None
    assert msg.body == data[data.index(b"\r\n\r\n") + 4 :]
    assert msg.body.startswith(b"v=0\r\n") and msg.body.endswith(b"RTP/AVP 0\r\n")
    top = msg.top_via
    assert top is not None and top.branch is None
    assert msg.from_.tag is None
    assert msg.max_forwards is None


def test_mpart01_binary_body() -> None:
    data = load("rfc4475", "mpart01.dat")
    msg = req("rfc4475", "mpart01.dat")
    assert msg.content_length == len(msg.body)
    assert b"\x00" in msg.body
    assert msg.body == data[data.index(b"\r\n\r\n") + 4 :]
    assert msg.to_bytes() == data


def test_unknown_headers_preserved_byte_exact() -> None:
    data = load("rfc4475", "wsinv.dat")
    msg = parse_message(data)
    msg.max_forwards = 67  # change one line; the unknown (folded) ones stay as they were
    out = msg.to_bytes()
    assert b"NewFangledHeader:   newfangled value\r\n continued newfangled value\r\n" in out
    assert b"UnknownHeaderWithUnusualValue: ;;,,;;,;\r\n" in out
    assert b"MaX-fOrWaRdS: 67\r\n" in out


def test_intmeth_unusual_tokens() -> None:
    msg = req("rfc4475", "intmeth.dat")
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq.method == msg.method
    top = msg.top_via
    assert top is not None and top.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.from_.tag == "_token~1'+`*%!-."


@pytest.mark.parametrize(("name", "status"), [("unreason.dat", 200), ("noreason.dat", 100)])
def test_response_reason(name: str, status: int) -> None:
    msg = parsed("rfc4475", name)
    assert isinstance(msg, Response)
    assert msg.status == status
    if name == "noreason.dat":
        assert msg.reason == ""
    else:
        assert msg.reason != "OK" and msg.reason


def test_unkscm_non_sip_request_uri_kept_opaque() -> None:
    msg = req("rfc4475", "unkscm.dat")
    assert not msg.uri.is_sip
    assert msg.uri.opaque is not None


def test_zeromf() -> None:
    assert req("rfc4475", "zeromf.dat").max_forwards == 0


def test_badvers_is_505() -> None:
    with pytest.raises(ParseError) as exc:
        parse_message(load("rfc4475", "badvers.dat"))
    assert exc.value.status == 505
