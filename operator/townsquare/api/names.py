"""Names of a room's children: part of the API, since the edge and on-call rely on them."""

from __future__ import annotations


def relay_set_name(room: str) -> str:
    """The StatefulSet whose pods are the room's relays (`<room>-relay-<ordinal>`)."""
    return f"{room}-relay"


def relay_service_name(room: str) -> str:
    """The headless Service giving each relay a stable DNS name."""
    return f"{room}-relays"


def shard_map_name(room: str) -> str:
    """The ConfigMap that publishes the room's shard map to the edge."""
    return f"{room}-shards"
