"""The client commands of the Ensemble wire protocol, one frozen class each.

A command is what :func:`ensemble.protocol.decode` makes of one client frame
(``{"type": "<name>", "ref": ..., ...fields}``). Every command carries the
client's ``ref`` (``None`` when the frame had none): the server answers a
command with a ``ref`` with a ``reply`` or an ``error`` frame carrying it.

These are plain data: validated (types, lengths, ids) by the decoder, with no
behaviour. What each one does is the server's business (see
``ensemble.server.ProtocolHandler`` and ``docs/protocol.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, TypeAlias

import attrs

Ref: TypeAlias = str | int | None
"""A command's correlation id, echoed in its reply or error."""

Scalar: TypeAlias = str | int | float | bool | None
"""A filter value of ``watch``: JSON scalars only."""


@attrs.frozen(kw_only=True)
class Position:
    """A resume position in a stream: the last event the client processed.

    Attributes:
        epoch: The stream's epoch when that event was sent.
        seq: That event's ``seq`` (``0``: nothing processed yet).
    """

    epoch: str
    seq: int

    def as_tuple(self) -> tuple[str, int]:
        """``(epoch, seq)``, as the hub's ``since=`` arguments take it."""
        return (self.epoch, self.seq)


@attrs.frozen(kw_only=True)
class Auth:
    """Present a token: first authentication, or an in-band refresh.

    Also what a bare ``{"token": "..."}`` frame (the seeds' form) decodes to.

    Attributes:
        token: The credential (a JWT, say).
        since: The ``(epoch, seq)`` of the last notification this device
            processed (first authentication only): what came after it is
            replayed.
    """

    type: ClassVar[str] = "auth"
    ref: Ref = None
    token: str
    since: Position | None = None


@attrs.frozen(kw_only=True)
class Ping:
    """Ask for a ``pong`` (an application-level heartbeat)."""

    type: ClassVar[str] = "ping"
    ref: Ref = None


@attrs.frozen(kw_only=True)
class Pong:
    """Answer a server's ``{"type":"ping"}`` heartbeat (no reply; any frame counts as an answer)."""

    type: ClassVar[str] = "pong"
    ref: Ref = None


@attrs.frozen(kw_only=True)
class Options:
    """Negotiate per-connection options.

    Attributes:
        batch: Receive several events per frame, newline-separated.
            ``None`` leaves the option as it is.
    """

    type: ClassVar[str] = "options"
    ref: Ref = None
    batch: bool | None = None


@attrs.frozen(kw_only=True)
class Join:
    """Join a room (or subscribe this connection, for a member already).

    Attributes:
        room: The room id.
        display_name: A new member's name (default: the user id).
        since: The position of the last room event the client processed:
            the events after it are replayed before the live ones.
    """

    type: ClassVar[str] = "join"
    ref: Ref = None
    room: str
    display_name: str | None = None
    since: Position | None = None


@attrs.frozen(kw_only=True)
class Leave:
    """Stop receiving a room's events on this connection.

    Attributes:
        room: The room id.
        membership: Also end the user's membership (every device).
    """

    type: ClassVar[str] = "leave"
    ref: Ref = None
    room: str
    membership: bool = False


@attrs.frozen(kw_only=True)
class Send:
    """Send a message to a room."""

    type: ClassVar[str] = "send"
    ref: Ref = None
    room: str
    content: str
    message_type: str = "text"


@attrs.frozen(kw_only=True)
class Edit:
    """Replace the content of one's own message."""

    type: ClassVar[str] = "edit"
    ref: Ref = None
    room: str
    message_id: str
    content: str


@attrs.frozen(kw_only=True)
class Delete:
    """Delete a message (one's own, or any with ``delete_any``)."""

    type: ClassVar[str] = "delete"
    ref: Ref = None
    room: str
    message_id: str


@attrs.frozen(kw_only=True)
class Typing:
    """Start (``typing: true``) or stop one's typing indicator."""

    type: ClassVar[str] = "typing"
    ref: Ref = None
    room: str
    typing: bool = True


