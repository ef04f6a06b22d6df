"""The edge's decisions: capacity shared by replicas, first come first served, moves."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from townsquare import tickets
from townsquare.edge.admission import (
    Admitted,
    Closed,
    Endpoint,
    Gate,
    Held,
    Line,
    Location,
    News,
    Queued,
    Report,
    line_of,
)
from townsquare.edge.admission import Settings as EdgeSettings
from townsquare.sharding import Admission, RelayState, ShardMap, new_map, rebalance, shard_of

KEY = b"k" * 32
NS, ROOM = "spaces", "launch"


def room_map(
    relays: int = 2,
    capacity: int = 10,
    draining: tuple[int, ...] = (),
    budget: int | None = None,
    admission: Admission = "open",
) -> ShardMap:
    base = new_map(64, capacity, budget)
    shard_map = rebalance(base, active=range(relays), fanout=8).map
    if draining:  # marked draining, shards not yet moved (the budget is spent)
        active = [r for r in range(relays) if r not in draining]
        weights = [1.0] * 64
        shard_map = rebalance(
            shard_map, active=active, draining=draining, fanout=8,
            shard_listeners=weights, budget=0,
        ).map  # fmt: skip
    return ShardMap(
        shard_map.generation,
        shard_map.assignment,
        shard_map.relays,
        shard_map.parents,
        admission,
        capacity,
        budget,
    )


def seat_at(listener: str, pod: str, *, at: float = 90.0, shard: int | None = None) -> str:
    """The admit ticket an edge gave `listener` for `pod` at `at` (expired by now=101); a
    guest's (no `shard`) unless told otherwise."""
    claims = {"listener": listener, "room": f"{NS}/{ROOM}", "pod": pod, "shard": shard}
    return tickets.sign(KEY, "admit", {**claims, "generation": 1}, expires=at + 5.0)


def gate_for(
    shard_map: ShardMap,
    *,
    replicas: int = 1,
    ready: tuple[int, ...] | None = None,
    listeners: dict[int, int] | None = None,
    sampled_at: float = 100.0,
    started_at: float = 0.0,
) -> Gate:
    gate = Gate(
        KEY, EdgeSettings(replicas=replicas, admit_ttl=5.0, retry_after=1.0, started_at=started_at)
    )
    gate.set_map(NS, ROOM, shard_map)
    ordinals = sorted(shard_map.relays) if ready is None else ready
    gate.set_slice(
        NS,
        ROOM,
        "slice-a",
        {f"{ROOM}-relay-{o}": Endpoint(f"10.0.0.{o + 1}:7000", True) for o in ordinals},
    )
    gate.set_reports(
        {
            (NS, ROOM, f"{ROOM}-relay-{o}"): Report((listeners or {}).get(o, 0), sampled_at)
            for o in shard_map.relays
        }
    )
    return gate


