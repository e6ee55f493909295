"""Where user mailboxes keep their notifications: a store protocol and an in-memory store.

A user mailbox actor (see ``_notifications.py``) holds a working copy of its
user's :class:`UserRecord` and writes every change through to a
:class:`NotificationStore` as a batch of *ops* before it delivers anything.
When the actor stops idle or crashes, the next incarnation loads the record
and carries on: the sequence numbers continue, read state is kept.

Ops are plain frozen records, applied in order by :func:`apply_ops`, which is
the one definition of what an op means (the in-memory store and any other
store that keeps records as values use it; a database store translates ops
to statements). Ops on a user without a record, other than
:class:`CreateUser`, do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

import attrs

from ._models import Notification

DEFAULT_MAX_PER_USER = 1000


@attrs.frozen(kw_only=True)
class UserRecord:
    """Everything stored about one user's notifications.

    Attributes:
        user_id: The user.
        epoch: The user's notification epoch: positions ``(epoch, seq)`` from
            another epoch cannot be resumed from.
        notifications: Kept notifications, oldest first (ascending ``seq``);
            each carries its read flag.
        last_seq: The newest ``seq`` issued (0 before the first); never
            decreases, not even when notifications are cleared.
        evicted_through: The newest ``seq`` dropped by the ``max_per_user``
            bound (0 if none): positions before it cannot be resumed from.
    """

    user_id: str
    epoch: str
    notifications: tuple[Notification, ...] = ()
    last_seq: int = 0
    evicted_through: int = 0

    @property
    def unread_count(self) -> int:
        """How many kept notifications are unread."""
        return sum(1 for n in self.notifications if not n.read)


@attrs.frozen
class CreateUser:
    """Create the user's record with this epoch, unless it exists."""

    epoch: str


@attrs.frozen
class Append:
    """Add a notification (its ``seq`` becomes ``last_seq``), then evict the
    oldest while more than ``max_per_user`` are kept."""

    notification: Notification
    max_per_user: int = DEFAULT_MAX_PER_USER


@attrs.frozen
class MarkRead:
    """Mark these notifications read (unknown ids are ignored)."""

    notification_ids: tuple[str, ...]


@attrs.frozen
class MarkAllRead:
    """Mark every kept notification read."""


@attrs.frozen
class Clear:
    """Remove every kept notification (``last_seq`` is kept)."""


Op: TypeAlias = CreateUser | Append | MarkRead | MarkAllRead | Clear


def apply_ops(record: UserRecord | None, user_id: str, ops: Sequence[Op]) -> UserRecord | None:
    """Apply ``ops`` in order to ``record`` (``None``: no record yet).

    Args:
        record: The current record, or ``None``.
        user_id: The user (for a record made by :class:`CreateUser`).
        ops: The batch.

    Returns:
        The new record (``None`` if there still is none).

    Raises:
        TypeError: An op of an unknown type.
    """
    for op in ops:
        if isinstance(op, CreateUser):
            if record is None:
                record = UserRecord(user_id=user_id, epoch=op.epoch)
            continue
        if record is None:
            continue
        if isinstance(op, Append):
            kept = (*record.notifications, op.notification)
            evicted_through = record.evicted_through
            excess = len(kept) - max(op.max_per_user, 0)
            if excess > 0:
                evicted_through = max(evicted_through, kept[excess - 1].seq)
                kept = kept[excess:]
            record = attrs.evolve(
                record,
                notifications=kept,
                last_seq=max(record.last_seq, op.notification.seq),
                evicted_through=evicted_through,
            )
        elif isinstance(op, MarkRead):
            ids = set(op.notification_ids)
            record = attrs.evolve(
                record,
                notifications=tuple(attrs.evolve(n, read=True) if n.id in ids and not n.read else n for n in record.notifications),
            )
        elif isinstance(op, MarkAllRead):
            record = attrs.evolve(
                record,
                notifications=tuple(n if n.read else attrs.evolve(n, read=True) for n in record.notifications),
            )
        elif isinstance(op, Clear):
            record = attrs.evolve(record, notifications=())
        else:
            raise TypeError(f"unknown notification store op {op!r}")
    return record


class NotificationStore(Protocol):
    """Persistent notification records, one per user.

    Implementations must make :meth:`apply` atomic per call (all of a batch
    or none of it) and must not hand out objects they later mutate.
    """

    async def load(self, user_id: str) -> UserRecord | None:
        """The user's record, or ``None`` if the user has none."""
        ...

    async def apply(self, user_id: str, ops: Sequence[Op]) -> None:
        """Apply a batch of ops to the user's record, in order, atomically."""
        ...


class InMemoryNotificationStore:
    """A :class:`NotificationStore` in a dict (records are immutable values).

    Attributes:
        loads: How many times :meth:`load` was called (for tests).
        applies: How many batches :meth:`apply` applied (for tests).
    """

    def __init__(self) -> None:
        self._records: dict[str, UserRecord] = {}
        self.loads = 0
        self.applies = 0

    async def load(self, user_id: str) -> UserRecord | None:
        """The user's record, or ``None``.

        The record is an immutable value, so handing it out is a copy: later
        changes never show through it.
        """
        self.loads += 1
        return self._records.get(user_id)

    async def apply(self, user_id: str, ops: Sequence[Op]) -> None:
        """Apply ``ops`` to the user's record, in order, atomically."""
        record = apply_ops(self._records.get(user_id), user_id, ops)
        if record is not None:
            self._records[user_id] = record
        self.applies += 1

    def users(self) -> list[str]:
        """The users with a record, in creation order."""
        return list(self._records)
