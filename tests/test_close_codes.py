"""Close codes over real sockets that the other server tests do not reach.

Frames that a well-behaved client library refuses to send (invalid UTF-8,
unmasked frames) are crafted by hand after a wsproto handshake.
"""

from __future__ import annotations

import os
import struct
import time

import jwt
import trio
from _sockets import SECRET, closed_with, make_config, open_websocket_url, receive_json, request, running_server, token
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request

from ensemble.protocol import CloseCode
from ensemble.realtime import HubConfig, WSRateLimitConfig
from ensemble.server import AuthConfig

DEADLINE = 10.0


async def _handshake(port: int, resource: str) -> tuple[trio.SocketStream, WSConnection]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target=resource)))
    with trio.fail_after(DEADLINE):
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(event, AcceptConnection) for event in ws.events()):
                return stream, ws


async def _close_code(stream: trio.SocketStream, ws: WSConnection) -> int | None:
    """Read until the server's close frame; its code (``None`` if the TCP connection just ended)."""
    with trio.fail_after(DEADLINE):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return None
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    return int(event.code)


def _frame(opcode: int, payload: bytes, *, masked: bool = True) -> bytes:
    """One final frame (payload under 126 bytes), masked like a client's unless told."""
    head = bytes([0x80 | opcode, (0x80 if masked else 0) | len(payload)])
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _broken_frame_ends_only_that_connection(frame: bytes, transport: str) -> None:
    """hypercorn (wsproto) rejects WebSocket-level violations before the app
    sees them, and drops the TCP connection (the client sees 1006, not 1007
    or 1002: docs/protocol.md, "Close codes"). Nothing else is affected."""
    async with running_server(transport=transport) as server, open_websocket_url(server.ws_url("token=bob")) as bob:
        await receive_json(bob)
        stream, ws = await _handshake(server.port, "/ws?token=alice")
        try:
            await stream.send_all(frame)
            assert await _close_code(stream, ws) in (None, CloseCode.INVALID_PAYLOAD, CloseCode.PROTOCOL_ERROR)
        finally:
            await stream.aclose()
        assert (await request(bob, 1, type="ping"))["type"] == "pong"
        with trio.fail_after(DEADLINE):
            while server.app.hub is not None and server.app.hub.connections.connection_count > 1:  # noqa: ASYNC110 (polling another task's state)
                await trio.sleep(0.01)  # alice's connection is cleaned up


async def test_invalid_utf8_ends_only_that_connection(transport: str) -> None:
    await _broken_frame_ends_only_that_connection(_frame(0x1, b'{"type":"ping","x":"\xff\xfe"}'), transport)


async def test_an_unmasked_client_frame_ends_only_that_connection(transport: str) -> None:
    await _broken_frame_ends_only_that_connection(_frame(0x1, b'{"type":"ping"}', masked=False), transport)


async def test_garbage_after_error_replies_is_closed_with_4004(transport: str) -> None:
    async with running_server(transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as alice:
        await receive_json(alice)
        for _ in range(20):
            if alice.closed is not None:
                break
            try:
                await alice.send_message("not json")
            except Exception:  # the server may close between two sends
                break
        assert await closed_with(alice) == CloseCode.PROTOCOL_VIOLATION == 4004


async def test_flooding_is_answered_with_errors_then_closed_with_4029(transport: str) -> None:
    config = make_config(hub=HubConfig(rate_limit=WSRateLimitConfig(messages_per_second=2, messages_per_minute=100, burst_size=2)))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as alice:
        await receive_json(alice)
        assert (await request(alice, 1, type="ping"))["type"] == "pong"
        assert (await request(alice, 2, type="ping"))["type"] == "pong"
        error = await request(alice, 3, type="ping")
        assert (error["type"], error["code"]) == ("error", "rate_limited")
        assert error["retry_after"] > 0
        for ref in (4, 5):
            with trio.move_on_after(DEADLINE):
                await alice.send_message(f'{{"type":"ping","ref":{ref}}}')
        assert await closed_with(alice) == CloseCode.RATE_LIMITED == 4029


async def test_an_expired_token_is_closed_with_4002(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET), heartbeat__interval=0.2, heartbeat__timeout=5.0)
    short = jwt.encode({"sub": "alice", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url(f"token={short}")) as alice:
        welcome = await receive_json(alice)
        assert welcome["user_id"] == "alice"
        # Refreshing with a longer token keeps the connection open past the first expiry.
        refreshed = await request(alice, 1, token=token("alice"))
        assert refreshed["type"] == "reply"
        await trio.sleep(2.5)
        assert alice.closed is None
        assert (await request(alice, 2, type="ping"))["type"] == "pong"

    short = jwt.encode({"sub": "bob", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url(f"token={short}")) as bob:
        await receive_json(bob)
        assert await closed_with(bob) == CloseCode.TOKEN_EXPIRED == 4002  # not refreshed in time


def test_the_frame_helper() -> None:
    assert _frame(0x1, b"hi", masked=False) == b"\x81\x02hi"
    assert struct.unpack("!BB", _frame(0x1, b"hi")[:2]) == (0x81, 0x82)
