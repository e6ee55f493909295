"""Tests of the supervisor: strategies, restart types, intensity, shutdown.

Every test runs on Trio's virtual clock (``autojump_clock``), so sleeps are
instant and times are exact. The test actors write what they do, and when, to
a :class:`Journal`; the assertions read it back.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import itertools
import math
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from ensemble.actors import (
    DEFAULT_SHUTDOWN,
    Actor,
    ActorCrashed,
    ActorRef,
    ActorStartFailed,
    ActorStatistics,
    ActorStopped,
    Backoff,
    ChildCounts,
    ChildSpec,
    Restart,
    Strategy,
    Supervisor,
    SupervisorGaveUp,
    SupervisorSpec,
    SupervisorStatistics,
    open_actor,
    open_supervisor,
)

# -- test actors ------------------------------------------------------------------


class Boom(Exception):
    """The crash of a test actor."""


class StartFailed(Exception):
    """Raised by a test actor's ``on_start``."""


class Rejected(Exception):
    """An expected exception: a rejection, not a crash."""


class Journal:
    """What the test actors did, and at which virtual time."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, float]] = []

    def record(self, event: str, name: str) -> None:
        self.entries.append((event, name, trio.current_time()))

    def names(self, event: str) -> list[str]:
        """Who did ``event``, in order."""
        return [name for kind, name, _ in self.entries if kind == event]

    def times(self, event: str, name: str) -> list[float]:
        """When ``name`` did ``event``."""
        return [time for kind, who, time in self.entries if kind == event and who == name]

    def of(self, *events: str) -> list[tuple[str, str, float]]:
        """The entries of these kinds, in order."""
        return [entry for entry in self.entries if entry[0] in events]


class Worker(Actor):
    """A test actor that records its life in a journal.

    Messages: ``"crash"`` raises :class:`Boom`, ``"reject"`` raises the
    expected :class:`Rejected`, ``"stop"`` stops normally, ``("add", n)``
    adds to a running total and returns it, ``("sleep", s)`` sleeps,
    ``"whoami"`` returns ``(name, incarnation)``, ``"history"`` returns the
    other messages this incarnation received. Anything else is recorded in
    the history.
    """

    expected_exceptions = (Rejected,)

    def __init__(self, name: str, journal: Journal, *, stop_for: float = 0.0, fail_start_on: frozenset[int] = frozenset()) -> None:
        self.name = name
        self.journal = journal
        self.stop_for = stop_for
        self.fail_start_on = fail_start_on
        self.incarnation = 0
        self.total = 0
        self.history: list[Any] = []

    async def on_start(self) -> None:
        self.journal.record("start", self.name)
        self.incarnation = len(self.journal.times("start", self.name))
        if self.incarnation in self.fail_start_on:
            raise StartFailed(f"{self.name} failed to start (incarnation {self.incarnation})")

    async def on_stop(self) -> None:
        self.journal.record("stop", self.name)
        if self.stop_for:
            try:
                await trio.sleep(self.stop_for)
            except trio.Cancelled:
                self.journal.record("killed", self.name)
                raise
        self.journal.record("stopped", self.name)

    async def receive(self, message: Any) -> Any:
        match message:
            case "crash":
                self.journal.record("crash", self.name)
                raise Boom(f"{self.name} crashed")
            case "reject":
                raise Rejected(f"{self.name} rejected the message")
            case "stop":
                self.stop()
                return "stopping"
            case ("add", int(amount)):
                self.total += amount
                return self.total
            case ("sleep", float(seconds)):
                await trio.sleep(seconds)
                return "slept"
            case "whoami":
                return (self.name, self.incarnation)
            case "history":
                return list(self.history)
            case _:
                self.history.append(message)
                return message


class SelfCancelling(Actor):
    """Cancels scopes of its own inside ``receive``; that is no crash."""

    async def receive(self, message: Any) -> Any:
        with trio.CancelScope() as scope:
            scope.cancel()
            await trio.sleep(10)
        with trio.move_on_after(1) as timeout:
            await trio.sleep(10)
        return (scope.cancelled_caught, timeout.cancelled_caught)


class Interrupting(Actor):
    """Raises ``KeyboardInterrupt`` from ``receive``."""

    async def receive(self, message: Any) -> Any:
        raise KeyboardInterrupt


# -- helpers ----------------------------------------------------------------------


def worker(
    journal: Journal,
    name: str,
    *,
    restart: Restart = Restart.PERMANENT,
    shutdown: float = DEFAULT_SHUTDOWN,
    stop_for: float = 0.0,
    fail_start_on: frozenset[int] = frozenset(),
) -> ChildSpec:
    """The spec of a :class:`Worker` child named ``name``."""
    factory = functools.partial(Worker, name, journal, stop_for=stop_for, fail_start_on=fail_start_on)
    return ChildSpec(id=name, factory=factory, restart=restart, shutdown=shutdown)


async def crash(ref: ActorRef) -> ActorCrashed:
    """Make the actor crash on an ``ask``; return what the asker got."""
    with pytest.raises(ActorCrashed) as info:
        await ref.ask("crash", timeout=None)
    return info.value


async def settle() -> None:
    """Let every task run until all are blocked, without moving the clock."""
    await trio.testing.wait_all_tasks_blocked()


async def run_until_it_gives_up(body: Callable[[Supervisor], Awaitable[None]], **options: Any) -> tuple[Supervisor, SupervisorGaveUp]:
    """Run ``body`` in a new supervisor, which must then give up.

    Returns the supervisor and the :class:`SupervisorGaveUp` raised out of
    ``open_supervisor`` (which cancelled the body, if it was still running).
    """
    supervisors: list[Supervisor] = []

    async def scenario() -> None:
        async with open_supervisor(**options) as supervisor:
            supervisors.append(supervisor)
            await body(supervisor)
            await trio.sleep(3600)
            pytest.fail("the supervisor did not give up")

    with pytest.raises(SupervisorGaveUp) as info:
        await scenario()
    return supervisors[0], info.value


async def start_workers(supervisor: Supervisor, journal: Journal, *names: str) -> list[ActorRef]:
    return [await supervisor.start_child(worker(journal, name)) for name in names]


@pytest.fixture
def journal() -> Journal:
    return Journal()


# -- strategies -------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_crashed_child(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(strategy="one_for_one") as sup:
        a, b, c = await start_workers(sup, journal, "a", "b", "c")
        for ref in (a, b, c):
            await ref.ask(("add", 5))
        await crash(b)
        await settle()
        assert journal.names("start") == ["a", "b", "c", "b"]
        assert journal.names("stop") == ["b"]  # the crashed incarnation's on_stop
        assert await a.ask(("add", 1)) == 6
        assert await b.ask(("add", 1)) == 1  # a fresh incarnation
        assert await c.ask(("add", 1)) == 6
        assert [ref.statistics().restarts for ref in (a, b, c)] == [0, 1, 0]


async def test_one_for_all_stops_the_others_in_reverse_order_and_restarts_all(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(strategy=Strategy.ONE_FOR_ALL) as sup:
        refs = await start_workers(sup, journal, "a", "b", "c", "d")
        for ref in refs:
            await ref.ask(("add", 5))
        await crash(refs[1])
        await settle()
        assert journal.names("stop") == ["b", "d", "c", "a"]
        assert journal.names("start") == ["a", "b", "c", "d", "a", "b", "c", "d"]
        assert [await ref.ask(("add", 1)) for ref in refs] == [1, 1, 1, 1]
        assert [await ref.ask("whoami") for ref in refs] == [("a", 2), ("b", 2), ("c", 2), ("d", 2)]
        assert sup.statistics().restarts == 4


async def test_rest_for_one_restarts_the_crashed_child_and_those_started_after_it(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(strategy="rest_for_one") as sup:
        refs = await start_workers(sup, journal, "a", "b", "c", "d")
        for ref in refs:
            await ref.ask(("add", 5))
        await crash(refs[1])
        await settle()
        assert journal.names("stop") == ["b", "d", "c"]
        assert journal.names("start") == ["a", "b", "c", "d", "b", "c", "d"]
        assert [await ref.ask(("add", 1)) for ref in refs] == [6, 1, 1, 1]
        assert [ref.statistics().restarts for ref in refs] == [0, 1, 1, 1]


# -- restart types ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "message", "restarted"),
    [
        (Restart.PERMANENT, "crash", True),
        (Restart.PERMANENT, "stop", True),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TRANSIENT, "stop", False),
        (Restart.TEMPORARY, "crash", False),
        (Restart.TEMPORARY, "stop", False),
    ],
)
async def test_restart_type_decides_whether_an_exited_child_is_restarted(
    autojump_clock: trio.testing.MockClock, journal: Journal, restart: Restart, message: str, restarted: bool
) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a", restart=restart))
        if message == "crash":
            await crash(ref)
        else:
            assert await ref.ask("stop") == "stopping"
        await settle()
        assert journal.names("stop") == ["a"]
        if restarted:
            assert journal.names("start") == ["a", "a"]
            assert sup.child("a") is ref
            assert await ref.ask("whoami") == ("a", 2)
            assert sup.statistics().restarts == 1
        else:
            assert journal.names("start") == ["a"]
            assert sup.child("a") is None
            assert sup.which_children() == []
            assert not ref.alive
            with pytest.raises(ActorStopped):
                await ref.ask("whoami")
            assert sup.statistics().restarts == 0


@pytest.mark.parametrize("strategy", [Strategy.ONE_FOR_ALL, Strategy.REST_FOR_ONE])
async def test_a_temporary_sibling_is_removed_not_restarted_by_a_group_restart(
    autojump_clock: trio.testing.MockClock, journal: Journal, strategy: Strategy
) -> None:
    async with open_supervisor(strategy=strategy) as sup:
        a = await sup.start_child(worker(journal, "a"))
        temp = await sup.start_child(worker(journal, "temp", restart="temporary"))
        b = await sup.start_child(worker(journal, "b"))
        await crash(a)
        await settle()
        assert journal.names("stop") == ["a", "b", "temp"]  # temp's on_stop ran
        assert journal.names("start") == ["a", "temp", "b", "a", "b"]
        assert [info.id for info in sup.which_children()] == ["a", "b"]
        assert not temp.alive
        with pytest.raises(ActorStopped):
            await temp.ask("whoami")
        assert await b.ask("whoami") == ("b", 2)


async def test_a_temporary_child_that_crashes_does_not_restart_its_siblings(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(strategy="one_for_all") as sup:
        a = await sup.start_child(worker(journal, "a"))
        temp = await sup.start_child(worker(journal, "temp", restart="temporary"))
        await crash(temp)
        await settle()
        assert journal.names("start") == ["a", "temp"]
        assert [info.id for info in sup.which_children()] == ["a"]
        assert await a.ask("whoami") == ("a", 1)
        assert sup.statistics().restarts == 0


async def test_a_transient_sibling_is_restarted_by_a_group_restart(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(strategy="one_for_all") as sup:
        a = await sup.start_child(worker(journal, "a"))
        t = await sup.start_child(worker(journal, "t", restart="transient"))
        await crash(a)
        await settle()
        assert await t.ask("whoami") == ("t", 2)


# -- restart intensity ------------------------------------------------------------


async def test_four_crashes_within_the_window_give_up(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    refs: list[ActorRef] = []

    async def crash_four_times(sup: Supervisor) -> None:
        refs.extend(await start_workers(sup, journal, "a"))
        for _ in range(4):
            await crash(refs[0])

    sup, gave_up = await run_until_it_gives_up(crash_four_times, name="top")
    assert trio.current_time() == 0
    assert gave_up.path == "/top"
    assert "more than 3 restarts within 5.0 s" in str(gave_up)
    assert isinstance(gave_up.__cause__, Boom)
    assert journal.names("start") == ["a"] * 4
    assert sup.statistics().gave_up == 1
    assert sup.statistics().state == "stopped"
    assert not refs[0].alive


async def test_three_crashes_within_the_window_do_not_give_up(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a"))
        for _ in range(3):
            await crash(ref)
        await settle()
        assert await ref.ask("whoami") == ("a", 4)
        stats = sup.statistics()
        assert (stats.restarts, stats.recent_restarts, stats.gave_up) == (3, 3, 0)
        await trio.sleep(5.5)
        assert sup.statistics().recent_restarts == 0


@pytest.mark.parametrize(("fourth_crash_at", "gives_up"), [(5.0, True), (5.5, False)])
async def test_the_window_includes_its_boundary(
    autojump_clock: trio.testing.MockClock, journal: Journal, fourth_crash_at: float, gives_up: bool
) -> None:
    async def crash_four_times(sup: Supervisor) -> None:
        (ref,) = await start_workers(sup, journal, "a")
        for _ in range(3):
            await crash(ref)
        await trio.sleep(fourth_crash_at)
        await crash(ref)
        await settle()
        assert await ref.ask("whoami") == ("a", 5)

    if gives_up:
        await run_until_it_gives_up(crash_four_times)
        assert trio.current_time() == fourth_crash_at
    else:
        async with open_supervisor() as sup:
            await crash_four_times(sup)


async def test_crashes_spread_out_over_time_never_give_up(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a"))
        for _ in range(12):
            await crash(ref)
            await trio.sleep(2)
        assert await ref.ask("whoami") == ("a", 13)
        assert sup.statistics().restarts == 12
        assert sup.statistics().recent_restarts == 2  # at t=24: the restarts at 20 and 22
        assert sup.statistics().gave_up == 0


async def test_a_nested_supervisor_that_gives_up_is_restarted_and_escalates(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    inner_spec = SupervisorSpec(id="inner", max_restarts=1, children=[worker(journal, "w")])
    handles: list[Any] = []

    async def escalate(top: Supervisor) -> None:
        inner = await top.start_child(inner_spec)
        w = inner.child("w")
        assert isinstance(w, ActorRef)
        handles.extend([inner, w])
        await w.ask(("add", 5))
        await crash(w)  # inner restarts w
        await crash(w)  # a 2nd restart is too many: inner gives up, top restarts inner
        await settle()
        assert top.child("inner") is inner
        assert inner.child("w") is w
        assert inner.statistics().gave_up == 1
        assert inner.statistics().state == "running"
        assert top.statistics().restarts == 1
        assert await w.ask("whoami") == ("w", 3)
        assert await w.ask(("add", 1)) == 1  # a fresh incarnation
        for _ in range(3):  # three more give-ups of inner: top gives up too
            await crash(w)
            await crash(w)
            await settle()

    _, gave_up = await run_until_it_gives_up(escalate, name="top")
    inner, w = handles
    assert trio.current_time() == 0
    assert gave_up.path == "/top"
    cause = gave_up.__cause__
    assert isinstance(cause, SupervisorGaveUp)
    assert cause.path == "/top/inner"
    assert isinstance(cause.__cause__, Boom)
    assert inner.statistics().gave_up == 4
    assert not w.alive


async def test_giving_up_stops_the_children_in_reverse_start_order(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    refs: list[ActorRef] = []

    async def crash_b(sup: Supervisor) -> None:
        for name in ("a", "b", "c"):
            refs.append(await sup.start_child(worker(journal, name, stop_for=1)))
        await crash(refs[1])

    await run_until_it_gives_up(crash_b, max_restarts=0)
    assert journal.of("stop", "stopped") == [
        ("stop", "b", 0),  # b's on_stop after its crash
        ("stopped", "b", 1),
        ("stop", "c", 1),
        ("stopped", "c", 2),
        ("stop", "a", 2),
        ("stopped", "a", 3),
    ]
    assert trio.current_time() == 3
    with pytest.raises(ActorStopped):
        refs[0].tell_nowait("hello")


# -- mailbox and messages across restarts -----------------------------------------


async def test_messages_queued_behind_a_crash_go_to_the_next_incarnation(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a"))
        ref.tell_nowait("crash")
        for message in ("m1", "m2", "m3"):
            ref.tell_nowait(message)
        assert ref.statistics().mailbox_depth == 4
        assert await ref.ask("history") == ["m1", "m2", "m3"]
        assert await ref.ask("whoami") == ("a", 2)
        assert sup.child("a") is ref
        assert ref.alive
        assert ref.statistics().restarts == 1
        assert journal.names("crash") == ["a"]


async def test_the_crashing_message_is_dropped_and_its_asker_gets_actor_crashed_at_once(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(name="sup", backoff=Backoff(initial=10, jitter=0)) as sup:
        ref = await sup.start_child(worker(journal, "a"))
        error = await crash(ref)
        assert trio.current_time() == 0  # before the restart, 10 s later
        assert error.path == "/sup/a"
        assert "/sup/a" in str(error)
        assert isinstance(error.__cause__, Boom)
        assert await ref.ask("whoami", timeout=None) == ("a", 2)
        assert trio.current_time() == 10
        assert await ref.ask("history") == []
        assert journal.names("crash") == ["a"]  # not redelivered
        assert ref.statistics().crashes == 1


async def test_an_expected_exception_is_a_rejection_not_a_crash(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a"))
        await ref.ask(("add", 5))
        with pytest.raises(Rejected):
            await ref.ask("reject")
        assert await ref.ask(("add", 1)) == 6
        assert journal.names("start") == ["a"]
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.messages_rejected) == (0, 0, 1)
        assert sup.statistics().restarts == 0


# -- on_start failures ------------------------------------------------------------


async def test_on_start_failure_on_the_first_start_raises_and_registers_nothing(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(name="sup") as sup:
        with pytest.raises(ActorStartFailed) as info:
            await sup.start_child(worker(journal, "a", fail_start_on=frozenset({1})))
        assert info.value.path == "/sup/a"
        assert isinstance(info.value.__cause__, StartFailed)
        assert sup.child("a") is None
        assert sup.count_children() == ChildCounts(specs=0, active=0, supervisors=0, workers=0)
        assert sup.statistics().restarts == 0
        ref = await sup.start_child(worker(journal, "a"))  # the id is free
        assert await ref.ask("whoami") == ("a", 2)


async def test_initial_children_that_fail_to_start_raise_out_of_open_supervisor(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    children = [worker(journal, "a"), worker(journal, "b", fail_start_on=frozenset({1})), worker(journal, "c")]
    with pytest.raises(ActorStartFailed) as info:
        async with open_supervisor(children=children):
            pytest.fail("the body must not run")
    assert info.value.path == "/b"
    assert journal.names("start") == ["a", "b"]
    assert journal.names("stop") == ["a"]


async def test_on_start_failures_on_restart_count_toward_intensity(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    refs: list[ActorRef] = []

    async def crash_once(sup: Supervisor) -> None:
        refs.append(await sup.start_child(worker(journal, "a", fail_start_on=frozenset({2, 3, 4}))))
        await crash(refs[0])  # 1 crash + 3 failed restarts = 4 restarts within 5 s

    _, gave_up = await run_until_it_gives_up(crash_once)
    assert isinstance(gave_up.__cause__, StartFailed)
    assert journal.names("start") == ["a"] * 4
    assert refs[0].statistics().crashes == 4


async def test_a_restart_that_fails_once_is_retried(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a", fail_start_on=frozenset({2})))
        await crash(ref)
        await settle()
        assert await ref.ask("whoami") == ("a", 3)
        assert sup.statistics().recent_restarts == 2


# -- shutdown ---------------------------------------------------------------------


async def test_shutdown_stops_children_in_reverse_start_order(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    inner = SupervisorSpec(id="inner", children=[worker(journal, "x"), worker(journal, "y")])
    async with open_supervisor(children=[worker(journal, "a"), inner]) as sup:
        refs = await start_workers(sup, journal, "b")
    assert journal.names("start") == ["a", "x", "y", "b"]
    assert journal.names("stopped") == ["b", "y", "x", "a"]
    assert trio.current_time() == 0
    assert sup.statistics().state == "stopped"
    assert not refs[0].alive


async def test_shutdown_grace_cancels_a_slow_on_stop_at_the_deadline(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        await sup.start_child(worker(journal, "slow", stop_for=10, shutdown=2))
        await sup.start_child(worker(journal, "quick", stop_for=1, shutdown=2))
    assert journal.of("stop", "stopped", "killed") == [
        ("stop", "quick", 0),
        ("stopped", "quick", 1),  # within its grace
        ("stop", "slow", 1),
        ("killed", "slow", 3),  # exactly at its 2 s grace deadline
    ]
    assert trio.current_time() == 3


async def test_terminate_child_cancels_after_grace_and_fails_pending_asks(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    outcomes: dict[str, tuple[type[BaseException], float]] = {}

    async def ask(ref: ActorRef, key: str, message: Any) -> None:
        with pytest.raises(ActorStopped) as info:
            await ref.ask(message, timeout=None)
        outcomes[key] = (type(info.value), trio.current_time())

    async with open_supervisor() as sup, trio.open_nursery() as nursery:
        ref = await sup.start_child(worker(journal, "a", shutdown=2))
        nursery.start_soon(ask, ref, "in flight", ("sleep", 100.0))
        await settle()
        nursery.start_soon(ask, ref, "queued", "whoami")
        await trio.sleep(1)
        await sup.terminate_child("a")
        assert trio.current_time() == 3  # 1 s + 2 s of grace
        await settle()
        assert outcomes == {"in flight": (ActorStopped, 3), "queued": (ActorStopped, 3)}
        assert sup.child("a") is None
        assert ref.statistics().crashes == 0  # cancelled by its supervisor: no crash
        assert sup.statistics().restarts == 0
        assert journal.names("start") == ["a"]


async def test_terminate_child_runs_on_stop_and_removes_the_child(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        a, b = await start_workers(sup, journal, "a", "b")
        await sup.terminate_child("a")
        assert journal.names("stopped") == ["a"]
        assert [info.id for info in sup.which_children()] == ["b"]
        with pytest.raises(ActorStopped):
            a.tell_nowait("hello")
        with pytest.raises(KeyError):
            await sup.terminate_child("a")
        assert await b.ask("whoami") == ("b", 1)
    assert journal.names("stopped") == ["a", "b"]


async def test_terminate_child_stops_a_nested_supervisor_and_its_children(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        inner = await sup.start_child(SupervisorSpec(id="inner", children=[worker(journal, "x"), worker(journal, "y")]))
        x = inner.child("x")
        assert isinstance(x, ActorRef)
        await sup.terminate_child("inner")
        assert journal.names("stopped") == ["y", "x"]
        assert sup.child("inner") is None
        assert not x.alive
        with pytest.raises(ActorStopped):
            await inner.start_child(worker(journal, "z"))


# -- cancellation -----------------------------------------------------------------


async def test_cancelling_an_outer_scope_stops_the_children_gracefully(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    reached: list[str] = []
    with trio.CancelScope() as outer:
        async with open_supervisor() as sup:
            a, b = [await sup.start_child(worker(journal, name, stop_for=1)) for name in ("a", "b")]
            outer.cancel()
            await trio.lowlevel.checkpoint()
            reached.append("body")
        reached.append("after")
    assert outer.cancelled_caught
    assert reached == []
    assert journal.of("stop", "stopped", "killed") == [
        ("stop", "b", 0),
        ("stopped", "b", 1),
        ("stop", "a", 1),
        ("stopped", "a", 2),
    ]
    assert not a.alive
    assert not b.alive
    assert a.statistics().crashes == b.statistics().crashes == 0
    assert sup.statistics().restarts == 0


async def test_an_outer_deadline_stops_the_children_and_a_nested_supervisor(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    inner = SupervisorSpec(id="inner", children=[worker(journal, "x", stop_for=1)])
    with trio.move_on_after(5) as outer:
        async with open_supervisor(children=[worker(journal, "a", stop_for=1), inner]):
            await trio.sleep_forever()
    assert outer.cancelled_caught
    assert journal.of("stop", "stopped", "killed") == [
        ("stop", "x", 5),
        ("stopped", "x", 6),
        ("stop", "a", 6),
        ("stopped", "a", 7),
    ]


async def test_an_exception_in_the_body_propagates_unwrapped(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async def scenario() -> None:
        async with open_supervisor() as sup:
            await start_workers(sup, journal, "a", "b")
            raise LookupError("from the body")

    with pytest.raises(LookupError) as info:
        await scenario()
    assert type(info.value) is LookupError
    assert journal.names("stopped") == ["b", "a"]


async def test_an_exception_in_the_body_while_giving_up_propagates_unwrapped(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    # The 4th crash reaches the body (uncaught) while the supervisor is busy
    # giving up (stopping a slow sibling): the body's exception wins.
    supervisors: list[Supervisor] = []

    async def scenario() -> None:
        async with open_supervisor() as sup:
            supervisors.append(sup)
            await sup.start_child(worker(journal, "slow", stop_for=1))
            ref = await sup.start_child(worker(journal, "a"))
            for _ in range(3):
                await crash(ref)
            await ref.ask("crash")

    with pytest.raises(ActorCrashed) as info:
        await scenario()
    assert type(info.value) is ActorCrashed
    assert journal.names("stopped")[-1] == "slow"
    assert supervisors[0].statistics().gave_up == 1


async def test_a_cancel_scope_inside_receive_is_not_a_crash(autojump_clock: trio.testing.MockClock) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(ChildSpec(id="a", factory=SelfCancelling))
        assert await ref.ask("go") == (True, True)
        assert trio.current_time() == 1
        stats = ref.statistics()
        assert (stats.crashes, stats.restarts, stats.messages_handled) == (0, 0, 1)


async def test_keyboard_interrupt_in_an_actor_propagates_and_is_not_a_crash(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    with pytest.RaisesGroup(KeyboardInterrupt):
        async with open_supervisor() as sup:
            other = await sup.start_child(worker(journal, "other"))
            ref = await sup.start_child(ChildSpec(id="a", factory=Interrupting))
            ref.tell_nowait("go")
            await trio.sleep_forever()
    assert ref.statistics().crashes == 0
    assert ref.statistics().restarts == 0
    assert sup.statistics().restarts == 0
    assert journal.names("stopped") == ["other"]  # the sibling was stopped gracefully
    assert not other.alive


# -- inspection -------------------------------------------------------------------


async def test_which_children_count_children_and_child(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(backoff=Backoff(initial=1, jitter=0)) as sup:
        a = await sup.start_child(worker(journal, "a"))
        inner = await sup.start_child(SupervisorSpec(id="inner", restart="transient"))
        t = await sup.start_child(worker(journal, "t", restart=Restart.TEMPORARY))
        rows = [(info.id, info.kind, info.restart, info.running, info.handle) for info in sup.which_children()]
        assert rows == [
            ("a", "worker", Restart.PERMANENT, True, a),
            ("inner", "supervisor", Restart.TRANSIENT, True, inner),
            ("t", "worker", Restart.TEMPORARY, True, t),
        ]
        assert sup.count_children() == ChildCounts(specs=3, active=3, supervisors=1, workers=2)
        assert sup.child("a") is a
        assert sup.child("inner") is inner
        assert sup.child("nobody") is None
        await crash(a)  # restarted in 1 s
        await settle()
        assert [info.running for info in sup.which_children()] == [False, True, True]
        assert sup.count_children() == ChildCounts(specs=3, active=2, supervisors=1, workers=2)
        await trio.sleep(1)  # the restart is due now
        await settle()
        assert sup.count_children().active == 3


async def test_statistics(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(name="top", strategy="rest_for_one", max_restarts=5, max_seconds=10) as sup:
        a, _ = await start_workers(sup, journal, "a", "b")
        await crash(a)
        await settle()
        assert sup.statistics() == SupervisorStatistics(
            path="/top",
            strategy=Strategy.REST_FOR_ONE,
            state="running",
            children=2,
            active=2,
            restarts=2,
            recent_restarts=1,
            max_restarts=5,
            max_seconds=10,
            gave_up=0,
        )
    stats = sup.statistics()
    assert (stats.state, stats.active, stats.restarts) == ("stopped", 0, 2)


async def test_snapshot_is_the_tree_with_statistics(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    inner = SupervisorSpec(id="inner", strategy="one_for_all", restart="transient", children=[worker(journal, "x")])
    async with open_supervisor(name="top", children=[worker(journal, "a"), inner]) as sup:
        a = sup.child("a")
        assert isinstance(a, ActorRef)
        await a.ask(("add", 1))
        await crash(a)
        await settle()
        tree = sup.snapshot()
    assert [node.path for node in tree.walk()] == ["/top", "/top/a", "/top/inner", "/top/inner/x"]
    assert [(node.kind, node.restart) for node in tree.walk()] == [
        ("supervisor", None),
        ("worker", Restart.PERMANENT),
        ("supervisor", Restart.TRANSIENT),
        ("worker", Restart.PERMANENT),
    ]
    top_stats, a_stats, inner_stats, x_stats = (node.statistics for node in tree.walk())
    assert isinstance(top_stats, SupervisorStatistics)
    assert (top_stats.path, top_stats.restarts, top_stats.children) == ("/top", 1, 2)
    assert isinstance(a_stats, ActorStatistics)
    assert (a_stats.path, a_stats.messages_handled, a_stats.crashes, a_stats.restarts, a_stats.state) == ("/top/a", 1, 1, 1, "running")
    assert isinstance(inner_stats, SupervisorStatistics)
    assert (inner_stats.path, inner_stats.strategy, inner_stats.children) == ("/top/inner", Strategy.ONE_FOR_ALL, 1)
    assert isinstance(x_stats, ActorStatistics)
    assert x_stats.path == "/top/inner/x"
    assert tree.format().splitlines() == [
        "/top <one_for_one> children=2 restarts=1",
        "  /top/a [running] handled=1 depth=0 restarts=1",
        "  /top/inner <one_for_all> children=1 restarts=0",
        "    /top/inner/x [running] handled=0 depth=0 restarts=0",
    ]


async def test_start_child_with_a_duplicate_id_raises_value_error(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        (a,) = await start_workers(sup, journal, "a")
        with pytest.raises(ValueError, match="already has a child 'a'"):
            await sup.start_child(worker(journal, "a"))
        with pytest.raises(ValueError, match="already has a child 'a'"):
            await sup.start_child(SupervisorSpec(id="a"))
        assert journal.names("start") == ["a"]
        assert sup.child("a") is a
        assert await a.ask("whoami") == ("a", 1)


async def test_duplicate_initial_children_raise_value_error(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    with pytest.raises(ValueError, match="already has a child 'a'"):
        async with open_supervisor(children=[worker(journal, "a"), worker(journal, "a")]):
            pytest.fail("the body must not run")
    assert journal.names("start") == ["a"]
    assert journal.names("stopped") == ["a"]


async def test_a_stopped_supervisor_refuses_operations(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(name="sup") as sup:
        (a,) = await start_workers(sup, journal, "a")
    with pytest.raises(ActorStopped) as info:
        await sup.start_child(worker(journal, "b"))
    assert info.value.path == "/sup"
    with pytest.raises(ActorStopped):
        await sup.terminate_child("a")
    with pytest.raises(ActorStopped):
        await a.ask("whoami")
    with pytest.raises(ActorStopped):
        a.tell_nowait("hello")
    assert journal.names("start") == ["a"]


async def test_a_supervisor_that_gave_up_refuses_operations(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    refs: list[ActorRef] = []

    async def crash_a(sup: Supervisor) -> None:
        refs.extend(await start_workers(sup, journal, "a"))
        await crash(refs[0])

    sup, _ = await run_until_it_gives_up(crash_a, max_restarts=0)
    with pytest.raises(ActorStopped):
        await sup.start_child(worker(journal, "b"))
    with pytest.raises(ActorStopped):
        await refs[0].ask("whoami")


# -- backoff ----------------------------------------------------------------------


async def test_backoff_delays_restarts_exponentially(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(backoff=Backoff(initial=1, factor=2, jitter=0)) as sup:
        ref = await sup.start_child(worker(journal, "a"))
        crashed_at = []
        for _ in range(3):
            await crash(ref)  # the next incarnation handles the next "crash"
            crashed_at.append(trio.current_time())
        assert await ref.ask("whoami", timeout=None) == ("a", 4)
    assert crashed_at == [0, 1, 3]
    assert journal.times("start", "a") == [0, 1, 3, 7]  # +1 s, +2 s, +4 s


async def test_messages_sent_during_the_backoff_wait_are_delivered_after_the_restart(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    async with open_supervisor(backoff=Backoff(initial=1, jitter=0)) as sup:
        ref = await sup.start_child(worker(journal, "a"))
        await crash(ref)
        await trio.sleep(0.5)
        await ref.tell("m1")
        await ref.tell("m2")
        stats = ref.statistics()
        assert (stats.state, stats.mailbox_depth) == ("restarting", 2)
        assert await ref.ask("history") == ["m1", "m2"]
        assert trio.current_time() == 1
        assert await ref.ask("whoami") == ("a", 2)


async def test_terminating_a_child_during_its_backoff_cancels_the_restart(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(backoff=Backoff(initial=1, jitter=0)) as sup:
        ref = await sup.start_child(worker(journal, "a"))
        await crash(ref)
        await sup.terminate_child("a")
        await trio.sleep(2)
        assert journal.names("start") == ["a"]
        assert sup.child("a") is None
        assert not ref.alive


async def test_backoff_jitter_comes_from_the_seeded_generator(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    backoff = Backoff(initial=1, factor=2, jitter=0.5)
    rng = random.Random(7)
    expected = [backoff.delay(attempt, rng) for attempt in (1, 2, 3)]
    assert len(set(expected)) == 3  # jittered: not exactly 1, 2, 4
    async with open_supervisor(backoff=backoff, seed=7) as sup:
        ref = await sup.start_child(worker(journal, "a"))
        for _ in range(3):
            await crash(ref)
        await ref.ask("whoami", timeout=None)
    starts = journal.times("start", "a")
    assert [later - earlier for earlier, later in itertools.pairwise(starts)] == pytest.approx(expected)


async def test_open_actor_restarts_its_actor(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_actor(functools.partial(Worker, "a", journal), name="solo") as ref:
        assert ref.path == "/solo"
        await crash(ref)
        assert await ref.ask("whoami") == ("a", 2)
    assert not ref.alive


def test_specs_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        ChildSpec(id="a/b", factory=Worker)
    with pytest.raises(ValueError, match="shutdown"):
        ChildSpec(id="a", factory=Worker, shutdown=-1)
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=2)
    assert SupervisorSpec(id="s").shutdown == math.inf
    assert Backoff(initial=1, factor=2, maximum=5, jitter=0).delay(4, random.Random()) == 5


class Echo(Actor):
    async def receive(self, message: object) -> object:
        return message


class StartsASiblingInOnStart(Actor):
    def __init__(self, supervisor: Supervisor, outcome: list[BaseException]) -> None:
        self.supervisor = supervisor
        self.outcome = outcome

    async def on_start(self) -> None:
        try:
            await self.supervisor.start_child(ChildSpec(id="sibling", factory=Echo))
        except RuntimeError as exc:
            self.outcome.append(exc)

    async def receive(self, message: object) -> object:
        return message


async def test_start_child_from_on_start_is_refused_instead_of_deadlocking(autojump_clock: trio.testing.MockClock) -> None:
    outcome: list[BaseException] = []
    async with open_supervisor(name="top") as sup:
        ref = await sup.start_child(ChildSpec(id="eager", factory=lambda: StartsASiblingInOnStart(sup, outcome)))
        assert await ref.ask("still works") == "still works"
        assert len(outcome) == 1
        assert "would deadlock" in str(outcome[0])
        assert [info.id for info in sup.which_children()] == ["eager"]
        # After on_start, starting children from the actor is fine.
        assert isinstance(await sup.start_child(ChildSpec(id="later", factory=Echo)), ActorRef)


class CrashOnBoom(Actor):
    async def receive(self, message: object) -> object:
        if message == "boom":
            raise Boom("boom")
        return message


async def test_a_child_with_its_own_limit_is_removed_alone(autojump_clock: trio.testing.MockClock) -> None:
    # Many independent children (rooms): one crash-looping child must not
    # take its siblings or the supervisor down, and does not use up the
    # supervisor's intensity.
    async with open_supervisor(name="rooms", max_restarts=1, max_seconds=5) as sup:
        own = {"max_restarts": 2, "max_seconds": 5.0}
        looping = await sup.start_child(ChildSpec(id="looping", factory=CrashOnBoom, restart="transient", **own))
        steady = await sup.start_child(ChildSpec(id="steady", factory=CrashOnBoom, restart="transient", **own))
        for _ in range(2):
            with pytest.raises(ActorCrashed):
                await looping.ask("boom")
            await trio.testing.wait_all_tasks_blocked()
        assert looping.statistics().restarts == 2
        with pytest.raises(ActorCrashed):
            await looping.ask("boom")  # the third within 5 s: removed, not restarted
        await trio.testing.wait_all_tasks_blocked()
        assert sup.child("looping") is None
        assert not looping.alive
        with pytest.raises(ActorStopped):
            await looping.ask("hello")
        # The sibling and the supervisor are unaffected, and the supervisor's
        # own intensity (1 restart in 5 s) was never touched.
        with pytest.raises(ActorCrashed):
            await steady.ask("boom")
        assert await steady.ask("hello") == "hello"
        stats = sup.statistics()
        assert (stats.children_given_up, stats.gave_up, stats.recent_restarts) == (1, 0, 0)


async def test_a_child_limit_window_slides(autojump_clock: trio.testing.MockClock) -> None:
    async with open_supervisor(name="rooms") as sup:
        ref = await sup.start_child(ChildSpec(id="r", factory=CrashOnBoom, max_restarts=1, max_seconds=5.0))
        for _ in range(4):  # one crash every 6 s never exceeds 1 in 5 s
            with pytest.raises(ActorCrashed):
                await ref.ask("boom")
            await trio.sleep(6)
        assert await ref.ask("still here") == "still here"
        assert ref.statistics().restarts == 4


# -- starting children: one at a time, the fast path, bursts -------------------------


class SlowStart(Actor):
    """Takes ``seconds`` (virtual) in ``on_start``; ``fail`` makes it raise then."""

    def __init__(self, name: str, journal: Journal, seconds: float, fail: bool) -> None:
        self.name = name
        self.journal = journal
        self.seconds = seconds
        self.fail = fail

    async def on_start(self) -> None:
        self.journal.record("starting", self.name)
        await trio.sleep(self.seconds)
        if self.fail:
            raise StartFailed(f"{self.name} failed to start")
        self.journal.record("started", self.name)

    async def on_stop(self) -> None:
        self.journal.record("stop", self.name)

    async def receive(self, message: Any) -> Any:
        return (self.name, message)


def slow(journal: Journal, name: str, seconds: float = 1.0, *, fail: bool = False) -> ChildSpec:
    return ChildSpec(id=name, factory=functools.partial(SlowStart, name, journal, seconds, fail))


async def test_concurrent_start_child_calls_start_each_id_once_one_at_a_time(
    autojump_clock: trio.testing.MockClock, journal: Journal
) -> None:
    names = [f"c{i % 20}" for i in range(60)]  # each id asked for by three tasks at once
    started: dict[str, list[ActorRef]] = {}
    duplicates: list[str] = []

    async def start(sup: Supervisor, name: str) -> None:
        try:
            started.setdefault(name, []).append(await sup.start_child(slow(journal, name)))
        except ValueError as exc:
            duplicates.append(str(exc))

    async with open_supervisor(name="sup") as sup:
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(start, sup, name)
        # The first call of each id started it; the two others got ValueError.
        assert sorted(started) == sorted(set(names))
        assert all(len(refs) == 1 for refs in started.values())
        assert sorted(duplicates) == sorted(f"/sup already has a child {name!r}" for name in set(names) for _ in range(2))
        assert sup.count_children() == ChildCounts(specs=20, active=20, supervisors=0, workers=20)
        for name, (ref,) in started.items():
            assert sup.child(name) is ref
            assert await ref.ask("hello") == (name, "hello")
        # One on_start at a time: each ended before the next began.
        events = journal.of("starting", "started")
        assert [kind for kind, _, _ in events] == ["starting", "started"] * 20
        assert all(events[i][1] == events[i + 1][1] for i in range(0, 40, 2))
        assert trio.current_time() == 20


async def test_a_start_goes_on_when_its_caller_is_cancelled(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(name="sup") as sup:
        with trio.move_on_after(0.5) as waited:
            await sup.start_child(slow(journal, "a"))
        assert waited.cancelled_caught
        assert [(info.id, info.running) for info in sup.which_children()] == [("a", False)]  # still starting
        await trio.sleep(1)
        ref = sup.child("a")
        assert isinstance(ref, ActorRef)
        assert await ref.ask("hello") == ("a", "hello")
        # A start that fails after its caller gave up is undone all the same.
        with trio.move_on_after(0.5):
            await sup.start_child(slow(journal, "b", fail=True))
        await trio.sleep(1)
        assert sup.child("b") is None
        assert await (await sup.start_child(slow(journal, "b", 0))).ask("hello") == ("b", "hello")
        assert journal.names("started") == ["a", "b"]


async def test_commands_sent_during_a_start_wait_for_it(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor(name="sup") as sup:
        await sup.start_child(worker(journal, "a"))

        async def start_b() -> None:
            await sup.start_child(slow(journal, "b"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_b)
            await settle()  # b's on_start is under way
            await sup.terminate_child("a")
            assert trio.current_time() == 1
        assert journal.of("started", "stop") == [("started", "b", 1.0), ("stop", "a", 1.0)]
        assert [info.id for info in sup.which_children()] == ["b"]


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


class SeesContext(Actor):
    async def on_start(self) -> None:
        self.seen = request_id.get()

    async def receive(self, message: Any) -> Any:
        if message == "crash":
            raise Boom("crash")
        return self.seen


async def test_children_inherit_the_supervisors_context_not_the_callers(autojump_clock: trio.testing.MockClock) -> None:
    token = request_id.set("opener")
    try:
        async with open_supervisor() as sup:
            request_id.set("caller")
            ref = await sup.start_child(ChildSpec(id="a", factory=SeesContext))
            assert await ref.ask("seen") == "opener"
            with pytest.raises(ActorCrashed):
                await ref.ask("crash")
            assert await ref.ask("seen") == "opener"  # the restart too
    finally:
        request_id.reset(token)


async def test_a_burst_of_exits_removes_every_child(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    # More exits at once than the control loop handles between two
    # checkpoints (BATCH_LIMIT), all queued in the same scheduler batch.
    async with open_supervisor(name="rooms") as sup:
        refs = [await sup.start_child(worker(journal, f"t{i}", restart=Restart.TRANSIENT)) for i in range(300)]
        for ref in refs:
            ref.tell_nowait("stop")
        await settle()
        assert sup.count_children().specs == 0
        assert not any(ref.alive for ref in refs)
        assert len(journal.names("stopped")) == 300
        assert isinstance(await sup.start_child(worker(journal, "t0")), ActorRef)


async def test_a_removed_child_is_freed_without_the_garbage_collector(autojump_clock: trio.testing.MockClock, journal: Journal) -> None:
    async with open_supervisor() as sup:
        ref = await sup.start_child(worker(journal, "a", restart=Restart.TRANSIENT))
        assert await ref.ask("stop") == "stopping"
        await settle()
        assert sup.child("a") is None
        gone_ref, gone_cell = weakref.ref(ref), weakref.ref(ref._cell)
        gc.disable()
        try:
            # No reference cycle: reference counting alone frees the stopped
            # actor's ref, cell and mailbox (100,000 idle rooms need no full
            # collection to be given back).
            del ref
            assert (gone_ref(), gone_cell()) == (None, None)
        finally:
            gc.enable()


async def test_on_given_up_is_called_once_after_removal(autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    from contextlib import suppress

    from ensemble.actors import ActorCrashed

    class Flaky(Actor):
        async def receive(self, message: object) -> object:
            raise RuntimeError("always")

    seen: list[tuple[str, bool]] = []
    async with open_supervisor(name="s") as supervisor:

        def on_given_up(child_id: str) -> None:
            seen.append((child_id, supervisor.child(child_id) is None))
            raise ValueError("a buggy hook")  # logged, not fatal

        ref = await supervisor.start_child(ChildSpec(id="f", factory=Flaky, max_restarts=2, max_seconds=10.0, on_given_up=on_given_up))
        for _ in range(3):
            with suppress(ActorCrashed):
                await ref.ask("x")
            await trio.sleep(0.1)
            assert seen == [] or seen == [("f", True)]
        assert seen == [("f", True)]  # called once, after the child was removed
        assert "on_given_up hook of f raised" in caplog.text
        assert supervisor.statistics().children_given_up == 1
        # The supervisor carries on.
        other = await supervisor.start_child(ChildSpec(id="g", factory=Flaky))
        assert other.alive
