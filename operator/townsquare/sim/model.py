"""The discrete-time model: relays, scrapes, listeners, and one loop per policy.

Time moves in 1 s steps over the trace. A relay takes its start-up time (with jitter) from
creation to Ready; a policy sees listener counts only as of the last scrape, which may be
missing (a metric outage) or wrong (a glitch), and every policy sees the same scrapes.

Every policy is judged on one figure, *unserved listener-seconds*: listeners waiting for a
relay plus listeners on an overloaded relay (a relay above `listenersPerRelay` degrades
everyone on it). The baselines have no admission control: every listener connects, and
they are modelled with perfect load balancing over the Ready relays (the most favourable
assumption for them), so when demand exceeds what the Ready relays carry, every listener
is overloaded. townsquare's listeners are placed by the shard map as the edge sees it: the
edge reads a published map `edge_delay` seconds late, sends each shard's listeners to its
relay while that map's admission is open (overloading the relay if the demand outgrew it
meanwhile) and queues what does not fit once the map says `queueing`; a join whose shard's
relay has no seat (full, not Ready, or none) sits as a guest on a relay that has one, and
waits only when no relay has. Overload is computed from those relay loads, never assumed 0.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import plan_room
from townsquare.scaling import Observation, ScalingState, decide, startup_estimate
from townsquare.sharding import (
    ADMISSION_MARGIN,
    ShardMap,
    in_transit_by_shard,
    new_map,
    rebalance,
    shard_listeners_from_relays,
)
from townsquare.sim.baselines import (
    Hpa,
    cron_window,
    keda_metrics,
    oracle_relays,
    reactive_metrics,
)
from townsquare.sim.edge import Edge, RelayLoads
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
    edge_delay: int = 5
    """Seconds from publishing a shard map to the edge acting on it."""
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
    listener_seconds: float = 0.0
    """All demand over the trace: the scale of the waiting share."""
    relay_seconds: int = 0
    cost_vs_oracle: float = 0.0
    migrated_listeners: float = 0.0
    scale_events: int = 0
    scale_ups: int = 0
    peak_relays: int = 0
    series: Series | None = None

    @property
    def unserved_listener_seconds(self) -> float:
        """Waiting plus overloaded: the one figure every policy is compared on."""
        return self.waiting_listener_seconds + self.overloaded_listener_seconds

    def figures(self) -> dict[str, Any]:
        """The figures as `simulate -o json` prints them."""
        return {
            "unserved_listener_seconds": round(self.unserved_listener_seconds),
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
        self.listener_seconds += demand
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


class _Scrapes:
    """What Prometheus answers at each scrape: the truth, a glitch, or nothing."""

    def __init__(self, trace: Trace, interval: int) -> None:
        self.outages = trace.outages
        self.factors: dict[int, float] = {}
        for t, factor in trace.glitches:
            scrape = trace.start + math.ceil((t - trace.start) / interval) * interval
            self.factors[scrape] = self.factors.get(scrape, 1.0) * factor

    def read(self, t: int, value: float) -> float | None:
        if any(begin <= t < end for begin, end in self.outages):
            return None
        return value * self.factors.get(t, 1.0)

    def factor(self, t: int) -> float:
        return self.factors.get(t, 1.0)


class _Fleet:
    """The relay StatefulSet: ordinals 0..size-1, some still starting."""

    def __init__(self, size: int, startup: float, rng: random.Random) -> None:
        self.size = size
        self.startup = startup
        self.rng = rng
        self.starting: dict[int, tuple[float, float]] = {}  # ordinal -> (created, ready at)
        self.next_ready = math.inf
        self.measured: list[float] = []
        self.version = 0
        """Advances whenever the set of Ready relays may have changed."""

    def ready(self) -> int:
        return self.size - len(self.starting)

    def is_ready(self, ordinal: int) -> bool:
        return ordinal < self.size and ordinal not in self.starting

    def _start(self, ordinal: int, t: float) -> None:
        ready_at = t + self.startup * self.rng.uniform(*STARTUP_JITTER)
        self.starting[ordinal] = (t, ready_at)
        self.next_ready = min(self.next_ready, ready_at)

    def resize(self, size: int, t: float) -> None:
        if size != self.size:
            self.version += 1
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
        self.version += bool(done)
        return bool(done)

    def fail(self, count: int, t: float) -> list[int]:
        """Kill `count` Ready relays; the StatefulSet restarts them."""
        ready = [o for o in range(self.size) if o not in self.starting]
        victims = sorted(self.rng.sample(ready, min(count, len(ready))))
        for ordinal in victims:
            self._start(ordinal, t)
        self.version += 1
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
            result.scale_ups += relays > previous
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
    """An HPA (and KEDA on top of it) over perfectly balanced relays without admission.

    The KEDA user configured the cron window for the announced event and does not move it
    when the host is late. Without a reading the HPA keeps its size; KEDA reads nothing as
    0 listeners (`ignoreNullValues`), so its cron floor is all that holds.
    """
    result = _new_result(policy, settings)
    scaling, capacity = spec.scaling, spec.relay.listeners_per_relay
    hpa = Hpa(min_replicas=max(1, scaling.min_relays), max_replicas=scaling.max_relays)
    startup = settings.relay_startup or spec.relay.startup_seconds
    fleet = _Fleet(hpa.min_replicas, startup, random.Random(settings.seed))
    cron = cron_window(spec)
    scrapes = _Scrapes(trace, settings.scrape_interval)
    failures = _failures(trace)
    scraped: float | None = demand[0]
    for i, t in enumerate(range(trace.start, trace.end + 1)):
        wanted = demand[i]
        if t in failures:
            fleet.fail(failures[t], t)
        fleet.advance(t)
        if i % settings.scrape_interval == 0:
            scraped = scrapes.read(t, wanted)
        if i % settings.hpa_sync == 0 and (scraped is not None or policy == "keda"):
            if policy == "keda":
                metrics = keda_metrics(cron, spec, t, scraped or 0.0)
            else:
                metrics = reactive_metrics(spec, scraped or 0.0)
            replicas = hpa.recommend(t, fleet.size, metrics)
            if replicas != fleet.size:
                result.scale_events += 1
                result.scale_ups += replicas > fleet.size
                removed = sum(fleet.is_ready(o) for o in range(replicas, fleet.size))
                if removed:
                    result.migrated_listeners += wanted * removed / max(1, fleet.ready())
                fleet.resize(replicas, t)
        ready = fleet.ready()
        over = wanted if wanted > ready * capacity else 0.0
        result.record(t, wanted, ready, fleet.size, 0.0, over)
    return result


@dataclass(frozen=True)
class _Scrape:
    """One reading of the room as the operator gets it (already glitched)."""

    t: int
    connected: float
    waiting: float
    loads: RelayLoads
    """Listeners per relay as the relays counted them (not glitched: `factor` does that)."""
    factor: float

    def of(self, ordinal: int) -> float:
        return self.loads.of(ordinal) * self.factor

    def by_relay(self) -> dict[int, float]:
        return {o: load * self.factor for o, load in self.loads.all().items()}


class _Townsquare:
    """The operator and the edge in miniature: scrape, decide, resize, reshard, place."""

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
        self.sets_key: tuple[int, tuple[int, ...], int] | None = None
        self.most: int | None = None
        """Most shards on one active relay, for the current map and relay sets."""
        self.pending = False
        self.unpublished: deque[tuple[int, ShardMap]] = deque()
        self.published_at: int | None = None
        self.map_counts: dict[int, int] = {}
        self.edge_map: ShardMap = self.map
        self.edge_counts: dict[int, int] = {}
        self.edge = Edge(self.shards, self.capacity)
        self.scrape: _Scrape | None = None
        self.resharded_at_scrape = -1
        self.migrated = 0.0

    def at(self, t: float) -> datetime:
        return self.start_time + timedelta(seconds=t)

    # The edge: the map it acts on, and where the demand lands.

    def publish(self, t: int, shard_map: ShardMap) -> None:
        self.unpublished.append((t, shard_map))

    def edge_catches_up(self, t: int) -> bool:
        """The edge acts on every map published at least `edge_delay` seconds ago."""
        caught = False
        while self.unpublished and self.unpublished[0][0] + self.settings.edge_delay <= t:
            self.edge_map = self.unpublished.popleft()[1]
            self.edge_counts = self.edge_map.counts()
            caught = True
        return caught

    def regroup(self) -> None:
        """The edge re-sorts the relays (a new map, a relay Ready, crashed or gone)."""
        fleet = self.fleet
        self.edge.regroup(self.edge_counts, self.edge_map.relays, fleet.size, fleet.starting)

    def serve(self, wanted: float) -> tuple[float, float, float]:
        """One second: (connected, waiting, overloaded) when `wanted` want to listen."""
        return self.edge.step(wanted, self.edge_map.admission == "queueing")

    def take_scrape(self, t: int, connected: float, waiting: float, scrapes: _Scrapes) -> None:
        """Prometheus scrapes the relays and the edge; an outage leaves the room unread.

        The edge reads the relays' counts from the same Prometheus, glitches and all."""
        if scrapes.read(t, 1.0) is None:
            self.scrape = None
            return
        factor = scrapes.factor(t)
        loads = self.edge.loads()
        self.scrape = _Scrape(t, connected * factor, waiting * factor, loads, factor)
        if self.edge.report(factor):
            self.regroup()

    # The operator: one reconcile.

    def move_start(self, t: int, new_start: float) -> None:
        """The producer edits startTime; the operator replans at once (a new generation)."""
        self.spec = self.spec.model_copy(update={"start_time": self.at(new_start)})
        startup = startup_estimate(self.spec.relay.startup_seconds, tuple(self.fleet.measured))
        self.plan = plan_room(self.spec, self.at(t), startup)

    def end(self) -> float:
        """Seconds after the announced start at which the event ends (startTime may move)."""
        return (self.spec.start_time + self.spec.duration - self.start_time).total_seconds()

    def drain(self, t: int) -> None:
        """Past the end, as `lifecycle` does: the relays stay until a reading shows no
        listener left (or the drain timeout passes), then all go at once."""
        if self.fleet.size == 0:
            return
        timeout = self.spec.scaling.drain_timeout.total_seconds()
        emptied = self.scrape is not None and round(self.scrape.connected) == 0
        if emptied or t >= self.end() + timeout:
            self.fleet.resize(0, t)
            self.regroup()

    def control(self, t: int) -> str:
        """One reconcile; returns the decision's direction."""
        scrape = self.scrape
        if scrape is None:
            observation = Observation(listeners=None)
        else:
            observation = Observation(
                listeners=round(scrape.connected),
                waiting=round(scrape.waiting),
                sampled_at=self.at(scrape.t),
                relay_listeners={o: round(scrape.of(o)) for o, _ in self.state.draining},
            )
        startup = startup_estimate(self.spec.relay.startup_seconds, tuple(self.fleet.measured))
        decision = decide(
            self.spec, self.plan, observation, self.state, self.at(t), startup_seconds=startup
        )
        self.state = decision.state
        if scrape is not None:
            for ordinal in decision.drain_timed_out:
                self.migrated += scrape.of(ordinal)  # forced reconnects
        self.fleet.resize(decision.replicas, t)
        key = (decision.relays, decision.draining, self.fleet.version)
        if key != self.sets_key or self.relay_sets is None:
            starting, size = self.fleet.starting, self.fleet.size
            active = frozenset(o for o in range(min(size, decision.relays)) if o not in starting)
            draining = frozenset(o for o in decision.draining if o < size and o not in starting)
            relay_sets = (active, draining)
            changed = relay_sets != self.relay_sets
        else:
            relay_sets, changed = self.relay_sets, False
        self.sets_key = key
        if changed or self.needs_rebalance(relay_sets, scrape):
            self.reshard(t, *relay_sets, scrape)
        return decision.direction

    def expected(self, scrape: _Scrape) -> float:
        """The demand admission is judged on: what was read, or the forecast if higher."""
        return max(scrape.connected + scrape.waiting, float(self.state.forecast))

    def needs_rebalance(
        self, relay_sets: tuple[frozenset[int], frozenset[int]], scrape: _Scrape | None
    ) -> bool:
        """Skip calls that would change nothing (the simulator's only shortcut): the relay
        sets are unchanged (the caller checked), so only pending moves or a reading that
        flips the admission state would change the map."""
        if self.pending:
            return True
        if scrape is None or scrape.t == self.resharded_at_scrape:
            return False
        demand = self.expected(scrape)
        if self.most is None:
            counts = self.map_counts
            self.most = max((counts.get(r, 0) for r in relay_sets[0]), default=0)
        most = self.most
        active, limit = len(relay_sets[0]), self.capacity * ADMISSION_MARGIN
        full = demand > active * limit or demand * most / self.shards > limit
        return full != (self.map.admission == "queueing")

    def reshard(
        self,
        t: int,
        active: frozenset[int],
        draining: frozenset[int],
        scrape: _Scrape | None,
    ) -> None:
        """Rebalance from what the operator read, exactly as the lifecycle does."""
        by_relay = None if scrape is None else scrape.by_relay()
        weights = None if by_relay is None else shard_listeners_from_relays(self.map, by_relay)
        in_transit = None if by_relay is None else in_transit_by_shard(self.map, by_relay)
        demand = None if scrape is None else self.expected(scrape)
        # As the lifecycle does: the per-minute cap times the time since the last publication.
        since = t - self.published_at if self.published_at is not None else 60
        budget = self.spec.sharding.max_migrations_per_minute * min(since, 60)
        change = rebalance(
            self.map,
            active=sorted(active),
            draining=sorted(draining, reverse=True),  # highest first, as the lifecycle
            shard_listeners=weights,
            demand=demand,
            fanout=self.spec.sharding.fanout,
            budget=budget / 60,
            in_transit=in_transit,
        )
        if change.map.generation != self.map.generation:
            self.publish(t, change.map)
            self.published_at = t
            self.map_counts = change.map.counts()
        self.map = change.map
        self.pending = change.pending
        self.migrated += change.migrated
        self.relay_sets = (active, draining)
        self.most = None
        self.resharded_at_scrape = scrape.t if scrape is not None else -1


