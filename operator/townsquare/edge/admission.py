"""Who gets a relay now, who waits, and who may move: one edge replica's decisions (pure).

Replicas never talk to each other. What they share is the shard map (which relay carries
each shard, which relays drain, whether the room queues, the migration budget), the relays'
readiness (EndpointSlices), the relays' own listener reports, and each other's line (how
many wait, and the first attempts at its tenths), which every replica exports to the
Prometheus it reads the reports from; the scrape's time says how fresh that news is.
Four rules make that enough:

- Capacity: a relay's spare room is its capacity minus its last reported listeners; each of
  the `replicas` replicas may fill only `spare // replicas` of it, counting its own
  admissions since the report (and for `admit_ttl` before it: a listener admitted then may
  not have connected yet, and its ticket expires after `admit_ttl`). The replicas' shares
  add up to at most the spare room, so together they cannot overfill a relay.
- Order: the room has one line, by the time of each join's first attempt, which the queue
  ticket carries, so whichever replica a retry reaches knows its place. A join is admitted
  only while no join whose first attempt came more than `REORDER_SHARE` of a refresh
  interval (`retry_after`) before its own still waits, here or at another replica; the
  rest of the interval is left for the time a request takes from a listener to the edge.
  A queued join (one with a ticket) is also admitted only once the news of every other
  replica's line was sampled no earlier than that window before its first attempt: a join
  that waited there since before then is in that news. So queued listeners get in in the
  order they came, as they themselves time it, with at most one refresh interval of
  reordering. A new join (no ticket, the map open) does not wait for news: it can pass
  a join that another replica queued since its last news, by at most that news's age.
- Seats: a queued join takes any free seat. Its shard's relay when that relay has room,
  otherwise the active relay with the most room, as a guest: an older join whose relay is
  full does not wait while younger joins of other shards take the new relays. A guest's
  ticket names no shard, so its relay never refuses it by its map; the relay asks it to
  go home while its shard's relay is active and the room takes joins, and the edge sends
  it there when that relay has room, as any move.
- Moves: a listener whose shard the map moved (or a guest) is sent to its shard's relay
  while this replica has spent less than `maxMigrationsPerMinute // replicas` moves in the
  last minute, and, off a relay that is not draining, only once no join waits here: while
  joins wait, a move would only take the seat of one. A guest off a relay that stays also
  waits while any relay of the room drains, so that drains keep the budget they are
  planned with.

Time is a parameter everywhere; the shell passes the clock in.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

from townsquare import tickets
from townsquare.api.names import relay_set_name
from townsquare.sharding import ShardMap, shard_of

MAX_ID_BYTES = 256
MOVE_WINDOW_SECONDS = 60.0
MAX_RETRY_FACTOR = 5
BEHIND_PER_RETRY_STEP = 2.0
"""Every this many refresh intervals between a join's first attempt and the oldest waiting
one's add one refresh interval to its Retry-After: the line moves at most about one refresh
interval of arrivals per retry, so a join far behind is not due sooner, and it is back by
the time the joins just ahead of it are admitted (a join that is not back holds the younger
ones until it is)."""
REORDER_SHARE = 0.75
"""Of a refresh interval, how far apart two joins' first attempts (as the edge saw them) may
be and the later one still get in first."""
WARMING_LIMIT = 3.0
"""Admit ttls after its start past which a replica stops waiting for a relay's newer report
before it calls itself ready (a relay whose reports stopped then simply takes no joins)."""
TICKET_ROUNDING = 0.001
"""Tickets carry their expiry to the millisecond."""
LATE_RETRY_FRACTION = 0.25
"""A waiter may retry this fraction of its Retry-After late (clients add jitter) before it
stops holding its place ahead of younger joins."""


@dataclass(frozen=True)
class Settings:
    """How one replica shares the work with the others."""

    replicas: int = 1
    """Edge replicas that may admit to the same relays (with an autoscaler: its maximum)."""
    admit_ttl: float = 10.0
    """Seconds an admit ticket is valid: a listener connects within it or not at all."""
    retry_after: float = 1.0
    """Seconds a queued listener waits before it retries (the refresh interval, and the most
    reordering the line allows); listeners far back in line are told to wait longer, up to
    `MAX_RETRY_FACTOR` times this."""
    waiter_expiry: float = 1.0
    """A queued listener not heard from for this long past its Retry-After (plus
    `LATE_RETRY_FRACTION` of it) has given up: it leaves the line, and holds back no one.
    Its ticket still keeps its place should it come back."""
    queue_ttl: float = 3600.0
    """How long a queue ticket keeps its place without a retry."""
    started_at: float = 0.0
    """When this replica started: reports sampled before `started_at + admit_ttl` may miss
    admissions a previous replica made, so they admit nobody."""


@dataclass(frozen=True)
class Endpoint:
    """A relay pod as its EndpointSlice shows it."""

    address: str
    """host:port of the listener port."""
    ready: bool


@dataclass(frozen=True)
class Report:
    """A relay's own count of its listeners, and when it was taken."""

    listeners: int
    sampled_at: float


