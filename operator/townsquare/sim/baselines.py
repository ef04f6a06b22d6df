"""What users would run instead: HPA v2, KEDA (cron + Prometheus) and a perfect oracle.

Faithful to the documented defaults (facts.md): 15 s sync, 10% tolerance, scale-up by at
most max(100%, 4 pods) per 15 s, 300 s scale-down stabilization, and
desired = ceil(current x metric / target). KEDA feeds the same HPA with two metrics and the
HPA takes the larger proposal.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from townsquare.api.models import AudioRoomSpec
from townsquare.planning import plan_room

Metric = tuple[float, float]
"""(value summed over the pods, target average value per pod)."""


class Hpa:
    """The Kubernetes HorizontalPodAutoscaler's replica calculation, default behaviour."""

    def __init__(
        self,
        *,
        min_replicas: int,
        max_replicas: int,
        tolerance: float = 0.1,
        scale_down_window: float = 300,
        scale_up_percent: float = 100,
        scale_up_pods: int = 4,
    ) -> None:
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.tolerance = tolerance
        self.window = scale_down_window
        self.up_percent = scale_up_percent
        self.up_pods = scale_up_pods
        self.recommendations: deque[tuple[float, int]] = deque()

    def proposal(self, current: int, metric: Metric) -> int:
        """One metric's replicas: ceil(current x ratio), unless within the tolerance."""
        value, target = metric
        ratio = value / (target * current)
        if abs(1.0 - ratio) <= self.tolerance:
            return current
        return math.ceil(ratio * current)

    def recommend(self, now: float, current: int, metrics: Sequence[Metric]) -> int:
        """Replicas after one sync at `now`, with stabilization and rate limits applied."""
        desired = max(self.proposal(current, m) for m in metrics)
        desired = min(self.max_replicas, max(self.min_replicas, desired))
        self.recommendations.append((now, desired))
        while now - self.recommendations[0][0] >= self.window:
            self.recommendations.popleft()
        replicas = max(current, desired)  # scale-up stabilization window is 0
        replicas = min(replicas, max(n for _, n in self.recommendations))
        up_limit = max(math.ceil(current * (1 + self.up_percent / 100)), current + self.up_pods)
        replicas = min(replicas, up_limit)
        return min(self.max_replicas, max(self.min_replicas, replicas))


def listeners_threshold(spec: AudioRoomSpec) -> float:
    """Listeners per relay a threshold autoscaler targets: the room's own utilization."""
    return spec.relay.listeners_per_relay * spec.scaling.target_utilization


def reactive_metrics(spec: AudioRoomSpec, listeners: float) -> list[Metric]:
    """HPA v2 on the listeners metric (an AverageValue target)."""
    return [(listeners, listeners_threshold(spec))]


@dataclass(frozen=True)
class CronWindow:
    """The KEDA cron trigger a user would configure for the event: the plan's relays from
    `prewarmAt` (when townsquare would begin pre-warming) to the end of the event."""

    begins: float
    """Seconds after the start (negative: before it)."""
    ends: float
    relays: int


def cron_window(spec: AudioRoomSpec) -> CronWindow:
    """The window and size a user copies from `townsquare plan` into a KEDA cron trigger."""
    plan = plan_room(spec, spec.start_time - timedelta(days=1))
    begins = (plan.prewarm_at - spec.start_time).total_seconds()
    relays = max(spec.scaling.min_relays, plan.relays)
    return CronWindow(begins, spec.duration.total_seconds(), relays)


def keda_metrics(cron: CronWindow, spec: AudioRoomSpec, t: float, listeners: float) -> list[Metric]:
    """KEDA: the cron trigger plus a Prometheus trigger; the HPA takes the larger proposal.

    The cron scaler reports its desired replicas against a target of 1 while active and 0
    outside its window; `t` is seconds after the start. With `ignoreNullValues` (KEDA's
    default) a Prometheus query that returns nothing counts as 0 listeners.
    """
    active = cron.begins <= t < cron.ends
    return [(float(cron.relays) if active else 0.0, 1.0), (listeners, listeners_threshold(spec))]


def oracle_relays(listeners: float, spec: AudioRoomSpec, *, cap: bool = False) -> int:
    """Perfect foresight at the room's headroom: max(minRelays, ceil(demand / per relay)).

    The oracle is the physical limit, so it is not held to maxRelays unless `cap` asks.
    """
    needed = math.ceil(listeners / listeners_threshold(spec) - 1e-9) if listeners > 0 else 0
    relays = max(spec.scaling.min_relays, needed)
    return min(relays, spec.scaling.max_relays) if cap else relays
