"""The embedded hub end to end: connections, rooms, notifications, presence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from ensemble.realtime._connections import MemoryTransport
from ensemble.realtime._errors import Banned, NotAMember
from ensemble.realtime._hub import Hub, HubConfig, open_hub
from ensemble.realtime._models import RoomConfig
from ensemble.testing import FaultInjector


@asynccontextmanager
async def hub_with(config: HubConfig | None = None) -> AsyncIterator[Hub]:
    async with open_hub(config) as hub:
        yield hub


def of_type(transport: MemoryTransport, kind: str) -> list[dict[str, Any]]:
    return [event for event in transport.events if event["type"] == kind]


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_a_message_reaches_every_device_of_every_member_as_one_bytes_object(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        phone, laptop, bob_t = MemoryTransport(), MemoryTransport(), MemoryTransport()
        alice_phone = await hub.connect(phone, "alice")
        alice_laptop = await hub.connect(laptop, "alice")
        bob = await hub.connect(bob_t, "bob")
        for conn in (alice_phone, alice_laptop, bob):
            await hub.join_room(conn.connection_id, "general")
        room = await hub.room("general")
        message = await room.send_message("bob", "hello")
        await settle()
        frames = [next(f for f in t.sent if b'"type":"message"' in f) for t in (phone, laptop, bob_t)]
        assert frames[0] is frames[1] is frames[2]  # serialised once, shared
        event = of_type(phone, "message")[0]
        assert (event["seq"], event["epoch"], event["data"]["content"]) == (message.seq, message.epoch, "hello")
        assert hub.connections.get_connection_rooms(alice_phone.connection_id) == {"general"}


async def test_members_are_per_user_and_rooms_use_the_default_config(autojump_clock: trio.testing.MockClock) -> None:
    config = HubConfig(room=RoomConfig(max_members=2, history_size=5))
    async with hub_with(config) as hub:
        conns = [await hub.connect(MemoryTransport(), user) for user in ("a", "a", "b", "c")]
        for conn in conns[:3]:
            await hub.join_room(conn.connection_id, "small")
        room = await hub.room("small")
        assert sorted(m.user_id for m in await room.get_members()) == ["a", "b"]  # a's second device is not a new member
        with pytest.raises(PermissionError):  # RoomFull
            await hub.join_room(conns[3].connection_id, "small")


async def test_anonymous_connections_cannot_join_rooms(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        conn = await hub.connect(MemoryTransport())
        with pytest.raises(NotAMember):
            await hub.join_room(conn.connection_id, "general")


async def test_notifications_reach_all_devices_and_presence_follows_connections(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        phone, laptop = MemoryTransport(), MemoryTransport()
        first = await hub.connect(phone, "alice")
        await hub.connect(laptop, "alice")
        assert hub.is_online("alice")
        sent = await hub.notifications.send("alice", "Hi", "two devices")
        await settle()
        for transport in (phone, laptop):
            assert [e["data"]["id"] for e in of_type(transport, "notification")] == [sent.id]
        await hub.disconnect(first.connection_id)
        assert hub.is_online("alice")
        assert phone.close_code == 1000
        await hub.connections.disconnect_all()
        assert not hub.is_online("alice")


async def test_a_join_decision_reaches_the_requester_as_a_notification(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        requester = MemoryTransport()
        await hub.connect(requester, "carol")
        room = await hub.room("private", RoomConfig(join_policy="approval"))
        await room.join("owner", "Owner", "admin", invited=True)
        await room.request_join("carol", "Carol")
        await room.approve("carol", by="owner")
        await settle()
        [notification] = await hub.notifications.get_unread("carol")
        assert notification.title == "Join request approved"
        assert notification.data is not None
        assert notification.data["room_id"] == "private"
        assert [e["data"]["title"] for e in of_type(requester, "notification")] == ["Join request approved"]
        assert await room.get_member("carol") is not None


async def test_closing_a_connection_unsubscribes_it_everywhere(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        conn = await hub.connect(MemoryTransport(), "alice")
        await hub.join_room(conn.connection_id, "general")
        room = await hub.room("general")
        assert (await room.statistics()).subscribers == 1
        await hub.disconnect(conn.connection_id)
        await settle()
        stats = await room.statistics()
        assert (stats.subscribers, stats.members) == (0, 1)  # membership stays, delivery stops
        assert hub.connections.connection_count == 0


async def test_a_room_crash_restarts_only_that_room_and_keeps_its_state(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        transport = MemoryTransport()
        conn = await hub.connect(transport, "alice")
        await hub.join_room(conn.connection_id, "general")
        general = await hub.room("general")
        other = await hub.room("other")
        await other.join("zed", "Zed")
        await general.ban("mallory", "spam")
        await general.send_message("alice", "before the crash")
        injector = FaultInjector()
        ref = hub.supervisor.snapshot()  # the tree is inspectable
        assert any(node.path.endswith("/rooms/general") for node in ref.walk())
        room_ref = general.ref
        injector.crash_next(room_ref)
        with pytest.raises(Exception, match="crashed"):
            await general.get_members()
        await settle()
        assert await general.is_banned("mallory")
        assert [m.content for m in await general.get_history()] == ["before the crash"]
        with pytest.raises(Banned):
            await general.join("mallory", "M")
        assert of_type(transport, "room_reset")
        assert [m.user_id for m in await other.get_members()] == ["zed"]
        assert room_ref.statistics().restarts == 1


async def test_idle_rooms_stop_and_resume_from_the_store(autojump_clock: trio.testing.MockClock) -> None:
    config = HubConfig(room=RoomConfig(idle_timeout=10.0))
    async with hub_with(config) as hub:
        room = await hub.room("quiet")
        await room.join("a", "A")
        await room.send_message("a", "kept")
        assert hub.rooms_running() == ["quiet"]
        await trio.sleep(30)
        await settle()
        assert hub.rooms_running() == []
        again = await hub.room("quiet")
        assert [m.content for m in await again.get_history()] == ["kept"]


async def test_many_abandoned_rooms_are_reaped(autojump_clock: trio.testing.MockClock) -> None:
    config = HubConfig(room=RoomConfig(idle_timeout=5.0))
    async with hub_with(config) as hub:
        for n in range(500):
            await hub.room(f"room-{n}")
        assert len(hub.rooms_running()) == 500
        await trio.sleep(20)
        await settle()
        assert hub.rooms_running() == []
        rooms = hub.supervisor.child("rooms")
        assert rooms is not None
        assert rooms.count_children().specs == 0  # type: ignore[union-attr]


async def test_leaving_the_hub_closes_connections_with_1001(autojump_clock: trio.testing.MockClock) -> None:
    transport = MemoryTransport()
    disconnected: list[str] = []
    async with hub_with() as hub:

        async def on_disconnect(info: Any) -> None:
            disconnected.append(info.connection_id)

        hub.connections.on_disconnect = on_disconnect
        conn = await hub.connect(transport, "alice")
    assert transport.close_code == 1001
    assert disconnected == [conn.connection_id]


def test_config_from_mapping_and_toml(tmp_path: Path) -> None:
    config = HubConfig.from_mapping({"name": "chat", "room": {"max_members": 5}, "rate_limit": {"burst_size": 3}})
    assert (config.name, config.room.max_members, config.rate_limit.burst_size) == ("chat", 5, 3)
    with pytest.raises(ValueError, match="unknown hub config keys: nope"):
        HubConfig.from_mapping({"nope": 1})
    with pytest.raises(ValueError, match=r"unknown keys in \[room\]: max"):
        HubConfig.from_mapping({"room": {"max": 1}})
    path = tmp_path / "ensemble.toml"
    path.write_text('[hub]\nname = "toml"\nmax_connections = 7\n[hub.room]\njoin_policy = "approval"\n')
    loaded = HubConfig.from_toml(path)
    assert (loaded.name, loaded.max_connections, loaded.room.join_policy) == ("toml", 7, "approval")
    with pytest.raises(ValueError, match="without '/'"):
        HubConfig(name="a/b")


async def test_invalid_ids_are_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        for bad in ("", "a/b", "x" * 201):
            with pytest.raises(ValueError, match="room id must be"):
                await hub.room(bad)
            with pytest.raises(ValueError, match="user id must be"):
                await hub.connect(MemoryTransport(), bad)
