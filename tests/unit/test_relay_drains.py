"""A relay tells an edge's fault (a listener placed on a map in which the relay drained) from
the map on its way (a listener placed just before the relay began draining)."""

from __future__ import annotations

import time

import pytest

from townsquare.relay.drains import DrainLedger
from townsquare.relay.hub import RefusedError
from townsquare.relay.server import Notices, Relay, RelayConfig
from townsquare.relay.topology import StaticResolver
from townsquare.sharding import ShardMap, new_map, rebalance
from townsquare.tickets import sign

KEY = b"relay-test-key-0123456789abcdef"


def maps() -> list[ShardMap]:
    """Relay 2 active, then draining (from the third map on), then gone: every generation."""
    first = rebalance(new_map(16, 100), active=[0, 1, 2], fanout=4).map
    grown = rebalance(first, active=[0, 1, 2, 3], fanout=4).map
    drained = rebalance(grown, active=[0, 1, 3], draining=[2], fanout=4).map
    still = rebalance(drained, active=[0, 1, 3, 4], draining=[2], fanout=4).map
    return [first, grown, drained, still]


def test_the_map_says_since_when_each_relay_is_in_its_state() -> None:
    first, grown, drained, still = maps()
    assert [m.generation for m in (first, grown, drained, still)] == [1, 2, 3, 4]
    assert still.relays[2] == "draining" and still.since[2] == drained.generation
    assert still.since[0] == first.generation and still.since[4] == still.generation
    assert ShardMap.from_dict(still.to_dict()) == still
    back = rebalance(still, active=[0, 1, 2, 3, 4], fanout=4).map
    assert back.relays[2] == "active" and back.since[2] == back.generation


def test_a_ticket_of_a_generation_in_which_the_relay_drained_is_the_edges_fault() -> None:
    first, _, _, still = maps()
    ledger = DrainLedger(2)
    ledger.read(first)
    ledger.read(still)  # the relay missed generations 2 and 3: the map says since when
    assert ledger.state_at(2) is None  # between two maps read, with no state said
    assert not ledger.on_map_of_draining(1)  # the map on its way: not the edge's fault
    assert ledger.on_map_of_draining(3) and ledger.on_map_of_draining(4)
    assert ledger.state_at(5) is None  # newer than any map read


def test_a_ticket_newer_than_the_relays_map_is_judged_once_a_map_covers_it() -> None:
    first, grown, drained, still = maps()
    ledger = DrainLedger(2)
    ledger.read(grown)
    ledger.judge_later(3, "seated")  # welcomed before the relay read that it drains
    ledger.judge_later(2, "refused")  # covered already: judged now, and not a fault
    assert ledger.pending == [(3, "seated")] and not ledger.misplaced
    ledger.read(still)
    assert ledger.misplaced == {"seated": 1} and not ledger.pending
    del first, drained


def _relay(ordinal: int) -> Relay:
    config = RelayConfig("ns", "r", f"r-relay-{ordinal}", KEY, ("127.0.0.1", 1), capacity=100)

    class NoMaps:
        async def read(self) -> ShardMap | None:
            return None

    return Relay(config, NoMaps(), StaticResolver({}))


def _hello(listener: str, generation: int, ordinal: int = 2) -> dict[str, object]:
    claims = {
        "listener": listener, "room": "ns/r", "pod": f"r-relay-{ordinal}",
        "shard": None, "generation": generation,
    }  # fmt: skip
    return {"role": "listener", "ticket": sign(KEY, "admit", claims, expires=time.time() + 10)}


def test_a_draining_relay_counts_only_the_edges_faults_and_refuses_both() -> None:
    first, grown, drained, _ = maps()
    relay = _relay(2)
    relay.apply_map(grown)
    assert relay.admit(_hello("early", grown.generation)).name == "early"
    relay.apply_map(drained)
    with pytest.raises(RefusedError) as race:
        relay.admit(_hello("crossed", grown.generation))
    assert race.value.reason == "draining"
    with pytest.raises(RefusedError) as fault:
        relay.admit(_hello("misplaced", drained.generation))
    assert fault.value.reason == "placed-while-draining"
    assert relay.drains.misplaced == {"refused": 1}
    del first


def test_a_relay_behind_the_edge_counts_a_listener_it_seated_on_a_draining_map() -> None:
    _, grown, drained, still = maps()
    relay = _relay(2)
    relay.apply_map(grown)  # it has not read that it drains yet
    assert relay.admit(_hello("misplaced", drained.generation)).name == "misplaced"
    assert not relay.drains.misplaced
    relay.apply_map(still)
    assert relay.drains.misplaced == {"seated": 1}


def test_a_guest_held_all_day_is_still_asked_at_the_cap() -> None:
    """A guest whose home stays full is asked at most every guest_renotify_max, however
    many times it was asked: the interval's doubling stops (2.0 ** 1,025 overflowed and
    stopped the relay's notices)."""
    relay = _relay(1)
    held = Notices(first=0.0, last=0.0, count=5_000)
    assert relay._renotify_after("guest", held) == relay.config.guest_renotify_max
    assert relay._renotify_after("draining", held) == relay.config.renotify_seconds
