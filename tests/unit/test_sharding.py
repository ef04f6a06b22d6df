"""The shard map: minimal movement, exactly-once assignment, capacity and the fan-out tree."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from townsquare.api.models import (
    SHARD_MAP_BYTES_PER_RELAY,
    SHARD_MAP_BYTES_PER_SHARD,
    SHARD_MAP_LIMIT_BYTES,
    AudioRoomSpec,
    shard_map_fits,
)
from townsquare.kube.children import shard_map_config_map
from townsquare.sharding import (
    Rebalance,
    ShardMap,
    fanout_parents,
    in_transit_by_shard,
    moved_share,
    new_map,
    place,
    rebalance,
    relays_moved,
    resize,
    shard_listeners_from_relays,
    shard_of,
)

FAST = settings(max_examples=40, deadline=None)
shard_counts = st.integers(min_value=16, max_value=4096)
relay_counts = st.integers(min_value=1, max_value=300)


def balanced(shards: int, relays: int, capacity: int = 1000) -> ShardMap:
    return rebalance(new_map(shards, capacity), active=range(relays), fanout=64).map


def moves(before: ShardMap, after: ShardMap) -> int:
    return sum(a != b for a, b in zip(before.assignment, after.assignment, strict=True))


def test_listener_hash_is_stable_across_processes() -> None:
    ids = [f"listener-{i}" for i in range(5)]
    script = f"from townsquare.sharding import shard_of; print([shard_of(i, 4096) for i in {ids}])"
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
        )
        seen.add(out.stdout)
    assert len(seen) == 1
    assert seen.pop().strip() == str([shard_of(i, 4096) for i in ids])


def test_listener_hash_spreads_evenly() -> None:
    counts = Counter(shard_of(f"l{i}", 64) for i in range(64_000))
    assert len(counts) == 64
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000


@FAST
@given(shard_counts, relay_counts)
def test_every_shard_assigned_exactly_once_and_balanced(shards: int, relays: int) -> None:
    shard_map = balanced(shards, relays)
    counts = shard_map.counts()
    assert all(relay in range(relays) for relay in shard_map.assignment)
    assert sum(counts.values()) == shards
    assert max(counts.values()) - min(counts.values()) <= 1


@FAST
@given(shard_counts, relay_counts)
def test_growth_moves_within_ten_percent_of_the_minimum(shards: int, relays: int) -> None:
    before = balanced(shards, relays)
    after = rebalance(before, active=range(relays + 1), fanout=64).map
    minimum = shards / (relays + 1)
    assert moves(before, after) <= math.ceil(1.1 * minimum)
    assert after.counts()[relays] >= math.floor(minimum)


@FAST
@given(shard_counts, st.integers(min_value=2, max_value=300), st.data())
def test_removing_a_relay_moves_only_its_shards(
    shards: int, relays: int, data: st.DataObject
) -> None:
    before = balanced(shards, relays)
    gone = data.draw(st.integers(min_value=0, max_value=relays - 1))
    after = rebalance(before, active=[r for r in range(relays) if r != gone], fanout=64).map
    for old, new in zip(before.assignment, after.assignment, strict=True):
        assert (old == new) if old != gone else (new is not None and new != gone)
    minimum = shards / relays
    assert moves(before, after) <= math.ceil(1.1 * minimum)


def test_a_balanced_map_is_left_alone() -> None:
    shard_map = balanced(4096, 715)
    again = rebalance(shard_map, active=range(715), fanout=64, shard_listeners=[100.0] * 4096)
    assert again.moved == 0
    assert again.map == shard_map


def test_draining_relays_shed_within_the_migration_budget() -> None:
    shard_map = balanced(4096, 10)
    listeners = [10.0] * 4096
    first = rebalance(
        shard_map,
        active=range(8),
        draining=[8, 9],
        shard_listeners=listeners,
        budget=1000,
        fanout=64,
    )
    assert first.migrated <= 1000
    assert first.moved == 100
    assert first.pending
    assert first.map.relays[8] == "draining"
    assert first.map.generation == shard_map.generation + 1
    rest = rebalance(
        first.map, active=range(8), draining=[8, 9], shard_listeners=listeners, fanout=64
    )
    assert not rest.pending
    assert rest.map.counts()[8] == rest.map.counts()[9] == 0


def test_relays_above_capacity_shed_to_relays_with_room() -> None:
    shard_map = balanced(8, 2, capacity=100)  # relay 0: shards 0,2,4,6 ...
    hot = [40.0 if r == 0 else 5.0 for r in shard_map.assignment]
    result = rebalance(shard_map, active=[0, 1], shard_listeners=hot, fanout=64)
    loads = Counter[int]()
    for shard, relay in enumerate(result.map.assignment):
        assert relay is not None
        loads[relay] += hot[shard]
    assert max(loads.values()) <= 100
    # 180 listeners on two relays of 100: past 90% the edge checks every join's room.
    assert result.map.admission == "queueing"


def test_admission_queue_turns_on_when_demand_exceeds_capacity() -> None:
    shard_map = balanced(64, 4, capacity=1000)
    full = rebalance(shard_map, active=range(4), fanout=64, demand=4200)
    assert full.map.admission == "queueing"
    calm = rebalance(full.map, active=range(4), fanout=64, demand=2000)
    assert calm.map.admission == "open"
    assert calm.map.generation == full.map.generation + 1


@FAST
@given(
    shard_counts,
    relay_counts,
    st.lists(st.floats(min_value=0, max_value=500), min_size=1, max_size=50),
)
def test_no_relay_above_capacity_while_the_queue_is_available(
    shards: int, relays: int, demand_pattern: list[float]
) -> None:
    shard_map = balanced(shards, relays, capacity=700)
    demand = [demand_pattern[s % len(demand_pattern)] for s in range(shards)]
    placement = place(shard_map, demand)
    assert all(v <= shard_map.capacity for v in placement.connected.values())
    assert math.isclose(sum(placement.connected.values()) + placement.waiting, sum(demand))


@FAST
@given(st.integers(min_value=1, max_value=5000), st.integers(min_value=2, max_value=100))
def test_fanout_tree_feeds_at_most_fanout_from_any_node(relays: int, fanout: int) -> None:
    parents = fanout_parents(list(range(relays)), fanout)
    fed = Counter(parents.values())
    assert max(fed.values()) <= fanout
    for relay in parents:  # every relay reaches the origin
        hops, node = 0, parents[relay]
        while node is not None:
            node, hops = parents[node], hops + 1
        assert hops < relays


def test_map_round_trips_through_json() -> None:
    shard_map = rebalance(
        balanced(256, 70), active=range(68), draining=[68, 69], fanout=8, demand=10
    ).map
    text = json.dumps(shard_map.to_dict())
    assert ShardMap.from_dict(json.loads(text)) == shard_map
    assert shard_map.parents[0] is None and shard_map.parents[69] is not None


def test_shard_listeners_estimated_from_relay_counts() -> None:
    shard_map = balanced(8, 2)
    estimate = shard_listeners_from_relays(shard_map, {0: 400, 1: 40})
    assert sum(estimate) == 440
    assert estimate[shard_map.assignment.index(0)] == 100


# -- the fan-out tree stays still --------------------------------------------------------

fanouts = st.integers(min_value=2, max_value=8)


def assert_is_a_tree(parents: dict[int, int | None], fanout: int) -> None:
    """Every relay reaches the origin without a cycle; nobody feeds more than fanout."""
    for relay in parents:
        seen, node = set(), relay
        while node is not None:
            assert node not in seen, f"cycle through {relay}"
            seen.add(node)
            node = parents[node]
    feeds = Counter(parents.values())
    assert max(feeds.values()) <= fanout


def moved_parents(before: dict[int, int | None], after: dict[int, int | None]) -> set[int]:
    return {r for r in after if r in before and before[r] != after[r]}


@FAST
@given(st.integers(min_value=1, max_value=200), fanouts)
def test_a_new_tree_is_filled_tier_by_tier(relays: int, fanout: int) -> None:
    parents = fanout_parents(range(relays), fanout)
    assert_is_a_tree(parents, fanout)
    tiers, feeders = 1, fanout
    while feeders < relays:
        feeders += fanout ** (tiers + 1)
        tiers += 1
    deepest = 0
    for relay in parents:
        depth, node = 0, relay
        while node is not None:
            depth, node = depth + 1, parents[node]
        deepest = max(deepest, depth)
    assert deepest == tiers


@FAST
@given(st.integers(min_value=2, max_value=200), fanouts, st.data())
def test_a_relay_leaving_moves_only_the_relays_it_fed(
    relays: int, fanout: int, data: st.DataObject
) -> None:
    before = fanout_parents(range(relays), fanout)
    gone = data.draw(st.integers(min_value=0, max_value=relays - 1))
    after = fanout_parents([r for r in range(relays) if r != gone], fanout, before)
    assert_is_a_tree(after, fanout)
    assert moved_parents(before, after) <= {r for r, p in before.items() if p == gone}


@FAST
@given(st.integers(min_value=1, max_value=200), fanouts, st.integers(min_value=1, max_value=5))
def test_relays_joining_move_nobody(relays: int, fanout: int, added: int) -> None:
    before = fanout_parents(range(relays), fanout)
    after = fanout_parents(range(relays + added), fanout, before)
    assert_is_a_tree(after, fanout)
    assert not moved_parents(before, after)


def test_one_relay_of_715_turning_unready_moves_at_most_the_64_under_it() -> None:
    before = balanced(4096, 715)
    gone = rebalance(before, active=[r for r in range(715) if r != 3], fanout=64).map
    moved = moved_parents(dict(before.parents), dict(gone.parents))
    assert moved <= {r for r, p in before.parents.items() if p == 3}
    assert len(moved) <= 64


def test_draining_relays_keep_their_children_but_get_no_new_ones() -> None:
    before = fanout_parents(range(6), 2)  # 0, 1 under the origin; 2, 3 under 0; 4, 5 under 1
    after = fanout_parents([0, 1, 2, 3, 4, 5, 6, 7], 2, before, leaves={2})
    assert {r: after[r] for r in before} == before
    assert after[6] == 3 and after[7] == 3


@FAST
@given(shard_counts, st.integers(min_value=2, max_value=60), st.data())
def test_a_readiness_blip_with_listeners_moves_nothing(
    shards: int, relays: int, data: st.DataObject
) -> None:
    before = balanced(shards, relays)
    blinked = data.draw(st.integers(min_value=0, max_value=relays - 1))
    others = [r for r in range(relays) if r != blinked]
    after = rebalance(before, active=others, held=[blinked], fanout=64).map
    assert after.assignment == before.assignment
    assert dict(after.parents) == dict(before.parents)
    assert after.relays[blinked] == "active"


@FAST
@given(shard_counts, st.integers(min_value=2, max_value=60), st.data())
def test_an_unready_relay_whose_listeners_have_gone_sheds_only_its_shards(
    shards: int, relays: int, data: st.DataObject
) -> None:
    before = balanced(shards, relays)
    gone = data.draw(st.integers(min_value=0, max_value=relays - 1))
    after = rebalance(before, active=[r for r in range(relays) if r != gone], fanout=64).map
    pairs = zip(before.assignment, after.assignment, strict=True)
    changed = {s for s, (a, b) in enumerate(pairs) if a != b}
    assert changed == {s for s, r in enumerate(before.assignment) if r == gone}


def test_without_a_reading_the_admission_state_is_kept() -> None:
    """A metric outage must not open the queue: nothing says the relays have room."""
    shard_map = balanced(64, 4, capacity=1000)
    full = rebalance(shard_map, active=range(4), fanout=64, demand=4200).map
    assert full.admission == "queueing"
    blind = rebalance(full, active=range(4), fanout=64)
    assert blind.map.admission == "queueing"


def test_the_operator_holds_an_unready_relay_only_while_its_own_count_shows_listeners() -> None:
    from datetime import UTC, datetime

    from townsquare.lifecycle import Metrics, Observed, _held

    shard_map = balanced(64, 4)
    now = datetime(2026, 12, 1, tzinfo=UTC)

    def seen(by_relay: dict[int, int]) -> Observed:
        metrics = Metrics(listeners=sum(by_relay.values()), by_relay=by_relay)
        return Observed(now, 1, 3, frozenset({0, 1, 3}), metrics)

    assert _held(shard_map, seen({0: 5, 1: 5, 2: 4, 3: 5}), replicas=4) == [2]
    assert _held(shard_map, seen({0: 5, 1: 5, 2: 0, 3: 5}), replicas=4) == []
    assert _held(shard_map, seen({0: 5, 1: 5, 3: 5}), replicas=4) == []  # series gone
    assert _held(shard_map, seen({0: 5, 1: 5, 2: 4, 3: 5}), replicas=2) == []  # removed


@pytest.mark.parametrize("shards", [1, 4096, 65536])
def test_the_largest_shard_map_the_api_allows_fits_in_its_config_map(shards: int) -> None:
    """Every relay draining with a 5-digit parent, every slot a 5-digit ordinal: the map as
    published stays within a ConfigMap's 1 MiB, at the most relays the rule allows."""
    relays = (SHARD_MAP_LIMIT_BYTES - shards * SHARD_MAP_BYTES_PER_SHARD) // (
        SHARD_MAP_BYTES_PER_RELAY
    )
    assert shard_map_fits(relays, shards) and not shard_map_fits(relays + 1, shards)
    ordinals = range(99_999 - relays + 1, 99_999 + 1)  # the widest ordinals there are
    largest = ShardMap(
        generation=10**9,
        assignment=tuple(99_999 for _ in range(shards)),
        relays=dict.fromkeys(ordinals, "draining"),
        parents=dict.fromkeys(ordinals, 99_998),
        admission="queueing",
        capacity=10**12,
        migrations_per_minute=10_000_000,
    )
    published = json.dumps(largest.to_dict(), separators=(",", ":"))
    config_map = shard_map_config_map("r" * 40, "n" * 63, "uid", published)
    data = sum(len(key) + len(value.encode()) for key, value in config_map["data"].items())
    assert data <= 1024 * 1024


