"""`make bench-relay`: what one relay process forwards per core, against an echo server.

Four measurements, each repeated, on this machine, loopback only:

1. Forwarding: an origin feeds one `townsquare relay` process (real processes, 20 ms frames
   of 60 bytes); N listeners hold connections and count what arrives. The figure is frames
   sent per CPU-second of the relay process (/proc: user + system time), so other load on
   the machine slows the run but does not change the figure much. That figure / 50 frames
   per second extrapolates listeners per core; item 4 measures them.
2. Baseline: a trivial echo server on the same runtime (asyncio + uvloop, one Protocol that
   writes back what it reads), N connections each sending one frame-sized message every
   20 ms: messages echoed per CPU-second of the echo process. The ratio relay / echo says
   what the relay's own work costs beyond moving bytes.
3. Moves: listeners on two relays while the map moves shards back and forth; the longest
   gap each moved listener heard (make-before-break moves, resuming from the new relay's
   recent frames). Joins come from the shard map and the shared key (no edge here).
4. Saturation (relay/saturation.py): listeners held by load generators in processes of
   their own, stepped up until they miss frames, against the relay and the echo server.

    python -m townsquare.relay.bench [--out docs/benchmarks-relay.md] [--listeners 400]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import uvloop

from townsquare.relay import saturation
from townsquare.relay.hub import HubSettings
from townsquare.relay.listener import Listener, MapJoiner
from townsquare.relay.origin import Origin, OriginConfig
from townsquare.relay.protocol import Kind, control, frame
from townsquare.relay.saturation import Saturation, cpu_seconds, free_port, until_port
from townsquare.relay.server import Relay, RelayConfig
from townsquare.relay.topology import FileMapSource, StaticResolver
from townsquare.sharding import new_map, rebalance
from townsquare.tickets import sign

FRAME_SECONDS = 0.020
FRAME_BYTES = 60
HOST = "127.0.0.1"


class Counting(asyncio.Protocol):
    """A listener that only counts bytes: the cheapest possible receiving end."""

    def __init__(self, hello: bytes, totals: list[int]) -> None:
        self.hello, self.totals = hello, totals

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.hello)

    def data_received(self, data: bytes) -> None:
        self.totals[0] += len(data)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "townsquare", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _egress(session: aiohttp.ClientSession, metrics_port: int) -> float:
    async with session.get(f"http://{HOST}:{metrics_port}/metrics") as response:
        text = await response.text()
    line = next(
        x for x in text.splitlines() if x.startswith("audioroom_relay_egress_packets_total")
    )
    return float(line.split()[-1])


@dataclass
class RelayUnderTest:
    """An origin and one relay process, and the listeners connected to it so far."""

    relay: subprocess.Popen[bytes]
    key: bytes
    generation: int
    port: int
    metrics_port: int
    transports: list[asyncio.BaseTransport] = field(default_factory=list)
    received: list[int] = field(default_factory=lambda: [0])
    """Bytes all listeners received."""

    async def connect(self, listeners: int) -> None:
        """`listeners` more listeners, each admitted with its own ticket."""
        loop = asyncio.get_running_loop()
        start = len(self.transports)
        for i in range(start, start + listeners):
            claims = {"listener": f"l{i}", "room": "bench/r", "pod": "r-relay-0",
                      "shard": 0, "generation": self.generation}  # fmt: skip
            ticket = sign(self.key, "admit", claims, expires=time.time() + 600)
            hello = control(Kind.HELLO, {"v": 1, "role": "listener", "ticket": ticket})
            transport, _ = await loop.create_connection(
                functools.partial(Counting, hello, self.received), HOST, self.port
            )
            self.transports.append(transport)


@contextlib.asynccontextmanager
async def relay_under_test(capacity: int, workdir: Path) -> AsyncIterator[RelayUnderTest]:
    key = secrets.token_bytes(32)
    (workdir / "key").write_bytes(key)
    shard_map = rebalance(new_map(64, capacity), active=[0], fanout=8).map
    (workdir / "map.json").write_text(json.dumps(shard_map.to_dict()))
    origin_port, relay_port, metrics_port = free_port(), free_port(), free_port()
    common = ["--namespace", "bench", "--room", "r", "--ticket-key-file", str(workdir / "key"),
              "--log-format", "json"]  # fmt: skip
    origin = _spawn("origin", *common, "--map-file", str(workdir / "map.json"),
                    "--port", str(origin_port), "--metrics-port", "0")  # fmt: skip
    relay = _spawn("relay", *common, "--map-file", str(workdir / "map.json"), "--pod",
                   "r-relay-0", "--origin", f"{HOST}:{origin_port}", "--address", HOST,
                   "--port", str(relay_port), "--metrics-port", str(metrics_port),
                   "--capacity", str(capacity))  # fmt: skip
    under_test = RelayUnderTest(relay, key, shard_map.generation, relay_port, metrics_port)
    try:
        await until_port(relay_port)
        yield under_test
    finally:
        for transport in under_test.transports:
            transport.close()
        for process in (relay, origin):
            process.terminate()
            process.wait(timeout=10)


async def forwarding(listeners: int, seconds: float, workdir: Path) -> float:
    """Frames one relay process sends per CPU-second, with `listeners` connected."""
    async with relay_under_test(listeners * 2, workdir) as bench:
        await bench.connect(listeners)
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(1.0)  # everyone welcomed, the stream flowing
            sent0, cpu0 = await _egress(session, bench.metrics_port), cpu_seconds(bench.relay.pid)
            await asyncio.sleep(seconds)
            sent1, cpu1 = await _egress(session, bench.metrics_port), cpu_seconds(bench.relay.pid)
        return (sent1 - sent0) / max(cpu1 - cpu0, 1e-3)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def serve_echo(port: int) -> None:
    """The baseline server: writes back what it reads, nothing else."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, HOST, port)
        await asyncio.Event().wait()

    uvloop.run(main())


