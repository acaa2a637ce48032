"""
The firewall site of the NAT topology (netns.NatNet): the proxy running in ``fw`` with captures
on both of its veths, sipp as the phone and as the provider, and the steps several test modules
take on it (register with a challenge, calls both ways) and the checks they share (no inside
address in what leaves).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sipproxy.message import Request, Response
from sipproxy.plugins.nat import TOKEN_PREFIX
from tests.integration.support.harness import REPO_ROOT, SippResult
from tests.integration.support.netns import (
    FW_INSIDE,
    FW_OUTSIDE,
    LAN,
    PHONE_IP,
    PROVIDER_IP,
    Capture,
    NatNet,
    NsProxyProcess,
    NsSipp,
    Packet,
    inside,
)

SIP = 5060
USER, PASSWORD = "alice", "secret"
PHONE_CONTACT = f"sip:{USER}@{PHONE_IP}:{SIP}"
#: the headers that tell the far side where to send something (compact forms included)
ADDRESS_HEADERS = ("via", "contact", "record-route", "route", "path")
SIPP_TIMEOUT = 20.0
#: an inside address as text (the LAN of netns.NatNet)
LAN_TEXT = re.compile(rb"192\.168\.77\.\d{1,3}")


def inside_addresses(message: Request | Response) -> list[str]:
    """Every Via, Contact, Record-Route, Route and Path value that names an inside host."""
    found = []
    for via in message.vias:
        if inside(via.host) or inside(via.received or "") or inside(via.maddr or ""):
            found.append(f"Via: {via}")
    for name in ADDRESS_HEADERS[1:]:
        values = message.contacts if name == "contact" else message.name_addrs(name)
        for addr in values:
            uri = addr.uri
            if uri.is_sip and (inside(uri.host) or inside(uri.get_param("maddr") or "")):
                found.append(f"{name}: {addr}")
    return found


def describe_packets(packets: list[tuple[Packet, Request | Response]], limit: int = 40) -> str:
    lines = []
    for packet, message in packets[-limit:]:
        first = message.start_line() if hasattr(message, "start_line") else "?"
        lines.append(f"{packet.interface} {'out' if packet.outgoing else 'in '} "
                     f"{packet.src}:{packet.sport} -> {packet.dst}:{packet.dport}  {first}")
    return "\n".join(lines)


def firewall_config(outside: str = FW_OUTSIDE, provider: str = PROVIDER_IP) -> dict[str, Any]:
    """examples/firewall.toml, with the provider at 203.0.113.50 (or ``provider``, the
    outside listener on ``outside``)."""
    return {
        "proxy": {"domains": []},
        "listen": [
            {"side": "inside", "transport": "udp", "address": FW_INSIDE, "port": SIP},
            {"side": "outside", "transport": "udp", "address": outside, "port": SIP},
        ],
        "upstream": {"uri": f"sip:{provider}:{SIP}"},
        "plugins": {"enabled": ["nat"]},
        "nat": {"inside_networks": [str(LAN)]},
    }


@dataclass
class Site:
    """One topology with the proxy running and both captures going."""

    net: NatNet
    proxy: NsProxyProcess
    capture: Capture
    phone: NsSipp
    provider: NsSipp
    results: dict[str, tuple[SippResult, SippResult]] = field(default_factory=dict)

    def logs(self) -> str:
        return self.proxy.log_tail(80)

    def outside(self) -> list[tuple[Packet, Request | Response]]:
        return self.capture.sip_on(self.net.wan_if)

    def lan(self) -> list[tuple[Packet, Request | Response]]:
        return self.capture.sip_on(self.net.lan_if)

    def stop(self) -> None:
        self.phone.cleanup()
        self.provider.cleanup()
        self.proxy.stop()
        self.capture.stop()


def start_site(net: NatNet, workdir: Path, config: dict[str, Any], proxy_ns: str = "fw") -> Site:
    capture = Capture(net.fw, [net.lan_if, net.wan_if])
    ns = net.fw if proxy_ns == "fw" else net.provider
    proxy = NsProxyProcess(ns, config, workdir / "proxy", name="proxy")
    try:
        proxy.start()
    except BaseException:
        capture.stop()
        raise
    return Site(net, proxy, capture, NsSipp(net.phone, workdir / "phone"),
                NsSipp(net.provider, workdir / "provider"))


def pair(uas: Any, uac: Any) -> tuple[SippResult, SippResult]:
    """Wait for a client and then its server (bounded); both are dead afterwards."""
    client = uac.wait()
    server = uas.wait(10)
    return server, client


REGISTER_KEYS = {"user": USER, "domain": "provider.example", "contact": PHONE_CONTACT,
                 "expires": "3600"}


def register_with_challenge(site: Site, auth_uri: str | None = None
                            ) -> tuple[SippResult, SippResult]:
    """The phone registers through the firewall, answering the provider's challenge.

    :param auth_uri: the digest ``uri`` sipp sends (its default: the address it sends to, the
        proxy's inside one; phones use the Request-URI, ``provider.example``).
    """
    uas = site.provider.start_uas("uas_register_auth.xml", SIP, count=1, timeout=SIPP_TIMEOUT)
    uac = site.phone.start_uac(
        "register_auth.xml", (FW_INSIDE, SIP), local_port=SIP, count=1, timeout=SIPP_TIMEOUT,
        keys=REGISTER_KEYS, variables={"contact": PHONE_CONTACT},
        extra_args=["-au", USER, "-ap", PASSWORD,
                    *(["-auth_uri", auth_uri] if auth_uri is not None else [])],
    )
    return pair(uas, uac)


def inside_on_the_outside(site: Site) -> list[str]:
    """Every frame on fw's outside veth that names an inside address: as its source or
    destination, or as text anywhere in its payload (empty: none leaks)."""
    found = []
    for frame in site.capture.on(site.net.wan_if):
        text = LAN_TEXT.findall(frame.payload)
        if inside(frame.src) or inside(frame.dst) or text:
            found.append(f"{frame.src}:{frame.sport} -> {frame.dst}:{frame.dport} {text}\n"
                         + frame.payload.decode(errors="replace"))
    return found


def token_seen_by_provider(site: Site) -> str:
    """The phone's Contact as the provider got it in the authorized REGISTER."""
    site.capture.settle()
    for packet, message in site.outside():
        if isinstance(message, Request) and message.method == "REGISTER" and \
                packet.dst == site.net.provider_ip and "authorization" in message.headers:
            [contact] = message.contacts
            assert contact.uri.user and contact.uri.user.startswith(TOKEN_PREFIX), str(contact)
            return contact.uri.user
    raise AssertionError(f"no authorized REGISTER reached the provider\n"
                         f"{describe_packets(site.outside())}\n{site.logs()}")


def incoming_call(site: Site, token: str, phone_scenario: str,
                  provider_scenario: str) -> tuple[SippResult, SippResult]:
    """The provider calls the phone's token (what it registered); the phone answers."""
    uas = site.phone.start_uas(phone_scenario, SIP, count=1, timeout=SIPP_TIMEOUT)
    uac = site.provider.start_uac(
        provider_scenario, (site.net.fw_outside, SIP), count=1, timeout=SIPP_TIMEOUT,
        keys={"ruri": f"sip:{token}@{site.net.fw_outside}:{SIP}"},
        # the provider sees one Via in the phone's BYE: the phone's are hidden (hide_vias)
        variables={"direct": "1"} if provider_scenario == "uac_waitbye.xml" else None,
    )
    return pair(uas, uac)


def outgoing_call(site: Site, phone_scenario: str,
                  provider_scenario: str) -> tuple[SippResult, SippResult]:
    """The phone calls bob at the provider through its outbound proxy, the firewall."""
    # the provider sees one Via in the phone's requests (hide_vias): its "came through a proxy"
    # check counts Vias, so it is off there; Record-Route is checked on the wire instead
    uas = site.provider.start_uas(provider_scenario, SIP, count=1, timeout=SIPP_TIMEOUT,
                                  variables={"direct": "1"})
    uac = site.phone.start_uac(
        phone_scenario, (FW_INSIDE, SIP), local_port=SIP, count=1, timeout=SIPP_TIMEOUT,
        keys={"ruri": "sip:bob@provider.example"},
    )
    return pair(uas, uac)


def firewall_example() -> dict[str, object]:
    """examples/firewall.toml as written; only the provider's name is its address here."""
    text = (REPO_ROOT / "examples" / "firewall.toml").read_text()
    return tomllib.loads(text.replace("sip.provider.example", PROVIDER_IP))


@contextmanager
def firewall_site(workdir: Path) -> Iterator[Site]:
    """A fresh topology with the proxy running :func:`firewall_example`, captures going; all
    stopped and torn down on the way out (the captured packets stay readable)."""
    net = NatNet.build()
    try:
        site = start_site(net, workdir, firewall_example())
        try:
            yield site
        finally:
            site.stop()
    finally:
        net.close()
