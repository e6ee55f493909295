"""Idle native connections hibernate: the reader's task, the connection's
actor and the user's mailbox actor end while the connection stays open, and
anything from either side brings them back.

Real loopback sockets on Trio's virtual clock (the client runs in the same
Trio run, so the clock jumps only when both sides wait).
"""

from __future__ import annotations

import json

import trio
import trio.testing
from _sockets import closed_with, make_config, open_websocket_url, receive_json, request, running_server
from _tasks import task_count

from ensemble.protocol import CloseCode

HIBERNATE_AFTER = 5.0


async def test_an_idle_connection_hibernates_and_wakes_for_the_client(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(transport="native", hub__hibernate_after=HIBERNATE_AFTER)
    async with running_server(config) as server, open_websocket_url(server.ws_url()) as ws:
        assert (await receive_json(ws))["type"] == "welcome"
        await trio.sleep(1)
        counters = server.app.counters
        # A new connection hibernates as soon as it is idle: its reader, its
        # actor and its user's mailbox actor hold no task.
        assert counters.readers_hibernated == 1
        assert server.hub.connections.supervisor.statistics().hibernating == 1
        assert server.hub.notifications._supervisor.statistics().hibernating == 1
        # The client speaks: the reader and the connection's actor wake.
        assert (await request(ws, 1, type="ping"))["type"] == "pong"
        assert counters.readers_woken == 1
        assert server.hub.connections.supervisor.statistics().hibernating == 0
        awake = task_count()
        # Idle for a period, they hibernate again.
        await trio.sleep(3 * HIBERNATE_AFTER)
        assert counters.readers_hibernated == 2
        assert task_count() == awake - 2
        assert server.hub.connections.supervisor.statistics().hibernating == 1
        assert (await request(ws, 2, type="join", room="lobby"))["ok"] is True
        await trio.sleep(3 * HIBERNATE_AFTER)
        assert counters.readers_hibernated == 3
        # A room message reaches it without waking anyone (the direct writer).
        room = await server.hub.room("lobby")
        await room.broadcast({"note": "hello"})
        message = await receive_json(ws)
        while "note" not in json.dumps(message):
            message = await receive_json(ws)
        assert counters.readers_woken == 2


async def test_a_hibernating_connection_closed_by_the_server_says_goodbye(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(transport="native", hub__hibernate_after=HIBERNATE_AFTER)
    async with running_server(config) as server, open_websocket_url(server.ws_url()) as ws:
        welcome = await receive_json(ws)
        await trio.sleep(3 * HIBERNATE_AFTER)
        assert server.app.counters.readers_hibernated == 1
        await server.app.close_connection(welcome["connection_id"], CloseCode.POLICY_VIOLATION, "bye")
        assert await closed_with(ws) == CloseCode.POLICY_VIOLATION
        await trio.sleep(2)  # (virtual) time for the server to finish the connection
        assert server.hub.connections.connection_count == 0
        assert server.app.counters.readers_woken == 1


async def test_a_hibernating_connection_whose_client_vanishes_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(transport="native", hub__hibernate_after=HIBERNATE_AFTER)
    async with running_server(config) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        await stream.send_all(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        received = b""
        with trio.fail_after(10):
            while b'"welcome"' not in received:
                received += await stream.receive_some(65536)
        assert server.hub.connections.connection_count == 1
        await trio.sleep(3 * HIBERNATE_AFTER)
        assert server.app.counters.readers_hibernated == 1
        await stream.aclose()  # gone without a close frame
        await trio.sleep(2)  # (virtual) time for the server to finish the connection
        assert server.hub.connections.connection_count == 0
        assert server.app.counters.readers_woken == 1


async def test_the_server_shuts_down_with_hibernating_connections(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(transport="native", hub__hibernate_after=HIBERNATE_AFTER)
    codes = []
    async with (
        running_server(config) as server,
        open_websocket_url(server.ws_url()) as first,
        open_websocket_url(server.ws_url()) as second,
    ):
        for ws in (first, second):
            assert (await receive_json(ws))["type"] == "welcome"
        await trio.sleep(3 * HIBERNATE_AFTER)
        assert server.app.counters.readers_hibernated == 2
        server.stop.set()  # a graceful shutdown: every client gets 1001
        for ws in (first, second):
            codes.append(await closed_with(ws))
    assert codes == [CloseCode.GOING_AWAY, CloseCode.GOING_AWAY]


async def test_without_hibernation_nothing_hibernates(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(transport="native", hub__hibernate_after=0)
    async with running_server(config) as server, open_websocket_url(server.ws_url()) as ws:
        assert (await receive_json(ws))["type"] == "welcome"
        await trio.sleep(25)  # (the heartbeat would close this silent client at 60 s)
        assert server.app.counters.readers_hibernated == 0
        assert server.hub.connections.supervisor.statistics().hibernating == 0
        assert (await request(ws, 1, type="ping"))["type"] == "pong"
