"""A load generator for tests and the demo: an audience that joins relays as an edge would.

It replays a trace (`t_seconds,listeners`, t relative to the room's start, optionally sped
up) against the shard map the operator publishes: a join goes to its shard's relay if that
relay is Ready and below capacity, else it waits; listeners on a relay that is gone
reconnect; listeners on a shard the map moved follow it. It serves the metric contract for
every relay pod on one `/metrics` endpoint, which a real Prometheus scrapes.

`Edge` is the placement model (no I/O); `run` is the shell around it.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from townsquare.api.names import relay_set_name
from townsquare.kube.client import Cluster, load_config
from townsquare.sharding import ShardMap, shard_of
from townsquare.sim.trace import Trace


def demand_at(trace: Trace, t: float) -> int:
    """Listeners the trace wants at `t` (linear between rows, flat outside them)."""
    times = trace.times
    if t <= times[0]:
        return round(trace.listeners[0])
    if t >= times[-1]:
        return round(trace.listeners[-1])
    right = bisect.bisect_right(times, t)
    left = right - 1
    share = (t - times[left]) / (times[right] - times[left])
    return round(trace.listeners[left] + (trace.listeners[right] - trace.listeners[left]) * share)


@dataclass(frozen=True)
class EdgeState:
    """What the edge did in one step, per relay and in all."""

    connected: dict[int, int]
    waiting: int
    wanted: int
    migrated: int
    """Listeners that reconnected to another relay in this step."""


class Edge:
    """Listeners of one room and the relays they are on. Listener i is `listener-i`."""

    def __init__(self) -> None:
        self._relay_of: list[int | None] = []
        self._shard_cache: dict[int, list[int]] = {}

    def _shards(self, shards: int, count: int) -> list[int]:
        cached = self._shard_cache.setdefault(shards, [])
        while len(cached) < count:
            cached.append(shard_of(f"listener-{len(cached)}", shards))
        return cached

    def step(self, wanted: int, shard_map: ShardMap | None, ready: Iterable[int]) -> EdgeState:
        """Move the audience one step towards `wanted` under the map and the Ready relays."""
        relay_of = self._relay_of
        del relay_of[wanted:]  # the last to join leave first
        relay_of.extend([None] * (wanted - len(relay_of)))
        usable = set(ready) & set(shard_map.relays if shard_map else ())
        active = {r for r in usable if shard_map and shard_map.relays[r] == "active"}
        load = dict.fromkeys(usable, 0)
        migrated = 0
        for i, relay in enumerate(relay_of):
            if relay is not None and relay not in usable:
                relay_of[i] = None  # the relay is gone: its listeners must reconnect
            elif relay is not None:
                load[relay] += 1
        if shard_map is None or not active:
            return self._state(load, wanted, migrated)
        capacity = shard_map.capacity
        shard_list = self._shards(shard_map.shards, wanted)
        for i, relay in enumerate(relay_of):
            target = shard_map.assignment[shard_list[i]]
            if target == relay or target not in active or load[target] >= capacity:
                continue
            if relay is not None:
                load[relay] -= 1
                migrated += 1
            relay_of[i] = target
            load[target] += 1
        return self._state(load, wanted, migrated)

    def _state(self, load: dict[int, int], wanted: int, migrated: int) -> EdgeState:
        waiting = sum(1 for relay in self._relay_of if relay is None)
        return EdgeState(connected=load, waiting=waiting, wanted=wanted, migrated=migrated)


@dataclass
class Published:
    """The latest figures, read by the /metrics collector from another thread."""

    namespace: str
    room: str
    state: EdgeState | None = None
    shard_map: ShardMap | None = None


class EdgeCollector(Collector):
    """The metric contract for every relay pod, plus the edge's own queue."""

    def __init__(self, published: Published) -> None:
        self.published = published

    def collect(self) -> Iterator[GaugeMetricFamily]:
        latest = self.published
        labels = ["namespace", "room", "pod"]
        listeners = GaugeMetricFamily(
            "audioroom_relay_listeners", "Connected listeners per relay", labels=labels
        )
        capacity = GaugeMetricFamily(
            "audioroom_relay_capacity_listeners", "Declared relay capacity", labels=labels
        )
        draining = GaugeMetricFamily(
            "audioroom_relay_draining", "1 when the relay accepts no joins", labels=labels
        )
        waiting = GaugeMetricFamily(
            "audioroom_edge_waiting_listeners",
            "Joins held in the admission queue",
            labels=["namespace", "room"],
        )
        wanted = GaugeMetricFamily(
            "audioroom_edge_wanted_listeners",
            "Listeners who want to be connected (the trace's demand)",
            labels=["namespace", "room"],
        )
        if latest.state is not None:
            set_name = relay_set_name(latest.room)
            for relay, count in sorted(latest.state.connected.items()):
                pod = [latest.namespace, latest.room, f"{set_name}-{relay}"]
                listeners.add_metric(pod, count)
                if latest.shard_map is not None:
                    capacity.add_metric(pod, latest.shard_map.capacity)
                    state = latest.shard_map.relays.get(relay)
                    draining.add_metric(pod, 1.0 if state == "draining" else 0.0)
            waiting.add_metric([latest.namespace, latest.room], latest.state.waiting)
            wanted.add_metric([latest.namespace, latest.room], latest.state.wanted)
        yield from (listeners, capacity, draining, waiting, wanted)


def run(
    namespace: str,
    room: str,
    trace: Trace,
    start: datetime,
    port: int,
    speed: float = 1.0,
    interval: float = 1.0,
    stop: threading.Event | None = None,
) -> None:
    """Play `trace` for one room until it ends (or `stop` is set), serving /metrics."""
    cluster = Cluster(load_config())
    published = Published(namespace, room)
    registry = CollectorRegistry()
    registry.register(EdgeCollector(published))
    start_http_server(port, addr="127.0.0.1", registry=registry)
    edge = Edge()
    stop = stop or threading.Event()
    while not stop.is_set():
        trace_t = (time.time() - start.timestamp()) * speed
        published.shard_map = cluster.read_shard_map(namespace, room)
        ready = {pod.ordinal for pod in cluster.relay_pods(namespace, room) if pod.ready}
        published.state = edge.step(demand_at(trace, trace_t), published.shard_map, ready)
        if trace_t > trace.times[-1]:
            break
        stop.wait(interval)
