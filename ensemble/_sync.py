"""Small synchronisation objects for things there is one of per connection.

Trio's :class:`trio.Event` and :class:`trio.StrictFIFOLock` each allocate
their waiting room (a set, a parking lot) up front. Most connections never
wait on theirs, and an idle connection should cost as little memory as it
can, so these make it on the first wait only. Same semantics otherwise.
"""

from __future__ import annotations

import trio


class LazyEvent:
    """A :class:`trio.Event` that makes its waiting room on the first wait."""

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event: trio.Event | None = None

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return self._flag

    def set(self) -> None:
        """Set it, waking every waiter."""
        self._flag = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Wait until it is set (a checkpoint either way, as trio's)."""
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        event = self._event
        if event is None:
            event = self._event = trio.Event()
        await event.wait()


class LazyFIFOLock:
    """A :class:`trio.StrictFIFOLock` that makes its parking lot on the first wait.

    Ownership passes to the longest waiter on release (first in, first out).
    """

    __slots__ = ("_lot", "_owner")

    def __init__(self) -> None:
        self._owner: trio.lowlevel.Task | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None

    def locked(self) -> bool:
        """Whether a task holds it."""
        return self._owner is not None

    def acquire_nowait(self) -> None:
        """Take it without waiting.

        Raises:
            trio.WouldBlock: It is held, or tasks wait for it.
            RuntimeError: The calling task holds it already.
        """
        task = trio.lowlevel.current_task()
        if self._owner is task:
            raise RuntimeError("attempt to re-acquire an already held lock")
        if self._owner is None and not self._lot:
            self._owner = task
            return
        raise trio.WouldBlock

    async def acquire(self) -> None:
        """Take it, waiting in line for it if need be."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.acquire_nowait()
        except trio.WouldBlock:
            lot = self._lot
            if lot is None:
                lot = self._lot = trio.lowlevel.ParkingLot()
            await lot.park()  # release() makes this task the owner
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def release(self) -> None:
        """Give it up (to the longest waiter, if any).

        Raises:
            RuntimeError: The calling task does not hold it.
        """
        if self._owner is not trio.lowlevel.current_task():
            raise RuntimeError("can't release a lock you don't own")
        lot = self._lot
        if lot:
            (self._owner,) = lot.unpark(count=1)
        else:
            self._owner = None

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