def test_a_room_whose_shard_map_could_not_fit_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="maxRelays x 52 \\+ shards x 6"):
        AudioRoomSpec.model_validate(
            {
                "startTime": "2026-12-01T23:00:00Z",
                "duration": "1h",
                "expectedAudience": 1000,
                "relay": {"image": "registry.example/relay:1.4"},
                "scaling": {"maxRelays": 19_673},
            }
        )


# --- a new shard count (spec.sharding.shards changed mid-event) --------------------------

LISTENERS = [f"listener-{n}" for n in range(20_000)]


def relocated(before: ShardMap, after: ShardMap) -> int:
    """Listeners (hashed by the real shard_of) whose relay differs between two maps."""
    return sum(1 for name in LISTENERS if before.relay_for(name) != after.relay_for(name))


def resized(current: ShardMap, shards: int) -> ShardMap:
    return replace(current, assignment=resize(current.assignment, shards))


def test_doubling_then_halving_the_shard_count_moves_no_listener() -> None:
    """The old rule (new shard s took old shard s*old//new) moved about 90% of them."""
    before = balanced(4096, 10)
    doubled = resized(before, 8192)
    assert relocated(before, doubled) == 0
    halved = resized(doubled, 4096)
    assert relocated(doubled, halved) == 0
    assert halved.assignment == before.assignment
    assert moved_share(before.assignment, doubled.assignment) == 0.0


