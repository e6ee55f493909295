"""In-process benchmark of the actor runtime, with raw Trio baselines.

Run ``python benchmarks/bench_actors.py`` (about three minutes) or with
``--quick`` (about fifteen seconds); ``--json PATH`` also writes the results as
JSON. Run it on an otherwise idle machine (it prints how busy the machine was
just before it started).

Scenarios:

* ``fanout``: one publisher actor handles a single "publish K messages"
  command by calling ``tell_nowait`` on each of N receivers' refs per message.
  Receivers count and signal when they have everything; their mailboxes are
  sized so that nothing is dropped, and the statistics are checked to prove it.
* ``fanout_raw``: the same shape with bare Trio: ``send_nowait`` into N memory
  channels, each consumer task draining with ``receive_nowait`` after one
  wake-up (the "raw batched figure" the runtime is measured against).
* ``pingpong``: two actors bounce a counter with ``tell_nowait`` (and with
  ``await tell``); ``ask``: a plain task awaits ``ref.ask()`` on an echo actor.
* ``pingpong_raw`` and ``channel_raw``: the same over bare memory channels;
  ``checkpoint_raw``: the cost of one pass through Trio's scheduler.

Each scenario is set up once, warmed up with one untimed round, then timed
over several rounds; the tables show medians. Times are wall
(``time.perf_counter``) and process CPU (``time.process_time``). The actor and
raw fan-outs for one N are set up side by side and their timed rounds
alternate, and the 2x target is checked on the median of the per-round ratios:
on a virtual machine that ratio is much steadier than either figure alone.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
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

from ensemble.actors import Actor, ActorRef, ChildSpec, MailboxConfig, open_supervisor

# -- targets (from the issue) --------------------------------------------------------

TARGET_RATIO_TO_RAW = 2.0  # runtime fan-out within 2x of the raw batched figure
TARGET_FANOUT_RATE = 500_000  # deliveries/s for N = 1000 receivers on one core
TARGET_FANOUT_N = 1000

# -- sizes ----------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Sizes:
    """How big each scenario is; ``fanout`` maps N to K (messages per round)."""

    fanout: tuple[tuple[int, int], ...]
    pingpong: int  # round trips per round
    ask: int  # asks per round
    channel: int  # messages per round
    repeats: int  # timed rounds (the median is reported)


FULL = Sizes(fanout=((100, 15_000), (1000, 1500), (10_000, 150)), pingpong=100_000, ask=50_000, channel=200_000, repeats=5)
QUICK = Sizes(fanout=((100, 2000), (1000, 200), (10_000, 20)), pingpong=10_000, ask=5000, channel=20_000, repeats=1)


# -- measuring ----------------------------------------------------------------------


@attrs.frozen
class Sample:
    wall: float  # seconds
    cpu: float  # seconds


@attrs.frozen(kw_only=True)
class Result(Medians):
    """The timed rounds of one scenario at one size."""

    scenario: str
    label: str
    n: int | None  # receivers (fan-out only)
    ops: int  # deliveries / round trips / messages per round
    unit: str
    samples: tuple[Sample, ...]

    @property
    def us_wall(self) -> float:
        return self.wall / self.ops * 1e6

    @property
    def us_cpu(self) -> float:
        return self.cpu / self.ops * 1e6

    @property
    def rate(self) -> float:
        return self.ops / self.wall

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "label": self.label,
            "n": self.n,
            "ops_per_round": self.ops,
            "unit": self.unit,
            "median_wall_s": self.wall,
            "median_cpu_s": self.cpu,
            "us_per_op_wall": self.us_wall,
            "us_per_op_cpu": self.us_cpu,
            "ops_per_s_wall": self.rate,
            "spread": self.spread,
            "samples": [attrs.asdict(s) for s in self.samples],
        }


Round = Callable[[], Awaitable[None]]


async def _timed_rounds(round_: Round, repeats: int, warmup: bool = True) -> tuple[Sample, ...]:
    """Run ``round_`` once untimed (warm-up), then ``repeats`` times timed."""
    (samples,) = await _interleaved_rounds((round_,), repeats, warmup)
    return samples


async def _interleaved_rounds(rounds: Sequence[Round], repeats: int, warmup: bool = True) -> list[tuple[Sample, ...]]:
    """Like :func:`_timed_rounds` for several rounds, alternating between them.

    Alternating puts each pair of figures under the same machine conditions,
    so their ratio is steadier than either figure on a noisy (virtual) machine.
    """
    if warmup:
        for round_ in rounds:
            await round_()
    samples: list[list[Sample]] = [[] for _ in rounds]
    for _ in range(repeats):
        for round_, into in zip(rounds, samples, strict=True):
            gc.collect()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            await round_()
            into.append(Sample(time.perf_counter() - wall0, time.process_time() - cpu0))
    return [tuple(s) for s in samples]


class Countdown:
    """Sets ``done`` once ``arrive`` has been called ``count`` times."""

    __slots__ = ("done", "remaining")

    def __init__(self, count: int) -> None:
        self.remaining = count
        self.done = trio.Event()

    def arrive(self) -> None:
        self.remaining -= 1
        if not self.remaining:
            self.done.set()


# -- fan-out through the actor runtime ------------------------------------------------


class FanoutRound:
    """Shared by the receivers: how many messages each expects in total so far."""

    def __init__(self) -> None:
        self.expected = 0
        self.countdown = Countdown(0)


@attrs.frozen
class SetTargets:
    refs: tuple[ActorRef, ...]


@attrs.frozen
class Publish:
    count: int


class Publisher(Actor):
    """Handles ``Publish(k)`` by telling every target each of k messages."""

    def __init__(self) -> None:
        self.targets: tuple[ActorRef, ...] = ()

    async def receive(self, message: Any) -> Any:
        if type(message) is Publish:
            targets = self.targets
            for i in range(message.count):
                for ref in targets:
                    ref.tell_nowait(i)
        elif type(message) is SetTargets:
            self.targets = message.refs


class Receiver(Actor):
    """Counts messages; arrives at the round's countdown when it has them all."""

    def __init__(self, round_: FanoutRound) -> None:
        self.round = round_
        self.count = 0

    async def receive(self, message: Any) -> None:
        self.count += 1
        if self.count == self.round.expected:
            self.round.countdown.arrive()


