"""User notifications: one mailbox actor per user, and the manager facade.

Every user who is being notified, or has a device attached, has a
:class:`UserMailbox`: a ``transient`` child of the manager's supervisor,
started on first use and stopping itself (normally) after ``idle_timeout``
seconds without messages while no device is attached. Its state is a working
copy of the user's :class:`UserRecord`, written through to a
:class:`NotificationStore` before anything is delivered, so a later
incarnation (after an idle stop or a crash) resumes where it was: sequence
numbers continue, read state is kept.

What must survive a crash but is not stored (the attached devices and the
in-process callbacks) lives in a :class:`UserRegistry` that the manager owns
and every incarnation of the user's mailbox is handed; only the mailbox
actor changes its devices, and only its idle stop forgets it.

Delivery: a new notification is persisted, then sent as *one*
:class:`Event` (``type="notification"``, ``topic="user:<id>"``, with its
``seq`` and ``epoch``) to every attached device of the user; the user's
in-process callbacks get the :class:`Notification` right after. Read state is shared by the devices: ``mark_read``,
``mark_all_read`` and ``clear`` persist the change and send a
``notification_read`` event (ephemeral: no ``seq``) to every device.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
import types
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, Final

import attrs
import trio

from ..actors import DEFAULT_ASK_TIMEOUT, Actor, ActorRef, ActorStopped, ChildSpec, Supervisor
from ._errors import HistoryUnavailable
from ._events import NOTIFICATION, NOTIFICATION_READ, Event, Subscriber
from ._models import NOTIFICATION_TYPES, Notification
from ._notification_store import (
    DEFAULT_MAX_PER_USER,
    Append,
    Clear,
    CreateUser,
    InMemoryNotificationStore,
    MarkAllRead,
    MarkRead,
    NotificationStore,
    Op,
    UserRecord,
    apply_ops,
)

logger = logging.getLogger("ensemble.realtime.notifications")

MAX_USER_ID_LENGTH: Final = 256
DEFAULT_IDLE_TIMEOUT: Final = 300.0  # seconds
DEFAULT_CALLBACK_TIMEOUT: Final = 5.0  # seconds
_RESOLVE_ATTEMPTS: Final = 3

Callback = Callable[[Notification], object]
"""A subscription callback: sync, or returning an awaitable (async def)."""

PresenceCallback = Callable[[str], object]
"""``on_online``/``on_offline``: called with the user id; sync or async."""


def validate_user_id(user_id: object) -> str:
    """Check a user id: a non-empty ``str`` without ``/``, at most 256 characters.

    Returns:
        The user id.

    Raises:
        ValueError: It is not a valid user id.
    """
    if not isinstance(user_id, str) or not user_id or "/" in user_id or len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"a user id must be a non-empty str without '/' of at most {MAX_USER_ID_LENGTH} characters, got {user_id!r}")
    return user_id


def _validate_type(notification_type: str) -> None:
    if notification_type not in NOTIFICATION_TYPES:
        raise ValueError(f"notification_type must be one of {', '.join(sorted(NOTIFICATION_TYPES))}; got {notification_type!r}")


def _topic(user_id: str) -> str:
    return f"user:{user_id}"


# -- records ---------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Attachment:
    """What :meth:`NotificationManager.attach` reports.

    Attributes:
        epoch: The user's notification epoch.
        last_seq: The newest ``seq`` issued when the device was attached: the
            position to resume from later if nothing else arrives.
        replayed: The notifications after ``since`` that were delivered to
            the device before it went live (empty without ``since``).
        came_online: Whether this was the user's first attached device.
        recovered: Whether a ``since`` was given and every notification
            after it was delivered before the live ones (``False`` without
            ``since``, and when ``strict=False`` let an unrecoverable
            ``since`` attach from now).
    """

    epoch: str
    last_seq: int
    replayed: tuple[Notification, ...] = ()
    came_online: bool = False
    recovered: bool = False


@attrs.define(eq=False)
class UserRegistry:
    """One user's attached devices and callbacks: kept outside the mailbox
    actor so that they survive its restarts.

    Attributes:
        user_id: The user.
        subscribers: Attached devices by connection id.
        callbacks: In-process callbacks by subscription id.
    """

    user_id: str
    subscribers: dict[str, Subscriber] = attrs.field(factory=dict)
    callbacks: dict[int, Callback] = attrs.field(factory=dict)

    @property
    def empty(self) -> bool:
        """Whether nothing is attached or subscribed."""
        return not self.subscribers and not self.callbacks


@attrs.define(eq=False)
class _Shared:
    """What the manager hands every incarnation of every user mailbox."""

    store: NotificationStore
    max_per_user: int
    idle_timeout: float
    callback_timeout: float
    clock: Callable[[], float]
    on_online: PresenceCallback | None
    on_offline: PresenceCallback | None
    registries: dict[str, UserRegistry] = attrs.field(factory=dict)

    def registry(self, user_id: str) -> UserRegistry:
        registry = self.registries.get(user_id)
        if registry is None:
            registry = self.registries[user_id] = UserRegistry(user_id)
        return registry

    def release(self, registry: UserRegistry) -> None:
        """Forget ``registry`` if it is current and empty."""
        if registry.empty and self.registries.get(registry.user_id) is registry:
            del self.registries[registry.user_id]


# -- messages --------------------------------------------------------------------


@attrs.frozen
class _Send:
    title: str
    body: str
    notification_type: str
    data: Mapping[str, object] | None


@attrs.frozen
class _Attach:
    subscriber: Subscriber
    since: tuple[str, int] | None
    strict: bool = True


@attrs.frozen
class _Detach:
    connection_id: str


@attrs.frozen
class _Replay:
    since: tuple[str, int]


@attrs.frozen
class _GetUnread:
    pass


@attrs.frozen
class _GetAll:
    limit: int | None


@attrs.frozen
class _Position:
    pass


@attrs.frozen
class _MarkRead:
    notification_id: str


@attrs.frozen
class _MarkAllRead:
    pass


@attrs.frozen
class _Clear:
    pass


@attrs.frozen
class _Idle:
    pass


@attrs.frozen
class _RunCallbacks:
    notification: Notification


_IDLE: Final = _Idle()
_IDLE_TIMER: Final = "idle"


# -- the actor -------------------------------------------------------------------


async def _call(callback: Callable[[Any], object], argument: object, limit: float, what: str) -> None:
    """Call a sync or async callback; log (never raise) its errors."""
    try:
        result = callback(argument)
        if inspect.isawaitable(result):
            with trio.move_on_after(limit) as scope:
                await result
            if scope.cancelled_caught:
                logger.warning("%s %r did not finish within %s s; cancelled", what, callback, limit)
    except Exception:
        logger.exception("%s %r raised", what, callback)


class UserMailbox(Actor):
    """The actor that owns one user's notifications.

    Args:
        shared: The manager's store, settings and registries.
        user_id: The user.
    """

    expected_exceptions = (HistoryUnavailable,)

    def __init__(self, shared: _Shared, user_id: str) -> None:
        self._shared = shared
        self.user_id = user_id
        self._topic = _topic(user_id)
        # Looked up per incarnation: an earlier incarnation that stopped idle
        # may have released its (empty) registry.
        self.registry = shared.registry(user_id)
        self._record = UserRecord(user_id=user_id, epoch="")
        self._persisted = False

    async def on_start(self) -> None:
        """Load the user's record (or begin a new epoch) and arm the idle timer."""
        record = await self._shared.store.load(self.user_id)
        if record is None:
            self._record = UserRecord(user_id=self.user_id, epoch=uuid.uuid4().hex)
            self._persisted = False
        else:
            self._record = record
            self._persisted = True
        self._rearm_idle()

    async def receive(self, message: Any) -> Any:
        """Handle one message (see the module docstring)."""
        if isinstance(message, _Idle):
            if not self.registry.subscribers:
                self._shared.release(self.registry)
                self.stop()
            return None
        try:
            return await self._handle(message)
        finally:
            self._rearm_idle()

    async def _handle(self, message: Any) -> Any:
        match message:
            case _Send():
                return await self._send(message)
            case _RunCallbacks(notification):
                return await self._run_callbacks(notification)
            case _Attach():
                return await self._attach(message)
            case _Detach(connection_id):
                return await self._detach(connection_id)
            case _Replay(since):
                return self._replay(since)
            case _GetUnread():
                return [n for n in self._record.notifications if not n.read]
            case _GetAll(limit):
                kept = self._record.notifications
                return list(kept if limit is None else kept[max(len(kept) - limit, 0) :])
            case _Position():
                return (self._record.epoch, self._record.last_seq)
            case _MarkRead(notification_id):
                return await self._mark_read(notification_id)
            case _MarkAllRead():
                ids = tuple(n.id for n in self._record.notifications if not n.read)
                if ids:
                    await self._apply([MarkAllRead()])
                    await self._emit_read("read_all", ids)
                return len(ids)
            case _Clear():
                ids = tuple(n.id for n in self._record.notifications)
                if ids:
                    await self._apply([Clear()])
                    await self._emit_read("clear", ids)
                return len(ids)
        raise TypeError(f"{self.path}: unknown message {message!r}")

    # -- state -----------------------------------------------------------------

    async def _apply(self, ops: list[Op]) -> None:
        """Persist ``ops``, then apply them to the working copy."""
        if not self._persisted:
            ops = [CreateUser(self._record.epoch), *ops]
        await self._shared.store.apply(self.user_id, ops)
        self._persisted = True
        record = apply_ops(self._record, self.user_id, ops)
        assert record is not None
        self._record = record

    def _rearm_idle(self) -> None:
        if self.registry.subscribers:
            self.cancel_timer(_IDLE_TIMER)
        else:
            self.start_timer(_IDLE_TIMER, self._shared.idle_timeout, _IDLE)

    # -- notifications -----------------------------------------------------------

    async def _send(self, message: _Send) -> Notification:
        record = self._record
        notification = Notification(
            id=uuid.uuid4().hex,
            user_id=self.user_id,
            title=message.title,
            body=message.body,
            notification_type=message.notification_type,
            data=message.data,
            created_at=self._shared.clock(),
            seq=record.last_seq + 1,
            epoch=record.epoch,
        )
        await self._apply([Append(notification, self._shared.max_per_user)])
        event = Event(type=NOTIFICATION, topic=self._topic, data=notification.to_dict(), seq=notification.seq, epoch=notification.epoch)
        await self._deliver(event)
        if self.registry.callbacks:
            # Run the callbacks right after replying (a due timer is handled
            # before the next queued message): the sender is not kept waiting.
            self.start_timer(("callbacks", notification.seq), 0, _RunCallbacks(notification))
        return notification

    async def _run_callbacks(self, notification: Notification) -> None:
        limit = self._shared.callback_timeout
        for callback in list(self.registry.callbacks.values()):
            await _call(callback, notification, limit, "notification callback")

    def _replay(self, since: tuple[str, int]) -> list[Notification]:
        epoch, seq = since
        record = self._record
        kept = record.notifications
        reason = None
        if epoch != record.epoch:
            reason = f"epoch {epoch!r} is not the current epoch {record.epoch!r}"
        elif seq > record.last_seq:
            reason = f"seq {seq} is in the future (last issued: {record.last_seq})"
        elif seq < record.evicted_through:
            reason = f"notifications after seq {seq} were evicted (through seq {record.evicted_through})"
        if reason is not None:
            raise HistoryUnavailable(
                f"cannot replay the notifications of {self.user_id!r}: {reason}",
                epoch=record.epoch,
                first_seq=kept[0].seq if kept else None,
                last_seq=record.last_seq,
            )
        return [n for n in kept if n.seq > seq]

    async def _mark_read(self, notification_id: str) -> bool:
        for n in self._record.notifications:
            if n.id == notification_id:
                if not n.read:
                    await self._apply([MarkRead((notification_id,))])
                    await self._emit_read("read", (notification_id,))
                return True
        return False

    async def _emit_read(self, action: str, ids: tuple[str, ...]) -> None:
        """Tell every device that read state changed (``action``: ``read``,
        ``read_all`` or ``clear``), with the ids and the new unread count."""
        data = {"action": action, "ids": list(ids), "unread": self._record.unread_count}
        await self._deliver(Event(type=NOTIFICATION_READ, topic=self._topic, data=data))

    # -- devices -----------------------------------------------------------------

    async def _deliver(self, event: Event) -> None:
        """Give ``event`` to every attached device; detach those that refuse it."""
        refused = []
        for connection_id, subscriber in list(self.registry.subscribers.items()):
            try:
                accepted = subscriber.deliver_nowait(event)
            except Exception:
                logger.exception("subscriber %s of %s raised in deliver_nowait; detaching it", connection_id, self.user_id)
                accepted = False
            if not accepted:
                refused.append(connection_id)
        for connection_id in refused:
            await self._detach(connection_id)

    async def _attach(self, message: _Attach) -> Attachment:
        subscriber = message.subscriber
        replayed: tuple[Notification, ...] = ()
        recovered = False
        if message.since is not None:
            try:
                replayed = tuple(self._replay(message.since))
            except HistoryUnavailable as exc:
                if message.strict:
                    raise
                logger.debug("device %s of %s attaches unrecovered: %s", subscriber.connection_id, self.user_id, exc)
            else:
                recovered = True
            for n in replayed:
                try:
                    subscriber.deliver_nowait(Event(type=NOTIFICATION, topic=self._topic, data=n.to_dict(), seq=n.seq, epoch=n.epoch))
                except Exception:
                    logger.exception("subscriber %s of %s raised in deliver_nowait during replay", subscriber.connection_id, self.user_id)
        subscribers = self.registry.subscribers
        came_online = not subscribers
        subscribers[subscriber.connection_id] = subscriber
        if came_online and self._shared.on_online is not None:
            await _call(self._shared.on_online, self.user_id, self._shared.callback_timeout, "on_online callback")
        return Attachment(
            epoch=self._record.epoch, last_seq=self._record.last_seq, replayed=replayed, came_online=came_online, recovered=recovered
        )

    async def _detach(self, connection_id: str) -> bool:
        subscribers = self.registry.subscribers
        if subscribers.pop(connection_id, None) is None:
            return False
        if not subscribers and self._shared.on_offline is not None:
            await _call(self._shared.on_offline, self.user_id, self._shared.callback_timeout, "on_offline callback")
        return True


