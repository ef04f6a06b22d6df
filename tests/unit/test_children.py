"""The relay pod template: what a production cluster asks of a pod."""

from __future__ import annotations

from typing import Any

from townsquare.api.models import AudioRoomSpec
from townsquare.kube.children import relay_stateful_set


def relays(**relay: Any) -> dict[str, Any]:
    spec = AudioRoomSpec.model_validate(
        {
            "startTime": "2026-12-01T23:00:00Z",
            "duration": "1h",
            "expectedAudience": 1000,
            "relay": {"image": "registry.example/relay:1", **relay},
            "scaling": {"drainTimeout": "10m"},
        }
    )
    return relay_stateful_set("r", "ns", "uid", spec, 3)


def test_the_operator_not_the_statefulset_replaces_relays() -> None:
    assert relays()["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_defaults_meet_the_restricted_pod_security_standard() -> None:
    pod = relays()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False


def test_relays_spread_across_zones_and_nodes_by_default() -> None:
    pod = relays()["spec"]["template"]["spec"]
    keys = {c["topologyKey"]: c["whenUnsatisfiable"] for c in pod["topologySpreadConstraints"]}
    assert keys == {
        "topology.kubernetes.io/zone": "ScheduleAnyway",
        "kubernetes.io/hostname": "ScheduleAnyway",
    }
    off = relays(topologySpread={"zones": "Off", "nodes": "DoNotSchedule"})
    [only] = off["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert (only["topologyKey"], only["whenUnsatisfiable"]) == (
        "kubernetes.io/hostname",
        "DoNotSchedule",
    )


def test_a_stopping_relay_has_the_time_to_drain() -> None:
    pod = relays(preStopSeconds=7)["spec"]["template"]["spec"]
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 7}}}
    assert pod["terminationGracePeriodSeconds"] == 7 + 600


def test_pull_secrets_priority_affinity_and_security_context_from_the_spec() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    pod = relays(
        imagePullSecrets=[{"name": "pull"}],
        priorityClassName="relays-high",
        affinity=affinity,
        securityContext={"runAsUser": 1000, "readOnlyRootFilesystem": False},
    )["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert pod["priorityClassName"] == "relays-high"
    assert pod["affinity"] == affinity
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
