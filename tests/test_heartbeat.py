"""The heartbeat sweeper: one task pings silent connections and closes dead ones.

The sweeper's decisions run on Trio's virtual clock against a fake
connection manager; the end-to-end test (a client that never answers pings)
runs over a real socket with short intervals and ``fail_after`` deadlines.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from _sockets import closed_with, make_config, open_websocket_url, receive_json, receive_until, request, running_server

from ensemble.protocol import CloseCode
from ensemble.realtime import OutboxStatistics
from ensemble.server._config import HeartbeatConfig
from ensemble.server._heartbeat import PING_FRAME, Heartbeat, Sweep


class FakeConnections:
    """Records what the sweeper asks of the connection manager."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes]] = []
        self.closed: list[tuple[str, int, str]] = []
        self.taken: dict[str, int] = {}  # outbox events taken so far, per connection (write progress)

    def send_frame_nowait(self, connection_id: str, frame: bytes) -> bool:
        self.frames.append((connection_id, frame))
        return True

    async def disconnect(self, connection_id: str, *, code: int = 1000, reason: str = "") -> bool:
        await trio.lowlevel.checkpoint()
        self.closed.append((connection_id, code, reason))
        return True

    def outbox_statistics(self, connection_id: str) -> OutboxStatistics | None:
        taken = self.taken.get(connection_id)
        if taken is None:
            return None
        return OutboxStatistics(
            depth=1,
            bytes=1,
            peak=1,
            peak_bytes=1,
            max_events=10,
            max_bytes=100,
            accepted=taken,
            coalesced=0,
            dropped=0,
            refused=0,
            delivered=taken,
            overflowed=False,
            closed=False,
        )


def test_the_sweep_decides_pings_and_timeouts() -> None:
    now = [100.0]
    beat = Heartbeat(FakeConnections(), interval=10.0, timeout=5.0, clock=lambda: now[0])
    beat.opened("quiet")
    beat.opened("chatty")
    beat.opened("dead")
    now[0] = 109.0
    assert beat.sweep() == Sweep()  # nobody silent for 10 s yet
    now[0] = 110.0
    beat.seen("chatty")
    assert beat.sweep() == Sweep(ping=("quiet", "dead"))
    now[0] = 112.0
    assert beat.sweep() == Sweep()  # pinged already in this interval
    beat.seen("quiet")  # answered
    now[0] = 115.0
    assert beat.sweep() == Sweep(timed_out=("dead",))
    assert "dead" not in beat  # being closed: no longer tracked
    now[0] = 120.0
    assert beat.sweep() == Sweep(ping=("chatty",))
    assert len(beat) == 2


def test_expired_and_unauthenticated_connections_are_deduplicated() -> None:
    now = [0.0]
    beat = Heartbeat(
        FakeConnections(),
        interval=10.0,
        timeout=5.0,
        unauthenticated=lambda wall: ["b"],
        expiring=lambda wall: ["b", "c", "a"],
        clock=lambda: now[0],
        wall_clock=lambda: 1_000.0,
    )
    beat.opened("a")
    now[0] = 20.0
    sweep = beat.sweep()
    assert sweep == Sweep(timed_out=("a",), unauthenticated=("b",), expired=("c",))


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval and timeout"):
        Heartbeat(FakeConnections(), interval=0, timeout=1)
    with pytest.raises(ValueError, match="tick"):
        Heartbeat(FakeConnections(), interval=1, timeout=1, tick=0)


async def test_one_task_pings_and_closes(autojump_clock: trio.testing.MockClock) -> None:
    connections = FakeConnections()
    beat = Heartbeat(connections, interval=10.0, timeout=5.0, expiring=lambda wall: [], tick=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(beat.run)
        beat.opened("silent")
        beat.opened("alive")
        for _ in range(30):
            await trio.sleep(1.0)
            beat.seen("alive")
        nursery.cancel_scope.cancel()
    assert ("silent", PING_FRAME) in connections.frames
    assert all(cid == "silent" for cid, _ in connections.frames)
    assert connections.closed == [("silent", CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")]
    stats = beat.statistics()
    assert stats.pings == 1
    assert stats.timed_out == 1
    assert stats.sweeps >= 29


async def test_a_close_in_progress_is_not_started_twice(autojump_clock: trio.testing.MockClock) -> None:
    class Slow(FakeConnections):
        async def disconnect(self, connection_id: str, *, code: int = 1000, reason: str = "") -> bool:
            await trio.sleep(10.0)
            return await super().disconnect(connection_id, code=code, reason=reason)

    connections = Slow()
    beat = Heartbeat(connections, interval=1.0, timeout=1.0, expiring=lambda wall: ["x"], tick=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(beat.run)
        await trio.sleep(5.5)  # five sweeps while the first close is under way
        nursery.cancel_scope.cancel()
    assert beat.statistics().expired == 1


# -- over a real socket ---------------------------------------------------------------------


async def test_a_client_that_never_answers_pings_is_closed_with_4009_and_its_presence_ends(transport: str) -> None:
    config = make_config(heartbeat=HeartbeatConfig(interval=0.2, timeout=0.3))
    async with (
        running_server(config, transport=transport) as server,
        open_websocket_url(server.ws_url("token=alice")) as alice,
        open_websocket_url(server.ws_url("token=bob")) as bob,
    ):
        await receive_json(alice)
        await receive_json(bob)
        await request(alice, 1, type="join", room="general")
        await request(bob, 1, type="join", room="general")
        pings = 0

        async def answer_pings() -> None:
            nonlocal pings
            while True:
                frame = await receive_json(alice)
                if frame["type"] == "ping":
                    pings += 1
                    await alice.send_message(json.dumps({"type": "pong"}))
                if frame["type"] == "presence" and frame["data"] == {"user_id": "bob", "online": False}:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_pings)
            # Bob reads (his client works) but never answers: the server gives up on him.
            assert await closed_with(bob) == CloseCode.HEARTBEAT_TIMEOUT == 4009
        assert pings >= 1  # alice was pinged too, answered, and stays
        assert (await request(alice, 2, type="ping"))["type"] == "pong"
        assert server.app.hub is not None
        assert not server.app.hub.is_online("bob")
        assert server.app.hub.is_online("alice")
        assert server.app.heartbeat is not None
        assert server.app.heartbeat.statistics().timed_out == 1


async def test_a_ping_frame_reaches_a_silent_client(transport: str) -> None:
    config = make_config(heartbeat=HeartbeatConfig(interval=0.2, timeout=5.0))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        frame: dict[str, Any] = await receive_until(ws, lambda frame: frame["type"] == "ping")
        assert frame == {"type": "ping"}


def test_a_busy_connection_still_reading_is_not_timed_out() -> None:
    # Its answer to the ping is queued behind a burst of events it is still
    # reading: write progress counts as life. A peer that stops reading dies.
    now = [0.0]
    connections = FakeConnections()
    beat = Heartbeat(connections, interval=10.0, timeout=5.0, clock=lambda: now[0])
    beat.opened("busy")
    beat.opened("stuck")
    connections.taken.update(busy=100, stuck=100)
    now[0] = 10.0
    assert sorted(beat.sweep().ping) == ["busy", "stuck"]
    connections.taken["busy"] = 250  # the busy one keeps taking frames
    now[0] = 15.0
    sweep = beat.sweep()
    assert list(sweep.timed_out) == ["stuck"]
    assert "busy" in beat
    now[0] = 25.0
    connections.taken["busy"] = 251  # only our next ping was taken: that is no sign of life
    now[0] = 30.0
    assert list(beat.sweep().timed_out) == ["busy"]
