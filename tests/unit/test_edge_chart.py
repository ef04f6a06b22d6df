"""The chart's edge: deployed when it can read the relays' reports, locked down, read-only."""

from __future__ import annotations

from typing import Any

import pytest
from test_chart import of_kind, render, rules_of

from townsquare.cli import build_parser

PROMETHEUS = {"prometheus": {"url": "http://prometheus.monitoring:9090"}}


def edge_docs(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        d
        for d in render({**PROMETHEUS, **values})
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "edge"
    ]


def test_the_edge_is_deployed_with_flags_townsquare_edge_accepts() -> None:
    docs = edge_docs({"watch": {"namespaces": ["a", "b"]}})
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        ["Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "Secret"]
        + ["Role", "RoleBinding"] * 2
    )
    (deployment,) = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "edge"
    assert parsed.namespace == ["a", "b"]
    assert parsed.prometheus_url == "http://prometheus.monitoring:9090"
    assert parsed.replicas == deployment["spec"]["replicas"] == 2
    assert parsed.ticket_key_file == "/etc/townsquare/tickets/key"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    (secret,) = of_kind(docs, "Secret")
    assert pod["volumes"][0]["secret"]["secretName"] == secret["metadata"]["name"]
    assert len(secret["data"]["key"]) >= 32
    (service,) = of_kind(docs, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_operator_objects_never_select_edge_pods() -> None:
    docs = render(PROMETHEUS)
    edge = next(
        d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "edge"
    )
    edge_labels = edge["spec"]["template"]["metadata"]["labels"]
    for service in of_kind(docs, "Service"):
        if service["metadata"]["labels"]["app.kubernetes.io/component"] == "edge":
            continue
        selector = service["spec"]["selector"]
        assert not selector.items() <= edge_labels.items(), service["metadata"]["name"]


def test_the_edge_reads_only_maps_and_endpoint_slices() -> None:
    for values in ({}, {"watch": {"namespaces": ["a"]}}):
        rules = rules_of(edge_docs(values))
        granted = {
            (g, r, v)
            for rule in rules
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
        assert granted == {
            (group, resource, verb)
            for group, resource in (("", "configmaps"), ("discovery.k8s.io", "endpointslices"))
            for verb in ("get", "list", "watch")
        }


def test_autoscaled_replicas_share_spare_room_by_the_maximum() -> None:
    docs = edge_docs({"edge": {"autoscaling": {"enabled": True, "maxReplicas": 7}}})
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 7
    (deployment,) = of_kind(docs, "Deployment")
    assert "replicas" not in deployment["spec"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert build_parser().parse_args(args).replicas == 7


def test_an_upgrade_never_runs_more_edge_replicas_than_the_spare_room_is_divided_by() -> None:
    """Each replica fills 1/--replicas of a relay's spare room: a surge replica would make
    the shares add up to more than the room."""
    for values in ({}, {"edge": {"autoscaling": {"enabled": True, "maxReplicas": 7}}}):
        (deployment,) = of_kind(edge_docs(values), "Deployment")
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_a_value_turns_it_off_and_a_given_secret_is_used() -> None:
    assert not edge_docs({"edge": {"enabled": False}})
    assert not [
        d for d in render() if d["metadata"]["labels"].get("app.kubernetes.io/component") == "edge"
    ], "without a Prometheus to read relay reports from, no edge"
    docs = edge_docs({"edge": {"ticketKey": {"existingSecret": "my-key"}}})
    assert not of_kind(docs, "Secret")
    (deployment,) = of_kind(docs, "Deployment")
    volume = deployment["spec"]["template"]["spec"]["volumes"][0]
    assert volume["secret"]["secretName"] == "my-key"


def relay_flags(docs: list[dict[str, Any]]) -> list[str | None]:
    """The --relay-ticket-secret each operator Deployment runs with."""
    return [
        build_parser()
        .parse_args(d["spec"]["template"]["spec"]["containers"][0]["args"])
        .relay_ticket_secret
        or None
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]


def test_relays_of_rooms_in_watched_namespaces_get_the_edges_key() -> None:
    docs = render({**PROMETHEUS, "watch": {"namespaces": ["spaces", "stage"]}})
    secrets = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): s for s in of_kind(docs, "Secret")
    }
    (edge_secret,) = [
        s for s in secrets.values() if s["metadata"]["namespace"] == "townsquare-system"
    ]
    name = edge_secret["metadata"]["name"]
    assert set(secrets) == {("townsquare-system", name), ("spaces", name), ("stage", name)}
    assert {s["data"]["key"] for s in secrets.values()} == {edge_secret["data"]["key"]}, (
        "one key: the relays check what the edge signs"
    )
    assert relay_flags(docs) == [name]


def test_the_operator_mounts_the_named_secret_into_relay_pods(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from townsquare.api.manifest import parse_room
    from townsquare.kube.children import relay_stateful_set

    room = parse_room(
        "apiVersion: townsquare.dev/v1alpha1\nkind: AudioRoom\nmetadata: {name: launch}\n"
        "spec: {startTime: '2026-12-01T23:00:00Z', duration: 90m, expectedAudience: 1000,"
        " relay: {image: 'registry.example/relay:1', listenersPerRelay: 100}}\n"
    )
    (flag,) = relay_flags(render({**PROMETHEUS, "watch": {"namespaces": ["spaces"]}}))
    template = relay_stateful_set("launch", "spaces", "uid", room.spec, 3, ticket_secret=flag)[
        "spec"
    ]["template"]
    pod = template["spec"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == flag
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] and mount["name"] == volume["name"]
    key_file = {e["name"]: e.get("value") for e in container["env"]}["TOWNSQUARE_TICKET_KEY_FILE"]
    assert key_file == f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}"
    monkeypatch.setenv("TOWNSQUARE_TICKET_KEY_FILE", key_file)  # as the pod's env sets it
    assert build_parser().parse_args(["relay"]).ticket_key_file == key_file
    assert template["metadata"]["annotations"]["townsquare.dev/ticket-secret"] == flag
    without = relay_stateful_set("launch", "spaces", "uid", room.spec, 3)["spec"]["template"]
    assert not [v for v in without["spec"]["volumes"] if "secret" in v]


def test_keys_go_only_where_asked_and_can_be_left_to_the_platform_team() -> None:
    everywhere = render(PROMETHEUS)
    assert [s["metadata"]["namespace"] for s in of_kind(everywhere, "Secret")] == [
        "townsquare-system"
    ]
    listed = render({**PROMETHEUS, "edge": {"ticketKey": {"relayNamespaces": ["spaces"]}}})
    assert sorted(s["metadata"]["namespace"] for s in of_kind(listed, "Secret")) == [
        "spaces",
        "townsquare-system",
    ]
    off = render(
        {**PROMETHEUS, "watch": {"namespaces": ["spaces"]},
         "edge": {"ticketKey": {"mountIntoRelays": False}}}
    )  # fmt: skip
    assert [s["metadata"]["namespace"] for s in of_kind(off, "Secret")] == ["townsquare-system"]
    assert relay_flags(off) == [None]
    given = render({**PROMETHEUS, "edge": {"ticketKey": {"existingSecret": "my-key"}}})
    assert not of_kind(given, "Secret") and relay_flags(given) == ["my-key"]


def test_prometheus_operator_scrapes_the_edge_keeping_the_rooms_namespace() -> None:
    # Without it audioroom_edge_waiting_listeners never reaches the operator, and no
    # replica learns the others' lines, on a Prometheus Operator install.
    docs = render({**PROMETHEUS, "metrics": {"serviceMonitor": {"enabled": True}}})
    monitors = of_kind(docs, "ServiceMonitor")
    services = of_kind(docs, "Service")

    def scraped(monitor: dict[str, Any]) -> list[tuple[str, str]]:
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
        return [
            (service["metadata"]["name"], port["name"])
            for service in services
            if wanted <= service["metadata"]["labels"].items()
            for port in service["spec"]["ports"]
            if port["name"] in ports
        ]

    (edge_service,) = of_kind(edge_docs({}), "Service")
    edge_monitors = [
        m for m in monitors if (edge_service["metadata"]["name"], "http") in scraped(m)
    ]
    assert len(edge_monitors) == 1
    (endpoint,) = edge_monitors[0]["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True, "the room's namespace label, not the edge's"
    assert endpoint["interval"] == "2s", "short: it paces the room's line across replicas"
    (deployment,) = of_kind(edge_docs({}), "Deployment")
    ports = deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "http", "containerPort": 8080} in [
        {k: p[k] for k in ("name", "containerPort")} for p in ports
    ]
    slower = render(
        {**PROMETHEUS, "metrics": {"serviceMonitor": {"enabled": True}},
         "edge": {"serviceMonitor": {"interval": "5s"}}}
    )  # fmt: skip
    intervals = sorted(e["interval"] for m in of_kind(slower, "ServiceMonitor")
                       for e in m["spec"]["endpoints"])  # fmt: skip
    assert intervals == ["30s", "5s"], "the operator's own keeps its interval"
    off = render({**PROMETHEUS, "edge": {"enabled": False},
                  "metrics": {"serviceMonitor": {"enabled": True}}})  # fmt: skip
    assert len(of_kind(off, "ServiceMonitor")) == 1
