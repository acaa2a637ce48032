"""SDP model: typed access, line-local rewriting, byte-exact round trips, hostile input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from sipproxy.sdp import (
    ICE_ATTRIBUTES,
    MAX_BODY_SIZE,
    MAX_LINE_LENGTH,
    MAX_LINES,
    Attribute,
    Candidate,
    Connection,
    Crypto,
    Origin,
    Rtcp,
    SdpError,
    SessionDescription,
    parse_sdp,
)

DATA = Path(__file__).parent / "data"


def lines_of(data: bytes) -> list[bytes]:
    """Split keeping each line's ending, so comparisons see endings too."""
    return re.findall(rb"[^\n]*\n|[^\n]+$", data)


def changed_lines(before: bytes, after: bytes) -> list[tuple[bytes, bytes]]:
    a, b = lines_of(before), lines_of(after)
    assert len(a) == len(b), (before, after)
    return [(x, y) for x, y in zip(a, b, strict=True) if x != y]


def sdp_body(path: Path, *, honour_content_length: bool = False) -> bytes:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\r\n\r\n")
    if honour_content_length:
        m = re.search(rb"\r\nContent-Length: *(\d+)", head)
        assert m is not None
        body = body[: int(m.group(1))]
    return body


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


BASIC = crlf(
    "v=0\n"
    "o=alice 2890844526 2890844527 IN IP4 192.168.1.10\n"
    "s=-\n"
    "c=IN IP4 192.168.1.10\n"
    "t=0 0\n"
    "a=tool:phone 1.0\n"
    "m=audio 49170 RTP/AVP 0 8 101\n"
    "a=rtpmap:0 PCMU/8000\n"
    "a=rtpmap:101 telephone-event/8000\n"
    "a=fmtp:101 0-15\n"
    "a=rtcp:49171\n"
    "a=ptime:20\n"
    "m=video 51372/2 RTP/AVPF 99\n"
    "c=IN IP6 2001:db8::5\n"
    "a=rtpmap:99 H264/90000\n"
    "a=recvonly\n"
)

SRTP_OFFER = crlf(
    "v=0\n"
    "o=- 4858 4858 IN IP4 10.0.0.7\n"
    "s=SRTP call\n"
    "c=IN IP4 10.0.0.7\n"
    "t=0 0\n"
    "m=audio 16384 RTP/SAVP 0 101\n"
    "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\n"
    "a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj|2^20|1:32"
    " KDR=1 UNENCRYPTED_SRTCP\n"
    "a=rtpmap:101 telephone-event/8000\n"
    "a=rtcp:16385 IN IP4 10.0.0.7\n"
    "a=sendrecv\n"
)

WEBRTC_OFFER = crlf(
    "v=0\n"
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1\n"
    "s=-\n"
    "t=0 0\n"
    "a=group:BUNDLE 0\n"
    "a=ice-options:trickle\n"
    "a=msid-semantic: WMS stream\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\n"
    "c=IN IP4 0.0.0.0\n"
    "a=rtcp:9 IN IP4 0.0.0.0\n"
    "a=candidate:842163049 1 udp 1677729535 198.51.100.7 50212 typ srflx raddr 192.168.1.20"
    " rport 50212 generation 0 network-cost 999\n"
    "a=candidate:1 1 UDP 2130706431 192.168.1.20 50212 typ host\n"
    "a=candidate:2 1 tcp 1518280447 192.168.1.20 9 typ host tcptype active\n"
    "a=end-of-candidates\n"
    "a=ice-ufrag:Ns0m\n"
    "a=ice-pwd:fkWkVjHv0vUbjTVxb8GRL0c4\n"
    "a=fingerprint:sha-256 49:66:12:17:0D:1C:91:AE:57:4C:C6:36:DD:D5:97:D2:7D:62:C9:9A"
    ":7F:B9:A3:F5:A2:C8:8C:1E:37:B9:4E:7A\n"
    "a=setup:actpass\n"
    "a=mid:0\n"
    "a=sendrecv\n"
    "a=rtcp-mux\n"
    "a=rtpmap:111 opus/48000/2\n"
    "a=fmtp:111 minptime=10;useinbandfec=1\n"
)


# --------------------------------------------------------------------------- corpora


CORPUS = [
    DATA / "rfc5118" / "ipv6-in-sdp",
    DATA / "rfc5118" / "mult-ip-in-sdp",
    DATA / "rfc5118" / "ipv4-mapped-ipv6",
    DATA / "rfc4475" / "sdp01.dat",
]


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
@pytest.mark.parametrize("truncate", [False, True], ids=["body", "content-length"])
def test_corpus_round_trips(path: Path, truncate: bool) -> None:
    # The RFC 5118 Content-Lengths are wrong; truncating at them must still parse (a UDP
    # receiver does exactly that) and still round-trip.
    body = sdp_body(path, honour_content_length=truncate)
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    assert sdp.copy().to_bytes() == body
    assert sdp.line_ending == b"\r\n"
    assert len(sdp.media) == 2


