"""The protocol handler over a real hub, through MemoryTransport: every command and event."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from _direct import DirectMemoryTransport

from ensemble import HubConfig, MemoryTransport, RoomConfig, WSRateLimitConfig, open_hub
from ensemble.protocol import CloseCode
from ensemble.realtime import Hub
from ensemble.server import Identity, ProtocolHandler

pytestmark = pytest.mark.usefixtures("autojump_clock")


class Tokens:
    """A test double of the authenticator interface: ``tok-<user>`` is valid."""

    def __init__(self) -> None:
        self.expiry: dict[str, float | None] = {}
        self.calls = 0

    async def authenticate(self, token: str) -> Identity | None:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        if token == "boom":
            raise RuntimeError("authenticator bug")
        if not token.startswith("tok-"):
            return None
        user = token[4:]
        return Identity(user_id=user, expires_at=self.expiry.get(token))


class Client:
    def __init__(self, handler: ProtocolHandler, transport: MemoryTransport, connection_id: str) -> None:
        self.handler = handler
        self.transport = transport
        self.id = connection_id
        self._seen = 0
        self.before: list[dict[str, Any]] = []  # what came before the last answer

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        data = json.dumps(frame) if isinstance(frame, dict) else frame
        await self.handler.frame(self.id, data)

    async def ask(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a command with a ref; return its reply or error (after settling)."""
        ref = frame.setdefault("ref", f"r{self._seen}-{frame['type']}")
        await self.send(frame)
        self.before = []
        for received in await self.new():
            if received.get("ref") == ref and received["type"] in {"reply", "error", "pong"}:
                return received
            self.before.append(received)
        raise AssertionError(f"no answer to {frame}")

    async def new(self) -> list[dict[str, Any]]:
        await trio.sleep(0.1)
        frames = all_frames(self.transport)
        fresh, self._seen = frames[self._seen :], len(frames)
        return fresh

    @property
    def closed(self) -> int | None:
        return self.transport.close_code


def all_frames(transport: MemoryTransport) -> list[dict[str, Any]]:
    return [json.loads(line) for frame in transport.sent for line in frame.split(b"\n")]


def data_of(answer: dict[str, Any]) -> Any:
    assert answer["type"] == "reply", answer
    assert answer["ok"] is True
    return answer["data"]


def code_of(answer: dict[str, Any]) -> str:
    assert answer["type"] == "error", answer
    assert answer["detail"]
    return str(answer["code"])


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    config = HubConfig(rate_limit=WSRateLimitConfig(messages_per_second=1000, messages_per_minute=100000, burst_size=1000))
    async with open_hub(config) as hub:
        yield hub


TRANSPORTS = {"memory": MemoryTransport, "direct": DirectMemoryTransport}
_make_transport: type[MemoryTransport] = MemoryTransport


@pytest.fixture(autouse=True, params=sorted(TRANSPORTS))
def transport_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the connections' transports written by their actors
    (``memory``) and by the hub's direct writer (``direct``, like the native transport)."""
    monkeypatch.setattr(f"{__name__}._make_transport", TRANSPORTS[request.param])
    return str(request.param)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def handler(hub: Hub, tokens: Tokens) -> ProtocolHandler:
    return ProtocolHandler(hub, authenticator=tokens, max_rooms_per_connection=3, max_protocol_errors=4).install()


async def connect(handler: ProtocolHandler, user: str | None, **kwargs: Any) -> Client:
    transport = _make_transport()
    info = await handler.open(transport, None if user is None else Identity(user_id=user), **kwargs)
    return Client(handler, transport, info.connection_id)


# -- opening -------------------------------------------------------------------------


async def test_install_sets_the_inbound_handler(hub: Hub, handler: ProtocolHandler) -> None:
    assert hub.connections.on_message == handler.on_message


async def test_welcome_is_the_first_frame(handler: ProtocolHandler, hub: Hub) -> None:
    await hub.notifications.send("alice", "one", "")
    first = await hub.notifications.send("alice", "two", "")
    await hub.notifications.send("alice", "three", "")
    alice = await connect(handler, "alice", resume=(first.epoch, first.seq - 1))
    frames = await alice.new()
    welcome = frames[0]
    assert welcome["type"] == "welcome"
    assert welcome["connection_id"] == alice.id
    assert welcome["user_id"] == "alice"
    assert welcome["guest"] is False
    assert welcome["notifications"]["recovered"] is True
    assert welcome["notifications"]["replayed"] == 2
    assert welcome["notifications"]["epoch"] == first.epoch
    assert [(f["type"], f["data"]["title"]) for f in frames[1:]] == [("notification", "two"), ("notification", "three")]


