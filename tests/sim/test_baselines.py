"""The baselines against hand-computed HPA and KEDA cases, and the oracle's formula."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from townsquare.api.models import AudioRoomSpec
from townsquare.sim.baselines import (
    Hpa,
    cron_window,
    keda_metrics,
    oracle_relays,
    reactive_metrics,
)

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)


def room(audience: int = 500_000) -> AudioRoomSpec:
    return AudioRoomSpec.model_validate(
        {
            "startTime": START,
            "duration": "90m",
            "expectedAudience": audience,
            "relay": {"image": "relay:1", "listenersPerRelay": 1000},
            "scaling": {"minRelays": 2, "maxRelays": 1200, "targetUtilization": 0.7},
        }
    )


def hpa() -> Hpa:
    return Hpa(min_replicas=2, max_replicas=1200)


@pytest.mark.parametrize(
    ("current", "listeners", "expected"),
    [
        (10, 7_600, 10),  # 7,600 / (700 x 10) = 1.086: within the 10% tolerance
        (10, 6_400, 10),  # 0.914: within the tolerance
        (10, 10_500, 15),  # 1.5 -> ceil(15.0)
        (10, 7_800, 12),  # 1.114 -> ceil(11.14)
        (3, 70_000, 7),  # wants 100; limited to max(2 x 3, 3 + 4) = 7 per sync
        (20, 70_000, 40),  # wants 100; limited to max(40, 24) = 40
    ],
)
def test_hpa_scale_up_and_tolerance(current: int, listeners: int, expected: int) -> None:
    assert hpa().recommend(0, current, reactive_metrics(room(), listeners)) == expected


def test_hpa_scale_down_waits_300_seconds_of_lower_recommendations() -> None:
    autoscaler = hpa()
    assert autoscaler.recommend(0, 20, reactive_metrics(room(), 14_000)) == 20
    replicas = [autoscaler.recommend(t, 20, reactive_metrics(room(), 3_500)) for t in (15, 285)]
    assert replicas == [20, 20]  # the recommendation of 20 at t=0 is still in the window
    assert autoscaler.recommend(300, 20, reactive_metrics(room(), 3_500)) == 5


def test_hpa_stays_within_min_and_max() -> None:
    assert hpa().recommend(0, 4, reactive_metrics(room(), 0)) >= 2
    big = Hpa(min_replicas=2, max_replicas=50)
    assert big.recommend(0, 40, reactive_metrics(room(), 1_000_000)) == 50


def test_keda_cron_holds_the_plan_from_prewarm_at_to_the_end() -> None:
    spec = room()  # 500,000 declared -> 715 relays
    cron = cron_window(spec)
    # Pre-warm lead as `townsquare plan` derives it: 2 x 45 s + 715 / 20 pods/s, plus 2 min,
    # rounded up to whole minutes = 5 min before the start.
    assert (cron.begins, cron.ends, cron.relays) == (-300, 5400, 715)
    before = hpa().recommend(-360, 2, keda_metrics(cron, spec, -360, 0))
    during = hpa().recommend(-300, 2, keda_metrics(cron, spec, -300, 0))
    assert before == 2
    assert during == 6  # cron wants 715; the HPA lets 2 grow to max(4, 6) first
    ramp, replicas = hpa(), 2
    for t in range(-300, -300 + 15 * 10, 15):
        replicas = ramp.recommend(t, replicas, keda_metrics(cron, spec, t, 0))
    assert replicas == 715
    assert ramp.recommend(5385, 715, keda_metrics(cron, spec, 5385, 0)) == 715  # last second
    assert ramp.recommend(5400, 715, keda_metrics(cron, spec, 5400, 0)) == 715  # stabilized
    assert ramp.recommend(5670, 715, keda_metrics(cron, spec, 5670, 0)) == 715
    assert ramp.recommend(5685, 715, keda_metrics(cron, spec, 5685, 0)) == 2  # window passed


def test_keda_takes_the_larger_of_cron_and_prometheus() -> None:
    spec = room(audience=7_000)  # plan: 10 relays
    cron = cron_window(spec)
    assert hpa().recommend(60, 10, keda_metrics(cron, spec, 60, 10_500)) == 15


def test_oracle_is_the_ceiling_of_demand_over_the_target_load() -> None:
    spec = room()
    assert oracle_relays(0, spec) == 2
    assert oracle_relays(700, spec) == 2
    assert oracle_relays(7_001, spec) == 11
    assert oracle_relays(2_000_000, spec) == 2858  # not held to maxRelays
