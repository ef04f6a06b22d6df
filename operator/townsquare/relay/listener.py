"""A listener as a program: join, hold a relay connection, count what arrives, move, rejoin.

Used by the tests, the benchmark and the load generator. Every figure here is measured at
the receiving end: frames that arrived, numbers that never did, and the longest silence.

Where to connect comes from a `Joiner`: the edge in production (`EdgeJoiner`), or
`MapJoiner` (the shard map plus the shared key) where there is no edge. When a relay says
"move" with a grace period, the listener asks the joiner where to go, connects there, and
leaves the old relay only once the new one has welcomed it (make-before-break), resuming
from the frame after the last one it heard; when the edge holds the move (budget spent), it
stays and the relay asks again later. A lost connection or a move without grace means a
fresh join.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from urllib.parse import quote

import aiohttp

from townsquare.relay.protocol import FRAME_HEADER, Decoder, Kind, ProtocolError, control
from townsquare.relay.topology import MapSource, Resolver, relay_pod_name
from townsquare.sharding import shard_of
from townsquare.tickets import sign


@dataclass(frozen=True)
class Admission:
    host: str
    port: int
    ticket: str
    pod: str


class NoRelayYetError(Exception):
    """No relay for this listener now (queued, or no map yet): try again after a while."""

    def __init__(self, reason: str, retry_after: float = 0.2) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RoomClosedError(Exception):
    """The room takes no new joins (its event is over, or it is being deleted): final."""


class Joiner(Protocol):
    async def join(self, listener: str) -> Admission: ...

    async def relocate(self, listener: str, current: Admission) -> Admission | None:
        """Where to go now that the current relay asked us to move; None: stay for now.
        `current` is the admission the listener holds: its ticket proves its seat."""
        ...


@dataclass
class Interruption:
    """A stretch without frames: from the last frame before it to the first after it."""

    started: float
    seconds: float
    cause: str
    lost: int
    """Frame numbers that never arrived across it (0 when the new relay replayed them)."""


@dataclass
class ListenerStats:
    frames: int = 0
    lost: int = 0
    duplicates: int = 0
    first_seq: int = -1
    last_seq: int = -1
    longest_gap: float = 0.0
    moves: Counter[str] = field(default_factory=Counter)
    """Move notices received, by reason."""
    relocations: int = 0
    """Moves completed make-before-break."""
    refusals: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    joins: int = 0
    turned_away: int = 0
    """Joins the room refused for good (closed: its event was over); the listener left."""
    relays: list[str] = field(default_factory=list)
    """Pods this listener was welcomed by, in order."""
    interruptions: list[Interruption] = field(default_factory=list)
    """Moves, lost connections, and any other gap that skipped frames or was notable."""


WELCOME_SECONDS = 2.0
"""How long a moving listener waits for the new relay's welcome before it gives up and stays:
so two relays hold it at once for at most this long (plus the old one noticing it left)."""
UNANNOUNCED = "no notice"
"""The cause of a gap that no move or lost connection explains (a stalled relay or upstream)."""
NOTABLE_GAP = 0.1
"""Seconds of silence a listener notices (five 20 ms frames): such a gap is kept as an
interruption even when nothing announced it, and so is any gap that skipped frames."""


class Listener:
    def __init__(
        self, name: str, joiner: Joiner, *, resume: bool = True, notable_gap: float = NOTABLE_GAP
    ) -> None:
        self.name = name
        self.joiner = joiner
        self.resume = resume
        self.notable_gap = notable_gap
        self.stats = ListenerStats()
        self.connected = asyncio.Event()
        self.pod: str | None = None
        self._last_arrival: float | None = None
        self._cause: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop`."""
        backoff = 0.05
        while not stop.is_set():
            try:
                admission = await self.joiner.join(self.name)
                self.stats.joins += 1
                session = await self._connect(admission)
            except NoRelayYetError as wait:
                await _sleep_or_stop(stop, max(wait.retry_after, 0.05))
                continue
            except RoomClosedError:
                self.stats.turned_away += 1
                return
            except (OSError, aiohttp.ClientError):
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            outcome = await self._hold(session, stop)
            self.connected.clear()
            if outcome == "refused":
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 1.0)
            else:
                backoff = 0.05

    async def _connect(self, admission: Admission) -> _Session:
        loop = asyncio.get_running_loop()
        session = _Session(self, admission)
        await loop.create_connection(
            functools.partial(_same, session), admission.host, admission.port
        )
        return session

    async def _hold(self, session: _Session, stop: asyncio.Event) -> str:
        """Keep one session going, switching relays when told to move; how it ended."""
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while True:
                notice = asyncio.ensure_future(session.move_notice.wait())
                ended = cast("asyncio.Future[Any]", session.ended)
                await asyncio.wait({stopped, ended, notice}, return_when=asyncio.FIRST_COMPLETED)
                notice.cancel()
                if stop.is_set():
                    session.close()
                    return "stopped"
                if session.ended.done():
                    return session.ended.result()
                session.move_notice.clear()
                session = await self._relocate(session)
        finally:
            stopped.cancel()

    async def _relocate(self, session: _Session) -> _Session:
        """Connect to the relay the joiner names; leave the old one once welcomed there."""
        try:
            admission = await self.joiner.relocate(self.name, session.admission)
            if admission is None:
                return session  # held: the relay will ask again
            new = await self._connect(admission)
        except (NoRelayYetError, OSError, aiohttp.ClientError):
            return session
        welcomed = asyncio.ensure_future(new.welcomed.wait())
        ended = cast("asyncio.Future[Any]", new.ended)
        await asyncio.wait(
            {welcomed, ended}, timeout=WELCOME_SECONDS, return_when=asyncio.FIRST_COMPLETED
        )
        welcomed.cancel()
        if not new.welcomed.is_set() or new.ended.done():
            new.close()
            return session
        self._cause = f"relocated: {session.move_reason}"
        session.close()
        self.stats.relocations += 1
        return new

    def _on_frame(self, body: bytes) -> None:
        seq, _ = FRAME_HEADER.unpack_from(body)
        stats = self.stats
        now = time.monotonic()
        if stats.last_seq >= 0 and seq <= stats.last_seq:
            stats.duplicates += 1
            return
        missing = seq - stats.last_seq - 1 if stats.last_seq >= 0 else 0
        stats.lost += missing
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            stats.longest_gap = max(stats.longest_gap, gap)
            if self._cause is not None or missing or gap >= self.notable_gap:
                cause = self._cause or UNANNOUNCED
                stats.interruptions.append(Interruption(self._last_arrival, gap, cause, missing))
        self._cause = None
        if stats.first_seq < 0:
            stats.first_seq = seq
        stats.last_seq = seq
        stats.frames += 1
        self._last_arrival = now


