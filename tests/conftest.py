"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import _sockets
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as module ``name``.

    ``benchmarks/`` is on ``sys.path`` while it loads, as it is when the script
    runs as ``python benchmarks/<name>.py``, so that it finds ``_common``.
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """``load_benchmark("bench_rooms")``: a benchmark script, imported as a module."""
    return _load_benchmark


@pytest.fixture(params=_sockets.TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each server transport in turn: the socket-level protocol tests run against all of them."""
    value: str = request.param
    return value
