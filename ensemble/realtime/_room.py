"""Rooms: one :class:`RoomActor` per room, and the :class:`Room` facade users hold.

A room actor owns the room's state (members, bans, join requests, history,
typing indicators, the live subscribers of its members) and changes it only
while handling a message, so there are no locks. Every change is written
through to a :class:`~ensemble.realtime._room_store.RoomStore` as **one**
``apply`` batch per message handled, *before* the events it causes are
delivered: a subscriber never sees an event the store does not hold, and a
``seq`` is never issued twice.

Events:
    Sequenced events (``message``, ``edited``, ``deleted``, ``member_joined``,
    ``member_left``, ``kicked``, ``banned``, ``unbanned``, ``role_changed``,
    ``system``, ``join_request``) carry a ``seq`` (strictly increasing and
    contiguous per room) and the room's ``epoch``, and are kept in the history
    (the newest ``history_size``). Ephemeral events (``typing``, ``presence``,
    ``room_reset``) carry no ``seq`` and are never stored; ``typing`` and
    ``presence`` have a ``coalesce_key`` so a slow connection only gets the
    latest one.

Fan-out:
    One :class:`Event` is built per change and handed to every admitted
    subscriber with ``deliver_nowait`` (the event's :class:`Audience` is
    checked once per user, never awaited per recipient). A subscriber that
    refuses (``False``: closed or slow) does not affect the others; the refusal
    is only counted, the connection deals with its own backlog.

Permissions (:data:`PERMISSIONS`, :data:`RANKS`):
    ``by=None`` means trusted server code and is always allowed. Otherwise
    ``by`` must be a member whose role grants the action:

    ============  ======================================================
    role          may
    ============  ======================================================
    member        nothing (but edit and delete *their own* messages)
    moderator     ``kick``, ``delete_any``, ``approve``, ``deny``
    admin         all of the above, ``ban``, ``unban``, ``set_role``
    ============  ======================================================

    Actions on a member (``kick``, ``ban``, ``set_role``) need the target's
    role to rank strictly *below* the actor's (member < moderator < admin):
    moderators kick members only, admins act on members and moderators, and
    nobody (but server code) acts on an admin or on themselves. ``set_role``
    may grant a role up to the actor's own. Editing is for authors only;
    deleting for authors and for ``delete_any``.

Crash and restart:
    Subscribers are held in a :class:`SubscriberRegistry` that the child
    spec's factory shares between incarnations (like the cell's mailbox); the
    hub keeps it per room id too. A restarted room reloads its record from
    the store (its config included: the latest, since :meth:`Room.configure`
    stores each change; the config the spec was made with is applied by the
    first incarnation only), drops the subscribers of users who are no
    longer members, and sends the others a ``room_reset`` event (``data``:
    ``epoch`` and ``last_seq``): clients re-sync with
    ``get_events(since=...)``. Every incarnation that ends calls the spec's
    ``on_exit`` hook (if any) with the registry and whether it crashed (the
    hub forgets the registry of a room that stopped for good). A room the
    supervisor gives up on is reported by the child spec's ``on_given_up``
    hook (see :class:`ensemble.actors.ChildSpec`).

Membership ends:
    When a member is removed (``kicked``, ``banned``, ``member_left``) the
    event is delivered first, the user's connections included; then the room
    unsubscribes them and calls the spec's ``on_dropped`` hook (if any) with
    their ids (the hub takes the room out of those connections' room index),
    as it does for a user found no longer a member at a restart.

Idle stop:
    One timer checks, every ``idle_timeout`` at most, whether the room had no
    subscribers and no messages for ``idle_timeout`` seconds (comparing with
    the time of the last message; no timer per message). If so the actor stops
    normally; its state stays in the store and the next start resumes it. A
    room with nothing worth keeping (no members, bans, join requests or
    history) deletes its record first (:class:`DeleteRoom`), so abandoned
    rooms cost nothing; started again, it gets a new ``epoch``, so a client
    resuming from a position of the old one is told the history is gone.

Resuming:
    ``Subscribe`` and ``JoinConnection`` take a ``since`` position: the room
    puts the kept events after it (that the user may see) in the
    subscriber's queue and subscribes it, while handling that one message,
    so no event is missed or repeated between the replay and live delivery.
    A position that cannot be resumed from subscribes from now and says so
    (:class:`~ensemble.realtime._models.Resumption` ``recovered=False``).
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar, Final

import attrs
import trio

from ..actors import DEFAULT_ASK_TIMEOUT, Actor, ActorRef, ActorStopped, ChildSpec, MailboxConfig
from ._errors import (
    ApprovalRequired,
    Banned,
    HistoryUnavailable,
    InvalidMessage,
    NotAllowed,
    NotAMember,
    NotFound,
    RateLimited,
    RealtimeError,
    RoomFull,
)
from ._events import (
    BANNED,
    DELETED,
    EDITED,
    JOIN_DECISION,
    JOIN_REQUEST,
    KICKED,
    MEMBER_JOINED,
    MEMBER_LEFT,
    MESSAGE,
    PRESENCE,
    ROLE_CHANGED,
    ROOM_RESET,
    SYSTEM,
    TYPING,
    UNBANNED,
    Audience,
    Event,
    EventBatch,
    Subscriber as Subscriber,
)
from ._models import ROLES, Resumption, RoomConfig, RoomJoin, RoomMember, RoomMessage
from ._ratelimit import SlidingWindowLimit
from ._room_store import (
    AddJoinRequest,
    AddMember,
    AppendEvent,
    Ban as BanOp,
    CreateRoom,
    DeleteRoom,
    JoinRequest,
    RemoveJoinRequest,
    RemoveMember,
    ReplaceMessage,
    RoomOp,
    RoomRecord,
    RoomStore,
    SetConfig,
    SetRole as SetRoleOp,
    Unban as UnbanOp,
)

logger = logging.getLogger("ensemble.realtime.room")

NotifyUser = Callable[[str, Event], Awaitable[None]]
"""Delivers an event to a user's personal mailbox (join decisions)."""

Since = int | tuple[str, int]
"""A history position: a ``seq``, or ``(epoch, seq)`` to also check the epoch."""

RoomExitHook = Callable[[str, ActorRef, "SubscriberRegistry", bool], None]
"""Called (without waiting) when an incarnation of a room ends: with the room
id, its ref, its subscriber registry and whether it crashed."""

RoomDroppedHook = Callable[[str, str, Sequence[str]], None]
"""Called (without waiting) when a room unsubscribes a user's connections
because the user is no longer a member (kicked, banned, left from any device,
or found gone at a restart): with the room id, the user id and the ids of
the connections dropped, after the event that says why was delivered to
them."""

RANKS: Final[Mapping[str, int]] = {"member": 0, "moderator": 1, "admin": 2}
"""Role order: an actor acts only on members ranked strictly below them."""

PERMISSIONS: Final[Mapping[str, frozenset[str]]] = {
    "member": frozenset(),
    "moderator": frozenset({"kick", "delete_any", "approve", "deny"}),
    "admin": frozenset({"kick", "ban", "unban", "set_role", "delete_any", "approve", "deny"}),
}
"""Actions each role may take (``by=None``, server code, may take all)."""


def _audience(roles: frozenset[str], users: frozenset[str]) -> Audience:
    # Audience's ``converter=frozenset`` confuses mypy's attrs plugin.
    return Audience(roles=roles, users=users)  # type: ignore[arg-type]


MODERATORS: Final = _audience(frozenset({"moderator", "admin"}), frozenset())
"""The audience of join-request events."""

