"""Offer/answer through the relay as pure functions: SDP and the relay's addresses in, SDP out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sipproxy.media.errors import RelayError
from sipproxy.media.offer_answer import (
    Endpoints,
    Mux,
    RelayedMedia,
    SignalOptions,
    answer_mux,
    check_stream_count,
    media_endpoints,
    offer_mux,
    rewrite_sdp,
    translate_protocol,
)
from sipproxy.sdp import parse_sdp

RELAY = "203.0.113.1"


def sdp(*medias: str, session_c: str = "192.168.1.20", extra: str = "") -> bytes:
    lines = ["v=0", f"o=- 1 1 IN IP4 {session_c}", "s=-", f"c=IN IP4 {session_c}", "t=0 0",
             *extra.splitlines()]
    for m in medias:
        lines.extend(m.splitlines())
    return ("\r\n".join(lines) + "\r\n").encode()


AUDIO = ("m=audio 4000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
         "a=candidate:1 1 UDP 1 192.168.1.20 4000 typ host")


def test_endpoints_from_the_sdp_or_the_sip_source() -> None:
    media = parse_sdp(sdp(AUDIO)).media[0]
    assert media_endpoints(media, SignalOptions()) == Endpoints(
        ("192.168.1.20", 4000), ("192.168.1.20", 4001), True)
    behind_nat = SignalOptions(sip_source_address=True, received_from="198.51.100.7")
    assert media_endpoints(media, behind_nat).rtp == ("198.51.100.7", 4000)
    held = parse_sdp(sdp(AUDIO, session_c="0.0.0.0")).media[0]
    assert media_endpoints(held, behind_nat) == Endpoints(None, None, False)


def test_rewrite_puts_the_relay_in_and_leaves_the_input_alone() -> None:
    original = sdp(AUDIO)
    parsed = parse_sdp(original)
    options = SignalOptions(replace_origin=True, replace_session_connection=True)
    out = rewrite_sdp(parsed, RELAY, {0: RelayedMedia(30000, 30001, False)}, options,
                      offer=True)
    assert parsed.to_bytes() == original
    text = out.to_bytes().decode()
    assert "192.168.1.20" not in text
    assert f"c=IN IP4 {RELAY}" in text and f"o=- 1 1 IN IP4 {RELAY}" in text
    assert "m=audio 30000 RTP/AVP 0" in text and "a=rtcp:30001" in text
    assert "a=candidate" not in text


def test_rewrite_keeps_a_rejected_stream_and_a_hold() -> None:
    rejected = "m=video 0 RTP/AVP 96"
    parsed = parse_sdp(sdp(AUDIO, rejected, session_c="0.0.0.0"))
    out = rewrite_sdp(parsed, RELAY, {0: RelayedMedia(30000, 30001, True, "RTP/AVPF")},
                      SignalOptions(rtcp_mux=frozenset({"require"})), offer=True)
    audio, video = out.media
    assert (audio.port, audio.proto, audio.rtcp_mux, audio.rtcp) == (30000, "RTP/AVPF", True,
                                                                     None)
    assert audio.effective_connection is not None and audio.effective_connection.is_hold
    assert video.port == 0


@given(st.integers(min_value=1, max_value=20))
def test_stream_count(count: int) -> None:
    parsed = parse_sdp(sdp(*[AUDIO] * count))
    if count <= 16:
        check_stream_count(parsed)
    else:
        with pytest.raises(RelayError, match="Too many media streams"):
            check_stream_count(parsed)


def test_protocol() -> None:
    assert translate_protocol("RTP/AVP", None, None, offer=True) is None
    assert translate_protocol("RTP/AVP", "RTP/AVPF", None, offer=True) == "RTP/AVPF"
    # an answer goes back in the offerer's profile, unless that would take SRTP away
    assert translate_protocol("RTP/AVPF", None, "RTP/AVP", offer=False) == "RTP/AVP"
    assert translate_protocol("RTP/SAVP", None, "RTP/AVP", offer=False) is None
    with pytest.raises(RelayError, match="passes SRTP through"):
        translate_protocol("RTP/AVP", "RTP/SAVP", None, offer=True)


def test_rtcp_mux() -> None:
    nothing: frozenset[str] = frozenset()
    assert offer_mux(True, nothing) == Mux(True)
    assert offer_mux(True, frozenset({"demux"})) == Mux(False)
    assert offer_mux(False, frozenset({"require"})) == Mux(True, receiver=True)
    # the answerer takes it: both mux; the offerer's policy demux: the offerer does not
    assert answer_mux(True, nothing, nothing, True) == Mux(True, sender=True, receiver=True)
    assert answer_mux(True, nothing, frozenset({"demux"}), False) == Mux(
        False, sender=True, receiver=False)
    assert answer_mux(False, frozenset({"reject"}), nothing, True) == Mux(
        False, sender=False, receiver=False)
