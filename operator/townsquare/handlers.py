"""kopf wiring: read the room and its relays, call the core once, write what it decided.

Each room has one daemon that sleeps until its next deadline (a room months ahead costs a
sleeping coroutine) and wakes early when its spec or children change, or when a new reading
of listeners arrives. One poller reads Prometheus for all rooms per tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from townsquare import observability
from townsquare.api.models import GROUP, PLURAL, VERSION, AudioRoomSpec, AudioRoomStatus
from townsquare.kube import children
from townsquare.kube.client import Cluster, load_config
from townsquare.lifecycle import Metrics, Observed, Outcome, reconcile, stored_scaling_state
from townsquare.metrics import (
    PrometheusSource,
    Reading,
    Source,
    aged,
    choose_prometheus,
    room_metrics,
)
from townsquare.scaling import ScalingState
from townsquare.sharding import ShardMap
from townsquare.telemetry import room_logger

ANNOTATION_PREFIX = GROUP
RETRY_SECONDS = 5.0
Key = tuple[str, str]
REGISTRY = kopf.OperatorRegistry()
"""The operator's handlers, kept apart from kopf's default registry."""


@dataclass(frozen=True)
class Settings:
    """Operator-wide options, from the command line."""

    prometheus_url: str | None = None
    allowed_prometheus_urls: tuple[str, ...] = ()
    """URLs a room's spec.metrics.prometheusUrl may name, besides the default."""
    metrics_interval: timedelta = timedelta(seconds=15)
    metrics_max_age: timedelta = timedelta(seconds=60)


@dataclass
class RoomState:
    """What the operator keeps in memory about one room, in one place: forgetting the room
    forgets all of it at once."""

    poke: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to reconcile now rather than at the next deadline (only from the event loop)."""
    spec: AudioRoomSpec | None = None
    """The spec last reconciled: the poller reads listeners for rooms that have one."""
    applied: dict[str, str] = field(default_factory=dict)
    """A digest of each child as last applied: unchanged children are not re-sent."""
    reading: Metrics | None = None
    """The poller's latest reading of this room's listeners."""
    scaling: ScalingState | None = None
    shard_map: ShardMap | None = None
    shard_map_at: datetime | None = None
    """When `shard_map` was published, for the migration budget."""


@dataclass
class Runtime:
    """Operator-wide state shared by every handler through kopf's memo."""

    cluster: Cluster
    settings: Settings
    loop: asyncio.AbstractEventLoop
    rooms: dict[Key, RoomState] = field(default_factory=dict)
    sources: dict[str, PrometheusSource] = field(default_factory=dict)

    def room(self, key: Key) -> RoomState:
        """The room's state, created on first use (call on the event loop)."""
        state = self.rooms.get(key)
        if state is None:
            state = self.rooms[key] = RoomState()
        return state

    def prometheus_for(self, spec: AudioRoomSpec) -> Source:
        settings = self.settings
        return choose_prometheus(
            spec.metrics.prometheus_url, settings.prometheus_url, settings.allowed_prometheus_urls
        )

    def wake(self, namespace: str | None, name: str | None) -> None:
        """Reconcile the room now; safe from any thread (kopf's sync handlers run in a pool,
        and an asyncio.Event may be set only on its own loop)."""
        if namespace and name:
            self.loop.call_soon_threadsafe(self._wake_on_loop, (namespace, name))

    def _wake_on_loop(self, key: Key) -> None:
        state = self.rooms.get(key)  # a deleted room has no daemon, and no state
        if state is not None:
            state.poke.set()

    def forget(self, key: Key) -> None:
        self.rooms.pop(key, None)


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials the kubernetes client uses (in-cluster or KUBECONFIG)."""
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info


@kopf.on.startup(registry=REGISTRY)
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    """Progress in annotations under our prefix (never pruned status), one client, a poller."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    api = load_config()
    api.configuration.connection_pool_maxsize = 32
    options: Settings = getattr(memo, "settings", None) or Settings()
    runtime = Runtime(cluster=Cluster(api), settings=options, loop=asyncio.get_running_loop())
    memo.runtime = runtime
    memo.poller = asyncio.create_task(poll_metrics(runtime))


@kopf.on.cleanup(registry=REGISTRY)
async def stop_poller(memo: Any, **_: Any) -> None:
    poller: asyncio.Task[None] | None = getattr(memo, "poller", None)
    if poller is not None:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


async def poll_metrics(runtime: Runtime) -> None:
    """Every tick: one batched query per Prometheus and preset, then wake the rooms read."""
    log = room_logger("-", "-").bind(component="metrics")
    last: dict[Key, Metrics] = {}
    while True:
        try:
            await asyncio.to_thread(read_listeners, runtime)
        except Exception:
            log.exception("reading listeners failed")
        for key, state in list(runtime.rooms.items()):
            if state.reading is not None and _figures(state.reading) != _figures(last.get(key)):
                state.poke.set()
        last = {key: state.reading for key, state in runtime.rooms.items() if state.reading}
        await asyncio.sleep(runtime.settings.metrics_interval.total_seconds())


