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
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from townsquare.api.models import MetricsSpec
from townsquare.api.names import relay_set_name
from townsquare.lifecycle import Metrics

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


WAITING_QUERY = "sum by (namespace, room) (audioroom_edge_waiting_listeners)"
"""Joins the edge holds in the admission queue, per room (optional in the contract)."""


def _tagged(query: str, tag: str) -> str:
    return f'label_replace({query}, "series", "{tag}", "", "")'


def batched_query(preset: str, queries: Mapping[str, str] = PRESETS) -> str:
    """One query for every room of a preset: listeners and sample times by pod, waiting by room.

    The three parts come back in one vector, told apart by the `series` label. `queries`
    are the named queries rooms may pick: the built-in presets and the platform team's.
    """
    listeners = queries[preset]
    return " or ".join(
        [
            _tagged(f"sum by (namespace, room, pod) ({listeners})", "listeners"),
            _tagged(f"max by (namespace, room, pod) (timestamp({listeners}))", "sampled"),
            _tagged(WAITING_QUERY, "waiting"),
        ]
    )


@dataclass(frozen=True)
class RoomListeners:
    """Listeners of one room at one instant, per relay pod."""

    by_pod: Mapping[str, int]
    oldest_sample: float
    """Unix time of the oldest of the pods' newest samples: how fresh all the figures are."""
    waiting: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_pod.values())


@dataclass
class Reading:
    """One tick's result: listeners per room, or why there are none."""

    rooms: dict[RoomKey, RoomListeners] = field(default_factory=dict)
    error: str | None = None


def parse_vector(result: Iterable[Mapping[str, Any]]) -> dict[RoomKey, RoomListeners]:
    """Group the batched answer by room; NaN and negative values count as missing."""
    pods: dict[RoomKey, dict[str, int]] = defaultdict(dict)
    oldest: dict[RoomKey, float] = {}
    evaluated: dict[RoomKey, float] = {}
    waiting: dict[RoomKey, int] = {}
    for series in result:
        labels = series.get("metric", {})
        namespace, room = labels.get("namespace"), labels.get("room")
        value = float(series["value"][1])
        if not namespace or not room or not math.isfinite(value) or value < 0:
            continue
        key = (namespace, room)
        kind = labels.get("series", "listeners")
        if kind == "waiting":
            waiting[key] = round(value)
        elif kind == "sampled":  # the oldest pod decides: one fresh pod hides no stale one
            oldest[key] = min(oldest.get(key, math.inf), value)
        else:
            pods[key][labels.get("pod", "")] = round(value)
        evaluated.setdefault(key, float(series["value"][0]))
    # A room with waiting joins but no relay series yet is kept: it may need its first relay.
    return {
        key: RoomListeners(
            by_pod=dict(pods.get(key, {})),
            oldest_sample=oldest.get(key, evaluated[key]),
            waiting=waiting.get(key, 0),
        )
        for key in pods.keys() | waiting.keys()
    }


