"""Dialogs the proxy record-routed, so per-call state lives and dies with the call, and
what the proxy saw of each party (so the ``acl`` plugin can tell where an in-dialog request
may go)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from sipproxy.uri import URI

if TYPE_CHECKING:
    from sipproxy.flows import Flow

__all__ = ["Address", "Dialog", "DialogTracker", "Party", "uri_address"]

DialogKey = tuple[str, str, str]
_T = TypeVar("_T")
#: (host in lower case, port): where a URI sends a request, or where a message came from
Address = tuple[str, int]
#: at most this many addresses of each kind per party (target refreshes add some; a peer
#: that keeps changing its Contact pushes its oldest ones out)
MAX_ADDRESSES = 8


def uri_address(uri: URI) -> Address:
    """Where a request to ``uri`` goes: its ``maddr`` or host, and its port (or the default)."""
    host = uri.get_param("maddr") or uri.host
    default = 5061 if uri.secure or (uri.transport or "").lower() == "tls" else 5060
    return host.lower(), uri.port if uri.port is not None else default


@dataclass(eq=False, slots=True)
class Party:
    """One end of a dialog as the proxy saw it (for the ``acl`` plugin).

    ``hosts``: the addresses its messages came from (the dialog-creating request or 2xx, and
    the responses to in-dialog requests sent to it). ``targets``: where requests to it may go:
    its remote target (the Contact it sent, also after a target refresh), the address the
    proxy sent its request to or got it from. ``routes``: the Record-Route entries on its side
    of the proxy (the route set its peer's requests follow from the proxy on)."""

    hosts: dict[str, None] = field(default_factory=dict)
    targets: dict[Address, None] = field(default_factory=dict)
    routes: dict[Address, None] = field(default_factory=dict)

    def learn(
        self, hosts: Iterable[str] = (), targets: Iterable[Address] = (),
        routes: Iterable[Address] = (),
    ) -> None:
        _remember(self.hosts, hosts)
        _remember(self.targets, targets)
        _remember(self.routes, routes)


def _remember(table: dict[_T, None], items: Iterable[_T]) -> None:
    """Add ``items`` as the newest entries of ``table`` (an ordered set), keeping the newest
    ``MAX_ADDRESSES``."""
    for item in items:
        table.pop(item, None)
        table[item] = None
        if len(table) > MAX_ADDRESSES:
            del table[next(iter(table))]


@dataclass(eq=False, slots=True)
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
    #: the source IP the flood guard counts this dialog for (None: not counted)
    flood_source: str | None = None
    #: the TCP/TLS connections the dialog was set up over (see :mod:`sipproxy.flows`)
    flows: list[Flow] = field(default_factory=list)
    #: made when first read (most dialogs are never asked)
    _caller: Party | None = None
    _callee: Party | None = None
    #: the From and To URIs of the INVITE that set the dialog up (for the admin status page)
    from_uri: str = ""
    to_uri: str = ""
    #: (learn, its arguments...): see learn_later
    _pending: tuple[Any, ...] | None = field(default=None, repr=False)

    def __init__(
        self, call_id: str, caller_tag: str, callee_tag: str, created: float,
        caller_side: str = "", callee_side: str = "", data: dict[str, Any] | None = None,
        ended: bool = False, flood_source: str | None = None, flows: list[Flow] | None = None,
        _caller: Party | None = None, _callee: Party | None = None, from_uri: str = "",
        to_uri: str = "", _pending: tuple[Any, ...] | None = None,
    ) -> None:
        # written out, not the dataclass's: compiled (mypyc), the generated one stays Python
        self.call_id = call_id
        self.caller_tag = caller_tag
        self.callee_tag = callee_tag
        self.created = created
        self.caller_side = caller_side
        self.callee_side = callee_side
        self.data = {} if data is None else data
        self.ended = ended
        self.flood_source = flood_source
        self.flows = [] if flows is None else flows
        self._caller = _caller
        self._callee = _callee
        self.from_uri = from_uri
        self.to_uri = to_uri
        self._pending = _pending

    @property
    def caller(self) -> Party:
        """What the proxy saw of the party that sent the INVITE."""
        return self._party("_caller")

    @property
    def callee(self) -> Party:
        """What the proxy saw of the party that answered the INVITE."""
        return self._party("_callee")

    def _party(self, slot: str) -> Party:
        if self._pending is not None:
            self._learn_pending()
        party: Party | None = getattr(self, slot)
        if party is None:
            party = Party()
            setattr(self, slot, party)
        return party

    def learn_later(self, learn: Callable[..., None], *args: Any) -> None:
        """Run ``learn(dialog, *args)`` (which teaches :attr:`caller` and :attr:`callee`)
        when either is first read: the messages that set a dialog up are parsed for it only
        if somebody asks (most calls end without anybody asking). One tuple is kept until
        then."""
        self._pending = (learn, *args)

    def _learn_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0](self, *pending[1:])

    @property
    def key(self) -> DialogKey:
        return (self.call_id, self.caller_tag, self.callee_tag)

    def parties_from(self, host: str) -> list[Party]:
        """The parties whose messages came from ``host`` (none, one, or both)."""
        return [p for p in (self.caller, self.callee) if host in p.hosts]

    def peer_of(self, party: Party) -> Party:
        return self.callee if party is self.caller else self.caller


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
        #: in the order they were set up, which is the order their lifetimes run out
        self._dialogs: dict[DialogKey, Dialog] = {}
        # one call for the oldest dialog's lifetime rather than a DelayedCall per dialog
        # (made and cancelled for nearly every call); ``_due`` is when it was armed for
        self._expiry: IDelayedCall | None = None
        self._due = 0.0

    def __len__(self) -> int:
        return len(self._dialogs)

    def __iter__(self) -> Iterator[Dialog]:
        """The dialogs open now (a copy: ending one while iterating is fine)."""
        return iter(list(self._dialogs.values()))

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
        if self._expiry is None:
            self._arm(dialog.created + self.max_lifetime)
        return dialog, True

    def end(self, dialog: Dialog, reason: str) -> None:
        if dialog.ended:
            return
        dialog.ended = True
        self._dialogs.pop(dialog.key, None)
        expiry = self._expiry
        if not self._dialogs and expiry is not None:  # none left: nothing stays scheduled
            if expiry.active():
                expiry.cancel()
            self._expiry = None
        self.on_end(dialog, reason)

    def _arm(self, due: float) -> None:
        self._due = due
        self._expiry = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._expire)

    def _expire(self) -> None:
        """End the dialogs whose lifetime ran out, the oldest first; armed again for the
        next oldest (the one it was armed for may have ended earlier)."""
        self._expiry = None
        limit = max(self.clock.seconds(), self._due)  # not late by a rounding of the delay
        while self._dialogs:
            dialog = next(iter(self._dialogs.values()))
            due = dialog.created + self.max_lifetime
            if due > limit:
                if self._expiry is None:  # ending one may have set another up
                    self._arm(due)
                return
            self.end(dialog, "timeout")

    def end_all(self, reason: str = "shutdown") -> None:
        for dialog in list(self._dialogs.values()):
            self.end(dialog, reason)
