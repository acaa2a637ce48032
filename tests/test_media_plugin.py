"""The media plugin inside a real Proxy, with the real relay engine on in-memory UDP ports.

Firewall set-up as in tests/test_nat.py: listeners 192.168.77.1 (inside) and 203.0.113.1
(outside), [upstream] the provider 203.0.113.50, ``enabled = ["nat", "media"]``. The phone is
192.168.77.10. What each side receives is recorded as bytes (``Wire``) and its SDP parsed, so
"the provider sees only the relay's outside address" is about the bytes on the wire. The relay
opens its ports through ``UdpClock.listenUDP`` (no sockets), so the ports left open after a
call are counted exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from sipproxy.admin.status import StatusModel
from sipproxy.config import ConfigError, Section, parse_config
from sipproxy.media.backends import LocalRelay, NGRelay
from sipproxy.media.ng import NGCommands, NGError, NGTimeout, to_text
from sipproxy.message import Response, Source
from sipproxy.plugins.media import factory
from sipproxy.testing import ProxyHarness, listen_toml
from tests.media_site import (
    BOB_CONTACT,
    CALLEE,
    CALLER,
    LAN,
    MEDIA_FIREWALL,
    PHONE_MEDIA,
    PROVIDER_MEDIA,
    RR_INSIDE,
    RR_OUTSIDE,
    Net,
    UdpClock,
    answered_call,
    assert_relayed,
    hang_up,
    make_net,
    media_address,
    outgoing_invite,
    phone_in_dialog,
    request,
    respond,
    sdp,
    session,
)
from tests.nat_site import INSIDE, OUTSIDE, PHONE, PROVIDER, PROVIDER_IP


@pytest.fixture
def net() -> Iterator[Net]:
    n = make_net()
    yield n
    if not n.stopped:
        n.proxy.stop()
        for plugin in n.proxy.pipeline.plugins:
            if getattr(plugin, "running", False):
                plugin.stopService()


def test_each_side_sees_only_the_relay_and_the_bye_closes_every_port(net: Net) -> None:
    invite = outgoing_invite(net)
    port_out = assert_relayed(invite, OUTSIDE)
    assert LAN.search(invite.body) is None
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    _, ok = net.one(PHONE.host)
    port_in = assert_relayed(ok, INSIDE)
    # the relay's ports: the phone's pair on the inside, the provider's on the outside
    assert {(INSIDE, port_in), (INSIDE, port_in + 1), (OUTSIDE, port_out),
            (OUTSIDE, port_out + 1)} == net.clock.open
    [(_, _, kwargs)] = [e for e in net.relay.log if e[0] == "offer"]
    assert kwargs["options"]["direction"] == ["inside", "outside"]
    assert kwargs["options"]["received-from"] == ["IP4", PHONE.host]
    assert "flags" not in kwargs["options"]  # the SDP names the address the SIP came from
    net.send(request("ACK", BOB_CONTACT, source=PHONE, branch="z9hG4bKack1", call_id="out-1",
                     from_=CALLER, to=CALLEE + ";tag=b1",
                     headers=(f"Route: {RR_INSIDE}", f"Route: {RR_OUTSIDE}")), PHONE)
    net.one(PROVIDER_IP)
    assert net.relay.commands() == [("offer", "a1", None), ("answer", "a1", "b1")]
    hang_up(net)
    assert net.relay.commands()[-1][0] == "delete"
    assert net.engine.calls == {} and net.clock.open == set() and net.media.calls == {}
    net.run_out()


def test_relayed_packets_go_through_the_relay_ports(net: Net) -> None:
    """A packet from the phone to the relay's inside port leaves from the outside port to the
    provider's media address (and back), as the SDPs said."""
    invite, ok = answered_call(net)
    _, port_out = media_address(invite)
    _, port_in = media_address(ok)
    [call] = net.engine.calls.values()
    legs = {(leg.rtp.port.interface, leg.rtp.local_port): leg for leg in call.legs()}
    legs[INSIDE, port_in].rtp.received(b"\x80\x00rtp-from-phone", PHONE_MEDIA)
    assert net.clock.sent[-1] == (OUTSIDE, port_out, b"\x80\x00rtp-from-phone", PROVIDER_MEDIA)
    legs[OUTSIDE, port_out].rtp.received(b"\x80\x00rtp-from-bob", PROVIDER_MEDIA)
    assert net.clock.sent[-1] == (INSIDE, port_in, b"\x80\x00rtp-from-bob", PHONE_MEDIA)
    hang_up(net)
    net.run_out()