class PrometheusSource:
    """Reads listener counts for all rooms of one Prometheus. Blocking."""

    def __init__(self, url: str, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        # One quick retry of a refused connection at most, none of a slow answer: a tick
        # that fails is simply a tick without data, and never lasts much past the timeout.
        self._client = PrometheusConnect(
            url=url,
            retry=Retry(total=1, connect=1, read=0, status=0, backoff_factor=0.1),
            timeout=timeout_seconds,
        )

    def _query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._client.custom_query(
            promql, params={"timeout": f"{math.ceil(self.timeout_seconds)}s"}
        )
        return result

    def read(self, preset: str, queries: Mapping[str, str] = PRESETS) -> Reading:
        """Every room's listeners under one preset: one request to Prometheus."""
        try:
            return Reading(rooms=parse_vector(self._query(batched_query(preset, queries))))
        except Exception as exc:  # any transport or server failure means "no data"
            return Reading(error=self._describe(exc))

    def read_room(self, metrics: MetricsSpec, namespace: str, room: str) -> Reading:
        """One room with its own query template (cannot be batched with the others)."""
        query = _tagged(f"sum by (pod) ({room_query(metrics, namespace, room)})", "listeners")
        try:
            values = self._query(query)
            relabelled = [
                {
                    **series,
                    "metric": {**series.get("metric", {}), "namespace": namespace, "room": room},
                }
                for series in values
            ]
            return Reading(rooms=parse_vector(relabelled))
        except Exception as exc:  # a tenant's query must never stop the other rooms' reads
            return Reading(error=self._describe(exc))

    def _describe(self, error: Exception) -> str:
        """One short line for the condition and the Event: what failed, not a traceback."""
        if isinstance(error, requests.Timeout) or "timed out" in str(error).lower():
            return f"Prometheus at {self.url} did not answer within {self.timeout_seconds:g}s"
        if isinstance(error, requests.ConnectionError):
            return f"Prometheus at {self.url} unreachable ({type(error).__name__})"
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"Prometheus at {self.url} failed: {text}"[:300]


def room_metrics(reading: Reading, key: RoomKey, now: datetime, max_age: timedelta) -> Metrics:
    """What one room's scaling sees of a reading: listeners by relay, or why there are none."""
    if reading.error is not None:
        return Metrics(listeners=None, problem=reading.error)
    found = reading.rooms.get(key)
    if found is None:
        return Metrics(listeners=None, problem="no listener series for this room")
    sampled_at = datetime.fromtimestamp(found.oldest_sample, tz=UTC)
    if not found.by_pod:
        return Metrics(
            listeners=None,
            waiting=found.waiting,
            sampled_at=sampled_at,
            problem="no listener series for this room",
        )
    age = now - sampled_at
    if age > max_age:
        return Metrics(
            listeners=None,
            problem=f"listener samples are up to {int(age.total_seconds())}s old",
        )
    pattern = re.compile(rf"^{re.escape(relay_set_name(key[1]))}-([0-9]+)$")
    by_relay: dict[int, int] = {}
    for pod, count in found.by_pod.items():
        match = pattern.match(pod)
        if match:
            by_relay[int(match.group(1))] = count
    return Metrics(
        listeners=found.total,
        waiting=found.waiting,
        by_relay=by_relay,
        sampled_at=sampled_at,
    )


def covering(
    metrics: Metrics,
    ready_since: Mapping[int, datetime],
    now: datetime,
    grace: timedelta,
) -> Metrics:
    """A reading that misses a relay Ready for longer than `grace` is partial: the missing
    relay's listeners are unknown, not zero, so the room gets no figure at all and holds
    its size rather than scale down on a sum that leaves relays out. Relays Ready for less
    than `grace` may not have been scraped yet."""
    if metrics.listeners is None:
        return metrics
    expected = {ordinal for ordinal, since in ready_since.items() if now - since > grace}
    missing = sorted(expected - set(metrics.by_relay))
    if not missing:
        return metrics
    shown = ", ".join(str(ordinal) for ordinal in missing[:10])
    more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    return Metrics(
        listeners=None,
        waiting=metrics.waiting,
        problem=f"Prometheus has no listener series for ready relays {shown}{more} "
        f"({len(missing)} of {len(expected)}): a partial reading",
    )


def aged(metrics: Metrics, now: datetime, max_age: timedelta) -> Metrics:
    """A reading as it stands at `now`: figures older than `max_age` count as missing, so a
    poller that stopped updating can never leave a room deciding on frozen numbers."""
    if metrics.listeners is None or metrics.sampled_at is None:
        return metrics
    age = now - metrics.sampled_at
    if age <= max_age:
        return metrics
    return Metrics(listeners=None, problem=f"no listener reading for {int(age.total_seconds())}s")


@dataclass(frozen=True)
class Source:
    """Which Prometheus serves a room, or why none may."""

    url: str | None
    refusal: str = ""


def choose_prometheus(room_url: str | None, default: str | None, allowed: Iterable[str]) -> Source:
    """The operator's Prometheus, or the room's own if the operator allows that URL.

    A room's author must not make the operator send requests anywhere it can reach, so a
    URL the operator was not told to trust is refused (and the room is told why), never
    silently replaced by the default.
    """
    if room_url is None or room_url == default:
        return Source(default)
    if room_url in set(allowed):
        return Source(room_url)
    return Source(
        None,
        f"spec.metrics.prometheusUrl {room_url} is not allowed by the operator "
        "(townsquare run --allow-prometheus-url)",
    )