async def test_ping_pong_with_and_without_ref(handler: ProtocolHandler) -> None:
    alice = await connect(handler, "alice")
    await alice.new()
    await alice.send({"type": "ping"})
    assert await alice.new() == [{"type": "pong"}]
    assert await alice.ask({"type": "ping", "ref": 5}) == {"type": "pong", "ref": 5}
    await alice.send({"type": "pong"})  # answering a server ping: no reply
    assert await alice.new() == []


async def test_commands_without_ref_get_no_reply_but_errors_do(handler: ProtocolHandler) -> None:
    alice = await connect(handler, "alice")
    await alice.new()
    await alice.send({"type": "join", "room": "general"})
    assert [f["type"] for f in await alice.new()] == ["member_joined", "presence"]
    await alice.send({"type": "send", "room": "elsewhere", "content": "x"})
    [error] = await alice.new()
    assert error["code"] == "not_joined"
    assert "ref" not in error


# -- rooms ---------------------------------------------------------------------------


async def test_room_commands_and_events(handler: ProtocolHandler, hub: Hub) -> None:
    room = await hub.room("general")
    await room.join("olga", "Olga", "admin")
    alice = await connect(handler, "alice")
    olga = await connect(handler, "olga")
    await alice.new()

    joined = data_of(await alice.ask({"type": "join", "room": "general", "display_name": "Alice", "role": "admin"}))
    assert joined["member"]["role"] == "member"  # a client never picks its role
    assert joined["member"]["display_name"] == "Alice"
    assert joined["recovered"] is False
    assert data_of(await olga.ask({"type": "join", "room": "general"}))["member"]["role"] == "admin"
    assert [(f["type"], f["data"]["user_id"]) for f in await alice.new()] == [("presence", "olga")]

    sent = data_of(await alice.ask({"type": "send", "room": "general", "content": "hello"}))
    assert sent["content"] == "hello"
    assert sent["user_id"] == "alice"
    [event] = await olga.new()
    assert event["type"] == "message"
    assert event["seq"] == sent["seq"]
    assert event["data"]["id"] == sent["id"]

    edited = data_of(await alice.ask({"type": "edit", "room": "general", "message_id": sent["id"], "content": "hello, all"}))
    assert edited["edited"] is True
    assert [f["type"] for f in await olga.new()] == ["edited"]
    assert code_of(await olga.ask({"type": "edit", "room": "general", "message_id": sent["id"], "content": "hacked"})) == "not_allowed"

    assert data_of(await alice.ask({"type": "typing", "room": "general"})) == {"typing": True}
    typing = [f for f in await olga.new() if f["type"] == "typing"]
    assert typing[-1]["data"]["users"] == ["alice"]
    await alice.ask({"type": "typing", "room": "general", "typing": False})
    assert [f["data"]["users"] for f in await olga.new() if f["type"] == "typing"] == [[]]

    history = data_of(await alice.ask({"type": "history", "room": "general", "limit": 10}))
    assert [m["content"] for m in history["messages"]] == ["hello, all"]
    members = data_of(await alice.ask({"type": "members", "room": "general"}))
    assert [m["user_id"] for m in members["members"]] == ["olga", "alice"]

    assert data_of(await olga.ask({"type": "delete", "room": "general", "message_id": sent["id"]})) == {
        "message_id": sent["id"],
        "deleted": True,
    }
    assert [f["type"] for f in await alice.new()] == ["deleted"]
    assert code_of(await alice.ask({"type": "delete", "room": "general", "message_id": "nope"})) == "not_found"

    promoted = data_of(await olga.ask({"type": "set_role", "room": "general", "user": "alice", "role": "moderator"}))
    assert promoted["role"] == "moderator"
    assert code_of(await olga.ask({"type": "set_role", "room": "general", "user": "alice", "role": "king"})) == "invalid"
    assert [f["type"] for f in await alice.new()] == ["role_changed"]
    assert code_of(await alice.ask({"type": "ban", "room": "general", "user": "olga"})) == "not_allowed"

    assert data_of(await olga.ask({"type": "kick", "room": "general", "user": "alice", "reason": "bye"})) == {
        "user_id": "alice",
        "kicked": True,
    }
    assert "kicked" in [f["type"] for f in await alice.new()]
    assert code_of(await alice.ask({"type": "send", "room": "general", "content": "still here?"})) == "not_joined"

    data_of(await alice.ask({"type": "join", "room": "general"}))
    assert data_of(await olga.ask({"type": "ban", "room": "general", "user": "alice", "reason": "spam"}))["banned"] is True
    assert code_of(await alice.ask({"type": "join", "room": "general"})) == "banned"
    assert data_of(await olga.ask({"type": "unban", "room": "general", "user": "alice"}))["unbanned"] is True
    types = [f["type"] for f in all_frames(olga.transport)]
    assert "banned" in types
    assert "unbanned" in types
    data_of(await alice.ask({"type": "join", "room": "general"}))

    left = data_of(await alice.ask({"type": "leave", "room": "general"}))
    assert left == {"room_id": "general", "left": True, "membership_ended": False}
    assert code_of(await alice.ask({"type": "history", "room": "general"})) == "not_joined"
    assert [m.user_id for m in await room.get_members()] == ["olga", "alice"]
    await alice.ask({"type": "join", "room": "general"})
    left = data_of(await alice.ask({"type": "leave", "room": "general", "membership": True}))
    assert left["membership_ended"] is True
    assert [m.user_id for m in await room.get_members()] == ["olga"]
    assert "member_left" in [f["type"] for f in await olga.new()]


