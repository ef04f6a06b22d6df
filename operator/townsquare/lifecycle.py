"""A room's life, from schedule to end: phases, relay counts, shard map, conditions, Events.

Pure: `reconcile` takes the room, what was last recorded (its status, the scaling state and
the published shard map) and what the cluster and Prometheus show now, and returns what to
record, the Events to post and when to look again. It calls the scaling policy and the shard
map once each, so the operator and the simulator decide alike. Everything needed to resume
after a restart is in what it returns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from pydantic import ValidationError

from townsquare import headroom
from townsquare.api.models import (
    AudioRoomSpec,
    AudioRoomStatus,
    Condition,
    ConditionStatus,
    ListenerStatus,
    NodeHeadroomStatus,
    Phase,
    PlanStatus,
    RelayStatus,
    RolloutDrain,
    RolloutStatus,
    ScalingSpec,
    ShardMapRef,
)
from townsquare.api.names import shard_map_name
from townsquare.api.types import format_duration
from townsquare.planning import Plan, capacity_of, plan_room
from townsquare.policy import TenantPolicy, violations
from townsquare.rollout import ROLLOUT_FILL, RolloutStep, plan_rollout
from townsquare.scaling import (
    DRAIN_SETTLE,
    Decision,
    Observation,
    ScalingState,
    decide,
    startup_estimate,
)
from townsquare.sharding import (
    Consolidation,
    ShardMap,
    consolidate,
    in_transit_by_shard,
    moved_share,
    new_map,
    rebalance,
    relays_changed,
    relays_moved,
    resize,
    shard_listeners_from_relays,
)

NORMAL = "Normal"
WARNING = "Warning"
STARTUP_SAMPLES = 20
"""The newest relay start-ups the policy learns from: recent pods tell of today's nodes."""
MISSING_RELAYS_RECHECK = timedelta(seconds=10)
"""While relay pods are missing, look again this often: a refusal raises no pod event."""
DRAIN_RECHECK = timedelta(seconds=5)
"""While a drain waits for a newer reading to show relays empty, look again this often: a
new sample with the same figures wakes no pass."""
BLOCKED_WINDOW = timedelta(minutes=10)
"""A pod-creation failure this recent, with relays still missing, means they are blocked."""


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the room, for on-call."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Metrics:
    """Listener counts read from Prometheus for this room, or why there are none."""

    listeners: int | None
    """Connected listeners; None when missing or stale."""
    waiting: int = 0
    """Joins the edge holds in the admission queue."""
    by_relay: Mapping[int, int] = field(default_factory=dict)
    sampled_at: datetime | None = None
    problem: str = ""
    """Why `listeners` is None, for the MetricsAvailable condition."""


@dataclass(frozen=True)
class Observed:
    """What the shell read from the cluster (and Prometheus) for this room."""

    now: datetime
    generation: int
    ready_relays: int
    """Relay pods that are Ready."""
    ready_ordinals: frozenset[int] | None = None
    """Which relays are Ready; None means ordinals 0..ready_relays-1."""
    metrics: Metrics | None = None
    """None: the operator reads no metrics (no Prometheus configured)."""
    startups: tuple[tuple[datetime, float], ...] = ()
    """(pod creation, seconds from creation to Ready) of relays that started cleanly."""
    namespace: str = ""
    deleting_since: datetime | None = None
    """When the room was deleted; it drains before its relays go."""
    existing_relays: int | None = None
    """Relay pods that exist at all (Ready or not); None: not counted."""
    outdated_ordinals: frozenset[int] = frozenset()
    """Relays running an older pod template than the StatefulSet's."""
    revision: str = ""
    """The StatefulSet's current template revision."""
    pod_failures: tuple[tuple[datetime, str], ...] = ()
    """(when, the API server's reason) of the StatefulSet's failures to create relay pods."""
    relays: headroom.Relays | None = None
    """Relay pods that exist and those on a node; None: as many as are Ready."""
    placeholders: tuple[headroom.Placeholder, ...] = ()
    node_waits: tuple[float, ...] = ()
    """Seconds the room's pods waited for a node (creation to scheduled), oldest first."""
    pending_relays: tuple[tuple[str, str], ...] = ()
    """(pod, the scheduler's reason) of relays not on a node."""

    @property
    def listeners(self) -> int | None:
        return self.metrics.listeners if self.metrics else None

    def ready_set(self) -> frozenset[int]:
        if self.ready_ordinals is not None:
            return self.ready_ordinals
        return frozenset(range(self.ready_relays))


@dataclass(frozen=True)
class Outcome:
    """What to write: status, scaling state, shard map, Events, and when to look again."""

    status: AudioRoomStatus
    events: tuple[Event, ...]
    desired_relays: int
    """StatefulSet replicas: accepting relays plus draining ones not yet empty."""
    scaling_state: ScalingState
    shard_map: ShardMap
    decision: Decision | None
    """The scaling decision, when the phase asked for one."""
    wake_at: datetime | None
    """None: nothing will happen with time alone (the room has ended)."""
    replace_relays: tuple[int, ...] = ()
    """Relay pods to delete now: drained for a rollout, they come back with the new template."""
    released: bool = False
    """The room is being deleted and has drained: its children may go."""
    refused: bool = False
    """The room breaks the operator's tenant policy (or its spec cannot be used): nothing of
    its spec is applied. With `children`, a refused room that ran winds down: only its relay
    count and its shard map are applied, the relays' template stays the last accepted."""
    headroom: headroom.Headroom | None = None
    """Placeholders to create and delete."""
    children: bool = True
    """The room's StatefulSet, Service, shard map and budget exist or are due now. A room
    scheduled ahead with no relay gets none until its pre-warm: thousands of rooms booked
    days ahead cost the API server and the operator a status each, not five objects."""


def occurrence_start(spec: AudioRoomSpec, now: datetime, previous: AudioRoomStatus) -> datetime:
    """The start of the occurrence the room is in, or waits for.

    Without a schedule that is `startTime`. With one, it is the first cron time, not before
    `startTime`, whose drain is not over yet, skipping the occurrence the room last ended.
    An occurrence that has begun is kept until the room records it Ended, even past its
    drain deadline: every occurrence ends (relays gone, an Ended Event) before the next is
    armed afresh.
    """
    schedule = spec.schedule
    if schedule is None:
        return spec.start_time
    current = previous.plan.start_time if previous.plan else None
    if current is not None and previous.phase not in (None, "Ended") and current <= now:
        return current
    earliest = max(spec.start_time, now - spec.duration - spec.scaling.drain_timeout)
    finished = previous.plan.start_time if previous.plan and previous.phase == "Ended" else None
    if finished is not None and finished >= earliest:
        earliest = finished + timedelta(seconds=1)
    zone = ZoneInfo(schedule.time_zone)
    times = croniter(schedule.cron, (earliest - timedelta(seconds=1)).astimezone(zone))
    found: datetime = times.get_next(datetime)
    return found.astimezone(UTC)


def end_of(spec: AudioRoomSpec) -> datetime:
    """When the event is over and its relays start draining."""
    return spec.start_time + spec.duration


