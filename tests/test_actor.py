"""Actors: ask and tell, rejections and crashes, timers, fairness, statistics."""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ensemble.actors import (
    DEFAULT_ASK_TIMEOUT,
    Actor,
    ActorCrashed,
    ActorRef,
    ActorStartFailed,
    ActorStatistics,
    ActorStopped,
    AskTimeout,
    Backoff,
    ChildSpec,
    MailboxConfig,
    open_actor,
    open_supervisor,
)
from ensemble.actors._actor import BATCH_LIMIT
from ensemble.testing import FaultInjector

# -- messages and the probe actor ---------------------------------------------------


@attrs.frozen
class Add:
    n: int


@attrs.frozen
class Get:
    pass


@attrs.frozen
class Boom:
    pass


@attrs.frozen
class Work:
    """Takes ``seconds`` of virtual time to handle (awaiting)."""

    seconds: float


@attrs.frozen
class Burn:
    """Takes ``seconds`` of virtual time *without* yielding, like CPU work."""

    clock: trio.testing.MockClock
    seconds: float


@attrs.frozen
class Tick:
    """What timers deliver; handling it takes ``work`` seconds (awaiting)."""

    name: str
    work: float = 0.0


@attrs.frozen
class Start:
    key: Hashable
    seconds: float
    message: Any
    repeat: bool = False


@attrs.frozen
class StartMany:
    timers: tuple[tuple[Hashable, float], ...]


@attrs.frozen
class Cancel:
    key: Hashable


class Probe(Actor):
    """Keeps a total; logs (time, message) for Work and Tick; drives its timers.

    ``ValueError`` is a rejection, anything else a crash. The log is shared
    across restarts.
    """

    expected_exceptions = (ValueError,)
    mailbox = MailboxConfig(size=20_000)

    def __init__(self, log: list[tuple[float, Any]]) -> None:
        self.log = log
        self.total = 0

    async def receive(self, message: Any) -> Any:
        now = trio.current_time()
        match message:
            case Add(n):
                if n < 0:
                    raise ValueError(f"cannot add {n}")
                self.total += n
                return self.total
            case Get():
                return self.total
            case Boom():
                raise RuntimeError("boom")
            case Start(key, seconds, timer_message, repeat):
                self.start_timer(key, seconds, timer_message, repeat=repeat)
                return now
            case StartMany(timers):
                for key, seconds in timers:
                    self.start_timer(key, seconds, Tick(str(key)))
                return now
            case Cancel(key):
                return self.cancel_timer(key)
            case Burn(clock, seconds):
                self.log.append((now, message))
                clock.jump(seconds)
            case Work(seconds) | Tick(_, seconds):
                self.log.append((now, message))
                if seconds:  # no checkpoint otherwise
                    await trio.sleep(seconds)
            case _:
                raise AssertionError(f"unexpected message {message!r}")
        return None


@asynccontextmanager
async def probe(**options: Any) -> AsyncIterator[tuple[ActorRef, list[tuple[float, Any]]]]:
    log: list[tuple[float, Any]] = []
    async with open_actor(functools.partial(Probe, log), name="probe", **options) as ref:
        yield ref, log


def count_tasks() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


# -- ask and tell ------------------------------------------------------------------------


async def test_ask_returns_the_reply_and_tell_is_handled_in_order(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, _):
        assert await ref.ask(Add(2)) == 2
        await ref.tell(Add(3))
        ref.tell_nowait(Add(4))
        assert await ref.ask(Get()) == 9
        assert ref.path == "/probe"
        assert ref.alive
        # The actor class's mailbox config applies, through the partial too.
        assert ref.statistics().mailbox_capacity == 20_000


