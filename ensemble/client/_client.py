"""A Python client for the Ensemble protocol, on trio-websocket.

``async with open_client(url, token=...) as client:`` connects, keeps the
connection up (reconnecting with exponential backoff and jitter after a
close that allows it, see :class:`ensemble.protocol.CloseCode`), and after
every reconnect re-authenticates and re-joins each room it had joined with
the position of the last event it received there, so the server replays
exactly what was missed (or says it cannot: the client then emits a
``resync`` event for that room). A ``room_reset`` or ``room_closed`` (the
room crashed on the server) is answered the same way: the client joins the
room again from its position. Events arrive in order on
``client.events()``; commands (``join``, ``send``, ...) return the reply's
``data`` or raise :class:`ServerError`.

The client owns its background task (the reader): that is why it is an
async context manager.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from .._json import dumps, loads
from ..protocol._close import CloseCode

logger = logging.getLogger("ensemble.client")

TokenProvider = Callable[[], "Awaitable[str | None] | str | None"]
"""Returns the token to (re)authenticate with; called before every connect."""


class ClientError(Exception):
    """Base class of the client's errors."""


class ServerError(ClientError):
    """The server answered a command with an error.

    Attributes:
        code: The protocol error code (``"not_a_member"``, ``"rate_limited"``, ...).
        detail: The server's explanation.
        data: The whole error frame.
    """

    def __init__(self, code: str, detail: str, data: dict[str, Any]) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.data = data


