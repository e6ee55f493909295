"""The ASGI transport over real sockets: hypercorn's trio worker on 127.0.0.1.

Each test starts a server with ``serve(...)`` on an ephemeral port in its
own nursery and talks to it with trio-websocket. Time is real here (sockets
do not run on the virtual clock): intervals are short and every wait is
bounded by ``trio.fail_after``; nothing asserts a duration.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import trio
from _sockets import (
    SECRET,
    Server,
    _serve,
    closed_with,
    http_get,
    http_request,
    make_config,
    open_websocket_url,
    receive_json,
    receive_until,
    refused_handshake,
    request,
    running_server,
    token,
)

from ensemble.protocol import CloseCode
from ensemble.server._config import AuthConfig, LimitsConfig, ServerConfig
from ensemble.server._serve import Listening
from ensemble.transport import EnsembleApp, create_app
from ensemble.transport._asgi import _app_path, close_reason

__all__ = [  # the harness moved to tests/_sockets.py; these names stay importable from here
    "SECRET",
    "Server",
    "_serve",
    "closed_with",
    "http_get",
    "http_request",
    "make_config",
    "open_websocket_url",
    "receive_json",
    "receive_until",
    "refused_handshake",
    "request",
    "running_server",
    "token",
]

# -- the /ws path ---------------------------------------------------------------------------


async def test_welcome_on_connect(transport: str) -> None:
    async with running_server(transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        welcome = await receive_json(ws)
        assert welcome["type"] == "welcome"
        assert welcome["user_id"] == "alice"
        assert welcome["guest"] is True
        assert server.app.hub is not None
        assert server.app.hub.is_online("alice")


async def test_two_clients_in_a_room_see_each_others_messages(transport: str) -> None:
    async with (
        running_server(transport=transport) as server,
        open_websocket_url(server.ws_url("token=alice")) as alice,
        open_websocket_url(server.ws_url("token=bob")) as bob,
    ):
        await receive_json(alice)
        await receive_json(bob)
        assert (await request(alice, 1, type="join", room="general"))["ok"] is True
        assert (await request(bob, 1, type="join", room="general"))["ok"] is True
        sent = await request(alice, 2, type="send", room="general", content="hello bob")
        assert sent["type"] == "reply"
        message = await receive_until(bob, lambda frame: frame["type"] == "message")
        assert message["data"]["content"] == "hello bob"
        assert message["data"]["user_id"] == "alice"
        await request(bob, 2, type="send", room="general", content="hi alice")
        message = await receive_until(alice, lambda frame: frame["type"] == "message" and frame["data"]["user_id"] == "bob")
        assert message["data"]["content"] == "hi alice"
        assert server.app.counters.frames_in >= 4
        assert server.app.counters.frames_out >= 6


async def test_an_origin_not_allowed_is_refused_before_the_upgrade(transport: str) -> None:
    config = make_config(allowed_origins=("https://chat.example.com",))
    async with running_server(config, transport=transport) as server:
        for origin in ("https://evil.example", "https://chat.example.com.evil.example", "http://chat.example.com"):
            status, body = await refused_handshake(server.port, "/ws?token=alice", Origin=origin)
            assert status == 403
            assert body["close_code"] == CloseCode.POLICY_VIOLATION == 1008
        async with open_websocket_url(server.ws_url("token=alice"), extra_headers=[(b"origin", b"https://chat.example.com")]) as ws:
            assert (await receive_json(ws))["type"] == "welcome"
        assert server.app.counters.refused == 3


async def test_a_cookie_without_an_origin_is_refused(transport: str) -> None:
    async with running_server(transport=transport) as server:
        status, body = await refused_handshake(server.port, "/ws", Cookie="sessionid=alice")
        assert status == 403
        assert body["close_code"] == 1008


async def test_an_invalid_token_is_closed_with_4001_when_auth_is_configured(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET))
    async with running_server(config, transport=transport) as server:
        async with open_websocket_url(server.ws_url("token=not-a-jwt")) as ws:
            assert await closed_with(ws) == CloseCode.UNAUTHENTICATED == 4001
        forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256")
        async with open_websocket_url(server.ws_url(f"token={forged}")) as ws:
            assert await closed_with(ws) == 4001
        assert server.app.hub is not None
        assert server.app.hub.connections.statistics().connected == 0  # no actor was allocated


async def test_no_token_must_authenticate_in_band_within_the_timeout(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET, auth_timeout=0.3))
    async with running_server(config, transport=transport) as server:
        async with open_websocket_url(server.ws_url()) as ws:
            welcome = await receive_json(ws)
            assert welcome["user_id"] is None
            assert await closed_with(ws) == 4001
        async with open_websocket_url(server.ws_url()) as ws:
            await receive_json(ws)
            reply = await request(ws, 1, type="auth", token=token("carol"))
            assert reply["type"] == "reply"
            assert reply["data"]["user_id"] == "carol"
            await trio.sleep(0.6)  # past the timeout: still open
            assert (await request(ws, 2, type="ping"))["type"] == "pong"


async def test_a_jwt_in_the_subprotocol_is_accepted_and_the_plain_subprotocol_echoed(transport: str) -> None:
    config = make_config(auth=AuthConfig(jwt_secret=SECRET))
    async with (
        running_server(config, transport=transport) as server,
        open_websocket_url(server.ws_url(), subprotocols=["ensemble", f"ensemble.token.{token('dave')}"]) as ws,
    ):
        assert ws.subprotocol == "ensemble"
        welcome = await receive_json(ws)
        assert welcome["user_id"] == "dave"
        assert welcome["guest"] is False


async def test_too_many_connections_are_closed_with_1013(transport: str) -> None:
    config = make_config(limits=LimitsConfig(max_connections=1, max_connections_per_user=None))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as first:
        await receive_json(first)
        async with open_websocket_url(server.ws_url("token=bob")) as second:
            assert await closed_with(second) == CloseCode.TRY_AGAIN_LATER == 1013


async def test_too_many_connections_of_one_user_are_closed_with_1013(transport: str) -> None:
    config = make_config(limits=LimitsConfig(max_connections_per_user=1))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as first:
        await receive_json(first)
        async with open_websocket_url(server.ws_url("token=alice")) as second:
            assert await closed_with(second) == 1013
        async with open_websocket_url(server.ws_url("token=bob")) as other:
            assert (await receive_json(other))["type"] == "welcome"


async def test_an_oversized_frame_is_closed_with_1009(transport: str) -> None:
    config = make_config(limits=LimitsConfig(max_message_size=1024))
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        await ws.send_message(json.dumps({"type": "ping", "pad": "x" * 2048}))
        assert await closed_with(ws) == CloseCode.MESSAGE_TOO_BIG == 1009


async def test_a_binary_frame_is_closed_with_1003(transport: str) -> None:
    async with running_server(transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        await receive_json(ws)
        await ws.send_message(b'{"type":"ping"}')
        assert await closed_with(ws) == CloseCode.UNSUPPORTED_DATA == 1003
        assert server.app.counters.protocol_errors == 1


async def test_malformed_frames_get_error_replies_and_others_are_unaffected(transport: str) -> None:
    async with (
        running_server(transport=transport) as server,
        open_websocket_url(server.ws_url("token=alice")) as alice,
        open_websocket_url(server.ws_url("token=bob")) as bob,
    ):
        await receive_json(alice)
        await receive_json(bob)
        await request(bob, 1, type="join", room="general")
        await request(alice, 1, type="join", room="general")
        for bad in ("{not json", "[1, 2]", '{"type": 5}', '{"type": "no_such_command", "ref": 3}', "[" * 200 + "]" * 200):
            await alice.send_message(bad)
            error = await receive_until(alice, lambda frame: frame["type"] == "error")
            assert error["code"] in ("bad_json", "bad_frame", "invalid", "unknown_command", "too_deep")
            assert "Traceback" not in error["detail"]
        # Alice is still connected, and Bob never noticed.
        await request(alice, 2, type="send", room="general", content="still here")
        message = await receive_until(bob, lambda frame: frame["type"] == "message")
        assert message["data"]["content"] == "still here"
        assert (await request(bob, 2, type="ping"))["type"] == "pong"


async def test_shutdown_closes_clients_with_1001_and_stops_accepting(transport: str) -> None:
    codes: list[int] = []
    async with running_server(transport=transport) as server:
        async with open_websocket_url(server.ws_url("token=alice")) as alice, open_websocket_url(server.ws_url("token=bob")) as bob:
            await receive_json(alice)
            await receive_json(bob)
            server.stop.set()
            codes.append(await closed_with(alice))
            codes.append(await closed_with(bob))
        assert not server.app.accepting
    assert codes == [CloseCode.GOING_AWAY, CloseCode.GOING_AWAY] == [1001, 1001]
    assert server.app.hub is None  # the lifespan ended: the actors stopped


async def test_the_server_closing_a_connection_ends_its_task(transport: str) -> None:
    async with running_server(transport=transport) as server, open_websocket_url(server.ws_url("token=alice")) as ws:
        welcome = await receive_json(ws)
        app = server.app
        assert app.handler is not None
        await app.handler.close(welcome["connection_id"], code=CloseCode.DISCONNECTED, reason="bye")
        assert await closed_with(ws) == 4003
        for _ in range(1000):  # the connection's task ends soon after
            if repr(app).endswith(" 0 WebSocket connections>"):
                break
            await trio.sleep(0.01)
        assert repr(app).endswith(" 0 WebSocket connections>")
        assert app.hub is not None
        assert not app.hub.is_online("alice")


async def test_unknown_paths_go_to_the_fallback_app_or_404() -> None:
    async def fallback(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": f"fallback {scope['path']}".encode()})

    async with running_server(fallback=fallback) as server:
        status, body = await http_get(server.port, "/somewhere/else")
        assert (status, body) == (200, b"fallback /somewhere/else")
    async with running_server() as server:
        status, body = await http_get(server.port, "/somewhere/else")
        assert status == 404
        assert json.loads(body)["error"] == "not_found"


def test_the_app_relative_path_respects_root_path() -> None:
    assert _app_path({"path": "/chat/ws", "root_path": "/chat"}) == "/ws"
    assert _app_path({"path": "/ws", "root_path": "/chat"}) == "/ws"  # a server that strips the prefix itself
    assert _app_path({"path": "/chatty/ws", "root_path": "/chat"}) == "/chatty/ws"
    assert _app_path({"path": "/chat", "root_path": "/chat/"}) == "/"
    assert _app_path({"path": "/healthz", "root_path": ""}) == "/healthz"


def test_a_long_close_reason_is_shortened() -> None:
    assert close_reason("short") == "short"
    positions = {f"room:{n}": ["e" * 16, n] for n in range(10)}
    reason = json.dumps({"error": "slow_consumer", "positions": positions})
    assert close_reason(reason) == "slow_consumer"
    assert len(close_reason("é" * 100).encode()) <= 123


async def test_a_mounted_app_serves_under_its_root_path() -> None:
    app = create_app(make_config())

    async def parent(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan" and scope["path"].startswith("/chat/"):
            await app({**scope, "root_path": "/chat"}, receive, send)
        elif scope["type"] == "lifespan":
            await app(scope, receive, send)
        else:
            await send({"type": "http.response.start", "status": 418, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    config = make_config()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(_serve_any, config, parent, app, stop)
        async with open_websocket_url(f"ws://127.0.0.1:{listening.port}/chat/ws?token=alice") as ws:
            assert (await receive_json(ws))["type"] == "welcome"
        assert (await http_get(listening.port, "/chat/healthz"))[0] == 200
        assert (await http_get(listening.port, "/teapot"))[0] == 418
        stop.set()


async def _serve_any(
    config: ServerConfig, parent: Any, app: EnsembleApp, stop: trio.Event, *, task_status: trio.TaskStatus[Listening]
) -> None:
    from hypercorn.trio import serve as hypercorn_serve

    from ensemble.server._serve import hypercorn_config

    async def trigger() -> None:
        await stop.wait()
        await app.drain()

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            lambda task_status: hypercorn_serve(parent, hypercorn_config(config), shutdown_trigger=trigger, task_status=task_status)
        )
        task_status.started(Listening.from_urls(bound))


async def test_a_client_that_stops_reading_is_closed_as_a_slow_consumer(transport: str) -> None:
    """The relay at work: the connection's actor is not stuck behind hypercorn's
    shielded socket write, so its outbox overflow closes it (4008), its presence
    ends, and other clients are unaffected."""
    config = make_config(hub__outbox_max_events=20)
    async with running_server(config, transport=transport) as server, open_websocket_url(server.ws_url("token=bob")) as bob:
        await receive_json(bob)
        hub = server.app.hub
        assert hub is not None
        # Alice's client does the handshake, then never reads a byte again.
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        try:
            await stream.send_all(
                b"GET /ws?token=alice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            for _ in range(1000):
                if hub.is_online("alice"):
                    break
                await trio.sleep(0.01)
            pad = "x" * 60_000
            with trio.fail_after(30):
                while hub.is_online("alice"):
                    await hub.connections.send_to_user("alice", {"pad": pad})
                    await trio.sleep(0.001)
            assert hub.connections.statistics().slow_consumers == 1
            assert (await request(bob, 1, type="ping"))["type"] == "pong"
        finally:
            await trio.aclose_forcefully(stream)
