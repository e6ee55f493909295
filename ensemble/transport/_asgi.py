"""The ASGI transport: Ensemble as an ASGI application (hypercorn's trio worker).

``create_app(config)`` returns an :class:`EnsembleApp`. Its lifespan starts
the hub (``open_hub``), the :class:`~ensemble.server._handler.ProtocolHandler`
and the one heartbeat sweeper in a nursery; hypercorn's trio worker runs the
whole ASGI app in one ``trio.run``, so every connection task shares them.

WebSocket (``/ws``), in order, before any actor is allocated:

1. shutting down or not started: refused (1001 / 1013);
2. the handshake's size (``limits.max_headers``; hypercorn bounds the bytes
   with ``h11_max_incomplete_size`` and the time with ``keep_alive_timeout``);
3. ``max_connections``, then ``authenticate_handshake`` (origin, then a
   credential from the query, the subprotocol or the cookie), then
   ``max_connections_per_user``.

A refusal for the *origin* (1008, including a cookie without an acceptable
``Origin``) happens before the upgrade, as an HTTP 403 whose JSON body names
the close code: a cross-site page never gets a WebSocket. The other
refusals (4001 no valid credential, 1011 the authenticator failed, 1013 too
many connections, 1001 shutting down) accept the upgrade and close at once
with the code, without reading a frame or allocating an actor: a browser
sees only "1006" for a refused upgrade, and its client must see 4001 (do not
reconnect) or 1013 (back off) to do the right thing.

Accepted: ``handler.open(transport, identity)`` connects the client to the
hub (the ``welcome`` is its first frame), then the read loop hands every
text frame to ``handler.frame``. A binary frame closes with 1003; a frame
over ``limits.max_message_size`` is refused by hypercorn with 1009 (and
checked here again); a client that goes away is disconnected from the hub
(its presence ends).

The write side: the connection's actor (in the hub's tasks) calls the
transport's ``send_many``. Hypercorn's ``send`` may be called from any task
of the trio run (it takes a lock), but it writes to the socket inside a
*shielded* cancel scope, so an actor blocked on a client that stopped
reading could not be cancelled (no slow-consumer close, no shutdown). So
each connection has a relay: its own writer task (in the connection's ASGI
task) does the ASGI sends. The hub's direct writer hands it each drained
batch without waiting (``send_nowait``) while it is idle; while it is busy
the events stay in the connection's bounded outbox and the relay asks for
them when it is done (``wake_when_writable``), so a burst is handed over in
few batches and the slow-consumer policy still applies. (The connection's
actor, when it writes, waits for its batch in a cancellable wait.) The
relay also keeps the hub's ``min_write_interval``. One ``websocket.send``
per frame (no batching across frames unless the client asked for it); the
text of a frame shared by many recipients is decoded once.

Everything else (``/healthz``, ``/readyz``, ``/metrics``, ``/api/...``) is
the HTTP API; other paths go to the optional ``fallback`` ASGI app, or get
404. The app respects ``root_path`` and can be mounted in a larger app (the
larger app must forward the lifespan, or run the app with
:meth:`EnsembleApp.running`).
"""

from __future__ import annotations

import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from prometheus_client import Gauge

from ..protocol import CloseCode
from ..realtime import Hub, TooManyConnections, Transport, TransportClosed, open_hub
from ..server._auth import AuthCallable, Authenticator, HandshakeResult, authenticate_handshake, build_authenticator, offered_subprotocols
from ..server._config import ServerConfig
from ..server._handler import ProtocolHandler
from ..server._heartbeat import Heartbeat
from ..server._http_api import HttpApi, not_found
from ..server._identity import Identity
from ..server._metrics import HubCollector, TransportCounters, create_registry, render

