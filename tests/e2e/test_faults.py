"""Faults survived on the real cluster: a replica killed, the API server stopped, Prometheus
losing series or answering slowly, and the operator in the chart's cluster-wide mode.

Verdicts come from the API server's own record (Events with the replica that posted them,
the StatefulSet's size, the shard map) and from a real Prometheus, never from the operator's
logs. The faults that would disturb tests running beside them (stopping the API server, an
operator serving every namespace) get a kwok cluster of their own.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from edges import EdgeFleet
from faults import ApiServer, FilteringPrometheus, SlowProxy, cluster_of_its_own
from harness import REPO, Prometheus, wait_until
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import PHASES, LoadGenerator, Recorder, Rooms, room_manifest, scaling_room, write_trace

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST_METRICS = ("--metrics-interval", "1", "--metrics-max-age", "5")
STEADY = 300
"""Listeners in the steady rooms: 5 relays of 100 at 70% utilization."""


def _condition(rooms: Rooms, name: str, kind: str) -> dict[str, Any]:
    status = rooms.get(name).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), {})


def _draining(rooms: Rooms, name: str) -> set[int]:
    data = rooms.core.read_namespaced_config_map(f"{name}-shards", rooms.namespace).data
    shard_map = json.loads(data["shardmap.json"])
    return {r["ordinal"] for r in shard_map["relays"] if r["state"] == "draining"}


def _steady_room(
    rooms: Rooms, kubeconfig: Path, prometheus: Prometheus, tmp_path: Path, name: str
) -> tuple[LoadGenerator, EdgeFleet]:
    """A live room carrying STEADY listeners on 5 relays, with MetricsAvailable True."""
    trace = write_trace(tmp_path / f"{name}.csv", [(-30, 0), (0, STEADY), (600, STEADY)])
    rooms.create(scaling_room(name, start_in=5, duration="10m", audience=STEADY))
    edges = EdgeFleet(kubeconfig, rooms.namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, rooms.namespace, name, trace, edges)
    prometheus.add_target(load.address)
    wait_until(
        lambda: _condition(rooms, name, "MetricsAvailable").get("status") == "True",
        90,
        "listeners observed",
    )
    wait_until(lambda: rooms.relays(name) == (5, 5), 60, f"5 relays for {STEADY} listeners")
    return load, edges


def _holds(rooms: Rooms, name: str, seconds: float) -> None:
    """For longer than the stabilization window: no relay removed, none marked draining."""
    until = time.time() + seconds
    while time.time() < until:
        assert rooms.relays(name)[0] == 5, "the room scaled down on missing data"
        assert not _draining(rooms, name), "a relay was marked draining on missing data"
        time.sleep(0.5)


@pytest.fixture
def filtering_prometheus(tmp_path: Path) -> Iterator[FilteringPrometheus]:
    server = FilteringPrometheus(tmp_path / "prometheus")
    server.start()
    yield server
    server.stop()


def test_prometheus_missing_some_relays_holds_the_room(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    kubeconfig: Path,
    filtering_prometheus: FilteringPrometheus,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    operator = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log",
        "--prometheus-url", filtering_prometheus.url, *FAST_METRICS,
    )  # fmt: skip
    operator.start()
    try:
        load, edges = _steady_room(rooms, kubeconfig, filtering_prometheus, tmp_path, "partial")
    except BaseException:
        operator.stop()  # no operator outlives a test that failed to set up
        raise
    try:
        filtering_prometheus.drop_pods("partial-relay-[34]")
        wait_until(
            lambda: (
                filtering_prometheus.value('count(audioroom_relay_listeners{room="partial"})') == 3
            ),
            30,
            "Prometheus to hold only 3 of the 5 relays",
        )
        unavailable = wait_until(
            lambda: (
                (c := _condition(rooms, "partial", "MetricsAvailable"))["status"] == "False" and c
            ),
            30,
            "MetricsAvailable False on a partial reading",
        )
        assert "partial reading" in unavailable["message"]
        assert "3, 4" in unavailable["message"], "the missing relays are named"
        # Counted as zero, 2 of 5 relays would make 180 listeners: 3 relays after 10s.
        _holds(rooms, "partial", 15)
        filtering_prometheus.drop_pods("")
        wait_until(
            lambda: _condition(rooms, "partial", "MetricsAvailable")["status"] == "True",
            30,
            "MetricsAvailable True once every relay reports again",
        )
    finally:
        load.stop()
        edges.stop()
        operator.stop()
    assert rooms.relays("partial")[0] == 5
    warnings = [e for e in rooms.events("partial") if e.reason == "MetricsUnavailable"]
    assert [w.message for w in warnings if "partial reading" in w.message], warnings


def test_prometheus_slower_than_the_timeout_holds_the_room(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    kubeconfig: Path,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    proxy = SlowProxy(prometheus.port)
    operator = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log",
        "--prometheus-url", proxy.url, "--metrics-timeout", "1", *FAST_METRICS,
    )  # fmt: skip
    operator.start()
    try:
        load, edges = _steady_room(rooms, kubeconfig, prometheus, tmp_path, "slow")
    except BaseException:
        operator.stop()  # no operator outlives a test that failed to set up
        raise
    try:
        proxy.delay = 3.0
        unavailable = wait_until(
            lambda: (c := _condition(rooms, "slow", "MetricsAvailable"))["status"] == "False" and c,
            30,
            "MetricsAvailable False while Prometheus answers after the timeout",
        )
        assert "did not answer within 1s" in unavailable["message"]
        _holds(rooms, "slow", 15)
        proxy.delay = 0.0
        wait_until(
            lambda: _condition(rooms, "slow", "MetricsAvailable")["status"] == "True",
            30,
            "MetricsAvailable True once Prometheus answers in time",
        )
    finally:
        load.stop()
        edges.stop()
        operator.stop()
        proxy.close()
    assert rooms.relays("slow")[0] == 5


def _peered_pair(
    api_client: client.ApiClient, namespace: str, kubeconfig: Path, tmp_path: Path
) -> tuple[OperatorProcess, OperatorProcess]:
    """(primary, standby): two operators in one kopf peering "ha" (10 s lifetime), priority
    100 and 99, neither started yet."""
    _peering_crds(kubeconfig)
    client.CustomObjectsApi(api_client).create_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "ha"}},
    )  # fmt: skip
    peering = ("--peering", "ha", "--peering-lifetime", "10")
    primary, standby = (
        OperatorProcess(
            kubeconfig, namespace, tmp_path / f"{role}.log", *peering, "--priority", priority
        )
        for role, priority in (("primary", "100"), ("standby", "99"))
    )
    return primary, standby


def _peering_crds(kubeconfig: Path) -> None:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    extensions = client.ApiextensionsV1Api(api)
    path = REPO / "charts" / "townsquare" / "crds" / "kopf.dev-peerings.yaml"
    for body in yaml.safe_load_all(path.read_text()):
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as error:
            if error.status != 409:
                raise
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        wait_until(
            lambda name=name: any(
                c.type == "Established" and c.status == "True"
                for c in extensions.read_custom_resource_definition(name).status.conditions or []
            ),
            30,
            f"CRD {name}",
        )


def _by_replica(rooms: Rooms, name: str) -> list[tuple[float, str, str]]:
    """(time, reason, replica that posted it) of the room's Events, as the API server has them."""
    return sorted(
        (e.metadata.creation_timestamp.timestamp(), e.reason, e.reporting_instance or "")
        for e in rooms.events(name)
    )