@attrs.frozen(kw_only=True)
class History:
    """Read a room's recent messages (oldest first)."""

    type: ClassVar[str] = "history"
    ref: Ref = None
    room: str
    limit: int = 50
    since: Position | None = None


@attrs.frozen(kw_only=True)
class Members:
    """List a room's members."""

    type: ClassVar[str] = "members"
    ref: Ref = None
    room: str


@attrs.frozen(kw_only=True)
class Kick:
    """Remove a member (who may join again)."""

    type: ClassVar[str] = "kick"
    ref: Ref = None
    room: str
    user: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class Ban:
    """Ban a user from a room."""

    type: ClassVar[str] = "ban"
    ref: Ref = None
    room: str
    user: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class Unban:
    """Lift a ban."""

    type: ClassVar[str] = "unban"
    ref: Ref = None
    room: str
    user: str


@attrs.frozen(kw_only=True)
class SetRole:
    """Change a member's role (``member``, ``moderator`` or ``admin``)."""

    type: ClassVar[str] = "set_role"
    ref: Ref = None
    room: str
    user: str
    role: str


@attrs.frozen(kw_only=True)
class RequestJoin:
    """Ask to join a room that admits members by approval."""

    type: ClassVar[str] = "request_join"
    ref: Ref = None
    room: str
    display_name: str | None = None


@attrs.frozen(kw_only=True)
class Approve:
    """Admit a pending join request."""

    type: ClassVar[str] = "approve"
    ref: Ref = None
    room: str
    user: str


@attrs.frozen(kw_only=True)
class Deny:
    """Refuse a pending join request."""

    type: ClassVar[str] = "deny"
    ref: Ref = None
    room: str
    user: str
    reason: str = ""


@attrs.frozen(kw_only=True)
class JoinRequests:
    """List a room's pending join requests (moderators and admins)."""

    type: ClassVar[str] = "join_requests"
    ref: Ref = None
    room: str


@attrs.frozen(kw_only=True)
class Notifications:
    """List one's notifications, newest last."""

    type: ClassVar[str] = "notifications"
    ref: Ref = None
    unread_only: bool = False
    limit: int = 50


@attrs.frozen(kw_only=True)
class Unread:
    """Count one's unread notifications."""

    type: ClassVar[str] = "unread"
    ref: Ref = None


@attrs.frozen(kw_only=True)
class MarkRead:
    """Mark one notification read (on every device)."""

    type: ClassVar[str] = "mark_read"
    ref: Ref = None
    id: str


@attrs.frozen(kw_only=True)
class MarkAllRead:
    """Mark every notification read."""

    type: ClassVar[str] = "mark_all_read"
    ref: Ref = None


@attrs.frozen(kw_only=True)
class Clear:
    """Delete every notification."""

    type: ClassVar[str] = "clear"
    ref: Ref = None


@attrs.frozen(kw_only=True)
class Watch:
    """Watch a model's changes (a live query).

    Attributes:
        model: The model's name.
        filters: Equality filters on the row's fields (JSON scalars).
        since: A version of the model: first deliver every change after it.
        epoch: The live-query epoch ``since`` belongs to.
    """

    type: ClassVar[str] = "watch"
    ref: Ref = None
    model: str
    filters: Mapping[str, Scalar] = attrs.field(factory=dict)
    since: int | None = None
    epoch: str | None = None


@attrs.frozen(kw_only=True)
class Unwatch:
    """End one of this connection's watches."""

    type: ClassVar[str] = "unwatch"
    ref: Ref = None
    id: str


Command: TypeAlias = (
    Auth
    | Ping
    | Pong
    | Options
    | Join
    | Leave
    | Send
    | Edit
    | Delete
    | Typing
    | History
    | Members
    | Kick
    | Ban
    | Unban
    | SetRole
    | RequestJoin
    | Approve
    | Deny
    | JoinRequests
    | Notifications
    | Unread
    | MarkRead
    | MarkAllRead
    | Clear
    | Watch
    | Unwatch
)
"""Any client command."""