def drain_deadline(spec: AudioRoomSpec) -> datetime:
    """When draining relays are removed even if listeners remain."""
    return end_of(spec) + spec.scaling.drain_timeout


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Conditions with `kind` set; its lastTransitionTime moves only when the status flips."""
    previous = next((c for c in conditions if c.type == kind), None)
    since = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != kind] + [updated]


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")


@dataclass
class _Draft:
    """The status being assembled, and the Events that explain it."""

    conditions: list[Condition]
    seen: Observed
    events: list[Event] = field(default_factory=list)

    def condition(
        self, kind: str, status: ConditionStatus, reason: str, message: str
    ) -> ConditionStatus | None:
        """Set a condition; returns its status before (None when it is new)."""
        before = next((c.status for c in self.conditions if c.type == kind), None)
        self.conditions = set_condition(
            self.conditions, kind, status, reason, message, self.seen.now, self.seen.generation
        )
        return before

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append(Event(kind, reason, message))


def _moved_occurrence(spec: AudioRoomSpec, previous: AudioRoomStatus) -> bool:
    """The room's start is no longer that of the occurrence it last planned for."""
    planned = previous.plan.start_time if previous.plan else None
    return planned is not None and planned != spec.start_time


def _occurrence_draining(
    spec: AudioRoomSpec, previous: AudioRoomStatus, seen: Observed, draft: _Draft
) -> tuple[AudioRoomSpec, datetime | None]:
    """A draining room whose producer moved `startTime`: the spec to decide with, and when
    the new occurrence is due to take over (None: no such wait).

    The listeners still connected after the event belong to the occurrence that ended; the
    new start does not reopen it to joins. They keep their relays, closed to new joins,
    until they leave or the drain times out, as they would have; the room then ends and is
    armed for the new start at once. A new occurrence whose pre-warm comes first takes the
    room over then (`reconcile` re-arms it, keeping the relays and their listeners). A
    start moved into the past, with its end past too, only finishes the drain: an Ended
    room is armed only by a start still to come.
    """
    if previous.phase != "Draining" or not _moved_occurrence(spec, previous):
        return spec, None
    assert previous.plan is not None and previous.plan.start_time is not None
    prewarm = plan_room(spec, seen.now, startup_of(spec, seen)).prewarm_at
    if seen.deleting_since is None and prewarm <= seen.now < end_of(spec):
        return spec, None  # the new occurrence is due now: it takes the room over
    if _start_moved_now(spec, previous, seen) and seen.deleting_since is None:
        draft.event(
            NORMAL,
            "Replanned",
            f"startTime moved to {spec.start_time.isoformat()} while the last occurrence "
            "drains: its listeners keep their relays, closed to new joins, until they leave; "
            f"the room is armed for the new start once they have, or at its pre-warm "
            f"({prewarm.isoformat()})",
        )
    drained = spec.model_copy(update={"start_time": previous.plan.start_time})
    due = prewarm if seen.deleting_since is None and prewarm > seen.now else None
    return drained, due


def _start_moved_now(spec: AudioRoomSpec, previous: AudioRoomStatus, seen: Observed) -> bool:
    """This generation moved the start: the last accepted spec had another one (without
    that record, any new generation counts)."""
    last = accepted_spec(previous)
    if last is None:
        return previous.observed_generation != seen.generation
    return last.start_time != spec.start_time


def accepted_spec(status: AudioRoomStatus) -> AudioRoomSpec | None:
    """The last spec the operator accepted for the room; None when none is recorded (a
    room last decided by an older operator) or this release cannot read it."""
    if not status.accepted_spec:
        return None
    try:
        return AudioRoomSpec.model_validate_json(status.accepted_spec)
    except ValidationError:
        return None


def last_accepted(
    spec: AudioRoomSpec, previous: AudioRoomStatus, shard_map: ShardMap | None = None
) -> AudioRoomSpec:
    """What a refused room that ran winds down on: the last spec accepted.

    Without that record (a room refused by an older release, or on the first pass after an
    upgrade), as little of the refused spec as can be: the start the room last planned
    for, so a refused edit of `startTime` never holds its relays on to a new date; the
    capacity, shard count and migration budget of the live shard map, so a refused edit
    never reshapes the map its listeners are on; and a drainTimeout no shorter than the
    default, so a refused edit never cuts their drain short."""
    last = accepted_spec(previous)
    if last is not None:
        return last
    planned = previous.plan.start_time if previous.plan else None
    if planned is not None:
        spec = spec.model_copy(update={"start_time": planned})
    drain = max(spec.scaling.drain_timeout, ScalingSpec().drain_timeout)
    scaling = spec.scaling.model_copy(update={"drain_timeout": drain})
    relay, sharding = spec.relay, spec.sharding
    if shard_map is not None:
        relay = relay.model_copy(update={"listeners_per_relay": shard_map.capacity})
        kept: dict[str, int] = {"shards": shard_map.shards}
        if shard_map.migrations_per_minute is not None:
            kept["max_migrations_per_minute"] = shard_map.migrations_per_minute
        sharding = sharding.model_copy(update=kept)
    return spec.model_copy(update={"scaling": scaling, "relay": relay, "sharding": sharding})


def _recorded(spec: AudioRoomSpec) -> str:
    """The spec as kept in the status: what the producer wrote, defaults left out."""
    written = spec.model_dump(by_alias=True, mode="json", exclude_defaults=True)
    return json.dumps(written, separators=(",", ":"), sort_keys=True)


def _phase_by_clock(spec: AudioRoomSpec, plan: PlanStatus, now: datetime) -> Phase:
    if now >= end_of(spec):
        return "Draining"
    if now >= spec.start_time:
        return "Live"
    if now >= plan.prewarm_at:
        return "PreWarming"
    return "Scheduled"


def _plan_status(spec: AudioRoomSpec, plan: Plan) -> PlanStatus:
    return PlanStatus(
        start_time=spec.start_time,
        expected_audience=spec.expected_audience,
        relays=plan.relays,
        capacity=plan.capacity,
        prewarm_at=plan.prewarm_at,
        ready_by=plan.ready_by,
    )


def _replan(
    spec: AudioRoomSpec, previous: AudioRoomStatus, draft: _Draft, rearmed: bool
) -> tuple[Plan, PlanStatus]:
    """The plan for this generation and occurrence; its status form is kept while both are
    unchanged (a plan stored before occurrences were recorded counts as this one's)."""
    seen = draft.seen
    plan = plan_room(spec, seen.now, startup_of(spec, seen))
    old = previous.plan
    same_occurrence = old is not None and old.start_time in (None, spec.start_time)
    if old is not None and same_occurrence and previous.observed_generation == seen.generation:
        return plan, old.model_copy(update={"start_time": spec.start_time})
    fresh = _plan_status(spec, plan)
    if rearmed or (old is not None and not same_occurrence):
        draft.event(
            NORMAL,
            "Replanned",
            f"re-armed for the occurrence starting {spec.start_time.isoformat()}: "
            f"{fresh.relays:,} relays, pre-warm at {_clock(fresh.prewarm_at)}",
        )
    elif old is not None and (old.relays, old.prewarm_at) != (fresh.relays, fresh.prewarm_at):
        draft.event(
            NORMAL,
            "Replanned",
            f"expected audience {old.expected_audience:,} -> {spec.expected_audience:,}: "
            f"{old.relays:,} -> {fresh.relays:,} relays, pre-warm at {_clock(fresh.prewarm_at)}",
        )
    if spec.expected_audience > plan.capacity:
        draft.event(
            WARNING,
            "AudienceBeyondMaxRelays",
            f"expected audience {spec.expected_audience:,} exceeds the {plan.capacity:,} "
            f"listeners that maxRelays ({spec.scaling.max_relays:,}) carries; excess joins "
            "wait in the admission queue",
        )
    if seen.now >= spec.start_time and (old is None or rearmed or not same_occurrence):
        draft.event(
            WARNING,
            "StartTimePassed",
            f"startTime {spec.start_time.isoformat()} is already past "
            f"({format_duration(seen.now - spec.start_time)} ago); starting "
            f"{plan.relays:,} relays at once",
        )
    return plan, fresh


