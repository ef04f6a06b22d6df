"""Observations -> desired relays, with the reason in numbers (pure).

One call, `decide`, serves the live operator and the simulator alike: it takes the room's
spec and plan, what was observed at `now`, and the state the previous call returned, and it
gives back a `Decision` whose `state` goes into the next call. The state is a small frozen
value that round-trips through a JSON-compatible dict, so the operator can keep it in the
cluster and pick up after a restart exactly where it left off.

The rules, each for a reason a person on call would give:

- Forecast, not just follow: a new relay needs its start-up time before it carries anyone,
  so demand is projected over that lead at the recent join rate (a robust slope, so one bad
  scrape does not bend it), adding at most FORECAST_GROWTH_CAP of the demand; the announced
  crowd arriving around the start is projected over the whole lead, up to twice what was
  declared (a storm of a minute outruns a relay's start-up otherwise). The rate is
  the lower of that slope and the newest interval's: a crowd that has stopped arriving
  stops the forecast at once, where the window's slope would carry every ramp past its top.
  Only the announced crowd surging (more than SURGE in one scrape) is projected at the
  newest interval's rate alone: the window's slope, still full of the quiet before the
  storm, would order its relays a minute late.
- A new sample, not a reconcile, moves the forecast. Every StatefulSet write wakes the
  operator again; the same scrape seen twice must not take a second step.
- One scrape is never enough for a big move: demand grows the room by one bounded step on
  a single sample, and up to one bounded step beyond what the previous sample asked (a
  single-scrape glitch moves one step; a crowd still arriving is followed at the pace of
  the newest sample, not one scrape behind it).
- The declared plan is a floor from pre-warm until `planHold` after the start: a late
  host and a no-show look alike until the crowd comes, so the plan is never yielded within
  the hold. After it, the floor yields to the evidence (3x the peak seen) and decays. A
  room already pre-warmed whose start is moved later keeps its relays (`plan_floor`).
  Listeners who come within one pre-warm lead before `prewarmAt`, more than minRelays
  carry, start the plan then: the announced crowd is arriving early. Once the crowd has
  come (after the start, at least 1/ANNOUNCED_SURPRISE of the declared audience, no
  longer arriving) the plan has done its job and the floor is gone: no late host is
  still to come, and the stabilization window holds what was observed.
- Up at once (within the bounds above); down only after a full stabilization window in
  which the observed demand stayed lower, and only by draining: relays that still carry
  listeners are never removed before they empty or their drain timeout passes. The window
  holds observed demand, not forecasts: a forecast that did not come true is not kept.
  Small drops (under DOWN_TOLERANCE) are not worth a drain, except once, a window after
  demand last grew the room: relays the forecast added and the demand never used are a
  guess undone, not a drop, and they go however few they are. Near the declared end the
  window shortens to END_STABILIZATION: an audience leaving at the end does not come back.
- Fail-static: without a fresh listener count the size is held, never lowered, except
  towards a maxRelays lowered below it, and then only where no listener is dropped on the
  way: a drained relay's listeners must move within drainTimeout at the pace the relays
  move them, and the relays kept must have room for the largest audience known (peak this
  occurrence, the plan's audience while its floor holds); a room with no count showing a
  listener this occurrence holds its relays (`_blind_towards_limit`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import Plan, capacity_of

RATE_WINDOW = timedelta(seconds=120)
"""The join rate is the demand's slope over this window: long enough to smooth scrapes."""
FORECAST_GROWTH_CAP = 0.3
"""A forecast adds at most this share of the current demand over one lead (chosen on the
tuning seeds of `townsquare.sim.families`: 0.5 left flash crowds waiting, 2 overshot)."""
FORECAST_HORIZON = timedelta(seconds=60)
"""Demand is projected at most this far ahead, however slow relays start (except the
announced crowd's arrival, see ANNOUNCED_SURPRISE)."""
ANNOUNCED_SURPRISE = 2
"""Up to this multiple of the declared audience, a crowd arriving for the first time before
`planHold` has passed is projected at its join rate over the whole start-up lead, neither
capped at FORECAST_GROWTH_CAP nor at FORECAST_HORIZON: an announced crowd comes in a storm
of a minute or two, and a relay ordered less than a lead before it is needed comes too late.
2 is the issue's range for a declared audience (declared/actual 0.5-2); beyond it, and in
later swings, demand must show itself first. On tuning seeds 0-59 it cut the p95 waiting of
on-time launches with a crash from 0.14% to 0.064% and of late hosts from 0.12% to 0.03%,
for oscillating cost p95 1.546x -> 1.573x (seeds 0-149); a flash crowd, 10-100x its
declared audience, soon passes 2x and keeps the cap (its peak figure did not move)."""
SURGE = 0.1
"""A rise of more than this share of the demand between two scrapes, while the announced
crowd is arriving, is its storm beginning: its rate is taken from the newest interval at
once instead of the window's robust slope, which still holds the quiet before the storm and
lags it by half the window. One glitched scrape still moves the room one bounded step at
most. Chosen on tuning seeds 0-119 (late host within the hold: waiting p95 0.096% ->
0.071%, max 0.53% -> 0.37%; on-time launch with a crash 0.124% -> 0.066%; costs alike);
the newest interval used on every rise instead, noise included, cost late hosts 1.057x ->
1.084x keda-style's at p95; the lower of the two newest intervals, on every rise while
arriving, only 0.096% -> 0.086% waiting for 1.062x."""
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
DOWN_TOLERANCE = 0.1
"""Relays are drained only when the room can shrink by more than 10%. 3% cost launches 2-3%
less on tuning seeds 0-19, but drained oscillating rooms in many small steps: on tuning seeds
80-229, 3 of 150 oscillating rooms made more scale events than the HPA (none at 10%)."""
END_STABILIZATION = timedelta(minutes=2)
"""Within one stabilization window of the declared end, a drop is the audience leaving,
not a swing that comes back: relays drain after this much lower demand, not a full window.
On tuning seeds 0-59: on-time cost p95 1.348x -> 1.319x, slow burn 1.708x -> 1.661x,
oscillating 1.57x -> 1.516x (scale events p95 0.42 -> 0.61 of the HPA's), waiting alike."""
DECAY_SHARE = 0.5
"""After the hold the floor decays over this share of `planHold` (0.5 and 1 waited alike on
the tuning seeds; 0.5 cost no-shows and slow burns 2-3% less)."""
DECAY_STEPS = 10
"""The plan floor decays in this many steps, not one relay per tick."""
STABILIZATION_BUCKETS = 10
"""The stabilization window is remembered as this many per-slice maxima (a small state)."""
LATE_ARRIVAL_FACTOR = 3
"""After the hold, the plan floor keeps at most 3x the peak demand seen (no-show insurance)."""
POSTPONEMENT_KEPT = timedelta(hours=1)
"""A pre-warmed room whose start moves later keeps its relays if the new start is this near."""
BLIND_DRAIN_PACE = timedelta(minutes=1)
"""Above a lowered maxRelays with no count, one step of relays begins draining a minute."""
BLIND_DRAIN_FILL = 0.9
"""Blind, relays drain only down to as many as hold the largest audience known with the
busiest of them at 90% of its capacity. The map balances shard counts to within one, so
the busiest relay holds ceil(shards / relays) shards, up to a sixth above the average at
5 shards a relay; and listeners hash unevenly over shards. A full relay turns moved
listeners away, and they are dropped with their draining relay at drainTimeout."""
BLIND_DRAIN_TIME_SHARE = 0.8
"""A relay drains blind only if its listeners, as many as it may carry, can move within
this share of drainTimeout: no count will show it empty, so it goes at the timeout, and the
edge may hold some moves (it tells them again later, spending the relay's pace again)."""
STARTUP_PRIOR_WEIGHT = 3
"""The spec's start-up hint counts as this many measured start-ups."""

