"""The number of partitions changes with rooms live: one operator serves every room, then two
partitions start beside it, then it stops. Each room has exactly one actor throughout.

The verdict comes from the API server's record: each re-plan Event names the replica that
posted it (reportingInstance), and every room is re-planned once per change of its audience.
Then a room pre-warms under the two partitions: its partition sees its relays come up
through a watch of pods that the API server filters by slot label, and the other
partition's filter matches none of them.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import Rooms, room_manifest

from townsquare.handlers import watch_selectors
from townsquare.kube.client import CLAIMS, Cluster
from townsquare.partitions import SLOT_LABEL, Claim, Partition, slot_of

pytestmark = [pytest.mark.e2e]

ROOMS = [f"room-{i}" for i in range(8)]


def _booked_ahead(name: str) -> dict[str, Any]:
    """A room two days ahead with no relay: its passes write status only."""
    manifest = room_manifest(name, start_in=2 * 86400, duration="1h")
    manifest["spec"]["scaling"]["minRelays"] = 0
    return manifest


def _replanned(rooms: Rooms, name: str, after: datetime) -> list[str]:
    """The replicas that posted the room's Replanned Events since `after`."""
    return [
        event.reporting_instance or ""
        for event in rooms.events(name)
        if event.reason == "Replanned" and event.metadata.creation_timestamp >= after
    ]


def _change_every_audience(rooms: Rooms, audience: int) -> datetime:
    changed_at = datetime.now(UTC) - timedelta(seconds=1)  # Events have 1 s resolution
    for name in ROOMS:
        rooms.patch_spec(name, {"expectedAudience": audience})
    return changed_at


def _replanned_everywhere(rooms: Rooms, relays: int) -> bool:
    return all(rooms.get(name)["status"]["plan"]["relays"] == relays for name in ROOMS)


def test_partitions_added_beside_a_running_operator_take_over_each_room_alone(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    single = OperatorProcess(kubeconfig, namespace, tmp_path / "single.log")
    halves = [
        OperatorProcess(kubeconfig, namespace, tmp_path / f"half-{i}.log", "--partition", f"{i}/2")
        for i in range(2)
    ]
    host = os.uname().nodename
    try:
        single.start()
        for name in ROOMS:
            rooms.create(_booked_ahead(name))
        wait_until(lambda: all(rooms.phase(n) == "Scheduled" for n in ROOMS), 120, "phases")
        for half in halves:
            half.start()
        for half in halves:
            half.wait_started()
        assert single.process and all(half.process for half in halves)
        named = {f"{host}-{p.process.pid}": p for p in (single, *halves) if p.process}
        # The two partitions label every room (their watches select by label) and wait.
        wait_until(
            lambda: all("townsquare.dev/slot" in rooms.get(n)["metadata"]["labels"] for n in ROOMS),
            60,
            "every room labelled with its slot",
        )
        first = _change_every_audience(rooms, 6000)
        wait_until(lambda: _replanned_everywhere(rooms, 8), 60, "the first re-plan")
        time.sleep(2)  # a second actor's duplicate Event would land meanwhile
        before = {name: _replanned(rooms, name, first) for name in ROOMS}

        stopped_at = time.monotonic()
        single.stop()
        second = _change_every_audience(rooms, 9000)
        wait_until(lambda: _replanned_everywhere(rooms, 12), 60, "the partitions to re-plan")
        taken_over = time.monotonic() - stopped_at
        time.sleep(2)
        after = {name: _replanned(rooms, name, second) for name in ROOMS}

        rooms.create(room_manifest("prewarmed", start_in=20, audience=1500, duration="1h"))
        wait_until(lambda: rooms.phase("prewarmed") == "Ready", 60, "its relays Ready")
        relay_pods = (
            client.CoreV1Api(api_client)
            .list_namespaced_pod(namespace, label_selector="townsquare.dev/room=prewarmed")
            .items
        )
        by_selector = {
            i: client.CoreV1Api(api_client)
            .list_namespaced_pod(
                namespace, label_selector=watch_selectors(Partition(i, 2))["v1", "pods"]
            )
            .items
            for i in range(2)
        }
    finally:
        for process in (single, *halves):
            process.stop()
    print(f"\nevery room re-planned by its partition {taken_over:.1f}s after the stop began")
    assert all(actors == [f"{host}-{single.process.pid}"] for actors in before.values()), (
        f"while the single operator ran, only it acted: {before}"
    )
    assert all(len(actors) == 1 for actors in after.values()), f"one Replanned each: {after}"
    by_replica = Counter(named[actors[0]] for actors in after.values())
    assert set(by_replica) == set(halves), f"both partitions act, on their own rooms: {after}"

    slot = slot_of(namespace, "prewarmed")
    serving = next(i for i in range(2) if slot in Partition(i, 2).slots)
    names = sorted(pod.metadata.name for pod in relay_pods)
    assert len(names) >= 2, names
    assert all(pod.metadata.labels.get(SLOT_LABEL) == str(slot) for pod in relay_pods)
    assert sorted(p.metadata.name for p in by_selector[serving]) == names
    assert not by_selector[1 - serving], "the other partition's watch is sent none of them"


def test_the_api_server_refuses_a_claims_write_based_on_a_table_that_changed_since(
    api_client: client.ApiClient, namespace: str
) -> None:
    """Two replicas write the claims table at once, each on the version it read: the API
    server (not our code) lets one through and refuses the other (409), so neither entry is
    silently overwritten; the same for two creates of a missing table, and for a write
    based on a table that was deleted and made again since."""
    first, second = Cluster(api_client, identity="first"), Cluster(api_client, identity="second")
    claim = Claim(frozenset(range(128)), datetime.now(UTC), timedelta(seconds=30))

    def refused(write: Callable[[], object]) -> int:
        with pytest.raises(ApiException) as refusal:
            write()
        return int(refusal.value.status)

    missing = first.read_claims(namespace)
    assert missing.version is None and second.read_claims(namespace).version is None
    uid = first.write_claim(namespace, None, "first", claim)
    assert refused(lambda: second.write_claim(namespace, None, "second", claim)) == 409

    read = first.read_claims(namespace)
    assert read.uid == uid and set(read.claims) == {"first"}
    renewal = Claim(claim.slots, claim.renewed + timedelta(seconds=7), claim.lifetime)
    first.write_claim(namespace, read.version, "first", renewal)  # (a write that changes it)
    assert refused(lambda: second.write_claim(namespace, read.version, "second", claim)) == 409
    assert set(second.read_claims(namespace).claims) == {"first"}, "the first write stands"
    # A write that changes nothing is none: the version stays, so readers would not see a
    # renewal that wrote the same entry again (decide_claims always moves the stamp on).
    same = first.read_claims(namespace)
    first.write_claim(namespace, same.version, "first", renewal)
    assert first.read_claims(namespace).version == same.version

    stale = second.read_claims(namespace)
    client.CoreV1Api(api_client).delete_namespaced_config_map(CLAIMS, namespace)
    recreated = first.write_claim(namespace, None, "first", claim)
    assert recreated != uid, "another incarnation: its own uid"
    assert refused(lambda: second.write_claim(namespace, stale.version, "second", claim)) == 409
    assert set(first.read_claims(namespace).claims) == {"first"}
