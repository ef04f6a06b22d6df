"""The edge on the real cluster with a real Prometheus: a join storm through 3 replicas.

The audience arrives faster than relays start. The relays are real `townsquare relay`
processes (the cluster's pod runner starts one for each relay pod, on its loopback pod IP),
fed by a real origin; the first `REAL` listeners hold real connections to them, the rest is
simulated by the load generator and counted apart. The verdicts come from elsewhere than the
edge: relay loads from what the relays report to Prometheus (the relay processes for the
real part, the load generator for the simulated part), who holds which listener from the
relays' own `/listeners`, draining from the relays' own count of listeners placed on them on
a map in which they drained (and from the shard maps the API server served), the order of
admissions and the simulated moves from the listeners' own record, waiting from the room's
status.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from audience import Audience, Process, origin
from edges import REFRESH_SECONDS, EdgeFleet
from harness import Prometheus, wait_until
from holdings import Holdings, RelayPods, overlap_figures
from kubernetes import client, watch
from operator_process import OperatorProcess
from rooms import GROUP, VERSION, LoadGenerator, Rooms, rfc3339, ticket_secret, write_trace
from sampling import moves_in_any_minute

from townsquare.edge.admission import LATE_RETRY_FRACTION, MAX_RETRY_FACTOR
from townsquare.relay.listener import WELCOME_SECONDS
from townsquare.sharding import shard_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CAPACITY = 100
BUDGET = 600
"""maxMigrationsPerMinute of the room."""
REAL = 200
"""Listeners on real connections in the storm (the earliest: they stay through every drain)."""
FRAME_INTERVAL = "0.05"
"""The origin's frame interval in the storm: 20 frames a second (not 50) lets this shared
2-core machine carry the real listeners; the storm's verdicts are about who is where."""
MOVE_OVERLAP_BOUND = WELCOME_SECONDS + 0.5
"""Seconds two relays may both hold a listener: a move is make-before-break, and a listener
leaves the new relay if it is not welcomed there within WELCOME_SECONDS; the rest is the old
relay noticing the close on a busy machine."""


@dataclass
class DataPlane:
    """What runs beside the cluster's real relays for one room: 3 edge replicas, the origin
    (at FRAME_INTERVAL), the ticket Secret the relay pods mount, and the relays' `/listeners`
    sampled in the background."""

    edges: EdgeFleet
    origin: Process
    origin_address: str
    holdings: Holdings

    @classmethod
    def start(
        cls, rooms: Rooms, kubeconfig: Path, prometheus: Prometheus, logs: Path, room: str
    ) -> DataPlane:
        edges = EdgeFleet(kubeconfig, rooms.namespace, prometheus, logs, replicas=3)
        key_file = logs / "ticket.key"
        key_file.write_text(edges.key)
        ticket_secret(rooms, edges.key.encode())
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        process, address = origin(
            logs, rooms.namespace, room, key_file, kubeconfig, env,
            "--frame-interval", FRAME_INTERVAL,
        )  # fmt: skip
        pods = RelayPods(rooms.core, rooms.namespace, room, prometheus)
        return cls(edges, process, address, Holdings(pods))

    def stop(self) -> None:
        self.holdings.stop()
        self.edges.stop()
        self.origin.stop()


def storm_room(name: str, start_in: float, origin_address: str | None = None) -> dict[str, Any]:
    """With `origin_address`, the relays are real processes fed from that origin."""
    real = {} if origin_address is None else {"townsquare.dev/origin": origin_address}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": {
            "startTime": rfc3339(datetime.now(UTC) + timedelta(seconds=start_in)),
            "duration": "100s",
            "expectedAudience": 100,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": CAPACITY,
                "startupSeconds": 4,
                "podAnnotations": {"pod-ready.stage.kwok.x-k8s.io/delay": "4s", **real},
                "nodeSelector": {"type": "kwok"},
                **({"args": ["relay"]} if real else {}),
            },
            "scaling": {
                "targetUtilization": 0.7,
                "minRelays": 1,
                "maxRelays": 20,
                "prewarmLead": "5s",
                "planHold": "5s",
                "scaleDownStabilization": "8s",
                "drainTimeout": "20s",
            },
            "sharding": {"shards": 256, "fanout": 4, "maxMigrationsPerMinute": BUDGET},
        },
    }


