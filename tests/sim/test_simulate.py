"""`townsquare simulate` as a user runs it, the trace format, and the model's bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from townsquare.api.manifest import parse_room
from townsquare.sim import Settings, TraceError, parse_trace, simulate

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "examples" / "traces"
FIGURES = {
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
    assert report["policies"]["townsquare"]["overloaded_listener_seconds"] == 0


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
    assert results["townsquare"].overloaded_listener_seconds == 0
    assert results["townsquare"].waiting_listener_seconds >= 1000 * 10 - 1
    assert results["oracle"].relay_seconds == 5 * 10  # ceil(3000 / 700)
