"""Relay pod template changes reach running relays a few at a time, drained first (pure).

The StatefulSet replaces no pod by itself (`OnDelete`). Each pass, `plan_rollout` marks a
few outdated relays draining (the shard map then sends no joins to them and moves their
listeners within the migration budget), and names those that have emptied (or whose drain
timed out): the operator deletes exactly those pods, and the StatefulSet brings them back
with the new template. Two limits hold throughout:

- at most `maxSurge` relays are out of service for the rollout at once (draining, or
  deleted and not Ready again);
- the relays left accepting joins always carry the demand (at 90% of their capacity, for
  the unevenness of hashing): a relay is drained only when the others can take its
  listeners. Without a fresh listener count,
  nothing new is drained (never blind).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RolloutStep:
    """What this pass does to the rollout."""

    draining: tuple[tuple[int, datetime], ...]
    """Relays drained for the rollout (accepting no joins), with when each began."""
    replace: tuple[int, ...]
    """Relays to delete now, so they come back with the new template."""
    timed_out: tuple[int, ...]
    """Relays among `replace` still carrying listeners when their drain timed out."""
    started: tuple[int, ...]
    """Relays whose rollout drain began in this pass."""
    held_by_capacity: bool
    """Outdated relays wait: the others could not carry the demand without them."""


ROLLOUT_FILL = 0.9
"""The fullest the relays left serving may be, on average, while others drain: listeners
hash unevenly over relays, so at 100% some relay would be full and joins would queue."""


def relays_for_demand(demand: float, capacity: int) -> int:
    """The fewest relays that may keep accepting joins: the demand at ROLLOUT_FILL each."""
    return math.ceil(demand / (capacity * ROLLOUT_FILL) - 1e-9) if demand > 0 else 0


def plan_rollout(
    *,
    accepting: int,
    ready: frozenset[int],
    outdated: frozenset[int],
    draining: Mapping[int, datetime],
    relay_listeners: Mapping[int, int] | None,
    sampled_at: datetime | None,
    demand: float | None,
    capacity: int,
    max_surge: int,
    now: datetime,
    drain_timeout: timedelta,
) -> RolloutStep:
    """The next step of the rollout over relays 0..accepting-1.

    `outdated` relays run an older template; `draining` is what the previous step returned;
    `relay_listeners` per relay as sampled at `sampled_at` (None: unknown); `demand` is all
    listeners wanting a relay (None: unknown). Relays at or above `accepting` are leaving
    anyway (scale-down) and are not replaced.
    """
    still = {o: since for o, since in draining.items() if o in outdated and o < accepting}
    empty = {
        o
        for o, since in still.items()
        if relay_listeners is not None
        and sampled_at is not None
        and sampled_at > since
        and relay_listeners.get(o, 0) <= 0
    }
    expired = {o for o, since in still.items() if now - since >= drain_timeout}
    replace = sorted(empty | expired)
    for ordinal in replace:
        still.pop(ordinal)
    starting = sum(1 for o in range(accepting) if o not in ready)
    in_flight = len(still) + len(replace) + starting
    candidates = sorted(
        (
            o
            for o in outdated
            if o < accepting and o in ready and o not in still and o not in replace
        ),
        key=lambda o: ((relay_listeners or {}).get(o, 0), o),
    )
    serving = sum(1 for o in range(accepting) if o in ready and o not in still and o not in replace)
    spare = 0 if demand is None else serving - relays_for_demand(demand, capacity)
    slots = max(0, min(max_surge - in_flight, spare))
    started = candidates[:slots]
    for ordinal in started:
        still[ordinal] = now
    return RolloutStep(
        draining=tuple(sorted(still.items())),
        replace=tuple(replace),
        timed_out=tuple(sorted(expired - empty)),
        started=tuple(started),
        held_by_capacity=bool(candidates) and spare <= 0 and max_surge > in_flight,
    )