Direction = Literal["up", "down", "hold"]


DRAIN_SETTLE = timedelta(seconds=2)
"""A count shows a drained relay empty only when it was taken this long after the drain
began. The map that marks the relay draining reaches the edges a moment after the pass that
decided it, and the count a moment after a listener connects (a scrape of what the relay
last counted): a join the edge admitted meanwhile, by the older map, may not be in a count
taken just after the drain began, and removing the relay then drops that listener."""


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
    forecast: int = 0
    """The forecast made from the newest sample; a repeated sample reuses it."""
    asked: int = 0
    """Relays the newest sample asked for: the next sample may go one bounded step past it."""
    need: int = 0
    """Relays the newest sample's observed demand needs (no forecast)."""
    prewarmed: bool = False
    """The plan floor has been in force: a start moved later keeps the relays."""
    grown_at: datetime | None = None
    """When demand last grew the room; a window later, relays it never used are trimmed."""
    moved_at: datetime | None = None
    """When the shard map last gave shards a new relay: listeners may be on their way from
    one relay to another until a moment after it. The pass that moves them stamps its own
    time; the next one, the time that map was published."""
    moved_unpublished: bool = False
    """`moved_at` is still the moving pass's time: its map's publication is not known yet."""
    arrived_at: datetime | None = None
    """When the announced crowd was seen to have come (see `plan_floor`): from then on the
    plan floor is gone."""
    relays_moved_at: tuple[tuple[int, datetime | None], ...] | None = None
    """While the room is closed (its end drain): when the map last moved shards onto or off
    each relay, dated as `moved_at` is (None: by a map not published yet). A relay the map
    drains is empty by a reading taken a moment after its own last move, whatever moves
    other relays make later: the drain's later moves go to the relays that receive, never
    to it. None: not tracked (the room is open, or its closed passes have not begun); the
    room's `moved_at` stands for every relay then. Kept in the process only (not in
    `to_dict`): it grows with the relays, and after a restart `moved_at` stands in."""
    empty_sampled_at: datetime | None = None
    """When the first reading of the whole room empty since the map last moved shards was
    sampled, on the metrics source's clock (the end drain confirms it with a reading sampled
    later still: a pass time on the operator's clock says nothing of which scrape a reading
    is, and a repeat of the same scrape proves nothing)."""

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
            "forecast": self.forecast,
            "asked": self.asked,
            "need": self.need,
            "prewarmed": self.prewarmed,
            "grownAt": None if self.grown_at is None else _iso(self.grown_at),
            "arrivedAt": None if self.arrived_at is None else _iso(self.arrived_at),
            "movedAt": None if self.moved_at is None else _iso(self.moved_at),
            "movedUnpublished": self.moved_unpublished,
            "emptySampledAt": None
            if self.empty_sampled_at is None
            else _iso(self.empty_sampled_at),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScalingState:
        return cls(
            relays=int(data["relays"]),
            draining=tuple((int(o), _parse(t)) for o, t in data.get("draining", ())),
            samples=tuple((_parse(t), int(d)) for t, d in data.get("samples", ())),
            targets=tuple((_parse(t), int(n)) for t, n in data.get("targets", ())),
            peak=int(data.get("peak", 0)),
            forecast=int(data.get("forecast", 0)),
            asked=int(data.get("asked", 0)),
            need=int(data.get("need", 0)),
            prewarmed=bool(data.get("prewarmed", False)),
            grown_at=_parse(data["grownAt"]) if data.get("grownAt") else None,
            arrived_at=_parse(data["arrivedAt"]) if data.get("arrivedAt") else None,
            moved_at=_parse(data["movedAt"]) if data.get("movedAt") else None,
            moved_unpublished=bool(data.get("movedUnpublished", False)),
            empty_sampled_at=(
                _parse(data["emptySampledAt"]) if data.get("emptySampledAt") else None
            ),
        )