async def test_ask_later_queues_without_waiting_and_replies_in_order(autojump_clock: trio.testing.MockClock) -> None:
    replies: list[tuple[Any, Any]] = []

    def on_reply(value: Any, error: BaseException | None) -> None:
        replies.append((value, type(error).__name__ if error is not None else None))

    async with probe() as (ref, _):
        for n in (1, 2, -1, 3):
            await ref.ask_later(Add(n), on_reply)
        assert replies == []  # queued, not handled yet: no schedule point in between
        await ref.ask_later(Boom(), on_reply)
        assert await ref.ask(Get()) == 0  # handled in order; the crash restarted the actor afresh
        assert replies[:4] == [(1, None), (3, None), (None, "ValueError"), (6, None)]
        assert replies[4] == (None, "ActorCrashed")

        def raising(value: Any, error: BaseException | None) -> None:
            raise RuntimeError("a broken callback")

        await ref.ask_later(Add(1), raising)  # logged, the actor is unaffected
        assert await ref.ask(Add(0)) >= 0


async def test_ask_later_to_a_stopped_actor(autojump_clock: trio.testing.MockClock) -> None:
    replies: list[Any] = []
    async with probe() as (ref, _):
        pass
    with pytest.raises(ActorStopped):
        await ref.ask_later(Get(), lambda value, error: replies.append(error))
    assert replies == []


async def test_ask_times_out_after_exactly_the_timeout(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with probe() as (ref, _):
        stall = fault_injector.stall(ref)
        start = trio.current_time()
        with pytest.raises(AskTimeout, match=r"did not reply within 2\.5 s") as info:
            await ref.ask(Add(1), timeout=2.5)
        assert trio.current_time() == start + 2.5
        assert info.value.path == "/probe"
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(AskTimeout):
            await ref.ask(Add(10))
        assert trio.current_time() == start + 2.5 + DEFAULT_ASK_TIMEOUT == start + 7.5
        stall.release()
        # The abandoned asks are still handled; their late replies go nowhere.
        assert await ref.ask(Get()) == 11
        assert ref.statistics().crashes == 0


async def test_ask_without_timeout_waits_as_long_as_it_takes(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with probe() as (ref, _):
        stall = fault_injector.stall(ref)
        replies: list[Any] = []

        async def asker() -> None:
            replies.append(await ref.ask(Add(5), timeout=None))
            replies.append(trio.current_time())

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(asker)
            await trio.sleep(1000)  # far beyond the default ask timeout
            assert replies == []
            stall.release()
        assert replies == [5, start + 1000]


async def test_rejections_reach_the_asker_and_keep_state(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, _):
        assert await ref.ask(Add(5)) == 5
        with pytest.raises(ValueError, match="cannot add -1"):
            await ref.ask(Add(-1))
        await ref.tell(Add(-2))  # a rejected tell is not a crash either
        assert await ref.ask(Add(1)) == 6
        stats = ref.statistics()
        assert (stats.messages_handled, stats.messages_rejected, stats.crashes, stats.restarts) == (4, 2, 0, 0)


async def test_unexpected_exceptions_crash_the_actor(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, _):
        assert await ref.ask(Add(5)) == 5
        with pytest.raises(ActorCrashed, match="crashed handling the message") as info:
            await ref.ask(Boom())
        assert isinstance(info.value.__cause__, RuntimeError)
        assert info.value.path == "/probe"
        # The supervisor restarted it: same ref, fresh state.
        assert await ref.ask(Get()) == 0
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.messages_rejected, stats.state) == (1, 1, 0, "running")


async def test_sending_to_a_stopped_actor_raises(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, _):
        await ref.ask(Add(1))
    assert not ref.alive
    assert ref.statistics().state == "stopped"
    with pytest.raises(ActorStopped, match="/probe has stopped"):
        await ref.tell(Add(1))
    with pytest.raises(ActorStopped):
        ref.tell_nowait(Add(1))
    with pytest.raises(ActorStopped):
        await ref.ask(Add(1))


def test_timers_need_a_running_actor() -> None:
    with pytest.raises(RuntimeError, match="not running under a supervisor"):
        Probe([]).start_timer("t", 1, Tick("t"))


# -- timers ---------------------------------------------------------------------------------


async def test_timer_fires_at_exactly_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, log):
        await trio.sleep(3)  # start away from zero
        started = await ref.ask(Start("t", 2.5, Tick("t")))
        assert ref.statistics().active_timers == 1
        await trio.sleep(10)
        assert log == [(started + 2.5, Tick("t"))]
        stats = ref.statistics()
        assert (stats.active_timers, stats.timers_fired) == (0, 1)
        assert not await ref.ask(Cancel("t"))  # it has fired: nothing to cancel