async def echoing(connections: int, seconds: float) -> float:
    """Messages a trivial echo server returns per CPU-second, one frame-sized message per
    connection every 20 ms (the same packet rate as the relay's listeners)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "townsquare.relay.bench", "--echo-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    try:
        await until_port(port)
        totals = [0]
        for _ in range(connections):
            transport, _ = await loop.create_connection(lambda: Counting(b"", totals), HOST, port)
            transports.append(transport)
        message = frame(0, 0, bytes(FRAME_BYTES))

        async def speak() -> None:
            while True:
                for transport in transports:
                    transport.write(message)
                await asyncio.sleep(FRAME_SECONDS)

        speaker = asyncio.create_task(speak())
        await asyncio.sleep(1.0)
        got0, cpu0 = totals[0], cpu_seconds(server.pid)
        await asyncio.sleep(seconds)
        got1, cpu1 = totals[0], cpu_seconds(server.pid)
        speaker.cancel()
        return (got1 - got0) / len(message) / max(cpu1 - cpu0, 1e-3)
    finally:
        for transport in transports:
            transport.close()
        server.terminate()
        server.wait(timeout=10)


async def move_gaps(listeners: int, rounds: int, workdir: Path) -> list[float]:
    """Longest gap of every listener each round of moves moved (seconds)."""
    key = secrets.token_bytes(32)
    map_file = workdir / "moves.json"
    first = rebalance(new_map(64, 10_000), active=[0, 1], fanout=8).map
    map_file.write_text(json.dumps(first.to_dict()))
    settings = HubSettings(buffer_frames=100)
    origin = Origin(OriginConfig("bench", "r", key, port=0, map_interval=0.2, hub=settings),
                    FileMapSource(map_file))  # fmt: skip
    await origin.start()
    resolver = StaticResolver({})
    relays = []
    for ordinal in (0, 1, 2):
        config = RelayConfig("bench", "r", f"r-relay-{ordinal}", key, origin.address, port=0,
                             capacity=10_000, map_interval=0.2, hub=settings,
                             migrations_per_minute=600_000)  # fmt: skip
        relay = Relay(config, FileMapSource(map_file), resolver)
        await relay.start()
        resolver.addresses[ordinal] = relay.address
        relays.append(relay)
    joiner = MapJoiner(FileMapSource(map_file), resolver, key, "bench", "r")
    stop = asyncio.Event()
    audience = [Listener(f"listener-{i}", joiner) for i in range(listeners)]
    tasks = [asyncio.create_task(lst.run(stop)) for lst in audience]
    gaps: list[float] = []
    try:
        await _wait(lambda: all(lst.stats.frames > 10 for lst in audience), 30)
        current = first
        for round_ in range(rounds):
            active = [0, 1, 2] if round_ % 2 == 0 else [0, 1]
            draining = [] if round_ % 2 == 0 else [2]
            current = rebalance(current, active=active, draining=draining, fanout=8).map
            marks = {lst.name: (lst.stats.relocations, lst.stats.longest_gap) for lst in audience}
            for lst in audience:
                lst.stats.longest_gap = 0.0
            map_file.write_text(json.dumps(current.to_dict()))
            await asyncio.sleep(3.0)
            gaps += [lst.stats.longest_gap for lst in audience
                     if lst.stats.relocations > marks[lst.name][0]]  # fmt: skip
        lost = sum(lst.stats.lost for lst in audience)
        if lost:
            print(f"note: moved listeners lost {lost} frames in all", file=sys.stderr)
        return gaps
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for relay in relays:
            await relay.stop()
        await origin.stop()


async def _wait(probe: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError("the listeners never heard the stream")
        await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Figures:
    relay: list[float]
    echo: list[float]
    gaps: list[float]
    driven: Saturation | None = None


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def report(figures: Figures, listeners: int, command: str) -> str:
    relay, echo = statistics.median(figures.relay), statistics.median(figures.echo)
    ratios = [r / e for r, e in zip(figures.relay, figures.echo, strict=True)]
    gaps_ms = [g * 1000 for g in figures.gaps]
    rows = [
        (
            "frames sent per CPU-second, one relay process",
            f"{relay:,.0f}",
            f"{_p95(figures.relay):,.0f}",
        ),
        (
            "frames per CPU-second / 50 (listeners per core, extrapolated)",
            f"{relay / 50:,.0f}",
            f"{_p95(figures.relay) / 50:,.0f}",
        ),
        (
            "echo server messages per CPU-second (baseline)",
            f"{echo:,.0f}",
            f"{_p95(figures.echo):,.0f}",
        ),
        ("relay / echo, same run", f"{statistics.median(ratios):.2f}", f"{_p95(ratios):.2f}"),
        (
            "longest gap of a moved listener (ms)",
            f"{statistics.median(gaps_ms):.0f}",
            f"{_p95(gaps_ms):.0f} (max {max(gaps_ms):.0f}, {len(gaps_ms)} moves)",
        ),
    ]
    lines = [
        "# Relay benchmark",
        "",
        f"Measured with `{command}` on this machine ({os.cpu_count()} cores, shared), "
        f"Python {sys.version.split()[0]} with uvloop; {listeners} listeners, "
        f"{len(figures.relay)} runs (median and p95 over runs; gaps over moves).",
        "",
        "| figure | median | p95 |",
        "| --- | --- | --- |",
        *(f"| {name} | {median} | {p95} |" for name, median, p95 in rows),
        "",
        "Frames per CPU-second divide the frames the relay sent (its own egress counter) by the",
        "CPU time /proc charges to the relay process; the echo baseline divides the messages",
        "the clients got back by the echo process's CPU time. Moves: listeners on two or three",
        "relays while the map adds a relay and drains it again, every 3 s; the gap is each",
        "moved listener's longest silence in that round (joins from the map and the key, no",
        "edge). Frames per CPU-second / 50 is an extrapolation; the section below drives",
        "listeners until the relay no longer carries them (the measured figure).",
        *(saturation.lines(figures.driven) if figures.driven else []),
    ]
    return "\n".join(lines) + "\n"


async def run_all(
    listeners: int, runs: int, seconds: float, steps: list[int], ramps: int
) -> Figures:
    relay, echo = [], []
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        for _ in range(runs):
            relay.append(await forwarding(listeners, seconds, Path(tmp)))
            echo.append(await echoing(listeners, seconds))
        gaps = await move_gaps(60, 6, Path(tmp))
    driven = await saturation.saturate(ramps, 3.0, steps) if steps and ramps else None
    return Figures(relay, echo, gaps, driven)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="relay benchmark")
    parser.add_argument("--out", default="docs/benchmarks-relay.md")
    parser.add_argument("--listeners", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument(
        "--saturation-steps",
        default=",".join(map(str, saturation.STEPS)),
        help="listener counts to drive one relay through (comma-separated; empty: skip)",
    )
    parser.add_argument(
        "--ramps", type=int, default=3, help="saturation ramps of the relay and the echo server"
    )
    parser.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_port:
        serve_echo(args.echo_port)
        return 0
    steps = [int(n) for n in args.saturation_steps.split(",") if n.strip()]
    figures = uvloop.run(run_all(args.listeners, args.runs, args.seconds, steps, args.ramps))
    command = "make bench-relay"
    text = report(figures, args.listeners, command)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
