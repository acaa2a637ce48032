"""
Call transfer through the firewall, end to end (issue 14): the proxy in ``fw`` with
examples/firewall.toml (nat with topology hiding, media relay), sipp phones inside
(192.168.77.10: A on 5060, B on 5070) and sipp at the provider (203.0.113.50), every frame on
fw's veths captured.

- blind: A calls P at the provider and REFERs it to B; P NOTIFYs (sipfrag 100, 200) and
  INVITEs the Refer-To it got (a ``nat-`` token), which reaches B; P plays audio to B through
  the relay; A hangs up.
- attended: A holds a call with B (phone to phone) and a call with P; it REFERs P to B with
  ``?Replaces=`` naming the A-B call; P's INVITE with Replaces reaches B naming the inside
  Call-ID and tags (B's scenario checks them, else answers 481), and B ends the replaced call
  with its BYE.
- blind to an outside number: A calls P and REFERs it to carol at the provider (5062); the
  Refer-To reaches P unchanged and P INVITEs carol directly.
- by the provider: A registers, P calls it and REFERs it to carol at the provider; A's INVITE
  to carol goes through the proxy, with audio through the relay.
- attended by the provider: P holds a call with carol (outside, no proxy) and a call with A; it
  REFERs A to carol with ``?Replaces=`` naming the P-carol call; A's INVITE with Replaces
  reaches carol naming the outside Call-ID and tags unchanged (carol's scenario checks them,
  else answers 481), A plays audio to her through the relay, and carol ends the replaced call
  with its BYE.

Not one byte on the outside link names an inside address; requests from the outside reach the
phones at their own Contact, never at a token. P's part after the REFER is started
by the test when the REFER shows up in the capture (a sipp call cannot start another one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from sipproxy.message import Request
from sipproxy.plugins.nat import TOKEN_PREFIX
from sipproxy.plugins.topology import HIDDEN_PREFIX
from tests.integration.support.harness import SCENARIOS, SippProcess, SippResult
from tests.integration.support.netns import FW_INSIDE, FW_OUTSIDE, PHONE_IP, PROVIDER_IP
from tests.integration.support.rtp import is_rtp, write_rtp_pcap
from tests.integration.support.sites import (
    SIP,
    SIPP_TIMEOUT,
    Site,
    describe_packets,
    firewall_site,
    inside_on_the_outside,
    register_with_challenge,
    token_seen_by_provider,
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

B_PORT = 5070
#: A's second line: the call to B it holds, its INVITE to the transfer target
A2_PORT = 5064
#: P's port when it calls (its 5060 is the transfer target's)
P1_PORT = 5061
#: the A-B call's Call-ID and tags (uac_held.xml, uas_replaced.xml)
HELD_CALL_ID = f"held-1@{PHONE_IP}"
HELD_REPLACES = f"{HELD_CALL_ID};to-tag=heldto1;from-tag=heldfrom1"
#: carol as the provider names her (the proxy sends every outside request to the provider's
#: 5060, where she answers)
CAROL_AT_PROVIDER = "sip:carol@provider.example"
#: P's line for the call with carol that its attended transfer replaces
P2_PORT = 5063
#: the P-carol call's Call-ID and tags, as outside values (uac_held.xml from the provider)
OUTSIDE_HELD_REPLACES = f"held-1@{PROVIDER_IP};to-tag=heldto1;from-tag=heldfrom1"


@dataclass
class Transfer:
    """What one transfer left: sipp's results by role, the REFER as the transferee got it, and
    the capture's frames from its start on."""

    results: dict[str, SippResult] = field(default_factory=dict)
    #: the calls a role must have completed, where not one
    calls: dict[str, int] = field(default_factory=dict)
    refer: Request | None = None
    first_frame: int = 0


def wait_all(transfer: Transfer, **processes: SippProcess) -> None:
    """Each process's result by role (bounded waits; the site's stop kills what is left)."""
    for role, process in processes.items():
        transfer.results[role] = process.wait(SIPP_TIMEOUT + 10)


