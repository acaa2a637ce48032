"""examples/blocklist_plugin.py: its hooks, its config validation, and a real proxy using it."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Callable
from typing import Any, cast

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from examples.blocklist_plugin import (
    SCREENED_HEADER,
    SCREENED_VALUE,
    BlocklistPlugin,
    dialed_number,
    factory,
)
from sipproxy.config import Config, ConfigError, Section, parse_config
from sipproxy.context import Branch, RequestContext
from sipproxy.interfaces import IPluginFactory, IProxyPlugin, IStatusProvider
from sipproxy.message import Message, Request, Response, Source, parse_message
from sipproxy.pipeline import Pipeline, find_factory, load_plugins
from sipproxy.service import makeService
from sipproxy.testing import ProxyHarness, answer
from sipproxy.uri import parse_uri

reactor: Any = _reactor
LOCAL = "127.0.0.1"
ENABLE = 'enabled = ["examples.blocklist_plugin:factory"]'


def sip_request(
    method: str = "INVITE",
    uri: str = "sip:+19005550100@provider.example",
    *,
    to_tag: str | None = None,
    via: str = "SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-unit;rport",
    call_id: str = "unit-1",
    extra: str = "",
) -> bytes:
    to = f"<{uri}>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:201@lan.example>;tag=caller1\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        "Contact: <sip:201@127.0.0.1:5062>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def parsed_request(*args: Any, **kwargs: Any) -> Request:
    message = parse_message(sip_request(*args, **kwargs))
    assert isinstance(message, Request)
    return message


def build(section: dict[str, Any]) -> BlocklistPlugin:
    return factory.build(cast(Any, None), Section("blocklist", section, "blocklist.toml"))


class DialedNumberTests(unittest.TestCase):
    def check(self, uri: str, expected: str | None) -> None:
        self.assertEqual(dialed_number(parse_uri(uri)), expected)

    def test_sip_user_part(self) -> None:
        self.check("sip:0900123456@provider.example", "0900123456")

    def test_visual_separators_and_user_params_removed(self) -> None:
        self.check("sip:+1-900-(555).0100;isub=7@provider.example;user=phone", "+19005550100")

    def test_escapes_decoded(self) -> None:
        self.check("sip:%30900123@provider.example", "0900123")

    def test_tel_uri(self) -> None:
        self.check("tel:+1-900-555-0100;phone-context=example.com", "+19005550100")

    def test_no_user_part(self) -> None:
        self.check("sip:provider.example", None)

    def test_other_scheme(self) -> None:
        self.check("urn:service:sos", None)


class HookTests(unittest.TestCase):
    def setUp(self) -> None:
        self.plugin = build({"prefixes": ["0900", "+1900", "+19005"]})

    def received(self, request: Request) -> tuple[RequestContext, Any]:
        ctx = RequestContext(request, None)
        return ctx, self.plugin.request_received(ctx)

    def forwarded(self, ctx: RequestContext) -> Request:
        branch = Branch(ctx.request.copy(), None, None)
        self.plugin.request_forwarding(ctx, branch)
        return branch.request

    def test_provides_the_interfaces(self) -> None:
        self.assertTrue(verifyObject(IPluginFactory, factory))
        self.assertTrue(verifyObject(IProxyPlugin, self.plugin))
        self.assertTrue(verifyObject(IStatusProvider, self.plugin))
        self.assertEqual(self.plugin.name, "blocklist")

    def test_blocked_invite_gets_403_with_warning_and_reason(self) -> None:
        request = parsed_request("INVITE", "sip:+19005550100@provider.example")
        _, response = self.received(request)
        assert isinstance(response, Response)
        self.assertEqual((response.status, response.reason), (403, "Forbidden"))
        warning = response.headers.get("Warning")
        assert warning is not None
        # the most specific prefix is named
        self.assertTrue(warning.startswith('399 sipproxy-blocklist "'), warning)
        self.assertIn("+19005 ", warning)
        self.assertEqual(
            response.headers.get("Reason"), 'SIP;cause=403;text="Blocked number prefix +19005"'
        )
        self.assertTrue(response.to.tag, "a final response from the proxy needs a To tag")
        self.assertEqual(response.call_id, request.call_id)
        self.assertEqual(str(response.cseq), "1 INVITE")
        self.assertEqual(response.headers.get_all("Via"), request.headers.get_all("Via"))
        self.assertEqual(self.plugin.blocked, {"+19005": 1})
        # the response is a valid SIP message
        again = parse_message(response.to_bytes())
        assert isinstance(again, Response)
        self.assertEqual(again.status, 403)

    def test_blocked_message_and_tel_uri(self) -> None:
        _, response = self.received(parsed_request("MESSAGE", "tel:0900-123"))
        assert isinstance(response, Response)
        self.assertEqual(response.status, 403)

    def test_allowed_invite_is_marked_when_forwarded(self) -> None:
        ctx, result = self.received(parsed_request("INVITE", "sip:+14155550100@provider.example"))
        self.assertIsNone(result)
        out = self.forwarded(ctx)
        self.assertEqual(out.headers.get_all(SCREENED_HEADER), [SCREENED_VALUE])
        self.assertIn(b"\r\nX-Screened: sipproxy-blocklist\r\n", out.to_bytes())

    def test_forged_mark_is_replaced(self) -> None:
        request = parsed_request(
            "INVITE", "sip:bob@provider.example", extra="x-screened: forged\r\n"
        )
        ctx, result = self.received(request)
        self.assertIsNone(result)
        self.assertEqual(self.forwarded(ctx).headers.get_all(SCREENED_HEADER), [SCREENED_VALUE])

    def test_unscreened_method_passes_unmarked_and_forged_mark_is_removed(self) -> None:
        request = parsed_request(
            "OPTIONS", "sip:0900123@provider.example", extra="X-Screened: forged\r\n"
        )
        ctx, result = self.received(request)
        self.assertIsNone(result)
        self.assertNotIn(SCREENED_HEADER, self.forwarded(ctx).headers)

    def test_in_dialog_request_is_not_screened(self) -> None:
        ctx, result = self.received(
            parsed_request("INVITE", "sip:0900123@192.0.2.9", to_tag="callee1")
        )
        self.assertIsNone(result)
        self.assertNotIn(SCREENED_HEADER, self.forwarded(ctx).headers)
        self.assertEqual(self.plugin.blocked, {})

    def test_configured_methods_only(self) -> None:
        plugin = build({"prefixes": ["0900"], "methods": ["INVITE"]})
        ctx = RequestContext(parsed_request("MESSAGE", "sip:0900123@provider.example"), None)
        self.assertIsNone(plugin.request_received(ctx))
        ctx = RequestContext(parsed_request("INVITE", "sip:0900123@provider.example"), None)
        self.assertIsInstance(plugin.request_received(ctx), Response)

    def test_prefix_must_match_at_the_start(self) -> None:
        for uri in ("sip:10900@provider.example", "sip:alice@provider.example",
                    "sip:090@provider.example", "sip:19005550100@provider.example"):
            _, result = self.received(parsed_request("INVITE", uri))
            self.assertIsNone(result, uri)

    def test_pipeline_calls_both_hooks(self) -> None:
        pipeline = Pipeline([self.plugin])
        ctx = RequestContext(parsed_request("INVITE", "sip:0900@provider.example"), None)
        result = pipeline.run("request_received", ctx)
        assert isinstance(result, Response)
        self.assertEqual(result.status, 403)
        ctx = RequestContext(parsed_request("INVITE", "sip:bob@provider.example"), None)
        self.assertIsNone(pipeline.run("request_received", ctx))
        branch = Branch(ctx.request.copy(), None, None)
        self.assertIsNone(pipeline.run("request_forwarding", ctx, branch))
        self.assertEqual(branch.request.headers.get_all(SCREENED_HEADER), [SCREENED_VALUE])


class ConfigTests(unittest.TestCase):
    def error(self, section: dict[str, Any]) -> str:
        with self.assertRaises(ConfigError) as caught:
            build(section)
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        return text

    def test_valid(self) -> None:
        plugin = build({"prefixes": ["0900", "+1900"], "methods": ["INVITE", "SUBSCRIBE"]})
        self.assertEqual(set(plugin.prefixes), {"0900", "+1900"})
        self.assertEqual(plugin.methods, {"INVITE", "SUBSCRIBE"})

    def test_default_methods(self) -> None:
        self.assertEqual(build({"prefixes": ["0900"]}).methods, {"INVITE", "MESSAGE"})

    def test_prefixes_required(self) -> None:
        self.assertEqual(self.error({}), "blocklist.toml: blocklist.prefixes: is required")

    def test_prefixes_not_empty(self) -> None:
        self.assertEqual(
            self.error({"prefixes": []}), "blocklist.toml: blocklist.prefixes: must not be empty"
        )

    def test_prefixes_must_be_an_array(self) -> None:
        self.assertEqual(
            self.error({"prefixes": "0900"}),
            'blocklist.toml: blocklist.prefixes: must be an array of strings, got "0900"',
        )

    def test_prefix_must_be_a_string(self) -> None:
        self.assertEqual(
            self.error({"prefixes": ["0900", 1900]}),
            "blocklist.toml: blocklist.prefixes[1]: must be a string, got 1900",
        )

    def test_prefix_must_be_digits(self) -> None:
        for bad in ("09-00", "premium", "1+900", "+", " 0900"):
            self.assertIn("blocklist.prefixes[1]: must be digits", self.error(
                {"prefixes": ["0900", bad]}
            ))

    def test_repeated_prefix(self) -> None:
        self.assertIn("blocklist.prefixes[1]", self.error({"prefixes": ["0900", "0900"]}))

    def test_unknown_key(self) -> None:
        self.assertIn(
            "blocklist.prefix: unknown key", self.error({"prefixes": ["0900"], "prefix": ["1"]})
        )

    def test_bad_methods(self) -> None:
        self.assertIn(
            "blocklist.methods[0]: must be a SIP method in upper case",
            self.error({"prefixes": ["0900"], "methods": ["invite"]}),
        )
        self.assertIn(
            "blocklist.methods[1]: ACK cannot be refused",
            self.error({"prefixes": ["0900"], "methods": ["INVITE", "ACK"]}),
        )
        self.assertIn(
            "blocklist.methods: must not be empty",
            self.error({"prefixes": ["0900"], "methods": []}),
        )

    def test_loaded_by_path_from_a_config_file(self) -> None:
        self.assertIs(find_factory("examples.blocklist_plugin:factory"), factory)
        config = parse_config(f'[plugins]\n{ENABLE}\n[blocklist]\nprefixes = ["0900"]\n', "p.toml")
        [plugin] = load_plugins(config, cast(Any, None))
        self.assertIsInstance(plugin, BlocklistPlugin)
        self.assertEqual(plugin.prefixes, ("0900",))

    def test_missing_section_named_in_the_error(self) -> None:
        config = parse_config(f"[plugins]\n{ENABLE}\n", "p.toml")
        with self.assertRaises(ConfigError) as caught:
            load_plugins(config, cast(Any, None))
        self.assertEqual(str(caught.exception), "p.toml: blocklist.prefixes: is required")


# -- through a proxy on a Clock (sipproxy.testing) -----------------------------------------------

PHONE = Source("UDP", "192.168.1.20", 5062, "192.168.1.1", 5060, "inside")
PROVIDER = Source("UDP", "203.0.113.50", 5060, "203.0.113.10", 5060, "outside")
PHONE_VIA = f"SIP/2.0/UDP {PHONE.host}:{PHONE.port};rport;branch=z9hG4bK-"


class ClockedProxyTests(unittest.SynchronousTestCase):
    """The plugin in a real proxy with in-memory transports: what the phone and the provider
    get, and nothing left running afterwards."""

    def setUp(self) -> None:
        self.harness = ProxyHarness.build({
            "listen": [
                {"side": "inside", "transport": "udp", "address": "192.168.1.1", "port": 5060},
                {"side": "outside", "transport": "udp", "address": "203.0.113.10", "port": 5060},
            ],
            "upstream": {"uri": f"sip:{PROVIDER.host}:5060"},
            "plugins": {"enabled": ["examples.blocklist_plugin:factory"]},
            "blocklist": {"prefixes": ["0900", "+1900"]},
        })

    def finals_to_phone(self) -> list[int]:
        return [r.status for r in self.harness.wire.responses_to(PHONE.host, "INVITE")
                if r.status >= 200]

    def test_blocked_invite_is_answered_and_never_reaches_the_provider(self) -> None:
        h = self.harness
        h.receive(sip_request("INVITE", "sip:+19005550100@provider.example",
                              via=PHONE_VIA + "b1", call_id="blocked"), PHONE)
        self.assertEqual(self.finals_to_phone(), [403])
        self.assertEqual(h.wire.requests_to(PROVIDER.host), [])
        h.settle()  # the 403 is retransmitted until Timer H: then the transaction is gone
        self.assertEqual(len(h.proxy.transactions), 0)

    def test_allowed_invite_is_marked_and_its_answer_comes_back(self) -> None:
        h = self.harness
        h.receive(sip_request("INVITE", "sip:+14155550100@provider.example",
                              via=PHONE_VIA + "a1", call_id="allowed"), PHONE)
        [out] = h.wire.requests_to(PROVIDER.host, "INVITE")
        self.assertEqual(out.headers.get_all(SCREENED_HEADER), [SCREENED_VALUE])
        h.receive(answer(out, 200, "provider-tag", (f"Contact: <sip:bob@{PROVIDER.host}>",)),
                  PROVIDER)
        self.assertEqual(self.finals_to_phone(), [200])
        h.settle()
        self.assertEqual(len(h.proxy.transactions), 0)


# -- end to end ----------------------------------------------------------------------------------


class UDPPeer(DatagramProtocol):
    """A SIP endpoint the test owns: collects what arrives, optionally answers requests."""

    def __init__(self, answer: Callable[[Request], Response | None] | None = None) -> None:
        self.answer = answer
        self.received: list[Message] = []
        self._waiters: list[tuple[Callable[[Message], bool], defer.Deferred[Message]]] = []

    def datagramReceived(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data)
        self.received.append(message)
        if isinstance(message, Request) and self.answer is not None:
            response = self.answer(message)
            if response is not None and self.transport is not None:
                self.transport.write(response.to_bytes(), addr)
        for waiter in list(self._waiters):
            if waiter[0](message):
                self._waiters.remove(waiter)
                waiter[1].callback(message)

    def expect(self, match: Callable[[Message], bool], timeout: float = 5.0) -> defer.Deferred[Any]:
        """The first message (already received or still to come) that ``match`` accepts."""
        for message in self.received:
            if match(message):
                return defer.succeed(message)
        d: defer.Deferred[Message] = defer.Deferred()
        self._waiters.append((match, d))
        return d.addTimeout(timeout, reactor)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.getHost().port)

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.write(data, (LOCAL, port))


def final_response(call_id: str) -> Callable[[Message], bool]:
    return lambda m: isinstance(m, Response) and m.call_id == call_id and m.status >= 200


def answer_200(request: Request) -> Response | None:
    if request.method != "INVITE":
        return None
    response = request.make_response(200)
    to = response.to.copy()
    to.tag = "upstream-tag"
    response.set_name_addr("To", to)
    response.headers.add("Contact", f"<sip:upstream@{LOCAL}>")
    return response


def e2e_config(upstream_port: int) -> Config:
    config = parse_config(
        f"""
        [[listen]]
        side = "inside"
        transport = "udp"
        address = "{LOCAL}"
        [upstream]
        uri = "sip:{LOCAL}:{upstream_port};transport=udp"
        [timers]  # short, so every transaction is gone soon after the test's traffic
        t1 = 0.01
        t2 = 0.08
        t4 = 0.05
        [plugins]
        {ENABLE}
        [blocklist]
        prefixes = ["0900", "+1900"]
        [admin]
        port = 0  # any free one: /metrics and /api/status show what the plugin blocked
        """,
        "e2e.toml",
    )
    # The config refuses port 0; TransportManager binds it and reports the real port.
    listen = tuple(dataclasses.replace(entry, port=0) for entry in config.listen)
    return dataclasses.replace(config, listen=listen)


async def http_get(url: str, timeout: float = 5.0) -> str:
    """The body of a GET of ``url`` (from the admin listener), within ``timeout`` seconds."""
    def get() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())

    return await threads.deferToThread(get)


async def drained(proxy: Any, timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy holds no transaction, so no timer outlives the test."""
    deadline = reactor.seconds() + timeout
    while len(proxy.transactions):
        if reactor.seconds() > deadline:
            raise AssertionError(f"{len(proxy.transactions)} transactions still alive")
        await deferLater(reactor, 0.02, lambda: None)