def test_rfc5118_ipv6_in_sdp() -> None:
    body = sdp_body(DATA / "rfc5118" / "ipv6-in-sdp")
    sdp = parse_sdp(body)
    assert sdp.origin == Origin("assistant", "971731711378798081", "0", "IN", "IP6", "2001:db8::20")
    assert sdp.connection == Connection("IN", "IP6", "2001:db8::20")
    assert sdp.session_name == "Live video feed for today's meeting"
    audio, video = sdp.media
    assert (audio.media, audio.port, audio.proto, audio.formats) == (
        "audio",
        6000,
        "RTP/AVP",
        ["2"],
    )
    assert (video.media, video.port, video.formats) == ("video", 6024, ["107"])
    assert audio.connection is None
    assert audio.effective_connection == Connection("IN", "IP6", "2001:db8::20")
    # Relay from the IPv6 side to an IPv4 relay address: only c= and the port change.
    sdp.connection = Connection.for_address("203.0.113.9")
    audio.port = 30000
    assert changed_lines(body, sdp.to_bytes()) == [
        (b"c=IN IP6 2001:db8::20\r\n", b"c=IN IP4 203.0.113.9\r\n"),
        (b"m=audio 6000 RTP/AVP 2\r\n", b"m=audio 30000 RTP/AVP 2\r\n"),
    ]


def test_rfc5118_mult_ip_in_sdp() -> None:
    body = sdp_body(DATA / "rfc5118" / "mult-ip-in-sdp")
    sdp = parse_sdp(body)
    assert sdp.connection is None
    assert sdp.origin is not None and sdp.origin.address == "host.example.com"
    audio, video = sdp.media
    assert audio.effective_connection == Connection("IN", "IP4", "192.0.2.1")
    assert video.effective_connection == Connection("IN", "IP6", "2001:db8::1")
    video.set_connection_address("2001:db8::99")
    audio.set_connection_address("[2001:db8::98]")  # brackets from URI habits are dropped
    assert changed_lines(body, sdp.to_bytes()) == [
        (b"c=IN IP4 192.0.2.1\r\n", b"c=IN IP6 2001:db8::98\r\n"),
        (b"c=IN IP6 2001:db8::1\r\n", b"c=IN IP6 2001:db8::99\r\n"),
    ]


def test_rfc5118_ipv4_mapped_ipv6() -> None:
    body = sdp_body(DATA / "rfc5118" / "ipv4-mapped-ipv6")
    sdp = parse_sdp(body)
    assert sdp.connection == Connection("IN", "IP6", "::ffff:192.0.2.2")
    assert sdp.origin is not None and sdp.origin.address == "::ffff:192.0.2.2"
    sdp.set_origin_address("192.0.2.2")
    assert changed_lines(body, sdp.to_bytes()) == [
        (
            b"o=assistant 971731711378798081 0 IN IP6 ::ffff:192.0.2.2\r\n",
            b"o=assistant 971731711378798081 0 IN IP4 192.0.2.2\r\n",
        )
    ]


def test_rfc4475_sdp01() -> None:
    body = sdp_body(DATA / "rfc4475" / "sdp01.dat")
    sdp = parse_sdp(body)
    audio, video = sdp.media
    assert audio.formats == ["0", "12"]
    assert video.attributes == [Attribute("rtpmap", "31 LPC")]
    assert sdp.session_name == "-"
    assert [m.direction for m in sdp.media] == ["sendrecv", "sendrecv"]


# --------------------------------------------------------------------------- accessors


def test_session_accessors() -> None:
    sdp = parse_sdp(BASIC)
    assert sdp.version == 0
    assert sdp.origin == Origin("alice", "2890844526", "2890844527", "IN", "IP4", "192.168.1.10")
    assert sdp.connection == Connection("IN", "IP4", "192.168.1.10")
    assert sdp.attributes == [Attribute("tool", "phone 1.0")]
    assert sdp.direction == "sendrecv"
    assert sdp.line_ending == b"\r\n"
    assert bytes(sdp) == BASIC
    assert "alice" in repr(sdp)


def test_media_accessors() -> None:
    sdp = parse_sdp(BASIC)
    audio, video = sdp.media
    assert audio.media == "audio"
    assert audio.port == 49170
    assert audio.port_count is None
    assert audio.proto == "RTP/AVP"
    assert audio.formats == ["0", "8", "101"]
    assert audio.attributes[0] == Attribute("rtpmap", "0 PCMU/8000")
    assert [a.name for a in audio.attributes] == ["rtpmap", "rtpmap", "fmtp", "rtcp", "ptime"]
    assert audio.get_attribute("ptime") == "20"
    assert audio.get_attribute("nope") is None
    assert audio.get_attributes("rtpmap") == ["0 PCMU/8000", "101 telephone-event/8000"]
    assert audio.has_attribute("fmtp") and not audio.has_attribute("fmt")
    assert audio.rtcp == Rtcp(49171)
    assert not audio.rtcp_mux
    assert audio.connection is None and audio.connections == []
    assert audio.effective_connection == sdp.connection
    assert audio.direction == "sendrecv"
    assert audio.session is sdp
    assert "audio" in repr(audio)

    assert (video.port, video.port_count, video.proto) == (51372, 2, "RTP/AVPF")
    assert video.connection == Connection("IN", "IP6", "2001:db8::5")
    assert video.effective_connection == video.connection
    assert video.direction == "recvonly"
    assert video.rtcp is None
    assert video.to_bytes().startswith(b"m=video 51372/2 RTP/AVPF 99\r\n")


@pytest.mark.parametrize(
    "proto",
    ["RTP/AVP", "RTP/SAVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVPF", "TCP/RTP/AVP", "udp", "UDP/BFCP"],
)
def test_protos(proto: str) -> None:
    sdp = parse_sdp(f"v=0\r\nm=audio 4000 {proto} 0\r\n".encode())
    assert sdp.media[0].proto == proto


