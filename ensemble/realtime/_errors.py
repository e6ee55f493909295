"""Exception types of the realtime actors.

Each is a subclass of the exception the seed API raises in the same case
(``PermissionError``, ``ValueError``, ``ConnectionError``, ``LookupError``),
so code written against the seed keeps working while new code can catch the
finer type.
"""

from __future__ import annotations


class RealtimeError(Exception):
    """Mixin base of every realtime error, for ``except RealtimeError``."""


class Banned(RealtimeError, PermissionError):
    """The user is banned from the room."""


class RoomFull(RealtimeError, PermissionError):
    """The room has ``max_members`` members already."""


class NotAMember(RealtimeError, PermissionError):
    """The user is not a member of the room."""


class NotAllowed(RealtimeError, PermissionError):
    """The user's role does not permit the action (kick, ban, edit, ...)."""


class RateLimited(RealtimeError, PermissionError):
    """The user (or connection) sent too many messages.

    Attributes:
        retry_after: Seconds until a message would be accepted again.
    """

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApprovalRequired(RealtimeError, PermissionError):
    """The room's ``join_policy`` is ``approval``: use ``request_join``."""


class InvalidMessage(RealtimeError, ValueError):
    """The content is too long, or the message type is not allowed."""


class NotFound(RealtimeError, LookupError):
    """No such message, notification, subscription or connection."""


class HistoryUnavailable(RealtimeError, LookupError):
    """The events after the requested position are no longer kept.

    Raised by ``get_history(since=...)`` when the position is older than the
    history window, from another epoch, or in the future: the caller must
    re-sync from scratch instead of silently missing events.

    Attributes:
        epoch: The room's current epoch.
        first_seq: The oldest ``seq`` still available (``None`` if empty).
        last_seq: The newest ``seq`` issued.
    """

    def __init__(self, message: str, *, epoch: str, first_seq: int | None, last_seq: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.first_seq = first_seq
        self.last_seq = last_seq


class TooManyConnections(RealtimeError, ConnectionError):
    """``max_connections`` (global or per user) is reached."""
