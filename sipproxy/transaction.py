"""RFC 3261 section 17 transactions for a stateful proxy, with RFC 6026's Accepted state.

The layer sits between the transports and the proxy core (the "TU"). It absorbs
retransmissions, retransmits over UDP, sends the hop-by-hop ACK for non-2xx finals, turns
silence into a 408 and send failures into a 503, and forgets each transaction when it
terminates. Every timer comes from the injected ``IReactorTime``.

Transport errors: ``ITransportSender.send_request``/``send_response`` may raise or return a
Deferred that fails. Either way the failure reaches the transaction on the next reactor turn
(``callLater(0)``), never inside the call that sent, so a caller of ``send_request`` always gets
its transaction object before its ``on_response`` can run.

An INVITE the TU answers while it is handed over (a refusal, a challenge) gets no 100 Trying and
its final is not resent by Timer G: the sender, still in Calling, retransmits the INVITE and
each copy gets one answer, as from a stateless UAS (RFC 3261 8.2.7; Kamailio's sl_send_reply).
So a source address spoofed by a third party gets one datagram per INVITE, not twelve (100
Trying and eleven copies of the final until Timer H). An INVITE the TU forwards gets its 100
right after, and Timer G as usual.

Lifetimes: every state but two ends on a timer. A server transaction waits for the TU's final
response as long as the TU takes (RFC 3261 has no timer there), and an INVITE client
transaction in Proceeding waits for a final response until the proxy's Timer C (RFC 3261 16.6
step 11) sends a CANCEL through ``send_request``, which gives it 64*T1 more (RFC 3261 9.1).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from sipproxy.errors import ParseError
from sipproxy.headers import Headers
from sipproxy.message import MAGIC_COOKIE, Request, Response, Source

# defined outside this module, which is compiled with mypyc: mypyc cannot build a zope
# ``Interface``; imported here, where callers have always found them
from sipproxy.transaction_interfaces import ITransactionUser, ITransportSender

if TYPE_CHECKING:
    from sipproxy.context import Target

__all__ = [
    "ClientTransaction",
    "ITransactionUser",
    "ITransportSender",
    "ServerTransaction",
    "State",
    "TransactionLayer",
    "TransactionTimeout",
    "build_ack",
    "build_cancel",
]

_log = Logger(namespace="sipproxy.transaction")


class TransactionTimeout(Exception):
    """Timer H fired: the ACK for a non-2xx final response never came."""


class State(enum.StrEnum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


def _reliable(transport: str | None) -> bool:
    return (transport or "UDP").upper() != "UDP"


def build_ack(invite: Request, response: Response) -> Request:
    """The hop-by-hop ACK for a non-2xx final response (RFC 3261 17.1.1.3).

    Same Request-URI, Call-ID, From and CSeq number as the INVITE; To from the response (with
    its tag); the INVITE's top Via only; the INVITE's Route headers.
    """
    return _build_from(invite, "ACK", response.headers.get("to") or "")


def build_cancel(request: Request) -> Request:
    """The CANCEL for ``request`` (RFC 3261 9.1): it reaches the same server transaction.

    Same Request-URI, Call-ID, To, From and CSeq number; the request's top Via only; its Route
    headers. Send it with ``TransactionLayer.send_request`` to the request's target, and only
    after a provisional response (``ClientTransaction.provisional_received``).
    """
    return _build_from(request, "CANCEL", request.headers.get("to") or "")


def _build_from(request: Request, method: str, to: str) -> Request:
    headers = Headers()
    top = request.top_via
    if top is not None:
        headers.add("Via", str(top))
    max_forwards = request.headers.get("max-forwards")
    headers.add("Max-Forwards", max_forwards if max_forwards is not None else "70")
    for route in request.headers.get_all("route"):
        headers.add("Route", route)
    headers.add("From", request.headers.get("from") or "")
    headers.add("To", to)
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.number} {method}")
    headers.add("Content-Length", "0")
    return Request(method, str(request.uri), headers)


# Table keys. A server transaction is found by (outer key, method); the outer key alone finds
# every transaction a CANCEL could target (RFC 3261 9.2).
_OuterKey = tuple[object, ...]


def _server_key(request: Request) -> tuple[_OuterKey, bool]:
    """(outer key, is RFC 3261 style) of a received request (RFC 3261 17.2.3)."""
    via = request.top_via
    branch = via.branch if via is not None else None
    if via is not None and branch and branch.startswith(MAGIC_COOKIE):
        # The source address joins the RFC's (branch, sent-by): sent-by is only what the
        # client claims, so a stranger reusing a branch must not hit someone else's transaction.
        source = request.source
        where = (source.host, source.port) if source is not None else None
        return ("3261", branch, via.host.lower(), via.port, where), True
    # RFC 2543: Request-URI, From tag, Call-ID, CSeq number and top Via; the To tag and the
    # method are checked separately because an ACK's To tag is the response's.
    return (
        "2543",
        str(request.uri),
        request.from_.tag,
        request.call_id,
        request.cseq.number,
        str(via) if via is not None else "",
    ), False


class _Timer:
    """One transaction timer in its :class:`_TimerQueue`: what to call on which transaction, and
    when. Cancelling only marks it (and lets go of the transaction); the queue skips it."""

    __slots__ = ("func", "name", "queue", "tx", "when")

    def __init__(self, tx: _Transaction, name: str, func: Callable[[Any], None],
                 when: float, queue: _TimerQueue) -> None:
        self.tx: _Transaction | None = tx
        self.name = name
        self.func = func
        self.when = when
        self.queue = queue

    def cancel(self) -> None:
        if self.tx is not None:
            self.tx = None
            self.queue.cancelled()


class _TimerQueue:
    """Every timer of one duration, in the order they were started, behind one ``DelayedCall``.

    Timers of one duration expire in the order they start, so a FIFO is already sorted: a
    transaction's timer costs a small object in a deque instead of a ``DelayedCall`` (with its
    bound method, argument tuple and keyword dict) in the reactor's heap, and the thousands of
    transactions that wait out Timer J/L/M hold far fewer objects for the garbage collector to
    scan. The clock is the layer's injected ``IReactorTime``, so tests still drive it with
    ``Clock``; a timer fires at exactly ``start + delay`` as before.
    """

    __slots__ = ("_call", "_clock", "_live", "_timers")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._timers: deque[_Timer] = deque()
        self._call: IDelayedCall | None = None
        self._live = 0  # timers in the deque not cancelled

    def __len__(self) -> int:
        return self._live

    def add(self, timer: _Timer) -> None:
        self._timers.append(timer)
        self._live += 1
        self._schedule(timer.when)

    def _schedule(self, when: float) -> None:
        """Make the queue's call fire by ``when``: arm it, or bring it forward (the clock went
        back, so a timer must not fire late)."""
        call = self._call
        delay = max(0.0, when - self._clock.seconds())
        if call is None:
            self._call = self._clock.callLater(delay, self._run)
        elif when < call.getTime():
            call.reset(delay)

    def cancelled(self) -> None:
        """A timer of this queue was cancelled. The queue's call stays scheduled, also with no
        timer left (it then fires once for nothing and is not armed again): most timers are
        cancelled soon after they start (A and B at the first response, E and F at the
        final), and cancelling the call and arming a new one for the next timer each time
        cost more. Once no transaction is left the layer stops every queue, so an idle layer
        leaves nothing scheduled."""
        self._live -= 1

    def _run(self) -> None:
        self._call = None
        timers = self._timers
        now = self._clock.seconds()
        while timers and timers[0].when <= now:
            timer = timers.popleft()
            tx = timer.tx
            if tx is None:
                continue  # cancelled
            timer.tx = None
            self._live -= 1
            if tx._timers.get(timer.name) is timer:
                del tx._timers[timer.name]
            if tx.state is not State.TERMINATED:
                try:
                    timer.func(tx)
                except Exception:
                    _log.failure("transaction timer {name} of {tx!r} failed",
                                 name=timer.name, tx=tx)
        # drop cancelled timers at the head now, so an idle queue holds nothing
        while timers and timers[0].tx is None:
            timers.popleft()
        if timers:
            # in a method of its own: a timer that fired may have armed the call again, which
            # a read of ``self._call`` here, after setting it to None, would not see (mypy
            # narrows it to None, and mypyc compiles what mypy infers)
            self._schedule(timers[0].when)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._live = 0
        self._timers.clear()


class _Transaction:
    """Timers and termination, shared by both kinds of transaction."""

    # slots: thousands live at once (most waiting out a timer)
    __slots__ = ("_interval", "_key", "_layer", "_timers", "_waiters", "is_invite",
                 "last_response", "reliable", "request", "state")

    state: State

    def __init__(self, layer: TransactionLayer, request: Request, reliable: bool) -> None:
        self._layer = layer
        self.request = request
        self.reliable = reliable
        self.is_invite = request.method == "INVITE"
        self.last_response: Response | None = None
        self._timers: dict[str, _Timer] = {}
        # Deferreds and (function, arguments) to fire on termination; None while there are none
        self._waiters: list[Deferred[None] | tuple[Callable[..., object], tuple[Any, ...]]] \
            | None = None
        self._interval = layer.t1

    @property
    def timers(self) -> frozenset[str]:
        """The RFC 3261/6026 timer letters now running (for tests and debugging)."""
        return frozenset(self._timers)

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def when_terminated(self) -> Deferred[None]:
        """A Deferred that fires (with None) once this transaction has terminated."""
        d: Deferred[None] = Deferred()
        if self.state is State.TERMINATED:
            d.callback(None)
        elif self._waiters is None:
            self._waiters = [d]
        else:
            self._waiters.append(d)
        return d

    def call_when_terminated(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn(*args)`` once this transaction has terminated (at once if it has): what
        :meth:`when_terminated` does without a Deferred, for a caller on the hot path (every
        request the proxy handles). An exception from ``fn`` is logged."""
        if self.state is State.TERMINATED:
            self._call_waiter(fn, args)
        elif self._waiters is None:
            self._waiters = [(fn, args)]
        else:
            self._waiters.append((fn, args))

    @staticmethod
    def _call_waiter(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            _log.failure("on termination: {fn} failed", fn=getattr(fn, "__name__", fn))

    def _start_timer(self, name: str, delay: float, fn: Callable[[Any], None]) -> None:
        """Run ``fn(self)`` after ``delay``, unless the transaction has terminated by then; a
        zero wait (reliable transports) runs it at once. ``fn`` is a method taken from the
        class (``ClientTransaction._timer_a``), not a bound one: a waiting timer then holds no
        bound method (one object less for the collector), and a compiled method has no
        ``__func__`` to unbind it with."""
        self._cancel_timer(name)
        if delay <= 0:
            fn(self)
            return
        layer = self._layer
        queue = layer.timer_queue(delay)
        timer = _Timer(self, name, fn, layer.clock.seconds() + delay, queue)
        self._timers[name] = timer
        queue.add(timer)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _compact(self) -> None:
        """After the final response a transaction mostly waits (up to 64*T1): keep its
        messages as text, not as parsed views, so thousands of them stay small."""
        for message in (self.request, self.last_response):
            if message is not None:
                message.compact()

    def _terminate(self) -> None:
        if self.state is State.TERMINATED:
            return
        self.state = State.TERMINATED
        for name in list(self._timers):
            self._cancel_timer(name)
        self._layer._forget(self)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if isinstance(waiter, tuple):
                self._call_waiter(*waiter)
            else:
                waiter.callback(None)

    def _guarded(self, send: Callable[..., object], *args: Any) -> None:
        """``send(*args)``, and route any failure to ``_transport_failed`` on the next reactor
        turn."""
        try:
            result = send(*args)
        except Exception:
            self._layer.clock.callLater(0, self._transport_failed, Failure())
            return
        # None first: Deferred is an ABC (Awaitable), so isinstance on it runs Python code
        if result is not None and isinstance(result, Deferred):
            result.addErrback(self._later_failed)

    def _later_failed(self, failure: Failure) -> None:
        self._layer.clock.callLater(0, self._transport_failed, failure)

    def _transport_failed(self, failure: Failure) -> None:
        raise TypeError("each kind of transaction handles its own transport failures")


class ServerTransaction(_Transaction):
    """A received request and the responses to it (RFC 3261 17.2, RFC 6026 7.1).

    ``respond()`` is the only thing the TU calls. Retransmitted requests never reach the TU:
    they are absorbed or answered with ``last_response``.
    """

    __slots__ = ("_method",)

    def __init__(self, layer: TransactionLayer, request: Request, key: _OuterKey) -> None:
        source = request.source
        via = request.top_via
        transport = source.transport if source is not None else (via.transport if via else None)
        super().__init__(layer, request, _reliable(transport))
        self.state = State.PROCEEDING if self.is_invite else State.TRYING
        self._key = key
        self._method = request.method

    def __repr__(self) -> str:
        return f"<ServerTransaction {self._method} {self.state}>"

    @property
    def source(self) -> Source | None:
        return self.request.source

    # -- from the TU -------------------------------------------------------------------------
    def respond(self, response: Response) -> None:
        """Send a response. Responses the state does not allow are dropped (and logged).

        After termination a 2xx to INVITE is still sent (statelessly, back where the request
        came from): a proxy must forward every 2xx (RFC 3261 16.7 step 10, RFC 6026).
        """
        status = response.status
        state = self.state
        if state is State.TERMINATED:
            if self.is_invite and 200 <= status < 300:
                self._layer.send_stateless_response(response, self.request.source)
            else:
                _log.debug("dropped {status} for terminated {tx!r}", status=status, tx=self)
            return
        if self.is_invite:
            if state is State.PROCEEDING:
                provisional_sent = self.last_response is not None
                self._send(response)
                if status >= 300:
                    self.state = State.COMPLETED
                    if not self.reliable and provisional_sent:
                        # a provisional went out, so the sender stopped retransmitting the
                        # INVITE: Timer G resends the final. Without one, each retransmission
                        # gets one copy (a stateless UAS, RFC 3261 8.2.7): a spoofed source
                        # gets one answer per INVITE, not eleven
                        self._interval = self._layer.t1
                        self._start_timer("G", self._interval, ServerTransaction._timer_g)
                    self._start_timer("H", 64 * self._layer.t1, ServerTransaction._timer_h)
                elif status >= 200:
                    self.state = State.ACCEPTED
                    self._start_timer("L", 64 * self._layer.t1, ServerTransaction._terminate)
            elif state is State.ACCEPTED and 200 <= status < 300:
                self._send(response)
            else:
                _log.debug("dropped {status} in {tx!r}", status=status, tx=self)
            return
        if state in (State.TRYING, State.PROCEEDING):
            self._send(response)
            if status < 200:
                self.state = State.PROCEEDING
            else:
                self.state = State.COMPLETED
                self._start_timer("J", 0 if self.reliable else 64 * self._layer.t1,
                                  ServerTransaction._terminate)
        else:
            _log.debug("dropped {status} in {tx!r}", status=status, tx=self)

    def _send(self, response: Response) -> None:
        self.last_response = response
        self._resend()
        if response.status >= 200:
            if not self.is_invite:
                # only retransmissions are left to answer: what matches them is all we keep
                self.request = self.request.essentials()
            self._compact()

    def _resend(self) -> None:
        response = self.last_response
        if response is not None:
            self._guarded(self._layer.transport.send_response, response, self.request.source)

    # -- from the network --------------------------------------------------------------------
    def _retransmission(self) -> None:
        state = self.state
        if state in (State.PROCEEDING, State.COMPLETED):
            self._resend()
        # Trying (no response yet), Accepted (RFC 6026: absorb), Confirmed: nothing to do.

    def _ack(self, ack: Request) -> None:
        if self.state is State.COMPLETED:
            self.state = State.CONFIRMED
            self._cancel_timer("G")
            self._cancel_timer("H")
            self._start_timer("I", 0 if self.reliable else self._layer.t4,
                              ServerTransaction._terminate)
        elif self.state is State.ACCEPTED:
            self._layer._call_tu(self._layer.tu.ack_received, ack)

    # -- timers ------------------------------------------------------------------------------
    def _timer_g(self) -> None:
        self._resend()
        self._interval = min(2 * self._interval, self._layer.t2)
        self._start_timer("G", self._interval, ServerTransaction._timer_g)

    def _timer_h(self) -> None:
        self._terminate()
        self._layer._call_tu(
            self._layer.tu.server_transaction_failed,
            self,
            Failure(TransactionTimeout("Timer H: no ACK for the final response")),
        )

    def _transport_failed(self, failure: Failure) -> None:
        if self.state in (State.TRYING, State.PROCEEDING, State.COMPLETED):
            self._terminate()
            self._layer._call_tu(self._layer.tu.server_transaction_failed, self, failure)
        else:
            _log.debug("send failed in {tx!r}: {f}", tx=self, f=failure.getErrorMessage())


def _ignore_response(response: Response) -> None:
    """What a terminated client transaction's ``on_response`` becomes."""


class ClientTransaction(_Transaction):
    """A request the proxy sends and the responses to it (RFC 3261 17.1, RFC 6026 8.4).

    Every response worth the TU's attention goes to ``on_response``: provisionals, the final,
    and (for INVITE) every 2xx including retransmissions. A timeout arrives as a locally made
    408 and a transport failure as a 503 (``source`` is None on both), as RFC 3261 16.7 and
    16.9 tell a proxy to treat them; the transaction has then already terminated.
    """

    __slots__ = ("_tu_args", "ack", "on_response", "provisional_received", "target")

    def __init__(
        self,
        layer: TransactionLayer,
        request: Request,
        target: Target,
        on_response: Callable[..., None],
        key: tuple[str, str],
        tu_args: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(layer, request, _reliable(target.transport))
        self.target = target
        #: called as ``on_response(response, *tu_args)``
        self.on_response = on_response
        self._tu_args = tu_args
        self.provisional_received = False
        self.state = State.CALLING if self.is_invite else State.TRYING
        self._key = key
        self.ack: Request | None = None

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.request.method} {self.state}>"

    @property
    def branch(self) -> str:
        return self._key[0]

    def _start(self) -> None:
        t1 = self._layer.t1
        self._send_request()
        if self.is_invite:
            if not self.reliable:
                self._start_timer("A", t1, ClientTransaction._timer_a)
            self._start_timer("B", 64 * t1, ClientTransaction._timeout)
        else:
            if not self.reliable:
                self._start_timer("E", t1, ClientTransaction._timer_e)
            self._start_timer("F", 64 * t1, ClientTransaction._timeout)

    def _send_request(self) -> None:
        self._guarded(self._layer.transport.send_request, self.request, self.target)

    def _deliver(self, response: Response) -> None:
        self._layer._call_tu(self.on_response, response, *self._tu_args)

    # -- from the network --------------------------------------------------------------------
    def _receive(self, response: Response) -> None:
        status = response.status
        state = self.state
        if self.is_invite:
            if state in (State.CALLING, State.PROCEEDING):
                self._cancel_timer("A")
                self._cancel_timer("B")
                self.last_response = response
                if status < 200:
                    self.state = State.PROCEEDING
                    self.provisional_received = True
                    self._deliver(response)
                elif status < 300:
                    self._cancel_timer("cancel")
                    self.state = State.ACCEPTED
                    self._deliver(response)
                    self._compact()
                    self._start_timer("M", 64 * self._layer.t1, ClientTransaction._terminate)
                else:
                    self._cancel_timer("cancel")
                    self.state = State.COMPLETED
                    self.ack = build_ack(self.request, response)
                    self._send_ack()
                    self._deliver(response)
                    self._compact()
                    self._start_timer("D", 0 if self.reliable else self._layer.timer_d,
                                      ClientTransaction._terminate)
            elif state is State.COMPLETED and status >= 300:
                self._send_ack()
            elif state is State.ACCEPTED and 200 <= status < 300:
                self._deliver(response)
            return
        if state in (State.TRYING, State.PROCEEDING):
            self.last_response = response
            if status < 200:
                self.state = State.PROCEEDING
                self.provisional_received = True
                self._deliver(response)
            else:
                self.state = State.COMPLETED
                self._cancel_timer("E")
                self._cancel_timer("F")
                self._deliver(response)
                self._compact()
                self._start_timer("K", 0 if self.reliable else self._layer.t4,
                                  ClientTransaction._terminate)

    def _send_ack(self) -> None:
        ack, transport, target = self.ack, self._layer.transport, self.target
        if ack is not None:
            try:
                result = transport.send_request(ack, target)
            except Exception as e:
                _log.info("sending ACK for {tx!r} failed: {e}", tx=self, e=e)
                return
            if result is not None and isinstance(result, Deferred):
                result.addErrback(lambda f: None)  # a lost ACK is retried on the next final

    # -- timers ------------------------------------------------------------------------------
    def _timer_a(self) -> None:
        self._send_request()
        self._interval *= 2
        self._start_timer("A", self._interval, ClientTransaction._timer_a)

    def _timer_e(self) -> None:
        self._send_request()
        if self.state is State.PROCEEDING:
            self._interval = self._layer.t2
        else:
            self._interval = min(2 * self._interval, self._layer.t2)
        self._start_timer("E", self._interval, ClientTransaction._timer_e)

    def _timeout(self) -> None:
        self._fail(408)

    def _cancel_sent(self) -> None:
        """A CANCEL went out for this INVITE: give up 64*T1 later without a final (RFC 3261 9.1)."""
        if self.state in (State.CALLING, State.PROCEEDING) and "cancel" not in self._timers:
            self._start_timer("cancel", 64 * self._layer.t1, ClientTransaction._timeout)

    def _transport_failed(self, failure: Failure) -> None:
        if self.state in (State.CALLING, State.TRYING) or (
            self.state is State.PROCEEDING and not self.is_invite
        ):
            if not getattr(failure.value, "logged", False):  # e.g. a TLS failure: logged once
                _log.info("sending {tx!r} to {target} failed: {f}", tx=self,
                          target=self.target, f=failure.getErrorMessage())
            self._fail(503)

    def _fail(self, status: int) -> None:
        on_response, args = self.on_response, self._tu_args
        self._terminate()
        self._layer._call_tu(on_response, self.request.make_response(status), *args)

    def _terminate(self) -> None:
        super()._terminate()
        # the TU's callback usually holds the TU's state for this request, which holds this
        # transaction: a reference cycle only the garbage collector would free (about 100
        # objects a call); a terminated transaction delivers nothing more
        self.on_response = _ignore_response
        self._tu_args = ()


class TransactionLayer:
    """Matches messages to transactions, creates them, and forgets them when they terminate.

    ``len(layer)`` is the number of live transactions (``client_count + server_count``); it
    must come back to zero when traffic stops, or something leaks.
    """

    def __init__(
        self,
        clock: IReactorTime,
        transport: ITransportSender,
        tu: ITransactionUser,
        t1: float = 0.5,
        t2: float = 4.0,
        t4: float = 5.0,
        timer_d: float = 32.0,
        send_trying: bool = True,
    ) -> None:
        self.clock = clock
        self.transport = transport
        self.tu = tu
        self.t1 = t1
        self.t2 = t2
        self.t4 = t4
        self.timer_d = timer_d
        self.send_trying = send_trying
        self._server: dict[_OuterKey, dict[str, ServerTransaction]] = {}
        self._queues: dict[float, _TimerQueue] = {}
        self._client: dict[tuple[str, str], ClientTransaction] = {}
        self._live_server: set[ServerTransaction] = set()

    def __len__(self) -> int:
        return len(self._client) + len(self._live_server)

    def __bool__(self) -> bool:
        return True  # an idle layer is still a layer

    @property
    def client_count(self) -> int:
        return len(self._client)

    @property
    def server_count(self) -> int:
        return len(self._live_server)

    def timer_queue(self, delay: float) -> _TimerQueue:
        """The queue of the timers that run ``delay`` seconds (a handful of distinct delays:
        T1 doubling up to T2, T4, 64*T1, Timer D)."""
        queue = self._queues.get(delay)
        if queue is None:
            queue = self._queues[delay] = _TimerQueue(self.clock)
        return queue

    # -- from the transports -----------------------------------------------------------------
    def receive(self, message: Request | Response) -> None:
        """Every parsed message from the transports comes here."""
        try:
            if isinstance(message, Response):
                self._receive_response(message)
            else:
                self._receive_request(message)
        except ParseError as e:
            _log.info("dropped {m!r}: {e}", m=message, e=e)

    def _receive_response(self, response: Response) -> None:
        via = response.top_via
        branch = via.branch if via is not None else None
        tx = self._client.get((branch, response.cseq.method)) if branch else None
        if tx is None:
            self._call_tu(self.tu.stray_response, response)
        else:
            tx._receive(response)

    def _receive_request(self, request: Request) -> None:
        key, rfc3261 = _server_key(request)
        method = request.method
        if method == "ACK":
            tx = self._server.get(key, {}).get("INVITE")
            if tx is not None and not rfc3261:
                response_tag = tx.last_response.to.tag if tx.last_response is not None else None
                if request.to.tag != response_tag:
                    tx = None
            if tx is None:
                self._call_tu(self.tu.ack_received, request)
            else:
                tx._ack(request)
            return
        slot = self._server.setdefault(key, {})
        tx = slot.get(method)
        if tx is not None and (rfc3261 or request.to.tag == tx.request.to.tag):
            tx._retransmission()
            return
        tx = ServerTransaction(self, request, key)
        slot[method] = tx
        self._live_server.add(tx)
        self._call_tu(self.tu.request_received, tx, request)
        if tx.is_invite and self.send_trying and tx.last_response is None \
                and tx.state is State.PROCEEDING:
            # after the TU: an INVITE it answered at once gets no 100 (RFC 3261 17.2.1: only
            # one not answered within 200 ms needs it), so its sender stays in Calling and
            # retransmits the INVITE instead of us retransmitting the final (see respond)
            trying = request.make_response(100)
            timestamp = request.headers.get("timestamp")
            if timestamp is not None:
                trying.headers.add("Timestamp", timestamp)
            tx._send(trying)

    def find_server_transaction_for_cancel(self, cancel: Request) -> ServerTransaction | None:
        """The live server transaction ``cancel`` targets (RFC 3261 9.2), INVITE preferred."""
        key, rfc3261 = _server_key(cancel)
        slot = self._server.get(key)
        if not slot:
            return None
        found = None
        for method, tx in slot.items():
            if method in ("CANCEL", "ACK") or tx.terminated:
                continue
            if not rfc3261 and cancel.to.tag != tx.request.to.tag:
                continue
            if method == "INVITE":
                return tx
            found = tx
        return found

    # -- from the proxy ----------------------------------------------------------------------
    def send_request(
        self, request: Request, target: Target, on_response: Callable[..., None],
        *args: Any,
    ) -> ClientTransaction:
        """Start a client transaction, whose responses go to ``on_response(response, *args)``
        (arguments rather than a closure: fewer objects per transaction, one call less per
        response). ``request`` already carries the proxy's top Via with a unique branch
        (``sipproxy.message.new_branch()``); ACK is not a transaction (use
        ``send_stateless_request``). A CANCEL whose branch is that of a live INVITE client
        transaction also arms that INVITE's 64*T1 give-up timer (RFC 3261 9.1)."""
        if request.method == "ACK":
            raise ValueError("ACK is not sent in a client transaction")
        via = request.top_via
        branch = via.branch if via is not None else None
        if not branch:
            raise ValueError("the request needs a top Via with a branch")
        key = (branch, request.method)
        if key in self._client:
            raise ValueError(f"a client transaction for {key} exists already")
        tx = ClientTransaction(self, request, target, on_response, key, args)
        self._client[key] = tx
        if request.method == "CANCEL":
            invite = self._client.get((branch, "INVITE"))
            if invite is not None:
                invite._cancel_sent()
        tx._start()
        return tx

    def send_stateless_request(self, request: Request, target: Target) -> None:
        """Send without a transaction (an ACK for a 2xx); failures are only logged."""
        self._stateless(self.transport.send_request, request, target)

    def send_stateless_response(self, response: Response, request_source: Source | None) -> None:
        """Send without a transaction (a 2xx after the INVITE server transaction ended) back
        where its request came from (``request_source``: None for a request made in this
        process); failures are only logged."""
        self._stateless(self.transport.send_response, response, request_source)

    def _stateless(self, send: Callable[[Any, Any], Deferred[Any] | None], what: object,
                   where: object) -> None:
        """``send(what, where)``; a failure is only logged."""
        try:
            result = send(what, where)
        except Exception as e:
            _log.info("sending {what!r} statelessly failed: {e}", what=what, e=e)
            return
        if result is not None and isinstance(result, Deferred):
            result.addErrback(
                lambda f: _log.info("sending {what!r} failed: {f}", what=what,
                                    f=f.getErrorMessage())
            )

    def stop(self) -> None:
        """Terminate every live transaction and cancel its timers (the proxy is stopping)."""
        for tx in [*self._client.values(), *self._live_server]:
            tx._terminate()
        for queue in self._queues.values():
            queue.stop()

    # -- internals ---------------------------------------------------------------------------
    def _call_tu(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            _log.failure("transaction user raised in {fn}", fn=getattr(fn, "__name__", fn))

    def _forget(self, tx: _Transaction) -> None:
        if isinstance(tx, ClientTransaction):
            if self._client.get(tx._key) is tx:
                del self._client[tx._key]
        elif isinstance(tx, ServerTransaction):
            self._live_server.discard(tx)
            slot = self._server.get(tx._key)
            if slot is not None:
                if slot.get(tx._method) is tx:
                    del slot[tx._method]
                if not slot:
                    del self._server[tx._key]
        if not self._client and not self._live_server:
            for queue in self._queues.values():
                queue.stop()