def test_the_admin_status_and_metrics_show_each_direction_of_a_call(net: Net) -> None:
    """/api/status's call has the media of each direction as the relay counted it (packets,
    bytes, path, seconds since the last packet); /metrics counts them by the sender's
    interface, and still after the call ended."""
    invite, ok = answered_call(net)
    _, port_out = media_address(invite)
    _, port_in = media_address(ok)
    [call] = net.engine.calls.values()
    legs = {(leg.rtp.port.interface, leg.rtp.local_port): leg for leg in call.legs()}
    for seq in (1, 2, 4):  # 3 lost on the way
        legs[INSIDE, port_in].rtp.received(
            b"\x80\x00" + seq.to_bytes(2, "big") + b"p" * 158, PHONE_MEDIA)
    net.advance(2.5)
    legs[OUTSIDE, port_out].rtp.received(b"\x80\x00" + b"b" * 80, PROVIDER_MEDIA)
    net.advance(0.5)
    [shown] = StatusModel(net.proxy).status(["calls"])["calls"]
    assert (shown["call_id"], shown["from"], shown["to"]) == (
        "out-1", "sip:alice@provider.example", "sip:bob@provider.example")
    assert shown["media"] == [
        {"direction": "caller->callee", "media": "audio", "packets": 3, "bytes": 3 * 162,
         "lost": 1, "path": "userspace", "last_packet_age": 3.0},
        {"direction": "callee->caller", "media": "audio", "packets": 1, "bytes": 82,
         "lost": 0, "path": "userspace", "last_packet_age": 0.5},
    ]
    [section] = [p["status"] for p in StatusModel(net.proxy).status(["plugins"])["plugins"]
                 if p["name"] == "media"]
    assert section == {"relay": "builtin", "calls": 1}

    def packets(name: str = "sipproxy_relay_packets") -> dict[tuple[str, str], float]:
        return {(s.labels["interface"], s.labels["path"]): s.value
                for family in net.media.metrics() if family.name == name
                for s in family.samples}

    assert packets()[("inside", "userspace")] == 3
    assert packets()[("outside", "userspace")] == 1
    # lost: userspace only (the kernel path has no sample: it sees no sequence numbers)
    assert packets("sipproxy_relay_packets_lost") == {
        ("inside", "userspace"): 1, ("outside", "userspace"): 0}
    hang_up(net)
    assert StatusModel(net.proxy).status(["calls"])["calls"] == []
    assert packets()[("inside", "userspace")] == 3  # counters never go back
    assert packets("sipproxy_relay_packets_lost")[("inside", "userspace")] == 1
    net.run_out()


