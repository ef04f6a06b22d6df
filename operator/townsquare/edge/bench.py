"""`make bench-edge`: joins per second and join latency of edge replicas on this machine.

Each server is a real `Edge` application (aiohttp on uvloop) in a process of its own,
serving one room of 4,096 shards on 1,000 relays with room to spare, so every join is
admitted (the full path: parse, hash, capacity share, signed ticket, metrics). The same run
measures a trivial aiohttp handler on the same server framework, so the framework's own cost
is visible as a ratio. The load comes from closed-loop clients on loopback that speak
HTTP/1.1 over keep-alive connections directly (a Python HTTP client library would be the
bottleneck), each measuring every request's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from townsquare.edge.admission import Endpoint, Gate, Report, Settings
from townsquare.edge.server import Edge
from townsquare.sharding import new_map, rebalance

NAMESPACE, ROOM = "bench", "launch"
RELAYS = 1_000
KEY = b"bench-key-0123456789abcdef"


def bench_gate(replicas: int) -> Gate:
    """A room whose relays are all ready, reported and far from full."""
    shard_map = rebalance(new_map(4096, 10**9), active=range(RELAYS), fanout=64).map
    gate = Gate(KEY, Settings(replicas=replicas, started_at=0.0))
    gate.set_map(NAMESPACE, ROOM, shard_map)
    pods = {
        f"{ROOM}-relay-{o}": Endpoint(f"10.1.{o // 250}.{o % 250}:7000", True)
        for o in range(RELAYS)
    }
    gate.set_slice(NAMESPACE, ROOM, "bench", pods)
    now = time.time()
    gate.set_reports({(NAMESPACE, ROOM, pod): Report(0, now) for pod in pods})
    return gate


def _serve(kind: str, port: int, replicas: int, core: int | None) -> None:
    import uvloop

    if core is not None:
        os.sched_setaffinity(0, {core})
    if kind == "trivial":
        app = web.Application()

        async def join(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"relay": "10.0.0.1:7000"})

        app.router.add_post("/v1/rooms/{namespace}/{room}/join", join)
    else:
        app = Edge(bench_gate(replicas)).app()
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


def _request(port: int, listener: str) -> bytes:
    body = json.dumps({"listener": listener}).encode()
    head = (
        f"POST /v1/rooms/{NAMESPACE}/{ROOM}/join HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(
    port: int, name: str, deadline: float, latencies: list[float], statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    while time.perf_counter() < deadline:
        began = time.perf_counter()
        writer.write(_request(port, f"{name}-{i}"))
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - began)
        status = int(status_line.split()[1])
        statuses[status] = statuses.get(status, 0) + 1
        i += 1
    writer.close()


def _load(
    ports: Sequence[int],
    connections: int,
    seconds: float,
    tag: str,
    core: int | None,
    out: multiprocessing.Queue[object],
) -> None:
    import uvloop

    if core is not None:
        os.sched_setaffinity(0, {core})
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(
            *(
                _connection(ports[c % len(ports)], f"{tag}-{c}", deadline, latencies, statuses)
                for c in range(connections)
            )
        )

    uvloop.run(main())
    out.put((latencies, statuses))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not start")


@dataclass(frozen=True)
class Result:
    name: str
    joins_per_second: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    cpu_us_per_join: float
    """The servers' own CPU time (user and system) per answered join: what a join costs,
    which the machine's other load moves less than it moves joins/s."""


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    name: str, kind: str, replicas: int, seconds: float, connections: int, clients: int
) -> Result:
    cores = sorted(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    ports = [_free_port() for _ in range(replicas)]
    servers = [
        context.Process(
            target=_serve,
            args=(kind, port, replicas, cores[0] if replicas == 1 and len(cores) > 1 else None),
            daemon=True,
        )
        for port in ports
    ]
    for server in servers:
        server.start()
    try:
        for port in ports:
            _wait_listening(port)
        out: multiprocessing.Queue[object] = context.Queue()
        cpu_before = sum(_cpu_seconds(server.pid or 0) for server in servers)
        load_core = cores[-1] if replicas == 1 and len(cores) > 1 else None
        loaders = [
            context.Process(
                target=_load, args=(ports, connections, seconds, f"{name}-{c}", load_core, out)
            )
            for c in range(clients)
        ]
        for loader in loaders:
            loader.start()
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        for _ in loaders:
            part: list[float]
            codes: dict[int, int]
            part, codes = out.get(timeout=seconds + 60)  # type: ignore[misc]
            latencies += part
            for code, count in codes.items():
                statuses[code] = statuses.get(code, 0) + count
        cpu = sum(_cpu_seconds(server.pid or 0) for server in servers) - cpu_before
        for loader in loaders:
            loader.join()
    finally:
        for server in servers:
            server.terminate()
            server.join()
    latencies.sort()
    return Result(
        name=name,
        joins_per_second=len(latencies) / seconds,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
        statuses=statuses,
        cpu_us_per_join=cpu / max(1, len(latencies)) * 1e6,
    )


def _spread(values: list[float], form: str) -> str:
    low, high = min(values), max(values)
    return f"{form.format(statistics.median(values))} ({form.format(low)}-{form.format(high)})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--clients", type=int, default=1, help="load processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the table (Markdown) to this file too")
    args = parser.parse_args(argv)
    runs = [
        ("trivial aiohttp handler, 1 process", "trivial", 1),
        ("edge, 1 replica", "edge", 1),
        ("edge, 2 replicas", "edge", 2),
        ("edge, 3 replicas", "edge", 3),
    ]
    # Rounds interleave the servers, so that whatever else loads the machine weighs on
    # each about equally; figures are medians over the rounds, ratios are within a round.
    rounds: list[list[Result]] = []
    load_before = os.getloadavg()[0]
    for number in range(args.rounds):
        row = []
        for name, kind, replicas in runs:
            result = measure(name, kind, replicas, args.seconds, args.connections, args.clients)
            print(f"round {number + 1}: {name}: {result.joins_per_second:,.0f}/s "
                  f"p50 {result.p50_ms:.2f} ms p99 {result.p99_ms:.2f} ms "
                  f"{result.cpu_us_per_join:.0f} us CPU/join", flush=True)  # fmt: skip
            row.append(result)
        rounds.append(row)
    cores = len(os.sched_getaffinity(0))
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    lines = [
        "# Edge benchmark (`make bench-edge`)",
        "",
        f"Loopback, {cores} cores shared with whatever else runs ({load}); {args.rounds} rounds of "
        f"{args.seconds:.0f} s per server, interleaved; {args.clients} closed-loop client "
        f"process(es) with {args.connections} keep-alive connections in all. With one "
        "server process, it and the client are pinned to one core each; with more, all "
        "processes share the cores. Every join is admitted (a room of 4,096 shards on 1,000 "
        "relays with room to spare). Medians over the rounds (min-max in brackets); the ratio "
        "is to the trivial handler in the same round. CPU per join is the server processes' "
        "own user and system time over the joins they answered (what a join costs; the "
        "machine's load moves it less than joins/s).",
        "",
        "| server | joins/s | ratio to the trivial handler | p50 ms | p99 ms "
        "| server CPU µs/join | its ratio to the trivial handler's |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, (name, _, _) in enumerate(runs):
        mine = [row[index] for row in rounds]
        rates = [r.joins_per_second for r in mine]
        ratios = [row[index].joins_per_second / row[0].joins_per_second for row in rounds]
        p50 = [r.p50_ms for r in mine]
        p99 = [r.p99_ms for r in mine]
        cpu = [r.cpu_us_per_join for r in mine]
        costs = [row[index].cpu_us_per_join / row[0].cpu_us_per_join for row in rounds]
        lines.append(
            f"| {name} | {_spread(rates, '{:,.0f}')} | {_spread(ratios, '{:.2f}')} "
            f"| {_spread(p50, '{:.2f}')} | {_spread(p99, '{:.1f}')} "
            f"| {_spread(cpu, '{:.0f}')} | {_spread(costs, '{:.2f}')} |"
        )
    failed = sum(c for row in rounds for r in row for s, c in r.statuses.items() if s != 200)
    lines += ["", f"Answers other than 200: {failed}."]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
