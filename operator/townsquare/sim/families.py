"""Trace families: audiences nobody here wrote, drawn from a family's parameters and a seed.

Five hand-written traces cannot judge a policy whose constants were tuned on them. Each
family below draws a room and its audience from wide ranges (audiences of 1,000 to 700,000,
declared/actual from 0.05 to 2 and beyond for no-shows and flash crowds, storms of 30 s to
10 min, relay start-up of 10 to 120 s), so that figures are medians and p95s over many
traces, never one curve.

Seeds are split once, here: constants of the policy are chosen on TUNING_SEEDS only, and
`make bench` reports on EVALUATION_SEEDS only. The two ranges are disjoint, and a case's
randomness comes from its family and seed alone, so every figure can be replayed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from townsquare.api.models import AudioRoomSpec
from townsquare.sim.model import Settings
from townsquare.sim.trace import Trace

TUNING_SEEDS = range(0, 100_000)
"""Seeds the policy's constants may be tuned on."""
EVALUATION_SEEDS = range(1_100_000, 1_200_000)
"""Seeds the benchmark reports on; never used to choose a constant. Moved from
[1,000,000, 1,100,000) when the policy was changed after its figures on that range had
been read (and the relay-crash family was corrected): a range whose results were seen
cannot judge the changes made after seeing them."""
RETIRED_EVALUATION_SEEDS = range(1_000_000, 1_100_000)
"""The earlier evaluation range: read, so neither tuned on nor reported again."""
START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
STEP = 30
"""Seconds between the rows of a generated trace (linear between them)."""
TAIL = 15 * 60
"""The trace goes on this long after the audience has left: draining costs too."""
GLITCH_FACTOR_MAX = 10.0
"""A glitched scrape reads up to this many times too high or too low (the issue's range)."""


@dataclass(frozen=True)
class Case:
    """One generated room and audience, with the world's true relay start-up."""

    family: str
    seed: int
    spec: AudioRoomSpec
    trace: Trace
    settings: Settings
    facts: dict[str, float] = field(default_factory=dict)
    """The drawn parameters, for reading a case by hand."""


@dataclass
class _Draw:
    """The shared parameters of a room, drawn once per case."""

    rng: random.Random
    listeners_per_relay: int = 1000
    utilization: float = 0.7
    startup: float = 45.0
    hint: int = 45
    noise: float = 0.01

    @classmethod
    def of(cls, rng: random.Random) -> _Draw:
        startup = rng.uniform(10, 120)
        return cls(
            rng=rng,
            listeners_per_relay=rng.choice((500, 1000, 1000, 2000)),
            utilization=rng.uniform(0.6, 0.8),
            startup=startup,
            hint=max(1, round(startup * _log_uniform(rng, 0.7, 1.4))),
            noise=rng.uniform(0.003, 0.02),
        )

    def relays_for(self, listeners: float) -> int:
        return math.ceil(listeners / (self.listeners_per_relay * self.utilization))

    def room(self, declared: float, peak: float, duration_minutes: float) -> AudioRoomSpec:
        """A room whose maxRelays suffices for both the plan and the real peak."""
        most = max(20, math.ceil(1.5 * self.relays_for(max(declared, peak))) + 10)
        return AudioRoomSpec.model_validate(
            {
                "startTime": START,
                "duration": f"{math.ceil(duration_minutes)}m",
                "expectedAudience": round(declared),
                "relay": {
                    "image": "relay:sim",
                    "listenersPerRelay": self.listeners_per_relay,
                    "startupSeconds": self.hint,
                },
                "scaling": {
                    "targetUtilization": round(self.utilization, 3),
                    "minRelays": 2,
                    "maxRelays": most,
                },
            }
        )

    def case(
        self, family: str, seed: int, curve: Callable[[float], float], facts: dict[str, float]
    ) -> Case:
        """The case of an audience `curve` from `facts["since"]` to `facts["ends"]` (seconds
        from the start), for `facts["declared"]` listeners declared, `facts["peak"]` at most."""
        since, ends = facts["since"], facts["ends"]
        spec = self.room(facts["declared"], facts["peak"], ends / 60)
        settings = Settings(relay_startup=self.startup, seed=seed)
        return Case(family, seed, spec, self.trace(curve, since, ends), settings, facts)

    def trace(self, curve: Callable[[float], float], start: float, end: float) -> Trace:
        """Rows every STEP seconds of `curve`, with multiplicative noise, then the tail."""
        times, values = [], []
        t = start
        while t <= end + TAIL:
            value = curve(t) if t <= end else 0.0
            values.append(max(0.0, value * (1 + self.rng.gauss(0, self.noise))))
            times.append(float(t))
            t += STEP
        return Trace(tuple(times), tuple(values))


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _ramp(t: float, begin: float, seconds: float) -> float:
    """0 before `begin`, 1 after `begin + seconds`, a smooth S-curve between."""
    if t <= begin:
        return 0.0
    if t >= begin + seconds:
        return 1.0
    x = (t - begin) / seconds
    return x * x * (3 - 2 * x)


