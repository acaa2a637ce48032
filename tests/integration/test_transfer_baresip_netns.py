"""
Blind transfer by a real softphone through the firewall (issue 14): baresip inside
(192.168.77.10, its account alice@provider.example through the proxy at 192.168.77.1)
registers with the provider's registrar (sipp), calls P (sipp at 203.0.113.50, which accepts a
REFER and NOTIFYs sipfrag 100 and 200), and its ``transfer`` command REFERs P to carol, an
outside number (a second sipp at the provider, port 5062). P INVITEs carol directly; baresip
ends its call on the final NOTIFY. Not one byte on the outside link names an inside address.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sipproxy.message import Request
from tests.integration.support.baresip import Account, Baresip, baresip_unavailable
from tests.integration.support.harness import SippResult
from tests.integration.support.netns import FW_INSIDE, PHONE_IP, PROVIDER_IP
from tests.integration.support.rtp import write_rtp_pcap
from tests.integration.support.sites import (
    SIP,
    SIPP_TIMEOUT,
    Site,
    describe_packets,
    firewall_site,
    inside_on_the_outside,
)
from tests.integration.support.transfers import (
    CAROL,
    CAROL_PORT,
    TALK,
    TRANSFER_MS,
    refer_target,
    wait_refer,
)

pytestmark = [pytest.mark.netns]

@dataclass
class Run:
    site: Site
    phone: Baresip
    results: dict[str, SippResult]
    refer: Request


@pytest.fixture(scope="module")
def run(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    reason = baresip_unavailable()
    if reason is not None:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("transfer-baresip")
    with firewall_site(workdir) as site:
        write_rtp_pcap(site.provider.workdir / "audio.pcap", TALK - 0.3)
        registrar = site.provider.start_uas("uas_register_auth.xml", SIP, count=1,
                                            timeout=SIPP_TIMEOUT)
        phone = Baresip(site.net.phone, workdir / "baresip", Account(
            "sip:alice@provider.example", "secret", outbound=f"sip:{FW_INSIDE}:{SIP}"),
            host=PHONE_IP)
        try:
            phone.start()
            phone.wait_event("REGISTER_OK", 20, fail_on=("REGISTER_FAIL",))
            results = {"registrar": registrar.wait(SIPP_TIMEOUT + 10)}
            first_frame = len(site.capture.snapshot())
            p = site.provider.start_uas("uas_transferee.xml", SIP, count=1,
                                        timeout=SIPP_TIMEOUT, extra_args=["-d", TRANSFER_MS])
            carol = site.provider.start_uas("uas_rr.xml", CAROL_PORT, count=1,
                                            timeout=SIPP_TIMEOUT, variables={"direct": "1"})
            mark = len(phone.events)
            response = phone.command("dial", "sip:bob@provider.example")
            assert response.get("ok"), response
            phone.wait_event("CALL_ESTABLISHED", 15, after=mark, fail_on=("CALL_CLOSED",))
            mark = len(phone.events)
            response = phone.command("transfer", CAROL)
            assert response.get("ok"), response
            refer = wait_refer(site, site.net.wan_if, PROVIDER_IP, first_frame)
            target, _ = refer_target(refer)
            p_invite = site.provider.start_uac(
                "uac_audio.xml", (PROVIDER_IP, CAROL_PORT), count=1, timeout=SIPP_TIMEOUT,
                keys={"ruri": target, "caller": "bob"},
                extra_args=["-d", str(int(TALK * 1000))])
            phone.wait_event("CALL_CLOSED", SIPP_TIMEOUT, after=mark)
            for role, process in (("p", p), ("p_invite", p_invite), ("carol", carol)):
                results[role] = process.wait(SIPP_TIMEOUT + 10)
            site.capture.settle()
            yield Run(site, phone, results, refer)
        finally:
            phone.stop()


def test_every_party_of_the_transfer_completes(run: Run) -> None:
    for role, result in run.results.items():
        assert result.ok(1), f"{role}\n{result.describe()}\n{run.site.logs()}\n" \
                             f"{run.phone.log_tail()}"


def test_the_refer_names_the_outside_target_and_no_inside_address(run: Run) -> None:
    target, replaces = refer_target(run.refer)
    assert target == CAROL and replaces is None, run.refer.headers.get("refer-to")
    assert PHONE_IP not in run.refer.to_bytes().decode(errors="replace")


def test_no_byte_on_the_outside_names_an_inside_address(run: Run) -> None:
    methods = {m.method for _, m in run.site.outside() if isinstance(m, Request)}
    assert {"REGISTER", "INVITE", "REFER", "NOTIFY"} <= methods, \
        describe_packets(run.site.outside())
    leaks = inside_on_the_outside(run.site)
    assert not leaks, "\n\n".join(leaks[:5])
