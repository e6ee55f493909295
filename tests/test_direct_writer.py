"""The connection manager's direct writer (transports with ``send_nowait``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from _direct import DirectMemoryTransport

from ensemble.actors import Supervisor
from ensemble.realtime._connections import (
    CLOSE_INTERNAL_ERROR,
    SLOW_CONSUMER,
    ConnectionManager,
    MemoryTransport,
)
from ensemble.realtime._events import Event, EventBatch


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def event(n: int, topic: str = "room:a") -> Event:
    return Event(type="message", topic=topic, data={"n": n}, seq=n, epoch="e")


async def connect(manager: ConnectionManager, transport: MemoryTransport) -> Any:
    info = await manager.connect(transport)
    subscriber = manager.get_subscriber(info.connection_id)
    assert subscriber is not None
    return subscriber


async def test_a_fan_out_is_written_by_the_one_writer(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor)
    transports = [DirectMemoryTransport() for _ in range(50)]
    subscribers = [await connect(manager, transport) for transport in transports]
    await settle()
    shared = event(1)
    for subscriber in subscribers:
        subscriber.deliver_nowait(shared)
    await settle()
    for transport in transports:
        assert transport.direct == [1]
        assert transport.waited == []  # no connection actor wrote
        assert transport.sent == [shared.encoded]
    # The writer is one actor under the connections' supervisor, not one per connection.
    assert supervisor.child("writer") is not None


async def test_events_queued_before_the_writer_runs_go_out_together(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor)
    transport = DirectMemoryTransport()
    subscriber = await connect(manager, transport)
    await settle()
    for n in range(1, 6):
        subscriber.deliver_nowait(event(n))
    subscriber.deliver_batch_nowait(EventBatch([event(n) for n in range(6, 9)]))
    await settle()
    assert transport.direct == [8]
    assert [frame["data"]["n"] for frame in transport.frames] == list(range(1, 9))
    assert manager.outbox_statistics(manager.get_all_connections()[0].connection_id).delivered == 8  # type: ignore[union-attr]


async def test_what_the_kernel_did_not_take_is_written_by_the_actor_in_order(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock
) -> None:
    manager = ConnectionManager(supervisor)
    transport = DirectMemoryTransport(room=2)
    subscriber = await connect(manager, transport)
    await settle()
    for n in range(1, 6):
        subscriber.deliver_nowait(event(n))
    await settle()
    # Two went directly; the three left were written by the actor (which may wait).
    assert transport.direct == [5]
    assert transport.waited == [0]
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3, 4, 5]
    transport.room = None
    subscriber.deliver_nowait(event(6))
    await settle()
    assert transport.direct == [5, 1]  # direct again once nothing is left over
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3, 4, 5, 6]


async def test_events_arriving_while_the_actor_waits_follow_the_remainder(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor)
    transport = DirectMemoryTransport(room=1)
    subscriber = await connect(manager, transport)
    await settle()
    transport.block()  # the client stops reading: the actor's write of the remainder waits
    subscriber.deliver_nowait(event(1))
    subscriber.deliver_nowait(event(2))
    await settle()
    assert transport.direct == [2]
    assert transport.writing
    for n in range(3, 5):
        subscriber.deliver_nowait(event(n))  # not direct: the actor is writing
        await settle()
    assert transport.direct == [2]
    assert transport.sent == []
    transport.unblock()
    await settle()
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3, 4]
    subscriber.deliver_nowait(event(5))
    await settle()
    assert transport.direct == [2, 1]


async def test_a_slow_consumer_on_a_direct_transport_is_closed_with_written_positions(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock
) -> None:
    manager = ConnectionManager(supervisor, outbox_max_events=3)
    transport = DirectMemoryTransport(room=2, stop_reading_when_full=True)
    subscriber = await connect(manager, transport)
    await settle()
    for n in range(1, 4):
        subscriber.deliver_nowait(event(n))
    await settle()
    assert [json.loads(frame)["data"]["n"] for frame in transport.sent] == [1, 2]  # event 3 is kept by the transport
    for n in range(4, 9):
        subscriber.deliver_nowait(event(n))
        await settle()
    assert transport.close_code == SLOW_CONSUMER
    assert transport.close_reason is not None
    # Event 3 was handed to the transport, which writes it before the close frame.
    assert json.loads(transport.close_reason)["positions"] == {"room:a": ["e", 3]}
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3]


async def test_a_failed_direct_write_closes_only_that_connection(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    closed: list[str] = []
    manager = ConnectionManager(supervisor)

    async def on_disconnect(info: Any) -> None:
        closed.append(info.connection_id)

    manager.on_disconnect = on_disconnect
    broken, healthy = DirectMemoryTransport(), DirectMemoryTransport()
    subscribers = [await connect(manager, broken), await connect(manager, healthy)]
    await settle()
    broken.fail()
    for subscriber in subscribers:
        subscriber.deliver_nowait(event(1))
    await settle()
    assert broken.close_code == CLOSE_INTERNAL_ERROR
    assert broken.close_reason == "send failed: BrokenResourceError"
    assert len(closed) == 1
    assert manager.statistics().transport_errors == 1
    assert healthy.close_code is None
    assert [frame["data"]["n"] for frame in healthy.frames] == [1]


async def test_max_batch_takes_turns_between_connections(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor, max_batch=2)
    transports = [DirectMemoryTransport(), DirectMemoryTransport()]
    subscribers = [await connect(manager, transport) for transport in transports]
    await settle()
    order: list[int] = []
    for index, transport in enumerate(transports):
        original = transport.send_nowait

        def recording(frames: list[bytes], original: Any = original, index: int = index) -> bool:
            order.append(index)
            result: bool = original(frames)
            return result

        transport.send_nowait = recording  # type: ignore[method-assign]
    for subscriber in subscribers:
        for n in range(1, 6):
            subscriber.deliver_nowait(event(n))
    await settle()
    assert order == [0, 1, 0, 1, 0, 1]
    for transport in transports:
        assert transport.direct == [2, 2, 1]
        assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3, 4, 5]


async def test_batch_frames_on_the_direct_path(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor, batch_frames=True)
    transport = DirectMemoryTransport()
    subscriber = await connect(manager, transport)
    await settle()
    for n in range(1, 4):
        subscriber.deliver_nowait(event(n))
    await settle()
    assert transport.direct == [1]
    assert [item["data"]["n"] for item in transport.frames[0]] == [1, 2, 3]


async def test_a_write_interval_uses_the_actors(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor, min_write_interval=0.05)
    transport = DirectMemoryTransport()
    subscriber = await connect(manager, transport)
    await settle()
    subscriber.deliver_nowait(event(1))
    await settle()
    assert transport.direct == []
    assert transport.waited == [1]


async def test_a_transport_that_raises_in_the_writer_is_written_by_its_actor(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    manager = ConnectionManager(supervisor)
    odd, fine = DirectMemoryTransport(), DirectMemoryTransport()
    subscribers = [await connect(manager, odd), await connect(manager, fine)]
    await settle()

    calls = []

    def broken_check() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the transport")
        return not odd.pending and not odd.writing

    odd.can_send_nowait = broken_check  # type: ignore[method-assign]
    for subscriber in subscribers:
        subscriber.deliver_nowait(event(1))
    await settle()
    assert odd.waited == [1]
    assert fine.direct == [1]
    assert "the direct write to" in caplog.text
    assert odd.close_code is None


async def test_closing_writes_the_queue_and_the_writer_skips_closed_connections(
    supervisor: Supervisor, autojump_clock: trio.abc.Clock
) -> None:
    manager = ConnectionManager(supervisor)
    transport = DirectMemoryTransport()
    subscriber = await connect(manager, transport)
    await settle()
    for n in range(1, 4):
        subscriber.deliver_nowait(event(n))
    await manager.disconnect(manager.get_all_connections()[0].connection_id, reason="bye")
    await settle()
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3]
    assert transport.close_reason == "bye"
    assert not subscriber.deliver_nowait(event(4))


async def test_a_supervisor_shutdown_with_writes_queued(autojump_clock: trio.abc.Clock) -> None:
    from ensemble.actors import open_supervisor

    transports = [DirectMemoryTransport() for _ in range(3)]
    async with open_supervisor(name="s") as supervisor:
        manager = ConnectionManager(supervisor)
        subscribers = [await connect(manager, transport) for transport in transports]
        await settle()
        for subscriber in subscribers:
            subscriber.deliver_nowait(event(1))
    for transport in transports:
        assert transport.closed


class RelayTransport(DirectMemoryTransport):
    """Like the ASGI transport: a writer task of its own, busy or idle."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = False
        self.callback: Any = None

    def can_send_nowait(self) -> bool:
        return super().can_send_nowait() and not self.busy

    def wake_when_writable(self, callback: Any) -> bool:
        if self.closed or not self.busy:
            return False
        self.callback = callback
        return True

    def idle(self) -> None:
        self.busy = False
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()


