"""SIP over TCP: one protocol per connection that frames the byte stream into messages.

The protocol owns what is about the stream itself: framing (:class:`StreamFramer`, whose size limits
cut off an endless header or body), RFC 5626 CRLF keepalives (a ``CRLFCRLF`` ping is answered
with a ``CRLF`` pong; it keeps the connection from the idle timeout only when the owner says it
counts, :meth:`StreamOwner.keepalive_counts`: pings alone must not hold a connection forever), the
idle timeout, the message timeout (a peer that starts a message must finish it in time: a
slow-loris trickling bytes is cut off) and write buffering. What a message means is the
owner's business (:class:`StreamOwner`, the transport manager).
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sipproxy.message import DEFAULT_LIMITS, KeepAlive, Limits, ParseError, StreamFramer

__all__ = ["PONG", "SIPStreamProtocol", "StreamOwner", "unmapped"]

PONG = b"\r\n"

_MAPPED = "::ffff:"


def unmapped(host: str) -> str:
    """An IPv4 peer of a dual-stack (``::``) socket shows as ``::ffff:a.b.c.d``: its IPv4 form,
    so that networks, bans and connection lookups see one address (sending maps it back)."""
    if host[:7].lower() == _MAPPED and "." in host:
        return host[7:]
    return host


class StreamOwner(TypingProtocol):
    """What a :class:`SIPStreamProtocol` reports to (the transport manager)."""

    def stream_connected(self, proto: SIPStreamProtocol) -> None:
        """The connection is up: register it for reuse."""

    def stream_message(self, proto: SIPStreamProtocol, data: bytes) -> None:
        """One whole framed SIP message arrived."""

    def stream_framing_error(
        self, proto: SIPStreamProtocol, error: ParseError, data: bytes
    ) -> None:
        """The stream cannot be framed any more; ``data`` starts with the message that broke it.

        The protocol closes the connection right after this returns.
        """

    def stream_lost(self, proto: SIPStreamProtocol, reason: Failure) -> None:
        """The connection is gone: forget it."""

    def stream_too_slow(self, proto: SIPStreamProtocol) -> None:
        """The peer did not finish a message within the message timeout; the protocol aborts
        the connection right after this returns."""

    def keepalive_counts(self, proto: SIPStreamProtocol) -> bool:
        """Does a CRLF keepalive from the peer count as traffic for the idle timeout?
        (An owner without this method: always.)"""


class SIPStreamProtocol(Protocol):
    """
    One SIP connection, accepted or opened by us.

    :ivar side: the listener side (``"inside"``/``"outside"``) this connection belongs to.
    :ivar outgoing: ``True`` when we opened it.
    :ivar peer: ``(host, port)`` of the other end, known once connected.
    :ivar local: ``(host, port)`` of our end, known once connected.
    """

    log = Logger()
    #: the transport name messages of this connection carry in their Source ("TLS" for TLS)
    kind = "TCP"

    def __init__(
        self,
        owner: StreamOwner,
        clock: IReactorTime,
        side: str,
        *,
        outgoing: bool,
        idle_timeout: float | None,
        limits: Limits = DEFAULT_LIMITS,
        message_timeout: float | None = None,
    ) -> None:
        self.owner = owner
        self.clock = clock
        self.side = side
        self.outgoing = outgoing
        self.idle_timeout = idle_timeout
        self.framer = StreamFramer(limits)
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.connected_ = False
        self.closing = False
        self._idle: IDelayedCall | None = None
        self.message_timeout = message_timeout or None
        self._partial: IDelayedCall | None = None
        #: the source IP the owner counted this connection for (the owner's bookkeeping)
        self.admitted: str | None = None

    # -- twisted callbacks ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        peer = self.transport.getPeer()
        host = self.transport.getHost()
        self.peer = (unmapped(getattr(peer, "host", "")), getattr(peer, "port", 0))
        self.local = (unmapped(getattr(host, "host", "")), getattr(host, "port", 0))
        self.connected_ = True
        self._arm_idle()
        self.owner.stream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            items = self.framer.feed(data)
        except ParseError as e:
            # The framer keeps the unframed rest, which starts with the message that broke it.
            pending = getattr(self.framer, "_buf", None)
            self._framing_failed(e, bytes(pending) if pending else data)
            return
        if self.message_timeout is not None:
            self._watch_partial()
        if self.framer.buffered or not all(isinstance(i, KeepAlive) for i in items) or \
                self._keepalive_counts():
            self._arm_idle()
        for item in items:
            if self.closing:
                return
            if isinstance(item, KeepAlive):
                if item is KeepAlive.PING and self.transport is not None:
                    self.transport.write(PONG)  # not traffic of ours: the idle timer stays
                continue
            try:
                self.owner.stream_message(self, item)
            except Exception:
                self.log.failure("dropped a message from {peer}: handler failed", peer=self.peer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        self.closing = True
        self._cancel_idle()
        self._cancel_partial()
        try:
            self.owner.stream_lost(self, reason)
        except Exception:
            self.log.failure("connection bookkeeping failed for {peer}", peer=self.peer)

    # -- API for the owner ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes on the connection; sending counts as activity for the idle timer."""
        if self.transport is None or self.closing:
            raise ConnectionError(f"connection to {self.peer[0]}:{self.peer[1]} is closed")
        self._arm_idle()
        self.transport.write(data)

    def close(self) -> None:
        """Flush what is written, then close."""
        self.closing = True
        self._cancel_idle()
        self._cancel_partial()
        if self.transport is not None:
            self.transport.loseConnection()

    # -- internals --------------------------------------------------------------------------------

    def _keepalive_counts(self) -> bool:
        counts = getattr(self.owner, "keepalive_counts", None)
        return counts is None or bool(counts(self))

    def _framing_failed(self, error: ParseError, data: bytes) -> None:
        self.log.info(
            "closing connection from {peer}: cannot frame the stream ({reason})",
            peer=self.peer,
            reason=error.reason,
        )
        try:
            self.owner.stream_framing_error(self, error, data)
        except Exception:
            self.log.failure("error answer to {peer} failed", peer=self.peer)
        self.close()

    def _arm_idle(self) -> None:
        if self.idle_timeout is None or self.closing:
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.idle_timeout)
        else:
            self._idle = self.clock.callLater(self.idle_timeout, self._timed_out)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _timed_out(self) -> None:
        self._idle = None
        self.log.debug("closing idle connection with {peer}", peer=self.peer)
        self.close()

    def _watch_partial(self) -> None:
        """A started message must be complete within ``message_timeout`` of its first byte."""
        if self.framer.buffered:
            if self._partial is None and not self.closing:
                assert self.message_timeout is not None
                self._partial = self.clock.callLater(self.message_timeout, self._too_slow)
        elif self._partial is not None:
            self._cancel_partial()

    def _cancel_partial(self) -> None:
        if self._partial is not None and self._partial.active():
            self._partial.cancel()
        self._partial = None

    def _too_slow(self) -> None:
        self._partial = None
        self.log.info(
            "closing connection from {peer}: a message took more than {timeout:g} s "
            "({buffered} bytes of it received)",
            peer=self.peer, timeout=self.message_timeout, buffered=self.framer.buffered,
        )
        try:
            report = getattr(self.owner, "stream_too_slow", None)
            if report is not None:
                report(self)
        except Exception:
            self.log.failure("bookkeeping failed for {peer}", peer=self.peer)
        transport = self.transport
        self.close()
        if transport is not None and hasattr(transport, "abortConnection"):
            transport.abortConnection()