def test_halving_gives_each_new_shard_the_relay_that_held_most_of_it() -> None:
    # old shards s and s + 4 merge into new shard s; 0 and 4 share relay 7
    before = replace(balanced(8, 2), assignment=(7, 1, 2, 3, 7, 5, 2, 5))
    halved = resize(before.assignment, 4)
    assert halved[0] == 7 and halved[2] == 2
    assert halved[1] in (1, 5) and halved[3] in (3, 5)
    quarter = Counter(resize(balanced(4096, 10).assignment, 1024))
    assert max(quarter.values()) - min(quarter.values()) <= 1, "shares kept when classes tie"


@FAST
@given(
    old=st.integers(min_value=16, max_value=4096),
    new=st.integers(min_value=16, max_value=4096),
    relays=st.integers(min_value=1, max_value=60),
)
def test_any_new_shard_count_moves_only_the_listeners_it_says_and_keeps_shares(
    old: int, new: int, relays: int
) -> None:
    """Any count: the listeners that change relay (counted by hashing real ids) are the
    share the operator announces, and no relay gains or loses more than its share of the
    map allows, so the relays, pacing moves at the migration budget, move only those."""
    before = balanced(old, relays)
    after = resized(before, new)
    share = moved_share(before.assignment, after.assignment)
    assert abs(relocated(before, after) / len(LISTENERS) - share) <= 0.02
    if new % old == 0:
        assert share == 0.0
    before_counts, after_counts = before.counts(), after.counts()
    assert sum(after_counts.values()) == new
    assert set(after_counts) <= set(before_counts)
    for relay, count in before_counts.items():
        assert abs(after_counts.get(relay, 0) - count * new / old) <= 2, relay


