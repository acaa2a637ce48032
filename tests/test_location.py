"""The location service: store semantics, clock-driven expiry, listeners, memory per binding."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sipproxy.location import (
    Binding,
    ILocationListener,
    ILocationStore,
    LocationService,
    MemoryLocationStore,
    RemovalReason,
)
from sipproxy.message import Source
from sipproxy.testing import LocationRecorder

AOR = "sip:alice@example.com"


def binding(
    contact: str = "sip:alice@192.0.2.10:5060",
    aor: str = AOR,
    expires_at: float = 3600.0,
    q: float = 1.0,
    **kw: object,
) -> Binding:
    return Binding(aor=aor, contact=contact, expires_at=expires_at, q=q, **kw)  # type: ignore[arg-type]


@implementer(ILocationListener)
class Broken:
    def binding_added(self, binding: Binding, previous: Binding | None) -> None:
        raise RuntimeError("listener bug")

    def binding_removed(self, binding: Binding, reason: RemovalReason) -> None:
        raise RuntimeError("listener bug")


# -- MemoryLocationStore ----------------------------------------------------------------------


def test_store_provides_interface() -> None:
    assert verifyObject(ILocationStore, MemoryLocationStore())
    assert verifyObject(ILocationListener, LocationRecorder())


def test_binding_is_slotted() -> None:
    b = binding()
    assert not hasattr(b, "__dict__")
    with pytest.raises(AttributeError):
        b.no_such_field = 1  # type: ignore[attr-defined]


def test_lookup_orders_by_q_then_newest_first() -> None:
    store = MemoryLocationStore()
    store.add_or_update(binding("sip:a@h1", q=0.5))
    store.add_or_update(binding("sip:a@h2", q=1.0))
    store.add_or_update(binding("sip:a@h3", q=0.5))
    store.add_or_update(binding("sip:a@h4", q=0.9))
    assert [b.contact for b in store.lookup(AOR, 0.0)] == [
        "sip:a@h2",
        "sip:a@h4",
        "sip:a@h3",
        "sip:a@h1",
    ]
    assert store.lookup("sip:bob@example.com", 0.0) == []


def test_update_same_contact_replaces_and_returns_previous() -> None:
    store = MemoryLocationStore()
    first = binding(expires_at=100.0)
    assert store.add_or_update(first) is None
    second = binding(expires_at=200.0)
    assert store.add_or_update(second) is first
    assert store.count() == 1
    assert store.lookup(AOR, 150.0) == [second]


def test_lookup_hides_expired_bindings_before_purge() -> None:
    store = MemoryLocationStore()
    store.add_or_update(binding("sip:a@old", expires_at=10.0))
    store.add_or_update(binding("sip:a@new", expires_at=20.0))
    assert [b.contact for b in store.lookup(AOR, 10.0)] == ["sip:a@new"]
    assert store.count() == 2  # still stored until expire()
    assert sorted(b.contact for b in store.all_bindings()) == ["sip:a@new", "sip:a@old"]


def test_expire_drops_only_expired() -> None:
    store = MemoryLocationStore()
    store.add_or_update(binding("sip:a@1", expires_at=10.0))
    store.add_or_update(binding("sip:a@2", expires_at=30.0))
    store.add_or_update(binding("sip:b@1", aor="sip:bob@example.com", expires_at=5.0))
    gone = store.expire(10.0)
    assert sorted(b.contact for b in gone) == ["sip:a@1", "sip:b@1"]
    assert store.count() == 1
    assert len(store) == 1
    assert store.expire(10.0) == []
    assert [b.contact for b in store.all_bindings()] == ["sip:a@2"]


def test_remove_and_remove_all() -> None:
    store = MemoryLocationStore()
    b1 = binding("sip:a@1")
    b2 = binding("sip:a@2")
    store.add_or_update(b1)
    store.add_or_update(b2)
    assert store.remove(AOR, "sip:a@nope") is None
    assert store.remove("sip:nobody@example.com", "sip:a@1") is None
    assert store.remove(AOR, "sip:a@1") is b1
    assert store.count() == 1
    assert store.remove_all(AOR) == [b2]
    assert store.count() == 0
    assert store.remove_all(AOR) == []
    assert list(store.all_bindings()) == []


def test_ten_thousand_bindings_fit_a_small_memory_budget() -> None:
    """A size check, not a timing test: a realistic binding costs well under 2.5 KB."""
    n = 10_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryLocationStore()
        for i in range(n):
            # Distinct string objects per binding, as parsing each REGISTER would produce.
            store.add_or_update(
                Binding(
                    aor=f"sip:user{i:05d}@example.com",
                    contact=f"sip:user{i:05d}@192.168.{i // 250}.{i % 250}:5060;transport=udp",
                    expires_at=3600.0 + i,
                    q=1.0,
                    call_id=f"{i:08x}-5f3c2a1b9e7d4c6f8a0b1c2d3e4f5a6b@192.168.1.1",
                    cseq=i,
                    source=Source("UDP", f"203.0.113.{i % 250}", 1024 + i, "198.51.100.1", 5060),
                    path=(f"<sip:edge{i % 7}.example.com;lr>",),
                    instance=f'"<urn:uuid:00000000-0000-0000-0000-{i:012d}>"',
                    reg_id=1,
                    user_agent=f"Phone/1.{i % 10} ({i})",
                )
            )
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.count() == n
    assert used < 25 * 1024 * 1024, f"{n} bindings took {used / 1e6:.1f} MB"
    assert used / n < 2500, f"{used / n:.0f} bytes per binding"


# -- LocationService --------------------------------------------------------------------------


def make_service(interval: float = 10.0) -> tuple[Clock, LocationService, LocationRecorder]:
    clock = Clock()
    service = LocationService(clock, purge_interval=interval)
    recorder = LocationRecorder()
    service.add_listener(recorder)
    return clock, service, recorder


def test_service_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        LocationService(Clock(), purge_interval=0)


def test_expiry_happens_when_the_clock_advances() -> None:
    clock, service, recorder = make_service(interval=10.0)
    service.startService()
    try:
        short = binding("sip:a@short", expires_at=15.0)
        long = binding("sip:a@long", expires_at=45.0)
        service.add_or_update(short)
        service.add_or_update(long)
        assert recorder.added == [(short, None), (long, None)]

        clock.advance(10)  # purge at t=10: nothing due
        assert recorder.removed == []
        clock.advance(5)  # t=15: short has expired; lookup hides it even before the purge
        assert service.lookup(AOR) == [long]
        assert recorder.removed == []
        clock.advance(5)  # purge at t=20
        assert recorder.removed == [(short, "expired")]
        assert service.count() == 1
        clock.advance(30)  # purges at t=30, 40, 50
        assert recorder.removed == [(short, "expired"), (long, "expired")]
        assert service.count() == 0
    finally:
        service.stopService()
    assert clock.getDelayedCalls() == []


def test_no_purge_while_stopped() -> None:
    clock, service, recorder = make_service()
    service.add_or_update(binding(expires_at=1.0))
    clock.advance(100)
    assert recorder.removed == []
    assert service.lookup(AOR) == []
    assert service.purge() != []
    assert [r for _, r in recorder.removed] == ["expired"]


def test_refresh_is_reported_as_added_with_previous() -> None:
    _clock, service, recorder = make_service()
    first = binding(expires_at=100.0)
    second = binding(expires_at=200.0)
    service.add_or_update(first)
    assert service.add_or_update(second) is first
    assert recorder.added[-1] == (second, first)
    assert recorder.removed == []


def test_refreshing_an_expired_unpurged_binding_reports_expiry_first() -> None:
    clock, service, recorder = make_service()
    first = binding(expires_at=10.0)
    service.add_or_update(first)
    clock.advance(10)
    second = binding(expires_at=100.0)
    assert service.add_or_update(second) is None
    assert recorder.removed == [(first, "expired")]
    assert recorder.added[-1] == (second, None)


def test_remove_reasons() -> None:
    clock, service, recorder = make_service()
    b1 = binding("sip:a@1", expires_at=100.0)
    b2 = binding("sip:a@2", expires_at=100.0)
    b3 = binding("sip:a@3", expires_at=5.0)
    b4 = binding("sip:a@4", expires_at=100.0)
    for b in (b1, b2, b3, b4):
        service.add_or_update(b)
    assert service.remove(AOR, "sip:a@1") is b1
    assert service.remove(AOR, "sip:a@1") is None
    assert service.remove(AOR, "sip:a@2", reason="replaced") is b2
    clock.advance(6)
    removed = service.remove_all(AOR)
    assert {b.contact for b in removed} == {"sip:a@3", "sip:a@4"}
    assert recorder.removed[:2] == [(b1, "unregistered"), (b2, "replaced")]
    # b3 had run out before it was removed: that is an expiry, not an unregistration.
    assert sorted((b.contact, r) for b, r in recorder.removed[2:]) == [
        ("sip:a@3", "expired"),
        ("sip:a@4", "unregistered"),
    ]
    assert service.count() == 0


def test_a_broken_listener_does_not_starve_the_others() -> None:
    clock, service, recorder = make_service()
    service.remove_listener(recorder)
    service.add_listener(Broken())
    service.add_listener(recorder)
    b = binding(expires_at=5.0)
    service.add_or_update(b)
    clock.advance(5)
    service.purge()
    assert recorder.added == [(b, None)]
    assert recorder.removed == [(b, "expired")]
    assert service.count() == 0


def test_custom_store_is_used() -> None:
    store = MemoryLocationStore()
    service = LocationService(Clock(), store=store)
    service.add_or_update(binding())
    assert store.count() == 1
    assert service.store is store


def test_replaces_swaps_an_equivalent_spelling_as_a_refresh() -> None:
    _clock, service, recorder = make_service()
    old = binding("sip:a@HOST.example.com", expires_at=100.0)
    service.add_or_update(old)
    new = binding("sip:a@host.example.com", expires_at=200.0)
    assert service.add_or_update(new, replaces=old) is old
    assert service.lookup(AOR) == [new]
    assert service.count() == 1
    assert recorder.added[-1] == (new, old)
    assert recorder.removed == []


def test_memory_store_refresh_and_remove_keep_order_and_count() -> None:
    store = MemoryLocationStore()
    a, b, c = (Binding("sip:a@x", f"sip:a@10.0.0.{n}", 100.0) for n in (1, 2, 3))
    for binding in (a, b, c):
        assert store.add_or_update(binding) is None
    newer = Binding("sip:a@x", a.contact, 200.0)
    assert store.add_or_update(newer) is a  # a refresh: now the newest
    assert [x.contact for x in store.lookup("sip:a@x", 0)] == [a.contact, c.contact, b.contact]
    assert store.count() == 3
    assert store.remove("sip:a@x", b.contact) is b and store.remove("sip:a@x", b.contact) is None
    assert [x.contact for x in store.expire(150.0)] == [c.contact]
    assert store.count() == 1 and list(store.all_bindings()) == [newer]
    assert store.remove_all("sip:a@x") == [newer] and store.count() == 0
