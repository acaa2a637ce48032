"""
The media plugin end to end, across the real NAT of tests/integration/netns.py.

The phone (sipp in ``phone``, 192.168.77.10) calls the provider (sipp in ``provider``,
203.0.113.50) through the proxy on ``fw`` and plays 8 s of G.711 from Debian's sip-tester pcap;
the provider echoes every RTP packet back (``-rtp_echo``). Both use media ports in the range fw
does not forward (UDP 10000-20000), so RTP can only flow through the relay on fw. Halfway the
phone holds (re-INVITE a=sendonly) and resumes. Packet captures on both of fw's veths show
what each side got. Three relays, one test each: the relay in the proxy's process, the
standalone relay (``twist sipproxy-relay``) over NG, and Debian's rtpengine (userspace).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipproxy.media.ng import decode_message, encode_message
from sipproxy.message import Request, Response
from sipproxy.sdp import SdpError, parse_sdp
from tests.integration.harness import REPO_ROOT, HarnessError, read_tail
from tests.integration.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    PHONE_IP,
    PROVIDER_IP,
    RTP_PORTS,
    Namespace,
    NatNet,
    Packet,
)
from tests.integration.test_nat_netns import (
    SIP,
    SIPP_TIMEOUT,
    describe_packets,
    firewall_config,
    pair,
    start_site,
)

pytestmark = [pytest.mark.netns]

PCAP = Path("/usr/share/sip-tester/g711a.pcap")
RELAY_PORTS = (30000, 30999)
NG_PORT = 2223
#: the kernel fast path's nftables table in fw (test_media_kernel_netns.py)
KERNEL_TABLE = "sipproxy_relay_test"
PHONE_RTP = 10000
PROVIDER_RTP = 12000
#: RTP packets each way, at least: the pcap sends 50 a second for ~4 s of the call
MIN_PACKETS = 60
#: ... and after the resume (1.5 s of talk)
MIN_AFTER_RESUME = 20


def _inside(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) in LAN
    except ValueError:
        return False


def is_rtp(packet: Packet) -> bool:
    return (packet.proto == "udp" and len(packet.payload) >= 12 and packet.payload[0] >> 6 == 2
            and SIP not in (packet.sport, packet.dport))


def in_relay_range(port: int) -> bool:
    return RELAY_PORTS[0] <= port <= RELAY_PORTS[1]


def open_relay_ports(ns: Namespace) -> list[int]:
    """The UDP ports of the relay range something listens on in ``ns`` (/proc/net/udp)."""
    text = ns.run("cat", "/proc/net/udp", "/proc/net/udp6").stdout
    ports = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 1 and ":" in fields[1]:
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if in_relay_range(port):
                ports.append(port)
    return ports


# ------------------------------------------------------------------------------------------------
# relays in their own process (in fw, NG on fw's loopback)
# ------------------------------------------------------------------------------------------------
class RelayProcess:
    """A relay process inside ``ns``; ready once it answers an NG ping."""

    def __init__(self, ns: Namespace, argv: list[str], workdir: Path, name: str) -> None:
        self.ns = ns
        self.argv = argv
        self.log_path = workdir / f"{name}.log"
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, limit: float = 10.0) -> RelayProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen([*self.ns.prefix(), *self.argv], cwd=REPO_ROOT,
                                            env=env, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"{self.name} exited with {self.process.returncode}\n"
                                   f"{self.log_tail()}")
            try:
                self.command({"command": "ping"}, timeout=0.3)
                return self
            except TimeoutError:
                continue
        self.stop()
        raise HarnessError(f"{self.name} did not answer an NG ping\n{self.log_tail()}")

    def command(self, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """One NG command from inside the namespace; TimeoutError without a reply. (A fresh
        cookie each time: the relay answers a cookie it saw from the same address within 30 s
        from its reply cache, and a new socket may get an earlier one's port.)"""
        sock = self.ns.socket()
        try:
            sock.settimeout(timeout)
            cookie = secrets.token_hex(6).encode()
            sock.sendto(encode_message(cookie, message), ("127.0.0.1", NG_PORT))
            data = sock.recv(65535)
        finally:
            sock.close()
        _cookie, reply, _ = decode_message(data)
        assert reply is not None
        return reply

    def log_tail(self) -> str:
        return f"--- {self.name} log ---\n{read_tail(self.log_path, 40)}"

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def standalone_relay(ns: Namespace, workdir: Path, kernel: str = "off") -> RelayProcess:
    return RelayProcess(ns, [
        sys.executable, "-m", "twisted", "--log-format=text", "sipproxy-relay",
        "--listen-ng", f"127.0.0.1:{NG_PORT}",
        "--port-min", str(RELAY_PORTS[0]), "--port-max", str(RELAY_PORTS[1]),
        "--interface", f"inside/{FW_INSIDE}", "--interface", f"outside/{FW_OUTSIDE}",
        "--kernel", kernel, *(["--kernel-table", KERNEL_TABLE] if kernel != "off" else []),
    ], workdir, "sipproxy-relay")


def rtpengine(ns: Namespace, workdir: Path) -> RelayProcess:
    return RelayProcess(ns, [
        "rtpengine", "--foreground", "--log-stderr", "--config-file=none", "--table=-1",
        f"--interface=inside/{FW_INSIDE}", f"--interface=outside/{FW_OUTSIDE}",
        f"--listen-ng=127.0.0.1:{NG_PORT}", f"--port-min={RELAY_PORTS[0]}",
        f"--port-max={RELAY_PORTS[1]}", "--delete-delay=0", "--num-threads=2",
        f"--pidfile={workdir / 'rtpengine.pid'}",
    ], workdir, "rtpengine")


def rtpengine_unavailable() -> str | None:
    if shutil.which("rtpengine") is None:
        return "rtpengine is not installed (Debian package rtpengine-daemon; scripts/test " \
               "installs it)"
    return None


# ------------------------------------------------------------------------------------------------
# one call with media, judged by the captures
# ------------------------------------------------------------------------------------------------
def media_config(relay: str) -> dict[str, Any]:
    config = firewall_config()
    config["plugins"] = {"enabled": ["nat", "media"]}
    if relay == "builtin":
        # userspace only: these tests check that the relay adds no nftables rule at all
        # (the kernel fast path: test_media_kernel_netns.py)
        config["media"] = {"port_min": RELAY_PORTS[0], "port_max": RELAY_PORTS[1],
                           "kernel": False}
    else:
        config["media"] = {"relay": f"ng:127.0.0.1:{NG_PORT}"}
    return config


@pytest.fixture
def media_net(netns_ready: None) -> Iterator[NatNet]:
    if not PCAP.exists():
        pytest.skip(f"{PCAP} is missing (Debian package sip-tester)")
    net = NatNet.build()
    try:
        yield net
    finally:
        net.close()


def sdp_addresses(message: Request | Response) -> list[str]:
    """The addresses of the c= and o= lines of the message's SDP."""
    if not message.body or b"v=0" not in message.body:
        return []
    try:
        sdp = parse_sdp(message.body)
    except SdpError:
        return ["<unparseable SDP>"]
    found = [sdp.origin.address] if sdp.origin is not None else []
    if sdp.connection is not None:
        found.append(sdp.connection.address)
    found += [m.connection.address for m in sdp.media if m.connection is not None]
    return found


def media_call(net: NatNet, workdir: Path, relay: str) -> None:
    # both ends' RTP ports are in the range fw drops: the relay is the only path
    assert all(RTP_PORTS[0] <= p <= RTP_PORTS[1] for p in (PHONE_RTP, PROVIDER_RTP))
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    process: RelayProcess | None = None
    if relay == "ng":
        process = standalone_relay(net.fw, workdir).start()
    elif relay == "rtpengine":
        process = rtpengine(net.fw, workdir).start()
    site = start_site(net, workdir, media_config(relay))
    try:
        uas = site.provider.start_uas("uas_media.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                      extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        uac = site.phone.start_uac("uac_media.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                                   timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example"},
                                   extra_args=["-mp", str(PHONE_RTP)])
        server, client = pair(uas, uac)
        site.capture.settle()
        logs = site.logs() + (process.log_tail() if process is not None else "") + "\n" + \
            describe_sip(site.capture.snapshot())
        assert client.ok(1), f"{client.describe()}\n{logs}"
        assert server.ok(1), f"{server.describe()}\n{logs}"
        site.capture.settle()

        # after the BYE: no relay port is open on fw (bounded wait for the close)
        deadline = time.monotonic() + 5
        while open_relay_ports(net.fw) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_relay_ports(net.fw) == [], logs
        if process is not None:
            assert process.command({"command": "list"}).get("calls") in ([], None), logs
        judge(site.capture.snapshot(), net, logs)
        # the relay added no firewall rule, and none is left
        assert net.fw.run("nft", "list", "ruleset").stdout == nft_before
    finally:
        site.stop()
        if process is not None:
            process.stop()


def describe_sip(packets: list[Packet]) -> str:
    """The SIP messages of a capture, with their times (for failure messages)."""
    lines = []
    start = packets[0].time if packets else 0.0
    for p in packets:
        message = p.sip()
        if message is not None:
            first = message.start_line() if hasattr(message, "start_line") else "?"
            lines.append(f"{p.time - start:7.3f} {p.interface} {p.src}:{p.sport} -> "
                         f"{p.dst}:{p.dport} {first} ({message.cseq.number})")
    return "\n".join(lines[-60:])


def judge(packets: list[Packet], net: NatNet, logs: str) -> None:
    wan = [p for p in packets if p.interface == net.wan_if]
    lan = [p for p in packets if p.interface == net.lan_if]

    # the SDP the outside got names no inside address (c= and o=), and the relay's otherwise
    sip_out = [(p, p.sip()) for p in wan]
    sdp_seen = 0
    for packet, message in sip_out:
        if message is None:
            continue
        addresses = sdp_addresses(message)
        sdp_seen += bool(addresses)
        assert not [a for a in addresses if _inside(a)], message.body.decode(errors="replace")
        if packet.dst == PROVIDER_IP and addresses:
            assert set(addresses) == {FW_OUTSIDE}, message.body.decode(errors="replace")
    assert sdp_seen >= 6, describe_packets([(p, m) for p, m in sip_out if m is not None])
    for packet in lan:
        message = packet.sip()
        if message is not None and packet.dst == PHONE_IP:
            assert set(sdp_addresses(message)) <= {FW_INSIDE}, message.body

    # RTP: both ways, only through the relay's ports on fw; none from an inside address outside
    rtp_wan = [p for p in wan if is_rtp(p)]
    rtp_lan = [p for p in lan if is_rtp(p)]
    assert not [p for p in rtp_wan if _inside(p.src) or _inside(p.dst)]
    to_provider = [p for p in rtp_wan if p.dst == PROVIDER_IP]
    from_provider = [p for p in rtp_wan if p.src == PROVIDER_IP]
    to_phone = [p for p in rtp_lan if p.dst == PHONE_IP]
    from_phone = [p for p in rtp_lan if p.src == PHONE_IP]
    counts = {"phone->relay": len(from_phone), "relay->provider": len(to_provider),
              "provider->relay": len(from_provider), "relay->phone": len(to_phone)}
    assert min(counts.values()) >= MIN_PACKETS, (counts, logs)
    assert all(p.dst == FW_INSIDE and in_relay_range(p.dport) for p in from_phone)
    assert all(p.src == FW_OUTSIDE and in_relay_range(p.sport) and p.dport == PROVIDER_RTP
               for p in to_provider)
    assert all(p.dst == FW_OUTSIDE and in_relay_range(p.dport) for p in from_provider)
    assert all(p.src == FW_INSIDE and in_relay_range(p.sport) for p in to_phone)
    # the echo came back to the phone: the very bytes it sent
    sent = {p.payload for p in from_phone}
    assert sum(p.payload in sent for p in to_phone) >= MIN_PACKETS

    # hold and resume keep media flowing through the same relay ports
    resume_acks = [p for p, m in sip_out if isinstance(m, Request) and m.method == "ACK"
                   and m.cseq.number == 3 and p.dst == PROVIDER_IP]
    assert resume_acks, describe_packets([(p, m) for p, m in sip_out if m is not None])
    resumed = resume_acks[0].time
    after = {"relay->provider": sum(p.time > resumed for p in to_provider),
             "relay->phone": sum(p.time > resumed for p in to_phone)}
    assert min(after.values()) >= MIN_AFTER_RESUME, (after, logs)
    assert len({(p.sport) for p in to_provider}) == 1
    assert len({(p.sport) for p in to_phone}) == 1


def test_media_through_the_builtin_relay(media_net: NatNet, tmp_path: Path) -> None:
    """The relay in the proxy's process (``[media]`` with the default ``relay = "builtin"``)."""
    media_call(media_net, tmp_path, "builtin")


def test_media_through_the_standalone_relay_over_ng(media_net: NatNet, tmp_path: Path) -> None:
    """``twist sipproxy-relay`` on fw, driven over NG (``relay = "ng:127.0.0.1:2223"``)."""
    media_call(media_net, tmp_path, "ng")


def test_media_through_rtpengine(media_net: NatNet, tmp_path: Path) -> None:
    """Debian's rtpengine-daemon on fw in userspace mode (no kernel module), over NG."""
    reason = rtpengine_unavailable()
    if reason is not None:
        pytest.skip(reason)
    media_call(media_net, tmp_path, "rtpengine")