class Disconnected(ClientError):
    """The connection closed before the command was answered.

    Attributes:
        code: The close code, if known.
        reason: The close reason, if any.
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class Closed(ClientError):
    """The client stopped for good (closed by the user, or a close that
    forbids reconnecting, such as 4001)."""

    def __init__(self, message: str, *, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@attrs.frozen(kw_only=True)
class Backoff:
    """Reconnect delays: ``initial * factor**n``, capped, with full jitter.

    Attributes:
        initial: The first delay, in seconds.
        factor: Growth per failed attempt.
        maximum: The cap.
        jitter: Fraction of the delay drawn at random (1.0: anywhere in
            ``[0, delay]``, which spreads a reconnect storm best).
    """

    initial: float = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    maximum: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    jitter: float = attrs.field(default=1.0, validator=[attrs.validators.ge(0), attrs.validators.le(1)])

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before reconnect attempt ``attempt`` (0-based)."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1 - self.jitter) + rng.uniform(0, base * self.jitter)


@attrs.define(eq=False)
class _Room:
    display_name: str | None


class Client:
    """A connected client (made by :func:`open_client`).

    Attributes:
        positions: Per topic (``room:<id>``, ``user:<id>``), the ``(epoch,
            seq)`` of the last sequenced event received: what a reconnect
            resumes from.
        welcome: The last ``welcome`` frame (connection id, user id, ...).
        reconnects: How many times the client reconnected.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | TokenProvider | None,
        backoff: Backoff,
        event_buffer: int,
        request_timeout: float,
        seed: int | None,
        batch: bool = False,
    ) -> None:
        self._url = url
        self._batch = batch
        self._token = token
        self._backoff = backoff
        self._request_timeout = request_timeout
        self._rng = random.Random(seed)
        self._refs = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._events_send, self._events_receive = trio.open_memory_channel[dict[str, Any]](event_buffer)
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._connected = trio.Event()
        self._closed: Closed | None = None
        self._rooms: dict[str, _Room] = {}
        self._nursery: trio.Nursery | None = None
        self.positions: dict[str, tuple[str, int]] = {}
        self.welcome: dict[str, Any] | None = None
        self.reconnects = 0
        self._close_info: tuple[int | None, str | None] = (None, None)

    # -- commands --------------------------------------------------------------------

    async def request(self, type: str, **fields: Any) -> Any:
        """Send a command and wait for its reply.

        Waits while the client is reconnecting.

        Returns:
            The reply's ``data``.

        Raises:
            ServerError: The server answered with an error.
            Disconnected: The connection closed first (the command may or may
                not have been applied).
            Closed: The client is closed.
            TimeoutError: No answer within the request timeout.
        """
        ws = await self._wait_connected()
        return await self._request(ws, type, fields)

    async def _request(self, ws: trio_websocket.WebSocketConnection, type: str, fields: dict[str, Any]) -> Any:
        ref = next(self._refs)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[ref] = send
        try:
            with trio.fail_after(self._request_timeout):
                try:
                    await ws.send_message(dumps({"type": type, "ref": ref, **fields}).decode())
                except trio_websocket.ConnectionClosed as exc:
                    raise Disconnected(f"{type}: the connection closed", code=_code(exc)) from None
                try:
                    frame = await receive.receive()
                except trio.EndOfChannel:
                    raise Disconnected(f"{type}: the connection closed before the reply") from None
        finally:
            self._pending.pop(ref, None)
        if frame.get("type") == "error":
            raise ServerError(str(frame.get("code")), str(frame.get("detail", "")), frame)
        return frame.get("data")

    async def join(self, room: str, *, display_name: str | None = None) -> Any:
        """Join a room (resuming from the last position seen in it, if any).

        Returns:
            The reply's data (the server says whether the resume
            ``recovered`` every missed event).
        """
        ws = await self._wait_connected()
        data = await self._join(ws, room, display_name)
        self._rooms[room] = _Room(display_name)
        return data

    async def _join(self, ws: trio_websocket.WebSocketConnection, room: str, display_name: str | None) -> Any:
        fields: dict[str, Any] = {"room": room}
        if display_name is not None:
            fields["display_name"] = display_name
        position = self.positions.get(f"room:{room}")
        if position is not None:
            fields["since"] = {"epoch": position[0], "seq": position[1]}
        return await self._request(ws, "join", fields)

    async def leave(self, room: str) -> Any:
        """Leave a room (it is not re-joined after a reconnect)."""
        self._rooms.pop(room, None)
        return await self.request("leave", room=room)

    async def send(self, room: str, content: str, message_type: str = "text") -> Any:
        """Send a message to a room; returns the message as the server stored it."""
        return await self.request("send", room=room, content=content, message_type=message_type)

    async def typing(self, room: str, typing: bool = True) -> Any:
        """Say that the user is (or stopped) typing in a room."""
        return await self.request("typing", room=room, typing=typing)

    async def ping(self) -> None:
        """A round trip to the server (answered with ``pong``)."""
        await self.request("ping")

    # -- events ------------------------------------------------------------------------

    def events(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """Every event the server pushes (and ``resync`` events of the client),
        in order, as a channel to iterate (``async for event in
        client.events()``); it ends when the client is closed for good."""
        return self._events_receive

    # -- the connection ----------------------------------------------------------------

    async def _wait_connected(self) -> trio_websocket.WebSocketConnection:
        while True:
            if self._closed is not None:
                raise self._closed
            ws = self._ws
            if ws is not None and self._connected.is_set() and ws.closed is None:
                return ws
            await self._connected.wait()

    async def _token_now(self) -> str | None:
        token = self._token
        if token is None or isinstance(token, str):
            return token
        value = token()
        if isinstance(value, Awaitable):
            value = await value
        return value

    async def _run(self, task_status: trio.TaskStatus[Closed | None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, read, and reconnect until closed for good.

        Reports ``None`` once the first connection is up, or the
        :class:`Closed` error when it could not be made (and returns).
        """
        attempt = 0
        started = False
        while True:
            self._close_info = (None, None)
            failure: BaseException | None = None
            try:
                async with self._connect() as ws:
                    self._ws = ws
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        nursery.start_soon(self._read, ws, nursery.cancel_scope)
                        try:
                            await self._resume(ws)
                        except Disconnected:
                            pass  # the reader saw the close and ends the nursery
                        except (ServerError, TimeoutError) as exc:
                            failure = exc
                            # A refused auth is followed by the server's close
                            # (4001): wait a moment for its code, then give up.
                            with trio.move_on_after(1.0):
                                await trio.sleep_forever()
                            nursery.cancel_scope.cancel()
                        else:
                            attempt = 0
                            self._connected.set()
                            if not started:
                                started = True
                                task_status.started(None)
            except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
                failure = exc
            finally:
                self._ws = None
                self._nursery = None
                self._connected = trio.Event()
                self._fail_pending()
            code, reason = self._close_info
            if not started:
                why = failure if failure is not None else f"closed with {code} ({reason or ''})"
                error = Closed(f"cannot connect to {self._url}: {why}", code=code, reason=reason)
                self._close(error)
                task_status.started(error)
                return
            if code is not None and code != 1006 and not _reconnectable(code):
                self._close(Closed(f"closed by the server with {code} ({reason or ''})", code=code, reason=reason))
                return
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            self.reconnects += 1
            logger.info("reconnecting to %s in %.2f s (close code %s)", self._url, delay, code)
            await trio.sleep(delay)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """One WebSocket connection over a TCP (or TLS) stream this client owns.

        Owning the stream means it is always closed when the connection ends,
        whoever closed the WebSocket first.
        """
        url = urlsplit(self._url)
        if url.scheme not in ("ws", "wss") or not url.hostname:
            raise Closed(f"not a ws:// or wss:// URL: {self._url!r}")
        port = url.port or (443 if url.scheme == "wss" else 80)
        resource = (url.path or "/") + (f"?{url.query}" if url.query else "")
        with trio.fail_after(self._request_timeout):
            tcp = await trio.open_tcp_stream(url.hostname, port)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        try:
            if url.scheme == "wss":
                stream = trio.SSLStream(tcp, ssl.create_default_context(), server_hostname=url.hostname, https_compatible=True)
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self._request_timeout):
                    ws = await trio_websocket.wrap_client_stream(nursery, stream, url.hostname, resource)
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1) as cleanup:
                        cleanup.shield = True
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(stream)

    async def _resume(self, ws: trio_websocket.WebSocketConnection) -> None:
        """Authenticate, then re-join every room from its last position."""
        token = await self._token_now()
        if token is not None:
            await self._request(ws, "auth", {"token": token})
        if self._batch:
            await self._request(ws, "options", {"batch": True})
        for room, state in list(self._rooms.items()):
            data = await self._join(ws, room, state.display_name)
            if isinstance(data, dict) and data.get("recovered") is False:
                await self._events_send.send({"type": "resync", "room": room, "data": data})

    async def _read(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        """Dispatch every frame; at the close, record its code and end the connection's nursery."""
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                close = exc.reason
                self._close_info = (None, None) if close is None else (close.code, close.reason)
                self._fail_pending()
                scope.cancel()
                return
            # One event per frame, or several separated by newlines when
            # batching was negotiated (``options`` with ``batch: true``).
            for line in message.split("\n") if isinstance(message, str) else [message]:
                if not line:
                    continue
                try:
                    frame = loads(line)
                except ValueError:
                    logger.warning("ignoring a frame that is not JSON")
                    continue
                if isinstance(frame, dict):
                    await self._dispatch(frame)

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        if kind in ("reply", "error", "pong") and isinstance(ref, int) and ref in self._pending:
            self._pending[ref].send_nowait(frame)
            return
        if kind == "ping":
            ws = self._ws
            if ws is not None:
                await ws.send_message('{"type":"pong"}')
            return
        if kind == "welcome":
            self.welcome = frame
        topic, seq, epoch = frame.get("topic"), frame.get("seq"), frame.get("epoch")
        if isinstance(topic, str) and isinstance(seq, int) and isinstance(epoch, str):
            self.positions[topic] = (epoch, seq)
        await self._events_send.send(frame)
        if kind in ("room_reset", "room_closed") and isinstance(topic, str) and topic.startswith("room:"):
            # The room restarted (events of the crash may be missing) or
            # dropped this connection: join again from the last position.
            room = topic[5:]
            ws, nursery = self._ws, self._nursery
            if room in self._rooms and ws is not None and nursery is not None:
                nursery.start_soon(self._rejoin, ws, room)

    async def _rejoin(self, ws: trio_websocket.WebSocketConnection, room: str) -> None:
        state = self._rooms.get(room)
        if state is None:
            return
        try:
            data = await self._join(ws, room, state.display_name)
        except Disconnected:
            return  # the reconnect re-joins it
        except (ServerError, TimeoutError) as exc:
            logger.warning("re-joining room %r after a reset failed: %s", room, exc)
            await self._events_send.send({"type": "resync", "room": room, "data": None})
            return
        if isinstance(data, dict) and data.get("recovered") is False:
            await self._events_send.send({"type": "resync", "room": room, "data": data})

    def _fail_pending(self) -> None:
        for send in self._pending.values():
            send.close()
        self._pending.clear()

    def _close(self, error: Closed) -> None:
        if self._closed is None:
            self._closed = error
            self._connected.set()
            self._events_send.close()


def _reconnectable(code: int) -> bool:
    try:
        return CloseCode(code).reconnect
    except ValueError:
        return False


def _code(exc: BaseException) -> int | None:
    if isinstance(exc, trio_websocket.ConnectionClosed):
        return None if exc.reason is None else exc.reason.code
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


@asynccontextmanager
async def open_client(
    url: str,
    *,
    token: str | TokenProvider | None = None,
    backoff: Backoff | None = None,
    event_buffer: int = 1000,
    request_timeout: float = 10.0,
    seed: int | None = None,
    batch: bool = False,
) -> AsyncIterator[Client]:
    """Connect to an Ensemble server and keep the connection up.

    Args:
        url: The WebSocket URL (``ws://host:port/ws``).
        token: The token, or a callable returning a fresh one before every
            (re)connect; ``None`` for a server in development mode.
        backoff: Reconnect delays (default :class:`Backoff`).
        event_buffer: Events buffered for ``events()``; when full, the
            reader waits (and the server sees a slow consumer).
        request_timeout: Longest wait for a connection or a reply.
        seed: Seeds the jitter (tests).
        batch: Ask the server for several events per frame (fewer frames
            to parse and write when many events arrive at once).

    Yields:
        The :class:`Client`, once connected (and authenticated).

    Raises:
        Closed: The first connection failed for good.
    """
    if not math.isfinite(request_timeout) or request_timeout <= 0:
        raise ValueError(f"request_timeout must be > 0, got {request_timeout}")
    client = Client(
        url,
        token=token,
        backoff=backoff or Backoff(),
        event_buffer=event_buffer,
        request_timeout=request_timeout,
        seed=seed,
        batch=batch,
    )
    start_error: Closed | None = None
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        start_error = await nursery.start(client._run)
        if start_error is None:
            try:
                yield client
            except BaseException as exc:  # re-raised as itself below, not in a group
                body_error = exc
            finally:
                client._close(Closed("the client was closed"))
                nursery.cancel_scope.cancel()  # the connection closes with a close handshake (see _connect)
    if start_error is not None:
        raise start_error
    if body_error is not None:
        raise body_error
