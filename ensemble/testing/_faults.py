"""The fault injector: crash, delay, fill and stall actors from a test."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..actors import ActorRef, ActorStopped
from ..actors._actor import FILLER, _Cell


class InjectedCrash(Exception):
    """The default exception raised by an injected crash."""


def _any_message(message: Any) -> bool:
    return True


@attrs.define(eq=False)
class InjectedFault:
    """One installed fault. ``fired`` counts how often it took effect.

    Faults with a limited number of ``times`` remove themselves once spent;
    :meth:`remove` takes one away earlier.
    """

    cell: _Cell
    predicate: Callable[[Any], bool]
    action: Callable[[_Cell, Any], Any]
    times: int | None
    fired: int = 0

    def matches(self, message: Any) -> bool:
        return self.predicate(message)

    async def apply(self, cell: _Cell, message: Any) -> None:
        self.fired += 1
        if self.times is not None and self.fired >= self.times:
            self.remove()
        await self.action(cell, message)

    @property
    def active(self) -> bool:
        """Whether the fault is still installed."""
        return self.cell.faults is not None and self in self.cell.faults

    def remove(self) -> None:
        """Uninstall the fault (a no-op if it is already gone)."""
        faults = self.cell.faults
        if faults is not None and self in faults:
            faults.remove(self)
            if not faults:
                self.cell.faults = None


@attrs.define(eq=False)
class Stall:
    """A stalled actor: it handles nothing until :meth:`release`.

    Usable as a context manager that releases on exit.
    """

    cell: _Cell
    event: trio.Event

    def release(self) -> None:
        """Let the actor handle messages again."""
        if self.cell.stalled is self.event:
            self.cell.stalled = None
        self.event.set()
        self.cell.mailbox.wake()

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return self.event.is_set()

    def __enter__(self) -> Stall:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class FaultInjector:
    """Injects faults into running actors, addressed by their refs.

    Every fault is counted and can be removed; :meth:`clear` removes all of
    them and releases every stall (the pytest fixture does so at teardown).
    """

    def __init__(self) -> None:
        self._faults: list[InjectedFault] = []
        self._stalls: list[Stall] = []

    def _install(
        self, ref: ActorRef, predicate: Callable[[Any], bool], action: Callable[[_Cell, Any], Any], times: int | None
    ) -> InjectedFault:
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 or None, got {times}")
        cell = ref._cell
        fault = InjectedFault(cell, predicate, action, times)
        if cell.faults is None:
            cell.faults = []
        cell.faults.append(fault)
        self._faults.append(fault)
        return fault

    def crash_next(self, ref: ActorRef, *, exception: BaseException | type[BaseException] | None = None) -> InjectedFault:
        """Make the actor crash on the next message it handles.

        Args:
            ref: The actor.
            exception: What to raise (an instance or a class); defaults to
                :class:`InjectedCrash`. An exception the actor lists in its
                ``expected_exceptions`` is a rejection, not a crash.

        Returns:
            The installed fault.
        """
        return self.crash_when(ref, _any_message, exception=exception, times=1)

    def crash_when(
        self,
        ref: ActorRef,
        predicate: Callable[[Any], bool],
        *,
        exception: BaseException | type[BaseException] | None = None,
        times: int | None = 1,
    ) -> InjectedFault:
        """Make the actor crash on messages for which ``predicate`` is true.

        Args:
            ref: The actor.
            predicate: Chooses the messages (timer messages included).
            exception: What to raise; defaults to :class:`InjectedCrash`.
            times: How many crashes before the fault removes itself
                (``None``: every matching message).

        Returns:
            The installed fault.
        """

        async def crash(cell: _Cell, message: Any) -> None:
            if exception is None:
                raise InjectedCrash(f"injected crash in {cell.path} on {message!r}")
            raise exception

        return self._install(ref, predicate, crash, times)

    def delay(
        self,
        ref: ActorRef,
        seconds: float,
        *,
        predicate: Callable[[Any], bool] = _any_message,
        times: int | None = None,
    ) -> InjectedFault:
        """Make the actor wait ``seconds`` before handling matching messages.

        Args:
            ref: The actor.
            seconds: The delay (virtual seconds under a mock clock).
            predicate: Chooses the messages.
            times: How many delays before the fault removes itself.

        Returns:
            The installed fault.
        """
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")

        async def wait(cell: _Cell, message: Any) -> None:
            await trio.sleep(seconds)

        return self._install(ref, predicate, wait, times)

    def stall(self, ref: ActorRef) -> Stall:
        """Stop the actor from handling anything until released.

        Messages keep queueing (and overflow policies apply) meanwhile.

        Returns:
            The :class:`Stall`; call ``release()`` or use it as a context
            manager.
        """
        cell = ref._cell
        if cell.stalled is not None:
            raise RuntimeError(f"{cell.path} is stalled already")
        stall = Stall(cell, trio.Event())
        cell.stalled = stall.event
        self._stalls.append(stall)
        return stall

    def fill_mailbox(self, ref: ActorRef, message: Any = FILLER, *, leave: int = 0) -> int:
        """Fill the actor's mailbox up to its capacity, bypassing policies.

        Args:
            ref: The actor.
            message: What to fill with; by default an inert filler the actor
                never sees.
            leave: How many free places to leave (>= 0).

        Returns:
            How many messages were added.

        Raises:
            ValueError: ``leave`` is negative.
            ActorStopped: The actor has stopped for good.
        """
        if leave < 0:
            raise ValueError(f"leave must be >= 0, got {leave}")
        mailbox = ref._cell.mailbox
        if mailbox.closed:
            raise ActorStopped(ref.path, f"actor {ref.path} has stopped")
        added = 0
        mailbox.restore_queue()
        while len(mailbox) < mailbox.capacity - leave:
            mailbox._queue.append(message)
            added += 1
        mailbox.peak = max(mailbox.peak, len(mailbox))
        if added:
            mailbox.wake()
        return added

    def clear(self) -> None:
        """Remove every fault installed here and release every stall."""
        for fault in self._faults:
            fault.remove()
        for stall in self._stalls:
            stall.release()
        self._faults.clear()
        self._stalls.clear()