class EndToEndTests(unittest.TestCase):
    def udp_peer(self, answer: Callable[[Request], Response | None] | None = None) -> UDPPeer:
        peer = UDPPeer(answer)
        port = reactor.listenUDP(0, peer, interface=LOCAL)
        self.addCleanup(port.stopListening)
        return peer

    def test_blocked_and_allowed_invites(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._blocked_and_allowed())

    async def _blocked_and_allowed(self) -> None:
        upstream = self.udp_peer(answer_200)
        client = self.udp_peer()
        service = makeService(e2e_config(upstream.port), reactor)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        proxy = service.proxy
        [listener] = proxy.listeners
        self.assertNotEqual(listener.port, 0)
        via = f"SIP/2.0/UDP {LOCAL}:{client.port};rport;branch=z9hG4bK-"

        # blocked: 403 comes back to the caller; the ACK ends the server transaction
        blocked = sip_request(
            "INVITE", "sip:+19005550100@provider.example", via=via + "b1", call_id="blocked"
        )
        client.send(blocked, listener.port)
        response = await client.expect(final_response("blocked"))
        self.assertEqual(response.status, 403)
        self.assertIn("+1900", response.headers.get("Warning"))
        ack = (
            blocked.decode()
            .replace("INVITE sip:", "ACK sip:", 1)
            .replace("CSeq: 1 INVITE", "CSeq: 1 ACK")
            .replace(
                "To: <sip:+19005550100@provider.example>",
                f"To: <sip:+19005550100@provider.example>;tag={response.to.tag}",
            )
        )
        client.send(ack.encode(), listener.port)

        # allowed: reaches the upstream socket, marked (a forged mark replaced), 200 comes back
        client.send(
            sip_request(
                "INVITE", "sip:+14155550100@provider.example", via=via + "a1", call_id="allowed",
                extra="X-Screened: forged\r\n",
            ),
            listener.port,
        )
        invite = await upstream.expect(lambda m: isinstance(m, Request) and m.call_id == "allowed")
        self.assertEqual(invite.headers.get_all(SCREENED_HEADER), [SCREENED_VALUE])
        self.assertEqual(str(invite.uri), "sip:+14155550100@provider.example")
        self.assertEqual(len(invite.vias), 2)
        response = await client.expect(final_response("allowed"))
        self.assertEqual(response.status, 200)

        # the admin listener shows the refusal: in /metrics and in the plugin's /api section
        admin = service.getServiceNamed("admin")
        base = f"http://{LOCAL}:{admin.port.getHost().port}"
        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(await http_get(base + "/metrics"))
                   for s in family.samples}
        self.assertEqual(metrics[("sipproxy_refusals_total",
                                  (("plugin", "blocklist"), ("reason", "blocked_prefix")))], 1)
        self.assertEqual(metrics[("sipproxy_blocklist_blocked_total", (("prefix", "+1900"),))], 1)
        self.assertEqual(metrics[("sipproxy_sip_requests_received_total",
                                  (("method", "INVITE"),))], 2)
        status = json.loads(await http_get(base + "/api/status"))
        [section] = [p["status"] for p in status["plugins"] if p["name"] == "blocklist"]
        self.assertEqual(section["blocked"], {"+1900": 1})

        await drained(proxy)
        self.assertEqual(
            [m for m in upstream.received if m.call_id == "blocked"], [],
            "the blocked INVITE (or its ACK) reached the upstream",
        )
        await service.stopService()
