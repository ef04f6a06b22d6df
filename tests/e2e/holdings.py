"""Where each listener is, as the relays themselves say: every relay pod's `/listeners`
(who it holds, since when, and who left lately, by its own clock), sampled in the background.

Each listener's stay on a relay is a span, from the relay's welcome to its own record of the
listener leaving. The union over every relay shows whether one listener was held by two
relays at once, and for how long: a move is make-before-break (the listener leaves the old
relay once the new one has welcomed it), so only such a hand-over may overlap, briefly.
"""

from __future__ import annotations

import itertools
import json
import statistics
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sampling import Sampler

METRICS_PORT = 9090
SINCE_MARGIN = 5.0
"""Seconds of departures asked again on every sample: a slow answer loses nothing."""


@dataclass
class Span:
    listener: str
    pod: str
    start: float
    end: float | None
    """When the relay saw the listener go; None while it was still there when last asked."""
    seen: float
    """When the relay last said it held the listener (or its end)."""

    @property
    def until(self) -> float:
        """The end, or the last moment the relay is known to have held the listener (a relay
        that went away before saying when its listeners left)."""
        return self.end if self.end is not None else self.seen


@dataclass(frozen=True)
class Overlap:
    listener: str
    left: str
    joined: str
    at: float
    """When the later span began (the new relay's welcome)."""
    seconds: float


class Holdings(Sampler):
    """Samples `/listeners` of every relay pod `pods()` names (pod -> IP) every 0.5 s."""

    interval = 0.5

    def __init__(self, pods: Callable[[], dict[str, str]]) -> None:
        self.pods = pods
        self.spans: dict[tuple[str, str, float], Span] = {}
        self.asked: dict[str, float] = {}
        """Pod -> the relay's clock at its last answer."""
        self.rounds = 0
        self.doubles_at_samples = 0
        """Listeners that two relays both named in one round of samples."""
        self.failures = 0
        self.placed_on: dict[tuple[str, str, float], int] = {}
        """(listener, pod, welcomed) -> the map generation of the ticket it was welcomed
        with, as the relay says."""
        self.misplaced: Counter[str] = Counter()
        """Listeners the relays say were placed on them while they drained, by outcome (and
        `unjudged`), summed over every relay process, also those a pod of the same name
        replaced since (its counts start again from 0)."""
        self._counted: dict[str, dict[str, int]] = {}
        super().__init__()

    def sample(self) -> None:
        named: dict[str, str] = {}
        doubles = 0
        for pod, ip in self.pods().items():
            since = self.asked.get(pod, 0.0) - SINCE_MARGIN
            url = f"http://{ip}:{METRICS_PORT}/listeners?since={since}"
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    said: dict[str, Any] = json.loads(answer.read())
            except (OSError, ValueError):
                self.failures += 1
                continue
            at = float(said["at"])
            self.asked[pod] = at
            for listener, start, generation in said.get("generations", []):
                self.placed_on[(listener, pod, start)] = int(generation)
            if "placed_while_draining" in said:
                self._count_misplaced(pod, said["placed_while_draining"])
            for listener, start, end in said["left"]:
                span = self.spans.setdefault(
                    (listener, pod, start), Span(listener, pod, start, end, end)
                )
                span.end = span.seen = end
            for listener, start in said["listeners"].items():
                span = self.spans.setdefault(
                    (listener, pod, start), Span(listener, pod, start, None, at)
                )
                if span.end is None:
                    span.seen = at
                doubles += listener in named and named[listener] != pod
                named[listener] = pod
        self.rounds += 1
        self.doubles_at_samples += doubles

    def _count_misplaced(self, pod: str, counts: dict[str, int]) -> None:
        last = self._counted.get(pod, {})
        if any(counts.get(k, 0) < n for k, n in last.items()):
            last = {}  # a new relay process under that pod's name: its counts start at 0
        for outcome, count in counts.items():
            self.misplaced[outcome] += count - last.get(outcome, 0)
        self._counted[pod] = dict(counts)

    def by_listener(self) -> dict[str, list[Span]]:
        spans: dict[str, list[Span]] = {}
        for span in sorted(self.spans.values(), key=lambda s: s.start):
            spans.setdefault(span.listener, []).append(span)
        return spans

    def overlaps(self) -> list[Overlap]:
        """Every time two relays held one listener at once, and for how long."""
        found = []
        for listener, spans in self.by_listener().items():
            for i, earlier in enumerate(spans):
                for later in spans[i + 1 :]:
                    if later.pod == earlier.pod:
                        continue
                    seconds = min(earlier.until, later.until) - later.start
                    if seconds > 0:
                        found.append(
                            Overlap(listener, earlier.pod, later.pod, later.start, seconds)
                        )
        return found

    def moves(self) -> list[Overlap]:
        """Moves as the relays saw them: a listener welcomed by another relay while the one
        it leaves still held it (make-before-break); a rejoin after a lost connection, which
        begins only after the old relay let it go, is not one."""
        found = []
        for listener, spans in self.by_listener().items():
            for earlier, later in itertools.pairwise(spans):
                if later.pod != earlier.pod and later.start < earlier.until:
                    found.append(
                        Overlap(
                            listener, earlier.pod, later.pod, later.start,
                            earlier.until - later.start,
                        )
                    )  # fmt: skip
        return found

    def held_by(self, pod: str, at: float) -> int:
        return sum(1 for s in self.spans.values() if s.pod == pod and s.start <= at < s.until)

    def listeners(self) -> set[str]:
        return {span.listener for span in self.spans.values()}


def overlap_figures(overlaps: list[Overlap]) -> dict[str, float]:
    seconds = sorted(o.seconds for o in overlaps) or [0.0]
    return {
        "count": len(overlaps),
        "p50_s": round(statistics.median(seconds), 4),
        "max_s": round(seconds[-1], 4),
    }


class RelayPods:
    """The room's relay pods that have an IP (those being deleted too: they hold listeners
    until they stop), each added to Prometheus as a target the first time it is seen, as a
    PodMonitor would."""

    def __init__(self, core: Any, namespace: str, room: str, prometheus: Any) -> None:
        self.core, self.namespace, self.room, self.prometheus = core, namespace, room, prometheus
        self.scraped: set[str] = set()
        self.last: dict[str, str] = {}

    def __call__(self) -> dict[str, str]:
        try:
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"townsquare.dev/room={self.room}"
            ).items
        except Exception:
            return self.last
        found = {p.metadata.name: p.status.pod_ip for p in pods if p.status.pod_ip}
        for ip in found.values():
            if ip not in self.scraped:
                self.scraped.add(ip)
                self.prometheus.add_target(f"{ip}:{METRICS_PORT}", {"source": "relay"})
        self.last = found
        return found
