"""The AudioRoom CRD from crds/, checked by the real kube-apiserver."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.e2e

GROUP, VERSION, PLURAL = "townsquare.dev", "v1alpha1", "audiorooms"

VALID_SPEC: dict[str, Any] = {
    "startTime": "2026-12-01T23:00:00Z",
    "duration": "90m",
    "expectedAudience": 500000,
    "relay": {"image": "registry.example/relay:1.4", "listenersPerRelay": 1000},
    "scaling": {"targetUtilization": 0.7, "minRelays": 2, "maxRelays": 1200},
    "sharding": {"shards": 4096, "fanout": 64},
}


def audioroom(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": spec,
    }


def with_change(path: str, value: object) -> dict[str, Any]:
    """VALID_SPEC with the dotted `path` set to `value`."""
    spec = copy.deepcopy(VALID_SPEC)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node[key]
    node[leaf] = value
    return spec


def test_crd_is_established_and_serves_audiorooms(
    api_client: client.ApiClient, crds: list[str]
) -> None:
    assert f"{PLURAL}.{GROUP}" in crds
    crd = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    assert crd.status.accepted_names.kind == "AudioRoom"
    served = {v.name for v in crd.spec.versions if v.served}
    assert VERSION in served


def test_valid_audioroom_is_stored_and_read_back(
    api_client: client.ApiClient, crds: list[str], namespace: str
) -> None:
    api = client.CustomObjectsApi(api_client)
    api.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, audioroom("campaign-launch", VALID_SPEC)
    )

    stored = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "campaign-launch")

    assert stored["metadata"]["uid"]
    spec = stored["spec"]
    for key, sent in VALID_SPEC.items():
        if isinstance(sent, dict):
            assert sent.items() <= spec[key].items(), f"spec.{key} changed when stored"
        else:
            assert spec[key] == sent, f"spec.{key} changed when stored"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expectedAudience", -1),
        ("scaling.targetUtilization", 1.5),
        ("scaling.minRelays", 1201),  # above maxRelays (1200)
        ("scaling.maxRelays", 20_000),  # its shard map could pass a ConfigMap's 1 MiB
        ("startTime", "2026-12-01 23:00"),  # no T, no offset
        ("schedule", {"cron": "61 17 * * 4"}),  # minute 61: the CRD's CEL cron grammar
    ],
)
def test_invalid_audioroom_is_refused_naming_the_field(
    api_client: client.ApiClient, crds: list[str], namespace: str, field: str, value: object
) -> None:
    api = client.CustomObjectsApi(api_client)

    with pytest.raises(ApiException) as refused:
        api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, audioroom("bad", with_change(field, value))
        )

    assert refused.value.status == 422, refused.value.body
    assert f"spec.{field}" in refused.value.body, refused.value.body
    stored = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    assert stored["items"] == []
