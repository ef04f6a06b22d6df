"""Every phase can be re-entered, and changes mid-event never melt the room (pure rules)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from townsquare import headroom
from townsquare.api.models import AudioRoomSpec, AudioRoomStatus
from townsquare.lifecycle import Metrics, Observed, Outcome, occurrence_start, reconcile
from townsquare.policy import TenantPolicy
from townsquare.sharding import ShardMap

START = datetime(2026, 12, 3, 16, 0, tzinfo=UTC)  # a Thursday, 17:00 in Paris
WRITE = timedelta(seconds=0.2)
"""A map's write returns this long after the pass that decided it: its publication."""


def room(**spec: Any) -> AudioRoomSpec:
    base: dict[str, Any] = {
        "startTime": START,
        "duration": "1h",
        "expectedAudience": 7000,
        "relay": {"image": "registry.example/relay:1", "listenersPerRelay": 1000},
        "scaling": {"minRelays": 1, "prewarmLead": "2m", "drainTimeout": "5m"},
    }
    for key, value in spec.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return AudioRoomSpec.model_validate(base)


def seen(at: datetime, ready: int = 0, generation: int = 1, **fields: Any) -> Observed:
    return Observed(at, generation, ready, **fields)


def counted(
    listeners: int, at: datetime, by_relay: dict[int, int] | None = None, waiting: int = 0
) -> Metrics:
    return Metrics(listeners=listeners, waiting=waiting, by_relay=by_relay or {}, sampled_at=at)


def reasons(outcome: Outcome) -> list[str]:
    return [e.reason for e in outcome.events]


def run_to_end(spec: AudioRoomSpec, status: AudioRoomStatus) -> AudioRoomStatus:
    """Live, then past the end with every relay empty, then Ended."""
    end = spec.start_time + spec.duration
    for at, ready in [
        (spec.start_time + timedelta(minutes=1), 10),
        (end + timedelta(seconds=30), 10),
    ]:
        status = reconcile("r", spec, status, seen(at, ready, metrics=counted(0, at))).status
    ended = reconcile("r", spec, status, seen(end + timedelta(minutes=1), 0))
    assert ended.status.phase == "Ended"
    return ended.status


# --- an Ended room re-armed -------------------------------------------------------------


def test_a_new_future_start_time_re_arms_an_ended_room() -> None:
    spec = room()
    ended = run_to_end(spec, AudioRoomStatus())
    next_week = START + timedelta(days=7)
    moved = room(startTime=next_week)
    outcome = reconcile("r", moved, ended, seen(START + timedelta(days=1), 0, generation=2))
    assert outcome.status.phase == "Scheduled"
    assert outcome.desired_relays == 1  # minRelays again
    replanned = next(e for e in outcome.events if e.reason == "Replanned")
    assert "re-armed" in replanned.message and "2026-12-10" in replanned.message
    assert outcome.wake_at == next_week - timedelta(minutes=2)
    assert outcome.status.plan is not None and outcome.status.plan.start_time == next_week
    assert not any(c.type == "PreWarmed" for c in outcome.status.conditions)
    assert "StartTimePassed" not in reasons(outcome)


def test_an_ended_room_whose_start_moved_into_the_past_stays_ended() -> None:
    ended = run_to_end(room(), AudioRoomStatus())
    earlier = room(startTime=START - timedelta(days=7))
    outcome = reconcile("r", earlier, ended, seen(START + timedelta(days=1), 0, generation=2))
    assert outcome.status.phase == "Ended"
    assert outcome.desired_relays == 0


def test_a_re_armed_room_forgets_the_last_event_s_audience() -> None:
    spec = room()
    status = AudioRoomStatus()
    at = START + timedelta(minutes=1)
    status = reconcile("r", spec, status, seen(at, 10, metrics=counted(6000, at))).status
    assert status.scaling_state is not None and status.scaling_state["peak"] == 6000
    ended = run_to_end(spec, status)
    again = reconcile(
        "r", room(startTime=START + timedelta(days=7)), ended, seen(START + timedelta(days=1), 0, 2)
    )
    assert again.status.scaling_state is not None and again.status.scaling_state["peak"] == 0


# --- recurring rooms: spec.schedule -----------------------------------------------------


def weekly() -> AudioRoomSpec:
    return room(schedule={"cron": "0 17 * * 4", "timeZone": "Europe/Paris"})


def test_the_weekly_townhall_runs_every_thursday_at_17_paris_time() -> None:
    spec = weekly()
    assert occurrence_start(spec, START - timedelta(days=2), AudioRoomStatus()) == START
    status = run_to_end(spec, AudioRoomStatus())
    after = START + timedelta(hours=2)
    assert occurrence_start(spec, after, status) == START + timedelta(days=7)
    rearmed = reconcile("r", spec, status, seen(after, 0))
    assert rearmed.status.phase == "Scheduled"
    assert rearmed.status.plan is not None
    assert rearmed.status.plan.start_time == START + timedelta(days=7)
    assert "Replanned" in reasons(rearmed)


def test_the_schedule_follows_daylight_saving_in_its_time_zone() -> None:
    spec = room(
        startTime=datetime(2027, 3, 20, tzinfo=UTC),
        schedule={"cron": "0 17 * * 4", "timeZone": "Europe/Paris"},
    )
    before = occurrence_start(spec, datetime(2027, 3, 20, tzinfo=UTC), AudioRoomStatus())
    after = occurrence_start(spec, datetime(2027, 3, 27, tzinfo=UTC), AudioRoomStatus())
    assert before == datetime(2027, 3, 25, 16, 0, tzinfo=UTC)  # CET, +01:00
    assert after == datetime(2027, 4, 1, 15, 0, tzinfo=UTC)  # CEST, +02:00


def test_an_occurrence_being_drained_is_not_replaced_by_the_next() -> None:
    spec = weekly()
    draining_at = START + timedelta(hours=1, minutes=2)
    live = AudioRoomStatus(phase="Draining")
    assert occurrence_start(spec, draining_at, live) == START


def test_no_occurrence_comes_before_the_start_time() -> None:
    spec = room(schedule={"cron": "0 17 * * 4", "timeZone": "Europe/Paris"})
    assert occurrence_start(spec, START - timedelta(days=30), AudioRoomStatus()) == START


def test_an_ended_recurring_room_wakes_soon_to_re_arm() -> None:
    spec = weekly()
    end = START + timedelta(hours=1)
    status = AudioRoomStatus()
    for at, ready in [(START + timedelta(minutes=1), 10), (end + timedelta(seconds=30), 10)]:
        status = reconcile("r", spec, status, seen(at, ready, metrics=counted(0, at))).status
    ended = reconcile("r", spec, status, seen(end + timedelta(minutes=1), 0))
    assert ended.status.phase == "Ended"
    assert ended.wake_at is not None and ended.wake_at <= end + timedelta(minutes=2)


# --- deletion mid-event drains first ----------------------------------------------------


def test_a_room_deleted_mid_event_drains_before_its_relays_go() -> None:
    spec = room()
    at = START + timedelta(minutes=10)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=counted(5000, at)))
    deleted_at = at + timedelta(seconds=5)
    by_relay = dict.fromkeys(range(10), 500)
    first = reconcile(
        "r", spec, live.status,
        seen(deleted_at, 10, deleting_since=deleted_at, metrics=counted(5000, at, by_relay)),
    )  # fmt: skip
    assert first.status.phase == "Draining"
    assert first.desired_relays == 10
    assert not first.released
    draining = next(e for e in first.events if e.reason == "Draining")
    assert "deleted" in draining.message
    later = deleted_at + timedelta(seconds=30)
    by_relay = {**dict.fromkeys(range(6), 500), **dict.fromkeys(range(6, 10), 0)}
    partly = reconcile(
        "r", spec, first.status,
        seen(later, 10, deleting_since=deleted_at, metrics=counted(3000, later, by_relay)),
    )  # fmt: skip
    assert partly.desired_relays == 6, "the empty relays at the top go at once"
    assert not partly.released
    empty = later + timedelta(seconds=30)
    gone = reconcile(
        "r", spec, partly.status,
        seen(empty, 6, deleting_since=deleted_at, metrics=counted(0, empty, {0: 0, 5: 0})),
    )  # fmt: skip
    assert gone.desired_relays == 0
    done = reconcile("r", spec, gone.status, seen(empty, 0, deleting_since=deleted_at))
    assert done.status.phase == "Ended"
    assert done.released


def test_a_deleted_room_is_released_after_the_drain_timeout_with_a_warning() -> None:
    spec = room()
    at = START + timedelta(minutes=10)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=counted(5000, at)))
    late = at + timedelta(minutes=6)
    timed_out = reconcile(
        "r", spec, live.status, seen(late, 10, deleting_since=at, metrics=counted(5000, late))
    )
    assert timed_out.desired_relays == 0
    assert "DrainTimedOut" in reasons(timed_out)
    released = reconcile("r", spec, timed_out.status, seen(late, 0, deleting_since=at))
    assert released.released


def test_an_ended_room_is_released_at_once() -> None:
    spec = room()
    ended = run_to_end(spec, AudioRoomStatus())
    at = START + timedelta(hours=3)
    outcome = reconcile("r", spec, ended, seen(at, 0, deleting_since=at))
    assert outcome.released
    assert outcome.events == ()


# --- the end drain removes each relay as it empties ------------------------------------


def test_the_end_drain_removes_relays_from_the_top_as_they_empty() -> None:
    spec = room()
    at = START + timedelta(minutes=10)
    status = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=counted(5000, at))).status
    end = START + timedelta(hours=1)
    sizes = []
    for seconds, by_relay in [
        (1, dict.fromkeys(range(10), 100)),
        (20, {**dict.fromkeys(range(10), 100), 8: 0, 9: 0}),
        (40, {**dict.fromkeys(range(10), 0), 2: 40}),
        (60, dict.fromkeys(range(10), 0)),
    ]:
        moment = end + timedelta(seconds=seconds)
        metrics = counted(sum(by_relay.values()), moment, by_relay)
        outcome = reconcile("r", spec, status, seen(moment, 10, metrics=metrics))
        sizes.append(outcome.desired_relays)
        status = outcome.status
    assert sizes == [10, 8, 3, 0]