def reconcile(
    room: str,
    spec: AudioRoomSpec,
    previous: AudioRoomStatus,
    seen: Observed,
    scaling_state: ScalingState | None = None,
    shard_map: ShardMap | None = None,
    shard_map_at: datetime | None = None,
    policy: TenantPolicy | None = None,
    spec_problems: Sequence[str] = (),
) -> Outcome:
    """Decide the room's phase, relays, shard map, conditions and Events at `seen.now`.

    `scaling_state` and `shard_map` are what the previous call returned (after a restart:
    what was stored); `shard_map_at` is when that map was published (the write returned),
    for the migration budget and the end drain's settling. With a `policy`, a room that
    breaks it is refused: nothing is decided for it; so is a room with `spec_problems`
    (parts of its spec the operator cannot use). A deleted room is drained either way, a
    refused one as a refused room that ran winds down (`Outcome.refused`): its relay
    count and map only, never its refused template (it runs on the last accepted spec).
    """
    draft = _Draft(conditions=list(previous.conditions), seen=seen)
    problems = list(spec_problems)
    if policy is not None:
        problems += violations(spec, seen.namespace, policy)
    written = spec
    if problems and (seen.deleting_since is not None or _ran(previous)):
        # Nothing of a refused spec is used: its relays wind down on the last one accepted
        # (its start, end and drain timeout; its map's capacity and shards).
        spec = last_accepted(spec, previous, shard_map)
    start = occurrence_start(spec, seen.now, previous)
    if start != spec.start_time:
        spec = spec.model_copy(update={"start_time": start})
    refused_at: datetime | None = None
    if problems:
        refusal = _Refusal(problems, "InvalidSpec" if spec_problems else None)
        deleting = seen.deleting_since is not None
        if not deleting and not _ran(previous):
            return _refuse(previous, refusal, draft)
        if (
            not deleting
            and previous.phase in ("PreWarming", "Ready", "Live")
            and seen.now < end_of(spec)
        ):
            # The event runs, or its audience is arriving (pre-warmed relays, the map open
            # to joins): its listeners keep their relays until it ends.
            return _refuse(previous, refusal, draft, hold_until=end_of(spec))
        refused_at = _say_refused(previous, refusal, draft)
    elif policy is not None:
        draft.condition("Accepted", "True", "WithinPolicy", "the room is within the tenant policy")
    was: Phase | None = previous.phase
    spec, upcoming = _occurrence_draining(spec, previous, seen, draft)
    cut_short = was == "Draining" and upcoming is None and _moved_occurrence(spec, previous)
    rearmed = (
        (was == "Ended" or cut_short)
        and seen.deleting_since is None
        and refused_at is None
        and seen.now < end_of(spec)
    )
    if rearmed:
        was = None
        draft.conditions = [c for c in draft.conditions if c.type != "PreWarmed"]
    plan, plan_status = _replan(spec, previous, draft, rearmed)
    running = previous.relays.desired if previous.relays else 0
    stored = None if rearmed else scaling_state or stored_scaling_state(previous)
    state = _dated_move(stored or ScalingState.initial(running), shard_map_at)
    current_map = _fit_map(
        replace(
            shard_map or new_map(spec.sharding.shards, spec.relay.listeners_per_relay),
            migrations_per_minute=spec.sharding.max_migrations_per_minute,
        ),
        spec,
        was,
        draft,
    )
    by_clock = _phase_by_clock(spec, plan_status, seen.now)

    phase: Phase
    decision: Decision | None = None
    step: RolloutStep | None = None
    consolidation: Consolidation | None = None
    wake_at: datetime | None
    if was == "Ended" and not rearmed:
        phase, replicas, accepting = "Ended", 0, 0
        wake_at = seen.now + timedelta(seconds=1) if spec.schedule else None
    elif (
        by_clock == "Draining"
        or seen.deleting_since is not None
        or upcoming is not None
        or refused_at is not None
    ):
        stopped = refused_at if by_clock != "Draining" else None
        began, deadline, why = _drain_window(spec, was, by_clock, seen, stopped)
        receiving = frozenset(o for o, s in current_map.relays.items() if s == "active")
        kept = _drain(spec, was, running, seen, draft, (began, deadline, why), receiving, state)
        phase, replicas, accepting = kept.phase, kept.replicas, 0
        state = replace(state, empty_sampled_at=kept.empty_sampled_at)
        if phase == "Draining":
            consolidation = consolidate(
                current_map,
                candidates=[o for o in seen.ready_set() if o < replicas],
                listeners=_listeners_since(seen, began),
                relay_listeners=seen.metrics.by_relay if seen.metrics else {},
                budget=_migration_budget(spec, seen.now, shard_map_at),
                per_minute=spec.sharding.max_migrations_per_minute,
            )
            _announce_consolidation(current_map, consolidation, spec, draft)
        wake_at = _after(deadline, seen.now)
        if kept.unsure:
            wake_at = min(wake_at, seen.now + DRAIN_RECHECK)
        if phase == "Ended" and (spec.schedule or upcoming) and seen.deleting_since is None:
            wake_at = seen.now + timedelta(seconds=1)  # to arm the next occurrence
        elif upcoming is not None:
            wake_at = min(wake_at, max(upcoming, seen.now + timedelta(seconds=1)))
    else:
        decision = decide(
            spec,
            # One plan per pass: the one the phase and the wake-up time were derived from.
            replace(plan, relays=plan_status.relays, prewarm_at=plan_status.prewarm_at),
            _observation(seen, running),
            state,
            seen.now,
            startup_seconds=startup_of(spec, seen),
        )
        state = decision.state
        replicas, accepting = decision.replicas, decision.relays
        phase = by_clock
        if by_clock == "PreWarming" and seen.ready_relays >= plan_status.relays:
            phase = "Ready"
        _announce_warmup(spec, plan_status, was, phase, draft)
        _announce_scaling(decision, was, phase, draft)
        step = _roll(spec, previous, seen, accepting, decision, draft)
        state = _with_surge(state, previous, step, accepting, seen.now)
        replicas = max(state.replicas, accepting + len(step.surge if step else ()))
        accepting += len(step.surge) if step else 0
        wake_at = _next_deadline(spec, plan_status, phase, seen.now)
        if step is not None and step.draining:
            timeout = spec.scaling.drain_timeout
            wake_at = min([wake_at or seen.now] + [t + timeout for _, t in step.draining])

    # Relays replaced in this pass are still Ready as seen, but their pods go now: no joins.
    rolling = {o for o, _ in step.draining} | set(step.replace) if step else set()
    ready = seen.ready_set()
    nodes = _node_headroom(room, spec, previous, plan_status, phase, draft)
    closed = phase in ("Draining", "Ended")
    held = _held(current_map, seen, replicas)
    if closed:  # past the end: the lowest relays take the last listeners, the rest drain
        receivers = consolidation.receivers if consolidation else ()
        draining = list(consolidation.draining) if consolidation else []
        held = sorted({*held, *(consolidation.waiting if consolidation else ())})
    else:
        receivers = tuple(sorted(o for o in ready if o < accepting and o not in rolling))
        draining = drain_order(ready, receivers, replicas, rolling)
    by_relay = _relay_listeners(seen)
    weights = None if by_relay is None else shard_listeners_from_relays(current_map, by_relay)
    # Past the end the consolidation seats the last listeners (its receivers are called back
    # when they could not carry them), so no full relay sheds for them: each such move set
    # the drain's settling clock back, and relays went 20-33 s after they emptied (e2e).
    in_transit = None if by_relay is None or closed else in_transit_by_shard(current_map, by_relay)
    rebalanced = rebalance(
        current_map,
        active=receivers,
        draining=draining,
        held=held,
        shard_listeners=weights,
        demand=None if closed else _admission_demand(seen, decision),
        fanout=spec.sharding.fanout,
        budget=_migration_budget(spec, seen.now, shard_map_at),
        closed=closed,
        in_transit=in_transit,
    )
    before = shard_map or current_map
    state = _track_relay_moves(state, before, rebalanced.map, max(running, replicas), closed)
    if relays_changed(before, rebalanced.map):
        # Listeners may be between relays a while: an empty reading before now proves nothing
        # (cleared here, not by comparing this pass time with a sample's, on another clock).
        state = replace(state, moved_at=seen.now, empty_sampled_at=None, moved_unpublished=True)
    if not closed:  # past the end, joins are closed: nothing to say
        _announce_shard_map(current_map, rebalanced.map, rebalanced.moved, rebalanced.reason, draft)
    _metrics_condition(seen, decision, draft)
    _capacity_condition(spec, plan, decision, draft)
    _blocked_condition(seen, replicas, draft)
    draft.condition(
        "Ready",
        "True" if seen.ready_relays >= replicas else "False",
        "RelaysReady" if seen.ready_relays >= replicas else "RelaysStarting",
        f"{seen.ready_relays:,}/{replicas:,} relays ready",
    )
    if seen.existing_relays is not None and seen.existing_relays < replicas:
        recheck = seen.now + MISSING_RELAYS_RECHECK  # nothing else may wake a blocked room
        wake_at = recheck if wake_at is None else min(wake_at, recheck)
    metrics = seen.metrics
    serving = accepting - len(rolling)
    children = has_children(previous) or (
        seen.deleting_since is None and (phase not in ("Scheduled", "Ended") or replicas > 0)
    )
    status = AudioRoomStatus(
        phase=phase,
        observed_generation=seen.generation,
        plan=plan_status,
        relays=RelayStatus(
            desired=replicas,
            ready=seen.ready_relays,
            draining=replicas - serving,
            summary=f"{seen.ready_relays}/{replicas}",
        ),
        listeners=ListenerStatus(
            current=(metrics.listeners or 0) if metrics else 0,
            forecast=(decision.forecast or 0) if decision else 0,
            capacity=capacity_of(serving, spec),
            waiting=metrics.waiting if metrics else 0,
        ),
        shard_map=ShardMapRef(config_map=shard_map_name(room), generation=rebalanced.map.generation)
        if children
        else None,
        rollout=_rollout_status(seen, replicas, step, previous.rollout),
        node_headroom=_headroom_status(nodes),
        scaling_state=_persisted(state),
        accepted_spec=previous.accepted_spec if refused_at is not None else _recorded(written),
        conditions=draft.conditions,
    )
    return Outcome(
        status=status,
        events=tuple(draft.events),
        desired_relays=replicas,
        scaling_state=state,
        shard_map=rebalanced.map,
        decision=decision,
        wake_at=min((t for t in (wake_at, nodes.wake_at) if t), default=None),
        replace_relays=step.replace if step else (),
        released=seen.deleting_since is not None and phase == "Ended",
        refused=refused_at is not None,
        headroom=nodes,
        children=children,
    )