def test_a_closed_map_opens_again_for_a_new_occurrence_without_a_reading() -> None:
    """Past the end the map is closed; when the room is armed again (no count yet, so the
    admission is otherwise kept as it was), it opens: a closed room would admit nobody."""
    closed = rebalance(new_map(64, 10), active=[0], fanout=4, closed=True).map
    assert closed.admission == "closed"
    again = rebalance(closed, active=[0, 1], fanout=4).map
    assert again.admission == "open"


def test_a_relay_holding_a_little_less_of_every_class_keeps_its_share() -> None:
    """2,673 -> 243 shards over 3 relays: each new shard gathers 11 old ones. By each
    class's own remainders relay 0 lost nearly every tie and got 64 shards for a share of
    81 (hypothesis found it); counted over the classes so far, it keeps its share."""
    after = Counter(resize(balanced(2673, 3).assignment, 243))
    assert all(abs(after[relay] - 81) <= 1 for relay in range(3)), after


def test_a_full_relay_sheds_a_shard_while_a_drained_relay_s_last_listeners_wait() -> None:
    """Relay 2 drained: its shards went to relays 0 and 1, and one listener of them is still
    on it, held by the edge because relay 0, where its shard went, is full (100 of 100).
    The old rule moved shards only off a relay above capacity, so nothing moved until the
    drain timed out and the listener was dropped. With listeners in transit, relay 0 sheds
    a shard to relay 1, which has room: a seat frees up for it either way."""
    first = rebalance(new_map(16, 100), active=[0, 1, 2], fanout=4).map
    drained = rebalance(first, active=[0, 1], draining=[2], fanout=4).map
    assert drained.counts()[2] == 0
    weights = shard_listeners_from_relays(drained, {0: 100, 1: 40, 2: 1})

    def again(on_drained: float) -> Rebalance:
        in_transit = in_transit_by_shard(drained, {0: 100, 1: 40, 2: on_drained})
        return rebalance(
            drained, active=[0, 1], draining=[2], shard_listeners=weights, fanout=4,
            budget=1000, in_transit=in_transit,
        )  # fmt: skip

    assert again(0).map.assignment == drained.assignment
    freed = again(1)
    moved = [shard for shard, _, _ in _moves(drained, freed.map)]
    assert len(moved) == 1 and drained.assignment[moved[0]] == 0
    assert freed.map.assignment[moved[0]] == 1
    assert freed.migrated == pytest.approx(100 / drained.counts()[0])


