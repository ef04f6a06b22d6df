"""Drained rollouts: a few relays at a time, drained first, never below the demand, with
extra relays when the room has no slack."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from townsquare.rollout import RolloutStep, plan_rollout
from townsquare.scaling import DRAIN_SETTLE

NOW = datetime(2026, 12, 1, 23, 30, tzinfo=UTC)
TIMEOUT = timedelta(minutes=5)


def step(**given_args: Any) -> RolloutStep:
    args: dict[str, Any] = {
        "accepting": 6,
        "ready": frozenset(range(6)),
        "outdated": frozenset(range(6)),
        "draining": {},
        "relay_listeners": dict.fromkeys(range(6), 300),
        "sampled_at": NOW,
        "demand": 1800.0,
        "capacity": 1000,
        "max_surge": 2,
        "now": NOW,
        "drain_timeout": TIMEOUT,
        "max_relays": 6,
    }
    args.update(given_args)
    return plan_rollout(**args)


def test_a_few_relays_are_drained_first_and_none_replaced_yet() -> None:
    first = step()
    assert len(first.started) == 2
    assert first.replace == ()
    assert {o for o, _ in first.draining} == set(first.started)


def test_the_least_loaded_relays_go_first() -> None:
    first = step(relay_listeners={0: 500, 1: 10, 2: 400, 3: 0, 4: 300, 5: 600})
    assert first.started == (3, 1)


def test_only_emptied_relays_are_replaced() -> None:
    since = NOW - timedelta(seconds=30)
    later = step(
        draining={0: since, 1: since},
        relay_listeners={0: 0, 1: 12, 2: 300, 3: 300, 4: 300, 5: 300},
    )
    assert later.replace == (0,)
    assert [o for o, _ in later.draining] == [1]


def test_a_count_sampled_before_the_drain_began_proves_nothing() -> None:
    since = NOW - timedelta(seconds=5)
    later = step(draining={0: since}, relay_listeners=dict.fromkeys(range(6), 0), sampled_at=since)
    assert later.replace == ()


def test_a_count_taken_just_after_the_drain_began_proves_nothing_either() -> None:
    """The edge admits by the older map until the new one reaches it, and a count trails the
    connection: a relay counted empty within DRAIN_SETTLE of its drain may still be taking
    a listener admitted meanwhile; a count after that shows it truly empty."""
    since = NOW - timedelta(seconds=5)
    empty = dict.fromkeys(range(6), 0)
    soon = step(draining={0: since}, relay_listeners=empty, sampled_at=since + timedelta(seconds=1))
    assert soon.replace == ()
    settled = step(draining={0: since}, relay_listeners=empty, sampled_at=since + DRAIN_SETTLE * 2)
    assert settled.replace == (0,)


def test_a_drain_that_times_out_replaces_the_relay_and_says_so() -> None:
    since = NOW - TIMEOUT
    later = step(draining={0: since}, relay_listeners={**dict.fromkeys(range(6), 300)})
    assert later.replace == (0,)
    assert later.timed_out == (0,)


def test_no_relay_is_drained_when_the_others_could_not_carry_the_demand() -> None:
    full = step(demand=5600.0)
    assert full.started == () and full.surge == ()
    assert full.held_by_capacity, "maxRelays leaves no room for an extra relay"
    one_spare = step(demand=4400.0)  # 5 relays at 90% carry it
    assert len(one_spare.started) == 1


def test_a_room_without_slack_first_adds_extra_relays_then_drains() -> None:
    tight = step(demand=5600.0, max_relays=20)  # needs 7 relays at 90%: more than the 6
    assert tight.surge == (6, 7)
    assert tight.started == (), "nothing drains while the extra relays start"
    assert not tight.held_by_capacity
    up = step(demand=5600.0, max_relays=20, surge=2, ready=frozenset(range(8)))
    assert up.surge == (6, 7)
    assert len(up.started) == 1, "8 relays serve, 7 carry the demand: one may drain"


def test_only_as_many_extra_relays_as_needed_and_never_beyond_max_relays() -> None:
    assert step(demand=4400.0, max_relays=20).surge == (6,)  # 5 carry it: one more, two out
    assert step(demand=1800.0, max_relays=20).surge == (), "slack enough: no extra relay"
    capped = step(demand=5600.0, max_relays=7)
    assert capped.surge == (6,)
    assert capped.started == ()


def test_extra_relays_stay_until_the_relays_they_stood_in_for_are_back() -> None:
    restarting = step(
        outdated=frozenset(), ready=frozenset({0, 1, 2, 4, 5, 6, 7}), surge=2, max_relays=20
    )
    assert restarting.surge == (6, 7), "relay 3 is still starting with the new template"
    done = step(outdated=frozenset(), ready=frozenset(range(8)), surge=2, max_relays=20)
    assert done.surge == (), "the rollout is over: the extra relays go"


def test_extra_relays_are_kept_not_added_when_the_demand_is_unknown() -> None:
    blind = {"demand": None, "relay_listeners": None, "sampled_at": None, "max_relays": 20}
    assert step(**blind).surge == ()
    assert step(**blind, surge=2).surge == (6, 7)


def test_a_dip_in_demand_mid_rollout_keeps_the_extra_relays() -> None:
    dip = step(demand=100.0, surge=2, ready=frozenset(range(8)), max_relays=20)
    assert dip.surge == (6, 7)


def test_nothing_new_is_drained_blind() -> None:
    blind = step(demand=None, relay_listeners=None, sampled_at=None)
    assert blind.started == ()
    since = NOW - timedelta(seconds=30)
    waiting = step(demand=None, relay_listeners=None, sampled_at=None, draining={0: since})
    assert waiting.replace == (), "unknown counts: only the timeout replaces"


def test_relays_starting_count_against_max_surge() -> None:
    restarting = step(ready=frozenset({2, 3, 4, 5}), outdated=frozenset({2, 3, 4, 5}))
    assert restarting.started == ()
    one_back = step(ready=frozenset({1, 2, 3, 4, 5}), outdated=frozenset({2, 3, 4, 5}))
    assert len(one_back.started) == 1, "relay 0 still starts: one slot of two is left"
    crashing = step(ready=frozenset({2, 3, 4, 5}), relay_listeners={2: 450, 3: 450, 4: 450, 5: 450})
    assert crashing.replace == (0, 1), "outdated and not Ready, carrying nobody: replaced now"
    assert crashing.started == (), "they are still out of service: no Ready relay drains yet"


FOUR_CARRY = {0: 100, 1: 100, 2: 100, 3: 100}
"""Relays 0-3 Ready with 100 listeners each; 4 and 5 report nobody."""


def test_outdated_relays_that_never_become_ready_are_replaced_at_once() -> None:
    """A bad image rolled out to 4 and 5, then reverted: they crash-loop on the old template.
    They carry nobody, so they are replaced now, without a slot (the old code waited for
    them to be Ready, and held both maxSurge slots with them for ever)."""
    reverted = step(
        ready=frozenset(range(4)), outdated=frozenset({4, 5}),
        relay_listeners=FOUR_CARRY, demand=400.0,
    )  # fmt: skip
    assert reverted.replace == (4, 5)
    assert reverted.timed_out == ()
    zero = step(
        ready=frozenset(range(4)), outdated=frozenset({4, 5}),
        relay_listeners={**FOUR_CARRY, 4: 0, 5: 0}, demand=400.0, max_surge=1,
    )  # fmt: skip
    assert zero.replace == (4, 5), "not gated by maxSurge: they are out of service already"


def test_an_outdated_relay_not_ready_but_still_carrying_listeners_drains_first() -> None:
    blip = step(
        ready=frozenset(range(4)), outdated=frozenset({4, 5}),
        relay_listeners={**FOUR_CARRY, 4: 80}, demand=480.0,
    )  # fmt: skip
    assert blip.replace == (5,)
    assert [o for o, _ in blip.draining] == [4], "its listeners leave before it is replaced"
    blind = step(
        ready=frozenset(range(4)), outdated=frozenset({4, 5}),
        relay_listeners=None, sampled_at=None, demand=None,
    )  # fmt: skip
    assert blind.replace == (), "no count at all: only the drain timeout replaces"
    assert [o for o, _ in blind.draining] == [4, 5]
    later = step(
        ready=frozenset(range(4)), outdated=frozenset({4, 5}), draining=dict(blind.draining),
        relay_listeners=None, sampled_at=None, demand=None, now=NOW + TIMEOUT,
    )  # fmt: skip
    assert later.replace == (4, 5)


def test_a_draining_relay_without_a_count_is_not_taken_for_empty() -> None:
    """Relay 0 drains and turns not Ready; its series is gone. Its listeners are unknown,
    not zero: it stays until a count says 0 or the drain times out."""
    since = NOW - timedelta(seconds=30)
    others = dict.fromkeys(range(1, 6), 300)
    unknown = step(draining={0: since}, ready=frozenset(range(1, 6)), relay_listeners=others)
    assert unknown.replace == ()
    assert 0 in dict(unknown.draining)
    counted = step(
        draining={0: since}, ready=frozenset(range(1, 6)), relay_listeners={**others, 0: 0}
    )
    assert counted.replace == (0,)


def test_relays_leaving_by_scale_down_are_not_replaced() -> None:
    shrinking = step(accepting=4, outdated=frozenset({4, 5}))
    assert shrinking.started == ()


def test_a_relay_back_with_the_new_template_leaves_the_rollout() -> None:
    since = NOW - timedelta(seconds=30)
    back = step(outdated=frozenset({1, 2, 3, 4, 5}), draining={0: since})
    assert 0 not in {o for o, _ in back.draining}
    assert 0 not in back.replace


@given(
    relays=st.integers(min_value=1, max_value=30),
    surge=st.integers(min_value=1, max_value=5),
    room=st.integers(min_value=0, max_value=6),
    demand=st.integers(min_value=0, max_value=30_000),
    loads=st.lists(st.integers(min_value=0, max_value=1000), min_size=40, max_size=40),
    broken=st.dictionaries(
        st.integers(min_value=0, max_value=29), st.sampled_from(["no series", "0", "blip"]),
        max_size=6,
    ),
)  # fmt: skip
def test_a_whole_rollout_never_exceeds_max_surge_nor_goes_below_demand(
    relays: int, surge: int, room: int, demand: int, loads: list[int], broken: dict[int, str]
) -> None:
    """Play a rollout to its end: listeners leave a drained relay within a pass, a new
    relay is Ready a pass after it was created, an extra relay let go drains and goes.
    `broken` outdated relays are not Ready and never will be until replaced (crash-looping):
    with no series, reporting 0, or still carrying listeners after a readiness blip."""
    max_relays = relays + room
    need = math.ceil(demand / 900 - 1e-9)
    outdated = set(range(relays))
    existing = set(range(relays))
    broken = {o: kind for o, kind in broken.items() if o < relays}
    down = len(broken)
    draining: dict[int, datetime] = {}
    starting: set[int] = set()
    held = 0
    now = NOW
    for turn in range(4 * relays + 8):
        ready = frozenset(existing - starting - set(broken))
        listeners = {
            o: 0 if o in draining or broken.get(o) == "0" else loads[o % 40]
            for o in existing
            if broken.get(o) != "no series"
        }
        result = plan_rollout(
            accepting=relays, ready=ready, outdated=frozenset(outdated), draining=draining,
            relay_listeners=listeners, sampled_at=now, demand=float(demand), capacity=1000,
            max_surge=surge, now=now, drain_timeout=TIMEOUT, max_relays=max_relays,
            surge=held,
        )  # fmt: skip
        assert relays + len(result.surge) <= max(max_relays, relays)
        assert len(result.surge) <= surge
        counted = range(relays + len(result.surge))
        not_ready = {o for o in counted if o not in ready}
        leaving = set(dict(result.draining)) | set(result.replace)
        taken = leaving & ready
        assert len(taken) <= surge, "at most maxSurge serving relays taken out"
        if set(result.started) & ready:
            assert len(leaving | not_ready) <= surge, "a drain starts only within maxSurge"
        if turn == 0:
            assert set(broken) <= leaving, "a relay never Ready again is not waited for"
            assert {o for o, kind in broken.items() if kind != "blip"} <= set(result.replace)
        serving = sum(1 for o in counted if o in ready and o not in leaving)
        assert serving >= min(need, relays - down), "never below what the audience needs"
        if set(result.started) & ready:
            assert serving * 1000 * 0.9 >= demand
        for ordinal in result.replace:
            reported = listeners.get(ordinal, None if ordinal in ready else 0)  # down: no one
            assert reported == 0 or ordinal in result.timed_out
            outdated.discard(ordinal)
            broken.pop(ordinal, None)
        added = set(result.surge) - existing
        existing = (existing & set(range(relays))) | set(result.surge)
        starting = set(result.replace) | added  # back Ready, new, by the next pass
        draining = dict(result.draining)
        held = len(result.surge)
        now += timedelta(seconds=10)
    extra = max(0, min(surge, room))
    if demand <= (relays + extra - 1) * 900:
        assert not outdated, "the rollout finishes when one relay can be spared or added"
        assert held == 0, "and the extra relays go"
