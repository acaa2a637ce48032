"""The cdr plugin in a real Proxy on a Clock: one JSON line per call attempt, with the codes,
times and the party that hung up, as an operator reads them from the file.

Set-up: a phone inside (192.168.77.10), the provider outside (203.0.113.50, [upstream]); the
phone calls out through the proxy, the provider answers (or not) and either side hangs up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipproxy.config import ConfigError
from sipproxy.message import Request
from sipproxy.plugins.cdr import CdrPlugin, media_counters
from sipproxy.testing import ProxyHarness, answer, listen_toml, sip_request
from tests.nat_site import INSIDE, OUTSIDE, PHONE, PROVIDER, PROVIDER_IP

CALLER = "<sip:alice@lan.example>;tag=a1"
CALLEE = "<sip:bob@provider.example>"
PHONE_CONTACT = "Contact: <sip:alice@192.168.77.10:5062>"
PROVIDER_CONTACT = "Contact: <sip:bob@203.0.113.50:5060>"
ROUTE_FROM_PHONE = (f"Route: <sip:{INSIDE}:5060;lr>", f"Route: <sip:{OUTSIDE}:5060;lr>")
ROUTE_FROM_PROVIDER = (f"Route: <sip:{OUTSIDE}:5060;lr>", f"Route: <sip:{INSIDE}:5060;lr>")
START = 1_780_000_000.0  # 2026-05-28T20:26:40Z


def config(path: Path) -> str:
    return f"""
