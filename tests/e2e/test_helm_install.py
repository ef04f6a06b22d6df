"""The chart on the real cluster: installed by a real helm, its RBAC checked by the real API server.

The operator image is never run here (no container engine, no registry): kwok marks the
chart's pod Ready without running it. What runs is `townsquare run` on this machine with
a token of the chart's ServiceAccount (TokenRequest API), so every call the operator makes
is authorized exactly as it would be in the pod.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import Rooms, room_manifest
from test_room_lifecycle import (
    test_phases_in_order_with_relays_ready_before_the_start as phases_scenario,
)

pytestmark = [pytest.mark.e2e]

CHART = REPO / "charts" / "townsquare"
KOPF_CRDS = CHART / "crds" / "kopf.dev-peerings.yaml"
KUBECTL = REPO / ".venv" / "bin" / "kubectl"
RELEASE = "ts"
SERVICE_ACCOUNT = "ts-townsquare"


@cache
def helm_binary() -> str:
    """The pinned helm (hack/helm/build.sh builds it once into ~/.cache/townsquare)."""
    built = subprocess.run(
        [str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, f"building helm failed:\n{built.stderr[-3000:]}"
    return built.stdout.strip().splitlines()[-1]


def run(*command: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], input=stdin, capture_output=True, text=True, check=False
    )


@dataclass
class Helm:
    kubeconfig: Path

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run(helm_binary(), "--kubeconfig", self.kubeconfig, *args)

    def template(self, namespace: str, *args: str) -> str:
        result = self("template", RELEASE, str(CHART), "--namespace", namespace, *args)
        assert result.returncode == 0, result.stderr
        return result.stdout


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = run(KUBECTL, "--kubeconfig", kubeconfig, *args, stdin=stdin)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def on_kwok(namespace: str) -> list[str]:
    """Values for a release serving `namespace`, with its pod on kwok's simulated nodes."""
    return ["--set-json", f'watch.namespaces=["{namespace}"]', "--set", "nodeSelector.type=kwok"]


@pytest.fixture
def helm(kubeconfig: Path) -> Helm:
    return Helm(kubeconfig)


