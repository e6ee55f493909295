"""What the benchmark scripts in this folder share: the command line options
every one has, the machine description and the header printed before a run,
median timings, verdicts against targets, Markdown tables and the JSON report.

The scripts import it as ``_common``: run as ``python benchmarks/<script>.py``,
this folder is ``sys.path[0]``; the smoke tests load a script by its path and
put this folder on ``sys.path`` while it loads (``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import trio

# -- measuring ----------------------------------------------------------------------


class Timing(Protocol):
    """One timed round: wall (``time.perf_counter``) and CPU (``time.process_time``) seconds."""

    @property
    def wall(self) -> float: ...

    @property
    def cpu(self) -> float: ...


class Medians:
    """Mixin for a result with the ``samples`` of its timed rounds: their medians and spread."""

    __slots__ = ()
    samples: tuple[Timing, ...]

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median wall time of the timed rounds."""
        walls = [s.wall for s in self.samples]
        return (max(walls) - min(walls)) / self.wall


# -- targets --------------------------------------------------------------------------


@attrs.frozen
class Verdict:
    target: str
    measured: str
    ratio: float  # measured relative to the target; >= 1.0 passes
    passed: bool


# -- the machine ----------------------------------------------------------------------


def busy_cpus(seconds: float = 1.0) -> float | None:
    """How many CPUs other processes kept busy over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    memory = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
            memory = f"{kib / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "trio": trio.__version__,
        "attrs": attrs.__version__,
        "busy_cpus_before": busy_cpus(),
    }


def print_header(what: str, quick: bool, repeats: int, info: dict[str, Any]) -> None:
    """What runs, on what machine, and how busy the machine was just before."""
    print(f"ensemble {what} benchmark ({'quick' if quick else 'full'}; median of {repeats} timed rounds after a warm-up)")
    print(
        f"  {info['cpu']}, {info['nproc']} CPUs, {info['memory']}; {info['implementation']} {info['python']}, trio {info['trio']}, attrs {info['attrs']}"
    )
    busy = info["busy_cpus_before"]
    if busy is not None:
        warning = "  (WARNING: the machine is busy; figures will be noisy)" if busy > 0.2 else ""
        print(f"  other processes kept {busy:.2f} CPUs busy just before the run{warning}")


# -- the command line ---------------------------------------------------------------

S = TypeVar("S", bound=attrs.AttrsInstance)


def add_run_arguments(parser: argparse.ArgumentParser, scenarios: Sequence[str]) -> None:
    """The options of every benchmark: --quick, --json, --only, --repeats."""
    parser.add_argument("--quick", action="store_true", help="small sizes, one timed round")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--only", choices=scenarios, action="append", help="run only these scenarios (repeatable)")
    parser.add_argument("--repeats", type=int, help="timed rounds per scenario (default 5, 1 with --quick)")


def chosen_sizes(args: argparse.Namespace, full: S, quick: S) -> S:
    """The sizes that --quick and --repeats ask for."""
    sizes = quick if args.quick else full
    if args.repeats is not None:
        sizes = attrs.evolve(sizes, repeats=args.repeats)  # type: ignore[misc]  # mypy's attrs plugin wants a concrete class
    return sizes


# -- reporting ------------------------------------------------------------------------


class Reportable(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


def run_payload(info: dict[str, Any], sizes: attrs.AttrsInstance, results: Iterable[Reportable]) -> dict[str, Any]:
    """The JSON report of a run: the machine, the command, the sizes and the results."""
    return {
        "machine": info,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "sizes": attrs.asdict(sizes),
        "results": [r.as_dict() for r in results],
    }


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {path}")


def format_verdicts(verdicts: Sequence[Verdict]) -> str:
    header = ("target", "measured", "result")
    rows = [(v.target, v.measured, f"{'PASS' if v.passed else 'MISS'} ({v.ratio:.2f}x of target)") for v in verdicts]
    return markdown_table(header, rows, right=())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] | range) -> str:
    """A Markdown table, columns padded to their widest cell; ``right``: the right-aligned column indexes."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"
        )

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
