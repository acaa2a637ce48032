"""
RTP for the end-to-end tests: a pcap of G.711 RTP for sipp's C{play_pcap_audio}, and loss
counted from packet captures (netns.Capture) at both ends of a call.

Loss is counted per packet, not per count: a packet is identified by its SSRC and sequence
number, which relays and NATs leave alone (the built-in relay, the kernel fast path and
C{sipp -rtp_echo} forward RTP byte for byte; SRTP leaves the header in clear). Packets sent in
the last moments before a call's BYE may legitimately die with the call, so only those sent
before a cut-off count.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.netns import Packet

__all__ = ["RtpFlow", "is_rtp", "rtp_id", "split_flows", "write_rtp_pcap"]

#: RTP payload types this suite sends (PCMU, PCMA); RTCP's 200-204 are not RTP
_AUDIO_TYPES = frozenset({0, 8})
_SIP_PORTS = frozenset({5060, 5061, 5070, 5090})


def is_rtp(packet: Packet) -> bool:
    """A G.711 RTP (or SRTP) packet: version 2, PCMU or PCMA, not to or from a SIP port."""
    payload = packet.payload
    return (packet.proto == "udp" and len(payload) >= 12 and payload[0] >> 6 == 2
            and payload[1] & 0x7F in _AUDIO_TYPES
            and not {packet.sport, packet.dport} & _SIP_PORTS)


def rtp_id(packet: Packet) -> tuple[int, int]:
    """(SSRC, sequence number)."""
    seq, = struct.unpack("!H", packet.payload[2:4])
    ssrc, = struct.unpack("!I", packet.payload[8:12])
    return ssrc, seq


@dataclass
class RtpFlow:
    """One direction of a call's audio: what one end sent and what the other got."""

    name: str
    sent: list[Packet]
    received: list[Packet]

    def lost(self, cutoff: float) -> set[tuple[int, int]]:
        """Packets sent before C{cutoff} (a capture time) that never arrived."""
        arrived = {rtp_id(p) for p in self.received}
        return {rtp_id(p) for p in self.sent if p.time < cutoff} - arrived

    def loss(self, cutoff: float) -> float:
        counted = [p for p in self.sent if p.time < cutoff]
        return len(self.lost(cutoff)) / len(counted) if counted else 1.0

    def describe(self, cutoff: float) -> str:
        counted = sum(1 for p in self.sent if p.time < cutoff)
        return (f"{self.name}: {len(self.sent)} sent ({counted} before the cut-off), "
                f"{len(self.received)} received, {len(self.lost(cutoff))} of those lost")


def split_flows(packets: Iterable[Packet]) -> tuple[list[Packet], list[Packet]]:
    """The RTP packets of one end's capture: (sent, received)."""
    rtp = [p for p in packets if is_rtp(p)]
    return [p for p in rtp if p.outgoing], [p for p in rtp if not p.outgoing]


def write_rtp_pcap(path: Path, seconds: float, frequency: float = 440.0) -> Path:
    """A pcap (Ethernet, IPv4, UDP) of 20 ms PCMU packets of a tone (sipp takes the RTP)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for n in range(int(seconds * 50)):
        samples = bytes(_mu_law(int(8000 * math.sin(2 * math.pi * frequency * (n * 160 + i)
                                                      / 8000))) for i in range(160))
        rtp = struct.pack("!BBHII", 0x80, 0, n & 0xFFFF, n * 160, 0x5EED0001) + samples
        udp = struct.pack("!HHHH", 6000, 6000, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])) + udp
        frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip
        usec = n * 20_000
        out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame),
                               len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


def _mu_law(sample: int) -> int:
    """One 16-bit sample as G.711 mu-law."""
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(abs(sample), 32635) + 0x84
    exponent = magnitude.bit_length() - 8
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF
