"""A listener as a program: join, hold a relay connection, count what arrives, rejoin.

Used by the tests, the benchmark and the load generator. Every figure here is measured at
the receiving end: frames that arrived, numbers that never did, and the longest silence.
`join` is whatever hands out a relay address and an admit ticket: the edge in production,
`MapJoin` (the shard map plus the shared key) where there is no edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from townsquare.relay.protocol import FRAME_HEADER, Decoder, Kind, ProtocolError, control
from townsquare.relay.topology import MapSource, Resolver, relay_pod_name
from townsquare.sharding import shard_of
from townsquare.tickets import sign


@dataclass(frozen=True)
class Admission:
    host: str
    port: int
    ticket: str


class NoRelayYetError(Exception):
    """No relay for this listener now (queued, or no map yet): try again later."""


Join = Callable[[str], Awaitable[Admission]]


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
    refusals: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    joins: int = 0
    relays: list[str] = field(default_factory=list)
    interruptions: list[Interruption] = field(default_factory=list)


class Listener:
    def __init__(self, name: str, join: Join, *, resume: bool = True) -> None:
        self.name = name
        self.join = join
        self.resume = resume
        self.stats = ListenerStats()
        self.connected = asyncio.Event()
        self._last_arrival: float | None = None
        self._cause: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until `stop`; every move, refusal or loss leads to a new join."""
        loop = asyncio.get_running_loop()
        backoff = 0.05
        while not stop.is_set():
            try:
                admission = await self.join(self.name)
                self.stats.joins += 1
                session = _Session(self, admission)
                await loop.create_connection(
                    functools.partial(_same, session), admission.host, admission.port
                )
            except (NoRelayYetError, OSError):
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
            ended: asyncio.Future[object] = session.ended  # type: ignore[assignment]
            await asyncio.wait({stopped, ended}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            session.close()
            self.connected.clear()
            outcome = session.ended.result() if session.ended.done() else "stopped"
            if outcome == "refused":
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 1.0)
            else:
                backoff = 0.05

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
            if self._cause is not None:
                stats.interruptions.append(
                    Interruption(self._last_arrival, gap, self._cause, missing)
                )
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
                listener.stats.relays.append(f"{self.admission.host}:{self.admission.port}")
                listener.connected.set()
            elif message.kind in (Kind.MOVE, Kind.REFUSE):
                reason = str(message.fields().get("reason", "?"))
                moved = message.kind is Kind.MOVE
                (listener.stats.moves if moved else listener.stats.refusals)[reason] += 1
                self._end("moved" if moved else "refused",
                          f"{'moved' if moved else 'refused'}: {reason}")  # fmt: skip
                return

    def _end(self, outcome: str, cause: str) -> None:
        if not self.ended.done():
            self.listener._cause = cause
            self.ended.set_result(outcome)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.listener.stats.disconnects += 1
            self._end("lost", "connection lost")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class MapJoin:
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

    async def __call__(self, listener: str) -> Admission:
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
        claims = {
            "listener": listener,
            "room": f"{self.namespace}/{self.room}",
            "pod": relay_pod_name(self.room, relay),
            "shard": shard,
            "generation": shard_map.generation,
        }
        ticket = sign(self.key, "admit", claims, expires=time.time() + self.ticket_seconds)
        return Admission(address[0], address[1], ticket)