def test_media_without_formats_is_accepted() -> None:
    sdp = parse_sdp(b"v=0\nm=audio 0 RTP/AVP\n")
    assert sdp.media[0].formats == []
    assert sdp.media[0].is_disabled


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("c=IN IP4 224.2.36.42/127", Connection("IN", "IP4", "224.2.36.42", 127)),
        ("c=IN IP4 224.2.1.1/127/3", Connection("IN", "IP4", "224.2.1.1", 127, 3)),
        ("c=IN IP6 ff15::101/3", Connection("IN", "IP6", "ff15::101", None, 3)),
        ("c=IN IP4 host.example.com", Connection("IN", "IP4", "host.example.com")),
        ("c=IN IP6 ::", Connection("IN", "IP6", "::")),
        (
            "c=ATM NSAP 47.0091.8100.0000.0060.3e64.fd01/x",
            Connection("ATM", "NSAP", "47.0091.8100.0000.0060.3e64.fd01/x"),
        ),
    ],
)
def test_connection_forms(line: str, expected: Connection) -> None:
    sdp = parse_sdp(f"v=0\r\n{line}\r\n".encode())
    assert sdp.connection == expected
    assert sdp.to_bytes() == f"v=0\r\n{line}\r\n".encode()


def test_rtcp_with_address() -> None:
    sdp = parse_sdp(b"v=0\r\nm=audio 5000 RTP/AVP 0\r\na=rtcp:53020 IN IP6 2001:db8::1\r\n")
    assert sdp.media[0].rtcp == Rtcp(53020, "IN", "IP6", "2001:db8::1")


def test_direction_session_default_and_media_override() -> None:
    body = b"v=0\na=sendonly\nm=audio 1 RTP/AVP 0\nm=audio 2 RTP/AVP 0\na=inactive\n"
    sdp = parse_sdp(body)
    assert sdp.direction == "sendonly"
    assert [m.direction for m in sdp.media] == ["sendonly", "inactive"]
    assert all(m.is_hold for m in sdp.media)


def test_direction_attribute_with_value_is_not_a_direction() -> None:
    sdp = parse_sdp(b"v=0\nm=audio 1 RTP/AVP 0\na=sendonly:odd\n")
    assert sdp.media[0].direction == "sendrecv"


@pytest.mark.parametrize(
    ("extra", "held"),
    [
        ("", False),
        ("a=sendonly\n", True),
        ("a=inactive\n", True),
        ("a=recvonly\n", False),
        ("c=IN IP4 0.0.0.0\n", True),
        ("c=IN IP6 ::\n", True),
        ("c=IN IP4 0.0.0.1\n", False),
    ],
)
def test_is_hold(extra: str, held: bool) -> None:
    sdp = parse_sdp(f"v=0\nc=IN IP4 192.0.2.1\nm=audio 1 RTP/AVP 0\n{extra}".encode())
    assert sdp.media[0].is_hold is held


def test_session_hold_address_applies_to_media() -> None:
    sdp = parse_sdp(b"v=0\nc=IN IP4 0.0.0.0\nm=audio 1 RTP/AVP 0\n")
    assert sdp.connection is not None and sdp.connection.is_hold
    assert sdp.media[0].is_hold


def test_crypto_accessor() -> None:
    audio = parse_sdp(SRTP_OFFER).media[0]
    c1, c2 = audio.crypto
    assert c1 == Crypto(
        "1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        1,
        "AES_CM_128_HMAC_SHA1_80",
        "inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32",
        (),
    )
    assert c2.tag == 2 and c2.session_params == ("KDR=1", "UNENCRYPTED_SRTCP")
    assert Crypto.from_value("garbage") == Crypto("garbage", None, None, None, ())


def test_candidates_accessor() -> None:
    audio = parse_sdp(WEBRTC_OFFER).media[0]
    srflx, host, tcp = audio.candidates
    assert srflx.foundation == "842163049"
    assert (srflx.component, srflx.transport, srflx.priority) == (1, "udp", 1677729535)
    assert (srflx.address, srflx.port, srflx.typ) == ("198.51.100.7", 50212, "srflx")
    assert srflx.extensions[:2] == ("raddr", "192.168.1.20")
    assert (host.typ, host.extensions) == ("host", ())
    assert tcp.extensions == ("tcptype", "active")
    bad = Candidate.from_value("1 1 UDP 5 10.0.0.1 notaport typ host")
    assert bad.value.startswith("1 1 UDP") and bad.port is None and bad.typ is None
    assert audio.rtcp_mux
    assert audio.rtcp == Rtcp(9, "IN", "IP4", "0.0.0.0")


# --------------------------------------------------------------------------- mutators


def test_set_media_port_touches_only_m_line() -> None:
    sdp = parse_sdp(BASIC)
    sdp.media[0].port = 30000
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (b"m=audio 49170 RTP/AVP 0 8 101\r\n", b"m=audio 30000 RTP/AVP 0 8 101\r\n")
    ]
    assert sdp.media[0].port == 30000


def test_port_count_kept_and_changed() -> None:
    sdp = parse_sdp(BASIC)
    video = sdp.media[1]
    video.port = 40000
    assert video.port_count == 2
    video.port_count = None
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (b"m=video 51372/2 RTP/AVPF 99\r\n", b"m=video 40000 RTP/AVPF 99\r\n")
    ]
    video.port_count = 4
    assert parse_sdp(sdp.to_bytes()).media[1].port_count == 4


