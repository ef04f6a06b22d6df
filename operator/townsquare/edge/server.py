"""The edge's HTTP API (aiohttp on uvloop): joins, locations, /metrics, /healthz, /readyz.

The handlers parse and check the request, ask the Gate once, and write its answer. Bad
input gets a 400 with one line naming the field, before any work is spent on it, so a
flood of malformed requests costs little and well-formed ones keep being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from townsquare import tickets
from townsquare.edge.admission import (
    LINE_QUANTILES,
    MAX_ID_BYTES,
    Admitted,
    Closed,
    Gate,
    Held,
    News,
    Room,
)
from townsquare.edge.reports import LINE, LINE_ROOMS, ReportSource, quantile_label
from townsquare.edge.watch import Watcher

MAX_BODY_BYTES = 4096
JOIN_FIELDS = frozenset({"listener", "ticket"})
OUTCOMES = (
    "admitted", "queued", "closed", "moved", "held", "located", "bad_request", "unknown_room"
)  # fmt: skip
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
KEY_ENV = "TOWNSQUARE_TICKET_KEY"

log = structlog.get_logger("townsquare.edge")
_encode = json.JSONEncoder(separators=(",", ":")).encode
"""One encoder for every answer: `json.dumps` with options builds a new one per call."""


class BadRequestError(Exception):
    """One line naming the field and the reason."""


def read_key(path: str | None) -> bytes:
    """The ticket key: a mounted Secret's file, else $TOWNSQUARE_TICKET_KEY."""
    key = Path(path).read_bytes().strip() if path else os.environ.get(KEY_ENV, "").encode()
    return tickets.check_key(key)


