"""
The relay's kernel fast path end to end, behind the seed's firewall: fw's forward chain drops
UDP 10000-60000 (the phone's, the provider's and the relay's media ports), with no exception for
the relay, as in issue 12.

- A 4-second and a 30-second call (sipp phone playing numbered G.711 packets, provider echoing)
  through ``nat`` + ``media`` with the default config (``kernel = "auto"``): RTP both ways with
  at most 0.5 % lost at each end (by sequence number, in fw's captures), the relay's netdev
  table counts the packets while its userspace sockets see only the first second's, and fw's
  own ruleset is byte-identical throughout and after.
- The standalone relay (``twist sipproxy-relay``) over NG, a call with hold and resume.
- Re-INVITEs to new endpoints mid-call (hold, resume, a new port), driven over NG with numbered
  packets from sockets in the namespaces: at most one packet lost per switch.
- Kamailio's ``rtpengine`` module driving the standalone relay: 20 calls, none of their packets
  lost, no session, port or rule left.
- Parties on the relay's own host (loopback): userspace, one log line, no rule.
- A WAN with a smaller MTU than the LAN: tiny packets and RTCP through the rules; UDP checksum
  0, IP options, fragments and packets longer than the MTU toward their destination through
  userspace; all byte for byte. A stranger at a relay port neither takes the stream nor pushes
  it out of the kernel. SIGTERM with a call up: no table left, fw's ruleset as it was.
- 50 calls at once in the kernel (200 rules), ``query`` counting kernel packets, rules gone
  after ``delete``; ``kill -9`` leaves the table, the next relay's start removes it.
- Source-based policy routing (a second uplink): the rules go the way the relay's sockets go.
- A re-INVITE moving an endpoint while 30 calls end at once: its old rules go first, at most
  a packet lost.
- A firewall reload (``flush ruleset``) mid-call: the call goes on in userspace, nothing lost;
  the relay makes its table again, the call's rules and the next call's in it.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support.harness import wait_for
from tests.integration.support.kamailio import NgKamailio, kamailio_unavailable
from tests.integration.support.netns import (
    FIREWALL_RULES,
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    NAT_PORTS,
    PHONE_IP,
    PROVIDER_IP,
    SEED_RTP_PORTS,
    Capture,
    Namespace,
    NatNet,
    NsSipp,
    Topology,
)
from tests.integration.support.relays import (
    KERNEL_TABLE,
    MIN_PACKETS,
    NG_PORT,
    PCAP,
    PHONE_RTP,
    PROVIDER_RTP,
    RELAY_PORTS,
    TABLE_PREFIX,
    RelayProcess,
    describe_sip,
    firewall_tables,
    judge,
    media_config,
    ng,
    open_relay_ports,
    relay_table,
    standalone_relay,
    start_media_call,
)
from tests.integration.support.rtp import (
    callee_scenario,
    caller_scenario,
    is_rtp,
    loss,
    write_rtp_pcap,
)
from tests.integration.support.sites import SIP, SIPP_TIMEOUT, pair, start_site

pytestmark = [pytest.mark.netns]


@pytest.fixture
def seed_net(netns_ready: None) -> Iterator[NatNet]:
    """The standard topology, fw dropping forwarded UDP to 10000-60000."""
    if not PCAP.exists():
        pytest.skip(f"{PCAP} is missing (Debian package sip-tester)")
    with NatNet.build(rtp_ports=SEED_RTP_PORTS) as net:
        yield net


def rtp_stats(reply: dict[str, Any] | None) -> tuple[int, int] | None:
    """(userspace RTP packets, kernel RTP packets the relay counted) over every stream."""
    if not reply or reply.get("result") != "ok":
        return None
    user = kernel = 0
    for mono in reply.get("tags", {}).values():
        for media in mono.get("medias", []):
            for stream in media.get("streams", []):
                if "RTP" in stream.get("flags", []):
                    user += int(stream.get("userspace stats", {}).get("packets", 0))
                    kernel += int(stream.get("kernel stats", {}).get("packets", 0))
    return user, kernel


class Sampler(threading.Thread):
    """While a call runs: the relay's table, its own counts and fw's ruleset, every 0.25 s
    (bounded by ``limit`` seconds)."""

    def __init__(self, fw: Namespace, limit: float) -> None:
        super().__init__(daemon=True)
        self.fw = fw
        self.deadline = time.monotonic() + limit
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, dict[str, Any] | None, tuple[int, int] | None]] = []
        self.firewall: set[str] = set()

    def run(self) -> None:
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            calls = (ng(self.fw, {"command": "list"}) or {}).get("calls") or []
            stats = rtp_stats(ng(self.fw, {"command": "query", "call-id": calls[0]})) \
                if calls else None
            self.samples.append((time.monotonic(), relay_table(self.fw), stats))
            self.firewall.add(firewall_tables(self.fw))
            self.stop_event.wait(0.25)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)


@pytest.mark.parametrize("seconds", [4, 30])
def test_calls_through_the_kernel_path_behind_the_seeds_firewall(
        seed_net: NatNet, tmp_path: Path, seconds: int) -> None:
    net = seed_net
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    pcap = tmp_path / "counted.pcap"
    count = write_rtp_pcap(pcap, seconds)
    scenario = caller_scenario(tmp_path / "uac_counted.xml", pcap, seconds)
    config = media_config("builtin")
    # the default config: only the NG port for the test's own look at the relay's counts
    config["media"] = {"listen_ng": f"127.0.0.1:{NG_PORT}"}
    site = start_site(net, tmp_path, config)
    sampler = Sampler(net.fw, seconds + SIPP_TIMEOUT)
    try:
        wait_for(lambda: relay_table(net.fw) is not None)
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, site.logs()
        sampler.start()
        uas = site.provider.start_uas(callee_scenario(tmp_path / "uas_counted.xml"), SIP,
                                      count=1, timeout=seconds + SIPP_TIMEOUT,
                                      extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        uac = site.phone.start_uac(scenario, (FW_INSIDE, SIP), local_port=SIP, count=1,
                                   timeout=seconds + SIPP_TIMEOUT,
                                   keys={"ruri": "sip:bob@provider.example"},
                                   extra_args=["-mp", str(PHONE_RTP)])
        server, client = pair(uas, uac)
        sampler.finish()
        site.capture.settle()
        packets = site.capture.snapshot()
        logs = site.logs() + "\n" + describe_sip(packets)
        assert client.ok(1), f"{client.describe()}\n{logs}"
        assert server.ok(1), f"{server.describe()}\n{logs}"

        lan = [p for p in packets if p.interface == net.lan_if and is_rtp(p, audio_only=False)]
        wan = [p for p in packets if p.interface == net.wan_if and is_rtp(p, audio_only=False)]
        from_phone = [p for p in lan if p.src == PHONE_IP]
        to_provider = [p for p in wan if p.dst == PROVIDER_IP]
        from_provider = [p for p in wan if p.src == PROVIDER_IP]
        to_phone = [p for p in lan if p.dst == PHONE_IP]
        # the phone sent the whole pcap; each end got it all but <= 0.5 %
        assert len({p.payload[2:4] for p in from_phone}) >= count * 0.995, (len(from_phone),
                                                                             logs)
        at_provider = loss(from_phone, to_provider)
        assert at_provider.ratio <= 0.005, (at_provider, logs)
        echoed = loss(from_provider, to_phone)
        assert echoed.ratio <= 0.005, (echoed, logs)
        end_to_end = loss(from_phone, to_phone)
        assert end_to_end.ratio <= 0.01, (end_to_end, logs)
        # through the relay's ports only, no inside address outside
        assert {(p.src, p.dport) for p in to_provider} == {(FW_OUTSIDE, PROVIDER_RTP)}
        assert {(p.src, p.dport) for p in to_phone} == {(FW_INSIDE, PHONE_RTP)}

        # the kernel path carried the call after its first second: the relay's userspace
        # sockets saw about a second's packets and no more, the table's counters the rest
        first = min(p.time for p in from_phone)
        during = [(at, t, s) for at, t, s in sampler.samples if t is not None]
        assert max(t["rules"] for _, t, _ in during) == 2, (during, logs)
        counted = [(at, s) for at, _, s in during if s is not None and at <= to_phone[-1].time]
        late = [s for at, s in counted if at >= first + 1.0]
        assert late, (counted, logs)
        user_after_first_second = late[0][0]
        assert user_after_first_second <= 2 * 50 + 10, (counted, logs)
        assert late[-1][0] == user_after_first_second, (counted, logs)  # flat from then on
        kernel_total = max(t["packets"] for _, t, _ in during)
        assert kernel_total >= 2 * count - user_after_first_second - 10, (during, logs)

        # fw's own ruleset: byte-identical all along
        assert sampler.firewall == {firewall_tables(net.fw)}, sampler.firewall
        # after the BYE: no rule, no counter, no port, no session
        wait_for(lambda: relay_table(net.fw) == {"rules": 0, "packets": 0})
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, logs
        wait_for(lambda: not open_relay_ports(net.fw))
        assert open_relay_ports(net.fw) == [], logs
        assert (ng(net.fw, {"command": "list"}) or {}).get("calls") in ([], None)
        assert "firewall" not in site.proxy.log_text()
    finally:
        sampler.finish()
        site.stop()
    # the relay stopped: its table is gone, fw's ruleset is what it was
    assert relay_table(net.fw) is None
    assert net.fw.run("nft", "list", "ruleset").stdout == nft_before


def test_hold_and_resume_through_the_standalone_relays_kernel_path(seed_net: NatNet,
                                                                    tmp_path: Path) -> None:
    """``twist sipproxy-relay`` (``--kernel auto``, the default) on fw, over NG; the phone holds
    and resumes (re-INVITEs with the same endpoints): judged as the userspace relay's calls."""
    net = seed_net
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    process: RelayProcess = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    site = start_site(net, tmp_path, media_config("ng"))
    sampler = Sampler(net.fw, SIPP_TIMEOUT)
    try:
        sampler.start()
        uas, uac = start_media_call(site)
        server, client = pair(uas, uac)
        sampler.finish()
        site.capture.settle()
        logs = site.logs() + process.log_tail() + "\n" + describe_sip(site.capture.snapshot())
        assert client.ok(1), f"{client.describe()}\n{logs}"
        assert server.ok(1), f"{server.describe()}\n{logs}"
        during = [t for _, t, _ in sampler.samples if t is not None]
        assert max(t["rules"] for t in during) == 2, (during, logs)
        assert max(t["packets"] for t in during) >= 2 * MIN_PACKETS, (during, logs)
        wait_for(lambda: not open_relay_ports(net.fw))
        assert open_relay_ports(net.fw) == [], logs
        assert process.command({"command": "list"}).get("calls") in ([], None), logs
        judge(site.capture.snapshot(), net, logs)
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, logs
    finally:
        sampler.finish()
        site.stop()
        process.stop()
    assert relay_table(net.fw) is None
    assert net.fw.run("nft", "list", "ruleset").stdout == nft_before