@asynccontextmanager
async def _actor_fanout(n: int, k: int) -> AsyncIterator[Round]:
    """N receivers, one publisher; each round publishes k messages to all.

    Checks on exit that every delivery arrived and nothing was dropped.
    """
    shared = FanoutRound()
    receivers: list[Receiver] = []

    def make_receiver() -> Receiver:
        actor = Receiver(shared)
        receivers.append(actor)
        return actor

    # Room for a whole round: the publisher never yields while it publishes.
    mailbox = MailboxConfig(size=k + 16)
    rounds = 0
    async with open_supervisor(name="bench", max_restarts=0) as sup:
        refs = tuple([await sup.start_child(ChildSpec(id=f"r{i}", factory=make_receiver, mailbox=mailbox)) for i in range(n)])
        publisher = await sup.start_child(ChildSpec(id="publisher", factory=Publisher))
        await publisher.ask(SetTargets(refs))

        async def one_round() -> None:
            nonlocal rounds
            rounds += 1
            shared.expected += k
            shared.countdown = countdown = Countdown(n)
            publisher.tell_nowait(Publish(k))
            await countdown.done.wait()

        yield one_round
        await trio.testing.wait_all_tasks_blocked()
        _check_fanout(refs, receivers, publisher, per_receiver=rounds * k, publishes=rounds + 1)


def _fanout_result(n: int, k: int, samples: tuple[Sample, ...]) -> Result:
    return Result(scenario="fanout", label="actors: tell_nowait fan-out", n=n, ops=n * k, unit="delivery", samples=samples)


def _fanout_raw_result(n: int, k: int, samples: tuple[Sample, ...]) -> Result:
    return Result(scenario="fanout_raw", label="raw trio: send_nowait + batched drain", n=n, ops=n * k, unit="delivery", samples=samples)


async def fanout_actors(n: int, k: int, repeats: int, warmup: bool = True) -> Result:
    """The runtime's fan-out: N receiving actors, k messages per round."""
    async with _actor_fanout(n, k) as one_round:
        samples = await _timed_rounds(one_round, repeats, warmup)
    return _fanout_result(n, k, samples)


async def fanout_raw(n: int, k: int, repeats: int, warmup: bool = True) -> Result:
    """The raw batched figure: N memory channels, k messages per round."""
    async with _raw_fanout(n, k) as one_round:
        samples = await _timed_rounds(one_round, repeats, warmup)
    return _fanout_raw_result(n, k, samples)


