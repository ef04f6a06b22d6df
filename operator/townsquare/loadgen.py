"""A load generator for tests and the demo: an audience that joins through the edge.

It replays a trace (`t_seconds,listeners`, t relative to the room's start, optionally sped
up). Listener i is `listener-i`; the first `wanted` of them want a relay. Each joins with
`POST /v1/rooms/{namespace}/{room}/join` at an edge replica, retries with its queue ticket
after `Retry-After` when it is held, asks `GET .../listeners/{id}?ticket=<its admit ticket>`
now and then whether its shard moved (and follows with the new ticket), rejoins when its
relay is gone, and leaves when the trace falls (the last to join leave first). It places
nobody itself.

It also plays the relays' side of the metric contract, since no relay process runs on the
local cluster yet: every Ready relay pod's `audioroom_relay_listeners` counts exactly the
listeners that connected to it with an admit ticket the edge signed for that pod (checked
with the shared key when one is given), so what Prometheus shows is what the edge admitted.
Every admission and move is also written, one JSON line each, to `--record`, so a test can
measure the order of admissions and the rate of moves without asking the edge; and so is
every listener a relay still held when it went (`dropped`: its pod stopped being Ready),
the relay's own count at its end, which no sample taken a moment before can stand for.

When the room's relays are real processes (the pod runner's: a loopback pod IP and an origin
annotation), up to `--real-listeners` of the audience are real listeners instead
(relay/listener.py): the earliest ones not yet connected when the relays are seen to be real
(keeping their place in the queue), then newcomers while there is room. Each joins through
its own edge replica (the next when that one does not answer), holds a TCP connection to
its relay in a process of its own (relay/crowd.py), follows moves and counts the frames it
hears. Only the rest is simulated as above; the relays count
the real ones themselves, so the metrics here count the simulated part only (for the relays
it placed someone on: a 0 for the others would stand for a relay's own count before
Prometheus first scrapes it), and the two parts are reported apart (metrics, and a
`summary` line in `--record` and on stdout at exit).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import json
import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import aiohttp
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from townsquare import tickets
from townsquare.api.names import relay_set_name
from townsquare.kube.client import Cluster, load_config
from townsquare.relay.crowd import CrowdProcess, MakeJoiner
from townsquare.relay.listener import EdgeJoiner
from townsquare.relay.saturation import measure_listener_cap
from townsquare.sim.trace import Trace

STEP_SECONDS = 0.2
PODS_SECONDS = 1.0
EACH = ("gaps", "stalls", "each", "record")
"""Parts of the real listeners' figures too long for every scrape: the summary only."""
REAL_LISTENERS: int | None = None
"""Real connections one load generator holds by default: None measures it at start
(`relay.saturation.measure_listener_cap`: how many this machine carries now, times CAP_SHARE)."""
ORIGIN_ANNOTATION = "townsquare.dev/origin"


def demand_at(trace: Trace, t: float) -> int:
    """Listeners the trace wants at `t` (linear between rows, flat outside them)."""
    times = trace.times
    if t <= times[0]:
        return round(trace.listeners[0])
    if t >= times[-1]:
        return round(trace.listeners[-1])
    right = bisect.bisect_right(times, t)
    left = right - 1
    share = (t - times[left]) / (times[right] - times[left])
    return round(trace.listeners[left] + (trace.listeners[right] - trace.listeners[left]) * share)


def _expiry(key: bytes, ticket: str) -> float | None:
    """When a genuine ticket expires (None for any other)."""
    try:
        expires = tickets.genuine(key, ticket, "admit").get("exp")
    except tickets.TicketError:
        return None
    return float(expires) if isinstance(expires, int | float) else None


class Relays:
    """The relays' side: who is connected where, counted as each relay would count."""

    def __init__(self, room: str, key: bytes | None = None) -> None:
        self.room = room
        """namespace/name, as admit tickets name it."""
        self.key = key
        self.connected: dict[str, set[str]] = {}
        self.ready: set[str] = set()
        self.refused = 0
        """Connections refused for a bad ticket (none, if the edge is right)."""
        self.late = 0
        """Connections refused for a ticket that was valid when this process asked for it
        and expired before it used it: this process was late (a loaded machine stalls it
        for seconds), not the edge wrong. The listener asks again, as a real one would."""
        self.only_placed = False
        """Count only relays this process ever placed a listener on: set when the relays
        are real processes, which count the rest themselves. Counting 0 for a Ready relay
        whose own count Prometheus has not scraped yet would make it look empty: the
        edge adds the sources up, and filled one to 100 real + 14 simulated that way."""
        self.placed: set[str] = set()

    def connect(
        self, listener: str, pod: str, ticket: str, now: float, asked_at: float | None = None
    ) -> bool:
        """Accept a listener presenting an admit ticket for this pod; refuse a bad one.
        `asked_at`: when the request that brought the ticket was sent. A ticket that expired
        after then was good when the edge gave it (counted late, not refused)."""
        if self.key is not None:
            try:
                claims = tickets.verify(self.key, ticket, "admit", now=now)
            except tickets.TicketError:
                expires = _expiry(self.key, ticket)  # a genuine admit ticket fails only late
                if expires is not None and asked_at is not None and expires > asked_at:
                    self.late += 1
                else:
                    self.refused += 1
                return False
            if (claims.get("listener"), claims.get("pod"), claims.get("room")) != (
                listener,
                pod,
                self.room,
            ):
                self.refused += 1
                return False
        self.connected.setdefault(pod, set()).add(listener)
        self.placed.add(pod)
        return True

    def disconnect(self, listener: str, pod: str) -> None:
        self.connected.get(pod, set()).discard(listener)

    def set_ready(self, pods: set[str]) -> set[str]:
        """The Ready relay pods now; returns the listeners of relays that are gone."""
        self.ready = set(pods)
        self.placed &= self.ready  # a pod of that name again is a new relay
        dropped: set[str] = set()
        for pod in [p for p in self.connected if p not in pods]:
            dropped |= self.connected.pop(pod)
        return dropped

    def on_two_relays(self) -> int:
        """Listeners that two relays both count: zero unless a listener was placed twice."""
        seen: set[str] = set()
        twice = 0
        for members in self.connected.values():
            twice += len(members & seen)
            seen |= members
        return twice

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.ready, 0)
        counts.update({pod: len(members) for pod, members in self.connected.items()})
        if self.only_placed:
            return {pod: n for pod, n in counts.items() if pod in self.placed}
        return counts


@dataclass
class RelayIdentities:
    """Ready relay pods by name, told apart from a pod back under the same name: a relay
    replaced between two looks is a new relay, and its listeners went with the old one."""

    uids: dict[str, str] = field(default_factory=dict)

    def ready(self, seen: Mapping[str, str]) -> set[str]:
        """The Ready pods (name -> uid) this look; one whose uid changed since the last look
        is left out once, so that its old listeners are dropped (it counts from the next)."""
        renewed = {name for name, uid in seen.items() if self.uids.get(name, uid) != uid}
        self.uids = dict(seen)
        return set(seen) - renewed


