"""Who gets a relay now, who waits, and who may move: one edge replica's decisions (pure).

Replicas never talk to each other. What they share is the shard map (which relay carries
each shard, which relays drain, whether the room queues, the migration budget), the relays'
readiness (EndpointSlices) and the relays' own listener reports. Three rules make that
enough:

- Capacity: a relay's spare room is its capacity minus its last reported listeners; each of
  the `replicas` replicas may fill only `spare // replicas` of it, counting its own
  admissions since the report (and for `admit_ttl` before it: a listener admitted then may
  not have connected yet, and its ticket expires after `admit_ttl`). The replicas' shares
  add up to at most the spare room, so together they cannot overfill a relay.
- Order: joins wait first come, first served per relay, by the time of their first attempt,
  which the queue ticket carries, so whichever replica a retry reaches knows its place.
- Moves: a listener whose shard the map moved is sent to the new relay while this replica
  has spent less than `maxMigrationsPerMinute // replicas` moves in the last minute.

Time is a parameter everywhere; the shell passes the clock in.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from townsquare import tickets
from townsquare.api.names import relay_set_name
from townsquare.sharding import ShardMap, shard_of

MAX_ID_BYTES = 256
MOVE_WINDOW_SECONDS = 60.0
MAX_RETRY_FACTOR = 5
WAITERS_PER_RETRY_STEP = 100
"""Every this many joins ahead in line add one refresh interval to a Retry-After."""


@dataclass(frozen=True)
class Settings:
    """How one replica shares the work with the others."""

    replicas: int = 1
    """Edge replicas that may admit to the same relays (with an autoscaler: its maximum)."""
    admit_ttl: float = 10.0
    """Seconds an admit ticket is valid: a listener connects within it or not at all."""
    retry_after: float = 1.0
    """Seconds a queued listener waits before it retries (the refresh interval); listeners
    far back in line are told to wait longer, up to `MAX_RETRY_FACTOR` times this."""
    waiter_expiry: float = 5.0
    """A queued listener not heard from for this long past its Retry-After has given up."""
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


@dataclass(frozen=True)
class Queued:
    position: int
    waiting: int
    ticket: str
    retry_after: int
    reason: str


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


@dataclass
class _Waiter:
    first: float
    expires: float
    pod: str | None


@dataclass
class Room:
    """One room as one replica knows it: the map, its relays, reports, and its own queue."""

    namespace: str
    name: str
    shard_map: ShardMap
    slices: dict[str, dict[str, Endpoint]] = field(default_factory=dict)
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    reports: dict[str, Report] = field(default_factory=dict)
    admitted: dict[str, deque[float]] = field(default_factory=dict)
    """Admission times per pod, by this replica, still inside the report window."""
    waiters: dict[str, _Waiter] = field(default_factory=dict)
    queue: list[tuple[float, str]] = field(default_factory=list)
    """(first attempt, listener) of every waiter, sorted: the room's line."""
    lines: dict[str | None, list[tuple[float, str]]] = field(default_factory=dict)
    """The same per relay pod (None: the shard has no relay yet)."""
    moves: deque[float] = field(default_factory=deque)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

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

    def admit(self, pod: str, now: float) -> None:
        self.admitted.setdefault(pod, deque()).append(now)

    def wait(self, listener: str, first: float, pod: str | None, expires: float) -> None:
        """Put (or keep) the listener in line until `expires`; its place is its first attempt."""
        waiter = self.waiters.get(listener)
        if waiter is not None and (waiter.first, waiter.pod) != (first, pod):
            self.leave(listener)
            waiter = None
        if waiter is None:
            self.waiters[listener] = _Waiter(first, expires, pod)
            bisect.insort(self.queue, (first, listener))
            bisect.insort(self.lines.setdefault(pod, []), (first, listener))
        else:
            waiter.expires = expires

    def leave(self, listener: str) -> None:
        waiter = self.waiters.pop(listener, None)
        if waiter is None:
            return
        entry = (waiter.first, listener)
        _remove(self.queue, entry)
        line = self.lines.get(waiter.pod)
        if line is not None:
            _remove(line, entry)
            if not line:
                del self.lines[waiter.pod]

    def regroup(self) -> None:
        """Put every waiter in the line of its shard's relay under the current map, so a
        moved shard's waiters keep their places in the new relay's line at once."""
        lines: dict[str | None, list[tuple[float, str]]] = {}
        for first, listener in self.queue:  # sorted, so every line comes out sorted
            waiter = self.waiters[listener]
            waiter.pod = self.target(listener)[1]
            lines.setdefault(waiter.pod, []).append((first, listener))
        self.lines = lines

    def ahead(self, pod: str | None, first: float, listener: str) -> int:
        """Waiters for `pod` whose first attempt came before this one's."""
        return bisect.bisect_left(self.lines.get(pod, []), (first, listener))

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


def _remove(line: list[tuple[float, str]], entry: tuple[float, str]) -> None:
    index = bisect.bisect_left(line, entry)
    if index < len(line) and line[index] == entry:
        del line[index]


