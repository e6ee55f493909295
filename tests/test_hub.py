"""The embedded hub end to end: connections, rooms, notifications, presence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from _direct import DirectMemoryTransport

from ensemble.realtime._connections import MemoryTransport
from ensemble.realtime._errors import Banned, NotAMember, NotFound, TooManyConnections
from ensemble.realtime._hub import Hub, HubConfig, open_hub
from ensemble.realtime._models import ConnectionInfo, RoomConfig
from ensemble.realtime._room import SubscriberRegistry
from ensemble.realtime._room_store import InMemoryRoomStore, RoomRecord
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


# -- abandoned rooms, given-up rooms --------------------------------------------------------


async def test_an_abandoned_room_leaves_nothing_behind_and_a_held_handle_still_works(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(room=RoomConfig(idle_timeout=5.0, max_members=3))) as hub:
        room = await hub.room("empty")
        first = room.ref
        await trio.sleep(10)
        await settle()
        assert hub.rooms_running() == []
        assert await hub.room_store.load("empty") is None  # deleted: nothing worth keeping
        assert hub._room_subscribers == {}
        # The handle starts the room again (from scratch, with the hub's default config).
        await room.join("alice", "Alice")
        assert room.ref is not first
        assert hub.rooms_running() == ["empty"]
        record = await hub.room_store.load("empty")
        assert record is not None
        assert (list(record.members), record.config.max_members) == (["alice"], 3)


async def crash_until_given_up(hub: Hub, room_id: str, times: int) -> None:
    injector = FaultInjector()
    room = await hub.room(room_id)
    for _ in range(times):
        injector.crash_next(room.ref)
        with pytest.raises(Exception, match="crashed"):
            await room.get_members()
        await settle()


async def test_a_room_given_up_on_tells_its_subscribers_and_starts_afresh_on_next_use(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(room_max_restarts=1, room_max_seconds=60.0)) as hub:
        phone, laptop, bob_screen = MemoryTransport(), MemoryTransport(), MemoryTransport()
        alice_phone = await hub.connect(phone, "alice")
        alice_laptop = await hub.connect(laptop, "alice")
        bob = await hub.connect(bob_screen, "bob")
        for conn in (alice_phone, alice_laptop, bob):
            await hub.join_room(conn.connection_id, "general")
        await hub.join_room(bob.connection_id, "other")
        room = await hub.room("general")
        await room.ban("eve")
        kept = await room.send_message("alice", "kept")
        old_ref = room.ref

        await crash_until_given_up(hub, "general", 1)  # restarted: room_reset, still subscribed
        assert [e["type"] for e in phone.events[-1:]] == ["room_reset"]
        assert not of_type(phone, "room_closed")
        assert hub.connections.get_connection_rooms(alice_phone.connection_id) == {"general"}

        await crash_until_given_up(hub, "general", 1)  # a second crash within 60 s: removed
        rooms = hub.supervisor.child("rooms")
        assert rooms is not None
        assert rooms.statistics().children_given_up == 1  # type: ignore[union-attr]
        assert hub.rooms_running() == ["other"]
        for transport in (phone, laptop, bob_screen):
            closed = of_type(transport, "room_closed")
            assert [(e["topic"], e["data"]) for e in closed] == [("room:general", {"room_id": "general", "reason": "failed"})]
            assert "seq" not in closed[0]
        assert hub.connections.get_room_connections("general") == []
        assert hub.connections.get_connection_rooms(bob.connection_id) == {"other"}
        assert "general" not in hub._room_subscribers

        # The next use starts a fresh incarnation from the store; joining subscribes again.
        joined = await hub.join_room(alice_phone.connection_id, "general", since=(kept.epoch, kept.seq))
        assert joined.recovered
        assert sorted(hub.rooms_running()) == ["general", "other"]
        assert room.ref is old_ref  # the handle has not been used since
        assert await room.is_banned("eve")
        assert room.ref is not old_ref
        after = await room.send_message("bob", "after")
        assert (after.epoch, after.seq) == (kept.epoch, kept.seq + 1)
        await settle()
        assert of_type(phone, "message")[-1]["data"]["content"] == "after"
        assert of_type(laptop, "message")[-1]["data"]["content"] == "kept"  # not subscribed any more
        stats = await room.statistics()
        assert stats.subscribers == 1


async def test_a_room_restarted_after_a_crash_keeps_its_subscribers_untold_of_closing(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(room_max_restarts=3)) as hub:
        screen = MemoryTransport()
        conn = await hub.connect(screen, "alice")
        await hub.join_room(conn.connection_id, "general")
        await crash_until_given_up(hub, "general", 3)
        await trio.sleep(1)
        assert len(of_type(screen, "room_reset")) == 3
        assert not of_type(screen, "room_closed")
        room = await hub.room("general")
        assert (await room.statistics()).subscribers == 1
        assert hub.connections.get_connection_rooms(conn.connection_id) == {"general"}


# -- resuming through the hub -----------------------------------------------------------------------


async def test_join_room_since_replays_the_missed_events_atomically(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        room = await hub.room("general")
        await room.join("bob", "Bob")
        first = MemoryTransport()
        conn = await hub.connect(first, "alice")
        joined = await hub.join_room(conn.connection_id, "general", display_name="Alice")
        assert (joined.member.display_name, joined.recovered, joined.resumption.replayed) == ("Alice", False, 0)
        assert joined.resumption.topic == "room:general"
        await room.send_message("bob", "seen")
        await settle()
        last = of_type(first, "message")[-1]
        position = (last["epoch"], last["seq"])
        await hub.disconnect(conn.connection_id)
        missed = [await room.send_message("bob", f"missed {n}") for n in range(3)]

        second = MemoryTransport()
        conn = await hub.connect(second, "alice")
        resumed = await hub.join_room(conn.connection_id, "general", since=position)
        assert (resumed.recovered, resumed.resumption.replayed, resumed.resumption.last_seq) == (True, 3, missed[-1].seq)
        assert resumed.to_dict()["recovered"] is True
        live = await room.send_message("bob", "live")
        await settle()
        sequenced = [(e["seq"], e["data"].get("content")) for e in second.events if "seq" in e]
        assert sequenced == [(m.seq, m.content) for m in missed] + [(live.seq, "live")]
        assert hub.connections.get_connection_rooms(conn.connection_id) == {"general"}


async def test_join_room_since_an_unrecoverable_position_says_so_and_subscribes(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(room=RoomConfig(history_size=2))) as hub:
        room = await hub.room("general")
        await room.join("bob", "Bob")
        await room.join("alice", "Alice")
        sent = [await room.send_message("bob", f"m{n}") for n in range(4)]  # seq 3 to 6; 5 and 6 kept
        screen = MemoryTransport()
        conn = await hub.connect(screen, "alice")
        for since in ((sent[0].epoch, 1), ("another epoch", sent[-1].seq), (sent[0].epoch, 99)):
            resumed = await hub.join_room(conn.connection_id, "general", since=since)
            assert (resumed.recovered, resumed.resumption.epoch, resumed.resumption.last_seq) == (False, sent[0].epoch, sent[-1].seq)
        await room.send_message("bob", "live")
        await settle()
        assert [e["data"]["content"] for e in of_type(screen, "message")] == ["live"]


async def test_connect_with_notifications_since_replays_the_missed_notifications(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        phone = MemoryTransport()
        info = await hub.connect(phone, "alice")
        assert info.notifications is not None
        assert (info.notifications.topic, info.notifications.last_seq, info.notifications.recovered) == ("user:alice", 0, False)
        seen = await hub.notifications.send("alice", "seen", "")
        await hub.disconnect(info.connection_id)
        missed = [await hub.notifications.send("alice", f"missed {n}", "") for n in range(2)]

        phone = MemoryTransport()
        info = await hub.connect(phone, "alice", metadata={"device": "phone"}, notifications_since=(seen.epoch, seen.seq))
        assert info.notifications is not None
        assert (info.notifications.recovered, info.notifications.replayed, info.notifications.last_seq) == (True, 2, 3)
        assert info.metadata == {"device": "phone"}
        assert info.to_dict()["notifications"] == info.notifications.to_dict()
        assert hub.connections.get_connection(info.connection_id) == ConnectionInfo(
            **attrs.asdict(info, recurse=False, filter=lambda a, v: a.name != "notifications")
        )
        live = await hub.notifications.send("alice", "live", "")
        await settle()
        assert [(e["seq"], e["data"]["title"]) for e in of_type(phone, "notification")] == [(n.seq, n.title) for n in [*missed, live]]

        stale = MemoryTransport()
        info = await hub.connect(stale, "alice", notifications_since=("another epoch", 1))
        assert info.notifications is not None
        assert (info.notifications.recovered, info.notifications.replayed, info.notifications.epoch) == (False, 0, seen.epoch)
        await hub.notifications.send("alice", "attached anyway", "")
        await settle()
        assert [e["data"]["title"] for e in of_type(stale, "notification")] == ["attached anyway"]

        anonymous = await hub.connect(MemoryTransport())
        assert anonymous.notifications is None
        with pytest.raises(ValueError, match="needs a user_id"):
            await hub.connect(MemoryTransport(), notifications_since=(seen.epoch, 1))
        with pytest.raises(TypeError, match="epoch, seq"):
            await hub.connect(MemoryTransport(), "alice", notifications_since=[seen.epoch, 1])  # type: ignore[arg-type]
        assert hub.connections.connection_count == 3  # the refused ones opened nothing


async def test_a_connection_opened_by_a_connect_hook_is_not_given_the_callers_position(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        seen = await hub.notifications.send("alice", "one", "")
        await hub.notifications.send("alice", "two", "")
        other = MemoryTransport()

        async def on_connect(info: Any) -> None:
            hub.connections.on_connect = None
            await hub.connections.connect(other, "alice")  # in the caller's context

        hub.connections.on_connect = on_connect
        info = await hub.connect(MemoryTransport(), "alice", notifications_since=(seen.epoch, seen.seq))
        assert info.notifications is not None
        assert (info.notifications.recovered, info.notifications.replayed) == (True, 1)
        assert len(hub.connections.get_user_connections("alice")) == 2
        await hub.notifications.send("alice", "three", "")
        await settle()
        assert [e["data"]["title"] for e in of_type(other, "notification")] == ["three"]  # attached, not replayed to


class FlakyRoomStore(InMemoryRoomStore):
    """An in-memory room store whose loads fail while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    async def load(self, room_id: str) -> RoomRecord | None:
        if self.failing:
            raise OSError("the store is down")
        return await super().load(room_id)