# ------------------------------------------------------------------------------------------------
# re-INVITEs to new endpoints, driven over NG with numbered packets
# ------------------------------------------------------------------------------------------------
def _sdp(host: str, port: int, direction: str = "sendrecv") -> str:
    return (f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 8\r\na=rtpmap:8 PCMA/8000\r\na={direction}\r\n")


class Endpoint:
    """A party in a namespace: sends numbered RTP at 50 packets a second to where it is told,
    from one of its sockets, and records the sequence numbers it receives on all of them."""

    def __init__(self, ns: Namespace, host: str, ports: tuple[int, ...]) -> None:
        self.sockets = {}
        for port in ports:
            sock = ns.socket()
            sock.bind((host, port))
            sock.settimeout(0.02)
            self.sockets[port] = sock
        self.port = ports[0]
        self.target: tuple[str, int] | None = None
        self.sending = True
        self.sent = 0
        self.received: list[int] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._send, daemon=True)] + [
            threading.Thread(target=self._receive, args=(s,), daemon=True)
            for s in self.sockets.values()]

    def start(self) -> Endpoint:
        for t in self.threads:
            t.start()
        return self

    def _send(self, limit: float = 60.0) -> None:
        start = time.monotonic()
        n = 0
        while not self.stop_event.is_set() and time.monotonic() < start + limit:
            due = start + n * 0.02
            time.sleep(max(0.0, due - time.monotonic()))
            if self.target is not None and self.sending:
                packet = struct.pack("!BBHII", 0x80, 8, self.sent & 0xFFFF, 0, 1) + bytes(160)
                self.sockets[self.port].sendto(packet, self.target)
                self.sent += 1
            n += 1

    def _receive(self, sock: Any) -> None:
        while not self.stop_event.is_set():
            try:
                data = sock.recv(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) >= 4:
                self.received.append(struct.unpack("!H", data[2:4])[0])

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(5)
        for s in self.sockets.values():
            s.close()

    def lost_of(self, other: Endpoint) -> list[int]:
        got = set(self.received)
        return [n for n in range(other.sent) if n not in got]


