"""
The admin listener of a real proxy process while real sipp phones use it (loopback).

A sipp phone registers; a sipp caller places calls that stay up a few seconds through the proxy
to a sipp callee. While they are up, ``/api/calls`` lists them and ``/metrics`` counts them as
active dialogs; afterwards the request and response counters have moved by what the phones
sent, parsed with ``prometheus_client``'s own parser, and ``/api/registrations`` shows the
phone where it really is.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.support.harness import LOOPBACK, Sipp, free_port, wait_for

DOMAIN = "lan.example"
CALLS = 4
HOLD_MS = 3000


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


def _metrics(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = _get(base + "/metrics").decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _api(base: str, part: str) -> Any:
    return json.loads(_get(f"{base}/api/{part}"))[part]


def _by_method(metrics: dict[Any, float], name: str, method: str) -> float:
    return metrics.get((name, (("method", method),)), 0.0)


def test_counters_move_and_the_api_shows_calls_and_registrations(
    proxy_factory: Any, sipp: Sipp
) -> None:
    uas_port, admin_port = free_port(), free_port()
    proxy = proxy_factory({
        "proxy": {"domains": [DOMAIN]},
        "listen": [{"side": "inside", "transport": "udp", "address": LOOPBACK,
                    "port": free_port()}],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port};transport=udp"},
        "admin": {"address": LOOPBACK, "port": admin_port},
    })
    base = f"http://{LOOPBACK}:{admin_port}"
    before = _metrics(base)
    assert ("process_resident_memory_bytes", ()) in before

    phone_port = free_port()
    register = sipp.run_uac("register.xml", proxy.address(), count=1, local_port=phone_port,
                            keys={"user": "alice", "domain": DOMAIN,
                                  "contact": f"sip:alice@{LOOPBACK}:{phone_port}",
                                  "expires": "600"}, timeout=15)
    assert register.ok(1), register.describe()
    [registration] = _api(base, "registrations")
    assert registration["aor"] == f"sip:alice@{DOMAIN}"
    assert registration["source"] == f"{LOOPBACK}:{phone_port}"
    assert registration["transport"] == "udp"
    assert 590 <= registration["expires_in"] <= 600

    uas = sipp.start_uas("uas_rr.xml", uas_port, count=CALLS, timeout=30)
    uac = sipp.start_uac("uac_rr.xml", proxy.address(), rate=10, count=CALLS,
                         call_duration_ms=HOLD_MS, timeout=30,
                         keys={"ruri": f"sip:service@{LOOPBACK}:{uas_port}"})
    # all calls up at once (they last 3 s, the last starts 0.3 s after the first; a call
    # listed but still being answered shows as "trying"/"ringing"/"answered" until its 2xx)
    def all_established() -> bool:
        listed = _api(base, "calls")
        return len(listed) == CALLS and {c["state"] for c in listed} == {"established"}

    wait_for(all_established, limit=HOLD_MS / 1000)
    calls = _api(base, "calls")
    assert {c["state"] for c in calls} == {"established"}, calls
    assert all(c["to"] == f"sip:service@{LOOPBACK}:{uas_port}" for c in calls)
    assert all(c["from"].startswith("sip:caller@") for c in calls)
    assert len({c["call_id"] for c in calls}) == CALLS
    assert _metrics(base)[("sipproxy_dialogs_active", ())] == CALLS

    caller = uac.wait(30)
    callee = uas.wait(15)
    assert caller.ok(CALLS), caller.describe()
    assert callee.ok(CALLS), callee.describe()
    wait_for(lambda: _api(base, "calls") == [], limit=5)

    after = _metrics(base)
    received, sent = "sipproxy_sip_requests_received_total", "sipproxy_sip_requests_sent_total"
    for method in ("INVITE", "ACK", "BYE"):
        # (a retransmission, on a loaded machine, counts too)
        assert _by_method(after, received, method) - _by_method(before, received, method) \
            >= CALLS, method
        assert _by_method(after, sent, method) - _by_method(before, sent, method) >= CALLS
    assert _by_method(after, received, "REGISTER") - _by_method(before, received, "REGISTER") \
        >= 1
    ok_sent = after[("sipproxy_sip_responses_sent_total", (("code", "200"),))]
    assert ok_sent >= 2 * CALLS + 1  # 200 to each INVITE and BYE, and to the REGISTER
    assert after[("sipproxy_sip_responses_received_total", (("code", "180"),))] >= CALLS
    assert after[("sipproxy_dialogs_active", ())] == 0
    assert after[("sipproxy_registrar_bindings", ())] == 1
    assert ("sipproxy_transactions_active", (("kind", "server"),)) in after
    assert proxy.running(), proxy.log_tail()
