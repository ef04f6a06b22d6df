"""`townsquare simulate` as a user runs it, the trace format, and the model's bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from townsquare.api.manifest import parse_room
from townsquare.api.models import AudioRoomSpec
from townsquare.sim import Settings, Trace, TraceError, parse_trace, simulate

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "examples" / "traces"
FIGURES = {
    "unserved_listener_seconds",
    "overloaded_listener_seconds",
    "waiting_listener_seconds",
    "relay_seconds",
    "cost_vs_oracle",
    "migrated_listeners",
    "scale_events",
    "peak_relays",
}


def townsquare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "townsquare", *args], capture_output=True, text=True, check=False
    )


def test_json_output_has_one_entry_per_policy() -> None:
    result = townsquare(
        "simulate",
        "--room",
        str(TRACES / "no-show.yaml"),
        "--trace",
        str(TRACES / "no-show.csv"),
        "-o",
        "json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["policies"]) == {"townsquare", "reactive", "keda", "oracle"}
    for figures in report["policies"].values():
        assert set(figures) == FIGURES
    assert report["policies"]["oracle"]["cost_vs_oracle"] == 1.0
    for figures in report["policies"].values():
        parts = figures["waiting_listener_seconds"] + figures["overloaded_listener_seconds"]
        assert abs(figures["unserved_listener_seconds"] - parts) <= 1
    ours, reactive = (
        report["policies"][p]["unserved_listener_seconds"] for p in ("townsquare", "reactive")
    )
    assert ours < reactive / 10


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--policy", "hpa"], "argument --policy: invalid choice"),
        (["--trace", "/nonexistent.csv"], "/nonexistent.csv: cannot read"),
        (["--room", str(ROOT / "examples" / "invalid-utilization.yaml")], "targetUtilization"),
        (["--scrape-interval", "0s"], "--scrape-interval"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    base = {"--room": str(TRACES / "no-show.yaml"), "--trace": str(TRACES / "no-show.csv")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    flat = [part for key, value in {**base, **given}.items() for part in (key, value)]
    result = townsquare("simulate", *flat)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("time,listeners\n0,1\n1,2\n", "header must name t_seconds,listeners"),
        ("t_seconds,listeners\n0,1\n0,2\n", "line 3: t_seconds 0 is not after 0"),
        ("t_seconds,listeners\n0,1\n1,lots\n", "line 3: not a number"),
        ("t_seconds,listeners\n0,1\n1,-5\n", "line 3: values must be finite and not negative"),
        ("t_seconds,listeners\n0,1\n", "needs at least two rows"),
        ("t_seconds,listeners,colour\n0,1,red\n1,1,red\n", "unknown column 'colour'"),
    ],
)
def test_malformed_traces_are_refused(text: str, expected: str) -> None:
    with pytest.raises(TraceError, match=expected):
        parse_trace(text)


def test_trace_is_linear_between_rows() -> None:
    trace = parse_trace("t_seconds,listeners,relay_failures\n-2,0,0\n2,400,3\n")
    assert trace.per_second() == [0, 100, 200, 300, 400]
    assert trace.failures == ((2.0, 3),)


def test_an_overloaded_baseline_counts_every_listener_on_it() -> None:
    spec = parse_room((TRACES / "flash-crowd.yaml").read_text()).spec
    # 2 relays carry 2,000 listeners; 3,000 arrive at once and stay for 10 s.
    trace = parse_trace("t_seconds,listeners\n0,3000\n9,3000\n")
    results = simulate(spec, trace, ("reactive", "townsquare", "oracle"), Settings())
    assert results["reactive"].overloaded_listener_seconds == 3000 * 10
    # townsquare's edge admits each relay up to its capacity and no further, as the real edge
    # does whatever the map's admission state: 1,000 listeners wait until new relays are
    # Ready (30 s, past the trace), none is overloaded, counted from the relays' loads.
    assert results["townsquare"].overloaded_listener_seconds == 0
    assert results["townsquare"].waiting_listener_seconds == 1000 * 10
    assert results["townsquare"].unserved_listener_seconds == (
        results["townsquare"].overloaded_listener_seconds
        + results["townsquare"].waiting_listener_seconds
    )
    assert results["oracle"].relay_seconds == 5 * 10  # ceil(3000 / 700)


def _room(audience: int, duration: str = "1h", **scaling: object) -> AudioRoomSpec:
    return AudioRoomSpec.model_validate(
        {
            "startTime": "2026-12-01T23:00:00Z",
            "duration": duration,
            "expectedAudience": audience,
            "relay": {"image": "relay:1", "listenersPerRelay": 1000, "startupSeconds": 30},
            "scaling": {"minRelays": 2, "maxRelays": 400, **scaling},
        }
    )


def test_during_a_metric_outage_keda_drops_to_its_floor_while_others_hold() -> None:
    """KEDA reads an empty answer as 0 listeners; the HPA and townsquare keep their size."""
    spec = _room(1_000)  # the cron plan is 2 relays: KEDA leans on Prometheus
    steady = parse_trace("t_seconds,listeners\n-600,0\n0,7000\n2400,7000\n")
    outage = replace(steady, outages=((600.0, 1800.0),))
    results = simulate(spec, outage, ("townsquare", "reactive", "keda"), Settings(keep_series=True))
    assert results["reactive"].overloaded_listener_seconds == 0
    ours = results["townsquare"]
    assert ours.overloaded_listener_seconds == 0
    assert ours.series is not None
    during = [w for t, w in zip(ours.series.t, ours.series.waiting, strict=True) if 600 <= t < 1800]
    assert during and max(during) == 0
    # 0 listeners read for 1,200 s: after its 300 s window KEDA scales to 2 relays (2,000
    # listeners) while 7,000 listen: every one of them is overloaded for the rest.
    assert results["keda"].overloaded_listener_seconds >= 7000 * (1800 - 600 - 300 - 30)


def test_a_single_glitched_scrape_moves_townsquare_one_step_at_most() -> None:
    spec = _room(0)
    steady = parse_trace("t_seconds,listeners\n-900,0\n-300,7000\n3600,7000\n")
    glitched = replace(steady, glitches=((1800.0, 10.0),))
    calm = simulate(spec, steady, ("townsquare",), Settings())["townsquare"]
    spiked = simulate(spec, glitched, ("townsquare",), Settings())["townsquare"]
    assert spiked.scale_ups - calm.scale_ups <= 1
    assert spiked.peak_relays <= max(2 * calm.peak_relays, calm.peak_relays + 4)
    assert spiked.unserved_listener_seconds == pytest.approx(calm.unserved_listener_seconds)


def _late_host(moves: tuple[tuple[float, float], ...]) -> Trace:
    """70,000 declared; 10,000 wait in the open room; the host comes 25 minutes late."""
    rows = "t_seconds,listeners\n-900,0\n0,5000\n1500,10000\n1620,70000\n6600,70000\n7000,0\n"
    return replace(parse_trace(rows), start_moves=moves)


def test_moving_start_time_mid_flight_keeps_the_plan_for_a_late_host() -> None:
    spec = _room(70_000, duration="90m")
    silent = simulate(spec, _late_host(()), ("townsquare",), Settings())["townsquare"]
    moved = simulate(spec, _late_host(((300.0, 1500.0),)), ("townsquare",), Settings())
    told = moved["townsquare"]
    assert told.waiting_listener_seconds <= 0.001 * told.listener_seconds
    assert silent.waiting_listener_seconds > 10 * max(1.0, told.waiting_listener_seconds)


def test_relays_go_once_the_event_has_ended_and_the_listeners_have_left() -> None:
    spec = _room(7_000, duration="30m")  # ends at 1,800 s
    trace = parse_trace("t_seconds,listeners\n-600,0\n0,7000\n1700,7000\n1800,0\n3600,0\n")
    result = simulate(spec, trace, ("townsquare",), Settings(keep_series=True))["townsquare"]
    assert result.series is not None
    pods_after = [p for t, p in zip(result.series.t, result.series.pods, strict=True) if t > 1830]
    assert max(pods_after) == 0, "a reading of no listener after the end removes every relay"


def test_a_relay_turning_ready_wakes_the_operator_as_its_pod_watch_does() -> None:
    """The operator reconciles when a relay pod changes (`handlers.relay_pod_changed`), not
    only on its timer: a relay that turns Ready gets its shards then. With a timer of ten
    minutes, every relay Ready for a scrape and the edge's delay (25 s) carries a full
    load while the crowd waits, instead of idling until the next tick."""
    spec = _room(0)
    trace = parse_trace("t_seconds,listeners\n-600,0\n0,1000\n300,1000\n360,12000\n2400,12000\n")
    settings = Settings(control_interval=600, relay_startup=30, keep_series=True)
    ours = simulate(spec, trace, ("townsquare",), settings)["townsquare"]
    series = ours.series
    assert series is not None
    ready_at = dict(zip(series.t, series.ready, strict=True))
    lag = 15 + 5 + 5
    checked = 0
    for t, wanted, waiting in zip(series.t, series.demand, series.waiting, strict=True):
        if t - lag in ready_at and waiting > 0:
            full = ready_at[t - lag] * spec.relay.listeners_per_relay
            assert waiting <= max(0.0, wanted - full) + 1, f"relays idle at {t}s"
            checked += 1
    assert checked > 30, "the rise outran the relays: somebody waited"
