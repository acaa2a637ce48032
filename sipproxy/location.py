"""The location service: which contacts an address-of-record is reachable at, and until when.

The registrar writes bindings; the proxy reads them to route requests for local users. Storage
sits behind `ILocationStore` so a persistent or shared store can replace the in-memory default
without touching either side. Time lives in `LocationService` (one injected `IReactorTime`), not
in stores: a store only compares `expires_at` against the `now` it is handed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

if TYPE_CHECKING:
    from sipproxy.message import Source

__all__ = [
    "Binding",
    "ILocationListener",
    "ILocationStore",
    "LocationService",
    "MemoryLocationStore",
    "RemovalReason",
]

RemovalReason = Literal["expired", "unregistered", "replaced"]


@dataclass(slots=True, eq=False)
class Binding:
    """One contact of one AOR. Slotted and flat: a registrar holds tens of thousands of them.

    Identity is (aor, contact): `eq=False` keeps comparison by object, since two bindings with
    equal fields but different refresh times are not "the same" for listeners.
    """

    aor: str  # canonical "sip:user@domain" (see sipproxy.registrar.aor_of)
    contact: str  # the Contact URI as the UA sent it, without the header's params
    expires_at: float  # absolute, in the LocationService clock's seconds
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    source: Source | None = None  # where the REGISTER came from (NAT traversal needs it)
    path: tuple[str, ...] = ()  # RFC 3327 Path header values, in request order
    instance: str | None = None  # +sip.instance, unquoted (e.g. "<urn:uuid:...>")
    reg_id: int | None = None  # RFC 5626 reg-id
    user_agent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # plugin-owned data

    def remaining(self, now: float) -> float:
        """Seconds left before this binding expires (negative once it has)."""
        return self.expires_at - now


class ILocationStore(Interface):
    """Where bindings are kept. Implementations must not block the reactor.

    Bindings are keyed by (aor, contact) with exact string comparison: deciding that two Contact
    URIs are "the same" (RFC 3261 19.1.4) is the registrar's job, which hands the store the
    string it wants kept. Methods taking `now` hide bindings whose `expires_at <= now`.
    """

    def add_or_update(binding: Binding) -> Binding | None:
        """Store `binding`, replacing the one with the same (aor, contact).

        Returns the replaced binding, or None if the contact was new for that AOR.
        """

    def remove(aor: str, contact: str) -> Binding | None:
        """Remove the binding (aor, contact); return it, or None if there was none."""

    def remove_all(aor: str) -> list[Binding]:
        """Remove every binding of `aor`, expired or not; return them."""

    def lookup(aor: str, now: float) -> list[Binding]:
        """Unexpired bindings of `aor`, highest q first (ties: most recently registered first)."""

    def all_bindings() -> Iterator[Binding]:
        """Every stored binding, expired-but-not-yet-purged ones included, in no order."""

    def expire(now: float) -> list[Binding]:
        """Drop every binding with `expires_at <= now`; return what was dropped."""

    def count() -> int:
        """Number of stored bindings (expired-but-not-yet-purged ones included)."""


class ILocationListener(Interface):
    """Told about binding changes (e.g. the NAT keepalive plugin, to track flows).

    Called synchronously from inside the LocationService; must not raise (errors are logged and
    swallowed) and must not block.
    """

    def binding_added(binding: Binding, previous: Binding | None) -> None:
        """`binding` is now stored; `previous` is the binding it refreshed (same contact)."""

    def binding_removed(binding: Binding, reason: RemovalReason) -> None:
        """`binding` is gone: "expired", "unregistered" (by REGISTER or API) or "replaced"
        (RFC 5626: a new contact with the same +sip.instance and reg-id took its place)."""


@implementer(ILocationStore)
class MemoryLocationStore:
    """The default store: per AOR, a dict of contact to binding (oldest first), lost on
    restart. Adding, refreshing and removing one binding take O(1)."""

    def __init__(self) -> None:
        self._by_aor: dict[str, dict[str, Binding]] = {}
        self._count = 0

    def add_or_update(self, binding: Binding) -> Binding | None:
        bindings = self._by_aor.setdefault(binding.aor, {})
        old = bindings.pop(binding.contact, None)
        bindings[binding.contact] = binding  # (re)inserted last: the newest
        if old is None:
            self._count += 1
        return old

    def remove(self, aor: str, contact: str) -> Binding | None:
        bindings = self._by_aor.get(aor)
        if not bindings:
            return None
        old = bindings.pop(contact, None)
        if old is not None:
            self._count -= 1
            if not bindings:
                del self._by_aor[aor]
        return old

    def remove_all(self, aor: str) -> list[Binding]:
        bindings = list(self._by_aor.pop(aor, {}).values())
        self._count -= len(bindings)
        return bindings

    def lookup(self, aor: str, now: float) -> list[Binding]:
        live = [b for b in self._by_aor.get(aor, {}).values() if b.expires_at > now]
        # Newest last in storage; reverse so a stable sort keeps "newest first" among equal q.
        live.reverse()
        live.sort(key=lambda b: b.q, reverse=True)
        return live

    def all_bindings(self) -> Iterator[Binding]:
        for bindings in list(self._by_aor.values()):
            yield from list(bindings.values())

    def expire(self, now: float) -> list[Binding]:
        gone: list[Binding] = []
        for aor in list(self._by_aor):
            bindings = self._by_aor[aor]
            old = [b for b in bindings.values() if b.expires_at <= now]
            if not old:
                continue
            gone.extend(old)
            for binding in old:
                del bindings[binding.contact]
            if not bindings:
                del self._by_aor[aor]
        self._count -= len(gone)
        return gone

    def count(self) -> int:
        return self._count

    def __len__(self) -> int:
        return self._count


class LocationService(Service):
    """Owns a store, the clock that expires its bindings, and the listeners told about changes.

    Everything that changes bindings goes through here so listeners never miss a change. As a
    Twisted service it runs the periodic purge only while started; `lookup` hides expired
    bindings regardless, so the purge interval only bounds how late listeners hear "expired".
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: ILocationStore | None = None,
        purge_interval: float = 10.0,
    ) -> None:
        if purge_interval <= 0:
            raise ValueError(f"purge_interval must be positive, got {purge_interval!r}")
        self.clock = clock
        self.store: ILocationStore = store if store is not None else MemoryLocationStore()
        self.purge_interval = purge_interval
        self._listeners: list[ILocationListener] = []
        self._purger: LoopingCall | None = None

    # -- service life -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        purger = LoopingCall(self.purge)
        purger.clock = self.clock
        self._purger = purger
        purger.start(self.purge_interval, now=False).addErrback(
            lambda f: self.log.failure("location purge loop died", f)
        )

    def stopService(self) -> None:
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        self._purger = None
        super().stopService()

    # -- listeners ----------------------------------------------------------------------------

    def add_listener(self, listener: ILocationListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ILocationListener) -> None:
        self._listeners.remove(listener)

    def _notify_added(self, binding: Binding, previous: Binding | None) -> None:
        for listener in list(self._listeners):
            try:
                listener.binding_added(binding, previous)
            except Exception:
                self.log.failure("location listener {listener!r} failed", listener=listener)

    def _notify_removed(self, binding: Binding, reason: RemovalReason) -> None:
        for listener in list(self._listeners):
            try:
                listener.binding_removed(binding, reason)
            except Exception:
                self.log.failure("location listener {listener!r} failed", listener=listener)

    # -- reads --------------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.seconds()

    def lookup(self, aor: str) -> list[Binding]:
        """Unexpired bindings of canonical `aor`, highest q first."""
        return self.store.lookup(aor, self.clock.seconds())

    def count(self) -> int:
        return self.store.count()

    # -- writes -------------------------------------------------------------------------------

    def add_or_update(self, binding: Binding, replaces: Binding | None = None) -> Binding | None:
        """Store `binding`; the binding it refreshed (same contact) is returned, not "removed".

        `replaces` names a stored binding of the same AOR whose contact is spelled differently
        but is the same URI (RFC 3261 19.1.4): it is swapped out as a refresh, not a removal.
        A binding that has already expired but was not purged yet counts as gone: it is
        reported "expired" first and `None` is returned, so listeners see a fresh start.
        """
        previous = None
        if replaces is not None and replaces.contact != binding.contact:
            previous = self.store.remove(replaces.aor, replaces.contact)
        previous = self.store.add_or_update(binding) or previous
        if previous is not None and previous.expires_at <= self.clock.seconds():
            self._notify_removed(previous, "expired")
            previous = None
        self._notify_added(binding, previous)
        return previous

    def remove(
        self, aor: str, contact: str, reason: RemovalReason = "unregistered"
    ) -> Binding | None:
        removed = self.store.remove(aor, contact)
        if removed is not None:
            self._notify_removed(removed, self._reason(removed, reason))
        return removed

    def remove_all(self, aor: str, reason: RemovalReason = "unregistered") -> list[Binding]:
        removed = self.store.remove_all(aor)
        for binding in removed:
            self._notify_removed(binding, self._reason(binding, reason))
        return removed

    def purge(self) -> list[Binding]:
        """Drop expired bindings now and tell listeners; the LoopingCall calls this."""
        gone = self.store.expire(self.clock.seconds())
        for binding in gone:
            self._notify_removed(binding, "expired")
        if gone:
            self.log.debug("purged {n} expired bindings", n=len(gone))
        return gone

    def _reason(self, binding: Binding, reason: RemovalReason) -> RemovalReason:
        # A binding that ran out before it was removed expired; saying otherwise would mislead.
        return "expired" if binding.expires_at <= self.clock.seconds() else reason
