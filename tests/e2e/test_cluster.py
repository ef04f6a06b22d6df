"""The local cluster schedules pods to kwok nodes and makes them Ready after a set delay."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
from harness import wait_until
from kubernetes import client

pytestmark = pytest.mark.e2e

READY_DELAY_SECONDS = 6
READY_DELAY_ANNOTATION = "pod-ready.stage.kwok.x-k8s.io/delay"


def relay_statefulset(name: str, replicas: int) -> client.V1StatefulSet:
    labels = {"app": name}
    return client.V1StatefulSet(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1StatefulSetSpec(
            replicas=replicas,
            service_name=name,
            pod_management_policy="Parallel",
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(
                    labels=labels,
                    annotations={READY_DELAY_ANNOTATION: f"{READY_DELAY_SECONDS}s"},
                ),
                spec=client.V1PodSpec(
                    node_selector={"type": "kwok"},
                    containers=[
                        client.V1Container(name="relay", image="registry.example/relay:test")
                    ],
                ),
            ),
        ),
    )


def condition_time(pod: client.V1Pod, kind: str) -> datetime | None:
    for condition in pod.status.conditions or []:
        if condition.type == kind and condition.status == "True":
            return condition.last_transition_time  # type: ignore[no-any-return]
    return None


def test_statefulset_pods_land_on_kwok_nodes_and_become_ready_after_the_delay(
    api_client: client.ApiClient, namespace: str, kwok_nodes: list[str]
) -> None:
    core = client.CoreV1Api(api_client)
    client.AppsV1Api(api_client).create_namespaced_stateful_set(
        namespace, relay_statefulset("relay", replicas=3)
    )
    created = time.monotonic()

    def pods() -> list[client.V1Pod]:
        return core.list_namespaced_pod(namespace, label_selector="app=relay").items  # type: ignore[no-any-return]

    def all_scheduled() -> list[client.V1Pod] | None:
        found = pods()
        return found if len(found) == 3 and all(p.spec.node_name for p in found) else None

    def all_ready() -> list[client.V1Pod] | None:
        found = pods()
        return found if all(condition_time(p, "Ready") for p in found) else None

    scheduled = wait_until(all_scheduled, 30, "3 relay pods to be scheduled")
    assert {p.spec.node_name for p in scheduled} <= set(kwok_nodes)
    not_ready_yet = [p.metadata.name for p in pods() if condition_time(p, "Ready") is None]
    assert time.monotonic() - created < READY_DELAY_SECONDS, "scheduling took longer than the delay"
    assert len(not_ready_yet) == 3, "pods became Ready before their delay"

    ready = wait_until(all_ready, READY_DELAY_SECONDS + 30, "3 relay pods to become Ready")

    assert time.monotonic() - created >= READY_DELAY_SECONDS - 1
    for pod in ready:
        became_ready = condition_time(pod, "Ready")
        was_scheduled = condition_time(pod, "PodScheduled")
        assert became_ready and was_scheduled
        waited = (became_ready - was_scheduled).total_seconds()  # whole seconds on the server
        assert READY_DELAY_SECONDS - 1 <= waited <= READY_DELAY_SECONDS + 5, pod.metadata.name
        assert pod.status.phase == "Running"