def has_children(status: AudioRoomStatus) -> bool:
    """Whether a pass may have applied the room's children: its status names the shard map
    from the first pass that applies them (the status is written before the children)."""
    return status.shard_map is not None


def children_worth_reading(status: AudioRoomStatus) -> bool:
    """Whether a pass should read the room's shard map and StatefulSet: a room booked ahead
    that never had children has nothing to read (most rooms, at 10,000 rooms)."""
    return has_children(status) or status.phase not in (None, "Scheduled")


def _node_headroom(
    room: str,
    spec: AudioRoomSpec,
    previous: AudioRoomStatus,
    plan: PlanStatus,
    phase: Phase,
    draft: _Draft,
) -> headroom.Headroom:
    """Placeholders for nodes ahead of the plan, with their condition and Events."""
    seen = draft.seen
    kept = previous.node_headroom.longest_node_wait_seconds if previous.node_headroom else None
    decision = headroom.decide(
        room,
        spec.node_headroom,
        plan,
        phase,
        seen.relays or headroom.Relays(existing=seen.ready_relays, scheduled=seen.ready_relays),
        seen.placeholders,
        next((c for c in draft.conditions if c.type == headroom.CONDITION), None),
        seen.now,
        waits=(() if kept is None else (kept,)) + seen.node_waits,
        deleting=seen.deleting_since is not None,
    )
    if decision.condition is not None:
        update = decision.condition
        draft.condition(headroom.CONDITION, update.status, update.reason, update.message)
    for kind, reason, message in decision.events:
        draft.event(kind, reason, message)
    return decision


def _headroom_status(decision: headroom.Headroom) -> NodeHeadroomStatus | None:
    if decision.request_at is None:
        return None
    return NodeHeadroomStatus(
        placeholders=decision.wanted,
        lead_time=decision.lead,
        request_at=decision.request_at,
        longest_node_wait_seconds=decision.longest_wait,
    )


@dataclass(frozen=True)
class _Refusal:
    """Why the operator does not act on a room: the problems, and the condition's reason."""

    problems: list[str]
    reason: str | None = None

    @property
    def message(self) -> str:
        return "; ".join(self.problems)


def _ran(previous: AudioRoomStatus) -> bool:
    """The room has relays (or had them this occurrence): refusing it must not strand them."""
    running = previous.relays.desired if previous.relays else 0
    return previous.phase not in (None, "Ended") and (running > 0 or previous.phase == "Draining")


def _say_refused(
    previous: AudioRoomStatus, refusal: _Refusal, draft: _Draft, then: str = ""
) -> datetime:
    """Accepted False, and a Warning once (again on each new spec); returns since when."""
    before = draft.condition(
        "Accepted", "False", refusal.reason or "PolicyViolation", refusal.message
    )
    if before != "False" or previous.observed_generation != draft.seen.generation:
        running = previous.relays.desired if previous.relays else 0
        if not then and _ran(previous):
            then = (
                f"; its {running:,} relays take no new joins and go as their listeners leave "
                "(the new spec is not applied)"
            )
        draft.event(
            WARNING, "Refused", f"the operator does not act on this room: {refusal.message}{then}"
        )
    found = next(c for c in draft.conditions if c.type == "Accepted")
    return found.last_transition_time