@dataclass(frozen=True)
class TowardsLimit:
    """A blind room above a lowered maxRelays: how many relays, and why."""

    relays: int
    reason: str
    held: bool
    """The limit is out of reach blind: the relays above it stay, accepting joins."""


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
    towards_limit: TowardsLimit | None = None
    """Blind above a lowered maxRelays: drains towards it, or holds where that would drop
    listeners (see `_blind_towards_limit`); None otherwise."""

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


def plan_floor(
    spec: AudioRoomSpec,
    plan: Plan,
    now: datetime,
    peak: int | None,
    *,
    prewarmed: bool = False,
    arrived_at: datetime | None = None,
) -> int:
    """Relays the declared plan still guarantees at `now`, given the `peak` demand seen.

    Before `prewarmAt` there is no floor. From `prewarmAt` the whole plan holds until
    `start + planHold`: nothing tells a host who is late from an audience that will not
    come until the crowd arrives, and draining the plan early is what left the May 2023
    launch melting. A room already pre-warmed (`prewarmed`) whose producer moved the start
    later keeps the plan until the new start plus the hold, if the new start is within
    POSTPONEMENT_KEPT; a longer postponement lets the relays go and pre-warms again.

    Unless the crowd has come (`arrived_at`, at or after the start): then the host is not
    late, the plan has done its job, and there is no floor. A crowd that came before a
    start moved later does not count (the producer expects another).

    After the hold the floor yields to the evidence, at most LATE_ARRIVAL_FACTOR times the
    peak seen (a no-show stops paying for the plan), and decays linearly in DECAY_STEPS
    steps to nothing over DECAY_SHARE of another `planHold`. Demand beyond it is caught by
    the forecast.
    """
    start, hold = spec.start_time, spec.scaling.plan_hold
    if now < plan.prewarm_at and not (prewarmed and start - now <= POSTPONEMENT_KEPT):
        return 0
    if arrived_at is not None and arrived_at >= start:
        return 0
    relays = plan.relays
    if now < start + hold:
        return relays
    if peak is not None:
        evidence = min(spec.expected_audience, peak * LATE_ARRIVAL_FACTOR)
        relays = min(relays, _relays_for(evidence, spec))
    elapsed = (now - start - hold) / (hold * DECAY_SHARE)
    remaining = max(0, DECAY_STEPS - math.floor(elapsed * DECAY_STEPS)) / DECAY_STEPS
    return math.ceil(relays * remaining - 1e-9)