def test_port_rewrite_keeps_odd_spacing() -> None:
    body = b"v=0\nm=audio  49170   RTP/AVP  0 \n"
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    sdp.media[0].port = 7
    assert sdp.to_bytes() == b"v=0\nm=audio  7   RTP/AVP  0 \n"


@pytest.mark.parametrize("bad", [-1, 65536, 10**9])
def test_bad_port_refused_and_nothing_changes(bad: int) -> None:
    sdp = parse_sdp(BASIC)
    with pytest.raises(ValueError):
        sdp.media[0].port = bad
    with pytest.raises(ValueError):
        sdp.media[0].port_count = 0
    assert sdp.to_bytes() == BASIC


def test_set_media_connection_replaces_existing() -> None:
    sdp = parse_sdp(BASIC)
    sdp.media[1].set_connection_address("2001:db8::77")
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (b"c=IN IP6 2001:db8::5\r\n", b"c=IN IP6 2001:db8::77\r\n")
    ]


def test_set_media_connection_inserts_after_m_and_i() -> None:
    body = b"v=0\nc=IN IP4 10.0.0.1\nm=audio 1 RTP/AVP 0\ni=main audio\na=ptime:20\n"
    sdp = parse_sdp(body)
    sdp.media[0].set_connection_address("203.0.113.1")
    assert sdp.to_bytes() == (
        b"v=0\nc=IN IP4 10.0.0.1\nm=audio 1 RTP/AVP 0\ni=main audio\n"
        b"c=IN IP4 203.0.113.1\na=ptime:20\n"
    )
    assert sdp.media[0].effective_connection == Connection("IN", "IP4", "203.0.113.1")
    assert sdp.connection == Connection("IN", "IP4", "10.0.0.1")


def test_set_session_connection_replaces_and_inserts() -> None:
    sdp = parse_sdp(BASIC)
    sdp.set_connection_address("203.0.113.1")
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (b"c=IN IP4 192.168.1.10\r\n", b"c=IN IP4 203.0.113.1\r\n")
    ]
    sdp2 = parse_sdp(b"v=0\no=- 1 1 IN IP4 h\ns=-\nt=0 0\nm=audio 1 RTP/AVP 0\n")
    sdp2.set_connection_address("2001:db8::1")
    assert sdp2.to_bytes() == (
        b"v=0\no=- 1 1 IN IP4 h\ns=-\nc=IN IP6 2001:db8::1\nt=0 0\nm=audio 1 RTP/AVP 0\n"
    )


def test_connection_ttl_kept_for_same_type_dropped_otherwise() -> None:
    sdp = parse_sdp(b"v=0\nc=IN IP4 224.2.1.1/127/3\n")
    sdp.set_connection_address("224.2.1.9")
    assert sdp.connection == Connection("IN", "IP4", "224.2.1.9", 127, 3)
    sdp.set_connection_address("ff15::1")
    assert sdp.to_bytes() == b"v=0\nc=IN IP6 ff15::1\n"
    sdp.set_connection_address("10.0.0.1", addrtype="IP4")
    assert sdp.connection == Connection("IN", "IP4", "10.0.0.1")


def test_connection_setter_and_removal() -> None:
    sdp = parse_sdp(BASIC)
    sdp.media[0].connection = Connection("IN", "IP4", "0.0.0.0")
    assert sdp.media[0].is_hold
    sdp.media[0].connection = None
    sdp.media[1].connection = None
    assert sdp.to_bytes() == BASIC.replace(b"c=IN IP6 2001:db8::5\r\n", b"")
    with pytest.raises(ValueError):
        sdp.connection = Connection("IN", "IP6", "ff15::1", ttl=5)  # IP6 has no TTL
    with pytest.raises(ValueError):
        sdp.connection = Connection("IN", "IP4", "a b")
    with pytest.raises(ValueError):
        sdp.connection = Connection("IN", "IP4", "")
    assert sdp.connection == Connection("IN", "IP4", "192.168.1.10")


def test_set_origin_and_origin_address() -> None:
    sdp = parse_sdp(BASIC)
    sdp.set_origin_address("203.0.113.1")
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (
            b"o=alice 2890844526 2890844527 IN IP4 192.168.1.10\r\n",
            b"o=alice 2890844526 2890844527 IN IP4 203.0.113.1\r\n",
        )
    ]
    old = sdp.origin
    assert old is not None
    sdp.origin = Origin(old.username, old.sess_id, "2890844528", "IN", "IP6", "2001:db8::1")
    assert parse_sdp(sdp.to_bytes()).origin == sdp.origin
    with pytest.raises(ValueError):
        sdp.origin = Origin("a b", "1", "1", "IN", "IP4", "x")
    with pytest.raises(ValueError):
        sdp.origin = Origin("a", "one", "1", "IN", "IP4", "x")


def test_origin_added_when_missing_and_address_needs_origin() -> None:
    sdp = parse_sdp(b"v=0\ns=-\n")
    with pytest.raises(ValueError):
        sdp.set_origin_address("192.0.2.1")
    sdp.origin = Origin("-", "1", "1", "IN", "IP4", "192.0.2.1")
    assert sdp.to_bytes() == b"v=0\no=- 1 1 IN IP4 192.0.2.1\ns=-\n"


