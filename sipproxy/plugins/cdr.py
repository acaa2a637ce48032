"""Call records: one JSON line per call attempt, appended to a file as each call ends.

A call attempt is an initial INVITE (no To tag) the proxy forwards or answers, answered or
not. When it ends, the ``cdr`` plugin appends one line of JSON to ``[cdr] file``::

    {"call_id_inside": "a84b4c76e66710", "call_id_outside": "a84b4c76e66710",
     "from": "sip:201@lan.example", "to": "sip:+4930123@lan.example",
     "start": "2026-12-05T17:20:01.120Z", "answer": "2026-12-05T17:20:04.310Z",
     "end": "2026-12-05T17:21:10.002Z", "duration": 65.692, "code": 200,
     "hangup_by": "callee", "hangup_reason": "BYE",
     "media": {"caller_to_callee": {"packets": 3284, "bytes": 564848, "lost": 0},
               "callee_to_caller": {"packets": 3281, "bytes": 564332, "lost": 2}}}

- ``call_id_inside``/``call_id_outside``: the Call-ID on the messages of that side of the
  proxy: the caller's as its INVITE carried it, the callee's as its responses carried it;
  ``null`` for a side the call never crossed (a call between two phones inside) or that never
  answered (the proxy's own 408).
- ``start``: the INVITE arrived; ``answer``: the 2xx (``null``: never answered); ``end``: the
  final response (unanswered) or the dialog's end; all ISO 8601, UTC. ``duration``: seconds
  from ``answer`` to ``end`` (0 when unanswered).
- ``code``: the final response the caller got (a 2xx for an answered call).
- ``hangup_by``/``hangup_reason``: ``caller``/``CANCEL``, ``caller`` or ``callee``/``BYE``,
  ``callee``/``"486 Busy Here"`` (its error response), ``proxy``/``timeout`` (no answer:
  Timer C or no response at all; or the dialog outlived its maximum lifetime, or the media
  relay ended it for silent media), ``proxy``/``shutdown``, ``proxy``/``"403 Relaying
  denied"`` (an answer of the proxy or of a plugin).
- ``media``: when the ``media`` plugin relayed the answered call, the relay's final counters per
  direction (what it received from each party and sent on, and ``lost``: RTP packets lost on
  the way to it by sequence number, ``null`` where unknown: an NG relay that does not say, or
  the built-in relay's kernel fast path forwarded them); ``null`` otherwise (also when the
  relay ended the call by itself: its counters went with it).

Writing is one small append (and flush) per call on the reactor thread: that is short enough
not to hold up the reactor. ``SIGHUP`` makes the plugin reopen the file (after logrotate moved
it away). INVITEs the core refuses before any plugin runs (malformed, looping, too many hops,
over the flood limits) are not call attempts and not recorded.

Place ``cdr`` anywhere in ``[plugins] enabled``; first is best: it then also sees the INVITEs a
later plugin answers in ``request_received`` (it records those too, from the answer, but their
``start`` is then the answer's time).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from zope.interface import implementer

from sipproxy.context import Branch, RequestContext
from sipproxy.dialogs import Dialog
from sipproxy.interfaces import MEDIA_STATS, IPluginFactory, IProxyCore
from sipproxy.logs import iso_utc
from sipproxy.message import Response
from sipproxy.pipeline import Plugin
from sipproxy.settings import Section, read_section, setting

__all__ = [
    "CallRecord",
    "CdrFactory",
    "CdrPlugin",
    "CdrSettings",
    "factory",
    "media_counters",
]

_log = Logger(namespace="sipproxy.plugins.cdr")

#: ``ctx.data`` and ``dialog.data`` key of the attempt's :class:`CallRecord`
RECORD = "cdr"
#: seconds a record waits for the relay's final counters before it is written without them
MEDIA_WAIT = 10.0


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else iso_utc(seconds)


@dataclass(eq=False)
class CallRecord:
    """What the plugin knows of one call attempt; :meth:`as_json` is its line."""

    #: (Call-ID, caller's tag): what the attempt's dialogs find it by
    key: tuple[str, str]
    start: float
    from_uri: str
    to_uri: str
    #: the Call-ID by side ("inside", "outside") of the proxy
    call_ids: dict[str, str]
    answer: float | None = None
    #: set when the attempt ended (its final response, or its last dialog's end)
    end: float | None = None
    code: int | None = None
    hangup_by: str | None = None
    hangup_reason: str | None = None
    #: the party that sent the last BYE in the call ("caller" or "callee")
    bye_from: str | None = None
    #: dialogs the attempt set up that have not ended yet
    dialogs: int = 0
    media: dict[str, dict[str, int | None]] | None = None
    written: bool = False

    def as_json(self) -> str:
        """The record as one line of JSON (no newline)."""
        answered, end = self.answer, self.end
        duration = end - answered if answered is not None and end is not None else 0.0
        return json.dumps({
            "call_id_inside": self.call_ids.get("inside"),
            "call_id_outside": self.call_ids.get("outside"),
            "from": self.from_uri,
            "to": self.to_uri,
            "start": _iso(self.start),
            "answer": _iso(answered),
            "end": _iso(end),
            "duration": round(max(0.0, duration), 3),
            "code": self.code,
            "hangup_by": self.hangup_by,
            "hangup_reason": self.hangup_reason,
            "media": self.media,
        }, ensure_ascii=False, separators=(",", ":"))


def media_counters(stats: dict[str, Any], caller_tag: str,
                   callee_tag: str) -> dict[str, dict[str, int | None]] | None:
    """The relay's counters (its ``query`` reply) per direction: what it received from each
    party's streams (RTP and RTCP) and sent on, and the RTP packets lost on the way to it
    (``lost``: the streams' ``packets lost``, which the built-in relay gives where it counted
    them; None when an RTP stream has none). None when the reply names neither party."""
    tags = stats.get("tags")
    if not isinstance(tags, dict) or (caller_tag not in tags and callee_tag not in tags):
        return None

    def received_from(tag: str) -> dict[str, int | None]:
        packets = size = lost = 0
        known = unknown = False
        party = tags.get(tag)
        for media in party.get("medias", []) if isinstance(party, dict) else []:
            for stream in media.get("streams", []):
                counters = stream.get("stats", {})
                packets += int(counters.get("packets", 0))
                size += int(counters.get("bytes", 0))
                if "RTCP" not in stream.get("flags", ()):
                    n = counters.get("packets lost")
                    known, unknown = known or n is not None, unknown or n is None
                    lost += int(n or 0)
        return {"packets": packets, "bytes": size, "lost": lost if known and not unknown else None}

    return {"caller_to_callee": received_from(caller_tag),
            "callee_to_caller": received_from(callee_tag)}


class CdrPlugin(Plugin, Service):
    """The ``cdr`` plugin (see the module docstring): call records appended to ``path``."""

    name = "cdr"

    def __init__(self, core: IProxyCore, path: str) -> None:
        self.core = core
        self.clock = core.clock
        self.path = path
        self._file: IO[str] | None = None
        #: attempts not written yet, by (Call-ID, caller's tag): their dialogs find them
        self._open: dict[tuple[str, str], CallRecord] = {}
        #: records whose last dialog ended, until the relay's counters are asked for
        self._ending: dict[CallRecord, Dialog] = {}
        #: waits for the relay's final counters (each at most MEDIA_WAIT)
        self._waiting: set[Deferred[None]] = set()
        self._previous_handler: Any = None
        self.reopen()

    # -- the file --------------------------------------------------------------------------------
    def reopen(self) -> None:
        """Close the file and open ``path`` anew, appending (made if logrotate moved it)."""
        old, self._file = self._file, None
        if old is not None:
            old.close()
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, record: CallRecord) -> None:
        """One small append and flush: short enough for the reactor thread."""
        record.written = True
        try:
            if self._file is None:
                self.reopen()
            assert self._file is not None
            self._file.write(record.as_json() + "\n")
            self._file.flush()
        except OSError as e:
            self._failed("write to", e)

    def _failed(self, what: str, error: OSError) -> None:
        _log.error("cdr: cannot {what} {path}: {error}", what=what, path=self.path,
                   error=error.strerror or str(error), plugin=self.name)

    def _reopen_after_hangup(self) -> None:
        try:
            self.reopen()
        except OSError as e:
            self._failed("reopen", e)  # the next record tries again

    def _hangup(self, signum: int, frame: Any) -> None:
        """SIGHUP: reopen the file in the reactor thread, then whatever handled it before."""
        self.core.reactor.callFromThread(self._reopen_after_hangup)
        previous = self._previous_handler
        if callable(previous):
            previous(signum, frame)

    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        super().stopService()
        if signal.getsignal(signal.SIGHUP) == self._hangup:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)
        # the proxy ended every dialog first: their records wait for the relay's counters (at
        # most MEDIA_WAIT); the attempts still ringing end here
        for record, dialog in list(self._ending.items()):
            self._count_media(record, dialog)
        for record in list(self._open.values()):
            if record.end is None:
                self._finish(record, None, "proxy", "shutdown")
        return DeferredList(list(self._waiting)).addCallback(self._close_file)

    def _close_file(self, _: object) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- attempts --------------------------------------------------------------------------------
    def _record(self, ctx: RequestContext) -> CallRecord:
        record: CallRecord | None = ctx.data.get(RECORD)
        if record is None:
            request = ctx.request
            source = request.source
            side = source.side if source is not None and source.side else "inside"
            record = CallRecord((request.call_id, request.from_.tag or ""), self.clock.seconds(),
                                str(request.from_.uri), str(request.to.uri),
                                {side: request.call_id})
            ctx.data[RECORD] = record
            self._open[record.key] = record
        return record

    def _finish(self, record: CallRecord, code: int | None, by: str | None,
                reason: str | None) -> None:
        """The attempt is over: write its line (once)."""
        if self._open.get(record.key) is record:
            del self._open[record.key]
        if record.written:
            return
        if record.end is None:
            record.end = self.clock.seconds()
        if code is not None:
            record.code = code
        record.hangup_by, record.hangup_reason = by, reason
        self._write(record)

    @staticmethod
    def _is_attempt(ctx: RequestContext) -> bool:
        request = ctx.request
        return request.method == "INVITE" and not request.to.tag

    def request_received(self, ctx: RequestContext) -> None:
        request = ctx.request
        dialog = ctx.dialog
        if request.method == "BYE" and dialog is not None:
            record: CallRecord | None = dialog.data.get(RECORD)
            if record is not None:
                record.bye_from = "caller" if request.from_.tag == dialog.caller_tag \
                    else "callee"
            return None
        tx = ctx.server_transaction
        if tx is None or not self._is_attempt(ctx):
            return None
        record = self._record(ctx)
        # the core answers some requests itself, with no hook (a user not registered: 480):
        # at once, after the hooks; anything else missed shows when the transaction ends
        self.clock.callLater(0, self._answered_without_hooks, ctx, record)
        tx.when_terminated().addCallback(
            lambda _: self._answered_without_hooks(ctx, record))
        return None

    def _answered_without_hooks(self, ctx: RequestContext, record: CallRecord) -> None:
        if record.written or record.dialogs or record.end is not None or not ctx.final_sent:
            return
        if record.answer is not None:  # a 2xx that set up no dialog (it had no tags)
            self._finish(record, None, None, None)
            return
        tx = ctx.server_transaction
        response = tx.last_response if tx is not None else None
        if response is not None and response.status >= 200:
            self._ended_unanswered(ctx, record, response)

    def response_received(self, ctx: RequestContext, branch: Branch, response: Response) -> None:
        source = response.source
        if source is not None and source.side and self._is_attempt(ctx):
            self._record(ctx).call_ids[source.side] = response.call_id
        return None

    def response_forwarding(self, ctx: RequestContext, response: Response) -> None:
        status = response.status
        if status < 200 or not self._is_attempt(ctx):
            return None
        record = self._record(ctx)
        if status < 300:
            if record.answer is None:
                record.answer = self.clock.seconds()
            record.code = status
        elif record.answer is None:
            self._ended_unanswered(ctx, record, response)
        return None

    def _ended_unanswered(self, ctx: RequestContext, record: CallRecord,
                          response: Response) -> None:
        status = response.status
        ours = response.source is None  # made by the proxy or a plugin
        if ctx.cancelled:
            by, why = "caller", "CANCEL"
        elif (status == 408 and ours) or (
                status == 487 and any(branch.cancelled for branch in ctx.branches)):
            by, why = "proxy", "timeout"  # no answer at all, or Timer C cancelled the branch
        else:
            by, why = ("proxy" if ours else "callee"), f"{status} {response.reason}".strip()
        self._finish(record, status, by, why)

    # -- dialogs ---------------------------------------------------------------------------------
    def dialog_established(self, dialog: Dialog) -> None:
        record = self._open.get((dialog.call_id, dialog.caller_tag))
        if record is None:
            return
        dialog.data[RECORD] = record
        record.dialogs += 1
        if record.answer is None:
            record.answer = self.clock.seconds()

    def dialog_ended(self, dialog: Dialog, reason: str) -> None:
        record: CallRecord | None = dialog.data.get(RECORD)
        if record is None or record.written:
            return
        record.dialogs -= 1
        if reason == "bye":
            record.hangup_by, record.hangup_reason = record.bye_from, "BYE"
        else:
            record.hangup_by, record.hangup_reason = "proxy", reason
        if record.dialogs > 0:
            return
        record.end = self.clock.seconds()
        # after every plugin's dialog_ended: media hands over its final counters there
        self._ending[record] = dialog
        self.clock.callLater(0, self._count_media, record, dialog)

    def _count_media(self, record: CallRecord, dialog: Dialog) -> None:
        if self._ending.pop(record, None) is None:
            return  # done at shutdown already
        stats: Deferred[dict[str, Any]] | None = dialog.data.get(MEDIA_STATS)
        if stats is None or record.written:
            self._finish(record, None, record.hangup_by, record.hangup_reason)
            return
        waiting: Deferred[None] = Deferred()
        self._waiting.add(waiting)

        def counted(result: Any) -> Any:
            if isinstance(result, dict):
                record.media = media_counters(result, dialog.caller_tag, dialog.callee_tag)
            if not waiting.called:
                waiting.callback(None)
            return result

        def write(_: object) -> None:
            self._waiting.discard(waiting)
            self._finish(record, None, record.hangup_by, record.hangup_reason)

        waiting.addTimeout(MEDIA_WAIT, self.clock)
        waiting.addErrback(lambda _: None)  # timed out: written without them
        waiting.addCallback(write)
        stats.addBoth(counted)


@dataclass(frozen=True, slots=True)
class CdrSettings:
    """``[cdr]``: where the call records go."""

    file: str = setting(doc="The file call records are appended to, one JSON line per call"
                            " attempt (reopened on SIGHUP).")


@implementer(IPluginFactory)
class CdrFactory:
    """Builds the ``cdr`` plugin from ``[cdr]``."""

    name = "cdr"
    settings = CdrSettings

    def build(self, core: IProxyCore, section: Section) -> CdrPlugin:
        s = read_section(CdrSettings, section)
        try:
            return CdrPlugin(core, s.file)
        except OSError as e:
            raise section.error("file", f"cannot open {s.file!r}: {e.strerror or e}") from None


factory = CdrFactory()