def live_map(spec: AudioRoomSpec, at: datetime) -> Outcome:
    """A pass of the room live on 10 relays of 700 listeners each."""
    metrics = counted(7000, at, dict.fromkeys(range(10), 700))
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=metrics))
    assert live.shard_map.relays == dict.fromkeys(range(10), "active")
    return live


def test_the_end_drain_moves_the_last_listeners_down_so_each_relay_goes_as_it_empties() -> None:
    """30 listeners linger after the end, spread over all 10 relays. The old rule (remove a
    relay only once it and every relay above it are empty) kept all 10 until they left.
    Now the listeners follow the map down (as the edge moves them) within the migration
    budget, the relays go from the top as each is counted empty, nobody is dropped, and
    one relay carries them long before the drain timeout (10 m): the 27 moves take at least
    3.4 minutes at 8 a minute, and a relay drains only once the budget covers all of its
    listeners (what a pass leaves unspent is not carried over), so about 5."""
    spec = room(sharding={"maxMigrationsPerMinute": 8}, scaling={"drainTimeout": "10m"})
    at = START + timedelta(minutes=10)
    outcome = live_map(spec, at)
    published = at
    lingering = [f"listener-{i}" for i in range(30)]
    where = {who: outcome.shard_map.relay_for(who) for who in lingering}
    assert len(set(where.values())) >= 8, "the lingering listeners are on most relays"
    end = START + timedelta(hours=1)
    sizes, ready, previous = [], 10, outcome.shard_map.generation
    for seconds in range(5, 360, 15):
        moment = end + timedelta(seconds=seconds)
        by_relay = dict.fromkeys(range(ready), 0)
        for relay in where.values():
            by_relay[relay] += 1
        metrics = counted(len(lingering), moment, by_relay)
        outcome = reconcile(
            "r", spec, outcome.status, seen(moment, ready, metrics=metrics),
            shard_map=outcome.shard_map, shard_map_at=published,
        )  # fmt: skip
        if outcome.shard_map.generation != previous:  # as the shell: when a new map goes out
            published, previous = moment, outcome.shard_map.generation
        removed = [o for o in range(outcome.desired_relays, ready) if by_relay[o]]
        assert not removed, f"relays {removed} removed with listeners on them"
        ready = outcome.desired_relays
        sizes.append(ready)
        # The edge moves each listener whose shard went to another (active) relay.
        for who in lingering:
            relay = outcome.shard_map.relay_for(who)
            if relay is not None and outcome.shard_map.relays.get(relay) == "active":
                where[who] = relay
        assert all(relay < ready for relay in where.values()), "nobody is dropped"
        assert outcome.shard_map.admission == "closed", "the room takes no new joins"
    assert outcome.status.phase == "Draining", "the 30 listeners still listen"
    assert sizes == sorted(sizes, reverse=True)
    assert len(set(sizes)) >= 4, f"relays go a few at a time as they empty: {sizes}"
    down_to_one = end + timedelta(seconds=5 + 15 * sizes.index(1))
    assert down_to_one - end <= timedelta(minutes=5), "well before the 10 m drain timeout"
    assert set(where.values()) == {0}
    consolidating = [e for e in outcome.events if e.reason == "DrainConsolidating"]
    assert not consolidating, "said once, when the relays begin to drain"
    # They leave: the last relay goes once a second reading confirms it, and the room ends.
    moment = end + timedelta(minutes=6)
    once = reconcile(
        "r", spec, outcome.status,
        seen(moment, 1, metrics=counted(0, moment, {0: 0})), shard_map=outcome.shard_map,
    )  # fmt: skip
    assert once.desired_relays == 1, "one empty reading may miss a listener on its way"
    assert once.wake_at is not None and once.wake_at <= moment + timedelta(seconds=5)
    again = once.wake_at
    gone = reconcile(
        "r", spec, once.status,
        seen(again, 1, metrics=counted(0, again, {0: 0})), shard_map=once.shard_map,
    )  # fmt: skip
    assert gone.desired_relays == 0
    assert "DrainTimedOut" not in reasons(gone)


def test_a_relay_emptied_early_in_the_end_drain_goes_while_the_relays_below_still_move() -> None:
    """30 listeners linger over 10 relays; a pass comes every second (as in a busy room),
    each moving the next relay's last listeners down within the budget; each map is out
    0.7 s after its pass, and each reading was sampled half a second before its pass. The
    old rule dated every relay's settling from the room's last move: no reading came 2 s
    after one while the drain kept moving listeners, so relay 9, empty after the first
    moves, stayed until every relay below it had moved, then went with them (20-40 s late
    on the real cluster). Now a relay goes by a reading sampled a moment after the
    publication of the last map that moved listeners onto or off it, and no sooner."""
    spec = room(sharding={"maxMigrationsPerMinute": 240})
    outcome = live_map(spec, START + timedelta(minutes=10))
    lingering = [f"listener-{i}" for i in range(30)]
    where = {who: outcome.shard_map.relay_for(who) for who in lingering}
    end = START + timedelta(hours=1)
    published, ready, lag = end, 10, timedelta(seconds=0.7)
    settle = timedelta(seconds=2)  # the moment a moved listener may take (README)
    moving, emptied, gone = [], {}, {}
    last_move: dict[int, datetime] = {}  # the publication of the last map moving a relay
    for second in range(1, 40):
        moment = end + timedelta(seconds=second)
        sampled = moment - timedelta(seconds=0.5)
        by_relay = dict.fromkeys(range(ready), 0)
        for relay in where.values():
            by_relay[relay] += 1
        emptied |= {o: second for o, n in by_relay.items() if n == 0 and o not in emptied}
        before = outcome.shard_map
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(moment, ready, metrics=counted(len(lingering), sampled, by_relay)),
            outcome.scaling_state, outcome.shard_map, published,
        )  # fmt: skip
        removed = range(outcome.desired_relays, ready)
        assert not [o for o in removed if by_relay[o]], "no relay goes with listeners on it"
        early = [o for o in removed if o in last_move and sampled <= last_move[o] + settle]
        assert not early, f"{early} went by a reading within the settle of their last move"
        gone |= dict.fromkeys(removed, second)
        ready = outcome.desired_relays
        if outcome.shard_map.generation != before.generation:
            published = moment + lag
        pairs = zip(before.assignment, outcome.shard_map.assignment, strict=True)
        changed = [(a, b) for a, b in pairs if a is not None and b is not None and a != b]
        if changed:  # listeners move from one relay to another: judged here, not by the core
            moving.append(second)
            for old, new in changed:
                last_move |= {old: published, new: published}
        for who in lingering:  # the edge moves each listener whose shard went elsewhere
            relay = outcome.shard_map.relay_for(who)
            if relay is not None and outcome.shard_map.relays.get(relay) == "active":
                where[who] = relay
    assert ready == 1 and set(where.values()) == {0}, "relay 0 carries the 30 who linger"
    assert len(moving) >= 5, f"the drain moved listeners pass after pass: {moving}"
    assert gone[9] < moving[-1], f"relay 9 went while relays below still moved: {gone}"
    # A StatefulSet removes its highest ordinal: a relay can go once those above it have.
    free = {o: max(emptied[p] for p in range(o, 10)) for o in gone}
    late = {o: gone[o] - free[o] for o in gone if gone[o] - free[o] > 4}
    assert not late, f"each relay went within 4 passes of it and those above emptying: {late}"
    stored = outcome.status.scaling_state or {}
    assert "relaysMovedAt" not in stored, "the moves by relay stay in memory, not in status"


def test_a_relay_drained_by_a_map_whose_write_failed_waits_for_its_publication() -> None:
    """The pass 10 s after the end drains relays 1-9 (every listener to relay 0), and its
    map's write fails: the edges still place by the old map, where those relays take
    listeners, and the shell hands the next pass that pass's own time. The old code took
    that for the publication, and a reading 2.5 s later removed relays 1-9 while the edges
    could still send listeners there. Now they wait for a reading a moment after the map
    is really out (the retry's write, at 14 s)."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    end = START + timedelta(hours=1)
    failed = end + timedelta(seconds=10)
    moved = reconcile(
        "r", spec, live.status,
        seen(failed, 10, metrics=counted(30, failed, {**dict.fromkeys(range(10), 0), 9: 30})),
        live.scaling_state, live.shard_map, START + timedelta(minutes=10),
    )  # fmt: skip
    assert [o for o, s in moved.shard_map.relays.items() if s == "active"] == [0]
    empty_above = {**dict.fromkeys(range(10), 0), 0: 30}
    outcome = moved  # the shell hands on the failed write's pass time, then the retry's
    for seconds, out in ((12.5, failed), (13.5, failed), (16.5, end + timedelta(seconds=14))):
        at = end + timedelta(seconds=seconds)
        outcome = reconcile(
            "r", spec, outcome.status, seen(at, 10, metrics=counted(30, at, empty_above)),
            outcome.scaling_state, outcome.shard_map, out,
        )  # fmt: skip
        if out == failed:
            assert outcome.desired_relays == 10, f"kept at {seconds}s: the map is not out"
    assert outcome.desired_relays == 1, "2.5 s after the retry published it, they go"


def test_the_end_drain_empties_the_highest_relay_first_within_the_budget() -> None:
    """A StatefulSet removes its highest ordinal: with budget for about one relay's
    listeners, those of relay 9 move (to the relay kept), not a share of every relay's."""
    spec = room(sharding={"maxMigrationsPerMinute": 7})
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    end = START + timedelta(hours=1)
    moment = end + timedelta(seconds=30)  # a budget of 3.5 listeners since the last map
    by_relay = dict.fromkeys(range(10), 3)
    outcome = reconcile(
        "r", spec, live.status, seen(moment, 10, metrics=counted(30, moment, by_relay)),
        shard_map=live.shard_map, shard_map_at=end,
    )  # fmt: skip
    drained = outcome.shard_map
    assert drained.relays == {**dict.fromkeys(range(9), "active"), 9: "draining"}, (
        "only the relay whose listeners the budget lets move drains; the others wait"
    )
    counts = drained.counts()
    assert counts[9] == 0, "the top relay's shards all went"
    assert counts[0] > live.shard_map.counts()[0] + 400
    before = live.shard_map.counts()
    assert all(counts[o] == before[o] for o in range(1, 9)), "relays below keep their shards"
    consolidating = next(e for e in outcome.events if e.reason == "DrainConsolidating")
    assert "relays 9 to relays 0" in consolidating.message


