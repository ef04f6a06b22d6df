"""Manifests of a room's children, built from its spec. Pure: no client, no clock.

Every child carries an owner reference to its AudioRoom, so deleting the room lets the
garbage collector remove them, and the labels the metric contract and selectors need.
"""

from __future__ import annotations

from typing import Any

from townsquare.api.models import API_VERSION, KIND, AudioRoomSpec, TopologySpread
from townsquare.api.names import relay_service_name, relay_set_name, shard_map_name
from townsquare.partitions import SLOT_LABEL, slot_of

Manifest = dict[str, Any]

ROOM_LABEL = "townsquare.dev/room"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "townsquare"
SHARD_MAP_KEY = "shardmap.json"
TICKET_SECRET_ANNOTATION = "townsquare.dev/ticket-secret"
"""Names the Secret mounted as the relay's ticket key, for on-call reading the pod."""
ORIGIN_ANNOTATION = "townsquare.dev/origin"
"""The room's origin (HOST:PORT), set through spec.relay.podAnnotations; the relay gets it in
$TOWNSQUARE_ORIGIN through the downward API."""
SHARD_MAP_DIR = "/etc/townsquare/shards"
SHARD_MAP_FILE = f"{SHARD_MAP_DIR}/{SHARD_MAP_KEY}"
"""Where a relay reads its room's shard map: the `<room>-shards` ConfigMap as a volume, which
the kubelet keeps up to date, so a relay needs no API access (it has no token)."""
TICKET_KEY_DIR = "/etc/townsquare/tickets"
TICKET_KEY_FILE = f"{TICKET_KEY_DIR}/key"
"""Where a relay finds the key that signs admit tickets, as the edge does (the chart)."""


def relay_selector(room: str) -> dict[str, str]:
    """Labels that select exactly this room's relay pods."""
    return {ROOM_LABEL: room, COMPONENT_LABEL: "relay"}


