"""The origin: the speakers' side of a room, a synthetic stream of numbered frames.

Frames are numbered by the wall clock (`seq = time / interval`), so an origin that restarts
continues the numbering instead of starting again at 0, and relays never mistake new audio
for frames they already forwarded. It feeds the relays the map says it feeds: those whose
`parent` is None; a relay it no longer feeds in a newer map is told to move. A relay whose
ancestors are all unreachable may ask to be fed meanwhile (`fallback`), up to a limit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from townsquare.relay.hub import Admitted, Hub, HubSettings, RefusedError
from townsquare.relay.protocol import frame
from townsquare.relay.server import cancel_all, supervised, ticket_refusal
from townsquare.relay.topology import MapSource, ordinal_of
from townsquare.relay.upstream import ORIGIN
from townsquare.sharding import ShardMap
from townsquare.tickets import TicketError, verify

log = structlog.get_logger("townsquare.origin")


@dataclass(frozen=True)
class OriginConfig:
    namespace: str
    room: str
    key: bytes
    host: str = "127.0.0.1"
    port: int = 7880
    frame_interval: float = 0.020
    frame_bytes: int = 60
    """Opus speech at 24 kbit/s in 20 ms frames is about 60 bytes."""
    map_interval: float = 1.0
    max_fallbacks: int = 16
    """Relays whose parents are all unreachable that the origin feeds meanwhile."""
    hub: HubSettings = field(default_factory=HubSettings)

    @property
    def room_key(self) -> str:
        return f"{self.namespace}/{self.room}"


class Origin(Hub):
    def __init__(self, config: OriginConfig, maps: MapSource | None = None) -> None:
        super().__init__(config.hub)
        self.config = config
        self.maps = maps
        self.map: ShardMap | None = None
        self.payload = bytes(i % 251 for i in range(config.frame_bytes))
        self._tasks: list[asyncio.Task[None]] = []

    def admit(self, hello: dict[str, Any]) -> Admitted:
        ticket = hello.get("ticket")
        if hello.get("role") != "relay" or not isinstance(ticket, str) or not ticket:
            raise RefusedError("no-ticket", "the origin feeds relays only, with a feed ticket")
        try:
            claims = verify(self.config.key, ticket, "feed", now=time.time())
        except TicketError as error:
            raise ticket_refusal(error) from None
        if claims.get("room") != self.config.room_key or claims.get("pod") != ORIGIN:
            raise RefusedError("wrong-relay", "feed ticket for another room or upstream")
        name = str(claims.get("downstream") or "?")
        fallback = not self._fed_by_origin(name, self.map)
        if fallback and not hello.get("fallback"):
            raise RefusedError("wrong-upstream", f"the map gives {name} a parent relay")
        if fallback and self._fallbacks() >= self.config.max_fallbacks:
            raise RefusedError("full", f"feeding {self.config.max_fallbacks} stranded relays")
        return Admitted(role="relay", name=name, fallback=fallback, welcome={"pod": ORIGIN})

    def _fallbacks(self) -> int:
        return sum(1 for c in self.relays if c.admitted is not None and c.admitted.fallback)

    def _fed_by_origin(self, pod: str, shard_map: ShardMap | None) -> bool:
        """True unless the map names a parent relay for this pod (unknown pods: fed)."""
        ordinal = ordinal_of(self.config.room, pod)
        if shard_map is None or ordinal is None:
            return True
        return shard_map.parents.get(ordinal) is None

    async def start(self) -> None:
        await self.serve(self.config.host, self.config.port)
        self._tasks.append(asyncio.create_task(supervised(self._speak)))
        if self.maps is not None:
            await self._refresh_map()
            self._tasks.append(asyncio.create_task(supervised(self._follow_map)))
        log.info("origin started", room=self.config.room_key,
                 address=":".join(map(str, self.address)))  # fmt: skip

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.close_all("shutdown")
        await cancel_all(self._tasks)

    async def _speak(self) -> None:
        """Frames on a fixed schedule; a late wake-up sends every frame that fell due."""
        interval_ns = round(self.config.frame_interval * 1e9)
        while True:
            now = time.time_ns()
            due = now // interval_ns
            start = max(self.last_seq + 1, due - self.config.hub.buffer_frames)
            for seq in range(start, due + 1):
                self.publish(seq, frame(seq, now, self.payload))
            await asyncio.sleep(((due + 1) * interval_ns - time.time_ns()) / 1e9)

    async def _refresh_map(self) -> None:
        assert self.maps is not None
        try:
            shard_map = await self.maps.read()
        except Exception as error:
            log.warning("shard map unreadable", error=str(error))
            return
        if shard_map is None or shard_map == self.map:
            return
        self.map = shard_map
        for connection in list(self.relays):
            admitted = connection.admitted
            if admitted is None or admitted.fallback:
                continue  # a stranded relay leaves once its parent answers again
            if not self._fed_by_origin(admitted.name, shard_map):
                connection.move("parent-changed")

    async def _follow_map(self) -> None:
        while True:
            await asyncio.sleep(self.config.map_interval)
            await self._refresh_map()