def test_the_end_drain_keeps_enough_relays_for_the_listeners_left() -> None:
    """250 listeners left at 1000 a relay: three relays carry them (at 90%), the lowest
    three; and a relay drained once never takes listeners again when a count wobbles up."""
    spec = room()
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    end = START + timedelta(hours=1)
    first = end + timedelta(seconds=10)
    by_relay = dict.fromkeys(range(10), 250)
    outcome = reconcile(
        "r", spec, live.status, seen(first, 10, metrics=counted(2500, first, by_relay)),
        shard_map=live.shard_map, shard_map_at=at,
    )  # fmt: skip
    assert sorted(o for o, s in outcome.shard_map.relays.items() if s == "active") == [0, 1, 2]
    later = first + timedelta(seconds=10)
    wobble = reconcile(
        "r", spec, outcome.status, seen(later, 10, metrics=counted(2600, later, by_relay)),
        shard_map=outcome.shard_map, shard_map_at=first,
    )  # fmt: skip
    assert sorted(o for o, s in wobble.shard_map.relays.items() if s == "active") == [0, 1, 2]


def test_the_end_drain_moves_nobody_before_a_count_taken_after_it_began() -> None:
    spec = room()
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    end = START + timedelta(hours=1)
    stale = counted(30, end - timedelta(seconds=1), dict.fromkeys(range(10), 3))
    outcome = reconcile(
        "r", spec, live.status, seen(end + timedelta(seconds=1), 10, metrics=stale),
        shard_map=live.shard_map, shard_map_at=at,
    )  # fmt: skip
    assert outcome.shard_map.assignment == live.shard_map.assignment
    assert outcome.shard_map.admission == "closed"
    assert "DrainConsolidating" not in reasons(outcome)


def test_the_end_drain_trusts_no_sample_taken_before_it_began() -> None:
    spec = room()
    at = START + timedelta(minutes=10)
    status = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=counted(5000, at))).status
    end = START + timedelta(hours=1)
    stale = counted(0, end - timedelta(seconds=1), dict.fromkeys(range(10), 0))
    outcome = reconcile("r", spec, status, seen(end + timedelta(seconds=1), 10, metrics=stale))
    assert outcome.desired_relays == 10


# --- minRelays 0 grows from zero --------------------------------------------------------


def test_a_room_with_no_relays_grows_from_zero_when_joins_wait() -> None:
    spec = room(scaling={"minRelays": 0}, expectedAudience=0)
    at = START + timedelta(minutes=5)
    idle = reconcile("r", spec, AudioRoomStatus(), seen(at, 0, metrics=Metrics(listeners=None)))
    assert idle.desired_relays == 0
    waiting = Metrics(listeners=None, waiting=1500, sampled_at=at, problem="no listener series")
    grown = reconcile("r", spec, idle.status, seen(at + timedelta(seconds=5), 0, metrics=waiting))
    assert grown.desired_relays >= 3
    assert "ScaledUp" in reasons(grown)


def test_waiting_joins_do_not_stand_in_for_missing_counts_of_running_relays() -> None:
    spec = room(scaling={"minRelays": 0}, expectedAudience=0)
    at = START + timedelta(minutes=5)
    running = reconcile(
        "r", spec, AudioRoomStatus(), seen(at, 0, metrics=counted(0, at, waiting=900))
    )
    assert running.desired_relays >= 1
    blind = Metrics(listeners=None, waiting=5000, sampled_at=at, problem="no listener series")
    held = reconcile(
        "r",
        spec,
        running.status,
        seen(at + timedelta(seconds=5), running.desired_relays, metrics=blind),
    )
    assert held.desired_relays == running.desired_relays


# --- capacity and shard count changes reach the live map --------------------------------


def live_room(spec: AudioRoomSpec) -> tuple[Outcome, datetime]:
    at = START + timedelta(minutes=10)
    outcome = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, metrics=counted(5000, at)))
    return outcome, at


def test_doubling_listeners_per_relay_mid_event_reaches_the_map_and_status() -> None:
    first, at = live_room(room())
    assert first.shard_map.capacity == 1000
    doubled = room(relay={"image": "registry.example/relay:1", "listenersPerRelay": 2000})
    later = at + timedelta(seconds=5)
    outcome = reconcile(
        "r", doubled, first.status, seen(later, 10, 2, metrics=counted(5000, later)),
        first.scaling_state, first.shard_map, at,
    )  # fmt: skip
    assert outcome.shard_map.capacity == 2000
    assert outcome.shard_map.generation > first.shard_map.generation
    assert outcome.status.listeners is not None
    assert outcome.status.listeners.capacity == 10 * 2000 * 0.7
    changed = next(e for e in outcome.events if e.reason == "ShardMapChanged")
    assert "capacity 1,000 -> 2,000" in changed.message


def test_a_new_shard_count_keeps_each_relay_s_share_of_the_map() -> None:
    first, at = live_room(room())
    more = room(sharding={"shards": 8192})
    later = at + timedelta(seconds=5)
    outcome = reconcile(
        "r", more, first.status, seen(later, 10, 2, metrics=counted(5000, later)),
        first.scaling_state, first.shard_map, at,
    )  # fmt: skip
    new_map: ShardMap = outcome.shard_map
    assert new_map.shards == 8192
    old_counts, new_counts = first.shard_map.counts(), new_map.counts()
    for relay, count in old_counts.items():
        assert abs(new_counts[relay] - 2 * count) <= 2, relay
    names = [f"listener-{n}" for n in range(5000)]
    assert all(first.shard_map.relay_for(n) == new_map.relay_for(n) for n in names)
    changed = next(e for e in outcome.events if e.reason == "ShardMapChanged")
    assert "shards 4,096 -> 8,192: 0% of listeners change relay" in changed.message
    fewer = room(sharding={"shards": 3000})
    again = reconcile(
        "r", fewer, outcome.status, seen(later + timedelta(seconds=5), 10, 3,
                                         metrics=counted(5000, later)),
        outcome.scaling_state, outcome.shard_map, later,
    )  # fmt: skip
    changed = next(e for e in again.events if e.reason == "ShardMapChanged")
    assert "% of listeners change relay, sent to the edge at up to 20,000 a minute" in (
        changed.message
    )


# --- pod creation refused ---------------------------------------------------------------


def test_refused_pod_creation_is_a_condition_and_a_warning_with_the_api_server_s_reason() -> None:
    spec = room()
    at = START - timedelta(hours=1)
    reason = 'pods "r-relay-0" is forbidden: exceeded quota: relays, requested: pods=1'
    blocked = reconcile(
        "r", spec, AudioRoomStatus(),
        seen(at, 0, existing_relays=0, pod_failures=((at - timedelta(seconds=2), reason),)),
    )  # fmt: skip
    found = next(c for c in blocked.status.conditions if c.type == "RelaysBlocked")
    assert (found.status, found.reason) == ("True", "FailedCreate")
    assert reason in found.message
    warning = next(e for e in blocked.events if e.reason == "RelaysBlocked")
    assert warning.type == "Warning" and reason in warning.message
    again = reconcile(
        "r", spec, blocked.status,
        seen(at + timedelta(seconds=5), 0, existing_relays=0, pod_failures=((at, reason),)),
    )  # fmt: skip
    assert "RelaysBlocked" not in reasons(again), "said once while it lasts"
    cleared = reconcile(
        "r", spec, again.status, seen(at + timedelta(minutes=1), 1, existing_relays=1)
    )
    found = next(c for c in cleared.status.conditions if c.type == "RelaysBlocked")
    assert found.status == "False"


# --- the operator's own tenant policy ---------------------------------------------------


def test_a_room_outside_the_operator_s_policy_is_refused_and_left_alone() -> None:
    spec = room(relay={"image": "evil.example/miner:1"})
    policy = TenantPolicy(allowed_registries=("registry.example",))
    at = START - timedelta(hours=1)
    outcome = reconcile("r", spec, AudioRoomStatus(), seen(at, 0, namespace="t"), policy=policy)
    assert outcome.refused
    accepted = next(c for c in outcome.status.conditions if c.type == "Accepted")
    assert (accepted.status, accepted.reason) == ("False", "PolicyViolation")
    assert "spec.relay.image" in accepted.message
    assert reasons(outcome) == ["Refused"]
    fine = reconcile("r", room(), outcome.status, seen(at, 0, 2, namespace="t"), policy=policy)
    assert not fine.refused
    accepted = next(c for c in fine.status.conditions if c.type == "Accepted")
    assert accepted.status == "True"


def test_the_shipped_weekly_townhall_recurs_every_thursday() -> None:
    from pathlib import Path

    from townsquare.api.manifest import parse_room

    example = Path(__file__).resolve().parents[2] / "examples" / "weekly-townhall.yaml"
    townhall = parse_room(example.read_text()).spec
    first = occurrence_start(townhall, datetime(2026, 11, 1, tzinfo=UTC), AudioRoomStatus())
    assert first == datetime(2026, 12, 3, 16, 0, tzinfo=UTC)
    summer = occurrence_start(townhall, datetime(2027, 6, 1, tzinfo=UTC), AudioRoomStatus())
    assert summer == datetime(2027, 6, 3, 15, 0, tzinfo=UTC), "17:00 CEST"


