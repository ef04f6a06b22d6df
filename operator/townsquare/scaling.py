"""Observations -> desired relays, with the reason in numbers (pure).

One call, `decide`, serves the live operator and the simulator alike: it takes the room's
spec and plan, what was observed at `now`, and the state the previous call returned, and it
gives back a `Decision` whose `state` goes into the next call. The state is a small frozen
value that round-trips through a JSON-compatible dict, so the operator can keep it in the
cluster and pick up after a restart exactly where it left off.

The rules, each for a reason a person on call would give:

- Forecast, not just follow: a new relay needs its start-up time before it carries anyone,
  so demand is projected over that lead at the recent join rate.
- The declared plan is a floor from pre-warm until a while after the start (audiences come
  late), then it decays; if the audience is clearly absent it yields early (`plan_floor`).
- Up at once (within a bounded step); down only after a full stabilization window of lower
  demand, and only by draining: relays that still carry listeners are never removed before
  they empty or their drain timeout passes. The window guards against noisy demand; the plan
  floor is a schedule, not a measurement, so it is not smoothed again: as it decays or
  yields, the room follows it down to the highest demand-based need of the window.
- Fail-static: without a fresh listener count the size is held, never lowered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import Plan, capacity_of

RATE_WINDOW = timedelta(seconds=60)
"""The join rate is the demand's slope over this window: long enough to smooth scrapes."""
DECISION_MARGIN = timedelta(seconds=15)
"""Added to the lead: a decision is acted on a moment after it is made."""
SCALE_UP_FACTOR = 2
SCALE_UP_MIN_STEP = 4
"""One decision grows the room to at most max(2 x current, current + 4) relays, so one bad
sample cannot summon maxRelays; at a 5 s tick, 2 -> 1,000 relays still takes under a minute."""
UP_TOLERANCE = 0.1
"""A forecast within 10% above what the relays carry at the target utilization leaves the
size alone (the HPA's tolerance): the headroom above the target absorbs it, and the room
does not grow by one relay every tick. Beyond it the room grows to the full target at once."""
DECAY_STEPS = 10
"""The plan floor decays in this many steps, not one relay per tick."""
STABILIZATION_BUCKETS = 10
"""The stabilization window is remembered as this many per-slice maxima (a small state)."""
LATE_ARRIVAL_FACTOR = 3
NO_SHOW_GRACE_SHARE = 1 / 3
STARTUP_PRIOR_WEIGHT = 3
"""The spec's start-up hint counts as this many measured start-ups."""

Direction = Literal["up", "down", "hold"]


@dataclass(frozen=True)
class Observation:
    """What the metrics said. `listeners=None` means missing or stale: hold, never shrink."""

    listeners: int | None
    """Connected listeners over all relays."""
    waiting: int = 0
    """Listeners held in the admission queue: demand the relays do not carry yet."""
    sampled_at: datetime | None = None
    """When the sample was taken (a scrape lags `now`); `now` when not given."""
    relay_listeners: Mapping[int, int] = field(default_factory=dict)
    """Listeners per relay ordinal, where known; a draining relay is empty at 0."""