logger = logging.getLogger("ensemble.transport.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WS_PATH: Final = "/ws"
MAX_CLOSE_REASON: Final = 123
"""A WebSocket close reason holds at most 123 bytes of UTF-8."""
CLOSE_GRACE: Final = 2.0
"""Seconds a client has to answer the server's close before its task ends."""

# Refusals answered before the upgrade (HTTP status), the others after it.
_BEFORE_UPGRADE: Final = {CloseCode.POLICY_VIOLATION: 403}


# -- the transport ------------------------------------------------------------------


class _Done:
    """Stands for the ``done`` event of a job nobody waits for (a direct write)."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NOBODY: Final = _Done()


@attrs.define(eq=False)
class _Job:
    texts: list[str]
    done: trio.Event | _Done = attrs.field(factory=trio.Event)
    abandoned: bool = False
    error: BaseException | None = None


@attrs.define(eq=False)
class _CloseJob:
    code: int
    reason: str
    done: trio.Event = attrs.field(factory=trio.Event)


class _TextCache:
    """The ``str`` of recently written frames, by identity of their ``bytes``.

    ASGI wants a text frame as ``str``; a broadcast hands the *same*
    ``bytes`` object to every recipient, so decoding it once serves them all.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._items: dict[int, tuple[bytes, str]] = {}

    def text(self, frame: bytes) -> str:
        key = id(frame)
        hit = self._items.get(key)
        if hit is not None and hit[0] is frame:
            return hit[1]
        text = frame.decode("utf-8")
        if len(self._items) >= self._size:
            self._items.clear()
        self._items[key] = (frame, text)
        return text


_TEXTS: Final = _TextCache()


def close_reason(reason: str) -> str:
    """A close reason that fits a close frame (123 bytes of UTF-8).

    A JSON reason (the slow-consumer one with resume positions) too long to
    fit is replaced by its ``error`` field; other text is cut on a character
    boundary.
    """
    encoded = reason.encode("utf-8", "replace")
    if len(encoded) <= MAX_CLOSE_REASON:
        return reason
    try:
        parsed = json.loads(reason)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return close_reason(parsed["error"])
    return encoded[:MAX_CLOSE_REASON].decode("utf-8", "ignore")


class AsgiWebSocketTransport:
    """A hub :class:`~ensemble.realtime.Transport` over one ASGI WebSocket.

    The hub's connection actor calls :meth:`send_many` (and :meth:`close`);
    the frames are handed to :meth:`run_writer`, the connection's relay task,
    which does the ASGI ``websocket.send`` calls. A close whose reason does
    not fit a close frame (over 123 bytes) is preceded by a final text frame
    ``{"type":"close","code":...,"reason":...}`` holding it whole.

    Args:
        send: The ASGI ``send`` callable of the WebSocket's scope.
        counters: Where frames and bytes written are counted.
    """

    def __init__(self, send: Send, counters: TransportCounters | None = None, *, min_write_interval: float = 0.0) -> None:
        self._send = send
        self._interval = min_write_interval
        self._written_at = -math.inf  # when the relay last finished a write
        self._counters = counters if counters is not None else TransportCounters()
        self._jobs: deque[_Job | _CloseJob] = deque()
        self._wake = trio.Event()
        self._close_job: _CloseJob | None = None
        self._writing = False  # the relay is in a job
        self._on_writable: Callable[[], None] | None = None
        self.peer_gone = False
        self.close_code: int | None = None
        self.closed_sent = trio.Event()

    def __repr__(self) -> str:
        return f"<AsgiWebSocketTransport close_code={self.close_code}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._close_job is not None

    async def send(self, data: bytes) -> None:
        """Write one frame (see :meth:`send_many`)."""
        await self.send_many([data])

    async def send_many(self, frames: list[bytes]) -> None:
        """Write ``frames`` in order, one text message each; return once written.

        Cancelling the wait (a slow consumer, a shutdown) abandons what is
        not written yet; the frame being written is finished by the writer.

        Raises:
            TransportClosed: The transport is closed.
            trio.BrokenResourceError: The write failed.
        """
        if self._close_job is not None:
            await trio.lowlevel.checkpoint()
            raise TransportClosed("the WebSocket is closed")
        if self.peer_gone:  # the client left; the hub is being told
            await trio.lowlevel.checkpoint()
            return
        done = trio.Event()
        job = _Job([_TEXTS.text(frame) for frame in frames], done)
        self._push(job)
        try:
            await done.wait()
        except BaseException:
            job.abandoned = True
            raise
        if job.error is not None:
            raise trio.BrokenResourceError(f"WebSocket send failed: {type(job.error).__name__}") from job.error

    # The hub's direct writer: hand a batch to the relay without waiting for it.
    direct_writes: Final = True
    paces_writes: Final = True
    """The relay keeps the hub's ``min_write_interval`` itself (direct writes stay on)."""

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may be called: open, the relay idle, and
        ``min_write_interval`` passed since its last write."""
        if self._close_job is not None or self.peer_gone or self._writing or self._jobs:
            return False
        return not self._interval or trio.current_time() >= self._written_at + self._interval

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Hand ``frames`` to the relay (written in order, before anything
        handed over later, and before the close frame); nobody waits."""
        self._push(_Job([_TEXTS.text(frame) for frame in frames], _NOBODY))
        return True

    def wake_when_writable(self, callback: Callable[[], None]) -> bool:
        """While the relay is busy: call ``callback`` once when it is idle again.

        Returns:
            Whether it will (``False``: closed, or not busy).
        """
        if self._close_job is not None or self.peer_gone:
            return False
        if not (self._writing or self._jobs or (self._interval and trio.current_time() < self._written_at + self._interval)):
            return False
        self._on_writable = callback
        self._wake.set()  # an idle relay waits out the interval, then calls it
        return True

    async def close(self, code: int, reason: str) -> None:
        """Close the WebSocket with ``code`` (once; later calls wait for the first)."""
        job = self._close_job
        if job is None:
            job = self._close_job = _CloseJob(int(code), reason)
            self.close_code = int(code)
            self._push(job)
        await job.done.wait()

    def _push(self, job: _Job | _CloseJob) -> None:
        self._jobs.append(job)
        self._wake.set()

    async def run_writer(self) -> None:
        """The relay: do the ASGI sends the hub asked for, until closed."""
        while True:
            if not self._jobs:
                callback = self._on_writable
                if callback is not None:
                    if self._interval:
                        # Events pile up in the outbox meanwhile: one write for them all.
                        await trio.sleep_until(self._written_at + self._interval)
                    self._on_writable = None
                    callback()  # the hub's direct writer hands over what queued meanwhile
                    continue
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            job = self._jobs.popleft()
            if isinstance(job, _CloseJob):
                await self._write_close(job)
                for pending in self._jobs:
                    if isinstance(pending, _Job):
                        pending.error = TransportClosed("the WebSocket is closed")
                    pending.done.set()
                self._jobs.clear()
                return
            await self._write(job)

    async def _write(self, job: _Job) -> None:
        counters = self._counters
        self._writing = True
        try:
            for text in job.texts:
                if job.abandoned or self.peer_gone:
                    break
                await self._send({"type": "websocket.send", "text": text})
                counters.frames_out += 1
                counters.bytes_out += len(text)
        except Exception as exc:  # hypercorn's and the socket's errors, translated here
            job.error = exc
            if job.done is _NOBODY:
                logger.debug("a WebSocket send failed: %r", exc)
                self.peer_gone = True  # the read loop sees the disconnect and closes
        finally:
            self._writing = False
            self._written_at = trio.current_time()
            job.done.set()

    async def _write_close(self, job: _CloseJob) -> None:
        try:
            if not self.peer_gone:
                reason = close_reason(job.reason)
                if reason != job.reason:
                    final = json.dumps({"type": "close", "code": job.code, "reason": job.reason}, separators=(",", ":"))
                    await self._send({"type": "websocket.send", "text": final})
                await self._send({"type": "websocket.close", "code": job.code, "reason": reason})
        except Exception as exc:
            logger.debug("closing a WebSocket with %d failed: %r", job.code, exc)
        finally:
            job.done.set()
            self.closed_sent.set()

    async def close_now(self, code: int, reason: str) -> None:
        """Close from the connection's own task, without the writer (a cancelled
        connection task: the writer is being cancelled with it)."""
        if self._close_job is not None or self.peer_gone:
            await trio.lowlevel.checkpoint()
            return
        job = self._close_job = _CloseJob(int(code), reason)
        self.close_code = int(code)
        await self._write_close(job)


# -- the app --------------------------------------------------------------------------


@attrs.frozen
class Admission:
    """The decision on a WebSocket handshake (:meth:`EnsembleApp.admit`).

    Attributes:
        refusal: ``(close code, reason)`` when refused.
        handshake: When admitted: the authenticated handshake (identity,
            subprotocol to echo).
    """

    refusal: tuple[CloseCode, str] | None = None
    handshake: HandshakeResult | None = None

    @property
    def identity(self) -> Identity | None:
        """The admitted client's identity (``None``: it must authenticate in-band)."""
        return None if self.handshake is None else self.handshake.identity


@attrs.frozen
class Refusal:
    """How a refused handshake is answered (:meth:`EnsembleApp.refusal`).

    Attributes:
        code: The close code.
        reason: The close reason (shortened to fit a close frame).
        status: An HTTP status to answer *instead of* the upgrade (the
            origin refusal: a cross-site page never gets a WebSocket), with
            ``body`` (JSON naming the close code); ``None``: accept the
            upgrade, then close at once with ``code``.
        body: The HTTP body when ``status`` is set.
        subprotocol: The subprotocol to echo when accepting to close (a
            browser fails a handshake that ignores the subprotocols it offered).
    """

    code: CloseCode
    reason: str
    status: int | None = None
    body: bytes = b""
    subprotocol: str | None = None


def _app_path(scope: Scope) -> str:
    """The path relative to where the app is mounted (``root_path`` removed)."""
    path: str = scope.get("path", "") or "/"
    root: str = (scope.get("root_path", "") or "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :] or "/"
    return path


class EnsembleApp:
    """The Ensemble server as an ASGI 3 application.

    Args:
        config: The server's configuration (default: ``ServerConfig()``).
        authenticator: An authenticator (or a function: token -> user id,
            Identity or None) passed in code; see ``build_authenticator``.
        hub: A hub the caller runs (``open_hub``); by default the app opens
            its own in its lifespan (``config.hub_config()``).
        fallback: An ASGI app for the paths this app does not serve.

    Attributes:
        config: The configuration.
        counters: The transport's counters (frames and bytes in and out).
        registry: The app's own Prometheus registry.
        hub: The running hub (``None`` outside the lifespan).
        handler: The protocol handler (``None`` outside the lifespan).
        heartbeat: The heartbeat sweeper (``None`` outside the lifespan).
        websocket_calls: WebSocket ASGI calls in progress (refused ones
            too, until they return); also the ``ensemble_websocket_calls``
            gauge. Above the open connections for long: tasks stuck in
            the server's writes.
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        authenticator: AuthCallable | Authenticator | None = None,
        hub: Hub | None = None,
        fallback: ASGIApp | None = None,
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        self.authenticator = build_authenticator(self.config.auth, authenticator)
        self.fallback = fallback
        self.serve_static = True
        self.counters = TransportCounters()
        self.hub: Hub | None = None
        self.handler: ProtocolHandler | None = None
        self.heartbeat: Heartbeat | None = None
        self._external_hub = hub
        self._accepting = False
        self._running = False
        self._connections: set[str] = set()
        self.websocket_calls = 0
        self.registry = create_registry(HubCollector(lambda: self.hub, self.counters, lambda: self.heartbeat))
        Gauge("ensemble_websocket_calls", "WebSocket ASGI calls in progress.", registry=self.registry).set_function(
            lambda: self.websocket_calls
        )
        self.http = HttpApi(
            lambda: self.hub,
            api_keys=self.config.api_keys,
            ready=lambda: self._accepting,
            metrics=lambda: render(self.registry),
        )

    def __repr__(self) -> str:
        state = "accepting" if self._accepting else "running" if self._running else "stopped"
        return f"<EnsembleApp {state}, {len(self._connections)} WebSocket connections>"

    @property
    def accepting(self) -> bool:
        """Whether new WebSocket connections are accepted now."""
        return self._accepting

    # -- lifecycle ------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[EnsembleApp]:
        """Run the hub, the protocol handler and the heartbeat sweeper.

        The ASGI lifespan uses this; an app mounted in a larger one that does
        not forward the lifespan can be run with it directly. On exit the app
        stops accepting, closes its clients with 1001 and stops the actors in
        order, within ``config.shutdown_timeout``.

        Raises:
            RuntimeError: The app is running already.
        """
        if self._running:
            raise RuntimeError("this EnsembleApp is running already")
        self._running = True
        config = self.config
        try:
            async with self._hub() as hub, trio.open_nursery() as nursery:
                handler = ProtocolHandler(
                    hub,
                    max_message_size=config.limits.max_message_size,
                    max_rooms_per_connection=config.limits.max_rooms_per_connection,
                    authenticator=self.authenticator,
                    auth_timeout=config.auth.auth_timeout,
                    watchable_models=config.watchable_models,
                ).install()
                heartbeat = Heartbeat(
                    hub.connections,
                    interval=config.heartbeat.interval,
                    timeout=config.heartbeat.timeout,
                    unauthenticated=handler.unauthenticated,
                    expiring=handler.expiring,
                    # Often enough for the authentication timeout too.
                    tick=min(config.heartbeat.interval, config.heartbeat.timeout, config.auth.auth_timeout) / 2,
                )
                await nursery.start(heartbeat.run)
                self.hub, self.handler, self.heartbeat = hub, handler, heartbeat
                self._accepting = True
                try:
                    yield self
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(config.shutdown_timeout):
                        await self.drain()
                    nursery.cancel_scope.cancel()
        finally:
            self._accepting = False
            self.hub = self.handler = self.heartbeat = None
            self._running = False

    @asynccontextmanager
    async def _hub(self) -> AsyncIterator[Hub]:
        if self._external_hub is not None:
            yield self._external_hub
            return
        async with open_hub(self.config.hub_config()) as hub:
            yield hub

    async def drain(self) -> int:
        """Stop accepting, and close this app's clients with 1001.

        Idempotent; ``serve`` calls it when a shutdown starts (before
        hypercorn stops listening and waits for the connections), and
        :meth:`running` on exit. Bound it with a cancel scope: clients still
        open when it is cancelled are left to the hub's shutdown.

        Returns:
            How many connections were closed.
        """
        self._accepting = False
        handler = self.handler
        if handler is None:
            await trio.lowlevel.checkpoint()
            return 0
        closed = 0
        async with trio.open_nursery() as nursery:

            async def close(connection_id: str) -> None:
                nonlocal closed
                if await handler.close(connection_id, code=CloseCode.GOING_AWAY, reason="server shutting down"):
                    closed += 1

            for connection_id in list(self._connections):
                nursery.start_soon(close, connection_id)
        if closed:
            logger.info("closed %d WebSocket connections for the shutdown", closed)
        return closed

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI 3 entry point."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = _app_path(scope)
        if kind == "websocket" and path == WS_PATH:
            self.websocket_calls += 1
            try:
                await self._websocket(scope, receive, send)
            finally:
                self.websocket_calls -= 1
        elif kind == "http" and self.http.handles(path):
            await self.http(scope, receive, send, path)
        elif kind == "http" and path in STATIC_FILES and self.serve_static:
            await _static(scope, send, STATIC_FILES[path])
        elif self.fallback is not None:
            await self.fallback(scope, receive, send)
        elif kind == "http":
            await not_found(send)
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": int(CloseCode.POLICY_VIOLATION)})  # 403 before the upgrade

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "lifespan.startup":
            return
        started = False
        try:
            async with self.running():
                started = True
                await send({"type": "lifespan.startup.complete"})
                while (await receive())["type"] != "lifespan.shutdown":
                    pass
        except Exception as exc:
            logger.exception("the Ensemble app failed")
            kind = "lifespan.shutdown.failed" if started else "lifespan.startup.failed"
            await send({"type": kind, "message": f"{type(exc).__name__}: {exc}"})
            return
        await send({"type": "lifespan.shutdown.complete"})

    # -- WebSocket ---------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        admission = await self.admit(scope)
        if admission.refusal is not None:
            await self._refuse(scope, send, *admission.refusal)
            return
        assert admission.handshake is not None
        await self._serve(scope, receive, send, admission.handshake, admission.identity)

    async def admit(self, scope: Scope) -> Admission:
        """Decide a WebSocket handshake, before any actor is allocated.

        Every transport asks this with the handshake as an ASGI ``websocket``
        scope (the native transport builds one): running and accepting, the
        number of headers, ``max_connections``, ``authenticate_handshake``
        (origin, then a credential), ``max_connections_per_user``. A refusal
        is counted in ``counters.refused``.
        """
        hub = self.hub
        config = self.config
        refusal: tuple[CloseCode, str] | None = None
        result: HandshakeResult | None = None
        if hub is None or self.handler is None or self.heartbeat is None or not self._accepting:
            refusal = (CloseCode.GOING_AWAY, "server shutting down") if self._running else (CloseCode.TRY_AGAIN_LATER, "server not ready")
        elif len(scope.get("headers", ())) > config.limits.max_headers:
            refusal = (CloseCode.POLICY_VIOLATION, "too many headers")
        elif hub.connections.connection_count >= config.limits.max_connections:
            refusal = (CloseCode.TRY_AGAIN_LATER, "too many connections")
        else:
            result = await authenticate_handshake(scope, config, self.authenticator)
            per_user = config.limits.max_connections_per_user
            identity = result.identity
            if result.close_code is not None:
                refusal = (result.close_code, result.reason)
            elif identity is not None and per_user is not None and len(hub.connections.get_user_connections(identity.user_id)) >= per_user:
                refusal = (CloseCode.TRY_AGAIN_LATER, "too many connections for this user")
        if refusal is not None:
            self.counters.refused += 1
            return Admission(refusal=refusal)
        assert result is not None
        return Admission(handshake=result)

    def refusal(self, scope: Scope, code: CloseCode, reason: str) -> Refusal:
        """How a transport answers a refused handshake (see the module doc)."""
        status = _BEFORE_UPGRADE.get(code)
        if status is not None:
            body = json.dumps({"type": "error", "code": code.name.lower(), "close_code": int(code), "detail": reason}).encode()
            return Refusal(code=code, reason=reason, status=status, body=body)
        subprotocol = self.config.auth.subprotocol
        return Refusal(
            code=code,
            reason=close_reason(reason),
            subprotocol=subprotocol if subprotocol in offered_subprotocols(scope) else None,
        )

    async def _refuse(self, scope: Scope, send: Send, code: CloseCode, reason: str) -> None:
        """Refuse a handshake with ``code``: before the upgrade (HTTP) for a
        policy refusal, else by accepting and closing at once (see the module doc)."""
        refusal = self.refusal(scope, code, reason)
        if refusal.status is not None:
            if "websocket.http.response" in (scope.get("extensions") or {}):
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(refusal.body)).encode())]
                await send({"type": "websocket.http.response.start", "status": refusal.status, "headers": headers})
                await send({"type": "websocket.http.response.body", "body": refusal.body})
            else:
                await send({"type": "websocket.close", "code": int(code), "reason": reason})  # the server answers 403
            return
        accept: Message = {"type": "websocket.accept"}
        if refusal.subprotocol is not None:
            accept["subprotocol"] = refusal.subprotocol  # a browser fails a handshake that ignores its subprotocols
        await send(accept)
        await send({"type": "websocket.close", "code": int(code), "reason": refusal.reason})

    async def _serve(self, scope: Scope, receive: Receive, send: Send, result: HandshakeResult, identity: Identity | None) -> None:
        accept: Message = {"type": "websocket.accept"}
        if result.subprotocol is not None:
            accept["subprotocol"] = result.subprotocol
        await send(accept)
        transport = AsgiWebSocketTransport(send, self.counters, min_write_interval=self.config.hub.min_write_interval)
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as reading:

                async def relay() -> None:
                    await transport.run_writer()
                    # The close is written: the client has a moment to answer it
                    # (the read loop sees its disconnect), then the task ends and
                    # hypercorn closes the socket (a vanished client cannot pin it).
                    reading.deadline = min(reading.deadline, trio.current_time() + CLOSE_GRACE)

                nursery.start_soon(relay)
                try:
                    async with self.connection(transport, identity, kind="asgi", client=scope.get("client")) as connection_id:
                        if connection_id is None:
                            await trio.sleep_forever()  # until the client answers the close, or the grace ends
                        await self._read(connection_id, receive, transport)
                except trio.Cancelled:
                    if not reading.cancel_called:
                        # Hypercorn cancels connections after its graceful timeout:
                        # say goodbye (1001) directly, the writer is cancelled too.
                        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                            await transport.close_now(int(CloseCode.GOING_AWAY), "server shutting down")
                    raise
                finally:
                    nursery.cancel_scope.cancel()

    def connection(
        self,
        transport: Transport,
        identity: Identity | None,
        *,
        kind: str,
        client: Any = None,
    ) -> _ClientConnection:
        """An admitted client's hub connection, for as long as the
        ``async with`` block runs.

        Opens it (``handler.open``: the ``welcome`` is its first frame) and
        has the heartbeat track it; at the end it is closed (1001, "connection
        ended", unless closed already) and forgotten. The block gets the
        connection id, or ``None`` when it could not be opened: the transport
        was then closed with 1013 (too many connections) or 1011.

        (A small object rather than a generator: it lives as long as the
        connection, so it is part of what an idle connection costs.)

        Args:
            transport: The connection's hub transport.
            identity: Who authenticated at the handshake (``None``: in-band).
            kind: The transport's name, in the connection's metadata.
            client: The peer's ``(host, port)``, if known.
        """
        return _ClientConnection(self, transport, identity, kind, client)

    async def client_frame(self, connection_id: str, text: str) -> None:
        """A text frame from a client: counted, noted as a sign of life, handled."""
        handler, heartbeat = self.handler, self.heartbeat
        if handler is None or heartbeat is None:
            raise RuntimeError("the app is not running")
        counters = self.counters
        counters.frames_in += 1
        counters.bytes_in += len(text)
        heartbeat.seen(connection_id)
        await handler.frame(connection_id, text)

    async def client_frames(self, connection_id: str, texts: list[str], *, wait: bool = True) -> None:
        """Several text frames from a client (one read's worth), handled in one
        actor step (``wait=False``: queued for it, see ``ProtocolHandler.frames``)."""
        handler, heartbeat = self.handler, self.heartbeat
        if handler is None or heartbeat is None:
            raise RuntimeError("the app is not running")
        counters = self.counters
        counters.frames_in += len(texts)
        counters.bytes_in += sum(len(text) for text in texts)
        heartbeat.seen(connection_id)
        await handler.frames(connection_id, texts, wait=wait)

    async def close_connection(self, connection_id: str, code: CloseCode, reason: str) -> None:
        """Close a client's connection with ``code`` (through its actor, after what it queued)."""
        handler = self.handler
        if handler is not None:
            await handler.close(connection_id, code=code, reason=reason)

    async def _read(self, connection_id: str, receive: Receive, transport: AsgiWebSocketTransport) -> None:
        """Hand each client frame to the handler until the client leaves.

        Once the server closed the connection, frames are read and dropped
        until the client's answer (the caller bounds that wait).
        """
        counters = self.counters
        max_size = self.config.limits.max_message_size
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                transport.peer_gone = True
                await self.close_connection(connection_id, CloseCode.NORMAL, "client went away")
                return
            if kind != "websocket.receive" or transport.closed:
                continue
            text = message.get("text")
            if text is None:
                counters.protocol_errors += 1
                await self.close_connection(connection_id, CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                continue
            # Hypercorn has a limit too (counted in characters); a mounted app's server may not.
            if len(text) > max_size or (not text.isascii() and len(text.encode("utf-8")) > max_size):
                counters.protocol_errors += 1
                await self.close_connection(connection_id, CloseCode.MESSAGE_TOO_BIG, "message too big")
                continue
            # Queued, not awaited: the next frame is read while the actor
            # handles this one (a burst reaches the room as a burst).
            await self.client_frames(connection_id, [text], wait=False)


def create_app(
    config: ServerConfig | None = None,
    *,
    authenticator: AuthCallable | Authenticator | None = None,
    hub: Hub | None = None,
    fallback: ASGIApp | None = None,
) -> EnsembleApp:
    """The Ensemble ASGI application (see :class:`EnsembleApp`).

    Args:
        config: The server's configuration (default: ``ServerConfig()``,
            development mode).
        authenticator: An authenticator or function passed in code.
        hub: A hub the caller runs, instead of the app's own.
        fallback: An ASGI app for the paths Ensemble does not serve.

    Raises:
        ValueError: The authentication configuration is not usable.
    """
    return EnsembleApp(config, authenticator=authenticator, hub=hub, fallback=fallback)


_STATIC_DIR: Final = Path(__file__).resolve().parent.parent / "static"

STATIC_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/ensemble.js": ("ensemble.js", "text/javascript; charset=utf-8"),
}
"""The demo chat page and the JavaScript client, by path (``serve_static`` turns them off)."""


async def _static(scope: Scope, send: Send, entry: tuple[str, str]) -> None:
    """Serve one of the packaged static files (GET and HEAD only)."""
    name, content_type = entry
    method = scope.get("method", "GET")
    if method not in ("GET", "HEAD"):
        await send({"type": "http.response.start", "status": 405, "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = await trio.Path(_STATIC_DIR / name).read_bytes()
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-cache"),
        (b"x-content-type-options", b"nosniff"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


class _ClientConnection:
    """:meth:`EnsembleApp.connection`."""

    __slots__ = ("app", "client", "connection_id", "handler", "heartbeat", "identity", "kind", "transport")

    def __init__(self, app: EnsembleApp, transport: Transport, identity: Identity | None, kind: str, client: Any) -> None:
        self.app = app
        self.transport = transport
        self.identity = identity
        self.kind = kind
        self.client = client
        self.connection_id: str | None = None
        self.handler: ProtocolHandler | None = None
        self.heartbeat: Heartbeat | None = None

    async def __aenter__(self) -> str | None:
        app = self.app
        handler, heartbeat = app.handler, app.heartbeat
        if handler is None or heartbeat is None:
            raise RuntimeError("the app is not running")
        metadata = {"transport": self.kind}
        client = self.client
        if client:
            metadata["remote"] = f"{client[0]}:{client[1]}"
        transport = self.transport
        try:
            info = await handler.open(transport, self.identity, metadata=metadata)
        except TooManyConnections:
            await transport.close(int(CloseCode.TRY_AGAIN_LATER), "too many connections")
            return None
        except ValueError as exc:
            logger.warning("opening a connection failed: %s", exc)
            await transport.close(int(CloseCode.INTERNAL_ERROR), "internal error")
            return None
        connection_id = self.connection_id = info.connection_id
        self.handler, self.heartbeat = handler, heartbeat
        app._connections.add(connection_id)
        heartbeat.opened(connection_id)
        return connection_id

    async def __aexit__(self, *exc: object) -> None:
        connection_id = self.connection_id
        if connection_id is None:
            return
        app, handler, heartbeat = self.app, self.handler, self.heartbeat
        assert handler is not None
        assert heartbeat is not None
        app._connections.discard(connection_id)
        heartbeat.closed(connection_id)
        with trio.CancelScope(shield=True), trio.move_on_after(app.config.shutdown_timeout):
            await handler.close(connection_id, code=CloseCode.GOING_AWAY, reason="connection ended")
