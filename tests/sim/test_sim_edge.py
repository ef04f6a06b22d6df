"""The simulator's edge and relays follow the data plane's rules (townsquare.edge.admission,
townsquare.relay.server): each case below is a rule of the real code, seen in the figures
a user of `townsquare simulate` reads (connected, waiting, overloaded, relay loads)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    edge = _edge({0: 6})
    edge.regroup({0: 6, 1: 4}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(1600, queueing=False)
    # relay 0 takes its own 960 and 40 of relay 1's as guests; relay 1 takes none
    assert (connected, waiting) == (pytest.approx(1000), pytest.approx(600))
    assert _loads(edge) == {0: pytest.approx(1000), 1: 0}
    edge.window_opens()
    assert edge.report(1.0)  # a scrape: relay 1 reported 0 listeners
    edge.regroup({0: 6, 1: 4}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(1600, queueing=False)
    assert (connected, waiting) == (pytest.approx(1600), pytest.approx(0))
    # relay 1 took its 600 waiting joins, then its 40 guests came home from relay 0
    assert _loads(edge) == {0: pytest.approx(960), 1: pytest.approx(640)}


def test_a_join_whose_relay_is_full_sits_as_a_guest_where_a_seat_is_free() -> None:
    """The edge's `seat`: its shard's relay if that has a seat, else the one with most."""
    edge = _edge({0: 8, 1: 2})
    connected, waiting, overloaded = edge.step(1500, queueing=False)
    assert (connected, waiting, overloaded) == (1500, 0, 0)
    assert _loads(edge) == {0: 1000, 1: 500}  # 200 of relay 0's shards sit on relay 1
    connected, waiting, overloaded = edge.step(2500, queueing=False)
    assert (connected, waiting, overloaded) == (2000, 500, 0)
    assert _loads(edge) == {0: 1000, 1: 1000}


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


def test_a_crashed_relays_listeners_take_the_free_seats_and_the_rest_wait() -> None:
    edge = _edge({0: 5, 1: 5})
    edge.step(1600, queueing=False)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, {1})
    connected, waiting, _ = edge.step(1600, queueing=False)
    assert (connected, waiting) == (1000, 600)  # 200 of relay 1's 800 sit on relay 0
    edge.regroup({0: 10}, {0: "active"}, 2, {1})  # the map moved them
    connected, waiting, overloaded = edge.step(1600, queueing=False)
    assert (connected, waiting, overloaded) == (1000, 600, 0)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())  # relay 1 back, Ready
    edge.window_opens()
    edge.report(1.0)
    edge.regroup({0: 5, 1: 5}, {0: "active", 1: "active"}, 2, set())
    connected, waiting, _ = edge.step(1600, queueing=False)
    assert (connected, waiting) == (1600, 0)


def test_while_the_map_queues_a_first_attempt_waits_for_its_retry() -> None:
    edge = _edge({0: 10})
    edge.step(100, queueing=True)
    connected, waiting, _ = edge.step(300, queueing=True)
    assert waiting == pytest.approx(200)  # the 200 who came this second retry the next
    connected, waiting, _ = edge.step(300, queueing=True)
    assert (connected, waiting) == (pytest.approx(300), pytest.approx(0))


@given(
    st.lists(
        st.tuples(
            st.floats(0, 4000),
            st.sampled_from(
                [{0: 10}, {0: 5, 1: 5}, {0: 8, 1: 2}, {0: 3, 1: 3, 2: 4}, {1: 6, 2: 4}]
            ),
            st.sets(st.integers(0, 2), max_size=1),
            st.sets(st.integers(0, 2), max_size=1),
            st.booleans(),
            st.booleans(),
            st.sampled_from([1.0, 1.0, 0.5, 2.0]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_every_listener_counted_connected_sits_on_exactly_one_relay_within_capacity(
    steps: list[tuple[float, dict[int, int], set[int], set[int], bool, bool, float]],
) -> None:
    """Guests, held listeners and moves home keep the books: the relays' loads add up to
    the connected listeners, nobody is connected twice, and no relay goes above capacity
    (the relay refuses a join at capacity, whatever a glitched report says), through
    draining relays, crashes, new maps and reports glitched either way."""
    edge = _edge({0: 10})
    for wanted, counts, down, draining, scrape, queueing, factor in steps:
        pods = max(counts) + 1
        states = {o: "draining" if o in draining else "active" for o in counts}
        edge.regroup(counts, states, pods, down)
        connected, waiting, overloaded = edge.step(wanted, queueing=queueing)
        assert waiting >= -1e-6 and -1e-6 <= connected <= wanted + 1e-6
        assert overloaded == 0
        loads = _loads(edge)
        assert sum(loads.values()) == pytest.approx(connected, abs=1e-6)
        assert max(loads.values()) <= CAPACITY + 1e-6
        assert all(loads.get(o, 0.0) <= 1e-6 for o in down), "a crashed relay carries nobody"
        if scrape:
            edge.window_opens()
            if edge.report(factor):
                edge.regroup(counts, states, pods, down)
