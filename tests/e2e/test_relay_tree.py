"""Real relays on the real cluster: a two-tier tree carries a room to real listeners through
a scale-up with its reshard, a scale-down by drain, and a relay process killed mid-stream.

Everything runs: the operator, the edge, the origin, one `townsquare relay` process per relay
pod (started by the cluster's pod runner on the pod's loopback IP), Prometheus scraping the
relays themselves, and listeners holding TCP connections. Verdicts come from the listeners'
own frame counts and from Prometheus, never from the code that placed anyone.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from audience import Audience, edge, origin
from harness import Prometheus, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import Rooms, rfc3339

from townsquare.sharding import shard_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOM = "stage"
FIRST, MORE, LEAVING = 15, 10, 12
"""15 listeners need 3 relays of 10 at 70%; 25 need 4 (the ceiling); 13 need 3 again."""
MOVED_GAP_BOUND = 1.0
"""Seconds a moved listener may go without a frame (measured: 0.1-0.3 s; a move is
make-before-break, so only the machine's own stalls show)."""


def relay_room(origin_address: str, start_in: float) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    return {
        "apiVersion": "townsquare.dev/v1alpha1",
        "kind": "AudioRoom",
        "metadata": {"name": ROOM},
        "spec": {
            "startTime": rfc3339(datetime.now(UTC) + timedelta(seconds=start_in)),
            "duration": "30m",
            "expectedAudience": 10,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": 10,
                "startupSeconds": 1,
                "args": ["relay"],  # the reference relay, as the pod runner requires
                "podAnnotations": {
                    "pod-ready.stage.kwok.x-k8s.io/delay": "1s",
                    "townsquare.dev/origin": origin_address,
                },
                "nodeSelector": {"type": "kwok"},
            },
            "scaling": {
                "targetUtilization": 0.7,
                "minRelays": 3,
                "maxRelays": 4,
                "prewarmLead": "5s",
                "planHold": "5s",
                # Short: the operator re-decides every 5 s or so when counts hold still, and
                # a window counts as covered at the first pass past it, whatever the pace.
                "scaleDownStabilization": "10s",
                "drainTimeout": "60s",
            },
            # fanout 2 with 3 relays: the origin feeds two, one relay feeds the third
            "sharding": {"shards": 64, "fanout": 2, "maxMigrationsPerMinute": 6000},
        },
    }


class RelayPods:
    """The room's relay pods, their loopback IPs, and Prometheus targets for each."""

    def __init__(self, rooms: Rooms, prometheus: Prometheus) -> None:
        self.rooms, self.prometheus = rooms, prometheus
        self.scraped: set[str] = set()

    def ips(self) -> dict[str, str]:
        pods = self.rooms.core.list_namespaced_pod(
            self.rooms.namespace, label_selector=f"townsquare.dev/room={ROOM}"
        ).items
        found = {
            p.metadata.name: p.status.pod_ip
            for p in pods
            if p.status.pod_ip and p.metadata.deletion_timestamp is None
        }
        for ip in found.values():
            if ip not in self.scraped:
                self.scraped.add(ip)
                self.prometheus.add_target(f"{ip}:9090")
        return found

    def shard_map(self) -> dict[str, Any]:
        data = self.rooms.core.read_namespaced_config_map(
            f"{ROOM}-shards", self.rooms.namespace
        ).data
        shard_map: dict[str, Any] = json.loads(data["shardmap.json"])
        return shard_map

    def relays_in_map(self) -> dict[int, tuple[str, int | None]]:
        return {r["ordinal"]: (r["state"], r["parent"]) for r in self.shard_map()["relays"]}


def runner_pid(kubeconfig: Path, namespace: str, pod: str) -> int:
    """The relay process the pod runner started last for `pod` (from its own log)."""
    log = kubeconfig.parent / "podrunner" / "podrunner.log"
    pid = None
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("msg") == "relay started" and record.get("pod") == f"{namespace}/{pod}":
            pid = int(record["pid"])
    assert pid is not None, f"the pod runner never started {pod}"
    return pid


