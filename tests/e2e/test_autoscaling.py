"""Live autoscaling against the real cluster and a real Prometheus, with the load generator.

The load generator places listeners through the shard map the operator publishes and serves
the metric contract; Prometheus scrapes it every second; the operator reads Prometheus.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from edges import EdgeFleet
from harness import Prometheus, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import CAPACITY, LoadGenerator, Rooms, scaling_room, write_trace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass
class Timeline:
    """Samples of the StatefulSet and the published shard map every 300 ms."""

    rooms: Rooms
    name: str
    samples: list[tuple[float, int, set[int]]] = field(default_factory=list)
    """(time, StatefulSet replicas, ordinals taking no joins by the shard map: those marked
    draining, and every relay once the map closes the room to joins past its end)."""
    generations: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                replicas, _ = self.rooms.relays(self.name)
                data = self.rooms.core.read_namespaced_config_map(
                    f"{self.name}-shards", self.rooms.namespace
                ).data
                shard_map = json.loads(data["shardmap.json"])
                closed = shard_map.get("admission") == "closed"
                draining = {
                    r["ordinal"] for r in shard_map["relays"] if r["state"] == "draining" or closed
                }
                self.samples.append((time.time(), replicas, draining))
                self.generations.append(shard_map["generation"])
            except (ApiException, KeyError, TypeError):
                pass
            self._stop.wait(0.3)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def shrinks(self) -> list[tuple[int, int]]:
        """Every (before, after) replica decrease of the StatefulSet."""
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return [(a[1], b[1]) for a, b in pairs if b[1] < a[1]]


def test_rising_audience_scales_up_reshards_and_drains_before_shrinking(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    trace = write_trace(
        tmp_path / "surge.csv",
        [(-20, 0), (0, 60), (20, 1200), (35, 1200), (45, 100), (80, 100), (85, 0), (200, 0)],
    )
    rooms.create(scaling_room("surge", start_in=15, duration="75s", audience=140))
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, namespace, "surge", trace, edges)
    prometheus.add_target(load.address)
    timeline = Timeline(rooms, "surge")
    try:
        wait_until(lambda: rooms.relays("surge")[0] >= 18, 90, "scale-up to carry 1,200")
        wait_until(lambda: timeline.shrinks(), 90, "the StatefulSet to shrink after the fall")
        wait_until(lambda: rooms.phase("surge") == "Ended", 120, "the room to end")
    finally:
        timeline.stop()
        load.stop()
        edges.stop()

    reasons = rooms.reasons("surge")
    assert "ScaledUp" in reasons and "Resharded" in reasons and "ScaledDown" in reasons
    scaled_up = [e for e in rooms.events("surge") if e.reason == "ScaledUp"]
    assert any("forecast" in e.message and "listeners" in e.message for e in scaled_up)
    assert timeline.generations[-1] > timeline.generations[0] + 2, "the shard map advanced"

    peak = prometheus.value(
        f'max_over_time(max(audioroom_relay_listeners{{namespace="{namespace}"}})[5m:1s])'
    )
    assert peak is not None and 0 < peak <= CAPACITY, "no relay ever exceeded its capacity"

    for before, after in timeline.shrinks():
        marked = [
            draining
            for _, replicas, draining in timeline.samples
            if replicas == before and set(range(after, before)) <= draining
        ]
        assert marked, f"relays {after}..{before - 1} were drained before the shrink"


def test_prometheus_outage_holds_the_size_and_recovers_by_itself(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    trace = write_trace(tmp_path / "flat.csv", [(-20, 0), (0, 500), (300, 500)])
    rooms.create(scaling_room("steady", start_in=5, duration="5m", audience=140))
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, namespace, "steady", trace, edges)
    prometheus.add_target(load.address)

    def condition() -> dict[str, Any]:
        status = rooms.get("steady").get("status") or {}
        return next(
            (c for c in status.get("conditions", []) if c["type"] == "MetricsAvailable"), {}
        )

    seen: list[tuple[float, int]] = []

    def settled() -> int | None:
        """A size that carries the listeners and has not changed for 3 s."""
        desired, ready = rooms.relays("steady")
        if desired != ready or desired not in (7, 8):
            seen.clear()
            return None
        if not seen or seen[-1][1] != desired:
            seen[:] = [(time.monotonic(), desired)]
        return desired if time.monotonic() - seen[0][0] >= 3 else None

    try:
        wait_until(lambda: condition().get("status") == "True", 90, "listeners observed")
        # 500 listeners at 70% of 100 need 8 relays; 7 carry them at 71%, within the
        # policy's 10% tolerance, so a ramp may settle on either.
        size = wait_until(settled, 60, "relays for 500 listeners")
        prometheus.stop()
        wait_until(lambda: condition().get("status") == "False", 30, "MetricsAvailable False")
        held_until = time.time() + 12  # longer than the stabilization window
        while time.time() < held_until:
            assert rooms.relays("steady")[0] == size, "the size is held while data is missing"
            time.sleep(0.5)
        warning = [e for e in rooms.events("steady") if e.reason == "MetricsUnavailable"]
        assert warning and warning[0].type == "Warning"
        assert "never scaling down without data" in warning[0].message
        prometheus.start()
        wait_until(lambda: condition().get("status") == "True", 60, "recovery by itself")
    finally:
        load.stop()
        edges.stop()
    # Never lower on recovery; edge and relay counts scraped a moment apart can add up to a
    # little more than the audience and grow the room one step, which is not blind scaling.
    assert rooms.relays("steady")[0] >= size
    assert "MetricsRecovered" in rooms.reasons("steady")
