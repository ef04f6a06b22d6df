"""The demo's report without a cluster: the page shows the figures it was given, escaped."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from townsquare.cli import main
from townsquare.demo import EventRow, Figures, Report, Sample, Timeline, write_report
from townsquare.hearing import Gap, place_gaps

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)


def report_in(directory: Path) -> Report:
    t0 = START.timestamp()
    figures = Figures(
        expected_audience=12_500, planned_relays=18, listeners_per_relay=1000,
        peak_wanted=25_492, peak_connected=25_490, peak_waiting=6_044,
        waiting_listener_seconds=1_750_260, max_listeners_on_a_relay=1000,
        peak_ready_relays=44, peak_desired_relays=44, prewarmed_seconds_before_start=None,
        events=2,
    )  # fmt: skip
    return Report(
        namespace="demo",
        room="launch",
        start_time=START,
        speed=60,
        figures=figures,
        events=[
            EventRow(t0 - 20, "Normal", "PreWarmStarted", "18 relays <for> 12,500"),
            EventRow(t0 + 2, "Warning", "AdmissionQueueOn", "joins wait & queue"),
        ],
        samples=[Sample(t0 + s, "Live", 100 * s, 700, 0, s, s) for s in range(5)],
        timeline=Timeline(
            t=[t0 + s for s in range(5)],
            wanted=[0, 10, 20, 30, 40],
            connected=[0, 10, 15, 30, 40],
            capacity=[1000] * 5,
            waiting=[0, 0, 5, 0, 0],
            max_on_relay=[0, 5, 10, 15, 20],
        ),
        html=directory / "report.html",
        png=directory / "timeline.png",
        elapsed_seconds=170,
    )


def test_the_page_shows_every_figure_and_escapes_event_messages(tmp_path: Path) -> None:
    report = report_in(tmp_path)
    write_report(report)

    page = report.html.read_text()
    shown = dict(re.findall(r'<td data-figure="([a-z_]+)">([^<]*)</td>', page))
    assert shown["peak_wanted"] == "25,492"
    assert shown["prewarmed_seconds_before_start"] == "never"
    assert set(shown) == set(Figures.LABELS)
    assert "18 relays &lt;for&gt; 12,500" in page and "joins wait &amp; queue" in page
    assert "NOT pre-warmed before the start" in page
    assert report.png.read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in page
    assert (tmp_path / "figures.json").read_text().count('"peak_wanted": 25492') == 1


def test_demo_without_a_cluster_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert main(["demo"]) == 2
    assert "--kubeconfig: needed" in capsys.readouterr().err
    assert main(["demo", "--kubeconfig", "/nonexistent/kubeconfig"]) == 2
    assert "/nonexistent/kubeconfig is not a file" in capsys.readouterr().err


def test_the_page_marks_when_nodes_were_requested_and_ready(tmp_path: Path) -> None:
    plain = report_in(tmp_path)
    write_report(plain)
    assert "data-nodes" not in plain.html.read_text(), "no node headroom, no marks"

    t0 = START.timestamp()
    nodes = dataclasses.replace(
        plain,
        events=[
            EventRow(t0 - 65, "Normal", "NodesRequested", "18 placeholder pods ask ..."),
            EventRow(t0 - 43, "Normal", "NodesReady", "nodes for 18 relays ready ..."),
            *plain.events,
        ],
    )
    write_report(nodes)
    marks = dict(re.findall(r'<span data-nodes="(\w+)">([^<]*)</span>', nodes.html.read_text()))
    assert marks == {
        "NodesRequested": "nodes requested at T- 65s (-65 min event time)",
        "NodesReady": "nodes ready at T- 43s (-43 min event time)",
    }
    assert nodes.png.read_bytes().startswith(b"\x89PNG")


def test_the_summary_says_how_much_of_the_audience_was_real_and_what_it_heard(
    tmp_path: Path,
) -> None:
    report = report_in(tmp_path)
    assert "every listener simulated" in report.summary()
    heard = dataclasses.replace(
        report.figures, real_listeners=100, real_listeners_on_relays=98,
        real_listeners_that_lost_frames=3, real_frames_lost=17, real_longest_gap_ms=412,
        real_longest_gap_near_scale_up_ms=61, real_longest_gap_near_reshard_ms=61,
        real_longest_gap_near_drain_ms=95,
    )  # fmt: skip
    summary = dataclasses.replace(report, figures=heard).summary()
    assert (
        "100 listeners on real connections (a count given; 98 at once by the relays' own "
        "count): 3 lost frames (17 in all), longest gap 412 ms (0 ms beyond their own "
        "process's stalls); near scale-ups 61 ms, reshards 61 ms, drains 95 ms"
    ) in summary
    measured = dataclasses.replace(heard, real_listeners_measured=200)
    assert "(200 carried in a measurement at start, a sixteenth held; 98 at once" in (
        dataclasses.replace(report, figures=measured).summary()
    )


def test_the_page_lists_the_longest_gaps_with_the_change_each_came_near(tmp_path: Path) -> None:
    report = report_in(tmp_path)
    t0 = START.timestamp()
    heard = dataclasses.replace(report.figures, real_listeners=2, real_gaps=2)
    events = [EventRow(t0 + 30, "Normal", "ScaledDown", "draining 1 relay"), *report.events]
    gaps = place_gaps(
        [Gap("listener-0", t0 + 33, 0.095, "relocated: draining", 0),
         Gap("listener-1", t0 + 80, 0.4, "no notice", 20)],
        [(e.at, e.reason) for e in events],
    )  # fmt: skip
    write_report(dataclasses.replace(report, figures=heard, events=events, gaps=gaps))

    page = report.html.read_text()
    rows = re.findall(r'<td data-gap-ms="(\d+)">[^<]*</td><td>[\d,]+</td><td>([\d,]+)</td>'
                      r'<td>([^<]*)</td><td data-near="([^"]*)">', page)  # fmt: skip
    assert rows == [("95", "0", "relocated: draining", "drain"), ("400", "20", "no notice", "")]
    assert "1 of them within" in page