def media_port(sdp: str | bytes) -> int:
    text = sdp.decode() if isinstance(sdp, bytes) else sdp
    return int(text.split("m=audio ")[1].split()[0])


def test_reinvites_to_new_endpoints_lose_at_most_a_packet_per_switch(
        seed_net: NatNet, tmp_path: Path) -> None:
    net = seed_net
    process = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    phone = Endpoint(net.phone, PHONE_IP, (PHONE_RTP, PHONE_RTP + 2))
    provider = Endpoint(net.provider, PROVIDER_IP, (PROVIDER_RTP,))
    call = {"call-id": "reinvite-1", "from-tag": "A", "direction": ["inside", "outside"]}

    def offer(port: int, direction: str = "sendrecv") -> int:
        reply = process.command({"command": "offer", **call, "sdp": _sdp(PHONE_IP, port,
                                                                          direction)})
        assert reply["result"] == "ok", reply
        return media_port(reply["sdp"])

    def answer(direction: str = "sendrecv") -> int:
        reply = process.command({"command": "answer", **call, "to-tag": "B",
                                 "sdp": _sdp(PROVIDER_IP, PROVIDER_RTP, direction)})
        assert reply["result"] == "ok", reply
        return media_port(reply["sdp"])

    try:
        to_provider_port = offer(PHONE_RTP)
        to_phone_port = answer()
        phone.target = (FW_INSIDE, to_phone_port)
        provider.target = (FW_OUTSIDE, to_provider_port)
        phone.start()
        provider.start()
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 2)
        time.sleep(1.0)
        in_kernel = (relay_table(net.fw) or {}).get("packets", 0)
        assert in_kernel > 50, (in_kernel, process.log_tail())
        # hold: the phone goes sendonly, then resumes (same endpoints)
        offer(PHONE_RTP, "sendonly")
        answer("recvonly")
        time.sleep(1.0)
        offer(PHONE_RTP)
        answer()
        time.sleep(1.0)
        # a new port: the phone re-INVITEs from its second socket and moves there
        offer(PHONE_RTP + 2)
        answer()
        phone.port = PHONE_RTP + 2
        time.sleep(1.5)
        # ... and back to the kernel path with the new endpoint
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 2)
        assert (relay_table(net.fw) or {}).get("rules") == 2, process.log_tail()
        before = (relay_table(net.fw) or {}).get("packets", 0)
        time.sleep(1.0)
        assert (relay_table(net.fw) or {}).get("packets", 0) > before + 50
        phone.sending = provider.sending = False
        time.sleep(0.5)
        switches = 3
        at_provider, at_phone = provider.lost_of(phone), phone.lost_of(provider)
        logs = process.log_tail()
        assert phone.sent > 200 and provider.sent > 200, logs
        assert len(at_provider) <= switches, (at_provider, phone.sent, logs)
        assert len(at_phone) <= switches, (at_phone, provider.sent, logs)
        reply = process.command({"command": "delete", "call-id": "reinvite-1", "from-tag": "A"})
        assert reply["result"] == "ok"
        wait_for(lambda: relay_table(net.fw) == {"rules": 0, "packets": 0})
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}
        assert open_relay_ports(net.fw) == []
        # the relay's own ports are in the range the firewall drops
        assert SEED_RTP_PORTS[0] <= RELAY_PORTS[0] <= RELAY_PORTS[1] <= SEED_RTP_PORTS[1]
    finally:
        phone.stop()
        provider.stop()
        process.stop()


