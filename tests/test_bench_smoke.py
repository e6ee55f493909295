"""The actor benchmark still runs: every scenario at tiny sizes, no timing checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("bench_actors")


async def test_fanout_delivers_everything(bench: ModuleType) -> None:
    # The smallest scenario; fanout_actors asserts that every delivery was
    # counted and that the statistics show no drops.
    result = await bench.fanout_actors(3, 5, 2)
    assert (result.n, result.ops, len(result.samples)) == (3, 15, 2)
    raw = await bench.fanout_raw(3, 5, 1)
    assert raw.ops == 15


def test_all_scenarios_and_report(bench: ModuleType, tmp_path: Path) -> None:
    tiny = bench.Sizes(fanout=((2, 3), (5, 2)), pingpong=4, ask=4, channel=8, repeats=1)
    lines: list[str] = []
    results = bench.run_all(tiny, log=lines.append)
    assert len(results) == len(lines) == 11
    assert {r.scenario for r in results} >= {"fanout", "fanout_raw", "pingpong_tell_nowait", "ask", "pingpong_raw", "channel_raw"}
    assert all(r.wall > 0 and r.us_wall > 0 for r in results)
    assert "fan-out" in bench.format_table(results)
    verdicts = bench.check_targets(results)
    assert len(verdicts) == 2  # the 2x ratio for both N (no N=1000 rate target)
    assert bench.format_verdicts(verdicts).count("|") > 0
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "pingpong", "--repeats", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]
