"""Tests of the connection actors and the ConnectionManager."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from ensemble.actors import Supervisor, open_supervisor
from ensemble.realtime._connections import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    RATE_LIMITED,
    SLOW_CONSUMER,
    ConnectionManager,
    MemoryTransport,
    RoomStats,
)
from ensemble.realtime._errors import NotAllowed, NotFound, RateLimited, TooManyConnections
from ensemble.realtime._events import Event
from ensemble.realtime._models import ConnectionInfo
from ensemble.realtime._ratelimit import WebSocketRateLimiter, WSRateLimitConfig
from ensemble.testing import FaultInjector


async def settle() -> None:
    """Let every connection actor run until it blocks."""
    await trio.testing.wait_all_tasks_blocked()


class Recorder:
    """Records hook calls."""

    def __init__(self) -> None:
        self.connected: list[ConnectionInfo] = []
        self.disconnected: list[ConnectionInfo] = []
        self.online: list[str] = []
        self.offline: list[str] = []

    async def on_connect(self, info: ConnectionInfo) -> None:
        self.connected.append(info)

    async def on_disconnect(self, info: ConnectionInfo) -> None:
        self.disconnected.append(info)

    async def on_online(self, user_id: str) -> None:
        self.online.append(user_id)

    async def on_offline(self, user_id: str) -> None:
        self.offline.append(user_id)

    def disconnect_counts(self) -> Counter[str]:
        return Counter(info.connection_id for info in self.disconnected)


def make_manager(supervisor: Supervisor, recorder: Recorder | None = None, **options: Any) -> ConnectionManager:
    if recorder is not None:
        options.setdefault("on_user_online", recorder.on_online)
        options.setdefault("on_user_offline", recorder.on_offline)
    manager = ConnectionManager(supervisor, clock=lambda: 1234.5, **options)
    if recorder is not None:
        manager.on_connect = recorder.on_connect
        manager.on_disconnect = recorder.on_disconnect
    return manager


# -- connect, queries, disconnect ---------------------------------------------------


async def test_connect_and_queries(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    metadata = {"device": "mobile"}
    info = await manager.connect(MemoryTransport(), user_id="alice", metadata=metadata)
    metadata["device"] = "changed"  # copied at connect
    assert isinstance(info, ConnectionInfo)
    assert info.user_id == "alice"
    assert info.connected_at == 1234.5
    assert dict(info.metadata) == {"device": "mobile"}
    assert info.rooms == frozenset()
    other = await manager.connect(MemoryTransport(), user_id="alice")
    anonymous = await manager.connect(MemoryTransport())
    assert anonymous.user_id is None
    assert manager.get_connection(info.connection_id) == info
    assert manager.get_connection("nope") is None
    assert {c.connection_id for c in manager.get_user_connections("alice")} == {info.connection_id, other.connection_id}
    assert manager.get_user_connections("bob") == []
    assert len(manager.get_all_connections()) == 3
    assert manager.connection_count == 3
    assert len({info.connection_id, other.connection_id, anonymous.connection_id}) == 3
    ref = manager.connection_ref(info.connection_id)
    assert ref is not None
    assert ref.path == f"/test/{info.connection_id}"
    assert manager.get_subscriber(info.connection_id) is not None
    assert manager.statistics().connections == 3


async def test_disconnect(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    transport = MemoryTransport()
    info = await manager.connect(transport, user_id="alice")
    assert await manager.disconnect(info.connection_id) is True
    assert transport.close_code == CLOSE_NORMAL
    assert transport.close_reason == "disconnected"
    assert manager.get_connection(info.connection_id) is None
    assert manager.connection_count == 0
    assert manager.get_user_connections("alice") == []
    assert await manager.disconnect(info.connection_id) is False
    assert await manager.disconnect("unknown") is False
    assert recorder.disconnect_counts() == {info.connection_id: 1}
    await settle()
    assert supervisor.child(info.connection_id) is None
    assert manager.statistics().disconnected == 1


async def test_disconnect_with_code_and_reason(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    assert await manager.disconnect(info.connection_id, code=4001, reason="kicked")
    assert (transport.close_code, transport.close_reason, transport.closes) == (4001, "kicked", 1)


async def test_disconnect_writes_queued_events_first(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    transport.block()
    await manager.send_to_connection(info.connection_id, {"n": 1})
    await settle()
    await manager.send_to_connection(info.connection_id, {"n": 2})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.disconnect, info.connection_id)
        await settle()
        transport.unblock()
    assert [event["data"]["n"] for event in transport.events] == [1, 2]
    assert transport.close_code == CLOSE_NORMAL


async def test_disconnect_of_a_stuck_client_is_forced(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder, close_timeout=2.0)
    transport = MemoryTransport()
    transport.block()
    info = await manager.connect(transport)
    await manager.send_to_connection(info.connection_id, {"n": 1})
    await settle()
    assert await manager.disconnect(info.connection_id)
    assert transport.close_code == CLOSE_NORMAL
    assert transport.sent == []
    assert recorder.disconnect_counts() == {info.connection_id: 1}
    await settle()
    assert supervisor.child(info.connection_id) is None


async def test_disconnect_all(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    transports = [MemoryTransport() for _ in range(3)]
    for transport in transports:
        await manager.connect(transport, user_id="alice")
    assert await manager.disconnect_all() == 3
    assert manager.connection_count == 0
    assert [t.close_code for t in transports] == [CLOSE_GOING_AWAY] * 3
    assert len(recorder.disconnected) == 3
    assert recorder.offline == ["alice"]


async def test_supervisor_shutdown_closes_connections(autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    transport = MemoryTransport()
    async with open_supervisor(name="connections") as connections:
        manager = make_manager(connections, recorder)
        await manager.connect(transport, user_id="alice")
    assert transport.close_code == CLOSE_GOING_AWAY
    assert len(recorder.disconnected) == 1
    assert recorder.offline == ["alice"]
    assert manager.connection_count == 0


# -- limits -------------------------------------------------------------------------


async def test_max_connections(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, max_connections=2)
    first = await manager.connect(MemoryTransport())
    await manager.connect(MemoryTransport())
    with pytest.raises(TooManyConnections, match="max_connections") as info:
        await manager.connect(MemoryTransport())
    assert isinstance(info.value, ConnectionError)
    assert manager.connection_count == 2
    await manager.disconnect(first.connection_id)
    await manager.connect(MemoryTransport())


async def test_max_connections_per_user(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, max_connections_per_user=2)
    await manager.connect(MemoryTransport(), user_id="alice")
    await manager.connect(MemoryTransport(), user_id="alice")
    with pytest.raises(TooManyConnections, match="max_connections_per_user"):
        await manager.connect(MemoryTransport(), user_id="alice")
    await manager.connect(MemoryTransport(), user_id="bob")
    await manager.connect(MemoryTransport())  # anonymous: not limited per user
    assert manager.connection_count == 4


async def test_max_metadata_keys(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, max_metadata_keys=2)
    await manager.connect(MemoryTransport(), metadata={"a": 1, "b": 2})
    with pytest.raises(ValueError, match="at most 2"):
        await manager.connect(MemoryTransport(), metadata={"a": 1, "b": 2, "c": 3})
    assert manager.connection_count == 1


async def test_constructor_validates(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(ValueError, match="max_connections_per_user"):
        ConnectionManager(supervisor, max_connections_per_user=0)
    with pytest.raises(ValueError, match="max_batch"):
        ConnectionManager(supervisor, max_batch=0)
    with pytest.raises(ValueError, match="close_timeout"):
        ConnectionManager(supervisor, close_timeout=-1)


# -- sending ----------------------------------------------------------------------


async def test_send_to_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    assert await manager.send_to_connection(info.connection_id, {"type": "welcome"}) is True
    assert await manager.send_to_connection("unknown", {"type": "welcome"}) is False
    await settle()
    assert transport.events == [{"type": "data", "topic": f"connection:{info.connection_id}", "data": {"type": "welcome"}}]


async def test_send_to_user_and_broadcast(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    phone, laptop, other = MemoryTransport(), MemoryTransport(), MemoryTransport()
    await manager.connect(phone, user_id="alice")
    await manager.connect(laptop, user_id="alice")
    await manager.connect(other, user_id="bob")
    assert await manager.send_to_user("alice", {"type": "update"}) == 2
    assert await manager.send_to_user("nobody", {"type": "update"}) == 0
    assert await manager.broadcast({"type": "announcement"}) == 3
    await settle()
    assert [e["data"]["type"] for e in phone.events] == ["update", "announcement"]
    assert [e["data"]["type"] for e in laptop.events] == ["update", "announcement"]
    assert [e["data"]["type"] for e in other.events] == ["announcement"]
    assert phone.events[0]["topic"] == "user:alice"


async def test_unserialisable_data_raises_to_the_caller(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    await manager.connect(MemoryTransport())
    with pytest.raises(TypeError, match="not JSON serialisable"):
        await manager.broadcast({"bad": object()})
    assert manager.connection_count == 1


async def test_broadcast_serialises_once(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transports = [MemoryTransport() for _ in range(1000)]
    for transport in transports:
        await manager.connect(transport)
    assert await manager.broadcast({"type": "announcement"}) == 1000
    await settle()
    first = transports[0].sent[0]
    assert all(len(t.sent) == 1 and t.sent[0] is first for t in transports)


async def test_batch_frames(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, batch_frames=True)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    transport.block()
    await manager.send_to_connection(info.connection_id, {"n": 0})
    await settle()  # the actor is now blocked writing n=0
    for n in range(1, 4):
        await manager.send_to_connection(info.connection_id, {"n": n})
    transport.unblock()
    await settle()
    assert len(transport.sent) == 2
    assert isinstance(json.loads(transport.sent[1]), list)
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3]


async def test_events_from_rooms_and_coalescing(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = MemoryTransport()
    info = await manager.connect(transport, user_id="alice")
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    assert subscriber.connection_id == info.connection_id
    assert subscriber.user_id == "alice"
    transport.block()
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": 0}, seq=1, epoch="e"))
    await settle()
    for typing in (True, False, True):
        subscriber.deliver_nowait(Event(type="typing", topic="room:a", data={"typing": typing}, coalesce_key="bob"))
    transport.unblock()
    await settle()
    assert [event["type"] for event in transport.events] == ["message", "typing"]
    assert transport.events[1]["data"] == {"typing": True}


# -- rooms ----------------------------------------------------------------------------


async def test_rooms(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    t1, t2, t3 = MemoryTransport(), MemoryTransport(), MemoryTransport()
    c1 = (await manager.connect(t1, user_id="alice")).connection_id
    c2 = (await manager.connect(t2, user_id="alice")).connection_id
    c3 = (await manager.connect(t3, user_id="bob")).connection_id
    for room in ("general", "announcements", "team"):
        manager.add_room(c1, room)
    manager.add_room(c1, "general")  # idempotent
    manager.add_room(c2, "general")
    manager.add_room(c3, "general")
    manager.add_room(c3, "team")
    assert manager.get_connection_rooms(c1) == {"general", "announcements", "team"}
    assert manager.get_connection_rooms("unknown") == set()
    assert manager.get_connection(c1) is not None
    assert manager.get_connection(c1).rooms == frozenset({"general", "announcements", "team"})  # type: ignore[union-attr]
    assert {c.connection_id for c in manager.get_room_connections("general")} == {c1, c2, c3}
    assert manager.get_room_connections("nowhere") == []
    assert manager.room_stats() == {
        "general": RoomStats(connections=3, users=2),
        "announcements": RoomStats(connections=1, users=1),
        "team": RoomStats(connections=2, users=2),
    }
    assert manager.room_stats()["general"].to_dict() == {"connections": 3, "users": 2}
    assert await manager.broadcast_to_room("team", {"type": "standup"}) == 2
    assert await manager.broadcast_to_room("nowhere", {"type": "standup"}) == 0
    await settle()
    assert [len(t.events) for t in (t1, t2, t3)] == [1, 0, 1]
    assert t1.events[0]["topic"] == "room:team"

    assert manager.remove_room(c1, "team") is True
    assert manager.remove_room(c1, "team") is False
    assert manager.remove_room("unknown", "team") is False
    assert manager.get_connection_rooms(c1) == {"general", "announcements"}

    await manager.disconnect(c1)  # dead-connection cleanup: out of every room
    assert "announcements" not in manager.room_stats()
    assert manager.room_stats()["general"] == RoomStats(connections=2, users=2)
    with pytest.raises(NotFound):
        manager.add_room(c1, "general")


# -- hooks, crashes, slow and broken clients ----------------------------------------


async def test_hooks_run_once_per_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    first = await manager.connect(MemoryTransport(), user_id="alice")
    second = await manager.connect(MemoryTransport(), user_id="bob")
    assert [info.connection_id for info in recorder.connected] == [first.connection_id, second.connection_id]
    await manager.disconnect(first.connection_id)
    await manager.disconnect(first.connection_id)
    assert recorder.disconnect_counts() == {first.connection_id: 1}
    assert recorder.disconnected[0].user_id == "alice"


async def test_hook_errors_are_logged_not_raised(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(info: ConnectionInfo) -> None:
        raise RuntimeError("hook bug")

    manager = make_manager(supervisor)
    manager.on_connect = broken
    manager.on_disconnect = broken
    transport = MemoryTransport()
    info = await manager.connect(transport)
    assert manager.connection_count == 1
    assert await manager.disconnect(info.connection_id)
    assert transport.closed
    assert manager.statistics().hook_errors == 2
    assert "hook bug" in caplog.text


async def test_a_crash_closes_the_connection_once(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.abc.Clock
) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    transport = MemoryTransport()
    info = await manager.connect(transport, user_id="alice")
    ref = manager.connection_ref(info.connection_id)
    assert ref is not None
    fault_injector.crash_next(ref)
    await manager.send_to_connection(info.connection_id, {"n": 1})
    await settle()
    assert transport.close_code == CLOSE_INTERNAL_ERROR
    assert manager.get_connection(info.connection_id) is None
    assert recorder.disconnect_counts() == {info.connection_id: 1}
    assert recorder.offline == ["alice"]
    assert manager.statistics().crashes == 1
    assert not ref.alive
    assert await manager.disconnect(info.connection_id) is False
    assert recorder.disconnect_counts() == {info.connection_id: 1}


async def test_a_slow_consumer_does_not_delay_others_and_is_closed(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder, outbox_max_events=5)
    slow = MemoryTransport()
    slow.block()  # never reads again
    slow_id = (await manager.connect(slow, user_id="slowpoke")).connection_id
    fast = [MemoryTransport() for _ in range(3)]
    for transport in fast:
        await manager.connect(transport)
    counts = []
    for seq in range(1, 21):
        event = Event(type="message", topic="room:a", data={"n": seq}, seq=seq, epoch="e1")
        counts.append(sum(1 for conn in manager.get_all_connections() if _deliver(manager, conn.connection_id, event)))
        await settle()
        # Every fast client has everything so far: the slow one holds no one up.
        assert all(len(t.sent) == seq for t in fast)
    assert counts[0] == 4
    assert counts[-1] == 3
    assert slow.close_code == SLOW_CONSUMER
    assert slow.close_reason is not None
    reason = json.loads(slow.close_reason)
    assert reason == {"error": "slow_consumer", "positions": {}}  # nothing was written
    assert manager.get_connection(slow_id) is None
    assert recorder.disconnect_counts() == {slow_id: 1}
    assert recorder.offline == ["slowpoke"]
    assert manager.statistics().slow_consumers == 1
    assert all(not t.closed for t in fast)


async def test_slow_consumer_positions_are_those_written(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, outbox_max_events=3)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={}, seq=1, epoch="e1"))
    subscriber.deliver_nowait(Event(type="message", topic="room:b", data={}, seq=7, epoch="e2"))
    await settle()
    transport.block()
    for seq in range(2, 7):
        subscriber.deliver_nowait(Event(type="message", topic="room:a", data={}, seq=seq, epoch="e1"))
        await settle()
    assert transport.close_code == SLOW_CONSUMER
    assert transport.close_reason is not None
    assert json.loads(transport.close_reason)["positions"] == {"room:a": ["e1", 1], "room:b": ["e2", 7]}


async def test_a_broken_transport_closes_only_that_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    broken, healthy = MemoryTransport(), MemoryTransport()
    broken_id = (await manager.connect(broken, user_id="alice")).connection_id
    await manager.connect(healthy, user_id="bob")
    broken.fail()
    assert await manager.broadcast({"n": 1}) == 2
    await settle()
    assert broken.close_code == CLOSE_INTERNAL_ERROR
    assert broken.close_reason == "send failed: BrokenResourceError"
    assert manager.get_connection(broken_id) is None
    assert manager.connection_count == 1
    assert recorder.disconnect_counts() == {broken_id: 1}
    assert await manager.broadcast({"n": 2}) == 1
    await settle()
    assert [e["data"]["n"] for e in healthy.events] == [1, 2]
    assert manager.statistics().transport_errors == 1


async def test_online_and_offline_with_two_devices(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    assert not manager.is_online("alice")
    phone = await manager.connect(MemoryTransport(), user_id="alice")
    assert recorder.online == ["alice"]
    laptop = await manager.connect(MemoryTransport(), user_id="alice")
    assert recorder.online == ["alice"]  # the second device changes nothing
    await manager.connect(MemoryTransport())  # anonymous: no presence
    assert manager.is_online("alice")
    assert manager.online_users() == {"alice"}
    await manager.disconnect(phone.connection_id)
    assert recorder.offline == []
    assert manager.is_online("alice")
    await manager.disconnect(laptop.connection_id)
    assert recorder.offline == ["alice"]
    assert not manager.is_online("alice")
    await manager.connect(MemoryTransport(), user_id="alice")
    assert recorder.online == ["alice", "alice"]


def _deliver(manager: ConnectionManager, connection_id: str, event: Event) -> bool:
    subscriber = manager.get_subscriber(connection_id)
    return subscriber is not None and subscriber.deliver_nowait(event)


# -- writing drained batches ------------------------------------------------------


class FrameByFrameTransport(MemoryTransport):
    """A transport without ``send_many``: one ``send`` per frame."""

    send_many = None  # type: ignore[assignment]


class CountingTransport(MemoryTransport):
    """Counts the calls of ``send`` and ``send_many``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    async def send(self, data: bytes) -> None:
        self.calls.append(("send", 1))
        await super().send(data)

    async def send_many(self, frames: list[bytes]) -> None:
        self.calls.append(("send_many", len(frames)))
        await super().send_many(frames)