async def test_acting_in_a_room_not_joined_fans_out_nothing(handler: ProtocolHandler, hub: Hub) -> None:
    room = await hub.room("general")
    await room.join("alice", "Alice")  # a member, but this connection did not join
    bob = await connect(handler, "bob")
    await bob.ask({"type": "join", "room": "general"})
    alice = await connect(handler, "alice")
    await bob.new()
    for command in [
        {"type": "send", "room": "general", "content": "x"},
        {"type": "typing", "room": "general"},
        {"type": "kick", "room": "general", "user": "bob"},
        {"type": "members", "room": "general"},
        {"type": "join_requests", "room": "general"},
    ]:
        assert code_of(await alice.ask(command)) == "not_joined"
    assert await bob.new() == []
    assert await room.get_history() == []


async def test_room_full_and_too_many_rooms(handler: ProtocolHandler, hub: Hub) -> None:
    await hub.room("tiny", RoomConfig(max_members=1))
    alice = await connect(handler, "alice")
    bob = await connect(handler, "bob")
    data_of(await alice.ask({"type": "join", "room": "tiny"}))
    assert code_of(await bob.ask({"type": "join", "room": "tiny"})) == "room_full"
    for name in ["a", "b"]:
        data_of(await alice.ask({"type": "join", "room": name}))
    assert code_of(await alice.ask({"type": "join", "room": "c"})) == "too_many_rooms"
    data_of(await alice.ask({"type": "join", "room": "a"}))  # joined already: fine
    await alice.ask({"type": "leave", "room": "a"})
    data_of(await alice.ask({"type": "join", "room": "c"}))


@pytest.mark.parametrize("how", ["kick", "ban"])
async def test_a_kicked_or_banned_user_no_longer_counts_the_room(hub: Hub, tokens: Tokens, how: str) -> None:
    handler = ProtocolHandler(hub, authenticator=tokens, max_rooms_per_connection=2).install()
    await (await hub.room("general")).join("olga", "Olga", "admin")
    olga = await connect(handler, "olga")
    alice = await connect(handler, "alice")
    data_of(await olga.ask({"type": "join", "room": "general"}))
    for room in ["general", "other"]:
        data_of(await alice.ask({"type": "join", "room": room}))
    assert code_of(await alice.ask({"type": "join", "room": "third"})) == "too_many_rooms"
    data_of(await olga.ask({"type": how, "room": "general", "user": "alice"}))
    seen = [(f["type"], f.get("topic")) for f in await alice.new()]
    assert seen[-1] == ("kicked" if how == "kick" else "banned", "room:general")  # told first
    data_of(await alice.ask({"type": "join", "room": "third"}))  # general no longer counts
    assert code_of(await alice.ask({"type": "send", "room": "general", "content": "hi"})) == "not_joined"
    assert data_of(await alice.ask({"type": "leave", "room": "general"}))["left"] is False


async def test_a_membership_left_on_another_device_no_longer_counts_the_room(hub: Hub, tokens: Tokens) -> None:
    handler = ProtocolHandler(hub, authenticator=tokens, max_rooms_per_connection=2).install()
    laptop = await connect(handler, "bob")
    phone = await connect(handler, "bob")
    alice = await connect(handler, "alice")
    data_of(await alice.ask({"type": "join", "room": "general"}))
    for room in ["general", "other"]:
        data_of(await phone.ask({"type": "join", "room": room}))
    data_of(await laptop.ask({"type": "join", "room": "general"}))
    assert code_of(await phone.ask({"type": "join", "room": "third"})) == "too_many_rooms"
    left = data_of(await laptop.ask({"type": "leave", "room": "general", "membership": True}))
    assert left == {"room_id": "general", "left": True, "membership_ended": True}
    assert [(f["type"], f.get("topic")) for f in await phone.new()][-1] == ("member_left", "room:general")
    data_of(await phone.ask({"type": "join", "room": "third"}))  # general no longer counts
    assert code_of(await phone.ask({"type": "history", "room": "general"})) == "not_joined"
    assert [c.user_id for c in hub.connections.get_room_connections("general")] == ["alice"]
    members = data_of(await alice.ask({"type": "members", "room": "general"}))["members"]
    assert [(m["user_id"], m["online"]) for m in members] == [("alice", True)]


