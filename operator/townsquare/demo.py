"""`townsquare demo`: an announced launch, compressed in time, played on a real cluster.

It installs the CRD, starts a Prometheus of its own, the operator and the load generator as
processes of their own, applies the example room to start about a minute later, prints what
happens while it happens, and writes a report (HTML and PNG) from what the API server and
Prometheus recorded. Everything it started is stopped again, also on Ctrl-C or SIGTERM.

`--nodes` plays the same launch where relays fit only on nodes that Karpenter's kwok
provider adds (each takes NODE_DELAY to come), with node headroom asking for them ahead of
the pre-warm; the report marks when nodes were requested and when they were ready.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from townsquare.api.manifest import load_yaml, parse_room
from townsquare.api.models import GROUP, KIND, PLURAL, VERSION, AudioRoom
from townsquare.hearing import BEFORE_SECONDS, Gap, PlacedGap, longest_near, place_gaps
from townsquare.kube import karpenter
from townsquare.kube.placeholders import headroom_priority_class
from townsquare.metrics import escape_label_value
from townsquare.planning import plan_room
from townsquare.relay.saturation import ListenerCap, measure_listener_cap

SCRAPE_SECONDS = 1
SAMPLE_SECONDS = 1.0
PROGRESS_EVERY = 2
"""Print a progress line every this many samples."""
SETTLE_SECONDS = 60.0
"""Allowance beyond the room's own end and drain timeout before the demo gives up."""
SETTLE_EVENTS_SECONDS = 2.0
RELAYS_JOB = "relays"
"""The Prometheus job of the relay processes: their series are the relays' own counts."""
REAL_LISTENERS: int | None = None
"""Real listener connections the demo's load generator holds (the rest is simulated); None:
as many as it measures this machine carries at start (loadgen.REAL_LISTENERS)."""
SUSTAINED_SECONDS = 10
"""Real listeners count as carried at once when the relays counted them for this long: a
listener between the make and the break of a move is counted by both relays, and on this
machine the listeners' process can stall for 5-8 s right then (a demo run counted 41 of 40
real listeners held for 5 s)."""
GAPS_SHOWN = 25
"""The report lists this many of the longest gaps real listeners heard."""
Progress = Callable[[str], None]

ORIGIN_ANNOTATION = "townsquare.dev/origin"
TICKET_SECRET = "townsquare-tickets"
"""The Secret the cluster's pod runner gives each relay its ticket key from."""
NODE_POOL = "townsquare-demo"
NODE_LABEL = "townsquare.dev/demo-pool"
NODE_DELAY = "20s"
"""From a NodeClaim to its node in the nodes scene (a cloud takes minutes; 20 min at 60x)."""
NODE_INSTANCE_TYPE = "c-16x-amd64-linux"
"""16 CPU: five relays of 3 CPU per node."""
NODE_LEAD = "40s"
NODE_REASONS = {"NodesRequested": "nodes requested", "NodesReady": "nodes ready"}


class DemoError(RuntimeError):
    """Why the demo could not finish, said so the user knows what to look at."""


# --- the processes the demo starts ---------------------------------------------------------


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A process the demo started, with its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, command: list[str], log: Path, env: dict[str, str]) -> Child:
        with log.open("wb") as sink:
            process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        return cls(name, process, log)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM, then SIGKILL if it has not gone within `timeout`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def tail(self, chars: int = 1500) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]


