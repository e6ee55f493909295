"""Heartbeats: one sweeper task for every connection, not a task per connection.

A transport records when each connection last sent anything
(:meth:`Heartbeat.seen`, a dict store on the inbound path). One task,
:meth:`Heartbeat.run`, wakes every ``tick`` and walks the table:

- a connection silent for ``interval`` gets a ``{"type":"ping"}`` frame
  (queued through its outbox with ``send_frame_nowait``, at most one per
  ``interval``); any frame from the client counts as an answer (a ``pong``,
  or anything else);
- a connection silent for ``interval + timeout`` whose outbox made no
  write progress since the ping (beyond the ping itself: a peer busy
  reading a burst has its answer queued behind it, and is alive) is closed
  with :attr:`CloseCode.HEARTBEAT_TIMEOUT` (4009): the peer vanished (no FIN) or
  stopped answering, and its presence ends with the close;
- the connections that did not authenticate in time
  (``unauthenticated(now)``, the protocol handler's answer) are closed with
  :attr:`CloseCode.UNAUTHENTICATED` (4001);
- the connections whose token expired (``expiring(now)``, the handler's
  answer too) are closed with :attr:`CloseCode.TOKEN_EXPIRED` (4002).

A transport tracks a connection by its hub connection id (the one
``ProtocolHandler.open`` returned; an in-band ``auth`` keeps it).

Closing goes through ``ConnectionManager.disconnect`` (which drains the
connection's outbox first, for up to its ``close_timeout``), each in a task
of the sweeper's own nursery, so a slow close never delays the next sweep.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import attrs
import trio

from ..protocol import CloseCode
from ..realtime import OutboxStatistics

logger = logging.getLogger("ensemble.server.heartbeat")

PING_FRAME: Final = b'{"type":"ping"}'
"""The frame a silent connection is sent (the client answers with anything)."""


class _Connections(Protocol):
    """The part of :class:`ensemble.realtime.ConnectionManager` the sweeper uses."""

    def send_frame_nowait(self, connection_id: str, frame: bytes) -> bool: ...

    async def disconnect(self, connection_id: str, *, code: int = ..., reason: str = ...) -> bool: ...

    def outbox_statistics(self, connection_id: str) -> OutboxStatistics | None: ...


@attrs.frozen(kw_only=True)
class Sweep:
    """What one sweep decided (see :meth:`Heartbeat.sweep`).

    Attributes:
        ping: Connections to send a ping now.
        timed_out: Connections silent for ``interval + timeout``: closed
            with 4009.
        unauthenticated: Connections that did not authenticate in time:
            closed with 4001.
        expired: Connections whose token expired: closed with 4002.
    """

    ping: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()
    unauthenticated: tuple[str, ...] = ()
    expired: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class HeartbeatStatistics:
    """A snapshot of the sweeper's counters.

    Attributes:
        tracked: Connections tracked now.
        sweeps: Sweeps done.
        pings: Ping frames queued.
        timed_out: Connections closed for silence (4009).
        unauthenticated: Connections closed for not authenticating (4001).
        expired: Connections closed for an expired token (4002).
    """

    tracked: int
    sweeps: int
    pings: int
    timed_out: int
    unauthenticated: int
    expired: int


class Heartbeat:
    """Last-seen times of every connection, and the one task that acts on them.

    Args:
        connections: The hub's connection manager (``hub.connections``).
        interval: Seconds of client silence before a ping is sent.
        timeout: Further seconds without any frame before the connection is
            closed with 4009.
        unauthenticated: Called with the Unix time; returns the (hub)
            connections that did not authenticate in time (the protocol
            handler's ``unauthenticated``).
        expiring: Called with the Unix time; returns the (hub) connections
            whose token expired (the protocol handler's ``expiring``).
        tick: Seconds between sweeps (default: ``min(interval, timeout)``).
        clock: The monotonic clock of last-seen times (Trio's by default).
        wall_clock: The Unix time given to ``expiring``.

    Raises:
        ValueError: A non-positive interval, timeout or tick.
    """

    def __init__(
        self,
        connections: _Connections,
        *,
        interval: float,
        timeout: float,
        unauthenticated: Callable[[float], Iterable[str]] | None = None,
        expiring: Callable[[float], Iterable[str]] | None = None,
        tick: float | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError(f"interval and timeout must be > 0, got {interval!r} and {timeout!r}")
        self.tick = min(interval, timeout) if tick is None else tick
        if not self.tick > 0:
            raise ValueError(f"tick must be > 0, got {tick!r}")
        self.connections = connections
        self.interval = interval
        self.timeout = timeout
        self.unauthenticated = unauthenticated
        self.expiring = expiring
        self._clock = clock
        self._wall_clock = wall_clock
        self._last: dict[str, float] = {}
        self._pinged: dict[str, float] = {}
        self._progress: dict[str, int] = {}  # outbox events taken, at the last ping or check
        self._closing: set[str] = set()
        self._sweeps = 0
        self._pings = 0
        self._timed_out = 0
        self._unauthenticated = 0
        self._expired = 0

    def __repr__(self) -> str:
        return f"<Heartbeat {len(self._last)} connections, interval={self.interval} timeout={self.timeout}>"

    # -- bookkeeping (called by the transport) ----------------------------------

    def opened(self, connection_id: str) -> None:
        """Start tracking a connection (it counts as seen now)."""
        self._last[connection_id] = self._clock()

    def seen(self, connection_id: str) -> None:
        """Record an inbound frame of a connection (the hot path: one store)."""
        if connection_id in self._last:
            self._last[connection_id] = self._clock()

    def closed(self, connection_id: str) -> None:
        """Stop tracking a connection (idempotent)."""
        self._last.pop(connection_id, None)
        self._pinged.pop(connection_id, None)
        self._progress.pop(connection_id, None)

    def __contains__(self, connection_id: object) -> bool:
        return connection_id in self._last

    def __len__(self) -> int:
        return len(self._last)

    def statistics(self) -> HeartbeatStatistics:
        """A frozen snapshot of the sweeper's counters."""
        return HeartbeatStatistics(
            tracked=len(self._last),
            sweeps=self._sweeps,
            pings=self._pings,
            timed_out=self._timed_out,
            unauthenticated=self._unauthenticated,
            expired=self._expired,
        )

    # -- the sweeper ----------------------------------------------------------------

    def sweep(self, now: float | None = None, wall_now: float | None = None) -> Sweep:
        """Decide what the sweep at ``now`` does (:meth:`apply` does it).

        Every id in the result is a hub connection id. Connections
        already being closed are left out, and each connection appears in at
        most one list (a timed-out one is not pinged). The pings are noted as
        sent, and timed-out connections are no longer tracked.

        Args:
            now: The monotonic time (default: ``clock()``).
            wall_now: The Unix time for token expiry and the authentication
                timeout (default: ``wall_clock()``).
        """
        now = self._clock() if now is None else now
        closing = self._closing
        ping: list[str] = []
        timed_out: list[str] = []
        silent_after = now - self.interval
        dead_after = silent_after - self.timeout
        for connection_id, last in self._last.items():
            if last > silent_after:
                continue
            if connection_id in closing:
                continue
            if last <= dead_after:
                if self._writing(connection_id):
                    # Still taking our frames (the ping may be queued behind
                    # them): alive, only busy. Ping again later.
                    self._last[connection_id] = silent_after
                    continue
                timed_out.append(connection_id)
            elif self._pinged.get(connection_id, -math.inf) <= silent_after:
                self._pinged[connection_id] = now
                ping.append(connection_id)
                self._writing(connection_id)  # the baseline of write progress
        for connection_id in timed_out:
            self.closed(connection_id)
        decided = {*timed_out}
        unauthenticated: list[str] = []
        expired: list[str] = []
        if self.unauthenticated is not None or self.expiring is not None:
            wall_now = self._wall_clock() if wall_now is None else wall_now
            for source, found in ((self.unauthenticated, unauthenticated), (self.expiring, expired)):
                if source is None:
                    continue
                for connection_id in source(wall_now):
                    if connection_id not in closing and connection_id not in decided:
                        decided.add(connection_id)
                        found.append(connection_id)
        return Sweep(ping=tuple(ping), timed_out=tuple(timed_out), unauthenticated=tuple(unauthenticated), expired=tuple(expired))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``tick`` until cancelled (start it in a nursery)."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                await trio.sleep(self.tick)
                self.apply(self.sweep(), nursery)

    def _writing(self, connection_id: str) -> bool:
        """Whether the connection's outbox was drained further since the last check.

        A connection actor takes its next batch only after the previous one
        was written, so progress means the peer is reading (its TCP stack
        acknowledges), even if its answer to our ping is still queued behind
        a burst of events. A vanished peer makes no progress.
        """
        stats = self.connections.outbox_statistics(connection_id)
        if stats is None:
            return False
        before = self._progress.get(connection_id)
        self._progress[connection_id] = stats.delivered
        # More than the one frame of our own ping: a peer that only takes
        # pings from us (and never answers) is not shown alive by them.
        return before is not None and stats.delivered > before + 1

    def apply(self, sweep: Sweep, nursery: trio.Nursery) -> None:
        """Do what a sweep decided: queue the pings, start the closes in ``nursery``."""
        self._sweeps += 1
        for connection_id in sweep.ping:
            if self.connections.send_frame_nowait(connection_id, PING_FRAME):
                self._pings += 1
        for ids, code, reason in (
            (sweep.timed_out, CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout"),
            (sweep.unauthenticated, CloseCode.UNAUTHENTICATED, "authentication timed out"),
            (sweep.expired, CloseCode.TOKEN_EXPIRED, "token expired"),
        ):
            for connection_id in ids:
                self._closing.add(connection_id)
                nursery.start_soon(self._close, connection_id, code, reason)

    async def _close(self, connection_id: str, code: CloseCode, reason: str) -> None:
        if code is CloseCode.HEARTBEAT_TIMEOUT:
            self._timed_out += 1
        elif code is CloseCode.UNAUTHENTICATED:
            self._unauthenticated += 1
        else:
            self._expired += 1
        logger.info("closing connection %s with %d (%s)", connection_id, int(code), reason)
        try:
            await self.connections.disconnect(connection_id, code=int(code), reason=reason)
        except Exception:
            logger.exception("closing connection %s with %d failed", connection_id, int(code))
        finally:
            self._closing.discard(connection_id)