async def fanout_paired(n: int, k: int, repeats: int, warmup: bool = True) -> tuple[Result, Result]:
    """Both fan-outs set up side by side, their timed rounds alternating."""
    async with _actor_fanout(n, k) as actor_round, _raw_fanout(n, k) as raw_round:
        actor_samples, raw_samples = await _interleaved_rounds((actor_round, raw_round), repeats, warmup)
    return _fanout_result(n, k, actor_samples), _fanout_raw_result(n, k, raw_samples)


def _check_fanout(
    refs: Sequence[ActorRef],
    receivers: Sequence[Receiver],
    publisher: ActorRef,
    *,
    per_receiver: int,
    publishes: int,
) -> None:
    """Fail loudly unless every delivery arrived and nothing was dropped."""
    assert len(receivers) == len(refs), "a receiver was restarted"
    for actor in receivers:
        assert actor.count == per_receiver, f"{actor.path}: counted {actor.count}, expected {per_receiver}"
    for ref in (*refs, publisher):
        stats = ref.statistics()
        assert stats.dropped == 0, f"{stats.path} dropped messages: {stats}"
        assert stats.crashes == 0, f"{stats.path} crashed: {stats}"
        assert stats.restarts == 0, f"{stats.path} restarted: {stats}"
        assert stats.mailbox_depth == 0, f"{stats.path} has queued messages: {stats}"
    for ref in refs:
        assert ref.statistics().messages_handled == per_receiver, ref.statistics()
    assert publisher.statistics().messages_handled == publishes, publisher.statistics()


# -- fan-out with bare Trio (the raw batched figure) -------------------------------------


async def _raw_consumer(receive: trio.MemoryReceiveChannel[int], shared: FanoutRound, counts: list[int], index: int) -> None:
    count = 0
    receive_nowait = receive.receive_nowait
    while True:
        try:
            await receive.receive()  # one wake-up ...
        except trio.EndOfChannel:
            break
        count += 1
        if count == shared.expected:
            shared.countdown.arrive()
        while True:  # ... then drain everything queued without checkpoints
            try:
                receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            count += 1
            if count == shared.expected:
                shared.countdown.arrive()
    counts[index] = count


@asynccontextmanager
async def _raw_fanout(n: int, k: int) -> AsyncIterator[Round]:
    """N memory channels fed with send_nowait; consumers drain in batches."""
    shared = FanoutRound()
    counts = [0] * n
    rounds = 0
    async with trio.open_nursery() as nursery:
        senders = []
        for i in range(n):
            send, receive = trio.open_memory_channel[int](k + 16)
            senders.append(send)
            nursery.start_soon(_raw_consumer, receive, shared, counts, i)
        await trio.testing.wait_all_tasks_blocked()

        async def one_round() -> None:
            nonlocal rounds
            rounds += 1
            shared.expected += k
            shared.countdown = countdown = Countdown(n)
            for i in range(k):
                for send in senders:
                    send.send_nowait(i)
            await countdown.done.wait()

        yield one_round
        for send in senders:
            send.close()
    assert counts == [rounds * k] * n, "a raw consumer missed messages"


# -- point to point -------------------------------------------------------------------


class PingPong:
    def __init__(self, use_await: bool) -> None:
        self.refs: list[ActorRef] = []
        self.use_await = use_await
        self.done = trio.Event()


class Bouncer(Actor):
    """Receives a hop count and tells the peer one less; 0 ends the round."""

    def __init__(self, shared: PingPong, index: int) -> None:
        self.shared = shared
        self.index = index

    async def receive(self, message: int) -> None:
        if not message:
            self.shared.done.set()
            return
        peer = self.shared.refs[1 - self.index]
        if self.shared.use_await:
            await peer.tell(message - 1)
        else:
            peer.tell_nowait(message - 1)


