"""Dialogs the proxy record-routed, so per-call state lives and dies with the call."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Dialog", "DialogTracker"]

DialogKey = tuple[str, str, str]


@dataclass(eq=False)
class Dialog:
    """One call leg pair through the proxy. ``data`` is for plugins (media sessions, NAT)."""

    call_id: str
    caller_tag: str
    callee_tag: str
    created: float
    caller_side: str = ""
    callee_side: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    ended: bool = False
    _timer: IDelayedCall | None = None

    @property
    def key(self) -> DialogKey:
        return (self.call_id, self.caller_tag, self.callee_tag)


class DialogTracker:
    """Finds dialogs by Call-ID and tags (either direction), ends them on BYE or after
    ``max_lifetime`` seconds (a call whose BYE was lost must not hold resources forever)."""

    def __init__(
        self,
        clock: IReactorTime,
        on_end: Callable[[Dialog, str], None],
        max_lifetime: float = 12 * 3600.0,
    ) -> None:
        self.clock = clock
        self.on_end = on_end
        self.max_lifetime = max_lifetime
        self._dialogs: dict[DialogKey, Dialog] = {}

    def __len__(self) -> int:
        return len(self._dialogs)

    def find(self, call_id: str, tag_a: str | None, tag_b: str | None) -> Dialog | None:
        if not tag_a or not tag_b:
            return None
        d = self._dialogs.get((call_id, tag_a, tag_b))
        if d is None:
            d = self._dialogs.get((call_id, tag_b, tag_a))
        return d

    def establish(
        self, call_id: str, caller_tag: str, callee_tag: str, caller_side: str = "",
        callee_side: str = "",
    ) -> tuple[Dialog, bool]:
        """The dialog for these tags, and whether it is new (2xx retransmissions find it)."""
        existing = self.find(call_id, caller_tag, callee_tag)
        if existing is not None:
            return existing, False
        dialog = Dialog(call_id, caller_tag, callee_tag, self.clock.seconds(), caller_side,
                        callee_side)
        self._dialogs[dialog.key] = dialog
        dialog._timer = self.clock.callLater(self.max_lifetime, self.end, dialog, "timeout")
        return dialog, True

    def end(self, dialog: Dialog, reason: str) -> None:
        if dialog.ended:
            return
        dialog.ended = True
        self._dialogs.pop(dialog.key, None)
        if dialog._timer is not None and dialog._timer.active():
            dialog._timer.cancel()
        dialog._timer = None
        self.on_end(dialog, reason)

    def end_all(self, reason: str = "shutdown") -> None:
        for dialog in list(self._dialogs.values()):
            self.end(dialog, reason)
