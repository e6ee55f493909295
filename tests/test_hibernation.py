"""Hibernating actors (``ChildSpec.hibernate_after``): an idle actor's task
ends while its state, mailbox and ref stay; the next message starts a task
again.

On Trio's virtual clock: sleeps are instant and the supervisor's sweep runs
at exact times.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing
from _tasks import task_count

from ensemble.actors import Actor, ActorCrashed, ActorRef, ChildSpec, open_actor, open_supervisor
from ensemble.testing import FaultInjector


@attrs.frozen
class Add:
    n: int


@attrs.frozen
class Start:
    seconds: float


@attrs.frozen
class Tick:
    pass


class Boom(Exception):
    pass


class Counter(Actor):
    """Keeps a total across hibernations; writes its lifecycle to ``journal``."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.total = 0

    async def on_start(self) -> None:
        self.journal.append("start")

    async def on_stop(self) -> None:
        self.journal.append(f"stop {self.total}")

    async def receive(self, message: Any) -> Any:
        if isinstance(message, Add):
            if message.n < 0:
                raise Boom(message.n)
            self.total += message.n
            return self.total
        if isinstance(message, Start):
            self.start_timer("tick", message.seconds, Tick())
            return None
        if isinstance(message, Tick):
            self.journal.append("tick")
            return None
        if message == "current?":
            return self.ref.is_current_task()
        raise TypeError(message)


async def test_an_idle_actor_hibernates_and_the_next_message_resumes_it(autojump_clock: trio.testing.MockClock) -> None:
    journal: list[str] = []
    async with open_actor(lambda: Counter(journal), hibernate_after=10) as ref:
        assert await ref.ask(Add(2)) == 2
        awake = task_count()
        await trio.sleep(25)  # idle for at least one full period: hibernating by now
        stats = ref.statistics()
        assert stats.state == "hibernating"
        assert stats.hibernations == 1
        assert task_count() == awake - 1  # its task is gone
        assert ref.alive
        # The next message starts a task again; the state was kept and there
        # is no second on_start.
        assert await ref.ask(Add(3)) == 5
        assert ref.statistics().state == "running"
        assert task_count() == awake
    assert journal == ["start", "stop 5"]


