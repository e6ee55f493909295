"""FaultInjector: crash, delay, stall and fill actors from a test.

Every test runs on Trio's virtual clock (``autojump_clock``), so delays and
timeouts cost no wall time and elapsed virtual times are exact.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ensemble.actors import (
    Actor,
    ActorCrashed,
    ActorRef,
    AskTimeout,
    ChildSpec,
    MailboxConfig,
    MailboxFull,
    Supervisor,
    open_supervisor,
)
from ensemble.testing import FaultInjector, InjectedCrash, InjectedFault, Stall


@attrs.frozen
class Tick:
    n: int = 0


class Recorder(Actor):
    """Records every message it sees; ``"reject"`` is a rejection.

    ``"arm"`` starts a one-shot timer delivering ``Tick()`` after one second.
    """

    expected_exceptions = (PermissionError,)

    def __init__(self, seen: list[Any], starts: list[float], times: list[float]) -> None:
        self.seen = seen
        self.starts = starts
        self.times = times
        self.count = 0

    async def on_start(self) -> None:
        self.starts.append(trio.current_time())

    async def receive(self, message: Any) -> Any:
        self.seen.append(message)
        self.times.append(trio.current_time())
        if message == "reject":
            raise PermissionError("rejected")
        if message == "arm":
            self.start_timer("tick", 1.0, Tick())
            return "armed"
        self.count += 1
        return self.count


@attrs.define
class Harness:
    supervisor: Supervisor
    injector: FaultInjector
    seen: list[Any] = attrs.field(factory=list)
    starts: list[float] = attrs.field(factory=list)
    times: list[float] = attrs.field(factory=list)

    async def recorder(self, id: str = "rec", mailbox: MailboxConfig | None = None) -> ActorRef:
        return await self.supervisor.start_child(
            ChildSpec(id=id, factory=lambda: Recorder(self.seen, self.starts, self.times), mailbox=mailbox)
        )


@asynccontextmanager
async def harness(max_restarts: int = 10) -> AsyncIterator[Harness]:
    injector = FaultInjector()
    try:
        async with open_supervisor(name="faults", max_restarts=max_restarts) as supervisor:
            yield Harness(supervisor, injector)
    finally:
        injector.clear()


# -- crash_next ------------------------------------------------------------------


async def test_crash_next_restarts_the_actor_and_fails_the_asker(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        fault = h.injector.crash_next(ref)
        assert isinstance(fault, InjectedFault)
        assert fault.active

        with pytest.raises(ActorCrashed) as info:
            await ref.ask("doomed")
        assert isinstance(info.value.__cause__, InjectedCrash)
        assert info.value.path == ref.path == "/faults/rec"
        assert "doomed" in str(info.value.__cause__)

        # The fault is spent and gone; the restarted actor is a fresh instance.
        assert fault.fired == 1
        assert not fault.active
        assert ref._cell.faults is None
        assert await ref.ask("next") == 1
        assert h.seen == ["next"]  # the crash happened before receive saw "doomed"
        assert len(h.starts) == 2
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.messages_handled, stats.state) == (1, 1, 1, "running")


async def test_crash_next_keeps_messages_queued_behind_the_crash(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.crash_next(ref)
        ref.tell_nowait("first")
        ref.tell_nowait("second")
        ref.tell_nowait("third")
        assert await ref.ask("last") == 3
        assert h.seen == ["second", "third", "last"]
        assert ref.statistics().restarts == 1


async def test_crash_next_with_a_custom_exception_instance(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        error = ValueError("custom boom")
        h.injector.crash_next(ref, exception=error)
        with pytest.raises(ActorCrashed) as info:
            await ref.ask("x")
        assert info.value.__cause__ is error
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().restarts == 1


async def test_crash_next_with_a_custom_exception_class(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.crash_next(ref, exception=LookupError)
        with pytest.raises(ActorCrashed) as info:
            await ref.ask("x")
        assert type(info.value.__cause__) is LookupError
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().restarts == 1


async def test_an_injected_expected_exception_is_a_rejection(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        assert await ref.ask("a") == 1
        error = PermissionError("injected rejection")
        fault = h.injector.crash_next(ref, exception=error)
        with pytest.raises(PermissionError) as info:
            await ref.ask("b")
        assert info.value is error
        assert not fault.active
        # No crash, no restart: the actor kept its state.
        assert await ref.ask("c") == 2
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.messages_rejected) == (0, 0, 1)
        assert len(h.starts) == 1


async def test_an_injected_expected_exception_class_is_a_rejection(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.crash_next(ref, exception=PermissionError)
        with pytest.raises(PermissionError):
            await ref.ask("b")
        assert ref.statistics().crashes == 0
        assert ref.statistics().messages_rejected == 1


# -- crash_when ---------------------------------------------------------------------


async def test_crash_when_matches_by_predicate_and_spends_its_times(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        fault = h.injector.crash_when(ref, lambda m: str(m).startswith("x"), times=2)
        assert await ref.ask("ok1") == 1
        with pytest.raises(ActorCrashed):
            await ref.ask("x1")
        assert fault.active  # one crash left
        assert await ref.ask("ok2") == 1  # a fresh incarnation counts from zero
        with pytest.raises(ActorCrashed):
            await ref.ask("x2")
        assert not fault.active
        assert fault.fired == 2
        assert await ref.ask("x3") == 1  # spent: "x3" is handled normally
        assert h.seen == ["ok1", "ok2", "x3"]
        assert ref.statistics().crashes == 2


async def test_crash_when_with_times_none_crashes_on_every_match_until_removed(autojump_clock: trio.testing.MockClock) -> None:
    async with harness(max_restarts=10) as h:
        ref = await h.recorder()
        fault = h.injector.crash_when(ref, lambda m: m == "bad", times=None)
        for _ in range(5):
            with pytest.raises(ActorCrashed):
                await ref.ask("bad")
            assert await ref.ask("good") == 1
        assert fault.active
        assert fault.fired == 5
        fault.remove()
        assert not fault.active
        fault.remove()  # a no-op the second time
        assert await ref.ask("bad") == 2
        assert ref.statistics().crashes == 5


async def test_crash_when_rejects_a_non_positive_times(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        with pytest.raises(ValueError, match="times"):
            h.injector.crash_when(ref, lambda m: True, times=0)
        assert ref._cell.faults is None


# -- delay -------------------------------------------------------------------------


async def test_delay_holds_handling_for_exactly_the_given_virtual_seconds(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.delay(ref, 3.0)
        start = trio.current_time()
        assert await ref.ask("a") == 1
        assert trio.current_time() - start == pytest.approx(3.0, abs=1e-9)
        assert h.times[0] - start == pytest.approx(3.0, abs=1e-9)  # receive ran after the delay

        # times=None by default: every message is delayed.
        start = trio.current_time()
        assert await ref.ask("b") == 2
        assert trio.current_time() - start == pytest.approx(3.0, abs=1e-9)


async def test_delay_with_predicate_and_times(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        fault = h.injector.delay(ref, 2.0, predicate=lambda m: m == "slow", times=1)
        start = trio.current_time()
        await ref.ask("fast")
        assert trio.current_time() == start
        await ref.ask("slow")
        assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
        assert not fault.active
        start = trio.current_time()
        await ref.ask("slow")
        assert trio.current_time() == start


async def test_delay_longer_than_the_ask_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.delay(ref, 10.0, times=1)
        with pytest.raises(AskTimeout):
            await ref.ask("late", timeout=1.0)
        assert h.seen == []
        await trio.sleep(9.5)
        assert h.seen == ["late"]  # handled eventually; the reply was abandoned


async def test_delay_rejects_negative_seconds(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        with pytest.raises(ValueError, match="seconds"):
            h.injector.delay(ref, -1.0)
        with pytest.raises(ValueError, match="seconds"):
            h.injector.delay(ref, float("nan"))


# -- stall --------------------------------------------------------------------------


async def test_stall_queues_messages_until_released(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        stall = h.injector.stall(ref)
        assert isinstance(stall, Stall)
        assert not stall.released
        for message in ("a", "b", "c"):
            ref.tell_nowait(message)
        with pytest.raises(AskTimeout):
            await ref.ask("d", timeout=1.0)
        await trio.sleep(100)
        assert h.seen == []
        assert ref.statistics().mailbox_depth == 4
        assert ref.statistics().messages_handled == 0

        stall.release()
        assert stall.released
        assert await ref.ask("e") == 5
        assert h.seen == ["a", "b", "c", "d", "e"]


async def test_stall_as_a_context_manager(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        with h.injector.stall(ref) as stall:
            ref.tell_nowait("a")
            await trio.sleep(10)
            assert h.seen == []
        assert stall.released
        assert await ref.ask("b") == 2
        assert h.seen == ["a", "b"]


async def test_stall_holds_messages_queued_before_it(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        for message in range(5):
            ref.tell_nowait(message)
        stall = h.injector.stall(ref)  # before the actor got to run
        await trio.sleep(1)
        assert h.seen == []
        stall.release()
        await ref.ask("x")
        assert h.seen == [0, 1, 2, 3, 4, "x"]


async def test_stall_takes_effect_after_the_current_message(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.delay(ref, 1.0, predicate=lambda m: m == 0)
        for message in range(5):
            ref.tell_nowait(message)
        await trio.sleep(0.5)  # the actor is in the middle of message 0
        stall = h.injector.stall(ref)
        await trio.sleep(10)
        assert h.seen == [0]
        assert ref.statistics().mailbox_depth == 4
        stall.release()
        await ref.ask("x")
        assert h.seen == [0, 1, 2, 3, 4, "x"]


async def test_stalling_twice_raises(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        other = await h.recorder("other")
        stall = h.injector.stall(ref)
        with pytest.raises(RuntimeError, match="stalled already"):
            h.injector.stall(ref)
        h.injector.stall(other).release()  # another actor is independent
        stall.release()
        stall.release()  # idempotent
        again = h.injector.stall(ref)  # after a release the actor can be stalled again
        ref.tell_nowait("a")
        await trio.sleep(1)
        assert h.seen == []
        again.release()
        await ref.ask("b")
        assert h.seen == ["a", "b"]


# -- fill_mailbox ----------------------------------------------------------------------


async def test_fill_mailbox_fills_to_capacity_with_fillers_the_actor_never_sees(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=5))
        with h.injector.stall(ref):
            assert h.injector.fill_mailbox(ref) == 5
            stats = ref.statistics()
            assert (stats.mailbox_depth, stats.mailbox_peak, stats.mailbox_capacity) == (5, 5, 5)
            with pytest.raises(MailboxFull):
                ref.tell_nowait("refused")  # the default policy is block
            assert h.injector.fill_mailbox(ref) == 0  # full already
        assert await ref.ask("real") == 1
        assert h.seen == ["real"]
        stats = ref.statistics()
        assert (stats.messages_handled, stats.mailbox_depth) == (1, 0)


async def test_fill_mailbox_on_a_running_actor(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=50))
        assert h.injector.fill_mailbox(ref) == 50
        assert await ref.ask("real") == 1
        assert h.seen == ["real"]
        assert ref.statistics().mailbox_peak == 50


async def test_fill_mailbox_leaves_room(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=5))
        with h.injector.stall(ref):
            assert h.injector.fill_mailbox(ref, leave=2) == 3
            ref.tell_nowait("m1")
            ref.tell_nowait("m2")
            with pytest.raises(MailboxFull):
                ref.tell_nowait("m3")
        await ref.ask("last", timeout=None)
        assert h.seen == ["m1", "m2", "last"]


async def test_fill_mailbox_rejects_a_negative_leave(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=5))
        with h.injector.stall(ref), pytest.raises(ValueError, match="leave"):
            h.injector.fill_mailbox(ref, leave=-1)
        assert ref.statistics().mailbox_peak == 0


async def test_fill_mailbox_with_a_real_message(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=4))
        with h.injector.stall(ref):
            assert h.injector.fill_mailbox(ref, "ping") == 4
        await ref.ask("done")
        assert h.seen == ["ping", "ping", "ping", "ping", "done"]


async def test_fill_and_stall_make_a_fail_policy_mailbox_refuse(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=3, overflow="fail"))
        with h.injector.stall(ref):
            h.injector.fill_mailbox(ref)
            with pytest.raises(MailboxFull, match="refused the message"):
                ref.tell_nowait("a")
            with pytest.raises(MailboxFull):
                await ref.tell("b")
            with pytest.raises(MailboxFull):
                await ref.ask("c")
            assert ref.statistics().refused == 3
        await trio.testing.wait_all_tasks_blocked()  # the actor drains the fillers
        assert await ref.ask("d") == 1
        assert h.seen == ["d"]


async def test_fill_and_stall_make_a_block_policy_sender_time_out(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder(mailbox=MailboxConfig(size=2, block_timeout=1.5))
        with h.injector.stall(ref):
            h.injector.fill_mailbox(ref)
            start = trio.current_time()
            with pytest.raises(MailboxFull, match="no room within"):
                await ref.tell("a")
            assert trio.current_time() - start == pytest.approx(1.5, abs=1e-9)
            assert ref.statistics().block_timeouts == 1


async def test_fill_mailbox_of_a_stopped_actor_raises(autojump_clock: trio.testing.MockClock) -> None:
    from ensemble.actors import ActorStopped

    async with harness() as h:
        ref = await h.recorder()
        await h.supervisor.terminate_child("rec")
        with pytest.raises(ActorStopped):
            h.injector.fill_mailbox(ref)


# -- clear ----------------------------------------------------------------------------


async def test_clear_removes_every_fault_and_releases_every_stall(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        other = await h.recorder("other")
        crash = h.injector.crash_when(ref, lambda m: True, times=None)
        slow = h.injector.delay(other, 5.0)
        stall = h.injector.stall(other)
        other.tell_nowait("queued")
        h.injector.clear()
        assert not crash.active
        assert not slow.active
        assert stall.released
        assert ref._cell.faults is None
        assert other._cell.stalled is None
        start = trio.current_time()
        assert await ref.ask("a") == 1
        assert await other.ask("b") == 2
        assert trio.current_time() == start  # no delay left
        # Two actors share ``seen``: only each actor's own order is defined.
        assert sorted(h.seen) == ["a", "b", "queued"]
        assert h.seen.index("queued") < h.seen.index("b")
        h.injector.clear()  # idempotent


# -- faults on timer messages ---------------------------------------------------------------


async def test_crash_on_a_timer_message(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        fault = h.injector.crash_when(ref, lambda m: isinstance(m, Tick))
        assert await ref.ask("arm") == "armed"
        assert ref.statistics().active_timers == 1
        await trio.sleep(2)
        assert fault.fired == 1
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.timers_fired, stats.active_timers) == (1, 1, 1, 0)
        assert h.seen == ["arm"]  # the Tick never reached receive
        # Without the fault the timer message is handled.
        await ref.ask("arm")
        await trio.sleep(2)
        assert h.seen == ["arm", "arm", Tick()]


async def test_delay_on_a_timer_message(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        h.injector.delay(ref, 2.0, predicate=lambda m: isinstance(m, Tick))
        start = trio.current_time()
        await ref.ask("arm")
        await trio.sleep(10)
        assert h.seen == ["arm", Tick()]
        assert h.times[1] - start == pytest.approx(3.0, abs=1e-9)  # 1 s timer + 2 s delay


async def test_stall_holds_timer_messages(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        ref = await h.recorder()
        await ref.ask("arm")
        with h.injector.stall(ref):
            await trio.sleep(10)
            assert ref.statistics().timers_fired == 0
            assert h.seen == ["arm"]
        await trio.sleep(0.1)
        assert h.seen == ["arm", Tick()]
        assert ref.statistics().timers_fired == 1


# -- the fixtures -------------------------------------------------------------------------


async def test_plugin_fixtures_work_together(
    supervisor: Supervisor, fault_injector: FaultInjector, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[Any] = []
    ref = await supervisor.start_child(ChildSpec(id="rec", factory=lambda: Recorder(seen, [], [])))
    assert ref.path == "/test/rec"
    fault_injector.crash_next(ref)
    with pytest.raises(ActorCrashed):
        await ref.ask("a")
    assert await ref.ask("b") == 1
