"""Placeholder pods for node headroom, shaped like the room's relays. Pure: no client.

A placeholder asks the scheduler, and so the node autoscaler, for exactly what one relay
will ask for: the same requests, node selector, tolerations, affinity and spread, the same
security settings (a restricted namespace admits it where it admits relays). It differs
where a relay would hold things up: a PriorityClass below the relays' (relays preempt it),
a container that only sleeps, no grace period.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from townsquare.api.models import AudioRoomSpec
from townsquare.api.names import relay_set_name
from townsquare.headroom import Placeholder, Relays
from townsquare.kube.children import (
    COMPONENT_LABEL,
    ROOM_LABEL,
    Manifest,
    _metadata,
    relay_stateful_set,
)
from townsquare.kube.client import RelayPod, scheduling, timestamp

COMPONENT = "headroom"
PRIORITY_CLASS = "townsquare-headroom"
"""The chart's PriorityClass for placeholders (`nodeHeadroom.priorityClass.name`)."""
IMAGE = "registry.k8s.io/pause:3.10"
"""A container that only sleeps."""
SCHEDULING_FIELDS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "securityContext",
    "imagePullSecrets",
    "runtimeClassName",
    "schedulerName",
)
"""What a placeholder copies from the relay pod: where it may run and what admits it."""


def placeholder_selector(room: str) -> dict[str, str]:
    """Labels that select exactly this room's placeholders (never its relays)."""
    return {ROOM_LABEL: room, COMPONENT_LABEL: COMPONENT}


def placeholder_pod(
    room: str,
    namespace: str,
    uid: str,
    spec: AudioRoomSpec,
    name: str,
    *,
    priority_class: str = PRIORITY_CLASS,
    image: str = IMAGE,
) -> Manifest:
    """One placeholder pod, owned by the room (deleting the room deletes it).

    The PriorityClass and image are the operator's settings, not the room's: a tenant must
    not run placeholders above others' pods, or an image from outside the allowed registries.
    """
    relay_pod: dict[str, Any] = relay_stateful_set(room, namespace, uid, spec, 0)["spec"][
        "template"
    ]["spec"]
    pod_spec: Manifest = {
        key: copy.deepcopy(relay_pod[key]) for key in SCHEDULING_FIELDS if relay_pod.get(key)
    }
    pod_spec["topologySpreadConstraints"] = [
        {**constraint, "labelSelector": {"matchLabels": placeholder_selector(room)}}
        for constraint in relay_pod.get("topologySpreadConstraints") or []
    ]
    pod_spec.update(
        {
            "priorityClassName": priority_class,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": f"holds-{container['name']}"[:63],
                    "image": image,
                    "resources": copy.deepcopy(container.get("resources") or {}),
                    **(
                        {"securityContext": copy.deepcopy(container["securityContext"])}
                        if container.get("securityContext")
                        else {}
                    ),
                }
                for container in relay_pod["containers"]
            ],
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(room, namespace, uid, name, COMPONENT),
        "spec": pod_spec,
    }


@dataclass(frozen=True)
class RoomNodes:
    """What the room's pods say about nodes: relays on nodes, waits, Pending relays."""

    relays: Relays
    waits: tuple[float, ...]
    """Seconds from creation to a node, of every pod that has one, oldest first."""
    pending_relays: tuple[tuple[str, str], ...]
    """(relay pod, the scheduler's reason) of relays on no node yet."""


def placeholder(body: Mapping[str, Any]) -> Placeholder | None:
    """A placeholder from its API object (as a watch delivers it); None once going away."""
    meta = body.get("metadata") or {}
    created = timestamp(meta.get("creationTimestamp"))
    if meta.get("deletionTimestamp") or created is None:
        return None
    return Placeholder(name=meta.get("name", ""), created=created, scheduled_at=scheduling(body)[0])


def room_nodes(
    room: str, relays: Iterable[RelayPod], placeholders: Iterable[Placeholder]
) -> RoomNodes:
    """Relays on nodes and waiting for one, and how long the room's pods waited for nodes."""
    relays = list(relays)
    bound: list[RelayPod | Placeholder] = [*relays, *placeholders]
    waits = sorted(
        (pod.created, (pod.scheduled_at - pod.created).total_seconds())
        for pod in bound
        if pod.scheduled_at is not None
    )
    return RoomNodes(
        relays=Relays(
            existing=len(relays), scheduled=sum(1 for p in relays if p.scheduled_at is not None)
        ),
        waits=tuple(max(0.0, seconds) for _, seconds in waits),
        pending_relays=tuple(
            (f"{relay_set_name(room)}-{pod.ordinal}", pod.unscheduled)
            for pod in sorted(relays, key=lambda p: p.ordinal)
            if pod.scheduled_at is None
        ),
    )


HEADROOM_PRIORITY = -5
"""Below every workload (0 without a class), at or above the cluster autoscaler's expendable
cutoff (-10), under which pods never cause a scale-up."""


def headroom_priority_class(name: str, value: int = HEADROOM_PRIORITY) -> Manifest:
    """The PriorityClass placeholders run at, as the chart ships it: relays preempt them,
    and they never preempt anything themselves."""
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": name},
        "value": value,
        "globalDefault": False,
        "preemptionPolicy": "Never",
        "description": (
            "Placeholder pods that hold node headroom ahead of an AudioRoom's pre-warm; "
            "relays preempt them."
        ),
    }
