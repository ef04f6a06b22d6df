"""A room's life, from schedule to end: phases, relay counts, conditions and Events.

Pure: `reconcile` takes the room, what was last recorded in its status and what the cluster
shows now, and returns the status to record, the Events to post and when to look again.
Everything it needs to resume after a restart is in the status it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from townsquare.api.models import (
    AudioRoomSpec,
    AudioRoomStatus,
    Condition,
    ConditionStatus,
    Phase,
    PlanStatus,
    RelayStatus,
)
from townsquare.api.types import format_duration
from townsquare.planning import Plan, plan_room

NORMAL = "Normal"
WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the room, for on-call."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What the shell read from the cluster for this room."""

    now: datetime
    generation: int
    ready_relays: int
    """Relay pods that are Ready."""
    listeners: int | None = None
    """Listeners connected now; None when unknown (no metrics yet, or unavailable)."""


@dataclass(frozen=True)
class Outcome:
    """What to write: the new status, the Events, and when to reconcile again at the latest."""

    status: AudioRoomStatus
    events: tuple[Event, ...]
    desired_relays: int
    wake_at: datetime | None
    """None: nothing will happen with time alone (the room has ended)."""
    draining: bool = False
    """True once the room is past its end: relays accept no new listeners."""


def end_of(spec: AudioRoomSpec) -> datetime:
    """When the event is over and its relays start draining."""
    return spec.start_time + spec.duration


def drain_deadline(spec: AudioRoomSpec) -> datetime:
    """When draining relays are removed even if listeners remain."""
    return end_of(spec) + spec.scaling.drain_timeout


def _plan_status(spec: AudioRoomSpec, plan: Plan) -> PlanStatus:
    return PlanStatus(
        expected_audience=spec.expected_audience,
        relays=plan.relays,
        capacity=plan.capacity,
        prewarm_at=plan.prewarm_at,
        ready_by=plan.ready_by,
    )


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
    events: list[Event] = field(default_factory=list)

    def condition(
        self, kind: str, status: ConditionStatus, reason: str, message: str, seen: Observed
    ) -> None:
        self.conditions = set_condition(
            self.conditions, kind, status, reason, message, seen.now, seen.generation
        )

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


def _replan(
    spec: AudioRoomSpec, previous: AudioRoomStatus, seen: Observed, draft: _Draft
) -> PlanStatus:
    """The plan for this generation: kept while the spec is unchanged, so status stays still."""
    if previous.plan is not None and previous.observed_generation == seen.generation:
        return previous.plan
    plan = plan_room(spec, seen.now)
    fresh = _plan_status(spec, plan)
    old = previous.plan
    if old is not None and (old.relays, old.prewarm_at) != (fresh.relays, fresh.prewarm_at):
        draft.event(
            NORMAL,
            "Replanned",
            f"expected audience {old.expected_audience:,} -> {spec.expected_audience:,}: "
            f"{old.relays:,} -> {fresh.relays:,} relays, pre-warm at "
            f"{_clock(fresh.prewarm_at)}",
        )
    _plan_warnings(spec, plan, seen, draft)
    return fresh


def _plan_warnings(spec: AudioRoomSpec, plan: Plan, seen: Observed, draft: _Draft) -> None:
    beyond = spec.expected_audience > plan.capacity
    if beyond:
        draft.condition(
            "CapacityExceeded",
            "True",
            "AudienceBeyondMaxRelays",
            f"expected audience {spec.expected_audience:,} exceeds the {plan.capacity:,} "
            f"listeners that maxRelays ({spec.scaling.max_relays:,}) carries; excess joins "
            "wait in the admission queue",
            seen,
        )
        draft.event(WARNING, "AudienceBeyondMaxRelays", draft.conditions[-1].message)
    else:
        draft.condition(
            "CapacityExceeded", "False", "WithinCapacity", "the plan carries the audience", seen
        )
    if seen.now >= spec.start_time:
        draft.event(
            WARNING,
            "StartTimePassed",
            f"startTime {spec.start_time.isoformat()} is already past "
            f"({format_duration(seen.now - spec.start_time)} ago); starting "
            f"{plan.relays:,} relays at once",
        )