def runs_real_relays(pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether relay pods (API objects) are real processes: the pod runner starts one for a
    running pod with a loopback IP, container args that run the reference relay, and an
    origin on loopback to pull from."""
    for pod in pods:
        ip = (pod.get("status") or {}).get("podIP") or ""
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        origin = str(annotations.get(ORIGIN_ANNOTATION) or "")
        if (
            ip.startswith("127.")
            and origin.startswith("127.")
            and list(containers[0].get("args") or [])[:1] == ["relay"]
        ):
            return True
    return False


class RealListeners:
    """Up to `cap` listeners holding real connections to real relays, in a process of their
    own (relay/crowd.py: in this one, the simulation kept them from reading for seconds at
    a time in a join storm); which of them are held here, and what they heard."""

    def __init__(self, make_joiner: MakeJoiner, cap: int) -> None:
        self.make_joiner, self.cap = make_joiner, cap
        self.enabled = False
        """Set once the room's relays are seen to be real processes."""
        self.held: set[str] = set()
        self.crowd: CrowdProcess | None = None
        """Started with the first real listener."""
        self.final: dict[str, Any] | None = None

    def can_take(self) -> bool:
        return self.enabled and len(self.held) < self.cap

    def start(
        self, name: str, queue_ticket: str | None = None, line: dict[str, Any] | None = None
    ) -> None:
        """A real listener `name`; with the queue ticket it holds, it keeps its place (and
        `line`, its way in so far, goes on being timed by the crowd)."""
        if self.crowd is None:
            self.crowd = CrowdProcess(self.make_joiner)
        self.held.add(name)
        self.crowd.start(name, queue_ticket, line)

    def leave(self, name: str) -> None:
        self.held.discard(name)
        if self.crowd is not None:
            self.crowd.leave(name)

    def connected(self, name: str) -> bool:
        return self.crowd is not None and name in self.crowd.connected

    async def close(self) -> None:
        """Every listener leaves; what they heard is kept for `figures(each=True)`."""
        self.held.clear()
        if self.crowd is not None and self.final is None:
            self.final = await asyncio.to_thread(self.crowd.close)

    def figures(self, each: bool = False) -> dict[str, Any]:
        """What the real listeners heard, measured at the receiving end (the crowd's last
        word; with `each`, after `close`, everything including every gap)."""
        if self.final is not None:
            return self.final if each else {k: v for k, v in self.final.items() if k not in EACH}
        if self.crowd is None:
            return {"listeners": 0, "frames": 0, "frames_lost": 0,
                    "listeners_that_lost_frames": 0, "longest_gap_s": 0.0}  # fmt: skip
        self.crowd.refresh()
        return dict(self.crowd.latest)


ID_PREFIX = "listener-"
"""Listener i of a load generator is `listener-i` unless it is given another prefix."""


@dataclass
class Listener:
    index: int
    state: str = "idle"
    """idle (wants to join), waiting (holds a queue ticket), connected, or turned_away (the
    room took no new joins: its event was over)."""
    pod: str | None = None
    ticket: str | None = None
    """While waiting: the queue ticket that keeps its place."""
    seat: str | None = None
    """While connected: the admit ticket of its relay, which proves the seat to a move."""
    due: float = 0.0
    busy: bool = False
    first_attempt: float | None = None
    first_answered: float | None = None
    """When the answer to the first attempt came back (the edge saw it in between)."""
    queued: bool = False
    place: tuple[int, int, float, int] | None = None
    """The first 429's position and waiting, when it came back, and from which edge."""
    late: float = 0.0
    """While queued: the most it retried after its own schedule (a busy machine)."""
    tries: list[list[Any]] = field(default_factory=list)
    """Its join requests an edge answered until it got in: [sent, answered, status,
    Retry-After, replica] each, so that a test can tell when its place in line may have
    lapsed (a retry later than the edge keeps a place for, or its replica gone)."""
    real: bool = False
    """Held by a real listener (RealListeners) rather than simulated here."""
    gone: bool = False
    """Left the audience (the trace fell); a request still out is undone when it ends."""
    prefix: str = ID_PREFIX

    @property
    def id(self) -> str:
        return f"{self.prefix}{self.index}"


@dataclass
class Audience:
    """The listeners of one room and what they did; driven by `step` and `act`."""

    namespace: str
    room: str
    edges: Sequence[str]
    relays: Relays
    check_every: float = 5.0
    record: IO[str] | None = None
    listeners: list[Listener] = field(default_factory=list)
    wanted: int = 0
    moves: int = 0
    joins: dict[str, int] = field(default_factory=dict)
    down_until: dict[int, float] = field(default_factory=dict)
    real: RealListeners | None = None
    real_cap_measured: dict[str, Any] | None = None
    """How many real listeners a measurement at start found this machine carries (None:
    the cap was given)."""
    id_prefix: str = ID_PREFIX
    """Listener i is `<id_prefix>i`: two load generators for one room need two prefixes."""

    def step(self, wanted: int, now: float) -> list[Listener]:
        """Grow or shrink the audience to `wanted`; the listeners due for a request."""
        self.wanted = wanted
        while len(self.listeners) < wanted:
            listener = Listener(len(self.listeners), due=now, prefix=self.id_prefix)
            if self.real is not None and self.real.can_take():
                listener.real = True
                self.real.start(listener.id)
            self.listeners.append(listener)
        while len(self.listeners) > wanted:
            # The last to join leave first, also one whose request is still out (with
            # thousands queued behind the concurrency limit, the last is nearly always busy,
            # and waiting for it kept a whole audience from ever leaving): `act` finishes it.
            gone = self.listeners.pop()
            gone.gone = True
            if gone.queued and gone.state == "waiting":
                self._write_queued("left", gone, now)
            if gone.real and self.real is not None:
                self.real.leave(gone.id)
            elif gone.state == "connected" and gone.pod:
                self.relays.disconnect(gone.id, gone.pod)
        return [lr for lr in self.listeners if not lr.real and not lr.busy and lr.due <= now]

    def make_real(self) -> None:
        """Once the relays are seen to be real processes, the earliest listeners not yet
        connected become real ones, with their place in the queue: the audience arrives
        before the relays start, and real listeners should be the first in line (and, as the
        last to leave, hear every drain) rather than whoever joins once relays run."""
        if self.real is None:
            return
        for listener in self.listeners:
            if not self.real.can_take():
                return
            if listener.real or listener.busy or listener.state == "connected":
                continue
            listener.real = True
            line = None
            if listener.first_attempt is not None:
                line = {
                    "first": listener.first_attempt,
                    "first_answered": listener.first_answered,
                    "queued": listener.queued,
                    "place": listener.place,
                    "due": listener.due,
                    "late": listener.late,
                    "tries": listener.tries,
                }
            self.real.start(listener.id, listener.ticket, line)

    def relays_changed(self, ready: set[str], now: float) -> None:
        """Listeners of a relay that is gone lost their connection: they join again."""
        dropped = self.relays.set_ready(ready)
        for listener in self.listeners:
            if listener.state == "connected" and listener.id in dropped:
                self._write(event="dropped", listener=listener.id, pod=listener.pod, at=now)
                listener.state, listener.pod, listener.due = "idle", None, now
                listener.seat = None

    def edge_for(self, listener: Listener, now: float) -> tuple[int, str]:
        """The listener's own replica (as a load balancer hashing on it would pick), or the
        next one that answers."""
        count = len(self.edges)
        for step in range(count):
            index = (listener.index + step) % count
            if self.down_until.get(index, 0.0) <= now:
                return index, self.edges[index]
        index = listener.index % count
        return index, self.edges[index]

    async def act(self, session: aiohttp.ClientSession, listener: Listener) -> None:
        listener.busy = True
        index = -1
        try:
            index, edge = self.edge_for(listener, time.time())
            if listener.state == "connected":
                await self._check(session, edge, listener)
            else:
                await self._join(session, edge, listener, index)
        except (aiohttp.ClientError, TimeoutError):
            self.down_until[index] = time.time() + 2.0
            listener.due = time.time() + 0.2
            self._count("unreachable")
        finally:
            listener.busy = False
            if listener.gone and listener.state == "connected" and listener.pod:
                self._undo(listener)

    def _undo(self, gone: Listener) -> None:
        """A listener that left while its request was out connected after all: it goes,
        unless the audience grew back meanwhile and its successor (same id) holds that pod."""
        index = gone.index
        successor = self.listeners[index] if index < len(self.listeners) else None
        if successor is None or (successor.state, successor.pod) != ("connected", gone.pod):
            self.relays.disconnect(gone.id, gone.pod or "")

    def _path(self, tail: str) -> str:
        return f"/v1/rooms/{quote(self.namespace)}/{quote(self.room)}/{tail}"

    async def _join(
        self, session: aiohttp.ClientSession, edge: str, listener: Listener, index: int
    ) -> None:
        body: dict[str, str] = {"listener": listener.id}
        if listener.ticket:
            body["ticket"] = listener.ticket
        began = time.time()
        if listener.queued:
            listener.late = max(listener.late, began - listener.due)
        async with session.post(edge + self._path("join"), json=body) as response:
            answer = await response.json(content_type=None)
            status = response.status
            retry = float(response.headers.get("Retry-After", "1"))
        now = time.time()
        if listener.first_attempt is None:
            # The first attempt an edge answered: a replica that could not be reached took
            # no place in line for it.
            listener.first_attempt, listener.first_answered = began, now
            listener.tries = []
        listener.tries.append([round(began, 4), round(now, 4), status, retry, index])
        if status == 200:
            self._count("admitted")
            if not self.relays.connect(listener.id, answer["pod"], answer["ticket"], now, began):
                listener.due = now + 1.0
                return
            listener.state, listener.pod, listener.ticket = "connected", answer["pod"], None
            listener.seat = answer["ticket"]
            listener.due = now + self.check_every * random.uniform(0.5, 1.5)
            self._write_queued(
                "admitted",
                listener,
                now,
                asked=began,
                pod=answer["pod"],
                generation=answer["generation"],
                queued=listener.queued,
                late=round(listener.late, 3),
                edge=index,
                place=listener.place,
                tries=listener.tries if listener.queued else [],
            )
            listener.first_attempt, listener.queued, listener.late = None, False, 0.0
            listener.place = None
        elif status == 429:
            self._count("queued")
            if not listener.queued:
                listener.place = (answer["position"], answer["waiting"], now, index)
            listener.state, listener.queued = "waiting", True
            listener.ticket = answer["ticket"]
            listener.due = now + retry * random.uniform(0.8, 1.2)
        elif status == 410:  # the room takes no new joins: final, so it asks no more
            self._count("closed")
            listener.state, listener.ticket, listener.due = "turned_away", None, math.inf
        else:
            self._count(str(status))
            listener.due = now + 1.0

    async def _check(self, session: aiohttp.ClientSession, edge: str, listener: Listener) -> None:
        url = edge + self._path(f"listeners/{quote(listener.id)}")
        params = {"ticket": listener.seat} if listener.seat else {}
        began = time.time()
        async with session.get(url, params=params) as response:
            answer = await response.json(content_type=None)
            status = response.status
        now = time.time()
        listener.due = now + self.check_every * random.uniform(0.5, 1.5)
        if status != 200 or not answer.get("moved") or listener.state != "connected":
            return
        old = listener.pod or ""
        if self.relays.connect(listener.id, answer["pod"], answer["ticket"], now, began):
            self.relays.disconnect(listener.id, old)
            listener.pod, listener.seat = answer["pod"], answer["ticket"]
            self.moves += 1
            self._write(
                event="moved",
                listener=listener.id,
                at=now,
                generation=answer["generation"],
                to=listener.pod,
                **{"from": old},
            )

    def _count(self, outcome: str) -> None:
        self.joins[outcome] = self.joins.get(outcome, 0) + 1

    def _write_queued(self, event: str, listener: Listener, now: float, **more: Any) -> None:
        """A listener's line in the record, with the times its place in line is judged by."""
        self._write(
            event=event,
            listener=listener.id,
            first=listener.first_attempt,
            first_answered=listener.first_answered,
            at=now,
            **more,
        )

    def _write(self, **event: Any) -> None:
        if self.record is not None:
            self.record.write(json.dumps(event) + "\n")
            self.record.flush()

    def summary(self) -> dict[str, int]:
        """The audience by state, real listeners included (connected once a relay welcomed
        them)."""
        states: dict[str, int] = {"idle": 0, "waiting": 0, "connected": 0, "turned_away": 0}
        for listener in self.listeners:
            if listener.real and self.real is not None:
                states["connected" if self.real.connected(listener.id) else "idle"] += 1
            else:
                states[listener.state] += 1
        return states

    def split(self) -> dict[str, int]:
        """How much of the audience is real connections and how much is simulated."""
        real = sum(1 for listener in self.listeners if listener.real)
        return {"real": real, "simulated": len(self.listeners) - real}

    def report(self) -> dict[str, Any]:
        """The summary written at exit: the split, and what the real listeners heard."""
        return {
            "event": "summary",
            "namespace": self.namespace,
            "room": self.room,
            "audience": self.split(),
            "real_cap": self.real.cap if self.real is not None else 0,
            "real_cap_measured": self.real_cap_measured,
            "relays_real": bool(self.real and self.real.enabled),
            "simulated_moves": self.moves,
            "real": self.real.figures(each=True) if self.real is not None else None,
        }


@dataclass(frozen=True)
class Snapshot:
    """The figures /metrics shows, taken by the audience's loop after every step, so that
    the scrape (served from its own thread) never waits behind the audience's requests."""

    namespace: str
    room: str
    counts: dict[str, int]
    wanted: int
    states: dict[str, int]
    on_two_relays: int
    moves: int
    refused: int
    late: int
    split: dict[str, int] = field(default_factory=dict)
    real: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, audience: Audience) -> Snapshot:
        return cls(
            audience.namespace,
            audience.room,
            audience.relays.counts(),
            audience.wanted,
            audience.summary(),
            audience.relays.on_two_relays(),
            audience.moves,
            audience.relays.refused,
            audience.relays.late,
            audience.split(),
            audience.real.figures() if audience.real is not None else {},
        )


