"""The chart's tenant admission policy, judged by the real API server.

The policy and its binding come from `helm template` of the shipped chart, scoped to this
test's namespace, so tests running side by side never meet each other's policy.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from harness import REPO, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException
from rooms import GROUP, PLURAL, VERSION, room_manifest

pytestmark = [pytest.mark.e2e]

CHART = REPO / "charts" / "townsquare"
VALUES = {
    "allowedRegistries": ["registry.example/"],
    "maxRelaysPerRoom": 50,
    "allowedPrometheusUrls": ["http://prometheus.monitoring:9090"],
    "listenerQueries": {"janus": "sum by (namespace, room, pod) (janus_listeners)"},
    "freePromQLNamespaces": ["platform-team"],
}


def helm() -> str:
    built = subprocess.run(
        [str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=True
    )
    return built.stdout.strip().splitlines()[-1]


@pytest.fixture
def policy(api_client: client.ApiClient, namespace: str, crds: list[str]) -> Iterator[str]:
    """The chart's policy and binding, for this namespace only; removed afterwards."""
    values = {
        **VALUES,
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
    }
    release = f"tp{secrets.token_hex(3)}"
    rendered = subprocess.run(
        [
            helm(), "template", release, str(CHART), "--namespace", namespace,
            "--show-only", "templates/tenant-policy.yaml",
            "--set-json", f"tenantPolicy={json.dumps({'enabled': True, **values})}",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    policy_doc, binding_doc = [d for d in yaml.safe_load_all(rendered) if d]
    admission = client.AdmissionregistrationV1Api(api_client)
    admission.create_validating_admission_policy(policy_doc)
    admission.create_validating_admission_policy_binding(binding_doc)
    name = policy_doc["metadata"]["name"]
    try:
        yield name
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)


def create(api_client: client.ApiClient, namespace: str, manifest: dict[str, Any]) -> str | None:
    """Creates the room; the API server's refusal message, or None when it was accepted."""
    custom = client.CustomObjectsApi(api_client)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except ApiException as error:
        if error.status in (400, 403, 422):
            return str(json.loads(error.body)["message"])
        raise
    return None


def room(name: str, **changes: dict[str, Any]) -> dict[str, Any]:
    manifest = room_manifest(name, start_in=3600)
    for key, value in changes.items():
        manifest["spec"][key] = {**manifest["spec"].get(key, {}), **value}
    return manifest


def test_the_admission_policy_refuses_rooms_outside_it_and_accepts_a_compliant_one(
    api_client: client.ApiClient, namespace: str, policy: str
) -> None:
    # The API server picks up a new policy within a moment: wait until it refuses.
    first = wait_until(
        lambda: create(api_client, namespace, room("probe", relay={"image": "evil.example/x:1"})),
        30,
        "the admission policy to take effect",
        interval=0.5,
    )
    assert "spec.relay.image: evil.example/x:1 is not from an allowed registry" in first
    assert "registry.example" in first
    assert policy in first, "the refusal names the policy"

    lookalike = room("lookalike", relay={"image": "registry.example.evil.io/relay:1"})
    assert "spec.relay.image" in (create(api_client, namespace, lookalike) or "")

    too_many = create(api_client, namespace, room("huge", scaling={"maxRelays": 5000}))
    assert too_many is not None
    assert "spec.scaling.maxRelays: 5000 is above the 50 relays a room may have" in too_many

    free = room("free", metrics={"listenersQuery": 'sum(secret_series{tenant="other"})'})
    free_refusal = create(api_client, namespace, free)
    assert free_refusal is not None
    assert "spec.metrics.listenersQuery: free PromQL is not allowed in namespace" in free_refusal

    unknown = create(api_client, namespace, room("unknown", metrics={"preset": "mystery"}))
    assert unknown is not None and "spec.metrics.preset: mystery is not a named" in unknown

    foreign = room("foreign", metrics={"prometheusUrl": "http://169.254.169.254/latest"})
    assert "spec.metrics.prometheusUrl" in (create(api_client, namespace, foreign) or "")

    compliant = room(
        "compliant",
        relay={"image": "registry.example/relay:1.4"},
        scaling={"maxRelays": 20},
        metrics={"preset": "janus", "prometheusUrl": "http://prometheus.monitoring:9090"},
    )
    assert create(api_client, namespace, compliant) is None
    custom = client.CustomObjectsApi(api_client)
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "compliant")
    assert stored["spec"]["metrics"]["preset"] == "janus"

    # Changing a compliant room into a refused one is refused too; its status stays writable.
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "compliant",
            {"spec": {"relay": {"image": "docker.io/miner:1"}}},
        )  # fmt: skip
    assert "spec.relay.image: docker.io/miner:1" in json.loads(refused.value.body)["message"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "compliant",
        {"metadata": {"labels": {"team": "townhall"}}},
    )  # fmt: skip


def test_the_operator_refuses_to_act_on_a_room_outside_its_own_flags(
    api_client: client.ApiClient, namespace: str, crds: list[str], kubeconfig: Any, tmp_path: Any
) -> None:
    """No admission policy here: the operator's flags alone keep the room from running."""
    from operator_process import OperatorProcess

    operator = OperatorProcess(
        kubeconfig, namespace, tmp_path / "operator.log",
        "--allowed-registry", "registry.example", "--max-relays-per-room", "50",
        "--free-promql-namespaces", "",
    )  # fmt: skip
    operator.start()
    custom = client.CustomObjectsApi(api_client)
    try:
        outside = room("outside", relay={"image": "evil.example/x:1"})
        assert create(api_client, namespace, outside) is None, "no admission policy here"
        free = room("nosy", metrics={"listenersQuery": 'sum(secret_series{tenant="other"})'})
        assert create(api_client, namespace, free) is None
        assert create(api_client, namespace, room("inside")) is None

        def accepted(name: str) -> dict[str, Any]:
            got = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            conditions = (got.get("status") or {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Accepted"), {})

        refused = wait_until(lambda: accepted("outside"), 30, "the operator's verdict")
        assert (refused["status"], refused["reason"]) == ("False", "PolicyViolation")
        assert (
            "spec.relay.image: evil.example/x:1 is not from an allowed registry"
            in (refused["message"])
        )
        nosy = wait_until(lambda: accepted("nosy"), 30, "the verdict on free PromQL")
        assert "spec.metrics.listenersQuery: free PromQL is not allowed" in nosy["message"]
        wait_until(lambda: accepted("inside").get("status") == "True", 30, "a compliant room")
        apps = client.AppsV1Api(api_client)
        wait_until(
            lambda: apps.read_namespaced_stateful_set("inside-relay", namespace), 30, "relays"
        )
        names = {s.metadata.name for s in apps.list_namespaced_stateful_set(namespace).items}
        assert names == {"inside-relay"}, "nothing was created for the refused rooms"

        def refusals() -> list[Any]:
            return list(
                client.CoreV1Api(api_client)
                .list_namespaced_event(
                    namespace, field_selector="involvedObject.name=outside,reason=Refused"
                )
                .items
            )

        # A pass writes the room's status before it posts the Events it decided on.
        events = wait_until(refusals, 30, "the Refused Event")
        assert events[0].type == "Warning"
    finally:
        operator.stop()