def _refuse(
    previous: AudioRoomStatus,
    refusal: _Refusal,
    draft: _Draft,
    hold_until: datetime | None = None,
) -> Outcome:
    """A room outside the tenant policy, or with a spec the operator cannot use: say why,
    change nothing else, decide nothing.

    A room refused once its pre-warm began (PreWarming, Ready or Live, until its end:
    `hold_until`) keeps what it has: its relays serve the listeners connected on the last
    accepted spec, neither grown nor shrunk, and the map stays as published; dropping an
    audience for a spec edit, or a policy tightened meanwhile, would punish the listeners
    for the producer's or platform's change. That holds before the startTime too: pre-warm
    is when the audience arrives (the map is open to joins from then on) and the event is
    only prewarmLead away, so letting the relays go would cancel it. At the end the room
    drains as any other (`reconcile`); a room refused still Scheduled (its relays idle at
    minRelays, days ahead perhaps), or after its end, lets its relays go then and there.
    """
    then = ""
    if hold_until is not None:
        running = previous.relays.desired if previous.relays else 0
        then = (
            f"; its {running:,} relays keep serving the listeners connected, on the last "
            f"accepted spec, until the event ends at {_clock(hold_until)}, then drain"
        )
    _say_refused(previous, refusal, draft, then)
    nodes = headroom.remove_all(draft.seen.placeholders)
    if nodes.delete:
        draft.condition(
            headroom.CONDITION,
            "False",
            "Refused",
            f"{len(nodes.delete):,} placeholder pods removed: the operator does not act on "
            "this room, so no relay comes to take their nodes",
        )
    status = previous.model_copy(
        update={"observed_generation": draft.seen.generation, "conditions": draft.conditions}
    )
    running = previous.relays.desired if previous.relays else 0
    state = stored_scaling_state(previous) or ScalingState.initial(running)
    return Outcome(
        status=status,
        events=tuple(draft.events),
        desired_relays=running,
        scaling_state=state,
        shard_map=new_map(1, 1),
        decision=None,
        wake_at=hold_until,
        refused=True,
        headroom=nodes,
        children=False,
    )


def _fit_map(current: ShardMap, spec: AudioRoomSpec, was: Phase | None, draft: _Draft) -> ShardMap:
    """The live map with the spec's relay capacity and shard count.

    A new shard count keeps each relay's share and moves as few listeners as the hash allows
    (`resize`): none for a multiple of the old count, none for a divisor whose merging
    shards shared a relay (as after a doubling); the relays send any moved listeners to the
    edge at the migration budget.
    """
    capacity, shards = spec.relay.listeners_per_relay, spec.sharding.shards
    if (current.capacity, current.shards) == (capacity, shards):
        return current
    old = current.shards
    assignment = resize(current.assignment, shards)
    if current.generation > 0:  # a published map changes under the edge: say so
        changes = []
        if current.capacity != capacity:
            changes.append(f"capacity {current.capacity:,} -> {capacity:,} listeners per relay")
        if old != shards:
            share = moved_share(current.assignment, assignment)
            moving = f"{share:.0%} of listeners change relay"
            if share:
                budget = spec.sharding.max_migrations_per_minute
                moving += f", sent to the edge at up to {budget:,} a minute"
            changes.append(f"shards {old:,} -> {shards:,}: {moving}")
        draft.event(NORMAL, "ShardMapChanged", "; ".join(changes))
    return replace(
        current,
        generation=current.generation + 1,
        assignment=assignment,
        capacity=capacity,
        former_shards=current.former_shards if old == shards else {},  # other shards now
    )


def _roll(
    spec: AudioRoomSpec,
    previous: AudioRoomStatus,
    seen: Observed,
    accepting: int,
    decision: Decision,
    draft: _Draft,
) -> RolloutStep | None:
    """The rollout's step for a running room, with its Events; None when nothing is outdated."""
    before = {d.ordinal: d.since for d in previous.rollout.draining} if previous.rollout else {}
    held = _surge_of(previous)
    if not seen.outdated_ordinals and not before and not held:
        _held_condition(spec, None, accepting, None, draft)
        return None
    metrics = seen.metrics
    known = metrics is not None and metrics.listeners is not None
    demand = _rollout_demand(spec, seen, decision)
    step = plan_rollout(
        accepting=accepting,
        ready=seen.ready_set(),
        outdated=seen.outdated_ordinals,
        draining=before,
        relay_listeners=metrics.by_relay if metrics is not None and known else None,
        sampled_at=metrics.sampled_at if metrics is not None else None,
        demand=demand,
        capacity=spec.relay.listeners_per_relay,
        max_surge=spec.rollout.max_surge,
        now=seen.now,
        drain_timeout=spec.scaling.drain_timeout,
        surge=sum(1 for o in held if o >= accepting),
        max_relays=spec.scaling.max_relays,
    )
    outdated = len(seen.outdated_ordinals)
    _held_condition(spec, step, accepting, demand, draft)
    added = [o for o in step.surge if o not in held]
    if added:
        draft.event(
            NORMAL,
            "RolloutSurge",
            f"adding relays {_ordinals(tuple(added))} for the rollout: {accepting:,} relays "
            f"have no spare capacity for {demand or 0:,.0f} listeners while some drain",
        )
    ended = [o for o in held if o >= accepting and o not in step.surge]
    if ended:
        draft.event(
            NORMAL,
            "RolloutSurgeDone",
            f"rollout over: draining the extra relays {_ordinals(tuple(ended))}",
        )
    if step.started:
        draft.event(
            NORMAL,
            "RollingOut",
            f"draining relays {_ordinals(step.started)} before replacing them with the new "
            f"template ({outdated:,} outdated; at most {spec.rollout.max_surge:,} at once)",
        )
    if step.replace:
        draft.event(
            NORMAL,
            "RelaysReplaced",
            f"relays {_ordinals(step.replace)} drained; replacing them with the new template",
        )
    if step.timed_out:
        draft.event(
            WARNING,
            "DrainTimedOut",
            f"relays {_ordinals(step.timed_out)} still carried listeners "
            f"{format_duration(spec.scaling.drain_timeout)} after their rollout drain began; "
            "replacing them anyway",
        )
    return step


def _held_condition(
    spec: AudioRoomSpec,
    step: RolloutStep | None,
    accepting: int,
    demand: float | None,
    draft: _Draft,
) -> None:
    """RolloutHeld: outdated relays wait because the room has no relay to spare and may add
    none. The operator cannot fix that itself, so it says so once, with the numbers."""
    if step is not None and step.held_by_capacity:
        message = (
            f"{len(draft.seen.outdated_ordinals):,} outdated relays wait: the {accepting:,} "
            f"relays serving are needed for {demand or 0:,.0f} listeners (at "
            f"{ROLLOUT_FILL:.0%} of {spec.relay.listeners_per_relay:,} each) and maxRelays "
            f"({spec.scaling.max_relays:,}) leaves no room for an extra relay; raise maxRelays "
            "or the rollout goes on when the audience falls"
        )
        if draft.condition("RolloutHeld", "True", "NoSpareCapacity", message) != "True":
            draft.event(WARNING, "RolloutHeld", message)
    elif any(c.type == "RolloutHeld" and c.status == "True" for c in draft.conditions):
        draft.condition("RolloutHeld", "False", "RollingOut", "the rollout is not held")


def _rollout_demand(spec: AudioRoomSpec, seen: Observed, decision: Decision) -> float | None:
    """Listeners the relays left serving must carry while others drain: those read (or
    forecast), and no fewer than the scaling policy still keeps relays for, by the plan floor
    or within its scale-down window. A rollout drain is a brief scale-down: one low reading
    must not open it. Without Prometheus the declared audience stands for the reading (each
    drain then takes its timeout, as no count will show it empty)."""
    read = decision.forecast if decision.forecast is not None else _demand(seen)
    if seen.metrics is None:
        read = spec.expected_audience
    if read is None:
        return None
    kept = max([decision.floor, *(relays for _, relays in decision.state.targets)])
    per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
    return max(float(read), kept * per_relay)


