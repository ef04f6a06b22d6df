"""The metric contract, exported by the relay itself, and its /metrics endpoint.

Counts are read from the relay's own state at scrape time: what Prometheus records is what
the process that holds the connections counts, not what anyone who placed listeners thinks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from townsquare.relay.hub import Hub
from townsquare.relay.server import Relay

LABELS = ["namespace", "room", "pod"]


class HubCollector(Collector):
    def __init__(self, hub: Hub, namespace: str, room: str, pod: str) -> None:
        self.hub = hub
        self.labels = [namespace, room, pod]

    def collect(self) -> Iterator[Metric]:
        hub, labels = self.hub, self.labels
        relay = hub if isinstance(hub, Relay) else None
        listeners = GaugeMetricFamily(
            "audioroom_relay_listeners", "Connected listeners", labels=LABELS
        )
        listeners.add_metric(labels, len(hub.listeners))
        yield listeners
        if relay is not None:
            capacity = GaugeMetricFamily(
                "audioroom_relay_capacity_listeners", "Declared maximum listeners", labels=LABELS
            )
            capacity.add_metric(labels, relay.capacity)
            draining = GaugeMetricFamily(
                "audioroom_relay_draining", "1 while accepting no new joins", labels=LABELS
            )
            draining.add_metric(labels, 1.0 if relay.draining else 0.0)
            lost = CounterMetricFamily(
                "audioroom_relay_upstream_frames_lost",
                "Frames never received from upstream",
                labels=LABELS,
            )
            lost.add_metric(labels, relay.frames_lost_upstream)
            misplaced = CounterMetricFamily(
                "audioroom_relay_placed_while_draining",
                "Listeners whose admit ticket was issued on a map generation in which this"
                " relay already drained (the edge's fault, not the map on its way), by what"
                " the relay did: refused, or seated before it knew it drained",
                labels=[*LABELS, "outcome"],
            )
            for outcome in ("refused", "seated"):
                misplaced.add_metric([*labels, outcome], relay.drains.misplaced[outcome])
            unjudged = CounterMetricFamily(
                "audioroom_relay_placements_unjudged",
                "Admit tickets of a map generation no map this relay read covered",
                labels=LABELS,
            )
            unjudged.add_metric(labels, relay.drains.unjudged)
            yield from (capacity, draining, lost, misplaced, unjudged)
        egress = CounterMetricFamily(
            "audioroom_relay_egress_packets", "Frames sent downstream", labels=LABELS
        )
        egress.add_metric(labels, hub.egress_packets)
        downstream = GaugeMetricFamily(
            "audioroom_relay_downstream_relays", "Relays fed by this one", labels=LABELS
        )
        downstream.add_metric(labels, len(hub.relays))
        seq = GaugeMetricFamily(
            "audioroom_relay_last_frame", "Sequence number of the newest frame", labels=LABELS
        )
        seq.add_metric(labels, hub.last_seq)
        yield from (egress, downstream, seq)
        for name, counts, help_text in (
            ("audioroom_relay_refused", hub.refusals, "Hellos refused, by reason"),
            ("audioroom_relay_moved", hub.moves, "Connections sent elsewhere, by reason"),
            ("audioroom_relay_dropped", hub.drops, "Connections dropped, by reason"),
        ):
            family = CounterMetricFamily(name, help_text, labels=[*LABELS, "reason"])
            for reason, count in sorted(counts.items()):
                family.add_metric([*labels, reason], count)
            yield family


async def serve_metrics(hub: Hub, namespace: str, room: str, pod: str, host: str,
                        port: int) -> web.AppRunner:  # fmt: skip
    """`/metrics`, `/healthz` and `/listeners` on the relay's own address, in its own event
    loop. `/listeners?since=<Unix seconds>` (read-only) names the listeners held now, with
    when each was welcomed, and those that left since then, with the map generation each
    was placed on, and how many listeners an edge placed here on a map in which this relay
    drained: a test, or an operator chasing a complaint, can check from the relays
    themselves where each listener is."""
    registry = CollectorRegistry()
    registry.register(HubCollector(hub, namespace, room, pod))

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "listeners": len(hub.listeners)})

    async def listeners(request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            since = math.nan
        if not math.isfinite(since):
            error = f"since: expected Unix seconds, got {request.query['since'][:40]!r}"
            return web.json_response({"error": error}, status=400)
        answer: dict[str, object] = {"pod": pod, **hub.holdings(since)}
        if isinstance(hub, Relay):
            answer["placed_while_draining"] = {
                "refused": hub.drains.misplaced["refused"],
                "seated": hub.drains.misplaced["seated"],
                "unjudged": hub.drains.unjudged,
            }
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/listeners", listeners)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    return runner
