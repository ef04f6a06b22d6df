"""A room on loopback for the relay tests: an origin, relays and listeners in one event loop.

The map is a JSON file the test rewrites (as the operator rewrites the ConfigMap); relay
addresses are fixed. Every verdict comes from the listeners' own counts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from townsquare.relay.hub import HubSettings
from townsquare.relay.listener import Listener, MapJoiner
from townsquare.relay.origin import Origin, OriginConfig
from townsquare.relay.server import Relay, RelayConfig
from townsquare.relay.topology import FileMapSource, StaticResolver
from townsquare.sharding import ShardMap, new_map, rebalance

KEY = b"relay-test-key-0123456789abcdef"
NAMESPACE, ROOM = "ns", "r"
SETTINGS = HubSettings(handshake_timeout=0.5, stall_timeout=0.5, buffer_frames=200)


def tree(relays: int, fanout: int = 2, shards: int = 32, capacity: int = 100) -> ShardMap:
    return rebalance(new_map(shards, capacity), active=range(relays), fanout=fanout).map


@dataclass
class LoopbackRoom:
    workdir: Path
    frame_interval: float = 0.01
    frame_bytes: int = 60
    capacity: int = 100
    migrations_per_minute: float = 60_000.0
    origin: Origin | None = None
    relays: dict[int, Relay] = field(default_factory=dict)
    listeners: list[Listener] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    resolver: StaticResolver = field(default_factory=lambda: StaticResolver({}))
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def map_file(self) -> Path:
        return self.workdir / "map.json"

    def publish(self, shard_map: ShardMap) -> None:
        partial = self.map_file.with_suffix(".tmp")
        partial.write_text(json.dumps(shard_map.to_dict()))
        partial.replace(self.map_file)

    def current_map(self) -> ShardMap:
        return ShardMap.from_dict(json.loads(self.map_file.read_text()))

    async def start(self, shard_map: ShardMap) -> None:
        self.publish(shard_map)
        config = OriginConfig(
            NAMESPACE, ROOM, KEY, port=0, frame_interval=self.frame_interval,
            frame_bytes=self.frame_bytes, map_interval=0.05, hub=SETTINGS,
        )  # fmt: skip
        self.origin = Origin(config, FileMapSource(self.map_file))
        await self.origin.start()
        for ordinal in sorted(shard_map.relays):
            await self.start_relay(ordinal)

    async def start_relay(self, ordinal: int) -> Relay:
        assert self.origin is not None
        config = RelayConfig(
            NAMESPACE, ROOM, f"{ROOM}-relay-{ordinal}", KEY, self.origin.address,
            capacity=self.capacity, port=0, map_interval=0.05, retry_seconds=0.05,
            migrations_per_minute=self.migrations_per_minute, hub=SETTINGS,
        )  # fmt: skip
        relay = Relay(config, FileMapSource(self.map_file), self.resolver)
        await relay.start()
        self.resolver.addresses[ordinal] = relay.address
        self.relays[ordinal] = relay
        return relay

    def join(self) -> MapJoiner:
        return MapJoiner(FileMapSource(self.map_file), self.resolver, KEY, NAMESPACE, ROOM)

    async def add_listeners(
        self, names: list[str], joiner: MapJoiner | None = None
    ) -> list[Listener]:
        """Listeners joined by `joiner` (the map's answer by default), once they hear."""
        join = joiner or self.join()
        added = [Listener(name, join) for name in names]
        for listener in added:
            self._tasks.append(asyncio.create_task(listener.run(self.stop)))
        self.listeners += added
        await until(lambda: all(lst.stats.frames >= 3 for lst in added), 10, "listeners hear")
        return added

    def on(self, ordinal: int) -> list[Listener]:
        """Listeners the relay itself counts as connected to it."""
        names = set(self.relays[ordinal].listeners)
        return [lst for lst in self.listeners if lst.name in names]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for relay in self.relays.values():
            await relay.stop()
        if self.origin is not None:
            await self.origin.stop()


async def until(probe: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def frames_flow(listeners: list[Listener], frames: int = 20) -> None:
    """Wait until every listener has heard `frames` more frames."""
    marks = {lst.name: lst.stats.frames for lst in listeners}
    await until(
        lambda: all(lst.stats.frames >= marks[lst.name] + frames for lst in listeners),
        15,
        f"{frames} more frames for every listener",
    )