def _surge_of(previous: AudioRoomStatus) -> tuple[int, ...]:
    return tuple(previous.rollout.surge) if previous.rollout else ()


def _with_surge(
    state: ScalingState,
    previous: AudioRoomStatus,
    step: RolloutStep | None,
    accepting: int,
    now: datetime,
) -> ScalingState:
    """The scaling state around the rollout's extra relays: one held again stops draining
    (a draining relay is the cheapest extra one); one no longer held drains like any relay
    above the accepting ones, and the scaling policy removes it once empty."""
    held = set(step.surge) if step else set()
    since = {o: t for o, t in state.draining if o not in held}
    for ordinal in _surge_of(previous):
        if ordinal >= accepting and ordinal not in held:
            since.setdefault(ordinal, now)
    return replace(state, draining=tuple(sorted(since.items())))


def _ordinals(ordinals: tuple[int, ...]) -> str:
    return ", ".join(str(o) for o in ordinals)


def _rollout_status(
    seen: Observed, replicas: int, step: RolloutStep | None, before: RolloutStatus | None
) -> RolloutStatus | None:
    if not seen.revision:
        return before
    return RolloutStatus(
        revision=seen.revision,
        updated=max(0, (seen.existing_relays or 0) - len(seen.outdated_ordinals)),
        outdated=sum(1 for o in seen.outdated_ordinals if o < replicas),
        draining=[RolloutDrain(ordinal=o, since=t) for o, t in (step.draining if step else ())],
        surge=list(step.surge) if step else [],
    )


def _blocked_condition(seen: Observed, replicas: int, draft: _Draft) -> None:
    """RelaysBlocked: the API server refuses relay pods (quota, Pod Security, a webhook)."""
    missing = seen.existing_relays is not None and seen.existing_relays < replicas
    recent = sorted(f for f in seen.pod_failures if seen.now - f[0] <= BLOCKED_WINDOW)
    if missing and recent:
        reason = recent[-1][1]
        message = f"{replicas - (seen.existing_relays or 0):,} relay pods not created: {reason}"
        before = draft.condition("RelaysBlocked", "True", "FailedCreate", message)
        if before != "True":
            draft.event(WARNING, "RelaysBlocked", message)
    elif any(c.type == "RelaysBlocked" for c in draft.conditions):
        draft.condition("RelaysBlocked", "False", "RelaysCreated", "every relay pod was created")


def startup_of(spec: AudioRoomSpec, seen: Observed) -> float:
    """Relay start-up to plan with: measured times, with the spec's hint as a prior."""
    newest = sorted(seen.startups)[-STARTUP_SAMPLES:]
    return startup_estimate(spec.relay.startup_seconds, tuple(seconds for _, seconds in newest))


def _observation(seen: Observed, running: int) -> Observation:
    """What the scaling policy sees. A room with no relay at all has no listener series, yet
    its connected listeners are known: none. Joins waiting at the edge then grow it from zero
    (minRelays 0); without them it stays at zero, as it would when blind."""
    metrics = seen.metrics
    no_relays = running == 0 and seen.ready_relays == 0
    if metrics is not None and metrics.listeners is None and metrics.waiting > 0 and no_relays:
        return Observation(listeners=0, waiting=metrics.waiting, sampled_at=metrics.sampled_at)
    if metrics is None or metrics.listeners is None:
        return Observation(listeners=None)
    return Observation(
        listeners=metrics.listeners,
        waiting=metrics.waiting,
        sampled_at=metrics.sampled_at,
        relay_listeners=dict(metrics.by_relay),
    )


def _relay_listeners(seen: Observed) -> dict[int, float] | None:
    """Listeners counted on each relay; None without a reading."""
    if seen.metrics is None or seen.metrics.listeners is None:
        return None
    return {relay: float(n) for relay, n in seen.metrics.by_relay.items()}


def _held(current: ShardMap, seen: Observed, replicas: int) -> list[int]:
    """Relays not Ready that still report listeners: a readiness blip, not a loss. Their
    shards stay until their own counts say the listeners have gone."""
    if seen.metrics is None:
        return []
    ready = seen.ready_set()
    return sorted(
        relay
        for relay, listeners in seen.metrics.by_relay.items()
        if relay in current.relays and relay not in ready and relay < replicas and listeners > 0
    )


def _demand(seen: Observed) -> float | None:
    metrics = seen.metrics
    if metrics is None or metrics.listeners is None:
        return None
    return float(metrics.listeners + metrics.waiting)


def _admission_demand(seen: Observed, decision: Decision | None) -> float | None:
    """Listeners the relays must carry: those read, or the forecast if higher, so the queue
    is on before a join storm reaches the relays, not a scrape and a publication after."""
    demand = _demand(seen)
    if demand is None:
        return None
    return max(demand, float(decision.forecast or 0) if decision else 0.0)


def _migration_budget(spec: AudioRoomSpec, now: datetime, since: datetime | None) -> float:
    """Listeners that may reconnect elsewhere now: the per-minute cap over the time passed."""
    if since is None:
        return float(spec.sharding.max_migrations_per_minute)
    minutes = max(0.0, (now - since).total_seconds()) / 60
    return spec.sharding.max_migrations_per_minute * min(minutes, 1.0)


def _announce_warmup(
    spec: AudioRoomSpec,
    plan: PlanStatus,
    was: Phase | None,
    phase: Phase,
    draft: _Draft,
) -> None:
    """Events and the PreWarmed condition for the way from Scheduled to Live."""
    ready, planned = draft.seen.ready_relays, plan.relays
    if was in (None, "Scheduled") and phase in ("PreWarming", "Ready", "Live"):
        draft.event(
            NORMAL,
            "PreWarmStarted",
            f"{planned:,} relays for {spec.expected_audience:,} expected listeners, ready by "
            f"{_clock(plan.ready_by)}",
        )
    if phase == "Ready" and was != "Ready":
        before = format_duration(spec.start_time - draft.seen.now)
        draft.event(
            NORMAL, "PreWarmed", f"{ready:,}/{planned:,} relays ready {before} before start"
        )
        draft.condition("PreWarmed", "True", "AllRelaysReady", f"{ready:,}/{planned:,} ready")
    elif phase == "Live" and was != "Live":
        if was != "Ready" and ready < planned:
            message = f"{ready:,}/{planned:,} relays ready at the start" + _pending(draft.seen)
            draft.event(WARNING, "PreWarmIncomplete", message)
            draft.condition("PreWarmed", "False", "PreWarmIncomplete", message)
        elif was != "Ready":
            draft.condition("PreWarmed", "True", "AllRelaysReady", f"{ready:,} ready")
        draft.event(NORMAL, "Live", f"the event started with {ready:,}/{planned:,} relays ready")
    elif phase == "PreWarming" and not any(c.type == "PreWarmed" for c in draft.conditions):
        draft.condition("PreWarmed", "False", "PreWarming", f"{ready:,}/{planned:,} relays ready")


PENDING_NAMED = 5
"""Pending relays named in an Event; the rest are counted."""