# -- the facade ------------------------------------------------------------------


class NotificationManager:
    """User-targeted notifications (the seed's ``NotificationManager``).

    Each user's notifications are owned by a :class:`UserMailbox` actor, a
    ``transient`` child of ``supervisor`` with the user id as its child id,
    started on first use and stopping itself after ``idle_timeout`` seconds
    without messages while none of the user's devices is attached. The
    supervisor should be used for user mailboxes only.

    Methods that need the user's state are ``async``: they ask the user's
    mailbox. ``subscribe``, ``unsubscribe``, ``is_online`` and
    ``online_users`` are not.

    Args:
        supervisor: Runs the user mailboxes.
        store: Where notifications are kept; defaults to a new
            :class:`InMemoryNotificationStore`.
        max_per_user: Most notifications kept per user; the oldest are
            evicted beyond it.
        idle_timeout: Seconds without messages (and with no device attached)
            after which a user's mailbox stops; its state stays in the store.
        callback_timeout: Longest wait for an async callback (subscription,
            ``on_online``, ``on_offline``) before it is cancelled.
        ask_timeout: Longest wait for a user's mailbox to answer.
        on_online: Called with the user id when a user's first device attaches.
        on_offline: Called with the user id when a user's last device detaches.
        clock: The wall clock for ``created_at`` (Unix time).
        max_restarts: Restarts one user's mailbox may take ...
        max_seconds: ... within this many seconds before the supervisor gives
            up on it alone (other users are unaffected). Its devices stay
            attached and its state stays in the store: the next use of the
            user's mailbox starts it afresh.
        hibernate_after: Seconds without a message after which a user's
            mailbox, while it does not stop (a device is attached), gives up
            its task until its next message (``ChildSpec.hibernate_after``);
            ``None``: never.

    Callbacks run inside the user's mailbox, one at a time: subscription
    callbacks right after ``send`` has returned (before the mailbox handles
    its next message), ``on_online``/``on_offline`` during the ``attach`` or
    ``detach`` that caused them. A raising callback is logged and affects
    neither the other callbacks nor the mailbox; an async one is cancelled
    after ``callback_timeout``. A callback must not wait for the same user's
    mailbox (e.g. ``await manager.get_unread(same_user)``): it is busy running
    the callback, so the wait would last until ``callback_timeout``. Callbacks
    due when the mailbox crashes are lost.

    Raises:
        ValueError: ``max_per_user`` < 1 or a timeout <= 0.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        store: NotificationStore | None = None,
        *,
        max_per_user: int = DEFAULT_MAX_PER_USER,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        callback_timeout: float = DEFAULT_CALLBACK_TIMEOUT,
        ask_timeout: float = DEFAULT_ASK_TIMEOUT,
        on_online: PresenceCallback | None = None,
        on_offline: PresenceCallback | None = None,
        clock: Callable[[], float] = time.time,
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        hibernate_after: float | None = None,
    ) -> None:
        if hibernate_after is not None and not 0 < hibernate_after < math.inf:
            raise ValueError(f"hibernate_after must be a positive number of seconds or None, got {hibernate_after}")
        if max_restarts < 0 or max_seconds < 0:
            raise ValueError(f"max_restarts and max_seconds must be >= 0, got {max_restarts} and {max_seconds}")
        if max_per_user < 1:
            raise ValueError(f"max_per_user must be >= 1, got {max_per_user}")
        for name, value in (("idle_timeout", idle_timeout), ("callback_timeout", callback_timeout), ("ask_timeout", ask_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self._supervisor = supervisor
        self._shared = _Shared(
            store=store if store is not None else InMemoryNotificationStore(),
            max_per_user=max_per_user,
            idle_timeout=idle_timeout,
            callback_timeout=callback_timeout,
            clock=clock,
            on_online=on_online,
            on_offline=on_offline,
        )
        self._ask_timeout = ask_timeout
        self._max_restarts = max_restarts
        self._max_seconds = max_seconds
        self._hibernate_after = hibernate_after
        self._sub_ids = itertools.count(1)

    @property
    def store(self) -> NotificationStore:
        """The store the mailboxes persist to."""
        return self._shared.store

    # -- mailboxes ---------------------------------------------------------------

    def mailbox(self, user_id: str) -> ActorRef | None:
        """The ref of the user's mailbox if it is running now, else ``None``."""
        handle = self._supervisor.child(validate_user_id(user_id))
        return handle if isinstance(handle, ActorRef) and handle.alive else None

    async def _resolve(self, user_id: str) -> ActorRef:
        ref = self.mailbox(user_id)
        if ref is not None:
            return ref
        spec = ChildSpec(
            id=user_id,
            factory=partial(UserMailbox, self._shared, user_id),
            restart="transient",
            max_restarts=self._max_restarts,
            max_seconds=self._max_seconds,
            hibernate_after=self._hibernate_after,
            start_hibernating=self._hibernate_after is not None,
        )
        try:
            return await self._supervisor.start_child(spec)
        except ValueError:
            # Another task started it meanwhile: use that one. (If it is an
            # incarnation that just stopped idle and is being removed, asking
            # it fails with ActorStopped and _ask resolves again.)
            handle = self._supervisor.child(user_id)
            if isinstance(handle, ActorRef):
                return handle
            return await self._supervisor.start_child(spec)

    async def _ask(self, user_id: str, message: object) -> Any:
        for attempt in range(_RESOLVE_ATTEMPTS):
            ref = await self._resolve(user_id)
            try:
                return await ref.ask(message, timeout=self._ask_timeout)
            except ActorStopped:
                # The mailbox stopped itself (idle) before handling the
                # message, which was not handled: start a fresh one, once
                # more, unless the supervisor itself is gone.
                if attempt == _RESOLVE_ATTEMPTS - 1 or self._supervisor.statistics().state != "running":
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sending -----------------------------------------------------------------

    async def send(
        self,
        user_id: str,
        title: str,
        body: str,
        notification_type: str = "info",
        data: Mapping[str, object] | None = None,
    ) -> Notification:
        """Send a notification to one user (to every attached device, and to
        the user's callbacks), after persisting it.

        Args:
            user_id: The recipient.
            title: Short title.
            body: Text.
            notification_type: ``info``, ``warning``, ``error`` or ``success``.
            data: Optional JSON-ready payload (copied).

        Returns:
            The notification, with its ``seq`` and ``epoch``.

        Raises:
            ValueError: An invalid user id or notification type.
        """
        validate_user_id(user_id)
        _validate_type(notification_type)
        result: Notification = await self._ask(user_id, _Send(title, body, notification_type, _freeze(data)))
        return result

    async def send_many(
        self,
        user_ids: Iterable[str],
        title: str,
        body: str,
        notification_type: str = "info",
        data: Mapping[str, object] | None = None,
    ) -> list[Notification]:
        """Send the same notification to several users, one after another.

        Every user id and the type are checked before anything is sent.
        Each distinct user gets one notification, in first-occurrence order.

        Returns:
            The notifications, one per distinct user.

        Raises:
            ValueError: An invalid user id or notification type.
        """
        users = list(dict.fromkeys(user_ids))
        for user_id in users:
            validate_user_id(user_id)
        _validate_type(notification_type)
        frozen = _freeze(data)
        return [await self._ask(user_id, _Send(title, body, notification_type, frozen)) for user_id in users]

    async def broadcast_all(self, title: str, body: str, notification_type: str = "info") -> list[Notification]:
        """Send a notification to every *subscribed* user: those with at least
        one attached device or callback now (not every user in the store).

        Returns:
            The notifications, one per user.

        Raises:
            ValueError: An invalid notification type.
        """
        _validate_type(notification_type)
        users = [user_id for user_id, registry in self._shared.registries.items() if not registry.empty]
        return await self.send_many(users, title, body, notification_type)

    # -- callbacks and devices ---------------------------------------------------------

    def subscribe(self, user_id: str, callback: Callback) -> int:
        """Call ``callback`` with each new notification of the user.

        ``callback`` may be sync or async; see the class docs for how it runs.

        Returns:
            The subscription id (for :meth:`unsubscribe`).

        Raises:
            ValueError: An invalid user id.
        """
        registry = self._shared.registry(validate_user_id(user_id))
        sub_id = next(self._sub_ids)
        registry.callbacks[sub_id] = callback
        return sub_id

    def unsubscribe(self, user_id: str, sub_id: int) -> bool:
        """Remove a subscription.

        Returns:
            Whether it existed.
        """
        registry = self._shared.registries.get(validate_user_id(user_id))
        if registry is None or registry.callbacks.pop(sub_id, None) is None:
            return False
        if self._supervisor.child(user_id) is None:
            # No mailbox holds the registry now (a starting one would look it
            # up afresh): forget it if empty.
            self._shared.release(registry)
        return True

    async def attach(
        self, user_id: str, subscriber: Subscriber, *, since: tuple[str, int] | None = None, strict: bool = True
    ) -> Attachment:
        """Attach a device: it receives the user's notification events from now on.

        With ``since`` (the ``(epoch, seq)`` of the last notification the
        device saw), the notifications after it are delivered to the device
        first, in the same step, so none is missed or repeated.

        Args:
            user_id: The user; must equal ``subscriber.user_id``.
            subscriber: The device's connection (replaces one attached with
                the same ``connection_id``).
            since: Where to resume from, or ``None``.
            strict: What a ``since`` that cannot be resumed from does:
                raise ``HistoryUnavailable`` (``True``), or attach the device
                from now and report ``recovered=False`` (``False``).

        Returns:
            The position, what was replayed and whether ``since`` was
            recovered.

        Raises:
            ValueError: An invalid user id, or the subscriber is another user's.
            HistoryUnavailable: ``strict`` and ``since`` cannot be resumed
                from (the device was not attached; resync and attach without
                ``since``).
        """
        validate_user_id(user_id)
        if subscriber.user_id != user_id:
            raise ValueError(f"subscriber {subscriber.connection_id!r} belongs to {subscriber.user_id!r}, not {user_id!r}")
        result: Attachment = await self._ask(user_id, _Attach(subscriber, since, strict))
        return result

    async def detach(self, user_id: str, connection_id: str) -> bool:
        """Detach a device.

        Returns:
            Whether it was attached.
        """
        result: bool = await self._ask(validate_user_id(user_id), _Detach(connection_id))
        return result

    def is_online(self, user_id: str) -> bool:
        """Whether at least one of the user's devices is attached."""
        registry = self._shared.registries.get(validate_user_id(user_id))
        return registry is not None and bool(registry.subscribers)

    def online_users(self) -> list[str]:
        """The users with at least one attached device."""
        return [user_id for user_id, registry in self._shared.registries.items() if registry.subscribers]

    # -- reading and read state ------------------------------------------------------

    async def replay(self, user_id: str, since: tuple[str, int]) -> list[Notification]:
        """The user's notifications after position ``since``, oldest first.

        Notifications cleared since are not included (they are gone); read
        flags are the current ones.

        Raises:
            ValueError: An invalid user id.
            HistoryUnavailable: ``since`` is from another epoch, in the
                future, or older than the oldest notification kept.
        """
        result: list[Notification] = await self._ask(validate_user_id(user_id), _Replay(since))
        return result

    async def position(self, user_id: str) -> tuple[str, int]:
        """The user's current ``(epoch, last_seq)``."""
        result: tuple[str, int] = await self._ask(validate_user_id(user_id), _Position())
        return result

    async def get_all(self, user_id: str, limit: int | None = 50) -> list[Notification]:
        """The user's newest ``limit`` notifications (``None``: all), oldest first."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        result: list[Notification] = await self._ask(validate_user_id(user_id), _GetAll(limit))
        return result

    async def get_unread(self, user_id: str) -> list[Notification]:
        """The user's unread notifications, oldest first."""
        result: list[Notification] = await self._ask(validate_user_id(user_id), _GetUnread())
        return result

    async def mark_read(self, user_id: str, notification_id: str) -> bool:
        """Mark one notification read (on all the user's devices).

        Returns:
            Whether the user has that notification (read now).
        """
        result: bool = await self._ask(validate_user_id(user_id), _MarkRead(notification_id))
        return result

    async def mark_all_read(self, user_id: str) -> int:
        """Mark all the user's notifications read.

        Returns:
            How many were unread.
        """
        result: int = await self._ask(validate_user_id(user_id), _MarkAllRead())
        return result

    async def clear(self, user_id: str) -> int:
        """Remove all the user's notifications (sequence numbers continue).

        Returns:
            How many were removed.
        """
        result: int = await self._ask(validate_user_id(user_id), _Clear())
        return result


def _freeze(data: Mapping[str, object] | None) -> Mapping[str, object] | None:
    return None if data is None else types.MappingProxyType(dict(data))
