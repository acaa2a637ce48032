"""The ``[admin]`` listener: its config rule, /metrics, /api/..., the token, a taken port.

The HTTP tests start the real proxy service (UDP on 127.0.0.1, any free port) with its admin
listener on 127.0.0.1 port 0, send it real SIP and read the answers over real HTTP.
"""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sipproxy.admin.metrics import merge_families
from sipproxy.admin.status import StatusModel
from sipproxy.config import ConfigError, parse_config
from sipproxy.interfaces import IStatusProvider
from sipproxy.location import Binding
from sipproxy.message import Source
from sipproxy.pipeline import Plugin
from sipproxy.plugins.nat import NatPlugin
from sipproxy.service import SipProxyService, makeService
from sipproxy.testing import ProxyHarness, answer, sip_request
from tests.nat_site import FIREWALL, OUTSIDE, PHONE, PROVIDER, PROVIDER_IP

reactor: Any = _reactor
LOCAL = "127.0.0.1"


# -- the config rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0", "192.168.1.1", "::", "2001:db8::1"])
def test_a_non_loopback_address_without_a_token_is_refused_in_one_line(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[admin]\naddress = "{address}"\n', "p.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("p.toml: admin.token: is required to listen on ")
    assert address in message


@pytest.mark.parametrize("text", [
    '[admin]\naddress = "0.0.0.0"\ntoken = "s3cret"\n',
    '[admin]\naddress = "0.0.0.0"\nenabled = false\n',
    '[admin]\naddress = "::1"\n',
    '[admin]\naddress = "127.0.0.2"\nport = 9100\n',
])
def test_loopback_or_a_token_or_off_is_accepted(text: str) -> None:
    parse_config(text, "p.toml")


def test_defaults_and_bad_values() -> None:
    admin = parse_config("").admin
    assert (admin.enabled, admin.address, admin.port, admin.token) == (
        True, "127.0.0.1", 8080, None)
    for text, problem in [
        ('[admin]\ntoken = ""\n', "p.toml: admin.token: must not be empty"),
        ("[admin]\nport = 70000\n", "p.toml: admin.port: must be an integer from 0 to 65535"),
        ('[admin]\naddress = "localhost"\n', "p.toml: admin.address: "),
        ("[admin]\nenabled = 1\n", "p.toml: admin.enabled: must be true or false, got 1"),
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(text, "p.toml")
        assert str(info.value).startswith(problem)


# -- the status model without sockets: what the nat plugin adds -----------------------------------


def test_a_phone_registered_at_the_provider_through_the_nat_plugin_is_listed() -> None:
    harness = ProxyHarness.build(FIREWALL)
    [nat] = [p for p in harness.plugins if isinstance(p, NatPlugin)]
    assert verifyObject(IStatusProvider, nat)
    harness.receive(sip_request(
        "REGISTER", "sip:provider.example",
        via=f"SIP/2.0/UDP {PHONE.host}:5060;rport;branch=z9hG4bKr1",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        call_id="reg-1", headers=[f"Contact: <sip:alice@{PHONE.host}:5060>", "Expires: 600"],
    ), PHONE)
    [register] = harness.wire.requests_to(PROVIDER_IP, "REGISTER")
    [contact] = register.contacts
    status = StatusModel(harness.proxy).status()
    assert status["registrations"] == []  # not before the provider accepted it
    harness.receive(answer(register, 200, "p1", [f"Contact: <{contact.uri}>;expires=300"]),
                    PROVIDER)
    harness.advance(10)
    status = StatusModel(harness.proxy).status()
    [registration] = status["registrations"]
    assert registration == {
        "aor": "sip:alice@provider.example",
        "contact": str(contact.uri),
        "source": f"{PHONE.host}:{PHONE.port}",
        "transport": "udp",
        "expires_in": 290,
        "user_agent": None,
    }
    assert str(contact.uri).startswith("sip:nat-") and f"@{OUTSIDE}:5060" in str(contact.uri)
    [plugin] = [p for p in status["plugins"] if p["name"] == "nat"]
    assert plugin["status"]["mappings"] == 1
    assert "registrations" not in plugin["status"]  # merged into the top-level list
    json.dumps(status)  # JSON-able as it is

    # unregistered: gone at once
    harness.receive(sip_request(
        "REGISTER", "sip:provider.example",
        via=f"SIP/2.0/UDP {PHONE.host}:5060;rport;branch=z9hG4bKr2",
        from_="<sip:alice@provider.example>;tag=r1", to="<sip:alice@provider.example>",
        call_id="reg-1", cseq=2,
        headers=[f"Contact: <sip:alice@{PHONE.host}:5060>", "Expires: 0"],
    ), PHONE)
    unregister = harness.wire.requests_to(PROVIDER_IP, "REGISTER")[-1]
    harness.receive(answer(unregister, 200, "p1", [f"Contact: <{contact.uri}>;expires=0"]),
                    PROVIDER)
    assert StatusModel(harness.proxy).status()["registrations"] == []


# -- over HTTP -------------------------------------------------------------------------------------


def proxy_config(admin: str = "port = 0", plugins: str = "") -> str:
    return f"""
[proxy]
domains = ["example.com"]
[[listen]]
address = "{LOCAL}"
port = 0
[dns]
servers = []
[timers]
t1 = 0.01
t2 = 0.08
t4 = 0.05
[admin]
{admin}
{plugins}
"""


def http_get(url: str, headers: Mapping[str, str] | None = None,
             timeout: float = 5.0) -> defer.Deferred[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of a GET, in a thread (urllib blocks), within ``timeout``."""
    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    return threads.deferToThread(get)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class _SipPeer:
    """A UDP socket that sends SIP to the proxy and reads its answers (blocking, bounded)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCAL, 0))
        self.sock.settimeout(5.0)
        self.port = self.sock.getsockname()[1]

    def request(self, method: str, proxy_port: int, n: int, extra: Iterable[str] = ()) -> bytes:
        via = f"SIP/2.0/UDP {LOCAL}:{self.port};rport;branch=z9hG4bK-adm{method}{n}"
        # OPTIONS to the proxy itself (it answers), REGISTER to its domain
        uri = f"sip:{LOCAL}:{proxy_port}" if method == "OPTIONS" else "sip:example.com"
        data = sip_request(method, uri, via=via,
                           from_=f"<sip:alice@example.com>;tag=t{n}",
                           to="<sip:alice@example.com>", call_id=f"adm-{method}-{n}",
                           headers=list(extra))
        self.sock.sendto(data, (LOCAL, proxy_port))
        return self.sock.recv(65536)

    def close(self) -> None:
        self.sock.close()


class AdminHttpTests(unittest.TestCase):
    def start(self, text: str) -> SipProxyService:
        service = makeService(parse_config(text, "admin.toml"), reactor)
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def base(self, service: SipProxyService) -> str:
        port = service.getServiceNamed("admin").port
        assert port is not None
        return f"http://{LOCAL}:{port.getHost().port}"

    @defer.inlineCallbacks
    def test_metrics_move_with_sip_traffic_and_api_shows_the_state(self) -> Any:
        service = self.start(proxy_config())
        proxy = service.proxy
        base = self.base(service)
        code, headers, body = yield http_get(base + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))
        before = samples(body.decode())
        self.assertIn(("process_cpu_seconds_total", ()), before)  # the standard process metrics
        self.assertEqual(before[("sipproxy_registrar_bindings", ())], 0)

        peer = _SipPeer()
        self.addCleanup(peer.close)
        listener = proxy.listeners[0].port
        for n in range(3):
            reply = yield threads.deferToThread(peer.request, "OPTIONS", listener, n)
            self.assertTrue(reply.startswith(b"SIP/2.0 200"), reply[:40])
        reply = yield threads.deferToThread(
            peer.request, "REGISTER", listener, 9,
            [f"Contact: <sip:alice@{LOCAL}:{peer.port}>", "Expires: 600", "User-Agent: unit"])
        self.assertTrue(reply.startswith(b"SIP/2.0 200"), reply[:40])

        _, _, body = yield http_get(base + "/metrics")
        after = samples(body.decode())
        received = "sipproxy_sip_requests_received_total"
        self.assertEqual(after[(received, (("method", "OPTIONS"),))]
                         - before[(received, (("method", "OPTIONS"),))], 3)
        self.assertEqual(after[(received, (("method", "REGISTER"),))], 1)
        self.assertEqual(after[("sipproxy_sip_responses_sent_total", (("code", "200"),))], 4)
        self.assertEqual(after[("sipproxy_registrar_bindings", ())], 1)

        # a ban and a dialog, as the flood guard and a 2xx would make them
        flood = proxy.flood
        assert flood is not None
        flood.ban("198.51.100.7", "over 20 messages/s")
        dialog, _ = proxy.dialogs.establish("call-1", "a", "b", "inside", "inside")
        dialog.from_uri, dialog.to_uri = "sip:alice@example.com", "sip:bob@example.com"
        self.addCleanup(proxy.dialogs.end_all)

        code, headers, body = yield http_get(base + "/api/status")
        self.assertEqual(code, 200)
        self.assertEqual(headers["Content-Type"], "application/json; charset=utf-8")
        status = json.loads(body)
        self.assertEqual(set(status), {"now", "registrations", "calls", "bans", "listeners",
                                       "plugins"})
        [registration] = status["registrations"]
        self.assertEqual(registration["aor"], "sip:alice@example.com")
        self.assertEqual(registration["contact"], f"sip:alice@{LOCAL}:{peer.port}")
        self.assertEqual(registration["source"], f"{LOCAL}:{peer.port}")
        self.assertEqual(registration["transport"], "udp")
        self.assertEqual(registration["user_agent"], "unit")
        self.assertTrue(590 <= registration["expires_in"] <= 600, registration)
        [call] = status["calls"]
        self.assertEqual((call["call_id"], call["from"], call["to"], call["state"], call["media"]),
                         ("call-1", "sip:alice@example.com", "sip:bob@example.com",
                          "established", []))
        [ban] = status["bans"]
        self.assertEqual((ban["source"], ban["reason"]), ("198.51.100.7", "over 20 messages/s"))
        self.assertTrue(0 < ban["time_left"] <= flood.ban_time)
        self.assertEqual(status["listeners"], [{
            "transport": "udp", "address": LOCAL, "port": listener, "side": "inside",
            "advertised": LOCAL}])

        for part in ("registrations", "bans", "listeners", "plugins", "calls"):
            code, _, body = yield http_get(f"{base}/api/{part}")
            self.assertEqual(code, 200)
            alone = json.loads(body)
            self.assertEqual(set(alone), {"now", part})
            if part not in ("calls", "bans"):  # (their time goes on)
                self.assertEqual(alone[part], status[part])
        self.assertGreater(alone["calls"][0]["duration"], call["duration"])
        code, _, _ = yield http_get(base + "/api/nothing")
        self.assertEqual(code, 404)

        _, _, body = yield http_get(base + "/metrics")
        final = samples(body.decode())
        self.assertEqual(final[("sipproxy_flood_bans_active", ())], 1)
        self.assertEqual(final[("sipproxy_flood_events_total", (("event", "banned"),))], 1)
        self.assertEqual(final[("sipproxy_dialogs_active", ())], 1)

    @defer.inlineCallbacks
    def test_the_token_is_required_as_bearer_or_basic_auth(self) -> Any:
        service = self.start(proxy_config('port = 0\ntoken = "s3cret"'))
        base = self.base(service)
        for path in ("/", "/metrics", "/api/status"):
            code, headers, _ = yield http_get(base + path)
            self.assertEqual(code, 401, path)
            self.assertEqual(headers["WWW-Authenticate"], 'Basic realm="sipproxy admin"')
            code, _, _ = yield http_get(base + path, {"Authorization": "Bearer wrong"})
            self.assertEqual(code, 401, path)
        code, _, body = yield http_get(base + "/api/calls", {"Authorization": "Bearer s3cret"})
        self.assertEqual((code, json.loads(body)["calls"]), (200, []))
        basic = base64.b64encode(b"anyone:s3cret").decode()
        code, _, body = yield http_get(base + "/metrics", {"Authorization": f"Basic {basic}"})
        self.assertEqual(code, 200)
        self.assertIn(b"sipproxy_dialogs_active", body)
        wrong = base64.b64encode(b"s3cret:nope").decode()
        code, _, _ = yield http_get(base + "/metrics", {"Authorization": f"Basic {wrong}"})
        self.assertEqual(code, 401)

    @defer.inlineCallbacks
    def test_a_taken_port_is_one_error_line_and_sip_goes_on(self) -> Any:
        taken = socket.socket()
        taken.bind((LOCAL, 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        service = self.start(proxy_config(f"port = {port}"))
        self.assertIsNone(service.getServiceNamed("admin").port)
        errors = [e for e in lines if e.get("log_namespace") == "sipproxy.admin"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["log_level"].name, "error")
        self.assertIn(f"cannot listen on {LOCAL}:{port}", errors[0]["log_format"].format(
            **errors[0]))
        peer = _SipPeer()
        self.addCleanup(peer.close)
        reply = yield threads.deferToThread(peer.request, "OPTIONS",
                                            service.proxy.listeners[0].port, 1)
        self.assertTrue(reply.startswith(b"SIP/2.0 200"))

    @defer.inlineCallbacks
    def test_two_proxies_in_one_process_each_have_their_own_metrics(self) -> Any:
        first, second = self.start(proxy_config()), self.start(proxy_config())
        peer = _SipPeer()
        self.addCleanup(peer.close)
        yield threads.deferToThread(peer.request, "OPTIONS", first.proxy.listeners[0].port, 1)
        options = ("sipproxy_sip_requests_received_total", (("method", "OPTIONS"),))
        _, _, body = yield http_get(self.base(first) + "/metrics")
        self.assertEqual(samples(body.decode())[options], 1)
        _, _, body = yield http_get(self.base(second) + "/metrics")
        self.assertEqual(samples(body.decode())[options], 0)

    @defer.inlineCallbacks
    def test_plugin_sections_and_metrics_and_a_failing_plugin(self) -> Any:
        service = self.start(proxy_config(plugins=(
            '[plugins]\nenabled = ["tests.test_admin:good", "tests.test_admin:broken"]')))
        base = self.base(service)
        lines: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(lines.append)
        self.addCleanup(globalLogPublisher.removeObserver, lines.append)
        _, _, body = yield http_get(base + "/api/plugins")
        plugins = json.loads(body)["plugins"]
        self.assertEqual(plugins, [{"name": "good", "status": {"widgets": 3}},
                                   {"name": "broken", "status": None}])
        code, _, body = yield http_get(base + "/metrics")
        self.assertEqual(code, 200)
        found = samples(body.decode())
        self.assertEqual(found[("sipproxy_good_widgets", ())], 3)
        self.assertIn(("sipproxy_dialogs_active", ()), found)  # the rest is still there
        failures = [e for e in lines if "failed" in e.get("log_format", "")]
        self.assertEqual(len(failures), 2)  # status() and metrics() of "broken", one line each
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_the_proxy_stops_its_admin_listener(self) -> defer.Deferred[None]:
        service = self.start(proxy_config())
        admin = service.getServiceNamed("admin")
        number = admin.port.getHost().port

        @defer.inlineCallbacks
        def check() -> Any:
            yield service.stopService()
            self.assertIsNone(admin.port)
            yield deferLater(reactor, 0, lambda: None)
            probe = socket.socket()
            self.addCleanup(probe.close)
            probe.bind((LOCAL, number))  # free again

        return check()


# -- plugins for the tests above (loaded by "tests.test_admin:good") -----------------------------


@implementer(IStatusProvider)
class _GoodPlugin(Plugin):
    name = "good"

    def metrics(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("sipproxy_good_widgets", "Widgets.")
        family.add_metric([], 3)
        return [family]

    def status(self) -> Mapping[str, Any]:
        return {"widgets": 3}


@implementer(IStatusProvider)
class _BrokenPlugin(Plugin):
    name = "broken"

    def metrics(self) -> Iterable[Metric]:
        raise RuntimeError("metrics broke")

    def status(self) -> Mapping[str, Any]:
        raise RuntimeError("status broke")


class _Factory:
    def __init__(self, plugin: type[Plugin]) -> None:
        self.plugin = plugin
        self.name = plugin.name

    def build(self, core: Any, section: Any) -> Plugin:
        return self.plugin()


good = _Factory(_GoodPlugin)
broken = _Factory(_BrokenPlugin)


def test_families_of_one_name_are_merged() -> None:
    a = GaugeMetricFamily("x", "X.", labels=["plugin"])
    a.add_metric(["one"], 1)
    b = GaugeMetricFamily("x", "X.", labels=["plugin"])
    b.add_metric(["two"], 2)
    c = GaugeMetricFamily("y", "Y.")
    [x, y] = merge_families([a, c, b])
    assert [(s.labels, s.value) for s in x.samples] == [({"plugin": "one"}, 1),
                                                        ({"plugin": "two"}, 2)]
    assert y is c


def test_a_binding_of_the_registrar_is_shown_with_its_source() -> None:
    harness = ProxyHarness.build("[proxy]\ndomains = [\"example.com\"]\n")
    now = harness.clock.seconds()
    harness.location.add_or_update(Binding(
        "sip:bob@example.com", "sip:bob@10.0.0.5:5060", now + 100,
        source=Source("TCP", "2001:db8::5", 40000)))
    [registration] = StatusModel(harness.proxy).status(["registrations"])["registrations"]
    assert registration["source"] == "[2001:db8::5]:40000"
    assert registration["transport"] == "tcp"
    assert registration["expires_in"] == 100


def test_calls_not_answered_yet_are_listed_trying_then_ringing_until_answered_or_failed(
) -> None:
    """An INVITE the proxy works on is a call ``trying`` (a 100 only), then ``ringing`` (a 180
    went to the caller), its duration counted from its arrival by the proxy's clock; answered,
    it is the dialog's row; refused, it is gone."""
    harness = ProxyHarness.build(FIREWALL)
    hold = _HoldAnswers()
    harness.proxy.set_plugins([*harness.plugins, hold])

    def invite(call_id: str) -> Any:
        harness.receive(sip_request(
            "INVITE", "sip:bob@provider.example",
            via=f"SIP/2.0/UDP {PHONE.host}:5060;rport;branch=z9hG4bK{call_id}",
            from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
            call_id=call_id, headers=[f"Contact: <sip:alice@{PHONE.host}:5060>"],
        ), PHONE)
        return harness.wire.requests_to(PROVIDER_IP, "INVITE")[-1]

    def calls() -> list[tuple[str, str, float]]:
        shown = StatusModel(harness.proxy).status(["calls"])["calls"]
        json.dumps(shown)
        return [(c["call_id"], c["state"], c["duration"]) for c in shown]

    first = invite("c1")
    harness.advance(1.5)
    second = invite("c2")
    harness.advance(0.5)
    assert calls() == [("c1", "trying", 2.0), ("c2", "trying", 0.5)]
    [shown, _] = StatusModel(harness.proxy).status(["calls"])["calls"]
    assert (shown["from"], shown["to"], shown["media"]) == (
        "sip:alice@provider.example", "sip:bob@provider.example", [])
    harness.receive(answer(first, 180, "b1", [f"Contact: <sip:bob@{PROVIDER_IP}>"]), PROVIDER)
    harness.advance(1)
    assert calls() == [("c1", "ringing", 3.0), ("c2", "trying", 1.5)]

    harness.receive(answer(second, 486, "b2"), PROVIDER)  # refused: gone
    assert calls() == [("c1", "ringing", 3.0)]
    harness.receive(answer(first, 200, "b1", [f"Contact: <sip:bob@{PROVIDER_IP}>"]), PROVIDER)
    assert calls() == [("c1", "answered", 3.0)]  # a plugin still works on the 200
    hold.held.callback(None)
    harness.advance(1)
    assert calls() == [("c1", "established", 1.0)]  # the dialog's row, from the answer on

    invite("c3")  # the caller gives up: gone at its CANCEL
    assert [c[:2] for c in calls()[1:]] == [("c3", "trying")]
    harness.receive(sip_request(
        "CANCEL", "sip:bob@provider.example",
        via=f"SIP/2.0/UDP {PHONE.host}:5060;rport;branch=z9hG4bKc3",
        from_="<sip:alice@provider.example>;tag=a1", to="<sip:bob@provider.example>",
        call_id="c3", cseq=1), PHONE)
    assert calls()[1:] == []


class _HoldAnswers(Plugin):
    """Holds the first 2xx in ``response_received`` until :attr:`held` fires (as a plugin that
    asks a media relay first does)."""

    name = "hold"

    def __init__(self) -> None:
        self.held: defer.Deferred[None] = defer.Deferred()

    def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
        return self.held if 200 <= response.status < 300 and not self.held.called else None


def test_a_listener_on_every_address_shows_no_fixed_advertised_address() -> None:
    # It names the local address of the route toward each peer, so "0.0.0.0" would be wrong;
    # an ``advertise`` given, or a listener on one address, is named as configured.
    harness = ProxyHarness.build(
        '[proxy]\ndomains = ["example.com"]\n'
        '[[listen]]\nside = "inside"\ntransport = "udp"\naddress = "0.0.0.0"\nport = 5060\n'
        '[[listen]]\nside = "inside"\ntransport = "tcp"\naddress = "0.0.0.0"\nport = 5060\n'
        'advertise = "192.0.2.7"\n'
        '[[listen]]\nside = "outside"\ntransport = "udp"\naddress = "192.0.2.8"\nport = 5070\n')
    listeners = StatusModel(harness.proxy).status(["listeners"])["listeners"]
    assert [(lst["transport"], lst["address"], lst["advertised"]) for lst in listeners] == [
        ("udp", "0.0.0.0", None), ("tcp", "0.0.0.0", "192.0.2.7"),
        ("udp", "192.0.2.8", "192.0.2.8")]
