"""Tests of the connection outbox: bounds, coalescing, overflow, batching."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from ensemble.realtime._events import Event, Subscriber
from ensemble.realtime._outbox import Outbox, OutboxStatistics, Positions, _Slot


def message(n: int, *, topic: str = "room:general", epoch: str = "e1", size: int = 0) -> Event:
    return Event(type="message", topic=topic, data={"n": n, "pad": "x" * size}, seq=n, epoch=epoch)


def typing(user: str, flag: bool) -> Event:
    return Event(type="typing", topic="room:general", data={"user": user, "typing": flag}, coalesce_key=("typing", user))


def test_is_a_subscriber() -> None:
    outbox = Outbox(connection_id="c1", user_id="alice")
    subscriber: Subscriber = outbox
    assert subscriber.connection_id == "c1"
    assert subscriber.user_id == "alice"


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Outbox(max_events=0)
    with pytest.raises(ValueError, match="at least 1"):
        Outbox(max_bytes=0)


def test_fifo_and_statistics() -> None:
    outbox = Outbox()
    events = [message(n) for n in range(5)]
    assert all(outbox.deliver_nowait(event) for event in events)
    stats = outbox.statistics()
    assert isinstance(stats, OutboxStatistics)
    assert stats.depth == 5
    assert stats.bytes == sum(len(event.encoded) for event in events)
    assert stats.peak == 5
    assert stats.accepted == 5
    assert outbox.get_batch_nowait() == events
    stats = outbox.statistics()
    assert (stats.depth, stats.bytes, stats.peak, stats.delivered) == (0, 0, 5, 5)
    assert outbox.get_batch_nowait() == []


def test_bounded_in_messages() -> None:
    overflows: list[Positions] = []
    outbox = Outbox(max_events=3, on_overflow=overflows.append)
    assert [outbox.deliver_nowait(message(n)) for n in range(1, 5)] == [True, True, True, False]
    assert outbox.overflowed
    assert overflows == [{"room:general": ("e1", 3)}]
    stats = outbox.statistics()
    assert stats.depth == 3
    assert stats.overflowed
    assert stats.refused == 1


def test_bounded_in_bytes() -> None:
    big = message(1, size=600)
    limit = len(big.encoded) + 100
    outbox = Outbox(max_bytes=limit)
    assert outbox.deliver_nowait(big)
    assert outbox.deliver_nowait(message(2))  # small: fits
    assert not outbox.deliver_nowait(message(3, size=600))
    assert outbox.overflowed
    assert outbox.statistics().bytes <= limit


def test_a_single_oversized_event_fits_an_empty_outbox() -> None:
    outbox = Outbox(max_bytes=10)
    assert outbox.deliver_nowait(message(1, size=100))
    assert not outbox.overflowed
    assert not outbox.deliver_nowait(message(2))
    assert outbox.overflowed


def test_refuses_everything_after_overflow_and_calls_back_once() -> None:
    overflows: list[Positions] = []
    outbox = Outbox(max_events=1, on_overflow=overflows.append)
    assert outbox.deliver_nowait(message(1))
    assert not outbox.deliver_nowait(message(2))
    assert outbox.get_batch_nowait() == [message(1)]  # queued events stay
    assert not outbox.deliver_nowait(message(3))  # room again, still refused
    assert not outbox.deliver_nowait(typing("bob", True))
    assert len(overflows) == 1
    assert outbox.statistics().refused == 3


def test_overflow_positions_per_topic() -> None:
    overflows: list[Positions] = []
    outbox = Outbox(max_events=4, on_overflow=overflows.append)
    outbox.deliver_nowait(message(7, topic="room:a", epoch="ea"))
    outbox.deliver_nowait(message(8, topic="room:a", epoch="ea"))
    outbox.deliver_nowait(message(3, topic="user:alice", epoch="eu"))
    outbox.deliver_nowait(typing("bob", True))  # unsequenced: no position
    assert outbox.positions == {"room:a": ("ea", 8), "user:alice": ("eu", 3)}
    assert not outbox.deliver_nowait(message(9, topic="room:a", epoch="ea"))
    assert overflows == [{"room:a": ("ea", 8), "user:alice": ("eu", 3)}]


def test_an_overflow_callback_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(positions: Positions) -> None:
        raise RuntimeError("boom")

    outbox = Outbox(max_events=1, on_overflow=boom)
    outbox.deliver_nowait(message(1))
    assert not outbox.deliver_nowait(message(2))
    assert "on_overflow" in caplog.text


def test_coalescing_keeps_position_and_latest_value() -> None:
    outbox = Outbox()
    first = message(1)
    outbox.deliver_nowait(first)
    outbox.deliver_nowait(typing("bob", True))
    second = message(2)
    outbox.deliver_nowait(second)
    latest = typing("bob", False)
    for flag in (False, True, False):
        outbox.deliver_nowait(typing("bob", flag))
    outbox.deliver_nowait(latest)
    outbox.deliver_nowait(typing("carol", True))
    batch = outbox.get_batch_nowait()
    assert batch[0] is first
    assert batch[1] is latest
    assert batch[2] is second
    assert batch[3].data["user"] == "carol"
    assert len(batch) == 4
    stats = outbox.statistics()
    assert stats.coalesced == 4
    assert stats.bytes == 0
    # After the slot was taken, the key starts a new slot.
    outbox.deliver_nowait(typing("bob", True))
    assert len(outbox) == 1


def test_coalescing_tracks_bytes() -> None:
    outbox = Outbox()
    outbox.deliver_nowait(Event(type="typing", topic="t", data={"v": "short"}, coalesce_key="k"))
    longer = Event(type="typing", topic="t", data={"v": "a much longer value"}, coalesce_key="k")
    outbox.deliver_nowait(longer)
    assert outbox.statistics().bytes == len(longer.encoded)


def test_coalescing_does_not_overflow_when_full() -> None:
    outbox = Outbox(max_events=2)
    assert outbox.deliver_nowait(typing("a", True))
    assert outbox.deliver_nowait(message(1))
    assert outbox.deliver_nowait(typing("a", False))  # replaces in place: fits
    assert not outbox.deliver_nowait(typing("b", True))  # new key, full: dropped
    assert not outbox.overflowed
    stats = outbox.statistics()
    assert (stats.dropped, stats.coalesced, stats.depth) == (1, 1, 2)


def test_on_ready_fires_on_empty_to_non_empty_only() -> None:
    calls = []
    outbox = Outbox(on_ready=lambda: calls.append(len(outbox)))
    outbox.deliver_nowait(message(1))
    outbox.deliver_nowait(message(2))
    outbox.deliver_nowait(typing("a", True))
    assert calls == [1]
    outbox.get_batch_nowait()
    outbox.deliver_nowait(message(3))
    assert calls == [1, 1]


def test_get_batch_nowait_takes_at_most_max_events() -> None:
    outbox = Outbox()
    for n in range(5):
        outbox.deliver_nowait(message(n))
    assert [event.seq for event in outbox.get_batch_nowait(2)] == [0, 1]
    assert [event.seq for event in outbox.get_batch_nowait(10)] == [2, 3, 4]


async def test_get_batch_waits_then_takes_everything_queued(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    batches: list[list[Event]] = []

    async def consumer() -> None:
        while True:
            try:
                batches.append(await outbox.get_batch())
            except trio.EndOfChannel:
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        for n in range(10):  # no checkpoint in between: one wake-up
            outbox.deliver_nowait(message(n))
        await trio.testing.wait_all_tasks_blocked()
        outbox.deliver_nowait(message(10))
        await trio.testing.wait_all_tasks_blocked()
        outbox.close()
    assert [len(batch) for batch in batches] == [10, 1]


async def test_get_batch_respects_max_events(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    for n in range(5):
        outbox.deliver_nowait(message(n))
    assert len(await outbox.get_batch(max_events=3)) == 3
    assert len(await outbox.get_batch(max_events=3)) == 2
    with pytest.raises(ValueError, match="max_events"):
        await outbox.get_batch(max_events=0)


async def test_close_wakes_the_waiter_with_end_of_channel(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    outcome: list[str] = []

    async def consumer() -> None:
        try:
            await outbox.get_batch()
        except trio.EndOfChannel:
            outcome.append("end")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consumer)
        await trio.testing.wait_all_tasks_blocked()
        outbox.close()
    assert outcome == ["end"]
    assert not outbox.deliver_nowait(message(1))
    assert outbox.statistics().closed


async def test_close_keeps_queued_events_for_the_consumer(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    outbox.deliver_nowait(message(1))
    outbox.close()
    assert [event.seq for event in await outbox.get_batch()] == [1]
    with pytest.raises(trio.EndOfChannel):
        await outbox.get_batch()
    assert outbox.get_batch_nowait() == []


async def test_a_cancelled_get_batch_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    with trio.move_on_after(1):
        await outbox.get_batch()
    outbox.deliver_nowait(message(1))
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await outbox.get_batch()
    assert len(outbox) == 1
    assert [event.seq for event in await outbox.get_batch()] == [1]


async def test_only_one_waiter(autojump_clock: trio.abc.Clock) -> None:
    outbox = Outbox()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.get_batch)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await outbox.get_batch()
        outbox.deliver_nowait(message(1))


def test_serialises_once() -> None:
    event = message(1)
    outboxes = [Outbox() for _ in range(100)]
    for outbox in outboxes:
        outbox.deliver_nowait(event)
    encoded = {id(outbox.get_batch_nowait()[0].encoded) for outbox in outboxes}
    assert len(encoded) == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("msg"), st.integers(0, 300)),
            st.tuples(st.just("typing"), st.integers(0, 3)),
            st.tuples(st.just("take"), st.integers(1, 4)),
        ),
        max_size=60,
    )
)
def test_bounds_and_byte_accounting_hold(operations: list[tuple[str, int]]) -> None:
    outbox = Outbox(max_events=5, max_bytes=800)
    seq = 0
    taken: list[Event] = []
    for kind, value in operations:
        if kind == "msg":
            seq += 1
            outbox.deliver_nowait(message(seq, size=value))
        elif kind == "typing":
            outbox.deliver_nowait(typing(f"user{value}", seq % 2 == 0))
        else:
            taken.extend(outbox.get_batch_nowait(value))
        stats = outbox.statistics()
        assert stats.depth <= 5
        assert stats.depth <= 1 or stats.bytes <= 800
        assert stats.bytes == queued_bytes(outbox)
    sequenced = [event.seq for event in taken if event.seq is not None]
    assert sequenced == sorted(sequenced)


def queued_bytes(outbox: Outbox) -> int:
    """White-box: the encoded size of what is queued now."""
    return sum(len(item.event.encoded) if isinstance(item, _Slot) else len(item.encoded) for item in outbox._queue)


def test_coalescing_is_per_topic() -> None:
    # One connection in two rooms: each room's typing set is kept.
    outbox = Outbox(max_events=10)
    a1 = Event(type="typing", topic="room:a", data={"users": ["x"]}, coalesce_key="typing")
    b1 = Event(type="typing", topic="room:b", data={"users": ["y"]}, coalesce_key="typing")
    a2 = Event(type="typing", topic="room:a", data={"users": []}, coalesce_key="typing")
    for event in (a1, b1, a2):
        assert outbox.deliver_nowait(event)
    assert outbox.get_batch_nowait() == [a2, b1]
    assert outbox.statistics().coalesced == 1


def test_a_batch_is_queued_in_one_step_with_the_same_accounting() -> None:
    from ensemble.realtime._events import EventBatch

    events = [Event(type="message", topic="room:a", data={"n": n}, seq=n + 1, epoch="e") for n in range(5)]
    one_by_one = Outbox(max_events=10)
    for event in events:
        assert one_by_one.deliver_nowait(event)
    batched = Outbox(max_events=10)
    assert batched.deliver_batch_nowait(EventBatch(events)) == 5
    assert batched.get_batch_nowait() == one_by_one.get_batch_nowait() == events
    a, b = one_by_one.statistics(), batched.statistics()
    assert (a.accepted, a.peak, a.peak_bytes, a.delivered) == (b.accepted, b.peak, b.peak_bytes, b.delivered)
    assert batched.positions == one_by_one.positions
    assert batched.positions == {"room:a": ("e", 5)}


def test_a_batch_that_does_not_fit_overflows_exactly_as_event_by_event() -> None:
    from ensemble.realtime._events import EventBatch

    events = [Event(type="message", topic="room:a", data={"n": n}, seq=n + 1, epoch="e") for n in range(5)]
    outbox = Outbox(max_events=3)
    assert outbox.deliver_batch_nowait(EventBatch(events)) == 3
    assert outbox.overflowed
    assert outbox.positions == {"room:a": ("e", 3)}
    assert outbox.deliver_batch_nowait(EventBatch(events)) == 0  # refusing from now on