async def test_join_requests(handler: ProtocolHandler, hub: Hub) -> None:
    room = await hub.room("team", RoomConfig(join_policy="approval"))
    await room.join("olga", "Olga", "admin", invited=True)
    olga = await connect(handler, "olga")
    await olga.ask({"type": "join", "room": "team"})
    carol = await connect(handler, "carol")
    dave = await connect(handler, "dave")
    await olga.new()

    assert code_of(await carol.ask({"type": "join", "room": "team"})) == "approval_required"
    request = data_of(await carol.ask({"type": "request_join", "room": "team", "display_name": "Carol"}))
    assert request["user_id"] == "carol"
    assert request["display_name"] == "Carol"
    await dave.ask({"type": "request_join", "room": "team"})
    events = [f for f in await olga.new() if f["type"] == "join_request"]
    assert [e["data"]["user_id"] for e in events] == ["carol", "dave"]
    pending = data_of(await olga.ask({"type": "join_requests", "room": "team"}))
    assert [r["user_id"] for r in pending["requests"]] == ["carol", "dave"]

    assert data_of(await olga.ask({"type": "approve", "room": "team", "user": "carol"}))["user_id"] == "carol"
    assert data_of(await olga.ask({"type": "deny", "room": "team", "user": "dave", "reason": "no"}))["denied"] is True
    assert code_of(await olga.ask({"type": "deny", "room": "team", "user": "dave"})) == "not_found"
    await trio.sleep(0.5)
    notes = [f for f in await carol.new() if f["type"] == "notification"]
    assert notes[-1]["data"]["data"]["approved"] is True
    data_of(await carol.ask({"type": "join", "room": "team"}))
    notes = [f for f in await dave.new() if f["type"] == "notification"]
    assert notes[-1]["data"]["data"]["approved"] is False


# -- resume --------------------------------------------------------------------------


async def test_resume_without_a_gap_replays_exactly_the_missed_events(handler: ProtocolHandler, hub: Hub) -> None:
    room = await hub.room("general")
    await room.join("bob", "Bob")
    alice = await connect(handler, "alice")
    await alice.ask({"type": "join", "room": "general"})
    seen = await room.send_message("bob", "one")
    await alice.new()
    await alice.transport.close(1006, "gone")
    await handler.close(alice.id)
    await room.send_message("bob", "two")
    await room.send_message("bob", "three")

    again = await connect(handler, "alice")
    await again.new()
    answer = await again.ask({"type": "join", "room": "general", "since": {"epoch": seen.epoch, "seq": seen.seq}})
    frames = again.transport  # events come before the reply
    got = [f for f in all_frames(frames) if f.get("topic") == "room:general" and "seq" in f]
    assert [(f["seq"], f["data"]["content"]) for f in got] == [(seen.seq + 1, "two"), (seen.seq + 2, "three")]
    reply = data_of(answer)
    assert reply["recovered"] is True
    assert reply["replayed"] == 2
    assert reply["last_seq"] == seen.seq + 2


async def test_resume_with_a_gap_says_not_recovered(hub: Hub) -> None:
    async with open_hub(HubConfig(room=RoomConfig(history_size=2))) as small:
        handler = ProtocolHandler(small).install()
        room = await small.room("general")
        await room.join("bob", "Bob")
        first = await room.send_message("bob", "one")
        for n in range(5):
            await room.send_message("bob", f"m{n}")
        alice = await connect(handler, "alice")
        reply = data_of(await alice.ask({"type": "join", "room": "general", "since": {"epoch": first.epoch, "seq": first.seq}}))
        assert reply["recovered"] is False
        assert reply["replayed"] == 0
        assert code_of(await alice.ask({"type": "history", "room": "general", "since": {"epoch": first.epoch, "seq": 1}})) == (
            "history_unavailable"
        )
        other = data_of(await alice.ask({"type": "join", "room": "general", "since": {"epoch": "another", "seq": 1}}))
        assert other["recovered"] is False


# -- notifications and live queries --------------------------------------------------


