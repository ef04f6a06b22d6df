"""The edge and the relays in miniature: who is connected, who waits, and where.

The same rules as the data plane (`townsquare.edge.admission`, `townsquare.relay.server`),
on listeners as a fluid:

- The edge sends a shard's joins to the shard's relay in the map it last read, only while
  that relay is Ready, active (not draining) and has reported its listeners since it became
  Ready (a report comes with a Prometheus scrape). A relay's room is its capacity minus its
  last report minus the joins the edge sent it since `admit_ttl` before that report; so a
  stale report (a metric outage) slows admissions and never speeds them.
- The relay itself refuses a join at capacity (a glitched report cannot overfill it).
- While the map says `queueing`, a first attempt is queued and admitted on its retry a
  second later, however much room there is.
- A join whose shard's relay has no seat (full, not Ready, draining, or no relay at all)
  sits as a guest on a relay that has one, as the edge's `seat` does; it moves to its own
  relay once that has a seat left after the joins.
- A listener whose shard moved stays on its old relay (held) until the new relay has room;
  moves are served before queued joins, as a move asks for no place in line.
- A relay that crashes loses its listeners, its guests too: they join again, as guests
  where a seat is free, else waiting until their shard's relay is Ready (the operator
  moves a dead relay's shards at once).

Relays holding the same number of shards in the same mode are one group whose figures are
per relay; a regroup (a new map, a relay Ready or gone) averages the members' figures,
which keeps every total (connected, reported, counted) and every relay's bound. Overload
is counted from those loads against capacity; it is never assumed 0.
"""

from __future__ import annotations

from collections.abc import Container, Mapping

ADMITS, SERVES, DOWN = 0, 1, 2
"""A relay's mode: takes joins; Ready but takes none (draining, or not reported yet); down."""
OWN, HELD, REPORT, COUNTED, RECENT, GUESTS_ON, GUESTS_OF = range(7)
"""Per relay of a group: listeners of its own shards; listeners held for shards that moved
away; its last report; joins counted against that report; joins since the next report's
admission window began; guests it seats (listeners of other relays' shards); listeners of
its shards seated as guests elsewhere."""
FIGURES = 7

Key = tuple[int, int]
"""(shards held in the edge's map, mode)."""