async def test_a_room_whose_restarts_fail_is_given_up_on_and_its_subscribers_told(autojump_clock: trio.testing.MockClock) -> None:
    store = FlakyRoomStore()
    async with open_hub(HubConfig(room_max_restarts=2), room_store=store) as hub:
        screen = MemoryTransport()
        conn = await hub.connect(screen, "alice")
        await hub.join_room(conn.connection_id, "general")
        room = await hub.room("general")
        store.failing = True
        FaultInjector().crash_next(room.ref)
        with pytest.raises(Exception, match="crashed"):
            await room.get_members()
        await settle()  # two restarts fail in on_start: given up
        assert hub.rooms_running() == []
        assert [e["type"] for e in screen.events if e["type"].startswith("room_")] == ["room_closed"]
        assert hub.connections.get_connection_rooms(conn.connection_id) == set()
        store.failing = False
        joined = await hub.join_room(conn.connection_id, "general")
        assert joined.member.user_id == "alice"
        assert (await room.statistics()).subscribers == 1


async def test_a_connection_that_joined_a_fresh_incarnation_is_not_told_the_old_one_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        first, second = MemoryTransport(), MemoryTransport()
        rejoined = await hub.connect(first, "alice")
        stayed_away = await hub.connect(second, "bob")
        for conn in (rejoined, stayed_away):
            await hub.join_room(conn.connection_id, "general")
        # The old incarnation's registry, as the crash watcher would hold it ...
        old = hub._room_subscribers["general"]
        snapshot = SubscriberRegistry()
        for user_id, connections in old.by_user.items():
            snapshot.by_user[user_id] = dict(connections)
        snapshot.by_connection.update(old.by_connection)
        # ... while the current one (a fresh incarnation) has alice's connection again.
        await hub.leave_room(stayed_away.connection_id, "general")
        hub.connections.add_room(stayed_away.connection_id, "general")  # as it was in the old incarnation
        hub._room_given_up("general", snapshot)
        await settle()
        assert not of_type(first, "room_closed")
        assert hub.connections.get_connection_rooms(rejoined.connection_id) == {"general"}
        assert [e["data"]["reason"] for e in of_type(second, "room_closed")] == ["failed"]
        assert hub.connections.get_connection_rooms(stayed_away.connection_id) == set()
        assert len(snapshot) == 0
        assert hub._room_subscribers["general"] is old  # the current registry is kept