def test_a_weekly_occurrence_whose_drain_times_out_ends_before_the_next_is_armed() -> None:
    """Listeners linger to the drain deadline of the shipped weekly townhall. The old code
    moved on to next week by the clock alone 15 s later: Scheduled with 4 relays (above
    minRelays), the last occurrence's peak kept, no Ended Event, a second DrainTimedOut."""
    from pathlib import Path

    from townsquare.api.manifest import parse_room

    example = Path(__file__).resolve().parents[2] / "examples" / "weekly-townhall.yaml"
    spec = parse_room(example.read_text()).spec
    start = occurrence_start(spec, datetime(2026, 11, 1, tzinfo=UTC), AudioRoomStatus())
    end = start + spec.duration
    deadline = end + spec.scaling.drain_timeout
    crowd = {0: 900, 1: 900, 2: 900, 3: 900}
    status = AudioRoomStatus()
    outcome = None
    for at in (start + timedelta(minutes=5), end + timedelta(seconds=30), deadline):
        outcome = reconcile("r", spec, status, seen(at, 4, metrics=counted(3600, at, crowd)))
        status = outcome.status
    assert outcome is not None and outcome.status.phase == "Draining"
    assert outcome.desired_relays == 0 and "DrainTimedOut" in reasons(outcome)
    going = deadline + timedelta(seconds=15)  # the relay pods are still on their way out
    outcome = reconcile("r", spec, status, seen(going, 4, metrics=counted(3600, going, crowd)))
    assert outcome.status.phase == "Draining", "this occurrence is not over yet"
    assert outcome.desired_relays == 0
    assert "DrainTimedOut" not in reasons(outcome) and "Replanned" not in reasons(outcome)
    gone = going + timedelta(seconds=15)
    ended = reconcile("r", spec, outcome.status, seen(gone, 0))
    assert ended.status.phase == "Ended"
    assert "Ended" in reasons(ended)
    assert ended.status.plan is not None and ended.status.plan.start_time == start
    rearm_at = ended.wake_at
    assert rearm_at is not None and rearm_at <= gone + timedelta(minutes=1)
    rearmed = reconcile("r", spec, ended.status, seen(rearm_at, 0))
    assert rearmed.status.phase == "Scheduled"
    assert rearmed.desired_relays == spec.scaling.min_relays
    assert rearmed.status.plan is not None
    assert rearmed.status.plan.start_time == start + timedelta(days=7)
    assert rearmed.scaling_state.peak == 0, "the last occurrence's audience is forgotten"
    assert "Replanned" in reasons(rearmed) and "DrainTimedOut" not in reasons(rearmed)


def test_a_room_deleted_before_its_start_without_any_count_goes_at_once() -> None:
    spec = room()
    at = START - timedelta(hours=2)
    scheduled = reconcile("r", spec, AudioRoomStatus(), seen(at, 1))
    assert scheduled.desired_relays == 1
    deleted = reconcile("r", spec, scheduled.status, seen(at, 1, deleting_since=at))
    assert deleted.desired_relays == 0
    assert "DrainTimedOut" not in reasons(deleted)
    gone = reconcile("r", spec, deleted.status, seen(at, 0, deleting_since=at))
    assert gone.released


# --- a rollout in a room with no slack --------------------------------------------------


def tight_room(max_relays: int) -> AudioRoomSpec:
    """5,000 listeners at a 90% target: 6 relays of 1000 with none to spare."""
    return room(
        expectedAudience=5000,
        scaling={"targetUtilization": 0.9, "maxRelays": max_relays, "planHold": "1h"},
    )


def test_a_tight_room_rolls_out_with_extra_relays_that_drain_when_it_is_over() -> None:
    """6 relays of 1000 at 90% target carry 5,000 listeners with no relay to spare: the
    rollout adds two relays first, and lets them drain once every relay is replaced."""
    spec = tight_room(max_relays=20)
    at = START + timedelta(minutes=10)
    everyone = dict.fromkeys(range(6), 833)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 6, metrics=counted(5000, at, everyone)))
    assert live.status.phase == "Live" and live.desired_relays == 6

    def step(previous: Outcome, ready: set[int], outdated: set[int], by_relay: dict[int, int],
             after: timedelta) -> Outcome:  # fmt: skip
        return rolling(spec, previous, at + after, ready, outdated, by_relay, published=at)

    changed = step(live, set(range(6)), set(range(6)), everyone, timedelta(seconds=10))
    assert changed.desired_relays == 8
    assert changed.status.rollout is not None and changed.status.rollout.surge == [6, 7]
    assert "RolloutSurge" in reasons(changed) and "RollingOut" not in reasons(changed)
    surged = step(changed, set(range(8)), set(range(6)), everyone, timedelta(seconds=20))
    assert surged.status.rollout is not None
    assert len(surged.status.rollout.draining) == 2, "8 serve, 6 carry the demand at 90%: 2 go"
    assert {o for o, state in surged.shard_map.relays.items() if state == "active"} >= {6, 7}
    assert surged.status.listeners.capacity >= 5000
    # every relay replaced and back Ready: the rollout is over, the extra relays drain
    spread = {**dict.fromkeys(range(8), 625)}
    over = step(surged, set(range(8)), set(), spread, timedelta(seconds=60))
    assert "RolloutSurgeDone" in reasons(over)
    assert over.status.rollout is not None and over.status.rollout.surge == []
    assert over.desired_relays == 8, "they still carry listeners"
    assert {over.shard_map.relays.get(o) for o in (6, 7)} == {"draining"}
    moved = {**dict.fromkeys(range(6), 833), 6: 0, 7: 0}
    gone = step(over, set(range(8)), set(), moved, timedelta(seconds=90))
    assert gone.desired_relays == 6


def test_one_low_reading_opens_no_rollout_drain_the_recent_demand_forbids() -> None:
    """5,000 listeners a moment ago, 2,000 in one reading: a rollout keeps the relays the
    scale-down window keeps, adding extra relays rather than draining on the dip."""
    spec = room(
        expectedAudience=1000,
        scaling={"targetUtilization": 0.9, "maxRelays": 20, "planHold": "1m",
                 "scaleDownStabilization": "5m"},
    )  # fmt: skip
    at = START + timedelta(minutes=10)
    full = dict.fromkeys(range(6), 833)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 6, metrics=counted(5000, at, full)))
    for second in (5, 10):
        now = at + timedelta(seconds=second)
        live = reconcile(
            "r", spec, live.status, seen(now, 6, metrics=counted(5000, now, full)),
            live.scaling_state, live.shard_map, at,
        )  # fmt: skip
    assert live.desired_relays == 6
    later = at + timedelta(seconds=15)
    dip = dict.fromkeys(range(6), 333)
    changed = reconcile(
        "r", spec, live.status,
        seen(later, 6, revision="v2", outdated_ordinals=frozenset(range(6)), existing_relays=6,
             metrics=counted(2000, later, dip)),
        live.scaling_state, live.shard_map, at,
    )  # fmt: skip
    assert changed.status.rollout is not None
    assert changed.status.rollout.draining == [], "no drain on one low reading"
    assert changed.status.rollout.surge == [6, 7]


def rolling(
    spec: AudioRoomSpec, previous: Outcome, now: datetime, ready: set[int], outdated: set[int],
    by_relay: dict[int, int] | None, published: datetime | None = None,
) -> Outcome:  # fmt: skip
    """A pass of a room whose relay template changed to v2; by_relay None: no Prometheus.
    `published`: when the previous shard map was (default: 5 s ago)."""
    metrics = None if by_relay is None else counted(sum(by_relay.values()), now, by_relay)
    return reconcile(
        "r", spec, previous.status,
        seen(now, len(ready), ready_ordinals=frozenset(ready), revision="v2",
             outdated_ordinals=frozenset(outdated), existing_relays=previous.desired_relays,
             metrics=metrics),
        previous.scaling_state, previous.shard_map, published or now - timedelta(seconds=5),
    )  # fmt: skip


def test_a_rollback_replaces_outdated_relays_that_never_became_ready() -> None:
    """A bad image reached relays 4 and 5, which crash-loop; the template is reverted, so
    they are the outdated ones. The old code waited for them to be Ready: over 11 passes
    nothing was drained or replaced and no Event said why."""
    spec = room(expectedAudience=400, scaling={"minRelays": 6, "maxRelays": 6})
    at = START + timedelta(minutes=10)
    four = {0: 100, 1: 100, 2: 100, 3: 100}
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 4, metrics=counted(400, at, four)))
    assert live.desired_relays == 6
    outcome = rolling(spec, live, at + timedelta(seconds=10), set(range(4)), {4, 5}, four)
    assert outcome.replace_relays == (4, 5)
    assert outcome.desired_relays == 6
    replaced = next(e for e in outcome.events if e.reason == "RelaysReplaced")
    assert "4, 5" in replaced.message


def test_without_prometheus_a_rollout_keeps_the_declared_audience_s_relays() -> None:
    """No Prometheus: the declared 7,000 listeners stand for the reading. The old code took
    the demand for 0 and drained maxSurge (4) of the 10 relays at once: 6 left for 7,000."""
    spec = room(scaling={"maxRelays": 10}, rollout={"maxSurge": 4})
    at = START + timedelta(minutes=10)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 10))
    assert live.desired_relays == 10
    outcome = rolling(spec, live, at + timedelta(seconds=10), set(range(10)), set(range(10)), None)
    assert outcome.status.rollout is not None
    draining = len(outcome.status.rollout.draining)
    assert draining >= 1, "the rollout still goes on, blind"
    accepting = [o for o, state in outcome.shard_map.relays.items() if state == "active"]
    assert len(accepting) * 1000 >= 7000, "the relays left taking joins carry the audience"
    assert draining == 2