def test_early_media_then_200_with_the_same_answer(net: Net) -> None:
    invite = outgoing_invite(net)
    net.send(respond(invite, 183, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    _, early = net.one(PHONE.host)
    assert early.status == 183
    early_port = assert_relayed(early, INSIDE)
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    _, ok = net.one(PHONE.host)
    assert assert_relayed(ok, INSIDE) == early_port
    # the 200's SDP is the 183's: the relay is not asked again
    assert net.relay.commands() == [("offer", "a1", None), ("answer", "a1", "b1")]
    hang_up(net)
    net.run_out()


def test_late_offer_in_the_200_answered_in_the_ack(net: Net) -> None:
    invite = outgoing_invite(net, body=b"")
    assert invite.body == b"" and net.relay.log == []
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    _, ok = net.one(PHONE.host)
    assert_relayed(ok, INSIDE)
    net.send(phone_in_dialog(net, "ACK", 1, "z9hG4bKack1", sdp(*PHONE_MEDIA)), PHONE)
    _, ack = net.one(PROVIDER_IP)
    assert ack.method == "ACK"
    assert_relayed(ack, OUTSIDE)
    assert net.relay.commands() == [("offer", "b1", "a1"), ("answer", "b1", "a1")]
    [(_, _, kwargs)] = [e for e in net.relay.log if e[0] == "offer"]
    assert kwargs["options"]["direction"] == ["outside", "inside"]
    hang_up(net)
    assert net.engine.calls == {}
    net.run_out()


def test_offer_in_a_reliable_183_answered_in_the_prack(net: Net) -> None:
    invite = outgoing_invite(net, body=b"")
    net.send(respond(invite, 183, "b1", sdp(*PROVIDER_MEDIA),
                     (f"Contact: <{BOB_CONTACT}>", "Require: 100rel", "RSeq: 1")), PROVIDER)
    [early] = net.to(PHONE.host)
    assert early.status == 183
    assert_relayed(early, INSIDE)
    net.send(phone_in_dialog(net, "PRACK", 2, "z9hG4bKpr1", sdp(*PHONE_MEDIA)), PHONE)
    [prack] = net.to(PROVIDER_IP)
    assert prack.method == "PRACK"
    assert_relayed(prack, OUTSIDE)
    net.send(respond(prack, 200), PROVIDER)
    assert [m.status for m in net.to(PHONE.host)] == [200]
    net.send(respond(invite, 200, "b1", headers=(f"Contact: <{BOB_CONTACT}>",)), PROVIDER)
    assert [m.status for m in net.to(PHONE.host)] == [200]
    assert net.relay.commands() == [("offer", "b1", "a1"), ("answer", "b1", "a1")]
    assert len(net.clock.open) == 4
    hang_up(net, cseq=3)
    net.run_out()


def test_hold_and_resume_by_reinvite_and_update_keep_the_relay_ports(net: Net) -> None:
    invite, _ = answered_call(net)
    _, port_out = media_address(invite)
    # the phone holds: a=sendonly
    net.send(phone_in_dialog(net, "INVITE", 2, "z9hG4bKre2",
                             sdp(*PHONE_MEDIA, direction="sendonly", version=2)), PHONE)
    _, reinvite = net.one(PROVIDER_IP)
    assert assert_relayed(reinvite, OUTSIDE) == port_out
    assert session(reinvite).media[0].direction == "sendonly"
    net.send(respond(reinvite, 200, None, sdp(*PROVIDER_MEDIA, direction="recvonly", version=2),
                     (f"Contact: <{BOB_CONTACT}>",)), PROVIDER)
    _, held = net.one(PHONE.host)
    assert session(held).media[0].direction == "recvonly"
    net.send(phone_in_dialog(net, "ACK", 2, "z9hG4bKack2"), PHONE)
    net.one(PROVIDER_IP)
    # the provider holds the old way (c=0.0.0.0), by UPDATE: the hold address stays
    [phone_contact] = invite.contacts  # the nat plugin's token for the phone
    net.send(request("UPDATE", str(phone_contact.uri), source=PROVIDER,
                     branch="z9hG4bKup1", call_id="out-1", from_=CALLEE + ";tag=b1",
                     to=CALLER, cseq=7, headers=(f"Route: {RR_OUTSIDE}",),
                     body=sdp("0.0.0.0", PROVIDER_MEDIA[1], version=3)), PROVIDER)
    _, update = net.one(PHONE.host)
    assert update.method == "UPDATE"
    assert media_address(update)[0] == "0.0.0.0"
    assert session(update).origin.address == INSIDE  # type: ignore[union-attr]
    net.send(respond(update, 200, None, sdp(*PHONE_MEDIA, version=3)), PHONE)
    _, update_ok = net.one(PROVIDER_IP)
    assert assert_relayed(update_ok, OUTSIDE) == port_out
    # and the phone resumes
    net.send(phone_in_dialog(net, "INVITE", 3, "z9hG4bKre3", sdp(*PHONE_MEDIA, version=4)),
             PHONE)
    _, resume = net.one(PROVIDER_IP)
    assert assert_relayed(resume, OUTSIDE) == port_out
    assert session(resume).media[0].direction == "sendrecv"
    assert net.relay.commands()[2:] == [
        ("offer", "a1", "b1"), ("answer", "a1", "b1"),
        ("offer", "b1", "a1"), ("answer", "b1", "a1"),
        ("offer", "a1", "b1"),
    ]
    net.send(respond(resume, 200, None, sdp(*PROVIDER_MEDIA, version=4)), PROVIDER)
    net.one(PHONE.host)
    assert len(net.clock.open) == 4  # the same four ports all along
    hang_up(net, cseq=4)
    net.run_out()


def test_ice_is_removed(net: Net) -> None:
    invite = outgoing_invite(net, body=sdp(*PHONE_MEDIA, ice=True))
    assert b"candidate" not in invite.body and b"ice-" not in invite.body
    assert net.relay.log[0][2]["options"]["ICE"] == "remove"
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA, ice=True),
                     (f"Contact: <{BOB_CONTACT}>",)), PROVIDER)
    _, ok = net.one(PHONE.host)
    assert b"candidate" not in ok.body and b"ice-" not in ok.body
    hang_up(net)
    net.run_out()


