"""Persistence of rooms: the :class:`RoomStore` protocol and an in-memory store.

A room actor keeps its state in memory and writes every change through to a
store, so that the state outlives the actor (a crash, an idle stop, a move to
another process). The store sees *operations*, never the actor's objects:
each message the actor handles ends in one :meth:`RoomStore.apply` call with
the batch of :data:`RoomOp` records it produced. Every op is a small frozen
record that maps to one or two commands of a Redis pipeline (``HSET``,
``HDEL``, ``RPUSH`` + ``LTRIM``, ``SET``), so a Redis store can apply a batch
as one ``MULTI``/``EXEC``.

:meth:`RoomStore.load` returns a :class:`RoomRecord`: a frozen snapshot that
shares nothing mutable with the store.

A room that stops idle with nothing worth keeping (no members, bans, join
requests or history) ends with a :class:`DeleteRoom` op, so an abandoned room
costs nothing once its actor is gone; starting it again creates a new record
with a new ``epoch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

from ._events import MESSAGE, Event
from ._models import RoomConfig, RoomMember


@attrs.frozen(kw_only=True)
class JoinRequest:
    """A pending request to join a room whose ``join_policy`` is ``approval``.

    Attributes:
        user_id: The requester.
        display_name: The name they asked to appear under.
        requested_at: Unix time of the request.
    """

    user_id: str
    display_name: str
    requested_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return {"user_id": self.user_id, "display_name": self.display_name, "requested_at": self.requested_at}


@attrs.frozen(kw_only=True)
class RoomRecord:
    """What outlives a room actor.

    Attributes:
        room_id: The room.
        config: Its configuration.
        epoch: A random string made when the room's history started; a store
            that lost history (or ``last_seq``) must report a new epoch.
        last_seq: The ``seq`` of the newest sequenced event (0: none yet).
        members: Members by user id.
        bans: Banned users and the reason given.
        join_requests: Pending join requests by user id.
        history: The newest sequenced events (at most ``config.history_size``),
            oldest first. Message events hold the message's current state
            (edits and deletions are applied to them in place).
    """

    room_id: str
    config: RoomConfig
    epoch: str
    last_seq: int = 0
    members: Mapping[str, RoomMember] = attrs.field(factory=dict)
    bans: Mapping[str, str] = attrs.field(factory=dict)
    join_requests: Mapping[str, JoinRequest] = attrs.field(factory=dict)
    history: tuple[Event, ...] = ()


# -- operations ----------------------------------------------------------------


@attrs.frozen
class CreateRoom:
    """Create the room's record, or reset it: no members, bans, requests or history.

    Redis: ``DEL`` of the room's keys, then ``HSET`` of its meta hash.
    """

    config: RoomConfig
    epoch: str


@attrs.frozen
class SetConfig:
    """Replace the room's configuration. Redis: ``HSET meta config``."""

    config: RoomConfig


@attrs.frozen
class AddMember:
    """Add (or replace) a member. Redis: ``HSET members <user> <json>``."""

    member: RoomMember


@attrs.frozen
class RemoveMember:
    """Remove a member (a no-op if absent). Redis: ``HDEL members <user>``."""

    user_id: str


@attrs.frozen
class SetRole:
    """Change a member's role (a no-op if absent). Redis: ``HSET`` of the member."""

    user_id: str
    role: str


@attrs.frozen
class Ban:
    """Ban a user with a reason. Redis: ``HSET bans <user> <reason>``."""

    user_id: str
    reason: str = ""


@attrs.frozen
class Unban:
    """Lift a ban (a no-op if absent). Redis: ``HDEL bans <user>``."""

    user_id: str


@attrs.frozen
class AddJoinRequest:
    """Store a pending join request. Redis: ``HSET requests <user> <json>``."""

    request: JoinRequest


@attrs.frozen
class RemoveJoinRequest:
    """Drop a pending join request (a no-op if absent). Redis: ``HDEL requests <user>``."""

    user_id: str


@attrs.frozen
class AppendEvent:
    """Append a sequenced event, set ``last_seq`` to its ``seq``, keep the newest ``history_size``.

    Redis: ``RPUSH history <json>``, ``LTRIM history -<size> -1``,
    ``HSET meta last_seq <seq>``.
    """

    event: Event
    history_size: int


@attrs.frozen
class ReplaceMessage:
    """Replace the event of message ``message_id`` in the history (edit, delete).

    A no-op if the message is no longer kept. Redis: the history holds
    message ids and a ``messages`` hash their current form: ``HSET``
    (guarded by ``HEXISTS`` in a script).
    """

    message_id: str
    event: Event


@attrs.frozen
class DeleteRoom:
    """Delete the room's record entirely (a no-op if it has none).

    Later ops in the same batch need a :class:`CreateRoom` first. Redis:
    ``DEL`` of the room's keys.
    """