MESSAGE_WINDOW: Final = 60.0  # seconds: RoomConfig.rate_limit is per minute
_IDLE_TOLERANCE: Final = 1e-9


# -- messages ------------------------------------------------------------------


@attrs.frozen
class Join:
    """Join the room (see :meth:`Room.join`)."""

    user_id: str | None
    display_name: str
    role: str = "member"
    subscriber: Subscriber | None = attrs.field(default=None, eq=False)
    invited: bool = False


@attrs.frozen
class Leave:
    """Leave the room."""

    user_id: str


@attrs.frozen
class SendMessage:
    """Send a chat message."""

    user_id: str
    content: str
    message_type: str = "text"


@attrs.frozen
class Broadcast:
    """A ``system`` event to every subscriber."""

    data: Mapping[str, Any]


@attrs.frozen
class SendTo:
    """A ``system`` event to the subscribers of some roles and/or users."""

    data: Mapping[str, Any]
    roles: frozenset[str] | None = None
    users: frozenset[str] | None = None


@attrs.frozen
class GetMembers:
    """All members, in join order."""


@attrs.frozen
class GetMember:
    """One member, or ``None``."""

    user_id: str


@attrs.frozen
class GetHistory:
    """Recent messages (newest last), optionally only those after ``since``."""

    limit: int | None = 50
    since: Since | None = None


@attrs.frozen
class GetEvents:
    """Sequenced events after ``since`` (for resuming), filtered for ``user_id``."""

    since: Since | None = None
    limit: int | None = None
    user_id: str | None = None


@attrs.frozen
class Kick:
    """Remove a member (who may rejoin)."""

    user_id: str
    reason: str = ""
    by: str | None = None


@attrs.frozen
class BanUser:
    """Ban a user (removing them if a member)."""

    user_id: str
    reason: str = ""
    by: str | None = None


@attrs.frozen
class UnbanUser:
    """Lift a ban."""

    user_id: str
    by: str | None = None


@attrs.frozen
class IsBanned:
    """Whether a user is banned."""

    user_id: str


@attrs.frozen
class ChangeRole:
    """Change a member's role."""

    user_id: str
    role: str
    by: str | None = None


@attrs.frozen
class SetTyping:
    """Start or stop a typing indicator. Coalesced per user (``keep_latest``)."""

    user_id: str
    typing: bool = True

    @property
    def coalesce_key(self) -> Hashable:
        """The ``keep_latest`` key: the user."""
        return self.user_id


@attrs.frozen
class GetTypingUsers:
    """Users typing now, in the order they started."""


@attrs.frozen
class EditMessage:
    """Replace a message's content (authors only)."""

    user_id: str
    message_id: str
    content: str


@attrs.frozen
class DeleteMessage:
    """Delete a message (authors, or ``delete_any``)."""

    user_id: str
    message_id: str


@attrs.frozen
class RequestJoin:
    """Ask to join (rooms with ``join_policy="approval"``)."""

    user_id: str | None
    display_name: str


@attrs.frozen
class Approve:
    """Admit a pending join request."""

    user_id: str
    by: str | None = None


@attrs.frozen
class Deny:
    """Refuse a pending join request."""

    user_id: str
    reason: str = ""
    by: str | None = None


@attrs.frozen
class GetJoinRequests:
    """Pending join requests (moderators)."""

    by: str | None = None


@attrs.frozen
class Subscribe:
    """Deliver the room's events to a member's connection (after ``since``)."""

    subscriber: Subscriber = attrs.field(eq=False)
    since: Since | None = None


@attrs.frozen
class JoinConnection:
    """Join the connection's user (unless a member already) and subscribe the connection."""

    subscriber: Subscriber = attrs.field(eq=False)
    display_name: str
    role: str = "member"
    invited: bool = False
    since: Since | None = None


@attrs.frozen
class Unsubscribe:
    """Stop delivering to a connection."""

    connection_id: str


@attrs.frozen
class GetStatistics:
    """A :class:`RoomStatistics` snapshot."""


@attrs.frozen
class Configure:
    """Replace the room's configuration (persisted; applied at once)."""

    config: RoomConfig


@attrs.frozen
class _TypingExpired:
    user_id: str


@attrs.frozen
class _IdleCheck:
    pass


@attrs.frozen(kw_only=True)
class RoomStatistics:
    """A snapshot of one room.

    Attributes:
        room_id: The room.
        epoch: Its epoch.
        last_seq: The newest ``seq`` issued.
        members: Members now.
        online_users: Members with at least one subscriber.
        subscribers: Subscribed connections.
        pending_requests: Pending join requests.
        history_length: Events kept in the history.
        deliveries: Events handed to subscribers (accepted).
        refused_deliveries: Events a subscriber refused (closed or slow).
    """

    room_id: str
    epoch: str
    last_seq: int
    members: int
    online_users: int
    subscribers: int
    pending_requests: int
    history_length: int
    deliveries: int
    refused_deliveries: int


# -- the actor -----------------------------------------------------------------


class SubscriberRegistry:
    """Live subscribers of one room, shared by all incarnations of its actor."""

    def __init__(self) -> None:
        self.by_user: dict[str, dict[str, Subscriber]] = {}
        self.by_connection: dict[str, str] = {}
        self.incarnations = 0
        self._flat: list[tuple[Subscriber, Callable[[Event], bool]]] | None = None
        self._flat_batch: list[tuple[Subscriber, Callable[[EventBatch], int]]] | None = None

    def __len__(self) -> int:
        return len(self.by_connection)

    def changed(self) -> None:
        """Call after changing ``by_user``: the flat lists are rebuilt on next use."""
        self._flat = None
        self._flat_batch = None

    def subscribers(self) -> list[Subscriber]:
        """Every subscriber, by user then subscription order."""
        return [subscriber for connections in self.by_user.values() for subscriber in connections.values()]

    def clear(self) -> None:
        """Forget every subscriber."""
        self.by_user.clear()
        self.by_connection.clear()
        self.changed()

    def flat_batch(self) -> list[tuple[Subscriber, Callable[[EventBatch], int]]]:
        """Every subscriber with a function that hands it an :class:`EventBatch`
        (its ``deliver_batch_nowait`` if it has one), cached between changes."""
        flat = self._flat_batch
        if flat is None:
            flat = self._flat_batch = [(subscriber, _batch_delivery(subscriber)) for subscriber, _ in self.flat()]
        return flat

    def flat(self) -> list[tuple[Subscriber, Callable[[Event], bool]]]:
        """Every subscriber with its bound ``deliver_nowait``, cached between changes.

        An event for everyone (no audience) is handed out from this list: no
        per-recipient dict walks or attribute lookups.
        """
        flat = self._flat
        if flat is None:
            flat = self._flat = [
                (subscriber, subscriber.deliver_nowait) for connections in self.by_user.values() for subscriber in connections.values()
            ]
        return flat


def _batch_delivery(subscriber: Subscriber) -> Callable[[EventBatch], int]:
    deliver_batch: Callable[[EventBatch], int] | None = getattr(subscriber, "deliver_batch_nowait", None)
    if deliver_batch is not None:
        return deliver_batch
    deliver = subscriber.deliver_nowait
    return lambda batch: sum([bool(deliver(event)) for event in batch.events])


def _new_epoch() -> str:
    return secrets.token_hex(8)


def _new_message_id() -> str:
    return secrets.token_hex(8)


def _message_of(event: Event) -> RoomMessage:
    return RoomMessage(**event.data)


