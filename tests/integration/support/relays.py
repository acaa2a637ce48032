"""
Media relays in their own process inside a namespace (the standalone ``sipproxy-relay`` and
rtpengine, driven over NG on fw's loopback), the relay's nftables table as the kernel fast path
leaves it, and one call's captures judged for media that went through the relay and nowhere
else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from sipproxy.media.ng import decode_message, encode_message
from sipproxy.message import Request, Response
from sipproxy.sdp import SdpError, parse_sdp
from tests.integration.support.harness import REPO_ROOT, HarnessError, read_tail, wait_started
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    Namespace,
    NatNet,
    Packet,
    inside,
)
from tests.integration.support.rtp import is_rtp
from tests.integration.support.sites import (
    SIP,
    SIPP_TIMEOUT,
    Site,
    describe_packets,
    firewall_config,
)

PCAP = Path("/usr/share/sip-tester/g711a.pcap")
RELAY_PORTS = (30000, 30999)
NG_PORT = 2223
#: the kernel fast path's nftables table in fw (test_media_kernel_netns.py)
KERNEL_TABLE = "sipproxy_relay_test"
#: every relay table's name starts so (a killed relay's is found by it)
TABLE_PREFIX = "sipproxy_relay_"
PHONE_RTP = 10000
PROVIDER_RTP = 12000
#: RTP packets each way, at least: the pcap sends 50 a second for ~4 s of the call
MIN_PACKETS = 60
#: ... and after the resume (1.5 s of talk)
MIN_AFTER_RESUME = 20


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

        def answers() -> bool:
            return ng(self.ns, {"command": "ping"}, timeout=0.3) is not None

        if wait_started(self.process, self.name, answers, limit, self.log_tail):
            return self
        self.stop()
        raise HarnessError(f"{self.name} did not answer an NG ping\n{self.log_tail()}")

    def command(self, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
        """One NG command (:func:`ng`); TimeoutError without a reply."""
        reply = ng(self.ns, message, timeout)
        if reply is None:
            raise TimeoutError(f"{self.name} did not answer {message.get('command')!r}")
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


def start_media_call(site: Site, token: str | None = None) -> tuple[Any, Any]:
    """Start a call with audio whose caller holds and resumes (``uac_media.xml``) and whose
    callee echoes the caller's RTP (``uas_media.xml``): the phone calls the provider
    (``token`` None) or the provider calls the phone's nat ``token``. Returns the running
    sipp processes, ``(uas, uac)`` (:func:`~tests.integration.support.sites.pair` waits for
    their results)."""
    echo = ["-rtp_echo", "-mp"]
    if token is None:
        uas = site.provider.start_uas("uas_media.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                      extra_args=[*echo, str(PROVIDER_RTP)])
        uac = site.phone.start_uac("uac_media.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                                   timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example"},
                                   extra_args=["-mp", str(PHONE_RTP)])
    else:
        uas = site.phone.start_uas("uas_media.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                   extra_args=[*echo, str(PHONE_RTP)])
        uac = site.provider.start_uac(
            "uac_media.xml", (FW_OUTSIDE, SIP), count=1, timeout=SIPP_TIMEOUT,
            keys={"ruri": f"sip:{token}@{FW_OUTSIDE}:{SIP}"},
            extra_args=["-mp", str(PROVIDER_RTP)])
    return uas, uac


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
        assert not [a for a in addresses if inside(a)], message.body.decode(errors="replace")
        if packet.dst == PROVIDER_IP and addresses:
            assert set(addresses) == {FW_OUTSIDE}, message.body.decode(errors="replace")
    assert sdp_seen >= 6, describe_packets([(p, m) for p, m in sip_out if m is not None])
    for packet in lan:
        message = packet.sip()
        if message is not None and packet.dst == PHONE_IP:
            assert set(sdp_addresses(message)) <= {FW_INSIDE}, message.body

    # RTP: both ways, only through the relay's ports on fw; none from an inside address outside
    rtp_wan = [p for p in wan if is_rtp(p, audio_only=False)]
    rtp_lan = [p for p in lan if is_rtp(p, audio_only=False)]
    assert not [p for p in rtp_wan if inside(p.src) or inside(p.dst)]
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


def ng(ns: Namespace, message: dict[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
    """One NG command to the relay on fw's loopback; None without a reply. (A fresh cookie:
    the relay's reply cache answers a cookie seen from the same address within 30 s, and the
    new socket may get an earlier one's port.)"""
    sock = ns.socket()
    try:
        sock.settimeout(timeout)
        sock.sendto(encode_message(secrets.token_hex(6).encode(), message),
                    ("127.0.0.1", NG_PORT))
        data = sock.recv(65535)
    except TimeoutError:
        return None
    finally:
        sock.close()
    return decode_message(data)[1]


def relay_table(ns: Namespace) -> dict[str, Any] | None:
    """The relay's netdev table in ``ns``: {"rules": n, "packets": what its counters
    counted}; None: no such table."""
    tables = json.loads(ns.run("nft", "-j", "list", "tables", "netdev").stdout)["nftables"]
    names = [t["table"]["name"] for t in tables if "table" in t
             and t["table"]["name"].startswith(TABLE_PREFIX)]
    if not names:
        return None
    assert len(names) == 1, names
    result = ns.run("nft", "-j", "list", "table", "netdev", names[0], check=False)
    if result.returncode != 0:
        return None
    items = json.loads(result.stdout)["nftables"]
    return {"rules": sum("rule" in item for item in items),
            "packets": sum(i["counter"]["packets"] for i in items if "counter" in i)}


def firewall_tables(ns: Namespace) -> str:
    """fw's ruleset without the relay's own table."""
    text = ns.run("nft", "list", "ruleset").stdout
    out, skip = [], False
    for line in text.splitlines():
        if line.startswith("table ") and TABLE_PREFIX in line:
            skip = True
        elif skip and line == "}":
            skip = False
            continue
        if not skip:
            out.append(line)
    return "\n".join(out)