def _pending(seen: Observed) -> str:
    """Which relays wait for a node, and the scheduler's reason, grouped by reason."""
    if not seen.pending_relays:
        return ""
    by_reason: dict[str, list[str]] = {}
    for pod, reason in seen.pending_relays:
        by_reason.setdefault(reason or "not scheduled yet", []).append(pod)
    parts = []
    for reason, pods in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        named = ", ".join(pods[:PENDING_NAMED])
        more = f" and {len(pods) - PENDING_NAMED:,} more" if len(pods) > PENDING_NAMED else ""
        parts.append(f"{len(pods):,} Pending ({named}{more}): {reason}")
    return "; " + "; ".join(parts)


def _announce_scaling(decision: Decision, was: Phase | None, phase: Phase, draft: _Draft) -> None:
    """ScaledUp/ScaledDown with the numbers, except the pre-warm itself (it has its Event).

    A scale-down is announced when relays stop accepting joins, not when they leave: they
    leave later, once drained.
    """
    first_pass = was is None
    prewarm = was == "Scheduled" and phase != "Scheduled"
    if not (first_pass or prewarm):
        if decision.direction == "up":
            draft.event(NORMAL, "ScaledUp", decision.reason)
        elif decision.direction == "down":
            draft.event(NORMAL, "ScaledDown", decision.reason)
    if decision.drain_timed_out:
        draft.event(WARNING, "DrainTimedOut", decision.reason)


def _announce_shard_map(
    before: ShardMap, after: ShardMap, moved: int, reason: str, draft: _Draft
) -> None:
    if moved and before.relays:
        draft.event(NORMAL, "Resharded", reason)
    if after.admission != before.admission:
        if after.admission == "queueing":
            draft.event(
                WARNING,
                "AdmissionQueueOn",
                "demand exceeds what the relays carry; new joins wait in the admission queue",
            )
        elif before.relays:
            draft.event(NORMAL, "AdmissionQueueOff", "relays carry the demand; joins flow again")


def _metrics_condition(seen: Observed, decision: Decision | None, draft: _Draft) -> None:
    metrics = seen.metrics
    if metrics is None:
        draft.condition("MetricsAvailable", "Unknown", "NotConfigured", "no Prometheus configured")
    elif metrics.listeners is None and seen.ready_relays == 0:
        # No relay runs yet, so no relay reports: nothing is missing.
        draft.condition("MetricsAvailable", "Unknown", "NoRelaysReady", "no relay is Ready yet")
    elif metrics.listeners is None:
        # Worded by the drain as a whole, not by this pass's step: the message changes only
        # when what the operator does blind changes.
        towards = decision.towards_limit if decision is not None else None
        holding = "holding the current relays (never scaling down without data)"
        if towards is not None and towards.held:
            holding = towards.reason
        elif towards is not None:
            holding = (
                "draining only towards a lowered maxRelays, where every listener of a "
                "drained relay can move before drainTimeout"
            )
        message = f"{metrics.problem or 'no listener data'}; {holding}"
        before = next((c for c in draft.conditions if c.type == "MetricsAvailable"), None)
        if draft.condition("MetricsAvailable", "False", "MetricsUnavailable", message) != "False":
            draft.event(WARNING, "MetricsUnavailable", message)
        elif towards is not None and towards.held and (before is None or before.message != message):
            draft.event(WARNING, "MaxRelaysHeld", holding)
    else:
        message = f"{metrics.listeners:,} listeners observed"
        if draft.condition("MetricsAvailable", "True", "ListenersObserved", message) == "False":
            draft.event(NORMAL, "MetricsRecovered", f"listener counts are back: {message}")


def _capacity_condition(
    spec: AudioRoomSpec, plan: Plan, decision: Decision | None, draft: _Draft
) -> None:
    planned_beyond = spec.expected_audience > plan.capacity
    demand_beyond = decision is not None and decision.capacity_exceeded
    if demand_beyond:
        assert decision is not None
        before = draft.condition(
            "CapacityExceeded", "True", "DemandBeyondMaxRelays", decision.reason
        )
        if before != "True":
            draft.event(WARNING, "CapacityExceeded", decision.reason)
    elif planned_beyond:
        draft.condition(
            "CapacityExceeded",
            "True",
            "AudienceBeyondMaxRelays",
            f"expected audience {spec.expected_audience:,} exceeds the {plan.capacity:,} "
            f"listeners that maxRelays ({spec.scaling.max_relays:,}) carries; excess joins "
            "wait in the admission queue",
        )
    else:
        draft.condition("CapacityExceeded", "False", "WithinCapacity", "relays carry the demand")


def _drain_window(
    spec: AudioRoomSpec,
    was: Phase | None,
    by_clock: Phase,
    seen: Observed,
    refused_at: datetime | None = None,
) -> tuple[datetime, datetime, str]:
    """When the drain began, its deadline, and why: the event's end, the room's deletion,
    or (before its event) its refusal."""
    timeout = spec.scaling.drain_timeout
    stopped, how = (
        (seen.deleting_since, "deleted") if seen.deleting_since else (refused_at, "refused")
    )
    if stopped is None or (by_clock == "Draining" and stopped >= end_of(spec)):
        return end_of(spec), drain_deadline(spec), f"the event ended at {_clock(end_of(spec))}"
    if was == "Draining" and by_clock == "Draining":
        return end_of(spec), min(drain_deadline(spec), stopped + timeout), "the event ended"
    return stopped, stopped + timeout, f"the room was {how} at {_clock(stopped)}"


@dataclass(frozen=True)
class _Kept:
    """What the end drain keeps after one pass, and what it learnt for the next."""

    phase: Phase
    replicas: int
    empty_sampled_at: datetime | None
    """See `ScalingState.empty_sampled_at`."""
    unsure: bool
    """Relays were kept only because the reading could not yet show them empty: look again
    soon, as a new sample with the same figures wakes no pass."""


def _drain(
    spec: AudioRoomSpec,
    was: Phase | None,
    running: int,
    seen: Observed,
    draft: _Draft,
    window: tuple[datetime, datetime, str],
    receiving: frozenset[int],
    state: ScalingState,
) -> _Kept:
    """Keep relays until their listeners have left (or the deadline), removing each from the
    top as soon as it and every relay above it are empty; then end. The top ones empty
    early: the map moves their last listeners down (`sharding.consolidate`)."""
    began, deadline, why = window
    if was != "Draining" and running > 0:
        draft.event(
            NORMAL,
            "Draining",
            f"{why}; draining {running:,} relays "
            f"(timeout {format_duration(spec.scaling.drain_timeout)})",
        )
    timed_out = seen.now >= deadline
    kept = _carrying(spec, running, seen, began, receiving, state)
    if timed_out:
        kept = replace(kept, replicas=0, unsure=False)
    if seen.ready_relays > 0 or kept.replicas > 0:
        if timed_out and running > 0 and seen.listeners != 0:
            left = "an unknown number of" if seen.listeners is None else f"{seen.listeners:,}"
            draft.event(
                WARNING,
                "DrainTimedOut",
                f"{left} listeners still connected "
                f"{format_duration(spec.scaling.drain_timeout)} after the drain began; removing "
                "the relays anyway",
            )
        return kept
    draft.event(NORMAL, "Ended", "all relays drained and removed")
    return replace(kept, phase="Ended", replicas=0, unsure=False)