RoomOp = (
    CreateRoom
    | DeleteRoom
    | SetConfig
    | AddMember
    | RemoveMember
    | SetRole
    | Ban
    | Unban
    | AddJoinRequest
    | RemoveJoinRequest
    | AppendEvent
    | ReplaceMessage
)
"""One change to a room's record."""


class RoomStore(Protocol):
    """Where rooms keep the state that must outlive their actor.

    Every call is async (a store may do I/O) and changes come in batches: one
    :meth:`apply` per message a room handles.
    """

    async def load(self, room_id: str) -> RoomRecord | None:
        """The room's record, or ``None`` if the room has none.

        The record shares nothing mutable with the store. A store that lost
        part of the record's history (or its ``last_seq``) must return a new
        ``epoch`` with it, so clients resuming with an old position re-sync.
        """
        ...

    async def apply(self, room_id: str, ops: Sequence[RoomOp]) -> None:
        """Apply ``ops`` in order, atomically where the store can.

        Every op except :class:`CreateRoom` and :class:`DeleteRoom` needs
        the room's record to exist (:class:`LookupError` otherwise).
        """
        ...


@attrs.define
class _Mutable:
    room_id: str
    config: RoomConfig
    epoch: str
    last_seq: int = 0
    members: dict[str, RoomMember] = attrs.field(factory=dict)
    bans: dict[str, str] = attrs.field(factory=dict)
    join_requests: dict[str, JoinRequest] = attrs.field(factory=dict)
    history: list[Event] = attrs.field(factory=list)


def _copy_event(event: Event) -> Event:
    return attrs.evolve(event, data=dict(event.data))


class InMemoryRoomStore:
    """A :class:`RoomStore` in a dict: for tests and single-process servers.

    :meth:`load` copies, so nothing the store holds is shared with an actor.

    Attributes:
        applied: How many :meth:`apply` batches were applied (for tests).
    """

    def __init__(self) -> None:
        self._rooms: dict[str, _Mutable] = {}
        self.applied = 0

    async def load(self, room_id: str) -> RoomRecord | None:
        """See :meth:`RoomStore.load`."""
        room = self._rooms.get(room_id)
        if room is None:
            return None
        return RoomRecord(
            room_id=room.room_id,
            config=room.config,
            epoch=room.epoch,
            last_seq=room.last_seq,
            members=dict(room.members),
            bans=dict(room.bans),
            join_requests=dict(room.join_requests),
            history=tuple(_copy_event(event) for event in room.history),
        )

    async def apply(self, room_id: str, ops: Sequence[RoomOp]) -> None:
        """See :meth:`RoomStore.apply`."""
        self.applied += 1
        for op in ops:
            if isinstance(op, CreateRoom):
                self._rooms[room_id] = _Mutable(room_id=room_id, config=op.config, epoch=op.epoch)
                continue
            if isinstance(op, DeleteRoom):
                self._rooms.pop(room_id, None)
                continue
            room = self._rooms.get(room_id)
            if room is None:
                raise LookupError(f"room {room_id!r} has no record")
            _apply(room, op)

    def room_ids(self) -> list[str]:
        """The rooms that have a record, in creation order."""
        return list(self._rooms)

    def forget(self, room_id: str) -> None:
        """Drop a room's record entirely (tests: simulate lost state)."""
        self._rooms.pop(room_id, None)


def _apply(room: _Mutable, op: RoomOp) -> None:
    match op:
        case SetConfig(config):
            room.config = config
        case AddMember(member):
            room.members[member.user_id] = member
        case RemoveMember(user_id):
            room.members.pop(user_id, None)
        case SetRole(user_id, role):
            current = room.members.get(user_id)
            if current is not None:
                room.members[user_id] = attrs.evolve(current, role=role)
        case Ban(user_id, reason):
            room.bans[user_id] = reason
        case Unban(user_id):
            room.bans.pop(user_id, None)
        case AddJoinRequest(request):
            room.join_requests[request.user_id] = request
        case RemoveJoinRequest(user_id):
            room.join_requests.pop(user_id, None)
        case AppendEvent(event, history_size):
            if event.seq is None or event.seq <= room.last_seq:
                raise ValueError(f"room {room.room_id!r}: event seq {event.seq} does not follow {room.last_seq}")
            room.last_seq = event.seq
            room.history.append(_copy_event(event))
            if len(room.history) > history_size:
                del room.history[: len(room.history) - history_size]
        case ReplaceMessage(message_id, event):
            for index, old in enumerate(room.history):
                if old.type == MESSAGE and old.data.get("id") == message_id:
                    room.history[index] = _copy_event(event)
                    break
        case _:  # pragma: no cover (CreateRoom and DeleteRoom are handled by apply)
            raise TypeError(f"unknown room op {op!r}")
