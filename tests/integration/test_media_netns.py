"""
The media plugin end to end, across the real NAT of tests/integration/support/netns.py.

The phone (sipp in ``phone``, 192.168.77.10) calls the provider (sipp in ``provider``,
203.0.113.50) through the proxy on ``fw`` and plays 8 s of G.711 from Debian's sip-tester pcap;
the provider echoes every RTP packet back (``-rtp_echo``). Both use media ports in the range fw
does not forward (UDP 10000-20000), so RTP can only flow through the relay on fw. Halfway the
phone holds (re-INVITE a=sendonly) and resumes. Packet captures on both of fw's veths show
what each side got. Three relays, one test each: the relay in the proxy's process, the
standalone relay (``twist sipproxy-relay``) over NG, and Debian's rtpengine (userspace). And
the admin listener's view of such a call: ``/api/calls`` while the media flows, ``/metrics``
after.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.support.harness import wait_for
from tests.integration.support.netns import (
    RTP_PORTS,
    NatNet,
)
from tests.integration.support.relays import (
    PCAP,
    PHONE_RTP,
    PROVIDER_RTP,
    RelayProcess,
    describe_sip,
    judge,
    media_config,
    open_relay_ports,
    rtpengine,
    rtpengine_unavailable,
    standalone_relay,
    start_media_call,
)
from tests.integration.support.sites import pair, start_site

pytestmark = [pytest.mark.netns]


@pytest.fixture
def media_net(netns_ready: None) -> Iterator[NatNet]:
    if not PCAP.exists():
        pytest.skip(f"{PCAP} is missing (Debian package sip-tester)")
    with NatNet.build() as net:
        yield net


def media_call(net: NatNet, workdir: Path, relay: str) -> None:
    # both ends' RTP ports are in the range fw drops: the relay is the only path
    assert all(RTP_PORTS[0] <= p <= RTP_PORTS[1] for p in (PHONE_RTP, PROVIDER_RTP))
    nft_before = net.fw.run("nft", "list", "ruleset").stdout
    process: RelayProcess | None = None
    if relay == "ng":
        process = standalone_relay(net.fw, workdir).start()
    elif relay == "rtpengine":
        process = rtpengine(net.fw, workdir).start()
    site = start_site(net, workdir, media_config(relay))
    try:
        uas, uac = start_media_call(site)
        server, client = pair(uas, uac)
        site.capture.settle()
        logs = site.logs() + (process.log_tail() if process is not None else "") + "\n" + \
            describe_sip(site.capture.snapshot())
        assert client.ok(1), f"{client.describe()}\n{logs}"
        assert server.ok(1), f"{server.describe()}\n{logs}"
        site.capture.settle()

        # after the BYE: no relay port is open on fw (bounded wait for the close)
        wait_for(lambda: not open_relay_ports(net.fw))
        assert open_relay_ports(net.fw) == [], logs
        if process is not None:
            assert process.command({"command": "list"}).get("calls") in ([], None), logs
        judge(site.capture.snapshot(), net, logs)
        # the relay added no firewall rule, and none is left
        assert net.fw.run("nft", "list", "ruleset").stdout == nft_before
    finally:
        site.stop()
        if process is not None:
            process.stop()


def test_media_through_the_builtin_relay(media_net: NatNet, tmp_path: Path) -> None:
    """The relay in the proxy's process (``[media]`` with the default ``relay = "builtin"``)."""
    media_call(media_net, tmp_path, "builtin")


def test_media_through_the_standalone_relay_over_ng(media_net: NatNet, tmp_path: Path) -> None:
    """``twist sipproxy-relay`` on fw, driven over NG (``relay = "ng:127.0.0.1:2223"``)."""
    media_call(media_net, tmp_path, "ng")


def test_media_through_rtpengine(media_net: NatNet, tmp_path: Path) -> None:
    """Debian's rtpengine-daemon on fw in userspace mode (no kernel module), over NG."""
    reason = rtpengine_unavailable()
    if reason is not None:
        pytest.skip(reason)
    media_call(media_net, tmp_path, "rtpengine")


ADMIN = "http://127.0.0.1:8081"


def _admin_get(net: NatNet, path: str) -> str:
    """GET ``path`` from the proxy's admin listener, inside fw (where it listens)."""
    fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
             f"'{ADMIN}{path}', timeout=5).read().decode())")
    return net.fw.run(sys.executable, "-c", fetch, timeout=15).stdout


def test_the_admin_api_shows_the_media_of_a_call_while_it_flows(
        media_net: NatNet, tmp_path: Path) -> None:
    """While the phone plays its 8 s and the provider echoes them, ``/api/calls`` has the call
    with both directions' packets rising through the built-in relay; after the BYE the call is
    gone and ``/metrics`` has counted the packets by the sender's interface; no RTP packet was
    lost either way (by sequence number)."""
    net = media_net
    config = media_config("builtin")
    config["admin"] = {"address": "127.0.0.1", "port": 8081}
    site = start_site(net, tmp_path, config)
    seen: list[dict[str, Any]] = []

    def flowing() -> bool:
        calls = json.loads(_admin_get(net, "/api/calls"))["calls"]
        seen[:] = calls
        return len(calls) == 1 and len(calls[0]["media"]) == 2 and all(
            m["packets"] > 50 and m["last_packet_age"] is not None
            and m["last_packet_age"] < 1.0 for m in calls[0]["media"])

    try:
        uas, uac = start_media_call(site)
        wait_for(flowing, limit=6.0)
        assert flowing(), seen
        [call] = seen
        assert call["to"] == "sip:bob@provider.example" and call["from"].startswith("sip:caller@")
        assert call["state"] == "established" and call["duration"] > 0
        assert [(m["direction"], m["media"], m["path"]) for m in call["media"]] == [
            ("caller->callee", "audio", "userspace"), ("callee->caller", "audio", "userspace")]
        first = {m["direction"]: m["packets"] for m in call["media"]}
        wait_for(lambda: flowing() and all(m["packets"] > first[m["direction"]] + 25
                                           for m in seen[0]["media"]), limit=3.0)
        assert all(m["packets"] > first[m["direction"]] + 25 for m in seen[0]["media"]), seen
        # the pcap's RTP over veths in order: nothing lost either way, by sequence number
        assert [m["lost"] for m in seen[0]["media"]] == [0, 0], seen

        server, client = pair(uas, uac)
        assert client.ok(1), f"{client.describe()}\n{site.logs()}"
        assert server.ok(1), f"{server.describe()}\n{site.logs()}"
        wait_for(lambda: json.loads(_admin_get(net, "/api/calls"))["calls"] == [], limit=5.0)
        assert json.loads(_admin_get(net, "/api/calls"))["calls"] == []
        samples = [s for family in text_string_to_metric_families(_admin_get(net, "/metrics"))
                   for s in family.samples if s.labels.get("path") == "userspace"]
        packets = {s.labels["interface"]: s.value for s in samples
                   if s.name == "sipproxy_relay_packets_total"}
        assert packets["inside"] > 100 and packets["outside"] > 100, packets
        lost = {s.labels["interface"]: s.value for s in samples
                if s.name == "sipproxy_relay_packets_lost_total"}
        assert lost == {"inside": 0, "outside": 0}, lost
    finally:
        site.stop()
