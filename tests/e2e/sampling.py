"""Watching a room as a person would: samples taken in the background, read afterwards."""

from __future__ import annotations

import contextlib
import re
import threading
import urllib.request
from typing import Any

from kubernetes import client
from rooms import LoadGenerator

SERIES = re.compile(r'^audioroom_relay_listeners\{[^}]*pod="([^"]+)"[^}]*\} ([0-9.e+]+)$')


class Sampler:
    """Calls `sample()` every `interval` seconds on a thread of its own until `stop()`;
    a sample that raises is skipped (the API server may be briefly busy)."""

    interval = 0.2

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


WANTED = re.compile(r"^audioroom_edge_wanted_listeners\{[^}]*\} ([0-9.e+]+)$")


STATES = re.compile(r'^audioroom_loadgen_listeners\{[^}]*state="([a-z]+)"[^}]*\} ([0-9.e+]+)$')


def audience_figures(load: LoadGenerator) -> tuple[dict[str, float], float, dict[str, float]]:
    """`load_figures`, and the audience by state as the load generator counts it: idle
    (wants a relay and has not asked yet, or lost its relay), waiting (holds a queue
    ticket), connected."""
    # A generous timeout: a load generator busy with hundreds of real connections may answer
    # late on a loaded machine, and a sampler skips a sample that fails.
    with urllib.request.urlopen(f"http://{load.address}/metrics", timeout=10) as answer:
        lines = answer.read().decode().splitlines()
    by_pod = {m.group(1): float(m.group(2)) for line in lines if (m := SERIES.match(line))}
    wanted = [float(m.group(1)) for line in lines if (m := WANTED.match(line))]
    states = {m.group(1): float(m.group(2)) for line in lines if (m := STATES.match(line))}
    return by_pod, sum(wanted), states


def load_figures(load: LoadGenerator) -> tuple[dict[str, float], float]:
    """What the load generator itself counts (the listeners' side): listeners on each relay
    pod, and all the listeners who want to listen, connected or waiting."""
    by_pod, wanted, _ = audience_figures(load)
    return by_pod, wanted


def listeners_by_pod(load: LoadGenerator) -> dict[str, float]:
    return load_figures(load)[0]


def is_ready(pod: client.V1Pod) -> bool:
    conditions: list[Any] = pod.status.conditions or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def alive(pods: list[client.V1Pod]) -> list[client.V1Pod]:
    """Pods not being deleted."""
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def moves_in_any_minute(moves: list[dict[str, Any]]) -> int:
    """The most listener moves (the load generator's record) within any 60 s."""
    times = sorted(e["at"] for e in moves)
    most, left = 0, 0
    for right, at in enumerate(times):
        while times[left] < at - 60:
            left += 1
        most = max(most, right - left + 1)
    return most