def _crowd_came(
    spec: AudioRoomSpec, now: datetime, samples: tuple[tuple[datetime, int], ...], forecast: int
) -> bool:
    """After the start, the demand is the announced crowd and it has stopped arriving.

    At least 1/ANNOUNCED_SURPRISE of the declared audience (a declared audience is a guess
    within that factor either way), and a forecast within UP_TOLERANCE of the demand, made
    from a measured join rate (two samples 10 s apart at least: one reading alone, say the
    first after a restart or in a room created late, tells nothing of the crowd's pace).
    Stopped means within a stabilization window too: the window's join rate adds less
    than UP_TOLERANCE of the demand over one. A room filling slowly while its host is late
    (the May 2023 launch: 200 a second for 40 minutes) grows under 10% per start-up lead
    and would pass for a crowd come; draining its plan then only to grow again left its
    listeners waiting (the example: 335,420 -> 690,890 listener-s; 191,372 with this). Early
    listeners waiting for a late host are a share of the crowd to come, not the crowd; an
    audience that stops at half of what was declared is a smaller crowd than hoped, and
    holding the plan for it to grow is what the stabilization window is for. On tuning
    seeds 0-119 it cut the cost of on-time launches from 1.31x to 1.242x the oracle's at
    p95 (worst 1.473x -> 1.336x); waiting alike but for launches with a crash (the plan's
    spare relays no longer absorb it: p95 0.066% -> 0.076%).
    """
    demand, window = samples[-1][1], spec.scaling.scale_down_stabilization
    return (
        now >= spec.start_time
        and demand * ANNOUNCED_SURPRISE >= spec.expected_audience
        and forecast <= demand * (1 + UP_TOLERANCE)
        and math.isfinite(_newest_rate(samples))
        and _join_rate(samples) * window.total_seconds() <= UP_TOLERANCE * demand
    )


