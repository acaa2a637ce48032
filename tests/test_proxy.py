"""RFC 3261 section 16 proxy rules, driven through ``Proxy.receive`` with in-memory transports.

Every message goes in as bytes parsed by ``parse_message`` (with ``source`` set, as the
transports do) and every message the proxy sends is recorded by ``RecordingWire``
(sipproxy.testing), re-parsed from the bytes it would put on the wire. Timers run on a
``task.Clock``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.logger import ILogObserver, globalLogPublisher

from sipproxy.context import Target
from sipproxy.dialogs import Dialog
from sipproxy.errors import ParseError
from sipproxy.interfaces import DROP
from sipproxy.message import MAGIC_COOKIE, Request, Response, Source, parse_message
from sipproxy.pipeline import Pipeline, Plugin
from sipproxy.proxy import TIMER_C
from tests.proxy_harness import (
    ALICE,
    BOB_1,
    BOB_2,
    CONFIG,
    INSIDE,
    OUTSIDE,
    PROVIDER,
    PROVIDER_SOURCE,
    Harness,
    invite,
    make_harness,
    only,
    request,
)

DATA = Path(__file__).parent / "data" / "rfc4475"


# ------------------------------------------------------------------------------------------------
# test doubles
# ------------------------------------------------------------------------------------------------
class RecordingPlugin(Plugin):
    """Records the dialog hooks."""

    name = "recorder"

    def __init__(self) -> None:
        self.established: list[Dialog] = []
        self.ended: list[tuple[Dialog, str]] = []

    def dialog_established(self, dialog: Any) -> None:
        self.established.append(dialog)

    def dialog_ended(self, dialog: Any, reason: str) -> None:
        self.ended.append((dialog, reason))


@pytest.fixture
def h() -> Harness:
    return make_harness()


@pytest.fixture
def plugin() -> RecordingPlugin:
    return RecordingPlugin()


# ------------------------------------------------------------------------------------------------
# 16.3: validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
def test_max_forwards_zero_is_483(h: Harness, method: str) -> None:
    h.receive(request(method, "sip:carol@example.com", max_forwards=0))
    assert h.finals() == [483]
    assert h.sent() == []
    h.assert_no_leaks()


def test_max_forwards_is_decremented(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com", max_forwards=10))
    assert only(h.sent("INVITE")).max_forwards == 9


def test_max_forwards_one_still_goes_out_with_zero(h: Harness) -> None:
    h.receive(request("OPTIONS", "sip:carol@example.com", max_forwards=1))
    assert only(h.sent("OPTIONS")).max_forwards == 0


def test_max_forwards_added_when_absent(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com", max_forwards=None))
    assert only(h.sent("INVITE")).max_forwards == 70


def test_request_coming_back_with_our_via_is_482(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com"))
    out = only(h.sent("INVITE"))
    assert h.proxy._is_own_via(out.vias[0])
    # the upstream routes it straight back to us, unchanged
    h.receive(out.to_bytes(), PROVIDER_SOURCE)
    assert h.replies(482)
    assert len(h.sent("INVITE")) == 1


def test_request_coming_back_through_another_proxy_is_482(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com"))
    out = only(h.sent("INVITE")).to_bytes().decode()
    back = out.replace(
        "\r\nVia:", "\r\nVia: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bKprovider1\r\nVia:", 1
    )
    h.receive(back, PROVIDER_SOURCE)
    assert [r.status for r in h.replies() if r.cseq.method == "INVITE" and r.status >= 200] \
        == [482]
    assert len(h.sent("INVITE")) == 1


def test_spiral_with_new_request_uri_is_forwarded(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite("sip:carol@example.com"))
    out = only(h.sent("INVITE")).to_bytes().decode()
    # the provider retargets carol to bob@lan.example and sends it back to us
    back = out.replace("INVITE sip:carol@example.com SIP/2.0",
                       "INVITE sip:bob@lan.example SIP/2.0", 1)
    back = back.replace(
        "\r\nVia:", "\r\nVia: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bKprovider2\r\nVia:", 1
    )
    h.receive(back, PROVIDER_SOURCE)
    assert 482 not in h.statuses()
    spiral = h.sent("INVITE")[1]
    assert str(spiral.uri) == BOB_1
    assert h.target_of(spiral).host == "192.168.1.30"
    assert len(spiral.vias) == 4  # our new one, the provider's, our first one, alice's
    assert spiral.vias[0].branch != spiral.vias[2].branch


@pytest.mark.parametrize("name", ["unkscm.dat", "novelsc.dat"])
def test_unsupported_request_uri_scheme_is_416(h: Harness, name: str) -> None:
    h.receive((DATA / name).read_bytes(), Source("TCP", "192.0.2.9", 40000, INSIDE, 5060))
    assert h.statuses() == [416]
    assert h.sent() == []
    h.assert_no_leaks()


def test_proxy_require_is_420_listing_the_tags(h: Harness) -> None:
    h.receive((DATA / "bext01.dat").read_bytes(), Source("TLS", "192.0.2.9", 40000, INSIDE, 5061))
    reply = only(h.replies())
    assert reply.status == 420
    unsupported = [t.strip() for t in reply.headers.get_all("unsupported")]
    assert unsupported == ["noProxiesSupportThis", "norDoAnyProxiesSupportThis"]
    assert reply.to.tag
    assert h.sent() == []


def test_require_alone_is_not_the_proxy_s_business(h: Harness) -> None:
    h.receive(request("OPTIONS", "sip:carol@example.com", extra="Require: fancy"))
    assert only(h.sent("OPTIONS")).headers.get("require") == "fancy"


# ------------------------------------------------------------------------------------------------
# 16.4: Route processing
# ------------------------------------------------------------------------------------------------
def test_route_naming_us_is_removed_and_next_route_is_followed(h: Harness) -> None:
    h.receive(request(
        "OPTIONS", "sip:carol@example.com",
        extra=f"Route: <sip:{INSIDE}:5060;lr>, <sip:198.51.100.9:5080;lr>",
    ))
    out = only(h.sent("OPTIONS"))
    assert out.headers.get_all("route") == ["<sip:198.51.100.9:5080;lr>"]
    assert str(out.uri) == "sip:carol@example.com"
    assert h.target_of(out) == Target("UDP", "198.51.100.9", 5080, "198.51.100.9")


def test_route_naming_us_only_is_removed_and_request_uri_routes(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(request("OPTIONS", "sip:bob@lan.example", extra=f"Route: <sip:{INSIDE};lr>"))
    out = only(h.sent("OPTIONS"))
    assert "route" not in out.headers
    assert str(out.uri) == BOB_1


def test_request_uri_we_record_routed_is_replaced_by_last_route(h: Harness) -> None:
    """16.4: a strict router put our Record-Route URI into the Request-URI."""
    h.receive(request(
        "OPTIONS", f"sip:{INSIDE}:5060;lr",
        extra="Route: <sip:198.51.100.9:5080;lr>, <sip:carol@192.0.2.44:5060>",
    ))
    out = only(h.sent("OPTIONS"))
    assert str(out.uri) == "sip:carol@192.0.2.44:5060"
    assert out.headers.get_all("route") == ["<sip:198.51.100.9:5080;lr>"]
    assert h.target_of(out).host == "198.51.100.9"


# ------------------------------------------------------------------------------------------------
# 16.6: Record-Route and Via
# ------------------------------------------------------------------------------------------------
def test_record_route_one_entry_when_in_and_out_listener_are_the_same(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    assert out.headers.get_all("record-route") == [f"<sip:{INSIDE}:5060;lr>"]


def test_record_route_two_entries_when_listeners_differ(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com", extra="Record-Route: <sip:192.168.1.99;lr>"))
    out = only(h.sent("INVITE"))
    # the outside entry first (the callee's side), then the inside one, then the caller's
    assert out.headers.get_all("record-route") == [
        f"<sip:{OUTSIDE}:5060;lr>", f"<sip:{INSIDE}:5060;lr>", "<sip:192.168.1.99;lr>",
    ]
    assert h.target_of(out) == PROVIDER
    assert out.vias[0].host == OUTSIDE


def test_record_route_names_our_listener_for_a_request_over_our_own_connection(
    h: Harness,
) -> None:
    # the provider calls over a TCP connection the proxy opened (local port 41234 is no
    # listener's): the entry facing it names the outside listener, not the kernel's 5060
    h.register("bob", BOB_1)
    over_our_connection = Source("TCP", PROVIDER.host, PROVIDER.port, OUTSIDE, 41234, "outside")
    h.receive(invite(via=f"Via: SIP/2.0/TCP {PROVIDER.host}:{PROVIDER.port};branch=z9hG4bKp1"),
              over_our_connection)
    out = only(h.sent("INVITE"))
    assert out.headers.get_all("record-route")[:2] == [
        f"<sip:{INSIDE}:5060;lr>", f"<sip:{OUTSIDE}:5060;lr>"]


@pytest.mark.parametrize("method", ["OPTIONS", "MESSAGE", "REGISTER"])
def test_no_record_route_outside_dialog_creation(h: Harness, method: str) -> None:
    h.receive(request(method, "sip:carol@example.com"))
    assert "record-route" not in only(h.sent(method)).headers


def test_no_record_route_for_in_dialog_request(h: Harness) -> None:
    h.receive(invite("sip:carol@192.0.2.44", to="<sip:carol@example.com>;tag=c1"))
    assert "record-route" not in only(h.sent("INVITE")).headers


def test_record_route_can_be_turned_off() -> None:
    h = make_harness(CONFIG.replace("[proxy]", "[proxy]\nrecord_route = false"))
    h.receive(invite("sip:carol@example.com"))
    assert "record-route" not in only(h.sent("INVITE")).headers


def test_via_added_with_unique_branch_and_removed_from_responses(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com", call_id="c1", branch="z9hG4bKa1"))
    h.receive(invite("sip:carol@example.com", call_id="c2", branch="z9hG4bKa2"))
    h.receive(request("OPTIONS", "sip:carol@example.com", call_id="c3", branch="z9hG4bKa3"))
    sent = h.sent()
    assert len(sent) == 3
    branches = [r.vias[0].branch for r in sent]
    assert all(b is not None and b.startswith(MAGIC_COOKIE) for b in branches)
    assert len(set(branches)) == 3
    for r in sent:
        assert (r.vias[0].host, r.vias[0].port, r.vias[0].transport) == (OUTSIDE, 5060, "UDP")
        assert r.vias[0].rport is True
        assert r.vias[1].host == ALICE.host
    first = sent[0]
    h.respond(first, 180, source=PROVIDER_SOURCE)
    h.respond(first, 200, source=PROVIDER_SOURCE)
    relayed = [r for r in h.replies() if r.call_id == "c1" and r.status > 100]
    assert [r.status for r in relayed] == [180, 200]
    for resp in relayed:
        assert [v.branch for v in resp.vias] == ["z9hG4bKa1"]


def test_forked_branches_have_distinct_branch_ids(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.register("bob", BOB_2)
    h.receive(invite())
    a, b = h.sent("INVITE")
    assert a.vias[0].branch != b.vias[0].branch


def test_oversized_request_gets_tcp_in_via(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com", body="v=0\r\n" + "a=x\r\n" * 300))
    out = only(h.sent("INVITE"))
    assert out.vias[0].transport == "TCP"
    assert out.vias[0].branch and out.vias[0].branch.startswith(MAGIC_COOKIE)


# ------------------------------------------------------------------------------------------------
# 16.5: the registrar and the location service
# ------------------------------------------------------------------------------------------------
def test_register_for_our_domain_is_answered_by_the_registrar(h: Harness) -> None:
    reply = h.register("bob", BOB_1)
    assert reply.status == 200
    assert [str(c.uri) for c in reply.contacts] == [BOB_1]
    assert reply.headers.get("server") == "sipproxy-test"
    assert h.sent() == []
    assert [b.contact for b in h.location.lookup("sip:bob@lan.example")] == [BOB_1]
    h.assert_no_leaks()


def test_register_for_a_foreign_domain_is_forwarded_upstream(h: Harness) -> None:
    h.receive(request("REGISTER", "sip:example.com", to="<sip:alice@example.com>",
                      from_="<sip:alice@example.com>;tag=x", extra="Contact: <sip:a@192.168.1.20>"))
    assert h.target_of(only(h.sent("REGISTER"))) == PROVIDER
    assert h.location.lookup("sip:alice@example.com") == []


def test_invite_to_registered_aor_goes_to_the_contact(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    assert str(out.uri) == BOB_1
    assert h.target_of(out) == Target("UDP", "192.168.1.30", 5062, "192.168.1.30")
    assert out.vias[0].host == INSIDE
    assert out.to.uri.user == "bob" and out.to.uri.host == "lan.example"


def test_unregistered_local_user_is_404(h: Harness) -> None:
    h.receive(invite("sip:nobody@lan.example"))
    assert h.finals() == [404]
    assert h.sent() == []
    h.assert_no_leaks()


def test_options_to_the_proxy_itself_is_answered(h: Harness) -> None:
    h.receive(request("OPTIONS", f"sip:{INSIDE}"))
    reply = only(h.replies())
    assert reply.status == 200
    assert "INVITE" in (reply.headers.get("allow") or "")


def test_foreign_domain_goes_to_upstream_host_and_port(h: Harness) -> None:
    h.receive(invite("sip:carol@example.com"))
    out = only(h.sent("INVITE"))
    assert h.target_of(out) == PROVIDER
    assert str(out.uri) == "sip:carol@example.com"
    assert [(c[0], c[1], (c[2] or "").upper(), c[3]) for c in h.resolver.calls] == [
        ("provider.example", 5070, "UDP", False)
    ]


def test_with_upstream_a_request_uri_naming_an_address_and_port_still_goes_upstream(
        h: Harness) -> None:
    """[upstream] is an outbound proxy: the host:port of the Request-URI is its business."""
    h.receive(invite("sip:carol@192.0.2.80:5090"))
    out = only(h.sent("INVITE"))
    assert h.target_of(out) == PROVIDER
    assert str(out.uri) == "sip:carol@192.0.2.80:5090"


def test_foreign_domain_without_upstream_goes_to_the_request_uri() -> None:
    h = make_harness(CONFIG.split("[upstream]")[0])
    h.receive(invite("sip:carol@192.0.2.80:5090"))
    assert h.target_of(only(h.sent("INVITE"))) == Target("UDP", "192.0.2.80", 5090, "192.0.2.80")


def test_unresolvable_target_is_answered_not_dropped() -> None:
    h = make_harness(CONFIG.split("[upstream]")[0])
    h.receive(invite("sip:carol@nowhere.invalid"))
    assert h.sent() == []
    final = only(h.finals())
    assert 500 <= final < 600
    h.assert_no_leaks()


# ------------------------------------------------------------------------------------------------
# 16.7: forking and response selection
# ------------------------------------------------------------------------------------------------
def forked(h: Harness, **kw: Any) -> tuple[Request, Request]:
    """An INVITE to bob, who has two contacts: the two branches, in contact order."""
    h.register("bob", BOB_1)
    h.register("bob", BOB_2)
    h.receive(invite(**kw))
    by_uri = {str(r.uri): r for r in h.sent("INVITE")}
    assert set(by_uri) == {BOB_1, BOB_2}
    return by_uri[BOB_1], by_uri[BOB_2]


def cancels_to(h: Harness, branch: Request) -> list[Request]:
    return [c for c in h.sent("CANCEL") if c.vias[0].branch == branch.vias[0].branch]


def test_fork_is_parallel(h: Harness) -> None:
    a, b = forked(h)
    assert h.target_of(a).host == "192.168.1.30"
    assert h.target_of(b).host == "192.168.1.31"
    assert a.call_id == b.call_id == "call-1"


def test_fork_200_beats_486(h: Harness) -> None:
    a, b = forked(h)
    h.respond(a, 486, to_tag="busy")
    assert h.finals("INVITE") == []  # a 4xx waits for the other branch
    h.respond(b, 200, to_tag="answered")
    final = only([r for r in h.replies() if r.status >= 200 and r.cseq.method == "INVITE"])
    assert final.status == 200 and final.to.tag == "answered"
    assert [ack.to.tag for ack in h.sent("ACK")] == ["busy"]  # the hop-by-hop ACK for the 486
    assert h.sent("CANCEL") == []
    h.assert_no_leaks()


def test_fork_200_cancels_other_branch_only_after_its_provisional(h: Harness) -> None:
    a, b = forked(h)
    h.respond(b, 200, to_tag="answered")
    assert h.finals("INVITE") == [200]
    assert cancels_to(h, a) == []  # 16.10 / 9.1: no CANCEL before a provisional
    h.respond(a, 180, to_tag="ringing")
    cancel = only(cancels_to(h, a))
    assert str(cancel.uri) == str(a.uri)
    assert cancel.cseq.number == a.cseq.number and cancel.cseq.method == "CANCEL"
    assert h.target_of(cancel) == h.target_of(a)
    assert 180 not in h.statuses()  # nothing after the final goes upstream
    h.respond(cancel, 200)
    h.respond(a, 487, to_tag="ringing")
    assert h.finals("INVITE") == [200]
    h.assert_no_leaks()


def test_fork_200_cancels_ringing_branch_at_once(h: Harness) -> None:
    a, b = forked(h)
    h.respond(a, 180, to_tag="ringing")
    assert 180 in h.statuses()
    assert h.sent("CANCEL") == []
    h.respond(b, 200, to_tag="answered")
    assert only(cancels_to(h, a))
    assert cancels_to(h, b) == []
    h.respond(a, 487, to_tag="ringing")
    assert h.finals("INVITE") == [200]
    h.assert_no_leaks()


def test_both_2xx_of_a_fork_are_forwarded(h: Harness) -> None:
    """16.7 step 10: every 2xx to INVITE goes upstream, the caller sorts the dialogs out."""
    a, b = forked(h)
    h.respond(a, 200, to_tag="first")
    h.respond(b, 200, to_tag="second")
    tags = [r.to.tag for r in h.replies(200) if r.cseq.method == "INVITE"]
    assert tags == ["first", "second"]


def first_branch(h: Harness) -> Request:
    ctx = only([c for c in h.proxy.requests_in_progress() if c.request.method == "INVITE"])
    return next(r for r in h.sent("INVITE") if str(r.uri) == str(ctx.branches[0].request.uri))


def test_two_failures_of_one_class_give_the_first_branch_s(h: Harness) -> None:
    """404 and 486 are the same class with the same preference in select_best: the tie goes
    to the first branch (the newest contact), not to the first or last to arrive."""
    a, b = forked(h)
    first = first_branch(h)
    other = b if first is a else a
    h.respond(other, 404, to_tag="nf")
    h.respond(first, 486, to_tag="busy")
    final = only([r for r in h.replies() if r.status >= 200 and r.cseq.method == "INVITE"])
    assert final.status == 486
    h.assert_no_leaks()


def test_lower_class_wins_and_challenges_are_preferred(h: Harness) -> None:
    a, b = forked(h)
    h.respond(a, 503, to_tag="down")
    h.respond(b, 407, to_tag="auth", extra='Proxy-Authenticate: Digest realm="b", nonce="1"')
    final = only([r for r in h.replies() if r.status >= 200 and r.cseq.method == "INVITE"])
    assert final.status == 407
    assert final.headers.get_all("proxy-authenticate") == ['Digest realm="b", nonce="1"']


def test_6xx_wins_and_cancels_the_other_branches(h: Harness) -> None:
    a, b = forked(h)
    h.respond(a, 180, to_tag="ringing")
    h.respond(b, 603, to_tag="declined")
    cancel = only(cancels_to(h, a))
    assert h.finals("INVITE") == []
    h.respond(cancel, 200)
    h.respond(a, 487, to_tag="ringing")
    final = only([r for r in h.replies() if r.status >= 200 and r.cseq.method == "INVITE"])
    assert final.status == 603 and final.to.tag == "declined"
    h.assert_no_leaks()


def test_503_is_passed_upstream_as_500(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 503)
    assert h.finals()[-1] == 500
    assert 503 not in h.statuses()
    h.assert_no_leaks()


def test_branch_timeout_is_408(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    h.clock.advance(64 * 0.5 + 1)  # Timer B
    assert h.finals()[-1] == 408
    h.assert_no_leaks()


# ------------------------------------------------------------------------------------------------
# 16.10: CANCEL
# ------------------------------------------------------------------------------------------------
def cancel_of(invite_text: str) -> str:
    head, _, _ = invite_text.partition("\r\n\r\n")
    lines = [ln for ln in head.split("\r\n")
             if not ln.startswith(("Contact:", "Content-Length:", "Record-Route:"))]
    lines[0] = lines[0].replace("INVITE", "CANCEL", 1)
    lines = [ln.replace(" INVITE", " CANCEL") if ln.startswith("CSeq:") else ln for ln in lines]
    return "\r\n".join([*lines, "Content-Length: 0"]) + "\r\n\r\n"


def test_cancel_is_answered_and_sent_downstream_after_the_provisional(h: Harness) -> None:
    h.register("bob", BOB_1)
    text = invite()
    h.receive(text)
    out = only(h.sent("INVITE"))
    h.receive(cancel_of(text))
    cancel_ok = only([r for r in h.replies() if r.cseq.method == "CANCEL"])
    assert cancel_ok.status == 200
    assert h.sent("CANCEL") == []  # no provisional from bob yet
    h.respond(out, 180)
    cancel = only(h.sent("CANCEL"))
    assert cancel.vias[0].branch == out.vias[0].branch
    assert str(cancel.uri) == str(out.uri)
    assert h.target_of(cancel) == h.target_of(out)
    h.respond(cancel, 200)
    h.respond(out, 487)
    assert h.finals("INVITE") == [487]
    assert only(h.sent("ACK")).to.tag == "callee"
    h.assert_no_leaks()


def test_cancel_after_provisional_goes_downstream_at_once(h: Harness) -> None:
    h.register("bob", BOB_1)
    text = invite()
    h.receive(text)
    out = only(h.sent("INVITE"))
    h.respond(out, 183)
    h.receive(cancel_of(text))
    assert only(h.sent("CANCEL")).vias[0].branch == out.vias[0].branch


def test_cancel_of_a_fork_cancels_every_branch(h: Harness) -> None:
    a, b = forked(h)
    h.respond(a, 180, to_tag="ra")
    h.respond(b, 180, to_tag="rb")
    h.receive(cancel_of(invite()))
    assert len(cancels_to(h, a)) == 1 and len(cancels_to(h, b)) == 1
    h.respond(a, 487, to_tag="ra")
    h.respond(b, 487, to_tag="rb")
    assert h.finals("INVITE") == [487]
    h.assert_no_leaks()


def test_cancel_without_transaction_is_481(h: Harness) -> None:
    h.receive(cancel_of(invite(branch="z9hG4bKnever")))
    assert only(h.replies()).status == 481
    assert h.sent() == []
    h.assert_no_leaks()


def test_cancel_after_final_does_nothing_downstream(h: Harness) -> None:
    h.register("bob", BOB_1)
    text = invite()
    h.receive(text)
    out = only(h.sent("INVITE"))
    h.respond(out, 180)
    h.respond(out, 200)
    h.receive(cancel_of(text))
    assert h.sent("CANCEL") == []


# ------------------------------------------------------------------------------------------------
# ACK for 2xx and stray responses
# ------------------------------------------------------------------------------------------------
def test_2xx_ack_is_forwarded_statelessly_by_route(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 200)
    clients = h.proxy.transactions.client_count
    h.receive(request(
        "ACK", BOB_1, branch="z9hG4bKack1", to="<sip:bob@lan.example>;tag=callee",
        max_forwards=70, extra=f"Route: <sip:{INSIDE}:5060;lr>",
    ))
    ack = only(h.sent("ACK"))
    assert str(ack.uri) == BOB_1
    assert "route" not in ack.headers
    assert ack.max_forwards == 69
    assert ack.vias[0].host == INSIDE and ack.vias[0].branch != "z9hG4bKack1"
    assert ack.vias[1].branch == "z9hG4bKack1"
    assert h.target_of(ack) == Target("UDP", "192.168.1.30", 5062, "192.168.1.30")
    assert h.proxy.transactions.client_count == clients
    assert [r for r in h.replies() if r.cseq.method == "ACK"] == []


def test_2xx_ack_follows_the_next_route(h: Harness) -> None:
    h.receive(request(
        "ACK", "sip:carol@192.0.2.50", branch="z9hG4bKack2", to="<sip:carol@x>;tag=t",
        extra=f"Route: <sip:{INSIDE};lr>, <sip:198.51.100.9:5080;lr>",
    ))
    ack = only(h.sent("ACK"))
    assert h.target_of(ack).port == 5080
    assert ack.headers.get_all("route") == ["<sip:198.51.100.9:5080;lr>"]
    h.assert_no_leaks()


def test_ack_with_max_forwards_zero_is_dropped(h: Harness) -> None:
    h.receive(request("ACK", "sip:carol@192.0.2.50", to="<sip:c@x>;tag=t", max_forwards=0))
    assert h.sent() == [] and h.replies() == []


def stray(status: int, method: str = "INVITE", top: str | None = None) -> str:
    top = top or f"SIP/2.0/UDP {INSIDE}:5060;branch=z9hG4bKgone.0x;rport"
    return (
        f"SIP/2.0 {status} Whatever\r\n"
        f"Via: {top}\r\n"
        f"Via: SIP/2.0/UDP {ALICE.host}:5060;branch=z9hG4bKalice9\r\n"
        "To: <sip:bob@lan.example>;tag=b9\r\nFrom: <sip:alice@lan.example>;tag=a9\r\n"
        f"Call-ID: stray-1\r\nCSeq: 9 {method}\r\nContent-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize("status, method, top", [
    (200, "INVITE", None),  # issue 11: was forwarded to the Via below ours (anyone's)
    (180, "INVITE", None),
    (486, "INVITE", None),
    (200, "BYE", None),
    (200, "INVITE", "SIP/2.0/UDP 192.0.2.200:5060;branch=z9hG4bKnotours"),
])
def test_stray_responses_are_dropped_and_counted(
    h: Harness, status: int, method: str, top: str | None
) -> None:
    """RFC 6026 7.3: a response no client transaction matches is never forwarded."""
    h.receive(stray(status, method, top), PROVIDER_SOURCE)
    h.receive(stray(status, method, top), PROVIDER_SOURCE)
    assert h.wire.responses == []
    assert h.sent() == []
    assert h.proxy.refusals.counters["stray_response"] == 2
    h.assert_no_leaks()


def test_2xx_retransmissions_reach_the_caller_until_timer_m(h: Harness) -> None:
    """The INVITE client transaction's Accepted state (RFC 6026) passes every 2xx on for 64*T1
    (also after the server transaction ended, back where the INVITE came from); later ones
    are strays."""
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    bob = Source("UDP", "192.168.1.30", 5062, INSIDE, 5060, "inside")
    ok = out.make_response(200).to_bytes().replace(b"\r\nFrom:", b";tag=b1\r\nFrom:", 1)
    h.receive(ok, bob)
    assert h.finals("INVITE") == [200]
    h.clock.advance(10)
    h.receive(ok, bob)  # a retransmission by the callee
    oks = [(r.status, src) for r, src in h.wire.responses if r.cseq.method == "INVITE"]
    assert oks == [(100, ALICE), (200, ALICE), (200, ALICE)]
    h.clock.advance(64 * h.config.timers.t1 - 10 + 1)  # Timer L and Timer M fired
    h.receive(ok, bob)
    assert len(h.wire.responses) == len(oks) + 1  # the REGISTER's 200 and these
    assert h.proxy.refusals.counters["stray_response"] == 1
    h.assert_no_leaks()


def test_one_invite_sets_up_at_most_max_branches_dialogs(h: Harness) -> None:
    """A callee answering again and again with new To tags (within Timer M) would grow the
    dialog table by one 12-hour dialog each: after max_branches (10) such 2xx are dropped;
    retransmissions of the dialogs it has still get through."""
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    for n in range(50):
        h.respond(out, 200, to_tag=f"t{n}")
    h.respond(out, 200, to_tag="t3")
    assert len(h.proxy.dialogs) == 10
    forwarded = [r.to.tag for r in h.replies(200) if r.cseq.method == "INVITE"]
    assert forwarded == [f"t{n}" for n in range(10)] + ["t3"]
    assert h.proxy.refusals.counters["dialogs_per_request"] == 40


def test_response_for_an_unknown_branch_is_dropped(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    before = list(h.statuses())
    ours = out.vias[0].branch
    assert ours is not None
    response = out.make_response(180).to_bytes().decode().replace(ours, ours + "x")
    h.receive(response, Source("UDP", "192.168.1.30", 5062, INSIDE, 5060))
    assert h.statuses() == before
    h.respond(out, 180)  # the real branch still works
    assert h.statuses() == [*before, 180]


# ------------------------------------------------------------------------------------------------
# Timer C (16.6 step 11)
# ------------------------------------------------------------------------------------------------
def test_timer_c_cancels_a_branch_that_rings_too_long(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, 100)  # stops Timer B
    h.clock.advance(60)
    h.respond(out, 180)  # a 101-199 provisional restarts Timer C
    h.clock.advance(TIMER_C - 1)
    assert h.sent("CANCEL") == []
    h.clock.advance(1)
    cancel = only(h.sent("CANCEL"))
    assert cancel.vias[0].branch == out.vias[0].branch
    h.respond(cancel, 200)
    h.respond(out, 487)
    assert h.finals("INVITE") == [487]
    h.assert_no_leaks()


def test_100_trying_does_not_restart_timer_c(h: Harness) -> None:
    """RFC 3261 16.7 step 2: only 101-199 reset Timer C; a 100 says nothing of the callee."""
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, 100)
    h.clock.advance(TIMER_C - 10)
    h.respond(out, 100)
    h.clock.advance(10)
    assert len(h.sent("CANCEL")) == 1


def test_timer_c_then_silence_still_ends_with_a_final(h: Harness) -> None:
    """A callee that ignores the CANCEL: 64*T1 later the proxy gives up with 408 (RFC 3261 9.1)."""
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 180)
    h.clock.advance(TIMER_C)
    assert len(h.sent("CANCEL")) >= 1
    h.assert_no_leaks()
    assert h.finals("INVITE") == [408]


# ------------------------------------------------------------------------------------------------
# dialogs
# ------------------------------------------------------------------------------------------------
def established_call(plugins: list[Any]) -> tuple[Harness, Request]:
    h = make_harness(plugins=plugins)
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, 180)
    h.respond(out, 200)
    h.receive(request("ACK", BOB_1, branch="z9hG4bKack1", to="<sip:bob@lan.example>;tag=callee",
                      extra=f"Route: <sip:{INSIDE}:5060;lr>"))
    return h, out


def test_dialog_established_on_2xx_and_ended_on_bye(plugin: RecordingPlugin) -> None:
    h, out = established_call([plugin])
    dialog = only(plugin.established)
    assert (dialog.call_id, dialog.caller_tag, dialog.callee_tag) == ("call-1", "a1", "callee")
    assert dialog.caller_side == "inside"
    h.respond(out, 200)  # a 2xx retransmission does not make a second dialog
    assert len(plugin.established) == 1
    assert plugin.ended == []
    h.receive(request("BYE", BOB_1, cseq=2, branch="z9hG4bKbye1",
                      to="<sip:bob@lan.example>;tag=callee",
                      extra=f"Route: <sip:{INSIDE}:5060;lr>"))
    bye = only(h.sent("BYE"))
    assert h.target_of(bye).host == "192.168.1.30"  # the remote target, not [upstream]
    assert plugin.ended == []  # ended when the BYE is answered
    h.respond(bye, 200)
    assert plugin.ended == [(dialog, "bye")]
    assert [r.status for r in h.replies() if r.cseq.method == "BYE"] == [200]
    assert len(h.proxy.dialogs) == 0
    h.assert_no_leaks()
    assert len(plugin.ended) == 1


def test_bye_from_the_callee_ends_the_dialog_too(plugin: RecordingPlugin) -> None:
    h, _ = established_call([plugin])
    bob = Source("UDP", "192.168.1.30", 5062, INSIDE, 5060, "inside")
    h.receive(request(
        "BYE", f"sip:alice@{ALICE.host}:{ALICE.port}", cseq=7,
        via="Via: SIP/2.0/UDP 192.168.1.30:5062;branch=z9hG4bKbobbye",
        to="<sip:alice@lan.example>;tag=a1", from_="<sip:bob@lan.example>;tag=callee",
        extra=f"Route: <sip:{INSIDE}:5060;lr>",
    ), bob)
    bye = only(h.sent("BYE"))
    assert h.target_of(bye).host == ALICE.host
    h.respond(bye, 200, source=ALICE)
    assert [reason for _, reason in plugin.ended] == ["bye"]


def test_the_dialog_records_each_party_and_follows_target_refreshes(
    plugin: RecordingPlugin,
) -> None:
    """What the acl plugin judges in-dialog requests by: where each party's messages came
    from, its remote targets (refreshed by a re-INVITE / UPDATE and their 2xx) and the
    Record-Route entries on its side of the proxy."""
    h = make_harness(plugins=[plugin])
    h.register("bob", BOB_1)
    h.receive(invite(extra=f"Contact: <sip:alice@{ALICE.host}:{ALICE.port}>\r\n"
                           "Record-Route: <sip:192.168.1.2;lr>"))
    out = only(h.sent("INVITE"))
    bob = Source("UDP", "192.168.1.30", 5062, INSIDE, 5060, "inside")
    h.respond(out, 200, source=bob, extra="Contact: <sip:bob@192.168.1.30:5062>\r\n"
              "Record-Route: <sip:192.168.1.3;lr>, " + ", ".join(
                  out.headers.get_all("record-route")))
    dialog = only(plugin.established)
    assert list(dialog.caller.hosts) == [ALICE.host]
    assert list(dialog.caller.targets) == [(ALICE.host, 5060)]
    assert list(dialog.caller.routes) == [("192.168.1.2", 5060)]
    assert list(dialog.callee.hosts) == ["192.168.1.30"]
    assert list(dialog.callee.targets) == [("192.168.1.30", 5062)]
    assert list(dialog.callee.routes) == [("192.168.1.3", 5060)]
    assert dialog.parties_from(ALICE.host) == [dialog.caller]
    # bob's re-INVITE moves bob; alice's 2xx moves alice
    h.receive(request(
        "INVITE", f"sip:alice@{ALICE.host}:{ALICE.port}", cseq=5,
        via="Via: SIP/2.0/UDP 192.168.1.30:5062;branch=z9hG4bKbobre",
        to="<sip:alice@lan.example>;tag=a1", from_="<sip:bob@lan.example>;tag=callee",
        extra="Contact: <sip:bob@192.168.1.31:5064>"), bob)
    reinvite = only(h.sent("INVITE")[1:])
    h.respond(reinvite, 200, source=ALICE, extra="Contact: <sip:alice@192.168.1.21:5070>")
    assert ("192.168.1.31", 5064) in dialog.callee.targets
    assert ("192.168.1.21", 5070) in dialog.caller.targets
    # an UPDATE from alice, answered by bob at his new address
    h.receive(request(
        "UPDATE", "sip:bob@192.168.1.31:5064", cseq=3, branch="z9hG4bKupd",
        to="<sip:bob@lan.example>;tag=callee", extra="Contact: <sip:alice@192.168.1.22:5072>"))
    update = only(h.sent("UPDATE"))
    h.respond(update, 200, source=Source("UDP", "192.168.1.31", 5064, INSIDE, 5060, "inside"),
              extra="Contact: <sip:bob@192.168.1.32:5066>")
    assert ("192.168.1.22", 5072) in dialog.caller.targets
    assert ("192.168.1.32", 5066) in dialog.callee.targets
    assert "192.168.1.31" in dialog.callee.hosts


def test_failed_invite_makes_no_dialog(plugin: RecordingPlugin) -> None:
    h = make_harness(plugins=[plugin])
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 486)
    h.assert_no_leaks()
    assert plugin.established == [] and plugin.ended == []


def test_stop_ends_every_dialog(plugin: RecordingPlugin) -> None:
    h, _ = established_call([plugin])
    h.proxy.stop()
    assert [reason for _, reason in plugin.ended] == ["shutdown"]


def test_in_dialog_request_from_the_provider_goes_to_the_phone(h: Harness) -> None:
    h.receive(request(
        "INFO", BOB_1, via="Via: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bKprov",
        to="<sip:bob@lan.example>;tag=b1", from_="<sip:carol@example.com>;tag=c1",
        extra=f"Route: <sip:{OUTSIDE}:5060;lr>",
    ), PROVIDER_SOURCE)
    info = only(h.sent("INFO"))
    assert h.target_of(info).host == "192.168.1.30"
    assert info.vias[0].host == INSIDE


# ------------------------------------------------------------------------------------------------
# the pipeline as the proxy runs it
# ------------------------------------------------------------------------------------------------
class Answering(Plugin):
    name = "answering"

    def request_received(self, ctx: Any) -> Any:
        return ctx.request.make_response(403, "Not Today")


class Counting(Plugin):
    name = "counting"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def request_received(self, ctx: Any) -> Any:
        self.seen.append(ctx.request.method)
        return None


class Waiting(Plugin):
    """Holds every hook it is told to hold until the test fires the Deferred."""

    name = "waiting"

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.pending: list[Deferred[Any]] = []

    def _wait(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def request_received(self, ctx: Any) -> Any:
        return self._wait() if self.hook == "request_received" else None

    def request_forwarding(self, ctx: Any, branch: Any) -> Any:
        return self._wait() if self.hook == "request_forwarding" else None

    def response_forwarding(self, ctx: Any, response: Any) -> Any:
        return self._wait() if self.hook == "response_forwarding" else None


class Dropping(Plugin):
    name = "dropping"

    def __init__(self, hook: str, statuses: set[int]) -> None:
        self.hook = hook
        self.statuses = statuses

    def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
        if self.hook == "response_received" and response.status in self.statuses:
            return DROP
        return None

    def response_forwarding(self, ctx: Any, response: Any) -> Any:
        if self.hook == "response_forwarding" and response.status in self.statuses:
            return DROP
        return None


class Raising(Plugin):
    name = "raising"

    def __init__(self, hook: str, deferred: bool = False) -> None:
        self.hook = hook
        self.deferred = deferred

    def _boom(self) -> Any:
        if self.deferred:
            return fail(RuntimeError("plugin failed later"))
        raise RuntimeError("plugin failed")

    def request_received(self, ctx: Any) -> Any:
        return self._boom() if self.hook == "request_received" else None

    def request_forwarding(self, ctx: Any, branch: Any) -> Any:
        return self._boom() if self.hook == "request_forwarding" else None

    def response_received(self, ctx: Any, branch: Any, response: Any) -> Any:
        return self._boom() if self.hook == "response_received" else None

    def response_forwarding(self, ctx: Any, response: Any) -> Any:
        if self.hook == "response_forwarding" and response.status >= 200:
            return self._boom()
        return None


def test_plugin_response_short_circuits() -> None:
    later = Counting()
    h = make_harness(plugins=[Answering(), later])
    h.receive(invite("sip:carol@example.com"))
    reply = only([r for r in h.replies() if r.status >= 200])
    assert (reply.status, reply.reason) == (403, "Not Today")
    assert reply.headers.get("server") == "sipproxy-test"
    assert h.sent() == []
    assert later.seen == []
    h.assert_no_leaks()


def test_plugins_run_in_order_and_see_every_request() -> None:
    first = Counting()
    h = make_harness(plugins=[first, Answering()])
    h.receive(request("OPTIONS", "sip:carol@example.com"))
    assert first.seen == ["OPTIONS"]
    assert h.finals() == [403]


def test_deferred_request_received_delays_forwarding() -> None:
    waiting = Waiting("request_received")
    h = make_harness(plugins=[waiting])
    h.receive(invite("sip:carol@example.com"))
    assert h.sent() == []
    only(waiting.pending).callback(None)
    assert len(h.sent("INVITE")) == 1


def test_deferred_request_forwarding_delays_each_branch() -> None:
    waiting = Waiting("request_forwarding")
    h = make_harness(plugins=[waiting])
    h.register("bob", BOB_1)
    h.register("bob", BOB_2)
    h.receive(invite())
    assert h.sent() == [] and len(waiting.pending) == 2
    waiting.pending[1].callback(None)
    assert len(h.sent("INVITE")) == 1
    waiting.pending[0].callback(None)
    assert len(h.sent("INVITE")) == 2


def test_deferred_request_received_answering_later() -> None:
    waiting = Waiting("request_received")
    h = make_harness(plugins=[waiting])
    ctx_request = parse_message(invite("sip:carol@example.com").encode())
    h.receive(invite("sip:carol@example.com"))
    assert isinstance(ctx_request, Request)
    only(waiting.pending).callback(ctx_request.make_response(480))
    assert h.finals() == [480]
    assert h.sent() == []
    h.assert_no_leaks()


def test_cancel_while_plugin_waits_sends_nothing_downstream() -> None:
    waiting = Waiting("request_received")
    h = make_harness(plugins=[waiting])
    text = invite("sip:carol@example.com")
    h.receive(text)
    h.receive(cancel_of(text))
    only(waiting.pending).callback(None)
    # whether or not the INVITE went out, the caller gets 487 and nothing leaks
    for out in h.sent("INVITE"):
        h.respond(out, 100, source=PROVIDER_SOURCE)
    h.assert_no_leaks()
    assert h.finals("INVITE") == [487]


@pytest.mark.parametrize("status", [200, 486])
def test_final_held_by_response_forwarding_goes_out_once(status: int) -> None:
    # found with an NG media relay: the final waited in its hook and response selection
    # chose and forwarded it a second time
    h = make_harness()
    h.register("bob", BOB_1)
    waiting = Waiting("response_forwarding")
    h.proxy.pipeline = Pipeline([waiting])
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, status)
    assert h.finals("INVITE") == []
    for d in list(waiting.pending):
        d.callback(None)
    assert h.finals("INVITE") == [status]
    assert len(waiting.pending) == 1


def test_drop_on_provisional_response() -> None:
    h = make_harness(plugins=[Dropping("response_received", {180})])
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, 180)
    h.respond(out, 183)
    assert [s for s in h.statuses() if 100 < s < 200] == [183]
    h.respond(out, 200)
    assert h.finals("INVITE") == [200]
    h.assert_no_leaks()


def test_drop_in_response_forwarding() -> None:
    h = make_harness(plugins=[Dropping("response_forwarding", {180})])
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    h.respond(out, 180)
    assert 180 not in h.statuses()
    h.respond(out, 486)
    assert h.finals("INVITE") == [486]
    h.assert_no_leaks()


@pytest.mark.parametrize("deferred", [False, True])
def test_raising_request_plugin_gives_500(deferred: bool) -> None:
    h = make_harness(plugins=[Raising("request_received", deferred)])
    h.receive(invite("sip:carol@example.com"))
    assert h.finals() == [500]
    assert h.sent() == []
    h.assert_no_leaks()


@pytest.mark.parametrize("deferred", [False, True])
def test_raising_forwarding_plugin_answers_500(deferred: bool) -> None:
    h = make_harness(plugins=[Raising("request_forwarding", deferred)])
    h.receive(invite("sip:carol@example.com"))
    assert h.sent() == []
    assert h.finals("INVITE") == [500]
    h.assert_no_leaks()


@pytest.mark.parametrize("hook", ["response_received", "response_forwarding"])
@pytest.mark.parametrize("deferred", [False, True])
def test_raising_response_plugin_never_leaves_the_caller_hanging(hook: str, deferred: bool) -> None:
    """The response the plugin choked on is dropped; the transaction still ends with a final."""
    h = make_harness(plugins=[Raising(hook, deferred)])
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 486)
    h.assert_no_leaks()
    finals = h.finals("INVITE")
    assert len(finals) == 1 and finals[0] >= 400


def test_drop_of_a_final_response_still_ends_the_transaction() -> None:
    h = make_harness(plugins=[Dropping("response_received", {486})])
    h.register("bob", BOB_1)
    h.receive(invite())
    h.respond(only(h.sent("INVITE")), 486)
    h.assert_no_leaks()
    assert len(h.finals("INVITE")) == 1


class BranchlessVia(Plugin):
    """Takes the branch off the proxy's Via of each branch, so the transaction layer refuses
    to send it (``send_request`` raises)."""

    name = "branchless"

    def request_forwarding(self, ctx: Any, branch: Any) -> Any:
        via = branch.request.top_via.copy()
        via.remove_param("branch")
        branch.request.update_top_via(via)


def proxy_made_final(scenario: str) -> Response:
    h = make_harness(CONFIG.split("[upstream]")[0])
    h.register("bob", BOB_1)
    if scenario == "timeout":
        h.receive(invite())
        h.clock.advance(64 * 0.5 + 1)
    elif scenario == "unresolvable":
        h.receive(invite("sip:carol@nowhere.invalid"))
    elif scenario == "plugin":
        h.proxy.set_plugins([Raising("request_forwarding")])
        h.receive(invite())
    elif scenario == "send-failed":
        h.proxy.set_plugins([BranchlessVia()])
        h.receive(invite())
    finals = [r for r in h.replies() if r.status >= 200 and r.cseq.method == "INVITE"]
    assert finals
    return finals[0]


@pytest.mark.parametrize("scenario, status", [
    ("timeout", 408), ("unresolvable", 500), ("plugin", 500), ("send-failed", 500),
])
def test_finals_the_proxy_makes_are_well_formed(scenario: str, status: int) -> None:
    final = proxy_made_final(scenario)
    assert final.status == status
    assert final.to.tag, "a response the proxy generates needs a To tag (RFC 3261 8.2.6.2)"
    assert [v.host for v in final.vias] == [ALICE.host]  # never our own Via


# ------------------------------------------------------------------------------------------------
# garbage never crashes (nothing raises, nothing is even logged as a failure)
# ------------------------------------------------------------------------------------------------
def live_call() -> tuple[Harness, Request]:
    h = make_harness()
    h.register("bob", BOB_1)
    h.receive(invite())
    return h, only(h.sent("INVITE"))


def garbage_for(out: Request) -> list[str]:
    """Responses that parse but that no sane callee sends, all for the live branch."""
    ours = str(out.vias[0])
    alice = str(out.vias[1])
    head = "To: <sip:bob@lan.example>;tag=g\r\nFrom: <sip:alice@lan.example>;tag=a1\r\n"
    tail = "Call-ID: call-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    both = f"Via: {ours}\r\nVia: {alice}\r\n"
    return [
        f"SIP/2.0 180 Only Our Via\r\nVia: {ours}\r\n{head}{tail}",
        f"SIP/2.0 200 Only Our Via\r\nVia: {ours}\r\n{head}{tail}",
        f"SIP/2.0 180 Wrong Method\r\n{both}{head}"
        "Call-ID: call-1\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
        f"SIP/2.0 180 Wrong CSeq Number\r\n{both}{head}"
        "Call-ID: call-1\r\nCSeq: 99 INVITE\r\nContent-Length: 0\r\n\r\n",
        f"SIP/2.0 180 Other Call\r\n{both}{head}"
        "Call-ID: other\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        f"SIP/2.0 699 Odd\r\n{both}{head}{tail}",
        f"SIP/2.0 199 Odd\r\n{both}{head}{tail}",
        f"SIP/2.0 487 No Tag\r\n{both}To: <sip:bob@lan.example>\r\n"
        f"From: <sip:alice@lan.example>;tag=a1\r\n{tail}",
        f"SIP/2.0 183 IPv6 Below\r\nVia: {ours}\r\nVia: SIP/2.0/UDP [2001:db8::1]:5060"
        f";branch=z9hG4bKv6\r\n{head}{tail}",
        f"SIP/2.0 180 Via Upper Case\r\nVia: {ours.upper()}\r\nVia: {alice}\r\n{head}{tail}",
        f"SIP/2.0 200 Comma Joined\r\nVia: {ours}, {alice}\r\n{head}{tail}",
    ]


def feed_garbage(h: Harness, text: bytes) -> bool:
    try:
        message = parse_message(text)
    except ParseError:
        return False
    message.source = Source("UDP", "192.168.1.30", 5062, INSIDE, 5060, "inside")
    h.proxy.receive(message)
    return True


def test_response_with_only_our_via_ends_the_branch_as_502(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    feed_garbage(h, garbage_for(out)[1].encode())
    assert h.finals("INVITE") == [502]
    h.assert_no_leaks()


def test_provisional_with_only_our_via_still_allows_timer_c_cancel(h: Harness) -> None:
    h.register("bob", BOB_1)
    h.receive(invite())
    out = only(h.sent("INVITE"))
    feed_garbage(h, garbage_for(out)[0].encode())
    assert 180 not in h.statuses()
    h.clock.advance(TIMER_C)
    assert only(h.sent("CANCEL")).vias[0].branch == out.vias[0].branch
    h.assert_no_leaks()


def test_garbage_responses_never_crash(failures: list[dict[str, Any]]) -> None:
    for i in range(len(garbage_for(live_call()[1]))):
        h, out = live_call()
        assert feed_garbage(h, garbage_for(out)[i].encode())  # the proxy, not the parser, copes
        h.assert_no_leaks()
    assert failures == []


def test_the_call_survives_garbage(failures: list[dict[str, Any]]) -> None:
    h, out = live_call()
    for text in garbage_for(out):
        feed_garbage(h, text.encode())
    h.respond(out, 486)
    h.assert_no_leaks()
    assert h.finals("INVITE") == [502]  # the 2xx with only our Via ended the only branch
    assert failures == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_responses_never_crash(data: st.DataObject) -> None:
    h, out = live_call()
    status = data.draw(st.sampled_from([100, 180, 200, 404, 503, 603]))
    raw = bytearray(out.make_response(status).to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.sampled_from(b" ;,:<>@\r\n\x00\xff0z"))
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None:
            events.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        feed_garbage(h, bytes(raw))
        h.assert_no_leaks()
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))
    assert events == []


# ------------------------------------------------------------------------------------------------
# limits: branches per forked request; the connections that carry bindings and dialogs
# ------------------------------------------------------------------------------------------------
def test_forking_is_capped_at_max_branches_highest_q_first() -> None:
    from sipproxy.location import Binding

    h = make_harness(CONFIG.replace('user_agent = "sipproxy-test"',
                                    'user_agent = "sipproxy-test"\nmax_branches = 2'))
    expires = h.clock.seconds() + 3600
    for n, q in enumerate((0.1, 0.9, 0.5, 0.3)):
        h.location.add_or_update(Binding("sip:bob@lan.example", f"sip:bob@192.168.1.{40 + n}",
                                         expires, q=q))
    h.receive(invite())
    assert sorted(str(r.uri) for r in h.sent("INVITE")) == [
        "sip:bob@192.168.1.41", "sip:bob@192.168.1.42"]
    assert h.proxy.refusals.counters["branches"] == 1
    for out in h.sent("INVITE"):
        h.respond(out, 486)
    assert h.finals("INVITE") == [486]
    h.assert_no_leaks()


def bob_at(h: Harness, *contacts: str) -> None:
    from sipproxy.location import Binding

    for contact in contacts:
        h.location.add_or_update(Binding("sip:bob@lan.example", contact,
                                         h.clock.seconds() + 3600))


def test_a_binding_that_names_the_proxy_is_skipped() -> None:
    """Contacts in our domain or at our socket would bring the INVITE back to fork into the
    same bindings again, each again (RFC 5393's amplification): they are left out."""
    h = make_harness()
    bob_at(h, "sip:bob@lan.example;x=1", f"sip:bob@{INSIDE}:5060;x=2", BOB_1)
    h.receive(invite())
    assert [str(r.uri) for r in h.sent("INVITE")] == [BOB_1]
    assert h.proxy.refusals.counters["self_contact"] == 2
    # an ACK to the user (forwarded statelessly) takes the first binding that does not
    h.receive(request("ACK", "sip:bob@lan.example", call_id="ack-1", branch="z9hG4bKack9",
                      to="<sip:bob@lan.example>;tag=b"))
    assert [str(r.uri) for r in h.sent("ACK")] == [BOB_1]


@pytest.mark.parametrize("header, branches, share", [
    ("", 3, "20"),  # RFC 5393: 60 when absent, shared by the parallel branches
    ("Max-Breadth: 2", 2, "1"),
    ("Max-Breadth: 7", 3, "2"),
])
def test_parallel_branches_share_the_max_breadth(header: str, branches: int, share: str) -> None:
    h = make_harness()
    bob_at(h, BOB_1, BOB_2, "sip:bob@192.168.1.32:5062")
    h.receive(invite(extra=f"Contact: <sip:alice@{ALICE.host}>\r\n{header}".strip()))
    sent = h.sent("INVITE")
    assert len(sent) == branches
    assert {r.headers.get("Max-Breadth") for r in sent} == {share}


def test_no_breadth_left_is_440() -> None:
    h = make_harness()
    bob_at(h, BOB_1, BOB_2)
    h.receive(invite(extra="Max-Breadth: 0"))
    assert h.sent("INVITE") == []
    assert h.finals("INVITE") == [440]


def test_registrations_and_dialogs_hold_their_tcp_connections(h: Harness) -> None:
    alice_tcp = Source("TCP", ALICE.host, 40000, INSIDE, 5060, "inside")
    flows = h.proxy.flows
    h.receive(request("REGISTER", "sip:lan.example", call_id="reg-tcp", to="<sip:alice@lan"
                      ".example>", extra="Contact: <sip:alice@192.168.1.20:40000;transport=tcp>"
                      "\r\nExpires: 600", branch="z9hG4bKrt1"), alice_tcp)
    assert flows.in_use("TCP", ALICE.host, 40000)
    h.receive(request("REGISTER", "sip:lan.example", call_id="reg-tcp", cseq=2,
                      to="<sip:alice@lan.example>", extra="Contact: <sip:alice@192.168.1.20:"
                      "40000;transport=tcp>\r\nExpires: 0", branch="z9hG4bKrt2"), alice_tcp)
    assert not flows.in_use("TCP", ALICE.host, 40000)
    # a call set up over the connection holds it until it ends
    h.register("bob", BOB_1)
    h.receive(invite(), alice_tcp)
    out = only(h.sent("INVITE"))
    h.respond(out, 200)
    assert flows.in_use("TCP", ALICE.host, 40000)
    assert not flows.in_use("UDP", "192.168.1.30", 5062)  # datagrams: nothing to hold
    h.receive(request("BYE", BOB_1, cseq=2, branch="z9hG4bKbye-tcp",
                      to="<sip:bob@lan.example>;tag=callee",
                      extra=f"Route: <sip:{INSIDE}:5060;lr>"), alice_tcp)
    h.respond(only(h.sent("BYE")), 200)
    assert not flows.in_use("TCP", ALICE.host, 40000)
