"""
Calls through the proxy between real sipp user agents on loopback.

Topology: sipp UAC -> proxy -> sipp UAS. The Request-URIs name a host outside the proxy's
domains, so the proxy sends them to [upstream], which points at the UAS; REGISTERed users of the
proxy's own domain go to their contact. The UAS scenarios fail the call when the proxy is not in
the path: an INVITE without Record-Route, or an in-dialog request with a single Via.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import pytest

from tests.integration.support.harness import LOOPBACK, ProxyProcess, Sipp, free_port

DOMAIN = "lan.example"


def _config(
    port: int, uas_port: int, transports: tuple[str, ...] = ("udp",), upstream: str = "udp"
) -> dict[str, Any]:
    return {
        "proxy": {"domains": [DOMAIN]},
        "listen": [
            {"side": "inside", "transport": t, "address": LOOPBACK, "port": port}
            for t in transports
        ],
        "upstream": {"uri": f"sip:{LOOPBACK}:{uas_port};transport={upstream}"},
        "plugins": {"enabled": []},
    }


def _calls(
    proxy: ProxyProcess,
    sipp: Sipp,
    uas_scenario: str,
    uac_scenario: str,
    *,
    uas_port: int,
    calls: int,
    rate: float,
    ruri: str | None = None,
    sipp_transport: str = "u1",
    proxy_transport: str = "udp",
    timeout: float = 60.0,
) -> None:
    """Run C{calls} calls and require every one to succeed on both sides."""
    uas = sipp.start_uas(
        uas_scenario, uas_port, transport=sipp_transport, count=calls, timeout=timeout
    )
    uac = sipp.run_uac(
        uac_scenario,
        proxy.address(proxy_transport),
        transport=sipp_transport,
        rate=rate,
        count=calls,
        keys={"ruri": ruri or f"sip:service@{LOOPBACK}:{uas_port}"},
        timeout=timeout,
    )
    server = uas.wait(15)
    assert proxy.running(), f"the proxy died\n{proxy.log_tail()}"
    assert uac.ok(calls), uac.describe()
    assert server.ok(calls), server.describe()


def test_udp_calls(proxy_factory, sipp: Sipp) -> None:
    """200 calls at 20 calls/s over UDP, each INVITE/180/200/ACK/BYE/200, none failed."""
    uas_port = free_port()
    proxy = proxy_factory(_config(free_port(), uas_port))
    _calls(proxy, sipp, "uas_rr.xml", "uac_rr.xml", uas_port=uas_port, calls=200, rate=20)


def test_tcp_calls(proxy_factory, sipp: Sipp) -> None:
    """The same over TCP: sipp on one connection each side, the proxy listening on TCP."""
    uas_port = free_port()
    # The UDP listener on the same port is only the harness's readiness probe.
    proxy = proxy_factory(_config(free_port(), uas_port, transports=("udp", "tcp"), upstream="tcp"))
    _calls(
        proxy,
        sipp,
        "uas_rr.xml",
        "uac_rr.xml",
        uas_port=uas_port,
        calls=200,
        rate=20,
        ruri=f"sip:service@{LOOPBACK}:{uas_port};transport=tcp",
        sipp_transport="t1",
        proxy_transport="tcp",
    )


def test_register_then_invite(proxy_factory, sipp: Sipp) -> None:
    """A REGISTERed contact receives the calls for its address-of-record."""
    uas_port = free_port()
    # Upstream points nowhere useful: the calls must be routed by the registration.
    proxy = proxy_factory(_config(free_port(), free_port()))
    register = sipp.run_uac(
        "register.xml",
        proxy.address(),
        count=1,
        keys={
            "user": "alice",
            "domain": DOMAIN,
            "contact": f"sip:alice@{LOOPBACK}:{uas_port}",
            "expires": "3600",
        },
        timeout=15,
    )
    assert register.ok(1), register.describe()
    _calls(
        proxy,
        sipp,
        "uas_rr.xml",
        "uac_rr.xml",
        uas_port=uas_port,
        calls=5,
        rate=5,
        ruri=f"sip:alice@{DOMAIN}",
        timeout=30,
    )


def test_unregistered_user_of_our_domain(proxy_factory) -> None:
    """A request for a user of our domain with no binding ends at the proxy: 404 or 480."""
    proxy = proxy_factory(_config(free_port(), free_port()))
    host, port = proxy.address()
    call_id = uuid.uuid4().hex
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        s.settimeout(5)
        local = s.getsockname()[1]
        s.sendto(
            (
                f"OPTIONS sip:nobody@{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {LOOPBACK}:{local};branch=z9hG4bK{call_id[:12]};rport\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:probe@{DOMAIN}>;tag=1\r\n"
                f"To: <sip:nobody@{DOMAIN}>\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode(),
            (host, port),
        )
        status = None
        for _ in range(5):  # skip provisionals, bounded
            data = s.recv(65535)
            status = int(data.split(b" ", 2)[1])
            if status >= 200:
                break
    assert status in (404, 480), status


def test_cancel_ringing_call(proxy_factory, sipp: Sipp) -> None:
    """CANCEL of a ringing call: 200 to the CANCEL, 487 to the INVITE, ACK; on both sides."""
    uas_port = free_port()
    proxy = proxy_factory(_config(free_port(), uas_port))
    _calls(proxy, sipp, "uas_ringing.xml", "uac_cancel.xml", uas_port=uas_port, calls=10, rate=10)


@pytest.mark.parametrize(
    ("uas_scenario", "uac_scenario"),
    [("uas_rr.xml", "uac_rr.xml"), ("uas_bye.xml", "uac_waitbye.xml")],
    ids=["caller-hangs-up", "callee-hangs-up"],
)
def test_bye_follows_record_route(
    proxy_factory, sipp: Sipp, uas_scenario: str, uac_scenario: str
) -> None:
    """The in-dialog BYE goes through the proxy by the Record-Route set, in either direction."""
    uas_port = free_port()
    proxy = proxy_factory(_config(free_port(), uas_port))
    _calls(proxy, sipp, uas_scenario, uac_scenario, uas_port=uas_port, calls=5, rate=5)
