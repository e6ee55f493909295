"""A connection's outbound queue: bounded, coalescing, never blocking.

An :class:`Outbox` sits between the fan-out path (rooms, mailboxes and live
queries calling :meth:`Outbox.deliver_nowait`) and the one task that writes
to the connection's transport (:meth:`Outbox.get_batch`). It is bounded in
events *and* in bytes (an event's size is ``len(event.encoded)``, the bytes
that will be written), so a slow client costs a bounded amount of memory.

* Events with a ``coalesce_key`` (typing, presence) replace a queued event
  with the same topic and key in place: it keeps the older one's position in
  the queue and the latest value is delivered.
* When an event without a ``coalesce_key`` does not fit, the outbox becomes
  *overflowed*: it refuses every event from then on and calls ``on_overflow``
  once with the resume positions (per topic, the ``(epoch, seq)`` of the last
  sequenced event it accepted). The owner is expected to close the connection
  (see :data:`ensemble.realtime._connections.SLOW_CONSUMER`).
* A coalescible event with a new key that does not fit is dropped (counted in
  ``dropped``) without overflowing: it is ephemeral by definition.

Everything except :meth:`Outbox.get_batch` is synchronous and runs in one Trio
thread, so no locks are needed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Final

import attrs
import trio

from ._events import Event, EventBatch

logger = logging.getLogger("ensemble.realtime")

DEFAULT_MAX_EVENTS: Final = 1000
DEFAULT_MAX_BYTES: Final = 1 << 20  # 1 MiB
_SMALL_BATCH: Final = 32  # events; see get_batch_nowait

Positions = dict[str, tuple[str, int]]
"""Per topic, the ``(epoch, seq)`` of an event (``""`` for a ``None`` epoch)."""


@attrs.frozen(kw_only=True)
class OutboxStatistics:
    """A snapshot of one outbox's counters (see :meth:`Outbox.statistics`).

    Attributes:
        depth: Events queued now.
        bytes: Encoded bytes queued now.
        peak: The most events ever queued at once.
        peak_bytes: The most bytes ever queued at once.
        max_events: The bound in events.
        max_bytes: The bound in bytes.
        accepted: Events accepted (including those that replaced another).
        coalesced: Queued events replaced in place by a newer one with the
            same ``coalesce_key``.
        dropped: Coalescible events with a new key dropped because the outbox
            was full.
        refused: Events refused because the outbox was overflowed or closed.
        delivered: Events taken out by the consumer.
        overflowed: Whether the outbox overflowed (it then refuses events).
        closed: Whether :meth:`Outbox.close` was called.
    """

    depth: int
    bytes: int
    peak: int
    peak_bytes: int
    max_events: int
    max_bytes: int
    accepted: int
    coalesced: int
    dropped: int
    refused: int
    delivered: int
    overflowed: bool
    closed: bool


class _Slot:
    """A queued coalescible event; replaced in place by a newer one."""

    __slots__ = ("event", "key", "size")

    def __init__(self, key: Hashable, event: Event, size: int) -> None:
        self.key = key
        self.event = event
        self.size = size


class Outbox:
    """A connection's bounded outbound queue (a :class:`Subscriber`).

    Args:
        max_events: The most events queued at once.
        max_bytes: The most encoded bytes queued at once. A single event
            larger than this is still accepted when the queue is empty (else
            it could never be delivered).
        on_overflow: Called once, synchronously from the delivering task,
            when the outbox overflows, with the resume positions. It must not
            block; exceptions from it are logged and ignored.
        on_ready: Called synchronously whenever the queue goes from empty to
            non-empty (the consumer's cue to drain it). Exceptions from it
            are logged and ignored.
        connection_id: The connection this outbox belongs to (for the
            :class:`Subscriber` protocol).
        user_id: The connection's user, or ``None``.

    Raises:
        ValueError: A bound is less than 1.
    """

    __slots__ = (
        "_accepted",
        "_bytes",
        "_closed",
        "_coalesced",
        "_delivered",
        "_dropped",
        "_last",
        "_overflowed",
        "_peak",
        "_peak_bytes",
        "_queue",
        "_refused",
        "_refusing",
        "_slots",
        "_waiter",
        "connection_id",
        "max_bytes",
        "max_events",
        "on_overflow",
        "on_ready",
        "user_id",
    )

    def __init__(
        self,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        on_overflow: Callable[[Positions], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        connection_id: str = "",
        user_id: str | None = None,
    ) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError(f"max_events and max_bytes must be at least 1, got {max_events} and {max_bytes}")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.on_overflow = on_overflow
        self.on_ready = on_ready
        self.connection_id = connection_id
        self.user_id = user_id
        # Plain events are queued bare; coalescible ones in a _Slot.
        self._queue: deque[Event | _Slot] = deque()
        self._slots: dict[Hashable, _Slot] = {}
        self._bytes = 0
        # Per topic, the last sequenced event accepted: positions are made
        # from it on demand, not per delivery.
        self._last: dict[str, Event] = {}
        self._waiter: trio.lowlevel.Task | None = None
        self._refusing = False  # overflowed or closed: the fast-path check
        self._overflowed = False
        self._closed = False
        self._peak = 0
        self._peak_bytes = 0
        self._accepted = 0
        self._coalesced = 0
        self._dropped = 0
        self._refused = 0
        self._delivered = 0

    def __len__(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return f"<Outbox {self.connection_id or '?'} depth={len(self._queue)} bytes={self._bytes}>"

    @property
    def overflowed(self) -> bool:
        """Whether the outbox overflowed (it refuses every event since)."""
        return self._overflowed

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def positions(self) -> Positions:
        """Per topic, the ``(epoch, seq)`` of the last sequenced event accepted."""
        return self._positions()

    # -- the fan-out side ------------------------------------------------------

    def deliver_nowait(self, event: Event) -> bool:
        """Queue ``event`` without blocking.

        Args:
            event: The event; its ``encoded`` bytes are computed here if they
                were not yet (once per event, shared by every recipient).

        Returns:
            Whether the event was accepted (``False``: refused because the
            outbox is closed or overflowed, or dropped because it is a
            coalescible event that did not fit).
        """
        if self._refusing:
            self._refused += 1
            return False
        size = len(event.encoded)
        queue = self._queue
        if event.coalesce_key is None:
            # The fan-out hot path: a plain event, inlined (no helper calls).
            depth = len(queue)
            total = self._bytes + size
            if depth >= self.max_events or (depth and total > self.max_bytes):
                self._overflow()
                return False
            queue.append(event)
            self._bytes = total
            self._accepted += 1
            if event.seq is not None:
                self._last[event.topic] = event
            depth += 1
            if depth > self._peak:
                self._peak = depth
            if total > self._peak_bytes:
                self._peak_bytes = total
            if depth == 1:
                self._ready()
            return True
        # Per topic: a connection in two rooms keeps both typing sets.
        key: Hashable = (event.topic, event.coalesce_key)
        slot = self._slots.get(key)
        if slot is not None:
            new_bytes = self._bytes - slot.size + size
            if new_bytes > self.max_bytes and len(queue) > 1:
                self._dropped += 1
                return False
            slot.event = event
            slot.size = size
            self._bytes = new_bytes
            self._coalesced += 1
            self._accept(event)
            return True
        if len(queue) >= self.max_events or (queue and self._bytes + size > self.max_bytes):
            self._dropped += 1
            return False
        slot = _Slot(key, event, size)
        self._slots[key] = slot
        queue.append(slot)
        self._bytes += size
        self._accept(event)
        depth = len(queue)
        if depth > self._peak:
            self._peak = depth
        if self._bytes > self._peak_bytes:
            self._peak_bytes = self._bytes
        if depth == 1:
            self._ready()
        return True

    def deliver_batch_nowait(self, batch: EventBatch) -> int:
        """Queue a batch of plain events (no coalescing key) without blocking.

        The same as :meth:`deliver_nowait` for each event in order, in one
        step when the whole batch fits (a room hands a burst to each of its
        subscribers this way: one call per subscriber, not one per event).

        Returns:
            How many of the events were accepted.
        """
        events = batch.events
        count = len(events)
        queue = self._queue
        depth = len(queue)
        total = self._bytes + batch.size
        if self._refusing or depth + count > self.max_events or total > self.max_bytes:
            deliver = self.deliver_nowait
            return sum([deliver(event) for event in events])
        queue.extend(events)
        self._bytes = total
        self._accepted += count
        if batch.tail:
            self._last.update(batch.tail)
        depth += count
        if depth > self._peak:
            self._peak = depth
        if total > self._peak_bytes:
            self._peak_bytes = total
        if depth == count:
            self._ready()
        return count

    def _accept(self, event: Event) -> None:
        self._accepted += 1
        if event.seq is not None:
            self._last[event.topic] = event

    def _positions(self) -> Positions:
        return {topic: (event.epoch or "", event.seq) for topic, event in self._last.items() if event.seq is not None}

    def _ready(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:
                logger.exception("on_ready of outbox %s raised", self.connection_id)

    def _overflow(self) -> None:
        self._refused += 1
        self._overflowed = True
        self._refusing = True
        logger.warning(
            "outbox of %s overflowed (%d events, %d bytes queued); refusing further events",
            self.connection_id or "?",
            len(self._queue),
            self._bytes,
        )
        if self.on_overflow is not None:
            try:
                self.on_overflow(self._positions())
            except Exception:
                logger.exception("on_overflow of outbox %s raised", self.connection_id)

    # -- the consumer side -----------------------------------------------------

    def get_batch_nowait(self, max_events: int | None = None) -> list[Event]:
        """Take the queued events, oldest first, without waiting.

        Args:
            max_events: The most events to take (``None``: all).

        Returns:
            The events taken (empty when none are queued, including after
            :meth:`close`).
        """
        queue = self._queue
        if not queue:
            return []
        depth = len(queue)
        count = depth if max_events is None or max_events >= depth else max_events
        if not self._slots:
            # Only plain events queued (the common case): no per-event checks.
            if count == depth:
                if depth <= _SMALL_BATCH:
                    # Taken one by one: deque.clear() would allocate a fresh
                    # block and keep the old one as a spare, 528 bytes more
                    # held by every connection that ever wrote.
                    popleft = queue.popleft
                    batch: list[Event] = [popleft() for _ in range(depth)]  # type: ignore[misc]
                else:
                    # A burst: start a fresh queue, so the blocks the old one
                    # grew (a deque keeps up to 16 spares) are given back.
                    batch = list(queue)  # type: ignore[arg-type]
                    self._queue = deque()
                self._bytes = 0
            else:
                popleft = queue.popleft
                batch = [popleft() for _ in range(count)]  # type: ignore[misc]
                self._bytes -= sum([len(event.encoded) for event in batch])
            self._delivered += count
            return batch
        batch = []
        append = batch.append
        popleft = queue.popleft
        taken_bytes = 0
        for _ in range(count):
            item = popleft()
            if type(item) is _Slot:
                del self._slots[item.key]
                taken_bytes += item.size
                append(item.event)
            else:
                assert isinstance(item, Event)
                taken_bytes += len(item.encoded)
                append(item)
        self._bytes -= taken_bytes
        self._delivered += count
        return batch

    async def get_batch(self, max_events: int | None = None) -> list[Event]:
        """Wait for at least one event, then take all queued (up to a bound).

        One wake-up per batch: events delivered while the consumer waits are
        taken together.

        Args:
            max_events: The most events to take (``None``: all).

        Returns:
            A non-empty list of events, oldest first. After :meth:`close`,
            the events still queued are returned first.

        Raises:
            trio.EndOfChannel: The outbox is closed and empty.
            trio.BusyResourceError: Another task is already waiting.
        """
        if max_events is not None and max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._queue:
            if self._closed:
                raise trio.EndOfChannel(f"outbox of {self.connection_id or '?'} is closed")
            if self._waiter is not None:
                raise trio.BusyResourceError("another task is already waiting on this outbox")
            self._waiter = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._waiter = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if not self._queue:
                raise trio.EndOfChannel(f"outbox of {self.connection_id or '?'} is closed")
            return self.get_batch_nowait(max_events)
        batch = self.get_batch_nowait(max_events)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    def close(self) -> None:
        """Refuse further events and wake a waiting consumer.

        Queued events stay: :meth:`get_batch_nowait` and :meth:`get_batch`
        still return them; once the queue is empty, :meth:`get_batch` raises
        :class:`trio.EndOfChannel` and :meth:`get_batch_nowait` returns ``[]``.
        Idempotent.
        """
        self._closed = True
        self._refusing = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            trio.lowlevel.reschedule(waiter)

    def statistics(self) -> OutboxStatistics:
        """A frozen snapshot of the counters."""
        return OutboxStatistics(
            depth=len(self._queue),
            bytes=self._bytes,
            peak=self._peak,
            peak_bytes=self._peak_bytes,
            max_events=self.max_events,
            max_bytes=self.max_bytes,
            accepted=self._accepted,
            coalesced=self._coalesced,
            dropped=self._dropped,
            refused=self._refused,
            delivered=self._delivered,
            overflowed=self._overflowed,
            closed=self._closed,
        )
