"""Where a relay learns the room's shard map, and where its upstream listens.

On a cluster both come from the API server (the `<room>-shards` ConfigMap the operator
publishes, and the parent relay pod's IP). Tests and the benchmark use a JSON file and fixed
addresses instead, so a relay never needs the operator, and its tests need no cluster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from townsquare.relay.kubeapi import KubeReader
from townsquare.sharding import ShardMap

SHARD_MAP_KEY = "shardmap.json"
"""The ConfigMap key the operator publishes the map under (kube.children.SHARD_MAP_KEY)."""


def relay_pod_name(room: str, ordinal: int) -> str:
    """The StatefulSet's pod name (`api.names.relay_set_name` plus the ordinal)."""
    return f"{room}-relay-{ordinal}"


def ordinal_of(room: str, pod: str) -> int | None:
    prefix = f"{room}-relay-"
    tail = pod.removeprefix(prefix)
    return int(tail) if pod.startswith(prefix) and tail.isdigit() else None


class MapSource(Protocol):
    async def read(self) -> ShardMap | None: ...


class Resolver(Protocol):
    async def relay_address(self, ordinal: int) -> tuple[str, int] | None: ...


def parse_map(document: str | None) -> ShardMap | None:
    """The map from its published JSON; None when there is none or it is unreadable."""
    if not document:
        return None
    try:
        return ShardMap.from_dict(json.loads(document))
    except (KeyError, TypeError, ValueError):
        return None


class ConfigMapSource:
    """The shard map as the operator publishes it."""

    def __init__(self, reader: KubeReader, namespace: str, room: str) -> None:
        self.reader, self.namespace, self.name = reader, namespace, f"{room}-shards"

    async def read(self) -> ShardMap | None:
        data = await self.reader.config_map(self.namespace, self.name)
        return parse_map((data or {}).get(SHARD_MAP_KEY))


class FileMapSource:
    """A map in a JSON file (the `to_dict` form), for tests and the benchmark."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def read(self) -> ShardMap | None:
        try:
            return parse_map(self.path.read_text())
        except OSError:
            return None


class PodResolver:
    """A relay's address: its pod's IP from the API server, and the room's relay port."""

    def __init__(self, reader: KubeReader, namespace: str, room: str, port: int) -> None:
        self.reader, self.namespace, self.room, self.port = reader, namespace, room, port

    async def relay_address(self, ordinal: int) -> tuple[str, int] | None:
        ip = await self.reader.pod_ip(self.namespace, relay_pod_name(self.room, ordinal))
        return (ip, self.port) if ip else None


class StaticResolver:
    """Fixed addresses by ordinal, for tests and the benchmark."""

    def __init__(self, addresses: Mapping[int, tuple[str, int]]) -> None:
        self.addresses = dict(addresses)

    async def relay_address(self, ordinal: int) -> tuple[str, int] | None:
        return self.addresses.get(ordinal)


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """`host[:port]` as given on the command line."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return (host or text, int(port) if port else default_port)
