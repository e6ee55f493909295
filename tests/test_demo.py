"""The embedded demo (``python -m ensemble``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio
import trio.testing

from ensemble._demo import run_demo


@pytest.fixture
def demo_output(capsys: pytest.CaptureFixture[str]) -> list[str]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(run_demo, clock=clock)
    assert clock.current_time() == pytest.approx(1.1)  # only the typing timeout's wait took (virtual) time
    return capsys.readouterr().out.splitlines()


def test_the_demo_tells_its_story(demo_output: list[str]) -> None:
    out = demo_output
    assert out[0] == "started /demo/rooms/general and its siblings under /demo/rooms"
    assert "alice says hello; messages in the log: 1" in out
    assert "mallory is refused (a rejection, not a crash): mallory is banned" in out
    # The message queued behind the crash reached the restarted room.
    assert "  history: ['/demo/rooms/general: <alice> hello', '/demo/rooms/general: <carol> queued behind the crash']" in out
    assert "bob starts typing; typing now: ['bob']" in out
    assert "  /demo/rooms/general: bob stopped typing (timer after 1.0 s)" in out
    # The lines come in the order of the story.
    order = [
        "alice says hello",
        "mallory is refused",
        "the room crashes on purpose",
        "  history:",
        "bob starts typing",
        "  /demo/rooms/general: bob stopped typing",
        "supervision tree:",
    ]
    positions = [next(i for i, line in enumerate(out) if line.startswith(prefix)) for prefix in order]
    assert positions == sorted(positions)


def test_the_demo_prints_the_tree_and_statistics(demo_output: list[str]) -> None:
    out = demo_output
    start = out.index("supervision tree:")
    assert out[start + 1 : start + 5] == [
        "/demo <one_for_one> children=1 restarts=0",
        "  /demo/rooms <one_for_one> children=2 restarts=1",
        "    /demo/rooms/general [running] handled=6 depth=0 restarts=1",
        "    /demo/rooms/random [running] handled=0 depth=0 restarts=0",
    ]
    assert out[-1] == "/demo/rooms/general: handled=6 rejected=1 crashes=1 restarts=1"


def test_python_dash_m_ensemble_runs_the_demo() -> None:
    result = subprocess.run([sys.executable, "-m", "ensemble"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # crashes are logged below CRITICAL, which the command silences
    assert "mallory is refused (a rejection, not a crash): mallory is banned" in result.stdout
    assert "/demo/rooms/general: handled=6 rejected=1 crashes=1 restarts=1" in result.stdout