# ------------------------------------------------------------------------------------------------
# a real NG client: Kamailio's rtpengine module in front of the standalone relay
# ------------------------------------------------------------------------------------------------
KAMAILIO_CALLS = 20
KAMAILIO_CALL_SECONDS = 2


def test_kamailio_drives_the_relay_over_ng(seed_net: NatNet, tmp_path: Path) -> None:
    """Kamailio on fw (``rtpengine_offer``/``answer``/``delete``) with ``twist sipproxy-relay``
    behind it: 20 calls, numbered RTP both ways through the kernel path, none lost; afterwards
    no session, no port and no rule left."""
    reason = kamailio_unavailable(rtpengine=True)
    if reason is not None:
        pytest.skip(reason)
    net = seed_net
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    pcap = tmp_path / "counted.pcap"
    count = write_rtp_pcap(pcap, KAMAILIO_CALL_SECONDS)
    scenario = caller_scenario(tmp_path / "uac_counted.xml", pcap, KAMAILIO_CALL_SECONDS)
    relay = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    capture: Capture | None = None
    kamailio = NgKamailio(net.fw, tmp_path / "kamailio", FW_INSIDE, port=SIP,
                          also_listen=[(FW_OUTSIDE, SIP)], next_hop=(PROVIDER_IP, SIP),
                          ng=("127.0.0.1", NG_PORT))
    phone, provider = NsSipp(net.phone, tmp_path / "phone"), NsSipp(net.provider,
                                                                     tmp_path / "provider")
    sampler = Sampler(net.fw, 60)
    try:
        kamailio.start()
        capture = Capture(net.fw, [net.lan_if, net.wan_if])
        sampler.start()
        limit = KAMAILIO_CALLS * KAMAILIO_CALL_SECONDS + SIPP_TIMEOUT
        uas = provider.start_uas(callee_scenario(tmp_path / "uas_counted.xml"), SIP,
                                 count=KAMAILIO_CALLS, timeout=limit,
                                 extra_args=["-rtp_echo", "-mp", str(PROVIDER_RTP)])
        uac = phone.start_uac(scenario, (FW_INSIDE, SIP), local_port=SIP,
                              count=KAMAILIO_CALLS, rate=2, timeout=limit,
                              keys={"ruri": "sip:bob@provider.example"},
                              extra_args=["-mp", str(PHONE_RTP)])
        server, client = pair(uas, uac)
        sampler.finish()
        capture.settle()
        packets = capture.snapshot()
        logs = (f"{kamailio.log_tail(40)}\n"
                f"{relay.log_tail()}\n{describe_sip(packets)}")
        assert client.ok(KAMAILIO_CALLS), f"{client.describe()}\n{logs}"
        assert server.ok(KAMAILIO_CALLS), f"{server.describe()}\n{logs}"

        lan = [p for p in packets if p.interface == net.lan_if and is_rtp(p, audio_only=False)]
        wan = [p for p in packets if p.interface == net.wan_if and is_rtp(p, audio_only=False)]
        # per call, told apart by the relay's port on each side
        from_phone = [p for p in lan if p.src == PHONE_IP]
        to_provider = loss(from_phone, [p for p in wan if p.dst == PROVIDER_IP],
                           ("dport", "sport"))
        assert len({k for k, *_ in to_provider.sent}) == KAMAILIO_CALLS, (to_provider, logs)
        assert len(to_provider.sent) == KAMAILIO_CALLS * count, (to_provider, logs)
        assert to_provider.lost == 0, (to_provider, logs)
        echoed = loss([p for p in wan if p.src == PROVIDER_IP],
                      [p for p in lan if p.dst == PHONE_IP], ("dport", "sport"))
        assert len(echoed.sent) == KAMAILIO_CALLS * count, (echoed, logs)
        assert echoed.lost == 0, (echoed, logs)
        # the kernel path carried them
        assert max((t or {}).get("packets", 0) for _, t, _ in sampler.samples) > count, logs
        # nothing left: sessions, ports, rules
        wait_for(lambda: not open_relay_ports(net.fw))
        assert open_relay_ports(net.fw) == [], logs
        assert relay.command({"command": "list"}).get("calls") in ([], None), logs
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, logs
    finally:
        sampler.finish()
        phone.cleanup()
        provider.cleanup()
        kamailio.stop()
        if capture is not None:
            capture.stop()
        relay.stop()
    assert relay_table(net.fw) is None
    assert net.fw.run("nft", "list", "ruleset").stdout == nft_before