[proxy]
domains = []
{listen_toml(inside=INSIDE, outside=OUTSIDE, transport=None)}[upstream]
uri = "sip:{PROVIDER_IP}:5060"
[plugins]
enabled = ["cdr"]
[cdr]
file = "{path}"
"""


class Call:
    """One call from the phone to the provider through the proxy."""

    def __init__(self, harness: ProxyHarness, call_id: str = "call-1") -> None:
        self.h = harness
        self.call_id = call_id
        self.invite: Request | None = None

    def phone_invites(self) -> Request:
        self.h.receive(sip_request(
            "INVITE", "sip:bob@provider.example",
            via="SIP/2.0/UDP 192.168.77.10:5062;rport;branch=z9hG4bKinv-" + self.call_id,
            from_=CALLER, to=CALLEE, call_id=self.call_id, headers=(PHONE_CONTACT,)), PHONE)
        invite = self.h.wire.requests_to(PROVIDER_IP, "INVITE")[-1]
        self.invite = invite
        return invite

    def provider_answers(self, status: int, after: float = 0.0) -> None:
        assert self.invite is not None
        self.h.advance(after)
        self.h.receive(answer(self.invite, status, to_tag="b1", record_route=status < 300,
                              headers=(PROVIDER_CONTACT,) if status < 300 else ()), PROVIDER)

    def phone_acks(self) -> None:
        self.h.receive(sip_request(
            "ACK", "sip:bob@203.0.113.50:5060",
            via="SIP/2.0/UDP 192.168.77.10:5062;rport;branch=z9hG4bKack-" + self.call_id,
            from_=CALLER, to=CALLEE + ";tag=b1", call_id=self.call_id,
            headers=ROUTE_FROM_PHONE), PHONE)

    def phone_hangs_up(self) -> None:
        self.h.receive(sip_request(
            "BYE", "sip:bob@203.0.113.50:5060",
            via="SIP/2.0/UDP 192.168.77.10:5062;rport;branch=z9hG4bKbye-" + self.call_id,
            from_=CALLER, to=CALLEE + ";tag=b1", call_id=self.call_id, cseq=2,
            headers=ROUTE_FROM_PHONE), PHONE)
        [bye] = self.h.wire.requests_to(PROVIDER_IP, "BYE")
        self.h.receive(answer(bye, 200), PROVIDER)

    def provider_hangs_up(self) -> None:
        self.h.receive(sip_request(
            "BYE", "sip:alice@192.168.77.10:5062",
            via=f"SIP/2.0/UDP {PROVIDER_IP}:5060;branch=z9hG4bKpbye-" + self.call_id,
            from_=CALLEE + ";tag=b1", to=CALLER, call_id=self.call_id, cseq=1,
            headers=ROUTE_FROM_PROVIDER), PROVIDER)
        [bye] = self.h.wire.requests_to(PHONE.host, "BYE")
        self.h.receive(answer(bye, 200), PHONE)

    def phone_cancels(self) -> None:
        self.h.receive(sip_request(
            "CANCEL", "sip:bob@provider.example",
            via="SIP/2.0/UDP 192.168.77.10:5062;rport;branch=z9hG4bKinv-" + self.call_id,
            from_=CALLER, to=CALLEE, call_id=self.call_id), PHONE)


@pytest.fixture
def cdr_path(tmp_path: Path) -> Path:
    return tmp_path / "cdr.json"


def stop_cdr(harness: ProxyHarness) -> None:
    """Stop the cdr plugin as the service stops it: its file is closed."""
    for plugin in harness.plugins:
        if isinstance(plugin, CdrPlugin):
            plugin.stopService()


@pytest.fixture
def harness(cdr_path: Path) -> Iterator[ProxyHarness]:
    h = ProxyHarness.build(config(cdr_path))
    h.advance(START)
    yield h
    stop_cdr(h)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_answered_call_hung_up_by_the_caller(harness: ProxyHarness, cdr_path: Path) -> None:
    call = Call(harness)
    call.phone_invites()
    call.provider_answers(180, after=1.0)
    call.provider_answers(200, after=2.5)
    call.phone_acks()
    harness.advance(61.25)
    assert records(cdr_path) == []  # written when the call ends
    call.phone_hangs_up()
    harness.advance(0)
    [record] = records(cdr_path)
    assert record == {
        "call_id_inside": "call-1", "call_id_outside": "call-1",
        "from": "sip:alice@lan.example", "to": "sip:bob@provider.example",
        "start": "2026-05-28T20:26:40.000Z", "answer": "2026-05-28T20:26:43.500Z",
        "end": "2026-05-28T20:27:44.750Z", "duration": 61.25, "code": 200,
        "hangup_by": "caller", "hangup_reason": "BYE", "media": None,
    }


def test_an_answered_call_hung_up_by_the_callee(harness: ProxyHarness, cdr_path: Path) -> None:
    call = Call(harness)
    call.phone_invites()
    call.provider_answers(200, after=4)
    call.phone_acks()
    harness.advance(30)
    call.provider_hangs_up()
    harness.advance(0)
    [record] = records(cdr_path)
    assert (record["code"], record["duration"], record["hangup_by"], record["hangup_reason"]) \
        == (200, 30.0, "callee", "BYE")


def test_a_rejected_call(harness: ProxyHarness, cdr_path: Path) -> None:
    call = Call(harness)
    call.phone_invites()
    call.provider_answers(180, after=1)
    call.provider_answers(486, after=2)
    [record] = records(cdr_path)  # at once: not when the transaction ends
    assert record["code"] == 486
    assert record["answer"] is None and record["duration"] == 0.0
    assert record["end"] == "2026-05-28T20:26:43.000Z"
    assert (record["hangup_by"], record["hangup_reason"]) == ("callee", "486 Busy Here")
    harness.settle()
    assert len(records(cdr_path)) == 1


def test_a_call_cancelled_by_the_caller(harness: ProxyHarness, cdr_path: Path) -> None:
    call = Call(harness)
    invite = call.phone_invites()
    call.provider_answers(180, after=1)
    harness.advance(5)
    call.phone_cancels()
    [cancel] = harness.wire.requests_to(PROVIDER_IP, "CANCEL")
    harness.receive(answer(cancel, 200), PROVIDER)
    harness.receive(answer(invite, 487, to_tag="b1"), PROVIDER)
    [record] = records(cdr_path)
    assert (record["code"], record["hangup_by"], record["hangup_reason"]) \
        == (487, "caller", "CANCEL")
    assert record["end"] == "2026-05-28T20:26:46.000Z"


def test_a_call_nobody_answers_times_out(harness: ProxyHarness, cdr_path: Path) -> None:
    Call(harness).phone_invites()
    harness.advance(40)  # no response at all: the proxy's INVITE transaction gives up (64*T1)
    [record] = records(cdr_path)
    assert (record["code"], record["hangup_by"], record["hangup_reason"]) \
        == (408, "proxy", "timeout")
    assert record["answer"] is None
    assert (record["call_id_inside"], record["call_id_outside"]) == ("call-1", None)


def test_a_call_that_outlives_the_dialog_lifetime_times_out(
        harness: ProxyHarness, cdr_path: Path) -> None:
    call = Call(harness)
    call.phone_invites()
    call.provider_answers(200, after=1)
    call.phone_acks()
    harness.advance(12 * 3600)
    [record] = records(cdr_path)
    assert (record["code"], record["duration"], record["hangup_by"], record["hangup_reason"]) \
        == (200, 12 * 3600.0, "proxy", "timeout")


def test_a_call_the_proxy_cannot_route_is_recorded_with_its_answer(tmp_path: Path) -> None:
    """The core answers a call to an unregistered user itself (no hook sees the answer)."""
    path = tmp_path / "cdr.json"
    h = ProxyHarness.build(config(path).replace("domains = []", 'domains = ["lan.example"]'))
    h.receive(sip_request(
        "INVITE", "sip:carol@lan.example",
        via="SIP/2.0/UDP 192.168.77.10:5062;rport;branch=z9hG4bKinv-x",
        from_=CALLER, to="<sip:carol@lan.example>", call_id="x-1"), PHONE)
    [refused] = h.wire.responses_to(PHONE.host, "INVITE")
    h.advance(0)
    [record] = records(path)
    assert record["code"] == refused.status >= 400
    assert record["hangup_by"] == "proxy"
    assert record["to"] == "sip:carol@lan.example" and record["call_id_outside"] is None
    stop_cdr(h)


def test_calls_in_progress_at_shutdown_are_written(harness: ProxyHarness, cdr_path: Path) -> None:
    [plugin] = [p for p in harness.plugins if isinstance(p, CdrPlugin)]
    plugin.startService()
    answered, ringing = Call(harness, "c-answered"), Call(harness, "c-ringing")
    answered.phone_invites()
    answered.provider_answers(200)
    ringing.phone_invites()
    harness.proxy.stop()  # as the service stops: dialogs end first, then the plugins stop
    plugin.stopService()
    got = {r["call_id_inside"]: (r["code"], r["hangup_by"], r["hangup_reason"])
           for r in records(cdr_path)}
    assert got == {"c-answered": (200, "proxy", "shutdown"),
                   "c-ringing": (None, "proxy", "shutdown")}


def test_reopen_starts_a_new_file_where_the_old_one_was_moved(
        harness: ProxyHarness, cdr_path: Path) -> None:
    """logrotate moves the file away and sends SIGHUP: the next record goes to a new file."""
    [plugin] = [p for p in harness.plugins if isinstance(p, CdrPlugin)]
    first = Call(harness, "first")
    first.phone_invites()
    first.provider_answers(486)
    os.rename(cdr_path, cdr_path.with_suffix(".1"))
    second = Call(harness, "second")
    second.phone_invites()
    second.provider_answers(486)
    assert not cdr_path.exists()  # still written to the moved file
    plugin.reopen()
    third = Call(harness, "third")
    third.phone_invites()
    third.provider_answers(486)
    assert [r["call_id_inside"] for r in records(cdr_path.with_suffix(".1"))] \
        == ["first", "second"]
    assert [r["call_id_inside"] for r in records(cdr_path)] == ["third"]


def test_an_unwritable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ProxyHarness.build(config(tmp_path / "no-such-dir" / "cdr.json"), source="p.toml")
    assert str(info.value).startswith("p.toml: cdr.file: cannot open ")
    assert "No such file or directory" in str(info.value)


def test_media_counters_per_direction_from_the_relays_statistics() -> None:
    """The relay's reply (as IMediaRelay.query describes it): what came from each party."""

    def stream(packets: int, size: int, component: str = "RTCP", **lost: int) -> dict[str, Any]:
        counters = {"packets": packets, "bytes": size, "errors": 0}
        return {"local port": 30000, "flags": [component],
                "stats": counters | {k.replace("_", " "): v for k, v in lost.items()}}

    stats = {"tags": {
        "a1": {"tag": "a1", "medias": [{"streams": [stream(500, 86000, "RTP", packets_lost=7),
                                                    stream(5, 400)]}]},
        "b1": {"tag": "b1", "medias": [{"streams": [stream(490, 84280, "RTP"),
                                                    stream(4, 320)]}]},
    }}
    # the callee's RTP stream has no loss count (the kernel forwarded it; or an NG relay): null
    assert media_counters(stats, "a1", "b1") == {
        "caller_to_callee": {"packets": 505, "bytes": 86400, "lost": 7},
        "callee_to_caller": {"packets": 494, "bytes": 84600, "lost": None},
    }
    assert media_counters({"tags": {}}, "a1", "b1") is None


