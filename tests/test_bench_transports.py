"""The transport benchmark's orchestrator still runs: a tiny matrix against real
servers (Ensemble's transports always, a peer when the bench extra is
installed), its JSON report and its Markdown. No timings are checked."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from ensemble.server import ServerConfig


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("bench_transports")


def tiny(bench: ModuleType) -> Any:
    return bench.Sizes(
        fanout_clients=20,
        fanout_messages=(5,),
        fanout_repeats=1,
        fanout_window=3,
        idle_clients=(20,),
        idle_settle=0.5,
        accept_burst=20,
        echo_round_trips=20,
        run_timeout=20.0,
        setup_timeout=20.0,
    )


def run_matrix(bench: ModuleType, servers: list[str], tmp_path: Path) -> dict[str, Any]:
    plot = str(tmp_path / "plot.png") if importlib.util.find_spec("matplotlib") else None
    lines: list[str] = []
    report: dict[str, Any] = bench.run(
        servers,
        ["fanout", "idle", "echo"],
        tiny(bench),
        out_dir=tmp_path,
        command="test",
        plot_path=plot,
        markdown_path=str(tmp_path / "transports.md"),
        info={"cpu": "test", "nproc": 2},  # machine_info() would sample the load for a second
        log=lines.append,
    )
    assert lines
    saved = json.loads(Path(report["json_path"]).read_text())
    assert not list(tmp_path.glob("*.partial.json"))  # replaced by the complete report
    assert saved["markdown"] == report["markdown"] == (tmp_path / "transports.md").read_text()
    for key in ("machine", "versions", "command", "sizes", "servers", "scenarios", "summary", "targets", "runs", "elapsed_s"):
        assert key in saved, key
    assert saved["versions"]["trio"]
    if plot is not None:
        assert Path(plot).stat().st_size > 0
    return saved


def check_server(report: dict[str, Any], server: str) -> None:
    runs = [r for r in report["runs"] if r["server"] == server]
    windowed = server in ("native", "hypercorn", "hypercorn-batch")  # Ensemble: the fan-out again, flow-controlled
    assert len(runs) == (5 if windowed else 4)  # fanout (windowed too), idle 20, the accept burst, echo
    for record in runs:
        assert record["ok"], record["error"]
        assert record["report"]["result"]  # the raw loadgen report
        assert record["server_process"]["rss_before_kb"] > 0
        assert record["server_process"]["exit_status"] == 0  # stopped cleanly by SIGTERM

    fanouts = [r for r in report["summary"]["fanout"] if r["server"] == server]
    assert [r.get("window") for r in fanouts] == ([None, 3] if windowed else [None])
    for fanout in fanouts:
        check_fanout(fanout)
    if windowed:
        assert any(t["server"] == "native" and t["target"].startswith("the same with a publisher") for t in report["targets"])
        assert "5 (window 3)" in report["markdown"]

    (idle,) = [r for r in report["summary"]["idle"] if r["server"] == server]
    assert idle["rss_before_kb"] > 0
    (level,) = idle["levels"]
    assert level["error"] is None
    assert level["connected"] == 20
    assert level["rss_kb"] > 0
    assert level["kb_per_conn"] is not None
    assert level["kb_per_conn_fresh"] is not None
    assert level["settle_s"] == 0.5
    assert level["setup_per_s"] > 0
    burst = idle["accept_burst"]
    assert burst["error"] is None
    assert burst["connected"] == 20
    assert burst["seconds"] > 0
    assert burst["tcp_connected"] == 20
    assert 0 < burst["tcp_seconds"] <= burst["seconds"]

    (echo,) = [r for r in report["summary"]["echo"] if r["server"] == server]
    assert echo["error"] is None
    assert echo["p50_us"] > 0
    assert echo["round_trips_per_s"] > 0


def check_fanout(fanout: dict[str, Any]) -> None:
    assert fanout["finished"]
    assert fanout["deliveries"] == fanout["expected"] == 20 * 5
    assert fanout["deliveries_per_s"] > 0
    assert fanout["server_us_per_delivery"] >= 0  # CPU ticks are 10 ms: a tiny run may show none
    assert fanout["p50_ms"] > 0
    assert fanout["p99_ms"] >= fanout["p50_ms"]
    assert fanout["max_ms"] >= fanout["p99_ms"]
    assert all(c >= 0 for c in fanout["generator_cpu_pct"])


def test_ensemble_transports(bench: ModuleType, tmp_path: Path) -> None:
    report = run_matrix(bench, ["native", "hypercorn"], tmp_path)
    for server in ("native", "hypercorn"):
        check_server(report, server)
    markdown = report["markdown"]
    for title in ("### Fan-out", "### Idle connections", "### Echo", "### Targets"):
        assert title in markdown
    assert "| native " in markdown
    assert "| hypercorn " in markdown
    targets = {(t["server"], t["target"]): t for t in report["targets"]}
    assert len(targets) == 6
    assert all(t["met"] is None for t in targets.values() if t["server"] == "hypercorn")  # no hypercorn-naive row
    assert all(t["met"] is None for t in targets.values() if "saturation" in t["target"])  # no openloop run


def test_a_peer(bench: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")  # the peers come with the bench extra
    report = run_matrix(bench, ["starlette"], tmp_path)
    check_server(report, "starlette")
    assert "| starlette " in report["markdown"]


def test_a_failing_server_is_recorded(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that exits at once: every run is recorded as failed, and the report still renders.
    monkeypatch.setattr(bench, "SERVE_PEER", tmp_path / "missing.py")
    monkeypatch.setattr(bench, "SERVER_START_TIMEOUT", 10.0)
    report = bench.run(["starlette"], ["fanout", "echo"], tiny(bench), out_dir=None, command="test", info={}, log=lambda line: None)
    assert [r["ok"] for r in report["runs"]] == [False, False]
    assert all("exited" in r["error"] for r in report["runs"])
    assert "FAILED" in report["markdown"]
    assert report["summary"]["fanout"][0]["deliveries_per_s"] is None


def test_a_matrix_that_dies_keeps_the_servers_it_finished(bench: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def echo(self: Any, server: str) -> None:
        if server == "hypercorn":
            raise KeyboardInterrupt  # the operator gave up, or the machine went away
        self.summary["echo"].append({"server": server, "error": None})

    monkeypatch.setattr(bench.Matrix, "echo", echo)
    monkeypatch.setattr(bench.Matrix, "fanout", lambda self, server: self.summary["fanout"].append({"server": server}))
    with pytest.raises(KeyboardInterrupt):
        bench.run(
            ["native", "hypercorn"], ["fanout", "echo"], tiny(bench), out_dir=tmp_path, command="test", info={"cpu": "test"}, log=print
        )
    (partial,) = tmp_path.glob("transports-*.partial.json")
    saved = json.loads(partial.read_text())
    assert saved["complete"] is False
    assert saved["summary"] == {"fanout": [{"server": "native"}], "echo": [{"server": "native", "error": None}]}  # servers finished


def test_the_paced_hypercorn_server_writes_at_most_every_100_ms(bench: ModuleType) -> None:
    text = bench.ensemble_toml(100, 10, slow=False, min_write_interval=bench.PACED_WRITE_INTERVAL)
    data = tomllib.loads(text)
    assert data["hub"]["min_write_interval"] == 0.1
    assert "min_write_interval" not in tomllib.loads(bench.ensemble_toml(100, 10, slow=False))["hub"]
    assert bench.ENSEMBLE_SERVERS["hypercorn-paced"] == ("hypercorn", True)  # batched frames too
    assert ServerConfig.from_mapping(data).hub.min_write_interval == 0.1  # the server takes it
