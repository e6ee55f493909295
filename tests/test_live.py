"""Live queries: the seed API, filters, enter/leave, replay, handlers, restarts."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
from _doc_faults import crash_mid_publish

from ensemble import HubConfig, MemoryTransport, WSRateLimitConfig, open_hub
from ensemble.actors import ActorCrashed, Supervisor
from ensemble.realtime import Hub
from ensemble.realtime._errors import HistoryUnavailable, NotFound
from ensemble.realtime._events import CHANGE, Event
from ensemble.realtime._live import (
    LiveConfig,
    LiveQuery,
    LiveStore,
    LiveWatch,
    WatchOverflowed,
    start_live_query,
)
from ensemble.realtime._models import ModelChange
from ensemble.server import Identity, ProtocolHandler
from ensemble.testing import FaultInjector


@attrs.define(eq=False)
class Recorder:
    """A subscriber that records what it is given."""

    connection_id: str
    user_id: str | None = None
    accept: bool = True
    events: list[Event] = attrs.Factory(list)

    def deliver_nowait(self, event: Event) -> bool:
        self.events.append(event)
        return self.accept

    def actions(self) -> list[tuple[str, Any]]:
        return [(event.data["action"], event.data["pk"]) for event in self.events]


def drain(watch: LiveWatch) -> list[ModelChange]:
    changes = []
    while True:
        try:
            changes.append(watch.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return changes


def seen(watch: LiveWatch) -> list[tuple[str, Any]]:
    return [(change.action, change.pk) for change in drain(watch)]


async def start(supervisor: Supervisor, **config: Any) -> LiveQuery:
    return await start_live_query(supervisor, config=LiveConfig(**config))


# -- the seed API ---------------------------------------------------------------------


async def test_seed_api_watch_notify_unwatch(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    sub_id = await live.watch("Post")
    assert isinstance(sub_id, str)
    changes = live.subscription(sub_id)

    await live.notify_create("Post", 1, {"title": "a", "body": "x"})
    await live.notify_update("Post", 1, {"title": "b"}, ["title"])
    await live.notify_delete("Post", 1)
    assert await live.version("Post") == 3

    create, update, delete = drain(changes)
    assert (create.action, create.pk, dict(create.data or {})) == ("create", 1, {"title": "a", "body": "x"})
    assert create.changed_fields is None
    assert (update.action, dict(update.data or {}), update.changed_fields) == ("update", {"title": "b", "body": "x"}, ("title",))
    assert (delete.action, delete.pk, delete.data) == ("delete", 1, None)
    assert changes.version == 3

    assert await live.unwatch(sub_id) is True
    assert await live.unwatch(sub_id) is False
    with pytest.raises(NotFound):
        live.subscription(sub_id)
    with pytest.raises(trio.EndOfChannel):
        await changes.receive()


async def test_iteration_ends_on_unwatch(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    sub_id = await live.watch("Post")
    changes = live.subscription(sub_id)
    await live.notify_create("Post", 1, {"title": "a"})
    await live.notify_create("Post", 2, {"title": "b"})
    await live.unwatch(sub_id)
    assert [change.pk async for change in changes] == [1, 2]


async def test_on_change_handlers_see_every_change(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    received: list[tuple[str, Any, Any]] = []

    @live.on_change("Post")
    async def handle(change: ModelChange) -> None:
        received.append((change.action, change.pk, change.changed_fields))

    await live.notify_create("Comment", 9, {"post_id": 1})  # another model
    await live.notify_create("Post", 1, {"title": "a"})
    await live.notify_update("Post", 1, {"title": "b"})  # changed_fields default to data's keys
    await live.notify_delete("Post", 1)
    await live.version("Post")
    assert received == [("create", 1, None), ("update", 1, ("title",)), ("delete", 1, None)]
    assert live.statistics().handler_calls == 3


# -- filters ------------------------------------------------------------------------


async def test_equality_and_predicate_filters(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    post42 = live.subscription(await live.watch("Comment", filters={"post_id": 42}))
    long = live.subscription(await live.watch("Comment", filters=lambda row: len(str(row.get("text", ""))) > 3))
    both = live.subscription(await live.watch("Comment", filters={"post_id": 42, "author": "ann"}))

    await live.notify_create("Comment", 1, {"post_id": 42, "text": "hi", "author": "ann"})
    await live.notify_create("Comment", 2, {"post_id": 7, "text": "hello"})
    await live.notify_create("Comment", 3, {"text": "no post id"})
    await live.version("Comment")

    assert seen(post42) == [("create", 1)]
    assert seen(long) == [("create", 2), ("create", 3)]
    assert seen(both) == [("create", 1)]


async def test_invalid_filters_are_refused(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    with pytest.raises(TypeError):
        await live.watch("Post", filters=42)  # type: ignore[arg-type]


async def test_a_raising_predicate_is_no_match(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    live = await start(supervisor)
    strict = live.subscription(await live.watch("Post", filters=lambda row: row["flag"] is True))
    await live.notify_create("Post", 1, {"title": "no flag"})
    await live.notify_create("Post", 2, {"flag": True})
    await live.version("Post")
    assert seen(strict) == [("create", 2)]
    assert live.statistics().predicate_errors == 1
    assert "raised" in caplog.text


# -- enter, leave, update, delete ---------------------------------------------------


async def test_partial_updates_move_rows_in_and_out_of_filters(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    two = live.subscription(await live.watch("Comment", {"post_id": 2}))
    everything = live.subscription(await live.watch("Comment"))

    await live.notify_create("Comment", 10, {"post_id": 1, "text": "hi"})
    await live.notify_update("Comment", 10, {"post_id": 2}, ["post_id"])  # moves from 1 to 2
    await live.notify_update("Comment", 10, {"text": "edited"}, ["text"])  # stays in 2
    await live.version("Comment")

    create, leave = drain(one)
    assert create.action == "create"
    assert (leave.action, dict(leave.data or {}), leave.changed_fields) == ("leave", {"post_id": 2, "text": "hi"}, ("post_id",))

    enter, update = drain(two)
    assert (enter.action, dict(enter.data or {})) == ("enter", {"post_id": 2, "text": "hi"})
    assert (update.action, dict(update.data or {}), update.changed_fields) == ("update", {"post_id": 2, "text": "edited"}, ("text",))

    assert seen(everything) == [("create", 10), ("update", 10), ("update", 10)]


async def test_delete_reaches_exactly_the_watchers_that_could_see_the_row(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    two = live.subscription(await live.watch("Comment", {"post_id": 2}))
    everything = live.subscription(await live.watch("Comment"))

    await live.notify_create("Comment", 10, {"post_id": 1})
    await live.notify_update("Comment", 10, {"post_id": 2})
    await live.version("Comment")
    assert (seen(one), seen(two), seen(everything)) == ([("create", 10), ("leave", 10)], [("enter", 10)], [("create", 10), ("update", 10)])
    await live.notify_delete("Comment", 10)
    await live.version("Comment")
    assert seen(one) == []
    assert seen(two) == [("delete", 10)]
    assert seen(everything) == [("delete", 10)]


async def test_unknown_rows_fall_back_to_the_update_data(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, max_rows=0)  # nothing is cached: every row is unknown
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    two = live.subscription(await live.watch("Comment", {"post_id": 2}))
    pred = live.subscription(await live.watch("Comment", lambda row: row.get("post_id") == 1))

    # The filter field is in the data but did not change: it was in as it is now.
    await live.notify_update("Comment", 10, {"post_id": 1, "text": "x"}, ["text"])
    # The filter field changed: a match enters, the others may have had it and leave (pk only).
    await live.notify_update("Comment", 11, {"post_id": 2}, ["post_id"])
    # The filter field is missing: nobody filtered learns anything.
    await live.notify_update("Comment", 12, {"text": "y"}, ["text"])
    await live.version("Comment")

    assert seen(one) == [("update", 10), ("leave", 11)]
    assert seen(two) == [("enter", 11)]
    assert seen(pred) == [("enter", 10), ("leave", 11), ("leave", 12)]
    assert live.statistics().rows_cached == 0


async def test_speculative_leave_carries_no_data(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, max_rows=0)
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    await live.notify_update("Comment", 11, {"post_id": 2, "secret": "s"}, ["post_id"])
    await live.version("Comment")
    (leave,) = drain(one)
    assert (leave.action, leave.pk, leave.data) == ("leave", 11, None)


async def test_delete_of_an_unknown_row(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, max_rows=0)
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    two = live.subscription(await live.watch("Comment", {"post_id": 2}))
    await live.notify_delete("Comment", 10)  # nothing known: everyone could have seen it
    await live.notify_delete("Comment", 11, {"post_id": 2})  # its last data stands in for the cache
    await live.version("Comment")
    assert seen(one) == [("delete", 10)]
    assert seen(two) == [("delete", 10), ("delete", 11)]


async def test_the_row_cache_is_a_bounded_lru(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, max_rows=2)
    one = live.subscription(await live.watch("Comment", {"post_id": 1}))
    for pk in (1, 2, 3):
        await live.notify_create("Comment", pk, {"post_id": 1, "text": str(pk)})
    await live.version("Comment")
    stats = live.statistics()
    assert (stats.rows_cached, stats.rows_evicted) == (2, 1)
    drain(one)
    # Row 1 was evicted: its update takes the fallback path (no post_id in the data: nothing).
    await live.notify_update("Comment", 1, {"text": "x"})
    # Row 3 is known: merged, so the update reaches the watcher.
    await live.notify_update("Comment", 3, {"text": "y"})
    await live.version("Comment")
    assert seen(one) == [("update", 3)]


# -- handlers -------------------------------------------------------------------------


async def test_handler_errors_and_timeouts_are_contained(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    live = await start(supervisor, handler_timeout=2.0)
    calls: list[str] = []

    @live.on_change("Post")
    async def broken(change: ModelChange) -> None:
        calls.append("broken")
        raise RuntimeError("handler bug")

    @live.on_change("Post")
    async def hangs(change: ModelChange) -> None:
        calls.append("hangs")
        await trio.sleep_forever()

    @live.on_change("Post")
    async def fine(change: ModelChange) -> None:
        calls.append("fine")

    watch = live.subscription(await live.watch("Post"))
    with caplog.at_level(logging.WARNING, logger="ensemble.realtime.live"):
        await live.notify_create("Post", 1, {})
        await live.notify_create("Post", 2, {})
        assert await live.version("Post") == 2
    assert calls == ["broken", "hangs", "fine"] * 2
    assert seen(watch) == [("create", 1), ("create", 2)]
    stats = live.statistics()
    assert (stats.handler_calls, stats.handler_errors, stats.handler_timeouts) == (6, 2, 2)
    assert live.ref.statistics().crashes == 0
    assert "handler bug" in caplog.text
    assert "timed out" in caplog.text


# -- subscribers ----------------------------------------------------------------------


async def test_subscriber_delivery(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    alice = Recorder("c1", "alice")
    sub_id = await live.watch("Post", subscriber=alice)
    await live.notify_create("Post", 1, {"title": "a"})
    await live.version("Post")
    (event,) = alice.events
    assert event.type == CHANGE
    assert event.topic == f"live:{sub_id}"
    assert (event.seq, event.epoch) == (1, live.epoch)
    assert event.data["action"] == "create"
    assert event.data["data"] == {"title": "a"}
    assert b'"topic":"live:' in event.encoded
    assert live.statistics().delivered == 1


async def test_events_are_shared_by_watchers_of_one_topic(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    connections = [Recorder(f"c{n}") for n in range(3)]
    for connection in connections:
        await live.watch("Comment", {"post_id": 42}, subscriber=connection, topic="live:post-42-comments")
    own = Recorder("c-own")
    await live.watch("Comment", {"post_id": 42}, subscriber=own)

    await live.notify_create("Comment", 1, {"post_id": 42})
    await live.version("Comment")
    first, second, third = (connection.events[0] for connection in connections)
    assert first is second is third
    assert first.encoded is third.encoded
    # Another topic needs its own event, but the payload is converted once.
    assert own.events[0] is not first
    assert own.events[0].data is first.data


async def test_refused_events_are_counted_and_connections_unwatched(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    slow = Recorder("c1", accept=False)
    other = Recorder("c2")
    await live.watch("Post", subscriber=slow)
    await live.watch("Comment", subscriber=slow)
    await live.watch("Post", subscriber=other)
    await live.notify_create("Post", 1, {})
    await live.version("Post")
    assert (live.statistics().refused, live.statistics().delivered) == (1, 1)

    assert await live.unwatch_connection("c1") == 2
    assert live.statistics().watchers == 1
    await live.notify_create("Post", 2, {})
    await live.version("Post")
    assert slow.actions() == [("create", 1)]
    assert other.actions() == [("create", 1), ("create", 2)]


async def test_changes_arrive_in_notify_order(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    connection = Recorder("c1")
    await live.watch("Post", subscriber=connection)

    async def writer(pks: range) -> None:
        for pk in pks:
            await live.notify_create("Post", pk, {"n": pk})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, range(50))
        nursery.start_soon(writer, range(100, 150))
    await live.version("Post")
    seqs = [event.seq for event in connection.events]
    assert seqs == list(range(1, 101))
    pks = [event.data["pk"] for event in connection.events]
    assert [pk for pk in pks if pk < 100] == list(range(50))
    assert [pk for pk in pks if pk >= 100] == list(range(100, 150))


# -- versions and replay (the lost-events race) ---------------------------------------


async def test_watch_since_replays_the_changes_a_page_missed(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    await live.notify_create("Comment", 1, {"post_id": 42, "text": "first"})
    page_version = await live.version("Comment")  # the page renders comment 1
    await live.notify_create("Comment", 2, {"post_id": 42, "text": "second"})  # before the socket connects
    await live.notify_create("Comment", 3, {"post_id": 7, "text": "elsewhere"})

    bob = Recorder("bob")
    await live.watch("Comment", {"post_id": 42}, subscriber=bob, since=page_version, epoch=live.epoch)
    await live.notify_create("Comment", 4, {"post_id": 42, "text": "third"})
    await live.version("Comment")
    assert bob.actions() == [("create", 2), ("create", 4)]
    assert [event.seq for event in bob.events] == [2, 4]


async def test_replay_uses_the_rows_as_they_were(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    await live.notify_create("Comment", 1, {"post_id": 1})
    since = await live.version("Comment")
    await live.notify_update("Comment", 1, {"post_id": 2})
    await live.notify_update("Comment", 1, {"post_id": 1})
    async with live.open_watch("Comment", {"post_id": 1}, since=since) as changes:
        assert seen(changes) == [("leave", 1), ("enter", 1)]
        assert changes.version == 3


async def test_watch_since_the_current_version_replays_nothing(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    assert await live.version("Post") == 0
    async with live.open_watch("Post", since=0) as changes:
        assert seen(changes) == []
        await live.notify_create("Post", 1, {})
        assert (await changes.receive()).pk == 1


async def test_watch_since_too_old_future_or_other_epoch_is_refused(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, log_size=2)
    for pk in range(5):
        await live.notify_create("Post", pk, {})
    assert await live.version("Post") == 5
    with pytest.raises(HistoryUnavailable) as info:
        await live.watch("Post", since=2)  # change 3 is gone: only 4 and 5 are kept
    assert (info.value.first_seq, info.value.last_seq, info.value.epoch) == (4, 5, live.epoch)
    with pytest.raises(HistoryUnavailable):
        await live.watch("Post", since=6)
    with pytest.raises(HistoryUnavailable):
        await live.watch("Post", since=5, epoch="another")
    # The oldest resumable version, and the refusals left the actor untouched.
    async with live.open_watch("Post", since=3) as changes:
        assert seen(changes) == [("create", 3), ("create", 4)]
    await live.version("Post")
    assert live.ref.statistics().crashes == 0
    assert live.statistics().watchers == 0


async def test_without_a_log_only_the_current_version_resumes(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor, log_size=0)
    await live.notify_create("Post", 1, {})
    with pytest.raises(HistoryUnavailable) as info:
        await live.watch("Post", since=0)
    assert info.value.first_seq is None
    await live.unwatch(await live.watch("Post", since=1))


# -- subscriber-less watches ------------------------------------------------------------


async def test_open_watch_iterates_and_unwatches_on_exit(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    received: list[Any] = []

    async def consume(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with live.open_watch("Post", {"draft": False}) as changes:
            task_status.started()
            async for change in changes:
                received.append(change.pk)
                if len(received) == 2:
                    break

    async with trio.open_nursery() as nursery:
        await nursery.start(consume)
        await live.notify_create("Post", 1, {"draft": False})
        await live.notify_create("Post", 2, {"draft": True})
        await live.notify_create("Post", 3, {"draft": False})
    assert received == [1, 3]
    await live.version("Post")
    assert live.statistics().watchers == 0


async def test_a_consumer_that_falls_behind_is_told_and_can_resume(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    async with live.open_watch("Post", buffer=2) as changes:
        for pk in range(5):
            await live.notify_create("Post", pk, {})
        await live.version("Post")
        assert [(await changes.receive()).pk for _ in range(2)] == [0, 1]
        with pytest.raises(WatchOverflowed) as info:
            await changes.receive()
        assert (info.value.subscription_id, info.value.version) == (changes.id, 2)
    assert live.statistics().overflowed == 1
    async with live.open_watch("Post", since=info.value.version) as resumed:
        assert seen(resumed) == [("create", 2), ("create", 3), ("create", 4)]


async def test_an_abandoned_watch_is_dropped(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    watch = live.subscription(await live.watch("Post"))
    watch.close()
    await live.notify_create("Post", 1, {})
    await live.version("Post")
    assert live.statistics().watchers == 0


# -- supervision ------------------------------------------------------------------------


async def test_watchers_and_handlers_survive_a_restart(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.abc.Clock
) -> None:
    live = await start(supervisor)
    handled: list[Any] = []

    @live.on_change("Post")
    async def handle(change: ModelChange) -> None:
        handled.append(change.pk)

    connection = Recorder("c1")
    await live.watch("Post", {"draft": False}, subscriber=connection)
    queue = live.subscription(await live.watch("Post"))
    await live.notify_create("Post", 1, {"draft": True})
    assert await live.version("Post") == 1

    fault_injector.crash_next(live.ref)
    with pytest.raises(ActorCrashed):
        await live.version("Post")

    await live.notify_update("Post", 1, {"draft": False})  # the cached row survived: an enter
    assert await live.version("Post") == 2
    assert live.ref.statistics().restarts == 1
    assert connection.actions() == [("enter", 1)]
    assert seen(queue) == [("create", 1), ("update", 1)]
    assert handled == [1, 1]


async def test_spec_with_an_explicit_store(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    store = LiveStore(LiveConfig(log_size=10))
    ref = await supervisor.start_child(LiveQuery.spec(store, id="queries"))
    live = LiveQuery(ref, store)
    assert ref.path == "/test/queries"
    await live.notify_create("Post", 1, {})
    assert await live.version("Post") == 1
    assert live.statistics().changes == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        LiveConfig(max_rows=-1)
    with pytest.raises(ValueError, match="handler_timeout"):
        LiveConfig(handler_timeout=0)
    with pytest.raises(ValueError, match="watch_buffer"):
        LiveConfig(watch_buffer=0)
    assert LiveConfig(handler_timeout=None).handler_timeout is None


class Exploding(Recorder):
    """A subscriber with a bug: it raises on its ``explode_on``-th delivery."""

    def __init__(self, connection_id: str, explode_on: int) -> None:
        super().__init__(connection_id)
        self.explode_on = explode_on

    def deliver_nowait(self, event: Event) -> bool:
        if len(self.events) + 1 == self.explode_on:
            self.explode_on = 0
            raise RuntimeError("subscriber bug")
        return super().deliver_nowait(event)


async def test_a_crash_while_publishing_is_never_a_silent_gap(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    calm = Recorder("calm")
    buggy = Exploding("buggy", explode_on=2)
    other_model = Recorder("other")
    # Watchers are delivered in watch order: ``calm`` gets version 2, then
    # ``buggy`` raises on it, and the subscriber-less watch never gets it.
    await live.watch("Post", subscriber=calm)
    await live.watch("Post", subscriber=buggy)
    queue = live.subscription(await live.watch("Post"))
    await live.watch("User", subscriber=other_model)
    await live.notify_create("Post", 1, {"n": 1})
    with pytest.raises(ActorCrashed):
        await live.notify_create("Post", 2, {"n": 2})  # the notifier knows
    assert await live.version("Post") == 2  # after the restart; the change was logged
    assert live.ref.statistics().restarts == 1
    # The restarted actor told the Post watchers to re-sync, with the version
    # to resume from; the User watcher saw nothing.
    assert [event.type for event in calm.events] == ["change", "change", "live_reset"]
    assert [event.type for event in buggy.events] == ["change", "live_reset"]
    reset = buggy.events[-1]
    assert reset.data == {"model": "Post", "version": 2, "epoch": live.epoch}
    assert other_model.events == []
    assert queue.receive_nowait().pk == 1
    with pytest.raises(WatchOverflowed, match="restarted") as ended:
        queue.receive_nowait()
    assert ended.value.version == 1
    # The reset ended every Post watch: no later change reaches them.
    assert live.statistics().watchers == 1  # the User watch
    # Resuming from the last version each had gives exactly what was missed.
    resumed = live.subscription(await live.watch("Post", since=ended.value.version, epoch=live.epoch))
    assert seen(resumed) == [("create", 2)]
    await live.watch("Post", subscriber=buggy, since=1, epoch=live.epoch)
    await live.notify_create("Post", 3, {"n": 3})
    assert [event.data["pk"] for event in buggy.events if event.type == "change"] == [1, 2, 3]
    assert [event.type for event in calm.events] == ["change", "change", "live_reset"]
    assert seen(resumed) == [("create", 3)]


def topics(recorder: Recorder) -> list[tuple[str, str, Any]]:
    return [(event.type, event.topic, event.seq) for event in recorder.events]


async def test_a_reset_ends_the_connection_watch_and_since_resumes_exactly(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    connection = Recorder("c1")
    buggy = Exploding("c2", explode_on=2)
    old = await live.watch("Post", subscriber=buggy)  # delivered first: it raises before c1 gets version 2
    watch = await live.watch("Post", subscriber=connection)
    await live.notify_create("Post", 1, {"n": 1})
    with pytest.raises(ActorCrashed):
        await live.notify_create("Post", 2, {"n": 2})
    assert await live.version("Post") == 2  # handled after the restarted actor's reset
    reset = Event(type="live_reset", topic=f"live:{watch}", data={"model": "Post", "version": 2, "epoch": live.epoch})
    assert connection.events[-1] == reset
    assert topics(connection) == [("change", f"live:{watch}", 1), ("live_reset", f"live:{watch}", None)]
    # The watches are ended: unwatching them finds nothing, and a later
    # change goes nowhere (no watcher of Post is left).
    assert await live.active([watch, old, "lq-unknown"]) == frozenset()
    assert live.statistics().watchers == 0
    await live.notify_create("Post", 3, {"n": 3})
    assert await live.unwatch(watch) is False
    assert topics(connection)[-1][0] == "live_reset"
    # Watching again since the last version received (1): the missed
    # changes once, in order, then the live ones, on the new topic only.
    again = await live.watch("Post", subscriber=connection, since=1, epoch=live.epoch)
    assert await live.active([watch, again]) == {again}
    await live.notify_create("Post", 4, {"n": 4})
    after = connection.events[2:]
    assert [(e.type, e.topic, e.seq, e.data["pk"]) for e in after] == [("change", f"live:{again}", v, v) for v in (2, 3, 4)]


async def test_no_change_queued_behind_the_crash_reaches_an_ended_watch(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    # Changes notified while the crashing one is handled wait in the mailbox;
    # the restarted actor ends the watches before it handles them.
    live = await start(supervisor)
    buggy = Exploding("c1", explode_on=1)
    watch = await live.watch("Post", subscriber=buggy)
    crashed: list[int] = []

    async def notify(pk: int) -> None:
        try:
            await live.notify_create("Post", pk, {"n": pk})
        except ActorCrashed:
            crashed.append(pk)

    async with trio.open_nursery() as nursery:
        for pk in (1, 2, 3):
            nursery.start_soon(notify, pk)
            await trio.lowlevel.checkpoint()  # queued in this order
    assert crashed == [1]
    assert topics(buggy) == [("live_reset", f"live:{watch}", None)]
    assert buggy.events[0].data["version"] == 1
    await live.watch("Post", subscriber=buggy, since=0, epoch=live.epoch)
    assert [event.data["pk"] for event in buggy.events[1:]] == [1, 2, 3]


async def test_a_reset_ends_every_watch_of_the_model_whatever_its_filters(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)
    buggy = Exploding("buggy", explode_on=1)
    open_orders = Recorder("open")
    big = Recorder("big")
    everything = Recorder("all")
    none = Recorder("none")
    shared = Recorder("shared")
    users = Recorder("users")
    await live.notify_create("Order", 1, {"status": "open", "total": 5})
    await live.watch("Order", subscriber=buggy)  # first: raises on version 2, before the others get it
    watches = {
        open_orders: await live.watch("Order", {"status": "open"}, subscriber=open_orders),
        big: await live.watch("Order", lambda row: int(str(row.get("total", 0))) > 10, subscriber=big),
        everything: await live.watch("Order", subscriber=everything),
        none: await live.watch("Order", {"status": "lost"}, subscriber=none),
    }
    # Two watches of one connection on one topic, with different filters.
    await live.watch("Order", {"status": "open"}, subscriber=shared, topic="orders")
    await live.watch("Order", {"status": "shipped"}, subscriber=shared, topic="orders")
    user_watch = await live.watch("User", subscriber=users)

    with pytest.raises(ActorCrashed):
        await live.notify_update("Order", 1, {"total": 20})  # version 2
    assert everything.events == []  # not published to it
    await live.notify_update("Order", 1, {"status": "shipped"})  # version 3, after the reset
    for recorder, watch in watches.items():
        assert topics(recorder) == [("live_reset", f"live:{watch}", None)], recorder.connection_id
    assert topics(shared) == [("live_reset", "orders", None)] * 2
    assert shared.events[0] is shared.events[1]  # one event per topic
    assert users.events == []
    assert await live.active([*watches.values(), user_watch]) == {user_watch}
    assert live.statistics().watchers == 1

    # Each resumes since the last version it received (1, the version at its
    # watch): exactly what its filter admits of versions 2 and 3.
    expected = {
        open_orders: [("update", 2), ("leave", 3)],
        big: [("enter", 2), ("update", 3)],
        everything: [("update", 2), ("update", 3)],
        none: [],
    }
    for recorder in expected:
        recorder.events.clear()
    for recorder, filters in (
        (open_orders, {"status": "open"}),
        (big, lambda row: int(str(row.get("total", 0))) > 10),
        (everything, None),
        (none, {"status": "lost"}),
    ):
        await live.watch("Order", filters, subscriber=recorder, since=1, epoch=live.epoch)
    await live.notify_update("Order", 1, {"total": 30})  # version 4: shipped, 30
    expected[big].append(("update", 4))
    expected[everything].append(("update", 4))
    for recorder, actions in expected.items():
        assert [(e.data["action"], e.seq) for e in recorder.events] == actions, recorder.connection_id


async def test_a_handler_may_notify_without_deadlock(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    live = await start(supervisor)

    @live.on_change("Comment")
    async def count_comments(change: ModelChange) -> None:
        await live.notify_update("Post", 1, {"comments": change.pk})

    queue = live.subscription(await live.watch("Post"))
    with trio.fail_after(1):
        await live.notify_create("Comment", 7, {"post": 1})
        assert await live.version("Post") == 1  # queued behind the Comment change, handled before this ask
    assert [(c.action, c.data) for c in drain(queue)] == [("update", {"comments": 7})]


# -- over the protocol handler: the connection's watches --------------------------------


class Client:
    """A protocol client over MemoryTransport (as in tests/test_protocol_handler.py)."""

    def __init__(self, handler: ProtocolHandler, transport: MemoryTransport, connection_id: str) -> None:
        self.handler = handler
        self.transport = transport
        self.id = connection_id
        self._seen = 0
        self._refs = 0

    async def ask(self, frame: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send a command; return its answer and the frames that came before it."""
        self._refs += 1
        frame["ref"] = self._refs
        await self.handler.frame(self.id, json.dumps(frame))
        before = []
        for received in await self.new():
            if received.get("ref") == self._refs and received["type"] in {"reply", "error"}:
                return received, before
            before.append(received)
        raise AssertionError(f"no answer to {frame}")

    async def new(self) -> list[dict[str, Any]]:
        await trio.sleep(0.1)
        frames = [json.loads(line) for sent in self.transport.sent for line in sent.split(b"\n")]
        fresh, self._seen = frames[self._seen :], len(frames)
        return fresh


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    config = HubConfig(rate_limit=WSRateLimitConfig(messages_per_second=1000, messages_per_minute=100000, burst_size=1000))
    async with open_hub(config) as hub:
        yield hub