class Prometheus:
    """A Prometheus server of the demo's own on loopback, scraping every second the demo's
    own processes (job `demo`) and the relay processes at their pod IPs (job `relays`,
    from a targets file the demo rewrites as pods come and go)."""

    def __init__(self, workdir: Path, targets: list[str], log: Path) -> None:
        binary = os.environ.get("TOWNSQUARE_PROMETHEUS") or shutil.which("prometheus")
        if not binary:
            raise DemoError("prometheus is not installed: run 'make prometheus'")
        self.binary = binary
        self.workdir = workdir
        self.log = log
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        interval = f"{SCRAPE_SECONDS}s"
        self.relay_targets = workdir / "relays.json"
        self.scraped: set[str] = set()
        self.scrape_relays([])
        settings = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval},
            "scrape_configs": [
                {
                    "job_name": "demo",
                    # The load generator labels its series (namespace, room, pod): keep them.
                    "honor_labels": True,
                    "static_configs": [{"targets": targets}],
                },
                {
                    "job_name": RELAYS_JOB,
                    # So do the relays, with their own namespace, room and pod.
                    "honor_labels": True,
                    "file_sd_configs": [
                        {"files": [str(self.relay_targets)], "refresh_interval": interval}
                    ],
                },
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(settings))
        self.child: Child | None = None

    def scrape_relays(self, addresses: list[str]) -> None:
        """Scrape exactly these relay processes (HOST:PORT) from now on; a relay left out
        (its pod gone) stops being scraped and its series end."""
        if set(addresses) == self.scraped and self.relay_targets.exists():
            return
        partial = self.relay_targets.with_suffix(".tmp")
        partial.write_text(json.dumps([{"targets": sorted(addresses), "labels": {}}]))
        partial.replace(self.relay_targets)  # never half-written when Prometheus reads it
        self.scraped = set(addresses)

    def start(self, timeout: float = 60) -> None:
        command = [
            self.binary,
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.child = Child.start("prometheus", command, self.log, dict(os.environ))
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.child.exit_code() is not None:
                raise DemoError(f"Prometheus exited; its log ends with:\n{self.child.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"Prometheus was not ready within {timeout:.0f}s; see {self.log}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout=15)

    def _get(self, path: str, **params: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise DemoError(f"Prometheus refused {params.get('query')!r}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The first value of an instant query, or None when it is empty."""
        result = self._get("/api/v1/query", query=promql)
        return float(result[0]["value"][1]) if result else None

    def series(self, promql: str, start: float, end: float) -> dict[float, float]:
        """The first series of a range query at 1s steps, by Unix time."""
        result = self._get(
            "/api/v1/query_range", query=promql, start=f"{start:.0f}", end=f"{end:.0f}", step="1"
        )
        return {float(t): float(v) for t, v in result[0]["values"]} if result else {}


# --- what the demo records ----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """The room's status as read at one moment (Unix time)."""

    at: float
    phase: str
    listeners: int
    capacity: int
    waiting: int
    ready: int
    desired: int


@dataclass(frozen=True)
class EventRow:
    """One Event on the room, as `kubectl describe audioroom` shows it."""

    at: float
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Timeline:
    """Per second, from Prometheus: what the audience wanted and what the relays carried."""

    t: list[float]
    wanted: list[float]
    connected: list[float]
    capacity: list[float]
    waiting: list[float]
    max_on_relay: list[float]


@dataclass(frozen=True)
class Figures:
    """The headline numbers of a run; listener-seconds are in the event's own time."""

    expected_audience: int
    planned_relays: int
    listeners_per_relay: int
    peak_wanted: int
    peak_connected: int
    peak_waiting: int
    waiting_listener_seconds: int
    max_listeners_on_a_relay: int
    peak_ready_relays: int
    peak_desired_relays: int
    prewarmed_seconds_before_start: int | None
    """Real seconds between the PreWarmed Event and the start; None if it never came."""
    events: int
    longest_wait_seconds: int = 0
    """Real seconds the oldest waiting join had waited, at worst (the edge's metric)."""
    real_listeners: int = 0
    """Most of the audience held as real relay connections at once (the load generator does
    so only when the relays are real processes); the rest was simulated."""
    real_listeners_that_lost_frames: int = 0
    """Real listeners that missed a frame number, as they counted it."""
    real_longest_gap_ms: int = 0
    """The longest silence any real listener heard."""
    real_listeners_on_relays: int = 0
    """Most real listeners connected at once, for SUSTAINED_SECONDS, as the relay processes
    themselves counted them (their own metrics, scraped at their pod IPs)."""
    real_frames_lost: int = 0
    """Frame numbers real listeners never received, all of them together."""
    real_gaps: int = 0
    """Gaps real listeners noticed: moves, lost connections, and silences of 0.1 s or more."""
    real_longest_own_stall_ms: int = 0
    """The longest time the real listeners' own process did not run (a busy machine): it
    shows as a gap in every one of them, with no frame lost."""
    real_longest_gap_beyond_stall_ms: int = 0
    """The longest gap not explained by the listeners' own stalls: what relays cost them."""
    real_longest_gap_near_scale_up_ms: int = 0
    real_longest_gap_near_reshard_ms: int = 0
    real_longest_gap_near_drain_ms: int = 0
    real_listeners_measured: int | None = None
    """Real listeners one listener process and one relay carried alone, measured by the load
    generator at start (it held CAP_SHARE of them); None when the count was given."""

    LABELS: ClassVar[dict[str, str]] = {
        "expected_audience": "declared audience",
        "peak_wanted": "peak demand (listeners wanting in)",
        "peak_connected": "peak connected listeners",
        "peak_waiting": "peak waiting in the admission queue",
        "longest_wait_seconds": "longest wait in the queue (real seconds)",
        "waiting_listener_seconds": "waiting listener-seconds (event time)",
        "max_listeners_on_a_relay": "most listeners on any one relay",
        "listeners_per_relay": "relay capacity",
        "planned_relays": "relays planned from the declared audience",
        "peak_ready_relays": "peak Ready relays",
        "peak_desired_relays": "peak desired relays",
        "prewarmed_seconds_before_start": "pre-warmed before the start (real seconds)",
        "events": "Events posted",
        "real_listeners": "listeners held as real relay connections (the rest simulated)",
        "real_listeners_on_relays": "most real listeners the relays themselves counted (10 s)",
        "real_listeners_measured": "real listeners this machine carried, measured at start "
        "(never: the count was given)",
        "real_listeners_that_lost_frames": "real listeners that lost frames",
        "real_frames_lost": "frames real listeners lost",
        "real_gaps": "gaps real listeners noticed (moves, drops, silences of 0.1 s or more)",
        "real_longest_gap_ms": "longest gap a real listener heard (ms)",
        "real_longest_own_stall_ms": "longest stall of the real listeners' own process (ms)",
        "real_longest_gap_beyond_stall_ms": "longest gap beyond the listeners' own stalls (ms)",
        "real_longest_gap_near_scale_up_ms": "longest gap near a scale-up, beyond own stalls (ms)",
        "real_longest_gap_near_reshard_ms": "longest gap near a reshard, beyond own stalls (ms)",
        "real_longest_gap_near_drain_ms": "longest gap near a drain, beyond own stalls (ms)",
    }

    def rows(self) -> list[tuple[str, str, str]]:
        """(key, label, formatted value) in reading order."""
        out = []
        for key, label in self.LABELS.items():
            value = getattr(self, key)
            shown = "never" if value is None else f"{value:,.0f}"
            out.append((key, label, shown))
        return out


@dataclass(frozen=True)
class Report:
    """What one demo run showed, and where it was written."""

    namespace: str
    room: str
    start_time: datetime
    speed: float
    figures: Figures
    events: list[EventRow]
    samples: list[Sample]
    timeline: Timeline
    html: Path
    png: Path
    elapsed_seconds: float
    gaps: list[PlacedGap] = field(default_factory=list)
    """Every gap the real listeners heard, with the changes announced around it."""

    def summary(self) -> str:
        f = self.figures
        verdict = "never above" if f.max_listeners_on_a_relay <= f.listeners_per_relay else "ABOVE"
        prewarm = (
            f"pre-warmed {f.prewarmed_seconds_before_start}s before the start"
            if f.prewarmed_seconds_before_start is not None
            else "NOT pre-warmed before the start"
        )
        return (
            f"{f.peak_wanted:,} listeners wanted in ({f.expected_audience:,} declared), "
            f"{f.peak_connected:,} connected at peak on up to {f.peak_ready_relays} relays; "
            f"{prewarm}; most on one relay {f.max_listeners_on_a_relay:,} "
            f"({verdict} its {f.listeners_per_relay:,}); peak queue {f.peak_waiting:,}, "
            f"longest wait {f.longest_wait_seconds}s; {self._heard()}"
        )

    def _heard(self) -> str:
        f = self.figures
        if not f.real_listeners:
            return "every listener simulated (no real relay connections held)"
        measured = (
            "a count given"
            if f.real_listeners_measured is None
            else f"{f.real_listeners_measured:,} carried in a measurement at start, "
            "a sixteenth held"
        )
        return (
            f"{f.real_listeners:,} listeners on real connections ({measured}; "
            f"{f.real_listeners_on_relays:,} at once by the relays' own count): "
            f"{f.real_listeners_that_lost_frames:,} lost frames ({f.real_frames_lost:,} in all), "
            f"longest gap {f.real_longest_gap_ms:,} ms ({f.real_longest_gap_beyond_stall_ms:,} ms "
            f"beyond their own process's stalls); near scale-ups "
            f"{f.real_longest_gap_near_scale_up_ms:,} ms, reshards "
            f"{f.real_longest_gap_near_reshard_ms:,} ms, drains "
            f"{f.real_longest_gap_near_drain_ms:,} ms"
        )


@dataclass(frozen=True)
class Running:
    """What a caller may inspect before the demo tears everything down."""

    namespace: str
    room: str
    prometheus_url: str
    report: Report


# --- the run ------------------------------------------------------------------------------


def run_demo(
    kubeconfig: Path,
    namespace: str,
    trace: Path,
    room_template: Path,
    speed: float,
    out_dir: Path,
    *,
    crd_dir: Path = Path("crds"),
    start_in: float = 60.0,
    progress: Progress = print,
    before_teardown: Callable[[Running], None] | None = None,
    nodes: bool = False,
    karpenter_script: Path = Path("hack/cluster/karpenter/run.sh"),
    real_listeners: int | None = REAL_LISTENERS,
) -> Report:
    """Play `trace` at `speed` against the room in `room_template`, starting in `start_in`s.

    Creates `namespace` unless it exists, and deletes it at the end only if it created it.
    `before_teardown` sees the run while Prometheus and the room are still there. `nodes`:
    the nodes scene, with Karpenter started by `karpenter_script`. The first
    `real_listeners` of the audience hold real connections to the relay processes.
    """
    began = time.time()
    _plotting()  # fail before anything starts, not after the run
    out_dir.mkdir(parents=True, exist_ok=True)
    measured: ListenerCap | None = None
    if real_listeners is None:
        # Before anything of the demo runs, so the trace is not held up and the figure is
        # the machine's, not the machine's minus the demo.
        progress("measuring how many real listeners this machine carries")
        measured = asyncio.run(measure_listener_cap())
        real_listeners = measured.use
        progress(f"{measured.carried:,} carried alone (load average {measured.load:.1f}, "
                 f"{measured.seconds:.0f}s): holding {real_listeners:,}")  # fmt: skip
    manifest, room = _room(room_template, namespace, start_in, nodes=nodes)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig.resolve())}
    api = config.new_client_from_config(config_file=str(kubeconfig))
    with tempfile.TemporaryDirectory(prefix="townsquare-demo-") as tmp, ExitStack() as cleanup:
        cleanup.callback(api.close)
        progress(f"installing the AudioRoom CRD from {crd_dir}")
        install_crds(api, crd_dir)
        if nodes:
            _start_nodes(api, kubeconfig, karpenter_script, out_dir, cleanup, progress)
            # The start counts from now: Karpenter took a while to come up.
            manifest, room = _room(room_template, namespace, start_in, nodes=nodes)
        if _ensure_namespace(api, namespace):
            cleanup.callback(_delete_namespace, api, namespace, progress)
        load_port, edge_port = free_loopback_port(), free_loopback_port()
        targets = [f"127.0.0.1:{load_port}", f"127.0.0.1:{edge_port}"]
        prometheus = Prometheus(Path(tmp), targets, out_dir / "prometheus.log")
        progress(f"starting Prometheus on {prometheus.url}")
        cleanup.callback(prometheus.stop)
        prometheus.start()
        operator = _start_operator(namespace, prometheus.url, out_dir, env)
        cleanup.callback(operator.stop)
        # Every join goes through an edge replica; the relays check its tickets with the
        # same key (the relay pods mount the Secret, --relay-ticket-secret).
        env["TOWNSQUARE_TICKET_KEY"] = secrets.token_hex(16)
        edge = _start_edge(namespace, prometheus.url, edge_port, out_dir, env)
        cleanup.callback(edge.stop)
        name = room.metadata.name
        start = room.spec.start_time
        # The speakers' side: the pod runner starts a real relay for a pod only when it has
        # an origin to pull from, and the edge admits only to relays that really run.
        origin = _start_origin(api, namespace, name, kubeconfig, Path(tmp), out_dir, env)
        cleanup.callback(origin.stop)
        annotations = manifest["spec"]["relay"].setdefault("podAnnotations", {})
        annotations[ORIGIN_ANNOTATION] = origin.address
        manifest["spec"]["relay"]["args"] = ["relay"]  # the reference relay
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest
        )
        progress(f"AudioRoom {namespace}/{name} starts at {_clock(start)} (in {start_in:.0f}s)")
        edge_url = f"http://127.0.0.1:{edge_port}"
        _poll(lambda: _answers(f"{edge_url}/readyz"), 60, "the edge to sync the shard maps")
        load = _start_loadgen(
            namespace, name, trace, start, speed, load_port, edge_url, out_dir, env,
            real_listeners,
        )  # fmt: skip
        cleanup.callback(load.stop)
        # First of all, while the operator still runs and reads listeners, so that it lets go
        # of the room (kopf's finalizer) and has no reason to warn of missing metrics.
        cleanup.callback(_delete_room, api, namespace, name, operator)
        cleanup.callback(progress, "tearing down what the demo started")
        deadline = (start + room.spec.duration + room.spec.scaling.drain_timeout).timestamp()
        core = client.CoreV1Api(api)
        samples, events = _watch(
            api, namespace, room, operator, deadline + SETTLE_SECONDS, progress,
            lambda: prometheus.scrape_relays(_relay_addresses(core, namespace, name)),
        )  # fmt: skip
        # The load generator writes what its real listeners heard when it stops.
        load.stop(timeout=60)
        heard = _loadgen_summary(load)
        if measured is not None:
            heard["cap_measured"] = measured.as_record()
        gaps = place_gaps(
            [Gap.of(g) for g in heard.get("gaps", [])], [(e.at, e.reason) for e in events]
        )
        timeline = _timeline(prometheus, namespace, name, began, time.time())
        figures = _figures(
            prometheus, room, samples, events, timeline, time.time() - began, speed, heard, gaps
        )
        report = Report(
            namespace=namespace,
            room=name,
            start_time=start,
            speed=speed,
            figures=figures,
            events=events,
            samples=samples,
            timeline=timeline,
            html=out_dir / "report.html",
            png=out_dir / "timeline.png",
            elapsed_seconds=time.time() - began,
            gaps=gaps,
        )
        write_report(report)
        progress(report.summary())
        if before_teardown is not None:
            before_teardown(Running(namespace, name, prometheus.url, report))
    return report