def _carrying(
    spec: AudioRoomSpec,
    running: int,
    seen: Observed,
    began: datetime,
    receiving: frozenset[int],
    state: ScalingState,
) -> _Kept:
    """StatefulSet size that keeps every relay that may still carry listeners.

    A relay is empty only by a sample taken a moment (DRAIN_SETTLE) after the drain began
    and after the map that last moved shards onto or off it was published
    (`ScalingState.relays_moved_at`; `moved_at`, the room's last move, where that is not
    known): a listener the map moved may be on its way, or sent back by an edge that has not
    read the map yet. Moves among other relays do not hold it: before, every move of the
    drain set every relay's clock back, and a relay emptied early went 20-40 s later, with
    the last (e2e). One without a series of its own is empty when every counted listener is
    on another relay. Without a count, all are kept.

    A relay the map sends moved listeners to (`receiving`: active in the map) is empty only
    once the whole room has read empty twice: in a reading taken after the last move, and
    again in one sampled a moment after the first (both times on the metrics source's
    clock; a move in between voids the first, see `reconcile`). One reading is not enough:
    the relay kept may be scraped just before a moved listener arrives, and the relay it
    left just after it went, so both read 0 and the listener would be dropped with the last
    relay. A second reading sampled after the first sees it arrived; the same sample read
    again in a later pass does not.
    """
    metrics = seen.metrics
    first = state.empty_sampled_at
    if first is not None and first <= began:
        first = None  # sampled before this drain began
    if metrics is None and began < spec.start_time:
        # Deleted before its start, and no count will ever come: nobody to wait for.
        return _Kept("Draining", 0, None, unsure=False)
    if metrics is None or metrics.listeners is None or metrics.sampled_at is None:
        return _Kept("Draining", running, first, unsure=False)
    sampled = metrics.sampled_at
    relay_moves = dict(state.relays_moved_at or ())

    def settled(relay: int) -> datetime:
        if relay in receiving or relay not in relay_moves:
            moved = state.moved_at
        elif (moved := relay_moves[relay]) is None:  # by a map not out yet
            return datetime.max.replace(tzinfo=UTC)
        return max(began, moved or began) + DRAIN_SETTLE

    fresh = sampled > max(began, state.moved_at or began) + DRAIN_SETTLE
    unattributed = metrics.listeners > sum(metrics.by_relay.values())
    room_empty = fresh and metrics.listeners == 0
    confirmed = room_empty and first is not None and sampled > first + DRAIN_SETTLE
    carrying = [o for o in range(running) if metrics.by_relay.get(o, int(unattributed)) > 0]
    unsettled = [o for o in range(running) if sampled <= settled(o)]
    waiting = [o for o in range(running) if o in receiving and not confirmed]
    unproven = sorted({*unsettled, *waiting})  # not shown empty yet: kept, looked at soon
    keep = max(carrying + unproven) + 1 if carrying or unproven else 0
    # A reading from before the room's last move settled neither starts nor ends a pair.
    empty_sampled_at = ((first or sampled) if room_empty else None) if fresh else first
    unsure = bool(unproven) and (not carrying or max(unproven) > max(carrying))
    return _Kept("Draining", keep, empty_sampled_at, unsure)


def _track_relay_moves(
    state: ScalingState, before: ShardMap, after: ShardMap, relays: int, closed: bool
) -> ScalingState:
    """Mark each relay this pass's map moves shards onto or off as moved by a map not yet
    published, while the room is closed (see `ScalingState.relays_moved_at`; `_dated_move`
    dates them). The first closed pass starts every relay, `relays` of them and any a map
    names, at the room's last move: none of them moved later. A relay that leaves the map
    keeps its time: the edge sends nobody to it."""
    if not closed:
        return state if state.relays_moved_at is None else replace(state, relays_moved_at=None)
    known: dict[int, datetime | None]
    if state.relays_moved_at is None:
        last = None if state.moved_unpublished else state.moved_at
        known = dict.fromkeys({*range(relays), *before.relays, *after.relays}, last)
    else:
        known = dict(state.relays_moved_at)
    known |= dict.fromkeys(relays_moved(before, after), None)
    return replace(state, relays_moved_at=tuple(sorted(known.items())))


def _dated_move(state: ScalingState, published_at: datetime | None) -> ScalingState:
    """The last move dated from when its map was published, not from the pass that decided
    it: listeners start moving only once the edges can read it. The pass after the move is
    handed that map's publication time (see `reconcile`'s `shard_map_at`)."""
    if not state.moved_unpublished or published_at is None or state.moved_at is None:
        return state
    if published_at <= state.moved_at:
        return state  # the moving map's write has not returned (it failed): not out yet
    relays = state.relays_moved_at
    if relays is not None:  # every relay moved since the last publication: this map has it
        relays = tuple((o, published_at if t is None else t) for o, t in relays)
    return replace(state, moved_at=published_at, moved_unpublished=False, relays_moved_at=relays)


def _listeners_since(seen: Observed, began: datetime) -> float | None:
    """The room's count if it was sampled after `began` (None: no such count yet)."""
    metrics = seen.metrics
    if metrics is None or metrics.listeners is None or metrics.sampled_at is None:
        return None
    return float(metrics.listeners) if metrics.sampled_at > began else None


def drain_order(
    ready: frozenset[int], active: Sequence[int], replicas: int, rolling: set[int]
) -> list[int]:
    """Ready relays that take no joins, in the order their listeners move: those a rollout
    replaces first (each frees a maxSurge slot as it empties), then those a scale-down
    removes, highest first (a StatefulSet removes its highest ordinal)."""
    leaving = [o for o in ready if o < replicas and o not in active]
    return sorted(leaving, key=lambda o: (o not in rolling, -o))


def _announce_consolidation(
    current: ShardMap, consolidation: Consolidation, spec: AudioRoomSpec, draft: _Draft
) -> None:
    """Say which relays start draining in this pass, so their last listeners move down."""
    starting = sorted(o for o in consolidation.draining if current.relays.get(o) == "active")
    if starting and consolidation.receivers:
        draft.event(
            NORMAL,
            "DrainConsolidating",
            f"moving the listeners left on relays {_ordinals(tuple(starting))} to relays "
            f"{_ordinals(consolidation.receivers)} (at up to "
            f"{spec.sharding.max_migrations_per_minute:,} a minute), so each relay goes as "
            "it empties",
        )


def _after(deadline: datetime, now: datetime) -> datetime:
    return deadline if deadline > now else now + timedelta(seconds=5)


def _next_deadline(
    spec: AudioRoomSpec, plan: PlanStatus, phase: Phase, now: datetime
) -> datetime | None:
    """The next moment the clock alone changes the decision; other changes wake us sooner."""
    deadlines = {
        "Scheduled": plan.prewarm_at,
        "PreWarming": spec.start_time,
        "Ready": spec.start_time,
        "Live": min(end_of(spec), spec.start_time + 2 * spec.scaling.plan_hold),
        "Draining": drain_deadline(spec),
    }
    if phase == "Ended":
        return None
    deadline = deadlines[phase]
    return deadline if deadline > now else now + timedelta(seconds=5)


VOLATILE_STATE = ("samples", "targets")
"""Scaling memory kept only in the process: it moves every tick, and storing it would write
status every tick. Losing it in a restart is safe: the join rate is relearned within a
minute, and a scale-down waits for a whole new stabilization window."""


def _persisted(state: ScalingState) -> dict[str, Any]:
    """The state as stored: relays, draining relays and the peak, not the volatile memory."""
    return {key: value for key, value in state.to_dict().items() if key not in VOLATILE_STATE}


def stored_scaling_state(status: AudioRoomStatus) -> ScalingState | None:
    """The scaling state a previous operator process left in the status, if any."""
    data: Mapping[str, Any] | None = status.scaling_state
    return ScalingState.from_dict(data) if data else None