def _launch(
    rng: random.Random, family: str, seed: int, *, delay: float, producer_moves: bool
) -> Case:
    """An announced launch: early listeners wait in the open room, the crowd comes when the
    host starts (`delay` seconds after the announced start), stays, and leaves."""
    draw = _Draw.of(rng)
    actual = _log_uniform(rng, 1_000, 700_000)
    declared = actual * _log_uniform(rng, 0.5, 2.0)
    duration = rng.uniform(60, 150) * 60
    opens = -rng.uniform(0, 10) * 60
    early = actual * (rng.uniform(0.02, 0.2) if delay > 0 else rng.uniform(0, 0.1))
    storm = rng.uniform(30, 600)
    leave = rng.uniform(2, 10) * 60
    drift = rng.uniform(-0.15, 0.15)
    ends = delay + duration

    def curve(t: float) -> float:
        waiting_room = early * min(1.0, max(0.0, (t - opens) / max(60.0, delay - opens)))
        crowd = (actual - early) * _ramp(t, delay, storm)
        level = (waiting_room + crowd) * (1 + drift * max(0.0, t - delay) / duration)
        return level * (1 - _ramp(t, ends - leave, leave))

    trace = draw.trace(curve, -40 * 60, ends)
    facts = {"actual": actual, "declared": declared, "delay_s": delay, "storm_s": storm}
    if producer_moves:
        noticed = rng.uniform(3, 10) * 60
        if delay > noticed:
            told = delay * rng.uniform(0.8, 1.0)
            trace = replace(trace, start_moves=((noticed, told),))
            facts |= {"moved_at_s": noticed, "moved_to_s": told}
    spec = draw.room(declared, actual, duration / 60)
    return Case(family, seed, spec, trace, Settings(relay_startup=draw.startup, seed=seed), facts)


def launch_on_time(rng: random.Random, seed: int) -> Case:
    """An announced launch on time; declared/actual 0.5-2, a join storm of 30 s-10 min."""
    return _launch(rng, "launch-on-time", seed, delay=0.0, producer_moves=False)


def launch_late_within_hold(rng: random.Random, seed: int) -> Case:
    """The host is up to planHold (15 min) late and nobody touches the room."""
    delay = rng.uniform(0, 15) * 60
    return _launch(rng, "launch-late-within-hold", seed, delay=delay, producer_moves=False)


def launch_late_moved(rng: random.Random, seed: int) -> Case:
    """The host is up to 30 min late; 3-10 min in, the producer moves startTime to when the
    host says they will start (a little early: hosts run later than they say)."""
    delay = rng.uniform(0, 30) * 60
    return _launch(rng, "launch-late-moved", seed, delay=delay, producer_moves=True)


