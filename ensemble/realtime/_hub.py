"""The hub: the whole supervision tree of the realtime actors, embedded.

``async with open_hub(config) as hub:`` starts, under one root supervisor::

    /<name>
      /rooms          one transient actor per room, started on first use,
                      stopped when idle, each with its own restart limit
      /mailboxes      one transient actor per user (notifications, devices)
      /connections    one temporary actor per connection
      /relay          delivers room outcomes (join decisions) to mailboxes
      /live           the live-query actor

and tears it down in reverse order on exit (connections first, closed with
1001). No network is needed: the server is a thin layer over this.

Room subscribers: the hub keeps each room's :class:`SubscriberRegistry` (the
connections subscribed to it) by room id, and hands it to the room's actor
and to each restart of it, so a restart after a crash keeps them (they get a
``room_reset``); a start from scratch (first use, after an idle stop or a
give-up) gets a new, empty one. When the rooms supervisor gives up on a room
(more than ``room_max_restarts`` crashes within ``room_max_seconds``), it
calls the room spec's ``on_given_up`` hook: every subscriber gets a ``room_closed`` event
(``data``: ``room_id``, ``reason="failed"``) and is unsubscribed (also in the
connection manager's room index); the next use of the room starts a fresh
incarnation from the store, with no subscribers.

The connection manager's room index (``ConnectionInfo.rooms``, what
``max_rooms_per_connection`` counts) follows the rooms' subscriptions: a
connection is put in a room when ``join_room`` subscribed it and taken out
by ``leave_room``, when the room is given up on (above), and when the room
unsubscribes it because its user's membership ended (kicked, banned, left
from any device): the room's ``on_dropped`` hook, called after the event
that says why was delivered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from ..actors import Actor, ActorRef, ActorStopped, ChildSpec, Supervisor, SupervisorSpec, TreeNode, open_supervisor
from ._connections import ConnectionManager, Transport
from ._errors import NotAMember, NotFound
from ._events import JOIN_DECISION, ROOM_CLOSED, Event
from ._live import LiveConfig, LiveQuery, start_live_query
from ._models import Connected, ConnectionInfo, Resumption, RoomConfig, RoomJoin
from ._notification_store import NotificationStore
from ._notifications import NotificationManager
from ._outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS
from ._ratelimit import WebSocketRateLimiter, WSRateLimitConfig
from ._registry import OnDemand
from ._room import Room, RoomActor, Since, SubscriberRegistry
from ._room_store import InMemoryRoomStore, RoomStore

logger = logging.getLogger("ensemble.hub")

_NESTED = {"room": RoomConfig, "rate_limit": WSRateLimitConfig, "live": LiveConfig}

ROOM_FAILED = "failed"
"""The ``reason`` of a ``room_closed`` event: the room crashed more than
``room_max_restarts`` times within ``room_max_seconds`` and was removed."""


@attrs.define
class _Connecting:
    """What ``Hub.connect`` and ``Hub.authenticate`` hand the connection
    manager's wiring (``on_opened``, ``on_authenticated``) as ``context``."""

    notifications_since: tuple[str, int] | None
    notifications: Resumption | None = None