def _moves(before: ShardMap, after: ShardMap) -> list[tuple[int, int | None, int | None]]:
    """(shard, from, to) for every shard the second map gives another relay."""
    pairs = zip(before.assignment, after.assignment, strict=True)
    return [(shard, a, b) for shard, (a, b) in enumerate(pairs) if a != b]


def test_a_shed_for_listeners_on_their_way_is_never_undone_by_the_next_pass() -> None:
    """3 shards of 5 listeners, capacity 10: relay 0 holds two (full), relay 1 one, and the
    drained relay 2 still has 1 listener, of the shard that went to relay 0. Moving a shard
    to relay 1 would leave it exactly full, so the next pass would shed it back, and so on
    every pass (5 listeners reconnected each time). A shed must leave its receiver clearly
    below full: over six passes, with the loads each map leads to, no shard goes back."""
    first = rebalance(new_map(3, 10), active=[0, 1, 2], fanout=4).map
    shard_map = rebalance(first, active=[0, 1], draining=[2], fanout=4).map
    history = [shard_map]
    for _ in range(6):
        counts = shard_map.counts()
        by_relay = {0: 5.0 * counts[0], 1: 5.0 * counts[1], 2: 1.0}
        shard_map = rebalance(
            shard_map, active=[0, 1], draining=[2], fanout=4, budget=1200,
            shard_listeners=shard_listeners_from_relays(shard_map, by_relay),
            in_transit=in_transit_by_shard(shard_map, by_relay),
        ).map  # fmt: skip
        history.append(shard_map)
    moves = [m for before, after in itertools.pairwise(history) for m in _moves(before, after)]
    assert len(moves) <= 1, moves
    assert max(history[-1].counts()[r] * 5 for r in (0, 1)) <= 10


