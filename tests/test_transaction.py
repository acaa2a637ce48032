"""The RFC 3261 section 17 / RFC 6026 transaction layer, driven by a task.Clock."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sipproxy.message import Request, Response, Source, Via, parse_message
from sipproxy.transaction import (
    ClientTransaction,
    ITransactionUser,
    ITransportSender,
    ServerTransaction,
    State,
    TransactionLayer,
    TransactionTimeout,
    build_ack,
    build_cancel,
)

try:
    from sipproxy.context import Target
except ImportError:  # sipproxy.dns is being written elsewhere; same shape, tests only

    @dataclass(frozen=True)
    class Target:  # type: ignore[no-redef]
        transport: str
        host: str
        port: int
        server_name: str | None = None


T1, T2, T4 = 0.5, 4.0, 5.0
STEP = 0.25  # every timer here is a multiple of this: pump in steps so chained timers stay exact

UPSTREAM_VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKupstream1;rport"


# ------------------------------------------------------------------------------------------------
# test doubles
# ------------------------------------------------------------------------------------------------
@implementer(ITransportSender)
class RecordingTransportSender:
    """A fake transport: records what would be sent (and when); can be told to fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.requests: list[tuple[float, Request, Any]] = []
        self.responses: list[tuple[float, Response, Source | None]] = []
        self.raise_error: Exception | None = None
        self.fail_deferred: Exception | None = None

    def _outcome(self) -> Deferred[None] | None:
        if self.raise_error is not None:
            raise self.raise_error
        if self.fail_deferred is not None:
            return fail(self.fail_deferred)
        return None

    def send_request(self, request: Request, target: Any) -> Deferred[None] | None:
        self.requests.append((self.clock.seconds(), request, target))
        return self._outcome()

    def send_response(
        self, response: Response, request_source: Source | None
    ) -> Deferred[None] | None:
        self.responses.append((self.clock.seconds(), response, request_source))
        return self._outcome()

    def request_times(self, method: str) -> list[float]:
        return [t for t, r, _ in self.requests if r.method == method]

    def response_times(self, status: int) -> list[float]:
        return [t for t, r, _ in self.responses if r.status == status]


@implementer(ITransactionUser)
class RecordingTransactionUser:
    """A fake proxy core: records every call; ``answer`` may respond inside request_received."""

    def __init__(self) -> None:
        self.requests: list[tuple[ServerTransaction, Request]] = []
        self.acks: list[Request] = []
        self.strays: list[Response] = []
        self.failures: list[tuple[ServerTransaction, Failure]] = []
        self.answer: int | None = None

    def request_received(self, tx: ServerTransaction, request: Request) -> None:
        self.requests.append((tx, request))
        if self.answer is not None:
            tx.respond(reply(request, self.answer))

    def ack_received(self, request: Request) -> None:
        self.acks.append(request)

    def stray_response(self, response: Response) -> None:
        self.strays.append(response)

    def server_transaction_failed(self, tx: ServerTransaction, reason: Failure) -> None:
        self.failures.append((tx, reason))


class Harness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.transport = RecordingTransportSender(self.clock)
        self.tu = RecordingTransactionUser()
        self.layer = TransactionLayer(self.clock, self.transport, self.tu, t1=T1, t2=T2, t4=T4)

    def advance_to(self, when: float) -> None:
        while self.clock.seconds() + STEP <= when + 1e-9:
            self.clock.advance(STEP)

    def advance(self, seconds: float) -> None:
        self.advance_to(self.clock.seconds() + seconds)


@pytest.fixture
def h() -> Harness:
    return Harness()