async def test_notification_commands(handler: ProtocolHandler, hub: Hub) -> None:
    alice = await connect(handler, "alice")
    phone = await connect(handler, "alice")
    first = await hub.notifications.send("alice", "one", "body")
    await hub.notifications.send("alice", "two", "")
    events = [f for f in await alice.new() if f["type"] == "notification"]
    assert [(e["seq"], e["data"]["title"]) for e in events] == [(1, "one"), (2, "two")]

    listed = data_of(await alice.ask({"type": "notifications", "limit": 10}))
    assert [n["title"] for n in listed["notifications"]] == ["one", "two"]
    assert data_of(await alice.ask({"type": "unread"})) == {"count": 2}
    assert data_of(await alice.ask({"type": "mark_read", "id": first.id})) == {"id": first.id, "read": True}
    assert code_of(await alice.ask({"type": "mark_read", "id": "nope"})) == "not_found"
    read = [f for f in await phone.new() if f["type"] == "notification_read"]
    assert read  # every device learns
    unread = data_of(await alice.ask({"type": "notifications", "unread_only": True}))
    assert [n["title"] for n in unread["notifications"]] == ["two"]
    assert data_of(await alice.ask({"type": "mark_all_read"})) == {"count": 1}
    assert data_of(await alice.ask({"type": "clear"})) == {"count": 2}
    assert data_of(await alice.ask({"type": "unread"})) == {"count": 0}


async def test_watch_and_unwatch(hub: Hub, tokens: Tokens) -> None:
    policy_calls: list[tuple[str | None, str]] = []

    def policy(user: str | None, model: str, filters: Any) -> bool:
        policy_calls.append((user, model))
        return model != "Secret"

    handler = ProtocolHandler(hub, watchable_models="*", watch_policy=policy, max_watches_per_connection=2).install()
    alice = await connect(handler, "alice")
    bob = await connect(handler, "bob")
    await hub.live.notify_create("Order", 1, {"status": "open"})
    watch = data_of(await alice.ask({"type": "watch", "model": "Order", "filters": {"status": "open"}}))
    assert watch["version"] == 1
    assert watch["epoch"] == hub.live.epoch
    await hub.live.notify_create("Order", 2, {"status": "open"})
    await hub.live.notify_create("Order", 3, {"status": "closed"})
    changes = [f for f in await alice.new() if f["type"] == "change"]
    assert [(c["seq"], c["data"]["pk"]) for c in changes] == [(2, 2)]
    assert changes[0]["topic"] == f"live:{watch['id']}"

    replay = data_of(await alice.ask({"type": "watch", "model": "Order", "since": 0, "epoch": hub.live.epoch}))
    assert [c["data"]["pk"] for c in alice.before if c["topic"] == f"live:{replay['id']}"] == [1, 2, 3]  # replayed, then the reply
    assert code_of(await alice.ask({"type": "watch", "model": "Other"})) == "too_many_watches"
    assert code_of(await bob.ask({"type": "watch", "model": "Secret"})) == "not_allowed"
    assert code_of(await bob.ask({"type": "watch", "model": "Order", "since": 99})) == "history_unavailable"
    assert code_of(await bob.ask({"type": "unwatch", "id": watch["id"]})) == "not_found"  # not bob's
    assert data_of(await alice.ask({"type": "unwatch", "id": watch["id"]})) == {"id": watch["id"], "unwatched": True}
    assert data_of(await alice.ask({"type": "unwatch", "id": replay["id"]}))["unwatched"] is True
    await hub.live.notify_create("Order", 4, {"status": "open"})
    assert [f for f in await alice.new() if f["type"] == "change"] == []
    assert ("alice", "Order") in policy_calls


# -- errors and limits -----------------------------------------------------------------


async def test_garbage_frames_then_4004(handler: ProtocolHandler) -> None:
    alice = await connect(handler, "alice")
    await alice.new()
    await alice.send("not json")
    await alice.send({"type": "ping"})  # a good frame resets the count
    for frame in ["{", "[]", b"\xff", '{"type":"fly"}']:
        await alice.send(frame)
    codes = [f.get("code", f["type"]) for f in await alice.new()]
    assert codes == ["bad_json", "pong", "bad_json", "bad_frame", "bad_json", "unknown_command"]
    assert alice.closed == CloseCode.PROTOCOL_VIOLATION
    assert handler.session_count() == 0


async def test_too_big_and_too_deep(hub: Hub) -> None:
    handler = ProtocolHandler(hub, max_message_size=100, max_depth=4).install()
    alice = await connect(handler, "alice")
    await alice.new()
    await alice.send("x" * 101)
    await alice.send('{"type":"ping","x":[[[[[]]]]]}')
    assert [f["code"] for f in await alice.new()] == ["too_big", "too_deep"]
    assert alice.closed is None