def test_a_rollout_held_at_max_relays_says_so_once() -> None:
    spec = tight_room(max_relays=6)
    at = START + timedelta(minutes=10)
    full = dict.fromkeys(range(6), 900)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 6, metrics=counted(5400, at, full)))
    held = rolling(spec, live, at + timedelta(seconds=10), set(range(6)), set(range(6)), full)
    assert held.status.rollout is not None and held.status.rollout.draining == []
    warning = next(e for e in held.events if e.reason == "RolloutHeld")
    assert warning.type == "Warning"
    assert "6 outdated relays" in warning.message and "maxRelays (6)" in warning.message
    condition = next(c for c in held.status.conditions if c.type == "RolloutHeld")
    assert (condition.status, condition.reason) == ("True", "NoSpareCapacity")
    again = rolling(spec, held, at + timedelta(seconds=20), set(range(6)), set(range(6)), full)
    assert "RolloutHeld" not in reasons(again), "said once while it lasts"
    raised = room(
        expectedAudience=5000,
        scaling={"targetUtilization": 0.9, "maxRelays": 8, "planHold": "1h"},
    )  # as the Event advises
    freed = rolling(raised, again, at + timedelta(seconds=30), set(range(6)), set(range(6)), full)
    condition = next(c for c in freed.status.conditions if c.type == "RolloutHeld")
    assert condition.status == "False"
    assert freed.status.rollout is not None and freed.status.rollout.surge == [6, 7]


def drain_after_the_end(
    spec: AudioRoomSpec, outcome: Outcome, at: datetime, where: dict[str, int], passes: int
) -> list[Outcome]:
    """Passes every 15 s after the end, as the shell runs them: the map is published when
    its generation changes (the budget runs from then); the edge moves a listener whose
    shard went to another active relay, within maxMigrationsPerMinute."""
    published, generation, ready = at, outcome.shard_map.generation, 10
    moves: list[datetime] = []
    outcomes = []
    end = spec.start_time + spec.duration
    for n in range(passes):
        moment = end + timedelta(seconds=5 + 15 * n)
        by_relay = dict.fromkeys(range(ready), 0)
        for relay in where.values():
            by_relay[relay] += 1
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(moment, ready, metrics=counted(len(where), moment, by_relay)),
            shard_map=outcome.shard_map, shard_map_at=published,
        )  # fmt: skip
        if outcome.shard_map.generation != generation:
            published, generation = moment, outcome.shard_map.generation
        ready = outcome.desired_relays
        outcomes.append(outcome)
        shard_map = outcome.shard_map
        for who, relay in sorted(where.items()):
            moves = [m for m in moves if m > moment - timedelta(minutes=1)]
            home = shard_map.relay_for(who)
            if home is None or home == relay or shard_map.relays.get(home) != "active":
                continue
            if len(moves) < spec.sharding.max_migrations_per_minute:
                where[who] = home
                moves.append(moment)
    return outcomes


def test_a_relay_drains_only_once_its_listeners_have_somewhere_to_go() -> None:
    """A relay told it drains sends its listeners to the edge, and closes those still there
    after a grace period; in a room closed to joins a listener whose shard the map had not
    moved yet had nowhere to go (the edge said stay, then refused its join for good). So
    past the end a relay is marked draining only once every shard it holds has gone to a
    relay that takes it: the map moves whole relays, top first, as the budget allows."""
    spec = room(sharding={"maxMigrationsPerMinute": 8}, scaling={"drainTimeout": "10m"})
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    where = {f"listener-{i}": live.shard_map.relay_for(f"listener-{i}") for i in range(30)}
    where = {who: relay for who, relay in where.items() if relay is not None}
    for outcome in drain_after_the_end(spec, live, at, where, passes=24):
        shard_map = outcome.shard_map
        draining = [o for o, s in shard_map.relays.items() if s == "draining"]
        assert all(shard_map.counts()[o] == 0 for o in draining), (
            f"relays {draining} draining with shards {shard_map.counts()}"
        )
    assert set(where.values()) == {0}, "every listener reached the relay kept"


def test_one_low_count_after_the_end_leaves_enough_relays_once_the_count_is_back() -> None:
    """One pass undercounts (850 for 2,500): relays start draining. When the true count
    comes back, the lowest of them take listeners again, so no relay is sent more than it
    carries (before, relay 0 got every shard of 2,500 listeners at 1,000 a relay)."""
    spec = room()
    at = START + timedelta(minutes=10)
    outcome = live_map(spec, at)
    end = START + timedelta(hours=1)
    low = end + timedelta(seconds=10)
    outcome = reconcile(
        "r", spec, outcome.status,
        seen(low, 10, metrics=counted(850, low, dict.fromkeys(range(10), 85))),
        shard_map=outcome.shard_map, shard_map_at=at,
    )  # fmt: skip
    published = low
    for n in range(2, 12):
        moment = end + timedelta(seconds=10 * n)
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(moment, 10, metrics=counted(2500, moment, dict.fromkeys(range(10), 250))),
            shard_map=outcome.shard_map, shard_map_at=published,
        )  # fmt: skip
        published = moment
    shard_map = outcome.shard_map
    active = [o for o, s in shard_map.relays.items() if s == "active"]
    sent = {o: 2500 * shard_map.counts()[o] / shard_map.shards for o in active}
    assert len(active) >= 3 and max(sent.values()) <= shard_map.capacity, sent


def first_pass_after_the_end(
    spec: AudioRoomSpec, by_relay: dict[int, int], ready: frozenset[int] = frozenset(range(10))
) -> tuple[Outcome, datetime]:
    """The room live on 10 relays, then its first pass 10 s after the end with `by_relay`
    counted on the `ready` relays."""
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    first = START + timedelta(hours=1, seconds=10)
    metrics = counted(sum(by_relay.values()), first, by_relay)
    outcome = reconcile(
        "r", spec, live.status, seen(first, len(ready), ready_ordinals=ready, metrics=metrics),
        shard_map=live.shard_map, shard_map_at=at,
    )  # fmt: skip
    return outcome, first


def test_the_relay_kept_crashes_and_a_draining_relay_takes_its_listeners() -> None:
    """Relay 0, the only one kept after the end, stops being Ready: a draining relay comes
    back to carry the shards, so no shard is left without a relay."""
    spec = room(sharding={"maxMigrationsPerMinute": 60})
    outcome, first = first_pass_after_the_end(spec, dict.fromkeys(range(10), 3))
    assert outcome.shard_map.relays[0] == "active"
    later = first + timedelta(seconds=10)
    by_relay = {o: 3 for o in range(1, 10)}
    crashed = reconcile(
        "r", spec, outcome.status,
        seen(later, 9, ready_ordinals=frozenset(range(1, 10)),
             metrics=counted(27, later, by_relay)),
        shard_map=outcome.shard_map, shard_map_at=first,
    )  # fmt: skip
    shard_map = crashed.shard_map
    assert shard_map.assignment.count(None) == 0, "every shard has a relay"
    assert any(s == "active" for s in shard_map.relays.values())


def test_a_relay_back_late_after_the_end_does_not_move_the_listeners_twice() -> None:
    """Relay 0 is not Ready at the first pass after the end, so relay 1 is kept; when relay
    0 is back, relay 1 stays the relay kept (its listeners do not move again)."""
    spec = room(sharding={"maxMigrationsPerMinute": 60})
    by_relay = {o: 3 for o in range(1, 10)}
    outcome, published = first_pass_after_the_end(spec, by_relay, frozenset(range(1, 10)))
    end = START + timedelta(hours=1)
    assert outcome.shard_map.relays.get(1) == "active"
    for n in range(2, 8):
        moment = end + timedelta(seconds=10 * n)
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(moment, 10, metrics=counted(27, moment, dict.fromkeys(range(10), 3))),
            shard_map=outcome.shard_map, shard_map_at=published,
        )  # fmt: skip
        published = moment
        assert outcome.shard_map.relays.get(1) == "active", f"pass {n}"
        assert outcome.shard_map.relays.get(0) != "active", f"pass {n}"


def test_no_shard_moves_blind_after_the_end() -> None:
    """Counts stop (Prometheus down) once relays drain: nothing moves until they return
    (before, every pending shard moved in one pass, far beyond the budget)."""
    spec = room(sharding={"maxMigrationsPerMinute": 60})
    outcome, first = first_pass_after_the_end(spec, dict.fromkeys(range(10), 80))
    later = first + timedelta(seconds=10)
    blind = reconcile(
        "r", spec, outcome.status, seen(later, 10, metrics=Metrics(listeners=None, problem="down")),
        shard_map=outcome.shard_map, shard_map_at=first,
    )  # fmt: skip
    assert blind.shard_map.assignment == outcome.shard_map.assignment
    assert blind.shard_map.relays == outcome.shard_map.relays


# --- the scrape gap at the end of the drain ---------------------------------------------


def after_the_end(
    spec: AudioRoomSpec, previous: Outcome, seconds: float, by_relay: dict[int, int],
    ready: int = 10, sampled: float | None = None,
) -> Outcome:  # fmt: skip
    """A pass `seconds` after the end, its reading sampled then (or `sampled` seconds after
    the end, on Prometheus's clock); the map threaded through as the shell does, and the
    scaling memory only in the status (as after a restart)."""
    moment = START + timedelta(hours=1, seconds=seconds)
    at = moment if sampled is None else START + timedelta(hours=1, seconds=sampled)
    metrics = counted(sum(by_relay.values()), at, by_relay)
    return reconcile(
        "r", spec, previous.status, seen(moment, ready, metrics=metrics),
        shard_map=previous.shard_map,
    )  # fmt: skip


