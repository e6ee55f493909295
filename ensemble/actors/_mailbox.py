"""Bounded mailboxes with per-actor and per-message-class overflow policies.

A mailbox belongs to an actor's *cell*, not to the actor instance, so it
survives restarts: messages queued before a crash are delivered to the next
incarnation.

The queue holds plain messages for ``tell`` and an :class:`_Envelope` for
anything that needs more (an ``ask``'s reply slot, a ``keep_latest`` key).
Keeping plain messages bare keeps the fan-out path to one ``deque.append``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Final

import attrs
import trio

from ._errors import ActorStopped, MailboxFull, MessageDropped

logger = logging.getLogger("ensemble.actors")

DEFAULT_MAILBOX_SIZE: Final = 1000  # messages
DEFAULT_BLOCK_TIMEOUT: Final = 5.0  # seconds


class Overflow(enum.Enum):
    """What happens when a message arrives at a full mailbox.

    Attributes:
        BLOCK: ``tell`` and ``ask`` wait for room (up to the mailbox's
            ``block_timeout``, then :class:`MailboxFull`); ``tell_nowait``
            raises :class:`MailboxFull` at once.
        FAIL: The sender gets :class:`MailboxFull` at once.
        DROP_NEWEST: The new message is dropped and counted (an ``ask`` gets
            :class:`MailboxFull`, since it could never be answered).
        DROP_OLDEST: The oldest queued message is evicted and counted to make
            room (its asker, if any, gets :class:`MessageDropped`).
        KEEP_LATEST: Messages are coalesced by key: a new message replaces a
            queued one with the same key in place (it keeps the older one's
            place in the queue). A message with a new key is queued if there
            is room and dropped (counted as ``dropped_newest``) if not.
    """

    BLOCK = "block"
    FAIL = "fail"
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"
    KEEP_LATEST = "keep_latest"


def default_coalesce_key(message: Any) -> Hashable:
    """The ``keep_latest`` key of a message: its ``coalesce_key`` attribute.

    Messages without that attribute coalesce by type alone (combined with the
    type in every case, so two message classes never share a key).

    Args:
        message: The message being queued.

    Returns:
        The message's ``coalesce_key`` attribute, or ``None``.
    """
    key: Hashable = getattr(message, "coalesce_key", None)
    return key


class Waker:
    """Stands in for the receiving task of a hibernating actor's mailbox.

    A message (or a stop) for an actor whose task has ended calls
    :meth:`resume` instead of rescheduling a task: the supervisor's subclass
    then starts a task for the actor again (see ``ChildSpec.hibernate_after``).
    """

    __slots__ = ()

    def resume(self) -> None:
        raise NotImplementedError


def wake_receiver(receiver: trio.lowlevel.Task | Waker) -> None:
    """Wake what waits for a mailbox: its loop's task, or a hibernating actor."""
    if isinstance(receiver, Waker):
        receiver.resume()
    else:
        trio.lowlevel.reschedule(receiver)


_NO_QUEUE: Final[Any] = ()  # the queue of a hibernating actor's mailbox (see release_queue)
_POLICY_TABLES: dict[MailboxConfig, tuple[dict[type, Overflow], dict[type, Overflow]]] = {}
_MAX_SHARED_TABLES: Final = 256


def _policy_tables(config: MailboxConfig) -> tuple[dict[type, Overflow], dict[type, Overflow]]:
    """The per-type policies of ``config`` and a cache of lookups, shared by
    every mailbox of an equal config (up to a bound of distinct configs)."""
    tables = _POLICY_TABLES.get(config)
    if tables is None:
        tables = (dict(config.per_type), {})
        if len(_POLICY_TABLES) < _MAX_SHARED_TABLES:
            _POLICY_TABLES[config] = tables
    return tables


def _to_overflow(value: Overflow | str) -> Overflow:
    return value if isinstance(value, Overflow) else Overflow(value)