def _metadata(
    room: str,
    namespace: str,
    uid: str,
    name: str,
    component: str,
    *,
    blocks_owner_deletion: bool = True,
) -> Manifest:
    """A child's metadata, owned by its room. `blocks_owner_deletion` False lets a
    foreground deletion of the room finish without waiting for this child."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": {
            ROOM_LABEL: room,
            COMPONENT_LABEL: component,
            MANAGED_BY_LABEL: MANAGER,
            SLOT_LABEL: str(slot_of(namespace, room)),
        },
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": room,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": blocks_owner_deletion,
            }
        ],
    }


def relay_stateful_set(
    room: str,
    namespace: str,
    uid: str,
    spec: AudioRoomSpec,
    replicas: int,
    *,
    ticket_secret: str | None = None,
    slot_label: bool = True,
) -> Manifest:
    """Relays as a StatefulSet: stable ordinals for the shard map, started in parallel.

    `OnDelete`: a template change replaces no pod by itself; the operator drains a few
    relays at a time and deletes only drained ones, which come back with the new template.

    `slot_label`: relay pods carry the room's slot label, so each partition's watch of pods
    asks the API server for its own rooms' pods only. False for a StatefulSet made before
    pods carried it: adding the label would be a new template, and every live room's
    relays would be replaced (drained, but moved listeners) by an operator upgrade.
    """
    slot = str(slot_of(namespace, room)) if slot_label else None
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        # Not blocking: in a foreground deletion the drain policy refuses the garbage
        # collector until the drain ends, and the collector's retries back off (5 ms doubling,
        # minutes apart by then), so a blocking StatefulSet held the room minutes after its
        # drain. The finalizer holds the room until drained; then the collector removes the
        # empty StatefulSet at once, its owner being gone.
        "metadata": _metadata(
            room, namespace, uid, relay_set_name(room), "relay", blocks_owner_deletion=False
        ),
        "spec": {
            "replicas": replicas,
            "serviceName": relay_service_name(room),
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": relay_selector(room)},
            "template": relay_pod_template(room, spec, ticket_secret=ticket_secret, slot=slot),
        },
    }


def relay_pod_template(
    room: str, spec: AudioRoomSpec, *, ticket_secret: str | None = None, slot: str | None = None
) -> Manifest:
    """A relay pod fit for production clusters: restricted Pod Security, no API token,
    spread across zones and nodes, and given the time to drain when told to stop.

    What a relay needs comes without the API server: the shard map as a mounted ConfigMap
    ($TOWNSQUARE_MAP_FILE), its parent by the headless Service's DNS names, its own address,
    ports and origin in its environment.

    `ticket_secret`: a Secret in the room's namespace holding the key (`key`) that the edge
    signs admit tickets with. It is mounted read-only and named in $TOWNSQUARE_TICKET_KEY_FILE,
    so the relay checks every listener's ticket; the operator only names it, never reads it.
    """
    relay = spec.relay
    context = relay.security_context
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _without_none(
            {
                "runAsNonRoot": context.run_as_non_root,
                "runAsUser": context.run_as_user,
                "runAsGroup": context.run_as_group,
                "fsGroup": context.fs_group,
                "seccompProfile": context.seccomp_profile.model_dump(
                    by_alias=True, exclude_none=True
                ),
            }
        ),
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "containers": [
            {
                "name": "relay",
                "image": relay.image,
                "ports": [
                    {"name": "listeners", "containerPort": relay.port},
                    {"name": "metrics", "containerPort": relay.metrics_port},
                ],
                "env": [
                    {"name": "TOWNSQUARE_ROOM", "value": room},
                    {"name": "TOWNSQUARE_CAPACITY", "value": str(relay.listeners_per_relay)},
                    {"name": "TOWNSQUARE_PORT", "value": str(relay.port)},
                    {"name": "TOWNSQUARE_METRICS_PORT", "value": str(relay.metrics_port)},
                    {"name": "TOWNSQUARE_MAP_FILE", "value": SHARD_MAP_FILE},
                    _field_env("POD_NAME", "metadata.name"),
                    _field_env("POD_NAMESPACE", "metadata.namespace"),
                    _field_env("POD_IP", "status.podIP"),
                    _field_env("TOWNSQUARE_ORIGIN", f"metadata.annotations['{ORIGIN_ANNOTATION}']"),
                ],
                "volumeMounts": [
                    {"name": "shard-map", "mountPath": SHARD_MAP_DIR, "readOnly": True}
                ],
                "readinessProbe": {"tcpSocket": {"port": "listeners"}, "periodSeconds": 5},
                "resources": relay.resources.model_dump(exclude_defaults=True),
                "securityContext": {
                    "allowPrivilegeEscalation": context.allow_privilege_escalation,
                    "readOnlyRootFilesystem": context.read_only_root_filesystem,
                    "capabilities": context.capabilities.model_dump(),
                },
            }
        ],
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in relay.tolerations],
        "nodeSelector": dict(relay.node_selector),
        "topologySpreadConstraints": _spread(room, relay.topology_spread),
        "imagePullSecrets": [{"name": secret.name} for secret in relay.image_pull_secrets],
        "volumes": [
            {
                "name": "shard-map",
                # Optional: a relay starts before the operator's first map and feeds from
                # the origin until the file appears.
                "configMap": {
                    "name": shard_map_name(room),
                    "items": [{"key": SHARD_MAP_KEY, "path": SHARD_MAP_KEY}],
                    "optional": True,
                },
            }
        ],
    }
    annotations: dict[str, str] = {}
    if ticket_secret:
        _mount_ticket_key(pod_spec, ticket_secret)
        annotations[TICKET_SECRET_ANNOTATION] = ticket_secret
    if relay.args:
        pod_spec["containers"][0]["args"] = list(relay.args)
    if relay.pre_stop_seconds:
        lifecycle = {"preStop": {"sleep": {"seconds": relay.pre_stop_seconds}}}
        pod_spec["containers"][0]["lifecycle"] = lifecycle
    if relay.affinity:
        pod_spec["affinity"] = relay.affinity
    if relay.priority_class_name:
        pod_spec["priorityClassName"] = relay.priority_class_name
    return {
        "metadata": {
            "labels": {
                **relay_selector(room),
                MANAGED_BY_LABEL: MANAGER,
                **({SLOT_LABEL: slot} if slot is not None else {}),
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(relay.metrics_port),
                **annotations,
                **relay.pod_annotations,
            },
        },
        "spec": pod_spec,
    }


def _mount_ticket_key(pod_spec: Manifest, secret: str) -> None:
    container = pod_spec["containers"][0]
    container["env"].append({"name": "TOWNSQUARE_TICKET_KEY_FILE", "value": TICKET_KEY_FILE})
    container["volumeMounts"].append(
        {"name": "ticket-key", "mountPath": TICKET_KEY_DIR, "readOnly": True}
    )
    pod_spec["volumes"].append(
        {
            "name": "ticket-key",
            # A missing Secret keeps the pod from starting (an Event names it) rather than
            # running a relay that admits nobody.
            "secret": {"secretName": secret, "items": [{"key": "key", "path": "key"}]},
        }
    )


def termination_grace_seconds(spec: AudioRoomSpec) -> int:
    """Long enough for the preStop pause and then a whole drain of the relay's listeners."""
    return spec.relay.pre_stop_seconds + int(spec.scaling.drain_timeout.total_seconds())


ZONE_KEY = "topology.kubernetes.io/zone"
NODE_KEY = "kubernetes.io/hostname"


def _spread(room: str, spread: TopologySpread) -> list[Manifest]:
    constraints = []
    for key, rule in ((ZONE_KEY, spread.zones), (NODE_KEY, spread.nodes)):
        if rule != "Off":
            constraints.append(
                {
                    "maxSkew": spread.max_skew,
                    "topologyKey": key,
                    "whenUnsatisfiable": rule,
                    "labelSelector": {"matchLabels": relay_selector(room)},
                }
            )
    return constraints


def _without_none(values: Manifest) -> Manifest:
    return {key: value for key, value in values.items() if value is not None}


def _field_env(name: str, path: str) -> Manifest:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def relay_service(room: str, namespace: str, uid: str, spec: AudioRoomSpec) -> Manifest:
    """Headless Service: one DNS name per relay, as the shard map refers to them."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(room, namespace, uid, relay_service_name(room), "relay"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": relay_selector(room),
            "ports": [
                {"name": "listeners", "port": spec.relay.port},
                {"name": "metrics", "port": spec.relay.metrics_port},
            ],
        },
    }


def shard_map_config_map(room: str, namespace: str, uid: str, shard_map_json: str) -> Manifest:
    """The published shard map; the edge routes joins by it."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(room, namespace, uid, shard_map_name(room), "shard-map"),
        "data": {SHARD_MAP_KEY: shard_map_json},
    }


def relay_disruption_budget(room: str, namespace: str, uid: str) -> Manifest:
    """Voluntary disruptions (node drains) take one relay at a time, never a tier at once."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(room, namespace, uid, relay_set_name(room), "relay"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": relay_selector(room)}},
    }
