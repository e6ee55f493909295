"""User notifications: the seed's NotificationManager API on per-user mailbox actors."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from ensemble.actors import ActorCrashed, ActorRef, Supervisor
from ensemble.realtime._errors import HistoryUnavailable
from ensemble.realtime._events import NOTIFICATION, NOTIFICATION_READ, Event
from ensemble.realtime._models import Notification
from ensemble.realtime._notification_store import (
    Append,
    Clear,
    CreateUser,
    InMemoryNotificationStore,
    MarkAllRead,
    MarkRead,
    UserRecord,
    apply_ops,
)
from ensemble.realtime._notifications import _IDLE, NotificationManager, validate_user_id
from ensemble.testing import FaultInjector

IDLE = 60.0


@attrs.define(eq=False)
class Device:
    """A test subscriber: records what it is given."""

    connection_id: str
    user_id: str | None
    accept: bool = True
    events: list[Event] = attrs.field(factory=list)

    def deliver_nowait(self, event: Event) -> bool:
        if self.accept:
            self.events.append(event)
        return self.accept

    def of_type(self, type: str) -> list[Event]:
        return [e for e in self.events if e.type == type]


def make(supervisor: Supervisor, **kwargs: object) -> NotificationManager:
    kwargs.setdefault("idle_timeout", IDLE)
    return NotificationManager(supervisor, **kwargs)  # type: ignore[arg-type]


async def settle() -> None:
    """Let the mailboxes run what is due (callbacks run after ``send`` returns)."""
    await trio.testing.wait_all_tasks_blocked()


def mailbox(manager: NotificationManager, user_id: str) -> ActorRef:
    ref = manager.mailbox(user_id)
    assert ref is not None
    return ref


# -- the store -------------------------------------------------------------------


def note(seq: int, *, read: bool = False) -> Notification:
    return Notification(id=f"n{seq}", user_id="u", title="t", body="b", seq=seq, epoch="e", read=read)


def test_apply_ops_evicts_the_oldest_and_tracks_positions() -> None:
    record = apply_ops(None, "u", [CreateUser("e"), *(Append(note(seq), max_per_user=3) for seq in range(1, 6))])
    assert record is not None
    assert [n.seq for n in record.notifications] == [3, 4, 5]
    assert (record.epoch, record.last_seq, record.evicted_through) == ("e", 5, 2)
    record = apply_ops(record, "u", [MarkRead(("n4", "unknown"))])
    assert record is not None
    assert [n.read for n in record.notifications] == [False, True, False]
    assert record.unread_count == 2
    record = apply_ops(record, "u", [MarkAllRead()])
    assert record is not None
    assert record.unread_count == 0
    record = apply_ops(record, "u", [Clear(), CreateUser("other")])
    assert record == UserRecord(user_id="u", epoch="e", notifications=(), last_seq=5, evicted_through=2)


def test_apply_ops_without_a_record_does_nothing() -> None:
    assert apply_ops(None, "u", [Append(note(1)), MarkAllRead(), Clear()]) is None


async def test_in_memory_store_hands_out_snapshots(autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryNotificationStore()
    assert await store.load("u") is None
    await store.apply("u", [CreateUser("e"), Append(note(1))])
    before = await store.load("u")
    await store.apply("u", [MarkAllRead(), Append(note(2))])
    assert before is not None
    assert [(n.seq, n.read) for n in before.notifications] == [(1, False)]
    after = await store.load("u")
    assert after is not None
    assert [(n.seq, n.read) for n in after.notifications] == [(1, True), (2, False)]
    assert store.users() == ["u"]


# -- sending ---------------------------------------------------------------------


async def test_send_returns_a_numbered_notification(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor, clock=lambda: 1234.5)
    first = await manager.send("user1", "Welcome", "You have joined!", "info")
    data = {"order_id": "12345"}
    second = await manager.send("user1", "Order Shipped", "On its way", "success", data=data)
    data["order_id"] = "changed"
    assert (first.user_id, first.title, first.body, first.notification_type) == ("user1", "Welcome", "You have joined!", "info")
    assert (first.read, first.created_at, first.data) == (False, 1234.5, None)
    assert second.data == {"order_id": "12345"}
    assert (first.seq, second.seq) == (1, 2)
    assert first.epoch == second.epoch != ""
    assert first.id != second.id
    assert await manager.position("user1") == (first.epoch, 2)
    assert json.loads(json.dumps(second.to_dict()))["data"] == {"order_id": "12345"}


@pytest.mark.parametrize("notification_type", ["", "debug", "INFO"])
async def test_send_rejects_an_unknown_type(supervisor: Supervisor, autojump_clock: trio.testing.MockClock, notification_type: str) -> None:
    manager = make(supervisor)
    with pytest.raises(ValueError, match="notification_type"):
        await manager.send("user1", "t", "b", notification_type)
    with pytest.raises(ValueError, match="notification_type"):
        await manager.send_many(["user1"], "t", "b", notification_type)
    assert manager.mailbox("user1") is None


@pytest.mark.parametrize("user_id", ["", "a/b", "x" * 257, None, 7])
async def test_user_ids_are_validated(supervisor: Supervisor, autojump_clock: trio.testing.MockClock, user_id: object) -> None:
    manager = make(supervisor)
    with pytest.raises(ValueError, match="user id"):
        validate_user_id(user_id)
    with pytest.raises(ValueError, match="user id"):
        await manager.send(user_id, "t", "b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user id"):
        manager.subscribe(user_id, print)  # type: ignore[arg-type]
    assert supervisor.which_children() == []


async def test_max_per_user_evicts_the_oldest(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor, max_per_user=3)
    sent = [await manager.send("u", f"n{i}", "b") for i in range(5)]
    kept = await manager.get_all("u", limit=None)
    assert kept == sent[2:]
    assert await manager.get_all("u", limit=2) == sent[3:]
    assert await manager.get_all("u", limit=0) == []
    assert await manager.get_unread("u") == sent[2:]
    with pytest.raises(ValueError, match="limit"):
        await manager.get_all("u", limit=-1)


async def test_send_many_sends_once_per_distinct_user(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    sent = await manager.send_many(["user1", "user2", "user1", "user3"], "System Update", "New version deployed")
    assert [n.user_id for n in sent] == ["user1", "user2", "user3"]
    assert all(n.seq == 1 and n.notification_type == "info" for n in sent)
    with pytest.raises(ValueError, match="user id"):
        await manager.send_many(["user1", "bad/id"], "t", "b")
    assert [n.seq for n in await manager.get_all("user1")] == [1]  # nothing sent on a bad batch


async def test_broadcast_all_reaches_subscribed_users_only(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    await manager.send("stored-only", "t", "b")
    device = Device("c1", "online")
    await manager.attach("online", device)
    got: list[Notification] = []
    manager.subscribe("callback", got.append)
    sent = await manager.broadcast_all("Maintenance", "Restart in 5 minutes", "warning")
    await settle()
    assert sorted(n.user_id for n in sent) == ["callback", "online"]
    assert [e.data["title"] for e in device.of_type(NOTIFICATION)] == ["Maintenance"]
    assert [n.title for n in got] == ["Maintenance"]
    assert len(await manager.get_all("stored-only")) == 1
    with pytest.raises(ValueError, match="notification_type"):
        await manager.broadcast_all("t", "b", "nope")


# -- devices ---------------------------------------------------------------------


async def test_one_event_goes_to_every_device_of_the_user(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    phone, laptop, other = Device("phone", "alice"), Device("laptop", "alice"), Device("x", "bob")
    await manager.attach("alice", phone)
    await manager.attach("alice", laptop)
    await manager.attach("bob", other)
    n = await manager.send("alice", "Hi", "there", data={"k": 1})
    assert len(phone.events) == len(laptop.events) == 1
    event = phone.events[0]
    assert laptop.events[0] is event
    assert (event.type, event.topic, event.seq, event.epoch) == (NOTIFICATION, "user:alice", n.seq, n.epoch)
    assert event.data == n.to_dict()
    assert json.loads(event.encoded)["data"]["data"] == {"k": 1}
    assert other.events == []


async def test_attach_checks_the_subscribers_user(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    with pytest.raises(ValueError, match="belongs to"):
        await manager.attach("alice", Device("c", "bob"))
    assert not manager.is_online("alice")


async def test_read_state_is_shared_by_all_devices(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    phone, laptop = Device("phone", "alice"), Device("laptop", "alice")
    await manager.attach("alice", phone)
    await manager.attach("alice", laptop)
    a = await manager.send("alice", "a", "b")
    b = await manager.send("alice", "b", "b")
    c = await manager.send("alice", "c", "b")

    assert await manager.mark_read("alice", b.id) is True
    assert await manager.mark_read("alice", b.id) is True  # already read: no change, no event
    assert await manager.mark_read("alice", "no-such-id") is False
    assert [n.id for n in await manager.get_unread("alice")] == [a.id, c.id]
    reads = phone.of_type(NOTIFICATION_READ)
    assert len(reads) == 1
    assert laptop.of_type(NOTIFICATION_READ)[0] is reads[0]
    assert reads[0].data == {"action": "read", "ids": [b.id], "unread": 2}
    assert reads[0].seq is None

    assert await manager.mark_all_read("alice") == 2
    assert await manager.mark_all_read("alice") == 0
    assert await manager.get_unread("alice") == []
    assert phone.of_type(NOTIFICATION_READ)[-1].data == {"action": "read_all", "ids": [a.id, c.id], "unread": 0}
    assert [n.read for n in await manager.get_all("alice")] == [True, True, True]

    assert await manager.clear("alice") == 3
    assert await manager.clear("alice") == 0
    assert phone.of_type(NOTIFICATION_READ)[-1].data == {"action": "clear", "ids": [a.id, b.id, c.id], "unread": 0}
    assert len(laptop.of_type(NOTIFICATION_READ)) == 3
    assert await manager.get_all("alice") == []
    d = await manager.send("alice", "d", "b")
    assert d.seq == 4  # sequence numbers continue after a clear


async def test_a_refusing_device_is_detached(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    offline: list[str] = []
    manager = make(supervisor, on_offline=offline.append)
    closed = Device("closed", "alice", accept=False)
    await manager.attach("alice", closed)
    await manager.send("alice", "t", "b")
    assert not manager.is_online("alice")
    assert offline == ["alice"]
    assert await manager.detach("alice", "closed") is False


@attrs.define(eq=False)
class BrokenDevice(Device):
    def deliver_nowait(self, event: Event) -> bool:
        raise RuntimeError("broken connection")


async def test_raising_devices_and_presence_callbacks_are_contained(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    def broken(user_id: str) -> None:
        raise RuntimeError("presence bug")

    manager = make(supervisor, on_online=broken, on_offline=broken)
    good = Device("good", "u")
    assert (await manager.attach("u", BrokenDevice("bad", "u"))).came_online
    await manager.attach("u", good)
    n = await manager.send("u", "t", "b")
    assert [e.seq for e in good.events] == [n.seq]
    assert await manager.detach("u", "bad") is False  # detached when it raised
    assert manager.is_online("u")
    assert mailbox(manager, "u").statistics().crashes == 0


async def test_is_online_with_two_devices(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    events: list[tuple[str, str]] = []

    async def went_offline(user_id: str) -> None:
        await trio.lowlevel.checkpoint()
        events.append(("offline", user_id))

    manager = make(supervisor, on_online=lambda user_id: events.append(("online", user_id)), on_offline=went_offline)
    assert not manager.is_online("alice")
    first = await manager.attach("alice", Device("phone", "alice"))
    second = await manager.attach("alice", Device("laptop", "alice"))
    assert (first.came_online, second.came_online) == (True, False)
    assert manager.is_online("alice")
    assert manager.online_users() == ["alice"]
    assert await manager.detach("alice", "phone") is True
    assert manager.is_online("alice")
    assert await manager.detach("alice", "phone") is False
    assert await manager.detach("alice", "laptop") is True
    assert not manager.is_online("alice")
    assert manager.online_users() == []
    assert events == [("online", "alice"), ("offline", "alice")]


# -- replay ----------------------------------------------------------------------


async def test_replay_returns_exactly_what_came_after(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor, max_per_user=3)
    sent = [await manager.send("u", f"n{i}", "b") for i in range(5)]  # seqs 1..5; 1 and 2 evicted
    epoch = sent[0].epoch
    assert await manager.replay("u", (epoch, 5)) == []
    assert await manager.replay("u", (epoch, 3)) == sent[3:]
    assert await manager.replay("u", (epoch, 2)) == sent[2:]

    with pytest.raises(HistoryUnavailable) as evicted:
        await manager.replay("u", (epoch, 1))
    assert (evicted.value.epoch, evicted.value.first_seq, evicted.value.last_seq) == (epoch, 3, 5)
    with pytest.raises(HistoryUnavailable, match="future"):
        await manager.replay("u", (epoch, 6))
    with pytest.raises(HistoryUnavailable, match="epoch"):
        await manager.replay("u", ("another-epoch", 3))
    # A rejection, not a crash.
    assert mailbox(manager, "u").statistics().crashes == 0


async def test_replay_of_a_new_user(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    epoch, last_seq = await manager.position("new")
    assert last_seq == 0
    assert await manager.replay("new", (epoch, 0)) == []
    with pytest.raises(HistoryUnavailable):
        await manager.replay("new", ("", 0))


async def test_attach_since_replays_then_goes_live(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    sent = [await manager.send("u", f"n{i}", "b") for i in range(3)]
    await manager.mark_read("u", sent[2].id)
    device = Device("phone", "u")
    attached = await manager.attach("u", device, since=(sent[0].epoch, 1))
    assert attached.replayed == (sent[1], attrs.evolve(sent[2], read=True))
    assert (attached.epoch, attached.last_seq) == (sent[0].epoch, 3)
    later = await manager.send("u", "live", "b")
    assert [(e.seq, e.data["read"]) for e in device.events] == [(2, False), (3, True), (later.seq, False)]

    assert attached.recovered
    assert not (await manager.attach("u", Device("laptop", "u"))).recovered  # no since: nothing to recover

    stale = Device("stale", "u")
    with pytest.raises(HistoryUnavailable):
        await manager.attach("u", stale, since=("old-epoch", 1))
    assert stale.events == []
    assert await manager.detach("u", "stale") is False  # not attached


@pytest.mark.parametrize("case", ["another epoch", "evicted", "future"])
async def test_attach_not_strict_attaches_from_now_when_since_cannot_be_resumed(
    supervisor: Supervisor, autojump_clock: trio.testing.MockClock, case: str
) -> None:
    manager = make(supervisor, max_per_user=2)
    sent = [await manager.send("u", f"n{i}", "b") for i in range(4)]  # 3 and 4 kept
    since = {"another epoch": ("old-epoch", 3), "evicted": (sent[0].epoch, 1), "future": (sent[0].epoch, 5)}[case]
    device = Device("phone", "u")
    attached = await manager.attach("u", device, since=since, strict=False)
    assert (attached.recovered, attached.replayed, attached.epoch, attached.last_seq) == (False, (), sent[0].epoch, 4)
    assert device.events == []  # nothing replayed, not even part of it
    later = await manager.send("u", "live", "b")
    assert [e.seq for e in device.events] == [later.seq]  # attached all the same
    recovered = await manager.attach("u", Device("laptop", "u"), since=(sent[0].epoch, 3), strict=False)
    assert (recovered.recovered, [n.seq for n in recovered.replayed]) == (True, [4, 5])


# -- callbacks -------------------------------------------------------------------


async def test_subscribe_callbacks_sync_async_and_failing(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    sync_got: list[Notification] = []
    async_got: list[Notification] = []

    def broken(n: Notification) -> None:
        raise RuntimeError("callback bug")

    async def async_broken(n: Notification) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("async callback bug")

    async def collect(n: Notification) -> None:
        await trio.sleep(1)
        async_got.append(n)

    ids = [manager.subscribe("u", broken), manager.subscribe("u", sync_got.append), manager.subscribe("u", async_broken)]
    ids.append(manager.subscribe("u", collect))
    assert len(set(ids)) == 4
    first = await manager.send("u", "t", "b")
    # Callbacks run after send returns, before the mailbox's next message.
    assert await manager.get_unread("u") == [first]
    assert sync_got == [first]
    assert async_got == [first]
    assert mailbox(manager, "u").statistics().crashes == 0

    assert manager.unsubscribe("u", ids[1]) is True
    assert manager.unsubscribe("u", ids[1]) is False
    assert manager.unsubscribe("nobody", 12345) is False
    second = await manager.send("u", "t2", "b")
    await manager.position("u")
    assert sync_got == [first]
    assert async_got == [first, second]


async def test_a_slow_async_callback_is_cancelled(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor, callback_timeout=2.0)
    got: list[str] = []

    async def slow(n: Notification) -> None:
        await trio.sleep(10)
        got.append("slow")  # never reached

    manager.subscribe("u", slow)
    manager.subscribe("u", lambda n: got.append("fast"))
    started = trio.current_time()
    await manager.send("u", "t", "b")
    assert trio.current_time() == started  # the sender does not wait for callbacks
    await manager.position("u")
    assert trio.current_time() - started == pytest.approx(2.0)
    assert got == ["fast"]


# -- lifecycle -------------------------------------------------------------------


async def test_idle_mailbox_stops_and_resumes_from_the_store(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryNotificationStore()
    manager = make(supervisor, store=store)
    first = await manager.send("u", "t", "b")
    await manager.mark_read("u", first.id)
    await trio.sleep(IDLE / 2)
    assert manager.mailbox("u") is not None
    await trio.sleep(IDLE)
    assert manager.mailbox("u") is None
    assert supervisor.which_children() == []
    assert store.loads == 1

    second = await manager.send("u", "t", "b")
    assert store.loads == 2
    assert (second.seq, second.epoch) == (2, first.epoch)
    assert [n.read for n in await manager.get_all("u")] == [True, False]


async def test_a_mailbox_with_devices_is_not_reaped(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    manager.subscribe("u", print)  # callbacks do not keep a mailbox alive...
    await manager.attach("u", Device("phone", "u"))  # ...devices do
    await trio.sleep(IDLE * 10)
    assert manager.mailbox("u") is not None
    await manager.detach("u", "phone")
    await trio.sleep(IDLE + 1)
    assert manager.mailbox("u") is None
    got: list[Notification] = []
    manager.subscribe("u", got.append)  # the registry (with callbacks) outlived the mailbox
    n = await manager.send("u", "t", "b")
    await settle()
    assert got == [n]


async def test_a_message_racing_an_idle_stop_is_retried(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    manager = make(supervisor)
    first = await manager.send("u", "t", "b")
    old = mailbox(manager, "u")
    old.tell_nowait(_IDLE)  # the mailbox stops on this, before the send below is handled
    second = await manager.send("u", "t", "b")
    assert not old.alive
    assert mailbox(manager, "u") is not old
    assert (second.seq, second.epoch) == (2, first.epoch)


async def test_concurrent_first_use_starts_one_mailbox(supervisor: Supervisor, autojump_clock: trio.testing.MockClock) -> None:
    store = InMemoryNotificationStore()
    manager = make(supervisor, store=store)
    sent: list[Notification] = []

    async def send(i: int) -> None:
        sent.append(await manager.send("u", f"n{i}", "b"))

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(send, i)
    assert sorted(n.seq for n in sent) == list(range(1, 11))
    assert len({n.epoch for n in sent}) == 1
    assert store.loads == 1
    assert [child.id for child in supervisor.which_children()] == ["u"]
    assert mailbox(manager, "u").statistics().restarts == 0


async def test_a_crash_keeps_notifications_read_state_and_devices(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.testing.MockClock
) -> None:
    manager = make(supervisor)
    phone, laptop = Device("phone", "u"), Device("laptop", "u")
    await manager.attach("u", phone)
    await manager.attach("u", laptop)
    got: list[Notification] = []
    manager.subscribe("u", got.append)
    a = await manager.send("u", "a", "b")
    await manager.send("u", "b", "b")
    await manager.mark_read("u", a.id)
    await manager.send("bystander", "t", "b")
    bystander = mailbox(manager, "bystander")

    ref = mailbox(manager, "u")
    fault_injector.crash_next(ref)
    with pytest.raises(ActorCrashed):
        await manager.get_unread("u")
    await trio.testing.wait_all_tasks_blocked()  # let the supervisor restart it
    assert ref.statistics().restarts == 1
    assert bystander.statistics().restarts == 0
    assert mailbox(manager, "u") is ref

    assert manager.is_online("u")
    assert [n.read for n in await manager.get_all("u")] == [True, False]
    c = await manager.send("u", "c", "b")
    assert c.seq == 3
    assert phone.events[-1] is laptop.events[-1]
    assert phone.events[-1].seq == 3
    await settle()
    assert [n.seq for n in got] == [1, 2, 3]


async def test_queued_messages_survive_a_crash(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.testing.MockClock
) -> None:
    manager = make(supervisor)
    await manager.send("u", "t", "b")
    ref = mailbox(manager, "u")
    results: list[object] = []

    async def call(fn: Callable[[], Awaitable[object]]) -> None:
        try:
            results.append(await fn())
        except ActorCrashed:
            results.append("crashed")

    stall = fault_injector.stall(ref)
    fault_injector.crash_next(ref)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, lambda: manager.get_unread("u"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, lambda: manager.send("u", "t2", "b"))
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().mailbox_depth == 2
        stall.release()
    assert results[0] == "crashed"
    assert isinstance(results[1], Notification)
    assert results[1].seq == 2
    assert ref.statistics().restarts == 1


def test_manager_settings_are_validated() -> None:
    sup = object.__new__(Supervisor)
    with pytest.raises(ValueError, match="max_per_user"):
        NotificationManager(sup, max_per_user=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        NotificationManager(sup, idle_timeout=0)
    with pytest.raises(ValueError, match="callback_timeout"):
        NotificationManager(sup, callback_timeout=-1)


async def test_a_crash_looping_mailbox_is_given_up_on_alone_and_comes_back(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.testing.MockClock
) -> None:
    manager = make(supervisor, max_restarts=2, max_seconds=10.0)
    phone = Device("phone", "u")
    await manager.attach("u", phone)
    await manager.send("u", "kept", "b")
    await manager.send("bystander", "t", "b")
    bystander = mailbox(manager, "bystander")
    ref = mailbox(manager, "u")
    for _ in range(3):  # the third crash within 10 s is one too many
        fault_injector.crash_next(ref)
        with pytest.raises(ActorCrashed):
            await manager.get_unread("u")
        await trio.testing.wait_all_tasks_blocked()
    assert not ref.alive
    assert manager.mailbox("u") is None
    assert supervisor.statistics().children_given_up == 1
    assert bystander.alive  # the others carry on
    assert bystander.statistics().restarts == 0
    # The next use starts the mailbox afresh, from its store, with the device attached.
    again = await manager.send("u", "again", "b")
    assert again.seq == 2
    assert [n.title for n in await manager.get_all("u")] == ["kept", "again"]
    assert phone.events[-1].seq == 2
    assert manager.is_online("u")
    with pytest.raises(ValueError, match="max_restarts"):
        make(supervisor, max_restarts=-1)
