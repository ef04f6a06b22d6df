"""Fixtures for end-to-end tests against a real kube-apiserver and a real Prometheus.

The cluster is the local kwok cluster (hack/cluster/cluster.sh), started once per session
unless it is already running, or any cluster that TOWNSQUARE_KUBECONFIG points at.
Every test gets its own namespace and its own Prometheus, so tests never share state.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, Prometheus, local_cluster, wait_until
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess

CRD_DIR = REPO / "crds"


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[Path]:
    """A kubeconfig for a live cluster: TOWNSQUARE_KUBECONFIG's, or the local one."""
    given = os.environ.get("TOWNSQUARE_KUBECONFIG")
    if given:
        yield Path(given)
        return
    with local_cluster() as path:
        yield path


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def kwok_nodes(api_client: client.ApiClient) -> list[str]:
    """Names of the nodes kwok simulates; the tests' pods are pinned to them."""
    nodes = client.CoreV1Api(api_client).list_node(label_selector="type=kwok").items
    names = [n.metadata.name for n in nodes if _is_ready(n.status.conditions)]
    if not names:
        if os.environ.get("TOWNSQUARE_KUBECONFIG"):
            pytest.skip("this cluster has no Ready kwok nodes (label type=kwok)")
        pytest.fail("the local cluster has no Ready kwok nodes: run 'make cluster-up' to see why")
    return names


@pytest.fixture(scope="session")
def crds(api_client: client.ApiClient) -> list[str]:
    """Installs every CustomResourceDefinition in crds/ and waits until each is served."""
    api = client.ApiextensionsV1Api(api_client)
    documents = [
        doc
        for path in sorted(CRD_DIR.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    if not documents:
        pytest.fail(f"no CustomResourceDefinition in {CRD_DIR}: run 'make crd'")
    for body in documents:
        refusal = _install_crd(api, body)
        if refusal:
            pytest.fail(f"the API server refused the CRD {body['metadata']['name']}: {refusal}")
    names = [body["metadata"]["name"] for body in documents]
    for name in names:
        wait_until(
            lambda name=name: _is_established(api.read_custom_resource_definition(name)),
            30,
            f"CRD {name} to be established",
        )
    return names


def _install_crd(api: client.ApiextensionsV1Api, body: dict[str, Any]) -> str | None:
    """Creates or replaces a CRD; returns the API server's message if it refuses it."""
    name = body["metadata"]["name"]
    # Test workers side by side install the same CRD at once: a replace that loses the race
    # to another worker's (409 on a stale resourceVersion) reads the CRD again and retries.
    for _ in range(5):
        try:
            try:
                api.create_custom_resource_definition(body)
            except ApiException as error:
                if error.status != 409:
                    raise
                current = api.read_custom_resource_definition(name)
                body["metadata"]["resourceVersion"] = current.metadata.resource_version
                api.replace_custom_resource_definition(name, body)
        except ApiException as error:
            if error.status == 409:
                continue
            if error.status != 422:
                raise
            return str(json.loads(error.body)["message"])
        return None
    raise AssertionError(f"CRD {name}: five conflicting writes in a row while installing it")


def _is_established(crd: client.V1CustomResourceDefinition) -> bool:
    conditions = crd.status.conditions or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _is_ready(conditions: list[client.V1NodeCondition] | None) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in conditions or [])


@pytest.fixture
def namespace(api_client: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (with everything in it) afterwards."""
    core = client.CoreV1Api(api_client)
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"e2e-{slug}-{secrets.token_hex(3)}"
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=name, labels={"townsquare.dev/e2e": "true"})
        )
    )
    # Pods are refused until the namespace's default service account exists.
    wait_until(
        lambda: core.read_namespaced_service_account("default", name),
        30,
        f"the default service account in namespace {name}",
    )
    yield name
    _release_rooms(api_client, name)
    core.delete_namespace(name, propagation_policy="Background")


def _release_rooms(api_client: client.ApiClient, namespace: str) -> None:
    """Drop kopf's finalizer from rooms left behind: their operator has stopped by now, and a
    finalizer nobody removes would keep the namespace Terminating forever."""
    custom = client.CustomObjectsApi(api_client)
    try:
        rooms = custom.list_namespaced_custom_object(
            "townsquare.dev", "v1alpha1", namespace, "audiorooms"
        )["items"]
    except ApiException as error:
        if error.status == 404:  # the CRD is not installed in this session
            return
        raise
    for room in rooms:
        if room["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object(
                "townsquare.dev", "v1alpha1", namespace, "audiorooms",
                room["metadata"]["name"], {"metadata": {"finalizers": None}},
            )  # fmt: skip


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    """A Prometheus server of this test's own, scraping every second; stopped afterwards."""
    server = Prometheus(tmp_path / "prometheus")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def scaling_operator(
    kubeconfig: Path, namespace: str, crds: list[str], tmp_path: Path, prometheus: Prometheus
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log",
        "--prometheus-url", prometheus.url, "--metrics-interval", "1", "--metrics-max-age", "5",
    )  # fmt: skip
    process.start()
    process.wait_started()
    yield process
    process.stop()


@pytest.fixture
def relay_operator(
    kubeconfig: Path, namespace: str, crds: list[str], tmp_path: Path, prometheus: Prometheus
) -> Iterator[OperatorProcess]:
    """The scaling operator for rooms whose relays really run: their pods mount the ticket
    key from the Secret `townsquare-tickets` (the test creates it), as in production."""
    process = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log",
        "--prometheus-url", prometheus.url, "--metrics-interval", "1", "--metrics-max-age", "5",
        "--relay-ticket-secret", "townsquare-tickets",
    )  # fmt: skip
    process.start()
    process.wait_started()
    yield process
    process.stop()


@pytest.fixture
def operator(
    kubeconfig: Path, namespace: str, crds: list[str], tmp_path: Path
) -> Iterator[OperatorProcess]:
    """`townsquare run` for this test's namespace, without Prometheus."""
    process = OperatorProcess(kubeconfig, namespace, tmp_path / "operator.log")
    process.start()
    process.wait_started()
    yield process
    process.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow scenarios first, so that with `-n 3 --dist worksteal` the minutes-long ones
    start at once and the short ones (and the unit tests) fill in around them, instead of
    one worker ending the run alone on a long scenario that was queued last."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("slow") else 1)
