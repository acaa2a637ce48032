"""sipproxy.dns: RFC 3263 resolution against a real twisted.names DNS server on 127.0.0.1."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.names import authority, client, common, dns, error, server
from twisted.trial import unittest

from sipproxy.dns import SipResolver, Target
from sipproxy.uri import parse_uri

reactor: Any = _reactor
ZONE = "example.test"


def _zone() -> list[tuple[str, Any]]:
    """The test zone. Addresses are documentation ranges: these tests resolve, never send."""

    def naptr(order: int, pref: int, service: str, replacement: str, flags: str = "s") -> Any:
        return dns.Record_NAPTR(order, pref, flags.encode(), service.encode(), b"",
                                replacement.encode(), ttl=60)

    def srv(priority: int, weight: int, port: int, target: str) -> Any:
        return dns.Record_SRV(priority, weight, port, target.encode(), ttl=60)

    z = ZONE
    return [
        (z, dns.Record_SOA(mname=f"ns.{z}", rname=f"admin.{z}", serial=1, refresh=60,
                           retry=60, expire=60, minimum=60)),
        # hosts
        (f"h1.{z}", dns.Record_A("192.0.2.1", ttl=60)),
        (f"h1.{z}", dns.Record_AAAA("2001:db8::1", ttl=60)),
        (f"h2.{z}", dns.Record_A("192.0.2.2", ttl=60)),
        (f"h3.{z}", dns.Record_A("192.0.2.3", ttl=60)),
        (f"h4.{z}", dns.Record_A("192.0.2.4", ttl=60)),
        (f"h5.{z}", dns.Record_A("192.0.2.5", ttl=60)),
        (f"h5.{z}", dns.Record_A("192.0.2.55", ttl=60)),
        (f"h6.{z}", dns.Record_AAAA("2001:db8::6", ttl=60)),
        # naptr.example.test: all three services, listed out of order on purpose; also a
        # non-terminal NAPTR and an unknown service, both to be ignored
        (f"naptr.{z}", naptr(20, 10, "SIP+D2U", f"_sip._udp.naptr.{z}")),
        (f"naptr.{z}", naptr(10, 20, "SIP+D2T", f"_sip._tcp.naptr.{z}")),
        (f"naptr.{z}", naptr(10, 10, "SIPS+D2T", f"_sips._tcp.naptr.{z}")),
        (f"naptr.{z}", naptr(5, 10, "SIP+D2T", f"elsewhere.{z}", flags="a")),
        (f"naptr.{z}", naptr(5, 10, "E2U+sip", f"_sip._udp.naptr.{z}")),
        (f"naptr.{z}", dns.Record_A("192.0.2.99", ttl=60)),
        (f"_sip._udp.naptr.{z}", srv(10, 0, 5060, f"h2.{z}")),
        (f"_sip._tcp.naptr.{z}", srv(10, 0, 5070, f"h1.{z}")),
        (f"_sips._tcp.naptr.{z}", srv(10, 0, 5061, f"h3.{z}")),
        # SRV present for a transport nobody asked about via NAPTR: must not show up
        (f"_sip._sctp.naptr.{z}", srv(10, 0, 5060, f"h4.{z}")),
        # srv.example.test: no NAPTR; UDP SRV with priorities and weights, TCP SRV
        (f"srv.{z}", dns.Record_A("192.0.2.98", ttl=60)),
        (f"_sip._udp.srv.{z}", srv(20, 0, 5080, f"h3.{z}")),
        (f"_sip._udp.srv.{z}", srv(10, 60, 5060, f"h1.{z}")),
        (f"_sip._udp.srv.{z}", srv(10, 40, 5062, f"h2.{z}")),
        (f"_sip._udp.srv.{z}", srv(10, 0, 5064, f"h5.{z}")),
        (f"_sip._tcp.srv.{z}", srv(10, 0, 5090, f"h4.{z}")),
        # plain.example.test: addresses only (NAPTR: NODATA, SRV: NXDOMAIN)
        (f"plain.{z}", dns.Record_A("192.0.2.10", ttl=60)),
        (f"plain.{z}", dns.Record_AAAA("2001:db8::10", ttl=60)),
        # broken.example.test: NAPTR points at SRV names that do not exist -> SRV fallback
        (f"broken.{z}", naptr(10, 10, "SIP+D2U", f"_sip._udp.nowhere.{z}")),
        (f"_sip._tcp.broken.{z}", srv(10, 0, 5066, f"h4.{z}")),
        # dot.example.test: SRV says "no service here" -> no A fallback
        (f"dot.{z}", dns.Record_A("192.0.2.97", ttl=60)),
        (f"_sip._udp.dot.{z}", srv(0, 0, 0, ".")),
        # dangling.example.test: SRV target without addresses, second target fine
        (f"_sip._udp.dangling.{z}", srv(10, 0, 5060, f"nohost.{z}")),
        (f"_sip._udp.dangling.{z}", srv(20, 0, 5060, f"h6.{z}")),
        # alias.example.test: CNAME to h2
        (f"alias.{z}", dns.Record_CNAME(f"h2.{z}", ttl=60)),
    ]


class MemoryAuthority(authority.FileAuthority):
    """An authoritative zone from a list of (name, record) instead of a file."""

    def __init__(self, records: list[tuple[str, Any]]) -> None:
        self._records = records
        super().__init__("memory")

    def loadFile(self, filename: str) -> None:
        records: dict[bytes, list[Any]] = {}
        for name, record in self._records:
            key = dns.domainString(name).lower()
            if isinstance(record, dns.Record_SOA):
                self.soa = (key, record)  # type: ignore[assignment]
            records.setdefault(key, []).append(record)
        self.records = records  # type: ignore[assignment]


class ScriptedRandom(random.Random):
    """randint answers from a script, and records the ranges it was asked for."""

    def __init__(self, picks: list[int]) -> None:
        super().__init__(0)
        self.picks = list(picks)
        self.asked: list[tuple[int, int]] = []

    def randint(self, a: int, b: int) -> int:
        self.asked.append((a, b))
        value = self.picks.pop(0)
        assert a <= value <= b, (a, value, b)
        return value


def udp(host: str, port: int = 5060, name: str = "") -> Target:
    return Target("UDP", host, port, name)


class RealServerMixin:
    """A twisted.names authoritative server on 127.0.0.1:<random> and a client pointing at it."""

    def start_server(self: Any) -> None:
        factory = server.DNSServerFactory(authorities=[MemoryAuthority(_zone())], verbose=0)
        protocol = dns.DNSDatagramProtocol(controller=factory)
        self.port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = client.Resolver(
            servers=[("127.0.0.1", self.port.getHost().port)], reactor=reactor
        )

    def sip(self: Any, **kw: Any) -> SipResolver:
        return SipResolver(self.client, reactor, **kw)


class NoLookupTests(unittest.TestCase):
    """Cases RFC 3263 settles without DNS: a resolver that fails every lookup proves it."""

    def setUp(self) -> None:
        self.resolver = SipResolver(FakeResolver({}), Clock())

    def resolved(self, *args: Any) -> list[Target]:
        result: list[Target] = self.successResultOf(self.resolver.resolve(*args))
        # the proxy's shortcut for these cases (no Deferred) must answer the same
        self.assertEqual(self.resolver.resolve_now(*args), result)
        return result

    def test_a_name_is_not_resolved_now(self) -> None:
        """A name needs a lookup: ``resolve_now`` leaves it to ``resolve``."""
        self.assertIsNone(self.resolver.resolve_now("h1.example.test", None, None, False))
        self.assertIsNone(self.resolver.resolve_now("h1.example.test", 5060, "udp", False))

    def test_ipv4_literal_defaults(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, None, False),
                         [Target("UDP", "192.0.2.7", 5060, "192.0.2.7")])

    def test_ipv4_literal_sips_is_tls_5061(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, None, True),
                         [Target("TLS", "192.0.2.7", 5061, "192.0.2.7")])

    def test_ipv6_literal_with_brackets_port_and_transport(self) -> None:
        self.assertEqual(self.resolved("[2001:db8::7]", 5070, "tcp", False),
                         [Target("TCP", "2001:db8::7", 5070, "2001:db8::7")])

    def test_sips_transport_tcp_means_tls(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, "tcp", True),
                         [Target("TLS", "192.0.2.7", 5061, "192.0.2.7")])

    def test_transport_tls_on_sip_uri(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, "TLS", False),
                         [Target("TLS", "192.0.2.7", 5061, "192.0.2.7")])

    def test_sips_over_udp_is_unusable(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, "udp", True), [])

    def test_unsupported_transport(self) -> None:
        self.assertEqual(self.resolved("192.0.2.7", None, "sctp", False), [])
        only_tcp = SipResolver(FakeResolver({}), Clock(), supported=("TCP",))
        self.assertEqual(self.successResultOf(only_tcp.resolve("192.0.2.7", None, "udp", False)),
                         [])
        # without a transport parameter, the default moves to a supported transport
        self.assertEqual(self.successResultOf(only_tcp.resolve("192.0.2.7", None, None, False)),
                         [Target("TCP", "192.0.2.7", 5060, "192.0.2.7")])

    def test_sips_without_tls_support(self) -> None:
        no_tls = SipResolver(FakeResolver({}), Clock(), supported=("UDP", "TCP"))
        self.assertEqual(self.successResultOf(no_tls.resolve("192.0.2.7", None, None, True)), [])

    def test_uri_target_maddr_overrides_host(self) -> None:
        uri = parse_uri("sip:alice@proxy.example.test;maddr=192.0.2.8;transport=tcp")
        # the server must still prove the URI's host (RFC 5922 section 4), not the maddr
        self.assertEqual(self.successResultOf(self.resolver.uri_target(uri)),
                         [Target("TCP", "192.0.2.8", 5060, "proxy.example.test")])
        self.assertEqual(
            self.successResultOf(self.resolver.resolve("192.0.2.8", 5061, None, True,
                                                       server_name="provider.test")),
            [Target("TLS", "192.0.2.8", 5061, "provider.test")])

    def test_uri_target_sips_and_port(self) -> None:
        uri = parse_uri("sips:bob@[2001:db8::9]:5071")
        self.assertEqual(self.successResultOf(self.resolver.uri_target(uri)),
                         [Target("TLS", "2001:db8::9", 5071, "2001:db8::9")])

    def test_uri_target_rejects_non_sip(self) -> None:
        self.failureResultOf(self.resolver.uri_target(parse_uri("tel:+15551234")), ValueError)

    def test_default_resolver_is_built_lazily(self) -> None:
        # no DNS needed: no resolv.conf re-read timer, no lookup, a synchronous answer
        clock = Clock()
        d = SipResolver(reactor=clock).resolve("192.0.2.7", 5080, None, False)
        self.assertEqual(self.successResultOf(d), [Target("UDP", "192.0.2.7", 5080, "192.0.2.7")])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_empty_host(self) -> None:
        self.assertEqual(self.resolved("", None, None, False), [])


class RealServerTests(RealServerMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.start_server()

    @defer.inlineCallbacks
    def test_explicit_port_uses_addresses_only(self) -> Any:
        # srv.example.test has SRV records, but an explicit port skips them (RFC 3263 4.2)
        targets = yield self.sip().resolve(f"srv.{ZONE}", 5099, None, False)
        self.assertEqual(targets, [udp("192.0.2.98", 5099, f"srv.{ZONE}")])
        targets = yield self.sip().resolve(f"plain.{ZONE}", 5099, "TCP", False)
        self.assertEqual(targets, [Target("TCP", "192.0.2.10", 5099, f"plain.{ZONE}"),
                                   Target("TCP", "2001:db8::10", 5099, f"plain.{ZONE}")])

    @defer.inlineCallbacks
    def test_explicit_port_sips_is_tls(self) -> Any:
        targets = yield self.sip().resolve(f"h1.{ZONE}", 5071, None, True)
        self.assertEqual(targets, [Target("TLS", "192.0.2.1", 5071, f"h1.{ZONE}"),
                                   Target("TLS", "2001:db8::1", 5071, f"h1.{ZONE}")])

    @defer.inlineCallbacks
    def test_address_types_order_and_filter(self) -> Any:
        v6_first = yield self.sip(address_types=("AAAA", "A")).resolve(
            f"plain.{ZONE}", 5060, None, False)
        self.assertEqual([t.host for t in v6_first], ["2001:db8::10", "192.0.2.10"])
        v4_only = yield self.sip(address_types=("A",)).resolve(f"plain.{ZONE}", 5060, None, False)
        self.assertEqual([t.host for t in v4_only], ["192.0.2.10"])

    @defer.inlineCallbacks
    def test_explicit_transport_uses_its_srv(self) -> Any:
        # NAPTR would prefer TLS; transport=tcp goes straight to _sip._tcp
        targets = yield self.sip().resolve(f"naptr.{ZONE}", None, "tcp", False)
        self.assertEqual(targets, [Target("TCP", "192.0.2.1", 5070, f"naptr.{ZONE}"),
                                   Target("TCP", "2001:db8::1", 5070, f"naptr.{ZONE}")])
        targets = yield self.sip().resolve(f"naptr.{ZONE}", None, "tcp", True)
        self.assertEqual(targets, [Target("TLS", "192.0.2.3", 5061, f"naptr.{ZONE}")])

    @defer.inlineCallbacks
    def test_explicit_transport_without_srv_falls_back_to_addresses(self) -> Any:
        targets = yield self.sip().resolve(f"plain.{ZONE}", None, "TLS", False)
        self.assertEqual(targets, [Target("TLS", "192.0.2.10", 5061, f"plain.{ZONE}"),
                                   Target("TLS", "2001:db8::10", 5061, f"plain.{ZONE}")])

    @defer.inlineCallbacks
    def test_naptr_order_and_preference(self) -> Any:
        targets = yield self.sip().resolve(f"naptr.{ZONE}", None, None, False)
        name = f"naptr.{ZONE}"
        self.assertEqual(targets, [
            Target("TLS", "192.0.2.3", 5061, name),      # order 10 pref 10
            Target("TCP", "192.0.2.1", 5070, name),      # order 10 pref 20
            Target("TCP", "2001:db8::1", 5070, name),
            Target("UDP", "192.0.2.2", 5060, name),      # order 20
        ])

    @defer.inlineCallbacks
    def test_naptr_sips_keeps_only_sips_services(self) -> Any:
        targets = yield self.sip().resolve(f"naptr.{ZONE}", None, None, True)
        self.assertEqual(targets, [Target("TLS", "192.0.2.3", 5061, f"naptr.{ZONE}")])

    @defer.inlineCallbacks
    def test_naptr_unsupported_transport_filtered(self) -> Any:
        targets = yield self.sip(supported=("UDP", "TCP")).resolve(
            f"naptr.{ZONE}", None, None, False)
        self.assertEqual([(t.transport, t.host) for t in targets],
                         [("TCP", "192.0.2.1"), ("TCP", "2001:db8::1"), ("UDP", "192.0.2.2")])
        targets = yield self.sip(supported=("UDP",)).resolve(f"naptr.{ZONE}", None, None, False)
        self.assertEqual(targets, [udp("192.0.2.2", 5060, f"naptr.{ZONE}")])
        # sips, but this proxy cannot do TLS: nothing to try (no fallback to plain transports)
        targets = yield self.sip(supported=("UDP", "TCP")).resolve(
            f"naptr.{ZONE}", None, None, True)
        self.assertEqual(targets, [])

    @defer.inlineCallbacks
    def test_srv_priority_and_weights(self) -> Any:
        # priority 10 group, zero weight first: [h5 w0, h1 w60, h2 w40], sum 100
        # pick 50 -> running sums 0, 60 -> h1; then [h5 w0, h2 w40], pick 0 -> h5; then h2
        rng = ScriptedRandom([50, 0])
        targets = yield self.sip(rng=rng, supported=("UDP",)).resolve(
            f"srv.{ZONE}", None, None, False)
        name = f"srv.{ZONE}"
        self.assertEqual(targets, [
            udp("192.0.2.1", 5060, name), udp("2001:db8::1", 5060, name),
            udp("192.0.2.5", 5064, name), udp("192.0.2.55", 5064, name),
            udp("192.0.2.2", 5062, name),
            udp("192.0.2.3", 5080, name),  # priority 20 last
        ])
        self.assertEqual(rng.asked, [(0, 100), (0, 40)])  # a lone record needs no draw
        self.assertEqual(rng.picks, [])

    @defer.inlineCallbacks
    def test_srv_weights_other_pick(self) -> Any:
        # pick 100 -> h2 (running sum 100); then [h5, h1]: pick 1 -> h1; then h5
        rng = ScriptedRandom([100, 1])
        targets = yield self.sip(rng=rng, supported=("UDP",), address_types=("A",)).resolve(
            f"srv.{ZONE}", None, "udp", False)
        self.assertEqual([(t.host, t.port) for t in targets], [
            ("192.0.2.2", 5062), ("192.0.2.1", 5060), ("192.0.2.5", 5064),
            ("192.0.2.55", 5064), ("192.0.2.3", 5080)])
        self.assertEqual(rng.picks, [])

    @defer.inlineCallbacks
    def test_no_naptr_srv_for_each_supported_transport(self) -> Any:
        # failover list: every UDP SRV target in order, then the TCP ones
        rng = ScriptedRandom([0, 60])
        targets = yield self.sip(rng=rng, address_types=("A",)).resolve(
            f"srv.{ZONE}", None, None, False)
        self.assertEqual([(t.transport, t.host, t.port) for t in targets], [
            ("UDP", "192.0.2.5", 5064), ("UDP", "192.0.2.55", 5064),
            ("UDP", "192.0.2.1", 5060), ("UDP", "192.0.2.2", 5062),
            ("UDP", "192.0.2.3", 5080),
            ("TCP", "192.0.2.4", 5090),
        ])
        self.assertEqual(rng.picks, [])
        # supported order is the preference order when DNS leaves it open
        rng = ScriptedRandom([0, 60])
        targets = yield self.sip(rng=rng, supported=("TCP", "UDP"), address_types=("A",)).resolve(
            f"srv.{ZONE}", None, None, False)
        self.assertEqual(targets[0], Target("TCP", "192.0.2.4", 5090, f"srv.{ZONE}"))
        self.assertEqual(len(targets), 6)

    @defer.inlineCallbacks
    def test_naptr_to_missing_srv_falls_back_to_plain_srv(self) -> Any:
        targets = yield self.sip().resolve(f"broken.{ZONE}", None, None, False)
        self.assertEqual(targets, [Target("TCP", "192.0.2.4", 5066, f"broken.{ZONE}")])

    @defer.inlineCallbacks
    def test_nxdomain_and_nodata_fall_back_to_addresses(self) -> Any:
        targets = yield self.sip().resolve(f"plain.{ZONE}", None, None, False)
        self.assertEqual(targets, [udp("192.0.2.10", 5060, f"plain.{ZONE}"),
                                   udp("2001:db8::10", 5060, f"plain.{ZONE}")])
        targets = yield self.sip().resolve(f"plain.{ZONE}", None, None, True)
        self.assertEqual(targets, [Target("TLS", "192.0.2.10", 5061, f"plain.{ZONE}"),
                                   Target("TLS", "2001:db8::10", 5061, f"plain.{ZONE}")])

    @defer.inlineCallbacks
    def test_name_that_does_not_exist(self) -> Any:
        resolver = self.sip()
        targets = yield resolver.resolve(f"missing.{ZONE}", None, None, False)
        self.assertEqual(targets, [])
        # every lookup that found nothing is counted, by type (for /metrics)
        self.assertGreaterEqual(resolver.failures["NAPTR"], 1)
        self.assertGreaterEqual(resolver.failures["A"], 1)
        targets = yield self.sip().resolve(f"missing.{ZONE}", 5060, "tcp", False)
        self.assertEqual(targets, [])

    @defer.inlineCallbacks
    def test_srv_dot_target_means_no_service(self) -> Any:
        targets = yield self.sip(supported=("UDP",)).resolve(f"dot.{ZONE}", None, None, False)
        self.assertEqual(targets, [])

    @defer.inlineCallbacks
    def test_srv_target_without_address_is_skipped(self) -> Any:
        targets = yield self.sip().resolve(f"dangling.{ZONE}", None, "udp", False)
        self.assertEqual(targets, [udp("2001:db8::6", 5060, f"dangling.{ZONE}")])

    @defer.inlineCallbacks
    def test_cname_followed_by_server(self) -> Any:
        targets = yield self.sip().resolve(f"alias.{ZONE}", 5060, None, False)
        self.assertEqual(targets, [udp("192.0.2.2", 5060, f"alias.{ZONE}")])

    @defer.inlineCallbacks
    def test_trailing_dot_and_case(self) -> Any:
        targets = yield self.sip().resolve(f"PLAIN.{ZONE}.", 5060, None, False)
        self.assertEqual([t.host for t in targets], ["192.0.2.10", "2001:db8::10"])
        self.assertEqual(targets[0].server_name, f"PLAIN.{ZONE}")


class FakeResolver(common.ResolverBase):
    """Answers from a dict {(name, type): [record, ...]}; names in ``hang`` never answer."""

    def __init__(self, records: dict[tuple[str, int], list[Any]],
                 hang: set[tuple[str, int]] | None = None,
                 fail: dict[tuple[str, int], Exception] | None = None) -> None:
        super().__init__()
        self.data = records
        self.hang = hang or set()
        self.fail = fail or {}
        self.asked: list[tuple[str, int]] = []
        self.pending: list[defer.Deferred[Any]] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        key = (name.decode(), type)
        self.asked.append(key)
        if key in self.hang:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append(d)
            return d
        if key in self.fail:
            return defer.fail(self.fail[key])
        answers = [dns.RRHeader(name, type, cls, 60, payload)
                   for payload in self.data.get(key, [])]
        return defer.succeed((answers, [], []))


class TimeoutTests(unittest.TestCase):
    """Lookups that never answer count as no answer once the injected clock passes the deadline."""

    def test_naptr_timeout_falls_through(self) -> None:
        clock = Clock()
        name = "slow.example.test"
        fake = FakeResolver(
            {(f"_sip._tcp.{name}", dns.SRV): [dns.Record_SRV(1, 0, 5070, b"h.example.test")],
             ("h.example.test", dns.A): [dns.Record_A("192.0.2.40")]},
            hang={(name, dns.NAPTR), ("h.example.test", dns.AAAA)},
            fail={(f"_sip._udp.{name}", dns.SRV): error.DNSServerError("SERVFAIL")},
        )
        d = SipResolver(fake, clock, timeout=3.0).resolve(name, None, None, False)
        self.assertNoResult(d)
        self.assertEqual(fake.asked, [(name, dns.NAPTR)])
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)  # NAPTR deadline: SRV lookups now; the AAAA lookup hangs too
        self.assertNoResult(d)
        clock.advance(3.0)
        self.assertEqual(self.successResultOf(d),
                         [Target("TCP", "192.0.2.40", 5070, name)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_everything_times_out(self) -> None:
        clock = Clock()
        name = "dead.example.test"
        fake = FakeResolver({}, hang={(name, dns.NAPTR), (f"_sip._udp.{name}", dns.SRV),
                                      (name, dns.A)})
        d = SipResolver(fake, clock, supported=("UDP",), timeout=5.0).resolve(
            name, None, None, False)
        for _ in range(3):
            self.assertNoResult(d)
            clock.advance(5.0)
        self.assertEqual(self.successResultOf(d), [])

    def test_cancel_stops_resolution(self) -> None:
        clock = Clock()
        name = "slow.example.test"
        fake = FakeResolver({}, hang={(name, dns.NAPTR)})
        d = SipResolver(fake, clock).resolve(name, None, None, False)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        clock.advance(60)
        self.assertEqual(fake.asked, [(name, dns.NAPTR)])  # no fall-through after cancel
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_during_parallel_lookups(self) -> None:
        clock = Clock()
        name = "slow.example.test"
        fake = FakeResolver({}, hang={(f"_sip._udp.{name}", dns.SRV),
                                      (f"_sip._tcp.{name}", dns.SRV)})
        d = SipResolver(fake, clock, supported=("UDP", "TCP")).resolve(name, None, None, False)
        self.assertEqual(len(fake.pending), 2)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(len(fake.asked), 3)  # NAPTR and the two SRV: no A lookup
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lookup_receives_a_retry_schedule_within_the_deadline(self) -> None:
        seen: list[Any] = []

        class Recording(FakeResolver):
            def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Any:
                seen.append(timeout)
                return super()._lookup(name, cls, type, timeout)

        resolver = SipResolver(Recording({}), Clock(), timeout=5.0)
        self.successResultOf(resolver.resolve("x.example.test", 5060, None, False))
        self.assertTrue(seen)
        for schedule in seen:
            self.assertLessEqual(sum(schedule), 5)