def prometheus_listeners(prometheus: Prometheus, namespace: str) -> dict[str, float]:
    return relay_series(prometheus, namespace, "audioroom_relay_listeners")


def relay_series(prometheus: Prometheus, namespace: str, metric: str) -> dict[str, float]:
    """One gauge per relay pod, as the relay processes export it."""
    result = prometheus.client().custom_query(f'{metric}{{namespace="{namespace}"}}')
    return {r["metric"]["pod"]: float(r["value"][1]) for r in result}


def fed_as_the_map_says(prometheus: Prometheus, namespace: str, pods: RelayPods) -> bool:
    """Every relay feeds exactly the relays the map hangs under it, by its own count
    (`audioroom_relay_downstream_relays`): a child that could not find its parent and fed
    from the origin instead would leave its parent's count short."""
    tree = pods.relays_in_map()
    children = {f"{ROOM}-relay-{o}": 0 for o in tree}
    for _, parent in tree.values():
        if parent is not None:
            children[f"{ROOM}-relay-{parent}"] += 1
    return relay_series(prometheus, namespace, "audioroom_relay_downstream_relays") == {
        pod: float(n) for pod, n in children.items()
    }


def test_a_two_tier_tree_carries_a_room_through_scaling_draining_and_a_killed_relay(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    relay_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    rooms = Rooms(api_client, namespace)
    key = secrets.token_bytes(32)
    key_file = tmp_path / "ticket.key"
    key_file.write_bytes(key)
    rooms.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="townsquare-tickets"),
            data={"key": base64.b64encode(key).decode()},
        ),
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    origin_process, origin_address = origin(tmp_path, namespace, ROOM, key_file, kubeconfig, env)
    edge_process, edge_url = edge(tmp_path, namespace, key_file, prometheus.url, env)
    pods = RelayPods(rooms, prometheus)
    audience: Audience | None = None
    try:
        rooms.create(relay_room(origin_address, start_in=5))
        # -- the two-tier tree, with real processes at the addresses Kubernetes publishes
        wait_until(lambda: len(pods.ips()) == 3 and rooms.relays(ROOM) == (3, 3), 60,
                   "three Ready relay pods")  # fmt: skip
        ips = pods.ips()
        assert all(ipaddress.ip_address(ip).is_loopback for ip in ips.values()), (
            f"relay pods must have loopback IPs ({ips}): is the cluster's pod runner up?"
        )
        wait_until(lambda: len(pods.relays_in_map()) == 3, 60, "a map of three relays")
        tree = pods.relays_in_map()
        tier_two = [o for o, (_, parent) in tree.items() if parent is not None]
        assert tier_two, f"fanout 2 with three relays must make a second tier: {tree}"
        # who feeds whom, by the relays' own counts (found by name, with no API access)
        wait_until(lambda: fed_as_the_map_says(prometheus, namespace, pods), 30,
                   "each relay feeding the relays the map hangs under it")  # fmt: skip

        # a precondition, not a verdict: the map has given the second tier its share of the
        # shards (a relay the map adds gets its shards by rebalancing, within the budget)
        wait_until(
            lambda: (
                pods.shard_map()["assignment"].count(tier_two[0])
                >= len(pods.shard_map()["assignment"]) // 4
            ),
            60,
            "the second tier's relay given its share of the shards",
        )
        # Three of the first listeners are named so that their shards are the second
        # tier's (ids hash to shards by the map's published rule): fifteen arbitrary ids
        # all missed its 16-21 of 64 shards in one full run.
        assignment = pods.shard_map()["assignment"]
        candidates = (f"second-tier-listener-{n}" for n in range(1000))
        homed_there = [
            name
            for name in candidates
            if assignment[shard_of(name, len(assignment))] == tier_two[0]
        ][:3]
        audience = Audience(edge_url, namespace, ROOM)
        audience.add(len(homed_there), names=homed_there)
        audience.add(FIRST - len(homed_there))
        wait_until(lambda: audience.hearing(10), 60, "every listener hearing frames")
        # An edge that read the map a moment before the test did seats them by the one
        # before, and one that has not read the second tier's first report yet seats them
        # on the others as guests; either way their relay then tells them to move (within
        # the budget), and they do.
        wait_until(
            lambda: [lst for lst in audience.listeners if lst.pod == f"{ROOM}-relay-{tier_two[0]}"],
            30,
            "somebody listening through the second tier",
        )
        audience.frames_flow(25, 20)

        # -- more listeners: a scale-up, and the reshard that moves shards to the new relay
        audience.add(MORE)
        wait_until(lambda: len(pods.ips()) == 4 and 3 in pods.relays_in_map(), 60,
                   "a fourth relay in the map")  # fmt: skip
        wait_until(lambda: audience.hearing(10) and audience.by_pod().get(f"{ROOM}-relay-3"),
                   60, "everyone connected, some on the new relay")  # fmt: skip
        audience.frames_flow(25, 20)
        wait_until(lambda: fed_as_the_map_says(prometheus, namespace, pods), 30,
                   "the grown tree fed as the map says")  # fmt: skip
        grown = time.monotonic()

        # -- listeners leave: a scale-down by drain; relay 3 sends the rest back, is removed
        leaving = audience.listeners[-LEAVING:]
        audience.remove(leaving)
        wait_until(lambda: rooms.relays(ROOM)[0] == 3 and len(pods.ips()) == 3, 90,
                   "relay 3 drained and removed")  # fmt: skip
        assert audience.by_pod().get(f"{ROOM}-relay-3", 0) == 0
        audience.frames_flow(25, 20)
        steady = {lst.name: (lst.stats.lost, lst.stats.disconnects) for lst in audience.listeners}
        drained = time.monotonic()

        # -- a relay process killed mid-stream (SIGKILL: no goodbye); its listeners re-join
        # The relay carrying the most listeners (a leaf of the tree if one carries any): the
        # shards may leave any one relay, relay 0 included, with nobody after the drain. One
        # that leaves a moved listener elsewhere first: the moves are few (2 to 6), and the
        # gap of a move is judged only on listeners the kill did not also interrupt.
        parents = {parent for _, parent in pods.relays_in_map().values() if parent is not None}
        carrying = audience.by_pod()

        def spares_a_moved_listener(pod: str) -> bool:
            return any(lst.stats.relocations and lst.pod != pod for lst in audience.listeners)

        victim = max(
            (pod for pod, held in carrying.items() if held),
            key=lambda pod: (
                spares_a_moved_listener(pod),
                int(pod.rsplit("-", 1)[1]) not in parents,
                carrying[pod],
            ),
            default="no relay",
        )
        stranded = [lst for lst in audience.listeners if lst.pod == victim]
        assert stranded, f"{victim} carries listeners"
        joins_before = {lst.name: lst.stats.joins for lst in stranded}
        killed_at = time.monotonic()
        os.kill(runner_pid(kubeconfig, namespace, victim), signal.SIGKILL)
        wait_until(
            lambda: all(lst.stats.joins > joins_before[lst.name] and lst.connected.is_set()
                        for lst in stranded),
            60, "the killed relay's listeners back through the edge",
        )  # fmt: skip
        audience.frames_flow(25, 30)
        rejoined = time.monotonic()

        # -- counts in Prometheus come from the relay processes themselves
        def prometheus_agrees() -> bool:
            counted = prometheus_listeners(prometheus, namespace)
            held = audience.by_pod()
            return sum(held.values()) == FIRST + MORE - LEAVING and all(
                counted.get(pod) == float(n) for pod, n in held.items()
            )

        wait_until(prometheus_agrees, 30, "Prometheus's per-relay counts equal the listeners")
        instances = prometheus.client().custom_query(
            f'count by (instance) (audioroom_relay_listeners{{namespace="{namespace}"}})'
        )
        scraped = {r["metric"]["instance"].rsplit(":", 1)[0] for r in instances}
        assert scraped <= set(pods.scraped) and scraped, "series come from the pod IPs"

        # -- verdicts from what each listener heard
        moved = [lst for lst in audience.listeners if lst.stats.relocations]
        assert moved, "the reshard and the drain moved somebody"
        everyone = audience.listeners + audience.gone
        assert any(lst.stats.moves["shard-moved"] for lst in everyone), "no shard moved"
        assert any(lst.stats.moves["draining"] for lst in audience.listeners), "a drain moved"
        # the 12 who left heard every frame while they stayed, moved or not
        assert len(leaving) == LEAVING and all(lst in audience.gone for lst in leaving)
        for listener in leaving:
            stats = listener.stats
            assert stats.frames >= 50, f"{listener.name} heard only {stats.frames} frames"
            assert (stats.lost, stats.disconnects) == (0, 0), f"{listener.name}: {stats}"
        stranded_names = {lst.name for lst in stranded}
        for listener in audience.listeners:
            stats = listener.stats
            if listener.name in stranded_names:
                continue
            assert stats.lost == 0, f"{listener.name} lost {stats.lost} frames"
            assert stats.disconnects == 0, f"{listener.name} was cut off"
        for listener in moved:
            assert steady[listener.name] == (0, 0)
        # a moved listener's longest silence over the whole run, moves included
        move_gaps = [lst.stats.longest_gap for lst in moved if lst.name not in stranded_names]
        kill_gaps = [
            i.seconds for lst in stranded for i in lst.stats.interruptions
            if not i.cause.startswith("relocated")
        ]  # fmt: skip
        kill_lost = [lst.stats.lost for lst in stranded]
        figures = {
            "listeners": FIRST + MORE - LEAVING,
            "moved_listeners": len(moved),
            "longest_gap_moved_s": round(max(move_gaps, default=0.0), 3),
            "frames_lost_moved": sum(
                lst.stats.lost for lst in moved if lst.name not in stranded_names
            ),
            "killed_relay_listeners": len(stranded),
            "longest_gap_after_kill_s": round(max(kill_gaps, default=0.0), 3),
            "frames_lost_after_kill_max": max(kill_lost),
            "phases_s": {
                "up_to_grown": round(grown - began, 1),
                "drain": round(drained - grown, 1),
                "kill_to_rejoined": round(rejoined - killed_at, 1),
            },
        }
        print("relay e2e figures:", json.dumps(figures))
        (tmp_path / "figures.json").write_text(json.dumps(figures))
        assert max(kill_gaps, default=0.0) > 0, "the kill interrupted its listeners"
        assert move_gaps, "a listener that was not cut off moved"
        assert max(move_gaps) <= MOVED_GAP_BOUND, f"moved listeners back too late: {figures}"
        assert figures["frames_lost_moved"] == 0
    except BaseException:
        print("origin log:\n", origin_process.tail())
        print("edge log:\n", edge_process.tail())
        if audience is not None:
            for lst in audience.listeners[:5]:
                print("listener", lst.name, lst.pod, lst.stats)
            for record in audience.joiner.record:  # where the edge seated them, and by which map
                if record["listener"].startswith("second-tier-"):
                    print("admitted", record)
            print("queued answers", audience.joiner.queued)
        print("prometheus", prometheus_listeners(prometheus, namespace), pods.scraped)
        print("status", json.dumps(rooms.get(ROOM).get("status")))
        print("map", pods.relays_in_map())
        slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(namespace)
        for item in slices.items:
            print("slice", item.metadata.name, [(e.addresses, e.conditions.ready,
                  e.target_ref.name if e.target_ref else None) for e in item.endpoints or []],
                  [(p.name, p.port) for p in item.ports or []])  # fmt: skip
        raise
    finally:
        if audience is not None:
            audience.stop()
        edge_process.stop()
        origin_process.stop()
