"""The protocol handler: client frames in, hub calls and reply frames out.

A transport (hypercorn's WebSocket adapter, a native one, a test) does three
things and nothing else: :meth:`ProtocolHandler.open` when a client is
accepted, :meth:`ProtocolHandler.frame` for every frame the client sends, in
order, and closing its socket when the hub closes the connection's
transport. Everything else happens here and in the hub:

* ``open`` connects the client to the hub (its identity's user, or
  anonymously until an ``auth`` command) and makes the ``welcome`` frame the
  connection's first.
* ``frame`` hands the frame to the connection's actor
  (``hub.connections.receive``), which checks the inbound rate limit and
  runs :meth:`ProtocolHandler.on_message` there, one frame at a time per
  connection. Over the rate limit the client gets a ``rate_limited`` error;
  the connection manager closes it with 4029 after repeated violations.
* ``on_message`` decodes the frame (sans-IO, :mod:`ensemble.protocol`),
  checks what this connection may do, calls the hub, and queues the reply or
  error frame in the connection's outbox (``send_frame_nowait``), so replies
  and events reach the client in the order they were queued.

Per-connection protocol state (identity, token expiry, batching, the count
of undecodable frames in a row, live watches) lives in a session object kept
by connection id. The handler wraps every transport it is given: the wrapper
writes the ``welcome`` first, joins batched frames, and forgets the session
when the hub closes the transport (whatever the cause), so no hook of the
connection manager is taken.

In-band authentication: a connection opened without an identity is
anonymous; when its ``auth`` succeeds the handler makes it the user's in
place (``hub.authenticate``, from inside the connection's actor): same hub
connection, same id, same session. The frames queued before are written
first, then the ``auth`` reply (the ``welcome`` fields), then the user's
notifications replayed from ``since``. A per-user connection limit closes
the connection with 1013, a failure with 1011 (logged).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

import attrs
import trio

from .._sync import LazyEvent
from ..protocol import CloseCode, ProtocolError, _commands as cmd, decode, dumps, encode_error, encode_pong, encode_reply
from ..realtime import (
    ApprovalRequired,
    Banned,
    ConnectionInfo,
    DirectTransport,
    HistoryUnavailable,
    Hub,
    InvalidMessage,
    NotAllowed,
    NotAMember,
    NotFound,
    RateLimited,
    Room,
    RoomFull,
    RoomMessage,
    TooManyConnections,
    Transport,
)
from ._auth import Authenticator
from ._identity import Identity

logger = logging.getLogger("ensemble.server")

PROTOCOL_VERSION: Final = 1
"""The ``protocol`` field of the ``welcome`` frame."""

# Error codes the handler sends (besides the decoder's, see ensemble.protocol).
NOT_AUTHENTICATED: Final = "not_authenticated"
UNAUTHENTICATED: Final = "unauthenticated"
NOT_JOINED: Final = "not_joined"
TOO_MANY_ROOMS: Final = "too_many_rooms"
TOO_MANY_WATCHES: Final = "too_many_watches"
INTERNAL: Final = "internal"

WatchPolicy = Callable[[str | None, str, Mapping[str, cmd.Scalar]], bool]
"""``(user_id, model, filters) -> bool``: whether a connection may watch."""


class _Refusal(Exception):
    """The handler refuses a command: becomes an ``error`` frame."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra


_NO_REPLY: Final = object()


@attrs.define(eq=False)
class _Session:
    """The protocol state of one client (one socket, one hub connection)."""

    connection_id: str = ""
    identity: Identity | None = None
    metadata: Mapping[str, object] | None = None
    resume: tuple[str, int] | None = None
    opened_at: float = 0.0
    batch: bool = False
    errors: int = 0
    watches: set[str] = attrs.field(factory=set)
    transport: _SessionTransport | None = None

    @property
    def expires_at(self) -> float | None:
        return None if self.identity is None else self.identity.expires_at


