"""Placeholder pods for node headroom, shaped like the room's relays. Pure: no client.

A placeholder asks the scheduler, and so the node autoscaler, for exactly what one relay
will ask for: the same requests, node selector, tolerations, affinity and spread, the same
security settings (a restricted namespace admits it where it admits relays). It differs
where a relay would hold things up: a PriorityClass below the relays' (relays preempt it),
a container that only sleeps, no grace period.
"""

from __future__ import annotations

import copy
from typing import Any

from townsquare.api.models import AudioRoomSpec
from townsquare.kube.children import (
    COMPONENT_LABEL,
    ROOM_LABEL,
    Manifest,
    _metadata,
    relay_stateful_set,
)

COMPONENT = "headroom"
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
    room: str, namespace: str, uid: str, spec: AudioRoomSpec, name: str
) -> Manifest:
    """One placeholder pod, owned by the room (deleting the room deletes it)."""
    relay_pod: dict[str, Any] = relay_stateful_set(room, namespace, uid, spec, 0)["spec"][
        "template"
    ]["spec"]
    headroom = spec.node_headroom
    pod_spec: Manifest = {
        key: copy.deepcopy(relay_pod[key]) for key in SCHEDULING_FIELDS if relay_pod.get(key)
    }
    pod_spec["topologySpreadConstraints"] = [
        {**constraint, "labelSelector": {"matchLabels": placeholder_selector(room)}}
        for constraint in relay_pod.get("topologySpreadConstraints") or []
    ]
    pod_spec.update(
        {
            "priorityClassName": headroom.priority_class_name,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": f"holds-{container['name']}"[:63],
                    "image": headroom.image,
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