# ------------------------------------------------------------------------------------------------
# calls that end before they are answered
# ------------------------------------------------------------------------------------------------
def test_a_cancelled_call_frees_the_relay(net: Net) -> None:
    invite = outgoing_invite(net)
    net.send(respond(invite, 180, "b1", headers=(f"Contact: <{BOB_CONTACT}>",)), PROVIDER)
    net.one(PHONE.host)
    assert len(net.clock.open) == 4
    net.send(request("CANCEL", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                     call_id="out-1", from_=CALLER, to=CALLEE), PHONE)
    cancel_ok, cancel = [m for _, m, _ in net.new()]
    assert cancel_ok.status == 200 and cancel.method == "CANCEL"
    net.send(respond(cancel, 200, "b1"), PROVIDER)
    net.send(respond(invite, 487, "b1"), PROVIDER)
    assert [m.status for _, m, _ in net.new() if isinstance(m, Response)] == [487]
    assert net.relay.commands()[-1][0] == "delete"
    assert net.engine.calls == {} and net.clock.open == set() and net.media.calls == {}
    net.run_out()


@pytest.mark.parametrize("status", [404, 486, 603])
def test_a_failed_call_frees_the_relay(net: Net, status: int) -> None:
    invite = outgoing_invite(net)
    net.send(respond(invite, status, "b1"), PROVIDER)
    [final] = net.to(PHONE.host)
    assert final.status == status
    assert net.engine.calls == {} and net.clock.open == set() and net.media.calls == {}
    net.run_out()


def test_a_failed_reinvite_keeps_the_call(net: Net) -> None:
    answered_call(net)
    net.send(phone_in_dialog(net, "INVITE", 2, "z9hG4bKre2",
                             sdp(*PHONE_MEDIA, direction="sendonly", version=2)), PHONE)
    _, reinvite = net.one(PROVIDER_IP)
    net.send(respond(reinvite, 488, None), PROVIDER)
    [final] = net.to(PHONE.host)
    assert final.status == 488
    assert len(net.engine.calls) == 1 and len(net.clock.open) == 4
    hang_up(net, cseq=3)
    net.run_out()