def listeners_of(shard_map: ShardMap, relay: int, count: int, prefix: str = "l") -> list[str]:
    """`count` listener ids whose shard the map gives to `relay`."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        listener = f"{prefix}-{i}"
        if shard_map.assignment[shard_of(listener, shard_map.shards)] == relay:
            found.append(listener)
        i += 1
    return found


def test_an_admission_names_the_relay_and_carries_a_ticket_the_relay_can_check() -> None:
    shard_map = room_map()
    gate = gate_for(shard_map)
    room = gate.rooms[(NS, ROOM)]
    answer = gate.join(room, "alice", None, now=101.0)
    assert isinstance(answer, Admitted)
    relay = shard_map.relay_for("alice")
    assert answer.pod == f"{ROOM}-relay-{relay}"
    assert answer.relay == f"10.0.0.{relay + 1}:7000"
    claims = tickets.verify(KEY, answer.ticket, "admit", now=101.0)
    assert claims["listener"] == "alice"
    assert claims["pod"] == answer.pod
    assert claims["shard"] == answer.shard == shard_of("alice", 64)
    assert claims["generation"] == shard_map.generation
    assert claims["room"] == f"{NS}/{ROOM}"


@settings(max_examples=60, deadline=None)
@given(
    replicas=st.integers(1, 5),
    reported=st.integers(0, 12),
    joins=st.lists(st.integers(0, 4), min_size=1, max_size=80),
)
def test_replicas_together_never_fill_a_relay_beyond_its_capacity(
    replicas: int, reported: int, joins: list[int]
) -> None:
    shard_map = room_map(relays=1, capacity=12)
    gates = [
        gate_for(shard_map, replicas=replicas, listeners={0: reported}) for _ in range(replicas)
    ]
    admitted = 0
    for i, replica in enumerate(joins):
        gate = gates[replica % replicas]
        answer = gate.join(gate.rooms[(NS, ROOM)], f"listener-{i}", None, now=101.0 + i * 0.01)
        admitted += isinstance(answer, Admitted)
    assert reported + admitted <= 12


def test_admissions_before_a_report_count_until_their_tickets_expire() -> None:
    shard_map = room_map(relays=1, capacity=4)
    gate = gate_for(shard_map, sampled_at=100.0)
    room = gate.rooms[(NS, ROOM)]
    answers = [gate.join(room, f"a-{i}", None, now=101.0) for i in range(5)]
    assert [isinstance(a, Admitted) for a in answers] == [True] * 4 + [False]
    # A report 2 s later still says 0 (the listeners have not connected): the four
    # admissions still count, so the relay stays full for this replica.
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(0, 103.0)})
    assert isinstance(gate.join(room, "b", None, now=103.5), Queued)
    # Past the tickets' lifetime, the report alone decides.
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(1, 107.0)})
    assert isinstance(gate.join(room, "c", None, now=107.5), Admitted)


def test_draining_unready_and_unreported_relays_receive_no_joins() -> None:
    # Draining relays keep their shards until the operator moves them: their joins wait
    # while no other relay has room, and take a seat elsewhere once one has.
    draining = room_map(relays=2, draining=(1,))
    assert draining.relays[1] == "draining"
    on_draining = listeners_of(draining, 1, 3)
    full = gate_for(draining, listeners={0: 10})
    room = full.rooms[(NS, ROOM)]
    for listener in on_draining:
        answer = full.join(room, listener, None, now=101.0)
        assert isinstance(answer, Queued)
        assert "draining" in answer.reason and "no other relay has room" in answer.reason
    roomy = gate_for(draining)
    room = roomy.rooms[(NS, ROOM)]
    for listener in on_draining:
        answer = roomy.join(room, listener, None, now=101.0)
        assert isinstance(answer, Admitted) and answer.guest
        assert answer.pod == f"{ROOM}-relay-0"

    unready = gate_for(room_map(relays=2), ready=(0,), listeners={0: 10})
    room = unready.rooms[(NS, ROOM)]
    for listener in listeners_of(room.shard_map, 1, 3):
        answer = unready.join(room, listener, None, now=101.0)
        assert isinstance(answer, Queued)
        assert "not ready" in answer.reason

    fresh = gate_for(room_map(relays=1))
    fresh.rooms[(NS, ROOM)].reports.clear()
    answer = fresh.join(fresh.rooms[(NS, ROOM)], "x", None, now=101.0)
    assert isinstance(answer, Queued)
    assert "reported" in answer.reason


def test_a_restarted_replica_waits_for_a_report_newer_than_its_start() -> None:
    gate = gate_for(room_map(relays=1), sampled_at=100.0, started_at=99.0)
    room = gate.rooms[(NS, ROOM)]
    assert isinstance(gate.join(room, "early", None, now=101.0), Queued)
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(0, 104.5)})
    assert isinstance(gate.join(room, "early", None, now=104.6), Admitted)


def test_a_restarted_replica_that_cannot_admit_yet_holds_no_other_replica_back() -> None:
    # Two replicas share an open room with spare seats. Replica B restarts at 97.5: until a
    # report sampled after 97.5 + admit_ttl (102.5) arrives it admits nobody, so joins that
    # reach it wait there. Its line must not hold back the joins that reach A meanwhile.
    shard_map = room_map(relays=2, capacity=100)
    a = gate_for(shard_map, replicas=2, sampled_at=100.0, started_at=0.0)
    b = gate_for(shard_map, replicas=2, sampled_at=100.0, started_at=97.5)
    room_a, room_b = a.rooms[(NS, ROOM)], b.rooms[(NS, ROOM)]
    assert b.warming(now=101.0) and not a.warming(now=101.0)
    waiting = [b.join(room_b, f"at-b-{i}", None, now=101.0 + i * 0.1) for i in range(5)]
    assert all(isinstance(answer, Queued) for answer in waiting)
    exported = {room.key: line for room, line in b.lines(now=102.0)}
    a.set_news(_news_of(exported, heard=102.0))
    later = [a.join(room_a, f"at-a-{i}", None, now=102.1 + i * 0.1) for i in range(5)]
    assert all(isinstance(answer, Admitted) for answer in later), [
        getattr(answer, "reason", "") for answer in later
    ]
    # Once B can admit, it exports its line again and admits its waiters first.
    b.set_reports({(NS, ROOM, f"{ROOM}-relay-{o}"): Report(5, 102.6) for o in (0, 1)})
    assert not b.warming(now=102.7)
    assert [room.key for room, _ in b.lines(now=102.7)] == [f"{NS}/{ROOM}"]
    retries = [
        b.join(room_b, f"at-b-{i}", answer.ticket, now=102.7)
        for i, answer in enumerate(waiting)
        if isinstance(answer, Queued)
    ]
    assert len(retries) == 5 and all(isinstance(answer, Admitted) for answer in retries)


def _news_of(exported: dict[str, Line], *, heard: float) -> News:
    lines = {(NS, ROOM): {"b": exported[f"{NS}/{ROOM}"]}} if exported else {}
    return News(heard={"b": heard}, lines=lines)


def test_queued_listeners_are_admitted_in_the_order_of_their_first_attempt() -> None:
    shard_map = room_map(relays=1, capacity=3)
    gate = gate_for(shard_map, listeners={0: 3})
    room = gate.rooms[(NS, ROOM)]
    tickets_by_listener: dict[str, str] = {}
    for i, listener in enumerate(["w0", "w1", "w2", "w3", "w4"]):
        answer = gate.join(room, listener, None, now=101.0 + i * 0.3)
        assert isinstance(answer, Queued)
        assert answer.position == i + 1
        assert answer.waiting == i + 1
        tickets_by_listener[listener] = answer.ticket
    # Two seats free up. The latest arrivals retry first, yet the two oldest get the seats.
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(1, 102.5)})
    admitted = []
    for listener in ["w4", "w3", "w1", "w2", "w0", "w4", "w3", "w2"]:
        answer = gate.join(room, listener, tickets_by_listener[listener], now=103.0)
        if isinstance(answer, Admitted):
            admitted.append(listener)
    assert admitted == ["w1", "w0"]


def test_a_queue_ticket_keeps_the_place_at_another_replica() -> None:
    shard_map = room_map(relays=1, capacity=1)
    first = gate_for(shard_map, listeners={0: 1})
    second = gate_for(shard_map, listeners={0: 1})
    early = first.join(first.rooms[(NS, ROOM)], "early", None, now=101.0)
    assert isinstance(early, Queued)
    late = second.join(second.rooms[(NS, ROOM)], "late", None, now=105.0)
    assert isinstance(late, Queued)
    moved = second.join(second.rooms[(NS, ROOM)], "early", early.ticket, now=106.0)
    assert isinstance(moved, Queued)
    assert moved.position == 1, "the first attempt at the other replica decides the place"


def test_forged_foreign_and_expired_tickets() -> None:
    gate = gate_for(room_map(relays=1, capacity=1), listeners={0: 1})
    room = gate.rooms[(NS, ROOM)]
    queued = gate.join(room, "a", None, now=101.0)
    assert isinstance(queued, Queued)
    with pytest.raises(tickets.TicketError, match="another listener"):
        gate.join(room, "b", queued.ticket, now=102.0)
    forged = tickets.sign(
        b"x" * 32, "queue", {"listener": "a", "room": f"{NS}/{ROOM}", "first": 0}, expires=999
    )
    with pytest.raises(tickets.TicketError, match="signature"):
        gate.join(room, "a", forged, now=102.0)
    expired = gate.join(room, "a", queued.ticket, now=101.0 + 4000)
    assert isinstance(expired, Queued), "an expired ticket starts a new place, no error"


def test_while_the_room_queues_new_joins_wait_even_where_there_is_room() -> None:
    gate = gate_for(room_map(relays=1, admission="queueing"))
    room = gate.rooms[(NS, ROOM)]
    answer = gate.join(room, "a", None, now=101.0)
    assert isinstance(answer, Queued)
    assert "queueing" in answer.reason
    assert isinstance(gate.join(room, "a", answer.ticket, now=102.0), Admitted)


def test_moves_follow_the_map_within_the_replica_share_of_the_budget() -> None:
    shard_map = room_map(relays=2, budget=4)
    gate = gate_for(shard_map, replicas=2)
    room = gate.rooms[(NS, ROOM)]
    moved = listeners_of(shard_map, 1, 3)
    old_pod = f"{ROOM}-relay-0"
    here = gate.locate(room, moved[0], seat_at(moved[0], f"{ROOM}-relay-1"), now=101.0)
    assert isinstance(here, Location) and not here.moved and here.ticket is None
    answers = [
        gate.locate(room, listener, seat_at(listener, old_pod), now=101.0) for listener in moved
    ]
    assert isinstance(answers[0], Location) and answers[0].moved and answers[0].ticket
    assert isinstance(answers[1], Location) and answers[1].moved
    assert isinstance(answers[2], Held), "two replicas share 4 moves a minute: 2 each"
    assert "budget" in answers[2].reason
    later = gate.locate(room, moved[2], seat_at(moved[2], old_pod), now=161.5)
    assert isinstance(later, Location) and later.moved


def test_waiters_who_stop_retrying_leave_the_line() -> None:
    gate = gate_for(room_map(relays=1, capacity=1), listeners={0: 1})
    room = gate.rooms[(NS, ROOM)]
    gate.join(room, "gone", None, now=101.0)
    stays = gate.join(room, "stays", None, now=102.0)
    assert isinstance(stays, Queued)
    assert [(r.name, n) for r, n, _ in gate.waiting(102.0)] == [(ROOM, 2)]
    gate.join(room, "stays", stays.ticket, now=105.5)
    gate.expire(107.5)  # "gone" was told to retry after 1 s, and given 5 s more
    ((_, count, oldest),) = gate.waiting(107.5)
    assert count == 1
    assert oldest == pytest.approx(5.5)


def test_the_map_carries_the_migration_budget_the_replicas_share() -> None:
    shard_map = room_map(budget=600)
    document = shard_map.to_dict()
    assert document["maxMigrationsPerMinute"] == 600
    assert ShardMap.from_dict(document) == shard_map
    older = {k: v for k, v in document.items() if k != "maxMigrationsPerMinute"}
    assert ShardMap.from_dict(older).migrations_per_minute is None


def news_of(oldest: float | None, heard: float, waiting: int = 1) -> News:
    """News from one other replica, scraped at `heard`, whose line (if any) starts at
    `oldest`, one join a second."""
    if oldest is None:
        return News(heard={"other": heard})
    firsts = [oldest + i for i in range(waiting)]
    line = line_of([(first, f"o{i}") for i, first in enumerate(firsts)])
    return News(heard={"other": heard}, lines={(NS, ROOM): {"other": line}})


def test_listeners_far_behind_the_oldest_waiting_join_are_told_to_retry_later() -> None:
    gate = gate_for(room_map(relays=1, capacity=1), listeners={0: 1})
    room = gate.rooms[(NS, ROOM)]
    gate.set_news(news_of(100.0, heard=100.0))
    retries = {}
    for behind in (0.5, 1.9, 2.5, 4.5, 30.0):
        answer = gate.join(room, f"w{behind}", None, now=100.0 + behind)
        assert isinstance(answer, Queued)
        retries[behind] = answer.retry_after
    assert retries == {0.5: 1, 1.9: 1, 2.5: 2, 4.5: 3, 30.0: 5}, "at most five intervals"


def test_a_new_relays_seats_go_to_the_oldest_waiters_of_the_room_whatever_their_shard() -> None:
    before = room_map(relays=1, capacity=3)
    gate = gate_for(before, listeners={0: 3})
    room = gate.rooms[(NS, ROOM)]
    waiting = {}
    for i in range(40):
        answer = gate.join(room, f"w{i}", None, now=101.0 + i * 0.02)
        assert isinstance(answer, Queued)
        waiting[f"w{i}"] = answer.ticket
    # A second relay arrives and takes half the shards; it has room for three.
    after = rebalance(before, active=[0, 1], fanout=8).map
    gate.set_map(NS, ROOM, after)
    gate.set_slice(NS, ROOM, "slice-b", {f"{ROOM}-relay-1": Endpoint("10.0.0.2:7000", True)})
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-1"): Report(0, 102.0)})
    # The youngest retry first, yet the seats go to the three oldest, on the new relay:
    # those whose shard stayed on the full relay sit there as guests.
    admitted: dict[str, Admitted] = {}
    for listener in [*reversed(waiting), *waiting]:
        answer = gate.join(room, listener, waiting[listener], now=102.5)
        if isinstance(answer, Admitted):
            admitted[listener] = answer
    assert sorted(admitted) == ["w0", "w1", "w2"]
    assert {a.pod for a in admitted.values()} == {f"{ROOM}-relay-1"}
    guests = {w for w, a in admitted.items() if a.guest}
    assert guests == {w for w in admitted if after.relay_for(w) == 0}
    for listener, answer in admitted.items():
        claims = tickets.verify(KEY, answer.ticket, "admit", now=102.5)
        assert claims["shard"] == (None if listener in guests else shard_of(listener, 64))
        assert answer.shard == shard_of(listener, 64)


def test_a_join_waits_while_one_that_came_more_than_the_window_earlier_still_waits() -> None:
    shard_map = room_map(relays=2, capacity=10, admission="queueing")
    gate = gate_for(shard_map, listeners={0: 10, 1: 9})
    room = gate.rooms[(NS, ROOM)]
    old = listeners_of(shard_map, 0, 1, prefix="old")[0]
    young = listeners_of(shard_map, 1, 1, prefix="young")[0]
    first = gate.join(room, old, None, now=101.0)
    queued = gate.join(room, young, None, now=101.9)
    assert isinstance(first, Queued) and isinstance(queued, Queued)
    # The young one's relay has a seat, but the old one came 0.9 s earlier and still waits.
    held = gate.join(room, young, queued.ticket, now=102.0)
    assert isinstance(held, Queued) and "earlier still wait" in held.reason
    # The old one retries: its relay is full, so it takes that seat, as a guest.
    seated = gate.join(room, old, first.ticket, now=102.1)
    assert isinstance(seated, Admitted) and seated.guest and seated.pod == f"{ROOM}-relay-1"
    again = gate.join(room, young, queued.ticket, now=102.9)
    assert isinstance(again, Queued) and "full" in again.reason


def test_joins_waiting_at_another_replica_hold_back_younger_ones_here() -> None:
    gate = gate_for(room_map(relays=1, capacity=10))
    room = gate.rooms[(NS, ROOM)]
    gate.set_news(news_of(100.0, heard=100.5))
    held = gate.join(room, "young", None, now=101.0)
    assert isinstance(held, Queued) and "earlier still wait" in held.reason
    assert isinstance(gate.join(room, "near", None, now=100.5), Admitted)
    gate.set_news(news_of(None, heard=101.5))  # the other replica admitted it
    assert isinstance(gate.join(room, "young", held.ticket, now=102.0), Admitted)


def test_a_queued_join_waits_until_the_other_replicas_news_covers_its_first_attempt() -> None:
    """A join queued at another replica since its last scrape is unknown here: a queued
    join younger than that news by more than the window waits for the next news."""
    gate = gate_for(room_map(relays=1, capacity=10, admission="queueing"))
    room = gate.rooms[(NS, ROOM)]
    gate.set_news(news_of(None, heard=100.0))
    queued = gate.join(room, "late", None, now=101.0)
    assert isinstance(queued, Queued) and "queueing" in queued.reason
    gate.set_map(NS, ROOM, room_map(relays=1, capacity=10))
    held = gate.join(room, "late", queued.ticket, now=102.0)
    assert isinstance(held, Queued) and "not known" in held.reason
    gate.set_news(news_of(None, heard=100.3))  # sampled 0.7 s before its first attempt
    assert isinstance(gate.join(room, "late", queued.ticket, now=103.0), Admitted)
    # A new join does not wait for news (the map is open): it is the one exception.
    gate.set_news(news_of(None, heard=90.0))
    assert isinstance(gate.join(room, "new", None, now=104.0), Admitted)


def test_position_and_waiting_count_the_whole_rooms_line() -> None:
    gate = gate_for(room_map(relays=1, capacity=10, admission="queueing"))
    room = gate.rooms[(NS, ROOM)]
    gate.set_news(news_of(100.0, heard=110.0, waiting=11))  # first attempts 100 ... 110
    for listener, now in (("a", 104.5), ("b", 105.5)):
        assert isinstance(gate.join(room, listener, None, now=now), Queued)
    answer = gate.join(room, "c", None, now=105.0)
    assert isinstance(answer, Queued)
    # Ahead: "a" here, and the five of the other line who came at 100 ... 104 (its tenths
    # place 105.0 halfway through it).
    assert (answer.position, answer.waiting) == (7, 14)
    gate.set_news(News())  # Prometheus unreachable: this replica's own line only
    alone = gate.join(room, "d", None, now=106.0)
    assert isinstance(alone, Queued) and (alone.position, alone.waiting) == (4, 4)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=300),
    st.floats(-10, 1010, allow_nan=False),
)
def test_a_line_places_a_join_within_a_tenth_of_it(firsts: list[float], first: float) -> None:
    line = line_of(sorted((f, str(i)) for i, f in enumerate(firsts)))
    exact = sum(1 for f in firsts if f < first)
    assert abs(line.ahead_of(first) - exact) <= len(firsts) / 10 + 1
    assert line == Line(len(firsts), line.firsts) and list(line.firsts) == sorted(line.firsts)


def test_a_listener_that_stopped_retrying_holds_back_no_one_for_long() -> None:
    gate = gate_for(room_map(relays=1, capacity=10), listeners={0: 10})
    room = gate.rooms[(NS, ROOM)]
    assert isinstance(gate.join(room, "gone", None, now=101.0), Queued)
    gate.set_reports({(NS, ROOM, f"{ROOM}-relay-0"): Report(0, 101.5)})
    assert isinstance(gate.join(room, "next", None, now=102.0), Queued)
    # "gone" was told to retry after 1 s; past 1.25 s and one more interval it is gone.
    assert isinstance(gate.join(room, "next", None, now=103.3), Admitted)


def test_a_guest_goes_home_once_no_join_waits_and_within_the_budget() -> None:
    shard_map = room_map(relays=2, capacity=10, budget=60)
    gate = gate_for(shard_map, listeners={1: 5})
    room = gate.rooms[(NS, ROOM)]
    guest = listeners_of(shard_map, 0, 1, prefix="g")[0]
    other = f"{ROOM}-relay-1"
    room.wait("w", 101.0, 110.0)  # a join waits here
    held = gate.locate(room, guest, seat_at(guest, other), now=101.0)
    assert isinstance(held, Held) and "wait for a seat" in held.reason
    room.leave("w")
    home = gate.locate(room, guest, seat_at(guest, other), now=101.0)
    assert isinstance(home, Location) and home.moved and home.pod == f"{ROOM}-relay-0"
    assert tickets.verify(KEY, home.ticket or "", "admit", now=101.0)["shard"] == home.shard


def test_a_guest_off_a_relay_that_stays_waits_while_a_relay_drains() -> None:
    """The operator paces a drain as if the whole migration budget were its own: a guest
    going home would spend it, so it waits (room and budget there for it) until no relay
    drains; a listener whose shard moved, and a guest on the draining relay, still move."""
    shard_map = room_map(relays=3, capacity=10, draining=(2,), budget=60)
    gate = gate_for(shard_map)
    room = gate.rooms[(NS, ROOM)]
    guest, moved, later = listeners_of(shard_map, 0, 3, prefix="g")
    stays, leaves = f"{ROOM}-relay-1", f"{ROOM}-relay-2"
    held = gate.locate(room, guest, seat_at(guest, stays), now=101.0)
    assert isinstance(held, Held) and "drains" in held.reason
    shard = shard_of(moved, shard_map.shards)
    by_shard = gate.locate(room, moved, seat_at(moved, stays, shard=shard), now=101.0)
    assert isinstance(by_shard, Location) and by_shard.moved
    drained = gate.locate(room, guest, seat_at(guest, leaves), now=101.0)
    assert isinstance(drained, Location) and drained.moved and drained.pod == f"{ROOM}-relay-0"
    over: dict[int, RelayState] = {o: "active" for o in shard_map.relays}  # drain called off
    gate.set_map(NS, ROOM, dataclasses.replace(shard_map, generation=9, relays=over))
    home = gate.locate(room, later, seat_at(later, stays), now=101.0)
    assert isinstance(home, Location) and home.moved and home.pod == f"{ROOM}-relay-0"


def test_listeners_leave_a_draining_relay_even_while_joins_wait() -> None:
    shard_map = room_map(relays=2, capacity=10, draining=(1,), budget=60)
    gate = gate_for(shard_map, listeners={1: 5})
    room = gate.rooms[(NS, ROOM)]
    room.wait("w", 101.0, 110.0)
    mover = listeners_of(shard_map, 0, 1, prefix="m")[0]
    moved = gate.locate(room, mover, seat_at(mover, f"{ROOM}-relay-1"), now=101.0)
    assert isinstance(moved, Location) and moved.moved


def test_a_closed_room_admits_nobody_yet_moves_its_listeners_down() -> None:
    """Past the end of the event the map is closed: no join gets a relay, with a queue
    ticket or without, though relay 0 has room, and the answer is final (no ticket, no
    place in a line that never moves); a listener on the draining relay 1 is still sent
    to relay 0, where its shard went."""
    shard_map = rebalance(
        room_map(relays=2, capacity=10, budget=60), active=[0], draining=[1], fanout=8,
        shard_listeners=[0.1] * 64, closed=True,
    ).map  # fmt: skip
    assert shard_map.admission == "closed" and shard_map.counts()[1] == 0
    gate = gate_for(shard_map, listeners={1: 3})
    room = gate.rooms[(NS, ROOM)]
    first = gate.join(room, "late", None, now=101.0)
    assert isinstance(first, Closed) and "no new joins" in first.reason
    assert not room.waiters and [n for _, n, _ in gate.waiting(101.0)] == [0]
    mover = listeners_of(shard_map, 0, 1, prefix="m")[0]
    moved = gate.locate(room, mover, seat_at(mover, f"{ROOM}-relay-1"), now=102.0)
    assert isinstance(moved, Location) and moved.moved and moved.pod == f"{ROOM}-relay-0"


def test_joins_that_waited_when_the_room_closed_hold_no_move_back() -> None:
    """A join queued just before the end, retried after it: turned away, and it leaves the
    line, so a move between two active relays is not held behind a join that can never
    get in (and the edge exports no one waiting)."""
    queueing = room_map(relays=2, capacity=10, budget=60, admission="queueing")
    gate = gate_for(queueing, listeners={0: 3, 1: 0})
    room = gate.rooms[(NS, ROOM)]
    waiting = gate.join(room, "late-arrival", None, now=100.0)
    assert isinstance(waiting, Queued)
    closed = dataclasses.replace(queueing, admission="closed", generation=queueing.generation + 1)
    gate.set_map(NS, ROOM, closed)
    assert [n for _, n, _ in gate.waiting(100.5)] == [0], "nobody waits for a closed room"
    mover = listeners_of(closed, 1, 1, prefix="m")[0]
    moved = gate.locate(room, mover, seat_at(mover, f"{ROOM}-relay-0"), now=100.6)
    assert isinstance(moved, Location) and moved.moved, moved
    again = gate.join(room, "late-arrival", waiting.ticket, now=101.0)
    assert isinstance(again, Closed) and not room.waiters


def test_no_stranger_can_skip_the_queue_by_claiming_a_seat() -> None:
    # The probe: the room queues, 10 joins wait here, and strangers ask to be "moved"
    # off a relay they never held, or one that is not in the map at all.
    shard_map = room_map(relays=2, capacity=100, budget=60, admission="queueing")
    gate = gate_for(shard_map)
    room = gate.rooms[(NS, ROOM)]
    for i in range(10):
        assert isinstance(gate.join(room, f"w{i}", None, now=101.0), Queued)
    moves = 0
    for i in range(300):
        stranger = f"stranger-{i}"
        answer = gate.locate(room, stranger, None, now=101.0)
        assert isinstance(answer, Location) and not answer.moved and answer.ticket is None
        for pod in (
            "nonsense",
            f"{ROOM}-relay-9",
            f"{ROOM}-relay-{1 - shard_map.assignment[shard_of(stranger, 64)]}",
        ):
            with pytest.raises(tickets.TicketError):
                gate.locate(room, stranger, pod, now=101.0)  # a bare pod name is no ticket
        with pytest.raises(tickets.TicketError, match="another listener"):
            gate.locate(room, stranger, seat_at("w0", f"{ROOM}-relay-0"), now=101.0)
        with pytest.raises(tickets.TicketError, match="not in the room's map"):
            gate.locate(room, stranger, seat_at(stranger, "nonsense"), now=101.0)
        moves += len(room.moves)
    assert moves == 0
    assert len(room.waiters) == 10


def test_a_seated_listener_off_an_active_relay_still_waits_behind_the_queue() -> None:
    shard_map = room_map(relays=2, capacity=100, budget=60, admission="queueing")
    gate = gate_for(shard_map)
    room = gate.rooms[(NS, ROOM)]
    gate.join(room, "w", None, now=101.0)
    mover = listeners_of(shard_map, 1, 1)[0]
    held = gate.locate(room, mover, seat_at(mover, f"{ROOM}-relay-0"), now=101.0)
    assert isinstance(held, Held) and "moves come after them" in held.reason


def test_a_listener_that_could_not_reach_its_new_relay_may_ask_again() -> None:
    """A move's ticket spends the seat it came from while it is valid (a replay wins no
    second move); once it expired unused (the new relay did not welcome the listener in
    time on a busy machine), the old seat is proved again: before, the listener could not
    move for a minute, and in a room closed to joins its draining relay kept it."""
    shard_map = room_map(relays=2, capacity=10, draining=(1,), budget=60)
    shard_map = rebalance(shard_map, active=[0], draining=[1], fanout=8).map
    gate = gate_for(shard_map, listeners={0: 0})
    room = gate.rooms[(NS, ROOM)]
    mover = listeners_of(shard_map, 0, 1, prefix="m")[0]
    seat = seat_at(mover, f"{ROOM}-relay-1")
    first = gate.locate(room, mover, seat, now=101.0)
    assert isinstance(first, Location) and first.moved
    with pytest.raises(tickets.TicketError, match="superseded"):
        gate.locate(room, mover, seat, now=101.0 + gate.settings.admit_ttl / 2)
    again = gate.locate(room, mover, seat, now=101.0 + gate.settings.admit_ttl + 0.1)
    assert isinstance(again, Location) and again.moved and again.pod == f"{ROOM}-relay-0"