async def test_an_actor_that_keeps_getting_messages_does_not_hibernate(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor(lambda: Counter([]), hibernate_after=10) as ref:
        for _ in range(10):
            await trio.sleep(6)
            await ref.ask(Add(1))
        assert ref.statistics().hibernations == 0
        assert ref.statistics().state == "running"


async def test_hibernation_happens_between_one_and_two_periods_of_idleness(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor(lambda: Counter([]), hibernate_after=10) as ref:
        await ref.ask(Add(1))
        await trio.sleep(9.9)
        assert ref.statistics().state == "running"  # not idle for a period yet
        await trio.sleep(10.2)
        assert ref.statistics().state == "hibernating"  # idle for two


async def test_an_actor_with_a_running_timer_does_not_hibernate(autojump_clock: trio.testing.MockClock) -> None:
    journal: list[str] = []
    async with open_actor(lambda: Counter(journal), hibernate_after=10) as ref:
        await ref.ask(Start(100))
        await trio.sleep(90)
        assert ref.statistics().state == "running"
        await trio.sleep(15)  # the timer fired at 100 s
        assert journal == ["start", "tick"]
        await trio.sleep(25)
        assert ref.statistics().state == "hibernating"


async def test_a_message_racing_the_hibernation_is_handled(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor(lambda: Counter([]), hibernate_after=1000) as ref:
        await ref.ask(Add(1))
        await trio.testing.wait_all_tasks_blocked()
        cell = ref._cell
        assert cell.hibernate()  # as the sweep does: the loop is woken to end ...
        ref.tell_nowait(Add(1))  # ... and a message comes before it runs
        assert await ref.ask(Add(1)) == 3
        assert ref.statistics().hibernations == 0
        assert ref.statistics().state == "running"


async def test_a_hibernating_actor_is_stopped_with_on_stop(autojump_clock: trio.testing.MockClock) -> None:
    journal: list[str] = []
    async with open_supervisor() as supervisor:
        refs = [await supervisor.start_child(ChildSpec(id=f"a{i}", factory=lambda: Counter(journal), hibernate_after=5)) for i in range(3)]
        for ref in refs:
            await ref.ask(Add(1))
        await trio.sleep(11)
        assert all(ref.statistics().state == "hibernating" for ref in refs)
        await supervisor.terminate_child("a0")
        assert journal == ["start"] * 3 + ["stop 1"]
        assert not refs[0].alive
    # The supervisor's shutdown stops the other two, hibernating as they were.
    assert journal == ["start"] * 3 + ["stop 1"] * 3


async def test_a_crash_after_waking_restarts_the_actor(autojump_clock: trio.testing.MockClock) -> None:
    journal: list[str] = []
    async with open_actor(lambda: Counter(journal), hibernate_after=5) as ref:
        await ref.ask(Add(4))
        await trio.sleep(11)
        assert ref.statistics().state == "hibernating"
        with pytest.raises(ActorCrashed):
            await ref.ask(Add(-1))
        assert await ref.ask(Add(1)) == 1  # a fresh incarnation
        stats = ref.statistics()
        assert stats.restarts == 1
        assert stats.crashes == 1
        # The fresh incarnation hibernates too.
        await trio.sleep(11)
        assert ref.statistics().state == "hibernating"
        assert ref.statistics().hibernations == 2
    assert journal == ["start", "stop 4", "start", "stop 1"]


async def test_a_stalled_actor_does_not_hibernate_and_a_stall_holds_a_hibernating_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    injector = FaultInjector()
    async with open_actor(lambda: Counter([]), hibernate_after=5) as ref:
        await ref.ask(Add(1))
        with injector.stall(ref):
            await trio.sleep(30)
            assert ref.statistics().state == "running"
        await trio.sleep(11)
        assert ref.statistics().state == "hibernating"
        with injector.stall(ref):
            ref.tell_nowait(Add(1))  # wakes it, but it may not handle anything
            await trio.sleep(1)
            assert ref.statistics().messages_handled == 1
        assert await ref.ask(Add(1)) == 3


async def test_is_current_task_follows_the_actor_across_hibernations(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor(lambda: Counter([]), hibernate_after=5) as ref:
        assert await ref.ask("current?") is True
        assert not ref.is_current_task()
        await trio.sleep(11)
        assert ref.statistics().state == "hibernating"
        assert not ref.is_current_task()
        assert await ref.ask("current?") is True


async def test_many_actors_hibernate_and_each_wakes_alone(autojump_clock: trio.testing.MockClock) -> None:
    async with open_supervisor() as supervisor:
        refs: list[ActorRef] = [
            await supervisor.start_child(ChildSpec(id=f"a{i}", factory=lambda: Counter([]), hibernate_after=5)) for i in range(200)
        ]
        for ref in refs:
            ref.tell_nowait(Add(1))
        awake = task_count()
        await trio.sleep(11)
        assert task_count() == awake - 200
        assert await refs[7].ask(Add(1)) == 2
        assert task_count() == awake - 199
        assert [ref.statistics().state for ref in refs].count("hibernating") == 199
        stats = supervisor.statistics()
        assert stats.hibernations == 200
        assert stats.wakeups == 1


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan")])
def test_hibernate_after_must_be_a_positive_number_of_seconds(value: float) -> None:
    with pytest.raises(ValueError, match="hibernate_after"):
        ChildSpec(id="a", factory=lambda: Counter([]), hibernate_after=value)


async def test_a_hibernating_actor_gives_up_its_queue_and_gets_one_back(autojump_clock: trio.testing.MockClock) -> None:
    injector = FaultInjector()
    async with open_actor(lambda: Counter([]), hibernate_after=5) as ref:
        await ref.ask(Add(1))
        await trio.sleep(11)
        mailbox = ref._cell.mailbox
        assert ref.statistics().state == "hibernating"
        assert mailbox._queue == ()  # no deque held while hibernating
        assert len(mailbox) == 0
        # tell_nowait (its fast path is off meanwhile), ask and fill_mailbox all work.
        ref.tell_nowait(Add(1))
        assert await ref.ask(Add(1)) == 3
        await trio.sleep(11)
        assert mailbox._queue == ()
        with injector.stall(ref):
            assert injector.fill_mailbox(ref, Add(1)) == ref.statistics().mailbox_capacity
        assert await ref.ask(Add(0)) == 3 + ref.statistics().mailbox_capacity
        # Woken by a stop alone (no message), it stops cleanly.
        await trio.sleep(11)
        assert ref.statistics().state == "hibernating"
    assert not ref.alive


async def test_start_hibernating_hibernates_at_the_first_idle_moment(autojump_clock: trio.testing.MockClock) -> None:
    journal: list[str] = []
    async with open_supervisor() as supervisor:
        ref = await supervisor.start_child(
            ChildSpec(id="a", factory=lambda: Counter(journal), hibernate_after=1000, start_hibernating=True)
        )
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().state == "hibernating"  # at once, not after 1000 s
        assert await ref.ask(Add(2)) == 2
        await trio.sleep(100)
        assert ref.statistics().state == "running"  # later idleness follows hibernate_after
        await trio.sleep(2000)
        assert ref.statistics().state == "hibernating"
        # A restarted incarnation starts hibernating again.
        with pytest.raises(ActorCrashed):
            await ref.ask(Add(-1))
        await trio.testing.wait_all_tasks_blocked()
        assert ref.statistics().state == "hibernating"
        assert ref.statistics().hibernations == 3
    assert journal == ["start", "stop 2", "start", "stop 0"]


async def test_start_hibernating_waits_for_a_timer(autojump_clock: trio.testing.MockClock) -> None:
    class WithTimer(Counter):
        async def on_start(self) -> None:
            await super().on_start()
            self.start_timer("tick", 10, Tick())

    journal: list[str] = []
    async with open_supervisor() as supervisor:
        ref = await supervisor.start_child(
            ChildSpec(id="a", factory=lambda: WithTimer(journal), hibernate_after=1000, start_hibernating=True)
        )
        await trio.sleep(5)
        assert ref.statistics().state == "running"  # its timer keeps it
        await trio.sleep(6)
        assert journal == ["start", "tick"]
        await trio.sleep(2500)
        assert ref.statistics().state == "hibernating"
