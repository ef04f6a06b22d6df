"""The planner: the design's example, and properties that must hold for every room."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import fanout_tiers, plan_room

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
LONG_BEFORE = START - timedelta(days=7)


def spec(audience: int = 500_000, **scaling: object) -> AudioRoomSpec:
    return AudioRoomSpec.model_validate(
        {
            "startTime": START,
            "duration": "90m",
            "expectedAudience": audience,
            "relay": {"image": "relay:1", "listenersPerRelay": 1000},
            "scaling": {"maxRelays": 1200, **scaling},
        }
    )


def test_design_example_needs_715_relays() -> None:
    plan = plan_room(spec(), LONG_BEFORE)
    assert plan.relays == 715
    assert plan.capacity == 500_500
    assert plan.hard_capacity == 715_000
    assert plan.fanout_tiers == 2
    assert plan.warnings == ()


def test_declared_lead_sets_the_prewarm_time() -> None:
    plan = plan_room(spec(prewarmLead="15m"), LONG_BEFORE)
    assert plan.prewarm_at == START - timedelta(minutes=15)
    assert plan.ready_by == plan.prewarm_at + plan.rollout


def test_audience_beyond_max_relays_is_capped_with_a_warning() -> None:
    plan = plan_room(spec(audience=2_000_000), LONG_BEFORE)
    assert plan.relays == 1200
    assert any("exceeds what maxRelays" in w for w in plan.warnings)


def test_start_in_the_past_still_plans_and_warns() -> None:
    plan = plan_room(spec(), START + timedelta(minutes=12))
    assert plan.relays == 715
    assert any("already past (12m ago)" in w for w in plan.warnings)


def test_short_lead_warns_that_relays_may_be_late() -> None:
    plan = plan_room(spec(prewarmLead="30s"), LONG_BEFORE)
    assert any("shorter than the expected rollout" in w for w in plan.warnings)


def test_fanout_tiers() -> None:
    assert fanout_tiers(1, 64) == 1
    assert fanout_tiers(64, 64) == 1
    assert fanout_tiers(65, 64) == 2
    assert fanout_tiers(4096, 64) == 2
    assert fanout_tiers(4097, 64) == 3


audiences = st.integers(min_value=0, max_value=5_000_000)
limits = st.tuples(st.integers(0, 50), st.integers(1, 3000)).filter(lambda t: t[0] <= t[1])
utilizations = st.floats(min_value=0.05, max_value=1.0)


@given(audiences, audiences, limits, utilizations)
def test_plan_is_monotone_in_audience(
    a: int, b: int, bounds: tuple[int, int], utilization: float
) -> None:
    low, high = sorted((a, b))
    scaling = {"minRelays": bounds[0], "maxRelays": bounds[1], "targetUtilization": utilization}
    assert (
        plan_room(spec(low, **scaling), LONG_BEFORE).relays
        <= plan_room(spec(high, **scaling), LONG_BEFORE).relays
    )


@given(audiences, limits, utilizations)
def test_plan_stays_within_min_and_max(
    audience: int, bounds: tuple[int, int], utilization: float
) -> None:
    scaling = {"minRelays": bounds[0], "maxRelays": bounds[1], "targetUtilization": utilization}
    plan = plan_room(spec(audience, **scaling), LONG_BEFORE)
    assert bounds[0] <= plan.relays <= bounds[1]
    if bounds[0] < plan.relays < bounds[1]:
        assert plan.capacity >= audience, "an uncapped plan carries the audience at target"


@given(audiences, st.integers(1, 600), st.datetimes(timezones=st.just(UTC)))
def test_prewarm_is_before_the_start(audience: int, startup: int, now: datetime) -> None:
    room = spec(audience).model_copy(
        update={"relay": spec().relay.model_copy(update={"startup_seconds": startup})}
    )
    plan = plan_room(room, now)
    assert plan.prewarm_at < START
    assert plan.ready_by <= START