def _same(session: _Session) -> _Session:
    return session


class _Session(asyncio.Protocol):
    """One connection to one relay; `ended` says how it ended (moved, refused, lost)."""

    def __init__(self, listener: Listener, admission: Admission) -> None:
        self.listener = listener
        self.admission = admission
        self.decoder = Decoder()
        self.transport: asyncio.Transport | None = None
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.welcomed = asyncio.Event()
        self.move_notice = asyncio.Event()
        self.move_reason = ""
        self._closed_by_us = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        stats = self.listener.stats
        resume = stats.last_seq + 1 if self.listener.resume and stats.last_seq >= 0 else None
        hello = {"v": 1, "role": "listener", "ticket": self.admission.ticket, "from": resume}
        self.transport.write(control(Kind.HELLO, hello))

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        try:
            messages = self.decoder.feed(data)
        except ProtocolError:
            self._end("lost", "relay broke the protocol")
            return
        for message in messages:
            if message.kind is Kind.FRAME:
                listener._on_frame(message.body)
            elif message.kind is Kind.WELCOME:
                listener.stats.relays.append(self.admission.pod)
                listener.pod = self.admission.pod
                listener.connected.set()
                self.welcomed.set()
            elif message.kind is Kind.MOVE:
                fields = message.fields()
                self.move_reason = str(fields.get("reason", "?"))
                listener.stats.moves[self.move_reason] += 1
                if float(fields.get("grace") or 0) > 0:
                    self.move_notice.set()
                else:
                    self._end("moved", f"moved: {self.move_reason}")
                    return
            elif message.kind is Kind.REFUSE:
                reason = str(message.fields().get("reason", "?"))
                listener.stats.refusals[reason] += 1
                self._end("refused", f"refused: {reason}")
                return

    def _end(self, outcome: str, cause: str) -> None:
        if not self.ended.done():
            self.listener._cause = cause
            self.ended.set_result(outcome)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended.done():
            return
        if self._closed_by_us:
            # We left (a move, or stopping): whatever caused the gap is already said, and
            # "connection lost" would relabel every move's gap.
            self.ended.set_result("closed")
            return
        self.listener.stats.disconnects += 1
        self._end("lost", "connection lost")

    def close(self) -> None:
        self._closed_by_us = True
        if self.transport is not None:
            self.transport.close()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class MapJoiner:
    """Joins decided from the shard map and signed with the shared key: an edge's answer
    without the edge, for tests and the benchmark (no queue, no capacity check)."""

    def __init__(
        self,
        maps: MapSource,
        resolver: Resolver,
        key: bytes,
        namespace: str,
        room: str,
        ticket_seconds: float = 30.0,
    ) -> None:
        self.maps, self.resolver, self.key = maps, resolver, key
        self.namespace, self.room, self.ticket_seconds = namespace, room, ticket_seconds

    async def join(self, listener: str) -> Admission:
        shard_map = await self.maps.read()
        if shard_map is None:
            raise NoRelayYetError("no shard map yet")
        shard = shard_of(listener, shard_map.shards)
        relay = shard_map.assignment[shard]
        if relay is None or shard_map.relays.get(relay) != "active":
            raise NoRelayYetError(f"shard {shard} has no active relay")
        address = await self.resolver.relay_address(relay)
        if address is None:
            raise NoRelayYetError(f"relay {relay} has no address")
        pod = relay_pod_name(self.room, relay)
        claims = {
            "listener": listener,
            "room": f"{self.namespace}/{self.room}",
            "pod": pod,
            "shard": shard,
            "generation": shard_map.generation,
        }
        ticket = sign(self.key, "admit", claims, expires=time.time() + self.ticket_seconds)
        return Admission(address[0], address[1], ticket, pod)

    async def relocate(self, listener: str, current: Admission) -> Admission | None:
        try:
            admission = await self.join(listener)
        except NoRelayYetError:
            return None
        return None if admission.pod == current.pod else admission


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) as the edge writes a relay's address."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass
class JoinLine:
    """One listener's way in, as it timed it (wall-clock seconds): the first attempt an edge
    answered, its first place in line, how late it came back, so that the order in which
    queued listeners got in can be judged from the listeners' side."""

    first: float | None = None
    first_answered: float | None = None
    queued: bool = False
    place: tuple[int, int, float, int] | None = None
    """The first 429's position and waiting, when it came back, and from which replica."""
    due: float | None = None
    late: float = 0.0
    tries: list[list[Any]] = field(default_factory=list)
    """Join requests an edge answered: [sent, answered, status, Retry-After, replica]."""