@dataclass(frozen=True)
class ScalingState:
    """What one decision hands to the next; `to_dict`/`from_dict` keep it in the cluster."""

    relays: int
    """Relays that accept listeners (ordinals 0..relays-1)."""
    draining: tuple[tuple[int, datetime], ...] = ()
    """Ordinals above `relays` still draining, with the time each began."""
    samples: tuple[tuple[datetime, int], ...] = ()
    """Recent (time, demand) samples within RATE_WINDOW, for the join rate."""
    targets: tuple[tuple[datetime, int], ...] = ()
    """(slice start, highest demand-based target in the slice) over the stabilization window."""
    peak: int = 0
    """Highest demand seen so far: the evidence that an audience came."""

    @classmethod
    def initial(cls, relays: int) -> ScalingState:
        """The state of a room that runs `relays` and has decided nothing yet."""
        return cls(relays=relays)

    @property
    def replicas(self) -> int:
        """StatefulSet size: the accepting relays and any draining above them."""
        return max([self.relays] + [ordinal + 1 for ordinal, _ in self.draining])

    def to_dict(self) -> dict[str, Any]:
        return {
            "relays": self.relays,
            "draining": [[ordinal, _iso(since)] for ordinal, since in self.draining],
            "samples": [[_iso(t), demand] for t, demand in self.samples],
            "targets": [[_iso(t), target] for t, target in self.targets],
            "peak": self.peak,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingState:
        return cls(
            relays=int(data["relays"]),
            draining=tuple((int(o), _parse(t)) for o, t in data.get("draining", ())),
            samples=tuple((_parse(t), int(d)) for t, d in data.get("samples", ())),
            targets=tuple((_parse(t), int(n)) for t, n in data.get("targets", ())),
            peak=int(data.get("peak", 0)),
        )


@dataclass(frozen=True)
class Decision:
    """How many relays, which drain, which may go, and why: everything an Event needs."""

    relays: int
    """Relays that accept listeners."""
    replicas: int
    """StatefulSet size: `relays` plus draining relays not yet removable."""
    draining: tuple[int, ...]
    """Ordinals that accept no new joins; they leave the StatefulSet once empty."""
    drain_timed_out: tuple[int, ...]
    """Relays removed this time although still carrying listeners (drainTimeout passed)."""
    direction: Direction
    listeners: int | None
    forecast: int | None
    capacity: int
    """Listeners `relays` carry at the target utilization."""
    floor: int
    capacity_exceeded: bool
    """Demand needs more than maxRelays: the admission queue must hold the rest."""
    reason: str
    state: ScalingState

    @property
    def metrics_available(self) -> bool:
        return self.listeners is not None

    @property
    def floor_bound(self) -> bool:
        """The declared plan, not the demand, set the relay count."""
        return self.floor >= self.relays


def startup_estimate(hint_seconds: float, measured_seconds: tuple[float, ...] = ()) -> float:
    """Relay start-up to plan with: measured creation-to-Ready times, the hint as a prior.

    A handful of measurements outweighs the hint, but one outlier pod does not erase it.
    """
    total = hint_seconds * STARTUP_PRIOR_WEIGHT + sum(measured_seconds)
    return total / (STARTUP_PRIOR_WEIGHT + len(measured_seconds))


def plan_floor(spec: AudioRoomSpec, plan: Plan, now: datetime, peak: int | None) -> int:
    """Relays the declared plan still guarantees at `now`, given the `peak` demand seen.

    Before `prewarmAt` there is no floor. From `prewarmAt` the plan holds: nothing is known
    about the audience yet, and the relays must be Ready when it arrives. After the start,
    audiences keep arriving late, so the plan holds until `start + planHold`, then decays
    linearly (in DECAY_STEPS steps) to nothing over another `planHold`.

    A no-show must not pay for the whole hold, though (500,000 declared, 20,000 came). An
    audience that is coming shows up in large part within the first minutes, so once a third
    of the hold has passed the floor covers only LATE_ARRIVAL_FACTOR (3) times the peak seen
    so far, never more than the plan: at a third of the declared audience the whole plan is
    kept, a 4% audience keeps an eighth of it. The floor only keeps insurance; demand beyond
    it is still caught by the forecast within one relay start-up, and the admission queue
    holds the rest meanwhile, so yielding costs waiting time, never overload. (On the shipped
    traces a factor of 2, 3 or 4 left waiting unchanged; 3 keeps the insurance affordable.)
    """
    if now < plan.prewarm_at:
        return 0
    start, hold = spec.start_time, spec.scaling.plan_hold
    relays = plan.relays
    if peak is not None and now >= start + hold * NO_SHOW_GRACE_SHARE:
        evidence = min(spec.expected_audience, peak * LATE_ARRIVAL_FACTOR)
        relays = min(relays, _relays_for(evidence, spec))
    if now < start + hold:
        return relays
    elapsed = (now - start - hold) / hold
    remaining = max(0, DECAY_STEPS - math.floor(elapsed * DECAY_STEPS)) / DECAY_STEPS
    return math.ceil(relays * remaining - 1e-9)


def decide(
    spec: AudioRoomSpec,
    plan: Plan,
    observation: Observation,
    state: ScalingState,
    now: datetime,
    *,
    startup_seconds: float | None = None,
) -> Decision:
    """The next relay count for a room, from what was observed at `now`.

    `startup_seconds` is the measured relay start-up (see `startup_estimate`); the spec's
    hint is used without it. The returned `Decision.state` is the `state` of the next call.
    """
    scaling = spec.scaling
    current = state.relays
    startup = startup_seconds if startup_seconds is not None else spec.relay.startup_seconds

    if observation.listeners is None:
        # Without a single reading there is no evidence of a no-show: keep the whole plan.
        floor = plan_floor(spec, plan, now, state.peak if state.peak > 0 else None)
        target = min(scaling.max_relays, max(current, floor, scaling.min_relays))
        relays = _grow(current, target, floor, spec)
        next_state = replace(state, samples=(), targets=())
        why = f"metrics unavailable: holding {current:,} relays (never scaling down blind)"
        if relays > current:
            why += f"; plan floor {floor:,} relays"
        return _finish(spec, observation, next_state, now, relays, None, floor, False, why)

    demand = observation.listeners + observation.waiting
    sampled_at = observation.sampled_at or now
    samples = _remember_sample(state.samples, sampled_at, demand)
    rate = _join_rate(samples)
    lead = timedelta(seconds=startup) + DECISION_MARGIN + max(timedelta(0), now - sampled_at)
    forecast = round(demand + max(0.0, rate) * lead.total_seconds())
    peak = max(state.peak, demand)
    floor = plan_floor(spec, plan, now, peak)
    needed = _relays_for(forecast, spec)
    demanded = min(scaling.max_relays, max(scaling.min_relays, needed))
    target = min(scaling.max_relays, max(demanded, floor))
    window = scaling.scale_down_stabilization
    targets = _remember_target(state.targets, now, demanded, window)

    per_relay = spec.relay.listeners_per_relay * scaling.target_utilization
    beyond_tolerance = forecast > current * per_relay * (1 + UP_TOLERANCE)
    if target > current and (beyond_tolerance or max(floor, scaling.min_relays) > current):
        relays = _grow(current, target, floor, spec)
    elif target < current and _covers_window(targets, now, window):
        relays = min(current, max(target, max(n for _, n in targets)))
    else:
        relays = current

    why = (
        f"listeners {observation.listeners:,}"
        + (f" (+{observation.waiting:,} waiting)" if observation.waiting else "")
        + f", forecast {forecast:,} in {round(lead.total_seconds())}s"
        + f", capacity {capacity_of(current, spec):,}"
    )
    if floor > needed and floor >= target:
        why += f", plan floor {floor:,} relays"
    if relays < current:
        why += f", lower for {_minutes(window)}"
    elif current < relays < target:
        why += f", growing in bounded steps towards {target:,}"
    capacity_exceeded = needed > scaling.max_relays
    if capacity_exceeded:
        why += f"; needs {needed:,} relays, above maxRelays {scaling.max_relays:,}"
    next_state = replace(state, samples=samples, targets=targets, peak=peak)
    return _finish(
        spec, observation, next_state, now, relays, forecast, floor, capacity_exceeded, why
    )


def _finish(
    spec: AudioRoomSpec,
    observation: Observation,
    state: ScalingState,
    now: datetime,
    relays: int,
    forecast: int | None,
    floor: int,
    capacity_exceeded: bool,
    why: str,
) -> Decision:
    """Apply the relay count to the drain bookkeeping and word the decision."""
    current = state.relays
    since = dict(state.draining)
    if relays > current:
        for ordinal in range(current, relays):
            since.pop(ordinal, None)  # a draining relay is the cheapest new relay
    for ordinal in range(relays, current):
        since[ordinal] = now
    timeout = spec.scaling.drain_timeout
    # Empty only by a sample taken after the drain began: an older one predates the joins
    # the relay took while it still accepted them.
    sampled_at = observation.sampled_at or now
    empty = {
        o
        for o, began in since.items()
        if sampled_at > began and observation.relay_listeners.get(o, 1) <= 0
    }
    expired = {o for o, began in since.items() if now - began >= timeout}
    top = max([relays - 1] + [o for o in since if o not in empty | expired]) + 1
    removed = {o for o in since if o >= top}
    still = tuple(sorted((o, t) for o, t in since.items() if o not in removed))
    timed_out = tuple(sorted(removed & expired - empty))

    direction: Direction = "up" if relays > current else "down" if relays < current else "hold"
    if direction == "up":
        why = f"scaling up {current:,} -> {relays:,} relays: {why}"
    elif direction == "down":
        why = f"draining {current - relays:,} relays ({current:,} -> {relays:,}): {why}"
    if timed_out:
        why += (
            f"; removed {len(timed_out):,} relays still carrying listeners after drainTimeout "
            f"{_minutes(timeout)}"
        )
    next_state = replace(state, relays=relays, draining=still)
    return Decision(
        relays=relays,
        replicas=next_state.replicas,
        draining=tuple(o for o, _ in still),
        drain_timed_out=timed_out,
        direction=direction,
        listeners=observation.listeners,
        forecast=forecast,
        capacity=capacity_of(relays, spec),
        floor=floor,
        capacity_exceeded=capacity_exceeded,
        reason=why,
        state=next_state,
    )


def _relays_for(listeners: float, spec: AudioRoomSpec) -> int:
    per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
    return math.ceil(listeners / per_relay - 1e-9) if listeners > 0 else 0


def _grow(current: int, target: int, floor: int, spec: AudioRoomSpec) -> int:
    """Demand grows the room in bounded steps; the declared plan (and minRelays) at once.

    The step bound guards against one bad sample; the plan is no sample, and pre-warming
    715 relays in eight doubling steps would only delay readiness.
    """
    declared = min(spec.scaling.max_relays, max(floor, spec.scaling.min_relays))
    return min(target, max(_step_up(current, target), declared))


def _step_up(current: int, target: int) -> int:
    return min(target, max(current * SCALE_UP_FACTOR, current + SCALE_UP_MIN_STEP))


def _remember_sample(
    samples: tuple[tuple[datetime, int], ...], at: datetime, demand: int
) -> tuple[tuple[datetime, int], ...]:
    if samples and at <= samples[-1][0]:
        return samples  # the same scrape seen again
    kept = [s for s in samples if at - s[0] <= RATE_WINDOW]
    return (*kept, (at, demand))


def _join_rate(samples: tuple[tuple[datetime, int], ...]) -> float:
    """Listeners per second over the window; 0 until two samples 10 s apart exist."""
    if len(samples) < 2:
        return 0.0
    (t0, d0), (t1, d1) = samples[0], samples[-1]
    seconds = (t1 - t0).total_seconds()
    return (d1 - d0) / seconds if seconds >= 10 else 0.0


def _remember_target(
    targets: tuple[tuple[datetime, int], ...], now: datetime, target: int, window: timedelta
) -> tuple[tuple[datetime, int], ...]:
    """Keep per-slice maxima of the targets, so the window's maximum survives restarts."""
    width = window / STABILIZATION_BUCKETS
    kept = [(t, n) for t, n in targets if t + width > now - window]
    if kept and now < kept[-1][0] + width:
        began, highest = kept[-1]
        kept[-1] = (began, max(highest, target))
    else:
        kept.append((now, target))
    return tuple(kept)


def _covers_window(
    targets: tuple[tuple[datetime, int], ...], now: datetime, window: timedelta
) -> bool:
    """True once the remembered targets reach back a full window (not after a gap)."""
    return bool(targets) and now - targets[0][0] >= window


def _minutes(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
