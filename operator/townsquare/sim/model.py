"""The discrete-time model: relays, scrapes, listeners, and one loop per policy.

Time moves in 1 s steps over the trace. A relay takes its start-up time (with jitter) from
creation to Ready; a policy sees listener counts only as of the last scrape; a relay carries
at most `listenersPerRelay`. Without admission control (the baselines) every listener
connects, and when demand exceeds what the Ready relays carry, every listener sits on an
overloaded relay: the baselines are modelled with perfect load balancing across Ready
relays, which is the most favourable assumption for them. townsquare places listeners by
its shard map and holds the excess in the admission queue, so it trades overload for
waiting; the model counts both.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import plan_room
from townsquare.scaling import Observation, ScalingState, decide, startup_estimate
from townsquare.sharding import ShardMap, new_map, rebalance
from townsquare.sim.baselines import Hpa, keda_metrics, oracle_relays, reactive_metrics
from townsquare.sim.trace import Trace

POLICIES = ("townsquare", "reactive", "keda", "oracle")
STARTUP_JITTER = (0.9, 1.4)
"""A relay's start-up is the nominal time times a factor drawn from this range."""
MEASURED_STARTUPS_KEPT = 20


@dataclass(frozen=True)
class Settings:
    """How the world behaves; the defaults are those of the `simulate` command."""

    relay_startup: float | None = None
    """True relay start-up in seconds; the room's `startupSeconds` hint when None."""
    scrape_interval: int = 15
    control_interval: int = 5
    hpa_sync: int = 15
    seed: int = 7
    keep_series: bool = False


@dataclass
class Series:
    """Per-second figures of one run, for plots."""

    t: list[int] = field(default_factory=list)
    demand: list[float] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    pods: list[int] = field(default_factory=list)
    waiting: list[float] = field(default_factory=list)
    overloaded: list[float] = field(default_factory=list)


@dataclass
class Result:
    """The figures of one policy on one trace."""

    policy: str
    overloaded_listener_seconds: float = 0.0
    waiting_listener_seconds: float = 0.0
    relay_seconds: int = 0
    cost_vs_oracle: float = 0.0
    migrated_listeners: float = 0.0
    scale_events: int = 0
    peak_relays: int = 0
    series: Series | None = None

    def figures(self) -> dict[str, Any]:
        """The figures as `simulate -o json` prints them."""
        return {
            "overloaded_listener_seconds": round(self.overloaded_listener_seconds),
            "waiting_listener_seconds": round(self.waiting_listener_seconds),
            "relay_seconds": self.relay_seconds,
            "cost_vs_oracle": round(self.cost_vs_oracle, 3),
            "migrated_listeners": round(self.migrated_listeners),
            "scale_events": self.scale_events,
            "peak_relays": self.peak_relays,
        }

    def record(
        self, t: int, demand: float, ready: int, pods: int, wait: float, over: float
    ) -> None:
        self.overloaded_listener_seconds += over
        self.waiting_listener_seconds += wait
        self.relay_seconds += pods
        self.peak_relays = max(self.peak_relays, pods)
        if self.series is not None:
            s = self.series
            s.t.append(t)
            s.demand.append(demand)
            s.ready.append(ready)
            s.pods.append(pods)
            s.waiting.append(wait)
            s.overloaded.append(over)


class _Fleet:
    """The relay StatefulSet: ordinals 0..size-1, some still starting."""

    def __init__(self, size: int, startup: float, rng: random.Random) -> None:
        self.size = size
        self.startup = startup
        self.rng = rng
        self.starting: dict[int, tuple[float, float]] = {}  # ordinal -> (created, ready at)
        self.next_ready = math.inf
        self.measured: list[float] = []

    def ready(self) -> int:
        return self.size - len(self.starting)

    def is_ready(self, ordinal: int) -> bool:
        return ordinal < self.size and ordinal not in self.starting

    def _start(self, ordinal: int, t: float) -> None:
        ready_at = t + self.startup * self.rng.uniform(*STARTUP_JITTER)
        self.starting[ordinal] = (t, ready_at)
        self.next_ready = min(self.next_ready, ready_at)

    def resize(self, size: int, t: float) -> None:
        for ordinal in range(self.size, size):
            self._start(ordinal, t)
        for ordinal in range(size, self.size):
            self.starting.pop(ordinal, None)
        self.size = size

    def advance(self, t: float) -> bool:
        """Mark relays Ready whose time has come; True if any did."""
        if t < self.next_ready:
            return False
        done = [o for o, (_, ready_at) in self.starting.items() if ready_at <= t]
        for ordinal in done:
            created, ready_at = self.starting.pop(ordinal)
            self.measured.append(ready_at - created)
        del self.measured[:-MEASURED_STARTUPS_KEPT]
        self.next_ready = min((r for _, r in self.starting.values()), default=math.inf)
        return bool(done)

    def fail(self, count: int, t: float) -> list[int]:
        """Kill `count` Ready relays; the StatefulSet restarts them."""
        ready = [o for o in range(self.size) if o not in self.starting]
        victims = sorted(self.rng.sample(ready, min(count, len(ready))))
        for ordinal in victims:
            self._start(ordinal, t)
        return victims