@dataclass(frozen=True)
class Admitted:
    relay: str
    pod: str
    shard: int
    generation: int
    ticket: str
    guest: bool = False
    """Seated on a relay other than its shard's, which had no room."""


@dataclass(frozen=True)
class Queued:
    position: int
    waiting: int
    ticket: str
    retry_after: int
    reason: str


@dataclass(frozen=True)
class Closed:
    """The room takes no new joins (its event is over, or it is being deleted): a final
    answer, not a place in line; listeners already in are still moved."""

    reason: str = "the room takes no new joins: its event is over or the room is being deleted"


@dataclass(frozen=True)
class Location:
    """The answer to "where is my relay": where it is, and a ticket when it has moved."""

    relay: str
    pod: str
    shard: int
    generation: int
    moved: bool
    ticket: str | None = None


@dataclass(frozen=True)
class Held:
    """A move that has to wait (budget spent, or the new relay cannot take it yet)."""

    reason: str
    retry_after: int


LINE_QUANTILES = tuple(i / 10 for i in range(11))
"""Where in a replica's line the first attempts are exported: its oldest, its tenths, its
youngest. Enough to place a join in the room's line within a tenth of each other line."""


@dataclass(frozen=True)
class Line:
    """Another replica's line for a room, as its last scrape showed it."""

    waiting: int
    firsts: tuple[float, ...]
    """First attempts at LINE_QUANTILES of that line, oldest first."""

    @property
    def oldest(self) -> float:
        return self.firsts[0]

    def ahead_of(self, first: float) -> float:
        """About how many of its joins came before `first`: linear between its tenths."""
        firsts = self.firsts
        above = bisect.bisect_left(firsts, first)
        if above == 0 or self.waiting == 0:
            return 0.0
        if above == len(firsts):
            return float(self.waiting)
        low, high = firsts[above - 1], firsts[above]
        steps = len(firsts) - 1
        fraction = (above - 1 + (first - low) / (high - low)) / steps
        return (self.waiting - 1) * fraction  # the join at a tenth q has q * (n - 1) ahead


def line_of(queue: list[tuple[float, str]]) -> Line:
    """What a replica exports of its (sorted, non-empty) line."""
    last = len(queue) - 1
    return Line(len(queue), tuple(queue[round(q * last)][0] for q in LINE_QUANTILES))


@dataclass(frozen=True)
class News:
    """The other replicas' lines, through Prometheus, and when each was scraped."""

    heard: Mapping[str, float] = field(default_factory=dict)
    """Replica -> the time of its last scrape (every live replica, lines or not)."""
    lines: Mapping[tuple[str, str], Mapping[str, Line]] = field(default_factory=dict)
    """(namespace, room) -> replica -> its line (rooms with joins waiting there)."""


@dataclass
class _Waiter:
    first: float
    expires: float


