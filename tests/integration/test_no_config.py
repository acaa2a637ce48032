"""
The no-config default, as the README tells a new user to run it: ``twistd -n sipproxy`` with no
config file, in a network namespace of its own (so port 5060 is free) that has two addresses,
192.168.77.1 and 203.0.113.1 (the NAT topology's fw; its NAT rules play no part here). Two sipp
phones in two other namespaces register, each to a different one of the host's addresses, and
call each other by user name at the other address (the user part is the key). Both calls
complete through the proxy (Record-Route, BYE through it), and the log has no warning. The
admin listener, on by default at 127.0.0.1:8080 of the proxy's host, lists both phones where
they really are and has counted the INVITEs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.support.harness import SippResult
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    PHONE_IP,
    PROVIDER_IP,
    NatNet,
    NoConfigProxy,
    NsSipp,
)

pytestmark = [pytest.mark.netns]

SIP = 5060
TIMEOUT = 20.0


@pytest.fixture
def host(netns_ready: None, tmp_path: Path) -> Iterator[tuple[NatNet, NoConfigProxy]]:
    net = NatNet.build()
    try:
        proxy = NoConfigProxy(net.fw, {}, tmp_path / "proxy")
        proxy.start()
        try:
            yield net, proxy
        finally:
            proxy.stop()
    finally:
        net.close()


def _register(phone: NsSipp, user: str, registrar: str, contact_ip: str) -> SippResult:
    return phone.run_uac("register.xml", (registrar, SIP), count=1, timeout=TIMEOUT,
                         keys={"user": user, "domain": registrar,
                               "contact": f"sip:{user}@{contact_ip}:{SIP}", "expires": "600"})


def _call(caller: NsSipp, callee: NsSipp, via: str, ruri: str) -> tuple[SippResult, SippResult]:
    uas = callee.start_uas("uas_rr.xml", SIP, count=1, timeout=TIMEOUT)
    try:
        uac = caller.run_uac("uac_rr.xml", (via, SIP), count=1, timeout=TIMEOUT,
                             keys={"ruri": ruri})
    finally:
        server = uas.wait(TIMEOUT)
    return uac, server


def test_no_config_phones_register_and_call_each_other(
        host: tuple[NatNet, NoConfigProxy], tmp_path: Path) -> None:
    net, proxy = host
    alice = NsSipp(net.phone, tmp_path / "alice")
    bob = NsSipp(net.provider, tmp_path / "bob")
    results: dict[str, Any] = {}
    try:
        results["alice registers"] = _register(alice, "alice", FW_INSIDE, PHONE_IP)
        results["bob registers"] = _register(bob, "bob", FW_OUTSIDE, PROVIDER_IP)
        # each calls the other by user name at the address it registered to itself
        results["alice calls bob"] = _call(alice, bob, FW_INSIDE, f"sip:bob@{FW_INSIDE}")
        results["bob calls alice"] = _call(bob, alice, FW_OUTSIDE, f"sip:alice@{FW_OUTSIDE}")
    finally:
        alice.cleanup()
        bob.cleanup()
    log = proxy.log_text()
    for name, result in results.items():
        for one in result if isinstance(result, tuple) else (result,):
            assert one.ok(1), f"{name}: {one.describe()}\n{log[-4000:]}"
    assert "#warn" not in log and "#error" not in log and "#critical" not in log, log
    assert "advertised as the local address toward each peer" in log, log
    assert proxy.running()

    # the admin listener is on by default, on the proxy host's loopback, port 8080
    registrations = json.loads(_admin_get(net, "/api/registrations"))["registrations"]
    # (every address of the host is one domain: the registrar keys it as "localhost"; the
    # source is where sipp sent the REGISTER from)
    assert {(r["aor"], r["contact"], r["source"].partition(":")[0], r["transport"])
            for r in registrations} == {
        ("sip:alice@localhost", f"sip:alice@{PHONE_IP}:{SIP}", PHONE_IP, "udp"),
        ("sip:bob@localhost", f"sip:bob@{PROVIDER_IP}:{SIP}", PROVIDER_IP, "udp"),
    }, registrations
    # the status page does not pretend "0.0.0.0" is what the far side sees
    listeners = json.loads(_admin_get(net, "/api/listeners"))["listeners"]
    assert listeners and all(lst["address"] in ("0.0.0.0", "::") and lst["advertised"] is None
                             for lst in listeners), listeners
    invites = [s for family in text_string_to_metric_families(_admin_get(net, "/metrics"))
               for s in family.samples
               if s.name == "sipproxy_sip_requests_received_total"
               and s.labels == {"method": "INVITE"}]
    assert [s.value for s in invites] >= [2.0], invites


def _admin_get(net: NatNet, path: str) -> str:
    """GET ``path`` from http://127.0.0.1:8080 inside the proxy's namespace."""
    fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
             f"'http://127.0.0.1:8080{path}', timeout=5).read().decode())")
    return net.fw.run(sys.executable, "-c", fetch, timeout=15).stdout