async def test_the_bodys_exception_leaves_open_hub_as_itself(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(ValueError, match="boom") as raised:
        async with open_hub():
            raise ValueError("boom")
    assert type(raised.value) is ValueError  # not wrapped in an exception group
    with trio.move_on_after(1) as scope:
        async with open_hub():
            await trio.sleep(10)
    assert scope.cancelled_caught


async def test_inbound_messages_are_rate_limited_by_the_connection_actor(autojump_clock: trio.testing.MockClock) -> None:
    # The seed's chat loop: each text a client sends becomes a room message,
    # unless the connection is over its rate limit.
    from ensemble.realtime._connections import RATE_LIMITED
    from ensemble.realtime._errors import RateLimited
    from ensemble.realtime._ratelimit import WSRateLimitConfig

    config = HubConfig(rate_limit=WSRateLimitConfig(messages_per_second=3, messages_per_minute=100, burst_size=3), max_rate_violations=2)
    async with open_hub(config) as hub:
        room = await hub.room("chat")

        async def on_message(info: ConnectionInfo, text: Any) -> Any:
            assert info.user_id is not None
            return (await room.send_message(info.user_id, text)).seq

        hub.connections.on_message = on_message
        spammer = MemoryTransport()
        alice = await hub.connect(spammer, user_id="alice")
        await hub.join_room(alice.connection_id, "chat")
        assert [await hub.connections.receive(alice.connection_id, f"m{n}") for n in range(3)] == [2, 3, 4]
        with pytest.raises(RateLimited) as limited:
            await hub.connections.receive(alice.connection_id, "too fast")
        assert limited.value.retry_after > 0
        assert hub.is_online("alice")  # one violation: refused, still open
        with pytest.raises(RateLimited, match="closed"):
            await hub.connections.receive(alice.connection_id, "spam")
        assert spammer.close_code == RATE_LIMITED
        assert not hub.is_online("alice")
        assert [m.content for m in await room.get_history()] == ["m0", "m1", "m2"]
        # Another connection of another user was never limited by alice's.
        bob = await hub.connect(MemoryTransport(), user_id="bob")
        with pytest.raises(NotAMember):  # the handler's error is the answer; the connection stays
            await hub.connections.receive(bob.connection_id, "hi")
        await hub.join_room(bob.connection_id, "chat")
        assert await hub.connections.receive(bob.connection_id, "hi") > 4
        assert hub.is_online("bob")
        assert hub.rate_limiter.statistics().refused == 2


async def test_room_config_given_to_a_running_room_is_applied_and_stored(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryRoomStore()
    async with open_hub(room_store=store) as hub:
        room = await hub.room("r", RoomConfig(max_members=5))
        await room.join("a", "A")
        for n in range(4):
            await room.send_message("a", f"m{n}")
        same = await hub.room("r", RoomConfig(max_members=5))
        assert await same.configure(RoomConfig(max_members=5)) is False  # unchanged
        await hub.room("r", RoomConfig(max_members=1, history_size=2, rate_limit=1))
        assert "r" in hub.rooms_running()
        with pytest.raises(PermissionError):
            await room.join("b", "B")  # full now
        assert [m.content for m in await room.get_history()] == ["m2", "m3"]  # the newest two events
        await room.send_message("a", "one a minute")
        with pytest.raises(PermissionError):
            await room.send_message("a", "too many")
        record = await store.load("r")
        assert record is not None
        assert (record.config.max_members, record.config.history_size) == (1, 2)
        assert hub._room_configs == {}
        with pytest.raises(TypeError):
            await room.configure("not a config")  # type: ignore[arg-type]


async def test_authenticate_makes_an_anonymous_connection_the_users_in_place(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        seen = await hub.notifications.send("alice", "seen", "")
        missed = [await hub.notifications.send("alice", f"missed {n}", "") for n in range(2)]
        phone = MemoryTransport()
        anon = await hub.connect(phone, metadata={"device": "phone"})
        assert anon.notifications is None
        await hub.notifications.send("alice", "before auth", "")
        await settle()
        assert of_type(phone, "notification") == []  # anonymous: none of alice's

        info = await hub.authenticate(anon.connection_id, "alice", notifications_since=(seen.epoch, seen.seq))
        assert info.connection_id == anon.connection_id
        assert (info.user_id, info.metadata) == ("alice", {"device": "phone"})
        assert info.notifications is not None
        assert (info.notifications.topic, info.notifications.recovered, info.notifications.replayed) == ("user:alice", True, 3)
        assert info.notifications.last_seq == seen.seq + 3
        assert hub.is_online("alice")
        assert hub.notifications.is_online("alice")
        live = await hub.notifications.send("alice", "live", "")
        await settle()
        titles = [e["data"]["title"] for e in of_type(phone, "notification")]
        assert titles == [*(n.title for n in missed), "before auth", live.title]  # replayed, then live: none missed or repeated

        # Joining rooms works now, on the same connection.
        joined = await hub.join_room(anon.connection_id, "general")
        assert joined.member.user_id == "alice"

        # Without a position: attached from now, as connect does.
        tablet = MemoryTransport()
        other = await hub.connect(tablet)
        attached = await hub.authenticate(other.connection_id, "alice")
        assert attached.notifications is not None
        assert (attached.notifications.recovered, attached.notifications.replayed) == (False, 0)
        await hub.notifications.send("alice", "both", "")
        await settle()
        assert [e["data"]["title"] for e in of_type(tablet, "notification")] == ["both"]

        # Closing it detaches it from the mailbox.
        await hub.disconnect(anon.connection_id)
        await hub.disconnect(other.connection_id)
        assert not hub.is_online("alice")
        assert not hub.notifications.is_online("alice")


async def test_authenticate_refusals_through_the_hub(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(max_connections_per_user=1)) as hub:
        alice = await hub.connect(MemoryTransport(), "alice")
        transport = MemoryTransport()
        anon = await hub.connect(transport)
        with pytest.raises(TooManyConnections):
            await hub.authenticate(anon.connection_id, "alice")
        assert hub.connections.get_connection(anon.connection_id) == ConnectionInfo(
            **attrs.asdict(anon, recurse=False, filter=lambda a, v: a.name != "notifications")
        )  # left anonymous and open
        await hub.notifications.send("alice", "not for anon", "")
        await settle()
        assert of_type(transport, "notification") == []  # and not attached
        assert not transport.closed

        same = await hub.authenticate(alice.connection_id, "alice", notifications_since=("e", 1))
        assert (same.connection_id, same.user_id, same.notifications) == (alice.connection_id, "alice", None)  # a no-op
        with pytest.raises(ValueError, match="another user"):
            await hub.authenticate(alice.connection_id, "bob")
        with pytest.raises(ValueError, match="user id"):
            await hub.authenticate(anon.connection_id, "a/b")
        with pytest.raises(TypeError, match="epoch, seq"):
            await hub.authenticate(anon.connection_id, "bob", notifications_since=["e", 1])  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await hub.authenticate("nope", "bob")
        assert hub.connections.get_connection(anon.connection_id).user_id is None  # type: ignore[union-attr]


async def test_an_on_message_handler_may_authenticate_its_own_connection(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with() as hub:
        seen = await hub.notifications.send("bob", "seen", "")
        missed = await hub.notifications.send("bob", "missed", "")

        async def on_message(info: ConnectionInfo, data: Any) -> Any:
            connected = await hub.authenticate(info.connection_id, data, notifications_since=(seen.epoch, seen.seq))
            return connected.notifications

        hub.connections.on_message = on_message
        transport = MemoryTransport()
        anon = await hub.connect(transport)
        with trio.fail_after(1):  # no wait for itself
            notifications = await hub.connections.receive(anon.connection_id, "bob")
        assert (notifications.recovered, notifications.replayed) == (True, 1)
        assert hub.connections.get_connection(anon.connection_id).user_id == "bob"  # type: ignore[union-attr]
        await settle()
        assert [e["data"]["id"] for e in of_type(transport, "notification")] == [missed.id]


# -- membership ending takes the room out of the connections' room index ----------------------


@pytest.mark.parametrize("how", ["kick", "ban", "leave"])
async def test_a_member_removed_from_a_room_is_out_of_it_on_every_connection(autojump_clock: trio.testing.MockClock, how: str) -> None:
    async with hub_with() as hub:
        phone, laptop, olga_screen = MemoryTransport(), MemoryTransport(), MemoryTransport()
        alice_phone = await hub.connect(phone, "alice")
        alice_laptop = await hub.connect(laptop, "alice")
        olga = await hub.connect(olga_screen, "olga")
        for conn in (alice_phone, alice_laptop, olga):
            await hub.join_room(conn.connection_id, "general")
        await hub.join_room(alice_laptop.connection_id, "other")
        room = await hub.room("general")
        if how == "kick":
            assert await room.kick("alice", "bye")
        elif how == "ban":
            assert await room.ban("alice", "spam")
        else:
            assert await room.leave("alice")  # another device (or server code) ends the membership
        await settle()
        expected = {"kick": "kicked", "ban": "banned", "leave": "member_left"}[how]
        for transport in (phone, laptop):
            # The event that says why reaches every device, and is the room's last one there.
            assert [e["type"] for e in transport.events if e["topic"] == "room:general"][-1] == expected
        assert hub.connections.get_connection_rooms(alice_phone.connection_id) == set()
        assert hub.connections.get_connection_rooms(alice_laptop.connection_id) == {"other"}
        assert hub.connections.get_connection_rooms(olga.connection_id) == {"general"}
        assert [c.connection_id for c in hub.connections.get_room_connections("general")] == [olga.connection_id]
        assert (await room.statistics()).subscribers == 1
        assert not await hub.leave_room(alice_phone.connection_id, "general")  # nothing left to leave
        await room.send_message("olga", "after")
        await settle()
        assert not [e for e in phone.events if e["type"] == "message"]
        if how != "ban":  # joining again puts the connection back in the room
            await hub.join_room(alice_phone.connection_id, "general")
            assert hub.connections.get_connection_rooms(alice_phone.connection_id) == {"general"}


async def test_a_member_gone_at_a_restart_is_out_of_the_room_on_every_connection(autojump_clock: trio.testing.MockClock) -> None:
    from ensemble.realtime._room_store import RemoveMember

    store = InMemoryRoomStore()
    async with open_hub(room_store=store) as hub:
        screen = MemoryTransport()
        alice = await hub.connect(screen, "alice")
        olga = await hub.connect(MemoryTransport(), "olga")
        for conn in (alice, olga):
            await hub.join_room(conn.connection_id, "general")
        await store.apply("general", [RemoveMember("alice")])  # the store changed under the room ...
        await crash_until_given_up(hub, "general", 1)  # ... which finds it at its restart
        assert hub.connections.get_connection_rooms(alice.connection_id) == set()
        assert hub.connections.get_connection_rooms(olga.connection_id) == {"general"}
        assert not of_type(screen, "room_reset")  # not subscribed any more


async def test_a_membership_ended_while_join_room_returns_leaves_no_room_in_the_index(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ensemble.realtime import _hub

    async with hub_with() as hub:
        alice = await hub.connect(MemoryTransport(), "alice")
        join_connection = _hub.Room.join_connection

        async def then_kicked(self: Any, *args: Any, **kwargs: Any) -> Any:
            joined = await join_connection(self, *args, **kwargs)
            await self.kick("alice")  # handled after the join's reply, before join_room goes on
            return joined

        monkeypatch.setattr(_hub.Room, "join_connection", then_kicked)
        joined = await hub.join_room(alice.connection_id, "general")
        assert joined.member.user_id == "alice"
        assert hub.connections.get_connection_rooms(alice.connection_id) == set()
        assert hub.connections.get_room_connections("general") == []


# -- a room's config across restarts ----------------------------------------------------------


async def test_a_room_reconfigured_at_runtime_keeps_its_config_across_crash_restarts(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryRoomStore()
    async with open_hub(HubConfig(room_max_restarts=5), room_store=store) as hub:
        room = await hub.room("r", RoomConfig(max_members=5))
        await room.join("a", "A")
        await hub.room("r", RoomConfig(max_members=1))  # running: applied and stored
        await crash_until_given_up(hub, "r", 1)
        with pytest.raises(PermissionError):
            await room.join("b", "B")  # still full after the restart
        await room.configure(RoomConfig(max_members=2))
        await crash_until_given_up(hub, "r", 1)
        await room.join("b", "B")
        with pytest.raises(PermissionError):
            await room.join("c", "C")
        assert room.ref.statistics().restarts == 2
        record = await store.load("r")
        assert record is not None
        assert record.config.max_members == 2


async def test_a_room_started_from_the_store_takes_its_stored_config(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryRoomStore()
    config = HubConfig(room=RoomConfig(max_members=50, idle_timeout=10.0))
    async with open_hub(config, room_store=store) as hub:
        room = await hub.room("r", RoomConfig(max_members=5, idle_timeout=10.0))
        await room.join("a", "A")
        await room.configure(RoomConfig(max_members=1, idle_timeout=10.0))
        await trio.sleep(30)
        assert hub.rooms_running() == []  # stopped idle
        again = await hub.room("r")  # no config: the stored one, not the hub's default
        with pytest.raises(PermissionError):
            await again.join("b", "B")
        await crash_until_given_up(hub, "r", 1)
        with pytest.raises(PermissionError):
            await again.join("b", "B")


async def test_closing_connections_that_never_watched_does_not_ask_the_live_actor(autojump_clock: trio.testing.MockClock) -> None:
    """A mass disconnect must not queue an ask per connection at the live-query actor."""
    async with open_hub() as hub:
        watcher = await hub.connect(MemoryTransport(), user_id="w")
        await hub.live.watch("Order", subscriber=hub.connections.get_subscriber(watcher.connection_id))
        others = [await hub.connect(MemoryTransport(), user_id=f"u{n}") for n in range(50)]
        before = hub.live.ref.statistics().messages_handled
        for info in others:
            await hub.connections.disconnect(info.connection_id)
        assert hub.live.ref.statistics().messages_handled == before
        await hub.connections.disconnect(watcher.connection_id)  # its watch is ended
        assert hub.live.ref.statistics().messages_handled == before + 1


async def test_idle_connections_and_mailboxes_hibernate_and_work_when_woken(autojump_clock: trio.testing.MockClock) -> None:
    async with hub_with(HubConfig(hibernate_after=5)) as hub:
        seen: list[Any] = []

        async def on_message(info: ConnectionInfo, data: Any) -> Any:
            seen.append((info.user_id, data))
            return "ok"

        hub.connections.on_message = on_message
        # Transports the direct writer writes (as the native transport is).
        transports = {user: DirectMemoryTransport() for user in ("alice", "bob")}
        conns = {user: await hub.connect(t, user) for user, t in transports.items()}
        for conn in conns.values():
            await hub.join_room(conn.connection_id, "general")
        await trio.sleep(11)
        connections = hub.connections.supervisor.statistics()
        mailboxes = hub.notifications._supervisor.statistics()
        # Every connection's actor (not the direct writer: it does not
        # hibernate) and every user's mailbox gave up its task.
        assert connections.hibernating == 2
        assert mailboxes.hibernating == 2
        # A room message is written without waking anyone.
        room = await hub.room("general")
        await room.send_message("bob", "while you were asleep")
        await settle()
        assert all(of_type(t, "message") for t in transports.values())
        assert hub.connections.supervisor.statistics().hibernating == 2
        # An inbound message wakes alice's connection actor only.
        assert await hub.connections.receive(conns["alice"].connection_id, {"hi": 1}) == "ok"
        assert seen == [("alice", {"hi": 1})]
        assert hub.connections.supervisor.statistics().hibernating == 1
        # A notification wakes bob's mailbox, and reaches his device.
        await hub.notifications.send("bob", "title", "body")
        await settle()
        assert [e["data"]["title"] for e in of_type(transports["bob"], "notification")] == ["title"]
        assert hub.notifications._supervisor.statistics().hibernating == 1
        # Closing a hibernating connection works as ever.
        await hub.disconnect(conns["bob"].connection_id)
        assert transports["bob"].closed
        assert hub.connections.connection_count == 1
    assert transports["alice"].closed