async def _queue_while_blocked(manager: ConnectionManager, transport: MemoryTransport, count: int) -> str:
    """Connect, block the transport on event 0, then queue events 1..count-1."""
    info = await manager.connect(transport)
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    transport.block()
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": 0}, seq=1, epoch="e"))
    await settle()  # the actor is now blocked writing event 0
    for n in range(1, count):
        subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": n}, seq=n + 1, epoch="e"))
    return info.connection_id


async def test_a_drained_batch_is_written_with_one_send_many(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = CountingTransport()
    await _queue_while_blocked(manager, transport, 6)
    transport.unblock()
    await settle()
    assert transport.calls == [("send", 1), ("send_many", 5)]
    # Still one frame per event, in order, each the event's shared bytes.
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3, 4, 5]
    assert all(isinstance(frame, dict) for frame in transport.frames)


async def test_max_batch_bounds_one_send_many(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, max_batch=2)
    transport = CountingTransport()
    await _queue_while_blocked(manager, transport, 6)
    transport.unblock()
    await settle()
    assert transport.calls == [("send", 1), ("send_many", 2), ("send_many", 2), ("send", 1)]
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3, 4, 5]


async def test_a_transport_without_send_many_gets_one_send_per_frame(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = FrameByFrameTransport()
    await _queue_while_blocked(manager, transport, 4)
    transport.unblock()
    await settle()
    assert len(transport.sent) == 4
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3]


