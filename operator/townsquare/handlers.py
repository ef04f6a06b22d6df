"""kopf wiring: read the room and its relays, call the core once, write what it decided.

Each room has one daemon that sleeps until its next deadline (a room months ahead costs a
sleeping coroutine) and wakes early when the room's spec or its children change.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from townsquare.api.models import GROUP, PLURAL, VERSION, AudioRoomSpec, AudioRoomStatus
from townsquare.kube import children
from townsquare.kube.client import Cluster, load_config
from townsquare.lifecycle import Observed, Outcome, reconcile
from townsquare.telemetry import room_logger

ANNOTATION_PREFIX = GROUP
RETRY_SECONDS = 5.0
Key = tuple[str, str]
REGISTRY = kopf.OperatorRegistry()
"""The operator's handlers, kept apart from kopf's default registry."""


@dataclass
class Runtime:
    """Operator-wide state shared by every handler through kopf's memo."""

    cluster: Cluster
    pokes: dict[Key, asyncio.Event] = field(default_factory=dict)
    applied: dict[Key, dict[str, str]] = field(default_factory=dict)
    """Per room, a digest of each child as last applied: unchanged children are not re-sent."""


@kopf.on.login(registry=REGISTRY)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same credentials the kubernetes client uses (in-cluster or KUBECONFIG)."""
    info: kopf.ConnectionInfo | None = kopf.login_via_client(**kwargs)
    return info


@kopf.on.startup(registry=REGISTRY)
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Progress in annotations under our prefix (never pruned status), and one client."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    api = load_config()
    api.configuration.connection_pool_maxsize = 32
    memo.runtime = Runtime(cluster=Cluster(api))


def _runtime(memo: Any) -> Runtime:
    runtime: Runtime = memo.runtime
    return runtime


def _poke(memo: Any, namespace: str | None, room: str | None) -> None:
    if namespace and room:
        _runtime(memo).pokes.setdefault((namespace, room), asyncio.Event()).set()


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0, registry=REGISTRY)
async def run_room(
    name: str, namespace: str | None, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    """Reconcile the room, then sleep until its next deadline or a poke."""
    assert namespace is not None, "AudioRoom is namespaced"
    runtime = _runtime(memo)
    key = (namespace, name)
    poke = runtime.pokes.setdefault(key, asyncio.Event())
    log = room_logger(namespace, name)
    try:
        while not stopped:
            poke.clear()
            try:
                wake_at = await asyncio.to_thread(reconcile_room, runtime, namespace, name)
                delay = _seconds_until(wake_at)
            except Exception:
                log.exception("reconcile failed; retrying", retry_seconds=RETRY_SECONDS)
                delay = RETRY_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poke.wait(), timeout=delay)
    finally:
        runtime.pokes.pop(key, None)
        runtime.applied.pop(key, None)


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
        _poke(memo, namespace, name)


def _on_child(kind: str) -> Any:
    def child_changed(
        name: str, namespace: str | None, labels: kopf.Labels, memo: Any, **_: Any
    ) -> None:
        """A child changed (readiness, or by hand): re-apply it and reconcile its room."""
        room = labels.get(children.ROOM_LABEL)
        if room and namespace:
            _runtime(memo).applied.get((namespace, room), {}).pop(f"{kind}/{name}", None)
            _poke(memo, namespace, room)

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


def reconcile_room(runtime: Runtime, namespace: str, name: str) -> datetime | None:
    """One pass for one room: read, decide, write. Returns when to look again."""
    cluster = runtime.cluster
    room = cluster.read_room(namespace, name)
    spec = AudioRoomSpec.model_validate(room["spec"])
    previous = AudioRoomStatus.model_validate(room.get("status") or {})
    now = datetime.now(UTC)
    seen = Observed(
        now=now,
        generation=room["metadata"]["generation"],
        ready_relays=cluster.ready_relays(namespace, name),
    )
    outcome = reconcile(spec, previous, seen)
    _apply_children(runtime, room, spec, outcome)
    _write_status(cluster, namespace, name, previous, outcome)
    log = room_logger(namespace, name)
    for event in outcome.events:
        cluster.post_event(room, event.type, event.reason, event.message, now)
        log.info("event", type=event.type, reason=event.reason, message=event.message)
    return outcome.wake_at


def _apply_children(
    runtime: Runtime, room: dict[str, Any], spec: AudioRoomSpec, outcome: Outcome
) -> None:
    meta = room["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    shard_map = json.dumps(
        {"relays": outcome.desired_relays, "draining": outcome.draining}, sort_keys=True
    )
    wanted = [
        children.relay_service(name, namespace, uid, spec),
        children.shard_map_config_map(name, namespace, uid, shard_map),
        children.relay_disruption_budget(name, namespace, uid),
        children.relay_stateful_set(name, namespace, uid, spec, outcome.desired_relays),
    ]
    applied = runtime.applied.setdefault((namespace, name), {})
    for manifest in wanted:
        key = f"{manifest['kind']}/{manifest['metadata']['name']}"
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        if applied.get(key) != digest:
            runtime.cluster.apply(manifest)
            applied[key] = digest


def _write_status(
    cluster: Cluster, namespace: str, name: str, previous: AudioRoomStatus, outcome: Outcome
) -> None:
    if outcome.status == previous:
        return
    cluster.patch_status(
        namespace, name, outcome.status.model_dump(by_alias=True, mode="json", exclude_none=True)
    )
