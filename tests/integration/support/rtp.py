"""
RTP for the end-to-end tests: a pcap of numbered G.711 packets for sipp's C{play_pcap_audio},
sipp scenarios that play it and echo it, and loss counted packet by packet from captures
(netns.Capture).

A packet is identified by its SSRC and sequence number, which relays and NATs leave alone (the
built-in relay, its kernel fast path, rtpengine and C{sipp -rtp_echo} forward RTP byte for
byte; SRTP leaves the header in clear). Packets sent in the last moments before a call's BYE may
legitimately die with the call, so callers count only those sent before a cut-off.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.support.harness import SCENARIOS
from tests.integration.support.netns import Packet

__all__ = ["PACKET_INTERVAL", "Loss", "callee_scenario", "caller_scenario", "is_rtp", "loss",
           "rtp_id", "write_rtp_pcap"]

#: G.711 at 20 ms
PACKET_INTERVAL = 0.02
_SAMPLES = 160
_SSRC = 0x5EED0001
#: RTP payload types this suite sends (PCMU, PCMA); RTCP's 200-204 are not RTP
_AUDIO_TYPES = frozenset({0, 8})
_SIP_PORTS = frozenset({5060, 5061, 5070, 5090})

PacketId = tuple[object, int, int]  # (stream, SSRC, sequence number)


def is_rtp(packet: Packet, *, audio_only: bool = True) -> bool:
    """A G.711 RTP (or SRTP) packet: version 2, PCMU or PCMA, not to or from a SIP port.

    :param audio_only: ``False`` counts any version-2 datagram of 12 bytes or more (RTCP
        too): what a check that nothing leaks past the relay must look at.
    """
    payload = packet.payload
    return (packet.proto == "udp" and len(payload) >= 12 and payload[0] >> 6 == 2
            and (not audio_only or payload[1] & 0x7F in _AUDIO_TYPES)
            and not {packet.sport, packet.dport} & _SIP_PORTS)


def rtp_id(packet: Packet) -> tuple[int, int]:
    """(SSRC, sequence number)."""
    seq, = struct.unpack("!H", packet.payload[2:4])
    ssrc, = struct.unpack("!I", packet.payload[8:12])
    return ssrc, seq


def write_rtp_pcap(path: Path, seconds: float, frequency: float = 440.0) -> int:
    """Write C{seconds} of 20 ms PCMU packets of a tone (sequence numbers 0, 1, ...) as an
    Ethernet/IPv4/UDP pcap (sipp sends the RTP of it); returns the number of packets."""
    count = int(seconds / PACKET_INTERVAL)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for n in range(count):
        samples = bytes(_mu_law(int(8000 * math.sin(2 * math.pi * frequency
                                                      * (n * _SAMPLES + i) / 8000)))
                        for i in range(_SAMPLES))
        rtp = struct.pack("!BBHII", 0x80, 0, n & 0xFFFF, n * _SAMPLES, _SSRC) + samples
        udp = struct.pack("!HHHH", 6000, 6000, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])) + udp
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip
        usec = round(n * PACKET_INTERVAL * 1_000_000)
        out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame),
                               len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return count


def _mu_law(sample: int) -> int:
    """One 16-bit sample as G.711 mu-law."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


# ------------------------------------------------------------------------------------------------
# sipp scenarios for counted calls
# ------------------------------------------------------------------------------------------------

_SIP_HEAD = """
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: sipp <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <[ruri]>{peer}
      Call-ID: [call_id]
      CSeq: {cseq}
      Contact: <sip:caller@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70"""


def caller_scenario(path: Path, pcap: Path, seconds: float) -> Path:
    """A sipp caller (keys: ruri): INVITE (SDP, PCMU) -> 200 -> ACK, plays C{pcap} (of
    C{seconds}), waits until it is played and echoed back, BYE."""
    head = _SIP_HEAD.format
    path.write_text(f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="uac_rtp_counted">
  <send retrans="500" start_txn="invite">
    <![CDATA[

      INVITE [ruri] SIP/2.0{head(peer="", cseq="1 INVITE")}
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=caller 53655765 1 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

    ]]>
  </send>
  <recv response="100" optional="true" response_txn="invite"/>
  <recv response="180" optional="true" response_txn="invite"/>
  <recv response="200" rtd="true" rrs="true" response_txn="invite"/>
  <send ack_txn="invite">
    <![CDATA[

      ACK [next_url] SIP/2.0{head(peer="[peer_tag_param]", cseq="1 ACK")}
      [routes]
      Content-Length: 0

    ]]>
  </send>
  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>
  <pause milliseconds="{int(seconds * 1000) + 700}"/>
  <send retrans="500" start_txn="bye">
    <![CDATA[

      BYE [next_url] SIP/2.0{head(peer="[peer_tag_param]", cseq="2 BYE")}
      [routes]
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true" response_txn="bye"/>
</scenario>
""")
    return path


def callee_scenario(path: Path) -> Path:
    """scenarios/uas_media.xml without its hold and resume, answering PCMU: INVITE -> 180,
    200 (SDP) -> ACK, BYE -> 200 (run it with -rtp_echo)."""
    text = (SCENARIOS / "uas_media.xml").read_text()
    ack = '<recv request="ACK" crlf="true"/>'
    text = text[:text.index(ack) + len(ack)] + "\n\n  " + \
        text[text.index('<recv request="BYE"/>'):]
    path.write_text(text.replace("RTP/AVP 8", "RTP/AVP 0").replace("rtpmap:8 PCMA",
                                                                   "rtpmap:0 PCMU"))
    return path


# ------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------


@dataclass
class Loss:
    """One direction of audio: the packets sent and those that arrived, by identity."""

    sent: set[PacketId]
    arrived: set[PacketId]
    name: str = ""

    @property
    def lost(self) -> int:
        return len(self.sent - self.arrived)

    @property
    def ratio(self) -> float:
        return self.lost / len(self.sent) if self.sent else 1.0

    def missing(self, limit: int = 20) -> list[PacketId]:
        return sorted(self.sent - self.arrived, key=repr)[:limit]

    def __repr__(self) -> str:
        return (f"Loss({self.name + ': ' if self.name else ''}sent={len(self.sent)}, "
                f"arrived={len(self.sent & self.arrived)}, lost={self.lost}, "
                f"missing={self.missing()})")


def loss(sent: Iterable[Packet], arrived: Iterable[Packet], keys: tuple[str, str] = ("", ""),
         name: str = "") -> Loss:
    """Loss from the RTP packets of C{sent} to those of C{arrived} (each packet counted once,
    also when a capture saw it twice, e.g. on loopback). C{keys} name a packet field
    ("sport", "dport", ...) on each side that tells concurrent streams apart when they carry
    the same SSRC and sequence numbers (every call playing the same pcap): the n-th distinct
    value on the sent side matches the n-th on the arrived side, in order of first appearance
    (calls started apart in time)."""
    def identified(packets: Iterable[Packet], key: str) -> set[PacketId]:
        order: dict[object, int] = {}
        out = set()
        for p in sorted(packets, key=lambda p: p.time):
            if is_rtp(p):
                stream = order.setdefault(getattr(p, key) if key else "", len(order))
                out.add((stream, *rtp_id(p)))
        return out

    return Loss(identified(sent, keys[0]), identified(arrived, keys[1]), name)
