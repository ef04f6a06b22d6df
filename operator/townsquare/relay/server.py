"""The reference relay: one room's stream from its upstream to the listeners the edge sends.

A relay follows the shard map. The map's `parents` say which upstream feeds it (None: the
origin); its `relays` say whether it drains; its `assignment` says which shards it carries.
It accepts a listener only with an `admit` ticket for this pod and room, refuses at
capacity, and when a listener's shard moves (the map gives it to another relay, whether or
not this one drains) it tells the listener to ask the edge again, paced by its share of the
room's migration budget; a draining relay takes no new listener. It also asks guests (seated
here while their shard's relay had no seat) to go home, but only with the notices that the
moves the map or a drain asks for leave over, and ever more rarely while the edge holds
them. If its parent is unreachable it feeds from the nearest reachable ancestor (finally the
origin) until the parent answers again, re-attaching make-before-break so that no frame is
lost on the way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from townsquare.relay.drains import DrainLedger
from townsquare.relay.hub import Admitted, Hub, HubSettings, RefusedError
from townsquare.relay.protocol import Message
from townsquare.relay.topology import MapSource, Resolver, ordinal_of, relay_pod_name
from townsquare.relay.upstream import ORIGIN, Target, UpstreamLink, attach, feed_ticket
from townsquare.sharding import ShardMap
from townsquare.tickets import TicketError, verify

log = structlog.get_logger("townsquare.relay")

MoveReason = Literal["draining", "shard-moved", "guest"]
NOTICE_ORDER: tuple[MoveReason, ...] = ("draining", "shard-moved", "guest")
"""Whose notice goes first when the budget binds: a draining relay's listeners (the operator
plans the drain as if the whole budget were its own), then listeners whose shard the map
moved, then guests, with what is left over."""


GUEST_DOUBLINGS_MAX = 30
"""A held guest's re-notice interval doubles at most this often (far past any cap): a guest
held all day would otherwise reach 2.0 ** 1,025, which overflows and stops every notice."""


@dataclass
class Notices:
    """The move notices one listener was sent while it should be elsewhere (monotonic s)."""

    first: float
    last: float
    count: int = 0


def move_reason_for(
    shard_map: ShardMap | None,
    ordinal: int | None,
    draining: bool,
    listener: str,
    shard: object,
    generation: int,
) -> MoveReason | None:
    """Why a listener on relay `ordinal` (its ticket naming `shard` and `generation`) should
    be elsewhere under `shard_map`, if it should; its home, the relay the map gives its
    shard, is computed once, from the listener under the map's own shard count (the count
    may have changed since the ticket was signed; the ticket's shard only says whether the
    edge seated it by its shard, a guest's names none).

    - draining: this relay drains and the map has a place elsewhere (until it has, the edge
      would only say stay);
    - shard-moved: seated by its shard, and the map, at least as new as the ticket, gives
      that shard to another relay;
    - guest: seated here while its home had no seat for it (full, not Ready, not reported
      yet), its home is active, the room takes joins (closed to joins, no join needs the
      seat back) and no relay drains (the edge holds guests then, so that the drain keeps
      the budget the operator planned it with). The edge grants the move once its home is
      Ready with room, its share of the budget is not spent and no join waits there.
    """
    if shard_map is None:
        return None
    home = shard_map.relay_for(listener)
    if home == ordinal:
        return None
    if draining and home is not None:
        return "draining"
    if isinstance(shard, int):
        return "shard-moved" if generation <= shard_map.generation else None
    home_active = home is not None and shard_map.relays.get(home) == "active"
    drains = "draining" in shard_map.relays.values()
    if shard is None and home_active and shard_map.admission != "closed" and not drains:
        return "guest"
    return None


@dataclass(frozen=True)
class RelayConfig:
    namespace: str
    room: str
    pod: str
    key: bytes
    origin: tuple[str, int]
    capacity: int = 1000
    host: str = "127.0.0.1"
    port: int = 7880
    migrations_per_minute: float = 1200.0
    """Moves this relay may announce per minute when the map does not carry the room's
    budget; when it does, the relay takes its share (the budget over the map's relays)."""
    move_grace: float = 30.0
    """Seconds a listener told to move keeps receiving frames here before it is closed
    (draining, or above capacity; a listener whose shard moved stays while the edge holds
    its move: closing it would only turn a held move into a join at the back of a queue)."""
    renotify_seconds: float = 3.0
    """A listener still here this long after a move notice (the edge held it) is told again."""
    guest_renotify_max: float = 60.0
    """A held guest is told again after `renotify_seconds`, then twice as long each time, up
    to this: its home is full, or not Ready, or the edge's share of the budget is nil, and
    may stay so for the whole event, while every notice takes a slot of the budget."""
    map_interval: float = 1.0
    """Seconds between reads of the shard map."""
    retry_seconds: float = 0.5
    hub: HubSettings = field(default_factory=HubSettings)

    @property
    def room_key(self) -> str:
        return f"{self.namespace}/{self.room}"


async def supervised(job: Callable[[], Awaitable[None]]) -> None:
    """Run a relay's background job for good: a bug in one pass is logged, not fatal."""
    while True:
        try:
            await job()
        except Exception:
            log.exception("background job failed; restarting it", job=job.__name__)
            await asyncio.sleep(0.5)


async def cancel_all(tasks: list[asyncio.Task[None]], timeout: float = 2.0) -> None:
    """Cancel background jobs and give them `timeout` seconds to finish; never hang."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


def ticket_refusal(error: TicketError) -> RefusedError:
    text = str(error)
    return RefusedError("expired" if "expired" in text else "bad-ticket", text)


class Relay(Hub):
    def __init__(self, config: RelayConfig, maps: MapSource, resolver: Resolver) -> None:
        super().__init__(config.hub)
        self.config = config
        self.maps = maps
        self.resolver = resolver
        self.ordinal = ordinal_of(config.room, config.pod)
        self.map: ShardMap | None = None
        self.draining = False
        self.drains = DrainLedger(self.ordinal)
        """Listeners an edge placed here on a map in which this relay drained (its fault),
        told apart from those that only crossed the new map on their way."""
        self.upstream: UpstreamLink | None = None
        self.upstream_changed = asyncio.Event()
        self.frames_lost_upstream = 0
        self.reattachments = 0
        self._move_queues: dict[MoveReason, deque[str]] = {r: deque() for r in NOTICE_ORDER}
        self._queued: dict[str, MoveReason] = {}
        """Listener -> the queue it waits in; an entry in any other queue is stale."""
        self._notified: dict[str, Notices] = {}
        self._move_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def capacity(self) -> int:
        """The room's capacity per relay as the live shard map says, so a mid-event change of
        `listenersPerRelay` reaches this relay with the map, as it reaches the edge, instead
        of after this pod is replaced; `config.capacity` (the pod's environment) until the
        first map is read."""
        return self.map.capacity if self.map is not None else self.config.capacity

    # -- who may connect ------------------------------------------------------------------

    def admit(self, hello: dict[str, Any]) -> Admitted:
        ticket = hello.get("ticket")
        if not isinstance(ticket, str) or not ticket:
            raise RefusedError("no-ticket", "the hello carries no ticket: ask the edge for one")
        role = hello.get("role", "listener")
        if role == "relay":
            return self._admit_relay(ticket)
        if role != "listener":
            raise RefusedError("bad-hello", f"unknown role {role!r}")
        try:
            claims = verify(self.config.key, ticket, "admit", now=time.time())
        except TicketError as error:
            raise ticket_refusal(error) from None
        if claims.get("room") != self.config.room_key:
            raise RefusedError("wrong-room", f"ticket for room {claims.get('room')!r}")
        if claims.get("pod") != self.config.pod:
            raise RefusedError("wrong-relay", f"ticket for relay {claims.get('pod')!r}")
        listener = str(claims.get("listener") or "")
        if not listener:
            raise RefusedError("bad-ticket", "ticket names no listener")
        shard, generation = claims.get("shard"), int(claims.get("generation") or 0)
        placed_on = self.drains.state_at(generation)
        if placed_on == "draining":
            self.drains.misplaced["refused"] += 1
            raise RefusedError(
                "placed-while-draining",
                f"the ticket is of map generation {generation}, in which this relay drained",
            )
        if self.draining:
            if placed_on is None:
                self.drains.judge_later(generation, "refused")
            raise RefusedError("draining", "this relay is draining: ask the edge again")
        reason = move_reason_for(self.map, self.ordinal, False, listener, shard, generation)
        if reason == "shard-moved":
            raise RefusedError("shard-moved", f"shard {shard} moved: ask the edge again")
        capacity = self.capacity
        if listener not in self.listeners and len(self.listeners) >= capacity:
            raise RefusedError("full", f"at capacity ({capacity} listeners)")
        if placed_on is None:
            self.drains.judge_later(generation, "seated")
        return Admitted(
            role="listener",
            name=listener,
            shard=shard if isinstance(shard, int) else None,
            generation=generation,
            welcome={"pod": self.config.pod, "room": self.config.room_key},
        )

    def _admit_relay(self, ticket: str) -> Admitted:
        try:
            claims = verify(self.config.key, ticket, "feed", now=time.time())
        except TicketError as error:
            raise ticket_refusal(error) from None
        if claims.get("room") != self.config.room_key or claims.get("pod") != self.config.pod:
            raise RefusedError("wrong-relay", "feed ticket for another room or upstream")
        name = str(claims.get("downstream") or "?")
        return Admitted(role="relay", name=name, welcome={"pod": self.config.pod})

    # -- running --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.serve(self.config.host, self.config.port)
        await self.refresh_map()
        for job in (self._follow_map, self._follow_upstream, self._pace_moves):
            self._tasks.append(asyncio.create_task(supervised(job)))
        log.info("relay started", pod=self.config.pod, room=self.config.room_key,
                 address=":".join(map(str, self.address)))  # fmt: skip

    async def stop(self, reason: str = "shutdown") -> None:
        """Tell everyone to go elsewhere, then stop (SIGTERM: the pod is going)."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        self.close_all(reason)
        await cancel_all(self._tasks)
        if self.upstream is not None:
            self.upstream.close("stopping")

    async def refresh_map(self) -> None:
        try:
            shard_map = await self.maps.read()
        except Exception as error:  # the API server may blip; keep the last map
            log.warning("shard map unreadable", error=str(error))
            return
        if shard_map is not None and (self.map is None or shard_map != self.map):
            self.apply_map(shard_map)

    async def _follow_map(self) -> None:
        while True:
            await asyncio.sleep(self.config.map_interval)
            await self.refresh_map()
            self.sweep_moves(time.monotonic())

    def apply_map(self, shard_map: ShardMap) -> None:
        """Drain, move listeners whose shard went elsewhere, re-attach if the parent moved."""
        previous = self.map
        self.map = shard_map
        self.drains.read(shard_map)
        state = shard_map.relays.get(self.ordinal) if self.ordinal is not None else None
        if state == "draining" and not self.draining:
            log.info("draining", pod=self.config.pod, listeners=len(self.listeners))
        self.draining = state == "draining"
        self.sweep_moves(time.monotonic())
        if previous is None or self._parent(previous) != self._parent(shard_map):
            self.upstream_changed.set()

    def _parent(self, shard_map: ShardMap | None) -> int | None:
        if shard_map is None or self.ordinal is None:
            return None
        return shard_map.parents.get(self.ordinal)

    # -- moves, paced by the migration budget -----------------------------------------------

    def move_reason(self, name: str) -> MoveReason | None:
        """Why a connected listener should be elsewhere now, if it should."""
        connection = self.listeners.get(name)
        admitted = connection.admitted if connection else None
        if admitted is None:
            return None
        return move_reason_for(
            self.map,
            self.ordinal,
            self.draining,
            admitted.name,
            admitted.shard,
            admitted.generation,
        )

    def _closed_to_joins(self) -> bool:
        return self.map is not None and self.map.admission == "closed"

    def sweep_moves(self, now: float) -> None:
        """Queue a notice for each listener that should move and was not told lately; close
        those that outstayed the grace period only while this relay is above capacity (and
        the room still takes joins: closed to joins, a listener could not come back).

        A listener the edge holds (no room for it yet where it goes, or the migration budget
        spent) stays past the grace, whether its shard moved or its relay drains, and is told
        again until the edge finds room: closing it would cut its audio and send it to the
        back of the queue, and its join again would spend no budget (the binding-budget e2e
        test lost 2 of 50 listeners that way). A draining relay still goes: the operator
        removes it once it is empty, or at drainTimeout. A guest is never closed: it holds a
        seat the edge gave it, as this relay's own listeners do (who are not closed above
        capacity either), and its home had no seat for it; the relay sheds its excess
        through the listeners the map moves off it."""
        closed = self._closed_to_joins()
        for name in list(self._notified):
            if name not in self.listeners or self.move_reason(name) is None:
                del self._notified[name]
        must_go = len(self.listeners) > self.capacity and not closed
        for name, connection in list(self.listeners.items()):
            reason = self.move_reason(name)
            if reason is None:
                continue
            notices = self._notified.get(name)
            overstayed = notices is not None and now - notices.first > self.config.move_grace
            if overstayed and must_go and reason != "guest":
                connection.move(f"{reason}-grace-over")
            elif notices is None or now - notices.last >= self._renotify_after(reason, notices):
                self._enqueue(name, reason)

    def _renotify_after(self, reason: MoveReason, notices: Notices) -> float:
        base = self.config.renotify_seconds
        if reason != "guest":
            return base
        doublings = min(notices.count - 1, GUEST_DOUBLINGS_MAX)  # 2.0 ** 1,025 overflows
        return min(base * 2.0**doublings, max(base, self.config.guest_renotify_max))

    def _enqueue(self, name: str, reason: MoveReason) -> None:
        """Queue `name` by its reason; one already queued lower moves up (its old entry goes
        stale), one queued as high or higher stays where it is."""
        queued = self._queued.get(name)
        if queued is not None and NOTICE_ORDER.index(queued) <= NOTICE_ORDER.index(reason):
            return
        self._queued[name] = reason
        self._move_queues[reason].append(name)
        self._move_wakeup.set()

    def _next_to_notify(self) -> str | None:
        """The first listener of the highest queue that holds anyone, or None."""
        for reason in NOTICE_ORDER:
            queue = self._move_queues[reason]
            while queue:
                name = queue.popleft()
                if self._queued.get(name) == reason:
                    del self._queued[name]
                    return name
        return None

    def moves_per_second(self) -> float:
        budget = self.map.migrations_per_minute if self.map else None
        if budget is not None:
            return max(budget / 60.0 / max(1, len(self.map.relays) if self.map else 1), 0.01)
        return max(self.config.migrations_per_minute / 60.0, 0.01)

    async def _pace_moves(self) -> None:
        tokens, last = 1.0, time.monotonic()
        while True:
            if not self._queued:
                self._move_wakeup.clear()
                await self._move_wakeup.wait()
                continue
            rate = self.moves_per_second()
            burst = max(1.0, rate * 0.1)
            now = time.monotonic()
            tokens = min(burst, tokens + (now - last) * rate)
            last = now
            if tokens < 1:
                await asyncio.sleep((1 - tokens) / rate)
                continue
            name = self._next_to_notify()
            if name is None:
                continue
            reason = self.move_reason(name)
            connection = self.listeners.get(name)
            if connection is not None and reason is not None:
                notices = self._notified.get(name) or Notices(first=now, last=now)
                notices.last, notices.count = now, notices.count + 1
                self._notified[name] = notices
                grace = self.config.move_grace - (now - notices.first)
                if self._closed_to_joins() or reason == "guest":  # never cut: stays until it can
                    grace = self.config.move_grace
                # Past the grace, a listener allowed to stay hears of it again, with time.
                connection.notify_move(reason, max(grace, self.config.renotify_seconds))
                tokens -= 1

    # -- the upstream -----------------------------------------------------------------------

    def on_frame(self, message: Message) -> None:
        seq, _ = message.frame_header()
        if self.last_seq >= 0 and seq > self.last_seq + 1:
            self.frames_lost_upstream += seq - self.last_seq - 1
        self.publish(seq, message.raw)

    async def _candidates(self) -> list[Target]:
        """The parent first, then its ancestors, then the origin: where frames may come from."""
        chain: list[int] = []
        parent = self._parent(self.map)
        while parent is not None and parent not in chain and parent != self.ordinal:
            chain.append(parent)
            parent = self.map.parents.get(parent) if self.map else None
        targets: list[Target] = []
        for ordinal in chain:
            try:
                address = await self.resolver.relay_address(ordinal)
            except Exception as error:
                log.warning("cannot resolve relay", ordinal=ordinal, error=str(error))
                address = None
            if address is not None:
                name = relay_pod_name(self.config.room, ordinal)
                targets.append(Target(name, *address))
        targets.append(Target(ORIGIN, *self.config.origin))
        return targets

    async def _follow_upstream(self) -> None:
        """Keep one live upstream, the most preferred one that answers."""
        while True:
            # Cleared before reading the map, so a change that lands meanwhile is not lost.
            self.upstream_changed.clear()
            candidates = await self._candidates()
            current = self.upstream
            preferred = candidates[0].name
            if current is not None and current.alive and current.target.name == preferred:
                await self._wait_for_change(current, None)
                continue
            link = await self._attach_first(candidates)
            if link is None:
                await asyncio.sleep(self.config.retry_seconds)
                continue
            if current is not None and current.alive:
                if current.target.name == link.target.name:
                    link.close("already fed from there")
                    await self._wait_for_change(current, 2.0)
                    continue
                current.close("re-attached elsewhere")
            if current is not None:
                self.reattachments += 1
            self.upstream = link
            log.info("upstream", pod=self.config.pod, upstream=link.target.name,
                     preferred=preferred)  # fmt: skip
            # Fed by a fallback: look for the preferred one again after a while.
            await self._wait_for_change(link, None if link.target.name == preferred else 2.0)

    async def _wait_for_change(self, link: UpstreamLink, timeout: float | None) -> None:
        waits = [asyncio.create_task(link.lost.wait()),
                 asyncio.create_task(self.upstream_changed.wait())]  # fmt: skip
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if not link.alive:
            log.warning("upstream lost", pod=self.config.pod, upstream=link.target.name,
                        reason=link.reason)  # fmt: skip

    async def _attach_first(self, candidates: list[Target]) -> UpstreamLink | None:
        # A new relay asks for everything its upstream still keeps, so that listeners moved
        # to it can resume from the frame they last heard.
        resume = self.last_seq + 1 if self.last_seq >= 0 else 0
        for index, target in enumerate(candidates):
            ticket = feed_ticket(
                self.config.key, self.config.room_key, target.name, self.config.pod, time.time()
            )
            try:
                return await attach(target, ticket, resume, self.on_frame, fallback=index > 0)
            except ConnectionError as error:
                log.info("upstream unavailable", pod=self.config.pod, upstream=target.name,
                         error=str(error))  # fmt: skip
        return None