class _SessionTransport:
    """What the hub writes to for one connection: the client's transport, plus

    a frame written before anything not yet written (the ``welcome``, or the
    ``auth`` reply ahead of the replayed notifications), batching (several
    frames joined with ``\\n``) when the client asked for it, and the
    session's end when the hub closes it.
    """

    def __init__(self, handler: ProtocolHandler, inner: Transport, session: _Session) -> None:
        self._handler = handler
        self.inner = inner
        self._session = session
        self._ready = LazyEvent()
        self._first: bytes | None = None
        self._first_written = True
        self._held = False
        self.closed = False

    def put_first(self, first: bytes | None) -> None:
        """Write ``first`` ahead of every frame not yet written; let writes through.

        Writes wait for the first call (``open`` makes it with the
        ``welcome``, or with ``None`` when the connection failed). ``first``
        is also queued in the connection's outbox (so that it is written
        even when nothing else is); it is written once, first, and its
        queued copy is skipped.
        """
        self._first = first
        self._first_written = first is None
        self._ready.set()

    def hold(self) -> None:
        """Keep the direct writer out (until :meth:`release`): the connection's
        actor is about to put a frame first, and its actor writes nothing
        while it works either."""
        self._held = True

    def release(self) -> None:
        """Undo :meth:`hold` (what was queued meanwhile is written by the actor)."""
        self._held = False

    async def send(self, data: bytes) -> None:
        await self.send_many([data])

    async def send_many(self, frames: list[bytes]) -> None:
        if not self._ready.is_set():  # (no schedule point once it is: the fan-out path)
            await self._ready.wait()
        send_many = getattr(self.inner, "send_many", None)
        if not frames:
            if send_many is not None:
                await send_many([])  # what an interrupted or partial write left
            return
        frames = self._prepare(frames)
        if not frames:
            return
        if send_many is not None:
            await send_many(frames)
        else:
            for frame in frames:
                await self.inner.send(frame)

    @property
    def direct_writes(self) -> bool:
        """Whether the client's transport can be written without waiting (the hub's direct writer)."""
        return bool(getattr(self.inner, "direct_writes", False))

    @property
    def paces_writes(self) -> bool:
        """Whether the client's transport keeps ``min_write_interval`` itself."""
        return bool(getattr(self.inner, "paces_writes", False))

    def can_send_nowait(self) -> bool:
        """Whether :meth:`send_nowait` may be called now (after the ``welcome``)."""
        inner: DirectTransport = self.inner  # type: ignore[assignment]
        return self._ready.is_set() and not self._held and inner.can_send_nowait()

    def wake_when_writable(self, callback: Callable[[], None]) -> bool:
        """The client transport's ``wake_when_writable``, if it has one (not while held)."""
        wake = getattr(self.inner, "wake_when_writable", None)
        if wake is None or not self._ready.is_set() or self._held:
            return False
        return bool(wake(callback))

    def send_nowait(self, frames: list[bytes]) -> bool:
        """:meth:`send_many` without waiting (see :class:`~ensemble.realtime.DirectTransport`)."""
        frames = self._prepare(frames)
        if not frames:
            return True
        inner: DirectTransport = self.inner  # type: ignore[assignment]
        return inner.send_nowait(frames)

    def _prepare(self, frames: list[bytes]) -> list[bytes]:
        """The first frame ahead, its queued copy skipped; joined when batching."""
        first = self._first
        if first is not None:
            kept = [frame for frame in frames if not (frame is first or frame == first)]
            if len(kept) != len(frames):
                self._first = None  # its queued copy came through: done
            if not self._first_written:
                kept.insert(0, first)
                self._first_written = True
            frames = kept
        if self._session.batch and len(frames) > 1:
            frames = _join(frames, self._handler.max_message_size)
        return frames

    async def close(self, code: int, reason: str) -> None:
        self.closed = True
        self._ready.set()  # a close never waits for the welcome
        self._handler._forget(self._session)
        await self.inner.close(code, reason)


def _join(frames: list[bytes], limit: int) -> list[bytes]:
    """Join frames with ``\\n`` into as few frames of at most ``limit`` bytes as fit."""
    joined: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for frame in frames:
        if chunk and size + 1 + len(frame) > limit:
            joined.append(b"\n".join(chunk))
            chunk, size = [], 0
        chunk.append(frame)
        size += len(frame) + (1 if size else 0)
    if chunk:
        joined.append(b"\n".join(chunk))
    return joined


def _valid_user_id(user_id: str) -> bool:
    return bool(user_id) and "/" not in user_id and len(user_id) <= 200