def no_show(rng: random.Random, seed: int) -> Case:
    """Announced for many, a small share came (2-25%)."""
    draw = _Draw.of(rng)
    declared = _log_uniform(rng, 5_000, 700_000)
    actual = declared * rng.uniform(0.02, 0.25)
    duration = rng.uniform(60, 150) * 60
    storm = rng.uniform(60, 600)
    leave = rng.uniform(2, 10) * 60

    def curve(t: float) -> float:
        return actual * _ramp(t, -60, storm) * (1 - _ramp(t, duration - leave, leave))

    facts = {"actual": actual, "declared": declared, "peak": actual}
    facts |= {"since": -40 * 60, "ends": duration}
    return draw.case("no-show", seed, curve, facts)


def flash_crowd(rng: random.Random, seed: int) -> Case:
    """A small declared room that something sends 10-100x its audience to within minutes."""
    draw = _Draw.of(rng)
    declared = _log_uniform(rng, 1_000, 20_000)
    base = declared * rng.uniform(0.5, 1.2)
    crowd = min(700_000.0, declared * _log_uniform(rng, 10, 100))
    duration = rng.uniform(60, 120) * 60
    flash_at = rng.uniform(5, 40) * 60
    storm = rng.uniform(30, 180)
    stays = rng.uniform(10, 40) * 60
    fades = rng.uniform(5, 20) * 60

    def curve(t: float) -> float:
        level = base * _ramp(t, 0, 120)
        surge = (crowd - base) * _ramp(t, flash_at, storm)
        surge *= 1 - _ramp(t, flash_at + storm + stays, fades)
        return (level + surge) * (1 - _ramp(t, duration - 300, 300))

    facts = {"declared": declared, "crowd": crowd, "storm_s": storm, "peak": crowd}
    facts |= {"since": -30 * 60, "ends": duration, "flash_at_s": flash_at}
    return draw.case("flash-crowd", seed, curve, facts)


def oscillating(rng: random.Random, seed: int) -> Case:
    """An audience that swings between a low and a high 1.5-3x the low (a debate, a match)."""
    draw = _Draw.of(rng)
    declared = _log_uniform(rng, 5_000, 300_000)
    high = declared * rng.uniform(1.0, 1.5)
    low = high * rng.uniform(1 / 3, 2 / 3)  # the example swings 50k <-> 150k
    period = rng.uniform(6, 40) * 60
    duration = rng.uniform(60, 150) * 60
    phase = rng.uniform(0, 2 * math.pi)

    def curve(t: float) -> float:
        swing = (1 - math.cos(2 * math.pi * t / period + phase)) / 2
        level = low + (high - low) * swing
        return level * _ramp(t, -120, 240) * (1 - _ramp(t, duration - 300, 300))

    facts = {"declared": declared, "low": low, "high": high, "period_s": period, "peak": high}
    facts |= {"since": -30 * 60, "ends": duration}
    return draw.case("oscillating", seed, curve, facts)


def slow_burn(rng: random.Random, seed: int) -> Case:
    """Word of mouth: a modest start, the audience grows for 40-120 min."""
    draw = _Draw.of(rng)
    actual = _log_uniform(rng, 5_000, 700_000)
    declared = actual * _log_uniform(rng, 0.5, 2.0)
    first = actual * rng.uniform(0.05, 0.3)
    grows = rng.uniform(40, 120) * 60
    power = rng.uniform(1.0, 2.0)
    duration = grows + rng.uniform(10, 40) * 60
    leave = rng.uniform(2, 10) * 60

    def curve(t: float) -> float:
        growth = math.pow(min(max(t, 0.0), grows) / grows, power)
        level = first * _ramp(t, -300, 300) + (actual - first) * growth
        return level * (1 - _ramp(t, duration - leave, leave))

    facts = {"actual": actual, "declared": declared, "grows_s": grows, "peak": actual}
    facts |= {"since": -30 * 60, "ends": duration}
    return draw.case("slow-burn", seed, curve, facts)


