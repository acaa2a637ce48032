"""
Calls whose RTP can be counted packet by packet: a pcap of numbered G.711 packets for sipp's
``play_pcap_audio``, a sipp caller scenario that plays it and hangs up once it is played, and
the loss at each end judged by RTP sequence numbers in fw's captures.

sipp plays the pcap's RTP payloads from the caller's media port to the address the answer's
SDP names; the callee (``-rtp_echo``) sends every packet back. Each packet's RTP sequence number
is its index, so a capture tells exactly which packets got where.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.integration.netns import Packet

__all__ = ["PACKET_INTERVAL", "Loss", "callee_scenario", "caller_scenario", "loss", "rtp_pcap",
           "rtp_seq"]

#: G.711 at 20 ms
PACKET_INTERVAL = 0.02
_PAYLOAD = 160
_SSRC = 0x5EED1212


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def rtp_pcap(path: Path, seconds: float) -> int:
    """Write ``seconds`` of PCMA RTP (sequence numbers 0, 1, ...) as an Ethernet pcap;
    returns the number of packets."""
    count = int(seconds / PACKET_INTERVAL)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for n in range(count):
        rtp = struct.pack("!BBHII", 0x80, 8, n & 0xFFFF, n * _PAYLOAD, _SSRC) + \
            bytes([0xD5]) * _PAYLOAD
        udp = struct.pack("!HHHH", 10000, 12000, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), n & 0xFFFF, 0, 64, 17, 0,
                         bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        frame = bytes(6) + bytes(6) + b"\x08\x00" + ip + udp
        at = n * PACKET_INTERVAL
        out.append(struct.pack("<IIII", int(at), int((at % 1) * 1e6), len(frame), len(frame)))
        out.append(frame)
    path.write_bytes(b"".join(out))
    return count


_SIP_HEAD = """
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: sipp <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <[ruri]>{peer}
      Call-ID: [call_id]
      CSeq: {cseq}
      Contact: <sip:caller@[local_ip]:[local_port];transport=[transport]>
      Max-Forwards: 70"""


def caller_scenario(path: Path, pcap: Path, seconds: float) -> Path:
    """A sipp caller (keys: ruri): INVITE (SDP, PCMA) -> 200 -> ACK, plays ``pcap`` (of
    ``seconds``), waits until it is played and echoed back, BYE."""
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
      m=audio [media_port] RTP/AVP 8
      a=rtpmap:8 PCMA/8000

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
    """scenarios/uas_media.xml without its hold and resume: INVITE -> 180, 200 (SDP) -> ACK,
    BYE -> 200 (run it with -rtp_echo)."""
    text = (Path(__file__).parent / "scenarios" / "uas_media.xml").read_text()
    ack = '<recv request="ACK" crlf="true"/>'
    path.write_text(text[:text.index(ack) + len(ack)] + "\n\n  " +
                    text[text.index('<recv request="BYE"/>'):])
    return path


def rtp_seq(packet: Packet) -> int | None:
    """The RTP sequence number of a packet of ours (our SSRC), else None."""
    p = packet.payload
    if packet.proto != "udp" or len(p) < 12 or p[0] >> 6 != 2 or \
            struct.unpack("!I", p[8:12])[0] != _SSRC:
        return None
    return int(struct.unpack("!H", p[2:4])[0])


@dataclass
class Loss:
    """What was sent and what arrived, by RTP sequence number (per stream key)."""

    sent: set[tuple[object, int]]
    arrived: set[tuple[object, int]]

    @property
    def lost(self) -> int:
        return len(self.sent - self.arrived)

    @property
    def ratio(self) -> float:
        return self.lost / len(self.sent) if self.sent else 1.0

    def missing(self, limit: int = 20) -> list[tuple[object, int]]:
        return sorted(self.sent - self.arrived, key=repr)[:limit]

    def __repr__(self) -> str:
        return (f"Loss(sent={len(self.sent)}, arrived={len(self.arrived)}, lost={self.lost}, "
                f"missing={self.missing()})")


def loss(sent: Iterable[Packet], arrived: Iterable[Packet],
         keys: tuple[str, str] = ("", "")) -> Loss:
    """Loss from ``sent`` to ``arrived``, by sequence number. ``keys`` name a packet field
    ("sport", "dport", ...) on each side that tells concurrent streams apart (every call's
    pcap has the same sequence numbers): the n-th distinct value on the sent side matches the
    n-th on the arrived side, in order of first appearance (calls started apart in time)."""
    def numbered(packets: Iterable[Packet], key: str) -> set[tuple[object, int]]:
        order: dict[object, int] = {}
        out = set()
        for p in sorted(packets, key=lambda p: p.time):
            seq = rtp_seq(p)
            if seq is None:
                continue
            k = getattr(p, key) if key else ""
            out.add((order.setdefault(k, len(order)), seq))
        return out

    return Loss(numbered(sent, keys[0]), numbered(arrived, keys[1]))