async def test_cancelled_timer_never_fires(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, log):
        await ref.ask(Start("a", 5, Tick("a")))
        await ref.ask(Start("b", 6, Tick("b")))
        await trio.sleep(1)
        assert await ref.ask(Cancel("a")) is True
        assert await ref.ask(Cancel("a")) is False
        assert await ref.ask(Cancel("never started")) is False
        assert ref.statistics().active_timers == 1
        await trio.sleep(20)
        assert [message for _, message in log] == [Tick("b")]


async def test_starting_a_timer_with_the_same_key_replaces_it(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, log):
        await ref.ask(Start("k", 5, Tick("old")))
        await trio.sleep(1)
        started = await ref.ask(Start("k", 10, Tick("new")))
        assert ref.statistics().active_timers == 1
        await trio.sleep(20)
        assert log == [(started + 10, Tick("new"))]


async def test_repeating_timer_fires_at_exact_multiples(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, log):
        # Handling takes 0.2 s: a fixed-rate schedule does not drift by it.
        started = await ref.ask(Start("r", 0.5, Tick("r", work=0.2), repeat=True))
        await trio.sleep(5.1)
        assert await ref.ask(Cancel("r")) is True
        await trio.sleep(10)
        assert [time for time, _ in log] == [started + 0.5 * k for k in range(1, 11)]
        assert ref.statistics().timers_fired == 10


async def test_timer_fires_between_messages_of_a_busy_mailbox(autojump_clock: trio.testing.MockClock) -> None:
    async with probe() as (ref, log):
        started = await ref.ask(Start("t", 2.5, Tick("t")))
        for _ in range(5):
            await ref.tell(Work(1))
        await trio.sleep(10)
    # Due at +2.5 while Work(1) number 3 runs; it goes before the rest of the queue.
    assert [time - started for time, _ in log] == [0, 1, 2, 3, 3, 4]
    assert log[3][1] == Tick("t")