def _early_audience(spec: AudioRoomSpec, plan: Plan, now: datetime, demand: int) -> bool:
    """Listeners came within one pre-warm lead before `prewarmAt`, more than minRelays
    carry: the announced crowd is arriving early, so the plan starts now, not at prewarmAt
    (a room that opens early fills its first relays while new ones take their start-up)."""
    if not plan.prewarm_at - plan.lead <= now < plan.prewarm_at:
        return False
    return _relays_for(demand, spec) > spec.scaling.min_relays


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
        peak = state.peak if state.peak > 0 else None
        floor = plan_floor(
            spec, plan, now, peak, prewarmed=state.prewarmed, arrived_at=state.arrived_at
        )
        target = max(current, min(scaling.max_relays, max(floor, scaling.min_relays)))
        relays = _grow(current, target, floor, spec)
        next_state = replace(state, samples=(), targets=(), prewarmed=state.prewarmed or floor > 0)
        why = f"metrics unavailable: holding {current:,} relays (never scaling down blind)"
        if relays > current:
            why += f"; plan floor {floor:,} relays"
        limit = None
        if current > scaling.max_relays:
            limit = _blind_towards_limit(spec, state, now, floor)
            relays, why = limit.relays, limit.reason
        decision = _finish(spec, observation, next_state, now, relays, None, floor, False, why)
        return replace(decision, towards_limit=limit)

    demand = observation.listeners + observation.waiting
    sampled_at = observation.sampled_at or now
    new_sample = not state.samples or sampled_at > state.samples[-1][0]
    lead = timedelta(seconds=startup) + DECISION_MARGIN + max(timedelta(0), now - sampled_at)
    samples = state.samples
    if new_sample:
        samples = _remember_sample(state.samples, sampled_at, demand)
    if new_sample:
        # A crowd at its highest yet, before the hold ends, is the announced one arriving.
        arriving = demand >= state.peak and now < spec.start_time + scaling.plan_hold
        rate = _newest_rate(samples)
        if not (arriving and _surging(samples)):
            rate = min(_join_rate(samples), rate)
        rate = max(0.0, rate)
        forecast = _forecast(demand, rate, lead, spec, arriving=arriving)
        need = _relays_for(demand, spec)
    else:  # the same scrape again: nothing new is known, so nothing moves
        forecast, need = state.forecast, state.need
    peak = max(state.peak, demand)
    arrived_at = state.arrived_at
    if arrived_at is not None and arrived_at < spec.start_time:
        arrived_at = None  # the start moved later: the producer expects another crowd
    if arrived_at is None and new_sample and _crowd_came(spec, now, samples, forecast):
        arrived_at = now
    floor = plan_floor(spec, plan, now, peak, prewarmed=state.prewarmed, arrived_at=arrived_at)
    early = floor == 0 and _early_audience(spec, plan, now, demand)
    if early:
        floor = plan.relays
    needed = _relays_for(forecast, spec)
    demanded = min(scaling.max_relays, max(scaling.min_relays, needed))
    target = min(scaling.max_relays, max(demanded, floor))
    window = scaling.scale_down_stabilization
    if now >= spec.start_time + spec.duration - window:  # the audience leaves, not swings
        window = min(window, END_STABILIZATION)
    # The window remembers what two samples in a row needed: one bad scrape never holds it.
    observed = min(scaling.max_relays, max(scaling.min_relays, min(need, state.need or need)))
    targets = _remember_target(state.targets, now, observed, window)

    per_relay = spec.relay.listeners_per_relay * scaling.target_utilization
    beyond_tolerance = forecast > current * per_relay * (1 + UP_TOLERANCE)
    declared = min(scaling.max_relays, max(floor, scaling.min_relays))
    grow_to = max(current, declared)
    if new_sample and demanded > current and beyond_tolerance:
        # The previous sample vouches for its own ask and one bounded step beyond it: a
        # crowd still arriving is followed at the pace of the newest sample, while one
        # glitched scrape still moves the room at most one step past the last true ask.
        confirmed = _step_up(state.asked, demanded) if state.asked else 0
        grow_to = max(grow_to, min(demanded, max(_step_up(current, demanded), confirmed)))
    grown_at = state.grown_at
    # A window after demand last grew the room, relays its forecast added that the demand
    # never came to use go, however few: they are no drop in demand, just a guess undone.
    unused = grown_at is not None and now - grown_at >= window
    if grow_to > current:
        relays = grow_to
        grown_at = now if grow_to > declared else grown_at
    elif target < current and _covers_window(targets, now, window):
        lower = max(target, max(n for _, n in targets))
        # Otherwise, like the HPA's tolerance: a drop of a few percent is not worth a drain
        # and, when demand swings, a re-grow a minute later.
        worth = unused or lower < current * (1 - DOWN_TOLERANCE)
        relays = lower if lower < current and worth else current
    else:
        relays = current
    if unused and relays <= current:
        grown_at = None

    why = (
        f"listeners {observation.listeners:,}"
        + (f" (+{observation.waiting:,} waiting)" if observation.waiting else "")
        + f", forecast {forecast:,} in {round(lead.total_seconds())}s"
        + f", capacity {capacity_of(current, spec):,}"
    )
    if floor > needed and floor >= target:
        why += f", plan floor {floor:,} relays"
        if early:
            why += " (listeners came before the pre-warm: it starts now)"
    if relays < current:
        why += f", lower for {_minutes(window)}"
    elif current < relays < target:
        why += f", growing in bounded steps towards {target:,}"
    capacity_exceeded = needed > scaling.max_relays
    if capacity_exceeded:
        why += f"; needs {needed:,} relays, above maxRelays {scaling.max_relays:,}"
    next_state = replace(
        state,
        samples=samples,
        targets=targets,
        peak=peak,
        forecast=forecast,
        asked=demanded if new_sample else state.asked,
        need=need,
        prewarmed=state.prewarmed or floor > 0,
        grown_at=grown_at,
        arrived_at=arrived_at,
    )
    return _finish(
        spec, observation, next_state, now, relays, forecast, floor, capacity_exceeded, why
    )