class LoadCollector(Collector):
    """The metric contract for every relay pod, and the audience's own figures."""

    def __init__(self, latest: list[Snapshot], capacity: int | None) -> None:
        self.latest = latest
        self.capacity = capacity

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if not self.latest:
            return
        audience = self.latest[-1]
        room = [audience.namespace, audience.room]
        labels = ["namespace", "room", "pod"]
        listeners = GaugeMetricFamily(
            "audioroom_relay_listeners", "Connected listeners per relay", labels=labels
        )
        capacity = GaugeMetricFamily(
            "audioroom_relay_capacity_listeners", "Declared relay capacity", labels=labels
        )
        for pod, count in sorted(audience.counts.items()):
            listeners.add_metric([*room, pod], count)
            if self.capacity is not None:
                capacity.add_metric([*room, pod], self.capacity)
        wanted = _per_room(
            GaugeMetricFamily, "audioroom_edge_wanted_listeners",
            "Listeners who want to be connected (the trace's demand)", room, audience.wanted,
        )  # fmt: skip
        states = _by_label(
            "audioroom_loadgen_listeners",
            "The audience by state: idle, waiting (queued), connected",
            room, "state", audience.states,
        )  # fmt: skip
        twice = _per_room(
            GaugeMetricFamily, "audioroom_loadgen_listeners_on_two_relays",
            "Listeners that two relays both count", room, audience.on_two_relays,
        )  # fmt: skip
        moves = _per_room(
            CounterMetricFamily, "audioroom_loadgen_moves",
            "Listeners that followed a moved shard", room, audience.moves,
        )  # fmt: skip
        refused = _per_room(
            CounterMetricFamily, "audioroom_loadgen_refused_tickets",
            "Connections the relays refused for a bad admit ticket", room, audience.refused,
        )  # fmt: skip
        late = _per_room(
            CounterMetricFamily, "audioroom_loadgen_late_tickets",
            "Admit tickets that expired between the edge's answer and their use here", room,
            audience.late,
        )  # fmt: skip
        split = _by_label(
            "audioroom_loadgen_audience",
            "The audience by kind: real connections to real relays, or simulated here",
            room, "kind", audience.split,
        )  # fmt: skip
        yield from (listeners, capacity, wanted, states, twice, moves, refused, late, split)
        yield from self._real(audience, room)

    def _real(self, audience: Snapshot, room: list[str]) -> Iterator[GaugeMetricFamily]:
        """What the real listeners heard (measured by them), when there are any."""
        names = {
            "frames": "Frames the real listeners received",
            "frames_lost": "Frame numbers the real listeners never received",
            "listeners_that_lost_frames": "Real listeners that lost at least one frame",
            "longest_gap_s": "The longest silence any real listener heard, in seconds",
        }
        for name, help_text in names.items():
            if name in audience.real:
                family = GaugeMetricFamily(
                    f"audioroom_loadgen_real_{name.removesuffix('_s')}"
                    + ("_seconds" if name.endswith("_s") else ""),
                    help_text,
                    labels=["namespace", "room"],
                )
                family.add_metric(room, float(audience.real[name]))
                yield family


