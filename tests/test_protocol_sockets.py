"""Every example session of docs/protocol.md again, over real sockets.

The same sessions as tests/test_protocol_doc.py, with the same checks, but
each client is a WebSocket client (trio-websocket) of a server running on
127.0.0.1, once per transport (the ``transport`` fixture). A client
authenticates at the handshake with ``?token=token-<user>`` (``anonymous``
presents none and authenticates in-band), so the handshake, the token
source, the frame codec and the writer of each transport are all on the
path.

Time is real here: after each step the runner waits (bounded) until every
client has at least the frames the session expects, then a short quiet
moment for any frame it does not expect.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from _sockets import DEADLINE, Server, make_config, open_websocket_url, running_server
from test_protocol_doc import HUB_CONFIG, MAX_ROOMS, WATCHABLE, Tokens, run_session, sessions, split
from trio_websocket import ConnectionClosed, WebSocketConnection

from ensemble.realtime import Hub
from ensemble.server._config import LimitsConfig

QUIET = 0.05
"""How long a settled session waits for frames it does not expect (they would fail it)."""


class SocketClients:
    """The session's clients as WebSocket clients of a running server."""

    def __init__(self, server: Server, nursery: trio.Nursery) -> None:
        self.server = server
        self.nursery = nursery
        self.sockets: dict[str, WebSocketConnection] = {}
        self.frames: dict[str, list[Any]] = {}

    @property
    def hub(self) -> Hub:
        return self.server.hub

    async def open(self, name: str, token: str | None) -> None:
        self.frames[name] = []
        self.sockets[name] = await self.nursery.start(
            self._client, self.server.ws_url(f"token={token}" if token else ""), self.frames[name]
        )

    @staticmethod
    async def _client(url: str, into: list[Any], *, task_status: trio.TaskStatus[WebSocketConnection]) -> None:
        """Connect, then read every frame into ``into`` until the server closes."""
        async with open_websocket_url(url) as ws:
            task_status.started(ws)
            with contextlib.suppress(ConnectionClosed):
                while True:
                    message = await ws.get_message()
                    assert isinstance(message, str), "the server sent a binary frame"
                    into.extend(split(message.encode()))

    async def send(self, name: str, frame: str) -> None:
        with trio.fail_after(DEADLINE):
            await self.sockets[name].send_message(frame)

    def received(self, name: str) -> list[Any]:
        return self.frames[name]

    async def settle(self, ready: Callable[[], bool]) -> None:
        with trio.move_on_after(DEADLINE):  # a frame that never comes fails the check after this
            while not ready():  # noqa: ASYNC110 (the reader tasks fill the lists)
                await trio.sleep(0.005)
        await trio.sleep(QUIET)


@asynccontextmanager
async def socket_clients(transport: str) -> AsyncIterator[SocketClients]:
    """A server configured like the in-memory sessions' hub, and its clients."""
    config = make_config(
        watchable_models=WATCHABLE,
        limits=LimitsConfig(max_rooms_per_connection=MAX_ROOMS),
        hub=HUB_CONFIG,
    )
    async with running_server(config, transport=transport, authenticator=Tokens()) as server, trio.open_nursery() as nursery:
        yield SocketClients(server, nursery)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("first_line", "lines"), sessions(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
async def test_session_over_sockets(first_line: int, lines: list[str], transport: str) -> None:
    async with socket_clients(transport) as clients:
        await run_session(lines, first_line=first_line, clients=clients)