@dataclass
class Room:
    """One room as one replica knows it: the map, its relays, reports, and its own line."""

    namespace: str
    name: str
    shard_map: ShardMap
    source: str = ""
    """The uid of the ConfigMap the map came from."""
    slices: dict[str, dict[str, Endpoint]] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    admitted: dict[str, deque[float]] = field(default_factory=dict)
    """Admission times per pod, by this replica, still inside the report window."""
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    queue: list[tuple[float, str]] = field(default_factory=list)
    """(first attempt, listener) of every waiter here, sorted: this replica's part of the
    room's line."""
    others: Mapping[str, Line] = field(default_factory=dict)
    """The other replicas' lines, as of `heard`."""
    heard: float | None = None
    """When the stalest news of the other replicas was sampled (None: none heard from)."""
    moves: deque[float] = field(default_factory=deque)
    """When this replica gave each move of the last minute."""
    movers: dict[str, float] = field(default_factory=dict)
    """Listener -> when this replica last moved it (the last minute): an admit ticket
    issued before that is spent, so replaying it wins no second move."""
    _seats: dict[str, int] | None = None
    """Seats this replica may still fill per usable relay (only those with any): computed
    from the reports, the map and the endpoints, kept in step with admissions."""
    _seats_total: int = 0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def closed(self) -> bool:
        """The map takes no new joins: the event is over, or the room is being deleted."""
        return self.shard_map.admission == "closed"

    def pod_of(self, ordinal: int) -> str:
        return f"{relay_set_name(self.name)}-{ordinal}"

    def target(self, listener: str) -> tuple[int, str | None]:
        """The listener's shard and the pod the map gives it (None: no relay yet)."""
        shard = shard_of(listener, self.shard_map.shards)
        ordinal = self.shard_map.assignment[shard]
        return shard, None if ordinal is None else self.pod_of(ordinal)

    def unusable(self, pod: str | None, settings: Settings) -> str | None:
        """Why a pod may take no join now, or None when it may."""
        if pod is None:
            return "no relay carries this shard yet"
        ordinal = int(pod.rsplit("-", 1)[1])
        if self.shard_map.relays.get(ordinal) != "active":
            return f"relay {pod} is draining"
        endpoint = self.endpoints.get(pod)
        if endpoint is None or not endpoint.ready:
            return f"relay {pod} is not ready"
        report = self.reports.get(pod)
        if report is None:
            return f"relay {pod} has not reported its listeners yet"
        if report.sampled_at < settings.started_at + settings.admit_ttl:
            return f"relay {pod} has not reported since this edge started"
        return None

    def warming(self, settings: Settings, now: float) -> bool:
        """This replica cannot admit here yet: a relay that would take joins has reported
        only from before `started_at + admit_ttl`, when a previous replica's admissions may
        still be uncounted. Its line then is one of joins it queued for that alone, which
        must hold no other replica back. Past `WARMING_LIMIT` admit_ttls after the start a
        relay still without a newer report is one whose reports stopped, not warm-up."""
        horizon = settings.started_at + settings.admit_ttl
        if now >= settings.started_at + settings.admit_ttl * WARMING_LIMIT:
            return False
        for ordinal, state in self.shard_map.relays.items():
            if state != "active":
                continue
            pod = self.pod_of(ordinal)
            endpoint = self.endpoints.get(pod)
            report = self.reports.get(pod)
            if endpoint and endpoint.ready and report and report.sampled_at < horizon:
                return True
        return False

    def spare(self, pod: str, settings: Settings) -> int:
        """Joins this replica may still send to `pod` before its next report."""
        report = self.reports[pod]
        share = max(0, self.shard_map.capacity - report.listeners) // settings.replicas
        recent = self.admitted.get(pod)
        if recent is None:
            return share
        since = report.sampled_at - settings.admit_ttl
        while recent and recent[0] <= since:
            recent.popleft()
        return share - len(recent)

    def seats(self, settings: Settings) -> dict[str, int]:
        """Free seats per usable relay for this replica (relays with none left out)."""
        if self._seats is None:
            self._seats = {}
            for ordinal, state in self.shard_map.relays.items():
                pod = self.pod_of(ordinal)
                if state == "active" and self.unusable(pod, settings) is None:
                    free = self.spare(pod, settings)
                    if free > 0:
                        self._seats[pod] = free
            self._seats_total = sum(self._seats.values())
        return self._seats

    def forget_moves(self, now: float) -> None:
        """Moves older than the budget's window no longer count."""
        while self.moves and self.moves[0] <= now - MOVE_WINDOW_SECONDS:
            self.moves.popleft()
        if self.movers and not self.moves:
            self.movers.clear()
        elif len(self.movers) > len(self.moves):
            cutoff = now - MOVE_WINDOW_SECONDS
            self.movers = {who: at for who, at in self.movers.items() if at > cutoff}

    def changed(self) -> None:
        """The map, endpoints or reports changed: count the seats again when next asked."""
        self._seats = None

    def seat(self, home: str | None, ahead: int, settings: Settings) -> str | None:
        """The relay for a join with `ahead` joins before it in line here: its shard's relay
        if that has a seat, else the one with the most; None while the seats here are
        fewer than the joins ahead plus this one."""
        seats = self.seats(settings)
        if ahead >= self._seats_total:
            return None
        if home is not None and home in seats:
            return home
        return max(seats, key=lambda pod: (seats[pod], -int(pod.rsplit("-", 1)[1])))

    def admit(self, pod: str, now: float) -> None:
        self.admitted.setdefault(pod, deque()).append(now)
        if self._seats is not None and pod in self._seats:
            self._seats[pod] -= 1
            self._seats_total -= 1
            if self._seats[pod] <= 0:
                del self._seats[pod]

    def wait(self, listener: str, first: float, expires: float) -> None:
        """Put (or keep) the listener in line until `expires`; its place is its first attempt."""
        waiter = self.waiters.get(listener)
        if waiter is not None and waiter.first != first:
            self.leave(listener)
            waiter = None
        if waiter is None:
            self.waiters[listener] = _Waiter(first, expires)
            bisect.insort(self.queue, (first, listener))
        else:
            waiter.expires = expires

    def leave(self, listener: str) -> None:
        waiter = self.waiters.pop(listener, None)
        if waiter is None:
            return
        entry = (waiter.first, listener)
        index = bisect.bisect_left(self.queue, entry)
        if index < len(self.queue) and self.queue[index] == entry:
            del self.queue[index]

    def ahead(self, first: float, listener: str) -> int:
        """Waiters here whose first attempt came before this one's."""
        return bisect.bisect_left(self.queue, (first, listener))

    def oldest(self, now: float) -> float | None:
        """The first attempt of the oldest join still waiting here (waiters who stopped
        retrying leave the line first)."""
        while self.queue:
            first, listener = self.queue[0]
            if self.waiters[listener].expires >= now:
                return first
            self.leave(listener)
        return None

    def oldest_anywhere(self, now: float) -> float | None:
        """The first attempt of the oldest join waiting here or at another replica."""
        firsts = [line.oldest for line in self.others.values()]
        here = self.oldest(now)
        if here is not None:
            firsts.append(here)
        return min(firsts, default=None)

    def place(self, first: float, ahead: int) -> tuple[int, int]:
        """(position, waiting) in the room's line: this replica's own line now, the others'
        as of their last news (their part of the position within a tenth of each)."""
        elsewhere = sum(line.ahead_of(first) for line in self.others.values())
        waiting = len(self.waiters) + sum(line.waiting for line in self.others.values())
        return min(ahead + round(elsewhere) + 1, waiting), waiting

    def expire(self, now: float) -> None:
        """Forget waiters that stopped retrying."""
        gone = [listener for listener, waiter in self.waiters.items() if waiter.expires < now]
        for listener in gone:
            self.leave(listener)

    def oldest_wait(self, now: float) -> float:
        return max(0.0, now - self.queue[0][0]) if self.queue else 0.0

    def set_slice(self, name: str, endpoints: Mapping[str, Endpoint] | None) -> None:
        if endpoints is None:
            self.slices.pop(name, None)
        else:
            self.slices[name] = dict(endpoints)
        merged: dict[str, Endpoint] = {}
        for found in self.slices.values():
            for pod, endpoint in found.items():
                if pod not in merged or endpoint.ready:
                    merged[pod] = endpoint
        self.endpoints = merged
        self.changed()