async def connect(handler: ProtocolHandler, user: str) -> Client:
    transport = MemoryTransport()
    info = await handler.open(transport, Identity(user_id=user))
    client = Client(handler, transport, info.connection_id)
    await client.new()  # the welcome
    return client


def changes(frames: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(f["topic"], f["data"]["action"], f["seq"]) for f in frames if f["type"] == "change"]


async def test_a_connection_rewatches_after_live_reset_without_loss_or_duplicates(hub: Hub, autojump_clock: trio.abc.Clock) -> None:
    handler = ProtocolHandler(hub, watchable_models="*", max_watches_per_connection=2).install()
    alice = await connect(handler, "alice")
    bob = await connect(handler, "bob")
    live = hub.live
    await live.notify_create("Order", 1, {"status": "open", "total": 10})
    a1, _ = await alice.ask({"type": "watch", "model": "Order"})
    a2, _ = await alice.ask({"type": "watch", "model": "Order", "filters": {"status": "shipped"}})
    b1, _ = await bob.ask({"type": "watch", "model": "Order", "filters": {"status": "open"}})
    old = {a1["data"]["id"], a2["data"]["id"], b1["data"]["id"]}

    await crash_mid_publish(live, live.notify_update("Order", 1, {"total": 12}))  # version 2
    await live.notify_update("Order", 1, {"total": 14})  # version 3: after the reset
    epoch = live.epoch
    for client, watches in ((alice, (a1, a2)), (bob, (b1,))):
        frames = await client.new()
        # Every watch of the model is reset (whatever its filter) and ended:
        # no change after the reset on its topic.
        resets = [f for f in frames if f["type"] == "live_reset"]
        assert [f["topic"] for f in resets] == [f"live:{w['data']['id']}" for w in watches]
        assert all(f["data"] == {"model": "Order", "version": 2, "epoch": epoch} for f in resets)
        last = max(i for i, f in enumerate(frames) if f["type"] == "live_reset")
        assert changes(frames[last:]) == []
    assert await live.active(old) == frozenset()

    # Unwatching an ended watch answers as for any watch the connection does not have.
    answer, _ = await alice.ask({"type": "unwatch", "id": a1["data"]["id"]})
    assert (answer["type"], answer["code"]) == ("error", "not_found")
    # The ended watches no longer count against the limit (2): alice watches
    # again twice, since the last version she received (1).
    again, replayed = await alice.ask({"type": "watch", "model": "Order", "since": 1, "epoch": epoch})
    topic = f"live:{again['data']['id']}"
    assert again["data"]["version"] == 3
    assert changes(replayed) == [(topic, "update", 2), (topic, "update", 3)]
    shipped, replayed = await alice.ask({"type": "watch", "model": "Order", "filters": {"status": "shipped"}, "since": 1})
    assert shipped["type"] == "reply"
    assert changes(replayed) == []
    answer, _ = await alice.ask({"type": "watch", "model": "Order"})
    assert answer["code"] == "too_many_watches"
    rewatched, replayed = await bob.ask({"type": "watch", "model": "Order", "filters": {"status": "open"}, "since": 1})
    bob_topic = f"live:{rewatched['data']['id']}"
    assert changes(replayed) == [(bob_topic, "update", 2), (bob_topic, "update", 3)]

    await live.notify_update("Order", 1, {"status": "shipped"})  # version 4
    assert changes(await alice.new()) == [(topic, "update", 4), (f"live:{shipped['data']['id']}", "enter", 4)]
    assert changes(await bob.new()) == [(bob_topic, "leave", 4)]
    answer, _ = await alice.ask({"type": "unwatch", "id": again["data"]["id"]})
    assert answer["data"] == {"id": again["data"]["id"], "unwatched": True}