def test_the_last_relay_stays_while_a_moved_listener_may_be_between_relays() -> None:
    """The map moves relay 7's last listener to relay 0, the relay kept. Relay 0 is scraped
    just before it arrives and relay 7 just after it left: one reading shows the whole room
    empty. The old code removed every relay on it (and the listener's join again got 410 in
    a room closed to joins). Now the last relay goes only once a second empty reading,
    taken after the pass that saw the first, confirms it; here that reading finds the
    listener on relay 0, and the room ends only after it has left, read empty twice."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    first = after_the_end(spec, live, 10, {**dict.fromkeys(range(10), 0), 0: 2, 7: 1})
    assert first.shard_map.relays[0] == "active"
    assert first.shard_map.relays[7] == "draining" and first.shard_map.counts()[7] == 0
    in_flight = after_the_end(spec, first, 20, dict.fromkeys(range(10), 0))
    assert in_flight.desired_relays == 1, "relay 0, where the moved listener is going, stays"
    assert in_flight.status.phase == "Draining"
    assert in_flight.wake_at is not None
    assert in_flight.wake_at <= START + timedelta(hours=1, seconds=25), "looks again soon"
    arrived = after_the_end(spec, in_flight, 25, {0: 1}, ready=1)
    assert arrived.desired_relays == 1
    left = after_the_end(spec, arrived, 40, {0: 0}, ready=1)
    assert left.desired_relays == 1, "one empty reading is not enough"
    confirmed = after_the_end(spec, left, 45, {0: 0}, ready=1)
    assert confirmed.desired_relays == 0
    ended = after_the_end(spec, confirmed, 50, {}, ready=0)
    assert ended.status.phase == "Ended"
    assert "DrainTimedOut" not in reasons(ended) + reasons(confirmed)


def test_no_relay_is_taken_for_empty_by_a_reading_from_just_after_listeners_moved() -> None:
    """The first pass after the end moves every listener to relay 0. A reading from a second
    later shows all ten relays empty: the moved listeners may be on their way, so no relay
    goes (the old code removed all ten, and a second empty reading taken before that move
    could not confirm it either)."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    moved = after_the_end(spec, live, 10, dict.fromkeys(range(10), 3))
    assert [o for o, s in moved.shard_map.relays.items() if s == "active"] == [0]
    soon = after_the_end(spec, moved, 11, dict.fromkeys(range(10), 0))
    assert soon.desired_relays == 10
    assert soon.wake_at is not None and soon.wake_at <= START + timedelta(hours=1, seconds=16)
    settled = after_the_end(spec, soon, 16, dict.fromkeys(range(10), 0))
    assert settled.desired_relays == 1, "the draining relays go; relay 0 waits for a second"
    done = after_the_end(spec, settled, 21, {0: 0}, ready=1)
    assert done.desired_relays == 0


