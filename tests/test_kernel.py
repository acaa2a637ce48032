"""sipproxy.media.kernel and the engine's use of it, with a fake nft/ip runner: the rule text
(netdev ingress, rewriting, fwd to the route's next hop), the start check, install once both
ends latched, counters into statistics and timeouts (task.Clock), the handovers (userspace
keeps forwarding what reached it, rules go atomically on a re-INVITE, the call's end and stop,
and stay on a foreign source), rules limited to the MTU, streams the hook cannot serve (local
parties) and fallback when nft fails.
Real UDP on 127.0.0.1 for the userspace side; the kernel itself is never touched here (the
namespace tests in tests/integration/test_media_kernel_netns.py do that)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from sipproxy.config import ConfigError
from sipproxy.media import tap
from sipproxy.media.engine import RelayEngine
from sipproxy.media.kernel import KernelError, KernelForwarder, Unsuitable, parse_counters
from sipproxy.media.offer_answer import SignalOptions
from sipproxy.media.offload import KernelOffloader
from sipproxy.media.ports import RelayInterface
from sipproxy.media.service import makeRelayService
from sipproxy.media.settings import RelaySettings
from sipproxy.sdp import parse_sdp
from tests.relay_phones import LOCAL, Phone, rtp, sdp

reactor: Any = _reactor
PORT_MIN = 47000 + (os.getpid() % 50) * 100
PORT_MAX = PORT_MIN + 99
TABLE = "sipproxy_relay_test"
#: what the fake ``ip route get`` answers for the unit tests' 127.0.0.1 parties: a route via a
#: gateway on a device, as for a phone behind a router
ROUTED = {"dst": LOCAL, "gateway": "10.0.0.254", "dev": "eth9", "prefsrc": "10.0.0.1",
          "flags": [], "uid": 0, "cache": []}


class FakeNft:
    """Answers nft and ip commands as the real ones would, and records them."""

    def __init__(self) -> None:
        self.commands: list[tuple[list[str], str]] = []
        self.handle = 0
        self.rules: dict[int, str] = {}  # handle -> rule line
        self.counters: dict[str, tuple[int, int]] = {}
        self.chains: set[str] = set()
        self.tables = ""
        #: address -> the route ``ip route get`` reports (default: ROUTED)
        self.routes: dict[str, dict[str, Any]] = {}  # {}: no route
        #: device -> its MTU, as ``ip link show`` reports them
        self.links: dict[str, int] = {"lo": 65536, "eth9": 1500, "lan0": 1500, "wan0": 1500}
        self.fail: set[str] = set()  # "echo", "start", "check", "counters", "remove"
        #: the relay's table was deleted behind its back (``nft flush ruleset``)
        self.table_gone = False

    def __call__(self, argv: Sequence[str], stdin: bytes | None) -> defer.Deferred[
            tuple[bytes, bytes, int]]:
        args = list(argv)
        text = stdin.decode() if stdin else ""
        self.commands.append((args, text))
        return defer.succeed(self.answer(args, text))

    def answer(self, args: list[str], text: str) -> tuple[bytes, bytes, int]:
        if args[0] == "ip":
            if args[1:4] == ["-j", "-batch", "-"]:
                out = ""
                for line in text.splitlines():  # ip stops at the first failing command
                    if line == "link show":
                        out += json.dumps([{"ifname": name, "mtu": mtu, "flags": ["UP"]}
                                           for name, mtu in self.links.items()]) + "\n"
                        continue
                    route = self.routes.get(line.split()[2], ROUTED)  # route get A from R
                    if not route:
                        return out.encode(), b"RTNETLINK answers: Network is unreachable\n", 1
                    out += json.dumps([route]) + "\n"
                return out.encode(), b"", 0
            return b"ip utility, iproute2-6.1.0\n", b"", 0
        if args[1:] == ["list", "tables"]:
            return self.tables.encode(), b"", 0
        if args[1:3] == ["list", "table"]:
            return (b"", b"Error: No such file or directory\n", 1) if self.table_gone else (
                b"table netdev x {}\n", b"", 0)
        if args[1:] == ["--check", "-f", "-"]:
            if "check" in self.fail:
                return b"", b"Error: Could not process rule: Not supported\n", 1
            return b"", b"", 0
        if args[1:] == ["-f", "-"]:
            if ("start" in self.fail and "table netdev" in text) or (
                    "remove" in self.fail and "delete rule" in text):
                return b"", b"Error: Operation not permitted\n", 1
            if text.startswith("table netdev"):
                self.table_gone = False
            for m in re.finditer(r"delete rule netdev \S+ \S+ handle (\d+)", text):
                self.rules.pop(int(m.group(1)), None)
            for m in re.finditer(r"delete counter netdev \S+ (\S+)", text):
                self.counters.pop(m.group(1), None)
            return b"", b"", 0
        if args[1:3] == ["--echo", "--handle"]:
            if "echo" in self.fail or self.table_gone:
                return b"", b"Error: Could not process rule: No such file or directory\n", 1
            out = []
            for line in text.splitlines():
                self.handle += 1
                if line.startswith("add counter"):
                    self.counters[line.split()[-1]] = (0, 0)
                elif line.startswith("add chain"):
                    self.chains.add(line.split()[4])
                else:
                    self.rules[self.handle] = line
                out.append(f"{line} # handle {self.handle}")
            return "\n".join(out).encode(), b"", 0
        if args[1:4] == ["-j", "list", "counters"]:
            if "counters" in self.fail or self.table_gone:
                return b"", b"Error: No such file or directory\n", 1
            return self.json(self.counters), b"", 0
        if args[1:3] == ["delete", "table"]:
            self.rules.clear()
            self.counters.clear()
            self.chains.clear()
            return b"", b"", 0
        return b"", f"unexpected {args}".encode(), 2

    @staticmethod
    def json(counters: dict[str, tuple[int, int]]) -> bytes:
        items: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
        items += [{"counter": {"family": "netdev", "name": n, "table": TABLE, "handle": 1,
                               "packets": p, "bytes": b}} for n, (p, b) in counters.items()]
        return json.dumps({"nftables": items}).encode()

    def ran(self, *words: str) -> list[list[str]]:
        return [a for a, _ in self.commands if all(w in a for w in words)]


LAN_ROUTE = {"dst": "192.168.77.10", "dev": "lan0", "prefsrc": "192.168.77.1", "flags": []}
WAN_ROUTE = {"dst": "198.51.100.7", "gateway": "203.0.113.254", "dev": "wan0",
             "prefsrc": "203.0.113.1", "flags": []}


class ForwarderTests(unittest.SynchronousTestCase):
    def started(self) -> tuple[FakeNft, KernelForwarder]:
        fake = FakeNft()
        fake.routes = {"192.168.77.10": LAN_ROUTE, "198.51.100.7": WAN_ROUTE}
        k = KernelForwarder(fake, TABLE)
        self.successResultOf(k.start())
        return fake, k

    def test_the_table_and_stale_tables(self) -> None:
        fake = FakeNft()
        fake.tables = ("table netdev other\ntable netdev sipproxy_relay_999999999\n"
                       f"table netdev sipproxy_relay_{os.getpid()}\n"
                       "table netdev sipproxy_relay_x\ntable ip sipproxy_relay_999999998\n"
                       "table inet sipproxy_relay_999999997\n")
        k = KernelForwarder(fake, TABLE)
        self.successResultOf(k.start())
        # a dead relay's table goes (also an ip one of the DNAT fast path of earlier
        # versions); a live one's (ours here), another name and other families stay
        self.assertEqual(fake.ran("delete", "table"),
                         [["nft", "delete", "table", "netdev", "sipproxy_relay_999999999"],
                          ["nft", "delete", "table", "ip", "sipproxy_relay_999999998"]])
        script = next(t for a, t in fake.commands if a == ["nft", "-f", "-"])
        self.assertIn(f"delete table netdev {TABLE}", script)  # our own stale one, atomically
        # the kernel checked every expression the rules use, without applying anything
        probe = next(t for a, t in fake.commands if a == ["nft", "--check", "-f", "-"])
        for words in ("hook ingress", "ip saddr set", "udp dport set", "udp checksum != 0",
                      "fwd ip to", "counter name"):
            self.assertIn(words, probe)
        self.successResultOf(k.stop())
        self.assertEqual(fake.ran("delete", "table", TABLE)[-1],
                         ["nft", "delete", "table", "netdev", TABLE])

    def test_start_fails_without_nft(self) -> None:
        fake = FakeNft()
        fake.fail.add("start")
        self.failureResultOf(KernelForwarder(fake, TABLE).start(), KernelError)

    def test_start_fails_where_the_kernel_lacks_an_expression(self) -> None:
        fake = FakeNft()
        fake.fail.add("check")
        k = KernelForwarder(fake, TABLE)
        failure = self.failureResultOf(k.start(), KernelError)
        self.assertIn("netdev ingress", failure.getErrorMessage())
        self.assertFalse(k.started)
        # the table it made for the check is gone again
        self.assertEqual(fake.ran("delete", "table", TABLE)[-1],
                         ["nft", "delete", "table", "netdev", TABLE])

    def test_bad_table_name(self) -> None:
        self.assertRaises(ValueError, KernelForwarder, FakeNft(), "a b")

    def test_rule_text_install_and_remove(self) -> None:
        fake, k = self.started()
        a = (("192.168.77.10", 10000), ("192.168.77.1", 30000))
        b = (("198.51.100.7", 12000), ("203.0.113.1", 30002))
        offload = self.successResultOf(k.install(a, b))
        script = k.rules(offload)
        # one ingress chain per device the parties' packets arrive on
        self.assertIn('add chain netdev sipproxy_relay_test in_lan0 { type filter hook ingress '
                      'device "lan0" priority -500; policy accept; }', script)
        self.assertIn('in_wan0 { type filter hook ingress device "wan0"', script)
        self.assertEqual(fake.chains, {"in_lan0", "in_wan0"})
        # A -> B: matched on A's source and the relay's port, rewritten, sent to B's gateway
        self.assertIn(
            "add rule netdev sipproxy_relay_test in_lan0 ip saddr 192.168.77.10 udp sport 10000 "
            "ip daddr 192.168.77.1 udp dport 30000 ip hdrlength 5 ip frag-off & 0x3fff == 0 "
            "udp checksum != 0 ip length <= 1500 ip saddr set 203.0.113.1 "
            "ip daddr set 198.51.100.7 udp sport set 30002 udp dport set 12000 "
            'counter name "o1_ab" fwd ip to 203.0.113.254 device "wan0" comment "o1d0"', script)
        # B -> A: A is on the link itself, the next hop is A
        self.assertIn(
            "in_wan0 ip saddr 198.51.100.7 udp sport 12000 ip daddr 203.0.113.1 udp dport 30002 "
            "ip hdrlength 5 ip frag-off & 0x3fff == 0 udp checksum != 0 ip length <= 1500 "
            "ip saddr set 192.168.77.1 "
            "ip daddr set 192.168.77.10 udp sport set 30000 udp dport set 10000 "
            'counter name "o1_ba" fwd ip to 192.168.77.10 device "lan0"', script)
        # the routes from the relay's address on each side (policy routing: as its sockets)
        routes = next(t for a, t in fake.commands if a[:3] == ["ip", "-j", "-batch"])
        self.assertEqual(routes, "route get 192.168.77.10 from 192.168.77.1\n"
                                 "route get 198.51.100.7 from 203.0.113.1\nlink show\n")
        # one transaction
        self.assertEqual(len(fake.ran("--echo")), 1)
        self.assertEqual(offload.rules, [("in_lan0", 4), ("in_wan0", 6)])
        self.assertEqual(len(fake.rules), 2)
        fake.counters["o1_ab"] = (5, 500)
        self.assertEqual(self.successResultOf(k.counters())["o1_ab"], (5, 500))
        final = self.successResultOf(k.remove(offload))
        self.assertEqual(final["o1_ab"], (5, 500))
        self.assertEqual(fake.rules, {})
        self.assertEqual(fake.counters, {})
        # both rules go in one transaction (the counters after: their last values first)
        removal = [t for a, t in fake.commands if a == ["nft", "-f", "-"] and "delete rule" in t]
        self.assertEqual(len(removal), 1)
        self.assertEqual(removal[0].count("delete rule"), 2)

    def test_packets_longer_than_the_mtu_toward_their_destination_stay_in_userspace(
            self) -> None:
        """``fwd`` does not fragment: each rule takes packets no longer than the MTU of the
        device toward its destination, or of the route where that is smaller (the relay's
        socket fragments the rest)."""
        fake, k = self.started()
        fake.links["wan0"] = 1492  # PPPoE
        a = (("192.168.77.10", 10000), ("192.168.77.1", 30000))
        b = (("198.51.100.7", 12000), ("203.0.113.1", 30002))
        offload = self.successResultOf(k.install(a, b))
        to_b, to_a = k.rules(offload).splitlines()[-3], k.rules(offload).splitlines()[-1]
        self.assertIn('ip length <= 1492 ip saddr set 203.0.113.1 ip daddr set 198.51.100.7', to_b)
        self.assertIn('ip length <= 1500 ip saddr set 192.168.77.1 ip daddr set 192.168.77.10',
                      to_a)
        fake.routes["198.51.100.7"] = {**WAN_ROUTE, "metrics": [{"mtu": 1400}]}
        offload = self.successResultOf(k.install(a, b))
        self.assertIn("ip length <= 1400 ip saddr set 203.0.113.1", k.rules(offload))
        # a device ip does not list: no rule
        fake.links.pop("wan0")
        fake.routes["198.51.100.7"] = WAN_ROUTE
        failure = self.failureResultOf(k.install(a, b), Unsuitable)
        self.assertIn("no MTU for the device wan0", failure.getErrorMessage())

    def test_a_removal_first_goes_ahead_of_what_waits(self) -> None:
        # a re-INVITE moved an endpoint: its old rules must go now, not after every install,
        # removal and poll queued before (each packet they still forward is lost)
        fake, k = self.started()
        a = (("192.168.77.10", 10000), ("192.168.77.1", 30000))
        b = (("198.51.100.7", 12000), ("203.0.113.1", 30002))
        moved = self.successResultOf(k.install(a, b))
        ended = self.successResultOf(k.install(a, b))
        gate: defer.Deferred[None] = defer.Deferred()
        real = k.runner
        k.runner = lambda argv, stdin: gate.addCallback(lambda _: real(argv, stdin))
        busy = k.counters()  # under way: holds the lock
        k.runner = real
        waiting = [k.install(a, b), k.remove(ended), k.counters()]
        first = k.remove(moved, first=True)
        gate.callback(None)
        for d in (busy, first, *waiting):
            self.successResultOf(d)
        echoes_and_deletes = [t for args, t in fake.commands
                              if "--echo" in args or "delete rule" in t][2:]
        self.assertIn(f"handle {moved.rules[0][1]}", echoes_and_deletes[0])
        self.assertIn("add rule", echoes_and_deletes[1])  # then the rest, in their order
        self.assertIn(f"handle {ended.rules[0][1]}", echoes_and_deletes[2])

    def test_a_flushed_table_is_made_again(self) -> None:
        # a firewall reload (``flush ruleset``) takes the relay's table: the next counter read
        # or install makes it again; the old offloads' handles never delete a new rule
        fake, k = self.started()
        a = (("192.168.77.10", 10000), ("192.168.77.1", 30000))
        b = (("198.51.100.7", 12000), ("203.0.113.1", 30002))
        old = self.successResultOf(k.install(a, b))
        fake.table_gone = True
        fake.rules.clear()
        fake.counters.clear()
        self.assertEqual(self.successResultOf(k.counters()), {})
        self.assertFalse(fake.table_gone)  # made again
        self.assertEqual(k.offloads, {})
        new = self.successResultOf(k.install(a, b))
        self.assertEqual(len(fake.rules), 2)
        self.assertEqual(self.successResultOf(k.remove(old)), {})
        self.assertEqual(len(fake.rules), 2)  # the old handles deleted nothing
        self.successResultOf(k.remove(new))
        self.assertEqual(fake.rules, {})
        # the same when an install is the first to find the table gone
        fake.table_gone = True
        self.successResultOf(k.install(a, b))
        self.assertEqual(len(fake.rules), 2)
        # a failure with the table there is not that
        fake.fail.add("echo")
        self.failureResultOf(k.install(a, b), KernelError)

    def test_local_parties_are_unsuitable(self) -> None:
        fake, k = self.started()
        fake.routes["127.0.0.1"] = {"type": "local", "dst": "127.0.0.1", "dev": "lo"}
        fake.routes["192.168.77.1"] = {"type": "local", "dst": "192.168.77.1", "dev": "lo"}
        fake.routes["10.1.1.1"] = {"dst": "10.1.1.1", "dev": "weird@dev"}
        fake.routes["10.2.2.2"] = {}  # no route at all
        for local in ("127.0.0.1", "192.168.77.1", "10.1.1.1", "10.2.2.2"):
            failure = self.failureResultOf(k.install(((local, 1), ("192.168.77.1", 2)),
                                                     (("198.51.100.7", 3), ("203.0.113.1", 4))),
                                           Unsuitable)
            self.assertIn(local, failure.getErrorMessage())
        self.assertEqual(fake.ran("--echo"), [])

    def test_install_before_start_fails(self) -> None:
        k = KernelForwarder(FakeNft(), TABLE)
        self.failureResultOf(k.install((("1.1.1.1", 1), ("2.2.2.2", 2)),
                                       (("3.3.3.3", 3), ("4.4.4.4", 4))), KernelError)

    def test_parse_counters(self) -> None:
        self.assertEqual(parse_counters(FakeNft.json({"x": (1, 2)}).decode()), {"x": (1, 2)})
        self.assertRaises(KernelError, parse_counters, "nope")


class EngineTests(unittest.TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = RelayEngine(reactor, self.clock,
                                  [RelayInterface("inside", LOCAL),
                                   RelayInterface("outside", LOCAL)],
                                  PORT_MIN, PORT_MAX, timeout=60, silent_timeout=600,
                                  offer_timeout=300, kernel_poll=2.0)
        self.fake = FakeNft()
        self.kernel = KernelForwarder(self.fake, TABLE)
        self.successResultOf(self.kernel.start())
        self.engine.use_kernel(self.kernel)
        self.ended: list[tuple[str, str]] = []
        self.engine.timeout_observers.append(lambda c, r: self.ended.append((c, r)))
        self.addCleanup(lambda: defer.gatherResults(self.engine.stop()))

    def phone(self) -> tuple[Phone, int]:
        p = Phone()
        port = reactor.listenUDP(0, p, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return p, port.getHost().port

    def call(self, a_port: int, b_port: int, options: SignalOptions | None = None
             ) -> tuple[int, int]:
        opts = options or SignalOptions(direction=("inside", "outside"))
        offer = self.engine.offer("c1", "A", parse_sdp(sdp(a_port)), opts)
        answer = self.engine.answer("c1", "A", "B", parse_sdp(sdp(b_port)), opts)
        return answer.media[0].port, offer.media[0].port

    @defer.inlineCallbacks
    def latched(self) -> Any:
        """A call whose RTP both ways crossed the relay once: (a, b, to_a_port, to_b_port)."""
        a, a_port = self.phone()
        b, b_port = self.phone()
        to_relay_a, to_relay_b = self.call(a_port, b_port)
        a.send(rtp(1), to_relay_a)
        data, _ = yield b.received.get()
        self.assertEqual(data, rtp(1))
        self.assertEqual(self.fake.rules, {})  # one end latched: nothing for the kernel yet
        b.send(rtp(2), to_relay_b)
        data, _ = yield a.received.get()
        self.assertEqual(data, rtp(2))
        return a, b, a_port, b_port, to_relay_a, to_relay_b

    def count(self, name: str, packets: int, octets: int) -> None:
        """The kernel forwarded ``packets``."""
        self.fake.counters[name] = (packets, octets)

    def streams(self) -> tuple[Any, Any]:
        call = self.engine.calls["c1"]
        return (call.monologues["A"].medias[0].rtp, call.monologues["B"].medias[0].rtp)

    @defer.inlineCallbacks
    def test_both_ends_latched_goes_to_the_kernel(self) -> Any:
        _a, _b, a_port, b_port, to_a, to_b = yield self.latched()
        rules = "\n".join(self.fake.rules.values())
        self.assertIn(f"ip saddr {LOCAL} udp sport {a_port} ip daddr {LOCAL} udp dport {to_a} ",
                      rules)
        self.assertIn(f"udp dport {to_a} ip hdrlength 5 ip frag-off & 0x3fff == 0 "
                      f"udp checksum != 0 ip length <= 1500 ip saddr set {LOCAL} "
                      f"ip daddr set {LOCAL} udp sport set {to_b} udp dport set {b_port} "
                      f"counter name ", rules)
        self.assertIn(f"udp dport {to_b} ip hdrlength 5 ip frag-off & 0x3fff == 0 "
                      f"udp checksum != 0 ip length <= 1500 ip saddr set {LOCAL} "
                      f"ip daddr set {LOCAL} udp sport set {to_a} udp dport set {a_port} "
                      f"counter name ", rules)
        self.assertEqual(rules.count('fwd ip to 10.0.0.254 device "eth9"'), 2)
        sa, sb = self.streams()
        self.assertTrue(sa.offload.active)
        self.assertIs(sa.offload, sb.offload)
        self.assertIn("kernel", sa.describe()["flags"])
        # RTCP never crossed: its pair stays in userspace
        self.assertEqual(len(self.kernel.offloads), 1)

    @defer.inlineCallbacks
    def test_rtcp_pairs_go_to_the_kernel_too(self) -> Any:
        _a, _b, _ap, _bp, to_a, to_b = yield self.latched()
        ra, _ = self.phone()
        rb, _ = self.phone()
        report = b"\x80\xc8\x00\x06" + bytes(24)  # an RTCP sender report
        ra.send(report, to_a + 1)
        rb.send(report, to_b + 1)
        call = self.engine.calls["c1"]
        rtcp = call.monologues["A"].medias[0].rtcp
        for _ in range(100):
            if rtcp.offload is not None:
                break
            yield deferLater(0.01)
        self.assertTrue(rtcp.offload is not None and rtcp.offload.active)
        self.assertEqual(len(self.kernel.offloads), 2)
        rules = "\n".join(self.fake.rules.values())
        self.assertIn(f"udp dport {to_a + 1} ", rules)
        self.assertIn(f"udp sport set {to_a + 1} ", rules)
        self.assertIn(f"udp dport {to_b + 1} ", rules)

    @defer.inlineCallbacks
    def test_streams_latched_before_the_kernel_started_are_handed_over(self) -> Any:
        self.engine.use_kernel(None)
        yield self.latched()
        self.assertEqual(self.fake.rules, {})
        self.engine.use_kernel(self.kernel)
        self.assertEqual(len(self.fake.rules), 2)
        sa, _ = self.streams()
        self.assertTrue(sa.offload.active)

    @defer.inlineCallbacks
    def test_counters_join_the_statistics_and_keep_the_call_alive(self) -> Any:
        yield self.latched()
        sa, _sb = self.streams()
        for second in range(0, 120, 2):
            self.count("o1_ab", second * 50, second * 50 * 200)
            self.count("o1_ba", second * 50, second * 50 * 200)
            self.clock.advance(2)
        self.assertEqual(self.ended, [])  # 2 minutes of kernel-only media, no timeout
        stats = self.engine.query("c1")
        packets = 118 * 50 + 1  # the kernel's plus the one userspace saw
        self.assertEqual(stats["totals"]["RTP"]["packets"], 2 * packets)
        self.assertEqual(sa.kernel_bytes, 118 * 50 * (200 - 28))
        self.assertEqual(sa.describe()["userspace stats"]["packets"], 1)
        # the kernel goes quiet: the silence timeout ends the call, and the rules go
        self.clock.advance(61)
        self.assertEqual(self.ended, [("c1", "timeout")])
        self.assertEqual(self.fake.rules, {})

    @defer.inlineCallbacks
    def test_delete_removes_the_rules_and_counts_the_last_packets(self) -> Any:
        yield self.latched()
        self.fake.counters["o1_ab"] = (7, 7 * 128)
        stats = self.engine.delete("c1")
        self.assertEqual(self.fake.rules, {})
        self.assertEqual(self.fake.counters, {})
        self.assertEqual(stats["totals"]["RTP"]["packets"], 2)  # taken before the final read
        self.assertEqual(self.kernel.offloads, {})

    @defer.inlineCallbacks
    def test_userspace_forwards_what_reached_it_after_the_kernel_took_over(self) -> Any:
        # packets that reached the socket before the rules (or do not match them) are
        # forwarded, not dropped: the handover loses nothing
        a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        sa, _ = self.streams()
        self.assertTrue(sa.offload.active)
        a.send(rtp(3), to_a)
        a.send(rtp(4), to_a)
        self.assertEqual((yield b.received.get())[0], rtp(3))
        self.assertEqual((yield b.received.get())[0], rtp(4))
        self.assertTrue(sa.offload.active)  # the latched source: the rules stay

    @defer.inlineCallbacks
    def test_rules_that_catch_nothing_go(self) -> Any:
        # the kernel counts nothing while userspace keeps getting the latched source's packets
        # (they arrive on another device, or carry no UDP checksum): the rules are useless
        a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        sa, sb = self.streams()
        for n in range(60):
            a.send(rtp(10 + n), to_a)
            yield b.received.get()
        self.assertEqual(len(self.fake.rules), 2)
        self.clock.advance(2)
        self.assertEqual(self.fake.rules, {})
        self.assertTrue(sa.no_kernel and sb.no_kernel)

    @defer.inlineCallbacks
    def test_a_strangers_packets_do_not_count_as_missed_by_the_rules(self) -> Any:
        # A is silent (its rule has counted nothing yet) while a stranger sends 60 packets to
        # A's relay port: they never could meet the rules, which stay
        _a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        stranger, _ = self.phone()
        for n in range(60):
            stranger.send(rtp(100 + n), to_a)
            yield b.received.get()
        self.clock.advance(2)
        self.assertEqual(len(self.fake.rules), 2)
        sa, _sb = self.streams()
        self.assertTrue(sa.offload.active)
        self.assertEqual(sa.foreign, 60)

    @defer.inlineCallbacks
    def test_streams_whose_table_was_flushed_go_back_to_the_kernel(self) -> Any:
        a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        old, _ = self.streams()
        old_offload = old.offload
        self.fake.table_gone = True  # a firewall reload: ``flush ruleset``
        self.fake.rules.clear()
        self.fake.counters.clear()
        a.send(rtp(3), to_a)  # userspace meanwhile
        self.assertEqual((yield b.received.get())[0], rtp(3))
        self.clock.advance(2)  # the counter read finds the table gone, makes it again
        self.assertFalse(self.fake.table_gone)
        self.assertEqual(len(self.fake.rules), 2)
        sa, sb = self.streams()
        self.assertIsNot(sa.offload, old_offload)
        self.assertTrue(sa.offload.active and sa.offload is sb.offload)
        self.assertEqual(len(self.engine.offloads()), 1)

    @defer.inlineCallbacks
    def test_a_local_party_stays_in_userspace_with_one_line(self) -> Any:
        self.fake.routes[LOCAL] = {"type": "local", "dst": LOCAL, "dev": "lo"}
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        sa, sb = self.streams()
        self.assertIsNone(sa.offload)
        self.assertTrue(sa.no_kernel and sb.no_kernel)  # not tried again for these streams
        self.assertEqual(self.fake.rules, {})
        a.send(rtp(3), to_a)
        self.assertEqual((yield b.received.get())[0], rtp(3))
        texts = [e.get("text", "") for e in logged if e.get("log_namespace", "").startswith(
            "sipproxy.media")]
        lines = [t for t in texts if "kernel fast path" in t]
        self.assertEqual(len(lines), 1, texts)
        self.assertIn("stays in userspace", lines[0])
        self.assertIn("local", lines[0])
        self.assertNotIn("firewall", " ".join(texts))
        # a second call: no second line
        self.engine.delete("c1")
        yield self.latched()
        self.assertEqual(len([e for e in logged if "kernel fast path" in e.get("text", "")]),
                         1)

    @defer.inlineCallbacks
    def test_reinvite_with_new_endpoints_falls_back_then_relatches(self) -> Any:
        a, b, _ap, b_port, to_a, _to_b = yield self.latched()
        c, c_port = self.phone()
        opts = SignalOptions(direction=("inside", "outside"))
        self.engine.offer("c1", "A", parse_sdp(sdp(c_port)), opts)  # A moves to c_port
        self.assertEqual(self.fake.rules, {})
        sa, _sb = self.streams()
        self.assertIsNone(sa.offload)
        self.engine.answer("c1", "A", "B", parse_sdp(sdp(b_port)), opts)
        c.send(rtp(5), to_a)  # userspace again, to B
        data, _ = yield b.received.get()
        self.assertEqual(data, rtp(5))
        self.assertIsNotNone(sa.offload)  # both latched again: back in the kernel
        self.assertIn(f"udp dport set {c_port}", "\n".join(self.fake.rules.values()))
        del a

    @defer.inlineCallbacks
    def test_a_foreign_source_neither_hijacks_nor_withdraws_the_kernel_path(self) -> Any:
        # the rules match the latched source only, so a foreign packet reaches userspace,
        # which treats it as without the kernel path; the latched stream stays in the kernel
        a, b, a_port, _bp, to_a, to_b = yield self.latched()
        other, _ = self.phone()
        other.send(rtp(9), to_a)
        data, _ = yield b.received.get()  # userspace forwards it (no strict source)
        self.assertEqual(data, rtp(9))
        sa, sb = self.streams()
        self.assertEqual(len(self.fake.rules), 2)
        self.assertTrue(sa.offload.active)
        self.assertFalse(sa.no_kernel or sb.no_kernel)
        self.assertEqual(sa.learned, (LOCAL, a_port))  # not hijacked
        b.send(rtp(10), to_b)  # B's packets still go to A, not to the stranger
        self.assertEqual((yield a.received.get())[0], rtp(10))
        self.assertTrue(other.received.pending == [])

    @defer.inlineCallbacks
    def test_install_failure_stays_in_userspace(self) -> Any:
        self.fake.fail.add("echo")
        a, b, _ap, _bp, to_a, _to_b = yield self.latched()
        sa, _ = self.streams()
        self.assertIsNone(sa.offload)
        self.assertTrue(sa.no_kernel)
        a.send(rtp(3), to_a)
        data, _ = yield b.received.get()
        self.assertEqual(data, rtp(3))

    @defer.inlineCallbacks
    def test_counter_poll_failures_are_survived(self) -> Any:
        yield self.latched()
        self.fake.fail.add("counters")
        self.clock.advance(2)
        self.clock.advance(2)
        self.fake.fail.discard("counters")
        self.count("o1_ab", 3, 300)
        self.clock.advance(2)
        sa, sb = self.streams()
        self.assertEqual(sa.kernel_packets + sb.kernel_packets, 3)

    @defer.inlineCallbacks
    def test_rtcp_mux_mismatch_stays_in_userspace(self) -> Any:
        a, a_port = self.phone()
        b, b_port = self.phone()
        opts = SignalOptions(direction=("inside", "outside"))
        offer = self.engine.offer("c1", "A", parse_sdp(sdp(a_port, extra="a=rtcp-mux\r\n")),
                                  SignalOptions(direction=("inside", "outside"),
                                                rtcp_mux=frozenset({"demux"})))
        answer = self.engine.answer("c1", "A", "B", parse_sdp(sdp(b_port)), opts)
        a.send(rtp(1), answer.media[0].port)
        yield b.received.get()
        b.send(rtp(2), offer.media[0].port)
        yield a.received.get()
        self.assertEqual(self.fake.rules, {})


def phone(case: unittest.TestCase) -> tuple[Phone, int]:
    p = Phone()
    port = reactor.listenUDP(0, p, interface=LOCAL)
    case.addCleanup(port.stopListening)
    return p, port.getHost().port


def deferLater(seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@dataclass(eq=False)
class FakeRules:
    """The rules a FakeOffloader "installed": what OffloadRules asks for, and the pair."""

    a: tuple[tuple[str, int], tuple[str, int]]
    b: tuple[tuple[str, int], tuple[str, int]]
    counters: tuple[str, str] = ("ab", "ba")
    seen: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0), (0, 0)])


class FakeOffloader:
    """A KernelOffloader without nftables: records installs and removals, counts what the
    test says; the engine's bookkeeping needs nothing more of a fast path."""

    def __init__(self) -> None:
        self.lost: Callable[[list[FakeRules]], None] | None = None
        self.installed: list[FakeRules] = []
        self.removed: list[FakeRules] = []
        self.counted: dict[str, tuple[int, int]] = {}

    def install(self, a: tuple[tuple[str, int], tuple[str, int]],
                b: tuple[tuple[str, int], tuple[str, int]]) -> defer.Deferred[FakeRules]:
        rules = FakeRules(a, b)
        self.installed.append(rules)
        return defer.succeed(rules)

    def remove(self, rules: FakeRules, *, first: bool = False) -> defer.Deferred[
            dict[str, tuple[int, int]]]:
        self.removed.append(rules)
        return defer.succeed(dict(self.counted))

    def counters(self) -> defer.Deferred[dict[str, tuple[int, int]]]:
        return defer.succeed(dict(self.counted))