async def test_slow_consumer_positions_after_batched_writes(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    # Events 1-3 are written by one send_many; then the client stops reading.
    manager = make_manager(supervisor, outbox_max_events=3)
    transport = MemoryTransport()
    await _queue_while_blocked(manager, transport, 3)
    transport.unblock()
    await settle()
    assert len(transport.sent) == 3
    subscriber = manager.get_subscriber(manager.get_all_connections()[0].connection_id)
    assert subscriber is not None
    transport.block()
    for seq in range(4, 9):
        subscriber.deliver_nowait(Event(type="message", topic="room:a", data={}, seq=seq, epoch="e"))
        await settle()
    assert transport.close_code == SLOW_CONSUMER
    assert transport.close_reason is not None
    assert json.loads(transport.close_reason)["positions"] == {"room:a": ["e", 3]}


async def test_a_failing_send_many_closes_the_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)
    transport = MemoryTransport()
    connection_id = await _queue_while_blocked(manager, transport, 4)
    transport.fail()
    transport.unblock()
    await settle()
    assert transport.close_code == CLOSE_INTERNAL_ERROR
    assert transport.close_reason == "send failed: BrokenResourceError"
    assert transport.sent == []
    assert recorder.disconnect_counts() == {connection_id: 1}


# -- inbound messages ------------------------------------------------------------


