"""Offer/answer through the relay as pure functions over SDP (RFC 3264), no I/O.

The engine reads what the sender's SDP says (:func:`media_endpoints`), decides per ``m=`` line
the transport protocol (:func:`translate_protocol`) and rtcp-mux (:func:`offer_mux`,
:func:`answer_mux`, RFC 5761), opens ports, and then :func:`rewrite_sdp` turns the sender's SDP
and the relay's addresses into the SDP for the receiver. Only ``c=``, ``o=`` (when asked),
``m=`` ports and protocol, ``a=rtcp``, ``a=rtcp-mux`` and ICE attributes change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from sipproxy.media.errors import RelayError
from sipproxy.media.ports import Address
from sipproxy.sdp import MediaDescription, SessionDescription

__all__ = [
    "MAX_STREAMS",
    "Endpoints",
    "Mux",
    "RelayedMedia",
    "SignalOptions",
    "answer_mux",
    "check_stream_count",
    "is_secure",
    "media_endpoints",
    "offer_mux",
    "rewrite_sdp",
    "translate_protocol",
]

#: Media streams (m= lines) one SDP may ask the relay for: each takes a port pair per party,
#: and a call has a few (audio, video, text, BFCP), so a hostile offer cannot take the range.
MAX_STREAMS: Final = 16


@dataclass(slots=True)
class SignalOptions:
    """What an offer or answer asks for beyond the SDP (the NG keys and flags)."""

    direction: tuple[str | None, str | None] = (None, None)
    #: Take endpoint addresses from ``received_from`` instead of the SDP (``SIP source address``).
    sip_source_address: bool = False
    received_from: str | None = None
    media_address: str | None = None
    asymmetric: bool = False
    strict_source: bool = False
    media_handover: bool = False
    replace_origin: bool = False
    replace_session_connection: bool = False
    replace_zero_address: bool = False
    #: The ``ICE`` key (``remove``, ``force``, ...); ICE is always removed, see ``warnings``.
    ice: str | None = None
    rtcp_mux: frozenset[str] = frozenset()
    transport_protocol: str | None = None
    full_rtcp_attribute: bool = False
    no_rtcp_attribute: bool = False
    label: str | None = None
    via_branch: str | None = None


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Where one ``m=`` line of the sender's SDP asks for its media (None: nowhere, on hold),
    and whether the sender should be sending (its direction)."""

    rtp: Address | None
    rtcp: Address | None
    sends: bool


@dataclass(frozen=True, slots=True)
class Mux:
    """rtcp-mux after one offer or answer for one ``m=`` line.

    :ivar toward_receiver: whether the SDP for the receiver offers or answers rtcp-mux.
    :ivar sender: whether the sender muxes from now on (None: as before).
    :ivar receiver: whether the receiver muxes from now on (None: as before).
    """

    toward_receiver: bool
    sender: bool | None = None
    receiver: bool | None = None


@dataclass(frozen=True, slots=True)
class RelayedMedia:
    """The relay's side of one ``m=`` line, for the receiver's SDP.

    :ivar rtp_port: the relay port the receiver sends RTP to (RTCP: ``rtcp_port``).
    :ivar mux: rtcp-mux toward the receiver (:attr:`Mux.toward_receiver`).
    :ivar protocol: the transport protocol to write, or None to keep the sender's.
    """

    rtp_port: int
    rtcp_port: int
    mux: bool
    protocol: str | None = None


def check_stream_count(sdp: SessionDescription) -> None:
    """:raises RelayError: when ``sdp`` has more than :data:`MAX_STREAMS` ``m=`` lines."""
    if len(sdp.media) > MAX_STREAMS:
        raise RelayError(f"Too many media streams ({len(sdp.media)}, at most {MAX_STREAMS})")


def media_endpoints(media: MediaDescription, options: SignalOptions) -> Endpoints:
    """Where the sender of ``media`` receives RTP and RTCP, by its SDP and ``options``."""
    conn = media.effective_connection
    hold = conn is None or conn.is_hold
    if options.media_address:
        address: str | None = options.media_address
    elif options.sip_source_address and options.received_from and not hold:
        address = options.received_from
    else:
        address = None if hold or conn is None else conn.address
    sends = media.direction in ("sendrecv", "sendonly") and not hold and media.port != 0
    if address is None or media.port == 0:
        return Endpoints(None, None, sends)
    rtp = (address, media.port)
    rtcp_attr = media.rtcp
    if rtcp_attr is not None:
        rtcp_address = rtcp_attr.address if rtcp_attr.address and not (
            options.media_address or options.sip_source_address
        ) else address
        rtcp: Address = (rtcp_address, rtcp_attr.port)
    else:
        rtcp = (address, media.port + 1)
    return Endpoints(rtp, rtcp, sends)


