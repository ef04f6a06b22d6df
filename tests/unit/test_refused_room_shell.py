"""A room refused after it ran, through the operator's shell: what reaches the API server.

The cluster here is a recorder standing in for the API server (the pure decisions are
tested in test_lifecycle_reentry.py); the verdict is what the shell sends it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from townsquare.api.models import AudioRoomSpec, AudioRoomStatus, MetricsSpec
from townsquare.handlers import RoomState, Runtime, Settings, reconcile_room
from townsquare.headroom import Placeholder
from townsquare.kube.children import SHARD_MAP_KEY
from townsquare.kube.client import FINALIZER, Cluster
from townsquare.lifecycle import Metrics, Observed, accepted_spec, reconcile
from townsquare.policy import TenantPolicy
from townsquare.sharding import ShardMap, new_map


class RecordingCluster:
    """Answers the reads of one room and records every write."""

    def __init__(self, room: dict[str, Any], shard_map: ShardMap) -> None:
        self.room = room
        self.shard_map = shard_map
        self.applied: list[dict[str, Any]] = []
        self.scaled: list[int] = []
        self.reasons: list[str] = []
        self.released: list[str] = []
        self.deleted: list[str] = []
        self.map_written_at = datetime.min.replace(tzinfo=UTC)

    def fenced(self, fence: Any) -> RecordingCluster:
        return self

    def room_if_exists(self, namespace: str, name: str) -> dict[str, Any]:
        return self.room

    def read_shard_map(self, namespace: str, room: str) -> ShardMap:
        return self.shard_map

    def relay_template(self, namespace: str, room: str) -> tuple[str, bool]:
        return "", True

    def pod_creation_failures(self, namespace: str, room: str) -> tuple[()]:
        return ()

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.room["status"] = status

    def post_event(self, room: Any, kind: str, reason: str, message: str, now: Any) -> None:
        self.reasons.append(reason)

    def apply(self, manifest: dict[str, Any]) -> tuple[str, int]:
        self.applied.append(manifest)
        return ("1", 1)

    def scale_relays(self, namespace: str, room: str, replicas: int) -> None:
        self.scaled.append(replicas)

    def hold_room(self, room: dict[str, Any]) -> None:
        raise AssertionError("a room being deleted is not held again")

    def release_room(self, room: dict[str, Any]) -> None:
        self.released.append(room["metadata"]["name"])

    def delete_pod(self, namespace: str, name: str) -> None:
        self.deleted.append(name)


def live_room(start: datetime) -> tuple[dict[str, Any], ShardMap]:
    """A room live since 10 minutes after `start` for 2,000 listeners, as stored."""
    spec = AudioRoomSpec.model_validate(
        {
            "startTime": start,
            "duration": "1h",
            "expectedAudience": 2000,
            "relay": {"image": "registry.example/relay:1", "listenersPerRelay": 1000},
            "scaling": {"minRelays": 1, "prewarmLead": "2m", "drainTimeout": "5m"},
        }
    )
    at = start + timedelta(minutes=10)
    metrics = Metrics(listeners=2000, by_relay=dict.fromkeys(range(4), 500), sampled_at=at)
    live = reconcile("r", spec, AudioRoomStatus(), Observed(at, 1, 4, metrics=metrics))
    assert live.status.phase == "Live"
    room = {
        "metadata": {"name": "r", "namespace": "t", "uid": "u", "generation": 1},
        "spec": spec.model_dump(by_alias=True, mode="json", exclude_none=True),
        "status": live.status.model_dump(by_alias=True, mode="json", exclude_none=True),
    }
    return room, live.shard_map


def one_pass(
    cluster: RecordingCluster,
    deleting: bool = False,
    settings: Settings | None = None,
    state: RoomState | None = None,
    holding: tuple[Placeholder, ...] = (),
) -> Any:
    async def scenario() -> Any:
        policy = TenantPolicy(allowed_registries=("other.example",))
        runtime = Runtime(
            cluster=cast(Cluster, cluster),
            settings=settings or Settings(policy=policy),
            loop=asyncio.get_running_loop(),
            indexes={"relay_pod_index": {}, "placeholder_index": {}},
        )
        return reconcile_room(
            runtime, state or RoomState(generation=1), "t", "r", [], holding, deleting=deleting
        )

    return asyncio.run(scenario())


def test_a_room_refused_while_live_is_left_as_it_runs() -> None:
    cluster = RecordingCluster(*live_room(datetime.now(UTC) - timedelta(minutes=20)))
    outcome = one_pass(cluster)
    assert outcome.refused
    assert cluster.applied == [] and cluster.scaled == [], "nothing of the refused spec"
    assert cluster.reasons == ["Refused"]


def test_a_room_refused_after_its_end_sends_only_its_relay_count_and_map() -> None:
    """Past the end, the refused room drains: the shell sends the shard map (closed to
    joins) and the relay count, never the StatefulSet built from the refused spec."""
    cluster = RecordingCluster(*live_room(datetime.now(UTC) - timedelta(hours=1, minutes=1)))
    outcome = one_pass(cluster)
    assert outcome.refused and outcome.children
    assert [m["kind"] for m in cluster.applied] == ["ConfigMap"]
    assert '"admission":"closed"' in cluster.applied[0]["data"][SHARD_MAP_KEY]
    assert cluster.scaled == [outcome.desired_relays]
    assert "Refused" in cluster.reasons and "Draining" in cluster.reasons
    assert cluster.room["status"]["phase"] == "Draining"


def test_a_refused_room_deleted_mid_event_never_sends_its_refused_template() -> None:
    """A tenant edits a live room to a disallowed image, then deletes it. The old shell
    applied the StatefulSet built from that spec in the deletion's drain: every relay rolled
    to the disallowed image. Now the deleted room winds down as a refused one: the shard
    map and the relay count only, then the room is released."""
    room, shard_map = live_room(datetime.now(UTC) - timedelta(minutes=20))
    room["spec"]["relay"]["image"] = "evil.example/miner:1"
    room["metadata"]["generation"] = 2
    cluster = RecordingCluster(room, shard_map)
    held = one_pass(cluster)
    assert held.refused and cluster.applied == [] and cluster.scaled == []
    room["metadata"]["deletionTimestamp"] = datetime.now(UTC).isoformat()
    room["metadata"]["generation"] = 3
    draining = one_pass(cluster, deleting=True)
    assert draining.refused and draining.status.phase == "Draining"
    assert [m["kind"] for m in cluster.applied] == ["ConfigMap"], "no StatefulSet"
    assert '"admission":"closed"' in cluster.applied[0]["data"][SHARD_MAP_KEY]
    assert cluster.scaled == [draining.desired_relays] and cluster.released == []
    room["status"]["relays"]["desired"] = 0  # as if every relay had drained
    cluster.applied.clear()
    released = one_pass(cluster, deleting=True)
    assert released.refused and released.released
    assert cluster.released == ["r"] and cluster.applied == []


def test_a_refused_room_is_counted_by_the_platform_s_query_not_its_own() -> None:
    """Its own query, where the policy refuses it, may reach other tenants' series; the
    metric contract on the operator's own Prometheus shows only its relays, which it needs
    to drain by their counts."""
    reaching = AudioRoomSpec.model_validate(
        {
            "startTime": datetime.now(UTC),
            "duration": "1h",
            "expectedAudience": 10,
            "relay": {"image": "registry.example/relay:1"},
            "metrics": {"listenersQuery": "sum by (pod) (audioroom_relay_listeners)"},
        }
    )

    async def scenario() -> tuple[MetricsSpec, MetricsSpec]:
        policy = TenantPolicy(
            allowed_registries=("other.example",), free_promql_namespaces=frozenset({"own"})
        )
        runtime = Runtime(
            cluster=cast(Cluster, object()),
            settings=Settings(policy=policy),
            loop=asyncio.get_running_loop(),
            indexes={"relay_pod_index": {}, "placeholder_index": {}},
        )
        relay = reaching.relay.model_copy(update={"image": "other.example/relay:1"})
        allowed = reaching.model_copy(update={"relay": relay})
        return runtime.metrics_read_for("t", reaching), runtime.metrics_read_for("own", allowed)

    refused, accepted = asyncio.run(scenario())
    assert refused == MetricsSpec()
    assert accepted.listeners_query == reaching.metrics.listeners_query


def test_a_refused_room_is_read_with_its_last_accepted_query_where_the_policy_allows_it() -> None:
    """A room on the `livekit` preset is edited to a disallowed image. The old shell read
    it with the default query (the metric contract), which a LiveKit relay does not
    export: the room wound down blind, every relay kept to drainTimeout. Now its last
    accepted source stands, part by part: only what the policy refuses falls back."""
    room, shard_map = live_room(datetime.now(UTC) - timedelta(minutes=20))
    room["spec"]["metrics"] = {"preset": "livekit"}
    room["status"]["acceptedSpec"] = json.dumps({**room["spec"], "metrics": {"preset": "livekit"}})
    room["spec"]["relay"]["image"] = "evil.example/miner:1"
    room["spec"]["metrics"] = {"listenersQuery": "sum(audioroom_relay_listeners)"}
    room["metadata"]["generation"] = 2
    cluster = RecordingCluster(room, shard_map)
    policy = TenantPolicy(
        allowed_registries=("registry.example",), free_promql_namespaces=frozenset()
    )
    state = RoomState(generation=2)
    settings = Settings(policy=policy, prometheus_url="http://127.0.0.1:9")
    outcome = one_pass(cluster, settings=settings, state=state)
    assert outcome.refused
    assert state.metrics == MetricsSpec(preset="livekit"), "the accepted source, not its edit"


def test_only_the_part_of_a_last_accepted_source_the_policy_now_refuses_falls_back() -> None:
    async def scenario() -> MetricsSpec:
        runtime = Runtime(
            cluster=cast(Cluster, object()),
            settings=Settings(
                policy=TenantPolicy(
                    allowed_registries=("registry.example",), free_promql_namespaces=frozenset()
                )
            ),
            loop=asyncio.get_running_loop(),
            indexes={"relay_pod_index": {}, "placeholder_index": {}},
        )
        base = {
            "startTime": datetime.now(UTC),
            "duration": "1h",
            "expectedAudience": 10,
            "relay": {"image": "registry.example/relay:1"},
        }
        accepted = AudioRoomSpec.model_validate(
            {**base, "metrics": {"preset": "livekit", "listenersQuery": "sum(x)"}}
        )
        refused = AudioRoomSpec.model_validate({**base, "relay": {"image": "evil.example/relay:1"}})
        return runtime.metrics_read_for("t", refused, accepted)

    read = asyncio.run(scenario())
    assert read == MetricsSpec(preset="livekit"), "free PromQL is refused now; the preset is not"


def test_a_refused_room_s_placeholders_are_deleted() -> None:
    """Scheduled with node headroom and placeholders holding nodes, then refused. The old
    shell never touched them: they held nodes (and cost) for relays that would not come."""
    start = datetime.now(UTC) + timedelta(minutes=8)
    spec = AudioRoomSpec.model_validate(
        {
            "startTime": start,
            "duration": "1h",
            "expectedAudience": 2000,
            "relay": {"image": "registry.example/relay:1"},
            "scaling": {"prewarmLead": "2m"},
            "nodeHeadroom": {"enabled": True, "leadTime": "10m"},
        }
    )
    room = {
        "metadata": {"name": "r", "namespace": "t", "uid": "u", "generation": 1},
        "spec": spec.model_dump(by_alias=True, mode="json", exclude_none=True),
    }
    cluster = RecordingCluster(room, ShardMap.from_dict(new_map(16, 1000).to_dict()))
    now = datetime.now(UTC)
    holding = tuple(Placeholder(f"r-headroom-{i}", now, now) for i in range(3))
    outcome = one_pass(cluster, holding=holding)
    assert outcome.refused
    assert sorted(cluster.deleted) == ["r-headroom-0", "r-headroom-1", "r-headroom-2"]
    assert cluster.applied == [] and cluster.scaled == []


def test_a_refused_wind_down_sends_its_map_and_relay_count_only_when_they_change() -> None:
    """The old shell sent the shard map and the relay count on every pass of a refused
    room's wind-down, though neither had changed: two writes a pass for nothing."""
    cluster = RecordingCluster(*live_room(datetime.now(UTC) - timedelta(hours=1, minutes=1)))
    state = RoomState(generation=1)
    first = one_pass(cluster, state=state)
    assert first.refused and first.children
    assert [m["kind"] for m in cluster.applied] == ["ConfigMap"]
    assert cluster.scaled == [first.desired_relays]
    again = one_pass(cluster, state=state)
    assert again.shard_map == first.shard_map and again.desired_relays == first.desired_relays
    assert len(cluster.applied) == 1 and len(cluster.scaled) == 1, "nothing changed: no write"