def test_origin_username_may_be_utf8() -> None:
    body = "v=0\no=jürgen 1 1 IN IP4 192.0.2.1\n".encode()
    sdp = parse_sdp(body)
    assert sdp.origin is not None and sdp.origin.username == "jürgen"
    sdp.set_origin_address("192.0.2.2")
    assert sdp.to_bytes() == "v=0\no=jürgen 1 1 IN IP4 192.0.2.2\n".encode()


def test_rtcp_set_replace_remove() -> None:
    sdp = parse_sdp(BASIC)
    audio, video = sdp.media
    audio.set_rtcp(30001, "203.0.113.1")
    assert changed_lines(BASIC, sdp.to_bytes()) == [
        (b"a=rtcp:49171\r\n", b"a=rtcp:30001 IN IP4 203.0.113.1\r\n")
    ]
    assert audio.rtcp == Rtcp(30001, "IN", "IP4", "203.0.113.1")
    audio.set_rtcp(30003)
    assert audio.rtcp == Rtcp(30003)
    video.rtcp = Rtcp(40001, "IN", "IP6", "2001:db8::1")
    assert video.to_bytes().endswith(b"a=recvonly\r\na=rtcp:40001 IN IP6 2001:db8::1\r\n")
    audio.rtcp = None
    assert audio.rtcp is None and not audio.has_attribute("rtcp")
    with pytest.raises(ValueError):
        audio.rtcp = Rtcp(70000)
    with pytest.raises(ValueError):
        audio.rtcp = Rtcp(1, "IN", None, "x")


def test_rtcp_mux_toggle() -> None:
    sdp = parse_sdp(BASIC)
    audio = sdp.media[0]
    audio.rtcp_mux = True
    audio.rtcp_mux = True  # idempotent
    assert audio.get_attributes("rtcp-mux") == [None]
    audio.rtcp_mux = False
    assert sdp.to_bytes() == BASIC


def test_direction_set() -> None:
    sdp = parse_sdp(BASIC)
    audio, video = sdp.media
    video.direction = "inactive"
    assert changed_lines(BASIC, sdp.to_bytes()) == [(b"a=recvonly\r\n", b"a=inactive\r\n")]
    audio.direction = "sendonly"
    assert audio.direction == "sendonly"
    assert audio.to_bytes().endswith(b"a=ptime:20\r\na=sendonly\r\n")
    sdp.direction = "recvonly"
    assert sdp.direction == "recvonly"
    assert sdp.get_attributes("recvonly") == [None]
    with pytest.raises(ValueError):
        audio.direction = "sideways"


def test_direction_set_collapses_duplicates() -> None:
    sdp = parse_sdp(b"v=0\nm=audio 1 RTP/AVP 0\na=sendonly\na=x\na=inactive\n")
    sdp.media[0].direction = "sendrecv"
    assert sdp.to_bytes() == b"v=0\nm=audio 1 RTP/AVP 0\na=sendrecv\na=x\n"


def test_attribute_add_set_remove() -> None:
    sdp = parse_sdp(BASIC)
    audio = sdp.media[0]
    audio.add_attribute("x-note", "hello wörld")
    audio.add_attribute("x-flag")
    assert audio.attributes[-2:] == [Attribute("x-note", "hello wörld"), Attribute("x-flag")]
    audio.set_attribute("rtpmap", "0 PCMU/8000")
    assert audio.get_attributes("rtpmap") == ["0 PCMU/8000"]
    assert audio.remove_attributes("x-note", "x-flag") == 2
    assert audio.remove_attributes("absent") == 0
    sdp.set_attribute("tool", "proxy")
    assert sdp.attributes == [Attribute("tool", "proxy")]
    sdp.add_attribute("ice-lite")
    assert sdp.remove_attributes("ice-lite") == 1
    for name, value in [("", None), ("a:b", None), ("x", "a\r\nb"), ("x", "nul\0"), ("rtcp", "x")]:
        with pytest.raises(ValueError):
            audio.add_attribute(name, value)
    with pytest.raises(ValueError):
        audio.add_attribute("x", "y" * MAX_LINE_LENGTH)


def test_copy_is_independent() -> None:
    sdp = parse_sdp(BASIC)
    dup = sdp.copy()
    assert dup.to_bytes() == BASIC
    assert all(m.session is dup for m in dup.media)
    dup.media[0].port = 1
    dup.set_connection_address("203.0.113.1")
    dup.media[1].direction = "inactive"
    dup.media[0].add_attribute("x")
    assert sdp.to_bytes() == BASIC
    assert dup.media[0].effective_connection == Connection("IN", "IP4", "203.0.113.1")


def test_srtp_offer_crypto_intact_after_rewrite() -> None:
    sdp = parse_sdp(SRTP_OFFER)
    audio = sdp.media[0]
    crypto_before = [ln for ln in lines_of(SRTP_OFFER) if ln.startswith(b"a=crypto:")]
    assert len(crypto_before) == 2
    sdp.set_origin_address("203.0.113.1")
    sdp.set_connection_address("203.0.113.1")
    audio.port = 35000
    audio.set_rtcp(35001, "203.0.113.1")
    out = sdp.to_bytes()
    assert [ln for ln in lines_of(out) if ln.startswith(b"a=crypto:")] == crypto_before
    assert [c for c, _ in changed_lines(SRTP_OFFER, out)] == [
        b"o=- 4858 4858 IN IP4 10.0.0.7\r\n",
        b"c=IN IP4 10.0.0.7\r\n",
        b"m=audio 16384 RTP/SAVP 0 101\r\n",
        b"a=rtcp:16385 IN IP4 10.0.0.7\r\n",
    ]
    again = parse_sdp(out).media[0]
    assert again.crypto == audio.crypto
    assert (again.port, again.proto) == (35000, "RTP/SAVP")