def transfer_by_phone(site: Site, attended: bool) -> Transfer:
    """A (5060) calls P and REFERs it to B (5070), with Replaces when ``attended``; P's
    INVITE to the Refer-To it got plays audio."""
    transfer = Transfer(first_frame=len(site.capture.snapshot()))
    b = site.phone.start_uas("uas_replaced.xml", B_PORT, count=2 if attended else 1,
                             timeout=SIPP_TIMEOUT)
    refer_to = f"sip:bob@{PHONE_IP}:{B_PORT}"
    processes: dict[str, SippProcess] = {}
    if attended:
        processes["held"] = site.phone.start_uac(
            "uac_held.xml", (PHONE_IP, B_PORT), local_port=A2_PORT, count=1,
            timeout=SIPP_TIMEOUT, keys={"ruri": refer_to}, extra_args=["-cid_str", "held-%u@%s"])
        transfer.calls["b"] = 2
        refer_to += "?Replaces=" + quote(HELD_REPLACES, safe="")
    p = site.provider.start_uas("uas_transferee.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                extra_args=["-d", TRANSFER_MS])
    a = site.phone.start_uac("uac_transferor.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                             timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example",
                                                         "refer_to": f"<{refer_to}>"})
    transfer.refer = wait_refer(site, site.net.wan_if, PROVIDER_IP, transfer.first_frame)
    target, replaces = refer_target(transfer.refer)
    keys = {"ruri": target, "caller": "carol"}
    if attended:
        keys["replaces"] = replaces or "none"
    p_invite = site.provider.start_uac(
        "uac_replaces.xml" if attended else "uac_audio.xml", (FW_OUTSIDE, SIP), count=1,
        timeout=SIPP_TIMEOUT, keys=keys, extra_args=["-d", str(int(TALK * 1000))])
    wait_all(transfer, a=a, p=p, p_invite=p_invite, b=b, **processes)
    return transfer