class SlowMapCluster(RecordingCluster):
    """Publishing the shard map takes a while (a slow API server), as it may."""

    def apply(self, manifest: dict[str, Any]) -> tuple[str, int]:
        if manifest["kind"] == "ConfigMap":
            time.sleep(0.05)
            self.map_written_at = datetime.now(UTC)
        return super().apply(manifest)


def test_the_map_is_taken_as_published_when_its_write_returns_not_when_the_pass_began() -> None:
    """The old shell dated a map from the start of the pass that decided it: a slow write
    made the end drain take a reading from before listeners could move for one taken
    after. Now the map counts as published once its write returned."""
    room, shard_map = live_room(datetime.now(UTC) - timedelta(minutes=20))
    room["metadata"]["finalizers"] = [FINALIZER]
    room["spec"]["expectedAudience"] = 3000  # the room grows: a new map is published
    room["metadata"]["generation"] = 2
    cluster = SlowMapCluster(room, shard_map)
    state = RoomState(generation=2)
    began = datetime.now(UTC)
    outcome = one_pass(cluster, settings=Settings(), state=state)
    assert not outcome.refused and "ConfigMap" in [m["kind"] for m in cluster.applied]
    assert state.shard_map_at is not None
    assert state.shard_map_at >= cluster.map_written_at > began + timedelta(seconds=0.04)