def test_a_full_relay_the_listeners_on_their_way_do_not_need_sheds_nothing() -> None:
    """The drained relay's shards went to the other relays, not to the full one: its last
    30 listeners find seats where they go, so moving a shard off the full relay would only
    reconnect its listeners for nothing."""
    first = rebalance(new_map(11, 100), active=[0, 1, 2, 3], fanout=4).map
    drained_one = min(first.counts(), key=lambda r: (first.counts()[r], -r))
    active = [r for r in range(4) if r != drained_one]
    drained = rebalance(first, active=active, draining=[drained_one], fanout=4).map
    gained = {drained.assignment[s] for s in drained.former_shards[drained_one]}
    full = next(r for r in active if r not in gained)
    by_relay = {r: 100.0 if r == full else 40.0 for r in active} | {drained_one: 30.0}
    again = rebalance(
        drained, active=active, draining=[drained_one], fanout=4, budget=1200,
        shard_listeners=shard_listeners_from_relays(drained, by_relay),
        in_transit=in_transit_by_shard(drained, by_relay),
    )  # fmt: skip
    assert _moves(drained, again.map) == []
    assert again.migrated == 0


def test_after_a_shed_for_listeners_on_their_way_the_next_pass_moves_nothing() -> None:
    """Relay 0 full, a listener of one of its shards still on drained relay 2: one shard
    sheds to relay 1. Read again once the shed shard's listeners have moved, before and
    after the waiting one has (on either relay), the map stays as it is."""
    first = rebalance(new_map(16, 100), active=[0, 1, 2], fanout=4).map
    drained = rebalance(first, active=[0, 1], draining=[2], fanout=4).map
    by_relay = {0: 100.0, 1: 40.0, 2: 1.0}
    shed = rebalance(
        drained, active=[0, 1], draining=[2], fanout=4, budget=1200,
        shard_listeners=shard_listeners_from_relays(drained, by_relay),
        in_transit=in_transit_by_shard(drained, by_relay),
    )  # fmt: skip
    (moved,) = _moves(drained, shed.map)
    per_shard = 100.0 / drained.counts()[0]
    for arrived_on in (None, 0, 1):  # read before the last listener moved, and after
        after = {0: 100.0 - per_shard, 1: 40.0 + per_shard, 2: 1.0}
        if arrived_on is not None:
            after[arrived_on] += 1
            after[2] = 0.0
        second = rebalance(
            shed.map, active=[0, 1], draining=[2], fanout=4, budget=1200,
            shard_listeners=shard_listeners_from_relays(shed.map, after),
            in_transit=in_transit_by_shard(shed.map, after),
        )  # fmt: skip
        assert _moves(shed.map, second.map) == [], moved


