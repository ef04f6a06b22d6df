"""The shard map: which relay carries which listeners, and how that changes gently (pure).

Listeners hash to a fixed number of virtual shards (`shard_of`); shards, not listeners, are
assigned to relays. The map is what the edge reads: it sends a join to its shard's relay,
queues it when the map says the relays are full, and tells each relay its upstream in the
fan-out tree. It is published as a JSON document (`ShardMap.to_dict`) with a generation
that advances on every change.

`rebalance` moves as little as it can: shard counts are balanced to within one, and the
relays that keep the extra shard are those that already hold the most, so growing from n to
n+1 relays moves about 1/(n+1) of the shards (the least any balanced map can move) and
removing a relay moves only that relay's shards. Moving a shard that has listeners means
they reconnect elsewhere, so such moves spend a migration budget (maxMigrationsPerMinute
times the time since the last call) and what does not fit waits for the next call.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

RelayState = Literal["active", "draining"]
ADMISSION_MARGIN = 0.9
"""The queue turns on once a relay is expected at 90% of its capacity, not 100%: the map
reaches the edge a publication after the reading it was made from, and joins keep coming
meanwhile. In queueing mode the edge still fills each relay up to its full capacity."""
Admission = Literal["open", "queueing", "closed"]
"""`closed`: the event is over (or the room deleted): the edge admits no new join, and only
moves listeners already in the room, off draining relays onto the active ones."""


def shard_of(listener_id: str, shards: int) -> int:
    """The shard of a listener: a stable hash, the same in every process and release.

    Python's `hash()` is salted per process, so two operator replicas (or an operator and an
    edge) would disagree; BLAKE2b does not.
    """
    digest = hashlib.blake2b(listener_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


@dataclass(frozen=True)
class ShardMap:
    """Shards to relay ordinals, relay states, admission and the fan-out tree."""

    generation: int
    assignment: tuple[int | None, ...]
    """Relay ordinal of every shard; None while no relay can take it."""
    relays: Mapping[int, RelayState]
    parents: Mapping[int, int | None]
    """Upstream relay of each relay; None means the origin feeds it."""
    admission: Admission
    """`queueing`: demand exceeds what the relays carry; the edge holds new joins."""
    capacity: int
    """Listeners one relay may carry; the edge never places more on it."""
    migrations_per_minute: int | None = None
    """The room's maxMigrationsPerMinute, which the edge replicas share when they tell
    listeners of moved shards where to go (None: the map does not say; no cap)."""
    since: Mapping[int, int] = field(default_factory=dict)
    """The generation from which each relay has been in its present state (a relay left out:
    not known, a map from before this was published). A relay judges an admit ticket by it:
    one issued on a generation in which the relay already drained is the edge's fault, one
    from before it began draining only crossed the new map on its way."""
    former_shards: Mapping[int, tuple[int, ...]] = field(default_factory=dict, compare=False)
    """The shards each draining relay held when it began draining: its last listeners belong
    to them, and go wherever the map now sends them (see `in_transit_by_shard`). Kept in the
    operator's memory only, not published (the ConfigMap's size is bounded without it): a
    map read back after an operator restart has none, and `in_transit_by_shard` then guesses."""

    @property
    def shards(self) -> int:
        return len(self.assignment)

    def counts(self) -> dict[int, int]:
        """Shards per relay, for every relay in the map (0 when it holds none)."""
        counts = dict.fromkeys(self.relays, 0)
        held = Counter(self.assignment)  # counted in C: the simulator asks this often
        held.pop(None, None)
        counts.update(cast(Counter[int], held))
        return counts

    def relay_for(self, listener_id: str) -> int | None:
        """Where the edge sends a listener's join."""
        return self.assignment[shard_of(listener_id, self.shards)]

    def to_dict(self) -> dict[str, Any]:
        budget = (
            {}
            if self.migrations_per_minute is None
            else {"maxMigrationsPerMinute": self.migrations_per_minute}
        )
        return {
            "generation": self.generation,
            "capacity": self.capacity,
            "admission": self.admission,
            "relays": [
                {
                    "ordinal": o,
                    "state": s,
                    "parent": self.parents.get(o),
                    **({"since": self.since[o]} if o in self.since else {}),
                }
                for o, s in sorted(self.relays.items())
            ],
            "assignment": list(self.assignment),
            **budget,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardMap:
        relays = {int(r["ordinal"]): cast(RelayState, r["state"]) for r in data["relays"]}
        parents = {int(r["ordinal"]): r.get("parent") for r in data["relays"]}
        since = {int(r["ordinal"]): int(r["since"]) for r in data["relays"] if "since" in r}
        budget = data.get("maxMigrationsPerMinute")
        return cls(
            generation=int(data["generation"]),
            assignment=tuple(None if a is None else int(a) for a in data["assignment"]),
            relays=relays,
            parents=parents,
            admission=cast(Admission, data["admission"]),
            capacity=int(data["capacity"]),
            migrations_per_minute=(None if budget is None else int(budget)),
            since=since,
        )


def new_map(shards: int, capacity: int, migrations_per_minute: int | None = None) -> ShardMap:
    """A map with no relays yet: every shard waits for one."""
    return ShardMap(0, (None,) * shards, {}, {}, "open", capacity, migrations_per_minute)


def resize(assignment: Sequence[int | None], shards: int) -> tuple[int | None, ...]:
    """The assignment for a new shard count that moves few listeners and keeps shares.

    A listener's shard is its hash modulo the count, so under `shards` new shard s gathers,
    in equal parts, the old shards congruent to s modulo g = gcd(old, new). Within each such
    class the new shards go to the relays that held the class's old shards, in proportion
    to how many each held (largest remainder, counted over the classes so far), so every
    relay keeps its share of the map to within a shard. A multiple of the old count moves
    nobody (new shard s is old shard s % old); a divisor moves nobody whose old shards of a
    class shared a relay. Other counts move listeners: a class spread over k relays keeps
    about 1/k of its listeners in place.
    """
    old = len(assignment)
    if shards == old:
        return tuple(assignment)
    classes = math.gcd(old, shards)
    per_class = shards // classes
    resized: list[int | None] = [None] * shards
    owed: Counter[int | None] = Counter()  # each relay's share so far, less what it got
    for first in range(classes):
        holders = Counter(assignment[first::classes])
        portions = {relay: per_class * held / (old // classes) for relay, held in holders.items()}
        given = {relay: math.floor(portion) for relay, portion in portions.items()}
        owed.update(portions)
        # The shards left over go to the relays owed the most so far (their share of the
        # classes up to this one, less what they got), so each keeps its share of the map to
        # within a shard; among equals, to the relay holding most of the class. (By this
        # class's remainders alone, a relay that held a little less of many classes lost
        # them all: 64 shards for a share of 81 at 2,673 -> 243 over 3 relays.)
        order = sorted(portions, key=lambda r: (given[r] - owed[r], given[r] - portions[r]))
        for relay in order[: per_class - sum(given.values())]:
            given[relay] += 1
        relays = [relay for relay, count in given.items() for _ in range(count)]
        for position, shard in enumerate(range(first, shards, classes)):
            resized[shard] = relays[position]
        owed.subtract(relays)
    return tuple(resized)


def moved_share(before: Sequence[int | None], after: Sequence[int | None]) -> float:
    """The share of listeners whose relay differs between two assignments of any shard
    counts: new shard s draws equally on the old shards congruent to s modulo the gcd."""
    classes = math.gcd(len(before), len(after))
    per_class = len(before) // classes
    held = [Counter(before[first::classes]) for first in range(classes)]
    staying = sum(held[shard % classes][relay] for shard, relay in enumerate(after))
    return 1.0 - staying / per_class / len(after) if after else 0.0


def relays_changed(before: ShardMap, after: ShardMap) -> bool:
    """Whether listeners the first map placed have another relay under the second: a shard
    that had no relay sends nobody from one relay to another."""
    if before.shards != after.shards:
        return moved_share(before.assignment, after.assignment) > 0
    return any(
        old is not None and new is not None and old != new
        for old, new in zip(before.assignment, after.assignment, strict=True)
    )


def relays_moved(before: ShardMap, after: ShardMap) -> frozenset[int]:
    """Relays listeners move off or onto from the first map to the second, as
    `relays_changed` counts moves (with another shard count, every relay either map names:
    their listeners may all move)."""
    if before.shards != after.shards:
        if moved_share(before.assignment, after.assignment) == 0:
            return frozenset()  # resized in place: every listener keeps its relay
        return frozenset(o for o in (*before.assignment, *after.assignment) if o is not None)
    return frozenset(
        relay
        for old, new in zip(before.assignment, after.assignment, strict=True)
        if old is not None and new is not None and old != new
        for relay in (old, new)
    )


@dataclass(frozen=True)
class Rebalance:
    """The new map and what changing to it costs, for the `Resharded` Event."""

    map: ShardMap
    moved: int
    """Shards given a new relay (including those of relays that are gone)."""
    migrated: float
    """Listeners on moved shards whose relay still ran: the reconnects this caused."""
    pending: bool
    """Moves were left for later because the migration budget ran out."""

    @property
    def reason(self) -> str:
        shards = self.map.shards
        text = f"moved {self.moved:,} of {shards:,} shards ({self.moved / shards:.1%})"
        text += f", {math.ceil(self.migrated):,} listeners migrated"
        return text + ("; more moves wait for the migration budget" if self.pending else "")


def rebalance(
    current: ShardMap,
    *,
    active: Iterable[int],
    draining: Iterable[int] = (),
    held: Iterable[int] = (),
    shard_listeners: Sequence[float] | None = None,
    demand: float | None = None,
    fanout: int,
    budget: float = math.inf,
    closed: bool = False,
    in_transit: Sequence[float] | None = None,
) -> Rebalance:
    """Assign shards to the `active` relays, moving as few listeners as possible.

    `active` relays are Ready and accept joins; `draining` relays accept none and shed their
    shards; `held` relays are not Ready but still carry listeners (a readiness blip): they
    keep their shards and their place in the tree, take nothing new, and their listeners
    stay where they are; a relay in none of these has gone, and its shards move at once
    (their listeners lost their connection anyway, so that costs no budget).
    `shard_listeners` are the connected listeners per shard (unknown: none), `demand` all
    listeners wanting a relay, waiting ones included (default: the connected ones). Moves
    off draining relays come first, then off relays above capacity, then towards equal shard
    counts, each lightest shard first, while `budget` listeners may still migrate. The
    `draining` relays are emptied in the order given (the caller knows which relay's
    emptying frees a pod soonest). `closed`: the room takes no new joins (its event is
    over, or it is being deleted); the active relays only take the listeners moved off
    the others. `in_transit`: per shard, its listeners still on a relay that holds none of
    their shards (a draining relay's last ones, told to move; see `in_transit_by_shard`). A
    relay that cannot seat the ones on their way to it sheds a shard too, not only one
    above capacity, as they would otherwise stay where they are until their relay's drain
    times out; it sheds only to a relay left clearly below full (ADMISSION_MARGIN), so the
    next pass, over the loads after the move, moves nothing back.
    """
    shards = current.shards
    weights = shard_listeners if shard_listeners is not None else (0.0,) * shards
    active_set = set(active)
    draining_order = [r for r in dict.fromkeys(draining) if r not in active_set]
    draining_set = set(draining_order)
    held_set = set(held) - active_set - draining_set
    live = active_set | draining_set | held_set
    owned: dict[int, list[int]] = {r: [] for r in live}
    orphans: list[int] = []
    if live:
        for shard, relay in enumerate(current.assignment):
            if relay in owned:
                owned[relay].append(shard)
            else:
                orphans.append(shard)

    assignment = list(current.assignment)
    load = {r: sum(map(weights.__getitem__, owned[r])) for r in owned}
    moved, migrated, pending = 0, 0.0, False
    if active_set:
        kept = sum(len(owned[r]) for r in held_set)
        targets = _balanced_targets(shards - kept, sorted(active_set), owned)
        # (shard, costs budget, must fit): a dead relay's shards cost nothing; a draining
        # relay's must go even if only a full relay is left; balancing never overloads.
        movers = [(s, False, False) for s in orphans]
        for relay in draining_order:
            movers += [(s, True, False) for s in sorted(owned[relay], key=weights.__getitem__)]
        # While joins wait, a full relay's extra shards move without spending the budget:
        # its listeners need not leave it (it is not overloaded), and the queued joins of
        # those shards reach the new relays at once instead of a budget's minutes later.
        queue = demand is not None and demand > sum(load.values())
        limit = current.capacity * ADMISSION_MARGIN
        for relay in sorted(active_set):
            excess = len(owned[relay]) - targets[relay]
            if excess > 0:
                costs = not (queue and load[relay] >= limit)
                lightest = sorted(owned[relay], key=weights.__getitem__)[:excess]
                movers += [(s, costs, True) for s in lightest]
        # A dead relay's listeners come back through the edge: each of its shards is expected
        # to bring the average shard's share of the demand.
        rejoining = (demand or 0.0) / shards
        receivers = _Receivers(
            {r: targets[r] - len(owned[r]) for r in active_set},
            load,
            current.capacity * ADMISSION_MARGIN,
        )
        # Closed to joins and no count: a move's cost is unknown, and nothing forces it
        # (nobody waits for a seat), so only the shards of relays that are gone move.
        blind = closed and shard_listeners is None
        for shard, costs, must_fit in movers:
            cost = weights[shard] if costs else 0.0
            if cost > budget or (costs and blind):
                pending = True
                continue
            orphan = assignment[shard] not in load
            expected = rejoining if orphan else weights[shard]
            relay = receivers.take(expected, must_fit=must_fit)
            if relay is None:
                if orphan:
                    assignment[shard] = None
                continue
            source = assignment[shard]
            if source is not None and not orphan:
                receivers.release(source, weights[shard])
            assignment[shard] = relay
            budget -= cost
            moved += 1
            migrated += 0.0 if orphan else weights[shard]  # paced by the relays if free
        shed_moved, shed_migrated, budget, shed_pending = _shed_overload(
            assignment, weights, load, sorted(active_set), current.capacity, budget,
            in_transit=in_transit,
        )  # fmt: skip
        moved += shed_moved
        migrated += shed_migrated
        pending = pending or shed_pending
    elif live:
        for shard in orphans:
            assignment[shard] = None
        moved = sum(1 for s in orphans if current.assignment[s] is not None)
    else:  # no relay at all (most rooms, booked ahead): every shard is unassigned
        assignment = [None] * shards
        moved = shards - current.assignment.count(None)

    if closed:
        admission: Admission = "closed"
    elif shard_listeners is None and demand is None:
        # No reading: fail-static, as the relay count is; a room open again (a new
        # occurrence) starts open.
        admission = "open" if current.admission == "closed" else current.admission
    else:
        admission = _admission(assignment, weights, load, active_set, current.capacity, demand)
    states: dict[int, RelayState] = {r: "active" for r in sorted(active_set)}
    states.update({r: "draining" for r in sorted(draining_set)})
    states.update({r: current.relays.get(r, "active") for r in sorted(held_set)})
    parents = fanout_parents(
        [*sorted(active_set), *sorted(draining_set), *sorted(held_set)],
        fanout,
        current.parents,
        leaves=draining_set | held_set,
    )
    new_assignment = tuple(assignment)
    changed = (
        new_assignment != current.assignment
        or states != dict(current.relays)
        or parents != dict(current.parents)
        or admission != current.admission
    )
    generation = current.generation + 1 if changed else current.generation
    new = ShardMap(
        generation,
        new_assignment,
        states,
        parents,
        admission,
        current.capacity,
        current.migrations_per_minute,
        since={
            relay: current.since.get(relay, generation)
            if current.relays.get(relay) == state
            else generation
            for relay, state in states.items()
        },
        former_shards=_former_shards(current, assignment, states),
    )
    return Rebalance(map=new, moved=moved, migrated=migrated, pending=pending)


@dataclass(frozen=True)
class Consolidation:
    """How a room past its end gathers its last listeners on its lowest relays.

    A StatefulSet removes its highest ordinal first, so one listener lingering on the top
    relay would keep every relay below it. Instead the fewest relays that carry the
    listeners left receive the others' listeners, and the rest drain from the top as the
    migration budget lets their listeners move down, so each relay goes as it empties."""

    receivers: tuple[int, ...]
    """Active: they keep their listeners and take those moved down."""
    draining: tuple[int, ...]
    """Highest first: every shard they hold goes to the receivers now (or, for a relay
    whose listeners exceed a minute's budget, as fast as the budget goes)."""
    waiting: tuple[int, ...]
    """Keep their shards and their listeners for now (still active in the map, taking
    nothing new): the budget or the receivers' room reaches them in a later pass. A relay
    is never marked draining before its listeners have somewhere to go, so a relay that
    sends every listener away when it drains drops nobody in a room closed to joins."""


def consolidate(
    current: ShardMap,
    *,
    candidates: Iterable[int],
    listeners: float | None,
    relay_listeners: Mapping[int, float],
    budget: float,
    per_minute: float,
) -> Consolidation:
    """Which relays receive, drain and wait while a room closed to joins drains (pure).

    `candidates` are the Ready relays the room keeps; `listeners` the room's count, taken
    since the drain began (None: none yet, so nothing changes: no relay starts draining and
    no shard moves blind); `relay_listeners` the count per relay; `budget` the listeners that
    may move in this pass, `per_minute` the room's cap.

    Receivers: the lowest relays already active, as many as carry the count at
    ADMISSION_MARGIN of their capacity; a relay the map drained comes back only when the
    receivers could not carry the count even full (the gap between the two is the
    hysteresis: a count that wobbles moves nobody back and forth, and one low count does
    not leave too few relays for good). Then, from the top, each relay drains once its
    listeners fit both the budget left and the receivers' room; the first that does not
    fit waits, with every relay below it.
    """
    order = sorted(set(candidates))
    state = current.relays
    if listeners is None:
        receivers = [o for o in order if state.get(o) == "active"] or order[:1]
        rest = [o for o in order if o not in receivers]
        return Consolidation(tuple(receivers), (), tuple(rest))
    capacity = current.capacity
    keep = max(1, math.ceil(listeners / (capacity * ADMISSION_MARGIN) - 1e-9))
    call_back = max(1, math.ceil(listeners / capacity - 1e-9))
    receivers = [o for o in order if state.get(o) == "active"][:keep]
    for relay in order:
        if len(receivers) >= call_back:
            break
        if relay not in receivers:
            receivers.append(relay)
    receivers.sort()
    held = current.counts()
    on = {o: float(relay_listeners.get(o, 0)) for o in order}
    room = sum(max(0.0, capacity - on[o]) for o in receivers)
    others = [o for o in reversed(order) if o not in receivers]
    draining = [o for o in others if state.get(o) == "draining"]
    for relay in draining:  # already draining: their listeners are on their way down
        room -= on[relay]
        budget -= on[relay] if held.get(relay) else 0.0
    pending = any(held.get(o) and on[o] > 0 for o in draining)
    waiting: list[int] = []
    for relay in (o for o in others if o not in draining):
        cost = on[relay] if held.get(relay) else 0.0
        fits = cost == 0 or cost <= budget - 1e-6 or (not pending and cost > per_minute)
        if waiting or not fits or on[relay] > room:
            waiting.append(relay)
            continue
        draining.append(relay)
        budget -= cost
        room -= on[relay]
        pending = pending or cost > per_minute
    return Consolidation(
        tuple(receivers), tuple(sorted(draining, reverse=True)), tuple(sorted(waiting))
    )


def _admission(
    assignment: Sequence[int | None],
    weights: Sequence[float],
    load: Mapping[int, float],
    active: set[int],
    capacity: int,
    demand: float | None,
) -> Admission:
    """Queue when the demand, spread as the map spreads it, would fill any relay.

    `load` includes what the shards of dead relays are expected to bring back.
    """
    connected = sum(load.values()) if demand is not None else sum(weights)
    wanted = connected if demand is None else demand
    limit = capacity * ADMISSION_MARGIN
    if wanted > len(active) * limit:
        return "queueing"
    if connected > 0:
        expected = {r: load[r] * wanted / connected for r in active}
    else:
        per_shard = wanted / len(assignment)
        expected = dict.fromkeys(active, 0.0)
        for relay in assignment:
            if relay in expected:
                expected[relay] += per_shard
    return "queueing" if any(v > limit for v in expected.values()) else "open"


class _Receivers:
    """Active relays ready to take shards: those short of their balanced count first, each
    time the one with the most room, and never one the shard would push above `capacity`
    (the admission limit) unless nothing else can take it (a dead relay's shard must go
    somewhere at once)."""

    def __init__(self, deficits: dict[int, int], load: dict[int, float], capacity: float) -> None:
        self.deficits = deficits
        self.load = load
        self.capacity = capacity
        self.short = [(load[r], r) for r, d in deficits.items() if d > 0]
        self.roomy = [(load[r], r) for r in deficits]
        heapq.heapify(self.short)
        heapq.heapify(self.roomy)

    def _coolest(self, heap: list[tuple[float, int]], short_only: bool) -> int | None:
        while heap:
            load, relay = heap[0]
            if short_only and self.deficits[relay] <= 0:
                heapq.heappop(heap)
            elif load != self.load[relay]:
                heapq.heappop(heap)  # stale: every change of a load pushed a fresh entry
            else:
                return relay
        return None

    def take(self, weight: float, *, must_fit: bool) -> int | None:
        """The relay that takes a shard of `weight` listeners; None if none should.

        `must_fit`: a balancing move, only to a relay short of shards with room for it.
        """
        fits = self.capacity - weight
        relay = self._coolest(self.short, short_only=True)
        if must_fit:
            if relay is None or self.load[relay] > fits:
                return None
        elif relay is None or self.load[relay] > fits:
            coolest = self._coolest(self.roomy, short_only=False)
            if relay is None or (coolest is not None and self.load[coolest] <= fits):
                relay = coolest
        if relay is None:
            return None
        self.deficits[relay] -= 1
        self._change(relay, weight)
        return relay

    def release(self, relay: int, weight: float) -> None:
        """A shard of `weight` listeners left `relay`."""
        if relay in self.deficits:  # an active relay above its count; a draining one is not
            self.deficits[relay] += 1
        self._change(relay, -weight)

    def _change(self, relay: int, weight: float) -> None:
        load = self.load[relay] + weight
        self.load[relay] = load
        deficit = self.deficits.get(relay)
        if deficit is not None:
            if deficit > 0:  # a relay short of none is never taken from `short`
                heapq.heappush(self.short, (load, relay))
            heapq.heappush(self.roomy, (load, relay))


def _balanced_targets(
    shards: int, active: list[int], owned: Mapping[int, list[int]]
) -> dict[int, int]:
    """Equal counts to within one; the extra shard stays where shards already are."""
    base, extra = divmod(shards, len(active))
    order = sorted(active, key=lambda r: (-len(owned[r]), r))
    return {relay: base + (1 if i < extra else 0) for i, relay in enumerate(order)}


def _shed_overload(
    assignment: list[int | None],
    weights: Sequence[float],
    load: dict[int, float],
    active: list[int],
    capacity: int,
    budget: float,
    *,
    in_transit: Sequence[float] | None = None,
) -> tuple[int, float, float, bool]:
    """Move shards off relays above capacity, or unable to seat the listeners on their way
    to them (`in_transit`, per shard), to the relay with the most room.

    A shed for listeners on their way leaves its receiver at most at ADMISSION_MARGIN of
    capacity, counting those on their way to it: one left exactly full would, on the next
    pass, shed a shard back (each such move reconnects the shard's listeners)."""
    moved, migrated, pending = 0, 0.0, False
    coming = dict.fromkeys(active, 0.0)
    if in_transit is None:
        transit: Sequence[float] = (0.0,) * len(assignment)
    else:
        transit = in_transit
        for shard, relay in enumerate(assignment):
            if relay in coming and transit[shard] > 0:
                coming[relay] += transit[shard]

    def demand(relay: int) -> float:
        return load[relay] + coming[relay]

    def overloaded(relay: int) -> bool:
        return load[relay] > capacity

    def over(relay: int) -> bool:
        return overloaded(relay) or (coming[relay] > 0 and demand(relay) > capacity + 1e-9)

    hot = [r for r in active if over(r)]
    if not hot:
        return moved, migrated, budget, pending
    owned: dict[int, list[int]] = {r: [] for r in hot}
    for shard, relay in enumerate(assignment):
        if relay in owned:
            owned[relay].append(shard)
    for relay in hot:
        for shard in sorted(owned[relay], key=weights.__getitem__):
            if not over(relay):
                break
            weight = weights[shard]
            if weight <= 0:
                continue  # moves nobody off it
            limit = capacity if overloaded(relay) else capacity * ADMISSION_MARGIN
            coolest = min(active, key=lambda r: (demand(r), r))
            if coolest == relay or demand(coolest) + weight + transit[shard] > limit:
                break
            if weight > budget:
                pending = True
                break
            assignment[shard] = coolest
            load[relay] -= weight
            load[coolest] += weight
            coming[relay] -= transit[shard]
            coming[coolest] += transit[shard]
            budget -= weight
            moved += 1
            migrated += weight
    return moved, migrated, budget, pending


def _former_shards(
    current: ShardMap, assignment: Sequence[int | None], states: Mapping[int, RelayState]
) -> dict[int, tuple[int, ...]]:
    """`ShardMap.former_shards` after a pass: a draining relay adds the shards it gave away
    in it; a relay no longer draining is forgotten."""
    draining = {relay for relay, state in states.items() if state == "draining"}
    if not draining:
        return {}
    gone: dict[int, set[int]] = {}
    for shard, (before, after) in enumerate(zip(current.assignment, assignment, strict=True)):
        if before != after and before in draining:
            gone.setdefault(before, set()).add(shard)
    former: dict[int, tuple[int, ...]] = {}
    for relay in sorted(draining):
        kept = (
            current.former_shards.get(relay, ()) if current.relays.get(relay) == "draining" else ()
        )
        if kept or relay in gone:
            former[relay] = tuple(sorted({*kept, *gone.get(relay, ())}))
    return former


def fanout_parents(
    relays: Sequence[int],
    fanout: int,
    previous: Mapping[int, int | None] | None = None,
    *,
    leaves: Collection[int] = (),
) -> dict[int, int | None]:
    """Upstreams forming a tree in which the origin and every relay feed at most `fanout`.

    The tree stays still: a relay keeps its previous parent while that parent is still in
    the tree and has room, so a relay that goes (or turns unready and is left out) moves
    only the relays directly under it, each with its own subtree, and a relay that comes
    is hung where there is room without renumbering anyone. Relays that need a parent take
    the shallowest feeder with room, the origin first, then the lowest ordinal; `leaves`
    (draining or unready relays) feed the relays they fed, but are given no new ones.
    With no more relays than `fanout` and no history, the origin feeds them all.
    """
    members = list(dict.fromkeys(relays))
    present = set(members)
    closed = set(leaves)
    previous = previous or {}
    parents: dict[int, int | None] = {}
    fed: dict[int | None, list[int]] = {None: []}
    for relay in members:
        parent = previous.get(relay, _NO_PARENT)
        kept = parent is None or (parent in present and parent != relay)
        if kept and len(fed.setdefault(parent, [])) < fanout:
            parents[relay] = parent
            fed[parent].append(relay)
    # Depths below the origin; relays in a subtree whose root lost its parent have none yet.
    depth: dict[int, int] = {}
    room: list[tuple[int, int]] = []

    def hang(root: int, root_depth: int) -> None:
        """Give `root` and everything under it a depth, and offer them as feeders."""
        stack = [(root, root_depth)]
        while stack:
            node, tier = stack.pop()
            depth[node] = tier
            if node not in closed and len(fed.get(node, ())) < fanout:
                heapq.heappush(room, (tier, node))
            stack += [(child, tier + 1) for child in fed.get(node, ())]

    for relay in fed[None]:
        hang(relay, 1)
    for relay in members:
        if relay in parents:
            continue
        chosen: int | None = None
        if len(fed[None]) >= fanout:
            while room and len(fed.get(room[0][1], ())) >= fanout:
                heapq.heappop(room)
            # Every feeder full or closed: the origin takes it beyond fanout.
            chosen = room[0][1] if room else None
        parents[relay] = chosen
        fed.setdefault(chosen, []).append(relay)
        hang(relay, 1 if chosen is None else depth[chosen] + 1)
    return {relay: parents[relay] for relay in members}


_NO_PARENT = -1
"""Marks a relay with no previous parent (None means the origin fed it)."""


@dataclass(frozen=True)
class Placement:
    """Where the edge puts the demand of each shard under a map."""

    connected: dict[int, float]
    """Listeners per relay, never above the map's capacity."""
    waiting: float
    """Listeners the admission queue holds."""


def place(current: ShardMap, shard_demand: Sequence[float]) -> Placement:
    """Connect each shard's listeners to its relay up to capacity; queue the rest."""
    wanted: dict[int, float] = dict.fromkeys(current.relays, 0.0)
    waiting = 0.0
    for shard, listeners in enumerate(shard_demand):
        relay = current.assignment[shard]
        if relay is None:
            waiting += listeners
        else:
            wanted[relay] = wanted.get(relay, 0.0) + listeners
    connected = {r: min(float(current.capacity), w) for r, w in wanted.items()}
    waiting += sum(wanted.values()) - sum(connected.values())
    return Placement(connected=connected, waiting=waiting)


def shard_listeners_from_relays(
    current: ShardMap, relay_listeners: Mapping[int, float]
) -> list[float]:
    """Per-shard listeners estimated from per-relay counts (the metrics are per relay).

    Hashing spreads a relay's listeners evenly over its shards, so each gets an equal share.
    """
    share = {r: relay_listeners.get(r, 0.0) / k for r, k in current.counts().items() if k}
    return [share.get(r, 0.0) if r is not None else 0.0 for r in current.assignment]


def in_transit_by_shard(
    current: ShardMap, relay_listeners: Mapping[int, float]
) -> list[float] | None:
    """Per shard, its listeners counted on relays of the map that hold none of their shards:
    a draining relay's last ones, on their way to their shards' relays (see `rebalance`);
    None when there are none.

    Which shard each of them is in is not measured (the counts are per relay), so they are
    spread evenly over the shards their relay held when it began draining
    (`ShardMap.former_shards`), as hashing spread them. A relay the map has no such record
    for (a map read back after an operator restart, or an active relay given no shard) has
    its listeners spread over every assigned shard: the least that is known."""
    shardless = {
        relay: listeners
        for relay, held in current.counts().items()
        if not held and (listeners := relay_listeners.get(relay, 0.0)) > 0
    }
    if not shardless:
        return None
    transit = [0.0] * current.shards
    assigned = [s for s, relay in enumerate(current.assignment) if relay is not None]
    for relay, listeners in shardless.items():
        shards = current.former_shards.get(relay) or assigned
        for shard in shards:
            transit[shard] += listeners / len(shards)
    return transit
