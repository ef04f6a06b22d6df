"""The load generator's edge: joins follow the shard map and never overload a relay."""

from __future__ import annotations

from townsquare.loadgen import Edge, demand_at
from townsquare.sharding import ShardMap, new_map, rebalance
from townsquare.sim.trace import parse_trace


def two_relays(capacity: int = 10) -> ShardMap:
    return rebalance(new_map(64, capacity), active=[0, 1], fanout=8).map


def test_joins_fill_relays_up_to_capacity_and_the_rest_wait() -> None:
    edge = Edge()
    state = edge.step(15, two_relays(), ready=[0, 1])
    assert sum(state.connected.values()) + state.waiting == 15
    assert max(state.connected.values()) <= 10
    crowded = edge.step(40, two_relays(), ready=[0, 1])
    assert max(crowded.connected.values()) <= 10
    assert crowded.waiting >= 20


def test_a_relay_that_is_not_ready_takes_nobody() -> None:
    state = Edge().step(8, two_relays(), ready=[0])
    assert set(state.connected) == {0}
    assert state.waiting + state.connected[0] == 8


def test_listeners_follow_moved_shards_and_leave_last_in_first_out() -> None:
    edge = Edge()
    first = two_relays(capacity=100)
    edge.step(60, first, ready=[0, 1])
    grown = rebalance(first, active=[0, 1, 2], fanout=8).map
    after = edge.step(60, grown, ready=[0, 1, 2])
    assert after.connected[2] > 0
    assert after.migrated == after.connected[2]
    shrunk = edge.step(10, grown, ready=[0, 1, 2])
    assert sum(shrunk.connected.values()) == 10


def test_no_map_means_everyone_waits() -> None:
    state = Edge().step(5, None, ready=[0, 1])
    assert state.waiting == 5


def test_demand_is_linear_between_rows() -> None:
    trace = parse_trace("t_seconds,listeners\n-10,0\n0,100\n10,300\n")
    assert demand_at(trace, -20) == 0
    assert demand_at(trace, -5) == 50
    assert demand_at(trace, 5) == 200
    assert demand_at(trace, 99) == 300
