"""The relays' own listener counts, as the edge sees them.

Today they come from Prometheus: one batched instant query per refresh for every relay of
every room (the metric contract's `audioroom_relay_listeners`, with the time of each
sample). It is one implementation of `ReportSource`; relays that push their counts, or an
edge that scrapes the relays it knows directly, would be another, with nothing else changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import aiohttp

from townsquare.edge.admission import Report

Reports = dict[tuple[str, str, str], Report]
"""(namespace, room, pod) -> the relay's last count."""

LISTENERS = "audioroom_relay_listeners"
QUERY = (
    f"sum by (namespace, room, pod) ({LISTENERS}) or "
    f'label_replace(min by (namespace, room, pod) (timestamp({LISTENERS})), "at", "1", "", "")'
)
"""Counts and their sample times in one vector, told apart by the `at` label.

One pod may be reported by more than one source: the relay process counts the listeners
connected to it, and a load generator counts the simulated ones it places there. Those
add up (a `max` would hide the smaller part and let the edge overfill the relay); a pod
reported by one source alone is that source's count. The time is the oldest part's, so
the edge never takes a count for fresher than all of it is."""


class ReportSource(Protocol):
    async def read(self, session: aiohttp.ClientSession) -> Reports: ...


def parse_reports(result: list[Mapping[str, Any]]) -> Reports:
    """Pair each relay's count with its sample time; NaN, negative or unpaired: dropped."""
    counts: dict[tuple[str, str, str], float] = {}
    times: dict[tuple[str, str, str], float] = {}
    for series in result:
        labels = series.get("metric", {})
        key = (labels.get("namespace", ""), labels.get("room", ""), labels.get("pod", ""))
        value = float(series["value"][1])
        if not all(key) or not math.isfinite(value) or value < 0:
            continue
        (times if labels.get("at") else counts)[key] = value
    return {
        key: Report(listeners=math.ceil(count), sampled_at=times[key])
        for key, count in counts.items()
        if key in times
    }


class PrometheusReports:
    """Reads every relay's count from one Prometheus (the one the operator reads)."""

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def read(self, session: aiohttp.ClientSession) -> Reports:
        async with session.get(
            f"{self.url}/api/v1/query", params={"query": QUERY}, timeout=self.timeout
        ) as response:
            response.raise_for_status()
            body = await response.json()
        return parse_reports(body["data"]["result"])