async def pingpong_actors(m: int, repeats: int, *, use_await: bool = False, warmup: bool = True) -> Result:
    """Two actors bounce a counter m round trips (2m tells) per round."""
    shared = PingPong(use_await)
    async with open_supervisor(name="bench", max_restarts=0) as sup:
        for index in (0, 1):
            shared.refs.append(await sup.start_child(ChildSpec(id=f"b{index}", factory=lambda i=index: Bouncer(shared, i))))

        async def one_round() -> None:
            shared.done = trio.Event()
            shared.refs[0].tell_nowait(2 * m)
            await shared.done.wait()

        samples = await _timed_rounds(one_round, repeats, warmup)
        rounds = repeats + (1 if warmup else 0)
        # With ``await tell`` the sender of the last hop is still in its
        # schedule point when the round ends; let it finish its message.
        await trio.testing.wait_all_tasks_blocked()
        handled = sum(ref.statistics().messages_handled for ref in shared.refs)
        assert handled == rounds * (2 * m + 1), handled
        assert all(ref.statistics().dropped == 0 for ref in shared.refs)
    how = "await tell" if use_await else "tell_nowait"
    return Result(
        scenario=f"pingpong_{how.replace(' ', '_')}", label=f"actors: ping-pong ({how})", n=None, ops=m, unit="round trip", samples=samples
    )


class Echo(Actor):
    async def receive(self, message: Any) -> Any:
        return message


async def ask_latency(m: int, repeats: int, *, ask_timeout: float | None = 5.0, warmup: bool = True) -> Result:
    """A plain task awaits ``ref.ask(..., timeout=ask_timeout)`` on an echo actor m times per round."""
    async with open_supervisor(name="bench", max_restarts=0) as sup:
        ref = await sup.start_child(ChildSpec(id="echo", factory=Echo))

        async def one_round() -> None:
            ask = ref.ask
            for i in range(m):
                assert await ask(i, timeout=ask_timeout) == i

        samples = await _timed_rounds(one_round, repeats, warmup)
    how = "default timeout" if ask_timeout is not None else "timeout=None"
    return Result(
        scenario="ask" if ask_timeout is not None else "ask_no_timeout",
        label=f"actors: await ask ({how})",
        n=None,
        ops=m,
        unit="round trip",
        samples=samples,
    )


async def pingpong_raw(m: int, repeats: int, warmup: bool = True) -> Result:
    """Two tasks bounce a counter over two memory channels (send_nowait)."""
    done = trio.Event()

    async def bounce(receive: trio.MemoryReceiveChannel[int], send: trio.MemorySendChannel[int]) -> None:
        async for hops in receive:
            if not hops:
                done.set()
            else:
                send.send_nowait(hops - 1)

    async with trio.open_nursery() as nursery:
        a_send, a_receive = trio.open_memory_channel[int](math.inf)
        b_send, b_receive = trio.open_memory_channel[int](math.inf)
        nursery.start_soon(bounce, a_receive, b_send)
        nursery.start_soon(bounce, b_receive, a_send)

        async def one_round() -> None:
            nonlocal done
            done = trio.Event()
            a_send.send_nowait(2 * m)
            await done.wait()

        samples = await _timed_rounds(one_round, repeats, warmup)
        nursery.cancel_scope.cancel()
    return Result(scenario="pingpong_raw", label="raw trio: ping-pong (send_nowait)", n=None, ops=m, unit="round trip", samples=samples)


async def channel_raw(m: int, repeats: int, warmup: bool = True) -> Result:
    """Plain ``await send`` / ``await receive`` on an unbuffered memory channel."""

    async def one_round() -> None:
        send, receive = trio.open_memory_channel[int](0)

        async def consume() -> None:
            count = 0
            async with receive:
                async for _ in receive:
                    count += 1
            assert count == m

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async with send:
                for i in range(m):
                    await send.send(i)

    samples = await _timed_rounds(one_round, repeats, warmup)
    return Result(scenario="channel_raw", label="raw trio: await send/receive (buffer 0)", n=None, ops=m, unit="message", samples=samples)


async def checkpoint_raw(m: int, repeats: int, warmup: bool = True) -> Result:
    """One task awaiting ``trio.lowlevel.checkpoint()``: the cost of one pass
    through Trio's scheduler, which bounds every point-to-point figure."""

    async def one_round() -> None:
        checkpoint = trio.lowlevel.checkpoint
        for _ in range(m):
            await checkpoint()

    samples = await _timed_rounds(one_round, repeats, warmup)
    return Result(scenario="checkpoint_raw", label="raw trio: await checkpoint()", n=None, ops=m, unit="checkpoint", samples=samples)


# -- running everything -------------------------------------------------------------------

SCENARIOS = ("fanout", "pingpong", "ask", "raw")