async def play(
    audience: Audience,
    trace: Trace,
    start: datetime,
    speed: float,
    ready_pods: Any,
    stop: asyncio.Event,
    concurrency: int = 64,
    latest: list[Snapshot] | None = None,
    relays_real: Callable[[], bool] | None = None,
) -> None:
    """Drive the audience along the trace until it ends (or `stop` is set)."""
    limit = asyncio.Semaphore(concurrency)
    pods_at = 0.0
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)
    ) as session:
        pending: set[asyncio.Task[None]] = set()

        async def limited(listener: Listener) -> None:
            async with limit:
                await audience.act(session, listener)

        while not stop.is_set():
            now = time.time()
            trace_t = (now - start.timestamp()) * speed
            if now >= pods_at:
                with contextlib.suppress(Exception):
                    audience.relays_changed(await asyncio.to_thread(ready_pods), now)
                if audience.real is not None and not audience.real.enabled and relays_real:
                    with contextlib.suppress(Exception):
                        audience.real.enabled = await asyncio.to_thread(relays_real)
                        audience.relays.only_placed = audience.real.enabled
                        audience.make_real()
                pods_at = now + PODS_SECONDS
            for listener in audience.step(demand_at(trace, trace_t), now):
                listener.busy = True
                task = asyncio.create_task(limited(listener))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if latest is not None:
                latest[:] = [Snapshot.of(audience)]
            if trace_t > trace.times[-1] and audience.wanted == 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STEP_SECONDS)
        for task in list(pending):
            task.cancel()
        if audience.real is not None:
            await audience.real.close()


