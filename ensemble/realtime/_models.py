"""Records of the realtime API: configuration and the seed's dataclasses.

All are ``@attrs.frozen``: a ``RoomMember`` or ``RoomMessage`` handed to a
caller is a snapshot and never changes under it. ``to_dict()`` gives the
JSON-ready form (attrs is not the wire format; this is).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

import attrs

ROLES: Final = ("member", "moderator", "admin")
MESSAGE_TYPES: Final = frozenset({"text", "image", "file", "system"})
NOTIFICATION_TYPES: Final = frozenset({"info", "warning", "error", "success"})
JOIN_POLICIES: Final = ("open", "approval")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


def _role(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ROLES:
        raise ValueError(f"{attribute.name} must be one of {', '.join(ROLES)}; got {value!r}")


@attrs.frozen(kw_only=True)
class RoomConfig:
    """Configuration of one room (the seed's fields and defaults, plus more).

    Args:
        max_members: Most members at once; ``join`` beyond raises ``RoomFull``.
        history_size: Most events kept for ``get_history`` and resume.
        require_auth: Whether anonymous users (``user_id`` of ``None`` or
            ``""``) are refused.
        allowed_message_types: Valid ``message_type`` values.
        rate_limit: Messages per minute per user (0 disables the limit).
        max_message_length: Most bytes of UTF-8 ``content`` per message.
        join_policy: ``"open"``, or ``"approval"`` for private rooms (join
            requests approved by moderators).
        typing_timeout: Seconds until a typing indicator expires.
        idle_timeout: Seconds without members or messages after which the
            room actor stops (its state stays in the store).
    """

    max_members: int = attrs.field(default=100, validator=_positive)
    history_size: int = attrs.field(default=100, validator=_non_negative)
    require_auth: bool = True
    allowed_message_types: frozenset[str] = attrs.field(default=MESSAGE_TYPES, converter=frozenset)
    rate_limit: int = attrs.field(default=30, validator=_non_negative)
    max_message_length: int = attrs.field(default=65536, validator=_positive)
    join_policy: str = attrs.field(default="open", validator=attrs.validators.in_(JOIN_POLICIES))
    typing_timeout: float = attrs.field(default=5.0, validator=_positive)
    idle_timeout: float = attrs.field(default=300.0, validator=_positive)


@attrs.frozen(kw_only=True)
class RoomMember:
    """A member of a room (the seed's fields; no socket: see connections).

    Attributes:
        user_id: The user.
        display_name: The name shown in the room.
        role: ``member``, ``moderator`` or ``admin``.
        joined_at: Unix time of the join.
    """

    user_id: str
    display_name: str
    role: str = attrs.field(default="member", validator=_role)
    joined_at: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return {"user_id": self.user_id, "display_name": self.display_name, "role": self.role, "joined_at": self.joined_at}


@attrs.frozen(kw_only=True)
class RoomMessage:
    """A message in a room (the seed's fields, plus its position).

    Attributes:
        id: Unique message id.
        room_id: The room.
        user_id: The sender.
        display_name: The sender's display name when it was sent.
        content: The text (or file name, URL, ...).
        message_type: One of the room's ``allowed_message_types``.
        timestamp: Unix time it was sent.
        edited: Whether it was edited since.
        deleted: Whether it was deleted (content is then empty).
        seq: Its position in the room's event sequence.
        epoch: The room's epoch when it was sent.
    """

    id: str
    room_id: str
    user_id: str
    display_name: str
    content: str
    message_type: str = "text"
    timestamp: float = 0.0
    edited: bool = False
    deleted: bool = False
    seq: int = 0
    epoch: str = ""

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Notification:
    """A notification for one user (the seed's fields, plus its position).

    Attributes:
        id: Unique notification id.
        user_id: The recipient.
        title: Short title.
        body: Text.
        notification_type: ``info``, ``warning``, ``error`` or ``success``.
        data: Optional JSON-ready payload.
        read: Whether it has been read (on any of the user's devices).
        created_at: Unix time it was sent.
        seq: Its position in the user's notification sequence.
        epoch: The user's notification epoch.
    """

    id: str
    user_id: str
    title: str
    body: str
    notification_type: str = "info"
    data: Mapping[str, object] | None = None
    read: bool = False
    created_at: float = 0.0
    seq: int = 0
    epoch: str = ""

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        result = attrs.asdict(self)
        result["data"] = None if self.data is None else dict(self.data)
        return result


@attrs.frozen(kw_only=True)
class ModelChange:
    """A change to a watched model (the seed's fields, plus enter/leave).

    Attributes:
        model_name: The model.
        action: ``create``, ``update``, ``delete``, or, for a watcher with
            filters, ``enter`` (an update moved the row into its filter) and
            ``leave`` (an update moved it out).
        pk: Primary key of the row.
        data: The row's fields (create, update, enter, leave).
        changed_fields: The fields that changed (update, enter, leave).
        timestamp: Unix time of the change.
    """

    model_name: str
    action: str
    pk: int | str
    data: Mapping[str, object] | None = None
    changed_fields: tuple[str, ...] | None = None
    timestamp: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return {
            "model_name": self.model_name,
            "action": self.action,
            "pk": self.pk,
            "data": None if self.data is None else dict(self.data),
            "changed_fields": None if self.changed_fields is None else list(self.changed_fields),
            "timestamp": self.timestamp,
        }


@attrs.frozen(kw_only=True)
class ConnectionInfo:
    """A snapshot of one live connection (the seed's fields, less the socket).

    Attributes:
        connection_id: Unique connection id.
        user_id: The authenticated user, or ``None`` when anonymous.
        connected_at: Unix time of the connect.
        rooms: The rooms this connection receives events of.
        metadata: Custom metadata given at connect.
    """

    connection_id: str
    user_id: str | None
    connected_at: float
    rooms: frozenset[str] = frozenset()
    metadata: Mapping[str, object] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return {
            "connection_id": self.connection_id,
            "user_id": self.user_id,
            "connected_at": self.connected_at,
            "rooms": sorted(self.rooms),
            "metadata": dict(self.metadata),
        }


INFINITY: Final = math.inf


@attrs.frozen(kw_only=True)
class Resumption:
    """Where a connection's subscription to one stream starts, and whether it resumed.

    A client that kept the position ``(epoch, seq)`` of the last event it
    processed passes it as ``since`` when it subscribes again
    (``hub.join_room(..., since=...)``, ``hub.connect(...,
    notifications_since=...)``); the events after it are then put in its
    outbox before any live one, in the same step, so that nothing is missed
    or repeated. When that is not possible (another epoch: the history was
    lost; events evicted; a position in the future) the connection is
    subscribed all the same, from now, with ``recovered=False``: the client
    must reload the stream's state instead of assuming it saw everything.

    Attributes:
        topic: The stream: ``room:<id>`` or ``user:<id>``.
        epoch: The stream's epoch now.
        last_seq: The position at subscription: every event after it is
            delivered to the connection (after the replayed ones).
        recovered: Whether a ``since`` was given and every event after it
            (that the user may see) was delivered before the live ones.
            ``False`` without ``since``.
        replayed: How many events were replayed.
    """

    topic: str
    epoch: str
    last_seq: int
    recovered: bool = False
    replayed: int = 0

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class RoomJoin:
    """What ``hub.join_room`` returns: the member, and the connection's subscription.

    Attributes:
        room_id: The room.
        member: The connection's user as a member of the room (joined now,
            or a member already).
        resumption: Where the connection's subscription starts and whether
            it resumed from the ``since`` given.
    """

    room_id: str
    member: RoomMember
    resumption: Resumption

    @property
    def recovered(self) -> bool:
        """Whether the events after ``since`` were all replayed (see :class:`Resumption`)."""
        return self.resumption.recovered

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        return {"room_id": self.room_id, "member": self.member.to_dict(), **self.resumption.to_dict()}


@attrs.frozen(kw_only=True)
class Connected(ConnectionInfo):
    """What ``hub.connect`` returns: the new connection's :class:`ConnectionInfo`, and more.

    Attributes:
        notifications: Where the connection's stream of its user's
            notifications starts (and whether it resumed from
            ``notifications_since``); ``None`` for an anonymous connection.
    """

    notifications: Resumption | None = None

    def to_dict(self) -> dict[str, object]:
        """The JSON-ready form."""
        result = super().to_dict()
        result["notifications"] = None if self.notifications is None else self.notifications.to_dict()
        return result
