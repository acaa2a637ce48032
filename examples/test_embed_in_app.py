"""examples/embed_in_app.py: the application starts, answers SIP and HTTP, and stops cleanly."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, cast

from twisted.application.service import IService, MultiService
from twisted.internet import defer, error
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial import unittest

from examples import embed_in_app
from examples.embed_in_app import DEMO_CONFIG, EmbeddedApp, make_app_service
from sipproxy.config import Config, TimerConfig, parse_config
from sipproxy.message import Response, parse_message

reactor: Any = _reactor
LOCAL = "127.0.0.1"


def demo_config() -> Config:
    """The demo config on a random port, with short timers so transactions end soon."""
    config = parse_config(DEMO_CONFIG, "<demo config>")
    listen = tuple(dataclasses.replace(entry, port=0) for entry in config.listen)
    return dataclasses.replace(
        config, listen=listen, timers=TimerConfig(t1=0.01, t2=0.08, t4=0.05)
    )


class SIPClient(DatagramProtocol):
    """Sends requests and hands out the final response to each (by Call-ID)."""

    def __init__(self) -> None:
        self.waiting: dict[str, defer.Deferred[Response]] = {}

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data)
        if isinstance(message, Response) and message.status >= 200:
            d = self.waiting.pop(message.call_id, None)
            if d is not None:
                d.callback(message)

    def request(self, data: bytes, call_id: str, port: int) -> defer.Deferred[Response]:
        assert self.transport is not None
        d: defer.Deferred[Response] = defer.Deferred()
        self.waiting[call_id] = d
        self.transport.write(data, (LOCAL, port))
        return d.addTimeout(5, reactor)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.getHost().port)


class HTTPGet(Protocol):
    """An HTTP/1.0 GET: the server closes the connection after the response, so nothing lingers."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data = b""
        self.done: defer.Deferred[tuple[int, bytes]] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET {self.path} HTTP/1.0\r\nHost: {LOCAL}\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        head, _, body = self.data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head else 0
        self.done.callback((status, body))


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    proto = HTTPGet(path)
    await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port, timeout=5), proto)
    result: tuple[int, bytes] = await proto.done.addTimeout(5, reactor)
    return result


async def drained(proxy: Any, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy holds no transaction, so no timer outlives the test."""
    deadline = reactor.seconds() + timeout
    while len(proxy.transactions):
        if reactor.seconds() > deadline:
            raise AssertionError(f"{len(proxy.transactions)} transactions still alive")
        await deferLater(reactor, 0.02, lambda: None)


def sip_request(method: str, uri: str, to: str, client_port: int, call_id: str) -> bytes:
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LOCAL}:{client_port};rport;branch=z9hG4bK-{call_id}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:201@lan.example>;tag=emb1\r\n"
        f"To: <{to}>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:201@{LOCAL}:{client_port}>\r\n"
        "Expires: 60\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


class EmbedTests(unittest.TestCase):
    def test_application_for_twistd(self) -> None:
        top = cast(MultiService, IService(embed_in_app.application))
        app = top.getServiceNamed("app")
        self.assertIsInstance(app, EmbeddedApp)
        self.assertIs(app.getServiceNamed("sipproxy"), app.sip)
        self.assertIs(app.getServiceNamed("status-http"), app.status)
        self.assertFalse(app.running)

    def test_sip_and_http_answer_then_stop(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._sip_and_http())

    async def _sip_and_http(self) -> None:
        client = SIPClient()
        udp = reactor.listenUDP(0, client, interface=LOCAL)
        self.addCleanup(udp.stopListening)
        app = make_app_service(demo_config(), status_port=0, reactor=reactor)
        app.startService()
        self.addCleanup(lambda: app.stopService() if app.running else None)
        proxy = app.sip.proxy
        sip_port = proxy.listeners[0].port
        http_port = app.status.port
        self.assertNotIn(0, (sip_port, http_port))

        # OPTIONS to the proxy itself (no user part): answered by the proxy
        options = sip_request(
            "OPTIONS", f"sip:{LOCAL}:{sip_port}", f"sip:{LOCAL}:{sip_port}", client.port, "opt1"
        )
        response = await client.request(options, "opt1", sip_port)
        self.assertEqual(response.status, 200)
        self.assertIn("INVITE", response.headers.get("Allow") or "")

        status, body = await http_get(http_port, "/status.json")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["registered_bindings"], 0)

        # a REGISTER shows up on the page: it reads the proxy's live state
        register = sip_request(
            "REGISTER", "sip:lan.example", "sip:201@lan.example", client.port, "reg1"
        )
        response = await client.request(register, "reg1", sip_port)
        self.assertEqual(response.status, 200)
        status, body = await http_get(http_port, "/status.json")
        self.assertEqual(status, 200)
        state = json.loads(body)
        self.assertEqual(state["registered_bindings"], 1)
        self.assertEqual(state["listeners"], [f"UDP {LOCAL}:{sip_port} (inside)"])
        status, body = await http_get(http_port, "/")
        self.assertEqual(status, 200)
        self.assertIn(b"registered bindings: 1\n", body)
        status, _ = await http_get(http_port, "/nothing-here")
        self.assertEqual(status, 404)

        await drained(proxy)
        await app.stopService()
        self.assertFalse(app.running)
        with self.assertRaises(error.ConnectionRefusedError):
            await http_get(http_port, "/")
