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


def test_a_relay_gets_its_map_from_a_mounted_config_map_and_needs_no_api_token() -> None:
    pod = relays(port=7000, metricsPort=7001)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"]
           for e in container["env"]}  # fmt: skip
    [volume] = [v for v in pod["volumes"] if v["name"] == "shard-map"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "shard-map"]
    assert volume["configMap"]["name"] == "r-shards" and volume["configMap"]["optional"]
    assert env["TOWNSQUARE_MAP_FILE"] == f"{mount['mountPath']}/shardmap.json"
    assert mount["readOnly"] and pod["automountServiceAccountToken"] is False
    assert env["TOWNSQUARE_ORIGIN"] == "metadata.annotations['townsquare.dev/origin']"
    assert (env["TOWNSQUARE_PORT"], env["TOWNSQUARE_METRICS_PORT"]) == ("7000", "7001")
    assert env["POD_IP"] == "status.podIP"
    assert "args" not in container, "the image's own command unless spec.relay.args says"
    [reference] = relays(args=["relay"])["spec"]["template"]["spec"]["containers"]
    assert reference["args"] == ["relay"]


def test_relay_pods_carry_the_rooms_slot_so_a_partition_selects_them_server_side() -> None:
    from townsquare.handlers import watch_selectors
    from townsquare.partitions import SLOT_LABEL, Partition, slot_of

    labels = relays()["spec"]["template"]["metadata"]["labels"]
    assert labels[SLOT_LABEL] == str(slot_of("ns", "r"))
    serving = next(i for i in range(2) if slot_of("ns", "r") in Partition(i, 2).slots)
    selector = watch_selectors(Partition(serving, 2))["v1", "pods"]
    assert selector.endswith(f",{Partition(serving, 2).label_selector()}")
    assert watch_selectors(Partition())["v1", "pods"] == (
        "app.kubernetes.io/component in (relay,headroom)"
    ), "one partition: no slot selector"
    legacy = watch_selectors(Partition(serving, 2), pods_labelled=False)["v1", "pods"]
    assert SLOT_LABEL not in legacy, "pods made before the label exist: filtered client-side"


def test_a_statefulset_made_before_pods_carried_the_slot_keeps_its_template() -> None:
    """Adding the label would be a new template revision: every live room's relays would
    be drained and replaced by an operator upgrade."""
    spec = AudioRoomSpec.model_validate(
        {
            "startTime": "2026-12-01T23:00:00Z",
            "duration": "1h",
            "expectedAudience": 1000,
            "relay": {"image": "registry.example/relay:1"},
        }
    )
    legacy = relay_stateful_set("r", "ns", "uid", spec, 3, slot_label=False)
    current = relay_stateful_set("r", "ns", "uid", spec, 3)
    assert "townsquare.dev/slot" not in legacy["spec"]["template"]["metadata"]["labels"]
    current["spec"]["template"]["metadata"]["labels"].pop("townsquare.dev/slot")
    assert legacy == current, "the only difference"