async def test_rate_limited_error_then_4029(tokens: Tokens) -> None:
    config = HubConfig(rate_limit=WSRateLimitConfig(messages_per_second=2, messages_per_minute=60, burst_size=2), max_rate_violations=3)
    async with open_hub(config) as hub:
        handler = ProtocolHandler(hub).install()
        alice = await connect(handler, "alice")
        for n in range(4):
            await alice.send({"type": "ping", "ref": n})
        frames = await alice.new()
        assert [f["type"] for f in frames] == ["welcome", "pong", "pong", "error", "error"]
        assert frames[3]["code"] == "rate_limited"
        assert frames[3]["ref"] == 2
        assert frames[3]["retry_after"] > 0
        assert frames[3]["detail"] == "rate limited: too many messages; retry after retry_after seconds"  # constant text
        assert alice.closed is None
        await alice.send({"type": "ping"})  # the third violation in a row
        await alice.new()
        assert alice.closed == CloseCode.RATE_LIMITED
        await alice.send({"type": "ping"})  # closed: ignored, no exception


async def test_a_send_over_the_rooms_rate_limit_has_a_constant_detail(handler: ProtocolHandler, hub: Hub) -> None:
    await hub.room("slow", RoomConfig(rate_limit=2))
    alice = await connect(handler, "alice")
    data_of(await alice.ask({"type": "join", "room": "slow"}))
    for n in range(2):
        data_of(await alice.ask({"type": "send", "room": "slow", "content": f"m{n}"}))
    refused = await alice.ask({"type": "send", "room": "slow", "content": "too many"})
    assert code_of(refused) == "rate_limited"
    assert refused["detail"] == "'alice' sent 2 messages in the last minute; retry after retry_after seconds"
    assert 59 < refused["retry_after"] <= 60


async def test_internal_errors_are_logged_not_shown(handler: ProtocolHandler, hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    alice = await connect(handler, "alice")

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    hub.notifications.get_unread = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="ensemble.server"):
        answer = await alice.ask({"type": "unread"})
    assert code_of(answer) == "internal"
    assert "secret" not in json.dumps(answer)
    assert "Traceback" not in json.dumps(answer)
    assert any("secret internals" in (record.exc_text or "") for record in caplog.records)
    assert data_of(await alice.ask({"type": "notifications"})) == {"notifications": []}  # the connection carries on


async def test_invalid_message_content(handler: ProtocolHandler, hub: Hub) -> None:
    await hub.room("strict", RoomConfig(max_message_length=5))
    alice = await connect(handler, "alice")
    await alice.ask({"type": "join", "room": "strict"})
    assert code_of(await alice.ask({"type": "send", "room": "strict", "content": "too long"})) == "invalid"
    assert code_of(await alice.ask({"type": "send", "room": "strict", "content": "x", "message_type": "video"})) == "invalid"
    assert code_of(await alice.ask({"type": "send", "room": "strict", "content": 5})) == "invalid"


# -- authentication --------------------------------------------------------------------


async def test_not_authenticated_until_auth(handler: ProtocolHandler, hub: Hub, tokens: Tokens) -> None:
    anon = await connect(handler, None)
    [welcome] = await anon.new()
    assert welcome["user_id"] is None
    assert welcome["notifications"] is None
    for command in [{"type": "join", "room": "general"}, {"type": "unread"}, {"type": "watch", "model": "M"}]:
        assert code_of(await anon.ask(command)) == "not_authenticated"
    assert (await anon.ask({"type": "ping", "ref": 1}))["type"] == "pong"
    assert data_of(await anon.ask({"type": "options", "batch": False})) == {"batch": False}
    await hub.notifications.send("bob", "waiting", "")

    hello = data_of(await anon.ask({"type": "auth", "token": "tok-bob"}))
    assert hello["user_id"] == "bob"
    assert hello["notifications"]["last_seq"] == 1
    assert hub.is_online("bob")
    assert hello["connection_id"] == anon.id  # the same connection, now bob's
    assert [c.connection_id for c in hub.connections.get_user_connections("bob")] == [anon.id]
    assert hub.connections.connection_count == 1
    assert anon.closed is None
    data_of(await anon.ask({"type": "join", "room": "general"}))
    assert hub.connections.get_room_connections("general")[0].user_id == "bob"
    assert handler.session_count() == 1

    await handler.close(anon.id, code=CloseCode.NORMAL)
    assert anon.closed == CloseCode.NORMAL
    assert handler.session_count() == 0


