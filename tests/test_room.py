"""Tests of the room actor (ensemble/realtime/_room.py) and its store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ensemble.actors import ActorCrashed, ActorStopped, open_supervisor
from ensemble.realtime._errors import (
    ApprovalRequired,
    Banned,
    HistoryUnavailable,
    InvalidMessage,
    NotAllowed,
    NotAMember,
    NotFound,
    RateLimited,
    RoomFull,
)
from ensemble.realtime._events import Event
from ensemble.realtime._models import RoomConfig
from ensemble.realtime._room import PERMISSIONS, Room, RoomActor
from ensemble.realtime._room_store import AddMember, AppendEvent, CreateRoom, DeleteRoom, InMemoryRoomStore
from ensemble.testing import FaultInjector

WALL = 1_700_000_000.0


class Recorder:
    """A subscriber that records what it is given (or refuses everything)."""

    def __init__(self, user_id: str | None, connection_id: str | None = None, *, accept: bool = True) -> None:
        self.user_id = user_id
        self.connection_id = connection_id or f"conn-{user_id}"
        self.accept = accept
        self.events: list[Event] = []
        self.offered = 0

    def deliver_nowait(self, event: Event) -> bool:
        self.offered += 1
        if not self.accept:
            return False
        self.events.append(event)
        return True

    def types(self) -> list[str]:
        return [event.type for event in self.events]

    def of(self, type: str) -> list[Event]:
        return [event for event in self.events if event.type == type]


@attrs.define
class Harness:
    room: Room
    store: InMemoryRoomStore
    notes: list[tuple[str, Event]]
    supervisor: Any


@asynccontextmanager
async def running_room(config: RoomConfig | None = None, *, store: InMemoryRoomStore | None = None) -> AsyncIterator[Harness]:
    store = store if store is not None else InMemoryRoomStore()
    notes: list[tuple[str, Event]] = []

    async def notify_user(user_id: str, event: Event) -> None:
        notes.append((user_id, event))

    async with open_supervisor(name="rooms") as supervisor:
        spec = RoomActor.spec("general", config, store, notify_user, clock=lambda: WALL + trio.current_time())
        ref = await supervisor.start_child(spec)
        yield Harness(Room("general", ref), store, notes, supervisor)


# -- the seed's methods --------------------------------------------------------


async def test_join_returns_the_member_and_announces_it(autojump_clock: Any) -> None:
    async with running_room() as h:
        alice = Recorder("alice")
        member = await h.room.join("alice", "Alice", role="admin", subscriber=alice)
        assert (member.user_id, member.display_name, member.role, member.joined_at) == ("alice", "Alice", "admin", WALL)
        bob = await h.room.join("bob", "Bob")
        assert bob.role == "member"
        joined = alice.of("member_joined")
        assert [event.data["user_id"] for event in joined] == ["alice", "bob"]
        assert [event.seq for event in joined] == [1, 2]
        # Joining again returns the member unchanged, with no event.
        assert await h.room.join("bob", "Robert", role="admin") == bob
        assert len(alice.of("member_joined")) == 2
        assert [m.user_id for m in await h.room.get_members()] == ["alice", "bob"]
        assert await h.room.get_member("bob") == bob
        assert await h.room.get_member("carol") is None


async def test_join_refusals_are_permission_errors(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(max_members=2)) as h:
        await h.room.join("a", "A")
        await h.room.join("b", "B")
        with pytest.raises(RoomFull) as full:
            await h.room.join("c", "C")
        assert isinstance(full.value, PermissionError)
        await h.room.ban("c", "spam")
        with pytest.raises(Banned) as banned:
            await h.room.join("c", "C")
        assert isinstance(banned.value, PermissionError)
        for anonymous in (None, ""):
            with pytest.raises(NotAllowed):
                await h.room.join(anonymous, "Nobody")
        with pytest.raises(ValueError, match="role"):
            await h.room.join("d", "D", role="owner")
        # Rejections keep the room running and its state intact.
        assert len(await h.room.get_members()) == 2
        assert h.room.ref.statistics().crashes == 0


async def test_anonymous_users_join_rooms_without_auth(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(require_auth=False)) as h:
        member = await h.room.join(None, "Guest")
        assert member.user_id.startswith("anonymous-")


async def test_leave(autojump_clock: Any) -> None:
    async with running_room() as h:
        alice = Recorder("alice")
        await h.room.join("alice", "Alice", subscriber=alice)
        await h.room.join("bob", "Bob")
        assert await h.room.leave("bob") is True
        assert await h.room.leave("bob") is False
        assert await h.room.get_member("bob") is None
        assert alice.types()[-1] == "member_left"
        assert alice.events[-1].data == {"user_id": "bob"}


async def test_send_message(autojump_clock: Any) -> None:
    async with running_room() as h:
        alice = Recorder("alice")
        await h.room.join("alice", "Alice", subscriber=alice)
        message = await h.room.send_message("alice", "Hello everyone!")
        image = await h.room.send_message("alice", "photo.jpg", message_type="image")
        assert (message.user_id, message.display_name, message.content, message.message_type) == (
            "alice",
            "Alice",
            "Hello everyone!",
            "text",
        )
        assert image.message_type == "image"
        assert message.room_id == "general"
        assert message.seq + 1 == image.seq
        events = alice.of("message")
        assert [event.data["id"] for event in events] == [message.id, image.id]
        assert [event.seq for event in events] == [message.seq, image.seq]
        assert events[0].epoch == message.epoch != ""
        with pytest.raises(NotAMember) as not_member:
            await h.room.send_message("mallory", "hi")
        assert isinstance(not_member.value, PermissionError)
        with pytest.raises(InvalidMessage) as invalid:
            await h.room.send_message("alice", "x", message_type="video")
        assert isinstance(invalid.value, ValueError)


async def test_message_length_is_counted_in_utf8_bytes(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(max_message_length=4)) as h:
        await h.room.join("alice", "Alice")
        await h.room.send_message("alice", "abcd")
        await h.room.send_message("alice", "éé")  # 4 bytes
        for content in ("abcde", "ééé", "€€"):  # 5, 6 and 6 bytes
            with pytest.raises(InvalidMessage):
                await h.room.send_message("alice", content)
        assert len(await h.room.get_history()) == 2


async def test_rate_limit_is_per_user_per_minute_exactly(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(rate_limit=3)) as h:
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob")
        start = trio.current_time()
        for n in range(3):  # at 0, 10 and 20 s
            await trio.sleep_until(start + 10.0 * n)
            await h.room.send_message("alice", f"m{n}")
        with pytest.raises(RateLimited) as limited:
            await h.room.send_message("alice", "too many")
        assert isinstance(limited.value, PermissionError)
        assert limited.value.retry_after == pytest.approx(40.0)
        # The delay is in retry_after only: the text does not vary with timing.
        assert str(limited.value) == "'alice' sent 3 messages in the last minute; retry after retry_after seconds"
        await h.room.send_message("bob", "bob is not limited")
        await trio.sleep_until(start + 59.9)
        with pytest.raises(RateLimited):
            await h.room.send_message("alice", "still too many")
        await trio.sleep_until(start + 60.0)
        await h.room.send_message("alice", "the window has moved")
        with pytest.raises(RateLimited):
            await h.room.send_message("alice", "but only by one")
        assert [m.content for m in await h.room.get_history()] == ["m0", "m1", "m2", "bob is not limited", "the window has moved"]


async def test_broadcast_reaches_every_subscriber_as_a_sequenced_system_event(autojump_clock: Any) -> None:
    async with running_room() as h:
        phone, laptop, bob = Recorder("alice", "phone"), Recorder("alice", "laptop"), Recorder("bob")
        await h.room.join("alice", "Alice", subscriber=phone)
        await h.room.subscribe(laptop)
        await h.room.join("bob", "Bob", subscriber=bob)
        await h.room.broadcast({"type": "system", "text": "Welcome to the room!"})
        for recorder in (phone, laptop, bob):
            (event,) = recorder.of("system")
            assert event.data == {"type": "system", "text": "Welcome to the room!"}
            assert event.seq is not None
        # One Event object shared by every recipient.
        assert phone.of("system")[0] is bob.of("system")[0]


async def test_get_history_limit_and_order(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(history_size=5)) as h:
        await h.room.join("alice", "Alice")  # seq 1
        for n in range(6):  # seqs 2..7; history keeps seqs 3..7
            await h.room.send_message("alice", f"m{n}")
        assert [m.content for m in await h.room.get_history()] == ["m1", "m2", "m3", "m4", "m5"]
        assert [m.content for m in await h.room.get_history(limit=2)] == ["m4", "m5"]


async def test_get_history_since_gives_exactly_the_events_after(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(history_size=4)) as h:
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob", role="moderator")
        sent = [await h.room.send_message("alice", f"m{n}") for n in range(3)]  # seqs 3, 4, 5
        await h.room.kick("alice", by="bob")  # seq 6; history: 3..6
        epoch = sent[0].epoch
        events = await h.room.get_events(since=4)
        assert [(event.seq, event.type) for event in events] == [(5, "message"), (6, "kicked")]
        assert [event.seq for event in await h.room.get_events(since=(epoch, 2))] == [3, 4, 5, 6]
        assert await h.room.get_events(since=6) == []
        assert [m.content for m in await h.room.get_history(since=3)] == ["m1", "m2"]
        assert [m.content for m in await h.room.get_history(since=(epoch, 2))] == ["m0", "m1", "m2"]
        # Gone (seq 2's successor is kept, seq 1's is not), future, other epoch.
        for since in (1, 0, 7, ("another-epoch", 5)):
            with pytest.raises(HistoryUnavailable) as unavailable:
                await h.room.get_history(since=since)
            assert isinstance(unavailable.value, LookupError)
            assert (unavailable.value.epoch, unavailable.value.first_seq, unavailable.value.last_seq) == (epoch, 3, 6)
        with pytest.raises(TypeError):
            await h.room.get_history(since="3")  # type: ignore[arg-type]


async def test_history_size_zero_keeps_only_the_position(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(history_size=0)) as h:
        await h.room.join("alice", "Alice")
        await h.room.send_message("alice", "gone")
        assert await h.room.get_history() == []
        assert await h.room.get_events(since=2) == []
        with pytest.raises(HistoryUnavailable):
            await h.room.get_events(since=1)


async def test_moderation_events_are_sequenced_and_stored(autojump_clock: Any) -> None:
    async with running_room() as h:
        admin = Recorder("root")
        await h.room.join("root", "Root", role="admin", subscriber=admin)
        await h.room.join("bob", "Bob")
        await h.room.join("carol", "Carol")
        await h.room.set_role("bob", "moderator", by="root")
        await h.room.kick("carol", "spam", by="bob")
        await h.room.ban("dave", "harassment", by="root")
        await h.room.unban("dave", by="root")
        expected = ["role_changed", "kicked", "banned", "unbanned"]
        assert admin.types()[-4:] == expected
        stored = await h.room.get_events()
        assert [event.type for event in stored][-4:] == expected
        seqs = [event.seq for event in stored]
        assert seqs == list(range(1, len(seqs) + 1))
        assert stored[-3].data == {"user_id": "carol", "reason": "spam", "by": "bob"}
        assert stored[-4].data == {"user_id": "bob", "role": "moderator", "previous": "member", "by": "root"}


async def test_kick_and_ban(autojump_clock: Any) -> None:
    async with running_room() as h:
        bob = Recorder("bob")
        await h.room.join("bob", "Bob", subscriber=bob)
        assert await h.room.kick("bob", reason="spam") is True
        assert bob.types()[-1] == "kicked"  # the kicked user's connections see it, then stop receiving
        assert await h.room.kick("bob") is False
        await h.room.join("bob", "Bob")  # a kicked user can rejoin
        assert await h.room.is_banned("bob") is False
        assert await h.room.ban("bob", reason="harassment") is True
        assert await h.room.ban("bob") is False
        assert await h.room.is_banned("bob") is True
        assert await h.room.get_member("bob") is None
        with pytest.raises(Banned):
            await h.room.join("bob", "Bob")
        assert await h.room.unban("bob") is True
        assert await h.room.unban("bob") is False
        await h.room.join("bob", "Bob")
        assert bob.types() == ["member_joined", "presence", "kicked"]  # nothing after the kick


KICK = {
    ("moderator", "member"),
    ("admin", "member"),
    ("admin", "moderator"),
}
BAN = {("admin", "member"), ("admin", "moderator")}
SET_ROLE = {("admin", "member"), ("admin", "moderator")}
PAIRS = [(actor, target) for actor in ("member", "moderator", "admin") for target in ("member", "moderator", "admin")]


@pytest.mark.parametrize(("actor", "target"), PAIRS)
async def test_role_permission_table(actor: str, target: str, autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("actor", "Actor", role=actor)
        await h.room.join("target", "Target", role=target)
        new_role = "member" if target != "member" else "moderator"
        attempts = {
            "kick": (KICK, lambda: h.room.kick("target", by="actor")),
            "ban": (BAN, lambda: h.room.ban("target", by="actor")),
            "set_role": (SET_ROLE, lambda: h.room.set_role("target", new_role, by="actor")),
        }
        for action in ("set_role", "kick", "ban"):
            allowed, attempt = attempts[action]
            if (await h.room.get_member("target")) is None:
                await h.room.unban("target")
                await h.room.join("target", "Target", role=target)
            if action != "set_role" and (await h.room.get_member("target")).role != target:  # type: ignore[union-attr]
                await h.room.set_role("target", target, by=None)
            if (actor, target) in allowed:
                await attempt()
            else:
                with pytest.raises(NotAllowed):
                    await attempt()


async def test_permission_edges(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("root", "Root", role="admin")
        await h.room.join("mod", "Mod", role="moderator")
        await h.room.join("bob", "Bob")
        assert PERMISSIONS["member"] == frozenset()
        with pytest.raises(NotAMember):
            await h.room.kick("bob", by="stranger")
        with pytest.raises(NotAllowed):
            await h.room.kick("root", by="root")  # not on oneself (equal rank)
        with pytest.raises(NotAllowed):
            await h.room.unban("x", by="mod")
        await h.room.set_role("bob", "admin", by="root")  # an admin may grant up to admin
        with pytest.raises(NotAllowed):
            await h.room.kick("bob", by="root")  # but not act on an admin afterwards
        assert await h.room.kick("bob", by=None) is True  # server code may


async def test_edit_and_delete_permissions(autojump_clock: Any) -> None:
    async with running_room() as h:
        watcher = Recorder("root")
        await h.room.join("root", "Root", role="admin", subscriber=watcher)
        await h.room.join("mod", "Mod", role="moderator")
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob")
        message = await h.room.send_message("alice", "helo")
        with pytest.raises(NotAllowed):
            await h.room.edit_message("bob", message.id, "hacked")
        with pytest.raises(NotAllowed):
            await h.room.edit_message("root", message.id, "admins may not edit either")
        edited = await h.room.edit_message("alice", message.id, "hello")
        assert (edited.content, edited.edited, edited.id, edited.seq) == ("hello", True, message.id, message.seq)
        assert watcher.of("edited")[0].data["content"] == "hello"
        with pytest.raises(NotAllowed):
            await h.room.delete_message("bob", message.id)
        assert await h.room.delete_message("mod", message.id) is True
        assert await h.room.delete_message("alice", message.id) is False
        (history,) = await h.room.get_history()
        assert (history.deleted, history.content, history.edited) == (True, "", True)
        with pytest.raises(NotFound):
            await h.room.edit_message("alice", message.id, "back")
        with pytest.raises(NotFound):
            await h.room.delete_message("alice", "no-such-id")
        own = await h.room.send_message("bob", "mine")
        assert await h.room.delete_message("bob", own.id) is True
        admin_deletes = await h.room.send_message("bob", "theirs")
        assert await h.room.delete_message("root", admin_deletes.id) is True
        assert watcher.of("deleted")[0].data == {"id": message.id, "by": "mod"}
        # The replaced message is persisted too.
        record = await h.store.load("general")
        assert record is not None
        stored = [event for event in record.history if event.type == "message" and event.data["id"] == message.id]
        assert stored[0].data["deleted"] is True


# -- typing ---------------------------------------------------------------------


async def test_typing_expires_after_exactly_the_timeout(autojump_clock: Any) -> None:
    async with running_room() as h:
        bob = Recorder("bob")
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob", subscriber=bob)
        start = trio.current_time()
        await h.room.set_typing("alice", True)
        assert await h.room.get_typing_users() == ["alice"]
        await trio.sleep_until(start + 4.999)
        assert await h.room.get_typing_users() == ["alice"]
        await trio.sleep_until(start + 5.0)
        assert await h.room.get_typing_users() == []
        typing = bob.of("typing")
        assert [event.data["users"] for event in typing] == [["alice"], []]
        assert all(event.seq is None and event.coalesce_key == "typing" for event in typing)
        assert [event.type for event in await h.room.get_events()] == ["member_joined", "member_joined"]


async def test_typing_refresh_and_stop(autojump_clock: Any) -> None:
    async with running_room() as h:
        bob = Recorder("bob")
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob", subscriber=bob)
        start = trio.current_time()
        await h.room.set_typing("alice")
        await trio.sleep_until(start + 3.0)
        await h.room.set_typing("alice")  # refreshes: now expires at 8.0
        await trio.sleep_until(start + 7.9)
        assert await h.room.get_typing_users() == ["alice"]
        await trio.sleep_until(start + 8.0)
        assert await h.room.get_typing_users() == []
        await h.room.set_typing("alice")
        await h.room.set_typing("bob")
        await h.room.set_typing("alice", False)
        assert await h.room.get_typing_users() == ["bob"]
        await h.room.send_message("bob", "sending clears typing")
        assert await h.room.get_typing_users() == []
        await h.room.set_typing("mallory")  # ignored: not a member
        assert await h.room.get_typing_users() == []
        assert [event.data["users"] for event in bob.of("typing")] == [["alice"], [], ["alice"], ["alice", "bob"], ["bob"], []]


async def test_typing_updates_are_coalesced_in_the_mailbox(autojump_clock: Any, fault_injector: FaultInjector) -> None:
    async with running_room() as h:
        bob = Recorder("bob")
        await h.room.join("alice", "Alice")
        await h.room.join("bob", "Bob", subscriber=bob)
        with fault_injector.stall(h.room.ref):
            for n in range(50):
                await h.room.set_typing("alice", n % 2 == 0)  # the last one: False
            await h.room.set_typing("alice", True)
        assert h.room.ref.statistics().coalesced == 50
        assert await h.room.get_typing_users() == ["alice"]
        assert [event.data["users"] for event in bob.of("typing")] == [["alice"]]


# -- join requests -------------------------------------------------------------------


async def test_private_room_request_and_approve(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(join_policy="approval")) as h:
        owner, mod, member = Recorder("owner"), Recorder("mod"), Recorder("member")
        await h.room.join("owner", "Owner", role="admin", subscriber=owner, invited=True)
        await h.room.join("mod", "Mod", role="moderator", subscriber=mod, invited=True)
        await h.room.join("member", "Member", subscriber=member, invited=True)
        with pytest.raises(ApprovalRequired) as approval:
            await h.room.join("carol", "Carol")
        assert isinstance(approval.value, PermissionError)
        request = await h.room.request_join("carol", "Carol")
        assert (request.user_id, request.display_name) == ("carol", "Carol")
        assert await h.room.request_join("carol", "Carol") == request  # idempotent while pending
        for recorder in (owner, mod):
            (event,) = recorder.of("join_request")
            assert event.data["action"] == "create"
            assert event.data["user_id"] == "carol"
        assert member.of("join_request") == []
        assert [r.user_id for r in await h.room.get_join_requests(by="mod")] == ["carol"]
        with pytest.raises(NotAllowed):
            await h.room.get_join_requests(by="member")
        with pytest.raises(NotAllowed):
            await h.room.approve("carol", by="member")
        joined = await h.room.approve("carol", by="mod")
        assert (joined.user_id, joined.display_name, joined.role) == ("carol", "Carol", "member")
        assert [event.data["action"] for event in owner.of("join_request")] == ["create", "admit"]
        assert member.of("join_request") == []
        assert member.types()[-1] == "member_joined"
        ((user_id, decision),) = h.notes
        assert user_id == "carol"
        assert decision.type == "join_decision"
        assert decision.data["approved"] is True
        assert decision.data["by"] == "mod"
        with pytest.raises(NotFound):
            await h.room.approve("carol", by="mod")
        # History replay hides the requests from plain members.
        assert all(event.type != "join_request" for event in await h.room.get_events(user_id="member"))
        assert any(event.type == "join_request" for event in await h.room.get_events(user_id="mod"))


async def test_private_room_request_and_deny(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(join_policy="approval")) as h:
        owner, member = Recorder("owner"), Recorder("member")
        await h.room.join("owner", "Owner", role="admin", subscriber=owner, invited=True)
        await h.room.join("member", "Member", subscriber=member, invited=True)
        await h.room.request_join("dave", "Dave")
        assert await h.room.deny("dave", "not today", by="owner") is True
        assert [event.data["action"] for event in owner.of("join_request")] == ["create", "deny"]
        assert member.of("join_request") == []
        ((user_id, decision),) = h.notes
        assert user_id == "dave"
        assert decision.data == {"room_id": "general", "user_id": "dave", "approved": False, "reason": "not today", "by": "owner"}
        assert await h.room.get_join_requests() == []
        with pytest.raises(NotFound):
            await h.room.deny("dave")
        assert await h.room.get_member("dave") is None
        # Members and banned users cannot request.
        with pytest.raises(NotAllowed):
            await h.room.request_join("member", "Member")
        await h.room.ban("eve")
        with pytest.raises(Banned):
            await h.room.request_join("eve", "Eve")


async def test_ban_drops_a_pending_request(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(join_policy="approval")) as h:
        await h.room.request_join("eve", "Eve")
        await h.room.ban("eve")
        assert await h.room.get_join_requests() == []
        record = await h.store.load("general")
        assert record is not None
        assert record.join_requests == {}


# -- subscribers and fan-out ----------------------------------------------------


async def test_subscribe_is_for_members_only(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("alice", "Alice")
        with pytest.raises(NotAMember):
            await h.room.subscribe(Recorder("mallory"))
        with pytest.raises(NotAMember):
            await h.room.subscribe(Recorder(None, "anonymous"))
        with pytest.raises(NotAllowed):
            await h.room.join("bob", "Bob", subscriber=Recorder("alice", "alices-conn"))
        assert await h.room.get_member("bob") is None  # the refused join changed nothing
        position = await h.room.subscribe(Recorder("alice"))
        assert (position.topic, position.last_seq, position.recovered, position.replayed) == ("room:general", 1, False, 0)
        assert position.epoch
        assert await h.room.unsubscribe("conn-alice") is True
        assert await h.room.unsubscribe("conn-alice") is False


async def test_presence_on_first_and_last_connection(autojump_clock: Any) -> None:
    async with running_room() as h:
        bob = Recorder("bob")
        await h.room.join("bob", "Bob", subscriber=bob)
        await h.room.join("alice", "Alice")
        await h.room.subscribe(Recorder("alice", "phone"))
        await h.room.subscribe(Recorder("alice", "laptop"))
        await h.room.unsubscribe("phone")
        await h.room.unsubscribe("laptop")
        presence = [event for event in bob.of("presence") if event.data["user_id"] == "alice"]
        assert [event.data["online"] for event in presence] == [True, False]
        assert all(event.seq is None and event.coalesce_key == ("presence", "alice") for event in presence)
        await h.room.subscribe(Recorder("alice", "phone"))
        await h.room.leave("alice")
        assert [event.data["online"] for event in bob.of("presence") if event.data["user_id"] == "alice"] == [True, False, True, False]
        stats = await h.room.statistics()
        assert (stats.subscribers, stats.online_users) == (1, 1)


async def test_send_to_filters_by_audience(autojump_clock: Any) -> None:
    async with running_room() as h:
        root, mod, alice, bob = Recorder("root"), Recorder("mod"), Recorder("alice"), Recorder("bob")
        await h.room.join("root", "Root", role="admin", subscriber=root)
        await h.room.join("mod", "Mod", role="moderator", subscriber=mod)
        await h.room.join("alice", "Alice", subscriber=alice)
        await h.room.join("bob", "Bob", subscriber=bob)
        await h.room.send_to({"n": 1}, roles=["moderator"])
        await h.room.send_to({"n": 2}, users=["alice"])
        await h.room.send_to({"n": 3}, roles=["admin"], users=["bob"])
        seen = {r.user_id: [event.data["n"] for event in r.of("system")] for r in (root, mod, alice, bob)}
        assert seen == {"root": [3], "mod": [1], "alice": [2], "bob": [3]}
        replay = await h.room.get_events(user_id="alice")
        assert [event.data["n"] for event in replay if event.type == "system"] == [2]
        with pytest.raises(NotAMember):
            await h.room.get_events(user_id="stranger")


async def test_a_slow_subscriber_does_not_affect_others(autojump_clock: Any) -> None:
    async with running_room() as h:
        slow, fast, phone = Recorder("slow", accept=False), Recorder("fast"), Recorder("slow", "slow-phone")
        await h.room.join("slow", "Slow", subscriber=slow)
        await h.room.subscribe(phone)
        await h.room.join("fast", "Fast", subscriber=fast)
        for n in range(5):
            await h.room.send_message("fast", f"m{n}")
        assert len(fast.of("message")) == 5
        assert len(phone.of("message")) == 5  # the same user's other device still receives
        assert slow.offered > 5
        assert slow.events == []
        stats = await h.room.statistics()
        assert stats.refused_deliveries == slow.offered
        assert h.room.ref.statistics().crashes == 0


# -- persistence, crash and idle ----------------------------------------------------


async def test_every_message_is_one_store_batch(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("alice", "Alice")
        before = h.store.applied
        await h.room.send_message("alice", "one")
        await h.room.ban("bob")
        await h.room.get_members()  # a query writes nothing
        assert h.store.applied == before + 2
        record = await h.store.load("general")
        assert record is not None
        assert record.last_seq == 3
        assert record.bans == {"bob": ""}
        assert list(record.members) == ["alice"]


async def test_crash_and_restart_keep_state_and_reset_subscribers(autojump_clock: Any, fault_injector: FaultInjector) -> None:
    async with running_room(RoomConfig(rate_limit=0)) as h:
        alice, bob = Recorder("alice"), Recorder("bob")
        await h.room.join("alice", "Alice", role="admin", subscriber=alice)
        await h.room.join("bob", "Bob", subscriber=bob)
        message = await h.room.send_message("bob", "before the crash")
        await h.room.ban("eve", "spam")
        events_before = await h.room.get_events()
        fault_injector.crash_next(h.room.ref)
        with pytest.raises(ActorCrashed):
            await h.room.get_members()
        assert [m.user_id for m in await h.room.get_members()] == ["alice", "bob"]
        assert h.room.ref.statistics().restarts == 1
        assert await h.room.is_banned("eve") is True
        assert await h.room.get_events() == events_before
        for recorder in (alice, bob):
            reset = recorder.of("room_reset")
            assert len(reset) == 1
            assert reset[0].data == {"epoch": message.epoch, "last_seq": events_before[-1].seq}
        # Subscriptions survive the restart; seqs carry on.
        after = await h.room.send_message("bob", "after")
        assert after.seq == events_before[-1].seq + 1
        assert after.epoch == message.epoch
        assert alice.events[-1].data["id"] == after.id


async def test_idle_room_stops_and_resumes_from_the_store(autojump_clock: Any) -> None:
    store = InMemoryRoomStore()
    config = RoomConfig(idle_timeout=100.0)
    async with running_room(config, store=store) as h:
        await h.room.join("alice", "Alice")
        sent = await h.room.send_message("alice", "persisted")
        await h.room.ban("eve")
        last_message = trio.current_time()
        await trio.sleep_until(last_message + 60.0)
        await h.room.get_members()  # activity: the idle clock restarts at 60
        await trio.sleep_until(last_message + 159.999)
        assert h.room.ref.alive
        await trio.sleep_until(last_message + 160.0)
        await trio.testing.wait_all_tasks_blocked()
        assert not h.room.ref.alive
        assert h.supervisor.which_children() == []
        with pytest.raises(ActorStopped):
            await h.room.get_members()
        again = Room("general", await h.supervisor.start_child(RoomActor.spec("general", None, store, _ignore)))
        assert [m.user_id for m in await again.get_members()] == ["alice"]
        assert await again.is_banned("eve") is True
        (history,) = await again.get_history()
        assert (history.id, history.epoch) == (sent.id, sent.epoch)
        assert (await again.send_message("alice", "resumed")).seq == sent.seq + 2
        assert again.ref.statistics().restarts == 0


async def test_subscribers_keep_a_room_alive(autojump_clock: Any) -> None:
    async with running_room(RoomConfig(idle_timeout=10.0)) as h:
        await h.room.join("alice", "Alice", subscriber=Recorder("alice"))
        await trio.sleep(100.0)
        assert h.room.ref.alive
        await h.room.unsubscribe("conn-alice")
        await trio.sleep(9.9)
        assert h.room.ref.alive
        await trio.sleep(0.2)
        assert not h.room.ref.alive


async def _ignore(user_id: str, event: Event) -> None:
    pass


# -- the store ----------------------------------------------------------------------


async def test_in_memory_store_copies_and_bounds_history(autojump_clock: Any) -> None:
    from ensemble.realtime._models import RoomMember

    store = InMemoryRoomStore()
    assert await store.load("r") is None
    with pytest.raises(LookupError):
        await store.apply("r", [AddMember(RoomMember(user_id="a", display_name="A"))])
    await store.apply("r", [CreateRoom(RoomConfig(), "epoch-1"), AddMember(RoomMember(user_id="a", display_name="A"))])
    data = {"n": 0}
    for seq in range(1, 5):
        await store.apply("r", [AppendEvent(Event(type="system", topic="room:r", data=data, seq=seq, epoch="epoch-1"), 3)])
    data["n"] = 99  # the caller's dict is not the store's
    record = await store.load("r")
    assert record is not None
    assert (record.epoch, record.last_seq, [e.seq for e in record.history]) == ("epoch-1", 4, [2, 3, 4])
    assert record.history[0].data == {"n": 0}
    record.history[0].data["n"] = 5  # type: ignore[index]
    record.members["b"] = RoomMember(user_id="b", display_name="B")  # type: ignore[index]
    again = await store.load("r")
    assert again is not None
    assert again.history[0].data == {"n": 0}
    assert list(again.members) == ["a"]
    with pytest.raises(ValueError, match="seq"):
        await store.apply("r", [AppendEvent(Event(type="system", topic="room:r", seq=4, epoch="epoch-1"), 3)])


async def test_a_new_room_gets_a_fresh_epoch(autojump_clock: Any) -> None:
    store = InMemoryRoomStore()
    async with running_room(store=store) as h:
        await h.room.join("alice", "Alice")
        first = (await h.room.statistics()).epoch
    store.forget("general")
    async with running_room(store=store) as h:
        stats = await h.room.statistics()
        assert stats.epoch != first
        assert stats.last_seq == 0
        assert stats.members == 0


# -- deleting abandoned rooms -------------------------------------------------------------


async def idle_out(h: Harness, seconds: float = 20.0) -> None:
    await trio.sleep(seconds)
    await trio.testing.wait_all_tasks_blocked()
    assert not h.room.ref.alive


async def test_an_empty_room_deletes_its_record_when_it_idles_out(autojump_clock: Any) -> None:
    store = InMemoryRoomStore()
    async with running_room(RoomConfig(idle_timeout=10.0), store=store) as h:
        assert store.room_ids() == ["general"]  # created on start
        await h.room.get_members()
        await idle_out(h)
        assert store.room_ids() == []
        assert await store.load("general") is None


@pytest.mark.parametrize("keep", ["member", "ban", "request", "history"])
async def test_a_room_with_something_worth_keeping_keeps_its_record(autojump_clock: Any, keep: str) -> None:
    # history_size=0 keeps no history at all, so each of the others is tested alone.
    history_size = 10 if keep == "history" else 0
    store = InMemoryRoomStore()
    config = RoomConfig(idle_timeout=10.0, history_size=history_size, join_policy="approval")
    async with running_room(config, store=store) as h:
        if keep == "member":
            await h.room.join("alice", "Alice", invited=True)
        elif keep == "ban":
            await h.room.ban("eve")
        elif keep == "request":
            await h.room.request_join("carol", "Carol")
        else:
            await h.room.join("alice", "Alice", invited=True)
            await h.room.leave("alice")  # no member left, but the history stays
        await idle_out(h)
        record = await store.load("general")
        assert record is not None
        assert (len(record.members), len(record.bans), len(record.join_requests)) == (
            int(keep == "member"),
            int(keep == "ban"),
            int(keep == "request"),
        )
        assert [event.type for event in record.history] == (["member_joined", "member_left"] if keep == "history" else [])


async def test_a_room_started_again_after_its_record_was_deleted_has_a_new_epoch(autojump_clock: Any) -> None:
    store = InMemoryRoomStore()
    config = RoomConfig(idle_timeout=10.0, history_size=0)
    async with running_room(config, store=store) as h:
        await h.room.join("alice", "Alice")
        await h.room.leave("alice")  # seq 2; kept nowhere (history_size=0)
        old = await h.room.statistics()
        assert (old.last_seq, old.history_length) == (2, 0)
        await idle_out(h)
        assert await store.load("general") is None
        again = Room("general", await h.supervisor.start_child(RoomActor.spec("general", config, store, _ignore)))
        new = await again.statistics()
        assert new.epoch != old.epoch
        assert new.last_seq == 0
        # A client resuming from the old incarnation is told, never given a silent gap.
        with pytest.raises(HistoryUnavailable):
            await again.get_events(since=(old.epoch, old.last_seq))
        with pytest.raises(HistoryUnavailable):
            await again.get_events(since=old.last_seq)
        await again.join("alice", "Alice")
        resumed = await again.subscribe(Recorder("alice"), since=(old.epoch, old.last_seq))
        assert (resumed.recovered, resumed.epoch, resumed.last_seq) == (False, new.epoch, 1)


class SlowDeleteStore(InMemoryRoomStore):
    """Holds a DeleteRoom batch until ``release`` is set (a store doing I/O)."""

    def __init__(self) -> None:
        super().__init__()
        self.deleting = trio.Event()
        self.release = trio.Event()

    async def apply(self, room_id: str, ops: Any) -> None:
        if any(isinstance(op, DeleteRoom) for op in ops):
            self.deleting.set()
            await self.release.wait()
        await super().apply(room_id, ops)


async def test_a_message_sent_while_an_empty_room_deletes_itself_reaches_a_new_incarnation(autojump_clock: Any) -> None:
    store = SlowDeleteStore()
    async with open_supervisor(name="rooms") as supervisor:

        def spec() -> Any:
            return RoomActor.spec("general", RoomConfig(idle_timeout=10.0), store, _ignore)

        async def resolve() -> Any:
            ref = supervisor.child("general")
            if ref is not None and ref.alive:  # type: ignore[union-attr]
                return ref
            return await supervisor.start_child(spec())

        first = await supervisor.start_child(spec())
        room = Room("general", first, resolve=resolve)
        old_epoch = (await room.statistics()).epoch
        async with trio.open_nursery() as nursery:
            await store.deleting.wait()  # the idle check is deleting the record ...
            joined: list[Any] = []

            async def join() -> None:
                joined.append(await room.join("alice", "Alice"))  # ... when a join arrives

            nursery.start_soon(join)
            await trio.testing.wait_all_tasks_blocked()
            assert first.statistics().mailbox_depth == 1  # queued in the stopping incarnation
            store.release.set()
        assert [member.user_id for member in joined] == ["alice"]
        assert room.ref is not first
        assert not first.alive
        record = await store.load("general")
        assert record is not None
        assert (list(record.members), record.last_seq) == (["alice"], 1)
        assert record.epoch != old_epoch


# -- resuming on subscribe -------------------------------------------------------------------


async def test_subscribe_since_replays_exactly_the_missed_events_then_live_ones(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("alice", "Alice")  # seq 1
        await h.room.join("bob", "Bob")  # seq 2
        messages = [await h.room.send_message("alice", f"m{n}") for n in range(4)]  # seq 3 to 6
        phone = Recorder("bob", "phone")
        resumed = await h.room.subscribe(phone, since=(messages[0].epoch, messages[1].seq))
        assert (resumed.recovered, resumed.replayed, resumed.last_seq) == (True, 2, 6)
        live = await h.room.send_message("alice", "live")
        sequenced = [event for event in phone.events if event.seq is not None]
        assert [event.seq for event in sequenced] == [5, 6, 7]
        assert [event.data["content"] for event in sequenced] == ["m2", "m3", "live"]
        assert sequenced[-1].data["id"] == live.id
        assert phone.types() == ["message", "message", "presence", "message"]  # replayed before anything live
        # A bare seq works too; the current position replays nothing.
        laptop = Recorder("bob", "laptop")
        assert (await h.room.subscribe(laptop, since=7)).replayed == 0
        assert (await h.room.subscribe(Recorder("bob", "tablet"), since=(messages[0].epoch, 7))).recovered


async def test_subscribe_since_replays_only_what_the_user_may_see(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("mod", "Mod", role="moderator")
        await h.room.join("bob", "Bob")
        position = (await h.room.statistics()).last_seq
        await h.room.send_to({"note": "mods only"}, roles=["moderator"])
        await h.room.send_to({"note": "for bob"}, users=["bob"])
        await h.room.broadcast({"note": "all"})
        bob, mod = Recorder("bob"), Recorder("mod")
        epoch = (await h.room.statistics()).epoch
        assert (await h.room.subscribe(bob, since=(epoch, position))).replayed == 2
        assert (await h.room.subscribe(mod, since=(epoch, position))).replayed == 2
        assert [event.data["note"] for event in bob.of("system")] == ["for bob", "all"]
        assert [event.data["note"] for event in mod.of("system")] == ["mods only", "all"]


@pytest.mark.parametrize("case", ["another epoch", "evicted", "future"])
async def test_subscribe_since_an_unrecoverable_position_subscribes_from_now(autojump_clock: Any, case: str) -> None:
    async with running_room(RoomConfig(history_size=3)) as h:
        await h.room.join("alice", "Alice")
        sent = [await h.room.send_message("alice", f"m{n}") for n in range(5)]  # seq 2 to 6; 4 to 6 kept
        since = {"another epoch": ("old", 5), "evicted": (sent[0].epoch, 2), "future": (sent[0].epoch, 7)}[case]
        phone = Recorder("alice", "phone")
        resumed = await h.room.subscribe(phone, since=since)
        assert (resumed.recovered, resumed.replayed, resumed.epoch, resumed.last_seq) == (False, 0, sent[0].epoch, 6)
        assert [event for event in phone.events if event.seq is not None] == []  # no partial replay: nothing
        await h.room.send_message("alice", "live")
        assert [event.seq for event in phone.events if event.seq is not None] == [7]  # subscribed all the same


async def test_a_refusing_subscriber_is_not_recovered(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("alice", "Alice")
        await h.room.send_message("alice", "missed")
        resumed = await h.room.subscribe(Recorder("alice", accept=False), since=0)
        assert (resumed.recovered, resumed.replayed) == (False, 0)


async def test_join_connection_with_since_joins_subscribes_and_replays_in_one_step(autojump_clock: Any) -> None:
    async with running_room() as h:
        await h.room.join("alice", "Alice")  # seq 1
        await h.room.send_message("alice", "before bob")  # seq 2
        epoch = (await h.room.statistics()).epoch
        bob = Recorder("bob")
        joined = await h.room.join_connection(bob, "Bob", since=(epoch, 1))
        # A new member: the replay ends where the join's own event begins, which comes live, once.
        assert (joined.member.user_id, joined.room_id, joined.recovered, joined.resumption.replayed) == ("bob", "general", True, 1)
        assert joined.resumption.last_seq == 2
        assert [(event.type, event.seq) for event in bob.events if event.seq is not None] == [("message", 2), ("member_joined", 3)]
        # A member already: only subscribed; role and name are not changed.
        phone = Recorder("bob", "phone")
        again = await h.room.join_connection(phone, "Robert", "admin", since=(epoch, 2))
        assert (again.member, again.recovered, again.resumption.replayed) == (joined.member, True, 1)
        assert (await h.room.statistics()).subscribers == 2
        await h.room.ban("eve")
        with pytest.raises(Banned):
            await h.room.join_connection(Recorder("eve"), "Eve")
        with pytest.raises(TypeError):
            await h.room.join_connection(Recorder("carol"), "Carol", since="1")  # type: ignore[arg-type]


async def test_a_configured_room_keeps_its_latest_config_across_a_crash_restart(autojump_clock: Any, fault_injector: FaultInjector) -> None:
    store = InMemoryRoomStore()
    async with running_room(RoomConfig(max_members=5, history_size=10), store=store) as h:
        await h.room.join("alice", "Alice")
        assert await h.room.configure(RoomConfig(max_members=1, history_size=10)) is True
        fault_injector.crash_next(h.room.ref)
        with pytest.raises(ActorCrashed):
            await h.room.get_members()
        await trio.testing.wait_all_tasks_blocked()
        assert h.room.ref.statistics().restarts == 1
        with pytest.raises(RoomFull):  # the restart took the stored (latest) config, not the spec's
            await h.room.join("bob", "Bob")
        record = await store.load("general")
        assert record is not None
        assert record.config.max_members == 1
        assert await h.room.configure(RoomConfig(max_members=1, history_size=10)) is False  # unchanged


async def test_a_room_started_from_the_store_without_a_config_takes_the_stored_one(
    autojump_clock: Any, fault_injector: FaultInjector
) -> None:
    store = InMemoryRoomStore()
    await store.apply("general", [CreateRoom(RoomConfig(max_members=1), "epoch-1")])
    async with running_room(None, store=store) as h:
        await h.room.join("alice", "Alice")
        with pytest.raises(RoomFull):
            await h.room.join("bob", "Bob")
        fault_injector.crash_next(h.room.ref)
        with pytest.raises(ActorCrashed):
            await h.room.get_members()
        with pytest.raises(RoomFull):
            await h.room.join("bob", "Bob")
        assert (await h.room.statistics()).epoch == "epoch-1"