class Gate:
    """Every room one replica serves, and the decisions it makes for them."""

    def __init__(self, key: bytes, settings: Settings) -> None:
        self.key = tickets.check_key(key)
        self.settings = settings
        self.rooms: dict[tuple[str, str], Room] = {}
        self._pending_slices: dict[tuple[str, str], dict[str, dict[str, Endpoint]]] = {}

    # Updates from the watches and the reports.

    def set_map(self, namespace: str, name: str, shard_map: ShardMap | None) -> None:
        """A room's published map (None: the room is gone)."""
        key = (namespace, name)
        if shard_map is None:
            self.rooms.pop(key, None)
            return
        room = self.rooms.get(key)
        if room is None:
            room = Room(namespace, name, shard_map)
            for slice_name, endpoints in self._pending_slices.get(key, {}).items():
                room.set_slice(slice_name, endpoints)
            self.rooms[key] = room
        elif shard_map.generation >= room.shard_map.generation:
            moved = shard_map.assignment != room.shard_map.assignment
            room.shard_map = shard_map
            if moved:
                room.regroup()

    def set_slice(
        self, namespace: str, name: str, slice_name: str, endpoints: Mapping[str, Endpoint] | None
    ) -> None:
        """One EndpointSlice of a room's relays (None: deleted). Kept for rooms whose map
        has not arrived yet, since the two watches race."""
        key = (namespace, name)
        pending = self._pending_slices.setdefault(key, {})
        if endpoints is None:
            pending.pop(slice_name, None)
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

    def expire(self, now: float) -> None:
        for room in self.rooms.values():
            room.expire(now)
            while room.moves and room.moves[0] <= now - MOVE_WINDOW_SECONDS:
                room.moves.popleft()

    # Decisions.

    def join(self, room: Room, listener: str, ticket: str | None, now: float) -> Admitted | Queued:
        """Admit the listener to its shard's relay, or keep it in line.

        A forged or foreign ticket raises TicketError (the caller answers 400); an expired
        one simply starts a new place in line.
        """
        settings = self.settings
        first = now
        if ticket is not None:
            first = self._first_attempt(room, listener, ticket, now)
        shard, pod = room.target(listener)
        reason = room.unusable(pod, settings)
        if reason is None and ticket is None and room.shard_map.admission == "queueing":
            reason = "the room is queueing joins"
        ahead = room.ahead(pod, first, listener)
        if reason is None and pod is not None:
            if ahead >= room.spare(pod, settings):
                reason = f"relay {pod} is full" if ahead == 0 else f"{ahead} joins wait ahead"
            else:
                room.leave(listener)
                room.admit(pod, now)
                return self._admitted(room, listener, shard, pod)
        steps = min(MAX_RETRY_FACTOR, 1 + ahead // WAITERS_PER_RETRY_STEP)
        retry_after = max(1, math.ceil(settings.retry_after * steps))
        room.wait(listener, first, pod, now + retry_after + settings.waiter_expiry)
        claims = {"listener": listener, "room": room.key, "first": first}
        return Queued(
            position=bisect.bisect_left(room.queue, (first, listener)) + 1,
            waiting=len(room.waiters),
            ticket=tickets.sign(self.key, "queue", claims, expires=now + settings.queue_ttl),
            retry_after=retry_after,
            reason=reason or "queued",
        )

    def locate(self, room: Room, listener: str, current: str | None, now: float) -> Location | Held:
        """Where the listener's relay is; when its shard moved away from `current`, a ticket
        for the new relay, within the migration budget and the new relay's room."""
        shard, pod = room.target(listener)
        generation = room.shard_map.generation
        retry = max(1, math.ceil(self.settings.retry_after))
        if pod is None:
            return Held("no relay carries this shard yet", retry)
        address = room.endpoints.get(pod)
        relay = address.address if address else ""
        if current is None or current == pod:
            return Location(relay, pod, shard, generation, moved=False)
        reason = room.unusable(pod, self.settings)
        if reason is None and room.spare(pod, self.settings) <= 0:
            reason = f"relay {pod} is full"
        budget = room.shard_map.migrations_per_minute
        if reason is None and budget is not None:
            while room.moves and room.moves[0] <= now - MOVE_WINDOW_SECONDS:
                room.moves.popleft()
            if len(room.moves) >= budget // self.settings.replicas:
                reason = f"the migration budget ({budget:,}/min) is spent; stay on {current}"
        if reason is not None:
            return Held(reason, retry)
        room.admit(pod, now)
        room.moves.append(now)
        ticket = self._admit_ticket(room, listener, shard, pod, now)
        return Location(relay, pod, shard, generation, moved=True, ticket=ticket)

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

    def _admitted(self, room: Room, listener: str, shard: int, pod: str) -> Admitted:
        endpoint = room.endpoints[pod]
        last = room.admitted[pod][-1]
        return Admitted(
            relay=endpoint.address,
            pod=pod,
            shard=shard,
            generation=room.shard_map.generation,
            ticket=self._admit_ticket(room, listener, shard, pod, last),
        )

    def _admit_ticket(self, room: Room, listener: str, shard: int, pod: str, now: float) -> str:
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
            yield room, len(room.waiters), room.oldest_wait(now)