def test_listeners_in_transit_are_counted_on_their_relay_s_former_shards() -> None:
    """A drained relay's listeners are spread over the shards it held, wherever those are
    now; a relay that still holds shards has nobody in transit."""
    first = rebalance(new_map(12, 100), active=[0, 1, 2], fanout=4).map
    drained = rebalance(first, active=[0, 1], draining=[2], fanout=4).map
    former = drained.former_shards[2]
    assert sorted(former) == [s for s, r in enumerate(first.assignment) if r == 2]
    transit = in_transit_by_shard(drained, {0: 50.0, 1: 50.0, 2: 8.0})
    assert transit is not None and sum(transit) == pytest.approx(8.0)
    assert all(transit[s] == pytest.approx(8.0 / len(former)) for s in former)
    assert all(transit[s] == 0 for s in range(12) if s not in former)
    assert in_transit_by_shard(first, {0: 50.0, 1: 50.0, 2: 8.0}) is None
    back = rebalance(drained, active=[0, 1, 2], fanout=4).map
    assert back.former_shards == {}, "a relay active again has no listeners in transit"


def test_joins_on_a_receiver_never_send_a_shed_shard_back() -> None:
    """6 shards, capacity 20: relay 0 full (20), relay 1 at 12, and 2 listeners of the
    drained relay 2 on their way, one to each. Had relay 0's shard gone to relay 1 up to
    full, a join there would make relay 1 the one that cannot seat its arrival, and it
    would shed back. Over six passes with a join on relay 1 each, no shard moves twice."""
    first = rebalance(new_map(6, 20), active=[0, 1, 2], fanout=4).map
    shard_map = rebalance(first, active=[0, 1], draining=[2], fanout=4).map
    assert {shard_map.assignment[s] for s in shard_map.former_shards[2]} == {0, 1}
    loads = {0: 20.0, 1: 12.0}
    history = [shard_map]
    for _ in range(6):
        by_relay = loads | {2: 2.0}
        weights = shard_listeners_from_relays(shard_map, by_relay)
        after = rebalance(
            shard_map, active=[0, 1], draining=[2], fanout=4, budget=1200,
            shard_listeners=weights, in_transit=in_transit_by_shard(shard_map, by_relay),
        ).map  # fmt: skip
        for shard, source, target in _moves(shard_map, after):
            assert source is not None and target is not None
            loads[source] -= weights[shard]
            loads[target] += weights[shard]
        loads[1] += 1  # a join
        shard_map = after
        history.append(shard_map)
    moved = Counter(m[0] for a, b in itertools.pairwise(history) for m in _moves(a, b))
    assert all(n == 1 for n in moved.values()), moved


def test_relays_moved_names_the_relays_listeners_leave_and_join_and_nothing_else() -> None:
    """The end drain holds a relay by its own last move: a move names its two relays; a
    map that moves nobody names none, a shard count changed in place included (a name
    there would hold its relays until the next move dates it)."""
    before = balanced(64, 4)
    moved = replace(before, assignment=(3, *before.assignment[1:]))
    assert before.assignment[0] != 3
    assert relays_moved(before, moved) == {before.assignment[0], 3}
    assert relays_moved(before, before) == frozenset()
    doubled = resized(before, 128)
    assert relocated(before, doubled) == 0, "every listener keeps its relay"
    assert relays_moved(before, doubled) == frozenset()
