"""In-process benchmark of a room's fan-out, to outboxes and end to end.

Run ``python benchmarks/bench_rooms.py`` (a few minutes) or with ``--quick``
(about twenty seconds); ``--json PATH`` also writes the results as JSON;
``--profile N`` prints a cProfile of one round at N subscribers instead.
Run it on an otherwise idle machine (it prints how busy the machine was just
before it started).

Scenarios:

* ``outbox``: one :class:`RoomActor` (in-memory store) with N members, each
  subscribed with its own :class:`Outbox`. One publisher (a member without a
  connection) sends K messages; the benchmark drains every outbox with
  ``get_batch_nowait`` at the end of the round (a consumer as cheap as can
  be). This is the room's fan-out: validation, store write, one ``Event``
  serialised once, N ``deliver_nowait`` hand-offs.
* ``hub``: the same room in a hub (:func:`open_hub`), with N connections over
  :class:`MemoryTransport`: each connection actor drains its outbox and
  awaits ``transport.send`` per event (the default) or per batch
  (``batch_frames``). The round ends when every task is idle again.

Messages are sent four ways: ``ask`` (``await room.send_message(...)`` one
after another: the caller waits for each reply), ``tell`` (``await
ref.tell(SendMessage(...))`` for all K, then one ``room.statistics()`` ask as
a barrier: the room's mailbox is FIFO; ``await tell`` is a schedule point, so
the room and the connections run between two messages), ``burst``
(``tell_nowait`` 500 messages at a time, then the barrier: the room handles
up to 128 queued messages per wake-up, so consumers get batches) and
``tasks`` (8 concurrent tasks doing sequential ``send_message`` asks).

Every round is verified: every subscriber got every message exactly once and
in order (contiguous ``seq``), no outbox overflowed, refused or dropped
anything, and the room counted exactly N x K deliveries. A round that loses a
message fails the run.

Each scenario is set up once, warmed up with one untimed round, then timed
over several rounds; the tables show medians. Times are wall
(``time.perf_counter``) and process CPU (``time.process_time``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio
import trio.testing
from _common import (
    Medians,
    Verdict,
    add_run_arguments,
    chosen_sizes,
    format_verdicts,
    machine_info,
    markdown_table,
    print_header,
    run_payload,
    write_json,
)

from ensemble.actors import open_supervisor
from ensemble.realtime import HubConfig, MemoryTransport, Outbox, RoomConfig, open_hub
from ensemble.realtime._events import MESSAGE, Event
from ensemble.realtime._room import Room, RoomActor, SendMessage
from ensemble.realtime._room_store import InMemoryRoomStore

# -- targets (from the issue) --------------------------------------------------------

TARGET_RATE = 500_000  # deliveries/s for a room of 1000 members on one core
TARGET_N = 1000
SENDER_TASKS = 8  # the "tasks" send mode
BURST = 500  # the "burst" send mode: tell_nowait this many, then wait for the room
SETUP_DRAIN = 64  # drain outboxes every this many subscriptions during set-up

# -- sizes ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Sizes:
    """How big each scenario is: (N subscribers, K messages per round) pairs."""

    outbox: tuple[tuple[int, int], ...]  # scaling, tell
    ask: tuple[tuple[int, int], ...]  # scaling, ask
    modes_n: int  # N for the comparison of send modes (all three)
    modes_k: int
    hub: tuple[tuple[int, int], ...]
    repeats: int  # timed rounds (the median is reported)


FULL = Sizes(
    outbox=((1, 10_000), (100, 10_000), (1000, 1000), (10_000, 100)),
    ask=((1, 10_000), (100, 10_000), (1000, 1000)),
    modes_n=1000,
    modes_k=1000,
    hub=((100, 1000), (1000, 1000)),
    repeats=5,
)
QUICK = Sizes(
    outbox=((1, 1000), (100, 1000), (1000, 200)), ask=((1, 1000), (1000, 200)), modes_n=1000, modes_k=200, hub=((1000, 200),), repeats=1
)

MODES = ("ask", "tell", "burst", "tasks")

# -- measuring ----------------------------------------------------------------------


@attrs.frozen
class Sample:
    wall: float  # seconds, the whole round
    cpu: float
    room_wall: float  # seconds until the room had handled every message
    room_cpu: float


@attrs.frozen(kw_only=True)
class Result(Medians):
    """The timed rounds of one scenario at one size."""

    scenario: str
    label: str
    mode: str
    n: int  # subscribers
    k: int  # messages per round
    samples: tuple[Sample, ...]

    @property
    def deliveries(self) -> int:
        return self.n * self.k

    @property
    def room_wall(self) -> float:
        return statistics.median(s.room_wall for s in self.samples)

    @property
    def rate(self) -> float:
        """Deliveries per second (wall, whole round)."""
        return self.deliveries / self.wall

    @property
    def us_delivery_cpu(self) -> float:
        return self.cpu / self.deliveries * 1e6

    @property
    def us_message_room(self) -> float:
        """Wall µs per message until the room had handed it to every subscriber."""
        return self.room_wall / self.k * 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "label": self.label,
            "mode": self.mode,
            "n": self.n,
            "messages_per_round": self.k,
            "deliveries_per_round": self.deliveries,
            "median_wall_s": self.wall,
            "median_cpu_s": self.cpu,
            "median_room_wall_s": self.room_wall,
            "deliveries_per_s_wall": self.rate,
            "us_per_delivery_cpu": self.us_delivery_cpu,
            "us_per_message_room": self.us_message_room,
            "spread": self.spread,
            "samples": [attrs.asdict(s) for s in self.samples],
        }


Mark = tuple[float, float]  # (perf_counter, process_time)
Round = Callable[[], Awaitable[tuple[Mark, Mark]]]
"""One round; returns the marks when the room had handled every message and
when the consumers had everything (checking comes after, untimed)."""


def _mark() -> Mark:
    return time.perf_counter(), time.process_time()


async def _timed_rounds(round_: Round, repeats: int, warmup: bool = True) -> tuple[Sample, ...]:
    """Run ``round_`` once untimed (warm-up), then ``repeats`` times timed."""
    if warmup:
        await round_()
    samples = []
    for _ in range(repeats):
        gc.collect()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        (room_wall, room_cpu), (end_wall, end_cpu) = await round_()
        samples.append(Sample(end_wall - wall0, end_cpu - cpu0, room_wall - wall0, room_cpu - cpu0))
    return tuple(samples)


def _room_config(n: int) -> RoomConfig:
    # No rate limit (one publisher sends everything), room for everyone.
    return RoomConfig(max_members=n + 1, rate_limit=0)


async def _noop_notify(user_id: str, event: Event) -> None:
    return None


async def _send(room: Room, mode: str, k: int, content: str) -> None:
    """Send k messages from ``publisher``; returns once the room handled them all."""
    if mode == "ask":
        send = room.send_message
        for _ in range(k):
            await send("publisher", content)
    elif mode == "tell":
        tell = room.ref.tell
        message = SendMessage("publisher", content)
        for _ in range(k):
            await tell(message)
        await room.statistics()  # FIFO: every message before it is handled
    elif mode == "burst":
        tell_nowait = room.ref.tell_nowait
        message = SendMessage("publisher", content)
        for start in range(0, k, BURST):
            for _ in range(min(BURST, k - start)):
                tell_nowait(message)
            await room.statistics()  # FIFO barrier; keeps the mailbox from filling up
    elif mode == "tasks":

        async def sender(count: int) -> None:
            send = room.send_message
            for _ in range(count):
                await send("publisher", content)

        async with trio.open_nursery() as nursery:
            for i in range(SENDER_TASKS):
                nursery.start_soon(sender, k // SENDER_TASKS + (1 if i < k % SENDER_TASKS else 0))
    else:
        raise ValueError(f"unknown send mode {mode!r}")


def _check_seqs(seqs: list[int | None], first: int, k: int, who: str) -> None:
    if seqs != list(range(first, first + k)):
        raise AssertionError(f"{who} got seqs {seqs[:5]}...{seqs[-5:]} ({len(seqs)}), expected {first}..{first + k - 1}")


# -- room -> outboxes -----------------------------------------------------------------


@asynccontextmanager
async def _outbox_room(n: int, k: int, mode: str, content: str) -> AsyncIterator[Round]:
    """A room with n members, each subscribed with its own outbox."""
    store = InMemoryRoomStore()
    async with open_supervisor(name="bench", max_restarts=0) as sup:
        ref = await sup.start_child(RoomActor.spec("bench", _room_config(n), store, _noop_notify))
        room = Room("bench", ref, timeout=None)
        await room.join("publisher", "publisher")
        # Members first (nobody is subscribed yet, so joins deliver nothing),
        # then their outboxes; each subscription sends everyone a presence
        # event, so outboxes are drained as we go (set-up is O(N^2) anyway).
        for i in range(n):
            await room.join(f"u{i}", f"user {i}")
        outboxes = [Outbox(max_events=k + SETUP_DRAIN + 16, max_bytes=1 << 30, connection_id=f"c{i}", user_id=f"u{i}") for i in range(n)]
        for i, outbox in enumerate(outboxes):
            await room.subscribe(outbox)
            if i % SETUP_DRAIN == SETUP_DRAIN - 1:
                for drained in outboxes[:i]:
                    drained.get_batch_nowait()
        for outbox in outboxes:
            outbox.get_batch_nowait()
        before = await room.statistics()
        deliveries = before.deliveries

        last_seq = before.last_seq

        async def one_round() -> tuple[Mark, Mark]:
            nonlocal deliveries, last_seq
            first = last_seq + 1
            await _send(room, mode, k, content)
            room_done = _mark()
            batches = [outbox.get_batch_nowait() for outbox in outboxes]
            end = _mark()
            reference = batches[0]
            _check_seqs([e.seq for e in reference], first, k, "subscriber 0")
            assert all(e.type == MESSAGE for e in reference)
            for i, batch in enumerate(batches):
                if batch != reference:  # identity first: the same Event objects
                    raise AssertionError(f"subscriber {i} got {len(batch)} events, not the {k} the others got")
            stats = await room.statistics()
            assert stats.deliveries - deliveries == n * k, stats
            assert stats.refused_deliveries == 0, stats
            deliveries, last_seq = stats.deliveries, stats.last_seq
            return room_done, end

        yield one_round
        for outbox in outboxes:
            s = outbox.statistics()
            assert (s.overflowed, s.refused, s.dropped, s.depth) == (False, 0, 0, 0), s


async def room_outbox(n: int, k: int, repeats: int, *, mode: str = "tell", warmup: bool = True, content: str = "hello, room") -> Result:
    async with _outbox_room(n, k, mode, content) as one_round:
        samples = await _timed_rounds(one_round, repeats, warmup)
    return Result(scenario="outbox", label=f"room -> outboxes ({mode})", mode=mode, n=n, k=k, samples=samples)


# -- end to end through the hub -------------------------------------------------------


@asynccontextmanager
async def _hub_room(n: int, k: int, mode: str, content: str, batch_frames: bool) -> AsyncIterator[Round]:
    config = HubConfig(
        room=_room_config(n),
        max_connections=n + 16,
        outbox_max_events=k + 2 * n + 16,  # the joins of everyone else queue up too
        outbox_max_bytes=1 << 30,
    )
    async with open_hub(config) as hub:
        hub.connections.batch_frames = batch_frames
        room = await hub.room("bench")
        room = Room("bench", room.ref, timeout=None)
        await room.join("publisher", "publisher")
        transports = [MemoryTransport() for _ in range(n)]
        connection_ids = []
        for i, transport in enumerate(transports):
            info = await hub.connect(transport, f"u{i}")
            connection_ids.append(info.connection_id)
        # Everyone joins at once (like clients connecting together): the room
        # handles the joins in batches, so connections wake once per batch
        # for the presence and join events, not once per join.
        async with trio.open_nursery() as nursery:
            for connection_id in connection_ids:
                nursery.start_soon(partial(hub.join_room, connection_id, "bench"))
        await trio.testing.wait_all_tasks_blocked()
        for transport in transports:
            transport.sent.clear()  # joins and presence

        last_seq = (await room.statistics()).last_seq

        async def one_round() -> tuple[Mark, Mark]:
            nonlocal last_seq
            first = last_seq + 1
            await _send(room, mode, k, content)
            room_done = _mark()
            await trio.testing.wait_all_tasks_blocked()
            end = _mark()
            sent = [transport.sent for transport in transports]
            reference = sent[0]
            if batch_frames or len(reference) != k:
                for i, transport in enumerate(transports):
                    _check_seqs([e.get("seq") for e in transport.events], first, k, f"connection {i}")
            else:
                _check_seqs([json.loads(frame)["seq"] for frame in reference], first, k, "connection 0")
                for i, frames in enumerate(sent):
                    if frames != reference:  # the same shared bytes objects
                        _check_seqs([json.loads(frame)["seq"] for frame in frames], first, k, f"connection {i}")
            for transport in transports:
                assert not transport.closed
                transport.sent.clear()
            last_seq = first + k - 1
            return room_done, end

        yield one_round
        stats = hub.connections.statistics()
        assert (stats.slow_consumers, stats.transport_errors, stats.crashes) == (0, 0, 0), stats
        for cid in connection_ids:
            s = hub.connections.outbox_statistics(cid)
            assert s is not None, cid
            assert (s.overflowed, s.refused, s.dropped) == (False, 0, 0), s


async def hub_end_to_end(
    n: int, k: int, repeats: int, *, mode: str = "tell", batch_frames: bool = False, warmup: bool = True, content: str = "hello, room"
) -> Result:
    async with _hub_room(n, k, mode, content, batch_frames) as one_round:
        samples = await _timed_rounds(one_round, repeats, warmup)
    how = "batch frames" if batch_frames else "frame per event"
    return Result(
        scenario="hub_batch" if batch_frames else "hub", label=f"hub, MemoryTransport ({how}, {mode})", mode=mode, n=n, k=k, samples=samples
    )


# -- running everything -------------------------------------------------------------------

SCENARIOS = ("outbox", "modes", "hub")


def run_all(sizes: Sizes, only: Sequence[str] = SCENARIOS, log: Callable[[str], None] = print) -> list[Result]:
    """Run the selected scenarios, each in its own ``trio.run``."""
    results: list[Result] = []

    def run(fn: Callable[..., Awaitable[Result]], *args: Any, **kwargs: Any) -> None:
        result = trio.run(lambda: fn(*args, **kwargs))
        log(f"  {result.label:<48} N={result.n:<6} {result.rate:>12,.0f} deliveries/s  {result.us_message_room:8.1f} µs/message (room)")
        results.append(result)

    if "outbox" in only:
        for n, k in sizes.outbox:
            run(room_outbox, n, k, sizes.repeats, mode="tell")
        for n, k in sizes.ask:
            run(room_outbox, n, k, sizes.repeats, mode="ask")
    if "modes" in only:
        for mode in ("burst", "tasks"):
            run(room_outbox, sizes.modes_n, sizes.modes_k, sizes.repeats, mode=mode)
    if "hub" in only:
        for n, k in sizes.hub:
            for mode in ("tell", "burst"):
                for batch_frames in (False, True):
                    run(hub_end_to_end, n, k, sizes.repeats, mode=mode, batch_frames=batch_frames)
    return results


@attrs.frozen
class Cost:
    """The room's wall µs per message at each N, split into a fixed part (the
    cost at the smallest N, normally 1 subscriber) and the marginal cost per
    extra recipient (the hand-off) at each larger N."""

    mode: str
    fixed_us: float
    fixed_n: int
    points: tuple[tuple[int, float, float], ...]  # (N, µs per message, marginal µs per recipient)


def room_costs(results: Sequence[Result], mode: str) -> Cost | None:
    points = sorted((r.n, r.us_message_room) for r in results if r.scenario == "outbox" and r.mode == mode)
    if len(points) < 2:
        return None
    n0, us0 = points[0]
    return Cost(mode=mode, fixed_us=us0, fixed_n=n0, points=tuple((n, us, (us - us0) / (n - n0)) for n, us in points[1:]))


def check_targets(results: Sequence[Result]) -> list[Verdict]:
    verdicts = []
    for r in results:
        if r.n != TARGET_N:
            continue
        verdicts.append(
            Verdict(
                target=f"{r.label}, N={r.n}: >= {TARGET_RATE:,} deliveries/s",
                measured=f"{r.rate:,.0f} deliveries/s ({r.us_delivery_cpu:.3f} µs CPU/delivery)",
                ratio=r.rate / TARGET_RATE,
                passed=r.rate >= TARGET_RATE,
            )
        )
    return verdicts


def format_table(results: Sequence[Result]) -> str:
    header = ("scenario", "N", "messages", "deliveries/s (wall)", "µs CPU/delivery", "room µs/message", "spread")
    rows = [
        (
            r.label,
            f"{r.n:,}",
            f"{r.k:,}",
            f"{r.rate:,.0f}",
            f"{r.us_delivery_cpu:.3f}",
            f"{r.us_message_room:.1f}",
            f"{r.spread:.0%}",
        )
        for r in results
    ]
    return markdown_table(header, rows, right=range(1, 7))


def format_costs(costs: Sequence[Cost]) -> str:
    header = ("send mode", "µs/message at N=1", "N", "µs/message", "marginal µs per recipient")
    rows = [
        (c.mode, f"{c.fixed_us:.1f}" if i == 0 else "", f"{n:,}", f"{us:,.1f}", f"{per:.3f}")
        for c in costs
        for i, (n, us, per) in enumerate(c.points)
    ]
    return markdown_table(header, rows, right=(1, 2, 3, 4))


def profile(n: int, k: int, mode: str, scenario: str, top: int = 25) -> None:
    """Print a cProfile of one round (after a warm-up round)."""

    async def main() -> None:
        context = _outbox_room(n, k, mode, "hello, room") if scenario == "outbox" else _hub_room(n, k, mode, "hello, room", False)
        async with context as one_round:
            await one_round()
            profiler = cProfile.Profile()
            profiler.enable()
            await one_round()
            profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)

    trio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, SCENARIOS)
    parser.add_argument("--profile", type=int, metavar="N", help="print a cProfile of one round with N subscribers and exit")
    parser.add_argument("--profile-mode", choices=MODES, default="tell")
    parser.add_argument("--profile-k", type=int, default=1000, help="messages in the profiled round")
    parser.add_argument("--profile-scenario", choices=("outbox", "hub"), default="outbox")
    parser.add_argument(
        "--report", metavar="PATH", help="re-print the tables of a JSON file written by --json (and refresh its derived parts)"
    )
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            report(json.load(f), args.report)
        return 0
    if args.profile:
        profile(args.profile, args.profile_k, args.profile_mode, args.profile_scenario)
        return 0
    sizes = chosen_sizes(args, FULL, QUICK)
    only = tuple(args.only or SCENARIOS)

    info = machine_info()
    print_header("room", args.quick, sizes.repeats, info)
    results = run_all(sizes, only)
    report(run_payload(info, sizes, results), args.json)
    return 0


def report(payload: dict[str, Any], path: str | None) -> None:
    """Print the tables of a run (derived from its samples) and write its JSON."""
    results = [
        Result(
            scenario=r["scenario"],
            label=r["label"],
            mode=r["mode"],
            n=r["n"],
            k=r["messages_per_round"],
            samples=tuple(Sample(**s) for s in r["samples"]),
        )
        for r in payload["results"]
    ]
    costs = [cost for cost in (room_costs(results, mode) for mode in ("tell", "ask")) if cost is not None]
    verdicts = check_targets(results)
    print()
    print(format_table(results))
    if costs:
        print()
        print(format_costs(costs))
    if verdicts:
        print()
        print(format_verdicts(verdicts))
    if path:
        payload = {**payload, "room_costs": [attrs.asdict(c) for c in costs], "targets": [attrs.asdict(v) for v in verdicts]}
        payload.pop("cost_fits", None)
        write_json(path, payload)


if __name__ == "__main__":
    sys.exit(main())
