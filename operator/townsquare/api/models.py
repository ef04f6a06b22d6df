"""The AudioRoom resource (townsquare.dev/v1alpha1): the one source of its schema and defaults.

The CRD in `crds/` is generated from these models, so `townsquare plan` and the API server
refuse the same manifests for the same reasons.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from townsquare.api.types import Duration, Quantity, Timestamp

GROUP = "townsquare.dev"
VERSION = "v1alpha1"
KIND = "AudioRoom"
PLURAL = "audiorooms"
API_VERSION = f"{GROUP}/{VERSION}"

MAX_ROOM_NAME_LENGTH = 40
"""Longest room name whose children (`<room>-relay-<ordinal>`, `<room>-relays`) stay valid."""
ROOM_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule, stated once: CEL for the API server, a predicate for Python."""

    cel: str
    message: str
    holds: Any  # Callable[[model], bool]; typed loosely so rules can be class attributes
    field_path: str | None = None

    def as_validation(self) -> dict[str, str]:
        validation = {"rule": self.cel, "message": self.message}
        if self.field_path:
            validation["fieldPath"] = self.field_path
        return validation


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields refused, rules enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.rules:
            if not rule.holds(self):
                context = {"field_path": rule.field_path} if rule.field_path else None
                raise PydanticCustomError("rule", rule.message, context)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: Any
    ) -> JsonSchemaValue:
        json_schema: JsonSchemaValue = handler(schema)
        if cls.rules:
            target = handler.resolve_ref_schema(json_schema)
            target["x-kubernetes-validations"] = [rule.as_validation() for rule in cls.rules]
        return json_schema


class Resources(ApiModel):
    """Compute resources of one relay pod, as in a container's `resources`."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class Toleration(ApiModel):
    """Lets relays run on tainted nodes (dedicated relay pools, simulated nodes)."""

    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class LocalObjectReference(ApiModel):
    """A Secret in the room's namespace, by name (as in a pod's `imagePullSecrets`)."""

    name: str = Field(min_length=1, max_length=253)


class Capabilities(ApiModel):
    """Linux capabilities of the relay container."""

    add: list[str] = Field(default_factory=list, max_length=64)
    drop: list[str] = Field(default_factory=lambda: ["ALL"], max_length=64)


class SeccompProfile(ApiModel):
    """The relay's seccomp profile; `RuntimeDefault` passes the restricted standard."""

    type: Literal["RuntimeDefault", "Localhost", "Unconfined"] = "RuntimeDefault"
    localhost_profile: str | None = Field(default=None, max_length=4096)


class SecurityContext(ApiModel):
    """Who the relay runs as and what it may do. The defaults pass the "restricted" Pod
    Security Standard, so namespaces that enforce it accept relay pods as they are."""

    run_as_non_root: bool = True
    run_as_user: int | None = Field(default=65532, ge=0, le=2147483647)
    run_as_group: int | None = Field(default=65532, ge=0, le=2147483647)
    fs_group: int | None = Field(default=None, ge=0, le=2147483647)
    read_only_root_filesystem: bool = True
    allow_privilege_escalation: bool = False
    capabilities: Capabilities = Field(default_factory=Capabilities)
    seccomp_profile: SeccompProfile = Field(default_factory=SeccompProfile)


WhenUnsatisfiable = Literal["ScheduleAnyway", "DoNotSchedule", "Off"]


class TopologySpread(ApiModel):
    """Relays spread across zones and nodes, so one zone or node failing takes few of them."""

    zones: WhenUnsatisfiable = "ScheduleAnyway"
    """`ScheduleAnyway` prefers spreading, `DoNotSchedule` insists, `Off` does not spread."""
    nodes: WhenUnsatisfiable = "ScheduleAnyway"
    max_skew: int = Field(default=1, ge=1, le=1000)


FreeFormObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""An object passed to Kubernetes as written (the API server validates it in the pod)."""


class RelaySpec(ApiModel):
    """The relay pods that carry listeners."""

    image: str = Field(min_length=1, max_length=512)
    """Container image of the relay."""
    args: list[str] = Field(default_factory=list, max_length=64)
    """Arguments of the relay container (empty: the image's own command). `[relay]` runs the
    reference relay from the townsquare image; its settings come from the pod's env."""
    listeners_per_relay: int = Field(default=1000, ge=1, le=1_000_000)
    """Hard capacity of one relay: listeners above it degrade everyone on that relay."""
    startup_seconds: int = Field(default=45, ge=1, le=3600)
    """Expected seconds from pod creation to Ready; a hint until the operator measures it."""
    port: int = Field(default=7880, ge=1, le=65535)
    """Port listeners connect to."""
    metrics_port: int = Field(default=9090, ge=1, le=65535)
    """Port serving the relay's Prometheus metrics."""
    resources: Resources = Field(default_factory=Resources)
    pod_annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations on relay pods (service mesh, scraping, simulated start-up delay)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    affinity: FreeFormObject = Field(default_factory=dict)
    """A pod `affinity` (node, pod, anti-affinity), as in a pod spec."""
    topology_spread: TopologySpread = Field(default_factory=TopologySpread)
    security_context: SecurityContext = Field(default_factory=SecurityContext)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list, max_length=16)
    priority_class_name: str | None = Field(default=None, max_length=253)
    """Relays outrank batch work: give them a PriorityClass so they pre-empt, not wait."""
    pre_stop_seconds: int = Field(default=5, ge=0, le=600)
    """A relay told to stop waits this long first, so the edge stops sending joins to it."""

    rules = (
        Rule(
            cel="self.port != self.metricsPort",
            message="must differ from port",
            holds=lambda r: r.port != r.metrics_port,
            field_path=".metricsPort",
        ),
    )


class ScalingSpec(ApiModel):
    """How many relays, and how fast the count may change."""

    target_utilization: float = Field(default=0.7, gt=0, le=1)
    """Share of a relay's capacity to fill in steady state; the rest is headroom for joins."""
    min_relays: int = Field(default=2, ge=0, le=100_000)
    max_relays: int = Field(default=1000, ge=1, le=100_000)
    prewarm_lead: Duration | None = None
    """How long before the start to begin pre-warming; derived from the plan when empty."""
    plan_hold: Duration = timedelta(minutes=15)
    """How long after the start the declared plan stays a floor (audiences arrive late)."""
    scale_down_stabilization: Duration = timedelta(minutes=10)
    """Demand must stay low this long before relays are drained."""
    drain_timeout: Duration = timedelta(minutes=30)
    """Longest wait for a draining relay to empty before it is removed anyway."""

    rules = (
        Rule(
            cel="self.minRelays <= self.maxRelays",
            message="must not exceed maxRelays",
            holds=lambda s: s.min_relays <= s.max_relays,
            field_path=".minRelays",
        ),
    )


class RolloutSpec(ApiModel):
    """How a change of the relay pod template reaches running relays: drained, a few at a time."""

    max_surge: int = Field(default=2, ge=1, le=1000)
    """Most relays in flight for the rollout at once (draining, being replaced, or extra
    relays starting), and the most extra relays it adds (within maxRelays) when the others
    have no spare capacity for the audience."""


def _cron_field(value: str) -> str:
    """One cron field: `*` or a value or range, each with an optional step, comma-separated."""
    item = rf"(\*|{value}(-{value})?)(/[0-9]{{1,2}})?"
    return rf"{item}(,{item})*"


_MONTHS = "jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec"
_WEEKDAYS = "sun|mon|tue|wed|thu|fri|sat"
CRON_GRAMMAR = (
    "(?i)^"
    + r"\s+".join(
        _cron_field(value)
        for value in (
            "[0-5]?[0-9]",  # minute
            "(1?[0-9]|2[0-3])",  # hour
            "(0?[1-9]|[12][0-9]|3[01])",  # day of the month
            f"(0?[1-9]|1[0-2]|{_MONTHS})",  # month
            f"([0-7]|{_WEEKDAYS})",  # day of the week
        )
    )
    + "$"
)
"""Five cron fields within their ranges, so the API server refuses `61 * * * *` at apply
time instead of the operator finding it mid-event. A CEL rule, for a message people read."""
CRON_MESSAGE = (
    "must be five cron fields: minute 0-59, hour 0-23, day 1-31, month 1-12 or jan-dec, "
    "weekday 0-7 or sun-sat (each *, a value, a range, a /step or a list), such as 0 17 * * 4"
)


def _valid_cron(text: str) -> str:
    if not re.match(CRON_GRAMMAR, text) or not croniter.is_valid(text):
        raise ValueError(f"{CRON_MESSAGE} (got {text!r})")
    return text


Cron = Annotated[
    str,
    AfterValidator(_valid_cron),
    WithJsonSchema(
        {
            "type": "string",
            "maxLength": 256,
            "x-kubernetes-validations": [
                {"rule": f"self.matches({json.dumps(CRON_GRAMMAR)})", "message": CRON_MESSAGE}
            ],
        }
    ),
]


TIME_ZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*$"


def _valid_time_zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"must be an IANA time zone such as Europe/Paris (got {text!r})") from None
    return text