async def test_a_busy_transport_wakes_the_writer_when_it_is_idle(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor)
    transport = RelayTransport()
    subscriber = await connect(manager, transport)
    await settle()
    subscriber.deliver_nowait(event(1))
    await settle()
    transport.busy = True  # its writer task is writing event 1
    for n in range(2, 5):
        subscriber.deliver_nowait(event(n))
        await settle()
    assert transport.callback is not None
    assert transport.direct == [1]
    assert transport.waited == []  # the connection's actor did not wait for it either
    transport.idle()
    await settle()
    assert transport.direct == [1, 3]  # what queued meanwhile, in one hand-over
    assert [frame["data"]["n"] for frame in transport.frames] == [1, 2, 3, 4]


async def test_a_busy_transport_still_closes_a_slow_consumer(supervisor: Supervisor, autojump_clock: trio.abc.Clock) -> None:
    manager = ConnectionManager(supervisor, outbox_max_events=3)
    transport = RelayTransport()
    subscriber = await connect(manager, transport)
    await settle()
    subscriber.deliver_nowait(event(1))
    await settle()
    transport.busy = True  # and never idle again (a client that stopped reading)
    for n in range(2, 7):
        subscriber.deliver_nowait(event(n))
        await settle()
    assert transport.close_code == SLOW_CONSUMER
    assert transport.close_reason is not None
    assert json.loads(transport.close_reason)["positions"] == {"room:a": ["e", 1]}