def blind_move_minutes(spec: AudioRoomSpec, relays_in_map: int) -> float:
    """Minutes a draining relay needs to send away as many listeners as it may carry.

    Each relay tells its own listeners to move at its share of the room's migration budget,
    maxMigrationsPerMinute over the relays in the map (`relay.server.Relay.moves_per_second`),
    however many relays drain: draining more at once does not drain any faster.
    """
    budget = spec.sharding.max_migrations_per_minute
    if budget <= 0:
        return math.inf
    return spec.relay.listeners_per_relay * max(1, relays_in_map) / budget


def blind_drain_floor(spec: AudioRoomSpec, listeners: float, relays: int) -> int | None:
    """The fewest relays, not below maxRelays and at most `relays`, that take `listeners`
    with the busiest at BLIND_DRAIN_FILL of its capacity (None: not even `relays` do)."""
    shards, limit = spec.sharding.shards, spec.relay.listeners_per_relay * BLIND_DRAIN_FILL
    per_shard = listeners / shards
    for kept in range(max(1, spec.scaling.max_relays), relays + 1):
        if math.ceil(shards / kept) * per_shard <= limit:
            return kept
    return None


def blind_audience(spec: AudioRoomSpec, state: ScalingState, floor: int) -> float | None:
    """The most listeners the relays may carry, as far as anything known says, while no
    count comes; None when no count this occurrence ever showed a listener.

    The newest count understates an audience that grew since, so this is the largest of
    what was counted (the peak this occurrence), what the newest counts asked for (relays
    at the target utilization, and the forecast), and, while the plan floor is in force,
    the audience the producer declared: a room that pre-warms and goes live on its plan
    without a count carries its plan, not nothing. A room never counted (or counted empty:
    the crowd may have come since) has nothing to bound it, so nothing drains."""
    if state.peak <= 0:
        return None
    per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
    known = [state.peak, state.forecast, state.need * per_relay, state.asked * per_relay]
    if floor > 0:
        known.append(spec.expected_audience)
    return float(max(known))


