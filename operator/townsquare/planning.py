"""From a declared audience to a relay plan: how many relays, and when to start them.

Pure: the caller passes the time. The operator, `townsquare plan` and the simulator all
plan through `plan_room`, so the plan a producer prints is the plan the cluster runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from townsquare.api.models import AudioRoomSpec
from townsquare.api.types import format_duration

POD_CREATION_RATE_PER_SECOND = 20
"""Relay pods a StatefulSet controller creates per second, roughly (client-side rate limits)."""
STRAGGLER_FACTOR = 2
"""Slowest relays take about this multiple of the typical start-up time."""
SAFETY_MARGIN = timedelta(minutes=2)
"""Time a derived pre-warm keeps spare before the start, for retries and slow nodes."""


@dataclass(frozen=True)
class Plan:
    """What the declared audience needs, and when pre-warming must begin."""

    relays: int
    capacity: int
    """Listeners the relays carry at the target utilization."""
    hard_capacity: int
    """Listeners the relays carry when full."""
    prewarm_at: datetime
    ready_by: datetime
    """When every planned relay is expected to be Ready."""
    lead: timedelta
    rollout: timedelta
    """Expected time from the first relay created to the last Ready."""
    shards_per_relay: float
    fanout_tiers: int
    """Relay tiers below the origin, so that no node feeds more than `fanout` others."""
    warnings: tuple[str, ...]


def relays_needed(listeners: float, spec: AudioRoomSpec) -> int:
    """Relays that carry `listeners` at the target utilization, within min and max relays."""
    per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
    unbounded = math.ceil(listeners / per_relay - 1e-9) if listeners > 0 else 0
    return max(spec.scaling.min_relays, min(spec.scaling.max_relays, unbounded))


def capacity_of(relays: int, spec: AudioRoomSpec) -> int:
    """Listeners `relays` carry at the target utilization."""
    return math.floor(
        relays * spec.relay.listeners_per_relay * spec.scaling.target_utilization + 1e-9
    )


def fanout_tiers(relays: int, fanout: int) -> int:
    """Tiers of a tree in which the origin and every relay feed at most `fanout` relays."""
    tiers, reach = 1, fanout
    while reach < relays:
        tiers += 1
        reach *= fanout
    return tiers


def rollout_time(relays: int, startup_seconds: float) -> timedelta:
    """Expected time for `relays` new relays to be created and all become Ready."""
    creation = relays / POD_CREATION_RATE_PER_SECOND
    return timedelta(seconds=math.ceil(STRAGGLER_FACTOR * startup_seconds + creation))


def plan_room(spec: AudioRoomSpec, now: datetime, startup_seconds: float | None = None) -> Plan:
    """Plan a room at time `now`; `startup_seconds` is the measured start-up, if known."""
    startup = startup_seconds if startup_seconds is not None else spec.relay.startup_seconds
    relays = relays_needed(spec.expected_audience, spec)
    rollout = rollout_time(relays, startup)
    if spec.scaling.prewarm_lead is not None:
        lead = spec.scaling.prewarm_lead
    else:
        derived = (rollout + SAFETY_MARGIN).total_seconds()
        lead = timedelta(minutes=math.ceil(derived / 60))
    prewarm_at = spec.start_time - lead
    ready_by = min(spec.start_time, max(now, prewarm_at) + rollout)
    return Plan(
        relays=relays,
        capacity=capacity_of(relays, spec),
        hard_capacity=relays * spec.relay.listeners_per_relay,
        prewarm_at=prewarm_at,
        ready_by=ready_by,
        lead=lead,
        rollout=rollout,
        shards_per_relay=spec.sharding.shards / relays if relays else 0.0,
        fanout_tiers=fanout_tiers(relays, spec.sharding.fanout),
        warnings=_warnings(spec, now, relays, lead, rollout, prewarm_at),
    )


def _warnings(
    spec: AudioRoomSpec,
    now: datetime,
    relays: int,
    lead: timedelta,
    rollout: timedelta,
    prewarm_at: datetime,
) -> tuple[str, ...]:
    warnings: list[str] = []
    scaling = spec.scaling
    most = capacity_of(scaling.max_relays, spec)
    if spec.expected_audience > most:
        warnings.append(
            f"expected audience {spec.expected_audience:,} exceeds what maxRelays "
            f"({scaling.max_relays:,}) carries at {scaling.target_utilization:.0%} utilization "
            f"({most:,}); the plan is capped at {scaling.max_relays:,} relays and excess joins "
            "will wait in the admission queue"
        )
    if now >= spec.start_time:
        warnings.append(
            f"startTime {spec.start_time.isoformat()} is already past "
            f"({format_duration(now - spec.start_time)} ago); relays start at once"
        )
    elif now > prewarm_at:
        warnings.append(
            f"pre-warming should have begun {format_duration(now - prewarm_at)} ago; it starts "
            f"now and needs about {format_duration(rollout)}"
        )
    if lead < rollout:
        warnings.append(
            f"prewarmLead {format_duration(lead)} is shorter than the expected rollout of "
            f"{relays:,} relays ({format_duration(rollout)}); some may not be Ready by the start"
        )
    if relays > spec.sharding.shards:
        warnings.append(
            f"{relays:,} relays but only {spec.sharding.shards:,} shards: some relays will "
            "carry no listeners; raise sharding.shards"
        )
    return tuple(warnings)
