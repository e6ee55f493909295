"""The native transport: WebSocket directly on trio streams.

``serve_native(app)`` listens (its own accept loop, as ``trio.serve_listeners``;
TLS through ``trio.SSLStream`` when ``config.tls_certfile`` is set) and runs the same
:class:`~ensemble.transport._asgi.EnsembleApp` as the ASGI transport: the
same handshake decision (:meth:`EnsembleApp.admit`: origin, credential,
limits), the same protocol handler, heartbeat, HTTP API, metrics and demo
page. Only the bytes are handled here:

- The request head is parsed with h11 (bounded by
  ``limits.max_handshake_bytes`` and ``limits.handshake_timeout``). A
  WebSocket upgrade of ``/ws`` is answered by hand (``101`` with
  ``Sec-WebSocket-Accept``); any other request is passed to the app as an
  ASGI ``http`` request (one request per connection, ``Connection: close``).
- Client frames are parsed by wsproto's frame layer (masking, fragments,
  UTF-8 checked incrementally: 1007; control frames; close handshake). A
  message is rejected with 1009 as soon as its fragments pass
  ``limits.max_message_size``, before it is buffered whole; a binary
  message is closed with 1003.
- Server frames are built once per event (:class:`FrameCache`: the frame of
  an ``Event.encoded`` payload is made by the first connection that writes
  it and shared by all the others) and each batch drained from an outbox is
  written with one socket write.

On a plain socket the transport is a ``DirectTransport``: the hub's direct
writer hands it each drained batch (:meth:`NativeWebSocketTransport.send_nowait`,
one non-blocking ``send`` straight to the socket); what the kernel does not
take is kept and written by the connection's actor, which may wait for the
socket. (Under TLS the actor writes every batch.) A socket write is
cancellable here (unlike hypercorn's shielded one), so the slow-consumer
policy can abandon a stuck write. The write loop tracks how much of the
batch went out, so the close that follows first finishes the interrupted
batch (the client's stream stays valid) and then sends the close frame
(4008 with the resume positions), all bounded by ``limits.write_timeout``;
the kernel's ``TCP_USER_TIMEOUT`` (the same limit) aborts a connection whose
peer stopped reading altogether.

An idle connection holds no task: its reader keeps its state in a
:class:`_NativeConnection` and, on a plain socket, after ``hub.hibernate_after``
seconds without a read, ends its task and leaves the socket to
:class:`_IdleReaders` (one ``epoll`` set, one task for all of them), which
gives it a task again when the client sends anything or goes away, or when
the server closes the connection. (With the hub's hibernating actors, that
takes an idle connection from about 28 KB to about 12 KB; docs/benchmarks.md.)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import select
import socket as _stdlib_socket
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final
from urllib.parse import unquote

import h11
import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from .._sync import LazyEvent, LazyFIFOLock
from ..protocol import CloseCode
from ..realtime import TransportClosed
from ..server._config import ServerConfig
from ..server._identity import Identity
from ..server._metrics import TransportCounters
from ..server._serve import set_write_timeout
from ._asgi import CLOSE_GRACE, WS_PATH, EnsembleApp, Scope, _app_path, close_reason
from ._frames import OP_PONG, FrameCache, accept_key, close_frame, frame, valid_key

logger = logging.getLogger("ensemble.transport.native")

RECEIVE_SIZE: Final = 65536
MAX_HTTP_BODY: Final = 1 << 20
"""The largest HTTP request body the native transport reads (413 beyond)."""


# -- the transport ------------------------------------------------------------------


class NativeWebSocketTransport:
    """A hub :class:`~ensemble.realtime.Transport` writing WebSocket frames to a trio stream.

    ``send_many`` frames the payloads (through the shared :class:`FrameCache`)
    and writes them with one socket write; the connection's actor calls it.
    The connection's reader writes control frames (pong, the close echo)
    through the same lock, so writes never interleave.

    Args:
        stream: The connection's stream (a ``SocketStream``, or an
            ``SSLStream`` over one).
        cache: The frame cache shared by the server's connections.
        counters: Where frames and bytes written are counted.
        write_timeout: Seconds the final writes of a close may take.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        cache: FrameCache,
        counters: TransportCounters,
        *,
        write_timeout: float,
    ) -> None:
        self._stream = stream
        socket = getattr(stream, "socket", None)
        self._socket: trio.socket.SocketType | None = socket if isinstance(stream, trio.SocketStream) else None
        # The non-blocking standard library socket trio's wraps (trio keeps it
        # as ``_sock``), for writes that need no wait; trio's own ``send``
        # where it is not there.
        raw = getattr(self._socket, "_sock", None)
        self._raw: _stdlib_socket.socket | None = raw if isinstance(raw, _stdlib_socket.socket) else None
        self._cache = cache
        self._counters = counters
        self._write_timeout = write_timeout
        self._lock = LazyFIFOLock()
        self._unsent: memoryview | None = None  # the rest of an interrupted write
        self._broken = False  # an interrupted write that cannot be finished (TLS)
        self.close_code: int | None = None
        self.close_sent = LazyEvent()
        self.peer_gone = False
        self.reading: trio.CancelScope | None = None
        """The connection's read loop: once closed, it reads for :data:`CLOSE_GRACE` more at most."""
        self.read_deadline = math.inf
        """Until when the reader reads (set by the close; applies to a later read loop too)."""
        self.on_close: Callable[[], None] | None = None
        """Called once the close frame is written: the reader of a hibernating connection wakes."""

    def __repr__(self) -> str:
        return f"<NativeWebSocketTransport close_code={self.close_code}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self.close_code is not None

    async def send(self, data: bytes) -> None:
        """Write one text frame (see :meth:`send_many`)."""
        await self.send_many([data])

    async def send_many(self, frames: list[bytes]) -> None:
        """Write ``frames`` as text frames, in order, with one socket write.

        Raises:
            TransportClosed: The transport is closed.
            trio.BrokenResourceError: The write failed (the client is gone).
        """
        if self.close_code is not None:
            await trio.lowlevel.checkpoint()
            raise TransportClosed("the WebSocket is closed")
        if self.peer_gone:  # the client left; the hub is being told
            await trio.lowlevel.checkpoint()
            return
        data = self._cache.frames(frames)
        lock = self._lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()  # the common case: no schedule point
        try:
            await self._write(data)
        finally:
            lock.release()
        counters = self._counters
        counters.frames_out += len(frames)
        counters.bytes_out += len(data)

    @property
    def direct_writes(self) -> bool:
        """Whether :meth:`send_nowait` can be used (a plain socket, not TLS)."""
        return self._raw is not None

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may be called now: a plain socket, open,
        with no write in progress and nothing left over from one."""
        return self._raw is not None and self._unsent is None and self.close_code is None and not self.peer_gone and not self._lock.locked()

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Write ``frames`` as text frames now, without waiting (the hub's
        direct writer; only when :meth:`can_send_nowait`).

        Returns:
            Whether the kernel took everything; if not, the rest is kept and
            written first by the next :meth:`send_many` (or before the close
            frame).

        Raises:
            trio.BrokenResourceError: The write failed (the client is gone).
        """
        raw = self._raw
        assert raw is not None
        assert self._unsent is None
        data = self._cache.frames(frames)
        counters = self._counters
        counters.frames_out += len(frames)
        counters.bytes_out += len(data)
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.peer_gone = True
            raise trio.BrokenResourceError(f"WebSocket send failed: {exc}") from None
        if sent == len(data):
            return True
        self._unsent = memoryview(data)[sent:]
        return False

    async def control(self, data: bytes) -> None:
        """Write a control frame (the reader's pongs); dropped once closing."""
        if self.close_code is not None or self.peer_gone:
            await trio.lowlevel.checkpoint()
            return
        async with self._lock:
            await self._write(data)

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``: finish an interrupted write, then the close frame.

        A reason too long for a close frame (the slow-consumer positions) is
        first sent whole in a final text frame ``{"type":"close",...}``, as
        the ASGI transport does. Bounded by the write timeout; the stream is
        closed by the connection's task afterwards (after the client's close
        echo, or a short grace).
        """
        if self.close_code is not None:
            await self.close_sent.wait()
            return
        self.close_code = int(code)
        try:
            if self.peer_gone:
                return
            short = close_reason(reason)
            data = close_frame(int(code), short)
            if short != reason:
                final = json.dumps({"type": "close", "code": int(code), "reason": reason}, separators=(",", ":")).encode()
                data = frame(final) + data
            with trio.move_on_after(self._write_timeout) as bounded:
                async with self._lock:
                    if self._broken:
                        return
                    if self._unsent is not None:
                        await self._write(b"")  # the rest of the interrupted batch first
                    await self._write(data)
            if bounded.cancelled_caught:
                logger.debug("the close (%d) of a connection could not be written in time", code)
                self.peer_gone = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.peer_gone = True
        finally:
            self.close_sent.set()
            # The client has a moment to answer the close; one that cannot be
            # written to gets none.
            grace = 0.0 if self.peer_gone else CLOSE_GRACE
            self.read_deadline = min(self.read_deadline, trio.current_time() + grace)
            reading = self.reading
            if reading is not None:
                reading.deadline = min(reading.deadline, self.read_deadline)
            hook = self.on_close
            if hook is not None:
                hook()

    async def _write(self, data: bytes) -> None:
        """Write ``data`` (after the rest of an interrupted write); cancellable,
        keeping track of what did not go out."""
        socket = self._socket
        if socket is None:
            if self._broken:
                raise trio.BrokenResourceError("an earlier write was interrupted")
            try:
                await self._stream.send_all(data)
            except trio.Cancelled:
                self._broken = True  # a TLS record may be half written
                raise
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.peer_gone = True
                raise trio.BrokenResourceError(f"WebSocket send failed: {type(exc).__name__}") from None
            return
        view = self._unsent if self._unsent is not None else None
        if view is not None:
            self._unsent = None
            if data:
                view = memoryview(bytes(view) + data)
        else:
            view = memoryview(data)
        raw = self._raw
        try:
            while view:
                if raw is None:
                    sent = await socket.send(view)
                else:
                    # Non-blocking: send what the kernel takes now (usually
                    # everything) without a trip through the scheduler; wait
                    # for room only when it takes nothing.
                    try:
                        sent = raw.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(raw)
                        continue
                view = view[sent:]
        except trio.Cancelled:
            self._unsent = view if view else None
            raise
        except OSError as exc:
            self.peer_gone = True
            raise trio.BrokenResourceError(f"WebSocket send failed: {exc}") from None


# -- the server -----------------------------------------------------------------------


class NativeServer:
    """Serves an :class:`EnsembleApp` on trio streams (see the module doc).

    Args:
        app: The running app (inside :meth:`EnsembleApp.running`).
        tls: Whether the streams are TLS (the scope's scheme).
    """

    def __init__(self, app: EnsembleApp, *, tls: bool = False) -> None:
        self.app = app
        self.config: ServerConfig = app.config
        self.tls = tls
        self.cache = FrameCache()
        self.connections = 0
        self.idle = trio.Event()
        self.idle_readers: _IdleReaders | None = None  # set by serve_native

    async def handle(self, stream: trio.abc.Stream) -> None:
        """One client connection: its handshake, then its reader (which may
        hibernate and carry on in other tasks, see :class:`_IdleReaders`)."""
        self.connections += 1
        if self.idle.is_set():
            self.idle = trio.Event()
        connection: _NativeConnection | None = None
        try:
            accepted = await self._handshake(stream)
            if accepted is not None:
                # Only what the connection needs stays referenced from here on
                # (not the request, its scope or the HTTP parser): an idle
                # connection is small.
                opening = _NativeConnection(self, stream, *accepted)
                if await opening.open():
                    connection = opening
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            logger.exception("a native connection failed")
        finally:
            if connection is None:
                await self._ended(stream)
        if connection is not None:
            await connection.run()

    async def _ended(self, stream: trio.abc.Stream) -> None:
        """A connection is over: count it out and close its stream."""
        self.connections -= 1
        if not self.connections:
            self.idle.set()
        await trio.aclose_forcefully(stream)

    def _ended_now(self, stream: trio.abc.Stream) -> None:
        """As :meth:`_ended`, without waiting (a plain socket: closed at once)."""
        self.connections -= 1
        if not self.connections:
            self.idle.set()
        sock = getattr(stream, "socket", None)
        if sock is not None:
            sock.close()

    async def _handshake(self, stream: trio.abc.Stream) -> tuple[Identity | None, Any, bytes] | None:
        """Read the request; answer HTTP, or decide and answer a WebSocket upgrade.

        Returns:
            For an accepted WebSocket: its identity (``None``: in-band
            auth), the peer's address and the bytes read past the request.
        """
        limits = self.config.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_handshake_bytes)
        request: h11.Request | None = None
        with trio.move_on_after(limits.handshake_timeout):
            if isinstance(stream, trio.SSLStream):
                await stream.do_handshake()
            request = await _read_request(stream, conn)
        if request is None:
            return None  # too slow, gone, or answered 400 already
        scope = self._scope(stream, request)
        if not (_is_upgrade(request) and _app_path(scope) == WS_PATH):
            await self._http(stream, conn, scope)
            return None
        headers = dict(request.headers)
        key = headers.get(b"sec-websocket-key", b"").decode("latin-1")
        if headers.get(b"sec-websocket-version") != b"13":
            await _respond(stream, 426, b"unsupported WebSocket version", [(b"sec-websocket-version", b"13")])
            return None
        if request.method != b"GET" or not valid_key(key):
            await _respond(stream, 400, b"invalid WebSocket handshake")
            return None
        app = self.app
        admission = await app.admit(scope)
        if admission.refusal is not None:
            refusal = app.refusal(scope, *admission.refusal)
            if refusal.status is not None:
                await _respond(stream, refusal.status, refusal.body, [(b"content-type", b"application/json")])
                return None
            await stream.send_all(_accept(key, refusal.subprotocol) + close_frame(int(refusal.code), refusal.reason))
            await self._await_close(stream)
            return None
        assert admission.handshake is not None
        await stream.send_all(_accept(key, admission.handshake.subprotocol))
        trailing, _ = conn.trailing_data
        return admission.identity, scope.get("client"), bytes(trailing)

    # -- WebSocket ----------------------------------------------------------------

    async def _await_close(self, stream: trio.abc.Stream) -> None:
        """After a refusal's close frame: give the client a moment to answer
        (its close frame, or the end of the stream), then the socket closes."""
        with trio.move_on_after(CLOSE_GRACE):
            ws = Connection(ConnectionType.SERVER)
            while data := await stream.receive_some(RECEIVE_SIZE):
                ws.receive_data(bytes(data))
                if any(isinstance(event, CloseConnection) for event in ws.events()):
                    return

    # -- HTTP ---------------------------------------------------------------------

    async def _http(self, stream: trio.abc.Stream, conn: h11.Connection, scope: Scope) -> None:
        """One plain HTTP request, answered by the app (health, metrics, API, page)."""
        body: list[bytes] = []
        size = 0
        with trio.move_on_after(self.config.limits.handshake_timeout) as reading:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = bytes(await stream.receive_some(RECEIVE_SIZE))
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if size > MAX_HTTP_BODY:
                        await _respond(stream, 413, b"request body too large")
                        return
                    body.append(bytes(event.data))
                    continue
                if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                    break
                if isinstance(event, h11.ConnectionClosed):
                    return
        if reading.cancelled_caught:
            await _respond(stream, 408, b"request timeout")
            return
        response = _HttpResponse(stream)
        sent_request = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        await self.app({**scope, "type": "http"}, receive, response.send)
        if not response.started:
            await _respond(stream, 500, b"internal error")

    # -- helpers -------------------------------------------------------------------

    def _scope(self, stream: trio.abc.Stream, request: h11.Request) -> Scope:
        target = bytes(request.target)
        raw_path, _, query = target.partition(b"?")
        headers = [(bytes(name).lower(), bytes(value)) for name, value in request.headers]
        subprotocols = [
            item.strip() for name, value in headers if name == b"sec-websocket-protocol" for item in value.decode("latin-1").split(",")
        ]
        socket_stream = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        client = server = None
        sock = getattr(socket_stream, "socket", None)
        if sock is not None:
            try:
                client = tuple(sock.getpeername()[:2])
                server = tuple(sock.getsockname()[:2])
            except OSError:
                pass
        return {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "http_version": request.http_version.decode("ascii"),
            "method": request.method.decode("ascii"),
            "scheme": ("wss" if self.tls else "ws") if _is_upgrade(request) else ("https" if self.tls else "http"),
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": client,
            "server": server,
            "subprotocols": [item for item in subprotocols if item],
            "extensions": {},
        }


class _HttpResponse:
    """Collects an ASGI HTTP response and writes it (``Connection: close``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.started = False
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False

    async def send(self, message: MutableMapping[str, Any]) -> None:
        """The ASGI ``send`` of the request."""
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            self.headers = [(bytes(name), bytes(value)) for name, value in message.get("headers", [])]
        elif kind == "http.response.body" and not self.done:
            self.body.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.done = True
                await _respond(self.stream, self.status, b"".join(self.body), self.headers, content_type=None)


# -- HTTP/1.1 helpers -------------------------------------------------------------------


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    """Read a request head; a malformed or oversized one is answered 400/431 (``None``)."""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            await _respond(stream, 431 if status == 431 else status, b"bad request")
            return None
        if event is h11.NEED_DATA:
            data = bytes(await stream.receive_some(RECEIVE_SIZE))
            if not data:
                return None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        return None


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = connection = b""
    for name, value in request.headers:
        if name == b"upgrade":
            upgrade = bytes(value).lower()
        elif name == b"connection":
            connection = bytes(value).lower()
    return upgrade == b"websocket" and b"upgrade" in [token.strip() for token in connection.split(b",")]


def _accept(key: str, subprotocol: str | None) -> bytes:
    lines = [
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_key(key).encode("ascii"),
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


_REASONS: Final = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


async def _respond(
    stream: trio.abc.Stream,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    content_type: bytes | None = b"text/plain; charset=utf-8",
) -> None:
    """Write a whole HTTP/1.1 response and mark the connection for closing."""
    out = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status"))]
    names = set()
    for name, value in headers or ():
        lowered = name.lower()
        if lowered in (b"content-length", b"connection", b"transfer-encoding"):
            continue
        names.add(lowered)
        out.append(name + b": " + value)
    if content_type is not None and b"content-type" not in names:
        out.append(b"Content-Type: " + content_type)
    out.append(b"Content-Length: %d" % len(body))
    out.append(b"Connection: close")
    with trio.move_on_after(CLOSE_GRACE):
        await stream.send_all(b"\r\n".join(out) + b"\r\n\r\n" + body)


def _violation(code: int) -> CloseCode:
    """The close code for a WebSocket-level violation wsproto reported."""
    try:
        return CloseCode(code)
    except ValueError:
        return CloseCode.PROTOCOL_ERROR


# -- serving ----------------------------------------------------------------------------


def ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context (``None`` without ``tls_certfile``)."""
    if config.tls_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_certfile, config.tls_keyfile)
    context.set_alpn_protocols(["http/1.1"])
    return context


class _NativeConnection:
    """One open WebSocket of the native transport: its reader's state.

    The reader (:meth:`run`) hands each client message to the app until the
    client leaves or the close ends. It keeps its state here rather than in
    its task's frames so that, idle, it can *hibernate*: its task ends, the
    socket is watched by the server's :class:`_IdleReaders`, and the next
    byte from the client (or the close of the connection) starts a task that
    carries on here. The connection's hub side (``app.connection``) stays
    open meanwhile; it is closed when the reader ends for good.
    """

    __slots__ = (
        "connection_id",
        "ctx",
        "fd",
        "fresh",
        "idle",
        "mark",
        "parts",
        "pending",
        "reads",
        "server",
        "size",
        "stream",
        "transport",
        "waiting",
        "ws",
    )

    def __init__(self, server: NativeServer, stream: trio.abc.Stream, identity: Identity | None, client: Any, initial: bytes) -> None:
        self.server = server
        self.stream = stream
        app = server.app
        self.transport = NativeWebSocketTransport(stream, server.cache, app.counters, write_timeout=server.config.limits.write_timeout)
        self.ctx = app.connection(self.transport, identity, kind="native", client=client)
        self.connection_id: str | None = None
        self.ws = Connection(ConnectionType.SERVER)
        self.pending = initial  # read, not yet parsed
        self.parts: list[str] = []  # the fragments of a text message so far
        self.size = 0  # their size in bytes
        self.reads = 0  # reads so far; the idle sweep compares it with ``mark``
        self.mark = -1
        self.idle: trio.CancelScope | None = None  # while waiting for the socket
        self.waiting = False
        self.fd = -1  # the socket's, while hibernating
        self.fresh = True  # not hibernated yet: does so at its first wait

    async def open(self) -> bool:
        """Open the hub connection (the ``welcome`` is its first frame).

        Returns:
            Whether it opened; if not, the client was told (1013 or 1011).
        """
        self.connection_id = await self.ctx.__aenter__()
        if self.connection_id is None:
            await self.server._await_close(self.stream)
            return False
        return True

    async def run(self) -> None:
        """Read until the connection ends (then close it) or hibernates."""
        hibernated = False
        try:
            try:
                hibernated = await self._read()
            finally:
                if not hibernated:
                    await self.ctx.__aexit__(None, None, None)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception:
            logger.exception("a native connection failed")
        finally:
            if not hibernated:
                idle_readers = self.server.idle_readers
                if idle_readers is not None:
                    idle_readers.awake.discard(self)
                self.transport.on_close = None
                await self.server._ended(self.stream)

    async def _read(self) -> bool:
        """Hand each client message to the app until the client leaves or the
        close ends (returns False), or until it hibernates (returns True)."""
        server = self.server
        app = server.app
        counters = app.counters
        max_size = server.config.limits.max_message_size
        transport = self.transport
        connection_id = self.connection_id
        assert connection_id is not None
        ws = self.ws
        parts = self.parts
        texts: list[str] = []  # the messages of one read, handed over together
        stream = self.stream
        # A plain socket waits for readability here, not inside
        # SocketStream.receive_some (three frames fewer held while idle), and
        # may hibernate; TLS reads through the SSLStream.
        sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        idle_readers = server.idle_readers if sock is not None else None
        if idle_readers is not None:
            idle_readers.awake.add(self)
        data = self.pending
        self.pending = b""
        with trio.CancelScope(deadline=transport.read_deadline) as reading:
            transport.reading = reading
            try:
                while True:
                    if data:
                        ws.receive_data(data)
                        for event in ws.events():
                            if texts and not isinstance(event, TextMessage):
                                await app.client_frames(connection_id, texts)  # in order with what follows
                                texts = []
                            if transport.closed:
                                if isinstance(event, CloseConnection):
                                    return False  # the client's answer to our close
                                continue  # read and drop until then
                            if isinstance(event, TextMessage):
                                chunk = event.data
                                self.size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8"))
                                if self.size > max_size:
                                    if texts:
                                        await app.client_frames(connection_id, texts)
                                        texts = []
                                    counters.protocol_errors += 1
                                    await app.close_connection(connection_id, CloseCode.MESSAGE_TOO_BIG, "message too big")
                                    parts.clear()
                                    continue
                                parts.append(chunk)
                                if event.message_finished:
                                    texts.append(parts[0] if len(parts) == 1 else "".join(parts))
                                    parts.clear()
                                    self.size = 0
                            elif isinstance(event, BytesMessage):
                                if event.message_finished:
                                    counters.protocol_errors += 1
                                    await app.close_connection(connection_id, CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                            elif isinstance(event, Ping):
                                await transport.control(frame(bytes(event.payload), OP_PONG))
                            elif isinstance(event, Pong):
                                pass  # the heartbeat pings in the protocol, not with ping frames
                            elif isinstance(event, CloseConnection):
                                if ws.state is ConnectionState.REMOTE_CLOSING:
                                    # The client closes: our close frame (1000) is the answer.
                                    await app.close_connection(connection_id, CloseCode.NORMAL, "client went away")
                                    return False
                                # A protocol violation wsproto found (1002, 1007): close with its code.
                                counters.protocol_errors += 1
                                await app.close_connection(connection_id, _violation(event.code), event.reason or "protocol error")
                                return False
                        if texts:
                            await app.client_frames(connection_id, texts)
                            texts = []
                    try:
                        if sock is not None:
                            if idle_readers is not None and self.fresh and not transport.closed:
                                # A new connection whose client has said
                                # nothing yet: hibernate at once (a burst of
                                # new connections never holds a task each).
                                self.fresh = False
                                idle_readers.awake.discard(self)
                                idle_readers.sleep(self, sock)
                                return True
                            if idle_readers is not None and not transport.closed:
                                idle = self.idle = trio.CancelScope()
                                self.waiting = True
                                try:
                                    with idle:
                                        await trio.lowlevel.wait_readable(sock)
                                finally:
                                    self.waiting = False
                                    self.idle = None
                                if idle.cancelled_caught:
                                    # Idle for a sweep period: hibernate (the
                                    # socket is readable-watched from now on).
                                    idle_readers.awake.discard(self)
                                    idle_readers.sleep(self, sock)
                                    return True
                            else:
                                await trio.lowlevel.wait_readable(sock)
                        data = bytes(await stream.receive_some(RECEIVE_SIZE))
                        self.reads += 1
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        transport.peer_gone = True
                        await app.close_connection(connection_id, CloseCode.NORMAL, "client went away")
                        return False
            finally:
                transport.reading = None
        return False  # the close's grace ended


class _IdleReaders:
    """Where the readers of idle native connections hibernate.

    A reader that waited a whole sweep period for its socket gives up its
    task: the socket goes into a private ``epoll`` set that one task watches
    (Linux; elsewhere readers do not hibernate), and becomes a reader task
    again when the client sends anything, closes, or the connection is
    closed from the server's side. An idle connection then holds no task,
    no coroutine frames and no cancel scopes.

    Args:
        nursery: Where woken readers run (the server's connection nursery).
        period: Seconds between sweeps; a reader idle for a full period
            hibernates (``hub.hibernate_after``).
    """

    def __init__(self, nursery: trio.Nursery, period: float) -> None:
        self._epoll = select.epoll()
        self._nursery = nursery
        self.period = period
        self.awake: set[_NativeConnection] = set()  # readers with a task (plain sockets)
        self.sleeping: dict[int, _NativeConnection] = {}

    @staticmethod
    def available() -> bool:
        """Whether readers can hibernate on this platform (``select.epoll``)."""
        return hasattr(select, "epoll")

    def sleep(self, connection: _NativeConnection, sock: trio.socket.SocketType) -> None:
        """Watch ``connection``'s socket instead of its reader task."""
        fd = connection.fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.sleeping[fd] = connection
        connection.server.app.counters.readers_hibernated += 1
        connection.transport.on_close = functools.partial(self._wake_connection, connection)

    def _wake_connection(self, connection: _NativeConnection) -> None:
        if self.sleeping.get(connection.fd) is connection:
            self._wake(connection.fd)

    def _wake(self, fd: int) -> None:
        connection = self.sleeping.pop(fd, None)
        if connection is None:
            return
        connection.fd = -1
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        connection.transport.on_close = None
        connection.server.app.counters.readers_woken += 1
        self._nursery.start_soon(connection.run)

    def _sweep(self) -> None:
        for connection in self.awake:
            if connection.waiting and connection.idle is not None and not connection.transport.closed:
                if connection.reads == connection.mark:
                    connection.idle.cancel()
                else:
                    connection.mark = connection.reads
            else:
                connection.mark = -1  # busy now: a full idle period from its next wait

    async def run(self) -> None:
        """Watch the sleeping sockets and sweep the awake readers, until cancelled."""
        epoll = self._epoll
        next_sweep = trio.current_time() + self.period
        try:
            while True:
                with trio.move_on_at(next_sweep):
                    await trio.lowlevel.wait_readable(epoll)
                for fd, _ in epoll.poll(0):
                    self._wake(fd)
                if trio.current_time() >= next_sweep:
                    self._sweep()
                    next_sweep = trio.current_time() + self.period
        finally:
            # The server is stopping: the sleeping connections were closed
            # from the server's side first (which woke them); whatever is
            # left is closed here without its goodbye.
            for fd, connection in list(self.sleeping.items()):
                del self.sleeping[fd]
                with contextlib.suppress(OSError):
                    epoll.unregister(fd)
                connection.server._ended_now(connection.stream)
            epoll.close()


async def serve_native(
    app: EnsembleApp,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``app`` on the native transport until ``shutdown_trigger`` returns.

    The app runs (:meth:`EnsembleApp.running`) for the whole call. When the
    trigger returns (it drains the app: clients are closed with 1001), the
    listeners stop and the connections still open get a short grace.

    Args:
        app: The app to serve (not running yet).
        shutdown_trigger: Awaited; its return starts the shutdown.
        task_status: Given the bound addresses (``["http://127.0.0.1:8000"]``).
    """
    config = app.config
    context = ssl_context(config)
    backlog = max(4096, min(config.limits.max_connections, 65535))
    async with app.running():
        listeners: list[Any] = await trio.open_tcp_listeners(config.port, host=config.host, backlog=backlog)
        urls = []
        for listener in listeners:
            set_write_timeout(listener.socket, config.limits.write_timeout)
            host, port = listener.socket.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"{'https' if context else 'http'}://{shown}:{port}")
        if context is not None:
            listeners = [trio.SSLListener(listener, context, https_compatible=True) for listener in listeners]
        server = NativeServer(app, tls=context is not None)
        hibernate_after = config.hub.hibernate_after
        async with trio.open_nursery() as nursery:
            connections = await nursery.start(_connections_nursery)
            if hibernate_after > 0 and _IdleReaders.available():
                server.idle_readers = _IdleReaders(connections, hibernate_after)
                nursery.start_soon(server.idle_readers.run)
            listening = await nursery.start(_listen, server, listeners, connections)
            task_status.started(urls)
            await shutdown_trigger()
            listening.cancel()
            with trio.move_on_after(min(CLOSE_GRACE, config.shutdown_timeout / 4)):
                if server.connections:
                    await server.idle.wait()
            nursery.cancel_scope.cancel()


async def _connections_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(nursery)
        await trio.sleep_forever()


async def _listen(
    server: NativeServer,
    listeners: list[Any],
    connections: trio.Nursery,
    *,
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, server.handle, connections)


# The errors of accept() that mean "out of some resource, try again later"
# (trio.serve_listeners's list): logged, then accepting resumes after a pause.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    code for code in (getattr(errno, name, None) for name in ("EMFILE", "ENFILE", "ENOMEM", "ENOBUFS")) if code is not None
)
_ACCEPT_PAUSE: Final = 0.1  # seconds


async def _accept_loop(listener: Any, handler: Callable[[Any], Awaitable[None]], connections: trio.Nursery) -> None:
    """Accept connections forever, each handled in ``connections``.

    As ``trio.serve_listeners``, except that the handler closes its stream
    itself: a connection whose reader hibernates outlives its first task.
    """
    async with listener:  # closed when accepting ends
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error("accept() failed (%s); accepting again in %s s", errno.errorcode.get(exc.errno or 0, exc.errno), _ACCEPT_PAUSE)
                await trio.sleep(_ACCEPT_PAUSE)
            else:
                connections.start_soon(handler, stream)