class MergingCluster(RecordingCluster):
    """Stores a status patch as the API server does: a JSON merge patch (RFC 7386), which
    leaves alone the keys of an object that the patch leaves out."""

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        def merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
            for key, value in patch.items():
                if value is None:
                    into.pop(key, None)
                elif isinstance(value, dict) and isinstance(into.get(key), dict):
                    merge(into[key], value)
                else:
                    into[key] = value

        merge(self.room.setdefault("status", {}), status)


def test_the_accepted_spec_kept_drops_what_a_later_spec_dropped() -> None:
    """A spec written with node headroom on, then edited back to the default. Kept as an
    object, the merge patch of the status would have left `nodeHeadroom` in it for good:
    a refused room would later wind down on a spec nobody wrote."""
    room, shard_map = live_room(datetime.now(UTC) - timedelta(minutes=20))
    room["metadata"]["finalizers"] = [FINALIZER]
    room["spec"]["nodeHeadroom"] = {"enabled": True}
    cluster = MergingCluster(room, shard_map)
    one_pass(cluster, settings=Settings(), state=RoomState(generation=1))
    kept = accepted_spec(AudioRoomStatus.model_validate(cluster.room["status"]))
    assert kept is not None and kept.node_headroom.enabled
    del room["spec"]["nodeHeadroom"]
    room["metadata"]["generation"] = 2
    one_pass(cluster, settings=Settings(), state=RoomState(generation=2))
    kept = accepted_spec(AudioRoomStatus.model_validate(cluster.room["status"]))
    assert kept is not None and not kept.node_headroom.enabled