@pytest.fixture
def kopf_crds(kubeconfig: Path) -> None:
    """The chart's CRDs, as `helm install` puts them (kopf's peering kinds among them)."""
    kubectl(
        kubeconfig, "apply", "--server-side", "-f", str(CHART / "crds" / "kopf.dev-peerings.yaml")
    )
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        kubectl(kubeconfig, "wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


@pytest.fixture
def release(
    helm: Helm,
    namespace: str,
    crds: list[str],
    kwok_nodes: list[str],
    kopf_crds: None,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    """The chart installed into the test namespace, serving that namespace only.

    Parametrize it indirectly with more `helm install` arguments to change values.
    """
    extra: list[str] = getattr(request, "param", [])
    installed = helm(
        "install", RELEASE, str(CHART), "--namespace", namespace, *on_kwok(namespace), *extra,
        "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    yield namespace
    helm("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "60s")


@pytest.fixture
def service_account_kubeconfig(
    kubeconfig: Path, api_client: client.ApiClient, release: str, tmp_path: Path
) -> Path:
    """A kubeconfig holding a token of the chart's ServiceAccount, minted by TokenRequest."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
    )
    token = (
        client.CoreV1Api(api_client)
        .create_namespaced_service_account_token(SERVICE_ACCOUNT, release, request)
        .status.token
    )
    admin = yaml.safe_load(
        kubectl(kubeconfig, "config", "view", "--raw", "--minify", "--flatten", "-o", "yaml")
    )
    cluster = admin["clusters"][0]
    path = tmp_path / "service-account.kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [{"name": SERVICE_ACCOUNT, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": SERVICE_ACCOUNT,
                        "context": {"cluster": cluster["name"], "user": SERVICE_ACCOUNT},
                    }
                ],
                "current-context": SERVICE_ACCOUNT,
            }
        )
    )
    return path


def test_the_rendered_chart_is_accepted_by_the_api_server(
    helm: Helm, kubeconfig: Path, namespace: str, kopf_crds: None
) -> None:
    """Every value combination a platform team would pick, validated by kube-apiserver."""
    combinations = [
        [],
        on_kwok(namespace),
        [*on_kwok(namespace), "--set", "highAvailability.enabled=true"],
        ["--set", "highAvailability.enabled=true", "--set", "metrics.dashboard.enabled=true"],
    ]
    for values in combinations:
        manifest = helm.template(namespace, *values)
        out = kubectl(
            kubeconfig, "apply", "--dry-run=server", "--namespace", namespace, "-f", "-",
            stdin=manifest,
        )  # fmt: skip
        assert "deployment.apps/ts-townsquare created (server dry run)" in out, out
        if "highAvailability.enabled=true" in values:
            assert "deployment.apps/ts-townsquare-standby-1 created (server dry run)" in out
            assert "kopfpeering.kopf.dev/ts-townsquare created (server dry run)" in out


def test_helm_install_brings_the_operator_deployment_to_available(
    release: str, api_client: client.ApiClient, helm: Helm
) -> None:
    apps = client.AppsV1Api(api_client)

    def available() -> bool:
        deployment = apps.read_namespaced_deployment("ts-townsquare", release)
        conditions = deployment.status.conditions or []
        return any(c.type == "Available" and c.status == "True" for c in conditions)

    assert wait_until(available, 60, "the operator Deployment to be Available")
    (pod,) = client.CoreV1Api(api_client).list_namespaced_pod(release).items
    assert pod.spec.service_account_name == SERVICE_ACCOUNT
    assert pod.spec.node_name.startswith("node-"), "placed on a kwok node"
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    status = helm("status", RELEASE, "--namespace", release)
    assert "STATUS: deployed" in status.stdout


def test_the_lifecycle_runs_under_the_chart_service_account(
    service_account_kubeconfig: Path,
    kubeconfig: Path,
    release: str,
    api_client: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The main lifecycle scenario, with the operator holding only the chart's permissions.

    The test's own reads (and `kubectl describe`, as on-call runs it) use the admin config.
    """
    operator = OperatorProcess(service_account_kubeconfig, release, tmp_path / "operator.log")
    operator.start()
    try:
        phases_scenario(Rooms(api_client, release), operator, kubeconfig)
    finally:
        operator.stop()
    log = operator.log_text()
    assert "forbidden" not in log.lower(), log[-3000:]
    assert "Not enough permissions" not in log, log[-3000:]


CAN = [
    ("patch", "audiorooms.townsquare.dev"),
    ("patch", "audiorooms.townsquare.dev/status"),
    ("watch", "audiorooms.townsquare.dev"),
    ("create", "statefulsets.apps"),
    ("patch", "statefulsets.apps"),
    ("patch", "poddisruptionbudgets.policy"),
    ("get", "configmaps"),
    ("create", "events"),
    ("list", "events"),
    ("list", "pods"),
    ("delete", "pods"),  # a drained relay, replaced during a rollout; a placeholder
    ("create", "pods"),  # node headroom placeholders (only those: relays come from the StatefulSet)
]
CANNOT = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("delete", "statefulsets.apps"),
    ("delete", "audiorooms.townsquare.dev"),
    ("patch", "deployments.apps"),
    ("create", "serviceaccounts/token"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("update", "configmaps"),
    ("delete", "events"),
]


def can_i(kubeconfig: Path, verb: str, resource: str, *scope: str) -> str:
    """`kubectl auth can-i` as the ServiceAccount itself: "yes" or "no"."""
    result = run(KUBECTL, "--kubeconfig", kubeconfig, "auth", "can-i", verb, resource, *scope)
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer


def test_the_service_account_cannot_read_secrets_or_touch_what_it_does_not_manage(
    service_account_kubeconfig: Path, release: str
) -> None:
    here = ["--namespace", release]
    for verb, resource in CAN:
        assert can_i(service_account_kubeconfig, verb, resource, *here) == "yes", (verb, resource)
    for verb, resource in CANNOT:
        assert can_i(service_account_kubeconfig, verb, resource, *here) == "no", (verb, resource)
    # (`can-i create pods/exec` would ask about a pod named "exec": the subresource is a flag)
    assert can_i(service_account_kubeconfig, "create", "pods", "--subresource=exec", *here) == "no"
    # Outside the namespaces it serves it may do nothing at all to rooms or their children.
    for verb, resource in CAN:
        assert can_i(service_account_kubeconfig, verb, resource, "--namespace", "default") == (
            "no"
        ), (verb, resource)
    assert can_i(service_account_kubeconfig, "list", "secrets", "--all-namespaces") == "no"
    assert can_i(service_account_kubeconfig, "list", "customresourcedefinitions") == "yes"
    assert can_i(service_account_kubeconfig, "create", "customresourcedefinitions") == "no"
    assert can_i(service_account_kubeconfig, "patch", "nodes") == "no"


HIGH_AVAILABILITY = ["--set", "highAvailability.enabled=true"]


def last_peering_decision(replica: OperatorProcess) -> str:
    """`paused` or `resumed`: the replica's latest peering decision (kopf starts paused)."""
    decision = "paused"
    for line in replica.log_text().splitlines():
        if "Pausing operations in favour of" in line:
            decision = "paused"
        elif "Resuming operations after the pause" in line:
            decision = "resumed"
    return decision


@pytest.mark.parametrize("release", [HIGH_AVAILABILITY], indirect=True)
def test_standby_replica_waits_then_takes_over_through_the_chart_peering_object(
    service_account_kubeconfig: Path,
    release: str,
    api_client: client.ApiClient,
    tmp_path: Path,
) -> None:
    """Both replicas, with the flags the chart gives them, under the chart's permissions."""
    apps = client.AppsV1Api(api_client)
    deployments = {d.metadata.name: d for d in apps.list_namespaced_deployment(release).items}
    assert set(deployments) == {"ts-townsquare", "ts-townsquare-standby-1"}
    replicas = []
    for name in sorted(deployments):
        args = deployments[name].spec.template.spec.containers[0].args
        peering = [a for a in args if a.startswith(("--peering=", "--priority="))]
        replica = OperatorProcess(
            service_account_kubeconfig, release, tmp_path / f"{name}.log", *peering
        )
        replica.start()
        replicas.append(replica)
    custom = client.CustomObjectsApi(api_client)
    try:

        def peers() -> dict[str, Any]:
            peering = custom.get_namespaced_custom_object(
                "kopf.dev", "v1", release, "kopfpeerings", "ts-townsquare"
            )
            return {k: v for k, v in (peering.get("status") or {}).items() if v}

        both = wait_until(lambda: len(peers()) == 2 and peers(), 60, "both replicas in the peering")
        assert sorted(p["priority"] for p in both.values()) == [99, 100]
        rooms = Rooms(api_client, release)
        rooms.create(room_manifest("peered", start_in=600))
        wait_until(lambda: rooms.phase("peered") == "Scheduled", 60, "the room to be served")
        primary, standby = replicas
        # kopf starts every replica paused and decides on each peering update, so a standby
        # that looked before the primary registered may resume once, then pause: what
        # matters is its latest decision.
        assert last_peering_decision(primary) == "resumed"
        wait_until(
            lambda: last_peering_decision(standby) == "paused",
            30,
            "the standby to wait while the primary lives",
        )

        primary.stop()
        wait_until(
            lambda: last_peering_decision(standby) == "resumed", 30, "the standby to take over"
        )
        rooms.patch_spec("peered", {"expectedAudience": 6000})
        wait_until(
            lambda: rooms.get("peered")["status"]["plan"]["relays"] == 8,
            30,
            "the standby to re-plan the room",
        )
    finally:
        for replica in replicas:
            replica.stop()
    for replica in replicas:
        assert "forbidden" not in replica.log_text().lower(), replica.log_text()[-3000:]


@pytest.mark.parametrize("release", [["--set", "prometheus.url=http://127.0.0.1:9"]], indirect=True)
def test_relays_of_a_helm_install_check_tickets_with_the_charts_key(
    release: str, kubeconfig: Path, api_client: client.ApiClient, tmp_path: Path
) -> None:
    """A platform team installs the chart (edge on: it has a Prometheus URL). The operator,
    with the chart's own flags, mounts the chart's ticket Secret into every relay pod; the
    relay process that runs for the pod (the pod runner writes the pod's Secret volume, as a
    kubelet mounts it) admits a listener whose ticket the chart's key signed, and refuses
    one signed with another key."""
    import asyncio
    import base64
    import os
    import secrets

    from audience import origin
    from test_relay_tree import ROOM, relay_room

    from townsquare.relay.kubeapi import ConfigMapSource, KubeReader, PodResolver, load_credentials
    from townsquare.relay.listener import Listener, MapJoiner

    apps, core = client.AppsV1Api(api_client), client.CoreV1Api(api_client)
    chart_args = apps.read_namespaced_deployment("ts-townsquare", release).spec.template.spec
    flags = [a for a in chart_args.containers[0].args if a.startswith("--relay-ticket-secret=")]
    assert flags == ["--relay-ticket-secret=ts-townsquare-tickets"]
    secret = core.read_namespaced_secret("ts-townsquare-tickets", release)
    key = base64.b64decode(secret.data["key"])
    key_file = tmp_path / "ticket.key"
    key_file.write_bytes(key)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    origin_process, origin_address = origin(tmp_path, release, ROOM, key_file, kubeconfig, env)
    operator = OperatorProcess(kubeconfig, release, tmp_path / "operator.log", flags[0])
    operator.start()
    rooms = Rooms(api_client, release)
    try:
        rooms.create(relay_room(origin_address, start_in=5))
        wait_until(lambda: rooms.relays(ROOM) == (3, 3), 90, "three Ready relays")
        pods = core.list_namespaced_pod(release, label_selector=f"townsquare.dev/room={ROOM}")
        for pod in pods.items:
            (volume,) = [v for v in pod.spec.volumes if v.secret is not None]
            assert volume.secret.secret_name == "ts-townsquare-tickets"
            assert (
                pod.metadata.annotations["townsquare.dev/ticket-secret"] == "ts-townsquare-tickets"
            )

        async def listen(signing_key: bytes, name: str) -> Listener:
            reader = KubeReader(load_credentials(str(kubeconfig)))
            joiner = MapJoiner(
                ConfigMapSource(reader, release, ROOM),
                PodResolver(reader, release, ROOM, 7880),
                signing_key, release, ROOM,
            )  # fmt: skip
            listener, stop = Listener(name, joiner), asyncio.Event()
            task = asyncio.create_task(listener.run(stop))
            deadline = asyncio.get_running_loop().time() + 30
            while asyncio.get_running_loop().time() < deadline:
                if listener.stats.frames >= 10 or listener.stats.refusals:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait({task}, timeout=5)
            await reader.close()
            return listener

        admitted = asyncio.run(listen(key, "listener-1"))
        assert admitted.stats.frames >= 10 and not admitted.stats.refusals
        forged = asyncio.run(listen(secrets.token_bytes(32), "listener-2"))
        assert forged.stats.frames == 0 and forged.stats.refusals, "a ticket of another key"
    finally:
        operator.stop()
        origin_process.stop()