class RoomActor(Actor):
    """The actor of one room; use :meth:`spec` to run it and :class:`Room` to talk to it.

    Args:
        room_id: The room.
        config: Its configuration when it starts; ``None`` uses the stored
            one (or the defaults for a new room). A config that differs from
            the stored one replaces it. Only the first incarnation applies
            it: a restart after a crash takes the stored config, the latest
            (see :meth:`Room.configure`).
        store: Where the room's record lives.
        notify_user: Delivers join decisions to the requester's mailbox.
        clock: Wall clock for ``joined_at`` and message timestamps.
        subscribers: The registry shared between incarnations (made by
            :meth:`spec`; a fresh one if ``None``).
        default_config: The config of a new room started without one
            (``None``: :class:`RoomConfig` defaults).
        on_exit: Called when this incarnation ends (see :data:`RoomExitHook`).
        on_dropped: Called when the room unsubscribes the connections of a
            user whose membership ended (see :data:`RoomDroppedHook`).
    """

    mailbox: ClassVar[MailboxConfig] = MailboxConfig(per_type={SetTyping: "keep_latest"})
    expected_exceptions: ClassVar[tuple[type[Exception], ...]] = (RealtimeError,)

    def __init__(
        self,
        room_id: str,
        config: RoomConfig | None,
        store: RoomStore,
        notify_user: NotifyUser,
        *,
        clock: Callable[[], float] = time.time,
        subscribers: SubscriberRegistry | None = None,
        default_config: RoomConfig | None = None,
        on_exit: RoomExitHook | None = None,
        on_dropped: RoomDroppedHook | None = None,
    ) -> None:
        self.room_id = room_id
        self.topic = f"room:{room_id}"
        self._config_arg = config
        self.config = config if config is not None else default_config if default_config is not None else RoomConfig()
        self._on_exit = on_exit
        self._on_dropped = on_dropped
        self._store = store
        self._notify_user = notify_user
        self._clock = clock
        self._subs = subscribers if subscribers is not None else SubscriberRegistry()
        self.epoch = ""
        self.last_seq = 0
        self._members: dict[str, RoomMember] = {}
        self._bans: dict[str, str] = {}
        self._requests: dict[str, JoinRequest] = {}
        self._history: deque[Event] = deque()
        self._typing: dict[str, None] = {}
        self._limit = SlidingWindowLimit(self.config.rate_limit, MESSAGE_WINDOW, clock=trio.current_time)
        self._last_activity = 0.0
        self._deliveries = 0
        self._refused = 0
        # Per message: store ops, then deliveries/actions, then notifications.
        self._ops: list[RoomOp] = []
        self._outbox: list[Event | Callable[[], None]] = []
        self._notices: list[tuple[str, Event]] = []

    @classmethod
    def spec(
        cls,
        room_id: str,
        config: RoomConfig | None,
        store: RoomStore,
        notify_user: NotifyUser,
        *,
        clock: Callable[[], float] = time.time,
        subscribers: SubscriberRegistry | None = None,
        default_config: RoomConfig | None = None,
        on_exit: RoomExitHook | None = None,
        on_dropped: RoomDroppedHook | None = None,
    ) -> ChildSpec:
        """The child spec of a room (``transient``: an idle stop removes it).

        Args:
            room_id: The room; also the child id (no ``/``).
            config: See :class:`RoomActor`.
            store: See :class:`RoomActor`.
            notify_user: See :class:`RoomActor`.
            clock: See :class:`RoomActor`.
            subscribers: The registry to share between the room's
                incarnations (``None``: a new one).
            default_config: See :class:`RoomActor`.
            on_exit: See :class:`RoomActor`.
            on_dropped: See :class:`RoomActor`.

        Returns:
            The spec; its factory shares one subscriber registry between the
            room's incarnations.
        """
        registry = subscribers if subscribers is not None else SubscriberRegistry()
        factory = functools.partial(
            cls,
            room_id,
            config,
            store,
            notify_user,
            clock=clock,
            subscribers=registry,
            default_config=default_config,
            on_exit=on_exit,
            on_dropped=on_dropped,
        )
        return ChildSpec(id=room_id, factory=factory, restart="transient")

    # -- lifecycle -------------------------------------------------------------

    async def on_start(self) -> None:
        """Load (or create) the record; after a restart, send ``room_reset``."""
        self._subs.incarnations += 1
        try:
            await self._start()
        except Exception:
            if self._subs.incarnations > 1:  # a restart failed: the supervisor decides
                self._exited(crashed=True)
            raise

    async def on_stop(self) -> None:
        """Tell the ``on_exit`` hook (after a normal stop or a crash)."""
        self._exited(crashed=self.ref.statistics().state == "restarting")

    def _exited(self, *, crashed: bool) -> None:
        if self._on_exit is None:
            return
        try:
            self._on_exit(self.room_id, self.ref, self._subs, crashed)
        except Exception:
            logger.exception("the on_exit hook of room %s raised", self.room_id)

    async def _start(self) -> None:
        record = await self._store.load(self.room_id)
        # The spec's config is for the room's start: a restart after a crash
        # takes the stored one, which configure() has kept up to date.
        config = self._config_arg if self._subs.incarnations == 1 else None
        ops: list[RoomOp] = []
        if record is None:
            record = RoomRecord(room_id=self.room_id, config=self.config, epoch=_new_epoch())
            ops.append(CreateRoom(record.config, record.epoch))
        elif config is not None and config != record.config:
            self.config = config
            ops.append(SetConfig(config))
        else:
            self.config = record.config
        if ops:
            await self._store.apply(self.room_id, ops)
        self._load(record)
        for user_id in [user for user in self._subs.by_user if user not in self._members]:
            self._drop_subscribers(user_id)
        if self._subs.incarnations > 1:
            self._deliver(Event(type=ROOM_RESET, topic=self.topic, data={"epoch": self.epoch, "last_seq": self.last_seq}))
        self._last_activity = trio.current_time()
        self.start_timer("idle", self.config.idle_timeout, _IdleCheck())

    def _load(self, record: RoomRecord) -> None:
        self.epoch = record.epoch
        self.last_seq = record.last_seq
        self._members = dict(record.members)
        self._bans = dict(record.bans)
        self._requests = dict(record.join_requests)
        history = record.history
        if len(history) > self.config.history_size:
            history = history[len(history) - self.config.history_size :]
        self._history = deque(history)
        self._limit = SlidingWindowLimit(self.config.rate_limit, MESSAGE_WINDOW, clock=trio.current_time)

    async def receive(self, message: Any) -> Any:
        """Handle one message: change state, persist one batch, deliver events."""
        if type(message) is _TypingExpired:
            self._set_typing(message.user_id, False)
            self._flush_outbox()
            return None
        if type(message) is _IdleCheck:
            await self._idle_check()
            return None
        self._last_activity = trio.current_time()
        try:
            result = self._handle(message)
        except BaseException:
            # Handlers validate before they change anything; nothing to undo.
            self._ops.clear()
            self._outbox.clear()
            self._notices.clear()
            raise
        if self._ops:
            ops, self._ops = self._ops, []
            await self._store.apply(self.room_id, ops)
        self._flush_outbox()
        if self._notices:
            notices, self._notices = self._notices, []
            for user_id, event in notices:
                try:
                    await self._notify_user(user_id, event)
                except Exception as exc:
                    logger.warning("room %s could not notify %s: %r", self.room_id, user_id, exc)
        return result

    def _handle(self, message: Any) -> Any:
        match message:
            case SetTyping(user_id, typing):
                if user_id in self._members:
                    self._set_typing(user_id, typing)
                return None
            case SendMessage(user_id, content, message_type):
                return self._send_message(user_id, content, message_type)
            case Join():
                return self._join(message)
            case Leave(user_id):
                return self._leave(user_id)
            case Subscribe(subscriber, since):
                return self._subscribe(subscriber, since=since)
            case JoinConnection(subscriber, display_name, role, invited, since):
                member, resumption = self._join_subscriber(subscriber.user_id, display_name, role, invited, subscriber, since)
                assert resumption is not None
                return RoomJoin(room_id=self.room_id, member=member, resumption=resumption)
            case Unsubscribe(connection_id):
                return self._unsubscribe(connection_id)
            case Broadcast(data):
                self._sequenced(SYSTEM, dict(data))
                return None
            case SendTo(data, roles, users):
                audience = _audience(roles or frozenset(), users or frozenset())
                self._sequenced(SYSTEM, dict(data), audience=audience)
                return None
            case GetMembers():
                return list(self._members.values())
            case GetMember(user_id):
                return self._members.get(user_id)
            case GetHistory(limit, since):
                events = self._events_after(since)
                messages = [_message_of(event) for event in events if event.type == MESSAGE]
                return messages if limit is None else messages[max(0, len(messages) - limit) :]
            case GetEvents(since, limit, user_id):
                return self._get_events(since, limit, user_id)
            case Kick(user_id, reason, by):
                return self._kick(user_id, reason, by)
            case BanUser(user_id, reason, by):
                return self._ban(user_id, reason, by)
            case UnbanUser(user_id, by):
                return self._unban(user_id, by)
            case IsBanned(user_id):
                return user_id in self._bans
            case ChangeRole(user_id, role, by):
                return self._set_role(user_id, role, by)
            case GetTypingUsers():
                return list(self._typing)
            case EditMessage(user_id, message_id, content):
                return self._edit(user_id, message_id, content)
            case DeleteMessage(user_id, message_id):
                return self._delete(user_id, message_id)
            case RequestJoin(user_id, display_name):
                return self._request_join(user_id, display_name)
            case Approve(user_id, by):
                return self._approve(user_id, by)
            case Deny(user_id, reason, by):
                return self._deny(user_id, reason, by)
            case GetJoinRequests(by):
                self._check(by, "approve")
                return list(self._requests.values())
            case GetStatistics():
                return self._statistics()
            case Configure(config):
                return self._configure(config)
        raise TypeError(f"room {self.room_id} got an unknown message {message!r}")

    # -- events ----------------------------------------------------------------

    def _sequenced(self, type: str, data: Mapping[str, Any], *, audience: Audience | None = None) -> Event:
        """Make the next sequenced event: keep it, persist it, queue its delivery."""
        self.last_seq += 1
        event = Event(type=type, topic=self.topic, data=data, seq=self.last_seq, epoch=self.epoch, audience=audience)
        self._history.append(event)
        size = self.config.history_size
        while len(self._history) > size:
            self._history.popleft()
        self._ops.append(AppendEvent(event, size))
        self._outbox.append(event)
        return event

    def _flush_outbox(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            run: list[Event] = []  # consecutive events for everyone: delivered as one batch
            for item in outbox:
                if isinstance(item, Event):
                    if item.audience is None and item.coalesce_key is None:
                        run.append(item)
                        continue
                    if run:
                        self._deliver_run(run)
                        run = []
                    self._deliver(item)
                else:
                    if run:
                        self._deliver_run(run)
                        run = []
                    item()
            if run:
                self._deliver_run(run)

    def _deliver_run(self, run: list[Event]) -> None:
        """Hand events for everyone to every subscriber, a batch per subscriber."""
        if len(run) == 1:
            self._deliver(run[0])
            return
        batch = EventBatch(run)
        delivered = 0
        flat = self._subs.flat_batch()
        for subscriber, deliver_batch in flat:
            try:
                delivered += deliver_batch(batch)
            except Exception as exc:
                logger.warning("subscriber %s of room %s raised %r", subscriber.connection_id, self.room_id, exc)
        self._deliveries += delivered
        self._refused += len(flat) * len(run) - delivered

    def _deliver(self, event: Event) -> None:
        """Hand ``event`` to every admitted subscriber, without waiting."""
        audience = event.audience
        if audience is not None:
            self._deliver_to(event, audience)
            return
        # The hot path: everyone, from the cached flat list of bound methods.
        delivered = 0
        flat = self._subs.flat()
        for subscriber, deliver_nowait in flat:
            try:
                if deliver_nowait(event):
                    delivered += 1
            except Exception as exc:
                logger.warning("subscriber %s of room %s raised %r", subscriber.connection_id, self.room_id, exc)
        self._deliveries += delivered
        self._refused += len(flat) - delivered

    def _deliver_to(self, event: Event, audience: Audience) -> None:
        """Hand ``event`` to the subscribers of the members ``audience`` admits."""
        members = self._members
        delivered = refused = 0
        for user_id, connections in self._subs.by_user.items():
            member = members.get(user_id)
            if not audience.admits(user_id, member.role if member is not None else None):
                continue
            for subscriber in connections.values():
                try:
                    accepted = subscriber.deliver_nowait(event)
                except Exception as exc:
                    logger.warning("subscriber %s of room %s raised %r", subscriber.connection_id, self.room_id, exc)
                    accepted = False
                if accepted:
                    delivered += 1
                else:
                    refused += 1
        self._deliveries += delivered
        self._refused += refused

    def _presence(self, user_id: str, online: bool) -> None:
        self._outbox.append(
            Event(type=PRESENCE, topic=self.topic, data={"user_id": user_id, "online": online}, coalesce_key=("presence", user_id))
        )

    # -- permissions -----------------------------------------------------------

    def _check(self, by: str | None, action: str, target: str | None = None) -> None:
        """Raise unless ``by`` may take ``action`` (on member ``target``)."""
        if by is None:
            return
        actor = self._members.get(by)
        if actor is None:
            raise NotAMember(f"{by!r} is not a member of room {self.room_id!r}")
        if action not in PERMISSIONS[actor.role]:
            raise NotAllowed(f"a {actor.role} may not {action} in room {self.room_id!r}")
        if target is not None:
            member = self._members.get(target)
            target_rank = RANKS[member.role] if member is not None else 0
            if target_rank >= RANKS[actor.role]:
                raise NotAllowed(f"{by!r} ({actor.role}) may not {action} {target!r} in room {self.room_id!r}")

    def _member(self, user_id: str) -> RoomMember:
        member = self._members.get(user_id)
        if member is None:
            raise NotAMember(f"{user_id!r} is not a member of room {self.room_id!r}")
        return member

    def _user_id(self, user_id: str | None) -> str:
        if not user_id:
            if self.config.require_auth:
                raise NotAllowed(f"room {self.room_id!r} requires an authenticated user")
            return f"anonymous-{secrets.token_hex(4)}"
        return user_id

    # -- membership ------------------------------------------------------------

    def _join(self, message: Join) -> RoomMember:
        member, _ = self._join_subscriber(message.user_id, message.display_name, message.role, message.invited, message.subscriber, None)
        return member

    def _join_subscriber(
        self,
        user_id: str | None,
        display_name: str,
        role: str,
        invited: bool,
        subscriber: Subscriber | None,
        since: Since | None,
    ) -> tuple[RoomMember, Resumption | None]:
        user_id = self._user_id(user_id)
        if user_id in self._bans:
            raise Banned(f"{user_id!r} is banned from room {self.room_id!r}")
        if subscriber is not None and subscriber.user_id is not None and subscriber.user_id != user_id:
            raise NotAllowed(f"connection {subscriber.connection_id!r} belongs to {subscriber.user_id!r}, not {user_id!r}")
        if subscriber is not None and self._subs.by_connection.get(subscriber.connection_id, user_id) != user_id:
            raise NotAllowed(f"connection {subscriber.connection_id!r} is subscribed as another user")
        member = self._members.get(user_id)
        if member is None:
            if self.config.join_policy == "approval" and not invited:
                raise ApprovalRequired(f"room {self.room_id!r} admits members by approval: use request_join")
            if len(self._members) >= self.config.max_members:
                raise RoomFull(f"room {self.room_id!r} is full ({self.config.max_members} members)")
            member = self._add_member(user_id, display_name, role)
        resumption = None
        if subscriber is not None:
            resumption = self._subscribe(subscriber, user_id=user_id, since=since)
        return member, resumption

    def _add_member(self, user_id: str, display_name: str, role: str) -> RoomMember:
        member = RoomMember(user_id=user_id, display_name=display_name, role=role, joined_at=self._clock())
        self._members[user_id] = member
        self._ops.append(AddMember(member))
        if self._requests.pop(user_id, None) is not None:
            self._ops.append(RemoveJoinRequest(user_id))
        self._sequenced(MEMBER_JOINED, member.to_dict())
        return member

    def _remove_member(self, user_id: str) -> None:
        """Remove a member; the caller has queued the event that says why."""
        del self._members[user_id]
        self._ops.append(RemoveMember(user_id))
        self._limit.forget(user_id)
        if user_id in self._typing:
            self._set_typing(user_id, False)
        if user_id in self._subs.by_user:
            # After the event is delivered (the user's connections see it).
            self._outbox.append(functools.partial(self._drop_subscribers, user_id))

    def _drop_subscribers(self, user_id: str) -> None:
        """Unsubscribe the connections of ``user_id``, who is no longer a member."""
        connections = self._subs.by_user.pop(user_id, None)
        self._subs.changed()
        if connections:
            for connection_id in connections:
                self._subs.by_connection.pop(connection_id, None)
            self._deliver(
                Event(type=PRESENCE, topic=self.topic, data={"user_id": user_id, "online": False}, coalesce_key=("presence", user_id))
            )
            if self._on_dropped is not None:
                try:
                    self._on_dropped(self.room_id, user_id, list(connections))
                except Exception:
                    logger.exception("the on_dropped hook of room %s raised", self.room_id)

    def _leave(self, user_id: str) -> bool:
        if user_id not in self._members:
            return False
        self._sequenced(MEMBER_LEFT, {"user_id": user_id})
        self._remove_member(user_id)
        return True

    def _kick(self, user_id: str, reason: str, by: str | None) -> bool:
        self._check(by, "kick", user_id)
        if user_id not in self._members:
            return False
        self._sequenced(KICKED, {"user_id": user_id, "reason": reason, "by": by})
        self._remove_member(user_id)
        return True

    def _ban(self, user_id: str, reason: str, by: str | None) -> bool:
        self._check(by, "ban", user_id)
        if user_id in self._bans:
            return False
        self._bans[user_id] = reason
        self._ops.append(BanOp(user_id, reason))
        if self._requests.pop(user_id, None) is not None:
            self._ops.append(RemoveJoinRequest(user_id))
        self._sequenced(BANNED, {"user_id": user_id, "reason": reason, "by": by})
        if user_id in self._members:
            self._remove_member(user_id)
        return True

    def _unban(self, user_id: str, by: str | None) -> bool:
        self._check(by, "unban")
        if user_id not in self._bans:
            return False
        del self._bans[user_id]
        self._ops.append(UnbanOp(user_id))
        self._sequenced(UNBANNED, {"user_id": user_id, "by": by})
        return True

    def _set_role(self, user_id: str, role: str, by: str | None) -> RoomMember:
        self._check(by, "set_role", user_id)
        if role not in RANKS:
            raise NotAllowed(f"unknown role {role!r}")
        if by is not None and RANKS[role] > RANKS[self._members[by].role]:
            raise NotAllowed(f"{by!r} may not grant the role {role!r}")
        member = self._member(user_id)
        if member.role == role:
            return member
        updated = attrs.evolve(member, role=role)
        self._members[user_id] = updated
        self._ops.append(SetRoleOp(user_id, role))
        self._sequenced(ROLE_CHANGED, {"user_id": user_id, "role": role, "previous": member.role, "by": by})
        return updated

    # -- subscribers -------------------------------------------------------------

    def _subscribe(self, subscriber: Subscriber, *, user_id: str | None = None, since: Since | None = None) -> Resumption:
        user_id = subscriber.user_id if user_id is None else user_id
        if user_id is None or user_id not in self._members:
            raise NotAMember(f"connection {subscriber.connection_id!r}: {user_id!r} is not a member of room {self.room_id!r}")
        if subscriber.user_id is not None and subscriber.user_id != user_id:
            raise NotAllowed(f"connection {subscriber.connection_id!r} belongs to {subscriber.user_id!r}, not {user_id!r}")
        connection_id = subscriber.connection_id
        previous = self._subs.by_connection.get(connection_id)
        if previous is not None and previous != user_id:
            raise NotAllowed(f"connection {connection_id!r} is subscribed as {previous!r}")
        # Events sequenced while handling this message are still queued for
        # delivery (after the store has them): the subscriber gets them live.
        # The replay covers what was delivered before, up to ``position``.
        position = next((item.seq - 1 for item in self._outbox if type(item) is Event and item.seq is not None), self.last_seq)
        recovered = False
        replayed = 0
        if since is not None:
            recovered, replayed = self._replay(subscriber, user_id, since, position)
        connections = self._subs.by_user.setdefault(user_id, {})
        first = not connections
        connections[connection_id] = subscriber
        self._subs.by_connection[connection_id] = user_id
        self._subs.changed()
        if first:
            self._presence(user_id, True)
        return Resumption(topic=self.topic, epoch=self.epoch, last_seq=position, recovered=recovered, replayed=replayed)

    def _replay(self, subscriber: Subscriber, user_id: str, since: Since, position: int) -> tuple[bool, int]:
        """Hand ``subscriber`` the kept events in ``(since, position]`` that ``user_id`` may see.

        Returns:
            Whether all of them were handed over (``False`` if ``since``
            cannot be resumed from, or the subscriber refused one), and how
            many were.
        """
        try:
            events = self._events_after(since, position)
        except HistoryUnavailable as exc:
            logger.debug("connection %s subscribes to room %s unrecovered: %s", subscriber.connection_id, self.room_id, exc)
            return False, 0
        role = self._members[user_id].role
        replayed = 0
        for event in events:
            if event.audience is not None and not event.audience.admits(user_id, role):
                continue
            try:
                accepted = subscriber.deliver_nowait(event)
            except Exception as exc:
                logger.warning("subscriber %s of room %s raised %r", subscriber.connection_id, self.room_id, exc)
                accepted = False
            if not accepted:
                return False, replayed
            replayed += 1
        return True, replayed

    def _unsubscribe(self, connection_id: str) -> bool:
        user_id = self._subs.by_connection.pop(connection_id, None)
        if user_id is None:
            return False
        connections = self._subs.by_user[user_id]
        del connections[connection_id]
        self._subs.changed()
        if not connections:
            del self._subs.by_user[user_id]
            self._presence(user_id, False)
        return True

    # -- messages --------------------------------------------------------------

    def _validate(self, content: str, message_type: str) -> None:
        if message_type not in self.config.allowed_message_types:
            raise InvalidMessage(f"message type {message_type!r} is not allowed in room {self.room_id!r}")
        if not isinstance(content, str):
            raise InvalidMessage(f"content must be a str, got {type(content).__name__}")
        size = len(content.encode("utf-8", "surrogatepass"))
        if size > self.config.max_message_length:
            raise InvalidMessage(f"message of {size} bytes exceeds max_message_length ({self.config.max_message_length})")

    def _send_message(self, user_id: str, content: str, message_type: str) -> RoomMessage:
        member = self._member(user_id)
        self._validate(content, message_type)
        if not self._limit.hit(user_id):
            retry_after = self._limit.retry_after(user_id)
            # The detail is constant text (documented frames pin it); the
            # delay is the error's retry_after.
            raise RateLimited(
                f"{user_id!r} sent {self.config.rate_limit} messages in the last minute; retry after retry_after seconds",
                retry_after=retry_after,
            )
        message = RoomMessage(
            id=_new_message_id(),
            room_id=self.room_id,
            user_id=user_id,
            display_name=member.display_name,
            content=content,
            message_type=message_type,
            timestamp=self._clock(),
            seq=self.last_seq + 1,
            epoch=self.epoch,
        )
        self._sequenced(MESSAGE, message.to_dict())
        if user_id in self._typing:
            self._set_typing(user_id, False)
        return message

    def _find_message(self, message_id: str) -> tuple[int, RoomMessage]:
        for index in range(len(self._history) - 1, -1, -1):
            event = self._history[index]
            if event.type == MESSAGE and event.data.get("id") == message_id:
                return index, _message_of(event)
        raise NotFound(f"no message {message_id!r} in the history of room {self.room_id!r}")

    def _replace_message(self, index: int, message: RoomMessage) -> None:
        event = attrs.evolve(self._history[index], data=message.to_dict())
        self._history[index] = event
        self._ops.append(ReplaceMessage(message.id, event))

    def _edit(self, user_id: str, message_id: str, content: str) -> RoomMessage:
        self._member(user_id)
        index, message = self._find_message(message_id)
        if message.deleted:
            raise NotFound(f"message {message_id!r} was deleted")
        if message.user_id != user_id:
            raise NotAllowed(f"only the author may edit message {message_id!r}")
        self._validate(content, message.message_type)
        edited = attrs.evolve(message, content=content, edited=True)
        self._replace_message(index, edited)
        self._sequenced(EDITED, edited.to_dict())
        return edited

    def _delete(self, user_id: str, message_id: str) -> bool:
        member = self._member(user_id)
        index, message = self._find_message(message_id)
        if message.user_id != user_id and "delete_any" not in PERMISSIONS[member.role]:
            raise NotAllowed(f"{user_id!r} may not delete message {message_id!r}")
        if message.deleted:
            return False
        self._replace_message(index, attrs.evolve(message, content="", deleted=True))
        self._sequenced(DELETED, {"id": message_id, "by": user_id})
        return True

    # -- history -----------------------------------------------------------------

    def _events_after(self, since: Since | None, last: int | None = None) -> Sequence[Event]:
        """The kept events after ``since`` (all kept events if ``None``), up to seq ``last`` (default: all)."""
        history = self._history
        if last is None:
            last = self.last_seq
        if since is None:
            if last == self.last_seq:
                return list(history)
            return [event for event in history if event.seq is not None and event.seq <= last]
        if isinstance(since, tuple):
            epoch, seq = since
            if epoch != self.epoch:
                raise self._unavailable(f"epoch {epoch!r} is not the room's current epoch")
        else:
            seq = since
        if seq > last or seq < 0:
            raise self._unavailable(f"seq {seq} is not a position of the room (last seq {last})")
        first = history[0].seq if history else self.last_seq + 1
        assert first is not None
        if seq < first - 1:
            raise self._unavailable(f"events after seq {seq} are no longer kept (oldest kept: {first})")
        end = len(history) - (self.last_seq - last)
        return [history[index] for index in range(seq - first + 1, end)]

    def _unavailable(self, reason: str) -> HistoryUnavailable:
        first = self._history[0].seq if self._history else None
        return HistoryUnavailable(f"room {self.room_id!r}: {reason}", epoch=self.epoch, first_seq=first, last_seq=self.last_seq)

    def _get_events(self, since: Since | None, limit: int | None, user_id: str | None) -> list[Event]:
        events = self._events_after(since)
        if user_id is not None:
            role = self._member(user_id).role
            events = [event for event in events if event.audience is None or event.audience.admits(user_id, role)]
        return list(events if limit is None else events[max(0, len(events) - limit) :])

    # -- typing --------------------------------------------------------------------

    def _set_typing(self, user_id: str, typing: bool) -> None:
        if typing:
            self.start_timer(("typing", user_id), self.config.typing_timeout, _TypingExpired(user_id))
            if user_id in self._typing:
                return
            self._typing[user_id] = None
        else:
            self.cancel_timer(("typing", user_id))
            if user_id not in self._typing:
                return
            del self._typing[user_id]
        self._outbox.append(Event(type=TYPING, topic=self.topic, data={"users": list(self._typing)}, coalesce_key="typing"))

    # -- join requests ---------------------------------------------------------------

    def _request_join(self, user_id: str | None, display_name: str) -> JoinRequest:
        user = self._user_id(user_id)
        if user in self._bans:
            raise Banned(f"{user!r} is banned from room {self.room_id!r}")
        if user in self._members:
            raise NotAllowed(f"{user!r} is a member of room {self.room_id!r} already")
        request = self._requests.get(user)
        if request is not None:
            return request
        request = JoinRequest(user_id=user, display_name=display_name, requested_at=self._clock())
        self._requests[user] = request
        self._ops.append(AddJoinRequest(request))
        self._sequenced(JOIN_REQUEST, {"action": "create", **request.to_dict()}, audience=MODERATORS)
        return request

    def _pending(self, user_id: str) -> JoinRequest:
        request = self._requests.get(user_id)
        if request is None:
            raise NotFound(f"{user_id!r} has no pending request to join room {self.room_id!r}")
        return request

    def _decision(self, user_id: str, approved: bool, reason: str, by: str | None) -> None:
        data = {"room_id": self.room_id, "user_id": user_id, "approved": approved, "reason": reason, "by": by}
        self._notices.append((user_id, Event(type=JOIN_DECISION, topic=self.topic, data=data)))

    def _approve(self, user_id: str, by: str | None) -> RoomMember:
        self._check(by, "approve")
        request = self._pending(user_id)
        if len(self._members) >= self.config.max_members:
            raise RoomFull(f"room {self.room_id!r} is full ({self.config.max_members} members)")
        self._sequenced(JOIN_REQUEST, {"action": "admit", "user_id": user_id, "by": by}, audience=MODERATORS)
        member = self._add_member(user_id, request.display_name, "member")
        self._decision(user_id, True, "", by)
        return member

    def _deny(self, user_id: str, reason: str, by: str | None) -> bool:
        self._check(by, "deny")
        self._pending(user_id)
        del self._requests[user_id]
        self._ops.append(RemoveJoinRequest(user_id))
        self._sequenced(JOIN_REQUEST, {"action": "deny", "user_id": user_id, "reason": reason, "by": by}, audience=MODERATORS)
        self._decision(user_id, False, reason, by)
        return True

    # -- idle ----------------------------------------------------------------------

    async def _idle_check(self) -> None:
        timeout = self.config.idle_timeout
        if self._subs.by_connection:
            self.start_timer("idle", timeout, _IdleCheck())
            return
        idle_for = trio.current_time() - self._last_activity
        if idle_for >= timeout - _IDLE_TOLERANCE:
            logger.debug("room %s stops after %.1f s idle", self.room_id, idle_for)
            if self._abandoned():
                try:
                    await self._store.apply(self.room_id, [DeleteRoom()])
                except Exception as exc:  # the record stays: nothing is lost
                    logger.warning("room %s could not delete its record: %r", self.room_id, exc)
            self.stop()
            return
        self.start_timer("idle", timeout - idle_for, _IdleCheck())

    def _configure(self, config: RoomConfig) -> bool:
        if config == self.config:
            return False
        old, self.config = self.config, config
        self._ops.append(SetConfig(config))
        if config.rate_limit != old.rate_limit:
            # The new limit counts from now (the old windows are not carried over).
            self._limit = SlidingWindowLimit(config.rate_limit, MESSAGE_WINDOW, clock=trio.current_time)
        while len(self._history) > config.history_size:
            self._history.popleft()
        if config.idle_timeout != old.idle_timeout:
            self.start_timer("idle", config.idle_timeout, _IdleCheck())
        # Members beyond a lowered max_members stay; new joins are refused.
        return True

    def _abandoned(self) -> bool:
        """Whether the room has nothing worth keeping: no members, bans, requests or history."""
        return not (self._members or self._bans or self._requests or self._history)

    def _statistics(self) -> RoomStatistics:
        return RoomStatistics(
            room_id=self.room_id,
            epoch=self.epoch,
            last_seq=self.last_seq,
            members=len(self._members),
            online_users=len(self._subs.by_user),
            subscribers=len(self._subs.by_connection),
            pending_requests=len(self._requests),
            history_length=len(self._history),
            deliveries=self._deliveries,
            refused_deliveries=self._refused,
        )


# -- the facade ------------------------------------------------------------------


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")


def _check_since(since: Since | None) -> None:
    if since is None or (type(since) is int):
        return
    if isinstance(since, tuple) and len(since) == 2 and isinstance(since[0], str) and type(since[1]) is int:
        return
    raise TypeError(f"since must be a seq (int) or an (epoch, seq) tuple, got {since!r}")


class Room:
    """What users hold to use a room: async methods that ask its actor.

    Rejections raise the :mod:`~ensemble.realtime._errors` types (subclasses
    of the seed's ``PermissionError``, ``ValueError`` and ``LookupError``).

    Args:
        room_id: The room.
        ref: The ref of its :class:`RoomActor`.
        timeout: Seconds each call waits for the room's reply.
        resolve: Finds (starting it if needed) the room's actor again: a
            call that finds the actor stopped (idle, or removed after
            crashing too often) asks the next incarnation, once. ``None``:
            such a call raises ``ActorStopped``.
    """

    def __init__(
        self,
        room_id: str,
        ref: ActorRef,
        *,
        timeout: float | None = DEFAULT_ASK_TIMEOUT,
        resolve: Callable[[], Awaitable[ActorRef]] | None = None,
    ) -> None:
        self._room_id = room_id
        self._ref = ref
        self._timeout = timeout
        self._resolve = resolve

    def __repr__(self) -> str:
        return f"<Room {self._room_id!r} {self._ref.path}>"

    @property
    def room_id(self) -> str:
        """The room's id."""
        return self._room_id

    @property
    def ref(self) -> ActorRef:
        """The room actor's ref (of the incarnation this handle used last)."""
        return self._ref

    async def _ask(self, message: Any) -> Any:
        try:
            return await self._ref.ask(message, timeout=self._timeout)
        except ActorStopped:
            if self._resolve is None:
                raise
        # The actor stopped before handling the message: a new one resumes
        # from the store.
        self._ref = await self._resolve()
        return await self._ref.ask(message, timeout=self._timeout)

    async def join(
        self,
        user_id: str | None,
        display_name: str,
        role: str = "member",
        *,
        subscriber: Subscriber | None = None,
        invited: bool = False,
    ) -> RoomMember:
        """Add a member (joining again returns the existing member, unchanged).

        Args:
            user_id: The user; ``None``/``""`` is refused if the room
                ``require_auth`` (else an anonymous id is made).
            display_name: Shown in the room.
            role: ``member``, ``moderator`` or ``admin`` (trusted: the server
                decides it).
            subscriber: Also subscribe this connection of the user.
            invited: Bypass ``join_policy="approval"`` (server code adding a
                member it vouches for, such as the room's owner).

        Returns:
            The member.

        Raises:
            Banned: The user is banned.
            RoomFull: ``max_members`` is reached.
            ApprovalRequired: The room admits by approval.
            NotAllowed: An anonymous user in a room that requires auth.
            ValueError: An unknown role.
        """
        _check_role(role)
        member: RoomMember = await self._ask(Join(user_id, display_name, role, subscriber, invited))
        return member

    async def leave(self, user_id: str) -> bool:
        """Remove a member; returns whether they were one."""
        left: bool = await self._ask(Leave(user_id))
        return left

    async def send_message(self, user_id: str, content: str, message_type: str = "text") -> RoomMessage:
        """Send a message to the room.

        Raises:
            NotAMember: The user is not a member.
            RateLimited: More than ``rate_limit`` messages in the last 60 s.
            InvalidMessage: A type not allowed, or more than
                ``max_message_length`` bytes of UTF-8.
        """
        message: RoomMessage = await self._ask(SendMessage(user_id, content, message_type))
        return message

    async def send_message_later(
        self,
        user_id: str,
        content: str,
        message_type: str,
        on_done: Callable[[RoomMessage | None, BaseException | None], None],
    ) -> None:
        """Send a message to the room without waiting for it to be handled.

        Returns once the room has queued it (waiting for room in its
        mailbox: backpressure); ``on_done(message, None)`` or
        ``on_done(None, error)`` is called when the room has handled it
        (with the errors of :meth:`send_message`), in the room's task, so it
        must not block. A sender can keep many messages in flight this way:
        the room handles a burst of them at once and its subscribers get
        them in few writes. Messages sent this way by one sender are handled
        in order.
        """
        if not self._ref.alive and self._resolve is not None:
            self._ref = await self._resolve()  # stopped idle: a new one resumes from the store
        await self._ref.ask_later(SendMessage(user_id, content, message_type), on_done)

    async def broadcast(self, data: Mapping[str, Any]) -> None:
        """Send a ``system`` event (stored, sequenced) to every subscriber."""
        await self._ask(Broadcast(dict(data)))

    async def send_to(self, data: Mapping[str, Any], *, roles: Sequence[str] | None = None, users: Sequence[str] | None = None) -> None:
        """Send a ``system`` event to the subscribers of members with ``roles`` or of ``users``.

        Events stored for a restricted audience are replayed (``get_events``)
        only to that audience.
        """
        await self._ask(SendTo(dict(data), None if roles is None else frozenset(roles), None if users is None else frozenset(users)))

    async def get_members(self) -> list[RoomMember]:
        """All members, in join order."""
        members: list[RoomMember] = await self._ask(GetMembers())
        return members

    async def get_member(self, user_id: str) -> RoomMember | None:
        """One member, or ``None``."""
        member: RoomMember | None = await self._ask(GetMember(user_id))
        return member

    async def get_history(self, limit: int | None = 50, since: Since | None = None) -> list[RoomMessage]:
        """Recent messages, newest last, in their current form (edited, deleted).

        Args:
            limit: At most this many (the newest); ``None``: all kept.
            since: Only messages after this position (``seq``, or
                ``(epoch, seq)``).

        Raises:
            HistoryUnavailable: Events after ``since`` are no longer all kept,
                ``since`` is in the future, or its epoch is not current.
        """
        _check_since(since)
        messages: list[RoomMessage] = await self._ask(GetHistory(limit, since))
        return messages

    async def get_events(self, since: Since | None = None, *, limit: int | None = None, user_id: str | None = None) -> list[Event]:
        """Sequenced events after ``since`` (exactly those, in order), for resuming.

        Args:
            since: A position (``seq`` or ``(epoch, seq)``); ``None``: all kept.
            limit: At most this many (the newest).
            user_id: Only events this member may see (audience); ``None``:
                all (server code).

        Raises:
            HistoryUnavailable: As for :meth:`get_history`.
            NotAMember: ``user_id`` is not a member.
        """
        _check_since(since)
        events: list[Event] = await self._ask(GetEvents(since, limit, user_id))
        return events

    async def kick(self, user_id: str, reason: str = "", *, by: str | None = None) -> bool:
        """Remove a member (who may rejoin); returns whether they were one.

        Raises:
            NotAllowed: ``by`` may not kick (see :data:`PERMISSIONS`).
        """
        kicked: bool = await self._ask(Kick(user_id, reason, by))
        return kicked

    async def ban(self, user_id: str, reason: str = "", *, by: str | None = None) -> bool:
        """Ban a user (removing them if a member); returns whether they were not banned yet."""
        banned: bool = await self._ask(BanUser(user_id, reason, by))
        return banned

    async def unban(self, user_id: str, *, by: str | None = None) -> bool:
        """Lift a ban; returns whether the user was banned."""
        unbanned: bool = await self._ask(UnbanUser(user_id, by))
        return unbanned

    async def is_banned(self, user_id: str) -> bool:
        """Whether the user is banned."""
        banned: bool = await self._ask(IsBanned(user_id))
        return banned

    async def set_role(self, user_id: str, role: str, *, by: str | None) -> RoomMember:
        """Change a member's role.

        Raises:
            NotAMember: The user is not a member.
            NotAllowed: ``by`` may not (see :data:`PERMISSIONS`).
            ValueError: An unknown role.
        """
        _check_role(role)
        member: RoomMember = await self._ask(ChangeRole(user_id, role, by))
        return member

    async def set_typing(self, user_id: str, typing: bool = True) -> None:
        """Set a member's typing indicator (expires after ``typing_timeout``).

        Queued without waiting for the room (updates are coalesced per user);
        ignored for non-members.
        """
        try:
            await self._ref.tell(SetTyping(user_id, typing))
            return
        except ActorStopped:
            if self._resolve is None:
                raise
        self._ref = await self._resolve()
        await self._ref.tell(SetTyping(user_id, typing))

    async def configure(self, config: RoomConfig) -> bool:
        """Replace the room's configuration, persisted and applied at once.

        It stays the room's configuration across restarts after a crash (a
        restart loads the stored one) and idle stops.

        Members beyond a lowered ``max_members`` stay (new joins are
        refused); a lowered ``history_size`` drops the oldest events now; a
        changed ``rate_limit`` counts from now; typing timers already running
        keep their timeout.

        Returns:
            Whether the configuration changed.

        Raises:
            TypeError: ``config`` is not a :class:`RoomConfig`.
        """
        if not isinstance(config, RoomConfig):
            raise TypeError(f"expected a RoomConfig, got {type(config).__name__}")
        changed: bool = await self._ask(Configure(config))
        return changed

    async def get_typing_users(self) -> list[str]:
        """Members typing now, in the order they started."""
        users: list[str] = await self._ask(GetTypingUsers())
        return users

    async def edit_message(self, user_id: str, message_id: str, content: str) -> RoomMessage:
        """Replace the content of one's own message.

        Raises:
            NotFound: No such message kept, or it was deleted.
            NotAllowed: ``user_id`` is not its author.
            InvalidMessage: The new content is too long.
        """
        message: RoomMessage = await self._ask(EditMessage(user_id, message_id, content))
        return message

    async def delete_message(self, user_id: str, message_id: str) -> bool:
        """Delete a message (its author, or a moderator/admin); returns whether it was not deleted yet.

        Raises:
            NotFound: No such message kept.
            NotAllowed: ``user_id`` may not delete it.
        """
        deleted: bool = await self._ask(DeleteMessage(user_id, message_id))
        return deleted

    async def request_join(self, user_id: str | None, display_name: str) -> JoinRequest:
        """Ask to join; moderators and admins see a ``join_request`` event.

        Asking again while pending returns the pending request.

        Raises:
            Banned: The user is banned.
            NotAllowed: The user is a member already (or anonymous).
        """
        request: JoinRequest = await self._ask(RequestJoin(user_id, display_name))
        return request

    async def approve(self, user_id: str, *, by: str | None = None) -> RoomMember:
        """Admit a pending request: the user becomes a member and is notified.

        Raises:
            NotFound: No pending request.
            RoomFull: ``max_members`` is reached.
            NotAllowed: ``by`` may not approve.
        """
        member: RoomMember = await self._ask(Approve(user_id, by))
        return member

    async def deny(self, user_id: str, reason: str = "", *, by: str | None = None) -> bool:
        """Refuse a pending request; the user is notified.

        Raises:
            NotFound: No pending request.
            NotAllowed: ``by`` may not deny.
        """
        denied: bool = await self._ask(Deny(user_id, reason, by))
        return denied

    async def get_join_requests(self, *, by: str | None = None) -> list[JoinRequest]:
        """Pending join requests (for moderators and admins)."""
        requests: list[JoinRequest] = await self._ask(GetJoinRequests(by))
        return requests

    async def subscribe(self, subscriber: Subscriber, *, since: Since | None = None) -> Resumption:
        """Deliver the room's events to a member's connection.

        Args:
            subscriber: The connection (of a member).
            since: The position of the last event the connection's client
                processed: the kept events after it (that the member may
                see) are delivered first, in the same step as the
                subscription, so none is missed or repeated.

        Returns:
            The room's position at subscription (events after it are
            delivered) and whether ``since`` was recovered. A ``since`` that
            cannot be resumed from (another epoch, evicted events, the
            future) subscribes all the same, with ``recovered=False``.

        Raises:
            NotAMember: The connection's user is not a member.
        """
        _check_since(since)
        resumption: Resumption = await self._ask(Subscribe(subscriber, since))
        return resumption

    async def join_connection(
        self,
        subscriber: Subscriber,
        display_name: str,
        role: str = "member",
        *,
        since: Since | None = None,
        invited: bool = False,
    ) -> RoomJoin:
        """Join the connection's user (unless a member already) and subscribe the connection, in one step.

        A member already is returned unchanged (``display_name`` and ``role``
        only apply to a new member). See :meth:`join` and :meth:`subscribe`.

        Raises:
            Banned: The user is banned.
            RoomFull: ``max_members`` is reached.
            ApprovalRequired: The room admits by approval (and the user is
                not a member).
            NotAllowed: The connection is anonymous and the room requires auth.
        """
        _check_role(role)
        _check_since(since)
        joined: RoomJoin = await self._ask(JoinConnection(subscriber, display_name, role, invited, since))
        return joined

    async def unsubscribe(self, connection_id: str) -> bool:
        """Stop delivering to a connection; returns whether it was subscribed."""
        removed: bool = await self._ask(Unsubscribe(connection_id))
        return removed

    async def statistics(self) -> RoomStatistics:
        """A snapshot of the room's counters."""
        stats: RoomStatistics = await self._ask(GetStatistics())
        return stats