async def test_auth_reply_comes_after_earlier_frames_and_before_the_replayed_notifications(handler: ProtocolHandler, hub: Hub) -> None:
    seen = await hub.notifications.send("bob", "seen", "")
    missed = [await hub.notifications.send("bob", f"missed {n}", "") for n in range(2)]
    anon = await connect(handler, None)
    await anon.new()
    await anon.send({"type": "ping", "ref": "p"})
    await anon.send({"type": "auth", "ref": "a", "token": "tok-bob", "since": {"epoch": seen.epoch, "seq": seen.seq}})
    await hub.notifications.send("bob", "live", "")
    frames = await anon.new()
    assert [(f["type"], f.get("ref")) for f in frames[:2]] == [("pong", "p"), ("reply", "a")]
    hello = data_of(frames[1])
    assert hello["connection_id"] == anon.id
    assert (hello["notifications"]["recovered"], hello["notifications"]["replayed"]) == (True, 2)
    assert [f["data"]["title"] for f in frames[2:]] == [*(n.title for n in missed), "live"]


async def test_auth_without_ref_is_answered_with_a_welcome(handler: ProtocolHandler, hub: Hub) -> None:
    anon = await connect(handler, None)
    await anon.new()
    await anon.send({"token": "tok-bob"})
    [welcome] = await anon.new()
    assert (welcome["type"], welcome["connection_id"], welcome["user_id"]) == ("welcome", anon.id, "bob")
    assert welcome["notifications"]["topic"] == "user:bob"


async def test_auth_over_the_per_user_limit_closes_1013(tokens: Tokens) -> None:
    config = HubConfig(max_connections_per_user=1, rate_limit=WSRateLimitConfig(messages_per_second=1000, burst_size=1000))
    async with open_hub(config) as hub:
        handler = ProtocolHandler(hub, authenticator=tokens).install()
        bob = await connect(handler, "bob")
        anon = await connect(handler, None)
        await anon.send({"type": "auth", "ref": 1, "token": "tok-bob"})
        await anon.new()
        assert anon.closed == CloseCode.TRY_AGAIN_LATER
        assert anon.transport.close_reason == "too many connections"
        assert hub.connections.get_connection(anon.id) is None
        assert [c.connection_id for c in hub.connections.get_user_connections("bob")] == [bob.id]
        assert handler.session_count() == 1
        assert bob.closed is None