class ScheduleSpec(ApiModel):
    """A recurring room: every occurrence starts at a time of the cron schedule."""

    cron: Cron = Field(max_length=256)
    """Five-field cron (minute hour day month weekday), read in `timeZone`."""
    time_zone: Annotated[str, AfterValidator(_valid_time_zone)] = Field(
        default="UTC", max_length=64, pattern=TIME_ZONE_PATTERN
    )
    """IANA time zone of the cron times, so an event stays at 17:00 across daylight saving."""


class ShardingSpec(ApiModel):
    """How listeners are spread over relays."""

    shards: int = Field(default=4096, ge=1, le=65536)
    """Virtual shards listeners hash to; shards, not listeners, are assigned to relays."""
    fanout: int = Field(default=64, ge=2, le=4096)
    """Most downstream relays one upstream relay (or the origin) feeds."""
    max_migrations_per_minute: int = Field(default=20_000, ge=0, le=10_000_000)
    """Cap on listeners moved between relays per minute, so a reshard is no reconnect storm."""


QUERY_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class MetricsSpec(ApiModel):
    """Where listener counts come from."""

    preset: str = Field(default="contract", max_length=63, pattern=QUERY_NAME_PATTERN)
    """A named listener query: `contract` (townsquare's metric contract), `livekit`
    (livekit_participant_total by pod), or one the platform team defines."""
    listeners_query: str = Field(default="", max_length=4096)
    """Free PromQL overriding the preset, where the platform team allows it; `$namespace` and
    `$room` are replaced by escaped labels."""
    prometheus_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://.+")
    """Prometheus for this room; the operator's default when empty."""


class NodeHeadroomSpec(ApiModel):
    """Placeholder pods that make the node autoscaler add nodes before the pre-warm."""

    enabled: bool = False
    """Create placeholders shaped like the relays a node lead time before prewarmAt."""
    lead_time: Duration | None = None
    """How long before prewarmAt to ask for nodes; measured from the room's waits when empty."""


SHARD_MAP_LIMIT_BYTES = 1024 * 1024 - 1024
"""A ConfigMap holds at most 1 MiB of data; 1 KiB is left for the map's other fields."""
SHARD_MAP_BYTES_PER_RELAY = 52
"""The longest entry of one relay in the published map (5-digit ordinals, as maxRelays
allows): `{"ordinal":99999,"state":"draining","parent":99998},`."""
SHARD_MAP_BYTES_PER_SHARD = 6
"""The longest slot of the map's assignment: a 5-digit ordinal and a comma."""


def shard_map_fits(max_relays: int, shards: int) -> bool:
    """Whether the largest shard map of the room fits in its ConfigMap."""
    size = max_relays * SHARD_MAP_BYTES_PER_RELAY + shards * SHARD_MAP_BYTES_PER_SHARD
    return size <= SHARD_MAP_LIMIT_BYTES