def simulate(
    spec: AudioRoomSpec,
    trace: Trace,
    policies: tuple[str, ...] = POLICIES,
    settings: Settings | None = None,
) -> dict[str, Result]:
    """Run each policy over the trace; `cost_vs_oracle` compares with the oracle's cost."""
    settings = settings or Settings()
    demand = trace.per_second()
    runners = {
        "townsquare": _run_townsquare,
        "reactive": _run_reactive,
        "keda": _run_keda,
        "oracle": _run_oracle,
    }
    results = {name: runners[name](spec, trace, demand, settings) for name in policies}
    oracle = (
        results["oracle"] if "oracle" in results else _run_oracle(spec, trace, demand, settings)
    )
    for result in results.values():
        result.cost_vs_oracle = result.relay_seconds / max(1, oracle.relay_seconds)
    return results


def _new_result(policy: str, settings: Settings) -> Result:
    return Result(policy=policy, series=Series() if settings.keep_series else None)


def _failures(trace: Trace) -> dict[int, int]:
    failures: Counter[int] = Counter()
    for t, count in trace.failures:
        failures[math.floor(t)] += count
    return dict(failures)


def _run_oracle(
    spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings
) -> Result:
    result = _new_result("oracle", settings)
    previous = None
    for t, wanted in zip(range(trace.start, trace.end + 1), demand, strict=True):
        relays = oracle_relays(wanted, spec)
        if previous is not None and relays != previous:
            result.scale_events += 1
        previous = relays
        result.record(t, wanted, relays, relays, 0.0, 0.0)
    return result


def _run_reactive(
    spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings
) -> Result:
    return _run_hpa("reactive", spec, trace, demand, settings)


def _run_keda(spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings) -> Result:
    return _run_hpa("keda", spec, trace, demand, settings)


def _run_hpa(
    policy: str, spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings
) -> Result:
    """An HPA (and KEDA on top of it) over perfectly balanced relays without admission."""
    result = _new_result(policy, settings)
    scaling, capacity = spec.scaling, spec.relay.listeners_per_relay
    hpa = Hpa(min_replicas=max(1, scaling.min_relays), max_replicas=scaling.max_relays)
    startup = settings.relay_startup or spec.relay.startup_seconds
    fleet = _Fleet(hpa.min_replicas, startup, random.Random(settings.seed))
    failures = _failures(trace)
    scraped = demand[0]
    for i, t in enumerate(range(trace.start, trace.end + 1)):
        wanted = demand[i]
        if t in failures:
            fleet.fail(failures[t], t)
        fleet.advance(t)
        if i % settings.scrape_interval == 0:
            scraped = wanted
        if i % settings.hpa_sync == 0:
            if policy == "keda":
                metrics = keda_metrics(spec, t, scraped)
            else:
                metrics = reactive_metrics(spec, scraped)
            replicas = hpa.recommend(t, fleet.size, metrics)
            if replicas != fleet.size:
                result.scale_events += 1
                removed = sum(fleet.is_ready(o) for o in range(replicas, fleet.size))
                if removed:
                    result.migrated_listeners += wanted * removed / max(1, fleet.ready())
                fleet.resize(replicas, t)
        ready = fleet.ready()
        over = wanted if wanted > ready * capacity else 0.0
        result.record(t, wanted, ready, fleet.size, 0.0, over)
    return result