def _figures(reading: Metrics | None) -> tuple[Any, ...] | None:
    """What a room decides on; a new sample time alone wakes nobody."""
    if reading is None:
        return None
    return (reading.listeners, reading.waiting, dict(reading.by_relay), reading.problem)


def read_listeners(runtime: Runtime) -> None:
    """Fill each watched room's `reading` (blocking: runs in a worker thread)."""
    now = datetime.now(UTC)
    groups: dict[tuple[str, str], list[tuple[Key, RoomState]]] = defaultdict(list)
    for key, state in list(runtime.rooms.items()):
        spec = state.spec
        url = runtime.prometheus_for(spec).url if spec else None
        if spec is None or url is None:
            continue
        source = runtime.sources.setdefault(url, PrometheusSource(url))
        if spec.metrics.listeners_query:
            reading = _timed_read(source.read_room, spec.metrics, *key)
            state.reading = room_metrics(reading, key, now, runtime.settings.metrics_max_age)
        else:
            groups[(url, spec.metrics.preset)].append((key, state))
    for (url, preset), rooms in groups.items():
        reading = _timed_read(runtime.sources[url].read, preset)
        for key, state in rooms:
            state.reading = room_metrics(reading, key, now, runtime.settings.metrics_max_age)


async def _first_reading(runtime: Runtime, state: RoomState, spec: AudioRoomSpec) -> None:
    """Wait (briefly) until the poller has read this room, so that a restarted operator
    decides with data instead of reporting metrics missing meanwhile."""
    if runtime.prometheus_for(spec).url is None:
        return
    state.spec = spec
    deadline = 3 * runtime.settings.metrics_interval.total_seconds() + 5
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline):
            while state.reading is None:
                await asyncio.sleep(0.1)


def _timed_read(read: Callable[..., Reading], *args: Any) -> Reading:
    began = time.perf_counter()
    reading = read(*args)
    failure = "Unreachable" if reading.error else None
    observability.record_prometheus_query(time.perf_counter() - began, failure)
    return reading


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0, registry=REGISTRY)
async def run_room(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    stopped: kopf.DaemonStopped,
    memo: Any,
    **_: Any,
) -> None:
    """Reconcile the room, then sleep until its next deadline or a poke."""
    assert namespace is not None, "AudioRoom is namespaced"
    runtime = _runtime(memo)
    key = (namespace, name)
    state = runtime.room(key)
    log = room_logger(namespace, name)
    with contextlib.suppress(ValueError):
        await _first_reading(runtime, state, AudioRoomSpec.model_validate(dict(spec)))
    try:
        while not stopped:
            state.poke.clear()
            try:
                with observability.time_reconcile():
                    wake_at = await asyncio.to_thread(
                        reconcile_room, runtime, state, namespace, name
                    )
                delay = _seconds_until(wake_at)
            except Exception:
                log.exception("reconcile failed; retrying", retry_seconds=RETRY_SECONDS)
                delay = RETRY_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.poke.wait(), timeout=delay)
    finally:
        runtime.forget(key)
        observability.forget_room(namespace, name)


def _seconds_until(moment: datetime | None) -> float | None:
    if moment is None:
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds()) + 0.05


@kopf.on.event(GROUP, VERSION, PLURAL, registry=REGISTRY)
def room_changed(
    name: str, namespace: str | None, meta: kopf.Meta, status: kopf.Status, memo: Any, **_: Any
) -> None:
    """A new generation of the spec is reconciled at once, not at the next deadline."""
    if meta.get("generation") != status.get("observedGeneration"):
        _runtime(memo).wake(namespace, name)


def _on_child(kind: str) -> Any:
    def child_changed(
        name: str, namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
    ) -> None:
        """A child changed (readiness, or by hand): re-apply it and reconcile its room."""
        room = labels.get(children.ROOM_LABEL)
        if room and namespace:
            runtime = _runtime(memo)
            state = runtime.rooms.get((namespace, room))
            if state is not None:
                state.applied.pop(f"{kind}/{name}", None)
            runtime.wake(namespace, room)

    return child_changed


for _group_version, _plural, _kind in [
    ("apps/v1", "statefulsets", "StatefulSet"),
    ("v1", "services", "Service"),
    ("v1", "configmaps", "ConfigMap"),
    ("policy/v1", "poddisruptionbudgets", "PodDisruptionBudget"),
]:
    kopf.on.event(
        _group_version,
        _plural,
        labels={children.MANAGED_BY_LABEL: children.MANAGER},
        registry=REGISTRY,
    )(_on_child(_kind))


