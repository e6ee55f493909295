"""Prometheus metrics: a custom collector that reads the hub's statistics.

Nothing is counted twice: the collector asks the hub (connections, rooms,
the supervision tree's mailboxes and restarts) and the transport's
:class:`TransportCounters` at scrape time. Each app has its own
``CollectorRegistry`` (never the process-global one), so several servers
in one process, or in one test session, do not collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..actors import ActorStatistics, SupervisorStatistics

if TYPE_CHECKING:
    from ..realtime import Hub
    from ._heartbeat import Heartbeat

__all__ = ["CONTENT_TYPE_LATEST", "HubCollector", "TransportCounters", "create_registry", "render"]


@attrs.define
class TransportCounters:
    """Counters a transport keeps on its hot path (plain int increments).

    Attributes:
        frames_in: Client frames received.
        frames_out: Frames written to clients.
        bytes_in: Bytes of client frames received.
        bytes_out: Bytes of frames written to clients.
        refused: WebSocket handshakes refused (origin, authentication,
            limits, shutting down).
        protocol_errors: Connections closed for what the client sent
            (binary frames, oversized frames).
        readers_hibernated: Times the reader of an idle native connection
            gave up its task (``hub.hibernate_after``).
        readers_woken: Times such a reader got a task again.
    """

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: int = 0
    protocol_errors: int = 0
    readers_hibernated: int = 0
    readers_woken: int = 0


def _group(path: str, root: str) -> str:
    """``/hub/rooms/general`` -> ``rooms``; ``/hub/live`` -> ``live``."""
    rest = path[len(root) :].strip("/")
    return rest.split("/", 1)[0] or "root"


class HubCollector(Collector):
    """Reads a hub's statistics at scrape time.

    Args:
        hub: Returns the running hub, or ``None`` (before start-up, after
            shutdown: only the transport counters are reported then).
        counters: The transport's counters.
        heartbeat: Returns the heartbeat sweeper, or ``None``.
    """

    def __init__(
        self,
        hub: Callable[[], Hub | None],
        counters: TransportCounters,
        heartbeat: Callable[[], Heartbeat | None] | None = None,
    ) -> None:
        self._hub = hub
        self._counters = counters
        self._heartbeat = heartbeat

    def describe(self) -> list[Metric]:
        """Nothing up front: the metrics are read at collection time."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by the registry at each scrape)."""
        counters = self._counters
        yield _counter("ensemble_messages_in", "Client frames received.", counters.frames_in)
        yield _counter("ensemble_messages_out", "Frames written to clients.", counters.frames_out)
        yield _counter("ensemble_bytes_in", "Bytes of client frames received.", counters.bytes_in)
        yield _counter("ensemble_bytes_out", "Bytes of frames written to clients.", counters.bytes_out)
        yield _counter("ensemble_handshakes_refused", "WebSocket handshakes refused.", counters.refused)
        yield _counter("ensemble_protocol_errors", "Connections closed for what the client sent.", counters.protocol_errors)
        yield _counter("ensemble_readers_hibernated", "Idle native readers that gave up their task.", counters.readers_hibernated)
        yield _counter("ensemble_readers_woken", "Hibernating native readers given a task again.", counters.readers_woken)
        hub = self._hub()
        if hub is not None:
            yield from self._hub_metrics(hub)
        heartbeat = self._heartbeat() if self._heartbeat is not None else None
        if heartbeat is not None:
            beat = heartbeat.statistics()
            yield _counter("ensemble_heartbeat_pings", "Ping frames sent to silent connections.", beat.pings)
            closed = CounterMetricFamily("ensemble_heartbeat_closed", "Connections closed by the sweeper.", labels=["reason"])
            closed.add_metric(["timeout"], beat.timed_out)
            closed.add_metric(["unauthenticated"], beat.unauthenticated)
            closed.add_metric(["token_expired"], beat.expired)
            yield closed

    def _hub_metrics(self, hub: Hub) -> Iterator[Metric]:
        stats = hub.connections.statistics()
        yield GaugeMetricFamily("ensemble_connections", "Open connections.", value=stats.connections)
        yield GaugeMetricFamily("ensemble_users_online", "Users with at least one open connection.", value=stats.users)
        yield GaugeMetricFamily("ensemble_rooms_running", "Rooms whose actors run now.", value=len(hub.rooms_running()))
        yield _counter("ensemble_connections_opened", "Connections opened.", stats.connected)
        yield _counter("ensemble_connections_closed", "Connections closed (any cause).", stats.disconnected)
        yield _counter("ensemble_slow_consumers", "Connections closed as slow consumers (4008).", stats.slow_consumers)
        yield _counter("ensemble_transport_errors", "Connections closed because a write failed.", stats.transport_errors)
        yield _counter("ensemble_connection_crashes", "Connection actors that crashed.", stats.crashes)
        yield _counter("ensemble_rate_limited", "Inbound messages refused by the rate limit.", stats.rate_limited)

        root = hub.supervisor.path
        depth = GaugeMetricFamily("ensemble_mailbox_depth", "Messages queued in actor mailboxes, summed per group.", labels=["group"])
        peak = GaugeMetricFamily("ensemble_mailbox_depth_max", "The deepest actor mailbox now, per group.", labels=["group"])
        actors = GaugeMetricFamily("ensemble_actors", "Actors running, per group.", labels=["group"])
        hibernating = GaugeMetricFamily(
            "ensemble_actors_hibernating", "Actors without a task while idle (counted in ensemble_actors too), per group.", labels=["group"]
        )
        drops = CounterMetricFamily(
            "ensemble_mailbox_drops",
            "Messages dropped or refused by the mailboxes of running actors, per group.",
            labels=["group"],
        )
        restarts = CounterMetricFamily("ensemble_restarts", "Child restarts performed by supervisors, per group.", labels=["group"])
        given_up = CounterMetricFamily("ensemble_children_given_up", "Children removed after too many restarts.", labels=["group"])
        totals: dict[str, list[int]] = {}  # group -> [depth, max depth, actors, drops, hibernating]
        supervised: dict[str, list[int]] = {}  # group -> [restarts, given up]
        for node in hub.snapshot().walk():
            group = _group(node.path, root)
            stats_ = node.statistics
            if isinstance(stats_, ActorStatistics):
                row = totals.setdefault(group, [0, 0, 0, 0, 0])
                row[0] += stats_.mailbox_depth
                row[1] = max(row[1], stats_.mailbox_depth)
                row[2] += 1
                row[3] += stats_.dropped_newest + stats_.dropped_oldest + stats_.refused + stats_.block_timeouts
                row[4] += stats_.state == "hibernating"
            elif isinstance(stats_, SupervisorStatistics):
                sup = supervised.setdefault(group, [0, 0])
                sup[0] += stats_.restarts
                sup[1] += stats_.children_given_up
        for group, (total, deepest, count, dropped, asleep) in sorted(totals.items()):
            depth.add_metric([group], total)
            peak.add_metric([group], deepest)
            actors.add_metric([group], count)
            hibernating.add_metric([group], asleep)
            drops.add_metric([group], dropped)
        for group, (restarted, removed) in sorted(supervised.items()):
            restarts.add_metric([group], restarted)
            given_up.add_metric([group], removed)
        yield from (depth, peak, actors, hibernating, drops, restarts, given_up)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def create_registry(collector: Collector) -> CollectorRegistry:
    """A registry of its own holding ``collector`` (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)
