"""The lazy synchronisation objects of ``ensemble._sync`` behave as trio's."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ensemble._sync import LazyEvent, LazyFIFOLock


async def test_lazy_event_wakes_every_waiter_and_stays_set(autojump_clock: trio.testing.MockClock) -> None:
    event = LazyEvent()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await event.wait()
        woken.append(n)

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(waiter, n)
        await trio.testing.wait_all_tasks_blocked()
        assert not event.is_set()
        assert woken == []
        event.set()
    assert sorted(woken) == [0, 1, 2]
    assert event.is_set()
    with trio.testing.assert_checkpoints():
        await event.wait()  # set already: returns at once, still a checkpoint


async def test_lazy_event_wait_can_be_cancelled(autojump_clock: trio.testing.MockClock) -> None:
    event = LazyEvent()
    with trio.move_on_after(1) as scope:
        await event.wait()
    assert scope.cancelled_caught
    event.set()
    await event.wait()


async def test_lazy_lock_is_first_in_first_out(autojump_clock: trio.testing.MockClock) -> None:
    lock = LazyFIFOLock()
    order: list[int] = []

    async def worker(n: int) -> None:
        async with lock:
            order.append(n)
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(worker, n)
            await trio.testing.wait_all_tasks_blocked()  # each queues behind the last
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()


async def test_lazy_lock_acquire_nowait_and_misuse(autojump_clock: trio.testing.MockClock) -> None:
    lock = LazyFIFOLock()
    lock.acquire_nowait()
    assert lock.locked()
    with pytest.raises(RuntimeError, match="re-acquire"):
        lock.acquire_nowait()

    async def other() -> None:
        with pytest.raises(trio.WouldBlock):
            lock.acquire_nowait()
        with pytest.raises(RuntimeError, match="don't own"):
            lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
    lock.release()
    assert not lock.locked()


async def test_a_cancelled_waiter_does_not_get_the_lock(autojump_clock: trio.testing.MockClock) -> None:
    lock = LazyFIFOLock()
    got: list[str] = []

    async def wait_for_it(name: str, patience: float) -> None:
        with trio.move_on_after(patience):
            async with lock:
                got.append(name)

    await lock.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_it, "impatient", 1)
        nursery.start_soon(wait_for_it, "patient", 100)
        await trio.sleep(5)  # the impatient one gave up
        lock.release()
    assert got == ["patient"]
    assert not lock.locked()