def reconcile_room(
    runtime: Runtime, state: RoomState, namespace: str, name: str
) -> datetime | None:
    """One pass for one room: read, decide, write. Returns when to look again."""
    cluster = runtime.cluster
    room = cluster.read_room(namespace, name)
    if room["metadata"].get("deletionTimestamp"):
        # Deletion bumps a custom resource's generation: reconciling now would re-plan a
        # room that is going away, and post Events about it.
        return None
    spec = AudioRoomSpec.model_validate(room["spec"])
    previous = AudioRoomStatus.model_validate(room.get("status") or {})
    pods = cluster.relay_pods(namespace, name)
    state.spec = spec
    now = datetime.now(UTC)
    metrics = None
    source = runtime.prometheus_for(spec)
    if source.refusal:
        metrics = Metrics(listeners=None, problem=source.refusal)
    elif source.url:
        reading = state.reading or Metrics(listeners=None, problem="no reading yet")
        metrics = aged(reading, now, runtime.settings.metrics_max_age)
    ready = frozenset(pod.ordinal for pod in pods if pod.ready)
    shard_map, map_at = state.shard_map, state.shard_map_at
    if shard_map is None:
        shard_map = cluster.read_shard_map(namespace, name)
    seen = Observed(
        now=now,
        generation=room["metadata"]["generation"],
        ready_relays=len(ready),
        ready_ordinals=ready,
        metrics=metrics,
        startups=tuple(
            (pod.created, seconds) for pod in pods if (seconds := pod.startup_seconds) is not None
        ),
    )
    scaling = state.scaling or stored_scaling_state(previous)
    outcome = reconcile(name, spec, previous, seen, scaling, shard_map, map_at)
    state.scaling = outcome.scaling_state
    if shard_map is None or outcome.shard_map.generation != shard_map.generation:
        state.shard_map, state.shard_map_at = outcome.shard_map, now
    # Status first: what a person reads never lags behind the children it describes. Then
    # the Events it implies, before anything else can fail: a recorded change is never
    # reconciled again, so an Event not posted now would be lost.
    _write_status(cluster, namespace, name, previous, outcome)
    _post_events(cluster, room, outcome, now)
    _apply_children(cluster, state, room, spec, outcome)
    _observe(namespace, name, spec, outcome)
    return outcome.wake_at


def _observe(namespace: str, name: str, spec: AudioRoomSpec, outcome: Outcome) -> None:
    """The operator's own /metrics: the room as recorded, and the decision with its rule."""
    admission = outcome.shard_map.admission
    observability.observe_room(namespace, name, outcome.status, spec.start_time, admission)
    decision = outcome.decision
    if decision is not None:
        reason = observability.decision_reason(
            metrics_available=decision.metrics_available,
            capacity_exceeded=decision.capacity_exceeded,
            plan_floor_binding=decision.floor_bound,
            drain_timed_out=bool(decision.drain_timed_out),
            direction=decision.direction,
        )
        observability.record_decision(decision.direction, reason)


def _post_events(cluster: Cluster, room: dict[str, Any], outcome: Outcome, now: datetime) -> None:
    meta = room["metadata"]
    log = room_logger(meta["namespace"], meta["name"])
    for event in outcome.events:
        try:
            cluster.post_event(room, event.type, event.reason, event.message, now)
        except Exception:  # one Event refused must not cost the others
            log.exception("posting an Event failed", reason=event.reason)
            continue
        observability.record_event(event.type, event.reason)
        log.info("event", type=event.type, reason=event.reason, message=event.message)


def _apply_children(
    cluster: Cluster, state: RoomState, room: dict[str, Any], spec: AudioRoomSpec, outcome: Outcome
) -> None:
    meta = room["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    shard_map = json.dumps(outcome.shard_map.to_dict(), separators=(",", ":"))
    wanted = [
        children.relay_service(name, namespace, uid, spec),
        children.shard_map_config_map(name, namespace, uid, shard_map),
        children.relay_disruption_budget(name, namespace, uid),
        children.relay_stateful_set(name, namespace, uid, spec, outcome.desired_relays),
    ]
    applied = state.applied
    for manifest in wanted:
        key = f"{manifest['kind']}/{manifest['metadata']['name']}"
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        if applied.get(key) != digest:
            cluster.apply(manifest)
            applied[key] = digest


def _write_status(
    cluster: Cluster, namespace: str, name: str, previous: AudioRoomStatus, outcome: Outcome
) -> None:
    if outcome.status == previous:
        return
    cluster.patch_status(
        namespace, name, outcome.status.model_dump(by_alias=True, mode="json", exclude_none=True)
    )