def test_webrtc_offer_ice_removed() -> None:
    sdp = parse_sdp(WEBRTC_OFFER)
    audio = sdp.media[0]
    assert len(audio.candidates) == 3
    assert audio.remove_attributes("candidate", "end-of-candidates") == 4
    assert audio.candidates == []
    removed = sdp.remove_ice_everywhere()
    assert removed == 3  # ice-options (session), ice-ufrag, ice-pwd
    out = sdp.to_bytes()
    kept = [
        ln
        for ln in lines_of(WEBRTC_OFFER)
        if not any(
            ln.startswith(f"a={n}:".encode()) or ln == f"a={n}\r\n".encode() for n in ICE_ATTRIBUTES
        )
    ]
    assert lines_of(out) == kept
    assert b"fingerprint" in out and b"a=setup:actpass\r\n" in out
    assert parse_sdp(out).to_bytes() == out


# --------------------------------------------------------------------------- line endings


def test_lf_preserved_and_used_for_new_lines() -> None:
    body = BASIC.replace(b"\r\n", b"\n")
    sdp = parse_sdp(body)
    assert sdp.line_ending == b"\n"
    assert sdp.to_bytes() == body
    sdp.media[0].add_attribute("x")
    sdp.add_attribute("y")
    assert b"\r" not in sdp.to_bytes()


def test_mixed_endings_round_trip() -> None:
    body = b"v=0\r\ns=-\nt=0 0\r\nm=audio 1 RTP/AVP 0\n"
    assert parse_sdp(body).to_bytes() == body


@pytest.mark.parametrize("last_eol", [b"", b"\r"])
def test_missing_final_line_ending_kept_when_appending(last_eol: bytes) -> None:
    body = b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=ptime:20" + last_eol
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    sdp.media[0].add_attribute("rtcp-mux")
    assert sdp.to_bytes() == b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=ptime:20\r\na=rtcp-mux" + last_eol
    assert sdp.media[0].remove_attributes("rtcp-mux") == 1
    assert sdp.to_bytes() == body
    only_session = parse_sdp(b"v=0\r\ns=-")
    only_session.add_attribute("x")
    assert only_session.to_bytes() == b"v=0\r\ns=-\r\na=x"


def test_trailing_blank_lines_kept() -> None:
    body = BASIC + b"\r\n\n"
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    sdp.media[1].add_attribute("x")
    assert sdp.to_bytes() == BASIC + b"a=x\r\n\r\n\n"


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n",
        b"o=- 1 1 IN IP4 1.2.3.4\r\n",
        b"v=1\r\n",
        b"v=0 \r\n",
        b" v=0\r\n",
        b"\xef\xbb\xbfv=0\r\n",
        b"v=0\r\nv=0\r\n",
        b"v=0\r\n\r\ns=-\r\n",
        b"v=0\r\ns -\r\n",
        b"v=0\r\n=x\r\n",
        b"v=0\r\n1=x\r\n",
        b"v=0\r\ns=a\rb\r\n",
        b"v=0\r\ns=a\0b\r\n",
        b"v=0\r\no=- 1 1 IN IP4\r\n",
        b"v=0\r\no=- x 1 IN IP4 h\r\n",
        b"v=0\r\no=- 1 2 3 IN IP4 h\r\n",
        b"v=0\r\no=- 1 1 IN IP4 h\r\no=- 1 1 IN IP4 h\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\n",
        b"v=0\r\nc=IN IP4\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4 x\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4/256\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4/1/2/3\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4/x\r\n",
        b"v=0\r\nc=IN IP6 ff15::1/1/2\r\n",
        b"v=0\r\nc=IN IP6 ff15::1/0\r\n",
        b"v=0\r\nc=IN IP4 /1\r\n",
        b"v=0\r\nc=IN IP4 1.2.3.4\t\r\n",
        b"v=0\r\nc=IN IP4 h\xc3\xa9\r\n",
        b"v=0\r\nm=audio\r\n",
        b"v=0\r\nm=audio 49170\r\n",
        b"v=0\r\nm=audio x RTP/AVP 0\r\n",
        b"v=0\r\nm=audio 65536 RTP/AVP 0\r\n",
        b"v=0\r\nm=audio 1/0 RTP/AVP 0\r\n",
        b"v=0\r\nm=audio 123456 RTP/AVP 0\r\n",
        b"v=0\r\nm=audio -1 RTP/AVP 0\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=:x\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:x\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:70000\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:1 IN IP4\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:1  IN IP4 h\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:1 IN IP4 h\xc3\xa9\r\n",
        b"v=0\r\nm=audio 1 RTP/AVP 0\r\n\r\na=x\r\n",
    ],
)
def test_malformed_bodies_raise_sdp_error(body: bytes) -> None:
    with pytest.raises(SdpError):
        parse_sdp(body)


def test_sdp_error_is_value_error_with_line() -> None:
    with pytest.raises(ValueError) as info:
        parse_sdp(b"v=0\r\ns=-\r\nc=IN\r\n")
    assert isinstance(info.value, SdpError)
    assert info.value.line == 3
    assert "line 3" in str(info.value)


