"""Node headroom ahead of the plan: placeholder pods that make the node autoscaler add nodes
before the relays need them.

A node autoscaler (Karpenter, the cluster autoscaler) adds nodes only for Pending pods, and a
new node takes minutes. So a node lead time before `prewarmAt` the room asks for nodes with
placeholder pods of a low PriorityClass, shaped like its relays; when the relays come they
preempt the placeholders and run on nodes that are already there. Placeholders grow only
before the pre-warm; from then on they only shrink, as relays take their place, and they
are all gone once the room is Ready, Live, over, deleted or has headroom turned off.

Pure: the shell says what exists and when; this module says how many placeholders to keep,
which to create or delete, the Events and the condition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from townsquare.api.models import Condition, NodeHeadroomSpec, Phase, PlanStatus
from townsquare.api.types import format_duration

CONDITION = "NodesReady"
DEFAULT_NODE_LEAD = timedelta(minutes=5)
"""Node lead time before the room has measured one: a cloud node is typically Ready in 1-5 min."""
NODE_LEAD_FACTOR = 1.5
"""Measured waits are scaled by this: the next node may be slower than the slowest seen."""
NODE_LEAD_MARGIN = timedelta(seconds=15)
"""Added to a measured lead: scheduling, the autoscaler's batching window, API latency."""
WAIT_SAMPLES = 20
"""The newest waits the lead time learns from: recent pods tell of today's nodes."""


@dataclass(frozen=True)
class Placeholder:
    """One placeholder pod as the scheduler left it."""

    name: str
    created: datetime
    scheduled_at: datetime | None
    """When it was bound to a node; None while Pending."""


@dataclass(frozen=True)
class Relays:
    """The room's relay pods as far as nodes are concerned."""

    existing: int
    """Relay pods that exist and are not being deleted."""
    scheduled: int
    """Of those, the ones bound to a node."""


@dataclass(frozen=True)
class ConditionUpdate:
    """The NodesReady condition as it should read now."""

    status: Literal["True", "False"]
    reason: str
    message: str


@dataclass(frozen=True)
class Headroom:
    """What to do with placeholders now, and what to tell people."""

    wanted: int
    """Placeholders to keep after this pass."""
    create: tuple[str, ...]
    delete: tuple[str, ...]
    lead: timedelta
    """Node lead time: placeholders are created this long before `prewarmAt`."""
    request_at: datetime | None
    """When placeholders are (or were) due; None when headroom is off."""
    wake_at: datetime | None
    """The next moment the clock alone changes this decision."""
    condition: ConditionUpdate | None
    """None: leave the NodesReady condition as it is (or absent)."""
    events: tuple[tuple[str, str, str], ...]
    """(type, reason, message) of the Events to post."""
    longest_wait: float | None
    """The longest recent wait for a node among the room's pods, in seconds."""


def placeholder_name(room: str, index: int) -> str:
    """Placeholder pod names: stable, so a pass that failed halfway is completed, not doubled."""
    return f"{room}-headroom-{index}"


def node_lead_time(spec: NodeHeadroomSpec, waits: Sequence[float]) -> timedelta:
    """How long before `prewarmAt` to ask for nodes.

    The spec's `leadTime` when set; else the room's own longest recent wait for a node,
    scaled up with a margin; else the default.
    """
    if spec.lead_time is not None:
        return spec.lead_time
    recent = [w for w in waits[-WAIT_SAMPLES:] if w >= 0]
    if not recent:
        return DEFAULT_NODE_LEAD
    seconds = max(recent) * NODE_LEAD_FACTOR + NODE_LEAD_MARGIN.total_seconds()
    return timedelta(seconds=math.ceil(seconds))


def wanted_placeholders(
    plan: PlanStatus,
    phase: Phase,
    relays: Relays,
    existing: int,
    now: datetime,
    request_at: datetime,
    *,
    enabled: bool,
    deleting: bool = False,
) -> int:
    """Placeholders to keep: the nodes the plan needs that relays do not hold yet.

    Before `prewarmAt` (from `request_at` on) the plan less the relays that exist; during
    the pre-warm the plan less the relays already on a node, never more than exist (a
    placeholder made now would only ask for a node the relays no longer wait for); none
    once the room is Ready, Live or over, or deleted, or when headroom is off.
    """
    if not enabled or deleting:
        return 0
    if phase == "Scheduled":
        return max(0, plan.relays - relays.existing) if now >= request_at else 0
    if phase == "PreWarming":
        return min(existing, max(0, plan.relays - relays.scheduled))
    return 0


