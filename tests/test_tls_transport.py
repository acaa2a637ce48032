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
from sipproxy.dns import Target
from sipproxy.message import Message, Request, parse_message
from sipproxy.transport import TransportManager
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
        self.assertEqual(manager.tls._out, {})

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

    def test_reconnect_with_backoff_until_it_works(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        mr = MemoryReactorClock()
        manager = TransportManager(mr, lambda m: None, [])
        manager.tls_client = policy(keepalive_interval=None)
        manager.startService()
        done = manager.send_request(invite(), Target("TLS", LOCAL, 5061, PROVIDER))
        self.assertEqual(len(mr.tcpClients), 1)
        proto = self._connect(mr, 0)
        self.assertIsNone(self.successResultOf(done))
        # the provider goes away: reconnect after 1 s, then 2 s after a failed attempt
        proto.connectionLost(_failure())
        self.assertEqual(len(mr.tcpClients), 1)
        mr.advance(1)
        self.assertEqual(len(mr.tcpClients), 2)
        mr.tcpClients[1][2].clientConnectionFailed(None, _failure())
        mr.advance(1.9)
        self.assertEqual(len(mr.tcpClients), 2)
        mr.advance(0.1)
        self.assertEqual(len(mr.tcpClients), 3)
        again = self._connect(mr, 2)
        self.assertIs(manager.tls._out[(LOCAL, 5061, PROVIDER)], again)
        # closed by us (idle, stop): no reconnect
        again.close()
        again.connectionLost(_failure())
        mr.advance(100)
        self.assertEqual(len(mr.tcpClients), 3)
        manager.stopService()
        self.assertEqual([c for c in mr.getDelayedCalls() if c.active()], [])

    @staticmethod
    def _connect(mr: Any, index: int) -> SIPTLSStreamProtocol:
        factory = mr.tcpClients[index][2]
        wrapper = factory.buildProtocol(None)
        wrapper.makeConnection(FakeTLSTransport())
        proto = wrapper._wrappedProtocol.wrappedProtocol
        assert isinstance(proto, SIPTLSStreamProtocol)
        proto.handshakeCompleted()
        return proto


def _failure() -> Any:
    from twisted.internet.error import ConnectionLost
    from twisted.python.failure import Failure

    return Failure(ConnectionLost())
