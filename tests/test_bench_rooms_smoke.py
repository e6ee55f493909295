"""The room benchmark still runs and checks delivery: tiny sizes, no timing checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("bench_rooms")


@pytest.mark.parametrize("mode", ["ask", "tell", "burst", "tasks"])
async def test_room_to_outboxes_delivers_everything(bench: ModuleType, mode: str) -> None:
    # room_outbox asserts every round: each subscriber got every message once,
    # in order, and no outbox overflowed, refused or dropped anything.
    result = await bench.room_outbox(5, 9, 2, mode=mode)
    assert (result.n, result.k, result.deliveries, len(result.samples)) == (5, 9, 45, 2)


@pytest.mark.parametrize("batch_frames", [False, True])
async def test_hub_end_to_end_delivers_everything(bench: ModuleType, batch_frames: bool) -> None:
    result = await bench.hub_end_to_end(4, 6, 1, mode="burst", batch_frames=batch_frames)
    assert result.deliveries == 24


async def test_a_lost_message_fails_the_round(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    real_get_batch = bench.Outbox.get_batch_nowait

    def lossy(self: object, max_events: int | None = None) -> list[object]:
        batch: list[object] = real_get_batch(self, max_events)
        return batch[1:] if len(batch) > 1 else batch

    monkeypatch.setattr(bench.Outbox, "get_batch_nowait", lossy)
    with pytest.raises(AssertionError, match="expected"):
        await bench.room_outbox(2, 3, 1, mode="tell")


def test_run_all_fits_and_report(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = bench.Sizes(outbox=((1, 4), (3, 4)), ask=((1, 4), (3, 4)), modes_n=3, modes_k=4, hub=((3, 4),), repeats=1)
    lines: list[str] = []
    results = bench.run_all(tiny, log=lines.append)
    assert len(results) == len(lines) == 10
    assert {r.scenario for r in results} == {"outbox", "hub", "hub_batch"}
    assert all(r.wall > 0 and r.rate > 0 for r in results)
    assert "room -> outboxes" in bench.format_table(results)
    costs = [bench.room_costs(results, mode) for mode in ("tell", "ask")]
    assert all(cost is not None and cost.fixed_n == 1 and len(cost.points) == 1 for cost in costs)
    assert bench.format_costs(costs).count("|") > 0
    assert bench.check_targets(results) == []  # no N=1000 at these sizes
    out = tmp_path / "rooms.json"
    monkeypatch.setattr(bench, "QUICK", tiny)
    assert bench.main(["--quick", "--only", "modes", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"]
    assert bench.main(["--report", str(out)]) == 0
    assert json.loads(out.read_text())["room_costs"] is not None