def limited_manager(supervisor: Supervisor, recorder: Recorder | None = None, **options: Any) -> ConnectionManager:
    limiter = WebSocketRateLimiter(WSRateLimitConfig(messages_per_second=2, messages_per_minute=100, burst_size=2), clock=trio.current_time)
    return make_manager(supervisor, recorder, rate_limiter=limiter, **options)


async def test_receive_calls_the_handler_in_order_and_returns_its_answer(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    seen: list[tuple[str | None, Any]] = []

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        await trio.sleep(1)  # one at a time per connection, even when slow
        seen.append((info.user_id, data))
        return {"echo": data}

    manager.on_message = on_message
    info = await manager.connect(MemoryTransport(), user_id="alice")
    answers: dict[int, Any] = {}

    async def send(n: int) -> None:
        answers[n] = await manager.receive(info.connection_id, n)

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(send, n)
            await trio.testing.wait_all_tasks_blocked()  # queued in this order
    assert seen == [("alice", n) for n in range(5)]
    assert answers == {n: {"echo": n} for n in range(5)}
    assert trio.current_time() == pytest.approx(5.0)  # never two at once


async def test_receive_errors(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    info = await manager.connect(MemoryTransport())
    with pytest.raises(NotAllowed, match="on_message"):
        await manager.receive(info.connection_id, "hi")

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        raise ValueError(f"bad input {data!r}")

    manager.on_message = on_message
    with pytest.raises(ValueError, match="bad input 'x'"):
        await manager.receive(info.connection_id, "x")
    assert manager.get_connection(info.connection_id) is not None  # a handler error is an answer, not a crash
    assert manager.statistics().crashes == 0
    with pytest.raises(NotFound):
        await manager.receive("nope", "x")
    await manager.disconnect(info.connection_id)
    with pytest.raises(NotFound):
        await manager.receive(info.connection_id, "x")


async def test_inbound_rate_limit_rejects_then_closes(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = limited_manager(supervisor, recorder, max_rate_violations=3)
    handled: list[Any] = []

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        handled.append(data)

    manager.on_message = on_message
    transport = MemoryTransport()
    other = MemoryTransport()
    info = await manager.connect(transport, user_id="spammer")
    other_info = await manager.connect(other, user_id="calm")
    await manager.receive(info.connection_id, 1)
    await manager.receive(info.connection_id, 2)
    with pytest.raises(RateLimited) as limited:
        await manager.receive(info.connection_id, 3)
    assert limited.value.retry_after > 0
    # The delay is in retry_after only: the text does not vary with timing.
    assert str(limited.value) == "rate limited: too many messages; retry after retry_after seconds"
    await trio.sleep(limited.value.retry_after)
    await manager.receive(info.connection_id, 4)  # an accepted message resets the count of violations
    # Within the same virtual instant: accepted until the windows are full,
    # then two refusals leave it open and the third closes it.
    accepted = 0
    while True:
        try:
            await manager.receive(info.connection_id, "x")
        except RateLimited:
            break
        accepted += 1
        assert accepted < 5
    with pytest.raises(RateLimited):
        await manager.receive(info.connection_id, "x")
    assert manager.get_connection(info.connection_id) is not None
    with pytest.raises(RateLimited, match="closed"):
        await manager.receive(info.connection_id, "x")
    assert transport.close_code == RATE_LIMITED
    assert transport.close_reason == "rate limited"
    assert manager.get_connection(info.connection_id) is None
    assert recorder.disconnect_counts() == {info.connection_id: 1}
    assert handled == [1, 2, 4] + ["x"] * accepted
    assert manager.statistics().rate_limited == 4
    with pytest.raises(NotFound):
        await manager.receive(info.connection_id, "x")
    # Another connection was never limited by the spammer.
    await manager.receive(other_info.connection_id, "fine")
    assert handled[-1] == "fine"
    assert manager.rate_limiter is not None
    assert manager.rate_limiter.statistics().tracked == 1  # the closed connection's state is gone


async def test_rate_limit_without_closing(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = limited_manager(supervisor, max_rate_violations=None)

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        return data

    manager.on_message = on_message
    info = await manager.connect(MemoryTransport())
    refused = 0
    for n in range(50):
        try:
            await manager.receive(info.connection_id, n)
        except RateLimited:
            refused += 1
    assert refused == 48
    assert manager.get_connection(info.connection_id) is not None
    with pytest.raises(ValueError, match="max_rate_violations"):
        make_manager(supervisor, max_rate_violations=0)


async def test_a_handler_may_disconnect_its_own_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    manager = make_manager(supervisor, recorder)

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        await manager.send_to_connection(info.connection_id, {"bye": True})
        return await manager.disconnect(info.connection_id, code=4000, reason="quit")

    manager.on_message = on_message
    transport = MemoryTransport()
    info = await manager.connect(transport)
    with trio.fail_after(1):  # not a wait for itself until close_timeout
        assert await manager.receive(info.connection_id, "quit") is True
    assert transport.close_code == 4000
    assert transport.close_reason == "quit"
    assert [event["data"] for event in transport.events] == [{"bye": True}]
    assert recorder.disconnect_counts() == {info.connection_id: 1}
    await settle()
    assert manager.supervisor.which_children() == []


async def test_inbound_backpressure(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    gate = trio.Event()

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        await gate.wait()

    manager.on_message = on_message
    info = await manager.connect(MemoryTransport())
    done = 0

    async def send() -> None:
        nonlocal done
        await manager.receive(info.connection_id, "x")
        done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(send)
        await settle()
        ref = manager.connection_ref(info.connection_id)
        assert ref is not None
        stats = ref.statistics()
        # One in the handler, 16 queued, the rest wait to enqueue: nothing dropped.
        assert (stats.mailbox_depth, stats.blocked_senders, stats.refused) == (16, 23, 0)
        gate.set()
    assert done == 40


async def test_send_frame_nowait_writes_the_bytes_in_order(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    transport = MemoryTransport()
    info = await manager.connect(transport)
    await manager.send_to_connection(info.connection_id, {"n": 1})
    assert manager.send_frame_nowait(info.connection_id, b'{"type":"reply","ref":7}')
    await manager.send_to_connection(info.connection_id, {"n": 2})
    await settle()
    assert transport.sent[1] == b'{"type":"reply","ref":7}'
    assert [frame.get("type") for frame in transport.frames] == ["data", "reply", "data"]
    assert not manager.send_frame_nowait("nope", b"{}")


# -- authenticating a connection in place ----------------------------------------


class Wiring:
    """Records ``on_authenticated`` calls (and can be made to fail)."""

    def __init__(self) -> None:
        self.calls: list[tuple[ConnectionInfo, Any]] = []
        self.written_before: list[int] = []  # frames written when it ran
        self.transport: MemoryTransport | None = None
        self.error: BaseException | None = None

    async def __call__(self, info: ConnectionInfo, context: Any) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append((info, context))
        if self.transport is not None:
            self.written_before.append(len(self.transport.sent))
        if self.error is not None:
            raise self.error


async def test_authenticate_keeps_the_connection_and_makes_it_the_users(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    wiring = Wiring()
    manager = make_manager(supervisor, recorder, on_authenticated=wiring)
    transport = MemoryTransport()
    anon = await manager.connect(transport, metadata={"device": "phone"})
    manager.add_room(anon.connection_id, "lobby")
    ref = manager.connection_ref(anon.connection_id)
    assert manager.room_stats()["lobby"].users == 0
    assert recorder.online == []

    info = await manager.authenticate(anon.connection_id, "alice", context="ctx")
    assert info.connection_id == anon.connection_id
    assert (info.user_id, info.connected_at, info.metadata, info.rooms) == (
        "alice",
        anon.connected_at,
        {"device": "phone"},
        frozenset({"lobby"}),
    )
    assert manager.get_connection(anon.connection_id) == info
    assert manager.connection_ref(anon.connection_id) is ref  # the same actor
    subscriber = manager.get_subscriber(anon.connection_id)
    assert subscriber is not None
    assert subscriber.user_id == "alice"  # the same outbox, now the user's
    assert [c.connection_id for c in manager.get_user_connections("alice")] == [anon.connection_id]
    assert manager.is_online("alice")
    assert recorder.online == ["alice"]  # online exactly as on connect
    assert [c.connection_id for c in recorder.connected] == [anon.connection_id]  # on_connect ran once, at connect
    assert [(c.user_id, context) for c, context in wiring.calls] == [("alice", "ctx")]
    assert manager.room_stats()["lobby"].users == 1
    assert manager.statistics().users == 1
    assert manager.statistics().connected == 1

    assert await manager.send_to_user("alice", {"hi": 1}) == 1
    await settle()
    assert [event["data"] for event in transport.events] == [{"hi": 1}]  # the same transport

    laptop = await manager.connect(MemoryTransport())
    await manager.authenticate(laptop.connection_id, "alice")
    assert recorder.online == ["alice"]  # the second device changes nothing
    await manager.disconnect(laptop.connection_id)
    await manager.disconnect(anon.connection_id)
    assert recorder.offline == ["alice"]
    assert recorder.disconnected[-1].user_id == "alice"
    assert not manager.is_online("alice")


async def test_authenticate_over_the_per_user_limit_leaves_the_connection_anonymous(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock
) -> None:
    recorder = Recorder()
    wiring = Wiring()
    manager = make_manager(supervisor, recorder, on_authenticated=wiring, max_connections_per_user=1)
    await manager.connect(MemoryTransport(), user_id="alice")
    transport = MemoryTransport()
    anon = await manager.connect(transport)
    with pytest.raises(TooManyConnections, match="max_connections_per_user") as refused:
        await manager.authenticate(anon.connection_id, "alice")
    assert isinstance(refused.value, ConnectionError)
    assert manager.get_connection(anon.connection_id) == anon  # unchanged: open, anonymous
    subscriber = manager.get_subscriber(anon.connection_id)
    assert subscriber is not None
    assert subscriber.user_id is None
    assert len(manager.get_user_connections("alice")) == 1
    assert wiring.calls == []
    assert recorder.online == ["alice"]
    assert not transport.closed
    info = await manager.authenticate(anon.connection_id, "bob")  # another user still may
    assert info.user_id == "bob"


async def test_authenticate_refusals(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    wiring = Wiring()
    manager = make_manager(supervisor, recorder, on_authenticated=wiring)
    alice = await manager.connect(MemoryTransport(), user_id="alice")
    # The same user: a no-op returning the connection as it is.
    assert await manager.authenticate(alice.connection_id, "alice") == alice
    assert wiring.calls == []
    assert recorder.online == ["alice"]
    # Another user: a connection's user never changes.
    with pytest.raises(ValueError, match="another user"):
        await manager.authenticate(alice.connection_id, "mallory")
    assert manager.get_connection(alice.connection_id) == alice
    assert manager.get_user_connections("mallory") == []
    anon = await manager.connect(MemoryTransport())
    with pytest.raises(ValueError, match="non-empty string"):
        await manager.authenticate(anon.connection_id, "")
    # Unknown or closed connections: NotFound, as receive raises.
    with pytest.raises(NotFound):
        await manager.authenticate("nope", "alice")
    await manager.disconnect(anon.connection_id)
    with pytest.raises(NotFound):
        await manager.authenticate(anon.connection_id, "alice")
    assert wiring.calls == []


async def test_a_handler_may_authenticate_its_own_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    wiring = Wiring()
    manager = make_manager(supervisor, recorder, on_authenticated=wiring)
    transport = MemoryTransport()
    wiring.transport = transport
    seen: list[tuple[str | None, Any]] = []

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        seen.append((info.user_id, data))
        if data == "whoami":
            return info.user_id
        await manager.send_to_connection(info.connection_id, {"before": "auth"})
        authenticated = await manager.authenticate(info.connection_id, data)
        await manager.send_to_connection(info.connection_id, {"after": "auth"})
        return authenticated

    manager.on_message = on_message
    anon = await manager.connect(transport)
    assert await manager.receive(anon.connection_id, "whoami") is None
    with trio.fail_after(1):  # not a wait for itself
        info = await manager.receive(anon.connection_id, "alice")
    assert (info.connection_id, info.user_id) == (anon.connection_id, "alice")
    assert await manager.receive(anon.connection_id, "whoami") == "alice"
    assert recorder.online == ["alice"]
    await settle()
    assert wiring.written_before == [1]  # what was queued while anonymous was written first
    assert [event["data"] for event in transport.events] == [{"before": "auth"}, {"after": "auth"}]
    assert seen == [(None, "whoami"), (None, "alice"), ("alice", "whoami")]
    with pytest.raises(ValueError, match="another user"):  # the handler's error is receive's answer
        await manager.receive(anon.connection_id, "mallory")
    assert manager.get_connection(anon.connection_id) is not None


async def test_authenticate_is_in_order_with_the_connections_messages(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor)
    seen: list[str | None] = []

    async def on_message(info: ConnectionInfo, data: Any) -> Any:
        await trio.sleep(1)  # slow: authenticate waits for it, in the actor's mailbox
        seen.append(info.user_id)

    manager.on_message = on_message
    anon = await manager.connect(MemoryTransport())
    authenticated: list[ConnectionInfo] = []

    async def authenticate() -> None:
        authenticated.append(await manager.authenticate(anon.connection_id, "alice"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.receive, anon.connection_id, "first")
        await settle()
        nursery.start_soon(authenticate)
        await settle()
        nursery.start_soon(manager.receive, anon.connection_id, "second")
        await settle()
        assert authenticated == []  # queued behind "first"
    assert seen == [None, "alice"]
    assert authenticated[0].user_id == "alice"
    assert trio.current_time() == pytest.approx(2.0)


async def test_a_failed_authentication_wiring_closes_the_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    recorder = Recorder()
    wiring = Wiring()
    wiring.error = RuntimeError("mailbox down")
    manager = make_manager(supervisor, recorder, on_authenticated=wiring)
    transport = MemoryTransport()
    anon = await manager.connect(transport)
    with pytest.raises(RuntimeError, match="mailbox down"):
        await manager.authenticate(anon.connection_id, "alice")
    assert (transport.close_code, transport.close_reason) == (CLOSE_INTERNAL_ERROR, "internal error")
    assert manager.get_connection(anon.connection_id) is None
    assert not manager.is_online("alice")
    assert recorder.online == recorder.offline == []  # never announced online
    assert recorder.disconnect_counts() == {anon.connection_id: 1}
    await settle()
    assert manager.supervisor.which_children() == []


async def test_min_write_interval_coalesces_a_trickle(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    """The first event after a quiet moment goes at once; those within the
    interval after a write wait for it and go out together."""
    manager = make_manager(supervisor, min_write_interval=0.01)
    transport = CountingTransport()
    info = await manager.connect(transport)
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    await trio.sleep(1)
    start = trio.current_time()
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": 0}, seq=1, epoch="e"))
    await settle()
    assert transport.calls == [("send", 1)]  # at once
    assert trio.current_time() == start
    for n in range(1, 4):
        subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": n}, seq=n + 1, epoch="e"))
        await trio.sleep(0.002)
    assert transport.calls == [("send", 1)]  # still within the interval
    await trio.sleep(0.01)
    assert transport.calls == [("send", 1), ("send_many", 3)]
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3]
    # A close writes what is queued at once.
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": 4}, seq=5, epoch="e"))
    await manager.disconnect(info.connection_id)
    assert [event["data"]["n"] for event in transport.events] == [0, 1, 2, 3, 4]


async def test_min_write_interval_does_not_wait_with_a_full_batch(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = make_manager(supervisor, min_write_interval=10.0, max_batch=3)
    transport = CountingTransport()
    info = await manager.connect(transport)
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": 0}, seq=1, epoch="e"))
    await settle()
    start = trio.current_time()
    for n in range(1, 4):
        subscriber.deliver_nowait(Event(type="message", topic="room:a", data={"n": n}, seq=n + 1, epoch="e"))
    await settle()
    assert transport.calls == [("send", 1), ("send_many", 3)]
    assert trio.current_time() == start
    with pytest.raises(ValueError, match="min_write_interval"):
        make_manager(supervisor, min_write_interval=-1)