def _start_nodes(
    api: client.ApiClient,
    kubeconfig: Path,
    script: Path,
    out_dir: Path,
    cleanup: ExitStack,
    progress: Progress,
) -> None:
    """Karpenter, the headroom PriorityClass, and a node pool only the demo's relays fit."""
    if not script.is_file():
        raise DemoError(f"{script} not found: run the nodes scene from the repository")
    progress(f"starting Karpenter's kwok provider (nodes take {NODE_DELAY} to come)")
    process = Child.start(
        "karpenter",
        [str(script), str(kubeconfig.resolve())],
        out_dir / "karpenter.log",
        karpenter.passed_on(os.environ),
    )
    cleanup.callback(process.stop)
    custom = client.CustomObjectsApi(api)
    _poll(lambda: _served(api, "nodepools.karpenter.sh"), 120, "Karpenter's CRDs")
    priority = headroom_priority_class("townsquare-headroom")
    with contextlib.suppress(ApiException):  # the chart's, or an earlier run's
        client.SchedulingV1Api(api).create_priority_class(priority)
    custom.create_cluster_custom_object(
        *karpenter.KWOK, "kwoknodeclasses", karpenter.kwok_node_class(NODE_POOL, NODE_DELAY)
    )
    pool = karpenter.node_pool(NODE_POOL, NODE_LABEL, instance_type=NODE_INSTANCE_TYPE)
    custom.create_cluster_custom_object(*karpenter.KARPENTER, "nodepools", pool)
    cleanup.callback(_delete_nodes, custom, progress)

    def pool_ready() -> bool:
        found = custom.get_cluster_custom_object(*karpenter.KARPENTER, "nodepools", NODE_POOL)
        conditions = (found.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    _poll(pool_ready, 60, "Karpenter to take the node pool")


def _served(api: client.ApiClient, crd: str) -> bool:
    try:
        return _established(client.ApiextensionsV1Api(api), crd)
    except ApiException as exc:
        if exc.status == 404:  # not installed yet
            return False
        raise


def _delete_nodes(custom: client.CustomObjectsApi, progress: Progress) -> None:
    """The pool and its nodes go before Karpenter stops (it removes what it added)."""
    progress("removing the demo's node pool and its nodes")
    for group, plural in ((karpenter.KARPENTER, "nodepools"), (karpenter.KWOK, "kwoknodeclasses")):
        with contextlib.suppress(ApiException):
            custom.delete_cluster_custom_object(*group, plural, NODE_POOL)

    def claims_gone() -> bool:
        claims = custom.list_cluster_custom_object(
            *karpenter.KARPENTER, "nodeclaims", label_selector=f"karpenter.sh/nodepool={NODE_POOL}"
        )
        return not claims["items"]

    with contextlib.suppress(DemoError):
        _poll(claims_gone, 60, "Karpenter to remove the demo's nodes")
    # A claim removed before its node registered still gets the node later (kwok provider):
    # such a node has nobody to remove it but us.
    core = client.CoreV1Api(custom.api_client)
    for node in core.list_node(label_selector=f"{NODE_LABEL}={NODE_POOL}").items:
        with contextlib.suppress(ApiException):
            core.delete_node(node.metadata.name)


def _room(
    template: Path, namespace: str, start_in: float, *, nodes: bool = False
) -> tuple[dict[str, Any], AudioRoom]:
    """The manifest to apply (start `start_in` seconds from now) and its validated model.

    The nodes scene puts relays (3 CPU each) on the demo's node pool only, with headroom."""
    try:
        manifest = load_yaml(template.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DemoError(f"{template}: cannot read: {exc.strerror}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
        raise DemoError(f"{template}: expected an AudioRoom manifest")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=round(start_in))
    manifest["metadata"] = {**(manifest.get("metadata") or {}), "namespace": namespace}
    manifest["spec"]["startTime"] = start.isoformat().replace("+00:00", "Z")
    if nodes:
        relay = manifest["spec"]["relay"]
        relay.update(karpenter.relays_on_pool(NODE_LABEL, NODE_POOL))
        relay["resources"] = {"requests": {"cpu": "3", "memory": "1Gi"}}
        manifest["spec"]["nodeHeadroom"] = {"enabled": True, "leadTime": NODE_LEAD}
    return manifest, parse_room(yaml.safe_dump(manifest))


def _clock(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M:%S UTC")


def install_crds(api: client.ApiClient, crd_dir: Path, timeout: float = 60) -> None:
    """Create or replace every CRD in `crd_dir` and wait until the API server serves it."""
    extensions = client.ApiextensionsV1Api(api)
    documents = [
        doc
        for path in sorted(crd_dir.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]
    if not documents:
        raise DemoError(f"no CustomResourceDefinition in {crd_dir}: run 'make crd'")
    for body in documents:
        name = body["metadata"]["name"]
        try:
            extensions.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = extensions.read_custom_resource_definition(name)
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            extensions.replace_custom_resource_definition(name, body)
        _poll(partial(_established, extensions, name), timeout, f"the CRD {name} to be served")


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    crd = extensions.read_custom_resource_definition(name)
    conditions = (crd.status and crd.status.conditions) or []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


def _poll(probe: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def _ensure_namespace(api: client.ApiClient, namespace: str) -> bool:
    """Create the namespace; False when it was there already (then it is not ours to delete)."""
    core = client.CoreV1Api(api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False

    def has_default_account() -> bool:
        try:
            return bool(core.read_namespaced_service_account("default", namespace))
        except ApiException:
            return False

    # Pods are refused until the namespace's default service account exists.
    _poll(has_default_account, 30, f"the default service account in {namespace}")
    return True


def _delete_namespace(api: client.ApiClient, namespace: str, progress: Progress) -> None:
    try:
        client.CoreV1Api(api).delete_namespace(namespace, propagation_policy="Background")
    except ApiException as exc:
        if exc.status != 404:
            progress(f"could not delete namespace {namespace}: {exc.reason}")


def _delete_room(
    api: client.ApiClient, namespace: str, name: str, operator: Child, timeout: float = 30
) -> None:
    """Delete the room and wait until the operator has released it; if the operator is gone
    or does not answer in time, drop the finalizers it left, or the namespace never goes."""
    custom = client.CustomObjectsApi(api)

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        deadline = time.monotonic() + timeout
        while not gone() and operator.exit_code() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if not gone():
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"finalizers": None}}
            )
    except ApiException as exc:
        if exc.status != 404:
            raise


def _python_townsquare(*args: str) -> list[str]:
    return [sys.executable, "-m", "townsquare", *args]


def _start_operator(
    namespace: str, prometheus_url: str, out_dir: Path, env: dict[str, str]
) -> Child:
    command = _python_townsquare(
        "run", "--namespace", namespace, "--prometheus-url", prometheus_url,
        "--metrics-interval", "1", "--metrics-max-age", "5", "--metrics-port", "0",
        "--relay-ticket-secret", TICKET_SECRET, "--log-format", "json",
    )  # fmt: skip
    return Child.start("operator", command, out_dir / "operator.log", env)


def _start_edge(
    namespace: str, prometheus_url: str, port: int, out_dir: Path, env: dict[str, str]
) -> Child:
    command = _python_townsquare(
        "edge", "--host", "127.0.0.1", "--port", str(port), "--namespace", namespace,
        "--prometheus-url", prometheus_url, "--admit-ttl", "3", "--log-format", "json",
    )  # fmt: skip
    return Child.start("edge", command, out_dir / "edge.log", env)


@dataclass
class Origin:
    child: Child
    address: str

    def stop(self) -> None:
        self.child.stop()


def _start_origin(
    api: client.ApiClient,
    namespace: str,
    room: str,
    kubeconfig: Path,
    workdir: Path,
    out_dir: Path,
    env: dict[str, str],
) -> Origin:
    """`townsquare origin` for the room, and the ticket Secret the relays read their key from."""
    key = env["TOWNSQUARE_TICKET_KEY"]
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name=TICKET_SECRET),
        data={"key": base64.b64encode(key.encode()).decode()},
    )
    core = client.CoreV1Api(api)
    try:
        core.create_namespaced_secret(namespace, secret)
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_secret(TICKET_SECRET, namespace, secret)
    key_file = workdir / "ticket.key"
    key_file.write_text(key)
    port = free_loopback_port()
    command = _python_townsquare(
        "origin", "--namespace", namespace, "--room", room, "--ticket-key-file", str(key_file),
        "--port", str(port), "--metrics-port", "0", "--kubeconfig", str(kubeconfig.resolve()),
        "--log-format", "json",
    )  # fmt: skip
    return Origin(Child.start("origin", command, out_dir / "origin.log", env), f"127.0.0.1:{port}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _start_loadgen(
    namespace: str,
    room: str,
    trace: Path,
    start: datetime,
    speed: float,
    port: int,
    edge_url: str,
    out_dir: Path,
    env: dict[str, str],
    real_listeners: int | None,
) -> Child:
    command = _python_townsquare(
        "loadgen", "--room", f"{namespace}/{room}", "--trace", str(trace), "--port", str(port),
        "--speed", f"{speed:g}", "--start", start.isoformat().replace("+00:00", "Z"),
        "--edge", edge_url, "--check-every", "20",
        # The relays count these themselves (Prometheus scrapes them at their pod IPs); the
        # load generator counts only the simulated rest, on the same pods.
        "--real-listeners", "auto" if real_listeners is None else str(real_listeners),
    )  # fmt: skip
    return Child.start("load generator", command, out_dir / "loadgen.log", env)


def _loadgen_summary(load: Child) -> dict[str, Any]:
    """What the real listeners heard: the summary line the load generator printed at exit
    (empty when it printed none)."""
    text = load.log.read_text(errors="replace") if load.log.exists() else ""
    for line in reversed(text.splitlines()):
        if line.startswith("{") and '"summary"' in line:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "summary":
                    real: dict[str, Any] = dict(record.get("real") or {})
                    real["cap_measured"] = record.get("real_cap_measured")
                    return real
    return {}


def _relay_addresses(core: client.CoreV1Api, namespace: str, room: str) -> list[str]:
    """HOST:PORT of the metrics of every relay pod that has an IP and is not going away:
    where the cluster's pod runner serves each relay process."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"townsquare.dev/room={room}")
    addresses = []
    for pod in pods.items:
        if not pod.status.pod_ip or pod.metadata.deletion_timestamp is not None:
            continue
        ports = [p for c in pod.spec.containers for p in c.ports or [] if p.name == "metrics"]
        if ports:
            addresses.append(f"{pod.status.pod_ip}:{ports[0].container_port}")
    return addresses


def _watch(
    api: client.ApiClient,
    namespace: str,
    room: AudioRoom,
    operator: Child,
    deadline: float,
    progress: Progress,
    every_sample: Callable[[], None] = lambda: None,
) -> tuple[list[Sample], list[EventRow]]:
    """Sample the room every second, print progress and new Events, until it has Ended;
    `every_sample` runs at each sample too."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    name, start = room.metadata.name, room.spec.start_time.timestamp()
    samples: list[Sample] = []
    events: dict[str, EventRow] = {}
    while True:
        status = (
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get(
                "status"
            )
            or {}
        )
        sample = _sample(status)
        samples.append(sample)
        every_sample()
        for uid, event in _events(core, namespace, name).items():
            if uid not in events:
                events[uid] = event
                progress(f"  {_since(event.at, start)}  {event.type:<7} {event.reason}: "
                         f"{event.message}")  # fmt: skip
        if len(samples) % PROGRESS_EVERY == 1 or sample.phase == "Ended":
            progress(_progress_line(sample, start))
        if sample.phase == "Ended":
            # The last Events may be posted just after the status that says Ended.
            time.sleep(SETTLE_EVENTS_SECONDS)
            for uid, event in _events(core, namespace, name).items():
                events.setdefault(uid, event)
            return samples, sorted(events.values(), key=lambda e: e.at)
        code = operator.exit_code()
        if code is not None:
            raise DemoError(f"the operator exited ({code}); its log ends with:\n{operator.tail()}")
        if time.time() > deadline:
            raise DemoError(
                f"the room had not Ended by {_clock(datetime.fromtimestamp(deadline, UTC))} "
                f"(phase {sample.phase}); see {operator.log}"
            )
        time.sleep(SAMPLE_SECONDS)


def _sample(status: dict[str, Any]) -> Sample:
    listeners = status.get("listeners") or {}
    relays = status.get("relays") or {}
    return Sample(
        at=time.time(),
        phase=status.get("phase") or "-",
        listeners=int(listeners.get("current", 0)),
        capacity=int(listeners.get("capacity", 0)),
        waiting=int(listeners.get("waiting", 0)),
        ready=int(relays.get("ready", 0)),
        desired=int(relays.get("desired", 0)),
    )


def _events(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, EventRow]:
    selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
    found: dict[str, EventRow] = {}
    for item in core.list_namespaced_event(namespace, field_selector=selector).items:
        when = item.event_time or item.first_timestamp or item.metadata.creation_timestamp
        found[item.metadata.uid] = EventRow(
            at=when.timestamp(), type=item.type or "", reason=item.reason or "",
            message=item.message or "",
        )  # fmt: skip
    return found


def _since(at: float, start: float) -> str:
    seconds = round(at - start)
    return f"T{'-' if seconds < 0 else '+'}{abs(seconds):3d}s"


def _progress_line(sample: Sample, start: float) -> str:
    return (
        f"{_since(sample.at, start)}  {sample.phase:<10} listeners {sample.listeners:>7,}"
        f"  capacity {sample.capacity:>7,}  relays {sample.ready:>3}/{sample.desired:<3}"
        f"  waiting {sample.waiting:>6,}"
    )


def _selector(namespace: str, room: str) -> str:
    return f'{{namespace="{escape_label_value(namespace)}",room="{escape_label_value(room)}"}}'


def _timeline(
    prometheus: Prometheus, namespace: str, room: str, start: float, end: float
) -> Timeline:
    """Per-second series from Prometheus over the run; missing seconds count as zero.

    A relay pod is reported twice: by its relay process (real listeners) and by the load
    generator (the simulated ones it placed there). Listeners add up per pod; a pod's
    capacity is declared by both alike and counts once."""
    selector = _selector(namespace, room)
    queries = {
        "wanted": f"sum(audioroom_edge_wanted_listeners{selector})",
        "connected": f"sum(audioroom_relay_listeners{selector})",
        "capacity": f"sum(max by (pod) (audioroom_relay_capacity_listeners{selector}))",
        "waiting": f"sum(audioroom_edge_waiting_listeners{selector})",
        "max_on_relay": f"max({_per_pod(selector)})",
    }
    found = {key: prometheus.series(q, start, end) for key, q in queries.items()}
    times = sorted(set().union(*(series.keys() for series in found.values())))
    columns = {key: [series.get(t, 0.0) for t in times] for key, series in found.items()}
    return Timeline(t=times, **columns)


def _per_pod(selector: str) -> str:
    """Listeners on each relay pod, whichever sources report it (relay process, load
    generator)."""
    return f"sum by (pod) (audioroom_relay_listeners{selector})"


def _figures(
    prometheus: Prometheus,
    room: AudioRoom,
    samples: list[Sample],
    events: list[EventRow],
    timeline: Timeline,
    window: float,
    speed: float,
    heard: dict[str, Any],
    gaps: list[PlacedGap],
) -> Figures:
    """The headline numbers; the busiest relay at every scrape, not only at the 1s steps of
    the timeline; what real listeners heard from the load generator's exit summary."""
    selector = _selector(room.metadata.namespace or "", room.metadata.name)
    span = f"[{window + 5:.0f}s:{SCRAPE_SECONDS}s]"
    busiest = prometheus.value(f"max_over_time(max({_per_pod(selector)}){span})")
    relays_only = selector[:-1] + f',job="{RELAYS_JOB}"}}'
    # Held for SUSTAINED_SECONDS: a listener moving make-before-break is counted by two
    # relays for a moment, and a peak of single scrapes would count it twice.
    held = f"min_over_time(sum(audioroom_relay_listeners{relays_only})[{SUSTAINED_SECONDS}s:1s])"
    on_relays = prometheus.value(f"max_over_time({held}{span})")
    longest = prometheus.value(
        f"max(max_over_time(audioroom_edge_oldest_wait_seconds{selector}[{window + 5:.0f}s]))"
    )

    def most(metric: str, labels: str = "") -> float:
        chosen = selector[:-1] + labels + "}"
        return prometheus.value(f"max(max_over_time({metric}{chosen}[{window + 5:.0f}s]))") or 0

    spec = room.spec
    prewarmed = next((e.at for e in events if e.reason == "PreWarmed"), None)
    near_changes = longest_near(gaps)
    return Figures(
        expected_audience=spec.expected_audience,
        planned_relays=plan_room(spec, spec.start_time).relays,
        listeners_per_relay=spec.relay.listeners_per_relay,
        peak_wanted=round(max(timeline.wanted, default=0)),
        peak_connected=round(max(timeline.connected, default=0)),
        peak_waiting=round(max(timeline.waiting, default=0)),
        longest_wait_seconds=round(longest or 0),
        # One step is one real second, which is `speed` seconds of the event.
        waiting_listener_seconds=round(sum(timeline.waiting) * speed),
        max_listeners_on_a_relay=round(busiest or 0),
        peak_ready_relays=max((s.ready for s in samples), default=0),
        peak_desired_relays=max((s.desired for s in samples), default=0),
        prewarmed_seconds_before_start=(
            None if prewarmed is None else round(spec.start_time.timestamp() - prewarmed)
        ),
        events=len(events),
        real_listeners=round(most("audioroom_loadgen_audience", ',kind="real"')),
        real_listeners_on_relays=round(on_relays or 0),
        real_listeners_measured=(heard.get("cap_measured") or {}).get("carried"),
        real_listeners_that_lost_frames=int(
            heard.get("listeners_that_lost_frames")
            or most("audioroom_loadgen_real_listeners_that_lost_frames")
        ),
        real_frames_lost=int(heard.get("frames_lost", 0)),
        real_gaps=len(gaps),
        real_longest_gap_ms=round(
            float(heard.get("longest_gap_s") or most("audioroom_loadgen_real_longest_gap_seconds"))
            * 1000
        ),
        real_longest_own_stall_ms=round(
            max((float(s["seconds"]) for s in heard.get("stalls", [])), default=0.0) * 1000
        ),
        real_longest_gap_beyond_stall_ms=round(
            max((p.gap.beyond_stall for p in gaps), default=0.0) * 1000
        ),
        real_longest_gap_near_scale_up_ms=round(near_changes["scale-up"] * 1000),
        real_longest_gap_near_reshard_ms=round(near_changes["reshard"] * 1000),
        real_longest_gap_near_drain_ms=round(near_changes["drain"] * 1000),
    )


# --- the report ---------------------------------------------------------------------------


def _plotting() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DemoError(
            "the demo's report needs matplotlib: install the `plot` extra "
            "(pip install townsquare[plot])"
        ) from None
    return plt


def _event_minutes(at: float, report: Report) -> float:
    """Real time as minutes from the start in the event's own time."""
    return (at - report.start_time.timestamp()) * report.speed / 60


def plot_report(report: Report, path: Path) -> None:
    """Listeners, relays and the busiest relay over the event's own minutes."""
    plt = _plotting()
    line = report.timeline
    minutes = [_event_minutes(t, report) for t in line.t]
    figure, (people, relays, busiest) = plt.subplots(
        3, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.6, 1.6]}
    )
    people.plot(minutes, line.wanted, color="black", linewidth=1.3, label="demand (wanting in)")
    people.plot(minutes, line.connected, color="tab:blue", linewidth=1.2, label="connected")
    people.step(minutes, line.capacity, where="post", color="tab:green", linewidth=1,
                label="capacity of Ready relays (full)")  # fmt: skip
    people.fill_between(minutes, 0, line.waiting, color="orange", alpha=0.6,
                        label="waiting (admission queue)")  # fmt: skip
    people.set_ylabel("listeners")
    people.legend(loc="upper right", fontsize=8)
    at = [_event_minutes(s.at, report) for s in report.samples]
    relays.step(at, [s.desired for s in report.samples], where="post", color="grey",
                linestyle="--", linewidth=1, label="desired")  # fmt: skip
    relays.step(at, [s.ready for s in report.samples], where="post", color="tab:blue",
                linewidth=1.2, label="Ready")  # fmt: skip
    relays.set_ylabel("relays")
    relays.legend(loc="upper right", fontsize=8)
    capacity = report.figures.listeners_per_relay
    busiest.plot(minutes, line.max_on_relay, color="tab:red", linewidth=1.1,
                 label="listeners on the busiest relay")  # fmt: skip
    busiest.axhline(capacity, color="tab:red", linestyle=":", linewidth=1,
                    label=f"relay capacity ({capacity:,})")  # fmt: skip
    busiest.set_ylim(0, capacity * 1.15)
    busiest.set_ylabel("listeners")
    busiest.legend(loc="lower right", fontsize=8)
    busiest.set_xlabel(f"minutes from the start, event time (played at {report.speed:g}x)")
    marks = [(e, NODE_REASONS[e.reason]) for e in report.events if e.reason in NODE_REASONS]
    for axis in (people, relays, busiest):
        axis.axvline(0, color="black", linewidth=0.8, alpha=0.5)
        for event, _ in marks:
            axis.axvline(_event_minutes(event.at, report), color="tab:purple", linewidth=0.9,
                         linestyle="-." if event.reason == "NodesRequested" else "-")  # fmt: skip
        axis.grid(alpha=0.3)
    for event, label in marks:
        where = (_event_minutes(event.at, report), 1)
        people.annotate(label, where, xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=8, color="tab:purple")  # fmt: skip
    figure.suptitle(f"AudioRoom {report.namespace}/{report.room}: {report.figures.events} Events")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def render_html(report: Report, png: bytes) -> str:
    """A self-contained page: headline figures, the plot and the Events in order."""
    start = report.start_time.timestamp()
    figures = "\n".join(
        f'<tr><th>{html.escape(label)}</th><td data-figure="{key}">{value}</td></tr>'
        for key, label, value in report.figures.rows()
    )
    events = "\n".join(
        f"<tr><td>{_since(e.at, start)}</td><td>{_event_minutes(e.at, report):+.0f} min</td>"
        f'<td class="{html.escape(e.type)}">{html.escape(e.type)}</td>'
        f"<td>{html.escape(e.reason)}</td><td>{html.escape(e.message)}</td></tr>"
        for e in report.events
    )
    image = base64.b64encode(png).decode("ascii")
    title = f"townsquare demo: {report.namespace}/{report.room}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