def test_primary_killed_mid_event_the_standby_takes_over_alone(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    kwok_nodes: list[str],
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    primary, standby = _peered_pair(api_client, namespace, kubeconfig, tmp_path)
    rooms = Rooms(api_client, namespace)
    primary.start()
    standby.start()
    try:

        def peers() -> int:
            peering = client.CustomObjectsApi(api_client).get_namespaced_custom_object(
                "kopf.dev", "v1", namespace, "kopfpeerings", "ha"
            )
            return sum(1 for value in (peering.get("status") or {}).values() if value)

        wait_until(lambda: peers() == 2, 60, "both replicas in the peering")
        time.sleep(3)  # kopf starts paused and decides on the next peering update
        rooms.create(room_manifest("event", start_in=15, duration="10m"))
        wait_until(lambda: rooms.phase("event") == "Live", 90, "the event to be live")
        assert primary.process and standby.process
        identities = {f"{os.uname().nodename}-{p.process.pid}": p for p in (primary, standby)}
        audiences = [6000, 9000, 4500]
        rooms.patch_spec("event", {"expectedAudience": audiences[0]})
        wait_until(lambda: rooms.get("event")["status"]["plan"]["relays"] == 8, 30, "a re-plan")
        killed_at = time.time()
        primary.kill()
        rooms.patch_spec("event", {"expectedAudience": audiences[1]})
        wait_until(
            lambda: rooms.get("event")["status"]["plan"]["relays"] == 12,
            60,
            "the standby to re-plan after the primary was killed",
        )
        takeover = time.time() - killed_at
        wait_until(lambda: rooms.relays("event") == (12, 12), 60, "the standby's 12 relays")
        rooms.patch_spec("event", {"expectedAudience": audiences[2]})
        wait_until(lambda: rooms.get("event")["status"]["plan"]["relays"] == 6, 30, "a re-plan")
    finally:
        primary.stop()
        standby.stop()
    print(f"\ntakeover after SIGKILL of the primary: {takeover:.1f}s (peering lifetime 10s)")
    events = _by_replica(rooms, "event")
    actors = {replica for _, _, replica in events}
    assert actors <= set(identities), f"Events from unknown replicas: {actors}"
    before = {replica for at, _, replica in events if at < killed_at - 1}
    after = {replica for at, _, replica in events if at > killed_at + 1}
    assert [identities[r] for r in before] == [primary], "only the primary acted before"
    assert [identities[r] for r in after] == [standby], "only the standby acted after"
    reasons = [reason for _, reason, _ in events]
    assert reasons.count("Replanned") == len(audiences), f"one Replanned per change: {reasons}"
    for once in ("PreWarmStarted", "PreWarmed", "Live"):
        assert reasons.count(once) == 1, f"{once} posted {reasons.count(once)} times: {reasons}"


def test_a_higher_priority_replica_takes_over_from_a_live_one_without_overlap(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    kubeconfig: Path,
    tmp_path: Path,
) -> None:
    """The standby acts alone; the primary starts and takes over while the audience changes
    every second: each change is re-planned by one replica only (two acting at once would
    post the same re-plan twice), the standby before, the primary after."""
    primary, standby = _peered_pair(api_client, namespace, kubeconfig, tmp_path)
    rooms = Rooms(api_client, namespace)
    manifest = room_manifest("event", start_in=2 * 86400, duration="1h")
    manifest["spec"]["scaling"] |= {"minRelays": 0, "maxRelays": 60}
    audiences = [750 * relays for relays in range(5, 45)]  # each change: a new plan
    changes: list[int] = []
    try:
        standby.start()
        rooms.create(manifest)
        wait_until(lambda: rooms.phase("event") == "Scheduled", 120, "the standby to act")
        primary.start()
        primary.wait_started()
        assert standby.process and primary.process
        started_at = time.time()
        while len(changes) < len(audiences) and (len(changes) < 8 or time.time() < started_at + 20):
            changes.append(audiences[len(changes)])
            rooms.patch_spec("event", {"expectedAudience": changes[-1]})
            time.sleep(1)
        last = -(-changes[-1] // 750)
        wait_until(
            lambda: rooms.get("event")["status"]["plan"]["relays"] == last, 60, "the last plan"
        )
        time.sleep(2)  # a second actor's duplicate Event would land meanwhile
    finally:
        standby.stop()
        primary.stop()
    host = os.uname().nodename
    names = {f"{host}-{standby.process.pid}": "standby", f"{host}-{primary.process.pid}": "primary"}
    replans = [
        (e.metadata.creation_timestamp.timestamp(), e.message, names.get(e.reporting_instance, "?"))
        for e in rooms.events("event")
        if e.reason == "Replanned"
    ]
    messages = Counter(message for _, message, _ in replans)
    assert all(count == 1 for count in messages.values()), f"a re-plan posted twice: {replans}"
    actors = [actor for _, _, actor in sorted(replans)]
    assert "primary" in actors, f"the primary took over: {actors}"
    handed_over = actors.index("primary")
    assert set(actors[:handed_over]) <= {"standby"} and set(actors[handed_over:]) == {"primary"}, (
        f"the standby before, the primary after, never both: {actors}"
    )
    print(f"\n{len(changes)} changes during the hand-over, {len(replans)} re-plans: {actors}")


def _cluster_name(suffix: str) -> str:
    return f"{os.environ.get('TOWNSQUARE_CLUSTER', 'townsquare')}-{suffix}"


def _prepare(kubeconfig: Path, namespace: str) -> client.ApiClient:
    """CRDs and a namespace on a fresh cluster of the test's own."""
    api = config.new_client_from_config(config_file=str(kubeconfig))
    extensions = client.ApiextensionsV1Api(api)
    for path in sorted((REPO / "crds").glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            if body and body.get("kind") == "CustomResourceDefinition":
                extensions.create_custom_resource_definition(body)
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    wait_until(
        lambda: core.read_namespaced_service_account("default", namespace),
        60,
        "the namespace's default service account",
    )
    custom = client.CustomObjectsApi(api)
    wait_until(
        lambda: (
            custom.list_namespaced_custom_object(
                "townsquare.dev", "v1alpha1", namespace, "audiorooms"
            )
            is not None
        ),
        60,
        "the AudioRoom kind to be served",
    )
    return api


def test_api_server_stopped_mid_event_nothing_lost_nothing_doubled(tmp_path: Path) -> None:
    with cluster_of_its_own(_cluster_name("apiserver")) as kubeconfig:
        api = _prepare(kubeconfig, "outage")
        rooms = Rooms(api, "outage")
        operator = OperatorProcess(kubeconfig, "outage", tmp_path / "operator.log")
        operator.start()
        try:
            rooms.create(room_manifest("event", start_in=15, duration="10m"))
            wait_until(lambda: rooms.phase("event") == "Live", 90, "the event to be live")
            wait_until(lambda: rooms.relays("event") == (4, 4), 30, "4 relays")
            apiserver = ApiServer(kubeconfig)
            apiserver.stop()
            stopped_at = time.time()
            time.sleep(30)
            apiserver.start()
            wait_until(lambda: rooms.relays("event") == (4, 4), 60, "the API server back")
            back_at = time.time()
            assert operator.alive(), "the operator outlived the outage"
            wait_until(  # the API server answers reads before it has installed every path
                lambda: rooms.patch_spec("event", {"expectedAudience": 6000}) or True,
                30,
                "the API server to take a change",
            )
            wait_until(
                lambda: rooms.get("event")["status"]["plan"]["relays"] == 8,
                90,
                "the operator to act again with no manual step",
            )
            recovered = time.time() - back_at
            # The StatefulSet asks for 8: what the operator writes. (Its pods may lag: the
            # controller-manager gives up its leadership when it cannot renew it for 30s,
            # and nothing here restarts it as a kubelet would.)
            wait_until(lambda: rooms.relays("event")[0] == 8, 60, "8 relays asked for")
            samples = []
            until = time.time() + 5
            while time.time() < until:
                samples.append(rooms.relays("event")[0])
                time.sleep(0.5)
        finally:
            operator.stop()
        print(f"\nAPI server down {back_at - stopped_at:.0f}s; operator acting again "
              f"{recovered:.1f}s after it answered")  # fmt: skip
        assert set(samples) == {8}, "no relay removed after the outage"
        reasons = rooms.reasons("event")
        assert reasons.count("Replanned") == 1, reasons
        for once in ("PreWarmStarted", "PreWarmed", "Live"):
            assert reasons.count(once) == 1, f"{once} posted {reasons.count(once)}x: {reasons}"
        assert "ScaledDown" not in reasons, reasons


def test_cluster_wide_operator_runs_the_lifecycle(tmp_path: Path) -> None:
    """The chart's default: no --namespace, so every namespace (here a cluster of its own, so
    that no other test's rooms get a second operator)."""
    with cluster_of_its_own(_cluster_name("clusterwide")) as kubeconfig:
        api = _prepare(kubeconfig, "anywhere")
        rooms = Rooms(api, "anywhere")
        operator = OperatorProcess(kubeconfig, "", tmp_path / "operator.log")
        operator.start()
        try:
            rooms.create(room_manifest("launch", start_in=45))
            recorder = Recorder(rooms, "launch")
            try:
                wait_until(lambda: rooms.phase("launch") == "Ended", 120, "the room to end")
            finally:
                recorder.stop()
        finally:
            operator.stop()
        assert recorder.phases() == PHASES, operator.log_text()[-3000:]
        assert {ready for _, _, _, ready in recorder.in_phase("Live")} == {4}
        assert recorder.samples[-1][2:] == (0, 0)