class _Townsquare:
    """The operator's loop in miniature: scrape, decide, resize, reshard."""

    def __init__(self, spec: AudioRoomSpec, trace: Trace, settings: Settings) -> None:
        self.spec = spec
        self.settings = settings
        self.capacity = spec.relay.listeners_per_relay
        self.shards = spec.sharding.shards
        self.start_time = spec.start_time
        self.plan = plan_room(spec, self.at(trace.start))
        relays = spec.scaling.min_relays
        self.state = ScalingState.initial(relays)
        startup = settings.relay_startup or spec.relay.startup_seconds
        self.fleet = _Fleet(relays, startup, random.Random(settings.seed))
        self.map: ShardMap = new_map(self.shards, self.capacity)
        self.relay_sets: tuple[frozenset[int], frozenset[int]] | None = None
        self.pending = False
        self.groups: Counter[int] = Counter()  # shard count -> Ready relays holding it
        self.counts: dict[int, int] = {}
        self.migrated = 0.0
        self.directions: Counter[str] = Counter()

    def at(self, t: float) -> datetime:
        return self.start_time + timedelta(seconds=t)

    def carried(self, wanted: float) -> float:
        """Listeners connected: each Ready relay in the map takes its shards' share."""
        per_shard = wanted / self.shards
        cap = self.capacity
        return sum(n * min(cap, per_shard * k) for k, n in self.groups.items())

    def regroup(self) -> None:
        self.counts = self.map.counts()
        self.groups = Counter(k for r, k in self.counts.items() if self.fleet.is_ready(r))

    def relay_load(self, relay: int, wanted: float) -> float:
        if not self.fleet.is_ready(relay):
            return 0.0
        return min(self.capacity, wanted * self.counts.get(relay, 0) / self.shards)

    def control(self, t: int, wanted: float, scrape: tuple[int, float, float]) -> int:
        """One control tick; returns 1 if the relay count changed."""
        scraped_at, connected, waiting = scrape
        draining_loads = {o: round(self.relay_load(o, wanted)) for o, _ in self.state.draining}
        observation = Observation(
            listeners=round(connected),
            waiting=round(waiting),
            sampled_at=self.at(scraped_at),
            relay_listeners=draining_loads,
        )
        startup = startup_estimate(self.spec.relay.startup_seconds, tuple(self.fleet.measured))
        decision = decide(
            self.spec, self.plan, observation, self.state, self.at(t), startup_seconds=startup
        )
        self.state = decision.state
        for ordinal in decision.drain_timed_out:
            self.migrated += self.relay_load(ordinal, wanted)  # forced reconnects
        self.fleet.resize(decision.replicas, t)
        active = frozenset(o for o in range(decision.relays) if self.fleet.is_ready(o))
        draining = frozenset(o for o in decision.draining if self.fleet.is_ready(o))
        if self.needs_rebalance((active, draining), wanted, len(active)):
            self.reshard(active, draining, wanted)
        self.directions[decision.direction] += 1
        return 0 if decision.direction == "hold" else 1

    def needs_rebalance(
        self, relay_sets: tuple[frozenset[int], frozenset[int]], wanted: float, active: int
    ) -> bool:
        """Skip calls that would change nothing (the simulator's only shortcut)."""
        if relay_sets != self.relay_sets or self.pending:
            return True
        most = max((k for r, k in self.counts.items() if r in relay_sets[0]), default=0)
        full = wanted > active * self.capacity or wanted * most / self.shards > self.capacity
        return full != (self.map.admission == "queueing")

    def reshard(self, active: frozenset[int], draining: frozenset[int], wanted: float) -> None:
        per_relay = {r: self.relay_load(r, wanted) / k for r, k in self.counts.items() if k}
        weights = [0.0 if r is None else per_relay.get(r, 0.0) for r in self.map.assignment]
        budget = self.spec.sharding.max_migrations_per_minute * self.settings.control_interval
        change = rebalance(
            self.map,
            active=sorted(active),
            draining=sorted(draining),
            shard_listeners=weights,
            demand=wanted,
            fanout=self.spec.sharding.fanout,
            budget=budget / 60,
        )
        self.map = change.map
        self.pending = change.pending
        self.migrated += change.migrated
        self.relay_sets = (active, draining)
        self.regroup()


def _run_townsquare(
    spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings
) -> Result:
    result = _new_result("townsquare", settings)
    room = _Townsquare(spec, trace, settings)
    room.reshard(frozenset(range(room.fleet.size)), frozenset(), demand[0])
    failures = _failures(trace)
    scrape = (trace.start, demand[0], 0.0)
    for i, t in enumerate(range(trace.start, trace.end + 1)):
        wanted = demand[i]
        if t in failures:
            room.fleet.fail(failures[t], t)
            room.regroup()  # their listeners lost the connection; the next tick reshards
        if room.fleet.advance(t):
            room.regroup()
        connected = room.carried(wanted)
        waiting = wanted - connected
        if i % settings.scrape_interval == 0:
            scrape = (t, connected, waiting)
        if i % settings.control_interval == 0:
            result.scale_events += room.control(t, wanted, scrape)
            connected = room.carried(wanted)
            waiting = wanted - connected
        result.record(t, wanted, room.fleet.ready(), room.fleet.size, max(0.0, waiting), 0.0)
    result.migrated_listeners = room.migrated
    return result
