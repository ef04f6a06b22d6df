"""A room's life on the real cluster, with `townsquare run` as the operator.

Rooms are time-compressed: the start is under a minute ahead, relays take a few seconds to
become Ready (kwok's per-pod delay), the event lasts seconds.
"""

from __future__ import annotations

import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from harness import REPO, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import GROUP, PHASES, PLURAL, VERSION, Recorder, Rooms, room_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def rooms(api_client: client.ApiClient, namespace: str, crds: list[str]) -> Rooms:
    return Rooms(api_client, namespace)


def test_phases_in_order_with_relays_ready_before_the_start(
    rooms: Rooms, operator: OperatorProcess, kubeconfig: Path
) -> None:
    manifest = room_manifest("launch", start_in=35)
    start = datetime.fromisoformat(manifest["spec"]["startTime"]).timestamp()
    rooms.create(manifest)
    recorder = Recorder(rooms, "launch")
    try:
        wait_until(lambda: rooms.phase("launch") == "Ended", 120, "the room to end")
    finally:
        recorder.stop()

    assert recorder.phases() == PHASES, operator.log_text()[-3000:]
    # 0: the StatefulSet is not there yet (the status is written before the children)
    scheduled = {replicas for _, _, replicas, _ in recorder.in_phase("Scheduled")}
    assert scheduled - {0} == {1}
    ready_samples = recorder.in_phase("Ready")
    assert ready_samples, "the room was seen Ready"
    assert all(replicas == ready == 4 for _, _, replicas, ready in ready_samples)
    assert ready_samples[0][0] < start, "every planned relay was Ready before the start"
    assert all(ready == 4 for _, _, _, ready in recorder.in_phase("Live"))
    assert recorder.samples[-1][2:] == (0, 0), "relays are gone once the room has ended"

    # The Event that says Ended may be posted just after the status that says so.
    wait_until(lambda: "Ended" in rooms.reasons("launch"), 15, "the Ended Event")
    reasons = rooms.reasons("launch")
    for expected in ["PreWarmStarted", "PreWarmed", "Live", "Draining", "Ended"]:
        assert reasons.count(expected) == 1, reasons
    prewarmed = next(e for e in rooms.events("launch") if e.reason == "PreWarmed")
    assert prewarmed.message.startswith("4/4 relays ready")

    described = subprocess.run(
        [
            str(REPO / ".venv/bin/kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            rooms.namespace,
            "describe",
            "audioroom",
            "launch",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "PreWarmStarted" in described and "4 relays for 3,000 expected listeners" in described


def test_printer_columns_show_phase_and_relays(
    rooms: Rooms, operator: OperatorProcess, kubeconfig: Path
) -> None:
    rooms.create(room_manifest("columns", start_in=600))
    wait_until(lambda: rooms.relays("columns") == (1, 1), 60, "the minimum relay to be Ready")
    wait_until(lambda: rooms.get("columns")["status"]["relays"]["ready"] == 1, 30, "status")
    table = subprocess.run(
        [
            str(REPO / ".venv/bin/kubectl"),
            "--kubeconfig",
            str(kubeconfig),
            "-n",
            rooms.namespace,
            "get",
            "ar",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:6] == ["NAME", "PHASE", "EXPECTED", "LISTENERS", "RELAYS", "START"]
    assert row[:3] == ["columns", "Scheduled", "3000"]
    assert "1/1" in row


def test_operator_killed_during_prewarm_and_live_resumes_without_a_trace(
    rooms: Rooms, operator: OperatorProcess
) -> None:
    rooms.create(room_manifest("resilient", start_in=30, duration="25s"))
    recorder = Recorder(rooms, "resilient")
    try:
        wait_until(lambda: rooms.phase("resilient") == "PreWarming", 60, "pre-warming")
        operator.kill()
        time.sleep(1)  # the gap a crash leaves; nothing may change because of it
        operator.start()
        wait_until(lambda: rooms.phase("resilient") == "Live", 90, "the event to go live")
        operator.kill()
        operator.start()
        wait_until(lambda: rooms.phase("resilient") == "Ended", 90, "the room to end")
    finally:
        recorder.stop()

    assert recorder.phases() == PHASES
    live = [replicas for _, phase, replicas, _ in recorder.samples if phase in ("Ready", "Live")]
    assert live and min(live) == 4, "relays never shrank while live, restarts included"
    reasons = rooms.reasons("resilient")
    for expected in ["PreWarmStarted", "Live", "Draining", "Ended"]:
        assert reasons.count(expected) == 1, reasons
    sets = rooms.apps.list_namespaced_stateful_set(rooms.namespace).items
    assert [s.metadata.name for s in sets] == ["resilient-relay"], "no duplicate children"


def test_deleting_the_room_removes_its_children(rooms: Rooms, operator: OperatorProcess) -> None:
    rooms.create(room_manifest("brief", start_in=600))
    wait_until(lambda: rooms.relays("brief")[0] == 1, 60, "the relay StatefulSet")
    wait_until(
        lambda: rooms.core.read_namespaced_config_map("brief-shards", rooms.namespace),
        30,
        "the shard map ConfigMap",
    )
    rooms.custom.delete_namespaced_custom_object(GROUP, VERSION, rooms.namespace, PLURAL, "brief")

    def children_left() -> list[str]:
        ns = rooms.namespace
        return [
            *(s.metadata.name for s in rooms.apps.list_namespaced_stateful_set(ns).items),
            *(s.metadata.name for s in rooms.core.list_namespaced_service(ns).items),
            *(
                c.metadata.name
                for c in rooms.core.list_namespaced_config_map(ns).items
                if c.metadata.name.startswith("brief")
            ),
            *(
                p.metadata.name
                for p in client.PolicyV1Api(rooms.api)
                .list_namespaced_pod_disruption_budget(ns)
                .items
            ),
        ]

    wait_until(lambda: children_left() == [], 60, "garbage collection of the children")


def test_raising_the_audience_replans_at_once(rooms: Rooms, operator: OperatorProcess) -> None:
    rooms.create(room_manifest("growing", start_in=600, audience=3000))
    wait_until(lambda: rooms.phase("growing") == "Scheduled", 60, "the room to be scheduled")
    assert rooms.get("growing")["status"]["plan"]["relays"] == 4
    rooms.patch_spec("growing", {"expectedAudience": 6000})
    wait_until(lambda: rooms.get("growing")["status"]["plan"]["relays"] == 8, 30, "the new plan")
    replanned = wait_until(
        lambda: [e for e in rooms.events("growing") if e.reason == "Replanned"], 30, "Replanned"
    )
    assert "expected audience 3,000 -> 6,000: 4 -> 8 relays" in replanned[0].message


def test_a_child_changed_by_hand_is_brought_back(rooms: Rooms, operator: OperatorProcess) -> None:
    rooms.create(room_manifest("stubborn", start_in=600))
    wait_until(lambda: rooms.relays("stubborn")[0] == 1, 60, "the relay StatefulSet")
    rooms.apps.patch_namespaced_stateful_set(
        "stubborn-relay", rooms.namespace, {"spec": {"replicas": 5}}
    )
    wait_until(lambda: rooms.relays("stubborn")[0] == 1, 30, "replicas to be restored")
    rooms.core.delete_namespaced_service("stubborn-relays", rooms.namespace)
    wait_until(
        lambda: rooms.core.read_namespaced_service("stubborn-relays", rooms.namespace),
        30,
        "the Service to be recreated",
    )


def test_unwise_rooms_run_with_warnings_and_do_not_stop_others(
    rooms: Rooms, operator: OperatorProcess
) -> None:
    late = room_manifest("late", start_in=-30, duration="10m")
    huge = room_manifest("huge", start_in=600, audience=1_000_000)
    healthy = room_manifest("healthy", start_in=600)
    for manifest in (late, huge, healthy):
        rooms.create(manifest)

    wait_until(lambda: rooms.phase("late") == "Live", 60, "the late room to go live")
    late_warning = wait_until(
        lambda: [e for e in rooms.events("late") if e.reason == "StartTimePassed"], 30, "warning"
    )
    assert late_warning[0].type == "Warning"
    wait_until(lambda: rooms.relays("late") == (4, 4), 60, "the late room's relays")

    huge_status = wait_until(lambda: rooms.get("huge").get("status"), 60, "huge's status")
    capacity = next(c for c in huge_status["conditions"] if c["type"] == "CapacityExceeded")
    assert capacity["status"] == "True"
    assert "exceeds the 15,000 listeners that maxRelays (20) carries" in capacity["message"]
    assert huge_status["plan"]["relays"] == 20

    wait_until(lambda: rooms.phase("healthy") == "Scheduled", 60, "the healthy room")
