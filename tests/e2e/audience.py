"""Real listeners for the e2e tests: connections held in a background event loop, and the
processes of the data plane (origin, edge) a test starts around the cluster's relays."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from harness import REPO, free_loopback_port, wait_until

from townsquare.relay.listener import EdgeJoiner, Listener

T = TypeVar("T")


class Audience:
    """Listeners joining through the edge, each on its own relay connection."""

    def __init__(self, edge_url: str | list[str], namespace: str, room: str) -> None:
        """`edge_url`: one edge, or every replica (each listener asks its own first)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.listeners: list[Listener] = []
        self.gone: list[Listener] = []
        self.edge_url, self.namespace, self.room = edge_url, namespace, room
        self._stops: dict[str, asyncio.Event] = {}
        self.joiner = self._call(self._make_joiner())
        self._tasks: list[asyncio.Future[None]] = []

    async def _make_stop(self) -> asyncio.Event:
        return asyncio.Event()

    async def _make_joiner(self) -> EdgeJoiner:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return EdgeJoiner(session, self.edge_url, self.namespace, self.room)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def add(self, count: int, names: list[str] | None = None) -> list[Listener]:
        """`count` more listeners, named `listener-<n>` unless `names` says otherwise."""
        start = len(self.listeners) + len(self.gone)
        chosen = names if names is not None else [f"listener-{start + i}" for i in range(count)]
        added = [Listener(name, self.joiner) for name in chosen]
        self.listeners += added
        for listener in added:
            self._stops[listener.name] = self._call(self._make_stop())
            running = listener.run(self._stops[listener.name])
            task = asyncio.run_coroutine_threadsafe(running, self.loop)
            self._tasks.append(asyncio.wrap_future(task, loop=self.loop))
        return added

    def remove(self, listeners: list[Listener]) -> None:
        """These listeners leave the room (close their connections)."""
        for listener in listeners:
            self.loop.call_soon_threadsafe(self._stops[listener.name].set)
            self.listeners.remove(listener)
            self.gone.append(listener)
        wait_until(lambda: not any(lst.connected.is_set() for lst in listeners), 10,
                   "leavers to disconnect")  # fmt: skip

    def hearing(self, frames: int = 10) -> bool:
        """Every listener is connected and has heard at least `frames` frames."""
        return all(lst.connected.is_set() and lst.stats.frames >= frames for lst in self.listeners)

    def frames_flow(self, frames: int, timeout: float) -> None:
        marks = {lst.name: lst.stats.frames for lst in self.listeners}
        wait_until(
            lambda: all(lst.stats.frames >= marks[lst.name] + frames for lst in self.listeners),
            timeout,
            f"{frames} more frames for every listener",
        )

    def by_pod(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for listener in self.listeners:
            if listener.connected.is_set() and listener.pod:
                counts[listener.pod] = counts.get(listener.pod, 0) + 1
        return counts

    def stop(self) -> None:
        async def finish() -> None:
            for stop in self._stops.values():
                stop.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.joiner.session.close()

        self._call(finish())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class Process:
    """A `townsquare` command on loopback, with its log kept for the failure message."""

    def __init__(self, log: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "townsquare", *args],
                cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def origin(workdir: Path, namespace: str, room: str, key_file: Path, kubeconfig: Path,
           env: dict[str, str], *options: str) -> tuple[Process, str]:  # fmt: skip
    """`townsquare origin` for the room on a free loopback port, with more `options`
    (e.g. `--frame-interval`); (process, host:port)."""
    port = free_loopback_port()
    process = Process(
        workdir / "origin.log", "origin", "--namespace", namespace, "--room", room,
        "--ticket-key-file", str(key_file), "--port", str(port), "--metrics-port", "0",
        "--kubeconfig", str(kubeconfig), "--log-format", "json", *options, env=env,
    )  # fmt: skip
    return process, f"127.0.0.1:{port}"


def edge(workdir: Path, namespace: str, key_file: Path, prometheus_url: str,
         env: dict[str, str]) -> tuple[Process, str]:  # fmt: skip
    """`townsquare edge` for the namespace on a free loopback port; (process, URL)."""
    port = free_loopback_port()
    process = Process(
        workdir / "edge.log", "edge", "--host", "127.0.0.1", "--port", str(port),
        "-n", namespace, "--prometheus-url", prometheus_url,
        "--ticket-key-file", str(key_file), "--refresh", "0.5", "--admit-ttl", "2",
        "--log-format", "json", env=env,
    )  # fmt: skip
    return process, f"http://127.0.0.1:{port}"