def reconcile(spec: AudioRoomSpec, previous: AudioRoomStatus, seen: Observed) -> Outcome:
    """Decide the room's phase, relay count, conditions and Events at `seen.now`."""
    draft = _Draft(conditions=list(previous.conditions))
    plan = _replan(spec, previous, seen, draft)
    was: Phase | None = previous.phase
    by_clock = _phase_by_clock(spec, plan, seen.now)
    live_before = previous.relays.desired if previous.relays else 0

    phase: Phase
    if was == "Ended":
        phase, desired = "Ended", 0
    elif by_clock == "Scheduled":
        phase, desired = "Scheduled", spec.scaling.min_relays
    elif by_clock == "Draining":
        phase, desired = _drain(spec, was, live_before, seen, draft)
    else:
        desired = max(plan.relays, live_before if was not in (None, "Scheduled") else 0)
        phase = by_clock
        if by_clock == "PreWarming" and seen.ready_relays >= plan.relays:
            phase = "Ready"
        _announce_warmup(spec, plan, was, phase, seen, draft)

    draft.condition(
        "Ready",
        "True" if seen.ready_relays >= desired else "False",
        "RelaysReady" if seen.ready_relays >= desired else "RelaysStarting",
        f"{seen.ready_relays:,}/{desired:,} relays ready",
        seen,
    )
    status = AudioRoomStatus(
        phase=phase,
        observed_generation=seen.generation,
        plan=plan,
        relays=RelayStatus(
            desired=desired,
            ready=seen.ready_relays,
            draining=desired if phase == "Draining" else 0,
            summary=f"{seen.ready_relays}/{desired}",
        ),
        listeners=previous.listeners,
        shard_map=previous.shard_map,
        conditions=draft.conditions,
    )
    return Outcome(
        status=status,
        events=tuple(draft.events),
        desired_relays=desired,
        wake_at=_next_deadline(spec, plan, phase, seen.now),
        draining=phase in ("Draining", "Ended"),
    )


def _announce_warmup(
    spec: AudioRoomSpec,
    plan: PlanStatus,
    was: Phase | None,
    phase: Phase,
    seen: Observed,
    draft: _Draft,
) -> None:
    """Events and the PreWarmed condition for the way from Scheduled to Live."""
    ready, planned = seen.ready_relays, plan.relays
    if was in (None, "Scheduled") and phase in ("PreWarming", "Ready", "Live"):
        draft.event(
            NORMAL,
            "PreWarmStarted",
            f"{planned:,} relays for {spec.expected_audience:,} expected listeners, ready by "
            f"{_clock(plan.ready_by)}",
        )
    if phase == "Ready" and was != "Ready":
        before = format_duration(spec.start_time - seen.now)
        draft.event(
            NORMAL, "PreWarmed", f"{ready:,}/{planned:,} relays ready {before} before start"
        )
        draft.condition("PreWarmed", "True", "AllRelaysReady", f"{ready:,}/{planned:,} ready", seen)
    elif phase == "Live" and was != "Live":
        if was != "Ready" and ready < planned:
            message = f"{ready:,}/{planned:,} relays ready at the start"
            draft.event(WARNING, "PreWarmIncomplete", message)
            draft.condition("PreWarmed", "False", "PreWarmIncomplete", message, seen)
        elif was != "Ready":
            draft.condition("PreWarmed", "True", "AllRelaysReady", f"{ready:,} ready", seen)
        draft.event(NORMAL, "Live", f"the event started with {ready:,}/{planned:,} relays ready")
    elif phase == "PreWarming" and not any(c.type == "PreWarmed" for c in draft.conditions):
        message = f"{ready:,}/{planned:,} relays ready"
        draft.condition("PreWarmed", "False", "PreWarming", message, seen)


def _drain(
    spec: AudioRoomSpec,
    was: Phase | None,
    live_before: int,
    seen: Observed,
    draft: _Draft,
) -> tuple[Phase, int]:
    """Past the end: keep relays until listeners have left (or the timeout), then end."""
    if was != "Draining":
        draft.event(
            NORMAL,
            "Draining",
            f"the event ended at {_clock(end_of(spec))}; draining {live_before:,} relays "
            f"(timeout {format_duration(spec.scaling.drain_timeout)})",
        )
    emptied = seen.listeners == 0
    timed_out = seen.now >= drain_deadline(spec)
    if not (emptied or timed_out):
        return "Draining", live_before
    if seen.ready_relays > 0:
        if timed_out and not emptied and live_before > 0:
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
    """The next moment the clock alone changes the decision; relay changes wake us sooner."""
    deadlines = {
        "Scheduled": plan.prewarm_at,
        "PreWarming": spec.start_time,
        "Ready": spec.start_time,
        "Live": end_of(spec),
        "Draining": drain_deadline(spec),
    }
    if phase == "Ended":
        return None
    deadline = deadlines[phase]
    return deadline if deadline > now else now + timedelta(seconds=5)