td[data-figure] {{ text-align: right; font-variant-numeric: tabular-nums; }}
td.Warning {{ color: #b35900; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Started {_clock(report.start_time)}, played at {report.speed:g}x; the run took
{report.elapsed_seconds:.0f}s. {html.escape(report.summary())}.</p>
{_nodes_paragraph(report)}
<h2>Headline figures</h2>
<table>
{figures}
</table>
<h2>Timeline</h2>
<img alt="listeners, capacity, relays and the busiest relay over time"
 src="data:image/png;base64,{image}" style="max-width: 100%">
{_gaps_section(report)}
<h2>Events</h2>
<table>
<tr><th>real time</th><th>event time</th><th>type</th><th>reason</th><th>message</th></tr>
{events}
</table>
</body></html>
"""


def _gaps_section(report: Report) -> str:
    """The gaps that cost real listeners most beyond their own process's stalls, in time
    order, each marked with the changes (scale-up, reshard, drain) announced around it."""
    f = report.figures
    if not f.real_listeners:
        return ""
    start = report.start_time.timestamp()
    longest = sorted(report.gaps, key=lambda p: p.gap.beyond_stall, reverse=True)[:GAPS_SHOWN]
    rows = "\n".join(
        f"<tr><td>{_since(p.gap.at, start)}</td><td>{html.escape(p.gap.listener)}</td>"
        f'<td data-gap-ms="{round(p.gap.seconds * 1000)}">{p.gap.seconds * 1000:,.0f}</td>'
        f"<td>{p.gap.stalled * 1000:,.0f}</td>"
        f"<td>{p.gap.lost:,}</td><td>{html.escape(p.gap.cause)}</td>"
        f'<td data-near="{" ".join(p.near)}">{", ".join(p.near) or "no change near"}</td></tr>'
        for p in sorted(longest, key=lambda p: p.gap.at)
    )
    near = sum(1 for p in report.gaps if p.near)
    return f"""<h2>What the real listeners heard</h2>
<p>{f.real_listeners:,} listeners held real connections to the relay processes (the relays
counted {f.real_listeners_on_relays:,} of them at once); the rest of the audience was
simulated and counted apart. They noticed {len(report.gaps):,} gaps, {near:,} of them within
{BEFORE_SECONDS:.0f}s after a scale-up, reshard or drain was announced. A gap is measured in
the listeners' own process: when that process did not run (the machine busy), every listener
shows the same gap with no frame lost (the longest such stall: {f.real_longest_own_stall_ms:,} ms).
The {len(longest):,} gaps longest beyond that, in time order:</p>
<table>
<tr><th>real time</th><th>listener</th><th>gap (ms)</th><th>of it, own stall (ms)</th>
<th>frames lost</th><th>cause</th><th>near</th></tr>
{rows}
</table>"""


def _nodes_paragraph(report: Report) -> str:
    """When nodes were requested and ready (node headroom), if the room asked for any."""
    start = report.start_time.timestamp()
    marks = [
        f'<span data-nodes="{e.reason}">{NODE_REASONS[e.reason]} at {_since(e.at, start)} '
        f"({_event_minutes(e.at, report):+.0f} min event time)</span>"
        for e in report.events
        if e.reason in NODE_REASONS
    ]
    if not marks:
        return ""
    return f"<p>Node headroom: {'; '.join(marks)}.</p>"


def write_report(report: Report) -> None:
    """The PNG and the HTML page that embeds it, plus the figures as JSON."""
    plot_report(report, report.png)
    report.html.write_text(render_html(report, report.png.read_bytes()), encoding="utf-8")
    figures = {key: getattr(report.figures, key) for key in Figures.LABELS}
    (report.html.parent / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, so a terminated demo tears down as on Ctrl-C."""

    def interrupt(_signal: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