def test_the_same_sample_read_again_does_not_confirm_an_empty_room() -> None:
    """Prometheus's clock runs 3 s ahead of the operator's. One scrape, taken while the
    listener moved from relay 7 is in flight, shows the whole room empty, and two passes a
    second apart both read it (no newer sample yet). The old code took the first pass's
    own time for the first reading and compared the sample's time with it: the same scrape
    counted as the confirming second reading, and relay 0 went with the listener on its way.
    Now only a reading sampled after the first one's sample confirms it."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    moved = after_the_end(spec, live, 10, {**dict.fromkeys(range(10), 0), 0: 2, 7: 1}, sampled=13)
    assert moved.shard_map.relays[7] == "draining"
    empty = dict.fromkeys(range(10), 0)
    first = after_the_end(spec, moved, 13.5, empty, sampled=16)
    assert first.desired_relays == 1
    again = after_the_end(spec, first, 14.5, empty, ready=1, sampled=16)
    assert again.desired_relays == 1, "the same scrape is not a second reading"
    assert again.wake_at is not None and again.wake_at <= START + timedelta(hours=1, seconds=20)
    newer = after_the_end(spec, again, 16.5, {0: 0}, ready=1, sampled=19)
    assert newer.desired_relays == 0, "a later scrape, still empty, confirms it"


def test_a_room_read_empty_twice_goes_though_its_samples_lag_the_passes() -> None:
    """Each reading was sampled 10 s before the pass that reads it (a slow scrape, or
    Prometheus's clock behind). The old code wanted a sample newer than the first pass's
    own time, so two scrapes of an empty room, 5 s apart, kept relay 0 on. Two successive
    samples, both taken after the move settled, are two readings."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    moved = after_the_end(spec, live, 10, {**dict.fromkeys(range(10), 0), 0: 3}, sampled=0.5)
    empty = dict.fromkeys(range(10), 0)
    too_early = after_the_end(spec, moved, 21, empty, sampled=11)
    assert too_early.desired_relays == 10, "sampled within the settle after the move"
    first = after_the_end(spec, too_early, 25, empty, sampled=15)
    assert first.desired_relays == 1
    second = after_the_end(spec, first, 30, {0: 0}, ready=1, sampled=20)
    assert second.desired_relays == 0


def test_an_empty_reading_in_the_pass_that_moves_the_map_is_not_the_first_of_two() -> None:
    """The first pass after the end reads every relay empty and moves the draining relays'
    shards to relay 0: a listener may be on its way there, so that reading cannot be
    confirmed by the next; a reading after the move starts the pair again."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    empty = dict.fromkeys(range(10), 0)
    moving = after_the_end(spec, live, 10, empty)
    assert [o for o, s in moving.shard_map.relays.items() if s == "active"] == [0]
    assert moving.desired_relays == 10
    next_reading = after_the_end(spec, moving, 15, empty)
    assert next_reading.desired_relays == 1, "the first empty reading since the move"
    confirmed = after_the_end(spec, next_reading, 20, {0: 0}, ready=1)
    assert confirmed.desired_relays == 0


def test_an_empty_reading_from_before_the_drain_began_confirms_nothing() -> None:
    """A room whose status kept an empty reading from before its end (an earlier drain):
    the first reading after the end is the first of two, not the second."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    stale = {**(live.status.scaling_state or {}), "emptySampledAt": "2026-12-03T16:59:00Z"}
    kept = replace(live, status=live.status.model_copy(update={"scaling_state": stale}))
    first = after_the_end(spec, kept, 10, dict.fromkeys(range(10), 0))
    assert first.desired_relays == 10, "one reading since the drain began is not two"


# --- startTime moved while the room drains ----------------------------------------------


def draining_with_listeners() -> tuple[AudioRoomSpec, Outcome]:
    """Ten seconds after the end, 500 listeners linger on relays 0 and 1."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    first = after_the_end(spec, live, 10, {**dict.fromkeys(range(10), 0), 0: 200, 1: 300})
    assert (first.status.phase, first.shard_map.admission) == ("Draining", "closed")
    return spec, first


def moved_pass(
    spec: AudioRoomSpec, previous: Outcome, at: datetime, by_relay: dict[int, int],
    generation: int = 2,
) -> Outcome:  # fmt: skip
    metrics = counted(sum(by_relay.values()), at, by_relay)
    ready = max(by_relay, default=-1) + 1
    return reconcile(
        "r", spec, previous.status, seen(at, ready, generation, metrics=metrics),
        shard_map=previous.shard_map,
    )  # fmt: skip


def test_a_start_moved_to_next_week_while_draining_lets_the_drain_finish_then_arms() -> None:
    """The old code took the new start at once: Scheduled, open to joins a week early, and
    the ten relays kept. Now the lingering listeners keep their relays, closed to new
    joins, the relays go as they empty, and the room is armed for next week once Ended."""
    _, first = draining_with_listeners()
    next_week = room(startTime=START + timedelta(days=7))
    at = START + timedelta(hours=1, seconds=20)
    moved = moved_pass(next_week, first, at, {0: 200, 1: 300})
    assert moved.status.phase == "Draining"
    assert moved.shard_map.admission == "closed", "no joins a week early"
    assert moved.desired_relays == 2, "the relays still carrying listeners stay"
    said = next(e for e in moved.events if e.reason == "Replanned")
    assert "while the last occurrence drains" in said.message and "2026-12-10" in said.message
    assert moved.status.plan is not None and moved.status.plan.start_time == START
    again = moved_pass(next_week, moved, at + timedelta(seconds=10), {0: 200, 1: 300})
    assert "Replanned" not in reasons(again), "said once"
    ended = again
    for seconds in range(30, 90, 5):  # they leave; two empty readings confirm it
        moment = at + timedelta(seconds=seconds)
        ended = moved_pass(next_week, ended, moment, dict.fromkeys(range(ended.desired_relays), 0))
        assert ended.status.phase in ("Draining", "Ended"), "armed only once Ended"
        if ended.status.phase == "Ended":
            break
    assert ended.status.phase == "Ended" and "Ended" in reasons(ended)
    assert ended.wake_at is not None and ended.wake_at <= moment + timedelta(seconds=1)
    armed = reconcile("r", next_week, ended.status, seen(ended.wake_at, 0, 2))
    assert armed.status.phase == "Scheduled"
    assert armed.status.plan is not None
    assert armed.status.plan.start_time == START + timedelta(days=7)
    assert "re-armed" in next(e for e in armed.events if e.reason == "Replanned").message


def test_a_new_start_whose_pre_warm_comes_during_the_drain_takes_the_room_over_then() -> None:
    """Moved to 4 minutes after the end (pre-warm 2 minutes before): the room stays closed
    until that pre-warm, then pre-warms with the relays that still carry listeners."""
    _, first = draining_with_listeners()
    soon = room(startTime=START + timedelta(hours=1, minutes=4))
    at = START + timedelta(hours=1, seconds=20)
    moved = moved_pass(soon, first, at, {0: 200, 1: 300})
    assert (moved.status.phase, moved.shard_map.admission) == ("Draining", "closed")
    prewarm = START + timedelta(hours=1, minutes=2)  # before the drain's 5 m timeout
    assert moved.wake_at == prewarm
    taken = moved_pass(soon, moved, prewarm, {0: 200, 1: 300})
    assert taken.status.phase == "PreWarming"
    assert taken.shard_map.admission == "open"
    assert taken.desired_relays == 10, "the plan for the new occurrence"
    assert {taken.shard_map.relays.get(o) for o in (0, 1)} == {"active"}
    assert taken.status.plan is not None and taken.status.plan.start_time == soon.start_time
    assert "Replanned" in reasons(taken) and "PreWarmStarted" in reasons(taken)


def test_a_start_moved_into_the_past_while_draining_only_finishes_the_drain() -> None:
    _, first = draining_with_listeners()
    earlier = room(startTime=START - timedelta(days=7))
    at = START + timedelta(hours=1, seconds=20)
    moved = moved_pass(earlier, first, at, {0: 200, 1: 300})
    assert (moved.status.phase, moved.shard_map.admission) == ("Draining", "closed")
    assert moved.desired_relays == 2
    assert moved.wake_at is not None and moved.wake_at > at + timedelta(seconds=5)


# --- maxRelays lowered while blind ------------------------------------------------------


def test_a_max_relays_lowered_while_blind_drains_the_top_relays_without_removing_them() -> None:
    """Live on 10 relays for 7,000 listeners, Prometheus down, maxRelays lowered to 4. The
    old code held all 10 as accepting relays. Now the relays above those that take the last
    count drain: 7 would do full, but their busiest would hold 586 of the 4,096 shards, 1,001
    listeners; 8 hold at most 512 shards, 875. The map moves the shards of the others, no relay
    goes before it is empty, and the on-call engineer reads why."""
    spec = room(scaling={"maxRelays": 10})
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    lowered = room(scaling={"maxRelays": 4})
    later = at + timedelta(seconds=10)
    blind = Metrics(listeners=None, problem="Prometheus down")
    outcome = reconcile(
        "r", lowered, live.status, seen(later, 10, 2, metrics=blind),
        live.scaling_state, live.shard_map, at,
    )  # fmt: skip
    assert outcome.desired_relays == 10, "draining relays stay until empty or drainTimeout"
    states = outcome.shard_map.relays
    assert [o for o, s in states.items() if s == "draining"] == [8, 9]
    assert all(outcome.shard_map.counts()[o] == 0 for o in (8, 9))
    scaled = next(e for e in outcome.events if e.reason == "ScaledDown")
    assert "maxRelays 4" in scaled.message and "blind" in scaled.message
    condition = next(c for c in outcome.status.conditions if c.type == "MetricsAvailable")
    assert "towards a lowered maxRelays" in condition.message


# --- a room refused after it ran --------------------------------------------------------


def refused_while_live(
    spec: AudioRoomSpec, policy: TenantPolicy, at: datetime
) -> tuple[Outcome, Outcome]:
    """The room live on 10 full relays at `at`, then refused 10 s later (held as it runs)."""
    live = live_map(spec, at)
    later = at + timedelta(seconds=10)
    metrics = counted(7000, later, dict.fromkeys(range(10), 700))
    held = reconcile(
        "r", spec, live.status, seen(later, 10, metrics=metrics, namespace="t"),
        live.scaling_state, live.shard_map, at, policy=policy,
    )  # fmt: skip
    assert held.refused and not held.children, "nothing of the refused spec is applied"
    return live, held


def test_a_room_refused_mid_event_keeps_its_listeners_until_the_end_then_drains() -> None:
    """The operator restarts with a tighter policy while the room is live. The old code
    froze the room for good: its ten relays ran on past the end with no pass ever due. Now
    the relays keep serving until the event ends (nothing of the new spec applied), then
    the room drains like any other, applying only its relay count and its map."""
    spec = room()
    policy = TenantPolicy(allowed_registries=("other.example",))
    at = START + timedelta(minutes=10)
    live, held = refused_while_live(spec, policy, at)
    assert held.desired_relays == 10
    end = START + timedelta(hours=1)
    assert held.wake_at == end, "back at the end, to drain"
    warning = next(e for e in held.events if e.reason == "Refused")
    assert "10 relays keep serving the listeners connected" in warning.message
    assert "until the event ends at 17:00:00" in warning.message
    after = end + timedelta(seconds=10)
    lingering = {**dict.fromkeys(range(10), 0), 0: 30}
    draining = reconcile(
        "r", spec, held.status,
        seen(after, 10, metrics=counted(30, after, lingering), namespace="t"),
        held.scaling_state, live.shard_map, at, policy=policy,
    )  # fmt: skip
    assert draining.refused and draining.children, "only the relay count and the map"
    assert draining.status.phase == "Draining"
    assert draining.shard_map.admission == "closed"
    next_pass = after + timedelta(seconds=10)
    draining = reconcile(
        "r", spec, draining.status,
        seen(next_pass, 10, metrics=counted(30, next_pass, lingering), namespace="t"),
        draining.scaling_state, draining.shard_map, after + WRITE, policy=policy,
    )  # fmt: skip
    assert draining.refused and draining.children
    assert draining.desired_relays == 1, "the empty relays go; relay 0 keeps its listeners"
    accepted = next(c for c in draining.status.conditions if c.type == "Accepted")
    assert accepted.status == "False"
    deadline = end + timedelta(minutes=5)
    blind = Metrics(listeners=None, problem="not read: refused")
    gone = reconcile(
        "r", spec, draining.status, seen(deadline, 1, metrics=blind, namespace="t"),
        draining.scaling_state, draining.shard_map, next_pass, policy=policy,
    )  # fmt: skip
    assert gone.desired_relays == 0 and "DrainTimedOut" in reasons(gone)
    ended = reconcile(
        "r", spec, gone.status, seen(deadline + timedelta(seconds=5), 0, namespace="t"),
        gone.scaling_state, gone.shard_map, deadline, policy=policy,
    )  # fmt: skip
    assert ended.status.phase == "Ended"
    again = reconcile(
        "r", spec, ended.status, seen(deadline + timedelta(minutes=1), 0, namespace="t"),
        policy=policy,
    )  # fmt: skip
    assert again.refused and not again.children and again.desired_relays == 0


def test_a_room_refused_before_its_event_lets_its_idle_relays_go() -> None:
    """Scheduled days ahead with minRelays 1, then refused: the old code kept that relay
    until the spec was fixed, however long. Nobody listens before the event: it goes."""
    spec = room()
    at = START - timedelta(days=2)
    scheduled = reconcile("r", spec, AudioRoomStatus(), seen(at, 1, namespace="t"))
    assert (scheduled.status.phase, scheduled.desired_relays) == ("Scheduled", 1)
    policy = TenantPolicy(allowed_registries=("other.example",))
    later = at + timedelta(minutes=1)
    refused = reconcile(
        "r", spec, scheduled.status, seen(later, 1, namespace="t"),
        scheduled.scaling_state, scheduled.shard_map, at, policy=policy,
    )  # fmt: skip
    assert refused.refused and refused.desired_relays == 0
    warning = next(e for e in refused.events if e.reason == "Refused")
    assert "take no new joins and go as their listeners leave" in warning.message
    ended = reconcile(
        "r", spec, refused.status, seen(later + timedelta(seconds=5), 0, namespace="t"),
        refused.scaling_state, refused.shard_map, later, policy=policy,
    )  # fmt: skip
    assert ended.status.phase == "Ended"
    assert "Refused" not in reasons(ended), "said once"


def test_a_room_refused_during_its_pre_warm_keeps_its_relays_for_the_arriving_audience() -> None:
    """Refused a minute before its start, after the pre-warm began: the audience is
    arriving on the open map and the event is due, so the relays stay until its end (as
    for a live room), not drained then and there as for a room refused while Scheduled."""
    spec = room()
    policy = TenantPolicy(allowed_registries=("other.example",))
    at = START - timedelta(minutes=1)
    warming = reconcile("r", spec, AudioRoomStatus(), seen(at, 10, namespace="t"))
    assert warming.status.phase in ("PreWarming", "Ready") and warming.desired_relays == 10
    assert warming.shard_map.admission == "open"
    later = at + timedelta(seconds=10)
    held = reconcile(
        "r", spec, warming.status, seen(later, 10, namespace="t"),
        warming.scaling_state, warming.shard_map, at, policy=policy,
    )  # fmt: skip
    assert held.refused and not held.children and held.desired_relays == 10
    assert held.wake_at == START + timedelta(hours=1), "held until the event's end"
    warning = next(e for e in held.events if e.reason == "Refused")
    assert "keep serving the listeners connected" in warning.message


def test_a_refused_room_deleted_mid_event_winds_down_without_its_refused_spec() -> None:
    """A tenant edits a live room to a disallowed image, then deletes it. The old code
    dropped the refusal once the room was deleted and drained it as an accepted room, so
    the shell applied the refused template (the disallowed image) to every relay. Now the
    deleted room stays refused: it drains by its relay count and its map, then is released."""
    spec = room()
    policy = TenantPolicy(allowed_registries=("other.example",))
    at = START + timedelta(minutes=10)
    live, held = refused_while_live(spec, policy, at)
    deleted_at = at + timedelta(seconds=20)
    draining = reconcile(
        "r", spec, held.status,
        seen(deleted_at, 10, generation=2, deleting_since=deleted_at, namespace="t",
             metrics=counted(7000, deleted_at, dict.fromkeys(range(10), 700))),
        held.scaling_state, live.shard_map, at, policy=policy,
    )  # fmt: skip
    assert draining.refused, "deleting a refused room does not accept its spec"
    assert draining.children, "its relay count and its map are still sent"
    assert draining.status.phase == "Draining" and not draining.released
    assert draining.desired_relays == 10, "every relay still carries listeners"
    assert draining.shard_map.admission == "closed"
    assert "deleted" in next(e for e in draining.events if e.reason == "Draining").message
    accepted = next(c for c in draining.status.conditions if c.type == "Accepted")
    assert accepted.status == "False"
    gone, later = draining, deleted_at + timedelta(seconds=20)  # every listener left
    published = deleted_at + WRITE
    while gone.desired_relays and later < deleted_at + timedelta(minutes=2):
        later += timedelta(seconds=10)
        before = gone.shard_map.generation
        gone = reconcile(
            "r", spec, gone.status,
            seen(later, gone.desired_relays, generation=2, deleting_since=deleted_at,
                 namespace="t", metrics=counted(0, later, dict.fromkeys(range(10), 0))),
            gone.scaling_state, gone.shard_map, published, policy=policy,
        )  # fmt: skip
        if gone.shard_map.generation != before:
            published = later + WRITE
        assert gone.refused
    assert gone.desired_relays == 0, "emptied well before the drain timeout"
    done = reconcile(
        "r", spec, gone.status,
        seen(later + timedelta(seconds=5), 0, generation=2, deleting_since=deleted_at,
             namespace="t"),
        gone.scaling_state, gone.shard_map, deleted_at, policy=policy,
    )  # fmt: skip
    assert done.refused and done.released and done.status.phase == "Ended"


def test_a_refused_room_that_never_ran_is_released_at_once_when_deleted() -> None:
    spec = room()
    policy = TenantPolicy(allowed_registries=("other.example",))
    at = START - timedelta(days=2)
    refused = reconcile("r", spec, AudioRoomStatus(), seen(at, 0, namespace="t"), policy=policy)
    assert refused.refused and not refused.children
    deleted = at + timedelta(minutes=1)
    outcome = reconcile(
        "r", spec, refused.status,
        seen(deleted, 0, generation=2, deleting_since=deleted, namespace="t"), policy=policy,
    )  # fmt: skip
    assert outcome.refused and outcome.released and not outcome.children
    assert outcome.desired_relays == 0


# --- a refused room winds down on its last accepted spec --------------------------------

EVIL = {"image": "evil.example/relay:1"}
ONLY_REGISTRY = TenantPolicy(allowed_registries=("registry.example",))


def test_a_refused_edit_that_moves_the_start_a_week_holds_the_relays_only_to_the_accepted_end() -> (
    None
):
    """Live, then edited to a disallowed image and a start a week later. The old code held
    the relays until the refused spec's end, a week on. Now nothing of the refused spec is
    used: the listeners keep their relays until the event they joined ends, then drain."""
    spec = room()
    at = START + timedelta(minutes=10)
    live = live_map(spec, at)
    assert live.status.accepted_spec is not None
    refused = room(startTime=START + timedelta(days=7), relay=EVIL)
    later = at + timedelta(seconds=10)
    metrics = counted(7000, later, dict.fromkeys(range(10), 700))
    held = reconcile(
        "r", refused, live.status, seen(later, 10, 2, metrics=metrics, namespace="t"),
        live.scaling_state, live.shard_map, at, policy=ONLY_REGISTRY,
    )  # fmt: skip
    assert held.refused and held.desired_relays == 10
    assert held.wake_at == START + timedelta(hours=1), "the accepted end, not next week's"
    assert "until the event ends at 17:00:00" in held.events[0].message
    assert held.status.accepted_spec == live.status.accepted_spec
    after = START + timedelta(hours=1, seconds=10)
    draining = reconcile(
        "r", refused, held.status,
        seen(after, 10, 2, metrics=counted(30, after, {0: 30}), namespace="t"),
        held.scaling_state, live.shard_map, at, policy=ONLY_REGISTRY,
    )  # fmt: skip
    assert draining.refused and draining.status.phase == "Draining"
    assert draining.status.plan is not None and draining.status.plan.start_time == START
    assert "Replanned" not in reasons(draining)


def test_a_room_refused_while_draining_keeps_its_accepted_map_and_drain_timeout() -> None:
    """Draining, then edited to a disallowed image with twice the capacity, a quarter of the
    shards and a 1-minute drainTimeout. The old code applied the refused capacity and shard
    count to the live map (moving listeners) and removed the relays at the refused
    timeout. Now the map and the drain stay as accepted."""
    _, first = draining_with_listeners()
    refused = room(
        relay={**EVIL, "listenersPerRelay": 2000},
        sharding={"shards": 1024},
        scaling={"drainTimeout": "1m"},
    )
    at = START + timedelta(hours=1, minutes=2)
    lingering = {0: 200, 1: 300}
    outcome = reconcile(
        "r", refused, first.status,
        seen(at, 10, 2, metrics=counted(500, at, lingering), namespace="t"),
        first.scaling_state, first.shard_map, at - timedelta(minutes=1), policy=ONLY_REGISTRY,
    )  # fmt: skip
    assert outcome.refused and outcome.status.phase == "Draining"
    assert (outcome.shard_map.capacity, outcome.shard_map.shards) == (1000, 4096)
    assert "ShardMapChanged" not in reasons(outcome)
    assert "DrainTimedOut" not in reasons(outcome), "the accepted drainTimeout is 5m"
    assert outcome.desired_relays == 2, "the relays carrying listeners stay"
    assert outcome.wake_at is not None
    assert outcome.wake_at <= START + timedelta(hours=1, minutes=5)


def test_a_start_moved_while_draining_is_said_once_not_on_every_new_generation() -> None:
    """The old code said "startTime moved ... while the last occurrence drains" again on
    any later edit (a new generation), though the start had not moved again."""
    _, first = draining_with_listeners()
    next_week = room(startTime=START + timedelta(days=7))
    at = START + timedelta(hours=1, seconds=20)
    moved = moved_pass(next_week, first, at, {0: 200, 1: 300})
    assert "Replanned" in reasons(moved)
    edited = room(startTime=START + timedelta(days=7), rollout={"maxSurge": 3})
    later = moved_pass(edited, moved, at + timedelta(seconds=10), {0: 200, 1: 300}, 3)
    assert later.status.phase == "Draining"
    assert "Replanned" not in reasons(later), "the start did not move again"
    again = room(startTime=START + timedelta(days=8), rollout={"maxSurge": 3})
    moved_again = moved_pass(again, later, at + timedelta(seconds=20), {0: 200, 1: 300}, 4)
    said = next(e for e in moved_again.events if e.reason == "Replanned")
    assert "2026-12-11" in said.message


def test_a_refused_room_s_placeholders_go() -> None:
    """Scheduled with node headroom, its placeholders holding nodes, then refused. The old
    code never removed them: each held a node for relays that would not come."""
    at = START - timedelta(minutes=8)
    holding = tuple(
        headroom.Placeholder(f"r-headroom-{i}", at, at + timedelta(seconds=30)) for i in range(7)
    )
    refused = reconcile(
        "r", room(nodeHeadroom={"enabled": True, "leadTime": "10m"}, relay=EVIL),
        AudioRoomStatus(), seen(at, 0, namespace="t", placeholders=holding),
        policy=ONLY_REGISTRY,
    )  # fmt: skip
    assert refused.refused and refused.headroom is not None
    assert refused.headroom.create == ()
    assert sorted(refused.headroom.delete) == sorted(p.name for p in holding)
    nodes = next(c for c in refused.status.conditions if c.type == headroom.CONDITION)
    assert nodes.reason == "Refused"


def test_the_end_drain_settles_from_when_the_moving_map_was_published() -> None:
    """The pass 10 s after the end moves every listener to relay 0, and its map is
    published 5 s later (a slow API server). The old code counted the settling from the
    pass that decided the move: an empty reading taken before the map was out, and another
    1 s after it (listeners on their way between relays), removed every relay. Now both
    readings must come after the publication."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    moved = after_the_end(spec, live, 10, dict.fromkeys(range(10), 3))
    assert [o for o, s in moved.shard_map.relays.items() if s == "active"] == [0]
    published = START + timedelta(hours=1, seconds=15)
    outcome = moved
    for seconds in (14, 16.5):  # sampled after the move's pass, around the publication
        at = START + timedelta(hours=1, seconds=seconds)
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(at, 10, metrics=counted(0, at, dict.fromkeys(range(10), 0))),
            outcome.scaling_state, outcome.shard_map, published,
        )  # fmt: skip
        assert outcome.desired_relays >= 1, f"relay 0 stays at {seconds}s"
    for seconds in (17.5, 20):  # both after the publication settled: it may go
        at = START + timedelta(hours=1, seconds=seconds)
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(at, outcome.desired_relays, metrics=counted(0, at, {0: 0})),
            outcome.scaling_state, outcome.shard_map, published,
        )  # fmt: skip
    assert outcome.desired_relays == 0