def decide(
    room: str,
    spec: NodeHeadroomSpec,
    plan: PlanStatus,
    phase: Phase,
    relays: Relays,
    placeholders: Sequence[Placeholder],
    previous: Condition | None,
    now: datetime,
    *,
    waits: Sequence[float] = (),
    deleting: bool = False,
) -> Headroom:
    """Placeholders to create and delete at `now`, with the NodesReady condition and Events.

    `previous` is the room's NodesReady condition as recorded (None: never requested);
    `waits` are the seconds the room's pods waited for a node (creation to scheduled),
    oldest first.
    """
    lead = node_lead_time(spec, waits)
    request_at = plan.prewarm_at - lead
    wanted = wanted_placeholders(
        plan,
        phase,
        relays,
        len(placeholders),
        now,
        request_at,
        enabled=spec.enabled,
        deleting=deleting,
    )
    create, delete = _changes(room, placeholders, wanted)
    kept = [p for p in placeholders if p.name not in delete]
    condition: ConditionUpdate | None = None
    events: tuple[tuple[str, str, str], ...] = ()
    if spec.enabled and not deleting:
        condition, events = _report(plan, phase, relays, kept, len(create), previous, now, lead)
    due = spec.enabled and phase == "Scheduled" and now < request_at
    return Headroom(
        wanted=wanted,
        create=create,
        delete=delete,
        lead=lead,
        request_at=request_at if spec.enabled else None,
        wake_at=request_at if due else None,
        condition=condition,
        events=events,
        longest_wait=max(waits[-WAIT_SAMPLES:], default=None),
    )


def remove_all(placeholders: Sequence[Placeholder]) -> Headroom:
    """A room the operator does not act on (refused): its placeholders go, and none is
    made; each holds a node for relays that will not come."""
    return Headroom(
        wanted=0,
        create=(),
        delete=tuple(p.name for p in placeholders),
        lead=timedelta(0),
        request_at=None,
        wake_at=None,
        condition=None,
        events=(),
        longest_wait=None,
    )


def _changes(
    room: str, placeholders: Sequence[Placeholder], wanted: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """New names for the missing ones; the excess goes Pending first (each still asks for a
    node that is no longer needed), then the newest."""
    excess = len(placeholders) - wanted
    if excess > 0:
        order = sorted(
            placeholders,
            key=lambda p: (p.scheduled_at is not None, -p.created.timestamp(), p.name),
        )
        return (), tuple(p.name for p in order[:excess])
    taken = {p.name for p in placeholders}
    names: list[str] = []
    index = 0
    while len(names) < -excess:
        name = placeholder_name(room, index)
        if name not in taken:
            names.append(name)
        index += 1
    return tuple(names), ()


def _report(
    plan: PlanStatus,
    phase: Phase,
    relays: Relays,
    kept: Sequence[Placeholder],
    created: int,
    previous: Condition | None,
    now: datetime,
    lead: timedelta,
) -> tuple[ConditionUpdate | None, tuple[tuple[str, str, str], ...]]:
    """NodesRequested when placeholders are asked for, NodesReady once the plan's relays have
    nodes (placeholders and relays on nodes together), and the condition in between."""
    if created and (previous is None or previous.status == "True"):
        more = "" if previous is None else " more"
        message = (
            f"{created:,}{more} placeholder pods ask the node autoscaler for nodes for "
            f"{plan.relays:,} relays, {format_duration(lead)} before pre-warm at "
            f"{_clock(plan.prewarm_at)}"
        )
        waiting = ConditionUpdate("False", "NodesRequested", _held(plan, relays, kept))
        return waiting, (("Normal", "NodesRequested", message),)
    if previous is None:
        return None, ()
    on_nodes = [p.scheduled_at for p in kept if p.scheduled_at is not None]
    if relays.scheduled + len(on_nodes) >= plan.relays:
        events: tuple[tuple[str, str, str], ...] = ()
        if previous.status != "True":
            requested = previous.last_transition_time
            ready = max(on_nodes, default=now)
            events = (("Normal", "NodesReady", _ready_message(plan, requested, ready)),)
        return ConditionUpdate("True", "NodesReady", _held(plan, relays, kept)), events
    if phase in ("Scheduled", "PreWarming") and previous.status != "True":
        reason = "NodesRequested" if phase == "Scheduled" else "NodesNotReadyAtPreWarm"
        return ConditionUpdate("False", reason, _held(plan, relays, kept)), ()
    return None, ()


def _held(plan: PlanStatus, relays: Relays, kept: Sequence[Placeholder]) -> str:
    placeholders = sum(1 for p in kept if p.scheduled_at is not None)
    held = min(plan.relays, relays.scheduled + placeholders)
    return (
        f"nodes for {held:,}/{plan.relays:,} planned relays "
        f"({relays.scheduled:,} relays and {placeholders:,} placeholders on nodes)"
    )


def _ready_message(plan: PlanStatus, requested: datetime, ready: datetime) -> str:
    ahead = plan.prewarm_at - ready
    timing = (
        f"{format_duration(ahead)} before pre-warm"
        if ahead.total_seconds() > 0
        else f"{format_duration(-ahead)} after pre-warm began"
    )
    return (
        f"nodes for {plan.relays:,} relays ready {format_duration(ready - requested)} after "
        f"they were requested (requested {_clock(requested)}, ready {_clock(ready)}), {timing}"
    )


def _clock(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")