# ------------------------------------------------------------------------------------------------
# the relay fails
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [NGError("Ran out of ports"), NGTimeout("no reply")])
def test_a_relay_error_on_the_offer_answers_5xx_and_forwards_nothing(
    net: Net, error: Exception
) -> None:
    net.relay.fail = error
    net.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                     call_id="out-1", from_=CALLER, to=CALLEE, body=sdp(*PHONE_MEDIA)), PHONE)
    [(_, final, to)] = net.new()
    assert to[0] == PHONE.host
    assert final.status == 500 and final.reason == "Media Relay Unavailable"
    assert str(error) in (final.headers.get("warning") or "")
    assert not any(host == PROVIDER_IP for _, (host, _p) in net.wire.datagrams)
    assert net.media.calls == {} and net.clock.open == set()
    net.run_out()


def test_a_relay_error_on_the_answer_lets_no_unrelayed_sdp_through(net: Net) -> None:
    invite = outgoing_invite(net)
    net.relay.fail = NGError("Unknown call-id")
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    to_phone = [m for _, m, to in net.new() if to[0] == PHONE.host]
    assert [m.status for m in to_phone] == [500]
    assert all(PROVIDER_MEDIA[0].encode() not in m.body for m in to_phone)
    net.relay.fail = None
    net.run_out()


def test_a_relay_that_answers_later_still_forwards_each_response_once(net: Net) -> None:
    """With a remote relay the hooks return unfired Deferreds: the INVITE, the 200 and the
    ACK wait for it, and the 200 reaches the phone once (response selection does not send it a
    second time meanwhile)."""
    net.relay.hold = True
    net.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                     call_id="out-1", from_=CALLER, to=CALLEE, body=sdp(*PHONE_MEDIA)), PHONE)
    assert net.to(PROVIDER_IP) == []
    net.relay.release()
    [invite] = net.to(PROVIDER_IP)
    assert_relayed(invite, OUTSIDE)
    net.send(respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",)),
             PROVIDER)
    assert net.to(PHONE.host) == []
    net.relay.release()
    net.clock.advance(0)
    [ok] = net.to(PHONE.host)
    assert ok.status == 200
    assert_relayed(ok, INSIDE)
    net.clock.advance(1)
    assert net.to(PHONE.host) == []
    net.relay.hold = False
    hang_up(net)
    net.run_out()


def test_bad_sdp_in_an_offer_is_488(net: Net) -> None:
    net.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                     call_id="out-1", from_=CALLER, to=CALLEE,
                     body=b"v=0\r\nc=IN IP4\r\nm=audio x\r\n"), PHONE)
    [(_, final, _)] = net.new()
    assert final.status == 488 and net.relay.log == []
    net.run_out()


def test_an_offer_with_too_many_streams_is_488(net: Net) -> None:
    """Each stream takes relay ports: 17 are refused before the relay is asked."""
    sdp = (b"v=0\r\no=- 1 1 IN IP4 192.168.77.10\r\ns=-\r\nc=IN IP4 192.168.77.10\r\n"
           b"t=0 0\r\n" + b"".join(b"m=audio %d RTP/AVP 0\r\n" % (20000 + 2 * i)
                                    for i in range(17)))
    net.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                     call_id="out-1", from_=CALLER, to=CALLEE, body=sdp), PHONE)
    [(_, final, _)] = net.new()
    assert (final.status, net.relay.log) == (488, [])
    assert "17 media streams" in final.headers.get("warning")
    net.run_out()


def test_the_relay_ending_a_call_ends_the_dialog(net: Net) -> None:
    answered_call(net)
    assert len(net.proxy.dialogs) == 1
    net.clock.advance(61)  # no RTP for longer than the relay's timeout (60 s)
    assert net.engine.calls == {} and net.clock.open == set()
    assert len(net.proxy.dialogs) == 0 and net.media.calls == {}
    net.run_out()