def test_limits() -> None:
    head = b"v=0\r\n"
    too_big = head + b"s=" + b"x" * MAX_BODY_SIZE
    with pytest.raises(SdpError, match="larger"):
        parse_sdp(too_big)
    many = head + b"a=x\n" * MAX_LINES
    with pytest.raises(SdpError, match="lines"):
        parse_sdp(many)
    parse_sdp(head + b"a=x\n" * (MAX_LINES - 1))
    with pytest.raises(SdpError, match="too long"):
        parse_sdp(head + b"a=" + b"x" * MAX_LINE_LENGTH)
    parse_sdp(head + b"a=" + b"x" * (MAX_LINE_LENGTH - 2))
    with pytest.raises(SdpError):
        parse_sdp(head + b"m=audio " + b"9" * 5000 + b" RTP/AVP 0\r\n")


def test_unknown_lines_and_bytes_preserved() -> None:
    body = (
        b"v=0\r\no=- 1 1 IN IP4 h\r\ns=\xff\xfe not utf-8\r\nZ=whatever goes\r\n"
        b"x=unknown\r\nb=AS:64\r\nk=prompt\r\nm=audio 1 RTP/AVP 0\r\na=x-\xff:\xc3\xa9\r\n"
    )
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    assert sdp.media[0].attributes == [Attribute("x-\udcff", "é")]
    sdp.media[0].port = 2
    sdp.media[0].set_attribute("x-\udcff", "ü")
    assert parse_sdp(sdp.to_bytes()).media[0].attributes == [Attribute("x-\udcff", "ü")]


def test_parse_accepts_bytearray_and_memoryview() -> None:
    assert parse_sdp(bytearray(BASIC)).to_bytes() == BASIC
    assert parse_sdp(memoryview(BASIC)).to_bytes() == BASIC


def test_constructed_description() -> None:
    sdp = parse_sdp(b"v=0\r\n")
    assert isinstance(sdp, SessionDescription)
    assert sdp.origin is None and sdp.connection is None and sdp.media == []
    assert sdp.session_name is None


# --------------------------------------------------------------------------- properties

_SAFE_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"),
    max_size=30,
)
_TOKEN = st.from_regex(r"[A-Za-z0-9._!~*'+-]{1,12}", fullmatch=True)
_ATTR_NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True).filter(
    lambda n: n != "rtcp"
)
_SEP = st.sampled_from([" ", " ", " ", "  "])


@st.composite
def _address(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["IP4", "IP6", "FQDN"]))
    if kind == "FQDN":
        return "IP4", draw(
            st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){1,2}", fullmatch=True)
        )
    ip = draw(st.ip_addresses(v=4 if kind == "IP4" else 6))
    return kind, str(ip)


@st.composite
def _attribute_line(draw: st.DrawFn) -> str:
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return "a=" + draw(st.sampled_from(["sendrecv", "sendonly", "recvonly", "inactive"]))
    if choice == 1:
        port = draw(st.integers(0, 65535))
        if draw(st.booleans()):
            addrtype, addr = draw(_address())
            return f"a=rtcp:{port} IN {addrtype} {addr}"
        return f"a=rtcp:{port}"
    if choice == 2:
        return "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + draw(
            st.from_regex(r"[A-Za-z0-9+/]{40}", fullmatch=True)
        )
    if choice == 3:
        return f"a=candidate:1 1 UDP 2130706431 10.0.0.{draw(st.integers(0, 255))} 9 typ host"
    name = draw(_ATTR_NAME)
    if draw(st.booleans()):
        return f"a={name}"
    return f"a={name}:{draw(_SAFE_TEXT)}"


@st.composite
def _connection_line(draw: st.DrawFn) -> str:
    addrtype, addr = draw(_address())
    sep = draw(_SEP)
    return f"c=IN{sep}{addrtype}{sep}{addr}"


@st.composite
def _media_block(draw: st.DrawFn) -> list[str]:
    media = draw(st.sampled_from(["audio", "video", "application", "text", "message"]))
    port = str(draw(st.integers(0, 65535)))
    if draw(st.booleans()):
        port += f"/{draw(st.integers(1, 8))}"
    proto = draw(st.sampled_from(["RTP/AVP", "RTP/SAVP", "RTP/SAVPF", "UDP/TLS/RTP/SAVPF", "udp"]))
    fmts = draw(st.lists(st.integers(0, 127).map(str), min_size=1, max_size=5))
    sep = draw(_SEP)
    trail = draw(st.sampled_from(["", "", " "]))
    lines = [f"m={media}{sep}{port}{sep}{proto}{sep}{sep.join(fmts)}{trail}"]
    if draw(st.booleans()):
        lines.append("i=" + draw(_SAFE_TEXT))
    if draw(st.booleans()):
        lines.append(draw(_connection_line()))
    if draw(st.booleans()):
        lines.append("b=AS:" + str(draw(st.integers(0, 10000))))
    lines.extend(draw(st.lists(_attribute_line(), max_size=6)))
    return lines