async def test_zero_delay_timer_fires_at_once(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with probe() as (ref, log):
        await trio.sleep(1)
        start = trio.current_time()
        with fault_injector.stall(ref):
            ref.tell_nowait(Start("now", 0, Tick("now")))
            ref.tell_nowait(Work(0))
            ref.tell_nowait(Work(0))
        await trio.sleep(1)
        # Due at once: it goes before the messages queued behind its Start.
        assert log == [(start, Tick("now")), (start, Work(0)), (start, Work(0))]
        # And with an empty mailbox.
        started = await ref.ask(Start("again", 0, Tick("again")))
        await trio.sleep(1)
        assert log[3:] == [(started, Tick("again"))]


@pytest.mark.parametrize(("seconds", "repeat"), [(-1, False), (-0.001, True), (math.nan, False), (0, True)])
async def test_invalid_timer_delays_are_refused(autojump_clock: trio.testing.MockClock, seconds: float, repeat: bool) -> None:
    async with probe() as (ref, log):
        await ref.ask(Start("ok", 1, Tick("ok")))
        with pytest.raises(ValueError, match="seconds"):
            await ref.ask(Start("bad", seconds, Tick("bad"), repeat=repeat))
        assert ref.statistics().active_timers == 1
        await trio.sleep(5)
        assert [message for _, message in log] == [Tick("ok")]


async def test_many_timers_run_in_the_actor_loop_without_tasks(autojump_clock: trio.testing.MockClock) -> None:
    delays = [1 + k / 8 for k in range(1000)]
    random.Random(7).shuffle(delays)
    async with probe() as (ref, log):
        await trio.sleep(1)
        tasks = count_tasks()
        started = await ref.ask(StartMany(tuple(enumerate(delays))))
        assert count_tasks() == tasks
        assert ref.statistics().active_timers == 1000
        await trio.sleep(60)  # halfway
        assert count_tasks() == tasks
        assert 0 < len(log) < 1000
        await trio.sleep(100)
        assert count_tasks() == tasks
    assert ref.statistics().timers_fired == 1000
    expected = sorted((started + seconds, Tick(str(key))) for key, seconds in enumerate(delays))
    assert log == expected


async def test_restart_clears_timers(autojump_clock: trio.testing.MockClock) -> None:
    async with probe(backoff=Backoff(initial=2, jitter=0)) as (ref, log):
        await ref.ask(Start("once", 5, Tick("once")))
        await ref.ask(Start("every", 1, Tick("every"), repeat=True))
        start = trio.current_time()
        await trio.sleep(0.5)
        with pytest.raises(ActorCrashed):
            await ref.ask(Boom())
        crashed = trio.current_time()
        stats = ref.statistics()
        # Waiting out the backoff: the crashed incarnation's timers are gone.
        assert (stats.state, stats.active_timers) == ("restarting", 0)
        await ref.tell(Add(1))  # queued meanwhile, handled by the next incarnation
        await trio.sleep(20)
        stats = ref.statistics()
        assert (stats.state, stats.restarts, stats.active_timers) == ("running", 1, 0)
        assert await ref.ask(Get()) == 1
    assert crashed == start + 0.5
    assert log == []


# -- fairness -------------------------------------------------------------------------------


async def observe_while_draining(ref: ActorRef, fault_injector: FaultInjector, messages: list[Any]) -> list[int]:
    """Queue ``messages`` at a stalled actor, release it, and record how many
    it had handled each time another task got to run."""
    seen: list[int] = []

    async def watcher() -> None:
        while True:
            seen.append(ref.statistics().messages_handled)
            await trio.lowlevel.checkpoint()

    before = ref.statistics().messages_handled
    with fault_injector.stall(ref):
        for message in messages:
            ref.tell_nowait(message)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher)
        await ref.ask(Get(), timeout=None)  # behind every queued message
        nursery.cancel_scope.cancel()
    return [count - before for count in seen]