async def test_a_failing_auth_closes_1011_and_is_logged(handler: ProtocolHandler, hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mailbox store down")

    hub.notifications.attach = broken  # type: ignore[method-assign]
    anon = await connect(handler, None)
    with caplog.at_level(logging.ERROR, logger="ensemble.server"):
        await anon.send({"type": "auth", "ref": 1, "token": "tok-bob"})
        frames = await anon.new()
    assert anon.closed == CloseCode.INTERNAL_ERROR
    assert all(f["type"] == "welcome" for f in frames)  # no reply, no traceback on the wire
    assert "authenticating connection" in caplog.text
    assert "mailbox store down" in caplog.text
    assert not hub.is_online("bob")
    assert handler.session_count() == 0


async def test_a_bad_token_before_auth_closes_4001(handler: ProtocolHandler) -> None:
    anon = await connect(handler, None)
    assert code_of(await anon.ask({"type": "auth", "token": "forged"})) == "unauthenticated"
    assert anon.closed == CloseCode.UNAUTHENTICATED
    anon = await connect(handler, None)
    await anon.send({"token": "boom"})  # the authenticator raised: refused, never a traceback
    frames = await anon.new()
    assert frames[-1]["code"] == "unauthenticated"
    assert anon.closed == CloseCode.UNAUTHENTICATED


async def test_no_authenticator_refuses_tokens(hub: Hub) -> None:
    handler = ProtocolHandler(hub).install()
    anon = await connect(handler, None)
    assert code_of(await anon.ask({"type": "auth", "token": "tok-bob"})) == "unauthenticated"
    assert anon.closed == CloseCode.UNAUTHENTICATED


async def test_bare_token_refresh_and_expiry(handler: ProtocolHandler, tokens: Tokens) -> None:
    tokens.expiry = {"tok-alice": 100.0}
    transport = MemoryTransport()
    info = await handler.open(transport, Identity(user_id="alice", expires_at=50.0))
    alice = Client(handler, transport, info.connection_id)
    assert handler.expiring(49.0) == []
    assert handler.expiring(50.0) == [alice.id]

    await alice.send({"token": "tok-alice"})  # the seeds' form: no ref, no reply
    assert [f["type"] for f in await alice.new()] == ["welcome"]
    assert handler.expiring(99.0) == []
    assert handler.expiring(100.0) == [alice.id]


async def test_refresh_keeps_the_connection_and_extends_expiry(handler: ProtocolHandler, tokens: Tokens) -> None:
    tokens.expiry = {"tok-alice": 500.0}
    transport = MemoryTransport()
    info = await handler.open(transport, Identity(user_id="alice", expires_at=50.0))
    alice = Client(handler, transport, info.connection_id)
    assert handler.expiring(60.0) == [alice.id]
    refreshed = data_of(await alice.ask({"type": "auth", "token": "tok-alice"}))
    assert refreshed == {"user_id": "alice", "guest": False, "expires_at": 500.0}
    assert handler.expiring(60.0) == []
    assert code_of(await alice.ask({"type": "auth", "token": "tok-mallory"})) == "invalid"  # another user
    assert code_of(await alice.ask({"type": "auth", "token": "forged"})) == "unauthenticated"
    assert alice.closed is None  # a failed refresh: the old identity stands until it expires
    assert handler.expiring(500.0) == [alice.id]
    assert await handler.sweep(500.0) == 1
    assert alice.closed == CloseCode.TOKEN_EXPIRED


async def test_auth_timeout(hub: Hub, tokens: Tokens) -> None:
    now = [1000.0]
    handler = ProtocolHandler(hub, authenticator=tokens, auth_timeout=10.0, clock=lambda: now[0]).install()
    anon = await connect(handler, None)
    assert handler.unauthenticated() == []
    now[0] += 10
    assert handler.unauthenticated() == [anon.id]
    assert await handler.sweep() == 1
    assert anon.closed == CloseCode.UNAUTHENTICATED


# -- batching and bookkeeping ------------------------------------------------------------


async def test_batching_joins_events_with_newlines(handler: ProtocolHandler, hub: Hub) -> None:
    room = await hub.room("general")
    await room.join("bob", "Bob")
    alice = await connect(handler, "alice")
    await alice.ask({"type": "join", "room": "general"})
    assert data_of(await alice.ask({"type": "options", "batch": True})) == {"batch": True}
    before = len(alice.transport.sent)
    alice.transport.block()  # the client reads slower: events pile up in the outbox
    for n in range(5):
        await room.send_message("bob", f"m{n}")
    alice.transport.unblock()
    await trio.sleep(0.1)
    frames = alice.transport.sent[before:]
    assert len(frames) < 5
    assert any(b"\n" in frame for frame in frames)
    assert [json.loads(line)["data"]["content"] for frame in frames for line in frame.split(b"\n")] == [f"m{n}" for n in range(5)]

    data_of(await alice.ask({"type": "options", "batch": False}))
    before = len(alice.transport.sent)
    alice.transport.block()
    for n in range(3):
        await room.send_message("bob", f"n{n}")
    alice.transport.unblock()
    await trio.sleep(0.1)
    assert len(alice.transport.sent) > before
    assert all(b"\n" not in frame for frame in alice.transport.sent[before:])


async def test_connections_opened_on_the_hub_directly_are_served(handler: ProtocolHandler, hub: Hub) -> None:
    transport = MemoryTransport()
    info = await hub.connect(transport, user_id="alice")
    client = Client(handler, transport, info.connection_id)
    assert data_of(await client.ask({"type": "join", "room": "general"}))["member"]["user_id"] == "alice"
    assert data_of(await client.ask({"type": "options", "batch": True})) == {"batch": False}  # not our transport


async def test_sessions_are_forgotten_whatever_closes_the_connection(handler: ProtocolHandler, hub: Hub) -> None:
    alice = await connect(handler, "alice")
    bob = await connect(handler, "bob")
    assert handler.session_count() == 2
    await hub.connections.disconnect(alice.id)
    alice.transport.fail()
    bob.transport.fail()
    await hub.connections.send_to_connection(bob.id, {"x": 1})
    await trio.sleep(0.1)
    assert bob.closed == CloseCode.INTERNAL_ERROR
    assert handler.session_count() == 0


async def test_watching_is_refused_unless_the_model_is_watchable(hub: Hub) -> None:
    default = ProtocolHandler(hub).install()
    alice = await connect(default, "alice")
    refused = await alice.ask({"type": "watch", "model": "Order"})
    assert code_of(refused) == "not_allowed"
    assert "watchable_models" in refused["detail"]
    assert hub.live.statistics().watchers == 0
    listed = ProtocolHandler(hub, watchable_models=["Order"]).install()
    bob = await connect(listed, "bob")
    assert data_of(await bob.ask({"type": "watch", "model": "Order"}))["model"] == "Order"
    assert code_of(await bob.ask({"type": "watch", "model": "User"})) == "not_allowed"
