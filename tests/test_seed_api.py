"""Issue 3 audit: one test per method of the seed's realtime API (seed 000).

Each test asserts the behaviour the seed *documents* (return values and
types, exceptions, defaults), written only against the public API
(``import ensemble`` and ``ensemble.realtime``), through ``open_hub`` where
the hub provides the object.

Deliberate differences from the seed (each noted again where tested):

* Room queries (``get_members``, ``get_member``, ``get_history``,
  ``is_banned``, ``get_typing_users``) are ``async``: they ask the room actor.
* ``Room.join(user_id, display_name, role="member")``: no ``ws`` argument
  (connections subscribe through ``hub.join_room`` or ``subscriber=``), so
  ``role`` is the third positional parameter instead of the fourth.
* ``kick``/``ban``/``unban`` take an extra keyword ``by=`` (the acting member,
  checked against the permission table; ``None`` is trusted server code).
* NotificationManager reads (``get_unread``, ``mark_read``,
  ``mark_all_read``, ``clear``) are ``async`` (they ask the user's mailbox);
  ``subscribe``/``unsubscribe`` stay sync. Callbacks get the
  :class:`ensemble.Notification` itself rather than a channel message.
  ``broadcast_all`` returns one notification per subscribed user (a list),
  not a single ``Notification``. ``send_many`` also accepts ``data=``.
* ``LiveQuery.watch``/``unwatch`` are ``async`` (they ask the live actor);
  ``ModelChange.changed_fields`` is a tuple, not a list.
* ``ConnectionInfo`` has no ``ws`` and is a frozen snapshot (``rooms`` is a
  frozenset; rooms are changed with ``hub.connections.add_room``).
* ``WebSocketRateLimiter`` takes a keyword ``clock=``; ``hub.rate_limiter``
  runs on Trio's clock, so ``autojump_clock`` drives its windows.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import ensemble
import ensemble.realtime
from ensemble import (
    ConnectionInfo,
    HubConfig,
    MemoryTransport,
    ModelChange,
    Notification,
    RoomConfig,
    RoomMember,
    RoomMessage,
    WebSocketRateLimiter,
    WSRateLimitConfig,
)

Clock = trio.testing.MockClock


@asynccontextmanager
async def hub_with(config: HubConfig | None = None) -> AsyncIterator[ensemble.Hub]:
    async with ensemble.open_hub(config) as hub:
        yield hub


async def settle() -> None:
    """Let every actor run until all are blocked (no time passes)."""
    await trio.testing.wait_all_tasks_blocked()


def of_type(transport: MemoryTransport, kind: str) -> list[dict[str, Any]]:
    return [event for event in transport.events if event["type"] == kind]


def drain(watch: ensemble.realtime.LiveWatch) -> list[ModelChange]:
    changes: list[ModelChange] = []
    while True:
        try:
            changes.append(watch.receive_nowait())
        except trio.WouldBlock:
            return changes


# -- records and configuration ------------------------------------------------------


def test_seed_names_are_exported() -> None:
    # The issue: these names are exported from ``ensemble`` itself.
    for name in (
        "open_hub",
        "RoomConfig",
        "RoomMember",
        "RoomMessage",
        "Notification",
        "ModelChange",
        "ConnectionInfo",
        "WebSocketRateLimiter",
        "WSRateLimitConfig",
    ):
        assert hasattr(ensemble, name), name
    # The seed's manager classes live in ensemble.realtime (the hub makes them).
    for name in ("Room", "NotificationManager", "LiveQuery", "ConnectionManager"):
        assert hasattr(ensemble.realtime, name), name
    # The finer exception types subclass the seed's.
    assert issubclass(ensemble.Banned, PermissionError)
    assert issubclass(ensemble.RoomFull, PermissionError)
    assert issubclass(ensemble.NotAMember, PermissionError)
    assert issubclass(ensemble.RateLimited, PermissionError)
    assert issubclass(ensemble.InvalidMessage, ValueError)
    assert issubclass(ensemble.TooManyConnections, ConnectionError)


def test_seed_auth_helpers_exist() -> None:
    for name in ("ws_authenticated", "ws_auth_from_query", "ws_auth_from_cookie"):
        assert hasattr(ensemble.realtime, name), name


def test_room_config_defaults_are_the_seeds() -> None:
    config = RoomConfig()
    assert config.max_members == 100
    assert config.history_size == 100
    assert config.require_auth is True
    assert config.allowed_message_types == frozenset({"text", "image", "file", "system"})
    assert config.rate_limit == 30
    assert config.max_message_length == 65536
    # The additions.
    assert config.join_policy == "open"
    assert config.typing_timeout == 5.0


def test_ws_rate_limit_config_defaults_are_the_seeds() -> None:
    config = WSRateLimitConfig()
    assert (config.messages_per_second, config.messages_per_minute, config.burst_size) == (10, 120, 20)


def test_records_carry_the_seeds_fields() -> None:
    seed_fields = {
        RoomMember: {"user_id", "display_name", "role", "joined_at"},  # no ``ws`` here: see connections
        RoomMessage: {"id", "room_id", "user_id", "display_name", "content", "message_type", "timestamp", "edited", "deleted"},
        Notification: {"id", "user_id", "title", "body", "notification_type", "data", "read", "created_at"},
        ModelChange: {"model_name", "action", "pk", "data", "changed_fields", "timestamp"},
        ConnectionInfo: {"connection_id", "user_id", "connected_at", "rooms", "metadata"},  # no ``ws``
    }
    for cls, fields in seed_fields.items():
        assert fields <= {field.name for field in attrs.fields(cls)}, cls
    # RoomMessage and Notification also carry their position (the issue).
    assert {"seq", "epoch"} <= {field.name for field in attrs.fields(RoomMessage)}
    assert {"seq", "epoch"} <= {field.name for field in attrs.fields(Notification)}


# -- Room ----------------------------------------------------------------------------


async def test_room_join(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general", RoomConfig(max_members=2))
        before = time.time()
        # Seed: join(user_id, display_name, ws=None, role="member"); ours has
        # no ``ws`` (connections subscribe separately), so role is third.
        alice = await room.join("user1", "Alice", role="admin")
        assert isinstance(alice, RoomMember)
        assert (alice.user_id, alice.display_name, alice.role) == ("user1", "Alice", "admin")
        assert isinstance(alice.joined_at, float)
        assert alice.joined_at >= before - 1  # a Unix timestamp
        bob = await room.join("user2", "Bob")
        assert bob.role == "member"
        # Full: PermissionError.
        with pytest.raises(PermissionError):
            await room.join("user3", "Carol")
        # Banned: PermissionError.
        await room.ban("user2")
        with pytest.raises(PermissionError):
            await room.join("user2", "Bob")
        # require_auth=True (the default): an anonymous join is refused.
        with pytest.raises(PermissionError):
            await room.join(None, "Anon")


async def test_room_leave(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice")
        assert await room.leave("user1") is True
        assert await room.get_member("user1") is None
        assert await room.leave("user1") is False  # not present
        assert await room.leave("nobody") is False


async def test_room_send_message(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice", role="admin")
        before = time.time()
        msg = await room.send_message("user1", "Hello everyone!")
        assert isinstance(msg, RoomMessage)
        assert (msg.room_id, msg.user_id, msg.display_name, msg.content, msg.message_type) == (
            "general",
            "user1",
            "Alice",
            "Hello everyone!",
            "text",
        )
        assert isinstance(msg.id, str)
        assert msg.id
        assert msg.timestamp >= before - 1
        assert (msg.edited, msg.deleted) == (False, False)
        img = await room.send_message("user1", "photo.jpg", message_type="image")
        assert img.message_type == "image"
        assert img.id != msg.id
        assert img.seq > msg.seq  # strictly increasing per room (the issue)
        d = msg.to_dict()
        assert d["content"] == "Hello everyone!"
        assert d["id"] == msg.id

        # Not a member: PermissionError.
        with pytest.raises(PermissionError):
            await room.send_message("stranger", "hi")
        # Type not allowed: ValueError.
        with pytest.raises(ValueError, match="type"):
            await room.send_message("user1", "clip.mp4", message_type="video")
        # Content longer than max_message_length (65536 *bytes*): ValueError.
        await room.send_message("user1", "x" * 65536, message_type="file")
        with pytest.raises(ValueError, match="max_message_length"):
            await room.send_message("user1", "x" * 65537)
        with pytest.raises(ValueError, match="max_message_length"):
            await room.send_message("user1", "é" * 32769)  # 65538 bytes of UTF-8


async def test_room_send_message_rate_limit_is_30_per_minute_per_user(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")  # default RoomConfig: rate_limit=30 per minute
        await room.join("user1", "Alice")
        await room.join("user2", "Bob")
        start = trio.current_time()
        for n in range(30):
            await room.send_message("user1", f"m{n}")
        with pytest.raises(PermissionError):  # rate limited
            await room.send_message("user1", "one too many")
        await room.send_message("user2", "per user: Bob is not limited")
        await trio.sleep_until(start + 60.0)
        await room.send_message("user1", "a minute later")


async def test_room_broadcast(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        transport = MemoryTransport()
        conn = await hub.connect(transport, "user1")
        await hub.join_room(conn.connection_id, "general")
        room = await hub.room("general")
        result = await room.broadcast({"type": "system", "text": "Welcome to the room!"})
        assert result is None
        await settle()
        system = of_type(transport, "system")
        assert len(system) == 1
        assert system[0]["data"] == {"type": "system", "text": "Welcome to the room!"}


async def test_room_get_members(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        assert await room.get_members() == []  # async here (asks the room)
        await room.join("user1", "Alice", role="admin")
        await room.join("user2", "Bob")
        members = await room.get_members()
        assert isinstance(members, list)
        assert all(isinstance(m, RoomMember) for m in members)
        assert [(m.user_id, m.role) for m in members] == [("user1", "admin"), ("user2", "member")]
        await room.leave("user2")
        assert [m.user_id for m in await room.get_members()] == ["user1"]


async def test_room_get_member(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        joined = await room.join("user1", "Alice")
        member = await room.get_member("user1")  # async here
        assert member == joined
        assert isinstance(member, RoomMember)
        assert await room.get_member("nobody") is None


async def test_room_get_history(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general", RoomConfig(rate_limit=1000))
        await room.join("user1", "Alice")
        await room.broadcast({"text": "not a message"})  # history is of messages
        sent = [await room.send_message("user1", f"m{n}") for n in range(60)]
        history = await room.get_history()  # async here; limit=50 by default
        assert isinstance(history, list)
        assert all(isinstance(m, RoomMessage) for m in history)
        assert [m.content for m in history] == [m.content for m in sent[-50:]]  # newest last
        assert [m.id for m in await room.get_history(limit=20)] == [m.id for m in sent[-20:]]
        # history_size=100 by default: at most 100 stored.
        assert len(await room.get_history(limit=1000)) <= 100

    async with hub_with() as hub:
        room = await hub.room("small", RoomConfig(history_size=10, rate_limit=1000))
        await room.join("user1", "Alice")
        sent = [await room.send_message("user1", f"m{n}") for n in range(15)]
        assert [m.id for m in await room.get_history(limit=50)] == [m.id for m in sent[-10:]]


async def test_room_get_history_keeps_100_messages_by_default(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general", RoomConfig(rate_limit=1000))
        await room.join("user1", "Alice")
        sent = [await room.send_message("user1", f"m{n}") for n in range(120)]
        assert [m.id for m in await room.get_history(limit=None)] == [m.id for m in sent[-100:]]


async def test_room_kick(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice", role="admin")
        await room.join("user2", "Bob")
        assert await room.kick("user2", reason="spam") is True
        assert await room.get_member("user2") is None
        assert await room.is_banned("user2") is False
        assert await room.kick("user2") is False  # not a member any more
        await room.join("user2", "Bob")  # a kicked user can rejoin
        # Ours: ``by=`` names the acting member; a plain member may not kick.
        with pytest.raises(PermissionError):
            await room.kick("user1", by="user2")


async def test_room_ban(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice", role="admin")
        await room.join("user3", "Carol")
        assert await room.ban("user3", reason="harassment") is True
        assert await room.get_member("user3") is None  # removed
        with pytest.raises(PermissionError):  # cannot rejoin
            await room.join("user3", "Carol")
        assert await room.ban("user3") is False  # already banned
        assert await room.ban("user4") is True  # a non-member can be banned ahead
        with pytest.raises(PermissionError):
            await room.join("user4", "Dan")


async def test_room_unban(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.ban("user3")
        assert await room.unban("user3") is True
        assert await room.is_banned("user3") is False
        assert await room.unban("user3") is False  # was not banned
        member = await room.join("user3", "Carol")  # can rejoin
        assert member.user_id == "user3"


async def test_room_is_banned(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        assert await room.is_banned("user3") is False  # async here
        await room.ban("user3")
        assert await room.is_banned("user3") is True
        await room.unban("user3")
        assert await room.is_banned("user3") is False


async def test_room_set_typing(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice")
        assert await room.set_typing("user1", True) is None
        assert await room.get_typing_users() == ["user1"]
        await room.set_typing("user1", False)
        assert await room.get_typing_users() == []
        await room.set_typing("user1")  # typing=True by default
        assert await room.get_typing_users() == ["user1"]
        await room.set_typing("stranger")  # non-members are ignored
        assert await room.get_typing_users() == ["user1"]
        # Typing indicators are not messages.
        assert await room.get_history() == []


async def test_room_typing_expires_after_exactly_5_seconds(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("user1", "Alice")
        start = trio.current_time()
        await room.set_typing("user1", True)
        await trio.sleep_until(start + 4.999)
        assert await room.get_typing_users() == ["user1"]
        await trio.sleep_until(start + 5.0)
        assert await room.get_typing_users() == []


async def test_room_get_typing_users(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        assert await room.get_typing_users() == []  # async here
        for user in ("user1", "user2", "user3"):
            await room.join(user, user.title())
        await room.set_typing("user2")
        await room.set_typing("user1")
        typing = await room.get_typing_users()
        assert isinstance(typing, list)
        assert all(isinstance(u, str) for u in typing)
        assert sorted(typing) == ["user1", "user2"]
        await room.leave("user2")  # leaving clears the indicator
        assert await room.get_typing_users() == ["user1"]


# -- NotificationManager ----------------------------------------------------------------


async def test_notifications_send(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        before = time.time()
        n = await notifier.send("user1", "Welcome", "You have joined!", "info")
        assert isinstance(n, Notification)
        assert (n.user_id, n.title, n.body, n.notification_type, n.data, n.read) == (
            "user1",
            "Welcome",
            "You have joined!",
            "info",
            None,
            False,
        )
        assert isinstance(n.id, str)
        assert n.id
        assert n.created_at >= before - 1
        default = await notifier.send("user1", "T", "B")
        assert default.notification_type == "info"  # the default type
        shipped = await notifier.send(
            "user1", "Order Shipped", "Your order is on the way", "success", data={"order_id": "12345", "tracking": "XYZ"}
        )
        assert dict(shipped.data or {}) == {"order_id": "12345", "tracking": "XYZ"}
        assert shipped.to_dict()["data"] == {"order_id": "12345", "tracking": "XYZ"}
        for kind in ("warning", "error", "success"):
            assert (await notifier.send("user1", "t", "b", kind)).notification_type == kind
        with pytest.raises(ValueError, match="notification_type"):
            await notifier.send("user1", "t", "b", "critical")


async def test_notifications_max_per_user_is_1000_oldest_evicted(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        sent = [await notifier.send("user1", f"n{n}", "body") for n in range(1001)]
        unread = await notifier.get_unread("user1")
        assert len(unread) == 1000
        assert {n.id for n in unread} == {n.id for n in sent[1:]}  # the oldest was evicted
        assert await notifier.mark_read("user1", sent[0].id) is False


async def test_notifications_send_many(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        result = await notifier.send_many(["user1", "user2", "user3"], "System Update", "New version deployed")
        assert isinstance(result, list)
        assert all(isinstance(n, Notification) for n in result)
        assert [n.user_id for n in result] == ["user1", "user2", "user3"]
        assert all((n.title, n.body, n.notification_type) == ("System Update", "New version deployed", "info") for n in result)
        for user in ("user1", "user2", "user3"):
            assert [n.title for n in await notifier.get_unread(user)] == ["System Update"]
        with pytest.raises(ValueError, match="notification_type"):
            await notifier.send_many(["user1"], "t", "b", "nope")


async def test_notifications_broadcast_all(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        received: list[Notification] = []
        notifier.subscribe("user1", received.append)
        notifier.subscribe("user2", received.append)
        # Seed: returns a Notification; ours returns one per subscribed user.
        result = await notifier.broadcast_all("Maintenance", "Server restart in 5 minutes", "warning")
        assert sorted(n.user_id for n in result) == ["user1", "user2"]
        assert all(isinstance(n, Notification) and n.notification_type == "warning" for n in result)
        await settle()
        assert sorted(n.user_id for n in received) == ["user1", "user2"]
        assert await notifier.get_unread("user3") == []  # not subscribed
        with pytest.raises(ValueError, match="notification_type"):
            await notifier.broadcast_all("t", "b", "nope")


async def test_notifications_subscribe(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        received: list[Notification] = []

        def my_callback(msg: Notification) -> None:
            received.append(msg)

        sub_id = notifier.subscribe("user1", my_callback)  # sync, as in the seed
        assert isinstance(sub_id, int)
        other = notifier.subscribe("user1", my_callback)
        assert other != sub_id
        sent = await notifier.send("user1", "Hi", "there")
        await notifier.send("user2", "Not", "for user1")
        await settle()
        # Each subscription is called once; ours passes the Notification itself.
        assert [n.id for n in received] == [sent.id, sent.id]


async def test_notifications_unsubscribe(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        received: list[Notification] = []
        sub_id = notifier.subscribe("user1", received.append)
        assert notifier.unsubscribe("user1", sub_id) is True
        assert notifier.unsubscribe("user1", sub_id) is False
        assert notifier.unsubscribe("user2", 12345) is False
        await notifier.send("user1", "Hi", "there")
        await settle()
        assert received == []


async def test_notifications_get_unread(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        assert await notifier.get_unread("user1") == []  # async here
        first = await notifier.send("user1", "a", "1")
        second = await notifier.send("user1", "b", "2")
        await notifier.mark_read("user1", first.id)
        unread = await notifier.get_unread("user1")
        assert isinstance(unread, list)
        assert all(isinstance(n, Notification) for n in unread)
        assert [n.id for n in unread] == [second.id]
        assert all(n.read is False for n in unread)


async def test_notifications_mark_read(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        n = await notifier.send("user1", "a", "1")
        assert await notifier.mark_read("user1", n.id) is True
        assert await notifier.get_unread("user1") == []
        assert await notifier.mark_read("user1", "no-such-id") is False
        assert await notifier.mark_read("user2", n.id) is False  # another user's


async def test_notifications_mark_all_read(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        first = await notifier.send("user1", "a", "1")
        for title in ("b", "c"):
            await notifier.send("user1", title, "x")
        await notifier.mark_read("user1", first.id)
        count = await notifier.mark_all_read("user1")
        assert count == 2  # int: how many were marked
        assert await notifier.get_unread("user1") == []
        assert await notifier.mark_all_read("user1") == 0
        assert await notifier.mark_all_read("nobody") == 0


async def test_notifications_clear(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        notifier = hub.notifications
        first = await notifier.send("user1", "a", "1")
        await notifier.send("user1", "b", "2")
        await notifier.mark_read("user1", first.id)
        cleared = await notifier.clear("user1")
        assert cleared == 2  # int: read ones count too
        assert await notifier.get_unread("user1") == []
        assert await notifier.clear("user1") == 0
        assert await notifier.mark_read("user1", first.id) is False


# -- LiveQuery ---------------------------------------------------------------------------


async def test_live_watch(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        all_posts = await live.watch("Post")  # async here
        assert isinstance(all_posts, str)
        comments_42 = await live.watch("Comment", filters={"post_id": 42})
        assert comments_42 != all_posts
        await live.notify_create("Post", 1, {"title": "a"})
        await live.notify_create("Comment", 10, {"post_id": 42, "text": "yes"})
        await live.notify_create("Comment", 11, {"post_id": 7, "text": "no"})
        await live.version("Comment")  # waits until the actor has handled them
        assert [c.pk for c in drain(live.subscription(all_posts))] == [1]
        assert [c.pk for c in drain(live.subscription(comments_42))] == [10]  # only matching changes


async def test_live_unwatch(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        sub_id = await live.watch("Post")
        changes = live.subscription(sub_id)
        assert await live.unwatch(sub_id) is True  # async here
        assert await live.unwatch(sub_id) is False
        assert await live.unwatch("never-existed") is False
        await live.notify_create("Post", 1, {"title": "a"})
        await live.version("Post")
        with pytest.raises(trio.EndOfChannel):
            changes.receive_nowait()


async def test_live_on_change(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        seen: list[ModelChange] = []

        @live.on_change("Post")
        async def handle_post_change(change: ModelChange) -> None:
            seen.append(change)

        assert callable(handle_post_change)  # the decorator returns the handler
        await live.notify_create("Post", 1, {"title": "Hello", "body": "x"})
        await live.notify_update("Post", 1, {"title": "Hi"}, ["title"])
        await live.notify_delete("Post", 1)
        await live.notify_create("Comment", 5, {"text": "other model"})
        await live.version("Comment")
        assert [(c.model_name, c.action, c.pk) for c in seen] == [("Post", "create", 1), ("Post", "update", 1), ("Post", "delete", 1)]
        assert seen[0].data is not None
        assert seen[0].data["title"] == "Hello"
        assert seen[1].changed_fields == ("title",)  # a tuple here, a list in the seed


async def test_live_notify_create(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        sub_id = await live.watch("Post")
        before = time.time()
        assert await live.notify_create("Post", 1, {"title": "T", "body": "B"}) is None
        await live.version("Post")
        (change,) = drain(live.subscription(sub_id))
        assert isinstance(change, ModelChange)
        assert (change.model_name, change.action, change.pk) == ("Post", "create", 1)
        assert dict(change.data or {}) == {"title": "T", "body": "B"}
        assert change.changed_fields is None  # update only
        assert change.timestamp >= before - 1
        assert change.to_dict()["action"] == "create"


async def test_live_notify_update(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        sub_id = await live.watch("Post")
        await live.notify_create("Post", 1, {"title": "T", "body": "B"})
        assert await live.notify_update("Post", 1, {"title": "T2"}, ["title"]) is None
        await live.version("Post")
        _, change = drain(live.subscription(sub_id))
        assert (change.action, change.pk) == ("update", 1)
        assert change.data is not None
        assert change.data["title"] == "T2"
        assert list(change.changed_fields or ()) == ["title"]  # a tuple here


async def test_live_notify_delete(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        live = hub.live
        everything = await live.watch("Comment")
        post_42 = await live.watch("Comment", filters={"post_id": 42})
        post_7 = await live.watch("Comment", filters={"post_id": 7})
        await live.notify_create("Comment", 1, {"post_id": 42})
        assert await live.notify_delete("Comment", 1) is None
        await live.version("Comment")
        assert [(c.action, c.pk, c.data) for c in drain(live.subscription(everything))][-1] == ("delete", 1, None)
        assert [c.action for c in drain(live.subscription(post_42))] == ["create", "delete"]
        assert drain(live.subscription(post_7)) == []  # could not see the row


# -- ConnectionManager ---------------------------------------------------------------------


async def test_connections_connect(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        before = time.time()
        info = await mgr.connect(MemoryTransport(), user_id="user1", metadata={"device": "mobile"})
        assert isinstance(info, ConnectionInfo)
        assert isinstance(info.connection_id, str)
        assert info.connection_id
        assert info.user_id == "user1"
        assert info.connected_at >= before - 1
        assert set(info.rooms) == set()
        assert dict(info.metadata) == {"device": "mobile"}
        anonymous = await mgr.connect(MemoryTransport())
        assert anonymous.user_id is None
        assert dict(anonymous.metadata) == {}
        assert anonymous.connection_id != info.connection_id


async def test_connections_connect_receives_the_users_notifications(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        transport = MemoryTransport()
        await hub.connections.connect(transport, user_id="user1")
        sent = await hub.notifications.send("user1", "Hi", "every device")
        await settle()
        assert hub.is_online("user1") == hub.notifications.is_online("user1")
        assert [e["data"]["id"] for e in of_type(transport, "notification")] == [sent.id]


async def test_connections_disconnect(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        transport = MemoryTransport()
        info = await mgr.connect(transport, user_id="user1")
        assert await mgr.disconnect(info.connection_id) is True
        assert transport.closed
        assert mgr.get_connection(info.connection_id) is None
        assert await mgr.disconnect(info.connection_id) is False  # not found
        assert await mgr.disconnect("no-such-connection") is False


async def test_connections_get_connection(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        info = await mgr.connect(MemoryTransport(), user_id="user1", metadata={"k": "v"})
        conn = mgr.get_connection(info.connection_id)
        assert conn == info
        assert mgr.get_connection("no-such-connection") is None


async def test_connections_get_user_connections(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        phone = await mgr.connect(MemoryTransport(), user_id="user1")
        laptop = await mgr.connect(MemoryTransport(), user_id="user1")
        await mgr.connect(MemoryTransport(), user_id="user2")
        user_conns = mgr.get_user_connections("user1")
        assert isinstance(user_conns, list)
        assert all(isinstance(c, ConnectionInfo) for c in user_conns)
        assert {c.connection_id for c in user_conns} == {phone.connection_id, laptop.connection_id}
        assert mgr.get_user_connections("nobody") == []


async def test_connections_get_all_connections(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        assert mgr.get_all_connections() == []
        a = await mgr.connect(MemoryTransport(), user_id="user1")
        b = await mgr.connect(MemoryTransport())
        assert {c.connection_id for c in mgr.get_all_connections()} == {a.connection_id, b.connection_id}
        await mgr.disconnect(a.connection_id)
        assert [c.connection_id for c in mgr.get_all_connections()] == [b.connection_id]


async def test_connections_connection_count(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        assert mgr.connection_count == 0  # a property
        a = await mgr.connect(MemoryTransport(), user_id="user1")
        await mgr.connect(MemoryTransport(), user_id="user1")
        assert mgr.connection_count == 2
        await mgr.disconnect(a.connection_id)
        assert mgr.connection_count == 1


async def test_connections_send_to_connection(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        transport = MemoryTransport()
        info = await mgr.connect(transport, user_id="user1")
        assert await mgr.send_to_connection(info.connection_id, {"type": "welcome"}) is True
        assert await mgr.send_to_connection("no-such-connection", {"type": "welcome"}) is False
        await settle()
        assert [e["data"] for e in transport.events] == [{"type": "welcome"}]


async def test_connections_send_to_user(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        phone, laptop, other = MemoryTransport(), MemoryTransport(), MemoryTransport()
        await mgr.connect(phone, user_id="user1")
        await mgr.connect(laptop, user_id="user1")
        await mgr.connect(other, user_id="user2")
        sent = await mgr.send_to_user("user1", {"type": "update"})
        assert sent == 2  # int: the count
        assert await mgr.send_to_user("nobody", {"type": "update"}) == 0
        await settle()
        for transport in (phone, laptop):
            assert [e["data"] for e in transport.events] == [{"type": "update"}]
        assert other.events == []


async def test_connections_broadcast(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        assert await mgr.broadcast({"type": "announcement"}) == 0
        transports = [MemoryTransport() for _ in range(3)]
        await mgr.connect(transports[0], user_id="user1")
        await mgr.connect(transports[1], user_id="user2")
        await mgr.connect(transports[2])  # anonymous connections get broadcasts too
        total = await mgr.broadcast({"type": "announcement"})
        assert total == 3
        await settle()
        for transport in transports:
            assert [e["data"] for e in transport.events] == [{"type": "announcement"}]


async def test_connections_on_connect_and_on_disconnect_hooks(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        mgr = hub.connections
        connected: list[ConnectionInfo] = []
        disconnected: list[ConnectionInfo] = []

        async def on_connect(info: ConnectionInfo) -> None:
            connected.append(info)

        async def on_disconnect(info: ConnectionInfo) -> None:
            disconnected.append(info)

        mgr.on_connect = on_connect
        mgr.on_disconnect = on_disconnect
        info = await mgr.connect(MemoryTransport(), user_id="user1")
        assert [c.connection_id for c in connected] == [info.connection_id]
        assert connected[0].user_id == "user1"
        assert disconnected == []
        await mgr.disconnect(info.connection_id)
        assert [c.connection_id for c in disconnected] == [info.connection_id]
        assert disconnected[0].user_id == "user1"
        assert len(connected) == 1


async def test_connections_max_connections(autojump_clock: Clock) -> None:
    assert HubConfig().max_connections == 10000  # the seed's default
    async with hub_with(HubConfig(max_connections=2)) as hub:
        mgr = hub.connections
        first = await mgr.connect(MemoryTransport(), user_id="user1")
        await mgr.connect(MemoryTransport(), user_id="user2")
        with pytest.raises(ConnectionError):
            await mgr.connect(MemoryTransport(), user_id="user3")
        assert mgr.connection_count == 2
        await mgr.disconnect(first.connection_id)
        await mgr.connect(MemoryTransport(), user_id="user3")  # room again


async def test_connections_max_metadata_keys(autojump_clock: Clock) -> None:
    assert HubConfig().max_metadata_keys == 32  # the seed's default
    async with hub_with() as hub:
        mgr = hub.connections
        ok = await mgr.connect(MemoryTransport(), metadata={f"k{n}": n for n in range(32)})
        assert len(ok.metadata) == 32
        with pytest.raises(ValueError, match="metadata"):
            await mgr.connect(MemoryTransport(), metadata={f"k{n}": n for n in range(33)})
        assert mgr.connection_count == 1


# -- WebSocketRateLimiter ----------------------------------------------------------------------


async def test_rate_limiter_check(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        limiter = hub.rate_limiter  # the seed's defaults, on Trio's clock
        assert isinstance(limiter, WebSocketRateLimiter)
        results = [limiter.check("connection_123") for _ in range(11)]
        assert results == [True] * 10 + [False]  # messages_per_second=10
        assert limiter.check("connection_456") is True  # per connection
        await trio.sleep(1.0)
        assert limiter.check("connection_123") is True

    # Custom config, as in the seed: burst_size caps a burst after a quiet period.
    now = [0.0]
    limiter = WebSocketRateLimiter(WSRateLimitConfig(messages_per_second=100, messages_per_minute=1000, burst_size=5), clock=lambda: now[0])
    assert [limiter.check("c") for _ in range(6)] == [True] * 5 + [False]
    # messages_per_minute: a sliding minute.
    now[0] = 0.0
    limiter = WebSocketRateLimiter(WSRateLimitConfig(messages_per_second=5, messages_per_minute=6, burst_size=10), clock=lambda: now[0])
    assert [limiter.check("c") for _ in range(5)] == [True] * 5
    now[0] = 1.0
    assert [limiter.check("c") for _ in range(2)] == [True, False]
    now[0] = 59.999
    assert limiter.check("c") is False
    now[0] = 60.0
    assert limiter.check("c") is True


async def test_rate_limiter_reset(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        limiter = hub.rate_limiter
        for _ in range(10):
            limiter.check("connection_123")
        assert limiter.check("connection_123") is False
        assert limiter.reset("connection_123") is None
        assert limiter.check("connection_123") is True
        assert limiter.reset("never-seen") is None  # unknown ids are fine


async def test_rate_limiter_cleanup_stale(autojump_clock: Clock) -> None:
    async with hub_with() as hub:
        limiter = hub.rate_limiter
        limiter.check("old")
        await trio.sleep(301)
        limiter.check("fresh")
        removed = limiter.cleanup_stale()  # max_idle_seconds=300.0 by default
        assert removed == 1
        assert limiter.cleanup_stale() == 0
        await trio.sleep(11)
        assert limiter.cleanup_stale(max_idle_seconds=10.0) == 1


async def test_rate_limiter_get_stats(autojump_clock: Clock) -> None:
    now = [0.0]
    config = WSRateLimitConfig(messages_per_second=5, messages_per_minute=60, burst_size=10)
    limiter = WebSocketRateLimiter(config, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("connection_123")
    stats = limiter.get_stats("connection_123")
    assert set(stats) == {
        "tokens_remaining",
        "per_second_count",
        "per_minute_count",
        "burst_size",
        "messages_per_second",
        "messages_per_minute",
    }
    assert stats["tokens_remaining"] == pytest.approx(7.0)
    assert isinstance(stats["tokens_remaining"], float)
    assert (stats["per_second_count"], stats["per_minute_count"]) == (3, 3)
    assert (stats["burst_size"], stats["messages_per_second"], stats["messages_per_minute"]) == (10, 5, 60)
    now[0] = 0.1
    assert limiter.get_stats("connection_123")["tokens_remaining"] == pytest.approx(7.5)  # the seed's example value
    now[0] = 1.0
    stats = limiter.get_stats("connection_123")
    assert (stats["per_second_count"], stats["per_minute_count"]) == (0, 3)

    async with hub_with() as hub:
        hub.rate_limiter.check("c")
        assert hub.rate_limiter.get_stats("c")["per_second_count"] == 1


# -- the seed's full example, and the reaping promise --------------------------------------


async def test_seed_full_chat_example(autojump_clock: Clock) -> None:
    # The seed's "Full Example: Chat Application", in our forms: the hub makes
    # rooms, hub.join_room both joins and subscribes the connection (the
    # seed's room.join(..., ws=ws) plus conn.rooms.add(room_id)).
    async with hub_with(HubConfig(room=RoomConfig(max_members=50))) as hub:
        connections, limiter = hub.connections, hub.rate_limiter
        transports = {user: MemoryTransport() for user in ("alice", "bob")}
        conns = {user: await connections.connect(t, user_id=user) for user, t in transports.items()}
        for conn in conns.values():
            await hub.join_room(conn.connection_id, "lobby")
        room = await hub.room("lobby")
        assert connections.get_connection_rooms(conns["alice"].connection_id) == {"lobby"}
        assert {c.connection_id for c in connections.get_room_connections("lobby")} == {c.connection_id for c in conns.values()}
        for text in ("hi", "there"):
            if limiter.check(conns["alice"].connection_id):
                await room.send_message("alice", text)
        await settle()
        assert [e["data"]["content"] for e in of_type(transports["bob"], "message")] == ["hi", "there"]
        await room.leave("bob")
        await connections.disconnect(conns["bob"].connection_id)
        assert [m.user_id for m in await room.get_members()] == ["alice"]
        assert transports["bob"].closed


async def test_abandoned_rooms_return_memory_to_baseline(autojump_clock: Clock) -> None:
    # The issue: "100,000 abandoned rooms do not stay in memory". Measured as
    # growth between two rounds of N new rooms each (the first round reaches
    # every high-water mark: dict capacities and the like), so only what is
    # kept per abandoned room counts. N is kept small for the test's speed.
    # Trio's own sets of tasks are left out: their hash tables are sized by
    # the tasks alive when they last resized (so they may be twice as large
    # after the second round as after the first, ~64 bytes per room at
    # random), a capacity that does not grow with abandoned rooms.
    rounds = 1000
    scheduler = tracemalloc.Filter(False, trio._core._run.__file__)

    def traced() -> int:
        return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces([scheduler]).statistics("filename"))

    async def abandon(prefix: str) -> None:
        for n in range(rounds):
            await hub.room(f"{prefix}-{n}")
        assert len(hub.rooms_running()) >= rounds
        await trio.sleep(20)  # idle_timeout=5 s: all are reaped
        await settle()
        assert hub.rooms_running() == []

    async with hub_with(HubConfig(room=RoomConfig(idle_timeout=5.0))) as hub:
        tracemalloc.start()
        try:
            await abandon("first")
            gc.collect()
            baseline = traced()
            await abandon("second")
            gc.collect()
            grown = traced() - baseline
        finally:
            tracemalloc.stop()
        assert grown < 50 * rounds, f"{grown / rounds:.0f} bytes kept per abandoned room"
