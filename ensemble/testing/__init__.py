"""Fault injection for tests of code built on :mod:`ensemble.actors`.

:class:`FaultInjector` makes an actor crash on its next message (or on a
message matching a predicate), delays its handling, fills its mailbox, or
stalls it. The pytest plugin (installed with the package) offers the
``fault_injector`` and ``supervisor`` fixtures; request ``autojump_clock`` in
the same test to run on Trio's virtual clock.
"""

from ._faults import (
    FaultInjector as FaultInjector,
    InjectedCrash as InjectedCrash,
    InjectedFault as InjectedFault,
    Stall as Stall,
)