def _blind_towards_limit(
    spec: AudioRoomSpec, state: ScalingState, now: datetime, floor: int
) -> TowardsLimit:
    """Relays for a room above a lowered maxRelays while no count comes, and why.

    maxRelays is the ceiling the producer (or the tenant's quota) set, so it is reached
    blind too, but only where no listener is dropped on the way. A relay drained blind is
    shown empty by no count, so it goes at drainTimeout; its listeners must have moved by
    then, at the pace the relays move them (`blind_move_minutes`), and as many as it may
    carry (listenersPerRelay), as nothing says how many it does. The relays kept must have
    room for the largest audience known (`blind_audience`, `blind_drain_floor`); a room
    with no count showing a listener this occurrence holds, as its relays may be full.
    Where the listeners cannot move in time or the relays kept could not take them, the
    relays stay and the reason says so. Otherwise each minute as many relays begin
    draining as the migration budget moves were they full, the next step a minute after
    the last began. Once counts return the limit applies as to any room. An audience that
    grows while blind past everything known is not seen: the drain keeps room for the
    largest audience known, with the busiest relay kept at BLIND_DRAIN_FILL of its capacity.
    """
    scaling = spec.scaling
    current = state.relays
    why = f"metrics unavailable; maxRelays {scaling.max_relays:,} is below {current:,} relays"
    then = "; once listener counts return, the limit applies as to any room"
    audience = blind_audience(spec, state, floor)
    if audience is None:
        reason = (
            f"{why}: holding them, as no listener count this occurrence showed how many "
            f"they carry (they may be full){then}"
        )
        return TowardsLimit(current, reason, held=True)
    lowest = blind_drain_floor(spec, audience, current) or current
    if lowest >= current:
        reason = (
            f"{why}: holding them, as the relays kept must take the {audience:,.0f} "
            f"listeners of the largest audience known with the busiest below "
            f"{BLIND_DRAIN_FILL:.0%} of its capacity{then}"
        )
        return TowardsLimit(current, reason, held=True)
    relays_in_map = state.replicas
    needed = blind_move_minutes(spec, relays_in_map)
    allowed = scaling.drain_timeout.total_seconds() / 60 * BLIND_DRAIN_TIME_SHARE
    if needed > allowed:
        pace = spec.sharding.max_migrations_per_minute / max(1, relays_in_map)
        reason = (
            f"{why}: holding them, as a relay drained blind may carry "
            f"{spec.relay.listeners_per_relay:,} listeners and its listeners move at "
            f"{pace:,.0f} a minute (maxMigrationsPerMinute "
            f"{spec.sharding.max_migrations_per_minute:,} over {relays_in_map:,} relays): "
            f"{needed:,.0f}m, beyond {allowed:,.0f}m ({BLIND_DRAIN_TIME_SHARE:.0%} of "
            f"drainTimeout {_minutes(scaling.drain_timeout)}), so it would go with listeners "
            f"on it; raise maxMigrationsPerMinute or drainTimeout to drain blind{then}"
        )
        return TowardsLimit(current, reason, held=True)
    step = max(1, spec.sharding.max_migrations_per_minute // spec.relay.listeners_per_relay)
    if any(now - since < BLIND_DRAIN_PACE for _, since in state.draining):
        return TowardsLimit(
            current, f"{why}: the next relays drain a minute after the last began", held=False
        )
    relays = max(lowest, current - step)
    kept = (
        f", keeping {lowest:,} to take the {audience:,.0f} listeners of the largest audience known"
        if lowest > scaling.max_relays
        else ""
    )
    reason = (
        f"{why}: draining towards it blind, {step:,} relays a minute (what "
        f"{spec.sharding.max_migrations_per_minute:,} migrations a minute move were they "
        f"full; each relay's listeners move within {needed:,.0f}m){kept}"
    )
    return TowardsLimit(relays, reason, held=False)


def _forecast(
    demand: int, rate: float, lead: timedelta, spec: AudioRoomSpec, *, arriving: bool = False
) -> int:
    """Demand projected at the join rate: over at most FORECAST_HORIZON, adding at most
    FORECAST_GROWTH_CAP of the demand; or, for the announced crowd `arriving`, over the
    whole lead up to ANNOUNCED_SURPRISE times the declared audience."""
    per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
    most = max(demand * FORECAST_GROWTH_CAP, per_relay * SCALE_UP_MIN_STEP)
    rate = max(0.0, rate)
    added = min(most, rate * min(lead, FORECAST_HORIZON).total_seconds())
    if arriving:
        announced = spec.expected_audience * ANNOUNCED_SURPRISE - demand
        added = max(added, min(announced, rate * lead.total_seconds()))
    return round(demand + added)


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
    # Empty only by a sample taken after the drain began (and settled): an older one
    # predates the joins the relay took while it still accepted them.
    sampled_at = observation.sampled_at or now
    empty = {
        o
        for o, began in since.items()
        if sampled_at > began + DRAIN_SETTLE and observation.relay_listeners.get(o, 1) <= 0
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
    if timed_out and observation.listeners is None:
        why += (
            f"; removed {len(timed_out):,} relays at drainTimeout {_minutes(timeout)}, "
            "without a count to show whether they were empty"
        )
    elif timed_out:
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
    """Listeners per second over the window: the median slope of sample pairs at least
    10 s apart (Theil-Sen), so one glitched scrape among three cannot tilt it; 0 until
    such a pair exists."""
    slopes = sorted(
        (d1 - d0) / seconds
        for i, (t0, d0) in enumerate(samples)
        for t1, d1 in samples[i + 1 :]
        if (seconds := (t1 - t0).total_seconds()) >= 10
    )
    if not slopes:
        return 0.0
    middle = len(slopes) // 2
    return slopes[middle] if len(slopes) % 2 else (slopes[middle - 1] + slopes[middle]) / 2


def _newest_rate(samples: tuple[tuple[datetime, int], ...]) -> float:
    """Listeners per second between the newest sample and the latest one at least 10 s
    before it; infinite until such a pair exists."""
    if len(samples) < 2:
        return math.inf
    t1, d1 = samples[-1]
    for t0, d0 in reversed(samples[:-1]):
        seconds = (t1 - t0).total_seconds()
        if seconds >= 10:
            return (d1 - d0) / seconds
    return math.inf


def _surging(samples: tuple[tuple[datetime, int], ...]) -> bool:
    """The newest sample is more than SURGE above the latest one at least 10 s before it."""
    t1, d1 = samples[-1]
    for t0, d0 in reversed(samples[:-1]):
        if (t1 - t0).total_seconds() >= 10:
            return d1 > d0 * (1 + SURGE)
    return False


def _remember_target(
    targets: tuple[tuple[datetime, int], ...], now: datetime, target: int, window: timedelta
) -> tuple[tuple[datetime, int], ...]:
    """Keep per-slice maxima of the targets, so the window's maximum survives restarts.

    The newest slice that began at or before the window's start stays too: its target held
    until the next decision, inside the window, and it is what shows the window covered.
    Decisions come at no fixed pace (a quiet room re-decides every few seconds plus the
    pass's own time), so no pass may be required to land within one slice of the start.
    """
    width = window / STABILIZATION_BUCKETS
    begins = now - window
    before = [(t, n) for t, n in targets if t <= begins]
    kept = before[-1:] + [(t, n) for t, n in targets if t > begins]
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
