"""Faults the example sessions of docs/protocol.md inject: ``faults`` on a ``!`` line.

Each helper is server code awaited with the hub (the in-memory hub of
tests/test_protocol_doc.py, or the running server's hub of
tests/test_protocol_sockets.py), so a crash is provoked the same way in both
runners. The crash is the one the actor would have from a bug; the helpers
swallow the error the caller gets (it is what the session shows: the events
the clients receive afterwards).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from ensemble.actors import ActorCrashed
from ensemble.realtime import Event, Hub, LiveQuery
from ensemble.testing import FaultInjector, InjectedCrash


async def crash_room(hub: Hub, room_id: str, times: int = 1) -> None:
    """Crash the room's actor ``times`` times in a row (each on the next message it handles).

    As in tests/test_hub.py: each crash is provoked with an ask, which fails;
    the supervisor restarts the room (its subscribers get ``room_reset``) until
    it gives up on it after ``room_max_restarts`` restarts within
    ``room_max_seconds`` (its subscribers get ``room_closed``).
    """
    injector = FaultInjector()
    room = await hub.room(room_id)
    for _ in range(times):
        injector.crash_next(room.ref)
        try:
            await room.get_members()
        except ActorCrashed:
            continue
        raise AssertionError(f"room {room_id!r} did not crash")


class _Buggy:
    """A watcher's subscriber with a bug: the next delivery raises, once.

    As the ``Exploding`` subscriber of tests/test_live.py, it makes the
    live-query actor crash while publishing a change (after logging it).
    """

    def __init__(self, watchers: list[Any]) -> None:
        self.watchers = {id(watcher): (watcher, watcher.subscriber) for watcher in watchers}

    def disarm(self) -> None:
        for watcher, subscriber in self.watchers.values():
            if watcher.subscriber is self:
                watcher.subscriber = subscriber
        self.watchers.clear()

    def deliver_nowait(self, event: Event) -> bool:
        self.disarm()
        raise InjectedCrash(f"injected crash delivering {event.type} on {event.topic}")


async def crash_mid_publish(live: LiveQuery, notify: Awaitable[None]) -> None:
    """Await ``notify`` (a ``live.notify_*`` call) while the live-query actor
    crashes delivering that change to its first watcher.

    The change is logged (its version counts); ``notify`` fails (the notifier
    knows); the restarted actor tells every watcher of the model to re-sync
    (``live_reset``).
    """
    buggy = _Buggy([watcher for watcher in live.store.watchers.values() if watcher.subscriber is not None])
    for watcher, _ in buggy.watchers.values():
        watcher.subscriber = buggy
    try:
        await notify
    except ActorCrashed:
        pass
    else:
        raise AssertionError("the live-query actor did not crash")
    finally:
        buggy.disarm()
