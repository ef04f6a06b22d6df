"""The operator's own metrics, for the people on call and for the chart's alerts and dashboard.

Per-room series are computed at scrape time from the last status each room's reconcile
produced, so a forgotten room leaves no stale series and a scrape never sees half an update.
Everything lives in one `REGISTRY` of our own, never prometheus-client's global one, so
tests (and the dashboard's test) see exactly what `/metrics` serves.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Literal, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from townsquare.api.models import AudioRoomStatus, Phase
from townsquare.sharding import Admission

PHASES: tuple[Phase, ...] = get_args(Phase)
DecisionReason = Literal[
    "forecast",
    "plan-floor",
    "stabilized",
    "metrics-unavailable",
    "capacity-exceeded",
    "drain-timeout",
]
"""A closed set, so a label value can never carry a room's numbers (one series per reason)."""
DECISION_REASONS: tuple[DecisionReason, ...] = get_args(DecisionReason)
Direction = Literal["up", "down", "hold"]
_LABEL_SAFE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

REGISTRY = CollectorRegistry(auto_describe=True)
"""Everything `/metrics` serves; tests read it directly."""

for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=REGISTRY)

BUILD_INFO = Gauge(
    "townsquare_build_info",
    "The running operator's version (always 1).",
    ["version"],
    registry=REGISTRY,
)
DECISIONS = Counter(
    "townsquare_decisions",
    "Scaling decisions made, by direction and the rule that drove them.",
    ["direction", "reason"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "townsquare_events",
    "Kubernetes Events posted on AudioRooms, by type and reason.",
    ["type", "reason"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "townsquare_reconcile_duration_seconds",
    "Time one reconcile of one room takes: read, decide, write.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "townsquare_reconcile_errors",
    "Reconciles that raised (the room is retried), by exception class.",
    ["error"],
    registry=REGISTRY,
)
QUERY_SECONDS = Histogram(
    "townsquare_prometheus_query_duration_seconds",
    "Latency of the operator's batched Prometheus query, successful or not.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
QUERY_ERRORS = Counter(
    "townsquare_prometheus_query_errors",
    "Prometheus queries that failed (rooms then hold their size), by exception class.",
    ["error"],
    registry=REGISTRY,
)

PARTITION_SHARE = Gauge(
    "townsquare_partition_share_slots",
    "Hash slots (of 256) of this replica's partition: what its replicas together act on.",
    ["partition"],
    registry=REGISTRY,
)
PARTITION_CLAIMED = Gauge(
    "townsquare_partition_claimed_slots",
    "Hash slots this replica acts on now (its claim holds them); 0 for a paused standby.",
    ["partition"],
    registry=REGISTRY,
)


def record_claims(partition: str, share: int, claimed: int) -> None:
    """The replica's share of the slots and how many it acts on: an alert compares their
    sums over a partition's replicas (rooms of slots nobody claims are served by nobody)."""
    PARTITION_SHARE.labels(partition=partition).set(share)
    PARTITION_CLAIMED.labels(partition=partition).set(claimed)


@dataclass(frozen=True, slots=True)
class _RoomView:
    """The figures one room's series show, as plain numbers: thousands of rooms are kept,
    and a whole status model per room would cost several times as much memory."""

    phase: Phase | None
    start: float
    prewarm: float | None
    planned: int | None
    relays: tuple[int, int, int] | None
    """desired, ready, draining"""
    listeners: tuple[int, int, int, int] | None
    """current, forecast, capacity, waiting"""
    conditions: tuple[tuple[str, float], ...]
    """(type, 1.0 if True else 0.0) of conditions that are not Unknown"""
    queueing: bool

    @classmethod
    def of(cls, status: AudioRoomStatus, start: datetime, admission: Admission) -> _RoomView:
        relays, listeners = status.relays, status.listeners
        return cls(
            phase=status.phase,
            start=start.timestamp(),
            prewarm=status.plan.prewarm_at.timestamp() if status.plan else None,
            planned=status.plan.relays if status.plan else None,
            relays=(relays.desired, relays.ready, relays.draining) if relays else None,
            listeners=(
                (listeners.current, listeners.forecast, listeners.capacity, listeners.waiting)
                if listeners
                else None
            ),
            conditions=tuple(
                (c.type, float(c.status == "True"))
                for c in status.conditions
                if c.status != "Unknown"
            ),
            queueing=admission == "queueing",
        )


class _Rooms(Collector):
    """Per-room gauges and rooms by phase, from each room's last status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rooms: dict[tuple[str, str], _RoomView] = {}

    def put(self, key: tuple[str, str], view: _RoomView) -> None:
        with self._lock:
            self._rooms[key] = view

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._rooms.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._rooms.clear()

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            rooms = dict(self._rooms)
        return self._families(rooms)

    @staticmethod
    def _families(rooms: dict[tuple[str, str], _RoomView] | None = None) -> list[Metric]:
        key = ["namespace", "room"]
        by_phase = GaugeMetricFamily(
            "townsquare_rooms", "AudioRooms this operator reconciles, by phase.", labels=["phase"]
        )
        phase = GaugeMetricFamily(
            "townsquare_room_phase", "1 for the room's current phase.", labels=[*key, "phase"]
        )
        start = GaugeMetricFamily(
            "townsquare_room_start_time_seconds",
            "The room's declared start (Unix time).",
            labels=key,
        )
        prewarm = GaugeMetricFamily(
            "townsquare_room_prewarm_time_seconds",
            "When the room's plan starts pre-warming (Unix time).",
            labels=key,
        )
        relays = GaugeMetricFamily(
            "townsquare_room_relays",
            "Relays: planned (declared audience), desired, ready, draining.",
            labels=[*key, "state"],
        )
        listeners = GaugeMetricFamily(
            "townsquare_room_listeners",
            "Listeners: current, forecast, capacity (at target utilization), waiting.",
            labels=[*key, "kind"],
        )
        condition = GaugeMetricFamily(
            "townsquare_room_condition",
            "1 if the condition is True, 0 if False (absent while Unknown).",
            labels=[*key, "type"],
        )
        queueing = GaugeMetricFamily(
            "townsquare_admission_queueing",
            "1 while the room's admission queue holds new joins.",
            labels=key,
        )
        waiting = GaugeMetricFamily(
            "townsquare_admission_waiting_listeners",
            "Listeners held in the admission queue.",
            labels=key,
        )
        counts = dict.fromkeys(PHASES, 0)
        for (namespace, name), view in sorted((rooms or {}).items()):
            labels = [namespace, name]
            start.add_metric(labels, view.start)
            if view.phase:
                counts[view.phase] += 1
                phase.add_metric([*labels, view.phase], 1)
            if view.prewarm is not None and view.planned is not None:
                prewarm.add_metric(labels, view.prewarm)
                relays.add_metric([*labels, "planned"], view.planned)
            if view.relays:
                for state, value in zip(("desired", "ready", "draining"), view.relays, strict=True):
                    relays.add_metric([*labels, state], value)
            if view.listeners:
                kinds = ("current", "forecast", "capacity", "waiting")
                for kind, value in zip(kinds, view.listeners, strict=True):
                    listeners.add_metric([*labels, kind], value)
            for kind, truth in view.conditions:
                condition.add_metric([*labels, kind], truth)
            queueing.add_metric(labels, float(view.queueing))
            waiting.add_metric(labels, view.listeners[3] if view.listeners else 0)
        if rooms is not None:
            for name, count in counts.items():
                by_phase.add_metric([name], count)
        return [by_phase, phase, start, prewarm, relays, listeners, condition, queueing, waiting]


_ROOMS = _Rooms()
REGISTRY.register(_ROOMS)


def _version() -> str:
    try:
        return metadata.version("townsquare")
    except metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(version=_version()).set(1)


def observe_room(
    namespace: str,
    name: str,
    status: AudioRoomStatus,
    start: datetime,
    admission: Admission | None = None,
) -> None:
    """Publish a room's status as just written (call after every reconcile of the room).

    Without `admission`, the queue counts as holding joins while listeners are waiting.
    """
    if admission is None:
        waiting = status.listeners.waiting if status.listeners else 0
        admission = "queueing" if waiting > 0 else "open"
    _ROOMS.put((namespace, name), _RoomView.of(status, start, admission))


def forget_room(namespace: str, name: str) -> None:
    """The room is gone or no longer ours: its series disappear at the next scrape."""
    _ROOMS.drop((namespace, name))


def forget_all_rooms() -> None:
    """Drop every room (for tests, and for an operator that lost its leadership)."""
    _ROOMS.clear()


def decision_reason(
    *,
    metrics_available: bool,
    capacity_exceeded: bool,
    plan_floor_binding: bool,
    drain_timed_out: bool,
    direction: Direction,
) -> DecisionReason:
    """The one rule that best explains a decision, most urgent first."""
    if drain_timed_out:
        return "drain-timeout"
    if not metrics_available:
        return "metrics-unavailable"
    if capacity_exceeded:
        return "capacity-exceeded"
    if plan_floor_binding:
        return "plan-floor"
    return "stabilized" if direction == "hold" else "forecast"


def record_decision(direction: Direction, reason: DecisionReason) -> None:
    """Count one scaling decision."""
    if reason not in DECISION_REASONS:
        raise ValueError(f"unknown decision reason {reason!r}: use one of {DECISION_REASONS}")
    DECISIONS.labels(direction=direction, reason=reason).inc()


def record_event(event_type: str, reason: str) -> None:
    """Count one Event posted on a room (reasons are the operator's fixed vocabulary)."""
    EVENTS.labels(type=event_type, reason=reason).inc()


@contextmanager
def _timed(duration: Histogram, errors: Counter) -> Iterator[None]:
    began = time.perf_counter()
    try:
        yield
    except Exception as error:
        errors.labels(error=type(error).__name__).inc()
        raise
    finally:
        duration.observe(time.perf_counter() - began)


def time_reconcile() -> AbstractContextManager[None]:
    """Around one reconcile: its duration, and its exception class if it raises."""
    return _timed(RECONCILE_SECONDS, RECONCILE_ERRORS)


def time_prometheus_query() -> AbstractContextManager[None]:
    """Around one Prometheus query: its latency, and its exception class if it raises."""
    return _timed(QUERY_SECONDS, QUERY_ERRORS)


def record_prometheus_query(seconds: float, error: str | None = None) -> None:
    """One Prometheus query that was timed by the caller; `error` names its failure.

    For callers that turn failures into values instead of raising. The name becomes a
    label, so anything but a short identifier (an exception class, say) counts as "Other".
    """
    QUERY_SECONDS.observe(seconds)
    if error is not None:
        QUERY_ERRORS.labels(error=error if _LABEL_SAFE.fullmatch(error) else "Other").inc()


def serve(port: int, address: str = "0.0.0.0") -> WSGIServer:
    """Serve `/metrics` on a daemon thread; `shutdown()` on the result stops it.

    All addresses by default: Prometheus scrapes the pod from outside.
    """
    server, _thread = start_http_server(port, addr=address, registry=REGISTRY)
    return server


def exported_names() -> set[str]:
    """Every sample name `/metrics` can serve (with _total, _bucket, ... suffixes)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "count", "sum", "created")}
        names |= {sample.name for sample in family.samples}
    return names