def parse_join(body: bytes) -> tuple[str, str | None]:
    """(listener, queue ticket) from a join's body, or BadRequestError naming the field."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequestError(f"body: {len(body):,} bytes, at most {MAX_BODY_BYTES:,}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("body: not valid JSON") from None
    except RecursionError:
        raise BadRequestError("body: nested too deeply (a join is one flat object)") from None
    if not isinstance(data, dict):
        raise BadRequestError('body: expected a JSON object like {"listener": "<id>"}')
    unknown = sorted(set(data) - JOIN_FIELDS)
    if unknown:
        raise BadRequestError(f"body: unknown field {unknown[0]!r} (allowed: listener, ticket)")
    listener = check_id(data.get("listener"), "listener")
    ticket = data.get("ticket")
    if ticket is not None and (
        not isinstance(ticket, str) or len(ticket) > MAX_BODY_BYTES or not ticket.isascii()
    ):
        raise BadRequestError("ticket: must be the string a 429 answer gave")
    return listener, ticket


def parse_seat(query: Mapping[str, str]) -> str | None:
    """The admit ticket a location request proves its seat with (None: just asking)."""
    unknown = sorted(set(query) - {"ticket"})
    if unknown == ["pod"]:
        raise BadRequestError(
            "pod: not accepted; send ticket=<your latest admit ticket> to prove your seat"
        )
    if unknown:
        raise BadRequestError(f"{unknown[0]}: unknown parameter (allowed: ticket)")
    seat = query.get("ticket")
    if seat is not None and (not seat or len(seat) > MAX_BODY_BYTES or not seat.isascii()):
        raise BadRequestError("ticket: must be the admit ticket a join or a move gave")
    return seat


def check_id(value: object, field: str) -> str:
    if value is None:
        raise BadRequestError(f"{field}: required")
    if not isinstance(value, str):
        raise BadRequestError(f"{field}: must be a string")
    if not value:
        raise BadRequestError(f"{field}: must not be empty")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequestError(f"{field}: not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_ID_BYTES:
        raise BadRequestError(f"{field}: {size:,} bytes, at most {MAX_ID_BYTES}")
    return value


def _json(
    status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=_encode(payload).encode("utf-8"),
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str) -> web.Response:
    return _json(status, {"error": message})


class WaitingCollector(Collector):
    """Waiting joins and the oldest wait per room, computed when Prometheus scrapes."""

    def __init__(self, gate: Gate, clock: Callable[[], float], replica: str) -> None:
        self.gate = gate
        self.clock = clock
        self.replica = replica

    def collect(self) -> Any:
        labels = ["namespace", "room"]
        waiting = GaugeMetricFamily(
            "audioroom_edge_waiting_listeners",
            "Joins this edge replica holds in the admission queue",
            labels=labels,
        )
        oldest = GaugeMetricFamily(
            "audioroom_edge_oldest_wait_seconds",
            "How long the oldest waiting join has waited (by its first attempt)",
            labels=labels,
        )
        line = Metric(
            LINE,
            "First attempts (unix seconds) of the joins waiting at this replica, at the tenths"
            " of its line, for rooms with any: the other replicas read them back to keep the"
            " room's line in order and to tell listeners their place in it",
            "summary",
        )
        rooms = GaugeMetricFamily(
            LINE_ROOMS,
            "Rooms with joins waiting at this replica (on every scrape: its time tells the"
            " other replicas how fresh their news of this one is)",
            labels=["replica"],
        )
        now = self.clock()
        lines = list(self.gate.lines(now))  # first: it forgets waiters who left
        for room, count, age in self.gate.waiting(now):
            waiting.add_metric([room.namespace, room.name], count)
            oldest.add_metric([room.namespace, room.name], age)
        for room, found in lines:
            names = {"namespace": room.namespace, "room": room.name, "replica": self.replica}
            for quantile, first in zip(LINE_QUANTILES, found.firsts, strict=True):
                line.add_sample(LINE, {**names, "quantile": quantile_label(quantile)}, first)
            line.add_sample(f"{LINE}_count", names, found.waiting)
        rooms.add_metric([self.replica], len(lines))
        yield waiting
        yield oldest
        yield line
        yield rooms


class Edge:
    """The application: a Gate, the watches that feed it, and the HTTP handlers."""

    def __init__(
        self,
        gate: Gate,
        *,
        watcher: Watcher | None = None,
        reports: ReportSource | None = None,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        replica: str = "edge",
    ) -> None:
        self.gate = gate
        self.replica = replica
        """This replica's name among the others (the `replica` label it exports)."""
        self.watcher = watcher
        self.reports = reports
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.registry = CollectorRegistry()
        self.registry.register(WaitingCollector(gate, clock, replica))
        joins = Counter(
            "audioroom_edge_joins",
            "Join and location requests by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.outcomes = {outcome: joins.labels(outcome) for outcome in OUTCOMES}
        self.latency = Histogram(
            "audioroom_edge_join_seconds",
            "Time to answer a join",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reports_ok = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES * 4)
        app.router.add_post("/v1/rooms/{namespace}/{room}/join", self._timed(self.join))
        app.router.add_get("/v1/rooms/{namespace}/{room}/listeners/{id}", self.locate)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.cleanup_ctx.append(self._background)
        return app

    def _timed(
        self, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def timed(request: web.Request) -> web.Response:
            began = time.perf_counter()
            try:
                return await handler(request)
            finally:
                self.latency.observe(time.perf_counter() - began)

        return timed

    def _room(self, request: web.Request) -> Room | None:
        info = request.match_info
        return self.gate.rooms.get((info["namespace"], info["room"]))

    async def join(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_BODY_BYTES:
            self.outcomes["bad_request"].inc()
            return _error(
                400, f"body: {request.content_length:,} bytes, at most {MAX_BODY_BYTES:,}"
            )
        body = await request.content.read(MAX_BODY_BYTES + 1)
        try:
            listener, ticket = parse_join(body)
        except BadRequestError as error:
            self.outcomes["bad_request"].inc()
            return _error(400, str(error))
        room = self._room(request)
        if room is None:
            self.outcomes["unknown_room"].inc()
            info = request.match_info
            return _error(404, f"room {info['namespace']}/{info['room']}: unknown (no shard map)")
        try:
            answer = self.gate.join(room, listener, ticket, self.clock())
        except tickets.TicketError as error:
            self.outcomes["bad_request"].inc()
            return _error(400, str(error))
        if isinstance(answer, Admitted):
            self.outcomes["admitted"].inc()
            return _json(
                200,
                {
                    "relay": answer.relay,
                    "pod": answer.pod,
                    "shard": answer.shard,
                    "generation": answer.generation,
                    "ticket": answer.ticket,
                },
            )
        if isinstance(answer, Closed):
            self.outcomes["closed"].inc()
            return _error(410, answer.reason)
        self.outcomes["queued"].inc()
        return _json(
            429,
            {"position": answer.position, "waiting": answer.waiting, "ticket": answer.ticket},
            {"Retry-After": str(answer.retry_after)},
        )

    async def locate(self, request: web.Request) -> web.Response:
        try:
            listener = check_id(request.match_info["id"], "id")
            seat = parse_seat(request.query)
        except BadRequestError as error:
            self.outcomes["bad_request"].inc()
            return _error(400, str(error))
        room = self._room(request)
        if room is None:
            self.outcomes["unknown_room"].inc()
            info = request.match_info
            return _error(404, f"room {info['namespace']}/{info['room']}: unknown (no shard map)")
        try:
            answer = self.gate.locate(room, listener, seat, self.clock())
        except tickets.TicketError as error:
            self.outcomes["bad_request"].inc()
            return _error(400, str(error))
        if isinstance(answer, Held):
            self.outcomes["held"].inc()
            return _json(429, {"error": answer.reason}, {"Retry-After": str(answer.retry_after)})
        self.outcomes["moved" if answer.moved else "located"].inc()
        payload: dict[str, Any] = {
            "relay": answer.relay,
            "pod": answer.pod,
            "shard": answer.shard,
            "generation": answer.generation,
            "moved": answer.moved,
        }
        if answer.ticket is not None:
            payload["ticket"] = answer.ticket
        return _json(200, payload)

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def healthz(self, _: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def readyz(self, _: web.Request) -> web.Response:
        if self.watcher is not None and not self.watcher.ready:
            return _error(503, "shard maps and relay endpoints not synced yet")
        if self.gate.warming(self.clock()):
            wait = self.gate.settings.started_at + self.gate.settings.admit_ttl
            return _error(
                503,
                "relays have reported only from before this replica could count a previous"
                f" replica's admissions; admitting nobody until reports sampled after {wait:.0f}",
            )
        return _json(200, {"status": "ready", "rooms": len(self.gate.rooms)})

    async def _background(self, _: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(self._refresh(session))]
            if self.watcher is not None:
                tasks.append(asyncio.create_task(self.watcher.run(session)))
            yield
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _refresh(self, session: aiohttp.ClientSession) -> None:
        """Every refresh interval: the relays' reports and the other replicas' lines, and
        forget waiters who left."""
        while True:
            began = time.monotonic()
            if self.reports is not None:
                try:
                    readings = await self.reports.read(session)
                    self.gate.set_reports(readings.reports)
                    self.gate.set_news(readings.news_for(self.replica))
                    if not self.reports_ok:
                        log.info("relay reports read")
                    self.reports_ok = True
                except Exception as error:  # keep the last reports; admissions age them out
                    if self.reports_ok:
                        log.warning("reading relay reports failed", error=repr(error))
                    self.reports_ok = False
                    # Order never outranks service: with no news from the others, only
                    # this replica's own line holds joins back.
                    self.gate.set_news(News())
            self.gate.expire(self.clock())
            elapsed = time.monotonic() - began
            await asyncio.sleep(max(0.05, self.refresh_seconds - elapsed))


def serve(edge: Edge, host: str, port: int) -> None:
    """Run until interrupted, on uvloop."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    log.info("edge serving", host=host, port=port)
    web.run_app(edge.app(), host=host, port=port, access_log=None, print=None, loop=loop)