# ------------------------------------------------------------------------------------------------
# parties on the relay's own host: the netdev hook cannot serve them
# ------------------------------------------------------------------------------------------------
def test_parties_on_loopback_stay_in_userspace_with_one_line(netns_ready: None,
                                                             tmp_path: Path) -> None:
    """The relay with ``--kernel auto`` in a namespace of its own, both parties on 127.0.0.1
    there (as on a host whose phones run beside the relay): two calls' RTP flows both ways in
    userspace, no rule is installed, one log line says why, and none blames a firewall."""
    with Topology() as topology:
        ns = topology.namespace("host")
        relay = RelayProcess(ns, [
            sys.executable, "-m", "twisted", "--log-format=text", "sipproxy-relay",
            "--listen-ng", f"127.0.0.1:{NG_PORT}", "--port-min", str(RELAY_PORTS[0]),
            "--port-max", str(RELAY_PORTS[1]), "--interface", "default/127.0.0.1",
            "--kernel", "auto"], tmp_path, "sipproxy-relay").start()
        try:
            wait_for(lambda: relay_table(ns) is not None)
            for n in range(2):
                a = Endpoint(ns, "127.0.0.1", (PHONE_RTP + 10 * n,))
                b = Endpoint(ns, "127.0.0.1", (PROVIDER_RTP + 10 * n,))
                call = {"call-id": f"local-{n}", "from-tag": "A"}
                offer = relay.command({"command": "offer", **call,
                                       "sdp": _sdp("127.0.0.1", a.port)})
                answer = relay.command({"command": "answer", **call, "to-tag": "B",
                                        "sdp": _sdp("127.0.0.1", b.port)})
                a.target = ("127.0.0.1", media_port(answer["sdp"]))
                b.target = ("127.0.0.1", media_port(offer["sdp"]))
                try:
                    a.start()
                    b.start()
                    time.sleep(1.5)
                    a.sending = b.sending = False
                    time.sleep(0.3)
                finally:
                    a.stop()
                    b.stop()
                assert a.sent >= 50 and not b.lost_of(a), (a.sent, b.lost_of(a))
                assert not a.lost_of(b), a.lost_of(b)
                assert relay.command({"command": "delete", **call})["result"] == "ok"
                assert relay_table(ns) == {"rules": 0, "packets": 0}
            log = relay.log_path.read_text(errors="replace")
            lines = [line for line in log.splitlines() if "kernel fast path:" in line]
            assert len(lines) == 1, log
            assert "stays in userspace" in lines[0] and "127.0.0.1" in lines[0], lines
            assert "firewall" not in log, log
        finally:
            relay.stop()


# ------------------------------------------------------------------------------------------------
# what the netdev rules must leave to userspace, strangers, a stop with calls up
# ------------------------------------------------------------------------------------------------
SO_NO_CHECK = 11  # Linux: send UDP without a checksum (0)
WAN_MTU = 1400


class Party:
    """A party's RTP and RTCP sockets in a namespace; records (datagram, source) per port."""

    def __init__(self, ns: Namespace, host: str, port: int) -> None:
        self.sockets = []
        self.got: dict[int, list[tuple[bytes, tuple[str, int]]]] = {port: [], port + 1: []}
        self.stop_event = threading.Event()
        for p in (port, port + 1):
            sock = ns.socket()
            sock.bind((host, p))
            sock.settimeout(0.05)
            self.sockets.append(sock)
            threading.Thread(target=self._receive, args=(sock, self.got[p]), daemon=True).start()
        self.rtp, self.rtcp = self.sockets
        self.port = port

    def _receive(self, sock: Any, into: list[tuple[bytes, tuple[str, int]]]) -> None:
        while not self.stop_event.is_set():
            try:
                data, source = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            into.append((data, source))

    def clear(self) -> None:
        for got in self.got.values():
            got.clear()

    def close(self) -> None:
        self.stop_event.set()
        time.sleep(0.1)
        for sock in self.sockets:
            sock.close()


def numbered(seq: int, size: int = 160) -> bytes:
    """An RTP packet whose payload bytes depend on ``seq`` (a corrupted byte shows)."""
    return struct.pack("!BBHII", 0x80, 8, seq & 0xFFFF, seq * 160, 7) + bytes(
        (seq + i) & 0xFF for i in range(size))


def kernel_packets(ns: Namespace) -> int:
    return (relay_table(ns) or {}).get("packets", 0)


def ng_call(relay: RelayProcess, call_id: str, a: tuple[str, int],
            b: tuple[str, int]) -> tuple[int, int]:
    """Offer from A (inside) and answer from B (outside): (the relay's port A sends to, the
    one B sends to)."""
    call = {"call-id": call_id, "from-tag": "A", "direction": ["inside", "outside"]}
    offer = relay.command({"command": "offer", **call, "sdp": _sdp(*a)})
    answer = relay.command({"command": "answer", **call, "to-tag": "B", "sdp": _sdp(*b)})
    assert offer["result"] == answer["result"] == "ok", (offer, answer)
    return media_port(answer["sdp"]), media_port(offer["sdp"])


Leg = tuple[Party, tuple[str, int]]  # a party and the relay's address it sends to


def latched_calls(net: NatNet, relay: RelayProcess, prefix: str, count: int,
                  offset: int = 0) -> list[tuple[Leg, Leg]]:
    """``count`` calls, each party's RTP and RTCP latched with one packet (the rules follow)."""
    calls = []
    for n in range(count):
        phone = Party(net.phone, PHONE_IP, PHONE_RTP + offset + 2 * n)
        provider = Party(net.provider, PROVIDER_IP, PROVIDER_RTP + offset + 2 * n)
        to_phone_side, to_provider_side = ng_call(relay, f"{prefix}-{n}", (PHONE_IP, phone.port),
                                                  (PROVIDER_IP, provider.port))
        calls.append(((phone, (FW_INSIDE, to_phone_side)),
                      (provider, (FW_OUTSIDE, to_provider_side))))
        for party, (host, port) in calls[-1]:
            party.rtp.sendto(numbered(0), (host, port))
            party.rtcp.sendto(b"\x81\xc9\x00\x01" + bytes(4), (host, port + 1))
    return calls


