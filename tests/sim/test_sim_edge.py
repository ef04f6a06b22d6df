"""The simulator's edge and relays follow the data plane's rules (townsquare.edge.admission,
townsquare.relay.server): each case below is a rule of the real code, seen in the figures
a user of `townsquare simulate` reads (connected, waiting, overloaded, relay loads)."""

from __future__ import annotations

import pytest

from townsquare.sim.edge import Edge

SHARDS, CAPACITY = 10, 1000


def _edge(counts: dict[int, int], down: set[int] | None = None) -> Edge:
    """An edge whose map is `counts`, every relay Ready but `down`, all reported."""
    edge = Edge(SHARDS, CAPACITY)
    states = dict.fromkeys(counts, "active")
    edge.regroup(counts, states, max(counts) + 1, down or set())
    if edge.report(1.0):
        edge.regroup(counts, states, max(counts) + 1, down or set())
    return edge


def _loads(edge: Edge) -> dict[int, float]:
    return edge.loads().all()


def test_a_relay_takes_joins_up_to_its_capacity_whatever_the_map_says() -> None:
    edge = _edge({0: 10})
    connected, waiting, overloaded = edge.step(1500, queueing=False)
    assert (connected, waiting, overloaded) == (1000, 500, 0)
    assert _loads(edge) == {0: 1000}


def test_a_report_glitched_low_cannot_overfill_a_relay_it_refuses_at_capacity() -> None:
    edge = _edge({0: 10})
    edge.step(900, queueing=False)
    edge.window_opens()  # the next report's window: the 900 joins are no longer counted
    edge.step(900, queueing=False)
    edge.report(0.1)  # the scrape read 90 listeners where 900 are
    connected, waiting, overloaded = edge.step(2000, queueing=False)
    assert overloaded == 0
    assert connected == pytest.approx(1000)
    assert waiting == pytest.approx(1000)
    assert max(_loads(edge).values()) == pytest.approx(CAPACITY)


def test_joins_counted_since_the_report_keep_the_edge_from_refilling_a_relay() -> None:
    """Without a new report (a metric outage) listeners who left are not known to have left."""
    edge = _edge({0: 10})
    edge.step(800, queueing=False)
    edge.step(0, queueing=False)  # they all leave; no scrape tells the edge
    connected, waiting, _ = edge.step(800, queueing=False)
    assert connected == pytest.approx(200)  # 1,000 - 0 reported - 800 joins counted
    assert waiting == pytest.approx(600)


def test_a_relay_ready_but_not_yet_reported_takes_no_join() -> None:
    edge = _edge({0: 5})
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(1000, queueing=False)
    assert (connected, waiting) == (500, 500)
    assert edge.report(1.0)  # a scrape: relay 1 reported 0 listeners
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(1000, queueing=False)
    assert (connected, waiting) == (1000, 0)


def test_a_moved_shard_stays_on_its_old_relay_until_the_new_one_can_take_it() -> None:
    edge = _edge({0: 10})
    edge.step(600, queueing=False)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(600, queueing=False)
    assert (connected, waiting) == (600, 0)  # relay 1 has not reported: the move is held
    assert _loads(edge) == {0: 600, 1: 0}
    edge.report(1.0)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(600, queueing=False)
    assert (connected, waiting) == (600, 0)
    assert _loads(edge) == {0: 300, 1: 300}


def test_a_crashed_relays_listeners_wait_until_their_shards_move() -> None:
    edge = _edge({0: 5, 1: 5})
    edge.step(1000, queueing=False)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, {1})
    connected, waiting, _ = edge.step(1000, queueing=False)
    assert (connected, waiting) == (500, 500)
    edge.regroup({0: 10}, {0: "active"}, 2, {1})  # the map moved them
    connected, waiting, _ = edge.step(1000, queueing=False)
    assert (connected, waiting) == (1000, 0)


def test_while_the_map_queues_a_first_attempt_waits_for_its_retry() -> None:
    edge = _edge({0: 10})
    edge.step(100, queueing=True)
    connected, waiting, _ = edge.step(300, queueing=True)
    assert waiting == pytest.approx(200)  # the 200 who came this second retry the next
    connected, waiting, _ = edge.step(300, queueing=True)
    assert (connected, waiting) == (pytest.approx(300), pytest.approx(0))
