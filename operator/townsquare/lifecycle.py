"""A room's life, from schedule to end: phases, relay counts, shard map, conditions, Events.

Pure: `reconcile` takes the room, what was last recorded (its status, the scaling state and
the published shard map) and what the cluster and Prometheus show now, and returns what to
record, the Events to post and when to look again. It calls the scaling policy and the shard
map once each, so the operator and the simulator decide alike. Everything needed to resume
after a restart is in what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from townsquare.api.models import (
    AudioRoomSpec,
    AudioRoomStatus,
    Condition,
    ConditionStatus,
    ListenerStatus,
    Phase,
    PlanStatus,
    RelayStatus,
    ShardMapRef,
)
from townsquare.api.names import shard_map_name
from townsquare.api.types import format_duration
from townsquare.planning import Plan, capacity_of, plan_room
from townsquare.scaling import Decision, Observation, ScalingState, decide, startup_estimate
from townsquare.sharding import ShardMap, new_map, rebalance, shard_listeners_from_relays

NORMAL = "Normal"
WARNING = "Warning"
STARTUP_SAMPLES = 20
"""The newest relay start-ups the policy learns from: recent pods tell of today's nodes."""


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
        expected_audience=spec.expected_audience,
        relays=plan.relays,
        capacity=plan.capacity,
        prewarm_at=plan.prewarm_at,
        ready_by=plan.ready_by,
    )


