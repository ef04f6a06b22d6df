"""What a tenant's room may ask for, as the platform team set it (pure).

The chart's ValidatingAdmissionPolicy refuses such rooms at `kubectl apply`; the operator
checks the same rules against its own flags, so a room slips through nowhere if the policy
was not installed (or was installed with other values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from townsquare.api.models import AudioRoomSpec, MetricsSpec

BUILT_IN_QUERIES = frozenset({"contract", "livekit"})


@dataclass(frozen=True)
class TenantPolicy:
    """The limits of one operator; empty collections and None mean "no limit"."""

    allowed_registries: tuple[str, ...] = ()
    """Image prefixes (`registry.example`, `registry.example/team`) a relay image must
    start with, followed by `/`."""
    max_relays: int | None = None
    """Most relays one room may ask for (`spec.scaling.maxRelays`)."""
    allowed_prometheus_urls: tuple[str, ...] | None = None
    """URLs `spec.metrics.prometheusUrl` may name; None leaves that to the metrics reader."""
    named_queries: frozenset[str] = BUILT_IN_QUERIES
    """Names `spec.metrics.preset` may pick."""
    free_promql_namespaces: frozenset[str] | None = field(default=None)
    """Namespaces whose rooms may write their own `spec.metrics.listenersQuery`; None: all."""


def image_allowed(image: str, registries: tuple[str, ...]) -> bool:
    """True when `image` comes from one of `registries` (any registry when none is given)."""
    return not registries or any(image.startswith(f"{r.rstrip('/')}/") for r in registries)


def violations(spec: AudioRoomSpec, namespace: str, policy: TenantPolicy) -> list[str]:
    """Every rule the room breaks, each as `field: what is allowed`, the wording the
    admission policy uses."""
    found: list[str] = []
    if not image_allowed(spec.relay.image, policy.allowed_registries):
        found.append(
            f"spec.relay.image: {spec.relay.image} is not from an allowed registry "
            f"({', '.join(policy.allowed_registries)})"
        )
    if policy.max_relays is not None and spec.scaling.max_relays > policy.max_relays:
        found.append(
            f"spec.scaling.maxRelays: {spec.scaling.max_relays:,} is above the "
            f"{policy.max_relays:,} relays a room may have"
        )
    url = spec.metrics.prometheus_url
    allowed_urls = policy.allowed_prometheus_urls
    if url is not None and allowed_urls is not None and url not in allowed_urls:
        found.append(f"spec.metrics.prometheusUrl: {url} is not an allowed Prometheus")
    if spec.metrics.preset not in policy.named_queries:
        found.append(
            f"spec.metrics.preset: {spec.metrics.preset} is not a named listener query "
            f"({', '.join(sorted(policy.named_queries))})"
        )
    free = policy.free_promql_namespaces
    if spec.metrics.listeners_query and free is not None and namespace not in free:
        found.append(
            f"spec.metrics.listenersQuery: free PromQL is not allowed in namespace "
            f"{namespace}; pick a named query in spec.metrics.preset"
        )
    return found


def within_policy(metrics: MetricsSpec, namespace: str, policy: TenantPolicy) -> MetricsSpec:
    """A listener source with each part the policy refuses replaced by the default (the
    metric contract, on the operator's own Prometheus), and the parts it allows kept."""
    default = MetricsSpec()
    url = metrics.prometheus_url
    allowed_urls = policy.allowed_prometheus_urls
    free = policy.free_promql_namespaces
    return MetricsSpec(
        preset=metrics.preset if metrics.preset in policy.named_queries else default.preset,
        listeners_query=metrics.listeners_query
        if free is None or namespace in free
        else default.listeners_query,
        prometheus_url=url
        if url is None or allowed_urls is None or url in allowed_urls
        else default.prometheus_url,
    )


def listener_source(
    spec: AudioRoomSpec,
    namespace: str,
    policy: TenantPolicy | None,
    accepted: AudioRoomSpec | None = None,
) -> MetricsSpec:
    """Where a room's listeners are read: as its spec says, except for a room outside the
    tenant policy (nothing of a refused spec is used): as the last spec `accepted` said,
    with the platform's default (the metric contract on the operator's own Prometheus)
    only for a part the policy refuses now, so a refused room that ran drains by its
    relays' counts, read as it read them (a `livekit` room is not left blind)."""
    if policy and violations(spec, namespace, policy):
        return within_policy(accepted.metrics if accepted else spec.metrics, namespace, policy)
    return spec.metrics
