"""Bounded mailboxes: overflow policies, their counters, ordering, and a model test."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings, strategies as st

from ensemble.actors import (
    Actor,
    ActorRef,
    ActorStopped,
    AskTimeout,
    MailboxConfig,
    MailboxFull,
    MessageDropped,
    Overflow,
    open_actor,
)
from ensemble.actors._mailbox import Mailbox, _Reply
from ensemble.testing import FaultInjector

# -- helpers ----------------------------------------------------------------


@attrs.frozen
class Msg:
    n: int


@attrs.frozen
class Update:
    coalesce_key: str
    value: int


@attrs.frozen
class Ping:
    """No ``coalesce_key``: coalesces by type alone under keep_latest."""

    n: int


@attrs.frozen
class Other:
    """Shares ``coalesce_key`` values with :class:`Update` but is another type."""

    coalesce_key: str
    value: int


class Noise(Msg):
    pass


class LoudNoise(Noise):
    pass


class QuietNoise(Noise):
    pass


class Recorder(Actor):
    """Logs every message it handles (taking ``delay`` s each) and replies with it."""

    def __init__(self, log: list[Any], delay: float) -> None:
        self.log = log
        self.delay = delay

    async def receive(self, message: Any) -> Any:
        if self.delay:
            await trio.sleep(self.delay)
        self.log.append(message)
        return message


@asynccontextmanager
async def recorder(config: MailboxConfig, *, delay: float = 0.0) -> AsyncIterator[tuple[ActorRef, list[Any]]]:
    log: list[Any] = []
    async with open_actor(functools.partial(Recorder, log, delay), mailbox=config) as ref:
        yield ref, log


async def settle() -> None:
    """Let every runnable task finish its work (virtual time moves on by 1 s)."""
    await trio.sleep(1)


# -- order and peak ------------------------------------------------------------


async def test_fifo_order_is_preserved(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=600)) as (ref, log):
        with fault_injector.stall(ref):
            for n in range(0, 500, 2):
                await ref.tell(Msg(n))
                ref.tell_nowait(Msg(n + 1))
        for n in range(500, 1000):
            await ref.tell(Msg(n))
        await settle()
    assert log == [Msg(n) for n in range(1000)]


async def test_mailbox_peak_tracks_the_deepest_queue(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=50)) as (ref, log):
        assert ref.statistics().mailbox_peak == 0
        with fault_injector.stall(ref):
            for n in range(7):
                ref.tell_nowait(Msg(n))
            assert (ref.statistics().mailbox_depth, ref.statistics().mailbox_peak) == (7, 7)
        await settle()
        for n in range(3):
            ref.tell_nowait(Msg(n))
        await settle()
        stats = ref.statistics()
        assert (stats.mailbox_depth, stats.mailbox_peak, stats.mailbox_capacity) == (0, 7, 50)
        with fault_injector.stall(ref):
            for n in range(9):
                ref.tell_nowait(Msg(n))
        assert ref.statistics().mailbox_peak == 9
        await settle()
    assert len(log) == 19


async def test_cancelled_tell_does_not_queue_the_message(autojump_clock: trio.testing.MockClock) -> None:
    # Trio's rule: an operation that raises Cancelled did not happen.
    async with recorder(MailboxConfig(size=5)) as (ref, log):
        with trio.move_on_after(0) as scope:
            await ref.tell(Msg(1))
        assert scope.cancelled_caught
        with trio.CancelScope() as scope:
            scope.cancel()
            await ref.ask(Msg(2), timeout=None)
        assert scope.cancelled_caught
        await settle()
        assert log == []
        assert ref.statistics().messages_handled == 0
        await ref.tell(Msg(3))
        await settle()
    assert log == [Msg(3)]


# -- drop_newest, drop_oldest, fail ----------------------------------------------


async def test_drop_newest_drops_and_counts_new_messages(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=3, overflow="drop_newest")) as (ref, log):
        with fault_injector.stall(ref):
            for n in range(5):
                await ref.tell(Msg(n))
            ref.tell_nowait(Msg(5))
            stats = ref.statistics()
            assert (stats.dropped_newest, stats.mailbox_depth, stats.refused) == (3, 3, 0)
            start = trio.current_time()
            with pytest.raises(MailboxFull, match="drop_newest"):
                await ref.ask(Msg(99))
            assert trio.current_time() == start
            assert ref.statistics().dropped_newest == 4
        await settle()
    assert log == [Msg(0), Msg(1), Msg(2)]


async def test_drop_oldest_evicts_and_counts_old_messages(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=3, overflow=Overflow.DROP_OLDEST)) as (ref, log):
        with fault_injector.stall(ref):
            for n in range(5):
                await ref.tell(Msg(n))
            ref.tell_nowait(Msg(5))
            assert (ref.statistics().dropped_oldest, ref.statistics().mailbox_depth) == (3, 3)
        await settle()
        assert log == [Msg(3), Msg(4), Msg(5)]

        # A queued ask that gets evicted fails with MessageDropped at once.
        outcome: list[Any] = []

        async def asker() -> None:
            with pytest.raises(MessageDropped, match="evicted"):
                await ref.ask(Msg(100), timeout=None)
            outcome.append(trio.current_time())

        with fault_injector.stall(ref):
            async with trio.open_nursery() as nursery:
                for n in range(6, 8):
                    ref.tell_nowait(Msg(n))
                nursery.start_soon(asker)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                for n in range(8, 11):
                    ref.tell_nowait(Msg(n))  # evicts 6, 7, then the ask
        assert outcome == [start]
        assert ref.statistics().dropped_oldest == 6
        await settle()
    assert log[3:] == [Msg(8), Msg(9), Msg(10)]


async def test_fail_refuses_at_once_and_counts(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=2, overflow="fail")) as (ref, log):
        with fault_injector.stall(ref):
            await ref.tell(Msg(0))
            await ref.tell(Msg(1))
            start = trio.current_time()
            with pytest.raises(MailboxFull, match=r"mailbox of /actor is full \(2 messages\)"):
                await ref.tell(Msg(2))
            with pytest.raises(MailboxFull):
                ref.tell_nowait(Msg(3))
            with pytest.raises(MailboxFull):
                await ref.ask(Msg(4))
            assert trio.current_time() == start
            stats = ref.statistics()
            assert (stats.refused, stats.dropped_newest, stats.dropped_oldest, stats.mailbox_depth) == (3, 0, 0, 2)
        await settle()
    assert log == [Msg(0), Msg(1)]


# -- keep_latest -------------------------------------------------------------------


async def test_keep_latest_replaces_in_place_and_delivers_the_latest(
    autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector
) -> None:
    async with recorder(MailboxConfig(size=10, overflow="keep_latest")) as (ref, log):
        with fault_injector.stall(ref):
            for message in [Update("a", 1), Update("b", 1), Update("a", 2), Update("c", 1), Update("a", 3), Update("b", 2)]:
                await ref.tell(message)
            assert (ref.statistics().coalesced, ref.statistics().mailbox_depth) == (3, 3)
        await settle()
        assert log == [Update("a", 3), Update("b", 2), Update("c", 1)]
        # Once handled, a key queues afresh (at the back).
        with fault_injector.stall(ref):
            for message in [Update("b", 3), Update("a", 4), Update("b", 4)]:
                ref.tell_nowait(message)
        await settle()
    assert log[3:] == [Update("b", 4), Update("a", 4)]
    assert ref.statistics().coalesced == 4


async def test_keep_latest_keys_include_the_type(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=10, overflow="keep_latest")) as (ref, log):
        with fault_injector.stall(ref):
            for message in [Ping(1), Update("a", 1), Other("a", 1), Ping(2), Other("a", 2), Ping(3)]:
                ref.tell_nowait(message)
        await settle()
    # Messages without coalesce_key coalesce by type; equal keys of other types do not coalesce.
    assert log == [Ping(3), Update("a", 1), Other("a", 2)]
    assert ref.statistics().coalesced == 3


async def test_keep_latest_uses_the_configured_key(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    config = MailboxConfig(size=10, overflow="keep_latest", coalesce_key=lambda message: message.n % 2)
    async with recorder(config) as (ref, log):
        with fault_injector.stall(ref):
            for n in range(6):
                ref.tell_nowait(Msg(n))
        await settle()
    assert log == [Msg(4), Msg(5)]
    assert ref.statistics().coalesced == 4


async def test_keep_latest_when_full(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=2, overflow="keep_latest")) as (ref, log):
        with fault_injector.stall(ref):
            for message in [Update("a", 1), Update("b", 1), Update("c", 1), Update("a", 2)]:
                ref.tell_nowait(message)
            stats = ref.statistics()
            assert (stats.dropped_newest, stats.coalesced, stats.mailbox_depth) == (1, 1, 2)
            # An ask with a new key cannot be queued: the asker hears at once.
            with pytest.raises(MailboxFull, match="keep_latest, new key"):
                await ref.ask(Update("d", 1))
            assert ref.statistics().dropped_newest == 2
        await settle()
    assert log == [Update("a", 2), Update("b", 1)]


async def test_keep_latest_replaced_ask_gets_message_dropped(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=4, overflow="keep_latest")) as (ref, log):
        results: dict[str, Any] = {}

        async def first() -> None:
            with pytest.raises(MessageDropped, match="keep_latest"):
                await ref.ask(Update("a", 1), timeout=None)
            results["first"] = trio.current_time()

        async def second() -> None:
            results["second"] = await ref.ask(Update("a", 2), timeout=None)

        stall = fault_injector.stall(ref)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert results == {"first": start}
            stall.release()
    assert results["second"] == Update("a", 2)
    assert log == [Update("a", 2)]
    assert ref.statistics().coalesced == 1


# -- per-type policies ----------------------------------------------------------------


async def test_per_type_policies_follow_the_mro(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    per_type: dict[type, Overflow | str] = {Noise: Overflow.DROP_NEWEST, QuietNoise: "drop_oldest", Update: "keep_latest"}
    config = MailboxConfig(size=2, overflow="fail", per_type=per_type)
    async with recorder(config) as (ref, log):
        with fault_injector.stall(ref):
            ref.tell_nowait(Msg(0))
            ref.tell_nowait(Update("a", 1))
            with pytest.raises(MailboxFull):  # Msg: the default, fail
                ref.tell_nowait(Msg(1))
            ref.tell_nowait(Noise(2))  # drop_newest
            ref.tell_nowait(LoudNoise(3))  # inherits drop_newest from Noise
            ref.tell_nowait(Update("a", 4))  # keep_latest, replaces in place
            ref.tell_nowait(QuietNoise(5))  # its own entry wins: evicts Msg(0)
            stats = ref.statistics()
            assert (stats.refused, stats.dropped_newest, stats.coalesced, stats.dropped_oldest) == (1, 2, 1, 1)
        await settle()
    assert log == [Update("a", 4), QuietNoise(5)]


# -- block ---------------------------------------------------------------------------


async def test_blocked_sender_proceeds_when_one_message_is_taken(
    autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector
) -> None:
    async with recorder(MailboxConfig(size=2, block_timeout=10), delay=1) as (ref, log):
        stall = fault_injector.stall(ref)
        ref.tell_nowait(Msg(0))
        ref.tell_nowait(Msg(1))
        sent: list[tuple[float, list[Any]]] = []

        async def sender() -> None:
            await ref.tell(Msg(2))
            sent.append((trio.current_time(), list(log)))

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(5)
            assert sent == []
            assert ref.statistics().blocked_senders == 1
            stall.release()
        # In as soon as the actor took Msg(0), before it finished handling it.
        assert sent == [(start + 5, [])]
        assert ref.statistics().blocked_senders == 0
        await trio.sleep(4)
    assert log == [Msg(0), Msg(1), Msg(2)]
    assert ref.statistics().block_timeouts == 0


async def test_block_times_out_after_exactly_block_timeout(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=2, block_timeout=2.5)) as (ref, log):
        with fault_injector.stall(ref):
            fault_injector.fill_mailbox(ref)
            start = trio.current_time()
            with pytest.raises(MailboxFull, match=r"no room within 2.5 s \(block\)"):
                await ref.tell(Msg(1))
            assert trio.current_time() == start + 2.5
            assert ref.statistics().block_timeouts == 1
            with pytest.raises(MailboxFull, match="no room within 7"):
                await ref.tell(Msg(2), timeout=7)
            assert trio.current_time() == start + 9.5
            # An ask waits for room up to the block timeout too (it is shorter than the ask's).
            with pytest.raises(MailboxFull):
                await ref.ask(Msg(3), timeout=60)
            assert trio.current_time() == start + 12
            stats = ref.statistics()
            assert (stats.block_timeouts, stats.refused, stats.blocked_senders) == (3, 0, 0)
        await settle()
    assert log == []


async def test_tell_nowait_under_block_is_refused(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=2)) as (ref, log):
        with fault_injector.stall(ref):
            ref.tell_nowait(Msg(0))
            ref.tell_nowait(Msg(1))
            with pytest.raises(MailboxFull, match="tell_nowait cannot wait"):
                ref.tell_nowait(Msg(2))
            stats = ref.statistics()
            assert (stats.refused, stats.block_timeouts, stats.mailbox_depth) == (1, 0, 2)
        await settle()
    assert log == [Msg(0), Msg(1)]


async def test_block_without_timeout_waits_until_room(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with recorder(MailboxConfig(size=1, block_timeout=None)) as (ref, log):
        stall = fault_injector.stall(ref)
        ref.tell_nowait(Msg(0))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.tell, Msg(1))
            await trio.sleep(1000)
            assert ref.statistics().blocked_senders == 1
            stall.release()
        assert trio.current_time() == start + 1000
        await settle()
    assert log == [Msg(0), Msg(1)]


async def test_ask_shorter_than_block_timeout_times_out_as_ask(
    autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector
) -> None:
    async with recorder(MailboxConfig(size=1, block_timeout=10)) as (ref, _):
        with fault_injector.stall(ref):
            fault_injector.fill_mailbox(ref)
            start = trio.current_time()
            with pytest.raises(AskTimeout):
                await ref.ask(Msg(1), timeout=1.5)
            assert trio.current_time() == start + 1.5
            assert ref.statistics().blocked_senders == 0


async def test_blocked_sender_hears_when_the_actor_stops(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with trio.open_nursery() as nursery:
        async with recorder(MailboxConfig(size=1, block_timeout=None)) as (ref, _):
            fault_injector.stall(ref)
            ref.tell_nowait(Msg(0))
            stopped = trio.Event()

            async def sender() -> None:
                with pytest.raises(ActorStopped):
                    await ref.tell(Msg(1))
                stopped.set()

            nursery.start_soon(sender)
            await trio.testing.wait_all_tasks_blocked()
            assert ref.statistics().blocked_senders == 1
        await stopped.wait()
    assert ref.statistics().dropped_on_stop == 1


# -- asks never hang ------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(Overflow))
async def test_queued_asks_fail_when_the_actor_stops(
    autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector, policy: Overflow
) -> None:
    errors: list[BaseException] = []

    async def asker(ref: ActorRef, n: int) -> None:
        try:
            await ref.ask(Update(str(n), n), timeout=None)
        except ActorStopped as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, recorder(MailboxConfig(size=3, overflow=policy)) as (ref, log):
        fault_injector.stall(ref)
        for n in range(3):
            nursery.start_soon(asker, ref, n)
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().mailbox_depth == 3
    assert len(errors) == 3
    assert all("stopped before handling the ask" in str(error) for error in errors)
    assert log == []
    assert ref.statistics().dropped_on_stop == 3
    with pytest.raises(ActorStopped):
        await ref.ask(Msg(0))


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: MailboxConfig(size=0),
        lambda: MailboxConfig(block_timeout=-1),
        lambda: MailboxConfig(block_timeout=math.nan),
        lambda: MailboxConfig(overflow="drop_everything"),
        lambda: MailboxConfig(per_type={Msg: "sometimes"}),
    ],
)
def test_invalid_config_is_refused(make: Callable[[], MailboxConfig]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each is a plain ValueError)
        make()


# -- the property test: nothing is lost silently ---------------------------------------


@attrs.frozen
class A:
    id: int
    coalesce_key: int


@attrs.frozen
class B:
    id: int
    coalesce_key: int


class C(B):
    pass


CLASSES = (A, B, C)
ERRORS: dict[type[BaseException], str] = {MailboxFull: "full", MessageDropped: "dropped", ActorStopped: "stopped"}


@attrs.define
class Item:
    message: Any
    ask: _Reply | None
    coalescing: bool


@attrs.define
class Model:
    """The reference: a list, and the documented policies spelled out."""

    capacity: int
    policies: dict[type, Overflow]
    queue: list[Item] = attrs.Factory(list)
    counters: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(["dropped_newest", "dropped_oldest", "coalesced", "refused"], 0))
    failed: dict[int, str] = attrs.Factory(dict)  # message id -> how its ask failed

    def put(self, message: Any, ask: _Reply | None) -> str | None:
        policy = self.policies[type(message)]
        full = len(self.queue) >= self.capacity
        if policy is Overflow.KEEP_LATEST:
            for item in self.queue:
                if item.coalescing and type(item.message) is type(message) and item.message.coalesce_key == message.coalesce_key:
                    if item.ask is not None:
                        self.failed[item.message.id] = "dropped"
                    item.message, item.ask = message, ask
                    self.counters["coalesced"] += 1
                    return None
            if full:
                self.counters["dropped_newest"] += 1
                return "full" if ask is not None else None
        elif full and policy is Overflow.DROP_OLDEST:
            evicted = self.queue.pop(0)
            self.counters["dropped_oldest"] += 1
            if evicted.ask is not None:
                self.failed[evicted.message.id] = "dropped"
        elif full and policy is Overflow.DROP_NEWEST:
            self.counters["dropped_newest"] += 1
            return "full" if ask is not None else None
        elif full:  # fail, and block (which cannot wait in put_nowait_or_fail)
            self.counters["refused"] += 1
            return "full"
        self.queue.append(Item(message, ask, policy is Overflow.KEEP_LATEST))
        return None


policies = st.sampled_from(list(Overflow))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(CLASSES), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("pop")),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(1, 5),
    default=policies,
    overrides=st.dictionaries(st.sampled_from(CLASSES), policies, max_size=3),
    ops=operations,
)
def test_mailbox_accounts_for_every_message(
    capacity: int, default: Overflow, overrides: dict[type, Overflow], ops: list[tuple[Any, ...]]
) -> None:
    mailbox = Mailbox(MailboxConfig(size=capacity, overflow=default, per_type=overrides), "/model")
    # The documented MRO rule, spelled out for this small hierarchy.
    resolved: dict[type, Overflow] = {A: overrides.get(A, default), B: overrides.get(B, default)}
    resolved[C] = overrides.get(C, resolved[B])
    model = Model(capacity, resolved)
    asks: dict[int, _Reply] = {}
    delivered: list[Any] = []
    put = 0
    for op in ops:
        if op[0] == "put":
            _, cls, key, is_ask = op
            message = cls(put, key)
            put += 1
            reply = _Reply() if is_ask else None
            expected = model.put(message, reply)
            try:
                mailbox.put_nowait_or_fail(message, reply)
            except MailboxFull:
                outcome: str | None = "full"
            else:
                outcome = None
                if reply is not None:
                    asks[message.id] = reply
            assert outcome == expected, (message, mailbox.policy_for(message))
        elif mailbox:
            message, reply = mailbox.pop()
            item = model.queue.pop(0)
            assert (message, reply) == (item.message, item.ask)
            delivered.append(message)
        assert len(mailbox) == len(model.queue) <= capacity
        assert mailbox.peak <= capacity
        counters = {name: getattr(mailbox, name) for name in model.counters}
        assert counters == model.counters
        assert put == len(delivered) + sum(counters.values()) + len(mailbox)

    queued = {item.message.id for item in model.queue if item.ask is not None}
    mailbox.close()
    assert mailbox.dropped_on_stop == len(model.queue)
    assert len(mailbox) == 0
    for n in queued:
        model.failed[n] = "stopped"
    # Every ask that was accepted either is still owed a reply (it was delivered)
    # or has failed exactly as the model says.
    delivered_ids = {message.id for message in delivered}
    for n, reply in asks.items():
        error = reply._error
        if n in model.failed:
            assert reply.done
            assert error is not None
            assert ERRORS[type(error)] == model.failed[n]
        else:
            assert n in delivered_ids
            assert not reply.done
    with pytest.raises(ActorStopped):
        mailbox.put_nowait_or_fail(A(put, 0))