class Gate:
    """Every room one replica serves, and the decisions it makes for them."""

    def __init__(self, key: bytes, settings: Settings) -> None:
        self.key = tickets.check_key(key)
        self.settings = settings
        self.rooms: dict[tuple[str, str], Room] = {}
        self._slices: dict[tuple[str, str], dict[str, dict[str, Endpoint]]] = {}

    # Updates from the watches and the reports.

    def set_map(
        self, namespace: str, name: str, shard_map: ShardMap | None, source: str = ""
    ) -> None:
        """A room's published map (None: the room is gone). `source` is the ConfigMap's
        uid: a map from a new ConfigMap (the room was deleted and created again while
        the watch was away) is taken even with a lower generation; an older map of the
        same ConfigMap never replaces a newer one."""
        key = (namespace, name)
        if shard_map is None:
            self.rooms.pop(key, None)
            return
        room = self.rooms.get(key)
        if room is None:
            room = Room(namespace, name, shard_map, source=source)
            for slice_name, endpoints in self._slices.get(key, {}).items():
                room.set_slice(slice_name, endpoints)
            self.rooms[key] = room
        elif source != room.source or shard_map.generation >= room.shard_map.generation:
            if source != room.source:
                room.moves.clear()  # a new room: its budget starts afresh
                room.movers.clear()
            room.shard_map, room.source = shard_map, source
            room.changed()

    def keep_maps(self, listed: Set[tuple[str, str]], namespace: str | None) -> None:
        """After a re-list of the maps (of `namespace`, None: all): rooms deleted while the
        watch was away are gone."""
        for key in [key for key in self.rooms if namespace in (None, key[0])]:
            if key not in listed:
                self.set_map(*key, None)

    def keep_slices(self, listed: Set[tuple[str, str, str]], namespace: str | None) -> None:
        """After a re-list of the relays' EndpointSlices: slices deleted meanwhile are gone."""
        for (room_namespace, room), slices in list(self._slices.items()):
            if namespace not in (None, room_namespace):
                continue
            for slice_name in list(slices):
                if (room_namespace, room, slice_name) not in listed:
                    self.set_slice(room_namespace, room, slice_name, None)

    def set_slice(
        self, namespace: str, name: str, slice_name: str, endpoints: Mapping[str, Endpoint] | None
    ) -> None:
        """One EndpointSlice of a room's relays (None: deleted). Kept for rooms whose map
        has not arrived yet, since the two watches race."""
        key = (namespace, name)
        pending = self._slices.setdefault(key, {})
        if endpoints is None:
            pending.pop(slice_name, None)
            if not pending:
                del self._slices[key]
        else:
            pending[slice_name] = dict(endpoints)
        room = self.rooms.get(key)
        if room is not None:
            room.set_slice(slice_name, endpoints)

    def set_reports(self, reports: Mapping[tuple[str, str, str], Report]) -> None:
        """Listeners per (namespace, room, pod); an older sample never replaces a newer."""
        for (namespace, name, pod), report in reports.items():
            room = self.rooms.get((namespace, name))
            if room is None:
                continue
            known = room.reports.get(pod)
            if known is None or report.sampled_at >= known.sampled_at:
                room.reports[pod] = report
                room.changed()

    def set_news(self, news: News) -> None:
        """The other replicas' lines (a room left out has none waiting there); empty news
        (no other replica, or no Prometheus) leaves only this replica's line to keep."""
        heard = min(news.heard.values(), default=None)
        for key, room in self.rooms.items():
            room.others = news.lines.get(key, {})
            room.heard = heard

    def expire(self, now: float) -> None:
        for room in self.rooms.values():
            room.expire(now)
            room.forget_moves(now)

    # Decisions.

    def join(
        self, room: Room, listener: str, ticket: str | None, now: float
    ) -> Admitted | Queued | Closed:
        """Admit the listener to a relay, or keep it in line; in a closed room, neither.

        A forged or foreign ticket raises TicketError (the caller answers 400); an expired
        one simply starts a new place in line.
        """
        if room.closed:
            room.leave(listener)
            return Closed()
        settings = self.settings
        first = now
        if ticket is not None:
            first = self._first_attempt(room, listener, ticket, now)
        shard, home = room.target(listener)
        known = room.waiters.get(listener)
        if known is not None and known.first != first:
            room.leave(listener)  # came back without its ticket: a new place, not the old one
        ahead = room.ahead(first, listener)
        oldest = room.oldest_anywhere(now)
        behind = 0.0 if oldest is None else max(0.0, first - oldest)
        window = settings.retry_after * REORDER_SHARE
        reason = None
        if ticket is None and room.shard_map.admission == "queueing":
            reason = "the room is queueing joins"
        else:
            if behind > window:
                reason = f"joins that came {behind:.0f}s earlier still wait"
            elif ticket is not None and room.heard is not None and room.heard < first - window:
                reason = "the other edge replicas' lines are not known up to this join yet"
            else:
                pod = room.seat(home, ahead, settings)
                if pod is not None:
                    room.leave(listener)
                    room.admit(pod, now)
                    return self._admitted(room, listener, shard, pod, guest=pod != home)
                reason = self._no_seat(room, home, ahead)
        steps = 1 + int(behind / (settings.retry_after * BEHIND_PER_RETRY_STEP))
        retry_after = max(1, math.ceil(settings.retry_after * min(MAX_RETRY_FACTOR, steps)))
        late = retry_after * (1 + LATE_RETRY_FRACTION) + settings.waiter_expiry
        room.wait(listener, first, now + late)
        claims = {"listener": listener, "room": room.key, "first": first}
        position, waiting = room.place(first, ahead)
        return Queued(
            position=position,
            waiting=waiting,
            ticket=tickets.sign(self.key, "queue", claims, expires=now + settings.queue_ttl),
            retry_after=retry_after,
            reason=reason,
        )

    def _no_seat(self, room: Room, home: str | None, ahead: int) -> str:
        if room.seats(self.settings):
            return f"{ahead} joins wait ahead"
        why = room.unusable(home, self.settings) or f"relay {home} is full"
        return f"{why}, and no other relay has room"

    def locate(self, room: Room, listener: str, seat: str | None, now: float) -> Location | Held:
        """Where the listener's relay is; when it holds a seat elsewhere (its shard moved,
        or it is a guest there), a ticket for its relay, within the migration budget and
        the relay's room, once no join waits here (unless its seat's relay drains). A guest
        off a relay that stays also waits while any relay of the room drains: the operator
        paces a drain as if the whole budget were its own, and a guest loses nothing by
        staying where it is.

        `seat` is the listener's latest admit ticket: the only proof of where it sits, so
        a move cannot be had by naming a relay. A forged ticket, one for another listener
        or room, one superseded by a move this replica gave, or one whose relay left the
        map raises TicketError (the caller answers 400); an expired one still proves the
        seat, since listeners stay long after they connected."""
        current, guest = (
            (None, False) if seat is None else self._seated_at(room, listener, seat, now)
        )
        shard, pod = room.target(listener)
        generation = room.shard_map.generation
        retry = max(1, math.ceil(self.settings.retry_after))
        if pod is None:
            return Held("no relay carries this shard yet", retry)
        address = room.endpoints.get(pod)
        relay = address.address if address else ""
        if current is None or current == pod:
            return Location(relay, pod, shard, generation, moved=False)
        room.leave(listener)  # it holds a relay: it waits for none
        reason = room.unusable(pod, self.settings)
        if reason is None and room.spare(pod, self.settings) <= 0:
            reason = f"relay {pod} is full"
        waits = room.oldest(now) is not None and not room.closed
        leaving = _drains(room, current)
        if reason is None and waits and not leaving:
            reason = f"{len(room.waiters)} joins wait for a seat; moves come after them"
        if reason is None and guest and not leaving and _any_drains(room):
            reason = f"a relay drains; a guest on {current} goes home after the drain"
        budget = room.shard_map.migrations_per_minute
        if reason is None and budget is not None:
            room.forget_moves(now)
            if len(room.moves) >= budget // self.settings.replicas:
                reason = f"the migration budget ({budget:,}/min) is spent; stay on {current}"
        if reason is not None:
            return Held(reason, retry)
        room.admit(pod, now)
        room.forget_moves(now)
        room.moves.append(now)
        room.movers[listener] = now
        ticket = self._admit_ticket(room, listener, shard, pod, now)
        return Location(relay, pod, shard, generation, moved=True, ticket=ticket)

    def _seated_at(self, room: Room, listener: str, seat: str, now: float) -> tuple[str, bool]:
        """The pod a genuine admit ticket of this listener seats it at, and whether as a
        guest (the ticket names no shard), or TicketError.

        A ticket issued before a move this replica gave is spent while the move's own ticket
        is valid; once that expired, the listener either connected with it (and asks with
        the newer ticket) or could not reach its new relay in time (its seat is still the
        old one, which it may prove again: otherwise it could not move for a minute)."""
        claims = tickets.genuine(self.key, seat, "admit")
        if claims.get("listener") != listener or claims.get("room") != room.key:
            raise tickets.TicketError("ticket: issued to another listener or room")
        pod = claims.get("pod")
        if not isinstance(pod, str) or _ordinal(pod) not in room.shard_map.relays:
            raise tickets.TicketError(
                f"ticket: relay {pod} is not in the room's map any more; join again"
            )
        moved = room.movers.get(listener)
        issued = float(claims.get("exp", 0)) - self.settings.admit_ttl
        spent = moved is not None and now < moved + self.settings.admit_ttl
        if moved is not None and spent and issued < moved - TICKET_ROUNDING:
            raise tickets.TicketError(
                "ticket: superseded by the move this edge gave; send the newest admit ticket"
            )
        return pod, claims.get("shard") is None

    def _first_attempt(self, room: Room, listener: str, ticket: str, now: float) -> float:
        try:
            claims = tickets.verify(self.key, ticket, "queue", now=now)
        except tickets.TicketError as error:
            if str(error) == "ticket: expired":
                return now
            raise
        if claims.get("listener") != listener or claims.get("room") != room.key:
            raise tickets.TicketError("ticket: issued to another listener or room")
        first = claims.get("first")
        if not isinstance(first, int | float) or first > now:
            raise tickets.TicketError("ticket: no valid first attempt")
        return float(first)

    def _admitted(
        self, room: Room, listener: str, shard: int, pod: str, *, guest: bool
    ) -> Admitted:
        endpoint = room.endpoints[pod]
        last = room.admitted[pod][-1]
        return Admitted(
            relay=endpoint.address,
            pod=pod,
            shard=shard,
            generation=room.shard_map.generation,
            ticket=self._admit_ticket(room, listener, None if guest else shard, pod, last),
            guest=guest,
        )

    def _admit_ticket(
        self, room: Room, listener: str, shard: int | None, pod: str, now: float
    ) -> str:
        """A relay checks the shard a ticket names against its map; a guest's names none,
        so the relay lets it in whatever its map says (and asks it to go home later)."""
        claims = {
            "listener": listener,
            "room": room.key,
            "pod": pod,
            "shard": shard,
            "generation": room.shard_map.generation,
        }
        return tickets.sign(self.key, "admit", claims, expires=now + self.settings.admit_ttl)

    # What /metrics shows.

    def waiting(self, now: float) -> Iterable[tuple[Room, int, float]]:
        """(room, waiting listeners, seconds the oldest has waited) for every room."""
        for room in self.rooms.values():
            if room.closed:  # nobody waits for a room closed to joins
                yield room, 0, 0.0
            else:
                yield room, len(room.waiters), room.oldest_wait(now)

    def lines(self, now: float) -> Iterable[tuple[Room, Line]]:
        """(room, this replica's line) for rooms with joins waiting here: what the other
        replicas read back, through Prometheus, to keep the room's order and answer
        position and waiting for the whole room. Not for a room this replica cannot admit
        to yet (`Room.warming`): the others would hold every later join for a line that
        cannot move; its joins keep their place by their tickets all the same."""
        for room in self.rooms.values():
            room.expire(now)
            if room.queue and not room.closed and not room.warming(self.settings, now):
                yield room, line_of(room.queue)

    def warming(self, now: float) -> bool:
        """Some room this replica cannot admit to yet since it started (not ready)."""
        return any(room.warming(self.settings, now) for room in self.rooms.values())


def _ordinal(pod: str) -> int | None:
    try:
        return int(pod.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def _any_drains(room: Room) -> bool:
    return any(state != "active" for state in room.shard_map.relays.values())


def _drains(room: Room, pod: str) -> bool:
    """The pod is leaving: marked draining, or gone from the map."""
    ordinal = _ordinal(pod)
    return ordinal is None or room.shard_map.relays.get(ordinal) != "active"
