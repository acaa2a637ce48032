"""ScheduledCollections: young objects collected and the survivors frozen every interval,
everything collected every full interval; what is freed stays the same."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock

from sipproxy.service import (
    FULL_COLLECTION_INTERVAL,
    YOUNG_COLLECTION_INTERVAL,
    ScheduledCollections,
    tune_garbage_collector,
)

Scheduled = tuple[ScheduledCollections, Clock]


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """Make a two-object cycle and drop it: only the collector frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def alive(ref: weakref.ref[Node]) -> bool:
    return ref() is not None


@pytest.fixture
def scheduled() -> Iterator[Scheduled]:
    """A running schedule on a test clock; the process's collector settings put back after."""
    thresholds = gc.get_threshold()
    tune_garbage_collector()
    clock = Clock()
    schedule = ScheduledCollections(clock)
    schedule.startService()
    gc.disable()  # only the schedule collects during the test
    try:
        yield schedule, clock
    finally:
        schedule.stopService()
        gc.enable()
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_young_cyclic_garbage_is_collected_at_the_next_interval(scheduled: Scheduled) -> None:
    _, clock = scheduled
    garbage = cycle()
    assert alive(garbage)
    clock.advance(YOUNG_COLLECTION_INTERVAL)
    assert not alive(garbage)


def test_survivors_are_frozen_and_freed_as_before(scheduled: Scheduled) -> None:
    _, clock = scheduled
    kept = [Node() for _ in range(100)]
    frozen = gc.get_freeze_count()
    clock.advance(YOUNG_COLLECTION_INTERVAL)
    assert gc.get_freeze_count() >= frozen + 100
    del kept  # reference counting frees frozen objects as any other
    assert gc.get_freeze_count() < frozen + 100


def test_garbage_made_of_frozen_objects_waits_for_the_full_collection(scheduled: Scheduled) -> None:
    _, clock = scheduled
    a = Node()
    a.other = Node()
    a.other.other = a
    clock.advance(YOUNG_COLLECTION_INTERVAL)  # survives young: frozen
    garbage = weakref.ref(a)
    del a
    clock.advance(FULL_COLLECTION_INTERVAL - 2 * YOUNG_COLLECTION_INTERVAL)
    assert alive(garbage)
    clock.advance(2 * YOUNG_COLLECTION_INTERVAL)
    assert not alive(garbage)


def test_stopped_it_collects_no_more(scheduled: Scheduled) -> None:
    schedule, clock = scheduled
    schedule.stopService()
    garbage = cycle()
    clock.advance(FULL_COLLECTION_INTERVAL)
    assert alive(garbage) and not clock.getDelayedCalls()
