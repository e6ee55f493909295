"""Connections: one supervised actor per client, and the manager of them all.

The :class:`ConnectionManager` is the seed's ``ConnectionManager`` (as
``hub.connections``) plus the seed's room-based manager (connections in many
rooms, broadcast to a room or to all, dead-connection cleanup, room stats).

Each connection is an actor (a ``temporary`` child of the supervisor given to
the manager) that owns the connection's :class:`Outbox`. The fan-out path
never waits: it calls :meth:`Outbox.deliver_nowait`, and when the outbox goes
from empty to non-empty the connection is queued for a write. Two writers
share the work, never at the same time for one connection:

* For a :class:`DirectTransport` (one that can write without waiting: the
  native transport on a plain socket, the ASGI transport's relay), the
  manager's one *direct writer* (an actor of its own under the same
  supervisor) takes the ready connections in turn and writes each drained
  batch with one ``send_nowait``: a fan-out wakes one task, not one per
  recipient.
* Otherwise, and for whatever needs waiting (the rest of a write the kernel
  did not take, an overflow, a failed write), the connection tells its own
  actor :class:`Flush` (coalesced by a ``keep_latest`` mailbox policy).
  Handling ``Flush`` drains the outbox (up to ``max_batch`` events at a
  time) and writes what it took with one call: ``transport.send_many(frames)``
  when the transport has it (one await per drained batch, not per event),
  else ``transport.send`` per frame.

Either way each event is its own frame, the event's shared ``encoded`` bytes,
or a batch is one frame holding a JSON array with ``batch_frames=True``.

A connection is closed, and removed, exactly once whatever the cause, and
``on_disconnect`` runs exactly once for it:

========================== ============================== ============================
Cause                      Close code                     Reason
========================== ============================== ============================
``disconnect()``           given (default 1000)           given (``"disconnected"``)
``disconnect_all()``       :data:`CLOSE_GOING_AWAY` 1001  ``"server shutting down"``
supervisor shutdown        :data:`CLOSE_GOING_AWAY` 1001  ``"server shutting down"``
slow consumer (overflow)   :data:`SLOW_CONSUMER` 4008     JSON, see below
inbound rate limit         :data:`RATE_LIMITED` 4029      ``"rate limited"``
``transport.send`` raised  :data:`CLOSE_INTERNAL_ERROR`   ``"send failed: ..."``
actor crash                :data:`CLOSE_INTERNAL_ERROR`   ``"internal error"``
========================== ============================== ============================

A connection opened anonymously (``user_id=None``) can be given its user
later, in place, with :meth:`ConnectionManager.authenticate` (in-band
authentication): the same connection id, transport, outbox and actor. It is
handled by the connection's own actor, in order with its inbound messages
(or directly, when called from that actor's ``on_message``), so the
connection's user never changes under a message being handled. What was
queued for the connection before is written first; then the per-user limit
is checked, the user index and presence are updated as on ``connect``, and
the owner's ``on_authenticated`` wiring runs (the hub attaches the
connection to its user's mailbox there).

The slow-consumer reason is compact JSON:
``{"error":"slow_consumer","positions":{"<topic>":["<epoch>",<seq>]}}``,
where the positions are those of the last event of each topic that was fully
*written* to the transport (not merely queued), so resuming from them never
skips an event. (A WebSocket close reason holds at most 123 bytes; a transport
adapter should send a long reason as a final frame instead of truncating it.)
"""

from __future__ import annotations

import json
import logging
import math
import time
import types
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from functools import partial
from typing import Any, Final, Protocol

import attrs
import trio

from .._sync import LazyEvent
from ..actors import Actor, ActorError, ActorRef, ActorStopped, ChildSpec, MailboxConfig, Supervisor
from ._errors import NotAllowed, NotFound, RateLimited, TooManyConnections
from ._events import Event, Subscriber, raw_event
from ._models import ConnectionInfo
from ._outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS, Outbox, OutboxStatistics, Positions
from ._ratelimit import WebSocketRateLimiter

logger = logging.getLogger("ensemble.realtime")

CLOSE_NORMAL: Final = 1000
"""Close code of :meth:`ConnectionManager.disconnect` (by default)."""
CLOSE_GOING_AWAY: Final = 1001
"""Close code when the server shuts down."""
CLOSE_INTERNAL_ERROR: Final = 1011
"""Close code after a crash of the connection actor or a failed send."""
SLOW_CONSUMER: Final = 4008
"""Close code when the connection's outbox overflowed (a slow client)."""
RATE_LIMITED: Final = 4029
"""Close code when a client kept sending over its inbound rate limit."""

DATA: Final = "data"
"""The event type of :meth:`ConnectionManager.send_to_connection` and friends."""

Hook = Callable[[ConnectionInfo], Awaitable[None]]
UserHook = Callable[[str], Awaitable[None]]
OpenedHook = Callable[[ConnectionInfo, Any], Awaitable[None]]
"""The owner's wiring of a new connection: its info and ``connect``'s ``context``."""
InboundHandler = Callable[[ConnectionInfo, Any], Awaitable[Any]]
"""Handles one inbound message of a connection; its result is the reply."""


class Transport(Protocol):
    """What a connection writes to (a WebSocket, or :class:`MemoryTransport`).

    A transport may also offer ``async def send_many(self, frames: list[bytes])``
    (see :class:`BatchTransport`): the connection then writes everything it
    drained from its outbox with one call, each event still its own frame
    (a WebSocket transport frames them all and does one socket write).
    """

    async def send(self, data: bytes) -> None:
        """Write one frame."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Close the connection with a close code and reason."""
        ...


class BatchTransport(Transport, Protocol):
    """A :class:`Transport` that writes several frames with one call."""

    async def send_many(self, frames: list[bytes]) -> None:
        """Write ``frames``, in order, each as its own frame.

        The transport must not keep a reference to the list itself after
        returning (the caller may reuse it); the frames (``bytes``) it may keep.
        """
        ...


