"""The image `make image` builds, run by a real podman exactly as the chart's pod spec says.

The chart is the one source of how the image runs: every flag comes from the rendered (or
installed) Deployment through container.pod_flags, and the verdicts come from the process
inside the container (its uid, capabilities, mounts, where it can write) and from the real
API server, not from the flags we passed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import test_helm_install
import yaml
from container import (
    API_HOST,
    HOST_LOOPBACK,
    NETWORK,
    ContainerProcess,
    PodRun,
    built_image,
    chart_problems,
    image_config,
    image_problems,
    pod_flags,
    podman,
    private_file,
    sandbox,
)
from harness import REPO, Prometheus, free_loopback_port, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import Rooms, room_manifest
from test_helm_install import CHART, RELEASE, helm_binary
from test_room_lifecycle import (
    test_phases_in_order_with_relays_ready_before_the_start as phases_scenario,
)

from townsquare.relay.listener import EdgeJoiner, Listener, ListenerStats

pytestmark = [pytest.mark.e2e]

# The chart installed on the cluster and a token of its ServiceAccount, as the chart's own
# e2e tests get them.
helm = test_helm_install.helm
kopf_crds = test_helm_install.kopf_crds
release = test_helm_install.release
service_account_kubeconfig = test_helm_install.service_account_kubeconfig

EXAMPLES = REPO / "examples"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def image() -> str:
    return built_image()


def rendered_deployment(*values: str, name: str = "ts-townsquare") -> dict[str, Any]:
    """A Deployment of the chart (the operator's by default) as `helm template` renders it."""
    done = subprocess.run(
        [helm_binary(), "template", RELEASE, str(CHART), "--namespace", "townsquare", *values],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (deployment,) = (
        d
        for d in yaml.safe_load_all(done.stdout)
        if d and d["kind"] == "Deployment" and d["metadata"]["name"] == name
    )
    return deployment  # type: ignore[no-any-return]


def operator_of(deployment: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def chart_uid(pod: dict[str, Any]) -> int:
    return int(pod["securityContext"]["runAsUser"])


def test_the_image_runs_as_the_chart_runs_it(image: str) -> None:
    """Non-root, read-only root, no capabilities, no privilege gain, writes only to /tmp."""
    pod, container = operator_of(rendered_deployment())
    run = pod_flags(pod, container)
    seen = sandbox(image, run.flags)
    assert chart_problems(seen, run, chart_uid(pod)) == []
    assert seen.writable == ["/tmp"], "the chart's emptyDir is the only place it may write"


def test_the_image_alone_runs_as_its_non_root_user_and_owns_no_file(image: str) -> None:
    """Without the chart's settings (docker run IMAGE): still not root, still no writes."""
    pod, _ = operator_of(rendered_deployment())
    seen = sandbox(image, [])
    assert image_problems(seen, image_config(image), chart_uid(pod)) == []


def test_the_image_defaults_are_the_chart_defaults(image: str) -> None:
    """User, entrypoint, arguments, ports and env: what `docker run IMAGE` does is what the
    chart runs, so the Dockerfile and the chart cannot drift apart unnoticed."""
    pod, container = operator_of(rendered_deployment())
    config = image_config(image)
    security = pod["securityContext"]
    assert config["User"] == f"{security['runAsUser']}:{security['runAsGroup']}"
    assert config["Entrypoint"] == ["townsquare"] and "command" not in container
    chart_args = container["args"]
    assert chart_args[: len(config["Cmd"])] == config["Cmd"], (chart_args, config["Cmd"])
    assert set(config["ExposedPorts"]) == {f"{p['containerPort']}/tcp" for p in container["ports"]}
    probe_port = container["livenessProbe"]["httpGet"]["port"]
    (health,) = (p for p in container["ports"] if p["name"] == probe_port)
    assert f"--liveness=http://0.0.0.0:{health['containerPort']}/healthz" in config["Cmd"]
    image_env = dict(variable.split("=", 1) for variable in config["Env"])
    for variable in container["env"]:
        assert image_env.get(variable["name"]) == variable["value"], variable


def test_version_plan_and_every_module_work_inside_the_image(image: str) -> None:
    pod, container = operator_of(rendered_deployment())
    flags = pod_flags(pod, container).flags
    version = podman("run", "--rm", *flags, image, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"townsquare {VERSION}"

    plan_args = ["plan", "-f", "/examples/campaign-launch.yaml", "-o", "json",
                 "--now", "2026-11-24T00:00:00Z"]  # fmt: skip
    mount = ["--volume", f"{EXAMPLES}:/examples:ro"]
    inside = podman("run", "--rm", *flags, *mount, image, *plan_args)
    assert inside.returncode == 0, inside.stderr
    plan = json.loads(inside.stdout)
    assert (plan["relays"], plan["capacity"]) == (715, 500_500)  # README's worked example
    here = subprocess.run(
        [sys.executable, "-m", "townsquare", *plan_args[:2],
         str(EXAMPLES / "campaign-launch.yaml"), *plan_args[3:]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert plan == json.loads(here.stdout), "the image plans as the checked-out code does"

    # Every module of the package imports in the image: each command's dependencies are
    # there (the operator's, the edge's and the relays'). Only the optional `plot` extra
    # (matplotlib, for plots on a workstation) is left out of the image.
    package = REPO / "operator"
    optional = {
        ".".join(path.relative_to(package).with_suffix("").parts).removesuffix(".__init__")
        for path in (package / "townsquare").rglob("*.py")
        if "matplotlib" in path.read_text()
    }
    imports = podman("run", "--rm", *flags, "--entrypoint", "python3", image, "-c", IMPORT_ALL)
    assert imports.returncode == 0, imports.stderr[-3000:]
    failed = json.loads(imports.stdout)
    assert set(failed) <= optional, failed


def test_the_final_image_holds_runtime_dependencies_only(image: str) -> None:
    """The locked runtime dependencies and the package itself (installed, not editable);
    no development package, no optional extra, no uv, no compilers."""
    listed = podman("run", "--rm", "--entrypoint", "python3", image, "-c", DISTRIBUTIONS)
    assert listed.returncode == 0, listed.stderr
    installed = json.loads(listed.stdout)
    assert installed["townsquare"] == VERSION
    assert installed.keys() & {"kopf", "kubernetes", "aiohttp", "uvloop"} == {
        "kopf", "kubernetes", "aiohttp", "uvloop"
    }  # fmt: skip
    development = {"pytest", "hypothesis", "ruff", "mypy", "import-linter", "matplotlib", "uv"}
    assert not installed.keys() & development, installed.keys() & development
    tools = ["uv", "gcc", "cc", "c++", "clang", "make", "ld"]
    look = (
        "import json, shutil, sys; print(json.dumps([t for t in sys.argv[1:] if shutil.which(t)]))"
    )
    found = podman("run", "--rm", "--entrypoint", "python3", image, "-c", look, *tools)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []
    uv = podman("run", "--rm", "--entrypoint", "python3", image, "-c", "import uv")
    assert "No module named 'uv'" in uv.stderr


DISTRIBUTIONS = r"""
import json
from importlib import metadata
print(json.dumps({d.metadata["Name"].lower(): d.version for d in metadata.distributions()}))
"""

IMPORT_ALL = r"""
import importlib, json, pkgutil, townsquare
failed = {}
for module in pkgutil.walk_packages(townsquare.__path__, "townsquare."):
    if module.name.endswith("__main__"):
        continue  # running it is `townsquare` itself
    try:
        importlib.import_module(module.name)
    except Exception as error:
        failed[module.name] = repr(error)
print(json.dumps(failed))
"""


def test_the_operator_from_the_image_runs_the_lifecycle_under_the_chart_service_account(
    image: str,
    service_account_kubeconfig: Path,
    kubeconfig: Path,
    release: str,
    api_client: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The Deployment helm installed, run by podman: its args, user, read-only root, no
    capabilities, memory limit and /tmp; only a token of the chart's ServiceAccount, in a
    kubeconfig with everything embedded (no file paths), reaching the API server under the
    name its certificate carries, kubernetes.default.svc."""
    installed = client.AppsV1Api(api_client).read_namespaced_deployment("ts-townsquare", release)
    pod, container = operator_of(api_client.sanitize_for_serialization(installed))
    run = pod_flags(pod, container)
    assert f"--namespace={release}" in run.args

    config = yaml.safe_load(service_account_kubeconfig.read_text())
    (cluster,) = config["clusters"]
    port = cluster["cluster"]["server"].rsplit(":", 1)[1]
    cluster["cluster"]["server"] = f"https://{API_HOST}:{port}"
    assert "certificate-authority-data" in cluster["cluster"]
    credentials = private_file(yaml.safe_dump(config), owner=chart_uid(pod))
    inside = "/var/run/townsquare/kubeconfig"
    operator = ContainerProcess(
        image, run, tmp_path / "operator.log",
        *NETWORK, "--volume", f"{credentials}:{inside}:ro", "--env", f"KUBECONFIG={inside}",
    )  # fmt: skip
    operator.start()
    try:
        probe = container["livenessProbe"]["httpGet"]
        health = f"http://127.0.0.1:{run.ports[probe['port']]}{probe['path']}"
        wait_until(lambda: _status(health) == 200, 60, f"the chart's liveness probe {health}")
        metrics = _get(f"http://127.0.0.1:{run.ports['metrics']}/metrics")
        assert f'townsquare_build_info{{version="{VERSION}"}} 1.0' in metrics
        phases_scenario(Rooms(api_client, release), operator, kubeconfig)  # type: ignore[arg-type]
    finally:
        operator.stop(grace=int(pod.get("terminationGracePeriodSeconds", 30)))
        credentials.unlink()
    assert operator.exit_code == 0, f"not a clean stop on SIGTERM:\n{operator.log_text()[-3000:]}"
    log = operator.log_text()
    assert "forbidden" not in log.lower(), log[-3000:]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


VARIANTS = {
    # The image rebuilt to run as root: the chart's runAsUser would hide it in the pod,
    # `docker run` and any chart without runAsUser would not.
    "root": "USER root",
    # The image rebuilt so that its user can write into the root filesystem.
    "writable": "USER root\nRUN chown 65532:65532 /app\nUSER 65532:65532",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_smoke_checks_fail_for_an_image_rebuilt_as_root_or_writable(
    image: str, variant: str, tmp_path: Path
) -> None:
    """The checks above have teeth: a variant of the image built FROM it fails them."""
    pod, _ = operator_of(rendered_deployment())
    tag = f"localhost/townsquare/variant:{variant}-{tmp_path.name}-{os.getpid()}"
    containerfile = f"FROM {image}\n{VARIANTS[variant]}\n"
    built = podman(
        "build", "--pull=never", "--network", "none", "--tag", tag, "-f", "-", str(tmp_path),
        stdin=containerfile,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    try:
        problems = image_problems(sandbox(tag, []), image_config(tag), chart_uid(pod))
    finally:
        podman("rmi", "--force", tag)
    expected = {
        "root": "the image's user is 'root' (root)",
        "writable": "its user can write the image's own files: ['/app']",
    }
    assert expected[variant] in problems, problems


def test_the_smoke_checks_fail_for_a_writable_root_filesystem(image: str) -> None:
    """The chart rebuilt without readOnlyRootFilesystem: the process sees a writable root."""
    pod, container = operator_of(rendered_deployment())
    container["securityContext"]["readOnlyRootFilesystem"] = False
    run: PodRun = pod_flags(pod, container)
    problems = chart_problems(sandbox(image, run.flags), run, chart_uid(pod))
    assert "the root filesystem is writable" in problems, problems


class Mounts:
    """Files for the containers, readable by their uid only, mounted read-only under /run."""

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.files: list[Path] = []
        self.flags: list[str] = []

    def add(self, text: str | bytes, inside: str) -> str:
        data = text if isinstance(text, str) else text.decode()
        path = private_file(data, owner=self.owner)
        self.files.append(path)
        self.flags += ["--volume", f"{path}:{inside}:ro"]
        return inside

    def private(self, text: str) -> Path:
        """A file for a volume the pod spec mounts itself (a Secret's item)."""
        path = private_file(text, owner=self.owner)
        self.files.append(path)
        return path

    def remove(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)


def cluster_credentials(kubeconfig: Path, mounts: Mounts) -> tuple[str, str]:
    """Kubeconfigs whose CA, certificate and key are mounted files (nothing to write out
    under a read-only root): for the host's network (the API server at 127.0.0.1), and for
    a container's own network (at kubernetes.default.svc, the name on its certificate)."""
    admin = yaml.safe_load(
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "kubectl"), "--kubeconfig", str(kubeconfig), "config",
             "view", "--raw", "--minify", "--flatten", "-o", "yaml"],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    (cluster,) = admin["clusters"]
    (user,) = admin["users"]
    folder = "/run/townsquare/kube"
    files = {
        "certificate-authority": (cluster["cluster"], "ca.crt"),
        "client-certificate": (user["user"], "client.crt"),
        "client-key": (user["user"], "client.key"),
    }
    for field, (entry, name) in files.items():
        entry[field] = mounts.add(base64.b64decode(entry.pop(f"{field}-data")), f"{folder}/{name}")
    on_host = mounts.add(yaml.safe_dump(admin), f"{folder}/config")
    port = cluster["cluster"]["server"].rsplit(":", 1)[1]
    cluster["cluster"]["server"] = f"https://{API_HOST}:{port}"
    return on_host, mounts.add(yaml.safe_dump(admin), f"{folder}/config-in-pod")


def test_the_edge_a_relay_and_the_origin_from_the_image_serve_a_join(
    image: str,
    kubeconfig: Path,
    namespace: str,
    crds: list[str],
    kwok_nodes: list[str],
    api_client: client.ApiClient,
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    """A listener admitted with a ticket hears the origin through the relay, both from the
    image on the host's network (as pods have their own addresses), the relay with the pod
    spec the operator gave its pod; the edge from the image, run as the chart's edge
    Deployment says (args, port, probes, read-only root, ticket Secret), answers joins.
    The verdicts come from the listener (frames heard) and from the relay's own /metrics
    (listeners it holds).

    The listener joins through the edge, which signs its ticket; the relay checks it. The
    relay pod has no townsquare.dev/origin annotation, so the cluster's pod runner runs no
    relay of its own for it and publishes its endpoint as the pod's readiness says."""
    room = "joinable"
    operator = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log", "--prometheus-url", prometheus.url
    )
    operator.start()
    rooms = Rooms(api_client, namespace)
    # No townsquare.dev/origin annotation: the cluster's pod runner leaves the relay pod to us.
    rooms.create(room_manifest(room, start_in=5, audience=100, duration="10m"))
    core = client.CoreV1Api(api_client)
    pod = wait_until(
        lambda: _running_with_ip(core.read_namespaced_pod(f"{room}-relay-0", namespace)),
        60,
        "the relay pod to run with an address",
    )
    # What the operator declared for its relays (the pod adds only placement).
    relays = client.AppsV1Api(api_client).read_namespaced_stateful_set(f"{room}-relay", namespace)
    pod_spec = api_client.sanitize_for_serialization(relays)["spec"]["template"]["spec"]
    (relay_container,) = pod_spec["containers"]
    ip = pod.status.pod_ip
    fields = {"metadata.name": pod.metadata.name, "metadata.namespace": namespace,
              "status.podIP": ip,
              "metadata.annotations['townsquare.dev/origin']": ""}  # fmt: skip
    # The shard map as the kubelet would mount it (a snapshot: one relay, nothing moves).
    shard_map = wait_until(
        lambda: (core.read_namespaced_config_map(f"{room}-shards", namespace).data or {}).get(
            "shardmap.json"
        ),
        60,
        "the room's shard map",
    )
    owner = int(pod_spec["securityContext"]["runAsUser"])
    mounts = Mounts(owner)
    relay_volumes = {"shard-map": {"shardmap.json": mounts.private(shard_map)}}
    relay_run = pod_flags(pod_spec, relay_container, fields, publish=False, secrets=relay_volumes)
    assert relay_run.flags[relay_run.flags.index("--user") + 1].startswith(f"{owner}:")

    chart_pod, chart_container = operator_of(rendered_deployment())
    hardened = pod_flags(chart_pod, chart_container, publish=False).flags
    secret_key = secrets.token_hex(32)
    key_file = mounts.add(secret_key, "/run/townsquare/ticket-key")
    config, config_in_pod = cluster_credentials(kubeconfig, mounts)
    origin_port = free_loopback_port()
    # The chart's edge, serving this namespace, reading the test's Prometheus through the
    # container's view of the host's loopback.
    edge_pod, edge_container = operator_of(
        rendered_deployment(
            "--set", f"prometheus.url=http://{HOST_LOOPBACK}:{prometheus.port}",
            "--set-json", f'watch.namespaces=["{namespace}"]', "--set", "edge.replicas=1",
            name="ts-townsquare-edge",
        )
    )  # fmt: skip
    tickets = {"tickets": {"key": mounts.private(secret_key)}}
    edge_run = pod_flags(edge_pod, edge_container, secrets=tickets)
    common = ["--network", "host", *mounts.flags]
    data_plane = ["--namespace", namespace, "--room", room, "--ticket-key-file", key_file,
                  "--kubeconfig", config, "--log-format", "json"]  # fmt: skip
    origin = ContainerProcess(
        image, PodRun(hardened, ["origin", *data_plane, "--address", "127.0.0.1",
                                 "--port", str(origin_port), "--metrics-port", "0"]),
        tmp_path / "origin.log", *common,
    )  # fmt: skip
    # The relay as its pod runs it: everything from the pod's env and volumes (no API
    # access, no kubeconfig); only the ticket key (the operator mounts none here) and the
    # origin (no annotation) are given.
    relay = ContainerProcess(
        image, PodRun(relay_run.flags, [
            "relay", "--ticket-key-file", key_file, "--log-format", "json",
            "--origin", f"127.0.0.1:{origin_port}",
        ]),
        tmp_path / "relay.log", *common,
    )  # fmt: skip
    edge = ContainerProcess(
        image, edge_run, tmp_path / "edge.log",
        *NETWORK, *mounts.flags, "--env", f"KUBECONFIG={config_in_pod}",
    )  # fmt: skip
    processes = [origin, relay, edge]
    try:
        for process in processes:
            process.start()
        relay_metrics = f"http://{ip}:{relay_run.ports['metrics']}/metrics"
        wait_until(lambda: _get(relay_metrics), 60, "the relay from the image to serve /metrics")
        prometheus.add_target(f"{ip}:{relay_run.ports['metrics']}")
        edge_url = f"http://127.0.0.1:{edge_run.ports['http']}"
        for probe in ("readinessProbe", "livenessProbe"):
            path = edge_container[probe]["httpGet"]["path"]
            wait_until(lambda p=path: _status(f"{edge_url}{p}") == 200, 60, f"the edge's {path}")

        listening = _listen(edge_url, namespace, room, frames=50, timeout=90,
                            meanwhile=lambda: _get(relay_metrics))  # fmt: skip
        stats, relay_said = asyncio.run(listening)
        assert stats.frames >= 50, (stats, relay.log_text()[-2000:])
        assert stats.relays == [pod.metadata.name]
        held = f'audioroom_relay_listeners{{namespace="{namespace}",pod="{pod.metadata.name}",room="{room}"}}'  # noqa: E501
        assert _metric(relay_said, held) == 1.0, "the relay counts its listener"
        status, answer = _join_answer(edge_url, namespace, room)
        assert (status, "ticket" in answer) in ((200, True), (429, True)), (status, answer)
    finally:
        for process in reversed(processes):
            process.stop(grace=10)
        operator.stop()
        mounts.remove()
    for process in processes:
        assert process.exit_code == 0, process.log_text()[-3000:]


def _join_answer(edge_url: str, namespace: str, room: str) -> tuple[int, dict[str, Any]]:
    """The edge's answer to one join: its status and JSON body."""
    request = urllib.request.Request(
        f"{edge_url}/v1/rooms/{namespace}/{room}/join", data=b'{"listener": "probe"}',
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


def _running_with_ip(pod: client.V1Pod) -> client.V1Pod | None:
    return pod if pod.status.phase == "Running" and pod.status.pod_ip else None


def _env(container: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in container["env"] if e["name"] == name))


def _metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


async def _listen(
    edge_url: str,
    namespace: str,
    room: str,
    frames: int,
    timeout: float,
    meanwhile: Callable[[], str],
) -> tuple[ListenerStats, str]:
    """One listener, admitted by the edge from the image, until it heard `frames` frames;
    and what `meanwhile` returned while it was still connected."""
    session = aiohttp.ClientSession()
    joiner = EdgeJoiner(session, edge_url, namespace, room)
    listener = Listener("first-listener", joiner)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    deadline = time.monotonic() + timeout
    while listener.stats.frames < frames and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    seen = await asyncio.to_thread(meanwhile)
    stop.set()
    await asyncio.wait_for(task, 10)
    await session.close()
    return listener.stats, seen