class OffloaderProtocolTests(unittest.TestCase):
    """The engine against any KernelOffloader (offload.py), here a fake one."""

    timeout = 10

    @defer.inlineCallbacks
    def test_a_latched_pair_is_offloaded_counted_and_removed(self) -> Any:
        clock = Clock()
        engine = RelayEngine(reactor, clock, [RelayInterface("default", LOCAL)], PORT_MIN,
                             PORT_MAX, kernel_poll=2.0)
        self.addCleanup(lambda: defer.gatherResults(engine.stop()))
        fake = FakeOffloader()
        offloader: KernelOffloader[FakeRules] = fake
        engine.use_kernel(offloader)
        (a, a_port), (b, b_port) = phone(self), phone(self)
        offer = engine.offer("c1", "A", parse_sdp(sdp(a_port)), SignalOptions())
        answer = engine.answer("c1", "A", "B", parse_sdp(sdp(b_port)), SignalOptions())
        a.send(rtp(1), answer.media[0].port)
        yield b.received.get()
        b.send(rtp(2), offer.media[0].port)
        yield a.received.get()
        [rules] = fake.installed
        # each party's latched source and the relay port it sends to
        self.assertEqual({rules.a, rules.b}, {((LOCAL, a_port), (LOCAL, answer.media[0].port)),
                                              ((LOCAL, b_port), (LOCAL, offer.media[0].port))})
        fake.counted = {"ab": (10, 10 * (28 + 17)), "ba": (0, 0)}
        clock.advance(2.0)
        stats = engine.query("c1")["totals"]["RTP"]
        self.assertEqual((stats["packets"], stats["bytes"]), (2 + 10, 17 * 2 + 10 * 17))
        engine.delete("c1")
        self.assertEqual(fake.removed, [rules])


