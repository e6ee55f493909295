"""A running Ensemble server on loopback and a WebSocket client for it: the
harness of every test that speaks the protocol over real sockets.

Tests that take the ``transport`` fixture (tests/conftest.py) run once per
transport in :data:`TRANSPORTS`: the same protocol suite for each, unchanged.
Time is real here (sockets do not run on the virtual clock): intervals are
short and every wait is bounded by ``trio.fail_after``; nothing asserts a
duration.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import jwt
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from ensemble.realtime import Hub
from ensemble.server._config import ServerConfig
from ensemble.server._serve import Listening, serve
from ensemble.transport import EnsembleApp, create_app

TRANSPORTS = ("hypercorn", "native")
"""Every transport the socket-level protocol tests run against."""

SECRET = "s" * 32
DEADLINE = 10.0


@attrs.frozen
class Server:
    """A running server: its app and where it listens."""

    app: EnsembleApp
    listening: Listening
    stop: trio.Event

    @property
    def hub(self) -> Hub:
        """The server's hub (while it runs)."""
        hub = self.app.hub
        assert hub is not None, "the server is not running"
        return hub

    @property
    def port(self) -> int:
        return self.listening.port

    def ws_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")


@asynccontextmanager
async def open_websocket_url(
    url: str,
    *,
    subprotocols: list[str] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client whose socket is closed at the end, whoever closed first.

    (``trio_websocket.open_websocket_url`` leaves its socket open when the
    server closes the connection: a ResourceWarning.)
    """
    rest = url.removeprefix("ws://")
    address, _, resource = rest.partition("/")
    host, _, port = address.partition(":")
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(DEADLINE):
                ws = await wrap_client_stream(nursery, stream, host, "/" + resource, subprotocols=subprotocols, extra_headers=extra_headers)
            try:
                yield ws
            finally:
                with trio.move_on_after(DEADLINE):
                    await ws.aclose()
    finally:
        await trio.aclose_forcefully(stream)


def make_config(**changes: Any) -> ServerConfig:
    """A loopback config on an ephemeral port (``section__option`` keys work)."""
    return ServerConfig(port=0).evolve(**changes)


@asynccontextmanager
async def running_server(config: ServerConfig | None = None, *, transport: str | None = None, **app_options: Any) -> AsyncIterator[Server]:
    """Serve ``config`` on 127.0.0.1 until the block ends (then shut down gracefully).

    ``transport`` (one of :data:`TRANSPORTS`) overrides ``config.transport``.
    """
    config = config if config is not None else make_config()
    if transport is not None:
        config = config.evolve(transport=transport)
    app = create_app(config, **app_options)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(_serve, config, app, stop)
        try:
            yield Server(app, listening, stop)
        finally:
            stop.set()


async def _serve(config: ServerConfig, app: EnsembleApp, stop: trio.Event, *, task_status: trio.TaskStatus[Listening]) -> None:
    await serve(config, app=app, shutdown_trigger=stop.wait, handle_signals=False, task_status=task_status)


async def receive_json(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(DEADLINE):
        message = await ws.get_message()
    assert isinstance(message, str)
    frame = json.loads(message)
    assert isinstance(frame, dict)
    return frame


async def receive_until(ws: WebSocketConnection, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first frame that matches (the others are skipped)."""
    with trio.fail_after(DEADLINE):
        while True:
            frame = await receive_json(ws)
            if match(frame):
                return frame


async def request(ws: WebSocketConnection, ref: int, **command: Any) -> dict[str, Any]:
    """Send a command with ``ref`` and return its reply or error."""
    await ws.send_message(json.dumps({**command, "ref": ref}))
    return await receive_until(ws, lambda frame: frame.get("ref") == ref and frame["type"] in ("reply", "error", "pong"))


async def closed_with(ws: WebSocketConnection) -> int:
    """Read until the server closes; the close code."""
    with trio.fail_after(DEADLINE):
        while ws.closed is None:
            with contextlib.suppress(ConnectionClosed):
                await ws.get_message()
    return int(ws.closed.code)


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600, **claims}, SECRET, algorithm="HS256")


# -- a tiny HTTP client ------------------------------------------------------------------------


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request (``Connection: close``): status, headers, body."""
    headers = dict(headers or {})
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Connection: {headers.pop('Connection', 'close')}"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # an early answer (413): read it
                await stream.send_all(raw)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    response = b"".join(chunks)
    head, _, payload = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), parsed, payload


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2 :]
    return b"".join(out)


async def refused_handshake(port: int, path: str, **headers: str) -> tuple[int, dict[str, Any]]:
    """Try a WebSocket upgrade that the server refuses: its status and JSON body.

    (trio-websocket leaks its socket on a refused handshake, so this speaks
    HTTP itself.)
    """
    handshake = {
        "Upgrade": "websocket",
        "Connection": "Upgrade, close",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **{name.replace("_", "-"): value for name, value in headers.items()},
    }
    status, _, body = await http_request(port, "GET", path, headers=handshake)
    return status, json.loads(body) if body else {}


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http_request(port, "GET", path)
    return status, body
