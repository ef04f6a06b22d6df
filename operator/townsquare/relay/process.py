"""`townsquare relay` and `townsquare origin` as processes: event loop, signals, /metrics.

SIGTERM (a pod being deleted) sends every listener back to the edge before the process
exits, so a scale-down never leaves anyone hanging on a dead socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from townsquare.relay.hub import Hub
from townsquare.relay.kubeapi import ConfigMapSource, KubeReader, load_credentials
from townsquare.relay.metrics import serve_metrics
from townsquare.relay.origin import Origin, OriginConfig
from townsquare.relay.server import Relay, RelayConfig
from townsquare.relay.topology import (
    DnsResolver,
    FileMapSource,
    MapSource,
    Resolver,
    StaticResolver,
)


@dataclass(frozen=True)
class RelaySources:
    """Where a relay finds the map and its parent: never the API server (a relay pod has no
    token). `map_file` is the mounted `<room>-shards` ConfigMap; a parent is found by DNS
    (or in `hosts_file`), unless `relay_addresses` fixes addresses (tests, the benchmark)."""

    map_file: Path
    hosts_file: Path | None = None
    relay_addresses: dict[int, tuple[str, int]] | None = None

    def resolver(self, namespace: str, room: str, port: int) -> Resolver:
        if self.relay_addresses:
            return StaticResolver(self.relay_addresses)
        return DnsResolver(namespace, room, port, self.hosts_file)


@dataclass(frozen=True)
class OriginSources:
    """Where the origin reads the map: a file, or the API server with `kubeconfig` (the
    origin is the speakers' side, run where the room's publisher has credentials)."""

    kubeconfig: str | None = None
    map_file: Path | None = None


async def _until_signalled(hub: Hub, stop: Callable[[], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await stop()
    await asyncio.sleep(0.2)  # let the goodbyes reach the sockets


async def run_relay(config: RelayConfig, sources: RelaySources, metrics_port: int) -> None:
    maps = FileMapSource(sources.map_file)
    relay = Relay(config, maps, sources.resolver(config.namespace, config.room, config.port))
    await relay.start()
    runner = await serve_metrics(
        relay, config.namespace, config.room, config.pod, config.host, metrics_port
    )
    try:
        await _until_signalled(relay, relay.stop)
    finally:
        await runner.cleanup()


async def run_origin(
    config: OriginConfig, sources: OriginSources | None, metrics_port: int
) -> None:
    maps: MapSource | None = None
    reader = None
    if sources is not None and sources.map_file is not None:
        maps = FileMapSource(sources.map_file)
    elif sources is not None:
        reader = KubeReader(load_credentials(sources.kubeconfig))
        maps = ConfigMapSource(reader, config.namespace, config.room)
    origin = Origin(config, maps)
    await origin.start()
    runner = None
    if metrics_port:
        runner = await serve_metrics(
            origin, config.namespace, config.room, "origin", config.host, metrics_port
        )
    try:
        await _until_signalled(origin, origin.stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        if reader is not None:
            await reader.close()


def run(main: Awaitable[None]) -> None:
    """Run on uvloop: the relay's hot path is socket writes, where uvloop is fastest."""
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main)  # type: ignore[arg-type]