# ------------------------------------------------------------------------------------------------
# a public proxy: every listener outside
# ------------------------------------------------------------------------------------------------
PUBLIC = f"""
[proxy]
domains = ["lan.example"]

{listen_toml(outside=OUTSIDE)}
[upstream]
uri = "sip:{PROVIDER_IP}:5060"

[plugins]
enabled = ["media"]
open_relay = true  # phones that call out unauthenticated: this is about media, not access

[media]
port_min = 30000
port_max = 30099
"""


def test_a_public_proxy_relays_outside_to_outside_and_latches_natted_phones() -> None:
    n = make_net(PUBLIC)
    natted = Source("UDP", "198.51.100.20", 40001, OUTSIDE, 5060, "outside")
    n.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                   call_id="pub-1", from_=CALLER, to=CALLEE, body=sdp(*PHONE_MEDIA)), natted)
    _, invite = n.one(PROVIDER_IP)
    assert_relayed(invite, OUTSIDE)
    [(_, _, kwargs)] = n.relay.log
    options = kwargs["options"]
    assert options["direction"] == ["outside", "outside"]
    assert options["flags"] == ["SIP-source-address"]  # 192.168.77.10 is not where SIP came from
    assert options["received-from"] == ["IP4", "198.51.100.20"]
    n.send(respond(invite, 486, "b1"), PROVIDER)
    n.run_out()


