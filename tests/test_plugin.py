"""The pytest plugin: discovered through its ``pytest11`` entry point, and its
``supervisor`` and ``fault_injector`` fixtures work (teardown included).

The user test files run in a pytest subprocess (``pytester``), so the plugin
is loaded the way a user's pytest loads it: from the installed entry point.
"""

from __future__ import annotations

import importlib.metadata
import textwrap

import pytest

import ensemble.testing._plugin

pytest_plugins = ["pytester"]

INI = """
[pytest]
trio_mode = true
filterwarnings = error
"""

USER_TESTS = """
import trio

from ensemble.actors import Actor, ActorCrashed, ChildSpec
from ensemble.testing import FaultInjector, InjectedCrash

EVENTS = []
KEPT = {}


class Counter(Actor):
    def __init__(self):
        self.count = 0

    async def receive(self, message):
        self.count += message
        return self.count

    async def on_stop(self):
        EVENTS.append(("on_stop", trio.current_time()))


def test_the_plugin_is_registered_under_its_entry_point_name(request):
    plugin = request.config.pluginmanager.get_plugin("ensemble")
    assert plugin is not None
    assert plugin.__name__ == "ensemble.testing._plugin"


async def test_crash_and_restart(supervisor, fault_injector, autojump_clock):
    assert supervisor.path == "/test"
    assert supervisor.strategy.value == "one_for_one"
    counter = await supervisor.start_child(ChildSpec(id="counter", factory=Counter))
    assert counter.path == "/test/counter"
    assert await counter.ask(2) == 2
    fault_injector.crash_next(counter)
    try:
        await counter.ask(3)
    except ActorCrashed as exc:
        assert isinstance(exc.__cause__, InjectedCrash)
    else:
        raise AssertionError("no crash")
    assert await counter.ask(5) == 5  # a fresh incarnation
    await trio.sleep(3600)  # virtual: autojump_clock is in use
    assert trio.current_time() >= 3600


async def test_faults_left_at_teardown(supervisor, fault_injector, autojump_clock):
    counter = await supervisor.start_child(ChildSpec(id="counter", factory=Counter))
    fault = fault_injector.crash_when(counter, lambda m: True, times=None)
    stall = fault_injector.stall(counter)
    counter.tell_nowait(1)
    await trio.sleep(1)
    EVENTS.clear()
    KEPT.update(supervisor=supervisor, counter=counter, fault=fault, stall=stall, ended=trio.current_time())


def test_teardown_cleared_faults_and_stopped_the_supervisor():
    assert not KEPT["fault"].active
    assert KEPT["stall"].released
    assert KEPT["supervisor"].statistics().state == "stopped"
    assert not KEPT["counter"].alive
    # The stall was released before shutdown, so the actor stopped normally
    # (on_stop ran) and at once, not after its grace period.
    assert EVENTS == [("on_stop", KEPT["ended"])]


def test_fault_injector_alone_is_a_sync_fixture(fault_injector):
    assert isinstance(fault_injector, FaultInjector)


async def test_an_unsurvived_fault_fails_the_test(supervisor, fault_injector, autojump_clock):
    counter = await supervisor.start_child(ChildSpec(id="counter", factory=Counter))
    fault_injector.crash_next(counter)
    await counter.ask(1)
"""


def test_the_entry_point_names_the_plugin_module() -> None:
    points = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "ensemble"]
    assert len(points) == 1
    assert points[0].value == "ensemble.testing._plugin"
    assert points[0].load() is ensemble.testing._plugin


def test_this_session_loaded_the_plugin(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.get_plugin("ensemble") is ensemble.testing._plugin


def test_fixtures_in_a_user_test_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_teardown_cleared_faults_and_stopped_the_supervisor PASSED*",
            "*test_an_unsurvived_fault_fails_the_test FAILED*",
            "*ActorCrashed*injected crash in /test/counter*",
        ]
    )


def test_fixtures_come_from_the_entry_point_plugin(pytester: pytest.Pytester) -> None:
    """Disabling the plugin by its entry point name removes the fixtures."""
    pytester.makeini(INI)
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            async def test_uses_supervisor(supervisor, autojump_clock):
                pass

            def test_uses_fault_injector(fault_injector):
                pass
            """
        )
    )
    result = pytester.runpytest_subprocess("-p", "no:ensemble", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*fixture 'supervisor' not found*", "*fixture 'fault_injector' not found*"])
