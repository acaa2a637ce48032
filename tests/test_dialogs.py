"""DialogTracker: dialogs found by Call-ID and tags, ended once, never outliving their limit.

The proxy's use of it (2xx to INVITE, BYE) is tested in test_proxy.py.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from sipproxy.dialogs import MAX_ADDRESSES, Dialog, DialogTracker, uri_address
from sipproxy.uri import parse_uri


class Ends:
    def __init__(self) -> None:
        self.calls: list[tuple[Dialog, str]] = []

    def __call__(self, dialog: Dialog, reason: str) -> None:
        self.calls.append((dialog, reason))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ends() -> Ends:
    return Ends()


@pytest.fixture
def tracker(clock: Clock, ends: Ends) -> DialogTracker:
    return DialogTracker(clock, ends, max_lifetime=3600.0)


def test_establish_records_the_call(clock: Clock, tracker: DialogTracker) -> None:
    clock.advance(12.5)
    dialog, new = tracker.establish("c1", "from", "to", "inside", "outside")
    assert new
    assert dialog.key == ("c1", "from", "to")
    assert (dialog.created, dialog.caller_side, dialog.callee_side) == (12.5, "inside", "outside")
    assert not dialog.ended
    assert len(tracker) == 1


def test_establish_again_finds_the_same_dialog(tracker: DialogTracker) -> None:
    """A 2xx retransmission, or a second 2xx with the same tags, makes no new dialog."""
    first, _ = tracker.establish("c1", "a", "b")
    again, new = tracker.establish("c1", "a", "b")
    assert again is first and not new
    reversed_, new = tracker.establish("c1", "b", "a")
    assert reversed_ is first and not new
    assert len(tracker) == 1


def test_forked_2xx_with_other_tag_is_another_dialog(tracker: DialogTracker) -> None:
    one, _ = tracker.establish("c1", "a", "b1")
    two, new = tracker.establish("c1", "a", "b2")
    assert new and two is not one
    assert len(tracker) == 2


def test_find_in_either_direction(tracker: DialogTracker) -> None:
    dialog, _ = tracker.establish("c1", "caller", "callee")
    assert tracker.find("c1", "caller", "callee") is dialog
    assert tracker.find("c1", "callee", "caller") is dialog  # a BYE from the callee
    assert tracker.find("c2", "caller", "callee") is None
    assert tracker.find("c1", "caller", "someone") is None


@pytest.mark.parametrize("tag_a, tag_b", [(None, "callee"), ("caller", None), ("", "callee")])
def test_find_without_both_tags_is_none(
    tracker: DialogTracker, tag_a: str | None, tag_b: str | None
) -> None:
    tracker.establish("c1", "caller", "callee")
    assert tracker.find("c1", tag_a, tag_b) is None


def test_end_tells_once_and_forgets(
    clock: Clock, tracker: DialogTracker, ends: Ends
) -> None:
    dialog, _ = tracker.establish("c1", "a", "b")
    tracker.end(dialog, "bye")
    tracker.end(dialog, "bye")  # a retransmitted BYE, or both sides hanging up at once
    assert ends.calls == [(dialog, "bye")]
    assert dialog.ended
    assert tracker.find("c1", "a", "b") is None
    assert len(tracker) == 0
    assert clock.getDelayedCalls() == []  # the lifetime timer went with it


def test_a_dialog_whose_bye_was_lost_times_out(
    clock: Clock, tracker: DialogTracker, ends: Ends
) -> None:
    dialog, _ = tracker.establish("c1", "a", "b")
    clock.advance(3599)
    assert ends.calls == []
    clock.advance(1)
    assert ends.calls == [(dialog, "timeout")]
    assert len(tracker) == 0
    tracker.end(dialog, "bye")  # the late BYE changes nothing
    assert len(ends.calls) == 1


def test_each_dialog_times_out_at_its_own_lifetime(
    clock: Clock, tracker: DialogTracker, ends: Ends
) -> None:
    """Dialogs set up at different times end each at its own time, also when an older one
    ended first; with none left nothing is scheduled."""
    first, _ = tracker.establish("c1", "a", "b")
    clock.advance(100)
    second, _ = tracker.establish("c2", "a", "b")
    clock.advance(100)
    third, _ = tracker.establish("c3", "a", "b")
    tracker.end(first, "bye")
    clock.advance(3400)  # the first would have ended now
    clock.advance(99)
    assert ends.calls == [(first, "bye")]
    clock.advance(1)
    assert ends.calls == [(first, "bye"), (second, "timeout")]
    clock.advance(99)
    assert len(ends.calls) == 2
    clock.advance(1)
    assert ends.calls[2:] == [(third, "timeout")]
    assert len(tracker) == 0 and clock.getDelayedCalls() == []


def test_default_lifetime_is_hours_not_seconds(clock: Clock, ends: Ends) -> None:
    tracker = DialogTracker(clock, ends)
    tracker.establish("c1", "a", "b")
    clock.advance(3600)
    assert ends.calls == []
    clock.advance(12 * 3600)
    assert [reason for _, reason in ends.calls] == ["timeout"]


def test_end_all_ends_everything(clock: Clock, tracker: DialogTracker, ends: Ends) -> None:
    dialogs = [tracker.establish(f"c{i}", "a", "b")[0] for i in range(3)]
    tracker.end_all("shutdown")
    assert ends.calls == [(d, "shutdown") for d in dialogs]
    assert len(tracker) == 0
    assert clock.getDelayedCalls() == []
    tracker.end_all()  # nothing left: nothing happens
    assert len(ends.calls) == 3


def test_a_new_dialog_after_the_old_one_ended(tracker: DialogTracker, ends: Ends) -> None:
    old, _ = tracker.establish("c1", "a", "b")
    tracker.end(old, "bye")
    new, is_new = tracker.establish("c1", "a", "b")
    assert is_new and new is not old and not new.ended


def test_each_dialog_has_its_own_plugin_data(tracker: DialogTracker) -> None:
    one, _ = tracker.establish("c1", "a", "b")
    two, _ = tracker.establish("c2", "a", "b")
    one.data["media"] = "session-1"
    assert two.data == {}


def test_on_end_may_end_other_dialogs(clock: Clock) -> None:
    """A plugin that tears down a related leg from dialog_ended must not break end_all."""
    ended: list[str] = []
    tracker: DialogTracker

    def on_end(dialog: Dialog, reason: str) -> None:
        ended.append(dialog.call_id)
        for other in ("c1", "c2"):
            found = tracker.find(other, "a", "b")
            if found is not None:
                tracker.end(found, reason)

    tracker = DialogTracker(clock, on_end)
    tracker.establish("c1", "a", "b")
    tracker.establish("c2", "a", "b")
    tracker.end_all("shutdown")
    assert sorted(ended) == ["c1", "c2"]
    assert len(tracker) == 0


def test_a_party_keeps_its_newest_addresses(tracker: DialogTracker) -> None:
    """A peer that keeps refreshing its target cannot grow the dialog without bound."""
    dialog, _ = tracker.establish("c1", "from", "to")
    dialog.caller.learn(["192.0.2.1"], [("192.0.2.1", 5060)])
    for port in range(6000, 6000 + 3 * MAX_ADDRESSES):
        dialog.caller.learn(targets=[("192.0.2.1", port)])
    assert len(dialog.caller.targets) == MAX_ADDRESSES
    assert ("192.0.2.1", 6000 + 3 * MAX_ADDRESSES - 1) in dialog.caller.targets
    assert ("192.0.2.1", 5060) not in dialog.caller.targets
    assert dialog.parties_from("192.0.2.1") == [dialog.caller]
    assert dialog.peer_of(dialog.caller) is dialog.callee


def test_what_a_dialog_learns_later_comes_before_anything_learnt_after(
        tracker: DialogTracker) -> None:
    """The parties are taught what set the dialog up when first read, once, and before
    whatever is learnt later (a target refresh), so the newest addresses stay the newest."""
    dialog, _ = tracker.establish("c1", "from", "to")
    runs: list[Dialog] = []

    def learn(d: Dialog) -> None:
        runs.append(d)
        d.caller.learn(["192.0.2.1"], [("192.0.2.1", 5060)])
        d.callee.learn(["198.51.100.7"], [("198.51.100.7", 5060)])

    dialog.learn_later(learn)
    assert runs == []
    dialog.caller.learn(targets=[("192.0.2.1", 6000)])  # a refresh: after what set it up
    assert runs == [dialog]
    assert list(dialog.caller.targets) == [("192.0.2.1", 5060), ("192.0.2.1", 6000)]
    assert dialog.parties_from("198.51.100.7") == [dialog.callee]
    assert runs == [dialog]


def test_uri_address_is_where_a_request_goes() -> None:
    assert uri_address(parse_uri("sip:a@Example.COM")) == ("example.com", 5060)
    assert uri_address(parse_uri("sips:a@example.com")) == ("example.com", 5061)
    assert uri_address(parse_uri("sip:a@example.com;transport=tls")) == ("example.com", 5061)
    assert uri_address(parse_uri("sip:a@example.com:5070;maddr=192.0.2.9")) == ("192.0.2.9", 5070)
