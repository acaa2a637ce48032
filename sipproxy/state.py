"""State that survives a restart: the default store (:class:`MemoryStateStore`, which keeps
nothing), the listener that writes bindings to a durable store (:class:`BindingRecorder`), and
``[registrar] store`` turned into a store (:func:`open_store`).

The stores themselves provide :class:`sipproxy.interfaces.IStateStore`. With the memory store
nobody writes anything: :func:`restore_bindings` attaches no listener, the ``nat`` plugin and
the flood guard skip their saves (``durable`` is False), so REGISTER handling does exactly
the work it did before there were stores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from sipproxy.config import MEMORY_STORE, SQLITE_STORE
from sipproxy.interfaces import IStateStore, SavedBan, SavedToken
from sipproxy.location import Binding, ILocationListener, LocationService
from sipproxy.message import Source
from sipproxy.settings import ConfigError, one_line

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "BindingRecorder",
    "MemoryStateStore",
    "binding_from_dict",
    "binding_to_dict",
    "open_store",
    "restore_bindings",
]

_STORE_KEY: Final = "registrar.store"


@implementer(IStateStore)
class MemoryStateStore:
    """The default store: nothing is kept, nothing comes back after a restart."""

    durable = False

    def saved_bindings(self, now: float) -> list[Binding]:
        return []

    def saved_tokens(self, now: float) -> list[SavedToken]:
        return []

    def saved_bans(self, now: float) -> list[SavedBan]:
        return []

    def save_binding(self, binding: Binding) -> Deferred[None]:
        return succeed(None)

    def delete_binding(self, aor: str, contact: str) -> Deferred[None]:
        return succeed(None)

    def save_token(self, token: SavedToken) -> Deferred[None]:
        return succeed(None)

    def delete_token(self, token: str) -> Deferred[None]:
        return succeed(None)

    def save_ban(self, ban: SavedBan) -> Deferred[None]:
        return succeed(None)

    def delete_ban(self, host: str) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(ILocationListener)
class BindingRecorder:
    """Writes every binding change of the location service to a durable store."""

    def __init__(self, store: IStateStore) -> None:
        self.store = store

    def binding_added(self, binding: Binding, previous: Binding | None) -> None:
        if previous is not None and previous.contact != binding.contact:
            # the same URI spelled otherwise (RFC 3261 19.1.4): the old row goes
            self.store.delete_binding(previous.aor, previous.contact)
        self.store.save_binding(binding)

    def binding_removed(self, binding: Binding, reason: str) -> None:
        self.store.delete_binding(binding.aor, binding.contact)


def restore_bindings(location: LocationService, store: IStateStore) -> int:
    """Put the bindings ``store`` saved (and still valid) back into ``location``, telling its
    listeners as for a REGISTER, then record every later change in ``store`` (a durable one
    only). Returns how many came back."""
    if not store.durable:
        return 0
    restored = store.saved_bindings(location.now())
    for binding in restored:
        location.add_or_update(binding)
    location.add_listener(BindingRecorder(store))
    return len(restored)


def binding_to_dict(binding: Binding) -> dict[str, Any]:
    """What a store keeps of ``binding`` besides its key and expiry, as JSON-ready values
    (``extra``, the plugins' scratch space, is not kept)."""
    source = binding.source
    return {
        "q": binding.q, "call_id": binding.call_id, "cseq": binding.cseq,
        "source": None if source is None else [
            source.transport, source.host, source.port, source.local_host, source.local_port,
            source.side],
        "path": list(binding.path), "instance": binding.instance, "reg_id": binding.reg_id,
        "user_agent": binding.user_agent,
    }


def binding_from_dict(aor: str, contact: str, expires_at: float, data: dict[str, Any]) -> Binding:
    """The binding :func:`binding_to_dict` made ``data`` of; KeyError or TypeError when
    ``data`` is not such a dict."""
    source = data["source"]
    return Binding(
        aor=aor, contact=contact, expires_at=expires_at, q=float(data["q"]),
        call_id=str(data["call_id"]), cseq=int(data["cseq"]),
        source=None if source is None else Source(
            str(source[0]), str(source[1]), int(source[2]), str(source[3]), int(source[4]),
            str(source[5])),
        path=tuple(str(p) for p in data["path"]), instance=data["instance"],
        reg_id=data["reg_id"], user_agent=data["user_agent"],
    )


def open_store(spec: str, reactor: IReactorTime) -> IStateStore:
    """The store ``spec`` (a valid ``[registrar] store``) names, opened and read: an SQLite file
    is created if missing. Blocks while it reads: call it before the reactor runs. A file that
    cannot be opened or read is a :class:`ConfigError` naming ``registrar.store``."""
    if spec == MEMORY_STORE:
        return MemoryStateStore()
    from sipproxy.sqlite_state import SqliteStateStore, StateFileError

    path = spec[len(SQLITE_STORE):]
    try:
        return SqliteStateStore(path, reactor, reactor.seconds())
    except StateFileError as e:
        raise ConfigError.for_key(_STORE_KEY, one_line(str(e))) from None