async def test_a_long_queue_is_drained_in_batches(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with probe() as (ref, _):
        seen = await observe_while_draining(ref, fault_injector, [Add(1)] * 10_000)
        assert await ref.ask(Get()) == 10_000
    # The watcher saw the whole drain, a batch at a time.
    assert seen[0] <= 2 * BATCH_LIMIT
    assert seen[-1] >= 10_000 - 2 * BATCH_LIMIT
    during = [count for count in seen if 0 < count < 10_000]
    # Others ran every BATCH_LIMIT messages (the scheduler may run the actor
    # twice in a row between two turns of the watcher).
    assert len(during) >= 10_000 // (2 * BATCH_LIMIT)
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 2 * BATCH_LIMIT


async def test_busy_actor_with_due_timers_still_yields(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    async with probe() as (ref, log):
        await ref.ask(Start("tick", 1, Tick("tick"), repeat=True))
        # Each message burns 1 s without yielding, so a timer is due after every one.
        seen = await observe_while_draining(ref, fault_injector, [Burn(autojump_clock, 1)] * 1000)
        await ref.ask(Cancel("tick"))
    assert ref.statistics().timers_fired >= 1000
    assert max(b - a for a, b in itertools.pairwise(seen)) <= 2 * BATCH_LIMIT
    assert sum(1 for _, message in log if isinstance(message, Burn)) == 1000


# -- statistics -----------------------------------------------------------------------------


async def test_statistics_after_a_known_sequence(autojump_clock: trio.testing.MockClock, fault_injector: FaultInjector) -> None:
    config = MailboxConfig(size=3, overflow="drop_newest")
    async with probe(mailbox=config) as (ref, _):
        with fault_injector.stall(ref):
            for n in [1, 2, -1, 3, 4]:  # -1 is rejected; 3 and 4 find the mailbox full
                ref.tell_nowait(Add(n))
        await trio.testing.wait_all_tasks_blocked()
        await ref.ask(Start("fires", 1, Tick("fires")))
        await ref.ask(Start("pending", 100, Tick("pending")))
        await trio.sleep(2)
        with pytest.raises(ActorCrashed):
            await ref.ask(Boom())
        assert await ref.ask(Add(10)) == 10
        stats = ref.statistics()
    assert stats == ActorStatistics(
        path="/probe",
        state="running",
        mailbox_capacity=3,
        mailbox_depth=0,
        mailbox_peak=3,
        messages_handled=7,  # 3 queued adds, 2 starts, the timer, Add(10)
        messages_rejected=1,
        crashes=1,
        restarts=1,
        dropped_newest=2,
        dropped_oldest=0,
        coalesced=0,
        refused=0,
        block_timeouts=0,
        dropped_on_stop=0,
        blocked_senders=0,
        active_timers=0,  # "pending" went with the crash
        timers_fired=1,
    )
    assert stats.dropped == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.crashes = 0  # type: ignore[misc]


# -- factories ------------------------------------------------------------------------------


class SmallDropOldest(Actor):
    mailbox = MailboxConfig(size=3, overflow="drop_oldest")

    def __init__(self, label: str) -> None:
        self.label = label

    async def receive(self, message: object) -> object:
        return (self.label, message)


async def test_class_mailbox_config_is_used_whatever_the_factory(autojump_clock: trio.testing.MockClock) -> None:
    async with open_supervisor() as sup:
        by_lambda = await sup.start_child(ChildSpec(id="lambda", factory=lambda: SmallDropOldest("l")))
        by_partial = await sup.start_child(ChildSpec(id="partial", factory=functools.partial(SmallDropOldest, "p")))
        by_spec = await sup.start_child(
            ChildSpec(id="spec", factory=lambda: SmallDropOldest("s"), mailbox=MailboxConfig(size=7, overflow="fail"))
        )
        assert by_lambda.statistics().mailbox_capacity == 3
        assert by_partial.statistics().mailbox_capacity == 3
        assert by_spec.statistics().mailbox_capacity == 7
        assert await by_lambda.ask("x") == ("l", "x")


class ExplodingConstructor(Actor):
    attempts = 0

    def __init__(self) -> None:
        type(self).attempts += 1
        if type(self).attempts == 2:
            raise RuntimeError("constructor failed")

    async def receive(self, message: object) -> object:
        if message == "boom":
            raise RuntimeError("boom")
        return message


async def test_a_constructor_failure_on_restart_is_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    ExplodingConstructor.attempts = 0
    async with open_supervisor() as sup:
        ref = await sup.start_child(ChildSpec(id="c", factory=ExplodingConstructor))
        ref.tell_nowait("boom")  # crash 1; the restart's constructor fails (crash 2); the next restart works
        assert await ref.ask("after") == "after"
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts) == (2, 2)
        assert ExplodingConstructor.attempts == 3


async def test_a_factory_that_returns_no_actor_fails_to_start(autojump_clock: trio.testing.MockClock) -> None:
    async with open_supervisor() as sup:
        with pytest.raises(ActorStartFailed, match="not an Actor") as info:
            await sup.start_child(ChildSpec(id="bad", factory=lambda: "nope"))  # type: ignore[arg-type,return-value]
        assert isinstance(info.value.__cause__, TypeError)