class ProtocolHandler:
    """Speaks the wire protocol (``docs/protocol.md``) for every connection of a hub.

    Args:
        hub: The running hub.
        max_message_size: Most bytes in a client frame (``too_big`` beyond;
            a transport should close with 1009 above its own frame limit).
        max_depth: Most nesting of arrays and objects in a client frame.
        max_rooms_per_connection: Most rooms one connection may be joined to
            (``too_many_rooms`` beyond).
        max_watches_per_connection: Most live watches of one connection.
        max_protocol_errors: Undecodable frames in a row after which the
            connection is closed with 4004 (``PROTOCOL_VIOLATION``).
        authenticator: Checks tokens presented in ``auth`` commands (and bare
            ``{"token": ...}`` frames); ``None``: such frames are refused.
        auth_timeout: Seconds an anonymous connection has to authenticate
            (see :meth:`unauthenticated`).
        watchable_models: The models clients may watch (``"*"``: any).
            Empty, the default: ``watch`` is refused (error
            ``not_allowed``), since a live query would otherwise show any
            client every row of every model the backend notifies about.
        watch_policy: Further, whether a user may watch a model with these
            filters (row-level rules); ``None``: no further check.
        clock: Unix time, for expiry and the authentication timeout.
    """

    def __init__(
        self,
        hub: Hub,
        *,
        max_message_size: int = 65536,
        max_depth: int = 32,
        max_rooms_per_connection: int = 100,
        max_watches_per_connection: int = 100,
        max_protocol_errors: int = 10,
        authenticator: Authenticator | None = None,
        auth_timeout: float = 10.0,
        watchable_models: Collection[str] = (),
        watch_policy: WatchPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_message_size < 1 or max_depth < 1 or max_rooms_per_connection < 0 or max_watches_per_connection < 0:
            raise ValueError("max_message_size and max_depth must be >= 1, the per-connection maxima >= 0")
        if max_protocol_errors < 1:
            raise ValueError(f"max_protocol_errors must be at least 1, got {max_protocol_errors}")
        self.hub = hub
        self.max_message_size = max_message_size
        self.max_depth = max_depth
        self.max_rooms_per_connection = max_rooms_per_connection
        self.max_watches_per_connection = max_watches_per_connection
        self.max_protocol_errors = max_protocol_errors
        self.authenticator = authenticator
        self.auth_timeout = auth_timeout
        self.watchable_models = frozenset(watchable_models)
        self.watch_policy = watch_policy
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._commands: dict[type[Any], Callable[[_Session, ConnectionInfo, Any], Awaitable[Any]]] = {
            cmd.Auth: self._auth,
            cmd.Ping: self._ping,
            cmd.Pong: self._pong,
            cmd.Options: self._options,
            cmd.Join: self._join,
            cmd.Leave: self._leave,
            cmd.Send: self._send,
            cmd.Edit: self._edit,
            cmd.Delete: self._delete,
            cmd.Typing: self._typing,
            cmd.History: self._history,
            cmd.Members: self._members,
            cmd.Kick: self._kick,
            cmd.Ban: self._ban,
            cmd.Unban: self._unban,
            cmd.SetRole: self._set_role,
            cmd.RequestJoin: self._request_join,
            cmd.Approve: self._approve,
            cmd.Deny: self._deny,
            cmd.JoinRequests: self._join_requests,
            cmd.Notifications: self._notifications,
            cmd.Unread: self._unread,
            cmd.MarkRead: self._mark_read,
            cmd.MarkAllRead: self._mark_all_read,
            cmd.Clear: self._clear,
            cmd.Watch: self._watch,
            cmd.Unwatch: self._unwatch,
        }

    def __repr__(self) -> str:
        return f"<ProtocolHandler {len(self._sessions)} sessions on {self.hub!r}>"

    def install(self) -> ProtocolHandler:
        """Make this the hub's inbound handler (``hub.connections.on_message``).

        Returns:
            The handler itself.
        """
        self.hub.connections.on_message = self.on_message
        return self

    # -- what a transport calls ------------------------------------------------------

    async def open(
        self,
        transport: Transport,
        identity: Identity | None,
        *,
        metadata: Mapping[str, object] | None = None,
        resume: tuple[str, int] | None = None,
    ) -> ConnectionInfo:
        """Connect an accepted client to the hub; its first frame is ``welcome``.

        Args:
            transport: The client's socket (``send``, ``close``, optionally
                ``send_many``); the hub writes to it and closes it.
            identity: Who authenticated at the handshake, or ``None``: the
                client must send ``auth`` first (within ``auth_timeout``);
                until then only ``auth``, ``ping`` and ``options`` are
                accepted.
            metadata: The connection's metadata.
            resume: The ``(epoch, seq)`` of the last notification the client
                processed (from the handshake): the ones after it are
                replayed after the ``welcome``.

        Returns:
            The connection's info; its ``connection_id`` is what the
            transport passes to :meth:`frame`.

        Raises:
            TooManyConnections: A connection limit is reached (close 1013).
            ValueError: Invalid metadata or identity.
        """
        session = _Session(identity=identity, metadata=metadata, resume=resume, opened_at=self._clock())
        wrapper = session.transport = _SessionTransport(self, transport, session)
        user_id = None if identity is None else identity.user_id
        try:
            connected = await self.hub.connect(wrapper, user_id, metadata, notifications_since=resume if user_id else None)
        except BaseException:
            wrapper.put_first(None)
            raise
        session.connection_id = connected.connection_id
        if not wrapper.closed:
            self._sessions[connected.connection_id] = session
        notifications = None if connected.notifications is None else connected.notifications.to_dict()
        welcome = dumps({"type": "welcome", **self._hello(session, notifications)})
        wrapper.put_first(welcome)
        self.hub.connections.send_frame_nowait(connected.connection_id, welcome)
        return connected

    async def frame(self, connection_id: str, data: str | bytes) -> None:
        """Handle one frame the client sent (call in order, one at a time).

        Never raises for a client's mistake: a refused frame is answered
        with an ``error`` frame. A frame for a connection that is closed is
        ignored.

        Args:
            connection_id: What :meth:`open` returned.
            data: The frame, as text or bytes.
        """
        try:
            await self.hub.connections.receive(connection_id, data)
        except RateLimited as exc:
            ref = _peek_ref(data, self.max_message_size, self.max_depth)
            frame = encode_error("rate_limited", str(exc), ref, retry_after=round(exc.retry_after, 3))
            self.hub.connections.send_frame_nowait(connection_id, frame)
        except NotFound:
            pass  # closed meanwhile: nobody to answer

    async def frames(self, connection_id: str, frames: list[str], *, wait: bool = True) -> None:
        """Handle several frames the client sent, in order, in one step of its actor.

        What a transport calls with every frame one read of its socket
        brought; the same as :meth:`frame` for each, without a wake-up per
        frame. With ``wait=False`` it returns once they are queued (the
        connection's next frames can be read meanwhile; 16 batches queued
        make it wait).
        """
        if wait and len(frames) == 1:
            await self.frame(connection_id, frames[0])
            return

        def refused(data: Any, error: Exception) -> None:
            if isinstance(error, RateLimited):
                ref = _peek_ref(data, self.max_message_size, self.max_depth)
                frame = encode_error("rate_limited", str(error), ref, retry_after=round(error.retry_after, 3))
                self.hub.connections.send_frame_nowait(connection_id, frame)
            elif not isinstance(error, NotFound):
                logger.error("handling a frame of connection %s failed", connection_id, exc_info=error)

        with contextlib.suppress(NotFound):  # closed meanwhile: nobody to answer
            if wait:
                await self.hub.connections.receive_many(connection_id, frames, refused)
            else:
                await self.hub.connections.post_many(connection_id, frames, refused)

    async def close(self, connection_id: str, *, code: int = CloseCode.NORMAL, reason: str = "") -> bool:
        """Close a connection by the id :meth:`open` returned.

        Returns:
            Whether it was open.
        """
        return await self.hub.connections.disconnect(connection_id, code=int(code), reason=reason)

    def expiring(self, now: float | None = None) -> list[str]:
        """The connections whose identity expired by ``now`` (Unix time) without a refresh.

        A transport's heartbeat sweeper closes them with
        :attr:`CloseCode.TOKEN_EXPIRED` (4002); see :meth:`sweep`.
        """
        now = self._clock() if now is None else now
        return [s.connection_id for s in self._sessions.values() if s.expires_at is not None and s.expires_at <= now]

    def unauthenticated(self, now: float | None = None) -> list[str]:
        """The anonymous connections that did not authenticate within ``auth_timeout``.

        A transport's sweeper closes them with
        :attr:`CloseCode.UNAUTHENTICATED` (4001); see :meth:`sweep`.
        """
        now = self._clock() if now is None else now
        deadline = now - self.auth_timeout
        return [s.connection_id for s in self._sessions.values() if s.identity is None and s.opened_at <= deadline]

    async def sweep(self, now: float | None = None) -> int:
        """Close the expired (4002) and unauthenticated (4001) connections.

        Returns:
            How many were closed.
        """
        closed = 0
        for cid in self.expiring(now):
            closed += await self.hub.connections.disconnect(cid, code=CloseCode.TOKEN_EXPIRED, reason="token expired")
        for cid in self.unauthenticated(now):
            closed += await self.hub.connections.disconnect(cid, code=CloseCode.UNAUTHENTICATED, reason="authentication timed out")
        return closed

    def session_count(self) -> int:
        """How many connections the handler keeps state for."""
        return len(self._sessions)

    def _forget(self, session: _Session) -> None:
        if self._sessions.get(session.connection_id) is session:
            del self._sessions[session.connection_id]

    def _hello(self, session: _Session, notifications: Mapping[str, Any] | None) -> dict[str, Any]:
        identity = session.identity
        return {
            "connection_id": session.connection_id,
            "user_id": None if identity is None else identity.user_id,
            "guest": False if identity is None else identity.guest,
            "expires_at": None if identity is None else identity.expires_at,
            "notifications": notifications,
            "protocol": PROTOCOL_VERSION,
            "limits": {
                "max_message_size": self.max_message_size,
                "max_rooms": self.max_rooms_per_connection,
                "max_protocol_errors": self.max_protocol_errors,
            },
        }

    # -- inbound -------------------------------------------------------------------------

    async def on_message(self, info: ConnectionInfo, data: Any) -> None:
        """Handle one client frame, inside the connection's actor.

        Decodes it, runs the command and queues the reply (for a command
        with a ``ref``) or an ``error`` frame. Never raises: a client's
        mistake is an error frame, a server failure an ``internal`` one
        (logged with its traceback, none on the wire).
        """
        session = self._sessions.get(info.connection_id)
        if session is None:  # a connection opened on the hub directly
            identity = None if info.user_id is None else Identity(user_id=info.user_id, source="server")
            session = _Session(connection_id=info.connection_id, identity=identity)
            self._sessions[info.connection_id] = session
        if not isinstance(data, (str, bytes, bytearray, memoryview)):
            data = b""  # not a frame: decodes to an error
        try:
            command = decode(data, max_size=self.max_message_size, max_depth=self.max_depth)
        except ProtocolError as exc:
            await self._protocol_error(session, exc)
            return
        session.errors = 0
        ref = command.ref
        try:
            if session.identity is None and not isinstance(command, (cmd.Auth, cmd.Ping, cmd.Pong, cmd.Options)):
                raise _Refusal(NOT_AUTHENTICATED, f"authenticate first: send an auth command before {command.type}")
            result = await self._commands[type(command)](session, info, command)
        except _Refusal as refusal:
            self._queue(session, encode_error(refusal.code, refusal.detail, ref, **refusal.extra))
            return
        except Exception as exc:
            self._queue(session, self._error_frame(exc, ref, command, session))
            return
        if isinstance(result, bytes):
            self._queue(session, result)
        elif result is not _NO_REPLY and ref is not None:
            self._queue(session, encode_reply(ref, result))

    async def _protocol_error(self, session: _Session, exc: ProtocolError) -> None:
        session.errors += 1
        self._queue(session, exc.to_frame())
        if session.errors >= self.max_protocol_errors:
            logger.info("connection %s sent %d undecodable frames in a row; closing it", session.connection_id, session.errors)
            await self.hub.connections.disconnect(
                session.connection_id, code=CloseCode.PROTOCOL_VIOLATION, reason=f"{session.errors} protocol errors in a row"
            )

    def _queue(self, session: _Session, frame: bytes) -> None:
        self.hub.connections.send_frame_nowait(session.connection_id, frame)

    def _error_frame(self, exc: Exception, ref: cmd.Ref, command: cmd.Command, session: _Session) -> bytes:
        detail = str(exc)
        if isinstance(exc, Banned):
            return encode_error("banned", detail, ref)
        if isinstance(exc, RoomFull):
            return encode_error("room_full", detail, ref)
        if isinstance(exc, NotAMember):
            return encode_error("not_a_member", detail, ref)
        if isinstance(exc, ApprovalRequired):
            return encode_error("approval_required", detail, ref)
        if isinstance(exc, RateLimited):
            return encode_error("rate_limited", detail, ref, retry_after=round(exc.retry_after, 3))
        if isinstance(exc, (NotAllowed, PermissionError)):
            return encode_error("not_allowed", detail, ref)
        if isinstance(exc, HistoryUnavailable):
            return encode_error("history_unavailable", detail, ref, epoch=exc.epoch, first_seq=exc.first_seq, last_seq=exc.last_seq)
        if isinstance(exc, (InvalidMessage, ValueError)):
            return encode_error("invalid", detail, ref)
        if isinstance(exc, NotFound):
            return encode_error("not_found", detail, ref)
        if isinstance(exc, TooManyConnections):
            return encode_error("overloaded", detail, ref)
        logger.error("internal error handling %s from connection %s", command.type, session.connection_id, exc_info=exc)
        return encode_error(INTERNAL, f"the server failed to handle {command.type}", ref)

    # -- commands ------------------------------------------------------------------------

    def _user(self, session: _Session) -> str:
        assert session.identity is not None
        return session.identity.user_id

    async def _joined_room(self, info: ConnectionInfo, room_id: str) -> Room:
        if room_id not in info.rooms:
            raise _Refusal(NOT_JOINED, f"this connection has not joined room {room_id!r}: send join first")
        return await self.hub.room(room_id)

    async def _ping(self, session: _Session, info: ConnectionInfo, command: cmd.Ping) -> bytes:
        await trio.lowlevel.checkpoint()
        return encode_pong(command.ref)

    async def _pong(self, session: _Session, info: ConnectionInfo, command: cmd.Pong) -> object:
        await trio.lowlevel.checkpoint()
        return _NO_REPLY

    async def _options(self, session: _Session, info: ConnectionInfo, command: cmd.Options) -> object:
        await trio.lowlevel.checkpoint()
        if command.batch is not None:
            session.batch = command.batch and session.transport is not None
        return {"batch": session.batch}

    async def _auth(self, session: _Session, info: ConnectionInfo, command: cmd.Auth) -> object:
        if self.authenticator is None:
            identity = None
            why = "this server takes no tokens in messages"
        else:
            why = "the token was not accepted"
            try:
                identity = await self.authenticator.authenticate(command.token)
            except Exception as exc:
                # Only the type and where it was raised: an exception's message may hold the token.
                tb = exc.__traceback__
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                where = "?" if tb is None else f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
                logger.error("the authenticator raised %s at %s for connection %s", type(exc).__name__, where, session.connection_id)
                identity = None
            if identity is not None and not _valid_user_id(identity.user_id):
                logger.error("the authenticator returned an invalid user id for connection %s", session.connection_id)
                identity = None
        if identity is None:
            if session.identity is not None:
                raise _Refusal(UNAUTHENTICATED, why)  # a failed refresh: the current identity stands until it expires
            self._queue(session, encode_error(UNAUTHENTICATED, why, command.ref))
            await self.hub.connections.disconnect(session.connection_id, code=CloseCode.UNAUTHENTICATED, reason="invalid token")
            return _NO_REPLY
        if session.identity is not None:
            if identity.user_id != session.identity.user_id:
                raise _Refusal("invalid", "the token is for another user: open a new connection to change users")
            session.identity = identity  # a refresh: the new expiry counts
            return {"user_id": identity.user_id, "guest": identity.guest, "expires_at": identity.expires_at}
        return await self._authenticate(session, identity, command)

    async def _authenticate(self, session: _Session, identity: Identity, command: cmd.Auth) -> object:
        """Make the anonymous connection ``identity``'s user's, in place (same hub connection and id).

        Runs in the connection's actor (``on_message``), so nothing is
        written until it returns: the reply is put ahead of the notifications
        the hub replayed into the outbox.
        """
        since = command.since.as_tuple() if command.since is not None else session.resume
        transport = session.transport
        if transport is not None:
            transport.hold()  # the direct writer too: the reply goes ahead of the replay
        try:
            return await self._authenticate_held(session, identity, command, since)
        finally:
            if transport is not None:
                transport.release()

    async def _authenticate_held(self, session: _Session, identity: Identity, command: cmd.Auth, since: tuple[str, int] | None) -> object:
        cid = session.connection_id
        try:
            connected = await self.hub.authenticate(cid, identity.user_id, notifications_since=since)
        except NotFound:
            return _NO_REPLY  # closed meanwhile: nobody to answer
        except TooManyConnections:
            await self.hub.connections.disconnect(cid, code=CloseCode.TRY_AGAIN_LATER, reason="too many connections")
            return _NO_REPLY
        except Exception:
            logger.exception("authenticating connection %s for its user failed", cid)
            await self.hub.connections.disconnect(cid, code=CloseCode.INTERNAL_ERROR, reason="internal error")
            return _NO_REPLY
        session.identity = identity
        notifications = None if connected.notifications is None else connected.notifications.to_dict()
        hello = self._hello(session, notifications)
        first = encode_reply(command.ref, hello) if command.ref is not None else dumps({"type": "welcome", **hello})
        if session.transport is not None:
            session.transport.put_first(first)
        self._queue(session, first)
        return _NO_REPLY

    async def _join(self, session: _Session, info: ConnectionInfo, command: cmd.Join) -> object:
        if command.room not in info.rooms and len(info.rooms) >= self.max_rooms_per_connection:
            raise _Refusal(
                TOO_MANY_ROOMS, f"this connection has joined {len(info.rooms)} rooms; at most {self.max_rooms_per_connection} are allowed"
            )
        since = None if command.since is None else command.since.as_tuple()
        joined = await self.hub.join_room(session.connection_id, command.room, display_name=command.display_name, since=since)
        return joined.to_dict()

    async def _leave(self, session: _Session, info: ConnectionInfo, command: cmd.Leave) -> object:
        left = await self.hub.leave_room(session.connection_id, command.room)
        member = False
        if command.membership:
            room = await self.hub.room(command.room)
            member = await room.leave(self._user(session))
        return {"room_id": command.room, "left": left, "membership_ended": member}

    async def _send(self, session: _Session, info: ConnectionInfo, command: cmd.Send) -> object:
        room = await self._joined_room(info, command.room)
        # Not awaited: the connection goes on with its next frame while the
        # room handles this one, so a client that sends a burst has many
        # messages in flight and the room fans them out together. The reply
        # (or error) is queued when the room has handled it: after the
        # message event it sends to this connection, in the order sent.
        ref = command.ref

        def done(message: RoomMessage | None, error: BaseException | None) -> None:
            if error is not None:
                if isinstance(error, Exception):
                    self._queue(session, self._error_frame(error, ref, command, session))
            elif ref is not None and message is not None:
                self._queue(session, encode_reply(ref, message.to_dict()))

        await room.send_message_later(self._user(session), command.content, command.message_type, done)
        return _NO_REPLY

    async def _edit(self, session: _Session, info: ConnectionInfo, command: cmd.Edit) -> object:
        room = await self._joined_room(info, command.room)
        message = await room.edit_message(self._user(session), command.message_id, command.content)
        return message.to_dict()

    async def _delete(self, session: _Session, info: ConnectionInfo, command: cmd.Delete) -> object:
        room = await self._joined_room(info, command.room)
        deleted = await room.delete_message(self._user(session), command.message_id)
        return {"message_id": command.message_id, "deleted": deleted}

    async def _typing(self, session: _Session, info: ConnectionInfo, command: cmd.Typing) -> object:
        room = await self._joined_room(info, command.room)
        await room.set_typing(self._user(session), command.typing)
        return {"typing": command.typing}

    async def _history(self, session: _Session, info: ConnectionInfo, command: cmd.History) -> object:
        room = await self._joined_room(info, command.room)
        since = None if command.since is None else command.since.as_tuple()
        messages = await room.get_history(command.limit, since)
        return {"room_id": command.room, "messages": [message.to_dict() for message in messages]}

    async def _members(self, session: _Session, info: ConnectionInfo, command: cmd.Members) -> object:
        room = await self._joined_room(info, command.room)
        # Online in this room: a connection of theirs is subscribed to it (what presence events track).
        online = {c.user_id for c in self.hub.connections.get_room_connections(command.room) if c.user_id is not None}
        members = [{**member.to_dict(), "online": member.user_id in online} for member in await room.get_members()]
        return {"room_id": command.room, "members": members}

    async def _kick(self, session: _Session, info: ConnectionInfo, command: cmd.Kick) -> object:
        room = await self._joined_room(info, command.room)
        return {"user_id": command.user, "kicked": await room.kick(command.user, command.reason, by=self._user(session))}

    async def _ban(self, session: _Session, info: ConnectionInfo, command: cmd.Ban) -> object:
        room = await self._joined_room(info, command.room)
        return {"user_id": command.user, "banned": await room.ban(command.user, command.reason, by=self._user(session))}

    async def _unban(self, session: _Session, info: ConnectionInfo, command: cmd.Unban) -> object:
        room = await self._joined_room(info, command.room)
        return {"user_id": command.user, "unbanned": await room.unban(command.user, by=self._user(session))}

    async def _set_role(self, session: _Session, info: ConnectionInfo, command: cmd.SetRole) -> object:
        room = await self._joined_room(info, command.room)
        return (await room.set_role(command.user, command.role, by=self._user(session))).to_dict()

    async def _request_join(self, session: _Session, info: ConnectionInfo, command: cmd.RequestJoin) -> object:
        room = await self.hub.room(command.room)
        user = self._user(session)
        request = await room.request_join(user, command.display_name or user)
        return {"room_id": command.room, **request.to_dict()}

    async def _approve(self, session: _Session, info: ConnectionInfo, command: cmd.Approve) -> object:
        room = await self._joined_room(info, command.room)
        return (await room.approve(command.user, by=self._user(session))).to_dict()

    async def _deny(self, session: _Session, info: ConnectionInfo, command: cmd.Deny) -> object:
        room = await self._joined_room(info, command.room)
        return {"user_id": command.user, "denied": await room.deny(command.user, command.reason, by=self._user(session))}

    async def _join_requests(self, session: _Session, info: ConnectionInfo, command: cmd.JoinRequests) -> object:
        room = await self._joined_room(info, command.room)
        requests = await room.get_join_requests(by=self._user(session))
        return {"room_id": command.room, "requests": [request.to_dict() for request in requests]}

    async def _notifications(self, session: _Session, info: ConnectionInfo, command: cmd.Notifications) -> object:
        user = self._user(session)
        if command.unread_only:
            found = (await self.hub.notifications.get_unread(user))[-command.limit :]
        else:
            found = await self.hub.notifications.get_all(user, command.limit)
        return {"notifications": [notification.to_dict() for notification in found]}

    async def _unread(self, session: _Session, info: ConnectionInfo, command: cmd.Unread) -> object:
        return {"count": len(await self.hub.notifications.get_unread(self._user(session)))}

    async def _mark_read(self, session: _Session, info: ConnectionInfo, command: cmd.MarkRead) -> object:
        if not await self.hub.notifications.mark_read(self._user(session), command.id):
            raise NotFound(f"no notification {command.id!r}")
        return {"id": command.id, "read": True}

    async def _mark_all_read(self, session: _Session, info: ConnectionInfo, command: cmd.MarkAllRead) -> object:
        return {"count": await self.hub.notifications.mark_all_read(self._user(session))}

    async def _clear(self, session: _Session, info: ConnectionInfo, command: cmd.Clear) -> object:
        return {"count": await self.hub.notifications.clear(self._user(session))}

    async def _watch(self, session: _Session, info: ConnectionInfo, command: cmd.Watch) -> object:
        if session.watches and len(session.watches) >= self.max_watches_per_connection:
            # Forget the watches the server ended (``live_reset``) before counting.
            session.watches &= await self.hub.live.active(session.watches)
        if len(session.watches) >= self.max_watches_per_connection:
            raise _Refusal(
                TOO_MANY_WATCHES,
                f"this connection has {len(session.watches)} watches; at most {self.max_watches_per_connection} are allowed",
            )
        filters = dict(command.filters)
        if "*" not in self.watchable_models and command.model not in self.watchable_models:
            raise _Refusal("not_allowed", f"model {command.model!r} may not be watched (the server's watchable_models)")
        if self.watch_policy is not None and not self.watch_policy(self._user(session), command.model, filters):
            raise _Refusal("not_allowed", f"you may not watch {command.model!r} with these filters")
        subscriber = self.hub.connections.get_subscriber(session.connection_id)
        if subscriber is None:
            raise NotFound("the connection is closed")
        live = self.hub.live
        watch_id = await live.watch(command.model, filters or None, subscriber=subscriber, since=command.since, epoch=command.epoch)
        session.watches.add(watch_id)
        return {"id": watch_id, "model": command.model, "version": await live.version(command.model), "epoch": live.epoch}

    async def _unwatch(self, session: _Session, info: ConnectionInfo, command: cmd.Unwatch) -> object:
        if command.id not in session.watches:
            raise NotFound(f"this connection has no watch {command.id!r}")
        session.watches.discard(command.id)
        if not await self.hub.live.unwatch(command.id):  # the server ended it (``live_reset``)
            raise NotFound(f"this connection has no watch {command.id!r}")
        return {"id": command.id, "unwatched": True}


def _peek_ref(data: Any, max_size: int, max_depth: int) -> cmd.Ref:
    """The ``ref`` of a frame that is refused before decoding (rate limited)."""
    if not isinstance(data, (str, bytes)):
        return None
    try:
        return decode(data, max_size=max_size, max_depth=max_depth).ref
    except ProtocolError as exc:
        return exc.ref
