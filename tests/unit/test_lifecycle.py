"""A room's phases, relay counts, conditions and Events, driven by time alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from townsquare.api.models import AudioRoomSpec, AudioRoomStatus
from townsquare.lifecycle import Metrics, Observed, Outcome, drain_order, reconcile, startup_of
from townsquare.scaling import ScalingState

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)


def room(audience: int = 7000, **scaling: object) -> AudioRoomSpec:
    return AudioRoomSpec.model_validate(
        {
            "startTime": START,
            "duration": "10m",
            "expectedAudience": audience,
            "relay": {"image": "relay:1", "listenersPerRelay": 1000, "startupSeconds": 5},
            "scaling": {"minRelays": 1, "prewarmLead": "2m", "drainTimeout": "1m", **scaling},
        }
    )


def step(
    spec: AudioRoomSpec,
    previous: AudioRoomStatus,
    at: timedelta,
    ready: int = 0,
    generation: int = 1,
    listeners: int | None = None,
) -> Outcome:
    metrics = None if listeners is None else Metrics(listeners=listeners, sampled_at=START + at)
    seen = Observed(START + at, generation, ready, metrics=metrics)
    return reconcile("room", spec, previous, seen)


def reasons(outcome: Outcome) -> list[str]:
    return [event.reason for event in outcome.events]


def condition(outcome: Outcome, kind: str) -> tuple[str, str]:
    found = next(c for c in outcome.status.conditions if c.type == kind)
    return found.status, found.reason


def test_a_room_walks_through_every_phase_in_order() -> None:
    spec = room()
    status = AudioRoomStatus()
    timeline = [
        (timedelta(minutes=-10), 0, "Scheduled", 1, []),
        (timedelta(minutes=-2), 1, "PreWarming", 10, ["PreWarmStarted"]),
        (timedelta(minutes=-1), 10, "Ready", 10, ["PreWarmed"]),
        (timedelta(seconds=1), 10, "Live", 10, ["Live"]),
        (timedelta(minutes=10), 10, "Draining", 10, ["Draining"]),
        (timedelta(minutes=11), 10, "Draining", 0, ["DrainTimedOut"]),
        (timedelta(minutes=11, seconds=5), 0, "Ended", 0, ["Ended"]),
        (timedelta(minutes=30), 0, "Ended", 0, []),
    ]
    for at, ready, phase, desired, events in timeline:
        outcome = step(spec, status, at, ready)
        assert (outcome.status.phase, outcome.desired_relays, reasons(outcome)) == (
            phase,
            desired,
            events,
        ), at
        status = outcome.status
    assert condition(outcome, "PreWarmed") == ("True", "AllRelaysReady")


def test_scheduled_room_sleeps_until_prewarm() -> None:
    outcome = step(room(), AudioRoomStatus(), timedelta(days=-30))
    assert outcome.wake_at == START - timedelta(minutes=2)
    assert outcome.status.plan is not None
    assert outcome.status.plan.relays == 10


def test_a_room_booked_ahead_with_no_relay_gets_children_only_at_its_pre_warm() -> None:
    spec = room(minRelays=0)
    scheduled = step(spec, AudioRoomStatus(), timedelta(days=-2))
    assert (scheduled.status.phase, scheduled.desired_relays) == ("Scheduled", 0)
    assert not scheduled.children and scheduled.status.shard_map is None
    assert step(room(minRelays=1), AudioRoomStatus(), timedelta(days=-2)).children, "a floor"
    prewarming = step(spec, scheduled.status, timedelta(minutes=-2))
    assert prewarming.status.phase == "PreWarming" and prewarming.children
    assert prewarming.status.shard_map is not None
    # Once applied, a room keeps its children, also when it is moved back to Scheduled.
    later = spec.model_copy(update={"start_time": START + timedelta(days=7)})
    moved = step(later, prewarming.status, timedelta(minutes=-1))
    assert moved.status.phase == "Scheduled"
    assert moved.children and moved.status.shard_map is not None


def test_nothing_changes_when_nothing_happens() -> None:
    spec = room()
    first = step(spec, AudioRoomStatus(), timedelta(minutes=-1), ready=4)
    again = step(spec, first.status, timedelta(minutes=-1, seconds=-30) + timedelta(seconds=50), 4)
    assert again.status == first.status
    assert again.events == ()


def test_incomplete_prewarm_warns_with_numbers_at_the_start() -> None:
    spec = room()
    warming = step(spec, AudioRoomStatus(), timedelta(minutes=-1), ready=6)
    live = step(spec, warming.status, timedelta(seconds=0), ready=6)
    warning = next(e for e in live.events if e.reason == "PreWarmIncomplete")
    assert warning.type == "Warning"
    assert warning.message == "6/10 relays ready at the start"
    assert condition(live, "PreWarmed") == ("False", "PreWarmIncomplete")


def test_raising_the_audience_replans_and_says_so() -> None:
    scheduled = step(room(7000), AudioRoomStatus(), timedelta(hours=-1))
    replanned = step(room(14000), scheduled.status, timedelta(hours=-1), generation=2)
    event = next(e for e in replanned.events if e.reason == "Replanned")
    assert "expected audience 7,000 -> 14,000: 10 -> 20 relays" in event.message
    assert replanned.status.observed_generation == 2


def test_lowering_the_audience_never_drops_live_relays() -> None:
    warming = step(room(7000), AudioRoomStatus(), timedelta(minutes=-1), ready=10)
    lowered = step(room(700), warming.status, timedelta(minutes=-1), ready=10, generation=2)
    assert lowered.desired_relays == 10


def test_condition_transition_time_moves_only_on_a_flip() -> None:
    spec = room()
    a = step(spec, AudioRoomStatus(), timedelta(minutes=-2), ready=2)
    b = step(spec, a.status, timedelta(minutes=-1), ready=3)
    c = step(spec, b.status, timedelta(seconds=-30), ready=10)
    ready = [next(x for x in o.status.conditions if x.type == "Ready") for o in (a, b, c)]
    assert ready[0].last_transition_time == ready[1].last_transition_time
    assert ready[2].status == "True"
    assert ready[2].last_transition_time == START - timedelta(seconds=30)


def test_start_already_past_runs_at_once_with_a_warning() -> None:
    outcome = step(room(), AudioRoomStatus(), timedelta(minutes=3))
    assert outcome.status.phase == "Live"
    assert outcome.desired_relays == 10
    assert "StartTimePassed" in reasons(outcome)


def test_audience_beyond_max_relays_sets_capacity_exceeded() -> None:
    outcome = step(room(50_000, maxRelays=20), AudioRoomStatus(), timedelta(hours=-1))
    assert condition(outcome, "CapacityExceeded") == ("True", "AudienceBeyondMaxRelays")
    warning = next(e for e in outcome.events if e.reason == "AudienceBeyondMaxRelays")
    assert warning.type == "Warning"


def test_drain_ends_early_when_listeners_have_left() -> None:
    spec = room()
    live = step(spec, AudioRoomStatus(), timedelta(minutes=5), ready=10)
    draining = step(spec, live.status, timedelta(minutes=10), ready=10, listeners=300)
    assert draining.desired_relays == 10
    emptied = step(spec, draining.status, timedelta(minutes=10, seconds=20), 10, listeners=0)
    assert emptied.desired_relays == 0
    assert "DrainTimedOut" not in reasons(emptied)


def test_restart_resumes_from_status_without_scaling_down() -> None:
    spec = room()
    live = step(spec, AudioRoomStatus(), timedelta(minutes=5), ready=10)
    stored = AudioRoomStatus.model_validate(live.status.model_dump(by_alias=True, mode="json"))
    resumed = step(spec, stored, timedelta(minutes=6), ready=10)
    assert resumed.desired_relays == 10
    assert resumed.events == ()
    assert resumed.status == live.status.model_copy(update={})


def test_stored_status_does_not_change_while_nothing_changes() -> None:
    spec = room(700)
    status = AudioRoomStatus()
    outcome = step(spec, status, timedelta(minutes=3), ready=1, listeners=300)
    writes = 0
    for second in range(1, 40):
        later = step(spec, outcome.status, timedelta(minutes=3, seconds=second), 1, 1, 300)
        writes += later.status != outcome.status
        outcome = later
    assert writes <= 1, "a flat audience must not rewrite the status every tick"


def test_no_series_before_any_relay_is_ready_is_no_warning() -> None:
    seen = Observed(START, 1, 0, metrics=Metrics(listeners=None, problem="no listener series"))
    outcome = reconcile("room", room(), AudioRoomStatus(), seen)
    assert "MetricsUnavailable" not in reasons(outcome)
    assert condition(outcome, "MetricsAvailable") == ("Unknown", "NoRelaysReady")


def test_one_plan_per_pass_even_when_measured_start_up_shortens_the_lead() -> None:
    slow = AudioRoomSpec.model_validate(
        {**room().model_dump(by_alias=True, mode="json"), "scaling": {"minRelays": 1}}
    )
    slow = slow.model_copy(update={"relay": slow.relay.model_copy(update={"startup_seconds": 300})})
    scheduled = step(slow, AudioRoomStatus(), timedelta(hours=-1))
    assert scheduled.status.plan is not None
    prewarm_at = scheduled.status.plan.prewarm_at
    quick_starts = tuple((START - timedelta(days=1, minutes=i), 5.0) for i in range(20))
    fast = Observed(prewarm_at + timedelta(seconds=10), 1, 1, startups=quick_starts)
    warming = reconcile("room", slow, scheduled.status, fast)
    assert warming.status.phase == "PreWarming"
    assert warming.desired_relays == scheduled.status.plan.relays, "the plan starts with the phase"


def test_scale_down_is_announced_when_relays_start_draining() -> None:
    spec = room(700).model_copy(update={"duration": timedelta(hours=2)})
    now = START + timedelta(minutes=40)
    live = step(spec, AudioRoomStatus(), timedelta(minutes=39), ready=10, listeners=300)
    state = ScalingState(relays=10, targets=((now - timedelta(minutes=10, seconds=30), 1),))
    metrics = Metrics(listeners=300, sampled_at=now - timedelta(seconds=2))
    seen = Observed(now, 1, 10, metrics=metrics)
    outcome = reconcile("room", spec, live.status, seen, scaling_state=state)
    assert outcome.desired_relays == 10, "draining relays stay until empty"
    assert outcome.status.relays is not None and outcome.status.relays.draining > 0
    assert "ScaledDown" in reasons(outcome)


def test_start_up_is_learned_from_the_newest_relays() -> None:
    old = tuple((START - timedelta(days=2, seconds=i), 300.0) for i in range(50))
    new = tuple((START - timedelta(hours=1, seconds=i), 5.0) for i in range(20))
    seen = Observed(START, 1, 0, startups=new + old)
    assert startup_of(room(), seen) < 10, "twenty fresh start-ups outweigh older slow ones"


def test_a_scale_down_empties_the_highest_relay_first_within_the_budget() -> None:
    """A StatefulSet removes its highest ordinal: with budget for one relay's listeners,
    the scale-down moves those of relay 9, not a share of every draining relay's."""
    spec = room(7000).model_copy(update={"duration": timedelta(hours=2)})
    spec = spec.model_copy(
        update={"sharding": spec.sharding.model_copy(update={"max_migrations_per_minute": 30})}
    )
    now = START + timedelta(minutes=40)
    by_relay = dict.fromkeys(range(10), 30)
    before = now - timedelta(minutes=1)
    live = reconcile(
        "room", spec, AudioRoomStatus(),
        Observed(before, 1, 10, metrics=Metrics(listeners=7000, sampled_at=before)),
        scaling_state=ScalingState(relays=10),
    )  # fmt: skip
    assert live.shard_map.relays == dict.fromkeys(range(10), "active")
    state = ScalingState(relays=10, targets=((now - timedelta(minutes=10, seconds=30), 1),))
    metrics = Metrics(listeners=300, by_relay=by_relay, sampled_at=now - timedelta(seconds=2))
    outcome = reconcile(
        "room", spec, live.status, Observed(now, 1, 10, metrics=metrics), scaling_state=state,
        shard_map=live.shard_map, shard_map_at=now - timedelta(minutes=1),
    )  # fmt: skip
    before, after = live.shard_map.counts(), outcome.shard_map.counts()
    draining = sorted(o for o, s in outcome.shard_map.relays.items() if s == "draining")
    assert draining and draining[-1] == 9 and after[9] == 0, after
    assert all(after[o] == before[o] for o in draining[:-1]), "the ones below wait"


def test_relays_a_rollout_replaces_drain_before_those_a_scale_down_removes() -> None:
    """Each relay a rollout replaces frees a maxSurge slot as it empties, so its listeners
    move first; then the scale-down's, highest first."""
    ready = frozenset(range(10))
    assert drain_order(ready, active=[0, 1, 3, 4, 5], replicas=10, rolling={2, 6}) == [
        6, 2, 9, 8, 7,
    ]  # fmt: skip