class DirectTransport(BatchTransport, Protocol):
    """A :class:`BatchTransport` that can also write without waiting.

    The manager's one writer (see :class:`ConnectionManager`) writes every
    ready connection of such a transport in turn, synchronously, instead of
    waking each connection's actor: a fan-out of one event to a thousand
    connections is then a thousand non-blocking socket writes in one task,
    not a thousand task wake-ups. Whatever cannot be written without waiting
    is left to the connection's actor (``send_many``).
    """

    direct_writes: bool
    """Whether :meth:`send_nowait` can ever be used (a plain socket: yes; TLS: no)."""

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may be called now (no write in
        progress or pending, not closed)."""
        ...

    # Optional: ``def wake_when_writable(self, callback: Callable[[], None]) -> bool``
    # for a transport that becomes writable by itself (a writer task of its
    # own is busy): it calls ``callback`` once when it is and returns True,
    # and the connection waits for that instead of its actor waiting.

    def send_nowait(self, frames: list[bytes]) -> bool:
        """Write ``frames`` without waiting (only when :meth:`can_send_nowait`).

        What the kernel does not take now is kept by the transport and
        written first by the next ``send_many`` (which may be given no frames).

        Returns:
            Whether everything was written (``False``: a remainder is kept).

        Raises:
            trio.BrokenResourceError: The write failed (the client is gone).
        """
        ...


class TransportClosed(Exception):
    """Raised by :meth:`MemoryTransport.send` once the transport is closed."""


class MemoryTransport:
    """An in-memory transport for embedded use and tests.

    Records every frame written (:attr:`sent`), and how it was closed. It can
    be told to block (a client that stopped reading), to slow down, or to
    fail (a broken socket).

    Attributes:
        sent: The frames written, in order.
        close_code: The close code, or ``None`` while open.
        close_reason: The close reason, or ``None`` while open.
        closes: How many times :meth:`close` was called.
    """

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closes = 0
        self._closed = False
        self._gate: trio.Event | None = None
        self._delay = 0.0
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<MemoryTransport sent={len(self.sent)} closed={self.closed}>"

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def frames(self) -> list[Any]:
        """The frames written, each decoded from JSON."""
        return [json.loads(frame) for frame in self.sent]

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events written, decoded (batched frames are flattened)."""
        events: list[dict[str, Any]] = []
        for frame in self.frames:
            if isinstance(frame, list):
                events.extend(frame)
            else:
                events.append(frame)
        return events

    def block(self) -> None:
        """Make :meth:`send` wait (until :meth:`unblock` or :meth:`close`)."""
        if self._gate is None:
            self._gate = trio.Event()

    def unblock(self) -> None:
        """Let blocked and future sends through."""
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    def slow_down(self, seconds: float) -> None:
        """Make every send take ``seconds`` (0 for full speed)."""
        self._delay = seconds

    def fail(self, error: BaseException | None = None) -> None:
        """Make every further send raise ``error`` (a broken socket).

        Args:
            error: What to raise; defaults to :class:`trio.BrokenResourceError`.
        """
        self._error = error if error is not None else trio.BrokenResourceError("connection reset by peer")

    async def send(self, data: bytes) -> None:
        """Record one frame (after any block or delay).

        Raises:
            TransportClosed: The transport is closed (also raised in a send
                blocked when it is closed).
            BaseException: The error given to :meth:`fail`.
        """
        await self._writable()
        self.sent.append(data)

    async def send_many(self, frames: list[bytes]) -> None:
        """Record several frames with one call (after any block or delay).

        One checkpoint (or one ``slow_down`` delay) per call, not per frame:
        like a socket transport that writes a drained batch in one write.

        Raises:
            TransportClosed: The transport is closed.
            BaseException: The error given to :meth:`fail`.
        """
        await self._writable()
        self.sent.extend(frames)

    async def _writable(self) -> None:
        if self._delay:
            await trio.sleep(self._delay)
        else:
            await trio.lowlevel.checkpoint()
        while self._gate is not None and not self._closed:
            await self._gate.wait()
        if self.closed:
            raise TransportClosed("the transport is closed")
        if self._error is not None:
            raise self._error

    async def close(self, code: int, reason: str) -> None:
        """Close the transport (only the first close code and reason count)."""
        await trio.lowlevel.checkpoint()
        self.closes += 1
        if not self._closed:
            self.close_code = code
            self.close_reason = reason
            self._closed = True
            if self._gate is not None:
                self._gate.set()  # a blocked send now raises TransportClosed


@attrs.frozen
class Flush:
    """Tells a connection actor to drain its outbox (coalesced: keep_latest)."""


FLUSH: Final = Flush()


@attrs.frozen
class _Close:
    code: int
    reason: str


@attrs.frozen
class _Inbound:
    data: Any


@attrs.frozen(eq=False)
class _InboundMany:
    items: list[Any]
    on_refused: Callable[[Any, Exception], None]


@attrs.frozen(eq=False)
class _Authenticate:
    user_id: str
    context: Any


class _Rejected(Exception):
    """Carries an inbound message's error from the connection actor to the
    caller of :meth:`ConnectionManager.receive` (a rejection, not a crash)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


@attrs.frozen(kw_only=True)
class RoomStats:
    """Who is in one connection room (see :meth:`ConnectionManager.room_stats`).

    Attributes:
        connections: Connections in the room.
        users: Distinct authenticated users among them.
    """

    connections: int
    users: int

    def to_dict(self) -> dict[str, int]:
        """The JSON-ready form."""
        return {"connections": self.connections, "users": self.users}


@attrs.frozen(kw_only=True)
class ConnectionManagerStatistics:
    """A snapshot of a :class:`ConnectionManager`'s counters.

    Attributes:
        connections: Connections open now.
        users: Users with at least one open connection.
        rooms: Non-empty connection rooms.
        connected: Connections opened in total.
        disconnected: Connections closed in total (any cause).
        slow_consumers: Connections closed because their outbox overflowed.
        transport_errors: Connections closed because a send failed.
        crashes: Connections closed because their actor crashed.
        hook_errors: Exceptions raised by hooks and callbacks (logged).
        rate_limited: Inbound messages refused by the rate limit.
    """

    connections: int
    users: int
    rooms: int
    connected: int
    disconnected: int
    slow_consumers: int
    transport_errors: int
    crashes: int
    hook_errors: int
    rate_limited: int


@attrs.define(eq=False)
class _Connection:
    """The manager's record of one connection (an identity object)."""

    connection_id: str
    user_id: str | None
    connected_at: float
    metadata: Mapping[str, object]
    transport: Transport
    outbox: Outbox
    rooms: set[str] = attrs.field(factory=set)
    ref: ActorRef | None = None
    registered: bool = True
    finishing: bool = False
    done: LazyEvent = attrs.field(factory=LazyEvent)
    send_scope: trio.CancelScope | None = None
    overflow_positions: Positions | None = None
    sent_positions: Positions = attrs.field(factory=dict)
    close_itself: Callable[[int, str], Awaitable[None]] | None = None
    authenticate_itself: Callable[[str, Any], Awaitable[ConnectionInfo]] | None = None
    rate_violations: int = 0
    last_write: float = -math.inf
    flush_timer: bool = False
    direct: _DirectWriter | None = None  # the manager's writer, for a DirectTransport
    write_queued: bool = False  # in the direct writer's queue
    send_error: Exception | None = None  # a direct write failed: the actor closes

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(
            connection_id=self.connection_id,
            user_id=self.user_id,
            connected_at=self.connected_at,
            rooms=frozenset(self.rooms),
            metadata=self.metadata,
        )

    def flush_soon(self) -> None:
        """The outbox's ``on_ready``: queue it for the direct writer, or tell
        the actor to drain it."""
        direct = self.direct
        if direct is not None:
            if not self.write_queued:
                self.write_queued = True
                direct.ready.append(self)
                if not direct.scheduled:
                    direct.schedule()
            return
        self.tell_flush()

    def tell_flush(self) -> None:
        """Tell the actor to drain the outbox."""
        ref = self.ref
        if ref is not None:
            with suppress(ActorError):
                ref.tell_nowait(FLUSH)

    def overflowed(self, positions: Positions) -> None:
        """The outbox's ``on_overflow``: stop the write in progress, if any."""
        self.overflow_positions = positions
        if self.send_scope is not None:
            self.send_scope.cancel()
        else:
            self.flush_soon()


