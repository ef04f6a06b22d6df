"""AudioRooms as a test reads them: manifests, the API server's view, a sampling recorder."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edges import EdgeFleet
from harness import REPO, free_loopback_port
from kubernetes import client
from kubernetes.client.rest import ApiException

GROUP, VERSION, PLURAL = "townsquare.dev", "v1alpha1", "audiorooms"
READY_DELAY = "3s"
PHASES = ["Scheduled", "PreWarming", "Ready", "Live", "Draining", "Ended"]


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def room_manifest(
    name: str,
    start_in: float,
    *,
    audience: int = 3000,
    prewarm_lead: str = "20s",
    duration: str = "20s",
) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=start_in)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": {
            "startTime": rfc3339(start),
            "duration": duration,
            "expectedAudience": audience,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": 1000,
                "startupSeconds": 3,
                "podAnnotations": {"pod-ready.stage.kwok.x-k8s.io/delay": READY_DELAY},
                "nodeSelector": {"type": "kwok"},
            },
            "scaling": {
                "targetUtilization": 0.75,
                "minRelays": 1,
                "maxRelays": 20,
                "prewarmLead": prewarm_lead,
                "drainTimeout": "3s",
            },
        },
    }


@dataclass
class Rooms:
    """AudioRooms and their children in one namespace, read through the real API server."""

    api: client.ApiClient
    namespace: str

    def __post_init__(self) -> None:
        self.custom = client.CustomObjectsApi(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)

    def create(self, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, manifest
        )

    def get(self, name: str) -> dict[str, Any]:
        room: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )
        return room

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": spec}
        )

    def phase(self, name: str) -> str | None:
        return (self.get(name).get("status") or {}).get("phase")

    def relays(self, name: str) -> tuple[int, int]:
        """(replicas the StatefulSet asks for, pods Ready)."""
        try:
            relay_set = self.apps.read_namespaced_stateful_set(f"{name}-relay", self.namespace)
        except ApiException as error:
            if error.status == 404:
                return (0, 0)
            raise
        return (relay_set.spec.replicas or 0, relay_set.status.ready_replicas or 0)

    def events(self, name: str) -> list[client.CoreV1Event]:
        selector = f"involvedObject.name={name},involvedObject.kind=AudioRoom"
        return self.core.list_namespaced_event(self.namespace, field_selector=selector).items

    def reasons(self, name: str) -> list[str]:
        ordered = sorted(self.events(name), key=lambda e: e.metadata.creation_timestamp)
        return [e.reason for e in ordered]


@dataclass
class Recorder:
    """Samples phase and relays every 200 ms in the background, as a watching person would."""

    rooms: Rooms
    name: str
    samples: list[tuple[float, str | None, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        # The operator writes the status before the children, and sees relays Ready before
        # it writes the phase that says so: so the StatefulSet's size is read before the
        # phase, and its Ready count after, and neither is ahead of the phase it is paired with.
        try:
            replicas, _ = self.rooms.relays(self.name)
            phase = self.rooms.phase(self.name)
            _, ready = self.rooms.relays(self.name)
            self.samples.append((time.time(), phase, replicas, ready))
        except ApiException:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.2)

    def stop(self) -> None:
        """Stop sampling, with one last sample of the state the test waited for."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def phases(self) -> list[str]:
        seen: list[str] = []
        for _, phase, _, _ in self.samples:
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
        return seen

    def in_phase(self, phase: str) -> list[tuple[float, str | None, int, int]]:
        return [s for s in self.samples if s[1] == phase]


CAPACITY = 100


def scaling_room(name: str, start_in: float, duration: str, audience: int) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(seconds=start_in)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": {
            "startTime": rfc3339(start),
            "duration": duration,
            "expectedAudience": audience,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": CAPACITY,
                "startupSeconds": 2,
                "podAnnotations": {"pod-ready.stage.kwok.x-k8s.io/delay": "2s"},
                "nodeSelector": {"type": "kwok"},
            },
            "scaling": {
                "targetUtilization": 0.7,
                "minRelays": 1,
                "maxRelays": 30,
                "prewarmLead": "10s",
                "planHold": "10s",
                "scaleDownStabilization": "10s",
                "drainTimeout": "20s",
            },
            "sharding": {"shards": 256, "fanout": 4, "maxMigrationsPerMinute": 100000},
        },
    }


class LoadGenerator:
    """`townsquare loadgen` for one room, joining through `edges`, scraped by the test's
    Prometheus; every admission and move goes to `record` (JSON lines). When the room's
    relays really run, `real_listeners` of the audience hold real connections to them."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        room: str,
        trace: Path,
        edges: EdgeFleet,
        check_every: float = 3.0,
        real_listeners: int | None = None,
        start: str | None = None,
        id_prefix: str | None = None,
    ) -> None:
        self.port = free_loopback_port()
        self.log = trace.with_suffix(".log")
        self.record = trace.with_suffix(".jsonl")
        command = [
            sys.executable, "-m", "townsquare", "loadgen", "--room", f"{namespace}/{room}",
            "--trace", str(trace), "--port", str(self.port), "--record", str(self.record),
            "--check-every", str(check_every),
            *[arg for url in edges.urls for arg in ("--edge", url)],
            *(() if real_listeners is None else ("--real-listeners", str(real_listeners))),
            *(() if start is None else ("--start", start)),
            *(() if id_prefix is None else ("--id-prefix", id_prefix)),
        ]  # fmt: skip
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env={
                    "KUBECONFIG": str(kubeconfig),
                    "PATH": "/usr/bin:/bin",
                    "TOWNSQUARE_TICKET_KEY": edges.key,
                },
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def events(self) -> list[dict[str, Any]]:
        """Every admission and move so far, in the order they happened."""
        if not self.record.exists():
            return []
        lines = self.record.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def write_trace(path: Path, rows: list[tuple[int, int]]) -> Path:
    path.write_text("t_seconds,listeners\n" + "".join(f"{t},{n}\n" for t, n in rows))
    return path


def ticket_secret(rooms: Rooms, key: bytes) -> None:
    """The Secret real relay pods mount their ticket key from (the operator's
    --relay-ticket-secret), holding the edges' key."""
    rooms.core.create_namespaced_secret(
        rooms.namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="townsquare-tickets"),
            data={"key": base64.b64encode(key).decode()},
        ),
    )
