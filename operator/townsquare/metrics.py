"""Listener counts from Prometheus: one batched query per tick for every room.

The PromQL builders are pure; `PrometheusSource` does the blocking I/O (call it from a
worker thread, never from kopf's event loop). Label values inserted into a query are
escaped, so a room's name or namespace can never change the query's meaning.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from townsquare.api.models import MetricsSpec

RoomKey = tuple[str, str]
"""(namespace, room)"""

CONTRACT_QUERY = "audioroom_relay_listeners"
"""Per relay pod, labels namespace, room, pod: the metric contract."""
LIVEKIT_QUERY = (
    'label_replace(sum by (namespace, pod) (livekit_participant_total), "room", "$1", "pod", '
    '"(.+)-relay-[0-9]+")'
)
"""LiveKit nodes as relays: participants by pod, the room taken from the pod's name."""
PRESETS = {"contract": CONTRACT_QUERY, "livekit": LIVEKIT_QUERY}


def escape_label_value(value: str) -> str:
    """A PromQL string literal's body: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def room_query(metrics: MetricsSpec, namespace: str, room: str) -> str:
    """The query for one room with a custom template; `$namespace`/`$room` become literals."""
    template = metrics.listeners_query
    values = {"namespace": namespace, "room": room}
    return re.sub(
        r"\$(namespace|room)\b",
        lambda match: escape_label_value(values[match.group(1)]),
        template,
    )


def batched_query(preset: str) -> str:
    """One query for every room of a preset, grouped by namespace, room and pod."""
    return f"sum by (namespace, room, pod) ({PRESETS[preset]})"


@dataclass(frozen=True)
class RoomListeners:
    """Listeners of one room at one instant, per relay pod."""

    by_pod: Mapping[str, int]
    newest_sample: float
    """Unix time of the newest sample behind these figures."""

    @property
    def total(self) -> int:
        return sum(self.by_pod.values())


@dataclass
class Reading:
    """One tick's result: listeners per room, or why there are none."""

    rooms: dict[RoomKey, RoomListeners] = field(default_factory=dict)
    error: str | None = None


def parse_vector(
    result: Iterable[Mapping[str, Any]], sample_times: Mapping[tuple[str, str, str], float]
) -> dict[RoomKey, RoomListeners]:
    """Group an instant vector by room; NaN and negative values count as missing."""
    pods: dict[RoomKey, dict[str, int]] = defaultdict(dict)
    newest: dict[RoomKey, float] = {}
    for series in result:
        labels = series.get("metric", {})
        namespace, room, pod = labels.get("namespace"), labels.get("room"), labels.get("pod", "")
        if not namespace or not room:
            continue
        value = float(series["value"][1])
        if math.isnan(value) or value < 0:
            continue
        key = (namespace, room)
        pods[key][pod] = round(value)
        stamp = sample_times.get((namespace, room, pod), float(series["value"][0]))
        newest[key] = max(newest.get(key, 0.0), stamp)
    return {
        key: RoomListeners(by_pod=dict(p), newest_sample=newest[key]) for key, p in pods.items()
    }


def _sample_times(result: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str], float]:
    times: dict[tuple[str, str, str], float] = {}
    for series in result:
        labels = series.get("metric", {})
        key = (labels.get("namespace", ""), labels.get("room", ""), labels.get("pod", ""))
        times[key] = float(series["value"][1])
    return times


class PrometheusSource:
    """Reads listener counts for all rooms of one Prometheus. Blocking."""

    def __init__(self, url: str, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        # One quick retry at most: a tick that fails is simply a tick without data.
        self._client = PrometheusConnect(
            url=url,
            retry=Retry(total=1, backoff_factor=0.1),
            timeout=math.ceil(timeout_seconds),
        )

    def _query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._client.custom_query(
            promql, params={"timeout": f"{self.timeout_seconds}s"}
        )
        return result

    def read(self, preset: str) -> Reading:
        """Every room's listeners under one preset, with the newest sample time per room."""
        query = batched_query(preset)
        try:
            values = self._query(query)
            stamps = self._query(f"max by (namespace, room, pod) (timestamp({PRESETS[preset]}))")
        except Exception as exc:  # any transport or server failure means "no data"
            return Reading(error=f"{type(exc).__name__}: {exc}"[:300])
        return Reading(rooms=parse_vector(values, _sample_times(stamps)))

    def read_room(self, metrics: MetricsSpec, namespace: str, room: str) -> Reading:
        """One room with its own query template (cannot be batched with the others)."""
        query = f"sum by (namespace, room, pod) ({room_query(metrics, namespace, room)})"
        try:
            values = self._query(query)
        except Exception as exc:
            return Reading(error=f"{type(exc).__name__}: {exc}"[:300])
        relabelled = [
            {**series, "metric": {**series.get("metric", {}), "namespace": namespace, "room": room}}
            for series in values
        ]
        return Reading(rooms=parse_vector(relabelled, {}))