class AudioRoomSpec(ApiModel):
    """An announced live audio event: when it starts and how many listeners are expected."""

    start_time: Timestamp
    """When the event starts (RFC 3339 with an offset)."""
    duration: Duration
    """How long the event lasts; relays drain after start + duration."""
    expected_audience: int = Field(ge=0, le=100_000_000)
    """Listeners the producer expects at peak."""
    schedule: ScheduleSpec | None = None
    """Makes the room recurring: occurrences at the cron's times, none before `startTime`."""
    relay: RelaySpec
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    sharding: ShardingSpec = Field(default_factory=ShardingSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    node_headroom: NodeHeadroomSpec = Field(default_factory=NodeHeadroomSpec)

    rules = (
        Rule(
            cel=(
                f"self.scaling.maxRelays * {SHARD_MAP_BYTES_PER_RELAY}"
                f" + self.sharding.shards * {SHARD_MAP_BYTES_PER_SHARD}"
                f" <= {SHARD_MAP_LIMIT_BYTES}"
            ),
            message=(
                "with sharding.shards, the shard map of this many relays could pass the 1 MiB"
                f" a ConfigMap holds: maxRelays x {SHARD_MAP_BYTES_PER_RELAY} + shards x"
                f" {SHARD_MAP_BYTES_PER_SHARD} must stay within {SHARD_MAP_LIMIT_BYTES:,}"
                " (with 4096 shards, at most 19,672 relays)"
            ),
            holds=lambda s: shard_map_fits(s.scaling.max_relays, s.sharding.shards),
            field_path=".scaling.maxRelays",
        ),
    )


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata the operator reads; the rest passes through."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)
    namespace: str | None = None


class AudioRoom(ApiModel):
    """A whole AudioRoom manifest, as a producer writes it."""

    model_config = ConfigDict(extra="ignore")
    api_version: Literal["townsquare.dev/v1alpha1"]
    kind: Literal["AudioRoom"]
    metadata: ObjectMeta
    spec: AudioRoomSpec

    rules = (
        Rule(
            cel=(
                f"self.metadata.name.size() <= {MAX_ROOM_NAME_LENGTH}"
                f" && self.metadata.name.matches('{ROOM_NAME_PATTERN}')"
            ),
            message=(
                f"metadata.name must be at most {MAX_ROOM_NAME_LENGTH} characters of a-z, 0-9"
                " and '-', starting with a letter, so that the names of the room's relays and"
                " service stay valid"
            ),
            holds=lambda room: (
                len(room.metadata.name) <= MAX_ROOM_NAME_LENGTH
                and re.fullmatch(ROOM_NAME_PATTERN, room.metadata.name) is not None
            ),
        ),
    )


# --- status ---------------------------------------------------------------------------

Phase = Literal["Scheduled", "PreWarming", "Ready", "Live", "Draining", "Ended"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """A standard Kubernetes condition; lastTransitionTime moves only when status flips."""

    type: str = Field(max_length=316)
    status: ConditionStatus
    reason: str = Field(max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: Timestamp
    observed_generation: int | None = Field(default=None, ge=0)


class PlanStatus(ApiModel):
    """The plan derived from the declared audience."""

    start_time: Timestamp | None = None
    """The start of the occurrence this plan is for (a recurring room has many)."""
    expected_audience: int = Field(ge=0)
    relays: int = Field(ge=0)
    capacity: int = Field(ge=0)
    prewarm_at: Timestamp
    ready_by: Timestamp


class RelayStatus(ApiModel):
    """Relay counts, and the `ready/desired` text shown by `kubectl get`."""

    desired: int = Field(default=0, ge=0)
    ready: int = Field(default=0, ge=0)
    draining: int = Field(default=0, ge=0)
    summary: str = ""


class ListenerStatus(ApiModel):
    """Listener counts as the operator last saw them."""

    current: int = Field(default=0, ge=0)
    forecast: int = Field(default=0, ge=0)
    capacity: int = Field(default=0, ge=0)
    waiting: int = Field(default=0, ge=0)


class RolloutDrain(ApiModel):
    """A relay drained for a rollout: it accepts no joins and is replaced once empty."""

    ordinal: int = Field(ge=0)
    since: Timestamp


class RolloutStatus(ApiModel):
    """Progress of a relay pod template change through the running relays."""

    revision: str = ""
    """The StatefulSet revision relays are being moved to."""
    updated: int = Field(default=0, ge=0)
    outdated: int = Field(default=0, ge=0)
    draining: list[RolloutDrain] = Field(default_factory=list)
    surge: list[int] = Field(default_factory=list)
    """Extra relays the rollout holds (ordinals) so that capacity never drops below demand;
    they drain once the rollout is over."""


class ShardMapRef(ApiModel):
    """Where the room's shard map is published."""

    config_map: str
    generation: int = Field(ge=0)


class NodeHeadroomStatus(ApiModel):
    """Placeholders held for the room's relays, and the node lead time they were made with."""

    placeholders: int = Field(default=0, ge=0)
    lead_time: Duration
    request_at: Timestamp
    longest_node_wait_seconds: float | None = Field(default=None, ge=0)
    """The longest a pod of this room waited for a node: the measured lead time's basis."""


class AudioRoomStatus(ApiModel):
    """What the operator observed and decided, for people and for its own restarts."""

    phase: Phase | None = None
    observed_generation: int | None = Field(default=None, ge=0)
    plan: PlanStatus | None = None
    relays: RelayStatus | None = None
    listeners: ListenerStatus | None = None
    shard_map: ShardMapRef | None = None
    rollout: RolloutStatus | None = None
    node_headroom: NodeHeadroomStatus | None = None
    scaling_state: Annotated[
        dict[str, Any] | None,
        WithJsonSchema(
            {
                "type": "object",
                "nullable": True,
                "x-kubernetes-preserve-unknown-fields": True,
                "description": "The scaling policy's memory, so a restarted operator resumes it.",
            }
        ),
    ] = None
    accepted_spec: str | None = None
    """The last spec the operator accepted, as JSON: a room refused later keeps its timing,
    shard map, drain and listener query. A string, not an object: a merge patch of the
    status replaces it whole, where an object would keep the keys a later spec dropped."""
    conditions: list[Condition] = Field(default_factory=list)