def _to_overrides(
    value: Mapping[Any, Overflow | str] | Iterable[tuple[Any, Overflow | str]],
) -> tuple[tuple[type, Overflow], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((cls, _to_overflow(policy)) for cls, policy in items)


def _positive_int(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _timeout_ok(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not value >= 0:
        raise ValueError(f"{attribute.name} must be >= 0 or None, got {value}")


@attrs.frozen(kw_only=True)
class MailboxConfig:
    """How an actor's mailbox is bounded and what happens when it is full.

    Args:
        size: The most messages the mailbox holds.
        overflow: The default policy (an :class:`Overflow` or its value, such
            as ``"drop_oldest"``).
        block_timeout: How long a ``block`` sender waits for room before
            :class:`MailboxFull`; ``None`` waits as long as the caller's cancel
            scopes allow.
        per_type: Policies for particular message classes, as a mapping from
            class to policy; a message uses the policy of the first class in
            its MRO that is listed here, else ``overflow``.
        coalesce_key: Gives the ``keep_latest`` key of a message (combined
            with the message's type).
    """

    size: int = attrs.field(default=DEFAULT_MAILBOX_SIZE, validator=_positive_int)
    overflow: Overflow = attrs.field(default=Overflow.BLOCK, converter=_to_overflow)
    block_timeout: float | None = attrs.field(default=DEFAULT_BLOCK_TIMEOUT, validator=_timeout_ok)
    per_type: tuple[tuple[type, Overflow], ...] = attrs.field(default=(), converter=_to_overrides)
    coalesce_key: Callable[[Any], Hashable] = default_coalesce_key


class _Reply:
    """A one-shot reply slot: the first ``set``/``fail`` wins."""

    __slots__ = ("_error", "_event", "_value", "done")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.done = False

    def set(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._error = error
            self._event.set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _CallbackReply(_Reply):
    """A reply slot that calls ``callback(value, error)`` instead of waking a
    waiter (:meth:`ActorRef.ask_later`). The callback runs wherever the reply
    is given (the actor's task, or whoever closed the mailbox), so it must
    not block; an exception from it is logged, never raised."""

    __slots__ = ("_callback",)

    def __init__(self, callback: Callable[[Any, BaseException | None], None]) -> None:
        self._callback = callback
        self._value = None
        self._error = None
        self.done = False

    def set(self, value: Any) -> None:
        if not self.done:
            self.done = True
            self._call(value, None)

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._call(None, error)

    def _call(self, value: Any, error: BaseException | None) -> None:
        try:
            self._callback(value, error)
        except Exception:
            logger.exception("a reply callback failed")

    async def wait(self) -> Any:
        raise RuntimeError("a callback reply is not awaited")


class _Envelope:
    """A queued message that carries a reply slot or a coalescing key."""

    __slots__ = ("key", "message", "reply")

    def __init__(self, message: Any, reply: _Reply | None, key: Hashable | None) -> None:
        self.message = message
        self.reply = reply
        self.key = key


class _Full(Exception):
    """Internal: the mailbox is full and the policy is ``block``."""


class Mailbox:
    """A bounded FIFO with overflow policies, owned by one actor cell.

    Only the actor's own loop takes messages out; any task may put them in.
    Everything here runs in one Trio thread, so no locks are needed.
    """

    __slots__ = (
        "_blocked",
        "_cache",
        "_default",
        "_has_per_type",
        "_key_fn",
        "_per_type",
        "_plain",
        "_plain_when_open",
        "_queue",
        "_receiver",
        "_slots",
        "_space",
        "block_timeout",
        "block_timeouts",
        "capacity",
        "closed",
        "coalesced",
        "config",
        "dropped_newest",
        "dropped_oldest",
        "dropped_on_stop",
        "path",
        "peak",
        "refused",
    )

    def __init__(self, config: MailboxConfig, path: str) -> None:
        self.path = path
        self.config = config
        self.capacity = config.size
        self.block_timeout = config.block_timeout
        self._default = config.overflow
        # Shared by the mailboxes of one config (there may be one per
        # connection): the per-type policies and their lookup cache.
        self._per_type, self._cache = _policy_tables(config)
        self._has_per_type = bool(self._per_type)
        self._key_fn = config.coalesce_key
        self._queue: deque[Any] = deque()
        self._slots: dict[Hashable, _Envelope] = {}
        # The loop's task while it waits for a message; a Waker while the
        # actor hibernates; None while it runs.
        self._receiver: trio.lowlevel.Task | Waker | None = None
        self._space: trio.lowlevel.ParkingLot | None = None  # made when a sender first blocks
        self._blocked = 0  # senders parked in _space (an upper bound)
        # ActorRef.tell_nowait's fast path applies: open, one policy for all.
        self._plain = self._plain_when_open = not self._has_per_type and self._default is not Overflow.KEEP_LATEST
        self.closed = False
        self.peak = 0
        self.dropped_newest = 0
        self.dropped_oldest = 0
        self.coalesced = 0
        self.refused = 0
        self.block_timeouts = 0
        self.dropped_on_stop = 0

    def __len__(self) -> int:
        return len(self._queue)

    def release_queue(self) -> None:
        """Give up the (empty) queue while the actor hibernates: an empty deque
        still holds a 64-slot block. Puts take the slow path meanwhile, which
        makes a new one (as does :meth:`restore_queue`)."""
        if not self._queue:
            self._queue = _NO_QUEUE
            self._plain = False

    def restore_queue(self) -> None:
        """Have a queue again (after :meth:`release_queue`)."""
        if self._queue is _NO_QUEUE:
            self._queue = deque()
            self._plain = self._plain_when_open and not self.closed

    @property
    def blocked_senders(self) -> int:
        return 0 if self._space is None else len(self._space)

    def unpark_one(self) -> None:
        """Let one blocked sender retry (a message was taken out)."""
        if self._space is not None:
            self._space.unpark()

    def policy_for(self, message: Any) -> Overflow:
        """The overflow policy that applies to ``message``."""
        if not self._has_per_type:
            return self._default
        cls = type(message)
        policy = self._cache.get(cls)
        if policy is None:
            policy = self._default
            for base in cls.__mro__:
                if base in self._per_type:
                    policy = self._per_type[base]
                    break
            self._cache[cls] = policy
        return policy

    # -- putting messages in -------------------------------------------------

    def put_nowait(self, message: Any, reply: _Reply | None = None) -> None:
        """Queue ``message`` or apply the overflow policy, never waiting.

        Raises:
            ActorStopped: The actor has stopped for good.
            MailboxFull: The policy refused the message.
            _Full: Internal; the policy is ``block`` and the mailbox is full.
        """
        if self.closed:
            raise ActorStopped(self.path, f"actor {self.path} has stopped")
        policy = self.policy_for(message) if self._has_per_type else self._default
        if self._queue is _NO_QUEUE:
            self.restore_queue()
        if policy is Overflow.KEEP_LATEST:
            self._put_keep_latest(message, reply)
            return
        queue = self._queue
        if len(queue) >= self.capacity:
            if policy is Overflow.DROP_OLDEST:
                self._evict_oldest()
            elif policy is Overflow.DROP_NEWEST:
                self.dropped_newest += 1
                if reply is not None:
                    raise MailboxFull(self.path, self._full_detail("dropped the ask (drop_newest)"))
                return
            elif policy is Overflow.FAIL:
                self.refused += 1
                raise MailboxFull(self.path, self._full_detail("refused the message (fail)"))
            else:
                raise _Full
        self._append(message if reply is None else _Envelope(message, reply, None))

    def _append(self, item: Any) -> None:
        """Queue ``item`` (room was checked), track the peak, wake the loop.

        ``ActorRef.tell_nowait`` inlines this for its fast path.
        """
        queue = self._queue
        queue.append(item)
        depth = len(queue)
        if depth > self.peak:
            self.peak = depth
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            wake_receiver(receiver)

    def _put_keep_latest(self, message: Any, reply: _Reply | None) -> None:
        key = (type(message), self._key_fn(message))
        existing = self._slots.get(key)
        if existing is not None:
            replaced = existing.reply
            existing.message = message
            existing.reply = reply
            self.coalesced += 1
            if replaced is not None:
                replaced.fail(
                    MessageDropped(self.path, f"a newer message with the same key replaced this ask in {self.path} (keep_latest)")
                )
            return
        queue = self._queue
        if len(queue) >= self.capacity:
            self.dropped_newest += 1
            if reply is not None:
                raise MailboxFull(self.path, self._full_detail("dropped the ask (keep_latest, new key)"))
            return
        envelope = _Envelope(message, reply, key)
        self._slots[key] = envelope
        self._append(envelope)

    def _evict_oldest(self) -> None:
        item = self._queue.popleft()
        self.dropped_oldest += 1
        if type(item) is _Envelope:
            if item.key is not None:
                del self._slots[item.key]
            if item.reply is not None:
                item.reply.fail(MessageDropped(self.path, f"the ask was evicted from the full mailbox of {self.path} (drop_oldest)"))

    def _full_detail(self, what: str) -> str:
        return f"mailbox of {self.path} is full ({self.capacity} messages); {what}"

    def put_nowait_or_fail(self, message: Any, reply: _Reply | None = None) -> None:
        """Like :meth:`put_nowait`, turning ``block`` into :class:`MailboxFull`."""
        try:
            self.put_nowait(message, reply)
        except _Full:
            self.refused += 1
            raise MailboxFull(self.path, self._full_detail("tell_nowait cannot wait (block)")) from None

    async def put(self, message: Any, reply: _Reply | None = None, *, timeout: float | None = None, schedule: bool = True) -> None:  # noqa: ASYNC109
        """Queue ``message``, waiting for room under the ``block`` policy.

        Args:
            message: The message.
            reply: The reply slot of an ``ask``.
            timeout: Overrides the mailbox's ``block_timeout``.

        Raises:
            ActorStopped: The actor has stopped for good.
            MailboxFull: The policy refused the message, or no room was made
                within the block timeout.
        """
        # Trio's cancellation semantics: if this raises Cancelled, the message
        # was not queued (so check before queueing, and shield the yield after).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.put_nowait(message, reply)
        except _Full:
            pass
        else:
            if schedule:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return
        limit = self.block_timeout if timeout is None else timeout
        with trio.move_on_after(math.inf if limit is None else limit):
            while True:
                self._blocked += 1
                space = self._space
                if space is None:
                    space = self._space = trio.lowlevel.ParkingLot()
                try:
                    await space.park()
                finally:
                    self._blocked -= 1
                try:
                    self.put_nowait(message, reply)
                except _Full:
                    continue
                return
        self.block_timeouts += 1
        raise MailboxFull(self.path, self._full_detail(f"no room within {limit} s (block)"))

    # -- taking messages out (the owning actor's loop only) --------------------

    def pop(self) -> tuple[Any, _Reply | None]:
        """Take the oldest message; the queue must not be empty.

        ``_Cell._loop`` inlines this for its hot path; keep the two in step.
        """
        item = self._queue.popleft()
        if self._blocked:
            self.unpark_one()
        if type(item) is _Envelope:
            if item.key is not None:
                del self._slots[item.key]
            return item.message, item.reply
        return item, None

    def wake(self) -> None:
        """Wake the owning loop if it is waiting for a message."""
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            wake_receiver(receiver)

    async def wait_nonempty(self) -> None:
        """Park the owning loop until a message arrives or :meth:`wake`."""
        self._receiver = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """Refuse further messages; fail queued asks with ActorStopped."""
        self.closed = True
        self._plain = False
        while self._queue:
            item = self._queue.popleft()
            self.dropped_on_stop += 1
            if type(item) is _Envelope and item.reply is not None:
                item.reply.fail(ActorStopped(self.path, f"actor {self.path} stopped before handling the ask"))
        self._slots.clear()
        if self._space is not None:
            self._space.unpark_all()
        self.wake()
