"""Whether an admit ticket placed a listener on this relay while it drained (pure).

A relay and the edge read the shard map at different moments, so a relay refuses, as
"draining", listeners that an edge placed on it from the map before: that is the map on its
way, and they ask again. A ticket issued on a map in which the relay already drained is
something else: the edge broke its rule. The ticket names the generation it was issued on,
and each map says since which generation each relay has been in its state (`ShardMap.since`),
so the relay can tell the two apart by itself, whatever maps it missed in between.

A ticket from a newer map than the relay has read cannot be judged yet: the relay keeps it
until a map that covers it arrives (its listener may have been welcomed meanwhile, if the
relay did not yet know it drained: that is counted too, as seated).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from townsquare.sharding import ShardMap

KEPT_SPANS = 64
"""States per generation span a relay remembers (a span per change of its state)."""
KEPT_PENDING = 4096
"""Tickets from maps newer than the relay's it keeps to judge later (the oldest go first)."""


@dataclass
class DrainLedger:
    """This relay's states by map generation, and its count of misplaced listeners."""

    ordinal: int | None
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    """(first generation, last generation, state), oldest first, as the maps read said."""
    pending: list[tuple[int, str]] = field(default_factory=list)
    """(ticket generation, what the relay did: refused or seated) not judged yet."""
    misplaced: Counter[str] = field(default_factory=Counter)
    """Listeners placed here on a map in which this relay drained, by what it did."""
    unjudged: int = 0
    """Tickets no map read covered (a generation between two spans): never judged."""

    def read(self, shard_map: ShardMap) -> None:
        """A map this relay read: what it says of the generations up to its own."""
        if self.ordinal is None:
            return
        state = shard_map.relays.get(self.ordinal)
        first = shard_map.since.get(self.ordinal)
        if state is None or first is None:
            return
        last = shard_map.generation
        spans = self.spans
        while spans and spans[-1][0] >= first:
            spans.pop()  # the newer map says more of the same generations
        if spans and spans[-1][2] == state and spans[-1][1] >= first - 1:
            first = spans.pop()[0]
        spans.append((first, last, state))
        del spans[:-KEPT_SPANS]
        still: list[tuple[int, str]] = []
        for generation, outcome in self.pending:
            if generation > last:
                still.append((generation, outcome))
            else:
                self._settle(generation, outcome)
        self.pending = still

    def state_at(self, generation: int) -> str | None:
        """The relay's state in that generation of the map, if a map read says."""
        for first, last, state in reversed(self.spans):
            if first <= generation <= last:
                return state
            if last < generation:
                return None
        return None

    def on_map_of_draining(self, generation: int) -> bool:
        """The ticket was issued on a map in which this relay drained: the edge's fault."""
        return self.state_at(generation) == "draining"

    def judge_later(self, generation: int, outcome: str) -> None:
        """A ticket from a map newer than any read here: judged when one covers it."""
        if self.spans and generation <= self.spans[-1][1]:
            self._settle(generation, outcome)
            return
        self.pending.append((generation, outcome))
        del self.pending[:-KEPT_PENDING]

    def _settle(self, generation: int, outcome: str) -> None:
        state = self.state_at(generation)
        if state is None:
            self.unjudged += 1
        elif state == "draining":
            self.misplaced[outcome] += 1