def run_all(sizes: Sizes, only: Sequence[str] = SCENARIOS, log: Callable[[str], None] = print) -> list[Result]:
    """Run the selected scenarios, each in its own ``trio.run``."""
    results: list[Result] = []

    def run(fn: Callable[..., Awaitable[Result | tuple[Result, ...]]], *args: Any, **kwargs: Any) -> None:
        outcome = trio.run(lambda: fn(*args, **kwargs))
        for result in outcome if isinstance(outcome, tuple) else (outcome,):
            log(f"  {result.label:<45} {'' if result.n is None else f'N={result.n:<6}'} {result.us_wall:8.3f} µs/{result.unit}")
            results.append(result)

    for n, k in sizes.fanout:
        if "fanout" in only and "raw" in only:
            run(fanout_paired, n, k, sizes.repeats)
        elif "fanout" in only:
            run(fanout_actors, n, k, sizes.repeats)
        elif "raw" in only:
            run(fanout_raw, n, k, sizes.repeats)
    if "pingpong" in only:
        run(pingpong_actors, sizes.pingpong, sizes.repeats)
        run(pingpong_actors, sizes.pingpong, sizes.repeats, use_await=True)
    if "ask" in only:
        run(ask_latency, sizes.ask, sizes.repeats)
        run(ask_latency, sizes.ask, sizes.repeats, ask_timeout=None)
    if "raw" in only:
        run(pingpong_raw, sizes.pingpong, sizes.repeats)
        run(channel_raw, sizes.channel, sizes.repeats)
        run(checkpoint_raw, sizes.channel, sizes.repeats)
    return results


def fanout_slowdown(actors: Result, raw: Result) -> float:
    """Actor time over raw time: the median of per-round ratios (rounds alternate)."""
    return statistics.median(a.wall / r.wall for a, r in zip(actors.samples, raw.samples, strict=True))


def check_targets(results: Sequence[Result]) -> list[Verdict]:
    """Compare the fan-out figures with the issue's targets."""
    actors = {r.n: r for r in results if r.scenario == "fanout"}
    raw = {r.n: r for r in results if r.scenario == "fanout_raw"}
    verdicts = []
    for n in sorted(actors.keys() & raw.keys(), key=lambda v: v or 0):
        slowdown = fanout_slowdown(actors[n], raw[n])
        verdicts.append(
            Verdict(
                target=f"fan-out N={n} within {TARGET_RATIO_TO_RAW:g}x of raw batched",
                measured=f"{slowdown:.2f}x raw (median of paired rounds; medians {actors[n].us_wall:.3f} vs {raw[n].us_wall:.3f} µs)",
                ratio=TARGET_RATIO_TO_RAW / slowdown,
                passed=slowdown <= TARGET_RATIO_TO_RAW,
            )
        )
    if TARGET_FANOUT_N in actors:
        rate = actors[TARGET_FANOUT_N].rate
        verdicts.append(
            Verdict(
                target=f"fan-out N={TARGET_FANOUT_N} >= {TARGET_FANOUT_RATE:,} deliveries/s",
                measured=f"{rate:,.0f} deliveries/s",
                ratio=rate / TARGET_FANOUT_RATE,
                passed=rate >= TARGET_FANOUT_RATE,
            )
        )
    return verdicts


def format_table(results: Sequence[Result]) -> str:
    header = ("scenario", "N", "ops/round", "µs/op wall", "µs/op CPU", "ops/s (wall)", "spread", "unit")
    rows = [
        (
            r.label,
            "" if r.n is None else f"{r.n:,}",
            f"{r.ops:,}",
            f"{r.us_wall:.3f}",
            f"{r.us_cpu:.3f}",
            f"{r.rate:,.0f}",
            f"{r.spread:.0%}",
            r.unit,
        )
        for r in results
    ]
    return markdown_table(header, rows, right=range(1, 7))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_run_arguments(parser, SCENARIOS)
    args = parser.parse_args(argv)
    sizes = chosen_sizes(args, FULL, QUICK)
    only = tuple(args.only or SCENARIOS)

    info = machine_info()
    print_header("actor", args.quick, sizes.repeats, info)
    results = run_all(sizes, only)
    verdicts = check_targets(results)

    print()
    print(format_table(results))
    if verdicts:
        print()
        print(format_verdicts(verdicts))
    if args.json:
        write_json(args.json, {**run_payload(info, sizes, results), "targets": [attrs.asdict(v) for v in verdicts]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