def _run_townsquare(
    spec: AudioRoomSpec, trace: Trace, demand: list[float], settings: Settings
) -> Result:
    result = _new_result("townsquare", settings)
    room = _Townsquare(spec, trace, settings)
    room.reshard(trace.start, frozenset(range(room.fleet.size)), frozenset(), None)
    room.edge_catches_up(trace.start + settings.edge_delay)  # the room was set up earlier
    room.regroup()
    if room.edge.report(1.0):  # and its relays have reported since
        room.regroup()
    scrapes = _Scrapes(trace, settings.scrape_interval)
    failures = _failures(trace)
    moves = {math.floor(t): new_start for t, new_start in trace.start_moves}
    window_opens = max(0, settings.scrape_interval - round(room.edge.admit_ttl))
    for i, t in enumerate(range(trace.start, trace.end + 1)):
        wanted = demand[i]
        event = False  # a change the operator is told of by a watch, not by its timer
        if t in failures:
            room.fleet.fail(failures[t], t)
            event = True
        if t in moves:
            room.move_start(t, moves[t])
            event = True
        became_ready = room.fleet.advance(t)
        event = event or became_ready  # the operator watches relay pods: Ready wakes it
        if room.edge_catches_up(t) or event:
            room.regroup()
        connected, waiting, overloaded = room.serve(wanted)
        if i % settings.scrape_interval == window_opens:
            room.edge.window_opens()
        if i % settings.scrape_interval == 0:
            room.take_scrape(t, connected, waiting, scrapes)
        if t >= room.end():
            room.drain(t)  # the lifecycle's Draining phase: no more decisions
        elif event or i % settings.control_interval == 0:
            size = room.fleet.size
            direction = room.control(t)
            result.scale_events += direction != "hold"
            result.scale_ups += direction == "up"
            if room.edge_catches_up(t) or room.fleet.size < size:
                room.regroup()
        result.record(t, wanted, room.fleet.ready(), room.fleet.size, waiting, overloaded)
    result.migrated_listeners = room.migrated
    return result