def close_calls(calls: list[tuple[Leg, Leg]]) -> None:
    parties = [party for call in calls for party, _ in call]
    for party in parties:
        party.stop_event.set()
    for party in parties:
        for sock in party.sockets:
            sock.close()


def test_odd_packets_strangers_and_a_stop_with_a_call_up(seed_net: NatNet,
                                                         tmp_path: Path) -> None:
    """fw's WAN has a smaller MTU than its LAN (as PPPoE's 1492). With RTP and RTCP of a call
    both ways in the kernel: tiny packets and packets up to the WAN's MTU go through the rules;
    packets with a UDP checksum of 0, IP options, IP fragments and packets longer than the MTU
    toward their destination reach the far party through userspace; every one arrives
    byte for byte from the relay's port. A stranger sending to the relay's port does not take
    the stream and does not push it out of the kernel. SIGTERM with the call up leaves no
    table and fw's ruleset as it was."""
    net = seed_net
    for ns, device in ((net.fw, net.wan_if), (net.provider, "eth0")):
        ns.run("ip", "link", "set", device, "mtu", str(WAN_MTU))
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    relay = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    phone, provider = Party(net.phone, PHONE_IP, PHONE_RTP), Party(net.provider, PROVIDER_IP,
                                                                    PROVIDER_RTP)
    stranger = net.provider.socket()
    stranger.bind((PROVIDER_IP, PROVIDER_RTP + 10))
    stranger.settimeout(0.3)
    try:
        to_phone_side, to_provider_side = ng_call(relay, "odd", (PHONE_IP, PHONE_RTP),
                                                  (PROVIDER_IP, PROVIDER_RTP))
        at = {phone: (FW_INSIDE, to_phone_side), provider: (FW_OUTSIDE, to_provider_side)}
        for seq in range(3):  # both latch, RTP and RTCP
            for party, (host, port) in at.items():
                party.rtp.sendto(numbered(seq), (host, port))
                party.rtcp.sendto(b"\x81\xc9\x00\x01" + bytes(4), (host, port + 1))
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 4)
        assert (relay_table(net.fw) or {}).get("rules") == 4, relay.log_tail()
        logs = relay.log_tail

        def through(sender: Party, receiver: Party, packet: bytes, *, rtcp: bool = False,
                    kernel: bool, options: tuple[int, int, Any] | None = None) -> None:
            host, port = at[sender]
            before = kernel_packets(net.fw)
            receiver.clear()
            sock = sender.rtcp if rtcp else sender.rtp
            if options is not None:
                sock.setsockopt(*options)
            try:
                sock.sendto(packet, (host, port + rtcp))
            finally:
                if options is not None:
                    sock.setsockopt(*options[:2], b"" if isinstance(options[2], bytes) else 0)
            got = receiver.got[receiver.port + rtcp]
            wait_for(lambda: bool(got), 2)
            relay_port = at[receiver][1] + rtcp
            side = FW_INSIDE if receiver is phone else FW_OUTSIDE
            what = f"{len(packet)} bytes, {options}"
            assert got == [(packet, (side, relay_port))], (what, got[:1], logs())
            counted = kernel_packets(net.fw) - before
            assert counted == (1 if kernel else 0), (what, counted, logs())

        biggest = WAN_MTU - 28
        through(phone, provider, numbered(10), kernel=True)
        through(provider, phone, numbered(11), kernel=True)
        through(phone, provider, b"\x81\xc9\x00\x01" + bytes(8), rtcp=True, kernel=True)
        through(provider, phone, b"\x81\xc9\x00\x01" + bytes(12), rtcp=True, kernel=True)
        through(phone, provider, b"", kernel=True)
        through(phone, provider, b"\x80", kernel=True)
        through(phone, provider, numbered(12), kernel=False,
                options=(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00"))
        through(phone, provider, numbered(13, biggest - 12), kernel=True)
        through(provider, phone, numbered(14, biggest - 12), kernel=True)
        # the LAN takes 1,500 bytes, the WAN not: the relay's socket fragments it
        through(phone, provider, numbered(15, 1500 - 28 - 12), kernel=False)
        through(phone, provider, numbered(16, 3000), kernel=False)  # fragments
        through(provider, phone, numbered(17, 3000), kernel=False)
        through(phone, provider, numbered(18), kernel=False,
                options=(socket.SOL_SOCKET, SO_NO_CHECK, 1))

        # a stranger at the relay's port for the provider: userspace forwards its packet (no
        # strict source), the stream stays latched and in the kernel
        phone.clear()
        stranger.sendto(numbered(19), at[provider])
        wait_for(lambda: bool(phone.got[PHONE_RTP]), 2)
        assert [d for d, _ in phone.got[PHONE_RTP]] == [numbered(19)], logs()
        assert (relay_table(net.fw) or {}).get("rules") == 4, logs()
        through(phone, provider, numbered(20), kernel=True)
        through(provider, phone, numbered(21), kernel=True)
        with pytest.raises(TimeoutError):
            stranger.recv(2048)
        assert "back to userspace" not in relay.log_path.read_text(errors="replace"), logs()

        relay.stop()  # SIGTERM, the call up
        assert "Main loop terminated" in relay.log_path.read_text(errors="replace"), logs()
        assert relay_table(net.fw) is None
        assert net.fw.run("nft", "list", "ruleset").stdout == nft_before
    finally:
        phone.close()
        provider.close()
        stranger.close()
        relay.stop()


MANY_CALLS = 50


def test_many_calls_then_a_killed_relays_table_goes_at_the_next_start(seed_net: NatNet,
                                                                       tmp_path: Path) -> None:
    """50 calls at once in the kernel (RTP and RTCP: 200 rules in the relay's own table,
    ``netdev sipproxy_relay_<pid>``), ``query`` counting a call's kernel packets; 49 deleted:
    their rules go. ``kill -9`` with a call up leaves the table; the next relay's start deletes
    it, and fw's own ruleset is as it was."""
    net = seed_net
    nft_before = firewall_tables(net.fw)
    argv = [arg for arg in standalone_relay(net.fw, tmp_path, kernel="auto").argv
            if arg not in ("--kernel-table", KERNEL_TABLE)]
    relay = RelayProcess(net.fw, argv, tmp_path, "killed").start()
    calls: list[tuple[Leg, Leg]] = []
    successor: RelayProcess | None = None
    try:
        calls = latched_calls(net, relay, "many", MANY_CALLS)
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 4 * MANY_CALLS, 60)
        assert (relay_table(net.fw) or {}).get("rules") == 4 * MANY_CALLS, relay.log_tail()
        (phone, at_phone_side), (provider, _) = calls[0]
        provider.clear()
        for seq in range(1, 11):
            phone.rtp.sendto(numbered(seq), at_phone_side)
        wait_for(lambda: len(provider.got[provider.port]) == 10, 2)
        assert [d for d, _ in provider.got[provider.port]] == [numbered(s) for s in range(1, 11)]
        wait_for(lambda: (rtp_stats(relay.command({"command": "query", "call-id": "many-0"}))
                          or (0, 0))[1] >= 10, 6)  # the counters are read every 2 s
        assert rtp_stats(relay.command({"command": "query", "call-id": "many-0"})) == (2, 10)
        for n in range(1, MANY_CALLS):
            reply = relay.command({"command": "delete", "call-id": f"many-{n}", "from-tag": "A"})
            assert reply["result"] == "ok", reply
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 4, 60)
        assert (relay_table(net.fw) or {}).get("rules") == 4, relay.log_tail()
        tables = net.fw.run("nft", "list", "tables").stdout
        assert f"table netdev {TABLE_PREFIX}" in tables, tables
        assert relay.process is not None
        relay.process.kill()
        relay.process.wait(5)
        assert (relay_table(net.fw) or {}).get("rules") == 4  # nobody deleted it
        successor = RelayProcess(net.fw, argv, tmp_path, "successor").start()
        wait_for(lambda: "kernel fast path on" in successor.log_path.read_text())
        assert relay_table(net.fw) == {"rules": 0, "packets": 0}, successor.log_tail()
        assert "removed the stale nftables table" in successor.log_path.read_text(), \
            successor.log_tail()
        successor.stop()
        assert relay_table(net.fw) is None
        assert firewall_tables(net.fw) == nft_before
    finally:
        close_calls(calls)
        relay.stop()
        if successor is not None:
            successor.stop()


