"""The relay's RTP loss count per stream (RFC 3550 A.1/A.3): lost = expected - received,
never negative, late packets and duplicates tolerated, sequence numbers wrapping, a jump of
more than 3000 a restart. Driven through :meth:`PacketStream.received` on in-memory ports."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sipproxy.media.engine import RelayEngine
from sipproxy.media.model import MAX_JUMP, Call, PacketStream, StreamTotals
from sipproxy.media.ports import RelayInterface
from tests.media_site import UdpClock

SOURCE = ("192.0.2.10", 4000)


def stream() -> PacketStream:
    """The RTP stream of one party of a fresh call (no peer: nothing is sent on)."""
    clock = UdpClock()
    engine = RelayEngine(clock, clock, [RelayInterface("inside", "127.0.0.1")], 30000, 30099)
    return Call(engine, "c1").monologue("a", engine.default_interface).leg(0).rtp


def rtp(seq: int, payload_type: int = 0) -> bytes:
    return bytes([0x80, payload_type]) + (seq & 0xFFFF).to_bytes(2, "big") + b"\0" * 8 + b"x" * 160


def send(s: PacketStream, *seqs: int) -> PacketStream:
    for seq in seqs:
        s.received(rtp(seq), SOURCE)
    return s


def test_in_order_loses_nothing_and_a_gap_is_lost() -> None:
    assert send(stream(), *range(100, 150)).lost == 0
    assert send(stream(), 1, 2, 3, 7, 8).lost == 3


def test_late_and_duplicated_packets_are_received() -> None:
    assert send(stream(), 1, 3, 2, 4).lost == 0  # 2 was late, not lost
    assert send(stream(), 1, 2, 2, 2, 5).lost == 0  # 3 and 4 lost, two duplicates: never < 0


def test_the_sequence_wraps() -> None:
    assert send(stream(), 65533, 65534, 65535, 0, 2).lost == 1


def test_a_jump_over_3000_restarts_and_keeps_what_was_lost() -> None:
    s = send(stream(), 10, 12)
    assert s.lost == 1
    send(s, 12 + MAX_JUMP + 1, 12 + MAX_JUMP + 2)  # the sender restarted
    assert s.lost == 1
    assert send(stream(), 10, 10 + MAX_JUMP).lost == MAX_JUMP - 1  # a gap of 3000: lost


def test_rtcp_is_not_counted() -> None:
    s = stream()
    s.received(rtp(1), SOURCE)
    s.received(rtp(500, payload_type=200), SOURCE)  # a muxed RTCP sender report
    s.received(rtp(2), SOURCE)
    assert (s.packets, s.lost) == (3, 0)


def test_the_kernel_path_makes_it_unknown() -> None:
    s = send(stream(), 1, 3)
    assert s.lost_known() == 1
    s.kernel_packets = 5  # what the kernel fast path forwarded (it sees no sequence numbers)
    assert s.lost_known() is None
    assert "packets lost" not in s.describe()["stats"]


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 0xFFFF), count=st.integers(1, 300),
       dropped=st.sets(st.integers(0, 299)), swaps=st.lists(st.integers(0, 298), max_size=30),
       duplicates=st.lists(st.integers(0, 299), max_size=20))
def test_lost_is_expected_minus_received_under_reordering(
        start: int, count: int, dropped: set[int], swaps: list[int], duplicates: list[int]) -> None:
    """A sender's ``count`` packets from ``start`` (wrapping), some dropped, neighbours
    swapped, some duplicated: lost = expected (first to highest) - received, never < 0."""
    order = list(range(count))
    for i in swaps:
        if i + 1 < count:
            order[i], order[i + 1] = order[i + 1], order[i]
    arrived = [i for i in order if i not in dropped]
    arrived += [i for i in duplicates if i in arrived]
    s = send(stream(), *(start + i for i in arrived))
    if not arrived:
        assert s.lost == 0
        return
    first = arrived[0]
    expected = max(arrived) - first + 1
    # a packet earlier than the first one that arrived is received but not expected
    assert s.lost == max(0, expected - len(arrived))
    assert s.lost <= len(dropped & set(range(count)))


def test_a_stream_the_kernel_forwarded_is_left_out_of_the_lost_totals() -> None:
    """Per direction (the status page) and in the totals (``/metrics``): the userspace stream's
    loss, null and not summed for the one the kernel forwarded some of."""
    clock = UdpClock()
    engine = RelayEngine(clock, clock, [RelayInterface("inside", "127.0.0.1"),
                                        RelayInterface("outside", "127.0.0.2")], 30000, 30099)
    call = Call(engine, "c1")
    caller = call.monologue("a", engine.interfaces["inside"])
    callee = call.monologue("b", engine.interfaces["outside"])
    send(caller.leg(0).rtp, 1, 2, 5)
    send(callee.leg(0).rtp, 1, 4)
    callee.medias[0].rtp.kernel_packets = 10
    assert [(m["direction"], m["lost"]) for m in call.directions("a", 0.0)] == [
        ("caller->callee", 2), ("callee->caller", None)]
    totals = StreamTotals()
    totals.add(call)
    assert totals.counts[("inside", "userspace")][2] == 2
    assert totals.counts[("outside", "userspace")][2] == 0
    assert totals.counts[("outside", "kernel")][2] == 0
