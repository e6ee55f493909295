"""The pytest plugin of :mod:`ensemble.testing` (entry point ``ensemble``).

Fixtures:
    fault_injector: A :class:`FaultInjector`, cleared at teardown.
    supervisor: A running ``one_for_one`` supervisor named ``test`` (async:
        needs pytest-trio). Request ``autojump_clock`` in the test too, to
        run on Trio's virtual clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from ..actors import Supervisor, open_supervisor
from ._faults import FaultInjector


@pytest.fixture
def fault_injector() -> Iterator[FaultInjector]:
    """A fault injector whose faults are removed after the test."""
    injector = FaultInjector()
    yield injector
    injector.clear()


@pytest.fixture
async def supervisor(fault_injector: FaultInjector) -> AsyncIterator[Supervisor]:
    """A running ``one_for_one`` supervisor (path ``/test``), stopped after the test.

    The test's faults are cleared (and stalls released) before the supervisor
    stops its children, so a stalled actor shuts down normally instead of
    being cancelled after its grace period. (A sync fixture such as
    ``fault_injector`` is torn down only after the test's Trio run, which is
    too late for that.)
    """
    async with open_supervisor(name="test") as running:
        try:
            yield running
        finally:
            fault_injector.clear()