def run(
    namespace: str,
    room: str,
    trace: Trace,
    start: datetime,
    port: int,
    edges: Sequence[str],
    speed: float = 1.0,
    key: bytes | None = None,
    record: Path | None = None,
    check_every: float = 5.0,
    real_listeners: int | None = REAL_LISTENERS,
    id_prefix: str = ID_PREFIX,
) -> None:
    """Play `trace` for one room through the edge until it ends (or SIGTERM/SIGINT), serving
    /metrics; the summary goes to stdout and `record` at the end. `real_listeners` None:
    as many as a measurement at start finds this machine carries."""
    import uvloop

    cluster = Cluster(load_config())
    spec = cluster.read_room(namespace, room).get("spec", {})
    capacity = spec.get("relay", {}).get("listenersPerRelay")

    identities = RelayIdentities()

    def ready_pods() -> set[str]:
        return identities.ready(
            {
                f"{relay_set_name(room)}-{pod.ordinal}": pod.uid
                for pod in cluster.relay_pods(namespace, room)
                if pod.ready
            }
        )

    def relays_real() -> bool:
        response = cluster.core.list_namespaced_pod(
            namespace, label_selector=f"townsquare.dev/room={room}", _preload_content=False
        )
        return runs_real_relays(json.loads(response.data).get("items", []))

    async def main() -> None:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(record.open("a")) if record else None
            audience = Audience(
                namespace,
                room,
                [e.rstrip("/") for e in edges],
                Relays(f"{namespace}/{room}", key),
                check_every=check_every,
                record=sink,
                id_prefix=id_prefix,
            )
            cap = real_listeners
            if cap is None:
                measured = await measure_listener_cap()
                audience.real_cap_measured = measured.as_record()
                print(json.dumps({"event": "real listeners measured", **measured.as_record()}),
                      flush=True)  # fmt: skip
                cap = measured.use
            if cap > 0:
                joiner = functools.partial(
                    EdgeJoiner, edge_url=list(audience.edges), namespace=namespace, room=room
                )
                audience.real = RealListeners(joiner, cap)
            latest: list[Snapshot] = []
            registry = CollectorRegistry()
            registry.register(LoadCollector(latest, capacity))
            server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            try:
                await play(
                    audience, trace, start, speed, ready_pods, stop, latest=latest,
                    relays_real=relays_real,
                )  # fmt: skip
                report = json.dumps(audience.report())
                print(report, flush=True)
                if sink is not None:
                    sink.write(report + "\n")
                    sink.flush()
            finally:
                server.shutdown()
                thread.join(timeout=5)

    uvloop.run(main())


def _per_room(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    text: str,
    room: list[str],
    value: float,
) -> GaugeMetricFamily | CounterMetricFamily:
    """One series for the whole room, labelled by namespace and room."""
    metric = family(name, text, labels=["namespace", "room"])
    metric.add_metric(room, value)
    return metric


def _by_label(
    name: str, text: str, room: list[str], label: str, counts: Mapping[str, float]
) -> GaugeMetricFamily:
    """One gauge series per value of `label` in the room (the audience by state or kind)."""
    metric = GaugeMetricFamily(name, text, labels=["namespace", "room", label])
    for value, count in counts.items():
        metric.add_metric([*room, value], count)
    return metric
