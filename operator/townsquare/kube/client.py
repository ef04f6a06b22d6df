"""The few Kubernetes calls the operator makes. Blocking: call them off the event loop.

Children are written with server-side apply under one field manager, so applying twice
changes nothing and a field changed by hand is taken back on the next reconcile.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from townsquare.api.models import GROUP, KIND, PLURAL, VERSION
from townsquare.api.names import relay_set_name, shard_map_name
from townsquare.kube.children import MANAGER, ROOM_LABEL, SHARD_MAP_KEY, Manifest
from townsquare.sharding import ShardMap

APPLY = "application/apply-patch+yaml"


def load_config() -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the KUBECONFIG context."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


@dataclass(frozen=True)
class RelayPod:
    """One relay pod as the scheduler and kubelet (here kwok) left it."""

    ordinal: int
    ready: bool
    created: datetime
    ready_since: datetime | None
    restarted: bool = False

    @property
    def startup_seconds(self) -> float | None:
        """Creation to Ready: the start-up time the scaling policy plans with. None when the
        pod restarted: its last Ready transition then measures the restart, not a start."""
        if self.ready_since is None or self.restarted:
            return None
        return max(0.0, (self.ready_since - self.created).total_seconds())


class Cluster:
    """Reads and writes for rooms and their children."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._apply_by_kind: dict[str, Callable[..., Any]] = {
            "StatefulSet": self.apps.patch_namespaced_stateful_set,
            "Service": self.core.patch_namespaced_service,
            "ConfigMap": self.core.patch_namespaced_config_map,
            "PodDisruptionBudget": self.policy.patch_namespaced_pod_disruption_budget,
        }

    def apply(self, manifest: Manifest) -> None:
        """Server-side apply one child, taking back fields others changed."""
        meta = manifest["metadata"]
        self._apply_by_kind[manifest["kind"]](
            meta["name"],
            meta["namespace"],
            manifest,
            field_manager=MANAGER,
            force=True,
            _content_type=APPLY,
        )

    def read_room(self, namespace: str, name: str) -> dict[str, Any]:
        """The room as stored now (not a cached view), so decisions see our own writes."""
        room: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return room

    def relay_pods(self, namespace: str, room: str) -> list[RelayPod]:
        """The room's relay pods with their ordinals and readiness."""
        pods = self.core.list_namespaced_pod(namespace, label_selector=f"{ROOM_LABEL}={room}").items
        prefix = re.compile(rf"^{re.escape(relay_set_name(room))}-([0-9]+)$")
        found: list[RelayPod] = []
        for pod in pods:
            match = prefix.match(pod.metadata.name)
            if not match or pod.metadata.deletion_timestamp is not None:
                continue
            ready = next((c for c in (pod.status.conditions or []) if c.type == "Ready"), None)
            ready_since = ready.last_transition_time if ready and ready.status == "True" else None
            restarts = sum(c.restart_count or 0 for c in pod.status.container_statuses or [])
            found.append(
                RelayPod(
                    ordinal=int(match.group(1)),
                    ready=ready_since is not None,
                    created=pod.metadata.creation_timestamp,
                    ready_since=ready_since,
                    restarted=restarts > 0,
                )
            )
        return sorted(found, key=lambda p: p.ordinal)

    def read_config_map(self, namespace: str, name: str) -> dict[str, str]:
        """A ConfigMap's data; empty when it does not exist yet."""
        try:
            config_map = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return dict(config_map.data or {})

    def read_shard_map(self, namespace: str, room: str) -> ShardMap | None:
        """The shard map as published in the room's ConfigMap (None: none, or unreadable)."""
        document = self.read_config_map(namespace, shard_map_name(room)).get(SHARD_MAP_KEY)
        try:
            return ShardMap.from_dict(json.loads(document)) if document else None
        except (KeyError, TypeError, ValueError):
            return None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Replace the room's status (merge patch on the status subresource)."""
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        )

    def post_event(
        self,
        room: dict[str, Any],
        kind: str,
        reason: str,
        message: str,
        now: datetime,
    ) -> None:
        """Post an Event on the room, as `kubectl describe audioroom` shows them."""
        meta = room["metadata"]
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            ),
            type=kind,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=MANAGER),
            reporting_component=f"{GROUP}/operator",
            reporting_instance=MANAGER,
        )
        self.core.create_namespaced_event(meta["namespace"], body)
