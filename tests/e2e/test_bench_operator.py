"""Operator benchmark on the real cluster (run by `make bench-operator`, not by `make test`).

Two figures, each against a baseline from the same run:
- reaction: from a threshold crossing being visible in Prometheus to the StatefulSet change,
  in seconds and in operator ticks (metrics interval + scrape interval);
- quiet writes: API writes the operator makes per room per minute while nothing changes,
  counted by the API server itself, against a naive operator that patches status every tick.
The test asserts only that the scenario happened; the figures go to docs/benchmarks-operator.md.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from edges import EdgeFleet
from harness import REPO, Prometheus, wait_until
from kubernetes import client
from rooms import LoadGenerator, Rooms, scaling_room, write_trace

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.bench]

WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}
OPERATOR_RESOURCES = {
    ("audiorooms", "status"),
    ("audiorooms", ""),
    ("statefulsets", ""),
    ("services", ""),
    ("configmaps", ""),
    ("poddisruptionbudgets", ""),
    ("events", ""),
}
METRICS_INTERVAL = 1.0
QUIET_SECONDS = 60


def api_server_writes(kubeconfig: Path) -> float:
    """Write requests the API server has served on the resources the operator writes."""
    kubectl = [str(REPO / ".venv/bin/kubectl"), "--kubeconfig", str(kubeconfig)]
    text = subprocess.run(
        [*kubectl, "get", "--raw", "/metrics"], capture_output=True, text=True, check=True
    ).stdout
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(
            part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(",")
        )
        verb = labels.get("verb", "").strip('"')
        resource = labels.get("resource", "").strip('"')
        subresource = labels.get("subresource", "").strip('"')
        if verb in WRITE_VERBS and (resource, subresource) in OPERATOR_RESOURCES:
            total += float(line.rsplit(" ", 1)[1])
    return total


class Steady:
    """How long a probe's value has stayed the same, sampled whenever asked."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.value = probe()
        self.since = time.time()

    def for_seconds(self) -> float:
        value = self.probe()
        if value != self.value:
            self.value, self.since = value, time.time()
        return time.time() - self.since


class Crossing:
    """Two probes polled side by side every 50 ms, each in its own thread, so that neither
    waits for the other: when did the crossing become visible, when did the cluster act."""

    def __init__(self, visible: Any, changed: Any) -> None:
        self.times: dict[str, float] = {}
        self._threads = [
            threading.Thread(target=self._watch, args=(name, probe), daemon=True)
            for name, probe in (("visible", visible), ("changed", changed))
        ]
        for thread in self._threads:
            thread.start()

    def _watch(self, name: str, probe: Any) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if probe():
                    self.times[name] = time.time()
                    return
            except Exception:
                pass
            time.sleep(0.05)

    def delay(self, timeout: float) -> float:
        for thread in self._threads:
            thread.join(timeout)
        assert set(self.times) == {"visible", "changed"}, f"only saw {self.times}"
        return self.times["changed"] - self.times["visible"]


def test_reaction_time_and_quiet_writes(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: Any,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    steps = [(0, 300), (119, 300), (120, 600), (159, 600), (160, 900), (199, 900), (200, 1200)]
    trace = write_trace(tmp_path / "steps.csv", [(-30, 300), *steps, (400, 1200)])
    rooms.create(scaling_room("bench", start_in=5, duration="10m", audience=140))
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, namespace, "bench", trace, edges)
    prometheus.add_target(load.address)
    start = time.time() + 5
    try:
        wait_until(lambda: rooms.relays("bench") == (5, 5), 90, "5 relays for 300 listeners")
        stable = Steady(lambda: rooms.relays("bench"))
        wait_until(lambda: stable.for_seconds() >= 20, 120, "the relay count to stay put")
        before, began = api_server_writes(kubeconfig), time.time()
        wait_until(lambda: time.time() - began >= QUIET_SECONDS, QUIET_SECONDS + 5, "quiet")
        quiet_writes = (api_server_writes(kubeconfig) - before) * 60 / (time.time() - began)

        room = f'namespace="{namespace}",room="bench"'
        demand = (
            f"sum(audioroom_relay_listeners{{{room}}})"
            f" + sum(audioroom_edge_waiting_listeners{{{room}}})"
        )
        delays = []
        for step_at in (120, 160, 200):
            wait_until(lambda t=step_at: time.time() > start + t - 8, 200, "the next step")
            settled = Steady(lambda: rooms.relays("bench"))
            wait_until(lambda s=settled: s.for_seconds() >= 5, 7.5, "the last step to settle")
            replicas = rooms.relays("bench")[0]
            threshold = replicas * 100 * 0.7 * 1.1  # the policy's tolerance above target
            crossing = Crossing(
                visible=lambda th=threshold: (prometheus.value(demand) or 0) > th,
                changed=lambda r=replicas: rooms.relays("bench")[0] > r,
            )
            delays.append(crossing.delay(timeout=60))
    finally:
        load.stop()
        edges.stop()

    assert len(delays) == 3
    tick = METRICS_INTERVAL + Prometheus.SCRAPE_SECONDS
    naive = 60 / METRICS_INTERVAL
    median = statistics.median(delays)
    report = REPO / "docs" / "benchmarks-operator.md"
    report.write_text(
        "# Operator benchmark (real cluster, real Prometheus)\n\n"
        "Measured by `make bench-operator` (tests/e2e/test_bench_operator.py) on the local\n"
        "kwok cluster, 2 cores, scrape interval 1 s, operator metrics interval 1 s.\n\n"
        "| figure | measured | baseline in the same run | ratio |\n|---|---|---|---|\n"
        f"| threshold visible in Prometheus -> StatefulSet change (median of 3 steps) "
        f"| {median:.2f} s (each: {', '.join(f'{d:.2f}' for d in delays)}) "
        f"| one tick = metrics + scrape interval = {tick:.0f} s | {median / tick:.2f} ticks |\n"
        f"| API writes per room per minute while nothing changes "
        f"| {quiet_writes:.1f} | naive status patch every tick: {naive:.0f}/min "
        f"| {quiet_writes / naive:.3f} |\n"
    )
    print(report.read_text())
