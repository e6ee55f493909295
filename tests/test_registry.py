"""The on-demand child registry: first-use races and idle-stop races."""

from __future__ import annotations

import trio
import trio.testing

from ensemble.actors import Actor, ChildSpec, open_supervisor
from ensemble.realtime._registry import OnDemand

starts: list[str] = []


class Idler(Actor):
    """Counts messages; stops itself when told to idle out."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.count = 0

    async def on_start(self) -> None:
        starts.append(self.id)

    async def receive(self, message: object) -> object:
        if message == "idle":
            self.stop()
            return "stopping"
        self.count += 1
        return self.count


def spec(id: str) -> ChildSpec:
    return ChildSpec(id=id, factory=lambda: Idler(id), restart="transient")


async def test_concurrent_first_use_starts_one_child(autojump_clock: trio.testing.MockClock) -> None:
    starts.clear()
    async with open_supervisor(name="rooms") as sup:
        registry = OnDemand(sup, spec)
        refs = []

        async def use() -> None:
            refs.append(await registry.get("general"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(use)
        assert starts == ["general"]
        assert len({id(ref) for ref in refs}) == 1
        assert registry.running() == ["general"]


async def test_concurrent_first_use_of_many_ids_starts_each_once(autojump_clock: trio.testing.MockClock) -> None:
    starts.clear()
    ids = [f"room{i}" for i in range(50)]
    async with open_supervisor(name="rooms") as sup:
        registry = OnDemand(sup, spec)
        refs: dict[str, set[int]] = {room: set() for room in ids}

        async def use(room: str) -> None:
            refs[room].add(id(await registry.get(room)))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                for room in ids:
                    nursery.start_soon(use, room)
        assert sorted(starts) == sorted(ids)
        assert all(len(seen) == 1 for seen in refs.values())
        assert sorted(registry.running()) == sorted(ids)


async def test_ask_after_the_child_stopped_itself_starts_a_new_one(autojump_clock: trio.testing.MockClock) -> None:
    starts.clear()
    async with open_supervisor(name="rooms") as sup:
        registry = OnDemand(sup, spec)
        assert await registry.ask("a", "x") == 1
        old = await registry.get("a")
        assert await registry.ask("a", "idle") == "stopping"
        # The transient child is removed once its supervisor sees it stop.
        await trio.testing.wait_all_tasks_blocked()
        assert registry.get_nowait("a") is None
        assert not old.alive
        assert await registry.ask("a", "x") == 1  # a fresh incarnation
        assert starts == ["a", "a"]


async def test_a_message_racing_with_the_idle_stop_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    starts.clear()
    async with open_supervisor(name="rooms") as sup:
        registry = OnDemand(sup, spec)
        ref = await registry.get("b")
        ref.tell_nowait("idle")
        ref.tell_nowait("lost with the old incarnation")  # queued behind the stop
        # This ask is queued to the stopping incarnation too; it fails with
        # ActorStopped when the old mailbox closes and is retried on a new one.
        assert await registry.ask("b", "x") == 1
        assert starts == ["b", "b"]
        assert ref.statistics().dropped_on_stop == 2
