"""What the edge reads back each refresh: the relays' own listener counts, and each edge
replica's line.

Today both come from Prometheus, in one batched instant query per refresh for every room:
the metric contract's `audioroom_relay_listeners` with the time of each sample, and the
line every edge replica exports (`audioroom_edge_line_first_attempt_seconds`, a summary of
the first attempts waiting there, and `audioroom_edge_line_rooms`, present on every scrape,
whose sample time says how fresh a replica's news is), so a replica keeps the room's line in
order, and tells a listener its place in it, without talking to the others. It is one
implementation of
`ReportSource`; relays that push their counts, or an edge that scrapes the relays it knows
directly, would be another, with nothing else changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from townsquare.edge.admission import LINE_QUANTILES, Line, News, Report

Reports = dict[tuple[str, str, str], Report]
"""(namespace, room, pod) -> the relay's last count."""
Parts = dict[tuple[str, str, str, str], Report]
"""(namespace, room, pod, instance) -> one source's count of a relay's listeners."""

LISTENERS = "audioroom_relay_listeners"
LINE = "audioroom_edge_line_first_attempt_seconds"
LINE_ROOMS = "audioroom_edge_line_rooms"
BY_SOURCE = "namespace, room, pod, instance"
BY_LINE = "namespace, room, replica"
QUERY = (
    f"sum by ({BY_SOURCE}) ({LISTENERS}) or "
    f'label_replace(max by ({BY_SOURCE}) (timestamp({LISTENERS})), "at", "1", "", "")'
    f" or max by ({BY_LINE}, quantile) ({LINE})"
    f' or label_replace(max by ({BY_LINE}) ({LINE}_count), "count", "1", "", "")'
    f' or label_replace(max by (replica) (timestamp({LINE_ROOMS})), "heard", "1", "", "")'
)
"""Each source's counts and their sample times in one vector, told apart by the `at` label;
the edge replicas' lines (`quantile`, `count`) and when each replica was last scraped
(`heard`), told apart by the `replica` label.

One pod may be reported by more than one source (scrape target): the relay process counts
the listeners connected to it, and a load generator counts the simulated ones it placed
there. Those add up (a `max` would hide the smaller part and let the edge overfill the
relay); a pod reported by one source alone is that source's count."""
MISSING_PART_GRACE = 10.0
"""Seconds a source that reported a pod before still counts, at its last figure, once its
series is gone (a failed scrape marks it stale): without it the pod would look emptier by
that part and take joins past its capacity. A pod whose every source is gone drops out."""


@dataclass(frozen=True)
class Readings:
    reports: Reports = field(default_factory=dict)
    news: News = field(default_factory=News)
    """Every replica's line, its own included."""

    def news_for(self, replica: str) -> News:
        """What `replica` needs of the others' lines: never its own."""
        lines: dict[tuple[str, str], dict[str, Line]] = {}
        for room, by_replica in self.news.lines.items():
            others = {name: line for name, line in by_replica.items() if name != replica}
            if others:
                lines[room] = others
        heard = {name: at for name, at in self.news.heard.items() if name != replica}
        return News(heard, lines)


class ReportSource(Protocol):
    async def read(self, session: aiohttp.ClientSession) -> Readings: ...


def parse_parts(result: list[Mapping[str, Any]]) -> Parts:
    """Pair each source's count with its sample time; NaN, negative or unpaired: dropped."""
    counts: dict[tuple[str, str, str, str], float] = {}
    times: dict[tuple[str, str, str, str], float] = {}
    for series in result:
        labels = series.get("metric", {})
        pod = (labels.get("namespace", ""), labels.get("room", ""), labels.get("pod", ""))
        value = float(series["value"][1])
        if not all(pod) or not math.isfinite(value) or value < 0:
            continue
        key = (*pod, labels.get("instance", ""))
        (times if labels.get("at") else counts)[key] = value
    return {
        key: Report(listeners=math.ceil(count), sampled_at=times[key])
        for key, count in counts.items()
        if key in times
    }


def parse_news(result: list[Mapping[str, Any]]) -> News:
    """The replicas' lines in one answer to QUERY. A line whose count or tenths are missing
    or not finite is dropped; a replica whose scrape time is missing is not heard from."""
    heard: dict[str, float] = {}
    counts: dict[tuple[str, str, str], int] = {}
    firsts: dict[tuple[str, str, str], dict[str, float]] = {}
    for series in result:
        labels = series.get("metric", {})
        replica = labels.get("replica", "")
        value = float(series["value"][1])
        if not replica or not math.isfinite(value):
            continue
        if labels.get("heard"):
            heard[replica] = value
            continue
        key = (labels.get("namespace", ""), labels.get("room", ""), replica)
        if not all(key):
            continue
        if labels.get("count"):
            counts[key] = int(value)
        elif "quantile" in labels:
            firsts.setdefault(key, {})[labels["quantile"]] = value
    lines: dict[tuple[str, str], dict[str, Line]] = {}
    wanted = [quantile_label(q) for q in LINE_QUANTILES]
    for key, count in counts.items():
        found = firsts.get(key, {})
        if count > 0 and all(q in found for q in wanted):
            line = Line(count, tuple(sorted(found[q] for q in wanted)))
            lines.setdefault(key[:2], {})[key[2]] = line
    return News(heard, lines)


def quantile_label(quantile: float) -> str:
    """How prometheus_client writes a quantile label ("0.0", "0.1", ..., "1.0")."""
    return repr(float(quantile))


def combine(parts: Parts) -> Reports:
    """A pod's count is the sum of its sources'; its time is the oldest part's, so the
    edge never takes the count for fresher than all of it is."""
    reports: Reports = {}
    for (namespace, room, pod, _), part in parts.items():
        key = (namespace, room, pod)
        known = reports.get(key)
        reports[key] = (
            part
            if known is None
            else Report(
                listeners=known.listeners + part.listeners,
                sampled_at=min(known.sampled_at, part.sampled_at),
            )
        )
    return reports


def parse_reports(result: list[Mapping[str, Any]]) -> Reports:
    """Every pod's count from one answer to QUERY."""
    return combine(parse_parts(result))


def carry_missing_parts(
    seen: Parts, previous: Mapping[tuple[str, str, str, str], tuple[Report, float]], now: float
) -> dict[tuple[str, str, str, str], tuple[Report, float]]:
    """The parts to count now, each with when it was last seen: those just read, and those
    gone for less than MISSING_PART_GRACE from pods that some source still reports."""
    kept = {key: (part, now) for key, part in seen.items()}
    reported = {key[:3] for key in seen}
    for key, (part, last_seen) in previous.items():
        if key not in kept and key[:3] in reported and now - last_seen < MISSING_PART_GRACE:
            kept[key] = (part, last_seen)
    return kept


class PrometheusReports:
    """Reads every relay's count from one Prometheus (the one the operator reads)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.parts: dict[tuple[str, str, str, str], tuple[Report, float]] = {}

    async def read(self, session: aiohttp.ClientSession) -> Readings:
        async with session.get(
            f"{self.url}/api/v1/query", params={"query": QUERY}, timeout=self.timeout
        ) as response:
            response.raise_for_status()
            body = await response.json()
        result = body["data"]["result"]
        self.parts = carry_missing_parts(parse_parts(result), self.parts, time.monotonic())
        reports = combine({key: part for key, (part, _) in self.parts.items()})
        return Readings(reports, parse_news(result))
