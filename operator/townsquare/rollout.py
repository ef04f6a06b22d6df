"""Relay pod template changes reach running relays a few at a time, drained first (pure).

The StatefulSet replaces no pod by itself (`OnDelete`). Each pass, `plan_rollout` marks a
few outdated relays draining (the shard map then sends no joins to them and moves their
listeners within the migration budget), and names those that have emptied (or whose drain
timed out): the operator deletes exactly those pods, and the StatefulSet brings them back
with the new template. Three limits hold throughout:

- the relays left accepting joins always carry the demand (at 90% of their capacity, for
  the unevenness of hashing): a relay is drained only when the others can take its
  listeners. Without a fresh listener count, nothing new is drained (never blind);
- when the room has no such slack, the rollout first adds up to `maxSurge` extra relays
  (new ones come with the new template), never beyond `maxRelays`, and drains them again,
  like any scale-down, once no outdated relay is left;
- at most `maxSurge` relays are in flight at once: draining for the rollout, deleted and
  not Ready again, or added and not Ready yet. An outdated relay that is not Ready is out
  of service already (crash-looping, or a bad template rolled out and then reverted): it
  is replaced at once when no listener is counted on it, and drained otherwise, without
  waiting for a slot, so such relays never hold a rollout (or its rollback) for ever.

A drained relay is replaced once a sample taken after its drain began counts 0 listeners on
it; a relay without a count is not taken for empty: only the drain timeout replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from townsquare.scaling import DRAIN_SETTLE


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
    """Outdated relays wait: the others could not carry the demand without them, and no
    extra relay may be added (maxRelays)."""
    surge: tuple[int, ...] = ()
    """Extra relays the rollout holds above the accepting ones, accepting joins too: the
    ordinals from `accepting` up. Empty once the rollout is over: they then drain."""


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
    max_relays: int,
    surge: int = 0,
) -> RolloutStep:
    """The next step of the rollout over relays 0..accepting-1.

    `outdated` relays run an older template; `draining` is what the previous step returned;
    `relay_listeners` per relay as sampled at `sampled_at` (None: unknown); `demand` is all
    listeners wanting a relay (None: unknown). Relays at or above `accepting` are leaving
    anyway (scale-down) and are not replaced. `surge` is how many extra relays above
    `accepting` the previous step held (see `RolloutStep.surge`); `max_relays` caps them.
    """
    still = {o: since for o, since in draining.items() if o in outdated and o < accepting}

    def count(ordinal: int) -> int | None:
        """The relay's listeners by the sample, None when unknown (no sample, no series)."""
        if relay_listeners is None or sampled_at is None:
            return None
        return relay_listeners.get(ordinal)

    def known_empty(ordinal: int) -> bool:
        listeners = count(ordinal)
        return listeners is not None and listeners <= 0

    empty = {
        o
        for o, since in still.items()
        if sampled_at is not None and sampled_at > since + DRAIN_SETTLE and known_empty(o)
    }
    expired = {o for o, since in still.items() if now - since >= drain_timeout}
    # An outdated relay that is not Ready takes no joins (crash-looping, or a bad template
    # rolled out and then reverted): waiting for it to be Ready would hold the rollout and
    # its slots for ever. When a fresh sample gives it no listeners it carries nobody (the
    # shard map has already moved its shards, as for any relay gone), so it is replaced at
    # once; still reporting listeners (a readiness blip), or with no sample at all, it
    # drains like the others, without waiting for a slot: it is out of service anyway.
    stuck = sorted(o for o in outdated if o < accepting and o not in ready and o not in still)
    sampled = relay_listeners is not None and sampled_at is not None
    broken = {o for o in stuck if sampled and (relay_listeners or {}).get(o, 0) <= 0}
    replace = sorted(empty | expired | broken)
    for ordinal in replace:
        still.pop(ordinal, None)
    blipped = tuple(o for o in stuck if o not in broken)
    for ordinal in blipped:
        still[ordinal] = now
    candidates = sorted(
        (
            o
            for o in outdated
            if o < accepting and o in ready and o not in still and o not in replace
        ),
        key=lambda o: (count(o) or 0, o),
    )
    # Extra relays stay until every relay they stood in for is back Ready.
    back = ready.issuperset(range(accepting))
    unfinished = bool(candidates or still or replace) or (surge > 0 and not back)
    need = None if demand is None else relays_for_demand(demand, capacity)
    extra = _surge(accepting, surge, need, max_surge, max_relays, unfinished)
    serving_range = range(accepting + extra)
    out = set(still) | set(replace) | {o for o in serving_range if o not in ready}
    in_flight = len(out)
    serving = sum(1 for o in serving_range if o not in out)
    spare = 0 if need is None else serving - need
    slots = max(0, min(max_surge - in_flight, spare))
    started = candidates[:slots]
    for ordinal in started:
        still[ordinal] = now
    return RolloutStep(
        draining=tuple(sorted(still.items())),
        replace=tuple(replace),
        timed_out=tuple(sorted(expired - empty)),
        started=(*blipped, *started),
        held_by_capacity=bool(candidates) and spare <= 0 and max_surge > in_flight,
        surge=tuple(range(accepting, accepting + extra)),
    )


def _surge(
    accepting: int,
    held: int,
    need: int | None,
    max_surge: int,
    max_relays: int,
    unfinished: bool,
) -> int:
    """Extra relays for the rollout: enough that `max_surge` relays may be out while the rest
    carry the demand, kept until the rollout ends (a dip in demand does not churn them), and
    held as they are while the demand is unknown."""
    if not unfinished:
        return 0
    room = max(0, min(max_surge, max_relays - accepting))
    if need is None:
        return min(held, room)
    wanted = need + max_surge - accepting
    return max(0, min(room, max(held, wanted)))