def test_a_relayed_call_records_what_each_party_sent(tmp_path: Path) -> None:
    """With the media plugin's relay (the real engine, in-memory ports): the record has the
    packets and bytes the relay got from each party."""
    from tests.media_site import (
        MEDIA_FIREWALL,
        PHONE_MEDIA,
        PROVIDER_MEDIA,
        answered_call,
        hang_up,
        make_net,
        media_address,
    )

    path = tmp_path / "cdr.json"
    net = make_net(MEDIA_FIREWALL.replace('enabled = ["nat", "media"]',
                                          'enabled = ["nat", "media", "cdr"]')
                   + f'[cdr]\nfile = "{path}"\n')
    invite, ok = answered_call(net)
    _, port_out = media_address(invite)
    _, port_in = media_address(ok)
    [relayed] = net.engine.calls.values()
    legs = {(leg.rtp.port.interface, leg.rtp.local_port): leg for leg in relayed.legs()}
    for _ in range(3):
        legs[INSIDE, port_in].rtp.received(b"\x80\x00" + b"p" * 160, PHONE_MEDIA)
    legs[OUTSIDE, port_out].rtp.received(b"\x80\x00" + b"b" * 80, PROVIDER_MEDIA)
    hang_up(net)
    net.clock.advance(0)
    [record] = records(path)
    net.run_out()
    assert len(records(path)) == 1
    assert record["media"] == {"caller_to_callee": {"packets": 3, "bytes": 3 * 162, "lost": 0},
                               "callee_to_caller": {"packets": 1, "bytes": 82, "lost": 0}}
    assert (record["hangup_by"], record["hangup_reason"]) == ("caller", "BYE")
