"""The two providers of :class:`~sipproxy.interfaces.IMediaRelay`.

- :class:`LocalRelay`: the built-in relay engine in this process (no UDP, no bencode between
  them; the very same NG command code runs, so behaviour is identical to the remote case).
- :class:`NGRelay`: any NG server, through an :class:`~sipproxy.media.ng.NGClient`: the
  built-in relay in its own process (``twistd sipproxy-relay``) or a real rtpengine. NG has no
  way for the relay to tell the proxy that a call timed out, so ``NGRelay`` asks: every
  ``poll_interval`` it queries the calls it set up, and one the relay no longer knows is
  reported to the end observers as "gone" (rtpengine too deletes a call when its media times
  out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.interfaces import IMediaRelay
from sipproxy.media.engine import RelayEngine
from sipproxy.media.ng import NGClient, NGCommands, NGError, NGTimeout, to_text

__all__ = ["LocalRelay", "NGRelay", "RelayedSdp"]

_log = Logger(namespace="sipproxy.media.backends")

EndObserver = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class RelayedSdp:
    """The SDP the relay rewrote, to forward in place of the original; and its warning."""

    sdp: bytes
    warning: str | None = None


def _relayed(reply: dict[str, Any]) -> RelayedSdp:
    sdp = reply.get("sdp")
    if not isinstance(sdp, str):
        raise NGError("reply without sdp")
    warning = reply.get("warning")
    return RelayedSdp(
        sdp.encode("utf-8", "surrogateescape"), warning if isinstance(warning, str) else None
    )


def _stats(reply: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in reply.items() if k not in ("result", "warning")}


class _NGDictRelay(ABC):
    """IMediaRelay in terms of NG request dicts; subclasses send them somewhere."""

    @abstractmethod
    def _command(self, message: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        """Send one NG command; the Deferred fires with the reply dict."""

    def ping(self) -> defer.Deferred[None]:
        return self._command({"command": "ping"}).addCallback(lambda _: None)

    def offer(
        self,
        call_id: str,
        from_tag: str,
        sdp: bytes,
        to_tag: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[RelayedSdp]:
        message = {**(options or {}), "command": "offer", "call-id": call_id}
        message.update({"from-tag": from_tag, "sdp": sdp})
        if to_tag:
            message["to-tag"] = to_tag
        return self._command(message).addCallback(_relayed)

    def answer(
        self,
        call_id: str,
        from_tag: str,
        to_tag: str,
        sdp: bytes,
        options: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[RelayedSdp]:
        message = {**(options or {}), "command": "answer", "call-id": call_id}
        message.update({"from-tag": from_tag, "to-tag": to_tag, "sdp": sdp})
        return self._command(message).addCallback(_relayed)

    def delete(
        self,
        call_id: str,
        from_tag: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> defer.Deferred[dict[str, Any]]:
        message: dict[str, Any] = {**(options or {}), "command": "delete", "call-id": call_id}
        if from_tag:
            message["from-tag"] = from_tag
        return self._command(message).addCallback(_stats)

    def query(self, call_id: str) -> defer.Deferred[dict[str, Any]]:
        return self._command({"command": "query", "call-id": call_id}).addCallback(_stats)


@implementer(IMediaRelay)
class LocalRelay(_NGDictRelay):
    """The built-in relay in this process: make the engine with
    ``sipproxy.media.service.makeRelayService(config)`` and pass ``service.engine``."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine
        self.commands = NGCommands(engine)

    def _command(self, message: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        reply = self.commands.handle(to_text(message))
        if reply.get("result") == "error":
            return defer.fail(NGError(str(reply.get("error-reason"))))
        return defer.succeed(reply)

    def add_end_observer(self, observer: EndObserver) -> None:
        self.engine.timeout_observers.append(observer)


@implementer(IMediaRelay)
class NGRelay(_NGDictRelay):
    """A relay reached over NG. ``client`` must be listening (``client.start()``); call
    :meth:`start` to watch for calls the relay ended, :meth:`stop` to stop watching."""

    def __init__(self, client: NGClient, clock: Any = None, poll_interval: float = 10.0) -> None:
        self.client = client
        self.clock = clock if clock is not None else client.clock
        self.poll_interval = poll_interval
        self.calls: set[str] = set()
        self._observers: list[EndObserver] = []
        self._loop: LoopingCall | None = None

    def _command(self, message: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        d = self.client.command(message)
        command, call_id = message.get("command"), message.get("call-id")
        if command in ("offer", "answer") and isinstance(call_id, str):
            d.addCallback(self._remember, call_id)
        elif command == "delete" and isinstance(call_id, str):
            self.calls.discard(call_id)
        return d

    def _remember(self, reply: dict[str, Any], call_id: str) -> dict[str, Any]:
        self.calls.add(call_id)
        return reply

    def add_end_observer(self, observer: EndObserver) -> None:
        self._observers.append(observer)

    def start(self) -> None:
        if self._loop is None:
            self._loop = LoopingCall(self.poll)
            self._loop.clock = self.clock
            self._loop.start(self.poll_interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def poll(self) -> defer.Deferred[None]:
        """Query every known call once; report those the relay no longer has."""
        waits = []
        for call_id in sorted(self.calls):
            d = self.client.command({"command": "query", "call-id": call_id})
            d.addCallbacks(lambda _: None, self._query_failed, errbackArgs=(call_id,))
            waits.append(d)
        return defer.gatherResults(waits).addCallback(lambda _: None)

    def _query_failed(self, failure: Any, call_id: str) -> None:
        if failure.check(NGTimeout) or not failure.check(NGError):
            return  # the relay is unreachable: that says nothing about this call
        if call_id not in self.calls:
            return
        self.calls.discard(call_id)
        for observer in list(self._observers):
            try:
                observer(call_id, "gone")
            except Exception:
                _log.failure("media relay: end observer failed")