def test_a_map_published_again_without_moving_anyone_does_not_hold_the_drain() -> None:
    """Only the publication of the map that moved listeners dates the move. A previous
    version counted the settling from the latest publication of any map: with a map
    published on every pass (its admission, the relays' states), passes 1.5 s apart and
    samples 1 s old, no reading ever came 2 s after the latest publication, and every relay
    was kept (on a busy cluster a relay went 29 s after it emptied)."""
    spec = room()
    live = live_map(spec, START + timedelta(minutes=10))
    moved = after_the_end(spec, live, 10, dict.fromkeys(range(10), 3))
    outcome, published = moved, START + timedelta(hours=1, seconds=10.2)
    for step in range(8):
        at = START + timedelta(hours=1, seconds=12 + 1.5 * step)
        sampled = at - timedelta(seconds=1)
        ready = outcome.desired_relays
        outcome = reconcile(
            "r", spec, outcome.status,
            seen(at, ready, metrics=counted(0, sampled, dict.fromkeys(range(ready), 0))),
            outcome.scaling_state, outcome.shard_map, published,
        )  # fmt: skip
        published = at + timedelta(seconds=0.2)  # published again, as if on every pass
    assert outcome.desired_relays == 0, "two readings after the moving map's publication"


def test_a_refused_edit_without_an_accepted_spec_keeps_the_map_and_the_drain() -> None:
    """A room whose status records no accepted spec (refused by the previous release, or on
    the first pass after an upgrade) drains with 500 listeners on relays 0 and 1, and an
    edit with a disallowed image also sets listenersPerRelay 2,000, 1,024 shards and
    drainTimeout 1m. The old code took all three from the refused spec: the map became
    2,000 / 1,024 and, two minutes on, both relays went with all 500 listeners. Now the
    live map keeps its capacity and shards, and the drain keeps its time."""
    _, first = draining_with_listeners()
    upgraded = first.status.model_copy(update={"accepted_spec": None})
    refused = room(
        relay={**EVIL, "listenersPerRelay": 2000},
        sharding={"shards": 1024},
        scaling={"drainTimeout": "1m"},
    )
    at = START + timedelta(hours=1, minutes=2)
    outcome = reconcile(
        "r", refused, upgraded,
        seen(at, 10, 2, metrics=counted(500, at, {0: 200, 1: 300}), namespace="t"),
        first.scaling_state, first.shard_map, at - timedelta(minutes=1), policy=ONLY_REGISTRY,
    )  # fmt: skip
    assert outcome.refused
    assert (outcome.shard_map.capacity, outcome.shard_map.shards) == (1000, 4096)
    assert outcome.desired_relays == 2, "the relays carrying the 500 listeners stay"
    assert "DrainTimedOut" not in reasons(outcome)
    assert "ShardMapChanged" not in reasons(outcome)
