"""
A SIP trunk on a carrier's private network, end to end: the provider is on a private address
(10.97.0.150) reached through the firewall's outside interface (10.97.0.1 on the same /24), the
phones on the LAN (192.168.77.0/24) behind the inside one. By address class both networks are
"inside"; by the route the kernel takes, the provider is outside, and that is what counts.

The real proxy runs in ``fw`` with the ``nat`` plugin at its default ``inside_networks`` (every
private range, 10.97.0.0/24 included) and the ``media`` plugin; sipp is the phone and the
provider (tests/integration/support/sites.py). The phone registers through the proxy (with the
provider's digest challenge) and calls both ways; a capture on fw's outside veth shows that
every SIP message to the provider left from the outside listener (10.97.0.1:5060, not the inside
socket masqueraded), naming nothing of the inside, and that the relay offered the provider its
outside address.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sipproxy.message import Request, Response
from sipproxy.sdp import parse_sdp
from tests.integration.support.netns import FW_INSIDE, PHONE_IP, NatNet, inside
from tests.integration.support.sites import (
    SIP,
    Site,
    describe_packets,
    firewall_config,
    incoming_call,
    inside_addresses,
    outgoing_call,
    register_with_challenge,
    start_site,
    token_seen_by_provider,
)

pytestmark = [pytest.mark.netns]

TRUNK = "10.97.0.1"  # fw's address on the carrier's network: its outside listener
PROVIDER = "10.97.0.150"
OUTSIDE_PORT = 5070  # the outside listener's port where both listen on every address


@pytest.fixture(scope="module")
def trunk(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Registration with a challenge, a call from the provider and one to it; the tests below
    judge the sipp results and the capture (everything is stopped by then)."""
    net = NatNet.build(fw_outside=TRUNK, provider_ip=PROVIDER)
    config = firewall_config(TRUNK, PROVIDER)
    del config["nat"]  # the default inside networks: 10.97.0.150 is in one
    config["plugins"] = {"enabled": ["nat", "media"]}
    try:
        site = start_site(net, tmp_path_factory.mktemp("trunk"), config)
        try:
            site.results["register"] = register_with_challenge(site)
            token = token_seen_by_provider(site)
            site.results["incoming"] = incoming_call(site, token, "uas_rr.xml", "uac_rr.xml")
            site.results["outgoing"] = outgoing_call(site, "uac_rr.xml", "uas_rr.xml")
            site.capture.settle()
        finally:
            site.stop()
    finally:
        net.close()
    yield site


@pytest.mark.parametrize("name", ["register", "incoming", "outgoing"])
def test_registration_and_calls_both_ways_complete(trunk: Site, name: str) -> None:
    server, client = trunk.results[name]
    assert client.ok(1), f"{client.describe()}\n{trunk.logs()}"
    assert server.ok(1), f"{server.describe()}\n{trunk.logs()}"


def test_every_request_to_the_provider_leaves_from_the_outside_listener(trunk: Site) -> None:
    """REGISTER, INVITE, ACK and BYE to the provider (and the responses to its requests) left
    from 10.97.0.1:5060 and name it in their Via; nothing on the outside link names the
    inside."""
    outside = trunk.outside()
    to_provider = [(p, m) for p, m in outside if p.dst == PROVIDER]
    methods = {m.method for _, m in to_provider if isinstance(m, Request)}
    assert {"REGISTER", "INVITE", "ACK", "BYE"} <= methods, describe_packets(outside)
    assert any(isinstance(m, Response) for _, m in to_provider), describe_packets(outside)
    wrong = [(p, m) for p, m in to_provider if (p.src, p.sport) != (TRUNK, SIP)]
    assert not wrong, describe_packets(wrong)
    for _, message in to_provider:
        if isinstance(message, Request):
            assert [(v.host, v.port) for v in message.vias] == [(TRUNK, SIP)], str(message)
    leaks = [(p, m) for p, m in outside if inside_addresses(m)]
    assert not leaks, describe_packets(leaks)
    for packet in trunk.capture.on(trunk.net.wan_if):
        assert not inside(packet.src) and not inside(packet.dst), packet
    registers = [m for _, m in to_provider if isinstance(m, Request) and m.method == "REGISTER"]
    assert {c.uri.host for m in registers for c in m.contacts} == {TRUNK}


def connection_addresses(message: Request | Response) -> set[str]:
    sdp = parse_sdp(message.body)
    return {m.effective_connection.address for m in sdp.media
            if m.effective_connection is not None}


def test_the_media_relay_offers_each_side_its_own_address(trunk: Site) -> None:
    """The SDP the provider got names the relay's outside address, the SDP the phone got its
    inside one: the relay's interface follows the listener chosen."""
    with_sdp = [(p, m) for p, m in trunk.outside() + trunk.lan()
                if m.body and (m.headers.get("content-type") or "").startswith("application/sdp")]
    to_provider = [m for p, m in with_sdp if p.dst == PROVIDER]
    to_phone = [m for p, m in with_sdp if p.dst == PHONE_IP]
    assert to_provider and to_phone, describe_packets(with_sdp)
    assert set().union(*map(connection_addresses, to_provider)) == {TRUNK}
    assert set().union(*map(connection_addresses, to_phone)) == {FW_INSIDE}


def test_upstream_side_names_the_side_where_the_routing_cannot(
        netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Listeners on every address (inside :5060, outside :5070): the route lookup names no
    listener, so by address class the provider would be inside; ``[upstream] side =
    "outside"`` sends the REGISTER and the call from the outside listener."""
    net = NatNet.build(fw_outside=TRUNK, provider_ip=PROVIDER)
    config = firewall_config(TRUNK, PROVIDER)
    del config["nat"]
    config["listen"] = [
        {"side": "inside", "transport": "udp", "address": "0.0.0.0", "port": SIP},
        {"side": "outside", "transport": "udp", "address": "0.0.0.0", "port": OUTSIDE_PORT},
    ]
    config["upstream"]["side"] = "outside"
    try:
        site = start_site(net, tmp_path_factory.mktemp("trunk-side"), config)
        try:
            results = [register_with_challenge(site), outgoing_call(site, "uac_rr.xml",
                                                                    "uas_rr.xml")]
            site.capture.settle()
        finally:
            site.stop()
    finally:
        net.close()
    for server, client in results:
        assert client.ok(1), f"{client.describe()}\n{site.logs()}"
        assert server.ok(1), f"{server.describe()}\n{site.logs()}"
    outside = site.outside()
    to_provider = [(p, m) for p, m in outside if p.dst == PROVIDER]
    assert {m.method for _, m in to_provider if isinstance(m, Request)} >= \
        {"REGISTER", "INVITE", "ACK", "BYE"}, describe_packets(outside)
    wrong = [(p, m) for p, m in to_provider if (p.src, p.sport) != (TRUNK, OUTSIDE_PORT)]
    assert not wrong, describe_packets(wrong)
    for _, message in to_provider:
        if isinstance(message, Request):
            assert [(v.host, v.port) for v in message.vias] == [(TRUNK, OUTSIDE_PORT)]
    leaks = [(p, m) for p, m in outside if inside_addresses(m)]
    assert not leaks, describe_packets(leaks)
