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
from townsquare.relay.kubeapi import KubeReader, load_credentials
from townsquare.relay.metrics import serve_metrics
from townsquare.relay.origin import Origin, OriginConfig
from townsquare.relay.server import Relay, RelayConfig
from townsquare.relay.topology import (
    ConfigMapSource,
    FileMapSource,
    MapSource,
    PodResolver,
    Resolver,
    StaticResolver,
)


@dataclass(frozen=True)
class Sources:
    """Where the map and relay addresses come from: a cluster, or files for tests."""

    kubeconfig: str | None = None
    map_file: Path | None = None
    relay_addresses: dict[int, tuple[str, int]] | None = None


async def _until_signalled(hub: Hub, stop: Callable[[], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await stop()
    await asyncio.sleep(0.2)  # let the goodbyes reach the sockets


def _sources(
    sources: Sources, namespace: str, room: str, port: int
) -> tuple[MapSource | None, Resolver, KubeReader | None]:
    if sources.map_file is not None:
        return FileMapSource(sources.map_file), StaticResolver(sources.relay_addresses or {}), None
    reader = KubeReader(load_credentials(sources.kubeconfig))
    maps = ConfigMapSource(reader, namespace, room)
    return maps, PodResolver(reader, namespace, room, port), reader


async def run_relay(config: RelayConfig, sources: Sources, metrics_port: int) -> None:
    maps, resolver, reader = _sources(sources, config.namespace, config.room, config.port)
    assert maps is not None
    relay = Relay(config, maps, resolver)
    await relay.start()
    runner = await serve_metrics(
        relay, config.namespace, config.room, config.pod, config.host, metrics_port
    )
    try:
        await _until_signalled(relay, relay.stop)
    finally:
        await runner.cleanup()
        if reader is not None:
            await reader.close()


async def run_origin(config: OriginConfig, sources: Sources | None, metrics_port: int) -> None:
    maps, reader = None, None
    if sources is not None:
        maps, _, reader = _sources(sources, config.namespace, config.room, config.port)
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