def relay_crash(rng: random.Random, seed: int) -> Case:
    """An on-time launch in which up to (1 - targetUtilization) of the relays die at once,
    after the crowd came: the survivors' headroom must take their listeners."""
    while True:
        case = _launch(rng, "relay-crash", seed, delay=0.0, producer_moves=False)
        crowd_in = case.facts["storm_s"] + 120
        last = max(case.trace.times) - TAIL - 15 * 60
        at = rng.uniform(crowd_in, max(crowd_in, last))
        running = crash_bound_relays(case, at)
        most = math.floor((1 - case.spec.scaling.target_utilization) * running + 1e-9)
        if most >= 1:
            break
        # Too small a room: one relay is more than its headroom can lose (1 of 2 is 50%).
    share = rng.uniform(0.05, 1 - case.spec.scaling.target_utilization)
    failures = ((at, min(most, max(1, math.floor(share * running)))),)
    facts = case.facts | {"crash_share": share, "crash_at_s": at, "crash_running": running}
    return Case(
        case.family, seed, case.spec, replace(case.trace, failures=failures), case.settings, facts
    )


def crash_bound_relays(case: Case, at: float) -> int:
    """Relays the room needs at `at` at its target utilization (the oracle's count, at least
    minRelays): the fewest any policy with that headroom runs, so a crash of a share of
    them is at most that share of any policy's relays."""
    demand = case.trace.per_second()[math.floor(at) - case.trace.start]
    per_relay = case.spec.relay.listeners_per_relay * case.spec.scaling.target_utilization
    return max(case.spec.scaling.min_relays, math.ceil(demand / per_relay - 1e-9))


def metric_outage(rng: random.Random, seed: int) -> Case:
    """An on-time launch during which Prometheus returns nothing for 1-10 min, 1-3 times."""
    case = _launch(rng, "metric-outage", seed, delay=0.0, producer_moves=False)
    last = max(case.trace.times) - TAIL
    outages = []
    for _ in range(rng.randint(1, 3)):
        begin = rng.uniform(-10 * 60, last - 10 * 60)
        outages.append((begin, begin + rng.uniform(1, 10) * 60))
    trace = replace(case.trace, outages=tuple(sorted(outages)))
    return Case(case.family, seed, case.spec, trace, case.settings, case.facts)


def glitch(rng: random.Random, seed: int) -> Case:
    """An on-time launch in which single scrapes read up to 10x too high or too low."""
    case = _launch(rng, "glitch", seed, delay=0.0, producer_moves=False)
    last = max(case.trace.times) - TAIL
    glitches = []
    for _ in range(rng.randint(1, 3)):
        factor = rng.uniform(2, GLITCH_FACTOR_MAX)
        glitches.append((rng.uniform(0, last), factor if rng.random() < 0.5 else 1 / factor))
    trace = replace(case.trace, glitches=tuple(sorted(glitches)))
    return Case(case.family, seed, case.spec, trace, case.settings, case.facts)


FAMILIES: dict[str, Callable[[random.Random, int], Case]] = {
    "launch-on-time": launch_on_time,
    "launch-late-within-hold": launch_late_within_hold,
    "launch-late-moved": launch_late_moved,
    "no-show": no_show,
    "flash-crowd": flash_crowd,
    "oscillating": oscillating,
    "slow-burn": slow_burn,
    "relay-crash": relay_crash,
    "metric-outage": metric_outage,
    "glitch": glitch,
}


def generate(family: str, seed: int) -> Case:
    """The case of `family` drawn from `seed`: the same case in every process and run."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family](random.Random(f"{family}/{seed}"), seed)


def seeds(kind: str, per_family: int) -> Iterator[tuple[str, int]]:
    """(family, seed) pairs: the first `per_family` seeds of `kind` (tuning or evaluation)."""
    chosen = {"tuning": TUNING_SEEDS, "evaluation": EVALUATION_SEEDS}[kind]
    for family in FAMILIES:
        for seed in chosen[:per_family]:
            yield family, seed
