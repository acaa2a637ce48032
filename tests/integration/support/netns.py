"""
Network namespaces with a real NAT for the end-to-end tests: namespaces joined by veth pairs,
nftables, the proxy and sipp run inside them (``ip netns exec``), and packet captures.

The standard topology (L{NatNet}, the ``nat_net`` fixture in conftest.py)::

    phone                      fw                                       provider
    192.168.77.10/24 ──veth── lan0 192.168.77.1 | wan0 203.0.113.1 ──veth── 203.0.113.50/24
    default via .1             IP forwarding; nftables: the LAN           no route to the LAN
                               masqueraded to the outside (source ports
                               40000-40999), forwarded UDP to the RTP
                               range dropped, nothing new forwarded in

The forward chain drops the RTP range (L{RTP_PORTS}; C{NatNet.build(rtp_ports=...)} takes
another, e.g. L{SEED_RTP_PORTS}) with no exception for the relay: media crosses fw only
through the relay (its userspace sockets, or its kernel fast path, which no filter chain sees).

Every namespace is named ``sipnt<pid>x<random>-<role>``: unique per run, and one whose creating
process is gone is a leftover that L{delete_leftovers} removes. Every wait is bounded; teardown
kills what runs inside the namespaces and deletes them.

Sockets can be opened inside a namespace from the test process itself (L{Namespace.entered},
L{Namespace.socket}): C{setns(2)} for the calling thread only, switched back at once. The
captures (L{Capture}) are C{AF_PACKET} sockets opened that way and read by a thread.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipproxy.addressing import in_networks
from sipproxy.errors import ParseError
from sipproxy.media.kernel import pid_alive
from sipproxy.message import Request, Response, parse_message
from tests.integration.support.harness import HarnessError, ProxyProcess, Sipp, SippProcess

__all__ = [
    "FW_INSIDE",
    "FW_OUTSIDE",
    "LAN",
    "PHONE_IP",
    "PROVIDER_IP",
    "Capture",
    "Namespace",
    "NatNet",
    "NoConfigProxy",
    "NsProxyProcess",
    "NsSipp",
    "Packet",
    "Topology",
    "delete_leftovers",
    "inside",
    "netns_unavailable",
]

PREFIX = "sipnt"
#: ``twistd`` as the README runs it, from this interpreter
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
LAN = ipaddress.ip_network("192.168.77.0/24")
PHONE_IP = "192.168.77.10"
FW_INSIDE = "192.168.77.1"
FW_OUTSIDE = "203.0.113.1"
PROVIDER_IP = "203.0.113.50"
#: the RTP ports the firewall does not forward (media needs the media plugin or open ports)
RTP_PORTS = (10000, 20000)
#: the range the seed's firewall drops (issue 12): the relay's own ports are in it too
SEED_RTP_PORTS = (10000, 60000)
#: the source ports the firewall's masquerading maps the LAN to (never the phone's own)
NAT_PORTS = (40000, 40999)


def inside(host: str) -> bool:
    """Whether ``host`` (an address, maybe in brackets) is on the LAN; a name is not."""
    return in_networks(host, (LAN,))


_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _run(argv: Sequence[str], *, timeout: float = 15.0, check: bool = True,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                input=input_text, check=False)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{' '.join(argv)}: no answer within {timeout} s") from e
    if check and result.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def netns_unavailable() -> str | None:
    """Why the namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("sipp", "sip-tester")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package}; scripts/test installs it)"
    probe = f"{PREFIX}{os.getpid()}xprobe{secrets.token_hex(2)}"
    result = _run(["ip", "netns", "add", probe], check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    _run(["ip", "netns", "delete", probe], check=False)
    return None


def _kill_inside(name: str) -> None:
    """SIGKILL every process in namespace C{name} and wait (bounded) until they are gone."""
    for _ in range(50):
        result = _run(["ip", "netns", "pids", name], check=False)
        pids = [int(p) for p in result.stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone (a crashed test run)."""
    result = _run(["ip", "netns", "list"], check=False)
    deleted = []
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):].split("x", 1)[0]
        if owner.isdigit() and pid_alive(int(owner)) and int(owner) != os.getpid():
            continue  # another run, still going
        if owner.isdigit() and int(owner) == os.getpid():
            continue  # ours: their Topology deletes them
        _kill_inside(name)
        _run(["ip", "netns", "delete", name], check=False)
        deleted.append(name)
    return deleted


# --- namespaces --------------------------------------------------------------------------------


@dataclass
class Namespace:
    """One network namespace (by its ``ip netns`` name) and its role in the topology."""

    name: str
    role: str
    addresses: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """Its first address (without the prefix length)."""
        if not self.addresses:
            raise HarnessError(f"namespace {self.role} has no address")
        return self.addresses[0]

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str, check: bool = True, timeout: float = 15.0,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run([*self.prefix(), *argv], check=check, timeout=timeout,
                    input_text=input_text)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a (per-namespace) sysctl, through /proc/sys: no procps needed."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run("sh", "-c", 'echo "$1" > "$2"', "sysctl", str(value), path)

    def nft(self, ruleset: str) -> None:
        self.run("nft", "-f", "-", input_text=ruleset)

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this namespace (sockets opened now live there for good)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, kind, proto)


class Topology:
    """Namespaces and veth pairs of one test; L{close} deletes all of them."""

    def __init__(self) -> None:
        self.tag = f"{PREFIX}{os.getpid()}x{secrets.token_hex(3)}"
        self.namespaces: dict[str, Namespace] = {}

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(f"{self.tag}-{role}", role)
        _run(["ip", "netns", "add", ns.name])
        self.namespaces[role] = ns
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def veth(self, a: Namespace, a_if: str, a_cidr: str, b: Namespace, b_if: str,
             b_cidr: str) -> None:
        """A veth pair from C{a} (interface C{a_if}, address C{a_cidr}) to C{b}."""
        _run(["ip", "link", "add", a_if, "netns", a.name, "type", "veth",
              "peer", "name", b_if, "netns", b.name])
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            ns.run("ip", "addr", "add", cidr, "dev", ifname)
            ns.run("ip", "link", "set", ifname, "up")
            ns.addresses.append(cidr.split("/")[0])

    def close(self) -> None:
        for ns in self.namespaces.values():
            _kill_inside(ns.name)
            _run(["ip", "netns", "delete", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


FIREWALL_RULES = """
table ip sipnat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" ip saddr {lan} meta l4proto udp masquerade to :{nat[0]}-{nat[1]}
        oifname "wan0" ip saddr {lan} meta l4proto tcp masquerade to :{nat[0]}-{nat[1]}
        oifname "wan0" ip saddr {lan} masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        udp dport {rtp[0]}-{rtp[1]} drop
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }}
}}
"""


@dataclass
class NatNet:
    """The standard topology: C{phone} behind the firewall C{fw}, the C{provider} outside;
    a context manager that deletes it all (L{close}) at the end of its block."""

    topology: Topology
    phone: Namespace
    fw: Namespace
    provider: Namespace
    lan_if: str = "lan0"  # fw's interface toward the phone
    wan_if: str = "wan0"  # fw's interface toward the provider
    fw_outside: str = FW_OUTSIDE  # fw's address on the outside link
    provider_ip: str = PROVIDER_IP

    @classmethod
    def build(cls, rtp_ports: tuple[int, int] = RTP_PORTS, *, fw_outside: str = FW_OUTSIDE,
              provider_ip: str = PROVIDER_IP) -> NatNet:
        """The namespaces, veths and fw's ruleset; fw's forward chain drops UDP to
        ``rtp_ports``. The outside link is the /24 of ``fw_outside`` and ``provider_ip`` (a
        private one, 10.97.0.0/24, for a SIP trunk on a carrier's network)."""
        topology = Topology()
        try:
            phone = topology.namespace("phone")
            fw = topology.namespace("fw")
            provider = topology.namespace("provider")
            topology.veth(phone, "eth0", f"{PHONE_IP}/24", fw, "lan0", f"{FW_INSIDE}/24")
            topology.veth(fw, "wan0", f"{fw_outside}/24", provider, "eth0", f"{provider_ip}/24")
            phone.run("ip", "route", "add", "default", "via", FW_INSIDE)
            fw.sysctl("net.ipv4.ip_forward", 1)
            fw.nft(FIREWALL_RULES.format(lan=LAN, nat=NAT_PORTS, rtp=rtp_ports))
        except BaseException:
            topology.close()
            raise
        return cls(topology, phone, fw, provider, fw_outside=fw_outside,
                   provider_ip=provider_ip)

    def nat_timeout(self, seconds: int) -> None:
        """How long the firewall keeps an idle UDP mapping (conntrack, this namespace only)."""
        self.fw.sysctl("net.netfilter.nf_conntrack_udp_timeout", seconds)
        self.fw.sysctl("net.netfilter.nf_conntrack_udp_timeout_stream", seconds)

    def close(self) -> None:
        self.topology.close()

    def __enter__(self) -> NatNet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- the proxy and sipp inside ------------------------------------------------------------------


class NsProxyProcess(ProxyProcess):
    """L{ProxyProcess} run with C{ip netns exec}; the readiness probe comes from inside too."""

    def __init__(self, ns: Namespace, config: Mapping[str, Any], workdir: Path,
                 **kwargs: Any) -> None:
        super().__init__(config, workdir, **kwargs)
        self.ns = ns

    def command(self) -> list[str]:
        return [*self.ns.prefix(), *super().command()]

    def wait_ready(self) -> None:
        with self.ns.entered():
            super().wait_ready()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class NoConfigProxy(NsProxyProcess):
    """``twistd -n sipproxy``: no --config, no file; probed on the host's first address."""

    def command(self) -> list[str]:
        return [*self.ns.prefix(), sys.executable, "-c", TWISTD, "-n", "--pidfile=",
                f"--logfile={self.log_path}", "sipproxy"]

    def listeners(self) -> list[tuple[str, str, int]]:
        return [("udp", FW_INSIDE, 5060)]


class NsSipp(Sipp):
    """L{Sipp} whose processes run in namespace C{ns}, on its address C{host}."""

    def __init__(self, ns: Namespace, workdir: Path, host: str | None = None) -> None:
        super().__init__(workdir, host=host or ns.address, prefix=ns.prefix())
        self.ns = ns

    def start_uas(self, scenario: str | Path, port: int, **kwargs: Any) -> SippProcess:
        with self.ns.entered():  # free ports and the bind check are the namespace's
            return super().start_uas(scenario, port, **kwargs)

    def start_uac(self, scenario: str | Path, target: tuple[str, int],
                  **kwargs: Any) -> SippProcess:
        with self.ns.entered():
            return super().start_uac(scenario, target, **kwargs)


# --- captures -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    """One IPv4 UDP or TCP packet seen on an interface."""

    time: float
    interface: str
    outgoing: bool
    proto: str  # "udp" | "tcp"
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes

    def sip(self) -> Request | Response | None:
        """The SIP message in the payload, if it holds one (keepalive CRLFs and junk: None)."""
        if not self.payload.strip():
            return None
        try:
            return parse_message(self.payload)
        except (ParseError, ValueError):
            return None


def _parse_ipv4(data: bytes) -> tuple[str, str, str, int, int, bytes] | None:
    if len(data) < 20 or data[0] >> 4 != 4:
        return None
    ihl = (data[0] & 0x0F) * 4
    total = struct.unpack("!H", data[2:4])[0]
    flags_frag = struct.unpack("!H", data[6:8])[0]
    if flags_frag & 0x1FFF:  # a later fragment: no transport header
        return None
    proto = data[9]
    src = socket.inet_ntoa(data[12:16])
    dst = socket.inet_ntoa(data[16:20])
    body = data[ihl:total]
    if proto == 17 and len(body) >= 8:
        sport, dport = struct.unpack("!HH", body[:4])
        return "udp", src, dst, sport, dport, body[8:]
    if proto == 6 and len(body) >= 20:
        sport, dport = struct.unpack("!HH", body[:4])
        offset = (body[12] >> 4) * 4
        return "tcp", src, dst, sport, dport, body[offset:]
    return None


class Capture:
    """
    Every IPv4 UDP/TCP packet on some interfaces of a namespace, from now until L{stop}.

    Each interface gets an C{AF_PACKET} socket opened inside the namespace, read by one thread
    (bounded: it stops at L{stop}, or after C{max_seconds}, or after C{max_packets}).
    """

    def __init__(self, ns: Namespace, interfaces: Sequence[str], *,
                 max_seconds: float = 300.0, max_packets: int = 200_000) -> None:
        self.ns = ns
        self.packets: list[Packet] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: dict[socket.socket, str] = {}
        with ns.entered():
            for ifname in interfaces:
                s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(_ETH_P_ALL))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind((ifname, _ETH_P_ALL))
                s.setblocking(False)
                self._sockets[s] = ifname
        self._deadline = time.monotonic() + max_seconds
        self._max_packets = max_packets
        self._thread = threading.Thread(target=self._read, name=f"capture-{ns.role}",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        sockets = list(self._sockets)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            ready, _, _ = select.select(sockets, [], [], 0.05)
            for s in ready:
                self._drain(s)
            if len(self.packets) >= self._max_packets:
                break

    def _drain(self, s: socket.socket) -> None:
        for _ in range(1000):
            try:
                data, addr = s.recvfrom(65535)
            except BlockingIOError:
                return
            if addr[1] != 0x0800:  # IPv4 only
                continue
            parsed = _parse_ipv4(data)
            if parsed is None:
                continue
            proto, src, dst, sport, dport, payload = parsed
            packet = Packet(time.monotonic(), self._sockets[s], addr[2] == _PACKET_OUTGOING,
                            proto, src, sport, dst, dport, payload)
            with self._lock:
                self.packets.append(packet)

    def settle(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Wait (bounded) until no packet has come for C{quiet} seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                last = self.packets[-1].time if self.packets else 0.0
            if time.monotonic() - last >= quiet:
                return
            time.sleep(0.05)

    def stop(self) -> list[Packet]:
        self._stop.set()
        self._thread.join(5)
        for s in list(self._sockets):
            self._drain(s)
            s.close()
        self._sockets.clear()
        return self.snapshot()

    def snapshot(self) -> list[Packet]:
        with self._lock:
            return list(self.packets)

    def on(self, interface: str) -> list[Packet]:
        return [p for p in self.snapshot() if p.interface == interface]

    def sip_on(self, interface: str) -> list[tuple[Packet, Request | Response]]:
        """(packet, message) for every SIP message seen on C{interface}, in order."""
        out = []
        for packet in self.on(interface):
            message = packet.sip()
            if message is not None:
                out.append((packet, message))
        return out