def is_secure(proto: str) -> bool:
    """Whether ``proto`` is an SRTP profile (which the relay passes through untouched)."""
    return "SAVP" in proto.upper()


def translate_protocol(
    proto: str, wanted: str | None, offerer_protocol: str | None, *, offer: bool
) -> str | None:
    """The transport protocol for the receiver's ``m=`` line, or None to keep ``proto``.

    :param wanted: the ``transport-protocol`` the command asks for (``accept``: keep).
    :param offerer_protocol: for an answer, the protocol the offerer itself used: the answer
        goes back in it when that is only a matter of the profile's name (AVP and AVPF, SAVP
        and SAVPF).
    :raises RelayError: for a translation between RTP and SRTP (the relay does not encrypt).
    """
    if not offer and wanted is None and offerer_protocol is not None:
        wanted = offerer_protocol
        if is_secure(wanted) != is_secure(proto):
            return None
    if wanted is None or wanted == "accept" or wanted == proto:
        return None
    if is_secure(wanted) != is_secure(proto):
        raise RelayError(
            f"Cannot translate {proto} to {wanted}: this relay passes SRTP through "
            "and does not encrypt or decrypt"
        )
    return wanted


def offer_mux(has_mux: bool, policy: frozenset[str]) -> Mux:
    """rtcp-mux for an offer: ``has_mux`` is what the offer says, ``policy`` the NG
    ``rtcp-mux`` values (``require``, ``offer``, ``demux``, ``reject``, ``accept``)."""
    if "require" in policy:
        return Mux(True, receiver=True)
    if "offer" in policy:
        return Mux(True)
    return Mux(has_mux and not ({"demux", "reject"} & policy))


def answer_mux(
    has_mux: bool, policy: frozenset[str], offer_policy: frozenset[str], offered_mux: bool
) -> Mux:
    """rtcp-mux for an answer to an offer that said ``offered_mux`` under ``offer_policy``:
    the sender (the answerer) muxes when its answer says so or the offer required it; the
    receiver (the offerer) when it offered it and the policies let it."""
    sender = has_mux or "require" in offer_policy
    policy = offer_policy | policy
    if "reject" in policy:
        receiver = False
    elif "demux" in policy:
        receiver = offered_mux
    else:
        receiver = offered_mux and sender
    return Mux(receiver, sender=sender, receiver=receiver)


def rewrite_sdp(
    sdp: SessionDescription,
    address: str,
    relayed: Mapping[int, RelayedMedia],
    options: SignalOptions,
    *,
    offer: bool,
) -> SessionDescription:
    """The sender's ``sdp`` as the receiver gets it: the relay's ``address`` and ports.

    :param relayed: the relay's side per ``m=`` line index; a line with port 0 (rejected or
        removed) is left as it is.
    :returns: a copy; ``sdp`` is not changed.
    """
    out = sdp.copy()
    for index, media in enumerate(out.media):
        if media.port == 0:
            continue
        ours = relayed[index]
        if ours.protocol is not None:
            media.proto = ours.protocol
        conn = media.effective_connection
        keep_hold = conn is not None and conn.is_hold and not options.replace_zero_address
        if not keep_hold:
            if media.connection is not None or not options.replace_session_connection:
                media.set_connection_address(address)
        media.port = ours.rtp_port
        if ours.mux and (not offer or "require" in options.rtcp_mux):
            media.rtcp = None
        elif options.no_rtcp_attribute:
            media.rtcp = None
        elif options.full_rtcp_attribute:
            media.set_rtcp(ours.rtcp_port, address)
        else:
            media.set_rtcp(ours.rtcp_port)
        media.rtcp_mux = ours.mux
    if options.replace_session_connection and out.connection is not None:
        if not out.connection.is_hold or options.replace_zero_address:
            out.set_connection_address(address)
    if options.replace_origin and out.origin is not None:
        out.set_origin_address(address)
    out.remove_ice_everywhere()
    return out