def transfer_to_outside(site: Site) -> Transfer:
    """A (5060) calls P and REFERs it to carol at the provider; P INVITEs carol directly."""
    transfer = Transfer(first_frame=len(site.capture.snapshot()))
    p = site.provider.start_uas("uas_transferee.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                extra_args=["-d", TRANSFER_MS])
    carol = site.provider.start_uas("uas_rr.xml", CAROL_PORT, count=1, timeout=SIPP_TIMEOUT,
                                    variables={"direct": "1"})
    a = site.phone.start_uac("uac_transferor.xml", (FW_INSIDE, SIP), local_port=SIP, count=1,
                             timeout=SIPP_TIMEOUT, keys={"ruri": "sip:bob@provider.example",
                                                         "refer_to": f"<{CAROL}>"})
    transfer.refer = wait_refer(site, site.net.wan_if, PROVIDER_IP, transfer.first_frame)
    target, _ = refer_target(transfer.refer)
    p_invite = site.provider.start_uac(
        "uac_audio.xml", (PROVIDER_IP, CAROL_PORT), count=1, timeout=SIPP_TIMEOUT,
        keys={"ruri": target, "caller": "bob"}, extra_args=["-d", str(int(TALK * 1000))])
    wait_all(transfer, a=a, p=p, p_invite=p_invite, carol=carol)
    return transfer


def transfer_by_provider(site: Site, token: str) -> Transfer:
    """P (5061) calls A's token and REFERs A to carol; A INVITEs carol from 5064, with audio."""
    transfer = Transfer(first_frame=len(site.capture.snapshot()))
    a = site.phone.start_uas("uas_transferee.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                             extra_args=["-d", TRANSFER_MS])
    p = site.provider.start_uac(
        "uac_transferor.xml", (FW_OUTSIDE, SIP), local_port=P1_PORT, count=1,
        timeout=SIPP_TIMEOUT, keys={"ruri": f"sip:{token}@{FW_OUTSIDE}:{SIP}",
                                    "refer_to": f"<{CAROL_AT_PROVIDER}>"})
    # carol sees one Via (the phone's are hidden): uas_rr's "through a proxy" check is off
    carol = site.provider.start_uas("uas_rr.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                                    variables={"direct": "1"})
    transfer.refer = wait_refer(site, site.net.lan_if, PHONE_IP, transfer.first_frame)
    target, _ = refer_target(transfer.refer)
    a_invite = site.phone.start_uac("uac_audio.xml", (FW_INSIDE, SIP), local_port=A2_PORT,
                                    count=1, timeout=SIPP_TIMEOUT,
                                    keys={"ruri": target, "caller": "alice"},
                                    extra_args=["-d", str(int(TALK * 1000))])
    wait_all(transfer, p=p, a=a, a_invite=a_invite, carol=carol)
    return transfer


def outside_replaced_scenario(site: Site) -> Path:
    """uas_replaced.xml for carol: the Replaces it accepts names the held call's outside
    Call-ID (held-1@<provider>) instead of the inside one."""
    text = (SCENARIOS / "uas_replaced.xml").read_text()
    inside, outside = ("held-1@" + ip.replace(".", r"\.") for ip in (PHONE_IP, PROVIDER_IP))
    assert inside in text
    path = site.provider.workdir / "uas_replaced_outside.xml"
    path.write_text(text.replace(inside, outside))
    return path


def attended_by_provider(site: Site, token: str) -> Transfer:
    """P (5063) holds a call with carol, P (5061) calls A's token and REFERs A to carol with
    Replaces naming the P-carol call; A INVITEs carol from 5064 with that Replaces."""
    transfer = Transfer(first_frame=len(site.capture.snapshot()), calls={"carol": 2})
    carol = site.provider.start_uas(outside_replaced_scenario(site), SIP, count=2,
                                    timeout=SIPP_TIMEOUT)
    held = site.provider.start_uac(
        "uac_held.xml", (PROVIDER_IP, SIP), local_port=P2_PORT, count=1,
        timeout=SIPP_TIMEOUT, keys={"ruri": CAROL_AT_PROVIDER},
        extra_args=["-cid_str", "held-%u@%s"])
    a = site.phone.start_uas("uas_transferee.xml", SIP, count=1, timeout=SIPP_TIMEOUT,
                             extra_args=["-d", TRANSFER_MS])
    refer_to = CAROL_AT_PROVIDER + "?Replaces=" + quote(OUTSIDE_HELD_REPLACES, safe="")
    p = site.provider.start_uac(
        "uac_transferor.xml", (FW_OUTSIDE, SIP), local_port=P1_PORT, count=1,
        timeout=SIPP_TIMEOUT, keys={"ruri": f"sip:{token}@{FW_OUTSIDE}:{SIP}",
                                    "refer_to": f"<{refer_to}>"})
    transfer.refer = wait_refer(site, site.net.lan_if, PHONE_IP, transfer.first_frame)
    target, replaces = refer_target(transfer.refer)
    a_invite = site.phone.start_uac(
        "uac_replaces.xml", (FW_INSIDE, SIP), local_port=A2_PORT, count=1,
        timeout=SIPP_TIMEOUT, keys={"ruri": target, "caller": "alice",
                                    "replaces": replaces or "none"},
        extra_args=["-d", str(int(TALK * 1000))])
    wait_all(transfer, p=p, held=held, a=a, a_invite=a_invite, carol=carol)
    return transfer


@dataclass
class Run:
    site: Site
    transfers: dict[str, Transfer]


@pytest.fixture(scope="module")
def run(netns_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    transfers: dict[str, Transfer] = {}
    with firewall_site(tmp_path_factory.mktemp("transfer")) as site:
        for sipp in (site.phone, site.provider):
            write_rtp_pcap(sipp.workdir / "audio.pcap", TALK - 0.3)
        transfers["blind"] = transfer_by_phone(site, attended=False)
        transfers["attended"] = transfer_by_phone(site, attended=True)
        transfers["blind_outside"] = transfer_to_outside(site)
        site.results["register"] = register_with_challenge(site, "provider.example")
        token = token_seen_by_provider(site)
        transfers["by_provider"] = transfer_by_provider(site, token)
        transfers["attended_by_provider"] = attended_by_provider(site, token)
        site.capture.settle()
    yield Run(site, transfers)


@pytest.mark.parametrize("name", ["blind", "attended", "blind_outside", "by_provider",
                                  "attended_by_provider"])
def test_every_party_of_the_transfer_completes(run: Run, name: str) -> None:
    transfer = run.transfers[name]
    for role, result in transfer.results.items():
        assert result.ok(transfer.calls.get(role, 1)), \
            f"{name}: {role}\n{result.describe()}\n{run.site.logs()}"
    assert transfer.results


@pytest.mark.parametrize("name", ["blind", "attended"])
def test_the_refer_to_the_provider_got_names_a_token(run: Run, name: str) -> None:
    refer = run.transfers[name].refer
    assert refer is not None
    target, replaces = refer_target(refer)
    assert target.startswith(f"sip:{TOKEN_PREFIX}") and target.endswith(f"@{FW_OUTSIDE}:{SIP}")
    assert (replaces is not None) == (name == "attended")
    if replaces is not None:
        call_id, _, tags = replaces.partition(";")
        assert call_id.startswith(HIDDEN_PREFIX) and tags == "to-tag=heldto1;from-tag=heldfrom1"
    assert PHONE_IP not in (refer.headers.get("referred-by") or "")


def test_the_refer_to_an_outside_number_reaches_the_provider_unchanged(run: Run) -> None:
    refer = run.transfers["blind_outside"].refer
    assert refer is not None
    assert refer_target(refer) == (CAROL, None), refer.headers.get("refer-to")
    assert PHONE_IP not in refer.to_bytes().decode(errors="replace")


def test_the_attended_transfer_reaches_b_with_the_inside_replaces(run: Run) -> None:
    """B got P's INVITE on the LAN with Replaces naming the call it holds (its scenario
    answers 481 otherwise: checked by the completion test; here the bytes themselves)."""
    transfer = run.transfers["attended"]
    site = run.site
    invites = [m for p, m in site.lan()[:] if isinstance(m, Request) and m.method == "INVITE"
               and p.dst == PHONE_IP and p.dport == B_PORT and "replaces" in m.headers]
    assert [m.headers.get("replaces") for m in invites] == [HELD_REPLACES], \
        describe_packets(site.lan())
    assert transfer.results["b"].ok(2)


def test_the_provider_attended_transfer_reaches_carol_with_the_outside_replaces(
        run: Run) -> None:
    """A got the REFER naming carol and the outside Call-ID unchanged; A's INVITE left on the
    outside with the same Replaces (carol's scenario answers 481 otherwise)."""
    transfer = run.transfers["attended_by_provider"]
    assert transfer.refer is not None
    assert refer_target(transfer.refer) == (CAROL_AT_PROVIDER, OUTSIDE_HELD_REPLACES)
    invites = [m for p, m in run.site.outside() if isinstance(m, Request)
               and m.method == "INVITE" and p.dst == PROVIDER_IP and p.dport == SIP
               and "replaces" in m.headers]
    # a set: the proxy may retransmit it
    assert {m.headers.get("replaces") for m in invites} == {OUTSIDE_HELD_REPLACES}, \
        describe_packets(run.site.outside())


def _rtp_to(run: Run, name: str, dst: str, interface: str) -> int:
    frames = run.site.capture.snapshot()[run.transfers[name].first_frame:]
    return sum(1 for p in frames if p.interface == interface and p.outgoing and p.dst == dst
               and is_rtp(p))


@pytest.mark.parametrize("name", ["blind", "attended", "by_provider", "attended_by_provider"])
def test_the_transferred_call_has_audio_through_the_relay(run: Run, name: str) -> None:
    """The transferred call's RTP (P to B; A to carol) leaves fw toward its target: sent from
    the relay, the only path (fw's forward chain drops the RTP port range)."""
    if name.endswith("by_provider"):
        sent = _rtp_to(run, name, PROVIDER_IP, run.site.net.wan_if)
    else:
        sent = _rtp_to(run, name, PHONE_IP, run.site.net.lan_if)
    expected = int((TALK - 0.3) / 0.02)
    assert sent >= expected * 0.8, (sent, expected)


def test_no_byte_on_the_outside_names_an_inside_address(run: Run) -> None:
    methods = {m.method for _, m in run.site.outside() if isinstance(m, Request)}
    assert {"INVITE", "REFER", "NOTIFY", "BYE"} <= methods, describe_packets(run.site.outside())
    leaks = inside_on_the_outside(run.site)
    assert not leaks, "\n\n".join(leaks[:5])


def test_the_phones_get_requests_at_their_own_contact(run: Run) -> None:
    """The NOTIFYs and BYEs from the outside reach the phones addressed to the Contact they
    gave (the token is the outside's name for it), INVITEs to a token too."""
    requests = [m for p, m in run.site.lan() if isinstance(m, Request) and p.dst == PHONE_IP]
    assert {"NOTIFY", "REFER", "INVITE", "BYE"} <= {m.method for m in requests}
    tokens = [m.start_line() for m in requests
              if m.uri.is_sip and (m.uri.user or "").startswith(TOKEN_PREFIX)]
    assert not tokens, tokens
