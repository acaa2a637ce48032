"""sipproxy.transport.tls: real TLS on 127.0.0.1 with certificates the tests make, and the
keepalive / reconnect logic on a fake clock."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import TLSVersion
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from sipproxy.config import ConfigError, ListenConfig
from sipproxy.context import Target
from sipproxy.message import Message, Request, parse_message
from sipproxy.transport import TransportManager
from sipproxy.transport.pool import pool_key
from sipproxy.transport.tls import (
    PING,
    SIPTLSStreamProtocol,
    TLSClientPolicy,
    TLSConnectError,
    client_creator_factory,
    load_certificates,
    load_server_certificate,
    trust_root,
)
from tests.tls_certs import PROVIDER, certs

LOCAL = "127.0.0.1"
reactor: Any = _reactor


def invite(via_transport: str = "TLS", call_id: str = "tls-1") -> Request:
    data = (
        "OPTIONS sip:service@provider.test SIP/2.0\r\n"
        f"Via: SIP/2.0/{via_transport} 127.0.0.1:5060;branch=z9hG4bK-{call_id};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:alice@lan.example>;tag=a1\r\n"
        "To: <sip:service@provider.test>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


class Collector(Protocol):
    """The provider stand-in: collects what arrives and can answer on the connection."""

    def __init__(self, owner: TLSServer) -> None:
        self.owner = owner

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.received += data
        if PING in data:
            assert self.transport is not None
            if self.owner.answer_pings:
                self.transport.write(b"\r\n")
        waiter, self.owner.waiter = self.owner.waiter, None
        if waiter is not None:
            waiter.callback(data)


class TLSServer(Factory):
    def __init__(self, pair: Any, *, require_client: list[Any] | None = None) -> None:
        self.received = b""
        self.connections: list[Collector] = []
        self.waiter: defer.Deferred[bytes] | None = None
        self.answer_pings = True
        server = load_server_certificate(str(pair.cert), str(pair.key))
        options = server.options(TLSVersion.TLSv1_2)
        if require_client is not None:
            from twisted.internet.ssl import CertificateOptions

            options = CertificateOptions(
                trustRoot=trust_root(require_client), **server.certificate_options()
            )
        self.port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, self),
                                      interface=LOCAL)

    def buildProtocol(self, addr: Any) -> Collector:
        return Collector(self)

    def next_data(self) -> defer.Deferred[bytes]:
        self.waiter = defer.Deferred()
        return self.waiter.addTimeout(5, reactor)

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    def stop(self) -> defer.Deferred[Any]:
        for c in self.connections:
            if c.transport is not None:
                try:
                    c.transport.abortConnection()  # type: ignore[attr-defined]
                except Exception:  # already closed
                    pass
        return defer.maybeDeferred(self.port.stopListening)


def policy(**kw: Any) -> TLSClientPolicy:
    c = certs()
    creator = client_creator_factory(ca_certificates=load_certificates(str(c.ca)),
                                     **kw.pop("creator_options", {}))
    return TLSClientPolicy(creator, **kw)


class RealTLSTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.received: list[Message] = []
        self.failures: list[TLSConnectError] = []

    def manager(self, *specs: ListenConfig, **policy_kw: Any) -> TransportManager:
        manager = TransportManager(reactor, self.received.append,
                                   specs or [ListenConfig("outside", "udp", LOCAL, 0)])
        policy_kw.setdefault("on_failure", self.failures.append)
        manager.tls_client = policy(**policy_kw)
        manager.startService()
        self.addCleanup(manager.stopService)
        return manager

    def server(self, pair: Any, **kw: Any) -> TLSServer:
        server = TLSServer(pair, **kw)
        self.addCleanup(server.stop)
        return server

    @defer.inlineCallbacks
    def test_request_goes_over_verified_tls_and_the_connection_is_reused(self) -> Any:
        server = self.server(certs().good)
        manager = self.manager()
        target = Target("TLS", LOCAL, server.number, PROVIDER)
        arrived = server.next_data()
        yield manager.send_request(invite(), target)
        data = yield arrived
        self.assertIn(b"OPTIONS sip:service@provider.test", data)
        arrived = server.next_data()
        yield manager.send_request(invite(call_id="tls-2"), target)
        data = yield arrived
        self.assertIn(b"Call-ID: tls-2", data)
        self.assertEqual(len(server.connections), 1)
        # a request over the connection comes back with Source TLS; the answer returns on it
        peer = server.connections[0]
        assert peer.transport is not None
        peer.transport.write(invite(via_transport="TLS", call_id="back").to_bytes())
        for _ in range(50):
            if self.received:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.received[0].source.transport, "TLS")  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def test_open_flow_names_the_connection_the_request_will_use(self) -> Any:
        """No TLS listener: the manager opens the connection first (open_flow), then names it
        (flow_address: its local address and port, which count as ours); with a TLS listener
        on the side nothing waits and the listener is named."""
        server = self.server(certs().good)
        manager = self.manager()
        target = Target("TLS", LOCAL, server.number, PROVIDER)
        listener = manager.choose_listener(target)
        self.assertIsNone(manager.flow_address(target, listener))
        opening = manager.open_flow(target)
        assert opening is not None
        proto = yield opening
        self.assertEqual(manager.flow_address(target, listener), proto.local)
        self.assertIsNone(manager.open_flow(target))  # open already
        self.assertTrue(manager.is_flow_port(proto.local[1]))
        arrived = server.next_data()
        yield manager.send_request(invite(), target)
        yield arrived
        self.assertEqual(len(server.connections), 1)  # the request went over that one
        c = certs()
        with_listener = self.manager(
            ListenConfig("outside", "udp", LOCAL, 0),
            ListenConfig("outside", "tls", LOCAL, 0, certificate=str(c.proxy.cert),
                         key=str(c.proxy.key)))
        self.assertIsNone(with_listener.open_flow(target))
        tls_listener = with_listener.choose_listener(target)
        assert tls_listener is not None and tls_listener.transport == "TLS"
        self.assertIsNone(with_listener.flow_address(target, tls_listener))

    @defer.inlineCallbacks
    def test_open_flow_failure_is_logged_once_and_marked(self) -> Any:
        server = self.server(certs().expired)
        manager = self.manager()
        opening = manager.open_flow(Target("TLS", LOCAL, server.number, PROVIDER))
        assert opening is not None
        with self.assertRaises(TLSConnectError) as caught:
            yield opening
        self.assertTrue(caught.exception.logged)
        self.assertEqual(len(self.failures), 1)

    @defer.inlineCallbacks
    def test_a_connection_the_provider_drops_is_opened_again(self) -> Any:
        """On real sockets: the provider hangs up, the proxy reconnects after 1 s (its service
        and the TLS layers agree the first connection is over), the next request uses it."""
        server = self.server(certs().good)
        manager = self.manager(keepalive_interval=None)
        target = Target("TLS", LOCAL, server.number, PROVIDER)
        yield manager.send_request(invite(), target)
        transport = server.connections[0].transport
        assert transport is not None
        transport.loseConnection()
        for _ in range(250):
            if len(server.connections) == 2:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(server.connections), 2)
        for _ in range(100):  # the handshake on the new connection
            if manager.pool.get(pool_key(LOCAL, server.number, PROVIDER)) is not None:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        arrived = server.next_data()
        yield manager.send_request(invite(call_id="after"), target)
        data = yield arrived
        self.assertIn(b"Call-ID: after", data)
        self.assertEqual((len(server.connections), self.failures), (2, []))

    @defer.inlineCallbacks
    def _refused(self, pair: Any, expected: str) -> Any:
        server = self.server(pair)
        manager = self.manager()
        target = Target("TLS", LOCAL, server.number, PROVIDER)
        with self.assertRaises(TLSConnectError) as caught:
            yield manager.send_request(invite(), target)
        error = caught.exception
        self.assertTrue(error.verification, str(error))
        self.assertIn(f"TLS to provider.test:{server.number} (127.0.0.1) failed: "
                      "certificate verify failed", str(error))
        self.assertIn(expected, str(error))
        self.assertEqual([str(e) for e in self.failures], [str(error)])
        self.assertNotIn(b"OPTIONS", server.received)  # never in clear, never at all
        # counted for /metrics (sipproxy_tls_handshake_failures_total{reason})
        self.assertEqual(dict(manager.tls.failures), {"certificate": 1})

    def test_wrong_name_fails(self) -> Any:
        return self._refused(certs().wrong_name, "certificate is not for provider.test")

    def test_expired_fails(self) -> Any:
        return self._refused(certs().expired, "certificate has expired")

    def test_unknown_ca_fails(self) -> Any:
        # the server sends its chain: OpenSSL then names the untrusted root it ends in
        return self._refused(certs().unknown_ca, "self-signed certificate in certificate chain")

    @defer.inlineCallbacks
    def test_without_a_policy_tls_fails_at_once(self) -> Any:
        manager = TransportManager(reactor, self.received.append,
                                   [ListenConfig("outside", "udp", LOCAL, 0)])
        manager.startService()
        self.addCleanup(manager.stopService)
        with self.assertRaises(TLSConnectError) as caught:
            yield manager.send_request(invite(), Target("TLS", LOCAL, 9, PROVIDER))
        self.assertIn("no TLS client configured", str(caught.exception))

    @defer.inlineCallbacks
    def test_connection_refused_is_one_clear_error(self) -> Any:
        manager = self.manager()
        from tests.integration.support.harness import free_port

        port = free_port()
        with self.assertRaises(TLSConnectError) as caught:
            yield manager.send_request(invite(), Target("TLS", LOCAL, port, PROVIDER))
        self.assertIn(f"TLS to provider.test:{port} (127.0.0.1) failed: cannot connect",
                      str(caught.exception))
        self.assertFalse(caught.exception.verification)

    @defer.inlineCallbacks
    def test_client_certificate_is_presented(self) -> Any:
        c = certs()
        server = self.server(c.good, require_client=load_certificates(str(c.ca)))
        client = load_server_certificate(str(c.client.cert), str(c.client.key))
        manager = self.manager(creator_options={"client_certificate": client})
        arrived = server.next_data()
        yield manager.send_request(invite(), Target("TLS", LOCAL, server.number, PROVIDER))
        data = yield arrived
        self.assertIn(b"OPTIONS", data)

    @defer.inlineCallbacks
    def test_no_client_certificate_when_required_fails(self) -> Any:
        c = certs()
        server = self.server(c.good, require_client=load_certificates(str(c.ca)))
        manager = self.manager()
        # with TLS 1.3 the server refuses the client after the client's handshake is done:
        # the request may count as written, but the server never gets it
        d = manager.send_request(invite(), Target("TLS", LOCAL, server.number, PROVIDER))
        d.addErrback(lambda f: None)
        yield deferLater(reactor, 0.3, lambda: None)
        self.assertNotIn(b"OPTIONS", server.received)
        self.assertIsNone(manager.pool.get(pool_key(LOCAL, server.number, PROVIDER)))

    @defer.inlineCallbacks
    def test_unverified_policy_connects_to_anything(self) -> Any:
        server = self.server(certs().unknown_ca)
        manager = self.manager(creator_options={"verify": False})
        arrived = server.next_data()
        yield manager.send_request(invite(), Target("TLS", LOCAL, server.number, PROVIDER))
        data = yield arrived
        self.assertIn(b"OPTIONS", data)

    @defer.inlineCallbacks
    def test_tls_listener_accepts_phones_and_answers_on_the_connection(self) -> Any:
        c = certs()
        manager = self.manager(
            ListenConfig("inside", "udp", LOCAL, 0),
            ListenConfig("inside", "tls", LOCAL, 0, certificate=str(c.proxy.cert),
                         key=str(c.proxy.key)),
        )
        tls_listener = next(lst for lst in manager.listeners if lst.transport == "TLS")
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

        creator = client_creator_factory(ca_certificates=load_certificates(str(c.ca)))("proxy.test")
        got: list[bytes] = []

        class Phone(Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)

        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, LOCAL, tls_listener.port))
        phone = yield connectProtocol(endpoint, Phone())
        self.addCleanup(lambda: phone.transport.abortConnection())
        phone.transport.write(invite(call_id="phone").to_bytes())
        for _ in range(100):
            if self.received:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        request = self.received[0]
        assert isinstance(request, Request) and request.source is not None
        self.assertEqual(request.source.transport, "TLS")
        self.assertEqual(request.source.side, "inside")
        response = request.make_response(200)
        yield manager.send_response(response, request.source)
        for _ in range(100):
            if got:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(got and got[0].startswith(b"SIP/2.0 200"), got)


class ListenerConfigTests(unittest.SynchronousTestCase):
    def test_bad_certificate_file_is_a_config_error_naming_the_key(self) -> None:
        c = certs()
        spec = ListenConfig("inside", "tls", LOCAL, 0, certificate="/nonexistent.pem",
                            key=str(c.proxy.key))
        with self.assertRaises(ConfigError) as caught:
            TransportManager(reactor, lambda m: None, [ListenConfig("inside", "udp", LOCAL, 0),
                                                      spec])
        self.assertTrue(str(caught.exception).startswith("listen[1].certificate: cannot read"))

    def test_key_that_does_not_match(self) -> None:
        c = certs()
        spec = ListenConfig("inside", "tls", LOCAL, 0, certificate=str(c.proxy.cert),
                            key=str(c.good.key))
        with self.assertRaises(ConfigError) as caught:
            TransportManager(reactor, lambda m: None, [spec])
        self.assertIn("does not match", str(caught.exception))

    def test_corrupt_certificate_is_one_line_naming_the_key(self) -> None:
        c = certs()
        bad = Path(tempfile.mkdtemp(prefix="sipproxy-tls-")) / "bad.crt"
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB!!!!\n-----END CERTIFICATE-----\n")
        spec = ListenConfig("inside", "tls", LOCAL, 0, certificate=str(bad), key=str(c.proxy.key))
        with self.assertRaises(ConfigError) as caught:
            TransportManager(reactor, lambda m: None, [spec])
        text = str(caught.exception)
        self.assertTrue(text.startswith(f"listen[0].certificate: certificate file {str(bad)!r} "
                                        "is not a valid PEM certificate: "), text)
        self.assertNotIn("\n", text)

    def test_encrypted_key_is_refused_naming_the_key(self) -> None:
        from cryptography.hazmat.primitives import serialization

        c = certs()
        key = serialization.load_pem_private_key(c.proxy.key.read_bytes(), password=None)
        encrypted = Path(tempfile.mkdtemp(prefix="sipproxy-tls-")) / "encrypted.key"
        encrypted.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        spec = ListenConfig("inside", "tls", LOCAL, 0, certificate=str(c.proxy.cert),
                            key=str(encrypted))
        with self.assertRaises(ConfigError) as caught:
            TransportManager(reactor, lambda m: None, [spec])
        self.assertEqual(str(caught.exception), f"listen[0].key: key file {str(encrypted)!r} "
                         "is not a valid unencrypted PEM private key")


class FakeTLSTransport(StringTransport):
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Owner:
    def __init__(self) -> None:
        self.connected: list[Any] = []
        self.lost: list[Any] = []

    def stream_connected(self, proto: Any) -> None:
        self.connected.append(proto)

    def stream_message(self, proto: Any, data: bytes) -> None:
        pass

    def stream_framing_error(self, proto: Any, error: Any, data: bytes) -> None:
        pass

    def stream_lost(self, proto: Any, reason: Any) -> None:
        self.lost.append(proto)


class KeepaliveTests(unittest.SynchronousTestCase):
    """RFC 5626 4.4.1 on a fake clock: ping when idle, give up on a missing pong."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.owner = Owner()
        self.proto = SIPTLSStreamProtocol(
            self.owner, self.clock, "outside", outgoing=True, idle_timeout=600.0,
            server_name=PROVIDER, target=(LOCAL, 5061), keepalive_interval=30.0,
            pong_timeout=10.0,
        )
        self.transport = FakeTLSTransport()
        self.proto.makeConnection(self.transport)

    def test_registered_only_after_the_handshake(self) -> None:
        self.assertEqual(self.owner.connected, [])
        self.proto.handshakeCompleted()
        self.assertEqual(self.owner.connected, [self.proto])

    def test_ping_when_idle_pong_keeps_it(self) -> None:
        self.proto.handshakeCompleted()
        self.clock.advance(29)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.transport.value(), PING)
        self.transport.clear()
        self.clock.advance(5)
        self.proto.dataReceived(b"\r\n")  # the pong
        self.clock.advance(10)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(20)  # 30 s after the pong: the next ping
        self.assertEqual(self.transport.value(), PING)

    def test_sip_traffic_postpones_the_ping(self) -> None:
        self.proto.handshakeCompleted()
        self.clock.advance(20)
        self.proto.write(b"OPTIONS ...")
        self.transport.clear()
        self.clock.advance(20)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(10)
        self.assertEqual(self.transport.value(), PING)

    def test_missing_pong_aborts(self) -> None:
        self.proto.handshakeCompleted()
        self.clock.advance(30)
        self.clock.advance(10)
        self.assertTrue(self.transport.aborted)
        self.assertTrue(self.proto.keepalive_failed)

    def test_handshake_failure_fails_the_waiters(self) -> None:
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        failures: list[Any] = []
        self.proto.handshake.addErrback(failures.append)
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0].value, TLSConnectError)
        self.assertIn("TLS to provider.test:5061 (127.0.0.1) failed: connection closed during "
                      "the TLS handshake", str(failures[0].value))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReconnectTests(unittest.SynchronousTestCase):
    """A lost provider connection is opened again, with growing delays, on a fake clock."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        self.mr = MemoryReactorClock()
        self.manager = TransportManager(self.mr, lambda m: None, [])
        self.manager.tls_client = policy(keepalive_interval=None)
        self.manager.startService()
        self.wires: list[Any] = []

    def send(self) -> defer.Deferred[None]:
        return self.manager.send_request(invite(), Target("TLS", LOCAL, 5061, PROVIDER))

    def open_connection(self, **kw: Any) -> SIPTLSStreamProtocol:
        """The first request's connection, up; then the provider goes away."""
        if kw:
            self.manager.tls_client = policy(keepalive_interval=None, **kw)
        done = self.send()
        self.assertEqual(len(self.mr.tcpClients), 1)
        proto = self._connect(0)
        self.assertIsNone(self.successResultOf(done))
        return proto

    def test_reconnect_with_backoff_until_it_works(self) -> None:
        mr, manager = self.mr, self.manager
        self.open_connection()
        # the provider goes away: reconnect after 1 s, then 2 s after a failed attempt
        self._lose(0)
        self.assertEqual(len(mr.tcpClients), 1)
        mr.advance(1)
        self.assertEqual(len(mr.tcpClients), 2)
        self._refuse(1)
        mr.advance(1.9)
        self.assertEqual(len(mr.tcpClients), 2)
        mr.advance(0.1)
        self.assertEqual(len(mr.tcpClients), 3)
        again = self._connect(2)
        self.assertIs(manager.pool.get(pool_key(LOCAL, 5061, PROVIDER)), again)
        # closed by us (idle, stop): no reconnect
        again.close()
        self._lose(2)
        mr.advance(100)
        self.assertEqual(len(mr.tcpClients), 3)
        manager.stopService()
        self.assertEqual([c for c in mr.getDelayedCalls() if c.active()], [])

    def test_backoff_grows_to_the_maximum_and_a_handshake_resets_it(self) -> None:
        mr = self.mr
        self.open_connection(max_backoff=4.0)
        self._lose(0)
        delays = []
        for attempt in range(1, 6):
            before = mr.seconds()
            while len(mr.tcpClients) == attempt:
                mr.advance(0.5)
            delays.append(mr.seconds() - before)
            if attempt < 5:
                self._connect(attempt, handshake=False)
                self._lose(attempt)  # TCP up, TLS never: not a success for the backoff
        self.assertEqual(delays, [1.0, 2.0, 4.0, 4.0, 4.0])
        self._connect(5)
        self._lose(5)
        before = mr.seconds()
        while len(mr.tcpClients) == 6:
            mr.advance(0.5)
        self.assertEqual(mr.seconds() - before, 1.0)

    def test_each_failed_attempt_is_one_log_line(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.open_connection()
        self._lose(0)
        self.mr.advance(1)
        self._refuse(1)
        self.mr.advance(2)
        self._refuse(2)
        from twisted.logger import formatEvent

        lines = [formatEvent(e) for e in events]
        failed = [line for line in lines if "failed" in line]
        self.assertEqual(len(failed), 2, lines)
        self.assertTrue(all(line.endswith("(reconnecting)") for line in failed), failed)
        self.assertEqual([line for line in lines if "Scheduling retry" in line], [])

    def test_a_request_does_not_wait_out_the_backoff(self) -> None:
        mr = self.mr
        self.open_connection()
        self._lose(0)
        mr.advance(1)
        self._refuse(1)  # the next attempt is 2 s away
        done = self.send()
        self.assertEqual(len(mr.tcpClients), 3)  # at once
        self._connect(2)
        self.assertIsNone(self.successResultOf(done))
        mr.advance(10)
        self.assertEqual(len(mr.tcpClients), 3)  # the scheduled attempt was dropped

    def test_a_connection_unused_for_the_idle_timeout_is_not_reopened(self) -> None:
        mr = self.mr
        proto = self.open_connection()
        self.assertEqual(self.manager.idle_timeout, 600.0)
        mr.advance(599)
        proto.dataReceived(b"\r\n")  # traffic keeps it open, but carries no SIP of ours
        mr.advance(2)
        self._lose(0)
        mr.advance(100)
        self.assertEqual(len(mr.tcpClients), 1)
        self.assertEqual([c for c in mr.getDelayedCalls() if c.active()], [])

    def test_a_certificate_that_does_not_verify_stops_the_retries(self) -> None:
        from service_identity import VerificationError
        from twisted.python.failure import Failure

        mr = self.mr
        self.open_connection()
        self._lose(0)
        mr.advance(1)
        self._connect(1, handshake=False)
        # what the TLS layer reports when service_identity refuses the name
        self._above_tls(1).connectionLost(Failure(VerificationError([])))
        mr.advance(100)
        self.assertEqual(len(mr.tcpClients), 2)
        self.assertEqual([c for c in mr.getDelayedCalls() if c.active()], [])

    def test_first_attempt_is_not_retried(self) -> None:
        mr = self.mr
        done = self.send()
        self._refuse(0)
        error = self.failureResultOf(done, TLSConnectError).value
        self.assertIn("TLS to provider.test:5061 (127.0.0.1) failed: cannot connect", str(error))
        mr.advance(100)
        self.assertEqual(len(mr.tcpClients), 1)
        self.assertEqual([c for c in mr.getDelayedCalls() if c.active()], [])

    def test_stop_cancels_an_attempt_and_fails_its_requests(self) -> None:
        done = self.send()
        self.manager.stopService()
        error = self.failureResultOf(done, TLSConnectError).value
        self.assertIn("cancelled (the proxy is stopping)", str(error))
        self.assertEqual([c for c in self.mr.getDelayedCalls() if c.active()], [])

    def _connect(self, index: int, *, handshake: bool = True) -> SIPTLSStreamProtocol:
        factory = self.mr.tcpClients[index][2]
        wire = factory.buildProtocol(None)
        wire.makeConnection(FakeTLSTransport())
        while len(self.wires) <= index:
            self.wires.append(None)
        self.wires[index] = wire
        proto = wire
        while not isinstance(proto, SIPTLSStreamProtocol):  # the TLS and ClientService layers
            proto = getattr(proto, "wrappedProtocol", None) or getattr(proto, "_protocol", None) \
                or proto._wrappedProtocol
        if handshake:
            proto.handshakeCompleted()
        return proto

    def _above_tls(self, index: int) -> Any:
        """The layer the TLS protocol hands the connection's end to (ClientService's)."""
        layer = self.wires[index]
        while getattr(layer, "wrappedProtocol", None) is None:
            layer = layer._wrappedProtocol
        return layer.wrappedProtocol

    def _lose(self, index: int) -> None:
        """The connection ends as the reactor would end it (all layers hear of it)."""
        self.wires[index].connectionLost(_failure())

    def _refuse(self, index: int) -> None:
        from twisted.internet.error import ConnectionRefusedError
        from twisted.python.failure import Failure

        self.mr.tcpClients[index][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))


def _failure() -> Any:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    return Failure(ConnectionLost())