@dataclass
class MapHistory:
    """Every shard map the API server served for the room, by generation (a watch)."""

    core: client.CoreV1Api
    namespace: str
    name: str
    states: dict[int, dict[int, str]] = field(default_factory=dict)
    assignments: dict[int, list[int | None]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(
                    self.core.list_namespaced_config_map,
                    self.namespace,
                    field_selector=f"metadata.name={self.name}-shards",
                    timeout_seconds=5,
                ):
                    document = (event["object"].data or {}).get("shardmap.json")
                    if document:
                        shard_map = json.loads(document)
                        generation = shard_map["generation"]
                        self.states[generation] = {
                            r["ordinal"]: r["state"] for r in shard_map["relays"]
                        }
                        self.assignments[generation] = shard_map["assignment"]
                    if self._stop.is_set():
                        break
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass
class Waiting:
    """status.listeners.waiting as the API server shows it, every 500 ms."""

    rooms: Rooms
    name: str
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.rooms.get(self.name).get("status") or {}
                waiting = (status.get("listeners") or {}).get("waiting", 0)
                self.samples.append((time.time(), int(waiting)))
            except Exception:
                pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def out_of_line(event: dict[str, Any], news_age: float) -> list[tuple[float, float]]:
    """When the edges may not have held the listener's place, from its own record of its
    tries ([sent, answered, status, Retry-After, replica] each; README "Order": the line
    keeps a place for a listener that comes back within its allowance):

    - a retry that may have reached the edge after the place lapsed: an edge keeps a waiter
      for Retry-After times (1 + LATE_RETRY_FRACTION) plus the waiter expiry after its answer,
      which came after the try was sent, while the retry reached it before it was answered;
    - a retry answered by another replica (its own was killed): that replica's line went
      with it.

    Either way the place is back once the retry was answered and the other replicas' news
    carried it (`news_age`). Measured from the listener's side conservatively: a stalled
    client only widens these spans, it never hides a lapse."""
    spans = []
    tries = event.get("tries") or []
    for earlier, later in itertools.pairwise(tries):
        sent, _, status, retry_after, replica = earlier
        back = later[1] + news_age
        if status != 429:
            continue
        if later[4] != replica:
            spans.append((sent, back))
            continue
        kept_until = sent + retry_after * (1 + LATE_RETRY_FRACTION) + REFRESH_SECONDS
        if later[1] > kept_until:
            spans.append((kept_until, back))
    return spans


def reordering(
    admissions: list[dict[str, Any]],
    waiting: list[dict[str, Any]],
    since: str = "first",
    news_age: float | None = None,
) -> list[float]:
    """For each admission, by how much the first attempt of a listener of `waiting` still
    not admitted then (it asked again only after this admission was answered) came before
    this one's; 0 when no earlier listener was left waiting. From the listeners' own clocks
    only. `since` is the waiting listener's first attempt as sent (`first`) or as answered
    (`first_answered`): the edge saw it in between, so the latter leaves out the time the
    request took, which the edge cannot know. With `news_age`, a waiting listener counts
    only while the edges surely held its place (`out_of_line`) over the whole time the
    admission's request was out."""
    by_asked = sorted(waiting, key=lambda e: e["asked"])
    asked = [e["asked"] for e in by_asked]
    lapses = {id(e): ([] if news_age is None else out_of_line(e, news_age)) for e in by_asked}
    late: list[float] = []
    for event in admissions:
        decided = (event["asked"], event["at"])
        left_waiting = min(
            (
                other[since]
                for other in by_asked[bisect.bisect_right(asked, event["at"]) :]
                if other["first_answered"] <= event["at"]
                and not any(a < decided[1] and decided[0] < b for a, b in lapses[id(other)])
            ),
            default=float("inf"),
        )
        late.append(max(0.0, event["first"] - left_waiting))
    return late


def edge_scrape_gap(prometheus: Prometheus, namespace: str, window: str) -> float:
    """The longest gap between two scrapes of an edge replica (the news the others read),
    as Prometheus timed them."""
    del namespace  # the replicas' heartbeat is per replica, not per room
    raw = prometheus.client().custom_query(f"audioroom_edge_line_rooms{window.split(':')[0]}]")
    gaps = [
        later[0] - earlier[0]
        for series in raw
        for earlier, later in itertools.pairwise(series["values"])
    ]
    return max(gaps, default=float(Prometheus.SCRAPE_SECONDS))


def place_errors(events: list[dict[str, Any]], news_age: float) -> dict[str, Any]:
    """How far the position and waiting of each listener's first 429 were from the room's
    line at that moment, as the listeners' own record shows it (everyone whose first
    attempt had been answered and who was neither admitted nor gone yet), and how many
    answers were off by more than the design allows: the changes to the line that the
    news of the other replicas cannot carry yet (joins that came or got in in the last
    `news_age`, and that left in it or, since a replica keeps a listener that stopped
    asking in line until its retry is overdue, in the longest allowance before it; and those
    whose place had lapsed, `out_of_line`), and for the position a tenth of the line (another
    replica's part of it is placed by its tenths) and the joins first sent while this one's
    first request was on its way."""
    spans = [
        (e["first_answered"], e["at"], e["first"], e["event"] == "left", out_of_line(e, news_age))
        for e in events
        if (e["event"] == "admitted" and e["queued"]) or e["event"] == "left"
    ]
    overdue = REFRESH_SECONDS * (MAX_RETRY_FACTOR * (1 + LATE_RETRY_FRACTION) + 1)
    errors: dict[str, list[float]] = {"position": [], "waiting": []}
    relative: dict[str, list[float]] = {"position": [], "waiting": []}
    beyond = {"position": 0, "waiting": 0}
    for event in events:
        if event["event"] != "admitted" or not event.get("place"):
            continue
        position, waiting, at, _ = event["place"]
        first = event["first"]
        line = [f for answered, end, f, _, _ in spans if answered <= at < end]
        truth = {"waiting": len(line), "position": sum(f < first for f in line) + 1}
        # Those whose place had lapsed then (a late retry, or their replica killed) were in
        # no replica's line (README "Order"): the answer could not count them either.
        changed = [
            f
            for answered, end, f, left, lapses in spans
            if at - news_age < answered <= at
            or at - news_age - (overdue if left else 0.0) < end <= at
            or (answered <= at < end and any(a < at and first < b for a, b in lapses))
        ]
        # Joins sent while this one was on its way (a crowd sends a burst at once) reach
        # the edge in either order: their places among themselves are not the clocks' to say.
        on_the_way = event["first_answered"] - first
        together = sum(0 < abs(f - first) <= on_the_way for f in line)
        slack = {
            "waiting": len(changed),
            "position": sum(f < first for f in changed) + together + waiting / 10 + 2,
        }
        for name, said in (("position", position), ("waiting", waiting)):
            error = abs(said - truth[name])
            errors[name].append(error)
            relative[name].append(error / max(1, truth[name]))
            beyond[name] += error > slack[name]
    return {
        name: [
            *(round(p, 1) for p in quantiles(errors[name])),
            max(errors[name], default=0.0),
            *(round(p, 2) for p in quantiles(relative[name])),
            beyond[name],
        ]
        for name in errors
    }


def overtaken_by(admissions: list[dict[str, Any]]) -> list[float]:
    """For each admission, how much later than it a listener got in whose first attempt
    came earlier (the order as the listeners saw it, client retry timing included)."""
    ordered = sorted(admissions, key=lambda e: e["first"])
    late: list[float] = []
    latest_earlier = -float("inf")
    for event in ordered:
        late.append(max(0.0, latest_earlier - event["at"]))
        latest_earlier = max(latest_earlier, event["at"])
    return late


def quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values) or [0.0]
    return ordered[len(ordered) // 2], ordered[int(len(ordered) * 0.95)]


def test_a_join_storm_through_three_edge_replicas(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    relay_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    scaling_operator = relay_operator
    rooms = Rooms(api_client, namespace)
    trace = write_trace(
        tmp_path / "storm.csv",
        [(-10, 0), (0, 0), (6, 600), (40, 600), (48, 100), (66, 100), (70, 300), (95, 300),
         (100, 0), (300, 0)],
    )  # fmt: skip
    plane = DataPlane.start(rooms, kubeconfig, prometheus, tmp_path, "storm")
    edges, holdings = plane.edges, plane.holdings
    history = MapHistory(rooms.core, namespace, "storm")
    manifest = storm_room("storm", start_in=12, origin_address=plane.origin_address)
    rooms.create(manifest)
    start = datetime.fromisoformat(manifest["spec"]["startTime"].replace("Z", "+00:00"))
    start_at = start.timestamp()
    # A busy machine may start the operator late: the storm begins once it has published.
    wait_until(lambda: history.states, 60, "the operator to publish the shard map")
    waiting = Waiting(rooms, "storm")
    load = LoadGenerator(kubeconfig, namespace, "storm", trace, edges, real_listeners=REAL)
    prometheus.add_target(load.address, {"source": "loadgen"})
    try:
        wait_until(lambda: time.time() > start_at + 14, 90, "the storm to be under way")
        edges.kill(2)
        killed_at = time.time()
        wait_until(lambda: time.time() > start_at + 64, 90, "the audience to have fallen")
        scaling_operator.kill()
        operator_down = (time.time(), 0.0)
        wait_until(lambda: time.time() > start_at + 76, 30, "new joins while the operator is away")
        operator_down = (operator_down[0], time.time())
        scaling_operator.start()
        wait_until(lambda: time.time() > start_at + 102, 60, "the audience to leave")
        wait_until(lambda: waiting.samples and waiting.samples[-1][1] == 0, 30, "no one waiting")
    finally:
        waiting.stop()
        history.stop()
        load.stop()
        plane.stop()

    events = load.events()
    # The real listeners' way in, as they timed it (the crowd's record, in the summary the
    # load generator writes at exit), joins the simulated ones' in every verdict on order.
    summary = next(e for e in events if e.get("event") == "summary")
    real_record = (summary.get("real") or {}).get("record", [])
    real_admissions = [e for e in real_record if e["event"] == "admitted"]
    events += real_record
    (tmp_path / "maps.json").write_text(json.dumps(history.assignments))
    admissions = [e for e in events if e["event"] == "admitted"]
    moves = [e for e in events if e["event"] == "moved"]
    selector = f'namespace="{namespace}",room="storm"'
    window = f"[{time.time() - start_at + 30:.0f}s:1s]"
    figures: dict[str, Any] = {
        "admissions (real ones among them)": [len(admissions), len(real_admissions)],
        "moves": len(moves),
    }

    # A relay's load is what the relay process counts plus the simulated listeners the load
    # generator placed there (each source its own series; they add up).
    peak = prometheus.value(
        f"max_over_time(max(sum by (pod) (audioroom_relay_listeners{{{selector}}})){window})"
    )
    figures["busiest relay (relay's own count + simulated)"] = peak
    real_peak = prometheus.value(
        f'max_over_time(max(audioroom_relay_listeners{{{selector},source="relay"}}){window})'
    )
    figures["busiest relay, real listeners only (the relay's own count)"] = real_peak
    refused = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prometheus.client().custom_query(
            f"sum by (reason) (max_over_time(audioroom_relay_refused_total{{{selector}}}{window}))"
        )
    }
    figures["hellos the relays refused, by reason"] = refused

    queued = [e for e in admissions if e["queued"]]
    figures["queued admissions"] = len(queued)
    latency = [e["first_answered"] - e["first"] for e in admissions]
    figures["first attempt answered in: p50, p95, most (s)"] = [
        *(round(p, 3) for p in quantiles(latency)),
        round(max(latency), 3),
    ]
    # The news of the other replicas' lines is at most the gap between two scrapes of a
    # replica plus a refresh old (README "Order").
    news_age = edge_scrape_gap(prometheus, namespace, window) + REFRESH_SECONDS * 1.25
    # The line holds a place for a listener that comes back within its allowance; one that
    # came back later (the loaded machine starved the load generator, or the request sat in
    # a queue on either side), or whose replica was killed, was out of line until it was
    # back and the news said so (`out_of_line`, from its own record of its tries).
    lapsed = [e for e in queued if out_of_line(e, news_age)]
    figures["queued listeners whose place may have lapsed once: all; by a killed replica"] = [
        len(lapsed),
        sum(1 for e in lapsed if len({t[4] for t in e["tries"]}) > 1),
    ]
    figures["queued listeners late for a retry by more than one refresh interval"] = sum(
        1 for e in queued if e["late"] > REFRESH_SECONDS
    )
    # The measure: the admission order of queued listeners against their first
    # attempts. A waiting listener's first attempt counts from when its answer came back
    # (the edge saw it in between), the admitted one's from when it was sent.
    in_line = reordering(queued, queued, since="first_answered", news_age=news_age)
    figures["queued listeners: reordering (s), most, beyond one interval"] = [
        round(max(in_line, default=0.0), 3),
        sum(r > REFRESH_SECONDS for r in in_line),
    ]
    figures["the same, both first attempts as sent: most (s)"] = round(
        max(reordering(queued, queued, news_age=news_age), default=0.0), 3
    )
    figures["the same, lapsed places included: most (s)"] = round(
        max(reordering(queued, queued, since="first_answered"), default=0.0), 3
    )
    # A new join (no ticket, the map open) does not wait for news of the other replicas:
    # it can pass a listener another replica queued since its last news, by at most that
    # news's age (README "Order").
    fresh = [e for e in admissions if not e["queued"]]
    passes = reordering(fresh, queued, since="first_answered", news_age=news_age)
    figures[
        "new joins passing a queued listener: most (s), beyond one interval; news age bound (s)"
    ] = [
        round(max(passes, default=0.0), 3),
        sum(r > REFRESH_SECONDS for r in passes),
        round(news_age, 2),
    ]
    places = place_errors(events, news_age)
    figures["429 position: |error| p50, p95, most; relative p50, p95; beyond the slack"] = places[
        "position"
    ]
    figures["429 waiting: |error| p50, p95, most; relative p50, p95; beyond the slack"] = places[
        "waiting"
    ]
    overtaken = overtaken_by(admissions)
    figures["an earlier listener got in later by: p50, p95, most (s)"] = [
        *(round(p, 2) for p in quantiles(overtaken)),
        round(max(overtaken, default=0.0), 2),
    ]
    waits = [e["at"] - e["first"] for e in queued]
    figures["queued wait p50, p95, most (s)"] = [
        *(round(p, 2) for p in quantiles(waits)),
        round(max(waits, default=0.0), 2),
    ]
    figures["guests (admitted to a relay other than their shard's)"] = sum(
        1
        for e in admissions
        if (assignment := history.assignments.get(e["generation"])) is not None
        and assignment[shard_of(e["listener"], len(assignment))] != int(e["pod"].rsplit("-", 1)[1])
    )

    peak_waiting = max(w for _, w in waiting.samples)
    figures["peak status.listeners.waiting"] = peak_waiting

    unknown, to_draining, while_draining = 0, [], 0
    for event in admissions + moves:
        pod = event.get("pod") or event["to"]
        ordinal = int(pod.rsplit("-", 1)[1])
        states = history.states.get(event["generation"])
        if states is None:
            unknown += 1
            continue
        if states.get(ordinal) != "active":
            to_draining.append(event)
        while_draining += "draining" in states.values()
    figures["joins checked against a map with draining relays"] = while_draining
    figures["joins whose map generation the watch missed"] = unknown

    # Draining, as the relays count it: a hello whose admit ticket was issued on a map in
    # which its relay already drained is the edge's fault; one from the map before only
    # crossed the new map on its way (refused as "draining": it asks the edge again).
    misplaced = {
        r["metric"]["outcome"]: float(r["value"][1])
        for r in prometheus.client().custom_query(
            "sum by (outcome) (max_over_time("
            f"audioroom_relay_placed_while_draining_total{{{selector}}}{window}))"
        )
    }
    sampled = {outcome: holdings.misplaced[outcome] for outcome in ("refused", "seated")}
    figures["placed on a relay while it drained, by the relays: metric; /listeners"] = [
        misplaced,
        sampled,
    ]
    figures["hellos refused as the new map crossed them (draining, not a fault)"] = refused.get(
        "draining", 0.0
    )
    figures["tickets no map a relay read covered"] = holdings.misplaced["unjudged"]
    # The same from the relays' own record of whom they welcomed on which generation, judged
    # by the maps the API server served (independent of the relays' own judgement).
    welcomed_on_draining = [
        (listener, pod, generation)
        for (listener, pod, _), generation in holdings.placed_on.items()
        if history.states.get(generation, {}).get(int(pod.rsplit("-", 1)[1])) == "draining"
    ]
    real_while_draining = sum(
        1
        for event in real_admissions
        if "draining" in history.states.get(event["generation"], {}).values()
    )
    figures["real listeners welcomed (by the relays): on a generation they drained in; all"] = [
        len(welcomed_on_draining),
        len(holdings.placed_on),
    ]
    figures["real admissions on a map with a relay draining"] = real_while_draining

    # Moves: the simulated listeners' own record, and the real ones' as the relays saw them
    # (welcomed by another relay while the old one still held them).
    real_moves = [{"at": m.at} for m in holdings.moves()]
    figures["moves: simulated, real (by the relays)"] = [len(moves), len(real_moves)]
    figures["most moves in any minute"] = moves_in_any_minute(moves + real_moves)

    after_kill = [e for e in admissions if e["at"] > killed_at + 1]
    figures["admissions after the kill"] = len(after_kill)
    # Who holds whom, by the relays themselves: two relays held one real listener at once
    # only during a move's hand-over.
    overlaps = holdings.overlaps()
    by_listener = holdings.by_listener()
    figures["real listeners the relays held; after the kill"] = [
        len(by_listener),
        sum(1 for spans in by_listener.values() if any(s.start > killed_at for s in spans)),
    ]
    figures["two relays holding one listener: count, p50, most (s)"] = overlap_figures(overlaps)
    figures["... of them after the kill"] = overlap_figures(
        [o for o in overlaps if o.at > killed_at]
    )
    figures["relay samples: rounds, failed asks, listeners named by two relays in a round"] = [
        holdings.rounds,
        holdings.failures,
        holdings.doubles_at_samples,
    ]
    twice = prometheus.value(
        f"max_over_time(audioroom_loadgen_listeners_on_two_relays{{{selector}}}{window})"
    )
    bad_tickets = prometheus.value(
        f"max_over_time(audioroom_loadgen_refused_tickets_total{{{selector}}}{window})"
    )
    figures["admit tickets that expired in the load generator before it used them"] = (
        prometheus.value(
            f"max_over_time(audioroom_loadgen_late_tickets_total{{{selector}}}{window})"
        )
    )

    away = [e for e in admissions if operator_down[0] < e["at"] < operator_down[1]]
    figures["admissions while the operator was down"] = len(away)

    print(json.dumps(figures, indent=1))

    assert peak is not None and CAPACITY * 0.5 < peak <= CAPACITY
    assert len(queued) > 100, "the storm queued listeners"
    # The room's line: no queued listener got in while one whose first attempt reached the
    # edge more than one refresh interval before its own was still waiting (README "Order").
    assert max(in_line) <= REFRESH_SECONDS, figures
    # Not vacuous: a listener is judged only while its place surely held, so most of the
    # line must never have lapsed (a review showed that with slow enough answers every
    # waiter counts as lapsed and any reordering passes; runs had 49-89% never lapsed).
    assert len(queued) - len(lapsed) >= len(queued) / 3, figures
    assert max(passes, default=0.0) <= news_age, figures
    # Position and waiting are the room's, off only by what the news cannot carry yet.
    assert places["position"][-1] == 0 and places["waiting"][-1] == 0, figures
    assert peak_waiting > 0
    assert waiting.samples[-1][1] == 0
    # Draining relays receive no joins: by the relays' own count (and the API server's maps
    # for the real listeners they welcomed), then by the simulated listeners' record.
    assert real_while_draining > 0, "real listeners joined while relays drained"
    assert not any(misplaced.values()) and not any(sampled.values()), figures
    assert not welcomed_on_draining, welcomed_on_draining[:5]
    assert not to_draining, to_draining[:3]
    assert while_draining > 0, "joins arrived while relays drained"
    assert unknown < len(admissions) * 0.05
    assert moves, "relays were added, so shards moved"
    assert moves_in_any_minute(moves) <= BUDGET
    assert after_kill and {e["edge"] for e in after_kill} <= {0, 1}
    assert real_peak is not None and 0 < real_peak <= CAPACITY
    assert not refused.get("full"), "the edge sent a real listener to a full relay"
    assert len(by_listener) >= REAL * 0.9, "the relays held the real listeners"
    assert set(by_listener) <= {e["listener"] for e in real_admissions}, (
        "the relays held only listeners an edge admitted"
    )
    assert figures["real listeners the relays held; after the kill"][1] > 0
    too_long = [o for o in overlaps if o.seconds > MOVE_OVERLAP_BOUND]
    assert not too_long, f"listeners held by two relays beyond a move's hand-over: {too_long[:5]}"
    # The simulated part, counted by the load generator itself (apart: it cannot be other).
    assert twice == 0 and bad_tickets == 0
    assert away, "joins were admitted with no operator running"
    reasons = rooms.reasons("storm")
    assert "AdmissionQueueOn" in reasons and "AdmissionQueueOff" in reasons


SHIFT_BUDGET = 24
"""maxMigrationsPerMinute of the room whose relays are cut from 6 to 2 (8 a replica)."""
AUDIENCE = 72
"""Real listeners in that room: the four relays cut held 25-39 of 60 in earlier runs (the map
and guests decide), so 72 leave a margin over the budget."""
# This test found that a draining relay closed a listener whose move the edge held (its
# replica's share, budget // replicas, spent while the others' was not) at the end of the
# 30 s move grace, and that it joined again unbudgeted (2 of 50 cut off); relays now keep
# held listeners (relay/server.py, sweep_moves).
MOVES_DONE_WITHIN = 420
"""Seconds for those moves. Measured at a budget of 30: 35-39 moves took 173-262 s, 11-16 in
the busiest minute: the operator prices a draining relay's last shards at all the listeners
still on it (sharding.shard_listeners_from_relays: those of shards already moved but not yet
gone count too), so the budget lets the tail through one shard at a time."""


@pytest.mark.long  # 3-5 minutes: make test-long
def test_the_move_budget_binds_and_the_moves_complete_after_it(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    relay_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    """72 real listeners on 6 real relays; maxRelays cut to 2, so the listeners of 4 relays,
    more than the room's maxMigrationsPerMinute, must move through 3 edge replicas. Moves
    are counted by the relays (a listener welcomed elsewhere while its old relay held it),
    per any minute, and every one of them must finish by a move, not a cut-off."""
    rooms = Rooms(api_client, namespace)
    plane = DataPlane.start(rooms, kubeconfig, prometheus, tmp_path, "shift")
    edges, holdings = plane.edges, plane.holdings
    manifest = storm_room("shift", start_in=2, origin_address=plane.origin_address)
    spec = manifest["spec"]
    spec["duration"] = "30m"
    spec["expectedAudience"] = AUDIENCE
    spec["relay"]["listenersPerRelay"] = 60
    spec["relay"]["startupSeconds"] = 1
    spec["relay"]["podAnnotations"]["pod-ready.stage.kwok.x-k8s.io/delay"] = "1s"
    spec["scaling"].update(minRelays=6, maxRelays=6, drainTimeout="600s")
    spec["sharding"] = {"shards": 64, "fanout": 8, "maxMigrationsPerMinute": SHIFT_BUDGET}
    rooms.create(manifest)
    audience = None
    selector = f'namespace="{namespace}",room="shift"'
    try:

        def counted() -> dict[str, float]:
            return {
                r["metric"]["pod"]: float(r["value"][1])
                for r in prometheus.client().custom_query(
                    f"audioroom_relay_listeners{{{selector}}}"
                )
            }

        def carrying() -> set[int]:
            """The relays the map gives shards, while it admits joins (not queueing)."""
            config = rooms.core.read_namespaced_config_map("shift-shards", namespace)
            shard_map = json.loads(config.data["shardmap.json"])
            if shard_map["admission"] != "open":
                return set()
            return {relay for relay in shard_map["assignment"] if relay is not None}

        def on_the_four() -> float:
            return sum(n for pod, n in counted().items() if int(pod.rsplit("-", 1)[1]) >= 2)

        # Listeners spread over all six (by their shards, none a guest) only once the map
        # gives each relay shards, admits joins, and the edge reads each relay's own count.
        wait_until(lambda: rooms.relays("shift") == (6, 6) and carrying() == set(range(6))
                   and len(counted()) == 6, 90, "six Ready relays carrying shards")  # fmt: skip
        audience = Audience(edges.urls, namespace, "shift")
        audience.add(AUDIENCE)
        wait_until(lambda: audience.hearing(5), 90, "every listener hearing its relay")
        wait_until(lambda: on_the_four() > SHIFT_BUDGET, 60,
                   "more listeners on the four relays to cut than the budget")  # fmt: skip
        wait_until(lambda: sum(counted().values()) == AUDIENCE, 30, "the relays counting all")
        leaving = {pod: n for pod, n in counted().items() if int(pod.rsplit("-", 1)[1]) >= 2}
        wanted = int(sum(leaving.values()))
        cut_at = time.time()
        rooms.patch_spec("shift", {"scaling": {"minRelays": 2, "maxRelays": 2}})
        wait_until(
            lambda: (
                set(audience.by_pod()) <= {"shift-relay-0", "shift-relay-1"}
                and sum(audience.by_pod().values()) == AUDIENCE
            ),
            MOVES_DONE_WITHIN,
            "every listener moved to the two relays left",
        )
        done_at = time.time()
        wait_until(lambda: rooms.relays("shift")[0] == 2, 120, "the drained relays removed")
        audience.frames_flow(10, 30)
    finally:
        if audience is not None:
            audience.stop()
        plane.stop()

    moves = [m for m in holdings.moves() if m.at >= cut_at]
    per_minute = moves_in_any_minute([{"at": m.at} for m in moves])
    cut_off = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prometheus.client().custom_query(
            f"sum by (reason) (max_over_time(audioroom_relay_moved_total{{{selector}}}[10m]))"
        )
    }
    everyone = audience.listeners
    figures = {
        "listeners to move (on the 4 relays cut)": wanted,
        "moves the relays saw after the cut": len(moves),
        "most moves in any minute (budget)": [per_minute, SHIFT_BUDGET],
        "seconds from the cut to the last move": round(done_at - cut_at, 1),
        "moves the relays announced, by reason": cut_off,
        "listeners cut off or rejoined": sum(
            1 for lst in everyone if lst.stats.disconnects or lst.stats.joins > 1
        ),
        "frames lost": sum(lst.stats.lost for lst in everyone),
        "two relays holding one listener: count, p50, most (s)": overlap_figures(
            holdings.overlaps()
        ),
    }
    print("move budget figures:", json.dumps(figures))
    assert wanted > SHIFT_BUDGET, "more listeners must move than a minute's budget allows"
    assert per_minute <= SHIFT_BUDGET, figures
    assert len(moves) >= wanted, "each listener of a relay cut moved (make-before-break)"
    assert done_at - cut_at > 60, figures
    assert not any("grace-over" in reason or reason == "shutdown" for reason in cut_off), figures
    assert figures["listeners cut off or rejoined"] == 0, figures
    assert all(o.seconds <= MOVE_OVERLAP_BOUND for o in holdings.overlaps()), figures


def test_joins_waiting_at_the_edge_start_a_room_with_no_relays(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    """minRelays 0 and nothing declared: only the edge's waiting count can start a relay."""
    rooms = Rooms(api_client, namespace)
    room = storm_room("empty", start_in=2)
    room["spec"]["expectedAudience"] = 0
    room["spec"]["scaling"]["minRelays"] = 0
    rooms.create(room)
    wait_until(
        lambda: rooms.core.read_namespaced_config_map("empty-shards", namespace),
        60,
        "the shard map",
    )
    assert rooms.relays("empty")[0] == 0
    trace = write_trace(tmp_path / "trickle.csv", [(-10, 0), (0, 0), (5, 60), (300, 60)])
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, namespace, "empty", trace, edges)
    prometheus.add_target(load.address)
    try:
        wait_until(lambda: rooms.relays("empty")[0] > 0, 60, "a relay for the waiting joins")
        wait_until(
            lambda: any(e["event"] == "admitted" for e in load.events()),
            60,
            "the first admission",
        )
    finally:
        load.stop()
        edges.stop()
    status = rooms.get("empty")["status"]
    scaled = [e for e in rooms.events("empty") if e.reason == "ScaledUp"]
    assert scaled and "waiting" in scaled[0].message, [e.message for e in scaled]
    assert status["relays"]["desired"] > 0


def test_bad_input_and_a_flood_of_it(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    rooms.create(storm_room("quiet", start_in=3600))
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    base = f"{edges.urls[0]}/v1/rooms/{namespace}"
    try:
        wait_until(
            lambda: rooms.core.read_namespaced_config_map("quiet-shards", namespace),
            60,
            "the shard map",
        )

        async def scenario() -> dict[str, Any]:
            async with aiohttp.ClientSession() as session:

                async def post(path: str, body: bytes) -> tuple[int, str]:
                    async with session.post(f"{base}/{path}", data=body) as response:
                        return response.status, await response.text()

                cases = {
                    b"{": (400, "body: not valid JSON"),
                    b'{"listener": "a", "extra": 1}': (400, "body: unknown field 'extra'"),
                    json.dumps({"listener": "x" * 257}).encode(): (
                        400,
                        "listener: 257 bytes, at most 256",
                    ),
                    json.dumps({"listener": "a", "pad": "x" * 5000}).encode(): (
                        400,
                        "body: 5,028 bytes, at most 4,096",
                    ),
                }
                answers = {}
                for body, expected in cases.items():
                    answers[body[:20]] = (await post("quiet/join", body), expected)
                unknown = await post("nowhere/join", b'{"listener": "a"}')
                junk = [post("quiet/join", b"{" * (i % 40 + 1)) for i in range(2000)]
                good = [
                    post("quiet/join", json.dumps({"listener": f"ok-{i}"}).encode())
                    for i in range(40)
                ]
                began = time.monotonic()
                flood = await asyncio.gather(*junk, *good)
                return {
                    "cases": answers,
                    "unknown": unknown,
                    "junk": flood[:2000],
                    "good": flood[2000:],
                    "seconds": time.monotonic() - began,
                }

        result = asyncio.run(scenario())
    finally:
        edges.stop()

    for (status, text), (expected_status, message) in result["cases"].values():
        assert status == expected_status
        assert "\n" not in text.strip()
        assert json.loads(text)["error"].startswith(message)
    status, text = result["unknown"]
    assert status == 404 and json.loads(text)["error"].startswith(f"room {namespace}/nowhere")
    assert all(status == 400 for status, _ in result["junk"])
    for status, text in result["good"]:
        answer = json.loads(text)
        assert status in (200, 429), text
        assert set(answer) in (
            {"relay", "pod", "shard", "generation", "ticket"},
            {"position", "waiting", "ticket"},
        )
    print(f"2,040 requests ({2000} malformed) answered in {result['seconds']:.2f}s")