@st.composite
def sdp_bodies(draw: st.DrawFn) -> bytes:
    addrtype, addr = draw(_address())
    username = draw(
        st.text(
            alphabet=st.characters(
                exclude_categories=["Cs", "Zs", "Cc", "Zl", "Zp"], exclude_characters="\x85"
            ),
            min_size=1,
            max_size=10,
        )
    )
    sep = draw(_SEP)
    lines = [
        "v=0",
        f"o={username}{sep}{draw(st.integers(0, 2**64))}{sep}{draw(st.integers(0, 2**64))}"
        f"{sep}IN{sep}{addrtype}{sep}{addr}",
        "s=" + draw(_SAFE_TEXT),
    ]
    if draw(st.booleans()):
        lines.append("i=" + draw(_SAFE_TEXT))
    if draw(st.booleans()):
        lines.append(draw(_connection_line()))
    lines.append("t=0 0")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["r=7d 1h 0 25h", "z=2882844526 -1h", "X=???"])))
    lines.extend(draw(st.lists(_attribute_line(), max_size=4)))
    for block in draw(st.lists(_media_block(), max_size=4)):
        lines.extend(block)
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    mixed = draw(st.integers(0, 9)) == 0
    out = ""
    for ln in lines:
        out += ln + (draw(st.sampled_from(["\r\n", "\n"])) if mixed else eol)
    ending = draw(st.sampled_from(["keep", "keep", "drop", "extra"]))
    if ending == "drop":
        out = out.rstrip("\r\n")
    elif ending == "extra":
        out += eol
    return out.encode("utf-8")


_PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPS
@given(sdp_bodies())
def test_generated_sdp_round_trips(body: bytes) -> None:
    sdp = parse_sdp(body)
    assert sdp.to_bytes() == body
    assert sdp.copy().to_bytes() == body
    for m in sdp.media:
        m.crypto, m.candidates, m.rtcp, m.direction, m.is_hold, m.effective_connection  # noqa: B018


@_PROPS
@given(sdp_bodies(), st.data())
def test_changing_a_port_changes_only_that_line(body: bytes, data: st.DataObject) -> None:
    sdp = parse_sdp(body)
    assume(sdp.media)
    index = data.draw(st.integers(0, len(sdp.media) - 1))
    port = data.draw(st.integers(0, 65535))
    media = sdp.media[index]
    old_count = media.port_count
    media.port = port
    out = sdp.to_bytes()
    diff = changed_lines(body, out)
    assert len(diff) <= 1
    for before, after in diff:
        # Only the port field moved; the spacing and every other field are as they were.
        count = b"" if old_count is None else b"/%d" % old_count
        assert after == re.sub(rb"^(m=[^ ]+ +)[^ ]+", rb"\g<1>%d%s" % (port, count), before)
    again = parse_sdp(out)
    assert again.media[index].port == port
    assert again.media[index].port_count == old_count
    assert [m.formats for m in again.media] == [m.formats for m in parse_sdp(body).media]


@_PROPS
@given(sdp_bodies(), st.data())
def test_changing_an_address_changes_only_that_line(body: bytes, data: st.DataObject) -> None:
    sdp = parse_sdp(body)
    addrtype, addr = data.draw(_address())
    target = data.draw(st.sampled_from(["origin", "session", "media"]))
    prefix = b"c="
    if target == "origin":
        sdp.set_origin_address(addr, addrtype)
        prefix = b"o="
    elif target == "session" or not sdp.media:
        assume(sdp.connection is not None)
        sdp.set_connection_address(addr, addrtype)
    else:
        media = data.draw(st.sampled_from(sdp.media))
        assume(media.connection is not None)
        media.set_connection_address(addr, addrtype)
    out = sdp.to_bytes()
    diff = changed_lines(body, out)
    assert len(diff) <= 1
    fields = (
        rb"^(o=(?:[^ ]+ +){4})[^ ]+( +)[^ \r\n]+"
        if prefix == b"o="
        else rb"^(c=[^ ]+ +)[^ ]+( +)[^ \r\n]+"
    )
    for before, after in diff:
        # Only the address type and address fields changed, spacing kept.
        expected = re.sub(fields, rb"\g<1>%s\g<2>%s" % (addrtype.encode(), addr.encode()), before)
        assert after == expected
    assert parse_sdp(out).to_bytes() == out


@_PROPS
@given(sdp_bodies())
def test_adding_an_attribute_only_appends(body: bytes) -> None:
    sdp = parse_sdp(body)
    target = sdp.media[-1] if sdp.media else sdp
    target.add_attribute("x-proxy", "1")
    out = parse_sdp(sdp.to_bytes())
    final = out.media[-1] if out.media else out
    assert final.attributes[-1] == Attribute("x-proxy", "1")
    assert out.line_ending == sdp.line_ending


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=400).map(lambda b: b"v=0\r\n" + b)))
def test_random_bytes_raise_only_sdp_error(body: bytes) -> None:
    try:
        sdp = parse_sdp(body)
    except SdpError:
        return
    assert sdp.to_bytes() == body


@_PROPS
@given(sdp_bodies(), st.data())
def test_damaged_sdp_raises_only_sdp_error(body: bytes, data: st.DataObject) -> None:
    damaged = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(damaged)))
        op = data.draw(st.integers(0, 2))
        byte = data.draw(st.sampled_from([0, 9, 10, 13, 32, 47, 58, 61, 0xFF, 0x41, 0x30]))
        if op == 0:
            damaged.insert(pos, byte)
        elif op == 1 and pos < len(damaged):
            del damaged[pos]
        elif pos < len(damaged):
            damaged[pos] = byte
    try:
        sdp = parse_sdp(bytes(damaged))
    except SdpError:
        event("refused")
        return
    event("accepted")
    assert sdp.to_bytes() == bytes(damaged)