def _valid_name(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not value or "/" in value:
        raise ValueError(f"{attribute.name} must be non-empty without '/', got {value!r}")


def _at_least_one_or_none(attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1 or None, got {value}")


@attrs.frozen(kw_only=True)
class HubConfig:
    """Configuration of a hub: one object, with named constructors.

    Args:
        name: The root supervisor's name (paths are ``/<name>/rooms/<id>``).
        room: The default :class:`RoomConfig` of rooms created without one.
        room_max_restarts: Restarts a room may take ...
        room_max_seconds: ... within this many seconds, before it is given
            up on alone (other rooms are unaffected).
        max_connections: Most connections at once.
        max_connections_per_user: Most connections of one user, or ``None``.
        max_metadata_keys: Most keys in a connection's metadata.
        outbox_max_events: Each connection's outbound queue bound, in events.
        outbox_max_bytes: ... and in bytes; beyond either the connection is
            a slow consumer and is closed with its resume positions.
        min_write_interval: Seconds a connection waits after a write before
            its next one: the events of a burst are written together (one
            wake-up and one system call for many events), at the price of at
            most this much latency; the first event after a quiet moment is
            written at once. 0: every wake-up writes.
        notifications_per_user: Most notifications kept per user.
        mailbox_idle_timeout: Seconds before an idle user mailbox stops.
        hibernate_after: Seconds without a message after which the actor of
            a connection, or of a user's mailbox, gives up its task until
            its next message (see ``ChildSpec.hibernate_after``): an idle
            connection then costs no actor task. A wake-up costs starting a
            task. A new connection's actors (and native reader) hibernate as
            soon as they are first idle. 0: never.
        mailbox_max_restarts: Restarts a user mailbox may take ...
        mailbox_max_seconds: ... within this many seconds, before it is
            given up on alone (its next use starts it again from its store).
        rate_limit: The inbound rate limit of every connection.
        max_rate_violations: Inbound messages over the rate limit in a row
            after which a connection is closed (4029); ``None``: never.
        live: Live-query settings.
    """

    name: str = attrs.field(default="hub", validator=_valid_name)
    room: RoomConfig = attrs.field(factory=RoomConfig)
    room_max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    room_max_seconds: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    max_connections: int = attrs.field(default=10_000, validator=attrs.validators.ge(0))
    max_connections_per_user: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    max_metadata_keys: int = attrs.field(default=32, validator=attrs.validators.ge(0))
    outbox_max_events: int = attrs.field(default=DEFAULT_MAX_EVENTS, validator=attrs.validators.ge(1))
    outbox_max_bytes: int = attrs.field(default=DEFAULT_MAX_BYTES, validator=attrs.validators.ge(1))
    min_write_interval: float = attrs.field(default=0.0, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(1)))
    notifications_per_user: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    mailbox_idle_timeout: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    hibernate_after: float = attrs.field(default=10.0, validator=[attrs.validators.ge(0), attrs.validators.lt(math.inf)])
    mailbox_max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    mailbox_max_seconds: float = attrs.field(default=5.0, validator=attrs.validators.ge(0))
    rate_limit: WSRateLimitConfig = attrs.field(factory=WSRateLimitConfig)
    max_rate_violations: int | None = attrs.field(default=3, validator=lambda _, attribute, value: _at_least_one_or_none(attribute, value))
    live: LiveConfig = attrs.field(factory=LiveConfig)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> HubConfig:
        """Build a config from plain data (such as parsed TOML or JSON).

        Nested sections (``room``, ``rate_limit``, ``live``) are mappings of
        their own fields.

        Raises:
            ValueError: An unknown key, or an invalid value.
            TypeError: A value of the wrong type.
        """
        known = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hub config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key, value in data.items():
            nested = _NESTED.get(key)
            if nested is not None and isinstance(value, Mapping):
                fields = {field.name for field in attrs.fields(nested)}
                bad = sorted(set(value) - fields)
                if bad:
                    raise ValueError(f"unknown keys in [{key}]: {', '.join(bad)} (known: {', '.join(sorted(fields))})")
                value = nested(**value)
            values[key] = value
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> HubConfig:
        """Read a config from a TOML file (its top-level table, or ``[hub]``)."""
        with open(path, "rb") as file:
            data = tomllib.load(file)
        section = data.get("hub", data)
        if not isinstance(section, Mapping):
            raise ValueError(f"{path}: [hub] must be a table")
        return cls.from_mapping(section)


@attrs.frozen
class _Relay:
    user_id: str
    event: Event


class _RelayActor(Actor):
    """Turns room outcomes for a user (join decisions) into notifications.

    Rooms hand these over with ``tell_nowait`` so that a room never waits on
    a user's mailbox; this actor does the waiting.
    """

    def __init__(self, notifications: NotificationManager) -> None:
        self.notifications = notifications

    async def receive(self, message: Any) -> Any:
        if not isinstance(message, _Relay):
            raise TypeError(f"unexpected message {message!r}")
        event = message.event
        data = dict(event.data)
        if event.type == JOIN_DECISION:
            approved = bool(data.get("approved"))
            room_id = data.get("room_id", "")
            title = "Join request approved" if approved else "Join request denied"
            body = f"Your request to join {room_id} was {'approved' if approved else 'denied'}."
            if not approved and data.get("reason"):
                body += f" Reason: {data['reason']}"
            await self.notifications.send(
                message.user_id,
                title,
                body,
                "success" if approved else "warning",
                data={"event": JOIN_DECISION, **data},
            )
        else:
            await self.notifications.send(message.user_id, event.type, "", "info", data={"event": event.type, **data})
        return None


class Hub:
    """The running realtime actors (from :func:`open_hub`).

    Attributes:
        config: The :class:`HubConfig`.
        connections: The :class:`ConnectionManager` (the seed's API).
        notifications: The :class:`NotificationManager` (the seed's API).
        live: The :class:`LiveQuery` (the seed's API, plus enter/leave).
        rate_limiter: The inbound :class:`WebSocketRateLimiter` that every
            connection actor checks in ``connections.receive``, on Trio's
            clock (so it follows a mock clock in tests).
        supervisor: The root supervisor (for ``snapshot()`` and metrics).
    """

    def __init__(
        self,
        *,
        config: HubConfig,
        supervisor: Supervisor,
        rooms_supervisor: Supervisor,
        room_store: RoomStore,
        connections: ConnectionManager,
        notifications: NotificationManager,
        live: LiveQuery,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.connections = connections
        self.notifications = notifications
        self.live = live
        assert connections.rate_limiter is not None
        self.rate_limiter: WebSocketRateLimiter = connections.rate_limiter
        self.room_store = room_store
        self._rooms_supervisor = rooms_supervisor
        self._room_configs: dict[str, RoomConfig] = {}
        self._room_subscribers: dict[str, SubscriberRegistry] = {}
        self._rooms = OnDemand(rooms_supervisor, self._room_spec)

    def __repr__(self) -> str:
        return f"<Hub {self.supervisor.path}: {self.connections.connection_count} connections, {len(self._rooms.running())} rooms running>"

    # -- rooms -------------------------------------------------------------------

    async def room(self, room_id: str, config: RoomConfig | None = None) -> Room:
        """The room ``room_id``, started (or resumed from its store) if needed.

        The returned :class:`Room` outlives the actor: a call that finds it
        stopped (idle, or given up on after crashing too often) starts the
        room again, from its store, and asks the new incarnation.

        Args:
            room_id: The room; non-empty, no ``/``, at most 200 characters.
            config: The room's configuration: used when the room starts
                (first use, or after an idle stop), and applied at once to a
                running room (see :meth:`Room.configure`); either way it is
                stored. ``None`` keeps the stored config, or the hub's
                default for a new room.

        Raises:
            ValueError: An invalid room id.
        """
        _check_id("room id", room_id)
        ref = await self._room_ref(room_id, config)
        room = Room(room_id, ref, resolve=functools.partial(self._room_ref, room_id))
        if config is not None and self._room_configs.pop(room_id, None) is not None:
            await room.configure(config)  # no start took it: the room was running
        return room

    async def _room_ref(self, room_id: str, config: RoomConfig | None = None) -> ActorRef:
        if config is not None:
            self._room_configs[room_id] = config
        try:
            return await self._rooms.get(room_id)
        except BaseException:
            if self._rooms.get_nowait(room_id) is None:  # it did not start: forget its registry
                registry = self._room_subscribers.get(room_id)
                if registry is not None and not registry:
                    del self._room_subscribers[room_id]
            raise

    def rooms_running(self) -> list[str]:
        """The ids of the rooms whose actors run now (idle ones are not)."""
        return self._rooms.running()

    def _room_spec(self, room_id: str) -> ChildSpec:
        config = self._room_configs.pop(room_id, None)
        # A new registry per start from scratch; restarts after a crash share it.
        registry = self._room_subscribers[room_id] = SubscriberRegistry()
        spec = RoomActor.spec(
            room_id,
            config,
            self.room_store,
            self._notify_user,
            subscribers=registry,
            default_config=self.config.room,
            on_exit=self._room_exited,
            on_dropped=self._room_dropped,
        )
        return attrs.evolve(
            spec,
            max_restarts=self.config.room_max_restarts,
            max_seconds=self.config.room_max_seconds,
            on_given_up=lambda _: self._room_given_up(room_id, registry),
        )

    def _room_exited(self, room_id: str, ref: ActorRef, subscribers: SubscriberRegistry, crashed: bool) -> None:
        """An incarnation of a room ended (the rooms' ``on_exit`` hook)."""
        if not crashed and self._room_subscribers.get(room_id) is subscribers:
            # Stopped for good (idle, or shutdown): nobody uses the registry any more.
            del self._room_subscribers[room_id]

    def _room_dropped(self, room_id: str, user_id: str, connection_ids: Sequence[str]) -> None:
        """A room unsubscribed a user's connections: the membership ended (the rooms' ``on_dropped`` hook).

        Takes the room out of those connections' room index, so it no longer
        counts as joined (nor against ``max_rooms_per_connection``).
        """
        for connection_id in connection_ids:
            self.connections.remove_room(connection_id, room_id)
        logger.debug("room %s unsubscribed %d connections of %s, no longer a member", room_id, len(connection_ids), user_id)

    def _room_given_up(self, room_id: str, subscribers: SubscriberRegistry) -> None:
        current = self._room_subscribers.get(room_id)
        if current is subscribers:
            del self._room_subscribers[room_id]
            current = None
        # Connections that joined a fresh incarnation meanwhile stay in it.
        resubscribed = current.by_connection if current is not None else {}
        closed = Event(type=ROOM_CLOSED, topic=f"room:{room_id}", data={"room_id": room_id, "reason": ROOM_FAILED})
        told = 0
        for subscriber in subscribers.subscribers():
            connection_id = subscriber.connection_id
            if connection_id in resubscribed:
                continue
            try:
                subscriber.deliver_nowait(closed)
            except Exception as exc:
                logger.warning("subscriber %s of room %s raised %r", connection_id, room_id, exc)
            self.connections.remove_room(connection_id, room_id)
            told += 1
        subscribers.clear()
        logger.warning("room %s was given up on after repeated crashes; %d subscribed connections were told", room_id, told)

    async def _notify_user(self, user_id: str, event: Event) -> None:
        relay = self.supervisor.child("relay")
        if relay is None or isinstance(relay, Supervisor):
            logger.warning("no relay to deliver %s to %s", event.type, user_id)
            return
        relay.tell_nowait(_Relay(user_id, event))

    # -- connections -----------------------------------------------------------------

    async def connect(
        self,
        transport: Transport,
        user_id: str | None = None,
        metadata: Mapping[str, object] | None = None,
        *,
        notifications_since: tuple[str, int] | None = None,
    ) -> Connected:
        """Open a connection and attach it to its user's mailbox (all devices
        then receive the user's notifications).

        Args:
            transport: Where the connection's events are written.
            user_id: The authenticated user, or ``None`` (anonymous).
            metadata: Custom metadata (copied).
            notifications_since: The ``(epoch, seq)`` of the last
                notification this device processed: the user's
                notifications after it are put in the connection's outbox
                before any live one, in the same step as the attachment, so
                none is missed or repeated. See :class:`Resumption`.

        Returns:
            The connection's :class:`ConnectionInfo`, with ``notifications``:
            where its notification stream starts and whether
            ``notifications_since`` was recovered (``recovered=False``: the
            position was from another epoch, evicted, or in the future; the
            device is attached from now and must reload its notifications).

        Raises:
            TooManyConnections: A connection limit is reached.
            ValueError: Too many metadata keys, an invalid user id, or
                ``notifications_since`` for an anonymous connection.
            TypeError: ``notifications_since`` is not an ``(epoch, seq)`` pair.
        """
        if user_id is not None:
            _check_id("user id", user_id)
        if notifications_since is not None:
            if user_id is None:
                raise ValueError("notifications_since needs a user_id: an anonymous connection gets no notifications")
            _check_position("notifications_since", notifications_since)
        connecting = _Connecting(notifications_since)
        info = await self.connections.connect(transport, user_id, metadata, context=connecting)
        return Connected(**attrs.asdict(info, recurse=False), notifications=connecting.notifications)

    async def authenticate(
        self,
        connection_id: str,
        user_id: str,
        *,
        notifications_since: tuple[str, int] | None = None,
    ) -> Connected:
        """Give an anonymous connection its user, in place, and attach it to
        the user's mailbox (in-band authentication).

        The connection keeps its id, transport and outbox; it becomes one of
        the user's devices exactly as if :meth:`connect` had opened it for
        the user (per-user limit, presence, notifications); see
        ``connections.authenticate``. May be called from the connection's
        own ``on_message`` handler.

        Args:
            connection_id: The connection.
            user_id: The authenticated user.
            notifications_since: The ``(epoch, seq)`` of the last
                notification this device processed: the user's
                notifications after it are put in the connection's outbox
                before any live one, as in :meth:`connect`.

        Returns:
            The connection's :class:`ConnectionInfo`, with ``notifications``
            as :meth:`connect` returns it. If the connection had this user
            already, nothing is done (``notifications_since`` is ignored)
            and ``notifications`` is ``None``.

        Raises:
            NotFound: The connection is not open.
            TooManyConnections: ``max_connections_per_user`` is reached (the
                connection stays open, anonymous).
            ValueError: An invalid user id, or the connection has another
                user already.
            TypeError: ``notifications_since`` is not an ``(epoch, seq)`` pair.
        """
        _check_id("user id", user_id)
        if notifications_since is not None:
            _check_position("notifications_since", notifications_since)
        connecting = _Connecting(notifications_since)
        info = await self.connections.authenticate(connection_id, user_id, context=connecting)
        return Connected(**attrs.asdict(info, recurse=False), notifications=connecting.notifications)

    async def _connection_opened(self, info: ConnectionInfo, context: Any) -> None:
        """Wire a connection to its user, however it got one: attach it to
        the user's mailbox so every device gets the user's notifications.

        Awaited by the connection manager inside ``connect`` (``on_opened``)
        and ``authenticate`` (``on_authenticated``), with the ``context``
        given to it: a :class:`_Connecting` from :meth:`connect` or
        :meth:`authenticate` (the attachment replays from its position and
        records the outcome), or ``None`` for a connection opened (or
        authenticated) on the manager directly.
        """
        if info.user_id is None:
            return
        subscriber = self.connections.get_subscriber(info.connection_id)
        if subscriber is None:
            return
        connecting = context if isinstance(context, _Connecting) else None
        since = None if connecting is None else connecting.notifications_since
        attached = await self.notifications.attach(info.user_id, subscriber, since=since, strict=False)
        if connecting is not None:
            connecting.notifications = Resumption(
                topic=f"user:{info.user_id}",
                epoch=attached.epoch,
                last_seq=attached.last_seq,
                recovered=attached.recovered,
                replayed=len(attached.replayed),
            )

    async def disconnect(self, connection_id: str) -> bool:
        """Close a connection (normal closure); see ``connections.disconnect``."""
        return await self.connections.disconnect(connection_id)

    async def join_room(
        self,
        connection_id: str,
        room_id: str,
        *,
        display_name: str | None = None,
        role: str = "member",
        since: Since | None = None,
    ) -> RoomJoin:
        """Join the connection's user to a room and subscribe the connection.

        A user who is a member already just gets this connection subscribed
        (another device). The room does both in one step.

        Args:
            connection_id: The connection.
            room_id: The room (started if needed).
            display_name: A new member's name (default: the user id).
            role: A new member's role (trusted: the server decides it).
            since: The position (``(epoch, seq)``, or a bare ``seq``) of the
                last room event this connection's client processed: the
                events after it (that the user may see) are put in the
                connection's outbox before any live one, in the same step as
                the subscription, so none is missed or repeated.

        Returns:
            The member and the subscription's :class:`Resumption`: its
            position, and whether ``since`` was ``recovered``
            (``False``: another epoch, evicted events, or a position in the
            future; the connection is subscribed from now all the same and
            its client must reload the room).

        Raises:
            NotFound: No such connection.
            NotAMember: The connection is anonymous.
            PermissionError: Banned, room full, approval required, ...
        """
        info = self.connections.get_connection(connection_id)
        subscriber = self.connections.get_subscriber(connection_id)
        if info is None or subscriber is None:
            raise NotFound(f"no connection {connection_id!r}")
        if info.user_id is None:
            raise NotAMember(f"connection {connection_id!r} is anonymous and cannot join rooms")
        room = await self.room(room_id)
        joined = await room.join_connection(subscriber, display_name or info.user_id, role, since=since)
        try:
            self.connections.add_room(connection_id, room_id)
        except NotFound:
            # Closed meanwhile, and cleaned up without this room: undo.
            await room.unsubscribe(connection_id)
            raise
        registry = self._room_subscribers.get(room_id)
        if registry is None or connection_id not in registry.by_connection:
            # Unsubscribed after the room replied, before the index had the
            # room (the membership ended, or the room was given up on): the
            # room's hook found nothing to take out, so take it out here.
            self.connections.remove_room(connection_id, room_id)
        return joined

    async def leave_room(self, connection_id: str, room_id: str) -> bool:
        """Stop delivering a room's events to a connection (membership stays)."""
        removed = self.connections.remove_room(connection_id, room_id)
        ref = self._rooms.get_nowait(room_id)
        if ref is not None:
            with contextlib.suppress(ActorStopped):  # stopped meanwhile: nobody is subscribed to it any more
                await Room(room_id, ref).unsubscribe(connection_id)
        return removed

    async def _connection_closed(self, info: ConnectionInfo) -> None:
        """Clean up after a connection, whatever closed it."""
        for room_id in info.rooms:
            ref = self._rooms.get_nowait(room_id)
            if ref is not None:
                try:
                    await Room(room_id, ref).unsubscribe(info.connection_id)
                except Exception as exc:  # a room that stopped meanwhile
                    logger.debug("unsubscribing %s from %s: %r", info.connection_id, room_id, exc)
        await self.live.unwatch_connection(info.connection_id)
        if info.user_id is not None:
            await self.notifications.detach(info.user_id, info.connection_id)

    # -- presence and introspection ----------------------------------------------------

    def is_online(self, user_id: str) -> bool:
        """Whether the user has at least one open connection (any device)."""
        return self.connections.is_online(user_id)

    def snapshot(self) -> TreeNode:
        """The supervision tree with every actor's statistics."""
        return self.supervisor.snapshot()


def _check_id(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or "/" in value or len(value) > 200:
        raise ValueError(f"{what} must be a non-empty string without '/' of at most 200 characters, got {value!r}")


def _check_position(what: str, value: object) -> None:
    if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and type(value[1]) is int):
        raise TypeError(f"{what} must be an (epoch, seq) tuple, got {value!r}")


@asynccontextmanager
async def open_hub(
    config: HubConfig | None = None,
    *,
    room_store: RoomStore | None = None,
    notification_store: NotificationStore | None = None,
) -> AsyncIterator[Hub]:
    """Start the realtime actors inside the caller's Trio program.

    Args:
        config: The hub's configuration (default: :class:`HubConfig`).
        room_store: Where room state lives (default: in memory).
        notification_store: Where notifications live (default: in memory).

    Yields:
        The running :class:`Hub`. On exit connections are closed with 1001,
        then every actor stops in reverse start order.
    """
    config = config or HubConfig()
    store = room_store if room_store is not None else InMemoryRoomStore()
    hub: Hub | None = None

    async def opened(info: ConnectionInfo, context: Any) -> None:
        if hub is not None:
            await hub._connection_opened(info, context)

    async def closed(info: ConnectionInfo) -> None:
        if hub is not None:
            await hub._connection_closed(info)

    async with open_supervisor(name=config.name) as root:
        mailboxes = await root.start_child(SupervisorSpec(id="mailboxes", max_restarts=1000, max_seconds=1.0))
        rooms_supervisor = await root.start_child(SupervisorSpec(id="rooms", max_restarts=1000, max_seconds=1.0))
        notifications = NotificationManager(
            mailboxes,
            notification_store,
            max_per_user=config.notifications_per_user,
            idle_timeout=config.mailbox_idle_timeout,
            hibernate_after=config.hibernate_after or None,
            max_restarts=config.mailbox_max_restarts,
            max_seconds=config.mailbox_max_seconds,
        )
        await root.start_child(ChildSpec(id="relay", factory=lambda: _RelayActor(notifications)))
        live = await start_live_query(root, id="live", config=config.live)
        connections_supervisor = await root.start_child(SupervisorSpec(id="connections", max_restarts=1000, max_seconds=1.0))
        connections = ConnectionManager(
            connections_supervisor,
            max_connections=config.max_connections,
            max_connections_per_user=config.max_connections_per_user,
            max_metadata_keys=config.max_metadata_keys,
            outbox_max_events=config.outbox_max_events,
            outbox_max_bytes=config.outbox_max_bytes,
            min_write_interval=config.min_write_interval,
            on_opened=opened,
            on_closed=closed,
            on_authenticated=opened,
            rate_limiter=WebSocketRateLimiter(config.rate_limit, clock=trio.current_time),
            max_rate_violations=config.max_rate_violations,
            hibernate_after=config.hibernate_after or None,
        )
        hub = Hub(
            config=config,
            supervisor=root,
            rooms_supervisor=rooms_supervisor,
            room_store=store,
            connections=connections,
            notifications=notifications,
            live=live,
        )
        try:
            yield hub
        finally:
            with trio.CancelScope(shield=True):
                await connections.disconnect_all()