def _replan(
    spec: AudioRoomSpec, previous: AudioRoomStatus, draft: _Draft
) -> tuple[Plan, PlanStatus]:
    """The plan for this generation; its status form is kept while the spec is unchanged."""
    seen = draft.seen
    plan = plan_room(spec, seen.now, startup_of(spec, seen))
    if previous.plan is not None and previous.observed_generation == seen.generation:
        return plan, previous.plan
    fresh = _plan_status(spec, plan)
    old = previous.plan
    if old is not None and (old.relays, old.prewarm_at) != (fresh.relays, fresh.prewarm_at):
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
    if seen.now >= spec.start_time:
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
) -> Outcome:
    """Decide the room's phase, relays, shard map, conditions and Events at `seen.now`.

    `scaling_state` and `shard_map` are what the previous call returned (after a restart:
    what was stored); `shard_map_at` is when that map was published, for the migration
    budget.
    """
    draft = _Draft(conditions=list(previous.conditions), seen=seen)
    plan, plan_status = _replan(spec, previous, draft)
    was: Phase | None = previous.phase
    running = previous.relays.desired if previous.relays else 0
    state = scaling_state or stored_scaling_state(previous) or ScalingState.initial(running)
    current_map = replace(
        shard_map or new_map(spec.sharding.shards, spec.relay.listeners_per_relay),
        migrations_per_minute=spec.sharding.max_migrations_per_minute,
    )
    by_clock = _phase_by_clock(spec, plan_status, seen.now)

    phase: Phase
    decision: Decision | None = None
    if was == "Ended":
        phase, replicas, accepting = "Ended", 0, 0
    elif by_clock == "Draining":
        phase, replicas = _drain(spec, was, running, seen, draft)
        accepting = 0
    else:
        decision = decide(
            spec,
            # One plan per pass: the one the phase and the wake-up time were derived from.
            replace(plan, relays=plan_status.relays, prewarm_at=plan_status.prewarm_at),
            _observation(seen),
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

    rebalanced = rebalance(
        current_map,
        active=sorted(o for o in seen.ready_set() if o < accepting),
        draining=sorted(o for o in seen.ready_set() if o >= accepting and o < replicas),
        shard_listeners=_shard_listeners(current_map, seen),
        demand=_demand(seen),
        fanout=spec.sharding.fanout,
        budget=_migration_budget(spec, seen.now, shard_map_at),
    )
    if phase not in ("Draining", "Ended"):  # past the end, joins are closed: nothing to say
        _announce_shard_map(current_map, rebalanced.map, rebalanced.moved, rebalanced.reason, draft)
    _metrics_condition(seen, draft)
    _capacity_condition(spec, plan, decision, draft)
    draft.condition(
        "Ready",
        "True" if seen.ready_relays >= replicas else "False",
        "RelaysReady" if seen.ready_relays >= replicas else "RelaysStarting",
        f"{seen.ready_relays:,}/{replicas:,} relays ready",
    )
    metrics = seen.metrics
    status = AudioRoomStatus(
        phase=phase,
        observed_generation=seen.generation,
        plan=plan_status,
        relays=RelayStatus(
            desired=replicas,
            ready=seen.ready_relays,
            draining=replicas - accepting,
            summary=f"{seen.ready_relays}/{replicas}",
        ),
        listeners=ListenerStatus(
            current=(metrics.listeners or 0) if metrics else 0,
            forecast=(decision.forecast or 0) if decision else 0,
            capacity=capacity_of(accepting, spec),
            waiting=metrics.waiting if metrics else 0,
        ),
        shard_map=ShardMapRef(
            config_map=shard_map_name(room), generation=rebalanced.map.generation
        ),
        scaling_state=_persisted(state),
        conditions=draft.conditions,
    )
    return Outcome(
        status=status,
        events=tuple(draft.events),
        desired_relays=replicas,
        scaling_state=state,
        shard_map=rebalanced.map,
        decision=decision,
        wake_at=_next_deadline(spec, plan_status, phase, seen.now),
    )


def startup_of(spec: AudioRoomSpec, seen: Observed) -> float:
    """Relay start-up to plan with: measured times, with the spec's hint as a prior."""
    newest = sorted(seen.startups)[-STARTUP_SAMPLES:]
    return startup_estimate(spec.relay.startup_seconds, tuple(seconds for _, seconds in newest))


def _observation(seen: Observed) -> Observation:
    metrics = seen.metrics
    if metrics is None or metrics.listeners is None:
        return Observation(listeners=None)
    return Observation(
        listeners=metrics.listeners,
        waiting=metrics.waiting,
        sampled_at=metrics.sampled_at,
        relay_listeners=dict(metrics.by_relay),
    )


def _shard_listeners(current: ShardMap, seen: Observed) -> list[float] | None:
    if seen.metrics is None or seen.metrics.listeners is None:
        return None
    by_relay = {relay: float(n) for relay, n in seen.metrics.by_relay.items()}
    return shard_listeners_from_relays(current, by_relay)


def _demand(seen: Observed) -> float | None:
    metrics = seen.metrics
    if metrics is None or metrics.listeners is None:
        return None
    return float(metrics.listeners + metrics.waiting)


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
            message = f"{ready:,}/{planned:,} relays ready at the start"
            draft.event(WARNING, "PreWarmIncomplete", message)
            draft.condition("PreWarmed", "False", "PreWarmIncomplete", message)
        elif was != "Ready":
            draft.condition("PreWarmed", "True", "AllRelaysReady", f"{ready:,} ready")
        draft.event(NORMAL, "Live", f"the event started with {ready:,}/{planned:,} relays ready")
    elif phase == "PreWarming" and not any(c.type == "PreWarmed" for c in draft.conditions):
        draft.condition("PreWarmed", "False", "PreWarming", f"{ready:,}/{planned:,} relays ready")


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


def _metrics_condition(seen: Observed, draft: _Draft) -> None:
    metrics = seen.metrics
    if metrics is None:
        draft.condition("MetricsAvailable", "Unknown", "NotConfigured", "no Prometheus configured")
    elif metrics.listeners is None and seen.ready_relays == 0:
        # No relay runs yet, so no relay reports: nothing is missing.
        draft.condition("MetricsAvailable", "Unknown", "NoRelaysReady", "no relay is Ready yet")
    elif metrics.listeners is None:
        message = (
            f"{metrics.problem or 'no listener data'}; holding the current relays "
            "(never scaling down without data)"
        )
        if draft.condition("MetricsAvailable", "False", "MetricsUnavailable", message) != "False":
            draft.event(WARNING, "MetricsUnavailable", message)
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


def _drain(
    spec: AudioRoomSpec,
    was: Phase | None,
    running: int,
    seen: Observed,
    draft: _Draft,
) -> tuple[Phase, int]:
    """Past the end: keep relays until listeners have left (or the timeout), then end."""
    if was != "Draining":
        draft.event(
            NORMAL,
            "Draining",
            f"the event ended at {_clock(end_of(spec))}; draining {running:,} relays "
            f"(timeout {format_duration(spec.scaling.drain_timeout)})",
        )
    emptied = seen.listeners == 0
    timed_out = seen.now >= drain_deadline(spec)
    if not (emptied or timed_out):
        return "Draining", running
    if seen.ready_relays > 0:
        if timed_out and not emptied and running > 0:
            left = "an unknown number of" if seen.listeners is None else f"{seen.listeners:,}"
            draft.event(
                WARNING,
                "DrainTimedOut",
                f"{left} listeners still connected "
                f"{format_duration(spec.scaling.drain_timeout)} after the end; removing the "
                "relays anyway",
            )
        return "Draining", 0
    draft.event(NORMAL, "Ended", "all relays drained and removed")
    return "Ended", 0


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