class EdgeJoiner:
    """Joins through the edge's HTTP API, keeping the queue ticket across retries.

    With several edge replicas (`edge_url` a list), each listener asks its own replica (a
    stable hash of its id, as a load balancer hashing on it would pick) and the next one
    when that does not answer (a replica killed mid-request): tickets are signed with the
    shared key, so any replica honours them. Every admission, and every queued listener that
    left before its turn (`left_line`), is kept in `record` with the times of the listener's
    way in (the load generator's record format)."""

    def __init__(self, session: aiohttp.ClientSession, edge_url: str | Sequence[str],
                 namespace: str, room: str) -> None:  # fmt: skip
        self.session = session
        urls = [edge_url] if isinstance(edge_url, str) else list(edge_url)
        if not urls:
            raise ValueError("edge_url: at least one edge replica")
        path = f"/v1/rooms/{quote(namespace)}/{quote(room)}"
        self.bases = [f"{url.rstrip('/')}{path}" for url in urls]
        self.queue_tickets: dict[str, str] = {}
        self.queued = 0
        """Join answers that said "wait" (429)."""
        self.closed = 0
        """Join answers that said the room takes no new joins (410)."""
        self.lines: dict[str, JoinLine] = {}
        self.record: list[dict[str, Any]] = []

    def _replicas(self, listener: str) -> list[int]:
        first = zlib.crc32(listener.encode()) % len(self.bases)
        return [(first + step) % len(self.bases) for step in range(len(self.bases))]

    async def _ask(
        self, listener: str, send: Callable[[str], Awaitable[tuple[int, dict[str, Any], float]]]
    ) -> tuple[int, dict[str, Any], float, int]:
        """`send` to the listener's replica, then to the others while none answers; the
        answer and which replica gave it."""
        replicas = self._replicas(listener)
        for index in replicas[:-1]:
            try:
                return (*await send(self.bases[index]), index)
            except (aiohttp.ClientConnectionError, TimeoutError):
                continue
        return (*await send(self.bases[replicas[-1]]), replicas[-1])

    async def join(self, listener: str) -> Admission:
        body: dict[str, str] = {"listener": listener}
        if listener in self.queue_tickets:
            body["ticket"] = self.queue_tickets[listener]

        async def send(base: str) -> tuple[int, dict[str, Any], float]:
            async with self.session.post(f"{base}/join", json=body) as response:
                retry = float(response.headers.get("Retry-After", 1))
                return response.status, await response.json(), retry

        line = self.lines.setdefault(listener, JoinLine())
        began = time.time()
        if line.due is not None:
            line.late = max(line.late, began - line.due)
        status, answer, retry_after, edge = await self._ask(listener, send)
        now = time.time()
        if line.first is None:
            line.first, line.first_answered = began, now
        line.tries.append([round(began, 4), round(now, 4), status, retry_after, edge])
        if status == 429:
            self.queued += 1
            self.queue_tickets[listener] = answer["ticket"]
            if not line.queued:
                line.place = (answer["position"], answer["waiting"], now, edge)
            line.queued, line.due = True, now + retry_after
            raise NoRelayYetError("queued", retry_after)
        if status == 410:  # final: retrying would not change it
            self.closed += 1
            self.queue_tickets.pop(listener, None)
            self.lines.pop(listener, None)
            raise RoomClosedError(str(answer.get("error")))
        if status != 200:
            raise NoRelayYetError(str(answer.get("error")), 1.0)
        self.queue_tickets.pop(listener, None)
        del self.lines[listener]
        self.record.append(
            {
                "event": "admitted", "listener": listener, "first": line.first,
                "first_answered": line.first_answered, "at": now, "asked": began,
                "pod": answer["pod"], "generation": answer["generation"],
                "queued": line.queued, "late": round(line.late, 3), "edge": edge,
                "place": line.place, "tries": line.tries if line.queued else [],
            }
        )  # fmt: skip
        host, port = split_address(answer["relay"])
        return Admission(host, port, answer["ticket"], answer["pod"])

    def left_line(self, listener: str) -> None:
        """The listener gave up (left the room) while it held a place in line."""
        line = self.lines.pop(listener, None)
        self.queue_tickets.pop(listener, None)
        if line is not None and line.queued:
            self.record.append(
                {
                    "event": "left", "listener": listener, "first": line.first,
                    "first_answered": line.first_answered, "at": time.time(),
                }
            )  # fmt: skip

    async def relocate(self, listener: str, current: Admission) -> Admission | None:
        async def send(base: str) -> tuple[int, dict[str, Any], float]:
            url = f"{base}/listeners/{quote(listener)}"
            async with self.session.get(url, params={"ticket": current.ticket}) as response:
                answer = await response.json() if response.status == 200 else {}
                return response.status, answer, 0.0

        status, answer, _, _ = await self._ask(listener, send)
        if status != 200 or not answer.get("moved") or not answer.get("ticket"):
            return None
        host, port = split_address(answer["relay"])
        return Admission(host, port, answer["ticket"], answer["pod"])