def test_the_rules_follow_policy_routing_as_the_relays_sockets_do(seed_net: NatNet,
                                                                  tmp_path: Path) -> None:
    """A host with a second uplink routes by source address: here fw's main table sends the
    provider's address elsewhere (a gateway on the LAN), a rule sends what comes from the
    relay's outside address out of wan0. The kernel path goes the way the relay's own socket
    goes: both ways through the rules, nothing lost."""
    net = seed_net
    net.fw.run("ip", "route", "add", f"{PROVIDER_IP}/32", "via", "192.168.77.99")
    net.fw.run("ip", "route", "add", "203.0.113.0/24", "dev", net.wan_if, "table", "100")
    net.fw.run("ip", "rule", "add", "from", FW_OUTSIDE, "lookup", "100")
    relay = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    phone, provider = Party(net.phone, PHONE_IP, PHONE_RTP), Party(net.provider, PROVIDER_IP,
                                                                    PROVIDER_RTP)
    try:
        to_phone_side, to_provider_side = ng_call(relay, "policy", (PHONE_IP, PHONE_RTP),
                                                  (PROVIDER_IP, PROVIDER_RTP))
        phone.rtp.sendto(numbered(0), (FW_INSIDE, to_phone_side))
        provider.rtp.sendto(numbered(0), (FW_OUTSIDE, to_provider_side))
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 2)
        assert (relay_table(net.fw) or {}).get("rules") == 2, relay.log_tail()
        phone.clear()
        provider.clear()
        for seq in range(1, 21):
            phone.rtp.sendto(numbered(seq), (FW_INSIDE, to_phone_side))
            provider.rtp.sendto(numbered(seq), (FW_OUTSIDE, to_provider_side))
        wait_for(lambda: len(provider.got[PROVIDER_RTP]) == len(phone.got[PHONE_RTP]) == 20, 3)
        sent = [numbered(seq) for seq in range(1, 21)]
        assert [d for d, _ in provider.got[PROVIDER_RTP]] == sent, relay.log_tail()
        assert [d for d, _ in phone.got[PHONE_RTP]] == sent, relay.log_tail()
        assert kernel_packets(net.fw) == 40, relay.log_tail()
    finally:
        phone.close()
        provider.close()
        relay.stop()