class Edge:
    """Connected, waiting and overloaded listeners, second by second."""

    def __init__(self, shards: int, capacity: int, admit_ttl: float = 10.0) -> None:
        self.shards = shards
        self.capacity = float(capacity)
        self.admit_ttl = admit_ttl
        self.groups: dict[Key, list[float]] = {}
        self.sizes: dict[Key, int] = {}
        self.member: dict[int, Key] = {}
        """The group of every pod 0..pods-1."""
        self.reported: set[int] = set()
        self.unreported: list[int] = []
        """Ready pods that have not reported since they became Ready."""
        self.unplaced = shards
        """Shards whose relay is in no pod at all: their listeners wait."""
        self.held = 0.0
        self.per_shard = 0.0

    def regroup(
        self,
        counts: Mapping[int, int],
        states: Mapping[int, str],
        pods: int,
        down: Container[int],
    ) -> None:
        """Re-sort the relays after the map the edge acts on, or the relays, changed.

        `counts` are the shards per relay in the edge's map, `states` its relay states,
        `pods` the StatefulSet's size and `down` the pods that are not Ready. A pod that
        changes group takes its group's figures per relay with it (a fluid: the members of
        a group are alike), so every total is kept.
        """
        member, reported = self.member, self.reported
        moves: list[tuple[int, Key]] = []
        unreported: list[int] = []
        placed = 0
        for ordinal in range(pods):
            k = counts.get(ordinal, 0)
            placed += k
            if ordinal in down:
                mode = DOWN
                reported.discard(ordinal)
            elif ordinal not in reported:
                mode = SERVES
                unreported.append(ordinal)
            elif states.get(ordinal) == "active":
                mode = ADMITS
            else:
                mode = SERVES
            key = (k, mode)
            if member.get(ordinal) != key:
                moves.append((ordinal, key))
        for ordinal in [o for o in member if o >= pods]:
            self._leave(member.pop(ordinal))
            reported.discard(ordinal)
        for ordinal, key in moves:
            self._move(ordinal, key)
        self.unreported = unreported
        self.unplaced = self.shards - placed
        self.held = sum(g[HELD] * self.sizes[key] for key, g in self.groups.items())

    def _leave(self, key: Key) -> list[float]:
        """One member leaves its group (the group's figures per relay stay as they are)."""
        figures = list(self.groups[key])
        self.sizes[key] -= 1
        if not self.sizes[key]:
            del self.sizes[key], self.groups[key]
        return figures

    def _move(self, ordinal: int, key: Key) -> None:
        old_key = self.member.get(ordinal)
        figures = [0.0] * FIGURES if old_key is None else self._leave(old_key)
        k, mode = key
        if mode == DOWN:
            figures[OWN] = figures[HELD] = figures[GUESTS_ON] = 0.0  # a crash drops them all
        elif old_key is not None and old_key[0] > k:
            kept = figures[OWN] * k / old_key[0]
            figures[HELD] += figures[OWN] - kept  # moved away: held until the move is served
            figures[OWN] = kept
        self.member[ordinal] = key
        group = self.groups.get(key)
        if group is None:
            self.groups[key] = figures
            self.sizes[key] = 1
        else:
            n = self.sizes[key]
            self.groups[key] = [(a * n + b) / (n + 1) for a, b in zip(group, figures, strict=True)]
            self.sizes[key] = n + 1

    def step(self, wanted: float, queueing: bool) -> tuple[float, float, float]:
        """One second with `wanted` listeners: (connected, waiting, overloaded)."""
        p = wanted / self.shards
        rise = max(0.0, p - self.per_shard) if queueing else 0.0
        self.per_shard = p
        cap = self.capacity
        self._match_homes(sum(self.sizes[key] * g[GUESTS_ON] for key, g in self.groups.items()))
        not_own = self.unplaced * p
        admitted = overloaded = guests = homed = 0.0
        spare: list[tuple[list[float], int, float]] = []
        for key, g in self.groups.items():
            k, mode = key
            n = self.sizes[key]
            d = k * p
            if mode == DOWN:
                not_own += n * d
                continue
            own = g[OWN]
            if own > d:
                own = d  # listeners left
            if own + g[GUESTS_OF] > d:
                g[GUESTS_OF] = d - own  # guests left too
            if mode == ADMITS:
                want = d - own - g[GUESTS_OF] - k * rise
                edge_room = cap - g[REPORT] - g[COUNTED]
                relay_room = cap - own - g[HELD] - g[GUESTS_ON]
                room = edge_room if edge_room < relay_room else relay_room
                if room > 0 and want > 0:
                    took = want if want < room else room
                    own += took
                    _count_joins(g, took)
                    admitted += n * took
                    room -= took
                if room > 0 and g[GUESTS_OF] > 0:  # joins first, then guests come home
                    home = min(g[GUESTS_OF], room)
                    own += home
                    g[GUESTS_OF] -= home
                    _count_joins(g, home)
                    homed += n * home
                    room -= home
                if room > 0:
                    spare.append((g, n, room))
            g[OWN] = own
            not_own += n * (d - own)
            guests += n * g[GUESTS_ON]
            if _load(g) > cap + 1e-9:
                overloaded += n * _load(g)
        held = self.held
        if held > 0:
            # Held listeners are among those whose shard's relay does not carry them yet;
            # those that left go first, then moves take the room before queued joins.
            before = min(held, not_own + admitted)
            after = max(0.0, before - admitted)
            if after != held:
                scale = after / held
                for g in self.groups.values():
                    g[HELD] *= scale
                self.held = held = after
        seated = min(guests - homed, max(0.0, not_own - held))
        self._guests(guests, max(0.0, seated))
        waiting = max(0.0, not_own - held - seated)
        joining = waiting - self.shards * rise
        if joining > 0 and spare:
            # A join whose shard's relay has no seat sits as a guest on one that has
            # (the edge's `seat`), held there until its own relay has a seat.
            free = sum(n * room for _, n, room in spare)
            took = joining if joining < free else free
            for g, _, room in spare:
                share = room * took / free
                g[GUESTS_ON] += share
                _count_joins(g, share)
            self._homes(took)
            waiting -= took
        return wanted - waiting, waiting, overloaded

    def _guests(self, before: float, after: float) -> None:
        """Scale the seats guests hold from `before` to `after` in all (some left, some
        went home), and their homes' count of them to match."""
        if before > 0 and after != before:
            scale = after / before
            for g in self.groups.values():
                g[GUESTS_ON] *= scale
        self._match_homes(after)

    def _match_homes(self, guests: float) -> None:
        """Count as many guests to their home relays as `guests` sit anywhere: a crash or a
        relay removed drops the guests it seated, who are then homeless joins again."""
        homes = sum(self.sizes[key] * g[GUESTS_OF] for key, g in self.groups.items())
        if homes > guests:
            scale = guests / homes
            for g in self.groups.values():
                g[GUESTS_OF] *= scale

    def _homes(self, seated: float) -> None:
        """`seated` new guests, counted to the relays whose shards they belong to in
        proportion to the joins those relays leave waiting."""
        unmet = {
            key: max(0.0, key[0] * self.per_shard - g[OWN] - g[GUESTS_OF])
            for key, g in self.groups.items()
        }
        total = sum(self.sizes[key] * left for key, left in unmet.items())
        if total <= 0:
            return
        for key, left in unmet.items():
            self.groups[key][GUESTS_OF] += left * seated / total

    def window_opens(self) -> None:
        """`admit_ttl` before a scrape: joins from now on count against its report."""
        for g in self.groups.values():
            g[RECENT] = 0.0

    def report(self, factor: float) -> bool:
        """A scrape reached the edge: every Ready relay reported (times a glitch's `factor`).

        True when relays that could not take joins before may now (a regroup is due).
        """
        for g in self.groups.values():
            g[REPORT] = _load(g) * factor
            g[COUNTED] = g[RECENT]
        if not self.unreported:
            return False
        self.reported.update(self.unreported)
        self.unreported = []
        return True

    def loads(self) -> RelayLoads:
        """Listeners per relay pod now, as each relay counts them."""
        per_group = {key: _load(g) for key, g in self.groups.items()}
        return RelayLoads(per_group, dict(self.member))


def _load(g: list[float]) -> float:
    """Listeners on one relay of a group, as the relay counts them: its own shards', those
    held for shards that moved away, and its guests."""
    return g[OWN] + g[HELD] + g[GUESTS_ON]


def _count_joins(g: list[float], joins: float) -> None:
    """Joins the edge sent one relay of a group: against its report, and the next one's."""
    g[COUNTED] += joins
    g[RECENT] += joins


class RelayLoads:
    """A snapshot of every relay's listeners, read per relay without copying them all."""

    def __init__(self, per_group: dict[Key, float], member: dict[int, Key]) -> None:
        self.per_group = per_group
        self.member = member

    def of(self, ordinal: int) -> float:
        key = self.member.get(ordinal)
        return 0.0 if key is None else self.per_group[key]

    def all(self) -> dict[int, float]:
        per_group = self.per_group
        return {o: per_group[key] for o, key in self.member.items()}
