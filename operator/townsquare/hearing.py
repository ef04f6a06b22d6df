"""What real listeners heard, set beside what the operator did then (pure).

A listener notices a gap in its audio, not a shard map. To say whether a reshard, a drain
or a scale-up interrupted anyone, each gap a real listener measured is placed beside the
operator's Events that came shortly before it began (or just after: an Event is posted
once the change it announces is written, and relays may act on the map a moment sooner).

A gap is measured where the listener runs, so the listener's own process not running (a
busy machine) shows as a gap too, with no frame lost: the frames wait in its socket. The
load generator measures those stalls of its own; `beyond_stall` is the part of a gap they
do not explain, which is what the relays and the operator's changes cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = {
    "ScaledUp": "scale-up",
    "Resharded": "reshard",
    "ScaledDown": "drain",
    "DrainTimedOut": "drain",
    "Draining": "drain",
}
"""Event reasons that move listeners, by the kind of change a report names."""
BEFORE_SECONDS = 5.0
"""A gap belongs to an Event posted up to this long before it began: relays read the map
every second and send listeners on within the migration budget, and a listener's check
with the edge takes a moment. (15 s marked nearly every gap of make demo, whose Events
come seconds apart, as near all three kinds.)"""
AFTER_SECONDS = 2.0
"""...or this long after (the Event follows the write that relays may already act on)."""


@dataclass(frozen=True)
class Gap:
    """One stretch without frames, as a real listener measured it (Unix seconds)."""

    listener: str
    at: float
    seconds: float
    cause: str
    lost: int
    stalled: float = 0.0
    """Seconds of the gap in which the listener's own process did not run."""

    @property
    def beyond_stall(self) -> float:
        return max(0.0, self.seconds - self.stalled)

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Gap:
        return cls(
            listener=str(record["listener"]),
            at=float(record["at"]),
            seconds=float(record["seconds"]),
            cause=str(record["cause"]),
            lost=int(record["lost"]),
            stalled=float(record.get("stalled", 0.0)),
        )


@dataclass(frozen=True)
class PlacedGap:
    gap: Gap
    near: tuple[str, ...]
    """Kinds of change (scale-up, reshard, drain) whose Event came just before the gap."""


def place_gaps(gaps: Iterable[Gap], events: Sequence[tuple[float, str]]) -> list[PlacedGap]:
    """Each gap with the kinds of change announced around it; `events` are (time, reason)."""
    placed = []
    for gap in gaps:
        near = {
            KINDS[reason]
            for at, reason in events
            if reason in KINDS and at - AFTER_SECONDS <= gap.at <= at + BEFORE_SECONDS
        }
        placed.append(PlacedGap(gap, tuple(sorted(near))))
    return placed


def longest_near(placed: Iterable[PlacedGap]) -> dict[str, float]:
    """The longest gap near each kind of change beyond the listener's own stalls, in seconds
    (0 when none came near)."""
    longest = dict.fromkeys(sorted(set(KINDS.values())), 0.0)
    for item in placed:
        for kind in item.near:
            longest[kind] = max(longest[kind], item.gap.beyond_stall)
    return longest


def lost_near(placed: Iterable[PlacedGap]) -> dict[str, int]:
    """Frames lost in the gaps near each kind of change."""
    lost = dict.fromkeys(sorted(set(KINDS.values())), 0)
    for item in placed:
        for kind in item.near:
            lost[kind] += item.gap.lost
    return lost
