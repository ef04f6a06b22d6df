"""Relay pods as a watch delivers them, and the versions that tell our writes from others'."""

from __future__ import annotations

from datetime import UTC, datetime

from townsquare.kube.client import child_version, relay_pod


def _pod(name: str, ready: str = "True", **meta: object) -> dict[str, object]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T10:00:00Z", **meta},
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "lastTransitionTime": "2026-01-01T10:00:30Z"}
            ],
            "containerStatuses": [{"restartCount": 0}],
        },
    }


def test_a_ready_relay_pod_carries_its_ordinal_and_start_up_time() -> None:
    pod = relay_pod(_pod("launch-relay-7"), "launch")
    assert pod is not None
    assert (pod.ordinal, pod.ready, pod.startup_seconds) == (7, True, 30.0)
    assert pod.created == datetime(2026, 1, 1, 10, tzinfo=UTC)


def test_other_rooms_pods_and_leaving_pods_are_not_relays_of_the_room() -> None:
    assert relay_pod(_pod("launch-relay-7"), "launc") is None
    assert relay_pod(_pod("launch-relay-x"), "launch") is None
    assert (
        relay_pod(_pod("launch-relay-1", deletionTimestamp="2026-01-01T11:00:00Z"), "launch")
        is None
    )
    starting = relay_pod(_pod("launch-relay-1", ready="False"), "launch")
    assert starting is not None and not starting.ready and starting.startup_seconds is None


def test_child_versions_grow_with_content_changes() -> None:
    assert child_version({"generation": 3, "resourceVersion": "900"}) == ("generation", 3)
    assert child_version({"resourceVersion": "900"}) == ("resourceVersion", 900)
