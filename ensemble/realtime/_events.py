"""Events: what rooms, mailboxes and live queries deliver to connections.

An :class:`Event` is serialised at most once, lazily, however many
connections receive it: :attr:`Event.encoded` is one ``bytes`` object shared
by every recipient. A :class:`Subscriber` is anything that takes events
without blocking (a connection's outbox, or a test recorder).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import cached_property
from typing import Any, Protocol

import attrs

from .._json import dumps

# Event types (the ``type`` field on the wire).
MESSAGE = "message"
EDITED = "edited"
DELETED = "deleted"
MEMBER_JOINED = "member_joined"
MEMBER_LEFT = "member_left"
KICKED = "kicked"
BANNED = "banned"
UNBANNED = "unbanned"
ROLE_CHANGED = "role_changed"
TYPING = "typing"
SYSTEM = "system"
NOTIFICATION = "notification"
NOTIFICATION_READ = "notification_read"
CHANGE = "change"
PRESENCE = "presence"
ROOM_RESET = "room_reset"
ROOM_CLOSED = "room_closed"
JOIN_REQUEST = "join_request"
JOIN_DECISION = "join_decision"


@attrs.frozen
class Audience:
    """Who in a room may see an event: members with one of ``roles``, or
    one of ``users`` (either may be empty). ``None`` on an event means all.
    """

    roles: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    users: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)

    def admits(self, user_id: str | None, role: str | None) -> bool:
        """Whether a recipient with this user id and role sees the event."""
        return (role is not None and role in self.roles) or (user_id is not None and user_id in self.users)


@attrs.frozen(kw_only=True, slots=False)
class Event:
    """One event for delivery.

    Attributes:
        type: The event type, such as ``"message"``.
        topic: Its stream: ``room:<id>``, ``user:<id>`` or ``live:<id>``.
        data: JSON-ready payload.
        seq: Position in the topic's sequence (``None`` for ephemeral events
            such as typing and presence, which are never stored).
        epoch: The topic's epoch (changes when its history is lost).
        audience: Who may see it; ``None`` for everyone subscribed.
        coalesce_key: Events of the same topic with the same non-``None``
            key replace each other in a connection's queue (typing,
            presence): only the latest is delivered.
    """

    type: str
    topic: str
    data: Mapping[str, Any] = attrs.field(factory=dict)
    seq: int | None = None
    epoch: str | None = None
    audience: Audience | None = None
    coalesce_key: Hashable | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object sent to clients."""
        wire: dict[str, Any] = {"type": self.type, "topic": self.topic}
        if self.seq is not None:
            wire["seq"] = self.seq
            wire["epoch"] = self.epoch
        wire["data"] = self.data
        return wire

    @cached_property
    def encoded(self) -> bytes:
        """The event as compact JSON, computed once and shared."""
        return dumps(self.to_wire(), default=_default)


def raw_event(topic: str, frame: bytes) -> Event:
    """An event whose wire bytes are ``frame`` as given (a protocol reply).

    Not sequenced, never coalesced: it takes its place in a connection's
    outbox like any event, so replies and events reach the client in the
    order they were queued.
    """
    event = Event(type="raw", topic=topic)
    event.__dict__["encoded"] = bytes(frame)  # the cached_property's slot
    return event


def _default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Subscriber(Protocol):
    """Something that receives events without blocking (a connection)."""

    @property
    def connection_id(self) -> str: ...

    @property
    def user_id(self) -> str | None: ...

    def deliver_nowait(self, event: Event) -> bool:
        """Queue ``event``; return ``False`` if it was refused (closed, slow)."""
        ...


class EventBatch:
    """Plain events handed to many outboxes at once (:meth:`Outbox.deliver_batch_nowait`).

    What every recipient needs is computed once: each event's encoded size
    (encoding it, once for all) and the last sequenced event of each topic.

    Args:
        events: Events without a coalescing key, in order.
    """

    __slots__ = ("events", "size", "tail")

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.size = sum([len(event.encoded) for event in events])
        tail: dict[str, Event] = {}
        for event in events:
            if event.seq is not None:
                tail[event.topic] = event
        self.tail = tail
