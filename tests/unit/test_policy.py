"""The operator's own tenant policy: the rules the chart's admission policy also enforces."""

from __future__ import annotations

from typing import Any

from townsquare.api.models import AudioRoomSpec, MetricsSpec
from townsquare.policy import TenantPolicy, image_allowed, violations, within_policy

POLICY = TenantPolicy(
    allowed_registries=("registry.example", "ghcr.io/townsquare/"),
    max_relays=200,
    allowed_prometheus_urls=("http://prometheus.monitoring:9090",),
    named_queries=frozenset({"contract", "livekit", "janus"}),
    free_promql_namespaces=frozenset({"platform"}),
)


def spec(**changes: Any) -> AudioRoomSpec:
    base: dict[str, Any] = {
        "startTime": "2026-12-01T23:00:00Z",
        "duration": "1h",
        "expectedAudience": 1000,
        "relay": {"image": "registry.example/relay:1.4"},
        "scaling": {"maxRelays": 100},
        "metrics": {},
    }
    for key, value in changes.items():
        base[key] = {**base[key], **value}
    return AudioRoomSpec.model_validate(base)


def test_a_compliant_room_breaks_no_rule() -> None:
    assert violations(spec(metrics={"preset": "janus"}), "tenant", POLICY) == []


def test_images_must_come_from_an_allowed_registry_not_a_lookalike() -> None:
    assert image_allowed("registry.example/relay:1", ("registry.example",))
    assert not image_allowed("registry.example.evil.io/relay:1", ("registry.example",))
    assert not image_allowed("relay:1", ("registry.example",))
    assert image_allowed("anything:1", ())
    [problem] = violations(spec(relay={"image": "docker.io/miner:1"}), "tenant", POLICY)
    assert problem.startswith("spec.relay.image: docker.io/miner:1 is not from an allowed")


def test_too_many_relays_names_the_limit() -> None:
    [problem] = violations(spec(scaling={"maxRelays": 5000}), "tenant", POLICY)
    assert problem == "spec.scaling.maxRelays: 5,000 is above the 200 relays a room may have"


def test_only_allowed_prometheus_urls() -> None:
    [problem] = violations(
        spec(metrics={"prometheusUrl": "http://169.254.169.254/"}), "tenant", POLICY
    )
    assert problem.startswith("spec.metrics.prometheusUrl:")


def test_named_queries_only_and_free_promql_only_where_allowed() -> None:
    [unknown] = violations(spec(metrics={"preset": "mystery"}), "tenant", POLICY)
    assert unknown.startswith("spec.metrics.preset: mystery is not a named listener query")
    free = spec(metrics={"listenersQuery": 'sum(other_tenant_secret{room="$room"})'})
    [problem] = violations(free, "tenant", POLICY)
    assert problem.startswith("spec.metrics.listenersQuery: free PromQL is not allowed")
    assert violations(free, "platform", POLICY) == []


def test_no_policy_allows_everything_it_did_before() -> None:
    wild = spec(
        relay={"image": "anywhere/relay:1"},
        scaling={"maxRelays": 19_000},
        metrics={"listenersQuery": "up"},
    )
    assert violations(wild, "tenant", TenantPolicy()) == []


def test_the_operator_s_flags_become_its_policy() -> None:
    from townsquare.cli import build_parser, tenant_policy

    args = build_parser().parse_args(
        [
            "run", "--allowed-registry", "registry.example", "--max-relays-per-room", "200",
            "--listener-query", "janus=sum by (namespace, room, pod) (janus_listeners)",
            "--free-promql-namespaces", "platform,ops",
        ]
    )  # fmt: skip
    policy, queries = tenant_policy(args)
    assert policy.allowed_registries == ("registry.example",)
    assert policy.max_relays == 200
    assert policy.named_queries == {"contract", "livekit", "janus"}
    assert policy.free_promql_namespaces == {"platform", "ops"}
    assert queries == {"janus": "sum by (namespace, room, pod) (janus_listeners)"}
    none = tenant_policy(build_parser().parse_args(["run", "--free-promql-namespaces", ""]))[0]
    assert none.free_promql_namespaces == frozenset()
    everyone = tenant_policy(build_parser().parse_args(["run"]))[0]
    assert everyone.free_promql_namespaces is None


def test_a_malformed_listener_query_flag_is_one_line_exit_2(capsys: Any) -> None:
    from townsquare.cli import main

    assert main(["run", "--listener-query", "Bad Name"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "townsquare: error: --listener-query: expected NAME=PROMQL with a lower-case NAME "
        "(got 'Bad Name')"
    )


def test_a_source_keeps_the_parts_the_policy_allows_and_only_those() -> None:
    policy = TenantPolicy(
        allowed_prometheus_urls=("http://prom.example",),
        named_queries=frozenset({"contract", "livekit"}),
        free_promql_namespaces=frozenset({"own"}),
    )
    source = MetricsSpec(
        preset="livekit", listeners_query="sum(x)", prometheus_url="http://prom.example"
    )
    assert within_policy(source, "own", policy) == source
    assert within_policy(source, "t", policy) == source.model_copy(update={"listeners_query": ""})
    elsewhere = MetricsSpec(preset="mine", prometheus_url="http://evil.example")
    assert within_policy(elsewhere, "own", policy) == MetricsSpec()