class ServiceTests(unittest.TestCase):
    def config(self, kernel: str) -> RelaySettings:
        return RelaySettings(interfaces=(RelayInterface("default", LOCAL),), port_min=PORT_MIN,
                           port_max=PORT_MAX, kernel=kernel, kernel_table=TABLE)

    @defer.inlineCallbacks
    def test_auto_uses_the_kernel_and_stopping_deletes_the_table(self) -> Any:
        fake = FakeNft()
        service = makeRelayService(self.config("auto"), reactor, Clock(), kernel_runner=fake)
        service.startService()
        self.assertIs(service.engine.kernel, service.kernel)
        yield service.stopService()
        self.assertIsNone(service.engine.kernel)
        self.assertEqual(fake.ran("delete", "table", TABLE)[-1],
                         ["nft", "delete", "table", "netdev", TABLE])

    @defer.inlineCallbacks
    def test_stopping_with_calls_up_deletes_the_table_at_once(self) -> Any:
        # rule by rule, thousands of calls meant thousands of nft runs before the table went
        # (a supervisor's kill in between left rules behind)
        fake = FakeNft()
        service = makeRelayService(self.config("auto"), reactor, Clock(), kernel_runner=fake)
        service.startService()
        for n in range(3):
            (a, a_port), (b, b_port) = phone(self), phone(self)
            offer = service.engine.offer(f"c{n}", "A", parse_sdp(sdp(a_port)), SignalOptions())
            answer = service.engine.answer(f"c{n}", "A", "B", parse_sdp(sdp(b_port)),
                                           SignalOptions())
            a.send(rtp(1), answer.media[0].port)
            yield b.received.get()
            b.send(rtp(2), offer.media[0].port)
            yield a.received.get()
        self.assertEqual(len(fake.rules), 6)
        yield service.stopService()
        self.assertEqual([t for _, t in fake.commands if "delete rule" in t], [])
        self.assertEqual(fake.ran("delete", "table", TABLE),
                         [["nft", "delete", "table", "netdev", TABLE]])

    def test_what_is_queued_when_stopping_is_skipped(self) -> None:
        fake = FakeNft()
        k = KernelForwarder(fake, TABLE)
        self.successResultOf(k.start())
        gate: defer.Deferred[None] = defer.Deferred()
        real = k.runner

        def held(argv: Sequence[str], stdin: bytes | None) -> defer.Deferred[
                tuple[bytes, bytes, int]]:
            return gate.addCallback(lambda _: None).addCallback(lambda _: real(argv, stdin))

        installed = self.successResultOf(k.install((("192.0.2.1", 1), ("192.0.2.9", 2)),
                                                   (("198.51.100.7", 3), ("203.0.113.1", 4))))
        k.runner = held
        queued = [k.remove(installed), k.install((("192.0.2.2", 1), ("192.0.2.9", 6)),
                                                 (("198.51.100.8", 3), ("203.0.113.1", 8)))]
        stopped = k.stop()
        k.runner = real
        gate.callback(None)  # the removal that was under way when stop() came finishes
        self.successResultOf(stopped)
        self.successResultOf(queued[0])
        self.failureResultOf(queued[1], KernelError)
        self.assertEqual(len(fake.ran("--echo")), 1)  # only the first install
        self.assertEqual(fake.ran("delete", "table", TABLE)[-1],
                         ["nft", "delete", "table", "netdev", TABLE])

    @defer.inlineCallbacks
    def test_auto_without_nft_is_userspace(self) -> Any:
        fake = FakeNft()
        fake.fail.add("start")
        service = makeRelayService(self.config("auto"), reactor, Clock(), kernel_runner=fake)
        service.startService()
        self.assertIsNone(service.engine.kernel)
        yield service.stopService()
        self.assertEqual(fake.ran("delete", "table"), [])

    def test_off_runs_nothing(self) -> None:
        fake = FakeNft()
        service = makeRelayService(self.config("off"), reactor, Clock(), kernel_runner=fake)
        service.startService()
        self.assertIsNone(service.kernel)
        self.assertEqual(fake.commands, [])
        self.successResultOf(service.stopService())

    def test_bad_value(self) -> None:
        self.assertRaises(ValueError, makeRelayService, self.config("maybe"), reactor)


class OptionTests(unittest.SynchronousTestCase):
    def parse(self, *args: str) -> Any:
        options = tap.Options()
        options.parseOptions(list(args))
        return tap.relay_config(options)

    def test_kernel_options(self) -> None:
        self.assertEqual(self.parse().kernel, "auto")
        config = self.parse("--kernel", "off", "--kernel-table", "mine")
        self.assertEqual((config.kernel, config.kernel_table), ("off", "mine"))
        with self.assertRaises(ConfigError) as e:
            self.parse("--kernel", "yes")
        self.assertIn("--kernel", str(e.exception))
        with self.assertRaises(ConfigError):
            self.parse("--kernel-table", "a-b")
        self.assertRaises(usage.UsageError, self.parse, "--kernel")