class LoopbackNGClient:
    """An NGClient stand-in: the commands go straight to an engine's NG command code."""

    def __init__(self, engine: Any, clock: Clock) -> None:
        self.commands = NGCommands(engine)
        self.clock = clock

    def command(self, message: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        reply = self.commands.handle(to_text(message))
        if reply.get("result") == "error":
            return defer.fail(NGError(str(reply.get("error-reason"))))
        return defer.succeed(reply)


def test_a_call_an_ng_relay_lost_ends_the_dialog(net: Net) -> None:
    """Over NG the relay cannot say that it ended a call: the plugin's NGRelay asks every
    10 s, and a call it no longer knows ("gone") ends the dialog."""
    engine = net.engine
    ng_relay = NGRelay(LoopbackNGClient(engine, net.clock), clock=net.clock)  # type: ignore[arg-type]
    net.relay.inner = ng_relay
    ng_relay.add_end_observer(net.media.relay_ended)
    ng_relay.start()
    answered_call(net)
    assert len(net.proxy.dialogs) == 1 and ng_relay.calls == {"out-1"}
    net.clock.advance(10)
    assert len(net.proxy.dialogs) == 1  # still there
    [call] = engine.calls.values()
    engine.end_call(call, "timeout", report=False)  # the remote relay's own timeout, unseen
    net.clock.advance(10)
    assert len(net.proxy.dialogs) == 0 and net.media.calls == {}
    ng_relay.stop()
    net.relay.inner = LocalRelay(engine)
    net.run_out()


def test_a_2xx_retransmission_gets_the_same_sdp() -> None:
    """Through the INVITE client transaction's Accepted state (RFC 6026); after Timer M a
    2xx is a stray and goes nowhere."""
    n = make_net(PUBLIC)
    caller = Source("UDP", "198.51.100.20", 5060, OUTSIDE, 5060, "outside")
    n.send(request("INVITE", "sip:bob@provider.example", source=PHONE, branch="z9hG4bKinv1",
                   call_id="pub-2", from_=CALLER, to=CALLEE,
                   body=sdp("198.51.100.20", 10000)), caller)
    _, invite = n.one(PROVIDER_IP)
    ok_bytes = respond(invite, 200, "b1", sdp(*PROVIDER_MEDIA), (f"Contact: <{BOB_CONTACT}>",))
    n.send(ok_bytes, PROVIDER)
    [ok] = n.to(caller.host)
    n.clock.advance(10)
    n.send(ok_bytes, PROVIDER)
    [again] = n.to(caller.host)
    assert again.status == 200 and again.body == ok.body
    assert [c[0] for c in n.relay.commands()] == ["offer", "answer"]
    n.clock.advance(40)  # Timer M: the INVITE client transaction is gone
    n.send(ok_bytes, PROVIDER)
    assert n.new() == []
    n.run_out()


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def _build(media: dict[str, Any], config_text: str = MEDIA_FIREWALL) -> Any:
    harness = ProxyHarness.build(config_text, clock=UdpClock(), plugins=[])
    return factory.build(harness.proxy, Section("media", media))


def test_the_builtin_relay_defaults_to_the_listeners_addresses() -> None:
    plugin = _build({})
    assert isinstance(plugin.relay, LocalRelay)
    interfaces = plugin.relay.engine.interfaces
    assert {n: (i.address, i.sdp_address) for n, i in interfaces.items()} == {
        "inside": (INSIDE, INSIDE), "outside": (OUTSIDE, OUTSIDE)}
    assert plugin.relay_service is not None and plugin.relay_service.parent is plugin
    assert (plugin.relay.engine.port_min, plugin.relay.engine.port_max) == (30000, 40000)


def test_an_ng_relay_and_its_interface_names() -> None:
    plugin = _build({"relay": "ng:127.0.0.1:2223", "inside_interface": "internal",
                     "outside_interface": "external"})
    assert isinstance(plugin.relay, NGRelay)
    assert plugin.relay.client.address == ("127.0.0.1", 2223)
    assert plugin.interface_names == {"inside": "internal", "outside": "external"}
    assert plugin.relay_service is None


@pytest.mark.parametrize(("media", "message"), [
    ({"relay": "rtpengine"}, 'media.relay: must be "builtin" or "ng:ADDRESS:PORT"'),
    ({"relay": "ng:relay.example:2223"}, "media.relay: must be ADDRESS:PORT with an IP"),
    ({"relay": "ng:127.0.0.1:99999"}, "media.relay: must be ADDRESS:PORT"),
    ({"relay": "ng:127.0.0.1:2223", "port_min": 30000}, 'media.port_min: only for relay = '),
    ({"poll_interval": 5}, 'media.poll_interval: only for relay = "ng:'),
    ({"port_min": 30000, "port_max": 30001}, "media.port_max: must be at least"),
    ({"port_min": 80}, "media.port_min:"),
    ({"inside_address": "lan"}, "media.inside_address: must be ADDRESS"),
    ({"inside_interface": "a b"}, "media.inside_interface: must be a relay interface name"),
    ({"listen_ng": "localhost"}, "media.listen_ng: must be ADDRESS:PORT"),
    ({"timeouts": 5}, "media.timeouts"),
])
def test_config_errors_name_the_key(media: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _build(media)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_wildcard_listener_needs_the_relay_address() -> None:
    wildcard = PUBLIC.replace(f'address = "{OUTSIDE}"', 'address = "0.0.0.0"')
    with pytest.raises(ConfigError, match=r"media\.outside_address: required"):
        _build({}, wildcard)
    plugin = _build({"outside_address": "203.0.113.9!198.51.100.9"}, wildcard)
    [interface] = plugin.relay.engine.interfaces.values()
    assert (interface.address, interface.sdp_address) == ("203.0.113.9", "198.51.100.9")
    with pytest.raises(ConfigError, match=r"media\.inside_address: no listener has side"):
        _build({"outside_address": "203.0.113.9", "inside_address": "10.0.0.1"}, wildcard)


def test_the_firewall_example_builds_with_the_media_plugin() -> None:
    """examples/firewall.toml is what a firewall should use: nat and media, relayed per side."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "examples" / "firewall.toml").read_text()
    config = parse_config(text)
    assert list(config.plugins) == ["acl", "nat", "media"]  # acl: the core's, outside socket
    n = make_net(text)
    assert {i.name: i.address for i in n.engine.interfaces.values()} == {
        "inside": "192.168.77.1", "outside": "203.0.113.1"}
    n.run_out()