ENDING_CALLS = 30


def test_an_endpoint_moving_while_many_calls_end_loses_at_most_a_packet(seed_net: NatNet,
                                                                        tmp_path: Path) -> None:
    """30 calls in the kernel end at once (their rules wait to go, one nft run after another)
    while a re-INVITE moves the phone of another call to a new port and the old one closes:
    the moved call's old rules go first, so the provider's packets reach the phone's new
    port (at most a packet lost), not the closed one until the queue is through."""
    net = seed_net
    relay = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    phone = Endpoint(net.phone, PHONE_IP, (PHONE_RTP, PHONE_RTP + 2))
    provider = Endpoint(net.provider, PROVIDER_IP, (PROVIDER_RTP,))
    calls: list[tuple[Leg, Leg]] = []
    try:
        to_phone_side, to_provider_side = ng_call(relay, "moving", (PHONE_IP, PHONE_RTP),
                                                  (PROVIDER_IP, PROVIDER_RTP))
        phone.target = (FW_INSIDE, to_phone_side)
        provider.target = (FW_OUTSIDE, to_provider_side)
        phone.start()
        provider.start()
        calls = latched_calls(net, relay, "ending", ENDING_CALLS, offset=100)
        rules = 2 + 4 * ENDING_CALLS
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == rules, 60)
        assert (relay_table(net.fw) or {}).get("rules") == rules, relay.log_tail()
        for n in range(ENDING_CALLS):
            relay.command({"command": "delete", "call-id": f"ending-{n}", "from-tag": "A"})
        call = {"call-id": "moving", "from-tag": "A", "direction": ["inside", "outside"]}
        relay.command({"command": "offer", **call, "sdp": _sdp(PHONE_IP, PHONE_RTP + 2)})
        relay.command({"command": "answer", **call, "to-tag": "B",
                       "sdp": _sdp(PROVIDER_IP, PROVIDER_RTP)})
        phone.port = PHONE_RTP + 2
        time.sleep(0.2)  # (an nft run or two, on a busy machine)
        phone.sockets[PHONE_RTP].close()  # the old port is gone
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 2, 60)
        time.sleep(0.5)
        phone.sending = provider.sending = False
        time.sleep(0.5)
        lost = phone.lost_of(provider)
        assert provider.sent > 100, relay.log_tail()
        assert len(lost) <= 1, (len(lost), provider.sent, relay.log_tail())
        assert len(provider.lost_of(phone)) <= 1, relay.log_tail()
    finally:
        close_calls(calls)
        phone.stop()
        provider.stop()
        relay.stop()


def test_a_firewall_reload_that_flushes_the_ruleset_mid_call(seed_net: NatNet,
                                                              tmp_path: Path) -> None:
    """The firewall is reloaded as nftables.conf does it (``flush ruleset``, then its own
    tables), the relay's table going with it, during a call in the kernel: the call goes on
    in userspace, nothing lost; the relay makes its table again with the call's rules, and
    the next call is in the kernel too; the firewall's ruleset is what it loaded."""
    net = seed_net
    relay = standalone_relay(net.fw, tmp_path, kernel="auto").start()
    parties = [Endpoint(net.phone, PHONE_IP, (PHONE_RTP + n,)) for n in (0, 10)] + [
        Endpoint(net.provider, PROVIDER_IP, (PROVIDER_RTP + n,)) for n in (0, 10)]
    (phone, phone2, provider, provider2) = parties
    for party in parties:
        party.start()  # sending once it has a target

    def call(n: int, a: Endpoint, b: Endpoint) -> None:
        to_a_side, to_b_side = ng_call(relay, f"reload-{n}", (PHONE_IP, a.port),
                                       (PROVIDER_IP, b.port))
        a.target, b.target = (FW_INSIDE, to_a_side), (FW_OUTSIDE, to_b_side)

    try:
        call(1, phone, provider)
        wait_for(lambda: kernel_packets(net.fw) > 50)
        assert kernel_packets(net.fw) > 50, relay.log_tail()
        reload = "flush ruleset\n" + FIREWALL_RULES.format(lan=LAN, nat=NAT_PORTS,
                                                            rtp=SEED_RTP_PORTS)
        net.fw.nft(reload)
        loaded = net.fw.run("nft", "list", "ruleset").stdout
        # at the next counter read: the table again, the call's rules in it again
        wait_for(lambda: kernel_packets(net.fw) > 50, 6)
        assert kernel_packets(net.fw) > 50, relay.log_tail()
        call(2, phone2, provider2)
        wait_for(lambda: (relay_table(net.fw) or {}).get("rules") == 4, 6)
        assert (relay_table(net.fw) or {}).get("rules") == 4, relay.log_tail()
        assert firewall_tables(net.fw) == loaded.rstrip("\n")
        time.sleep(1.0)
        for party in parties:
            party.sending = False
        time.sleep(0.5)
        assert phone.sent > 100 and phone2.sent > 50, relay.log_tail()
        for a, b in ((phone, provider), (provider, phone), (phone2, provider2),
                     (provider2, phone2)):
            assert b.lost_of(a) == [], (b.lost_of(a), relay.log_tail())
        assert "was deleted" in relay.log_path.read_text(), relay.log_tail()
    finally:
        for party in parties:
            party.stop()
        relay.stop()