# ------------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------------
def incoming(
    method: str = "INVITE",
    branch: str | None = "z9hG4bKaaa1",
    transport: str = "UDP",
    host: str = "192.0.2.10",
    cseq: int = 1,
    cseq_method: str | None = None,
    from_tag: str = "a1",
    to_tag: str | None = None,
    extra: str = "",
) -> Request:
    """A request as a transport hands it over (parsed, with its source)."""
    branch_param = f";branch={branch}" if branch else ""
    to = f"Bob <sip:bob@example.com>{';tag=' + to_tag if to_tag else ''}"
    text = (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {host}:5060{branch_param}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: Alice <sip:alice@example.com>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        "Call-ID: call-1@192.0.2.10\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    msg.source = Source(transport, host, 5060)
    return msg


def outgoing(
    method: str = "INVITE", branch: str = "z9hG4bKdown1", transport: str = "UDP"
) -> Request:
    """A request as the proxy forwards it: our Via on top of the upstream one, a Route set."""
    text = (
        f"{method} sip:bob@198.51.100.7:5060 SIP/2.0\r\n"
        f"Via: {UPSTREAM_VIA}\r\n"
        "Max-Forwards: 69\r\n"
        "Route: <sip:p1.example.net;lr>, <sip:p2.example.net;lr>\r\n"
        "From: \"Alice\" <sip:alice@example.com>;tag=a1\r\n"
        "To: <sip:bob@example.com>\r\n"
        "Call-ID: out-1@192.0.2.10\r\n"
        f"CSeq: 7 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    msg.push_via(Via.build(transport, "203.0.113.1", 5060, branch))
    return msg


def reply(request: Request, status: int, to_tag: str | None = "b1") -> Response:
    response = request.make_response(status)
    if to_tag is not None and status > 100:
        to = response.to.copy()
        to.tag = to_tag
        response.set_name_addr("To", to)
    return response


def reparse(message: Request | Response) -> Request | Response:
    """A copy as the network would deliver it (a retransmission is a new object)."""
    copy = parse_message(message.to_bytes())
    copy.source = message.source
    return copy


def udp_target(transport: str = "UDP") -> Target:
    return Target(transport, "198.51.100.7", 5060, "198.51.100.7")


def test_doubles_provide_the_interfaces(h: Harness) -> None:
    assert verifyObject(ITransportSender, h.transport)
    assert verifyObject(ITransactionUser, h.tu)
    assert bool(h.layer) and len(h.layer) == 0


# ------------------------------------------------------------------------------------------------
# server INVITE
# ------------------------------------------------------------------------------------------------
def test_server_invite_sends_100_at_once_and_hands_request_to_tu(h: Harness) -> None:
    req = incoming(extra="Timestamp: 54\r\n")
    h.layer.receive(req)
    assert [r.status for _, r, _ in h.transport.responses] == [100]
    trying, source = h.transport.responses[0][1], h.transport.responses[0][2]
    assert source == req.source
    assert trying.to.tag is None
    assert trying.headers.get("Timestamp") == "54"
    ((tx, got),) = h.tu.requests
    assert got is req and tx.request is req and tx.state is State.PROCEEDING
    assert tx.last_response is trying
    assert len(h.layer) == 1 and h.layer.server_count == 1 and h.layer.client_count == 0


def test_server_invite_retransmission_resends_last_provisional(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    h.layer.receive(reparse(req))
    assert [r.status for _, r, _ in h.transport.responses] == [100, 100]
    tx.respond(reply(req, 180))
    h.layer.receive(reparse(req))
    assert [r.status for _, r, _ in h.transport.responses] == [100, 100, 180, 180]
    assert len(h.tu.requests) == 1  # never passed up again


def test_server_invite_non2xx_timer_g_then_timer_h(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    h.advance(1)
    tx.respond(reply(req, 486))
    assert tx.state is State.COMPLETED and tx.timers == {"G", "H"}
    h.advance(40)
    start = 1.0
    expected = [0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]  # doubling, capped at T2
    assert h.transport.response_times(486) == [start + e for e in expected]
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    ((failed_tx, reason),) = h.tu.failures
    assert failed_tx is tx and reason.check(TransactionTimeout)
    # Timer H fired at start + 64*T1
    assert h.transport.response_times(486)[-1] < start + 64 * T1


def test_server_invite_retransmission_in_completed_resends_final(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    tx.respond(reply(req, 486))
    h.layer.receive(reparse(req))
    assert [r.status for _, r, _ in h.transport.responses] == [100, 486, 486]
    assert len(h.tu.requests) == 1


def test_server_invite_ack_confirms_and_timer_i_terminates(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    tx.respond(reply(req, 486))
    h.advance(2)
    sent = len(h.transport.responses)
    h.layer.receive(incoming("ACK", cseq_method="ACK", to_tag="b1"))
    assert tx.state is State.CONFIRMED and tx.timers == {"I"}
    h.layer.receive(incoming("ACK", cseq_method="ACK", to_tag="b1"))  # absorbed
    h.advance(T4 - STEP)
    assert tx.state is State.CONFIRMED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    assert len(h.transport.responses) == sent  # Timer G stopped
    assert h.tu.acks == [] and h.tu.failures == []


def test_server_invite_over_tcp_has_no_timer_g_and_zero_timer_i(h: Harness) -> None:
    req = incoming(transport="TCP")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    assert tx.reliable
    tx.respond(reply(req, 603))
    assert tx.timers == {"H"}
    h.layer.receive(incoming("ACK", cseq_method="ACK", to_tag="b1", transport="TCP"))
    assert tx.state is State.TERMINATED and len(h.layer) == 0  # Timer I is zero: no wait


def test_server_invite_over_tcp_still_times_out_with_timer_h(h: Harness) -> None:
    req = incoming(transport="TCP")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    tx.respond(reply(req, 603))
    h.advance(64 * T1 - STEP)
    assert tx.state is State.COMPLETED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.tu.failures) == 1
    assert h.transport.response_times(603) == [0]


def test_server_invite_2xx_accepted_absorbs_invite_and_passes_2xx(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    ok = reply(req, 200)
    tx.respond(ok)
    assert tx.state is State.ACCEPTED and tx.timers == {"L"}
    h.layer.receive(reparse(req))  # absorbed: no resend of anything
    assert [r.status for _, r, _ in h.transport.responses] == [100, 200]
    tx.respond(ok)  # the TU forwards a 2xx retransmission from downstream
    tx.respond(reply(req, 200, to_tag="fork2"))  # and a 2xx from another fork
    tx.respond(reply(req, 486))  # a non-2xx is not allowed any more
    assert [r.status for _, r, _ in h.transport.responses] == [100, 200, 200, 200]
    ack = incoming("ACK", cseq_method="ACK", to_tag="b1")  # same branch (RFC 6026 7.1)
    h.layer.receive(ack)
    assert h.tu.acks == [ack]
    h.advance(64 * T1 - STEP)
    assert tx.state is State.ACCEPTED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0 and h.tu.failures == []
    # after termination a 2xx still goes out (statelessly), anything else is dropped
    tx.respond(ok)
    tx.respond(reply(req, 486))
    assert [r.status for _, r, _ in h.transport.responses] == [100, 200, 200, 200, 200]
    # and the INVITE, retransmitted after Timer L, is a new transaction (the RFC's choice)
    h.layer.receive(reparse(req))
    assert len(h.tu.requests) == 2


def test_server_invite_final_from_tu_inside_request_received(h: Harness) -> None:
    """An INVITE the TU answers at once gets no 100 Trying and its final is not resent by
    Timer G: the sender, still in Calling, retransmits the INVITE and gets one copy each time
    (a stateless UAS, RFC 3261 8.2.7); a spoofed source gets one answer per INVITE."""
    h.tu.answer = 404
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    assert [r.status for _, r, _ in h.transport.responses] == [404]
    assert tx.state is State.COMPLETED
    h.clock.advance(10)
    assert [r.status for _, r, _ in h.transport.responses] == [404]
    h.layer.receive(req)  # a retransmission
    assert [r.status for _, r, _ in h.transport.responses] == [404, 404]
    h.layer.receive(incoming("ACK", cseq_method="ACK", to_tag=tx.last_response.to.tag))
    assert tx.state is State.CONFIRMED


def test_server_invite_final_after_a_provisional_is_resent_by_timer_g(h: Harness) -> None:
    """After the 100 Trying the sender no longer retransmits: Timer G resends the final."""
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    tx.respond(reply(req, 486))
    h.clock.advance(0.6)
    assert [r.status for _, r, _ in h.transport.responses] == [100, 486, 486]


def test_server_invite_completed_drops_later_responses(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    tx.respond(reply(req, 486))
    tx.respond(reply(req, 200))
    tx.respond(reply(req, 180))
    assert [r.status for _, r, _ in h.transport.responses] == [100, 486]


def test_ack_for_2xx_matches_nothing_and_goes_to_tu(h: Harness) -> None:
    req = incoming()
    h.layer.receive(req)
    h.tu.requests[0][0].respond(reply(req, 200))
    ack = incoming("ACK", branch="z9hG4bKnewbranch", cseq_method="ACK", to_tag="b1")
    h.layer.receive(ack)
    assert h.tu.acks == [ack]


def test_send_trying_can_be_turned_off() -> None:
    clock = Clock()
    transport = RecordingTransportSender(clock)
    layer = TransactionLayer(clock, transport, RecordingTransactionUser(), send_trying=False)
    layer.receive(incoming())
    assert transport.responses == []
    layer.receive(incoming())  # nothing to resend yet
    assert transport.responses == []


# ------------------------------------------------------------------------------------------------
# server non-INVITE
# ------------------------------------------------------------------------------------------------
def test_server_non_invite_states_and_retransmissions(h: Harness) -> None:
    req = incoming("OPTIONS")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    assert tx.state is State.TRYING and h.transport.responses == []  # no automatic 100
    h.layer.receive(reparse(req))
    assert h.transport.responses == [] and len(h.tu.requests) == 1  # absorbed in Trying
    tx.respond(reply(req, 183))
    assert tx.state is State.PROCEEDING
    h.layer.receive(reparse(req))
    assert [r.status for _, r, _ in h.transport.responses] == [183, 183]
    tx.respond(reply(req, 200))
    assert tx.state is State.COMPLETED and tx.timers == {"J"}
    h.layer.receive(reparse(req))
    tx.respond(reply(req, 500))  # dropped in Completed
    assert [r.status for _, r, _ in h.transport.responses] == [183, 183, 200, 200]
    h.advance(64 * T1 - STEP)
    assert tx.state is State.COMPLETED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    assert [r.status for _, r, _ in h.transport.responses] == [183, 183, 200, 200]  # no Timer G


def test_completed_non_invite_keeps_only_what_retransmissions_need(h: Harness) -> None:
    # thousands of REGISTERs wait 64*T1 in Completed: they must not keep the whole request
    req = incoming("REGISTER", extra="Contact: <sip:alice@192.0.2.10>\r\nExpires: 3600\r\n")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    final = reply(req, 200)
    final.headers.add("Contact", "<sip:alice@192.0.2.10>;expires=3600")
    tx.respond(final)
    sent = h.transport.responses[-1][1].to_bytes()
    assert [name for name, _ in tx.request.headers] == ["Via", "From", "To", "Call-ID", "CSeq"]
    assert tx.request.source == req.source and tx.source == req.source
    h.layer.receive(reparse(req))  # a retransmission still gets the very same bytes
    assert h.transport.responses[-1][1].to_bytes() == sent
    assert len(h.tu.requests) == 1


def test_server_non_invite_over_tcp_terminates_at_once(h: Harness) -> None:
    h.tu.answer = 200
    h.layer.receive(incoming("REGISTER", transport="TLS"))
    tx = h.tu.requests[0][0]
    assert tx.state is State.TERMINATED and len(h.layer) == 0 and h.clock.getDelayedCalls() == []


# ------------------------------------------------------------------------------------------------
# server matching
# ------------------------------------------------------------------------------------------------
def test_server_matching_uses_branch_sent_by_and_method(h: Harness) -> None:
    h.layer.receive(incoming())
    h.layer.receive(incoming(host="192.0.2.11"))  # same branch, other sent-by: new
    h.layer.receive(incoming(branch="z9hG4bKaaa2"))  # other branch: new
    h.layer.receive(incoming("CANCEL"))  # same branch, CANCEL: its own transaction
    h.layer.receive(incoming(host="192.0.2.10"))  # a retransmission of the first
    assert len(h.tu.requests) == 4 and len(h.layer) == 4
    methods = [tx.request.method for tx, _ in h.tu.requests]
    assert methods == ["INVITE", "INVITE", "INVITE", "CANCEL"]


def test_find_server_transaction_for_cancel(h: Harness) -> None:
    invite = incoming()
    h.layer.receive(invite)
    invite_tx = h.tu.requests[0][0]
    cancel = incoming("CANCEL")
    h.layer.receive(cancel)
    cancel_tx = h.tu.requests[1][0]
    assert cancel_tx is not invite_tx and cancel_tx.state is State.TRYING
    assert h.layer.find_server_transaction_for_cancel(cancel) is invite_tx
    find = h.layer.find_server_transaction_for_cancel
    assert find(incoming("CANCEL", branch="z9hG4bKzz")) is None
    assert find(incoming("CANCEL", host="192.0.2.99")) is None
    invite_tx.respond(reply(invite, 487))
    h.advance(64 * T1)
    assert h.layer.find_server_transaction_for_cancel(cancel) is None


def test_rfc2543_request_matching(h: Harness) -> None:
    invite = incoming(branch=None)
    h.layer.receive(invite)
    tx = h.tu.requests[0][0]
    h.layer.receive(incoming(branch=None))  # retransmission: same R-URI, tags, Call-ID, CSeq, Via
    assert len(h.tu.requests) == 1 and [r.status for _, r, _ in h.transport.responses] == [100, 100]
    h.layer.receive(incoming(branch=None, from_tag="other"))  # another From tag: new
    h.layer.receive(incoming(branch=None, cseq=2))  # another CSeq: new
    h.layer.receive(incoming(branch="1234"))  # an RFC 2543 branch changes the top Via: new
    assert len(h.tu.requests) == 4
    # CANCEL: same everything but the method (RFC 3261 9.2)
    cancel = incoming("CANCEL", branch=None)
    assert h.layer.find_server_transaction_for_cancel(cancel) is tx
    assert h.layer.find_server_transaction_for_cancel(
        incoming("CANCEL", branch=None, to_tag="zz")) is None
    tx.respond(reply(invite, 486, to_tag="resp"))
    # an ACK whose To tag is not the response's does not match: it goes to the TU
    wrong = incoming("ACK", branch=None, cseq_method="ACK", to_tag="nope")
    h.layer.receive(wrong)
    assert h.tu.acks == [wrong] and tx.state is State.COMPLETED
    h.layer.receive(incoming("ACK", branch=None, cseq_method="ACK", to_tag="resp"))
    assert tx.state is State.CONFIRMED and h.tu.acks == [wrong]
    h.advance(T4)
    assert tx.state is State.TERMINATED


def test_rfc2543_reinvite_with_other_to_tag_is_new(h: Harness) -> None:
    h.layer.receive(incoming(branch=None, to_tag="x"))
    h.layer.receive(incoming(branch=None, to_tag="y"))
    assert len(h.tu.requests) == 2 and len(h.layer) == 2
    for tx, req in h.tu.requests:
        tx.respond(reply(req, 200))
    h.advance(64 * T1)
    assert len(h.layer) == 0


# ------------------------------------------------------------------------------------------------
# client INVITE
# ------------------------------------------------------------------------------------------------
class Responses(list[Response]):
    """An on_response callback that keeps what it is given."""

    def __call__(self, response: Response) -> None:
        self.append(response)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self]


def test_client_invite_timer_a_and_timer_b(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    assert isinstance(tx, ClientTransaction)
    assert tx.request is req and tx.target == udp_target() and tx.state is State.CALLING
    assert tx.timers == {"A", "B"} and len(h.layer) == 1 and h.layer.client_count == 1
    h.advance(64 * T1 - STEP)
    assert h.transport.request_times("INVITE") == [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert got == []
    h.advance(STEP)
    assert got.statuses == [408] and got[0].source is None
    assert got[0].call_id == req.call_id and got[0].cseq == req.cseq
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    assert h.clock.getDelayedCalls() == []


def test_client_invite_over_tcp_does_not_retransmit(h: Harness) -> None:
    got = Responses()
    tx = h.layer.send_request(outgoing(transport="TCP"), udp_target("TCP"), got)
    assert tx.reliable and tx.timers == {"B"}
    h.advance(64 * T1)
    assert h.transport.request_times("INVITE") == [0]
    assert got.statuses == [408] and len(h.layer) == 0


def test_client_invite_provisional_stops_a_and_b(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    h.advance(1)
    assert not tx.provisional_received
    h.layer.receive(reply(req, 100, to_tag=None))
    h.layer.receive(reply(req, 180))
    assert tx.state is State.PROCEEDING and tx.provisional_received and tx.timers == set()
    h.advance(200)  # Timer C is the proxy's business: the transaction waits
    assert h.transport.request_times("INVITE") == [0, 0.5]
    assert got.statuses == [100, 180] and tx.state is State.PROCEEDING


def test_client_invite_non2xx_sends_ack_and_timer_d(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    h.layer.receive(reply(req, 180))
    busy = reply(req, 486, to_tag="callee")
    h.layer.receive(busy)
    assert tx.state is State.COMPLETED and got.statuses == [180, 486]
    acks = [(r, t) for _, r, t in h.transport.requests if r.method == "ACK"]
    assert len(acks) == 1
    ack, target = acks[0]
    assert target == udp_target()
    assert str(ack.uri) == str(req.uri)
    assert ack.call_id == req.call_id
    assert ack.headers.get("From") == req.headers.get("From")
    assert ack.cseq.number == req.cseq.number and ack.cseq.method == "ACK"
    assert ack.to.tag == "callee" and ack.headers.get("To") == busy.headers.get("To")
    assert [str(v) for v in ack.vias] == [str(req.top_via)]
    assert ack.headers.get_all("Route") == req.headers.get_all("Route") and len(
        ack.headers.get_all("Route")) == 2
    assert ack.max_forwards == 69 and ack.body == b""
    assert parse_message(ack.to_bytes()).cseq.method == "ACK"  # it serializes and parses
    # a retransmitted final: the ACK again, nothing to the TU
    h.layer.receive(reparse(busy))
    assert len([r for _, r, _ in h.transport.requests if r.method == "ACK"]) == 2
    assert got.statuses == [180, 486]
    assert tx.timers == {"D"}
    h.advance(32 - STEP)
    assert tx.state is State.COMPLETED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    h.layer.receive(reparse(busy))
    assert h.tu.strays and h.tu.strays[-1].status == 486


def test_client_invite_non2xx_over_tcp_terminates_at_once(h: Harness) -> None:
    got = Responses()
    req = outgoing(transport="TLS")
    tx = h.layer.send_request(req, udp_target("TLS"), got)
    h.layer.receive(reply(req, 503))
    assert got.statuses == [503] and tx.state is State.TERMINATED and len(h.layer) == 0
    assert h.transport.request_times("ACK") == [0]


def test_client_invite_2xx_accepted_passes_every_2xx(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    ok = reply(req, 200)
    h.layer.receive(ok)
    assert tx.state is State.ACCEPTED and tx.timers == {"M"}
    h.layer.receive(reparse(ok))
    h.layer.receive(reply(req, 200, to_tag="fork2"))
    h.layer.receive(reply(req, 486))  # absorbed
    h.layer.receive(reply(req, 180))  # absorbed
    assert got.statuses == [200, 200, 200]
    assert h.transport.request_times("ACK") == []  # the ACK for 2xx is end to end, not ours
    h.advance(64 * T1 - STEP)
    assert tx.state is State.ACCEPTED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    h.layer.receive(reparse(ok))
    assert [r.status for r in h.tu.strays] == [200] and got.statuses == [200, 200, 200]


class _BranchState:
    """A TU's state for one forwarded request, holding its transaction (as a proxy's does)."""

    def __init__(self, got: Responses) -> None:
        self.got = got
        self.tx: ClientTransaction | None = None

    def on_response(self, response: Response) -> None:
        self.got.append(response)


@pytest.mark.parametrize("ending", ["2xx", "timeout"])
def test_a_terminated_client_transaction_frees_its_tu_state_without_the_collector(
        h: Harness, ending: str) -> None:
    """The TU's callback holds the TU's state, which holds the transaction: once the
    transaction ends nothing may keep that cycle alive for the garbage collector to find (it
    cost the collector about 100 objects per proxied call); a timeout's 408 still arrives."""
    import gc
    import weakref

    got = Responses()
    req = outgoing()
    state = _BranchState(got)
    state.tx = h.layer.send_request(req, udp_target(), state.on_response)
    freed = weakref.ref(state)
    del state
    if ending == "2xx":
        h.layer.receive(reply(req, 200))
    enabled = gc.isenabled()
    gc.disable()
    try:
        h.advance(64 * T1)
        assert freed() is None
    finally:
        if enabled:
            gc.enable()
    assert got.statuses == ([200] if ending == "2xx" else [408])


def test_client_response_matching_uses_branch_and_cseq_method(h: Harness) -> None:
    got_invite, got_cancel = Responses(), Responses()
    req = outgoing()
    h.layer.send_request(req, udp_target(), got_invite)
    h.layer.receive(reply(req, 180))
    cancel = build_cancel(req)
    cancel_tx = h.layer.send_request(cancel, udp_target(), got_cancel)
    assert cancel_tx.state is State.TRYING and len(h.layer) == 2
    h.layer.receive(reply(cancel, 200))
    assert got_cancel.statuses == [200] and got_invite.statuses == [180]
    other = outgoing(branch="z9hG4bKother")
    h.layer.receive(reply(other, 200))
    assert [r.status for r in h.tu.strays] == [200]


def test_build_cancel_headers() -> None:
    req = outgoing()
    cancel = build_cancel(req)
    assert cancel.method == "CANCEL" and str(cancel.uri) == str(req.uri)
    assert [str(v) for v in cancel.vias] == [str(req.top_via)]
    assert cancel.headers.get("To") == req.headers.get("To")
    assert cancel.headers.get("From") == req.headers.get("From")
    assert cancel.call_id == req.call_id and str(cancel.cseq) == "7 CANCEL"
    assert cancel.headers.get_all("Route") == req.headers.get_all("Route")
    assert build_ack(req, reply(req, 404)).method == "ACK"


def test_cancel_gives_the_invite_64_t1_to_finish(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    h.layer.receive(reply(req, 180))
    h.advance(10)
    cancel_tx = h.layer.send_request(build_cancel(req), udp_target(), Responses())
    assert tx.timers == {"cancel"}
    h.layer.receive(reply(build_cancel(req), 200))
    assert cancel_tx.state is State.COMPLETED
    h.advance(64 * T1 - STEP)
    assert tx.state is State.PROCEEDING
    h.advance(STEP)
    assert got.statuses == [180, 408] and tx.state is State.TERMINATED
    h.advance(T4)
    assert len(h.layer) == 0


def test_cancel_timer_stops_on_final(h: Harness) -> None:
    got = Responses()
    req = outgoing()
    tx = h.layer.send_request(req, udp_target(), got)
    h.layer.receive(reply(req, 180))
    h.layer.send_request(build_cancel(req), udp_target(), Responses())
    h.layer.receive(reply(req, 487))
    assert got.statuses == [180, 487] and tx.timers == {"D"}


# ------------------------------------------------------------------------------------------------
# client non-INVITE
# ------------------------------------------------------------------------------------------------
def test_client_non_invite_timer_e_and_timer_f(h: Harness) -> None:
    got = Responses()
    tx = h.layer.send_request(outgoing("OPTIONS"), udp_target(), got)
    assert tx.state is State.TRYING and tx.timers == {"E", "F"}
    h.advance(64 * T1 - STEP)
    assert h.transport.request_times("OPTIONS") == [
        0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    h.advance(STEP)
    assert got.statuses == [408] and tx.state is State.TERMINATED and len(h.layer) == 0


def test_client_non_invite_timer_e_is_t2_once_proceeding(h: Harness) -> None:
    got = Responses()
    req = outgoing("REGISTER")
    tx = h.layer.send_request(req, udp_target(), got)
    h.advance(1)
    h.layer.receive(reply(req, 100, to_tag=None))
    assert tx.state is State.PROCEEDING and tx.provisional_received
    h.advance(64 * T1 - 1 - STEP)
    assert h.transport.request_times("REGISTER") == [0, 0.5, 1.5, 5.5, 9.5, 13.5, 17.5, 21.5,
                                                      25.5, 29.5]
    h.advance(STEP)  # Timer F runs on in Proceeding
    assert got.statuses == [100, 408] and len(h.layer) == 0


def test_client_non_invite_final_and_timer_k(h: Harness) -> None:
    got = Responses()
    req = outgoing("MESSAGE")
    tx = h.layer.send_request(req, udp_target(), got)
    ok = reply(req, 202)
    h.layer.receive(ok)
    assert tx.state is State.COMPLETED and tx.timers == {"K"}
    h.layer.receive(reparse(ok))  # absorbed
    h.layer.receive(reply(req, 500))  # absorbed
    assert got.statuses == [202]
    h.advance(T4 - STEP)
    assert tx.state is State.COMPLETED
    h.advance(STEP)
    assert tx.state is State.TERMINATED and len(h.layer) == 0
    assert h.transport.request_times("MESSAGE") == [0]  # Timer E stopped with the final


def test_cancelled_timers_run_nothing_and_end_with_the_last_transaction(h: Harness) -> None:
    """Timer E and F of a MESSAGE answered at once are cancelled; while another transaction
    lives their queues may still fire, for nothing (no retransmission, no 408), and once the
    last transaction ends nothing is left scheduled."""
    got = Responses()
    req = outgoing("MESSAGE", branch="z9hG4bKdown1")
    h.layer.send_request(req, udp_target(), got)
    h.layer.receive(reply(req, 200))
    other = outgoing("OPTIONS", branch="z9hG4bKdown2")
    other_got = Responses()
    h.layer.send_request(other, udp_target("TCP"), other_got)  # Timer F only
    h.advance(64 * T1 - STEP)
    assert got.statuses == [200] and h.transport.request_times("MESSAGE") == [0]
    assert other_got.statuses == []
    h.advance(STEP)
    assert other_got.statuses == [408] and len(h.layer) == 0
    assert h.clock.getDelayedCalls() == []
    assert got.statuses == [200] and h.transport.request_times("MESSAGE") == [0]


def test_client_non_invite_over_tcp_zero_timer_k(h: Harness) -> None:
    got = Responses()
    req = outgoing("BYE", transport="TCP")
    tx = h.layer.send_request(req, udp_target("TCP"), got)
    assert tx.timers == {"F"}
    h.layer.receive(reply(req, 200))
    assert got.statuses == [200] and tx.state is State.TERMINATED and len(h.layer) == 0
    assert h.clock.getDelayedCalls() == []


def test_send_request_refuses_ack_missing_branch_and_duplicates(h: Harness) -> None:
    with pytest.raises(ValueError):
        ack = build_ack(outgoing(), reply(outgoing(), 486))
        h.layer.send_request(ack, udp_target(), Responses())
    req = outgoing()
    req.pop_via()
    req.pop_via()
    with pytest.raises(ValueError):
        h.layer.send_request(req, udp_target(), Responses())
    h.layer.send_request(outgoing(), udp_target(), Responses())
    with pytest.raises(ValueError):
        h.layer.send_request(outgoing(), udp_target(), Responses())
    assert len(h.layer) == 1


def test_stateless_sends(h: Harness) -> None:
    ack = build_ack(outgoing(), reply(outgoing(), 200))
    h.layer.send_stateless_request(ack, udp_target())
    invite = incoming()
    ok = reply(invite, 200)
    h.layer.send_stateless_response(ok, invite.source)
    h.transport.raise_error = OSError("unreachable")
    h.layer.send_stateless_response(ok, invite.source)  # logged, never raised
    assert [r for _, r, _ in h.transport.requests] == [ack]
    assert [(r, s) for _, r, s in h.transport.responses] == [(ok, invite.source)] * 2
    assert len(h.layer) == 0


# ------------------------------------------------------------------------------------------------
# transport errors and misbehaving users
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["raise", "deferred"])
@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
def test_client_transport_error_is_a_503_on_the_next_turn(
    h: Harness, how: str, method: str
) -> None:
    error = ConnectionRefusedError("refused")
    if how == "raise":
        h.transport.raise_error = error
    else:
        h.transport.fail_deferred = error
    got = Responses()
    tx = h.layer.send_request(outgoing(method), udp_target("TCP"), got)
    assert got == [] and tx.state in (State.CALLING, State.TRYING)
    h.clock.advance(0)
    assert got.statuses == [503] and tx.state is State.TERMINATED and len(h.layer) == 0
    assert h.clock.getDelayedCalls() == []


def test_server_transport_error_is_reported_to_the_tu(h: Harness) -> None:
    req = incoming("OPTIONS", transport="TCP")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    h.transport.fail_deferred = ConnectionResetError("reset")
    tx.respond(reply(req, 180))
    h.clock.advance(0)
    ((failed, reason),) = h.tu.failures
    assert failed is tx and reason.check(ConnectionResetError)
    assert tx.state is State.TERMINATED and len(h.layer) == 0


def test_when_terminated_fires(h: Harness) -> None:
    req = incoming("OPTIONS")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    fired: list[object] = []
    tx.when_terminated().addCallback(fired.append)
    tx.respond(reply(req, 200))
    assert fired == []
    h.advance(64 * T1)
    assert fired == [None]
    tx.when_terminated().addCallback(fired.append)
    assert fired == [None, None]


def test_exceptions_from_the_tu_do_not_break_the_layer(h: Harness) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("proxy bug")

    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        h.tu.request_received = boom  # type: ignore[method-assign,assignment]
        h.layer.receive(incoming())
        assert len(h.layer) == 1 and [r.status for _, r, _ in h.transport.responses] == [100]
        req = outgoing()
        tx = h.layer.send_request(req, udp_target(), boom)
        h.layer.receive(reply(req, 486))
        assert tx.state is State.COMPLETED and h.transport.request_times("ACK") == [0]
    finally:
        globalLogPublisher.removeObserver(observer)
    logged = [e["log_failure"].value for e in events if "log_failure" in e]
    assert len(logged) == 2 and all(isinstance(v, RuntimeError) for v in logged)


# ------------------------------------------------------------------------------------------------
# property: any interleaving ends with empty tables
# ------------------------------------------------------------------------------------------------
SERVER_CASES = [("INVITE", "UDP"), ("INVITE", "TCP"), ("OPTIONS", "UDP"), ("OPTIONS", "TCP")]
CLIENT_CASES = [("INVITE", "UDP"), ("INVITE", "TCP"), ("MESSAGE", "UDP"), ("MESSAGE", "TLS")]

_index = st.integers(0, 3)
_pick = st.integers(0, 7)  # an index into whatever exists by then, modulo its length
_status = st.sampled_from([100, 180, 200, 486])
_steps = st.one_of(st.integers(0, 8), st.integers(0, 150))  # in STEPs: short waits, and long ones
actions = st.one_of(
    st.tuples(st.just("srv_req"), _index),
    st.tuples(st.just("srv_ack"), _index, st.booleans()),
    st.tuples(st.just("srv_cancel"), _index),
    st.tuples(st.just("srv_respond"), _pick, _status),
    st.tuples(st.just("cli_send"), _index),
    st.tuples(st.just("cli_resp"), _pick, _status),
    st.tuples(st.just("cli_cancel"), _index),
    st.tuples(st.just("advance"), _steps),
    st.tuples(st.just("fail_next"), st.sampled_from(["raise", "deferred"])),
)


def _server_request(i: int) -> Request:
    method, transport = SERVER_CASES[i]
    return incoming(method, branch=f"z9hG4bKsrv{i}", transport=transport)


def _client_request(j: int) -> Request:
    method, transport = CLIENT_CASES[j]
    return outgoing(method, branch=f"z9hG4bKcli{j}", transport=transport)


class OneShotFailingTransport(RecordingTransportSender):
    """Fails only the next send, so failures land at every point of a transaction's life."""

    fail_next: str | None = None

    def _outcome(self) -> Deferred[None] | None:
        how, self.fail_next = self.fail_next, None
        if how == "raise":
            raise ConnectionRefusedError()
        if how == "deferred":
            return fail(ConnectionResetError())
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=20, max_size=80))
def test_any_interleaving_ends_with_empty_tables(script: list[tuple[Any, ...]]) -> None:
    h = Harness()
    transport = OneShotFailingTransport(h.clock)
    h.transport = transport
    h.layer.transport = transport
    clients: list[tuple[ClientTransaction, Responses]] = []
    sent: set[int] = set()
    cancelled: set[int] = set()

    for action in script:
        kind = action[0]
        if kind == "srv_req":  # the first time a new transaction, then retransmissions
            h.layer.receive(_server_request(action[1]))
        elif kind == "srv_ack":  # hop-by-hop (same branch) or end-to-end (new branch)
            i, same_branch = action[1] % 2, action[2]  # the INVITE cases
            branch = f"z9hG4bKsrv{i}" if same_branch else f"z9hG4bKack{i}"
            h.layer.receive(incoming("ACK", branch=branch, transport=SERVER_CASES[i][1],
                                     cseq_method="ACK", to_tag="b1"))
        elif kind == "srv_cancel":
            i = action[1]
            h.layer.receive(incoming("CANCEL", branch=f"z9hG4bKsrv{i}",
                                     transport=SERVER_CASES[i][1]))
        elif kind == "srv_respond":  # the TU answers any transaction it was given, any time
            if h.tu.requests:
                stx = h.tu.requests[action[1] % len(h.tu.requests)][0]
                stx.respond(reply(stx.request, action[2]))
        elif kind == "cli_send":
            j = action[1]
            if j not in sent:
                sent.add(j)
                got = Responses()
                target = udp_target(CLIENT_CASES[j][1])
                clients.append((h.layer.send_request(_client_request(j), target, got), got))
        elif kind == "cli_resp":  # responses (and retransmissions, and strays) from downstream
            if clients:
                ctx = clients[action[1] % len(clients)][0]
                h.layer.receive(reply(ctx.request, action[2]))
            else:
                h.layer.receive(reply(_client_request(0), action[2]))
        elif kind == "cli_cancel":
            j = action[1]
            if j in sent and j not in cancelled and CLIENT_CASES[j][0] == "INVITE":
                cancelled.add(j)
                got = Responses()
                cancel = build_cancel(_client_request(j))
                target = udp_target(CLIENT_CASES[j][1])
                clients.append((h.layer.send_request(cancel, target, got), got))
        elif kind == "advance":
            h.advance(action[1] * STEP)
        elif kind == "fail_next":
            transport.fail_next = action[1]
        # the tables hold exactly the transactions that have not terminated
        live_server = [tx for tx, _ in h.tu.requests if not tx.terminated]
        live_client = [tx for tx, _ in clients if not tx.terminated]
        assert h.layer.server_count == len(live_server)
        assert h.layer.client_count == len(live_client)

    # wind down as a proxy would: everything answered, every outstanding branch finished
    transport.fail_next = None
    h.clock.advance(0)
    for stx, req in h.tu.requests:
        if not stx.terminated and (stx.last_response is None or stx.last_response.status < 200):
            stx.respond(reply(req, 200 if req.method == "CANCEL" else 500))
    for ctx, _ in clients:
        if ctx.state in (State.CALLING, State.TRYING, State.PROCEEDING):
            h.layer.receive(reply(ctx.request, 487 if ctx.is_invite else 200))
    h.advance(64 * T1 + T4)

    assert len(h.layer) == 0 and h.layer.client_count == 0 and h.layer.server_count == 0
    assert h.layer._server == {} and h.layer._client == {}
    assert h.clock.getDelayedCalls() == []
    for _, got in clients:
        finals = [s for s in got.statuses if s >= 200]
        assert finals, "every client transaction ends with a final response"
        non2xx = [s for s in finals if s >= 300]
        assert len(non2xx) <= 1 and (not non2xx or finals == non2xx)


def test_call_when_terminated_calls_once_in_order(h: Harness) -> None:
    req = incoming("OPTIONS")
    h.layer.receive(req)
    tx = h.tu.requests[0][0]
    calls: list[object] = []

    def boom() -> None:
        raise RuntimeError("a waiter's bug")

    tx.call_when_terminated(calls.append, "first")
    tx.call_when_terminated(boom)  # logged; the next one is still called
    tx.when_terminated().addCallback(calls.append)
    tx.call_when_terminated(calls.append, "last")
    tx.respond(reply(req, 200))
    assert calls == []
    h.advance(64 * T1)
    assert calls == ["first", None, "last"]
    tx.call_when_terminated(calls.append, "late")  # already terminated: at once
    assert calls == ["first", None, "last", "late"]
