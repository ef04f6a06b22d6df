"""Changes mid-event on the real cluster, with listeners connected through the load
generator: a new relay image rolled out drained, and a doubled relay capacity.

The verdicts come from the listeners' side (the load generator's own count per relay pod)
and from the API server (pods, their images and readiness, the published shard map), not
from the operator's account of what it did."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from edges import EdgeFleet
from harness import Prometheus, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import LoadGenerator, Rooms, scaling_room, write_trace
from sampling import Sampler, alive, is_ready, listeners_by_pod, load_figures

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


RELAYS, CAPACITY, LISTENERS, MAX_SURGE = 6, 100, 300, 2
RELAYS_ONLY = "app.kubernetes.io/component=relay"


def steady_room(name: str) -> dict[str, Any]:
    """6 relays of 100 for 300 listeners: 4 carry them at 90% at most, so 2 may drain."""
    manifest = scaling_room(name, start_in=5, duration="10m", audience=420)
    manifest["spec"]["scaling"]["planHold"] = "10m"  # the plan's 6 relays stay
    manifest["spec"]["rollout"] = {"maxSurge": MAX_SURGE}
    manifest["spec"]["scaling"]["drainTimeout"] = "90s"  # listeners move through the edge
    return manifest


@dataclass
class Sample:
    at: float
    pods: dict[str, tuple[str, str, bool]]
    """name -> (uid, image, Ready) of pods not being deleted."""
    draining: set[int]
    active: set[int]
    listeners: dict[str, float]
    wanted: float
    capacity: int


class Watch(Sampler):
    """Pods, the published map and the listeners the load generator counts."""

    def __init__(self, rooms: Rooms, name: str, load: LoadGenerator) -> None:
        self.rooms, self.name, self.load = rooms, name, load
        self.samples: list[Sample] = []
        super().__init__()

    def sample(self) -> None:
        listeners, wanted = load_figures(self.load)
        pods = [
            p
            for p in alive(self.rooms.core.list_namespaced_pod(self.rooms.namespace).items)
            if p.metadata.name.startswith(f"{self.name}-relay-")
        ]
        data = self.rooms.core.read_namespaced_config_map(
            f"{self.name}-shards", self.rooms.namespace
        ).data
        shard_map = json.loads(data["shardmap.json"])
        states = {r["ordinal"]: r["state"] for r in shard_map["relays"]}
        self.samples.append(
            Sample(
                time.time(),
                {p.metadata.name: (p.metadata.uid, p.spec.containers[0].image, is_ready(p))
                 for p in pods},
                {o for o, s in states.items() if s == "draining"},
                {o for o, s in states.items() if s == "active"},
                listeners,
                wanted,
                shard_map["capacity"],
            )
        )  # fmt: skip


@contextmanager
def steady(
    rooms: Rooms, name: str, kubeconfig: Path, prometheus: Prometheus, tmp_path: Path
) -> Iterator[LoadGenerator]:
    """The room with its listeners (joining through an edge), once its 6 relays are Ready."""
    rooms.create(steady_room(name))
    trace = write_trace(tmp_path / "steady.csv", [(-20, 0), (0, LISTENERS), (900, LISTENERS)])
    edges = EdgeFleet(kubeconfig, rooms.namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, rooms.namespace, name, trace, edges)
    prometheus.add_target(load.address)
    try:
        wait_until(lambda: rooms.relays(name) == (RELAYS, RELAYS), 60, "6 relays Ready")
        yield load
    finally:
        load.stop()
        edges.stop()


def all_on(rooms: Rooms, image: str) -> bool:
    pods = alive(rooms.core.list_namespaced_pod(rooms.namespace, label_selector=RELAYS_ONLY).items)
    return sum(1 for p in pods if p.spec.containers[0].image == image and is_ready(p)) == RELAYS


def test_an_image_change_mid_event_replaces_relays_a_few_at_a_time_drained_first(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    with steady(rooms, "rolling", kubeconfig, prometheus, tmp_path) as load:
        wait_until(
            lambda: sum(listeners_by_pod(load).values()) == LISTENERS, 60, "listeners connected"
        )
        watch = Watch(rooms, "rolling", load)
        began = time.time()
        rooms.patch_spec("rolling", {"relay": {"image": "registry.example/relay:v2"}})
        wait_until(
            lambda: all_on(rooms, "registry.example/relay:v2"),
            180,
            "every relay replaced by one with the new image",
        )
        seconds = time.time() - began
        time.sleep(1)
        watch.stop()

    samples = watch.samples
    old = {uid for name, (uid, image, _) in samples[0].pods.items() if image.endswith(":test")}
    assert len(old) == RELAYS
    out_at_once, drained_at_once = [], []
    removed = set()
    for before, after in pairwise(samples):
        for name, (uid, _, _) in before.pods.items():
            if after.pods.get(name, ("",))[0] != uid and uid in old:
                on_it = before.listeners.get(name, 0)
                assert on_it == 0, f"{name} was removed with {on_it} listeners on it"
                removed.add(uid)
    assert removed == old, "every old relay was removed, each seen empty just before"
    carried = {name for name, count in samples[0].listeners.items() if count > 0}
    assert len(carried) == RELAYS, "listeners were on every relay: they moved before it went"
    for sample in samples:
        ready = {int(name.rsplit("-", 1)[1]) for name, (_, _, ok) in sample.pods.items() if ok}
        out = {o for o in range(RELAYS) if o not in ready or o in sample.draining}
        out_at_once.append(len(out))
        drained_at_once.append(len(sample.draining))
        serving = len(ready & sample.active)
        assert sample.wanted == LISTENERS
        assert serving * CAPACITY >= sample.wanted, f"{serving} relays cannot carry the demand"
    assert max(out_at_once) <= MAX_SURGE, out_at_once
    assert max(drained_at_once) >= 1, "relays were drained before they were replaced"
    reasons = rooms.reasons("rolling")
    assert "RollingOut" in reasons and "RelaysReplaced" in reasons
    rollout = rooms.get("rolling")["status"]["rollout"]
    assert rollout["outdated"] == 0 and rollout["updated"] == RELAYS
    print(f"rollout of {RELAYS} relays with {LISTENERS} listeners took {seconds:.0f}s")


def test_doubling_listeners_per_relay_mid_event_reaches_the_map_and_status(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)

    def published_capacity() -> int:
        data = rooms.core.read_namespaced_config_map("bigger-shards", namespace).data
        return int(json.loads(data["shardmap.json"])["capacity"])

    with steady(rooms, "bigger", kubeconfig, prometheus, tmp_path):
        assert published_capacity() == CAPACITY
        rooms.patch_spec("bigger", {"relay": {"listenersPerRelay": 2 * CAPACITY}})
        wait_until(lambda: published_capacity() == 2 * CAPACITY, 20, "the map's new capacity")
        wait_until(
            lambda: (
                rooms.get("bigger")["status"]["listeners"]["capacity"]
                >= (RELAYS - MAX_SURGE) * 2 * CAPACITY * 0.7
            ),
            20,
            "status at the new capacity",
        )
        changed = [e for e in rooms.events("bigger") if e.reason == "ShardMapChanged"]
        assert changed and "capacity 100 -> 200 listeners per relay" in changed[0].message
        # The relays themselves learn it through their template, rolled out drained.
        wait_until(
            lambda: all(
                {e.name: e.value for e in p.spec.containers[0].env}["TOWNSQUARE_CAPACITY"] == "200"
                for p in rooms.core.list_namespaced_pod(namespace).items
                if p.metadata.name.startswith("bigger-relay-")
            ),
            180,
            "relays restarted with the new capacity",
        )
