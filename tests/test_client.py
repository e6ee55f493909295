"""The Python client against a scripted WebSocket server on loopback.

The server here is a small fake that speaks just enough of the protocol to
drive the client's reconnect, re-authentication and resume logic; the real
server is exercised by the server tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest, serve_websocket

from ensemble.client import Backoff, Closed, ServerError, open_client

FAST = Backoff(initial=0.01, factor=2.0, maximum=0.05)

Script = Callable[["FakeServer", WebSocketConnection, int], Awaitable[None]]


class FakeServer:
    """Accepts connections and runs ``script(server, ws, connection_number)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.received: list[list[dict[str, Any]]] = []
        self.url = ""

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        self.received.append([])
        await self.script(self, ws, len(self.received) - 1)

    async def command(self, ws: WebSocketConnection, number: int) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await ws.get_message())
        self.received[number].append(frame)
        return frame


@asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[FakeServer]:
    server = FakeServer(script)
    async with trio.open_nursery() as nursery:
        ws_server = await nursery.start(partial(serve_websocket, server.handler, "127.0.0.1", 0, None, disconnect_timeout=1))
        server.url = f"ws://127.0.0.1:{ws_server.port}/ws"
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def reply(ws: WebSocketConnection, frame: dict[str, Any], data: Any) -> None:
    await ws.send_message(json.dumps({"type": "reply", "ref": frame["ref"], "ok": True, "data": data}))


def event(seq: int, content: str, room: str = "general", epoch: str = "e1") -> str:
    return json.dumps({"type": "message", "topic": f"room:{room}", "seq": seq, "epoch": epoch, "data": {"content": content}})


async def test_commands_replies_errors_and_events() -> None:
    async def script(server: FakeServer, ws: WebSocketConnection, n: int) -> None:
        await ws.send_message(json.dumps({"type": "welcome", "connection_id": "c1", "user_id": "alice"}))
        auth = await server.command(ws, n)
        await reply(ws, auth, {"user_id": "alice"})
        join = await server.command(ws, n)
        await reply(ws, join, {"room": "general", "recovered": True})
        await ws.send_message(event(5, "hi") + "\n" + event(6, "batched"))  # a batch: newline-separated events
        send = await server.command(ws, n)
        await ws.send_message(json.dumps({"type": "error", "ref": send["ref"], "code": "rate_limited", "detail": "slow down"}))
        ping = await server.command(ws, n)
        await ws.send_message(json.dumps({"type": "pong", "ref": ping["ref"]}))
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with fake_server(script) as server, open_client(server.url, token="t0k3n", backoff=FAST, seed=1) as client:
            assert (await client.join("general", display_name="Alice"))["recovered"] is True
            events = client.events()
            welcome = await events.__anext__()
            assert welcome["type"] == "welcome"
            assert client.welcome == welcome
            message = await events.__anext__()
            assert message["data"]["content"] == "hi"
            assert (await events.__anext__())["data"]["content"] == "batched"
            assert client.positions == {"room:general": ("e1", 6)}
            with pytest.raises(ServerError) as error:
                await client.send("general", "too fast")
            assert (error.value.code, error.value.detail) == ("rate_limited", "slow down")
            await client.ping()
            commands = server.received[0]
            assert [c["type"] for c in commands] == ["auth", "join", "send", "ping"]
            assert commands[0]["token"] == "t0k3n"
            assert commands[1] == {"type": "join", "ref": commands[1]["ref"], "room": "general", "display_name": "Alice"}
            assert len({c["ref"] for c in commands}) == 4


async def test_reconnects_reauthenticates_and_resumes_from_its_positions() -> None:
    tokens = iter(["first", "second"])

    async def script(server: FakeServer, ws: WebSocketConnection, n: int) -> None:
        auth = await server.command(ws, n)
        await reply(ws, auth, {})
        join = await server.command(ws, n)
        if n == 0:
            await reply(ws, join, {"recovered": True})
            await ws.send_message(event(7, "before"))
            await ws.aclose(4008, '{"error":"slow_consumer"}')  # a slow consumer: reconnect and resume
        elif n == 1:
            await reply(ws, join, {"recovered": True, "replayed": 1})
            await ws.send_message(event(8, "missed"))
            await ws.aclose(1011, "internal error")  # a server bug: reconnect
        else:
            await reply(ws, join, {"recovered": False})  # the history is gone
            await trio.sleep_forever()

    with trio.fail_after(10):
        async with (
            fake_server(script) as server,
            open_client(server.url, token=lambda: next(tokens, "third"), backoff=FAST, seed=2) as client,
        ):
            await client.join("general")
            got = []
            async for item in client.events():
                got.append(item)
                if item["type"] == "resync":
                    break
            assert [(e["type"], e.get("data", {}).get("content")) for e in got[:2]] == [("message", "before"), ("message", "missed")]
            assert got[2]["room"] == "general"
            assert client.reconnects == 2
            sessions = server.received
            assert [s[0]["token"] for s in sessions] == ["first", "second", "third"]  # a fresh token per connect
            assert "since" not in sessions[0][1]
            assert sessions[1][1]["since"] == {"epoch": "e1", "seq": 7}
            assert sessions[2][1]["since"] == {"epoch": "e1", "seq": 8}


async def test_a_terminal_close_code_stops_the_client() -> None:
    async def script(server: FakeServer, ws: WebSocketConnection, n: int) -> None:
        await server.command(ws, n)
        await ws.aclose(4001, "authentication required")

    with trio.fail_after(10):
        async with fake_server(script) as server:
            with pytest.raises(Closed) as closed:
                async with open_client(server.url, token="bad", backoff=FAST):
                    pass  # pragma: no cover - the first connect fails
            assert closed.value.code == 4001
            assert len(server.received) == 1  # not retried: 4001 means fix the token first


async def test_a_terminal_close_later_ends_events_and_requests() -> None:
    async def script(server: FakeServer, ws: WebSocketConnection, n: int) -> None:
        join = await server.command(ws, n)
        await reply(ws, join, {})
        await ws.aclose(4003, "disconnected by the server")

    with trio.fail_after(10):
        async with fake_server(script) as server, open_client(server.url, backoff=FAST) as client:
            await client.join("general")
            assert [e async for e in client.events()] == []  # ends at the close
            with pytest.raises(Closed) as closed:
                await client.send("general", "anyone?")
            assert closed.value.code == 4003
            assert len(server.received) == 1


async def test_unreachable_server() -> None:
    with trio.fail_after(10), pytest.raises(Closed, match="cannot connect"):
        async with open_client("ws://127.0.0.1:1/ws", backoff=FAST):
            pass  # pragma: no cover


def test_backoff_is_capped_and_jittered() -> None:
    import random

    backoff = Backoff(initial=1.0, factor=2.0, maximum=10.0, jitter=0.5)
    rng = random.Random(3)
    delays = [backoff.delay(n, rng) for n in range(8)]
    assert all(0.5 <= d <= 1.0 for d in delays[:1])
    assert all(5.0 <= d <= 10.0 for d in delays[4:])
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2.0)
