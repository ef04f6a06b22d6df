"""The trace families: seeds kept apart, cases reproducible, parameters within their ranges."""

from __future__ import annotations

import math

import pytest

from townsquare.sim import bench
from townsquare.sim.families import (
    EVALUATION_SEEDS,
    FAMILIES,
    RETIRED_EVALUATION_SEEDS,
    TUNING_SEEDS,
    generate,
    seeds,
)


def test_tuning_and_evaluation_seeds_are_disjoint() -> None:
    assert len(TUNING_SEEDS) > 0 and len(EVALUATION_SEEDS) > 0
    assert (
        TUNING_SEEDS.stop <= EVALUATION_SEEDS.start or EVALUATION_SEEDS.stop <= TUNING_SEEDS.start
    )
    assert not set(TUNING_SEEDS) & set(EVALUATION_SEEDS)


def test_the_evaluation_range_is_none_whose_figures_were_read_before() -> None:
    assert not set(RETIRED_EVALUATION_SEEDS) & set(EVALUATION_SEEDS)
    assert not set(RETIRED_EVALUATION_SEEDS) & set(TUNING_SEEDS)


def test_the_benchmark_reads_evaluation_seeds_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.parse_args(["traces", "out"]).seeds == "evaluation"
    seen: list[int] = []

    def record(family: str, seed: int) -> tuple[str, int, dict[str, float]]:
        seen.append(seed)
        return family, seed, {}

    monkeypatch.setattr(bench, "measure", record)
    by_family = bench.run_cases("evaluation", bench.PER_FAMILY, processes=1)
    assert len(seen) == bench.PER_FAMILY * len(FAMILIES) >= 200
    assert all(seed in EVALUATION_SEEDS for seed in seen)
    assert not set(seen) & set(TUNING_SEEDS)
    assert {family: len(cases) for family, cases in by_family.items()} == dict.fromkeys(
        FAMILIES, bench.PER_FAMILY
    )


def test_a_case_is_the_same_in_every_run() -> None:
    for family in FAMILIES:
        assert generate(family, 3) == generate(family, 3)
        assert generate(family, 3).trace != generate(family, 4).trace


def test_unknown_family_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown family 'storm'; known: launch-on-time"):
        generate("storm", 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_cases_stay_within_the_ranges_the_issue_names(family: str) -> None:
    for family_name, seed in seeds("tuning", 12):
        if family_name != family:
            continue
        case = generate(family, seed)
        spec, trace = case.spec, case.trace
        assert case.settings.relay_startup is not None
        assert 10 <= case.settings.relay_startup <= 120
        peak = max(trace.listeners)
        assert peak <= 700_000 * 1.25  # audiences up to 700k, plus drift and noise
        per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
        assert spec.scaling.max_relays * per_relay >= 1.2 * peak, "maxRelays suffices"
        if family == "flash-crowd":
            assert spec.expected_audience / peak <= 0.12
        if family == "no-show":
            assert spec.expected_audience / peak >= 3.5
        if family.startswith("launch"):
            declared_over_actual = spec.expected_audience / case.facts["actual"]
            assert 0.5 <= declared_over_actual <= 2
        if family == "launch-late-moved":
            assert 0 <= case.facts["delay_s"] <= 30 * 60
        if family == "launch-late-within-hold":
            assert case.facts["delay_s"] <= spec.scaling.plan_hold.total_seconds()
        if family == "glitch":
            assert trace.glitches
            assert all(0.1 <= factor <= 10 for _, factor in trace.glitches)
        if family == "metric-outage":
            assert all(60 <= end - begin <= 600 for begin, end in trace.outages)


def test_a_crash_kills_at_most_the_share_the_headroom_covers() -> None:
    """The issue's bound, "up to (1 - targetUtilization) of the relays", with the relays
    counted as the fewest any policy at the room's headroom runs at the crash (the
    oracle's). One relay of two is 50%: a room too small for a crash within the bound is
    drawn again, so every case crashes at least one relay and never beyond the share."""
    shares = []
    for seed in TUNING_SEEDS[:150]:
        case = generate("relay-crash", seed)
        ((at, failed),) = case.trace.failures
        demand = case.trace.per_second()[math.floor(at) - case.trace.start]
        spec = case.spec
        per_relay = spec.relay.listeners_per_relay * spec.scaling.target_utilization
        running = max(spec.scaling.min_relays, math.ceil(demand / per_relay - 1e-9))
        headroom = 1 - case.spec.scaling.target_utilization
        assert 1 <= failed <= headroom * running + 1e-9, (seed, failed, running)
        shares.append(failed / running)
    assert max(shares) > 0.15, "the family still reaches large crashes"


@pytest.mark.parametrize("seed", range(4))
def test_the_flash_crowd_references_are_bounds_townsquare_cannot_beat(seed: int) -> None:
    """The references printed beside the flash-crowd target claim that no policy reacting
    to evidence leaves fewer listeners unserved, and none that also keeps the glitch rule
    fewer than the second, as long as it ran no more relays than the oracle before the
    surge (townsquare may run more: its plan floor). townsquare keeps the glitch rule, and
    on these seeds (and all of tuning seeds 0-119, checked by hand) it never beats either."""
    _, _, figures = bench.measure("flash-crowd", seed)
    least = figures["least unserved seeing the surge/reactive"]
    careful = figures["least unserved under the glitch rule/reactive"]
    assert 0 < least <= careful <= figures["unserved vs reactive"]