class _TimedFlush:
    """The coalescing timer's message: drain the outbox now."""


_FLUSH_TIMER: Final = "flush"
_TIMED_FLUSH: Final = _TimedFlush()


class _ConnectionActor(Actor):
    """Writes one connection's outbox to its transport."""

    # Inbound messages block their sender (the transport's reader) when 16
    # are queued: backpressure to the socket, never an unbounded queue.
    mailbox = MailboxConfig(
        size=16, overflow="fail", per_type={Flush: "keep_latest", _Inbound: "block", _InboundMany: "block", _Authenticate: "block"}
    )
    expected_exceptions = (_Rejected,)

    def __init__(self, manager: ConnectionManager, connection: _Connection) -> None:
        self._manager = manager
        self._conn = connection

    async def on_start(self) -> None:
        self._conn.ref = self.ref
        self._conn.close_itself = self._close
        self._conn.authenticate_itself = self._authenticate
        if self._conn.outbox:
            self.ref.tell_nowait(FLUSH)

    async def receive(self, message: Any) -> Any:
        if message is _TIMED_FLUSH:
            self._conn.flush_timer = False
            await self._flush()
        elif isinstance(message, Flush):
            await self._flush()
        elif isinstance(message, _Inbound):
            return await self._inbound(message.data)
        elif isinstance(message, _InboundMany):
            for item in message.items:
                if self._conn.finishing:
                    break
                try:
                    await self._inbound(item)
                except _Rejected as rejected:
                    message.on_refused(item, rejected.error)
        elif isinstance(message, _Close):
            await self._close(message.code, message.reason)
        elif isinstance(message, _Authenticate):
            try:
                return await self._authenticate(message.user_id, message.context)
            except Exception as exc:
                # A refusal (or a failed wiring) is the caller's answer, not a crash.
                raise _Rejected(exc) from None
        else:
            raise TypeError(f"unexpected message for connection {self._conn.connection_id}: {message!r}")

    async def on_stop(self) -> None:
        # A normal stop after a close (no-op), a supervisor shutdown, or a
        # crash: in every case the connection is finished exactly once.
        conn = self._conn
        if conn.finishing:
            await self._manager._finish(conn, CLOSE_GOING_AWAY, "")
            return
        crash = self._crashed()
        if crash:
            self._manager._crashes += 1
            await self._manager._finish(conn, CLOSE_INTERNAL_ERROR, "internal error")
        else:
            await self._manager._finish(conn, CLOSE_GOING_AWAY, "server shutting down")

    async def _close(self, code: int, reason: str) -> None:
        self._conn.outbox.close()  # refuse new events; write the queued ones
        await self._flush()
        await self._manager._finish(self._conn, code, reason)
        self.stop()

    async def _authenticate(self, user_id: str, context: Any) -> ConnectionInfo:
        await self._flush()  # what was queued while anonymous is written first
        return await self._manager._authenticate(self._conn, user_id, context)

    async def _inbound(self, data: Any) -> Any:
        conn = self._conn
        manager = self._manager
        if conn.finishing:
            raise _Rejected(NotFound(f"connection {conn.connection_id!r} is closing"))
        limiter = manager.rate_limiter
        if limiter is not None and not limiter.check(conn.connection_id):
            conn.rate_violations += 1
            manager._rate_limited += 1
            retry_after = limiter.retry_after(conn.connection_id)
            limit = manager.max_rate_violations
            if limit is not None and conn.rate_violations >= limit:
                logger.info("connection %s kept sending over its rate limit; closing it with %d", conn.connection_id, RATE_LIMITED)
                await self._close(RATE_LIMITED, "rate limited")
                raise _Rejected(RateLimited("rate limited: the connection is closed", retry_after=retry_after))
            # Constant text (documented frames pin it); the delay is the error's retry_after.
            raise _Rejected(RateLimited("rate limited: too many messages; retry after retry_after seconds", retry_after=retry_after))
        conn.rate_violations = 0
        handler = manager.on_message
        if handler is None:
            raise _Rejected(NotAllowed("this connection accepts no inbound messages (no on_message handler)"))
        try:
            return await handler(conn.info(), data)
        except Exception as exc:
            # The handler's error is the caller's answer; the connection stays.
            raise _Rejected(exc) from None

    def _crashed(self) -> bool:
        stats = self.ref.statistics()
        return stats.state == "restarting"

    async def _flush(self, *, now: bool = False) -> None:
        conn = self._conn
        outbox = conn.outbox
        manager = self._manager
        transport = conn.transport
        send_many = getattr(transport, "send_many", None)
        interval = manager.min_write_interval
        while not conn.finishing:
            if outbox.overflowed:
                await self._slow_consumer()
                return
            if conn.send_error is not None:
                await self._send_failed(conn.send_error)
                return
            if interval > 0 and not now and not outbox.closed:
                # Coalescing: a connection that wrote less than the interval
                # ago waits for the rest of it, so the events of a burst go
                # out together; after a quiet moment the first event goes
                # at once. (A timer: the actor stays free for inbound frames.)
                due = conn.last_write + interval
                wait = due - trio.current_time()
                if wait > 0 and len(outbox) < manager.max_batch:
                    if not conn.flush_timer:
                        conn.flush_timer = True
                        self.start_timer(_FLUSH_TIMER, wait, _TIMED_FLUSH)
                    return
            batch = outbox.get_batch_nowait(manager.max_batch)
            if not batch:
                if conn.direct is not None and send_many is not None and not transport.can_send_nowait():  # type: ignore[attr-defined]
                    # What a direct write left (the kernel took part of it):
                    # written here, where waiting for the socket is allowed.
                    await self._send(partial(send_many, []), batch)
                return
            conn.last_write = trio.current_time()
            if len(batch) == 1:
                written = await self._send(partial(transport.send, batch[0].encoded), batch)
            elif manager.batch_frames:
                written = await self._send(partial(transport.send, b"[" + b",".join([event.encoded for event in batch]) + b"]"), batch)
            elif send_many is not None:
                written = await self._send(partial(send_many, [event.encoded for event in batch]), batch)
            else:
                written = await self._send(partial(self._send_each, transport, batch), [])
            if not written:
                return

    async def _send_each(self, transport: Transport, batch: list[Event]) -> None:
        positions = self._conn.sent_positions
        for event in batch:
            await transport.send(event.encoded)
            if event.seq is not None:
                positions[event.topic] = (event.epoch or "", event.seq)

    async def _send(self, write: Callable[[], Awaitable[None]], batch: list[Event]) -> bool:
        """Run one write of the connection; ``False``: stop flushing (closed,
        failed, or cancelled by an overflow's close)."""
        conn = self._conn
        with trio.CancelScope() as scope:
            conn.send_scope = scope
            try:
                await write()
                _written(conn.sent_positions, batch)
            except Exception as exc:
                conn.send_scope = None
                if conn.finishing:
                    return False  # closed under us: the send failing is expected
                await self._send_failed(exc)
                return False
            finally:
                conn.send_scope = None
        return not (scope.cancelled_caught and not conn.outbox.overflowed)

    async def _send_failed(self, exc: Exception) -> None:
        conn = self._conn
        manager = self._manager
        manager._transport_errors += 1
        logger.info("send to connection %s failed: %r; closing it", conn.connection_id, exc)
        await manager._finish(conn, CLOSE_INTERNAL_ERROR, f"send failed: {type(exc).__name__}")
        self.stop()

    async def _slow_consumer(self) -> None:
        conn = self._conn
        manager = self._manager
        manager._slow_consumers += 1
        reason = json.dumps(
            {"error": "slow_consumer", "positions": {topic: list(pos) for topic, pos in conn.sent_positions.items()}},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        logger.warning(
            "connection %s is a slow consumer (outbox overflowed; queued up to %s); closing it with %d",
            conn.connection_id,
            conn.overflow_positions,
            SLOW_CONSUMER,
        )
        await manager._finish(conn, SLOW_CONSUMER, reason)
        self.stop()


class _Write:
    """Tells the direct writer that connections are ready."""


_WRITE: Final = _Write()
_WRITER_ID: Final = "writer"
_WRITER_SLICE: Final = 256
"""Connections the direct writer writes between two schedule points."""


class _DirectWriter:
    """The manager's shared writer of :class:`DirectTransport` connections.

    ``ready`` holds the connections whose outbox went non-empty; one actor
    (``ref``) takes them in turn and writes each one's queued events with one
    non-blocking :meth:`DirectTransport.send_nowait`, so a fan-out wakes one
    task, not one per recipient, and the events that arrive while it works
    are written together (a burst coalesces by itself). A connection that
    cannot be written to now (a write in progress or left over, an overflow,
    a failed write) is handed to its own actor, which may wait.
    """

    __slots__ = ("manager", "ready", "ref", "scheduled")

    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager
        self.ready: deque[_Connection] = deque()
        self.ref: ActorRef | None = None
        self.scheduled = False

    def schedule(self) -> None:
        ref = self.ref
        if ref is None:
            self.hand_back()
            return
        try:
            ref.tell_nowait(_WRITE)
            self.scheduled = True
        except ActorError:
            self.hand_back()

    def hand_back(self) -> None:
        """The writer is gone (stopping): the queued connections' actors write them."""
        ready = self.ready
        while ready:
            conn = ready.popleft()
            conn.write_queued = False
            conn.tell_flush()

    async def write_ready(self) -> None:
        manager = self.manager
        ready = self.ready
        max_batch = manager.max_batch
        batch_frames = manager.batch_frames
        count = 0
        try:
            while ready:
                conn = ready.popleft()
                conn.write_queued = False
                try:
                    self._write(conn, max_batch, batch_frames)
                except Exception:
                    # A transport's bug stays that connection's: its actor writes it.
                    logger.exception("the direct write to %s failed; its actor writes it", conn.connection_id)
                    conn.tell_flush()
                count += 1
                if count % _WRITER_SLICE == 0:
                    await trio.lowlevel.checkpoint()  # let readers and rooms run
        finally:
            self.scheduled = False
            if ready:
                self.schedule()  # cancelled or crashed part-way: the rest goes on

    def _write(self, conn: _Connection, max_batch: int, batch_frames: bool) -> None:
        outbox = conn.outbox
        if conn.finishing or not outbox._queue:
            return
        transport: DirectTransport = conn.transport  # type: ignore[assignment]
        if outbox.overflowed or conn.send_scope is not None:
            conn.tell_flush()  # the actor closes it, or is writing anyway
            return
        if not transport.can_send_nowait():
            wake = getattr(transport, "wake_when_writable", None)
            if wake is None or not wake(conn.flush_soon):
                conn.tell_flush()  # the actor waits where this writer cannot
            return
        batch = outbox.get_batch_nowait(max_batch)
        if len(batch) == 1:
            frames = [batch[0].encoded]
        elif batch_frames:
            frames = [b"[" + b",".join([event.encoded for event in batch]) + b"]"]
        else:
            frames = [event.encoded for event in batch]
        try:
            done = transport.send_nowait(frames)
        except Exception as exc:
            conn.send_error = exc
            conn.tell_flush()
            return
        # A remainder kept by the transport is written before anything else
        # (by the actor's next write, or before the close frame).
        _written(conn.sent_positions, batch)
        if not done:
            conn.tell_flush()
        elif outbox:  # more than max_batch queued: the rest after the others
            conn.write_queued = True
            self.ready.append(conn)


class _WriterActor(Actor):
    """Runs :meth:`_DirectWriter.write_ready` (restarted if it ever crashes)."""

    mailbox = MailboxConfig(size=4, overflow="fail")

    def __init__(self, writer: _DirectWriter) -> None:
        self._writer = writer

    async def on_start(self) -> None:
        writer = self._writer
        writer.ref = self.ref
        writer.scheduled = False
        if writer.ready:
            writer.schedule()

    async def receive(self, message: Any) -> None:
        await self._writer.write_ready()

    async def on_stop(self) -> None:
        writer = self._writer
        writer.ref = None
        writer.hand_back()


class ConnectionManager:
    """Tracks live connections, their users and rooms, and sends to them.

    Every connection is a ``temporary`` actor under ``supervisor``, which the
    hub creates with :func:`ensemble.actors.open_supervisor`.

    Args:
        supervisor: Where connection actors run.
        max_connections: Most connections at once (:class:`TooManyConnections`).
        max_connections_per_user: Most connections of one user at once
            (:class:`TooManyConnections`); ``None`` for no limit.
        max_metadata_keys: Most keys in ``connect``'s ``metadata``
            (``ValueError``).
        outbox_max_events: Each connection's outbox bound in events.
        outbox_max_bytes: Each connection's outbox bound in encoded bytes.
        batch_frames: Write each drained batch of several events as one
            frame (a JSON array) instead of one frame per event.
        max_batch: Most events taken from an outbox per batch (and
            written with one ``send_many``).
        min_write_interval: Seconds a connection waits after a write before
            the next one (0: none). Events that arrive sooner are written
            together when it has passed, or at once when ``max_batch`` of
            them are queued; the first event after a quiet moment is written
            at once. Under a burst this turns many small writes into few
            large ones (each write costs a wake-up and a system call) at the
            price of at most this much latency.
        rate_limiter: Checked on every inbound message (:meth:`receive`);
            ``None`` for no inbound limit.
        max_rate_violations: Inbound messages over the rate limit in a row
            (without an accepted one between) after which the connection is
            closed with :data:`RATE_LIMITED`; the earlier ones only raise
            :class:`RateLimited` to the caller. ``None``: never close.
        close_timeout: Seconds a graceful close may take (draining the outbox,
            ``transport.close``) before the connection is closed by force.
        hibernate_after: Seconds without a message after which a
            connection's actor gives up its task until its next message
            (``ChildSpec.hibernate_after``); ``None``: never. Writes by the
            direct writer do not wake it.
        on_user_online: Awaited when a user's first connection opens.
        on_user_offline: Awaited when a user's last connection closes.
        on_opened: Awaited with a new connection's info and the ``context``
            given to :meth:`connect`, before ``on_user_online`` and
            ``on_connect``, for the owner's own wiring (the hub attaches the
            connection to its user's mailbox there, replaying from the
            position in ``context``). An exception from it fails the
            ``connect`` (the connection is closed again).
        on_authenticated: Awaited with the info of a connection that
            :meth:`authenticate` just gave its user (``user_id`` set) and
            the ``context`` given to it, in the connection's actor, before
            ``on_user_online``: the same wiring as ``on_opened`` (the hub
            gives both the same function). An exception from it fails the
            ``authenticate`` (the connection is closed with
            :data:`CLOSE_INTERNAL_ERROR`, since its wiring may be half done).
        on_closed: Awaited first when a connection closes, before
            ``on_user_offline`` and ``on_disconnect``, for the owner's own
            clean-up (the hub leaves rooms and live queries there).
        clock: Gives ``connected_at`` (Unix time).

    Attributes:
        on_connect: Awaited with the new connection's :class:`ConnectionInfo`
            after it opened (errors are logged).
        on_disconnect: Awaited with the :class:`ConnectionInfo` of a closed
            connection, exactly once per connection whatever the cause
            (errors are logged).
        on_message: Handles the inbound messages given to :meth:`receive`,
            one at a time per connection, inside the connection's actor;
            what it returns (or raises) is the answer to ``receive``.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        *,
        max_connections: int = 10000,
        max_connections_per_user: int | None = None,
        max_metadata_keys: int = 32,
        outbox_max_events: int = DEFAULT_MAX_EVENTS,
        outbox_max_bytes: int = DEFAULT_MAX_BYTES,
        batch_frames: bool = False,
        max_batch: int = 256,
        min_write_interval: float = 0.0,
        rate_limiter: WebSocketRateLimiter | None = None,
        max_rate_violations: int | None = 3,
        close_timeout: float = 5.0,
        hibernate_after: float | None = None,
        on_user_online: UserHook | None = None,
        on_user_offline: UserHook | None = None,
        on_opened: OpenedHook | None = None,
        on_closed: Hook | None = None,
        on_authenticated: OpenedHook | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_connections < 0 or max_metadata_keys < 0:
            raise ValueError("max_connections and max_metadata_keys must be >= 0")
        if max_connections_per_user is not None and max_connections_per_user < 1:
            raise ValueError(f"max_connections_per_user must be at least 1 or None, got {max_connections_per_user}")
        if not close_timeout >= 0:
            raise ValueError(f"close_timeout must be >= 0, got {close_timeout}")
        if hibernate_after is not None and not 0 < hibernate_after < math.inf:
            raise ValueError(f"hibernate_after must be a positive number of seconds or None, got {hibernate_after}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not min_write_interval >= 0:
            raise ValueError(f"min_write_interval must be >= 0, got {min_write_interval}")
        if max_rate_violations is not None and max_rate_violations < 1:
            raise ValueError(f"max_rate_violations must be at least 1 or None, got {max_rate_violations}")
        if outbox_max_events < 1 or outbox_max_bytes < 1:
            raise ValueError("outbox_max_events and outbox_max_bytes must be at least 1")
        self.supervisor = supervisor
        self.max_connections = max_connections
        self.max_connections_per_user = max_connections_per_user
        self.max_metadata_keys = max_metadata_keys
        self.outbox_max_events = outbox_max_events
        self.outbox_max_bytes = outbox_max_bytes
        self.batch_frames = batch_frames
        self.max_batch = max_batch
        self.min_write_interval = min_write_interval
        self.rate_limiter = rate_limiter
        self.max_rate_violations = max_rate_violations
        self.close_timeout = close_timeout
        self.hibernate_after = hibernate_after
        self.on_user_online = on_user_online
        self.on_user_offline = on_user_offline
        self._on_opened = on_opened
        self._on_closed = on_closed
        self._on_authenticated = on_authenticated
        self.on_connect: Hook | None = None
        self.on_disconnect: Hook | None = None
        self.on_message: InboundHandler | None = None
        self._clock = clock
        self._connections: dict[str, _Connection] = {}
        self._by_user: dict[str, dict[str, _Connection]] = {}
        self._rooms: dict[str, dict[str, _Connection]] = {}
        self._online: set[str] = set()
        self._connected = 0
        self._disconnected = 0
        self._slow_consumers = 0
        self._transport_errors = 0
        self._crashes = 0
        self._hook_errors = 0
        self._rate_limited = 0
        self._writer: _DirectWriter | None = None

    def __repr__(self) -> str:
        return f"<ConnectionManager {len(self._connections)} connections under {self.supervisor.path}>"

    # -- lifecycle -------------------------------------------------------------

    async def _direct_writer(self) -> _DirectWriter:
        """The shared writer of direct transports, started on first use."""
        writer = self._writer
        if writer is None:
            writer = self._writer = _DirectWriter(self)
            try:
                await self.supervisor.start_child(ChildSpec(id=_WRITER_ID, factory=partial(_WriterActor, writer), restart="permanent"))
            except BaseException:
                self._writer = None
                raise
        return writer

    async def connect(
        self,
        transport: Transport,
        user_id: str | None = None,
        metadata: Mapping[str, object] | None = None,
        *,
        context: Any = None,
    ) -> ConnectionInfo:
        """Register a connection and start its actor.

        Args:
            transport: Where the connection's events are written.
            user_id: The authenticated user, or ``None`` when anonymous.
            metadata: Custom metadata (copied).
            context: Handed to the owner's ``on_opened`` wiring with the
                connection's info (the hub's resume position), not stored.

        Returns:
            A snapshot of the new connection.

        Raises:
            TooManyConnections: ``max_connections`` or
                ``max_connections_per_user`` is reached (a
                ``ConnectionError``).
            ValueError: ``metadata`` has more than ``max_metadata_keys`` keys.
        """
        metadata = dict(metadata or {})
        if len(metadata) > self.max_metadata_keys:
            raise ValueError(f"metadata has {len(metadata)} keys; at most {self.max_metadata_keys} are allowed")
        if len(self._connections) >= self.max_connections:
            raise TooManyConnections(f"{self.max_connections} connections are open already (max_connections)")
        if user_id is not None and self.max_connections_per_user is not None:
            open_now = len(self._by_user.get(user_id, ()))
            if open_now >= self.max_connections_per_user:
                raise TooManyConnections(f"user {user_id!r} has {open_now} connections open already (max_connections_per_user)")
        connection_id = uuid.uuid4().hex
        conn = _Connection(
            connection_id=connection_id,
            user_id=user_id,
            connected_at=self._clock(),
            metadata=types.MappingProxyType(metadata),
            transport=transport,
            outbox=Outbox(
                max_events=self.outbox_max_events,
                max_bytes=self.outbox_max_bytes,
                connection_id=connection_id,
                user_id=user_id,
            ),
        )
        conn.outbox.on_ready = conn.flush_soon
        conn.outbox.on_overflow = conn.overflowed
        if getattr(transport, "direct_writes", False) and (self.min_write_interval == 0 or getattr(transport, "paces_writes", False)):
            conn.direct = await self._direct_writer()
        # Registered before the actor starts, so concurrent connects count it.
        self._connections[connection_id] = conn
        if user_id is not None:
            self._by_user.setdefault(user_id, {})[connection_id] = conn
        try:
            await self.supervisor.start_child(
                ChildSpec(
                    id=connection_id,
                    factory=partial(_ConnectionActor, self, conn),
                    restart="temporary",
                    shutdown=self.close_timeout,
                    hibernate_after=self.hibernate_after,
                    start_hibernating=self.hibernate_after is not None,
                )
            )
        except BaseException:
            self._unregister(conn)
            conn.outbox.close()
            conn.done.set()
            raise
        self._connected += 1
        if self._on_opened is not None:
            try:
                await self._on_opened(conn.info(), context)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.disconnect(connection_id, code=CLOSE_INTERNAL_ERROR, reason="internal error")
                raise
        if user_id is not None and user_id not in self._online and conn.registered:
            self._online.add(user_id)
            await self._call(self.on_user_online, user_id, "on_user_online")
        await self._call(self.on_connect, conn.info(), "on_connect")
        return conn.info()

    async def authenticate(self, connection_id: str, user_id: str, *, context: Any = None) -> ConnectionInfo:
        """Give an anonymous connection its user, in place (in-band authentication).

        The connection keeps its id, transport, outbox, actor, rooms and
        metadata; from now on it is one of ``user_id``'s connections, exactly
        as if it had been opened for the user: it counts toward
        ``max_connections_per_user``, is in the user's index
        (:meth:`get_user_connections`, :meth:`send_to_user`), the owner's
        ``on_authenticated`` wiring runs (the hub attaches it to the user's
        mailbox), and if it is the user's first connection the user goes
        online (``on_user_online``). ``on_connect`` does not run again.

        It is done by the connection's actor, in order with its inbound
        messages (a message queued before is handled as anonymous, one after
        as the user's); called from that actor itself (its ``on_message``
        handler authenticating its own connection) it is done right there,
        without waiting for itself. Events queued for the connection before
        are written to its transport first.

        Authenticating a connection as the user it already has is a no-op
        (no wiring, no presence change) returning its info.

        Args:
            connection_id: The connection.
            user_id: The authenticated user.
            context: Handed to the owner's ``on_authenticated`` wiring with
                the connection's info (the hub's resume position), not stored.

        Returns:
            A snapshot of the connection, now with its ``user_id``.

        Raises:
            NotFound: The connection is not open (or is closing).
            ValueError: ``user_id`` is not a non-empty string, or the
                connection has another user already (a connection's user
                never changes; open a new connection instead).
            TooManyConnections: ``max_connections_per_user`` is reached for
                ``user_id`` (a ``ConnectionError``); the connection is left
                as it was, anonymous and open.
            Exception: Whatever ``on_authenticated`` raised (the connection
                is then closed with :data:`CLOSE_INTERNAL_ERROR`).
        """
        if not isinstance(user_id, str) or not user_id:
            raise ValueError(f"user_id must be a non-empty string, got {user_id!r}")
        conn = self._connections.get(connection_id)
        ref = None if conn is None else conn.ref
        if conn is None or ref is None or not conn.registered or conn.finishing:
            await trio.lowlevel.checkpoint()
            raise NotFound(f"no open connection {connection_id!r}")
        itself = conn.authenticate_itself
        if itself is not None and ref.is_current_task():
            # Called from the connection's own actor (its on_message handler):
            # asking itself would wait for itself.
            return await itself(user_id, context)
        try:
            info: ConnectionInfo = await ref.ask(_Authenticate(user_id, context), timeout=None)
        except _Rejected as rejected:
            raise rejected.error from None
        except ActorError:
            raise NotFound(f"connection {connection_id!r} closed") from None
        return info

    async def _authenticate(self, conn: _Connection, user_id: str, context: Any) -> ConnectionInfo:
        """Make ``conn`` one of ``user_id``'s connections (in its own actor's task)."""
        await trio.lowlevel.checkpoint()
        cid = conn.connection_id
        if conn.finishing or not conn.registered:
            raise NotFound(f"connection {cid!r} closed")
        if conn.user_id is not None:
            if conn.user_id == user_id:
                return conn.info()
            raise ValueError(f"connection {cid!r} is authenticated as another user already; a connection's user cannot change")
        # Checked and counted in one step (no await between), as in connect.
        if self.max_connections_per_user is not None:
            open_now = len(self._by_user.get(user_id, ()))
            if open_now >= self.max_connections_per_user:
                raise TooManyConnections(f"user {user_id!r} has {open_now} connections open already (max_connections_per_user)")
        conn.user_id = user_id
        conn.outbox.user_id = user_id
        self._by_user.setdefault(user_id, {})[cid] = conn
        if self._on_authenticated is not None:
            try:
                await self._on_authenticated(conn.info(), context)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.disconnect(cid, code=CLOSE_INTERNAL_ERROR, reason="internal error")
                raise
        if user_id not in self._online and conn.registered:
            self._online.add(user_id)
            await self._call(self.on_user_online, user_id, "on_user_online")
        return conn.info()

    async def disconnect(self, connection_id: str, *, code: int = CLOSE_NORMAL, reason: str = "disconnected") -> bool:
        """Close a connection: drain its outbox, close its transport, remove it.

        The connection disappears from every query at once; this returns once
        it is closed and ``on_disconnect`` has run. Events queued before the
        call are written first, for up to ``close_timeout`` seconds (a stuck
        client is then closed by force).

        Args:
            connection_id: The connection.
            code: The close code sent to the client.
            reason: The close reason sent to the client.

        Returns:
            Whether the connection was found (``False`` if unknown or already
            closing).
        """
        conn = self._connections.get(connection_id)
        if conn is None or not conn.registered:
            await trio.lowlevel.checkpoint()
            return False
        self._unregister(conn)
        conn.outbox.close()
        await self._close(conn, code, reason)
        return True

    async def disconnect_all(self, *, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> int:
        """Close every connection, concurrently (for a graceful shutdown).

        Returns:
            How many connections were closed.
        """
        conns = list(self._connections.values())
        for conn in conns:
            self._unregister(conn)
            conn.outbox.close()
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(self._close, conn, code, reason)
        return len(conns)

    async def receive(self, connection_id: str, data: Any) -> Any:
        """Hand one inbound message of a connection to its actor.

        A transport's reader calls this for every message its client sends,
        in order. The connection's actor checks the inbound rate limit, then
        awaits :attr:`on_message` with the connection and ``data``; messages
        of one connection are handled one at a time, in order. When 16 are
        queued the call waits (backpressure to the reader).

        Args:
            connection_id: The connection.
            data: The message, as the transport decoded it.

        Returns:
            What :attr:`on_message` returned.

        Raises:
            NotFound: The connection is not open (or is closing).
            RateLimited: Over the inbound rate limit (``retry_after`` says
                when to retry); after ``max_rate_violations`` in a row the
                connection is also closed with :data:`RATE_LIMITED`.
            NotAllowed: No :attr:`on_message` handler is set.
            Exception: Whatever :attr:`on_message` raised (the connection
                stays open).
        """
        try:
            return await self._ask_inbound(connection_id, _Inbound(data))
        except _Rejected as rejected:
            raise rejected.error from None

    async def receive_many(self, connection_id: str, items: list[Any], on_refused: Callable[[Any, Exception], None]) -> None:
        """Hand several inbound messages of a connection to its actor at once.

        As :meth:`receive` for each, in order, in one step of the actor (a
        transport passes every message one read of its socket brought): a
        client's burst is handled without a wake-up per message. What
        ``receive`` would raise for a message (:class:`RateLimited`, or what
        :attr:`on_message` raised) is given to ``on_refused(item, error)``
        instead, in the actor's task (it must not block); the messages after
        one that closed the connection are dropped.

        Raises:
            NotFound: The connection is not open (or is closing).
        """
        await self._ask_inbound(connection_id, _InboundMany(items, on_refused))

    async def post_many(self, connection_id: str, items: list[Any], on_refused: Callable[[Any, Exception], None]) -> None:
        """As :meth:`receive_many`, without waiting for the messages to be handled.

        Returns once they are queued for the connection's actor (waiting
        while 16 batches are queued: backpressure). A transport whose reads
        bring one message at a time uses this, so that its client's next
        message is read while the actor handles the previous ones.

        Raises:
            NotFound: The connection is not open (or is closing).
        """
        conn = self._connections.get(connection_id)
        ref = None if conn is None else conn.ref
        if conn is None or ref is None or not conn.registered:
            await trio.lowlevel.checkpoint()
            raise NotFound(f"no open connection {connection_id!r}")
        try:
            await ref.tell(_InboundMany(items, on_refused), timeout=None)
        except ActorError:
            raise NotFound(f"connection {connection_id!r} closed") from None

    async def _ask_inbound(self, connection_id: str, message: _Inbound | _InboundMany) -> Any:
        conn = self._connections.get(connection_id)
        ref = None if conn is None else conn.ref
        if conn is None or ref is None or not conn.registered:
            await trio.lowlevel.checkpoint()
            raise NotFound(f"no open connection {connection_id!r}")
        try:
            return await ref.ask(message, timeout=None)
        except ActorError:
            raise NotFound(f"connection {connection_id!r} closed") from None

    async def _close(self, conn: _Connection, code: int, reason: str) -> None:
        ref = conn.ref
        if ref is not None and ref.is_current_task():
            # Called from the connection's own actor (its on_message handler
            # disconnecting it): asking itself would wait for itself.
            if conn.close_itself is not None and not conn.finishing:
                await conn.close_itself(code, reason)  # writes what is queued first
            await self._finish(conn, code, reason)
            return
        if ref is not None and not conn.finishing:
            with suppress(ActorError):
                await ref.ask(_Close(code, reason), timeout=self.close_timeout)
        await self._finish(conn, code, reason)
        with suppress(KeyError, ActorStopped):
            await self.supervisor.terminate_child(conn.connection_id)

    def _unregister(self, conn: _Connection) -> None:
        """Remove ``conn`` from every index (idempotent, synchronous)."""
        if not conn.registered:
            return
        conn.registered = False
        cid = conn.connection_id
        self._connections.pop(cid, None)
        if conn.user_id is not None:
            devices = self._by_user.get(conn.user_id)
            if devices is not None:
                devices.pop(cid, None)
                if not devices:
                    del self._by_user[conn.user_id]
        for room_id in conn.rooms:
            members = self._rooms.get(room_id)
            if members is not None:
                members.pop(cid, None)
                if not members:
                    del self._rooms[room_id]

    async def _finish(self, conn: _Connection, code: int, reason: str) -> None:
        """Close ``conn`` for good, exactly once: transport, indexes, hooks.

        Called by the connection's actor (slow consumer, failed send, close
        request, ``on_stop`` after a crash or shutdown) or by the manager
        (forced close). A second caller waits for the first to finish.
        """
        if conn.finishing:
            await conn.done.wait()
            return
        conn.finishing = True
        try:
            conn.outbox.close()
            if conn.send_scope is not None:
                conn.send_scope.cancel()
            self._unregister(conn)
            self._disconnected += 1
            if self.rate_limiter is not None:
                self.rate_limiter.reset(conn.connection_id)
            with trio.move_on_after(self.close_timeout):
                try:
                    await conn.transport.close(code, reason)
                except Exception as exc:
                    logger.info("closing the transport of %s raised %r", conn.connection_id, exc)
            await self._call(self._on_closed, conn.info(), "on_closed")
            user_id = conn.user_id
            if user_id is not None and user_id in self._online and user_id not in self._by_user:
                self._online.discard(user_id)
                await self._call(self.on_user_offline, user_id, "on_user_offline")
            await self._call(self.on_disconnect, conn.info(), "on_disconnect")
        finally:
            conn.done.set()

    async def _call(self, hook: Callable[[Any], Awaitable[None]] | None, arg: Any, name: str) -> None:
        if hook is None:
            return
        try:
            await hook(arg)
        except Exception:
            self._hook_errors += 1
            logger.exception("%s hook raised for %r; ignored", name, arg)

    # -- queries ---------------------------------------------------------------

    def get_connection(self, connection_id: str) -> ConnectionInfo | None:
        """A snapshot of the connection, or ``None`` if it is not open."""
        conn = self._connections.get(connection_id)
        return None if conn is None else conn.info()

    def get_user_connections(self, user_id: str) -> list[ConnectionInfo]:
        """Snapshots of the user's open connections (every device)."""
        return [conn.info() for conn in self._by_user.get(user_id, {}).values()]

    def get_all_connections(self) -> list[ConnectionInfo]:
        """Snapshots of every open connection."""
        return [conn.info() for conn in self._connections.values()]

    @property
    def connection_count(self) -> int:
        """How many connections are open."""
        return len(self._connections)

    def is_online(self, user_id: str) -> bool:
        """Whether the user has at least one open connection."""
        return user_id in self._by_user

    def online_users(self) -> set[str]:
        """The users with at least one open connection."""
        return set(self._by_user)

    def get_subscriber(self, connection_id: str) -> Subscriber | None:
        """The connection's outbox, to subscribe it to rooms and topics."""
        conn = self._connections.get(connection_id)
        return None if conn is None else conn.outbox

    def connection_ref(self, connection_id: str) -> ActorRef | None:
        """The connection actor's ref (for inspection and fault injection)."""
        conn = self._connections.get(connection_id)
        return None if conn is None else conn.ref

    def outbox_statistics(self, connection_id: str) -> OutboxStatistics | None:
        """The statistics of the connection's outbox, or ``None``."""
        conn = self._connections.get(connection_id)
        return None if conn is None else conn.outbox.statistics()

    def statistics(self) -> ConnectionManagerStatistics:
        """A frozen snapshot of the manager's counters."""
        return ConnectionManagerStatistics(
            connections=len(self._connections),
            users=len(self._by_user),
            rooms=len(self._rooms),
            connected=self._connected,
            disconnected=self._disconnected,
            slow_consumers=self._slow_consumers,
            transport_errors=self._transport_errors,
            crashes=self._crashes,
            hook_errors=self._hook_errors,
            rate_limited=self._rate_limited,
        )

    # -- rooms -------------------------------------------------------------------

    def add_room(self, connection_id: str, room_id: str) -> None:
        """Put the connection in a room (idempotent).

        Raises:
            NotFound: The connection is not open.
        """
        conn = self._connections.get(connection_id)
        if conn is None:
            raise NotFound(f"no open connection {connection_id!r}")
        conn.rooms.add(room_id)
        self._rooms.setdefault(room_id, {})[connection_id] = conn

    def remove_room(self, connection_id: str, room_id: str) -> bool:
        """Take the connection out of a room.

        Returns:
            Whether it was in the room (``False`` also for an unknown
            connection: removing is idempotent).
        """
        conn = self._connections.get(connection_id)
        if conn is None or room_id not in conn.rooms:
            return False
        conn.rooms.discard(room_id)
        members = self._rooms[room_id]
        del members[connection_id]
        if not members:
            del self._rooms[room_id]
        return True

    def get_connection_rooms(self, connection_id: str) -> set[str]:
        """The rooms the connection is in (a copy; empty if unknown)."""
        conn = self._connections.get(connection_id)
        return set() if conn is None else set(conn.rooms)

    def get_room_connections(self, room_id: str) -> list[ConnectionInfo]:
        """Snapshots of the connections in a room (empty if none)."""
        return [conn.info() for conn in self._rooms.get(room_id, {}).values()]

    def room_stats(self) -> dict[str, RoomStats]:
        """Per non-empty room, how many connections and users are in it."""
        return {
            room_id: RoomStats(
                connections=len(members),
                users=len({conn.user_id for conn in members.values() if conn.user_id is not None}),
            )
            for room_id, members in self._rooms.items()
        }

    # -- sending -----------------------------------------------------------------

    async def send_to_connection(self, connection_id: str, data: Mapping[str, Any]) -> bool:
        """Queue ``data`` for one connection (an event of type ``"data"``).

        Returns:
            Whether the connection is open and accepted it.

        Raises:
            TypeError: ``data`` is not JSON serialisable.
        """
        await trio.lowlevel.checkpoint()
        conn = self._connections.get(connection_id)
        if conn is None:
            return False
        return conn.outbox.deliver_nowait(_data_event(f"connection:{connection_id}", data))

    def send_frame_nowait(self, connection_id: str, frame: bytes) -> bool:
        """Queue one pre-encoded frame (a protocol reply) for a connection.

        It goes through the connection's outbox like every event (so it is
        written in order with them, and counts toward the outbox's bounds).

        Returns:
            Whether the connection is open and accepted it.
        """
        conn = self._connections.get(connection_id)
        if conn is None:
            return False
        return conn.outbox.deliver_nowait(raw_event(f"connection:{connection_id}", frame))

    async def send_to_user(self, user_id: str, data: Mapping[str, Any]) -> int:
        """Queue ``data`` for every connection of the user (one encoding).

        Returns:
            How many connections accepted it.

        Raises:
            TypeError: ``data`` is not JSON serialisable.
        """
        await trio.lowlevel.checkpoint()
        return _fan_out(_data_event(f"user:{user_id}", data), list(self._by_user.get(user_id, {}).values()))

    async def broadcast(self, data: Mapping[str, Any]) -> int:
        """Queue ``data`` for every open connection (one encoding).

        Returns:
            How many connections accepted it.

        Raises:
            TypeError: ``data`` is not JSON serialisable.
        """
        await trio.lowlevel.checkpoint()
        return _fan_out(_data_event("broadcast", data), list(self._connections.values()))

    async def broadcast_to_room(self, room_id: str, data: Mapping[str, Any]) -> int:
        """Queue ``data`` for every connection in a room (one encoding).

        Returns:
            How many connections accepted it.

        Raises:
            TypeError: ``data`` is not JSON serialisable.
        """
        await trio.lowlevel.checkpoint()
        return _fan_out(_data_event(f"room:{room_id}", data), list(self._rooms.get(room_id, {}).values()))


def _written(positions: Positions, batch: list[Event]) -> None:
    """Record the position of the last sequenced event of each topic in ``batch``."""
    if len(batch) == 1:  # the common case of a quiet connection: no set
        event = batch[0]
        if event.seq is not None:
            positions[event.topic] = (event.epoch or "", event.seq)
        return
    seen: set[str] = set()
    for event in reversed(batch):
        topic = event.topic
        if event.seq is not None and topic not in seen:
            seen.add(topic)
            positions[topic] = (event.epoch or "", event.seq)


def _data_event(topic: str, data: Mapping[str, Any]) -> Event:
    event = Event(type=DATA, topic=topic, data=data)
    _ = event.encoded  # serialise once, here: a TypeError reaches the caller
    return event


def _fan_out(event: Event, conns: list[_Connection]) -> int:
    # The list is a snapshot: an overflow closes a connection only later, in
    # its own actor, but stay safe against changes during the loop anyway.
    return sum(1 for conn in conns if conn.outbox.deliver_nowait(event))
