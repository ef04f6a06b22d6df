"""Where a relay learns the room's shard map, and where its upstream listens.

A relay pod has no API access (no service-account token, no RBAC), so both come without it:
the map is the `<room>-shards` ConfigMap mounted as a file, which the kubelet swaps
atomically when the operator changes it, and a parent relay is found by the stable DNS name
the room's headless Service gives each StatefulSet pod. Where there is no cluster DNS (the
local kwok cluster), a hosts file carries the same records; tests and the benchmark give
fixed addresses instead.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from townsquare.api.names import relay_service_name
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


class FileMapSource:
    """The map in a JSON file (the `to_dict` form): the mounted ConfigMap in a pod.

    Read again only when the file changed. The kubelet updates a ConfigMap volume by
    pointing a symlink at a new directory, so the path's inode and mtime (symlinks
    followed) change with every update, and a reader never sees half a file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._map: ShardMap | None = None

    async def read(self) -> ShardMap | None:
        try:
            stat = self.path.stat()
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if signature != self._seen:
                self._map = parse_map(self.path.read_text())
                self._seen = signature
        except OSError:
            return None
        return self._map


def relay_dns_name(namespace: str, room: str, ordinal: int) -> str:
    """The relay pod's name under the room's headless Service: `<pod>.<service>.<ns>.svc`
    (a StatefulSet pod's hostname and subdomain; the pod's DNS search path completes it)."""
    return f"{relay_pod_name(room, ordinal)}.{relay_service_name(room)}.{namespace}.svc"


def read_hosts(path: Path) -> dict[str, str]:
    """`IP NAME...` lines, as in /etc/hosts: name -> IP (the first line naming it wins)."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        for name in fields[1:]:
            found.setdefault(name, fields[0])
    return found


class DnsResolver:
    """A relay's address by its DNS name, on the room's relay port.

    Only Ready pods have a record (the Service does not publish unready addresses), so a
    parent that is starting or gone does not resolve and the relay feeds from further up.
    With `hosts_file` the records come from that file instead of the system's resolver.
    """

    def __init__(
        self, namespace: str, room: str, port: int, hosts_file: Path | None = None
    ) -> None:
        self.namespace, self.room, self.port, self.hosts_file = namespace, room, port, hosts_file

    async def relay_address(self, ordinal: int) -> tuple[str, int] | None:
        name = relay_dns_name(self.namespace, self.room, ordinal)
        if self.hosts_file is not None:
            try:
                ip = read_hosts(self.hosts_file).get(name)
            except OSError:
                return None
            return (ip, self.port) if ip else None
        loop = asyncio.get_running_loop()
        try:
            found = await asyncio.wait_for(
                loop.getaddrinfo(name, self.port, type=socket.SOCK_STREAM), 2.0
            )
        except (OSError, TimeoutError):
            return None
        return (str(found[0][4][0]), self.port) if found else None


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
