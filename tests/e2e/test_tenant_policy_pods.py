"""Relay pods as production clusters see them: admitted where Pod Security "restricted" is
enforced, and a refusal by the API server (here a ResourceQuota) shown on the room."""

from __future__ import annotations

from typing import Any

import pytest
from harness import wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import Rooms, room_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def condition(rooms: Rooms, name: str, kind: str) -> dict[str, Any]:
    status = rooms.get(name).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def test_relays_run_where_restricted_pod_security_is_enforced(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(api_client)
    core.patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    # The namespace does refuse a pod with no security context: the enforcement is real.
    bare = client.V1Pod(
        metadata=client.V1ObjectMeta(name="bare"),
        spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="busybox")]),
    )
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(namespace, bare)
    assert refused.value.status == 403 and "restricted" in refused.value.body

    rooms = Rooms(api_client, namespace)
    rooms.create(room_manifest("strict", start_in=8, prewarm_lead="6s", duration="1m"))
    wait_until(lambda: rooms.relays("strict") == (4, 4), 60, "4 relays Ready")
    pod = core.read_namespaced_pod("strict-relay-0", namespace)
    assert pod.spec.automount_service_account_token is False
    assert pod.spec.security_context.run_as_non_root is True
    assert {c.topology_key for c in pod.spec.topology_spread_constraints} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    assert pod.spec.termination_grace_period_seconds == 5 + 3  # preStop + drainTimeout
    assert condition(rooms, "strict", "RelaysBlocked") == {}, "never blocked"


def test_relays_refused_by_a_quota_show_relays_blocked_with_the_api_server_s_reason(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_resource_quota(
        namespace,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="relays"),
            spec=client.V1ResourceQuotaSpec(hard={"pods": "2"}),
        ),
    )
    rooms = Rooms(api_client, namespace)
    rooms.create(room_manifest("squeezed", start_in=5, prewarm_lead="4s", duration="1m"))
    blocked = wait_until(
        lambda: (c := condition(rooms, "squeezed", "RelaysBlocked")).get("status") == "True" and c,
        60,
        "RelaysBlocked",
    )
    assert blocked["reason"] == "FailedCreate"
    # Counted from the relay pods the operator has seen: under load its first count may
    # come before the quota's 2 pods are seen, so the count settles on 4 - 2 a pass later.
    settled = wait_until(
        lambda: (
            "2 relay pods not created"
            in (m := condition(rooms, "squeezed", "RelaysBlocked")["message"])
            and m
        ),
        30,
        "the count of missing relays to settle on 2",
    )
    assert "exceeded quota: relays" in settled, "the API server's own reason"
    # A pass writes the condition before it posts the Event.
    warning = wait_until(
        lambda: [e for e in rooms.events("squeezed") if e.reason == "RelaysBlocked"],
        30,
        "the RelaysBlocked Event",
    )
    assert warning[0].type == "Warning"
    assert "exceeded quota" in warning[0].message

    core.delete_namespaced_resource_quota("relays", namespace)
    wait_until(
        lambda: condition(rooms, "squeezed", "RelaysBlocked").get("status") == "False",
        90,
        "RelaysBlocked to clear once the quota is gone",
    )
    wait_until(lambda: rooms.relays("squeezed") == (4, 4), 60, "every relay Ready")
