"""The pod runner: a real `townsquare relay` process for every relay pod of the local cluster.

kwok's pods run nothing. This runner watches the relay pods (label
app.kubernetes.io/component=relay) and, while a pod is Running with a loopback IP (kwok's
pod CIDR is set inside 127.0.0.0/8 by cluster.sh), keeps one relay process bound to that IP,
on the pod's own container ports. When the pod goes (deleted, or its IP gone), the process
gets SIGTERM: its listeners are told to go back to the edge, and the connections really
drop. A process that dies while its pod exists is started again, as a kubelet would.

The API server refuses loopback IPs in Endpoints and EndpointSlices, so the runner also
publishes each relay Service's endpoints itself, as an FQDN-type EndpointSlice whose
addresses are the pods' IPs (ready while the pod is Ready and its process runs).

What a relay needs and where it comes from:
  room, namespace, pod     the pod's label townsquare.dev/room, namespace and name
  ports                    the container ports named `listeners` and `metrics`
  capacity                 the container's env TOWNSQUARE_CAPACITY
  origin                   the pod annotation townsquare.dev/origin (HOST:PORT); set it with
                           the AudioRoom's spec.relay.podAnnotations
  ticket key               the Secret named by the annotation townsquare.dev/ticket-secret
                           (default townsquare-tickets) in the pod's namespace, key `key`
  shard map                read by the relay itself, with this cluster's kubeconfig

Nothing outside 127.0.0.0/8 is ever contacted: a pod whose IP is not on loopback is left
alone (logged once). Runs until SIGTERM (cluster.sh down), or until the API server has been
unreachable for a minute (the cluster is gone).

    python hack/cluster/podrunner.py --kubeconfig K --state-dir D [--python P]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, config

SELECTOR = "app.kubernetes.io/component=relay"
ROOM_LABEL = "townsquare.dev/room"
ORIGIN_ANNOTATION = "townsquare.dev/origin"
SECRET_ANNOTATION = "townsquare.dev/ticket-secret"
DEFAULT_SECRET = "townsquare-tickets"
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
GIVE_UP_SECONDS = 60.0
RESTART_SECONDS = 1.0


def log(message: str, **fields: Any) -> None:
    record = {"time": time.strftime("%H:%M:%S"), "msg": message, **fields}
    print(json.dumps(record), flush=True)


@dataclass(frozen=True)
class Want:
    """One relay process as a pod asks for it; a changed Want means a new process."""

    namespace: str
    pod: str
    uid: str
    room: str
    ip: str
    port: int
    metrics_port: int
    capacity: int
    origin: str
    secret: str


@dataclass
class Running:
    want: Want
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0


def container_port(pod: Any, name: str, default: int) -> int:
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            if port.name == name:
                return int(port.container_port)
    return default


def container_env(pod: Any, name: str, default: str) -> str:
    for container in pod.spec.containers or []:
        for entry in container.env or []:
            if entry.name == name and entry.value is not None:
                return str(entry.value)
    return default


class PodRunner:
    def __init__(self, kubeconfig: str, state_dir: Path, python: str) -> None:
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.python = python
        api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.published: dict[tuple[str, str], dict[str, Any]] = {}
        self.running: dict[str, Running] = {}
        self.warned: set[str] = set()
        self.stopping = False
        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        (state_dir / "keys").mkdir(parents=True, exist_ok=True)
        (state_dir / "keys").chmod(0o700)

    def warn_once(self, key: str, message: str, **fields: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log(message, **fields)

    def wanted(self, pods: list[Any]) -> dict[str, Want]:
        wants: dict[str, Want] = {}
        for pod in pods:
            meta, status = pod.metadata, pod.status
            key = f"{meta.namespace}/{meta.name}"
            room = (meta.labels or {}).get(ROOM_LABEL)
            if meta.deletion_timestamp is not None or status.phase != "Running" or not room:
                continue
            ip = status.pod_ip
            if not ip:
                continue
            if ipaddress.ip_address(ip) not in LOOPBACK:
                self.warn_once(key + ip, "pod IP not on loopback: not started", pod=key, ip=ip)
                continue
            annotations = meta.annotations or {}
            origin = annotations.get(ORIGIN_ANNOTATION) or container_env(
                pod, "TOWNSQUARE_ORIGIN", ""
            )
            if not origin:
                self.warn_once(key, f"no {ORIGIN_ANNOTATION} annotation: not started", pod=key)
                continue
            wants[key] = Want(
                namespace=meta.namespace,
                pod=meta.name,
                uid=meta.uid,
                room=room,
                ip=ip,
                port=container_port(pod, "listeners", 7880),
                metrics_port=container_port(pod, "metrics", 9090),
                capacity=int(container_env(pod, "TOWNSQUARE_CAPACITY", "1000")),
                origin=origin,
                secret=annotations.get(SECRET_ANNOTATION, DEFAULT_SECRET),
            )
        return wants

    def key_file(self, want: Want) -> Path | None:
        """The ticket key from the pod's Secret, in a file only this user reads."""
        try:
            secret = self.core.read_namespaced_secret(want.secret, want.namespace)
        except client.ApiException as error:
            if error.status == 404:
                self.warn_once(
                    f"{want.namespace}/{want.secret}",
                    "ticket Secret missing: relay waits for it",
                    secret=f"{want.namespace}/{want.secret}",
                )
                return None
            raise
        data = (secret.data or {}).get("key")
        if not data:
            self.warn_once(
                f"{want.namespace}/{want.secret}/key",
                "ticket Secret has no `key`",
                secret=f"{want.namespace}/{want.secret}",
            )
            return None
        path = self.state_dir / "keys" / f"{want.namespace}_{want.secret}"
        partial = path.with_suffix(".tmp")
        partial.write_bytes(base64.b64decode(data))
        partial.chmod(0o600)
        partial.replace(path)
        return path

    def start(self, key: str, want: Want, restarts: int = 0) -> None:
        key_file = self.key_file(want)
        if key_file is None:
            return
        command = [
            self.python, "-m", "townsquare", "relay",
            "--namespace", want.namespace, "--room", want.room, "--pod", want.pod,
            "--address", want.ip, "--port", str(want.port),
            "--metrics-port", str(want.metrics_port), "--capacity", str(want.capacity),
            "--origin", want.origin, "--ticket-key-file", str(key_file),
            "--kubeconfig", self.kubeconfig, "--log-format", "json",
        ]  # fmt: skip
        sink = (self.state_dir / "logs" / f"{want.namespace}_{want.pod}.log").open("ab")
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        sink.close()
        self.running[key] = Running(want, process, time.monotonic(), restarts)
        log("relay started", pod=key, ip=want.ip, port=want.port, pid=process.pid,
            restarts=restarts)  # fmt: skip

    def stop(self, key: str, reason: str) -> None:
        running = self.running.pop(key)
        process = running.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log("relay stopped", pod=key, pid=process.pid, reason=reason)

    def sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(label_selector=SELECTOR, timeout_seconds=10)
        wants = self.wanted(pods.items)
        for key in list(self.running):
            running = self.running[key]
            if wants.get(key) != running.want:
                self.stop(key, "pod gone" if key not in wants else "pod changed")
            elif running.process.poll() is not None:
                if time.monotonic() - running.started < RESTART_SECONDS:
                    continue
                code = running.process.returncode
                del self.running[key]
                log("relay exited; starting it again", pod=key, code=code)
                self.start(key, running.want, running.restarts + 1)
        for key, want in wants.items():
            if key not in self.running:
                self.start(key, want)
        self.publish_endpoints(pods.items, wants)

    def publish_endpoints(self, pods: list[Any], wants: dict[str, Want]) -> None:
        """Each relay Service's endpoints, as an EndpointSlice the edge can read.

        The API server refuses loopback IPs in Endpoints and in IPv4/IPv6 EndpointSlices
        ("may not be in the loopback range"), so the EndpointSlice controller publishes
        nothing for our pods. An FQDN-type slice carries the same pod addresses, written as
        names: ready while the pod is Ready and its relay process runs, as a readiness
        probe would say. A relay pod with no origin runs no process here (a load generator
        plays its relay, as kwok pods run nothing): its readiness is the pod's alone.
        """
        by_room: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for pod in pods:
            meta, status = pod.metadata, pod.status
            room = (meta.labels or {}).get(ROOM_LABEL)
            ip = status.pod_ip
            if not room or not ip or ipaddress.ip_address(ip) not in LOOPBACK:
                continue
            key = f"{meta.namespace}/{meta.name}"
            running = self.running.get(key)
            alive = key not in wants or (running is not None and running.process.poll() is None)
            pod_ready = any(
                c.type == "Ready" and c.status == "True" for c in status.conditions or []
            )
            terminating = meta.deletion_timestamp is not None
            by_room.setdefault((meta.namespace, room), []).append({
                "addresses": [ip],
                "conditions": {
                    "ready": pod_ready and alive and not terminating,
                    "serving": alive,
                    "terminating": terminating,
                },
                "targetRef": {"kind": "Pod", "namespace": meta.namespace, "name": meta.name,
                              "uid": meta.uid},
                "nodeName": pod.spec.node_name,
            })  # fmt: skip
        for (namespace, room), endpoints in by_room.items():
            self.apply_slice(namespace, room, sorted(endpoints, key=lambda e: e["addresses"]))
        for namespace, room in set(self.published) - set(by_room):
            self.apply_slice(namespace, room, [])

    def apply_slice(self, namespace: str, room: str, endpoints: list[dict[str, Any]]) -> None:
        service_name = f"{room}-relays"
        try:
            service = self.core.read_namespaced_service(service_name, namespace)
        except client.ApiException as error:
            if error.status == 404:
                self.published.pop((namespace, room), None)
                return
            raise
        ports = [{"name": p.name, "port": p.port, "protocol": p.protocol or "TCP"}
                 for p in service.spec.ports or []]  # fmt: skip
        labels = {**(service.metadata.labels or {}),
                  "kubernetes.io/service-name": service_name,
                  "endpointslice.kubernetes.io/managed-by": "podrunner.townsquare.dev"}  # fmt: skip
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service_name}-loopback",
                "namespace": namespace,
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": service_name,
                        "uid": service.metadata.uid,
                    }
                ],
            },
            "addressType": "FQDN",
            "endpoints": endpoints,
            "ports": ports,
        }
        if self.published.get((namespace, room)) == body:
            return
        self.discovery.patch_namespaced_endpoint_slice(
            body["metadata"]["name"], namespace, body, field_manager="townsquare-podrunner",
            force=True, _content_type="application/apply-patch+yaml",
        )  # fmt: skip
        self.published[(namespace, room)] = body
        ready = sum(1 for e in endpoints if e["conditions"]["ready"])
        log("endpoints published", service=f"{namespace}/{service_name}",
            endpoints=len(endpoints), ready=ready)  # fmt: skip

    def run(self, interval: float) -> None:
        last_ok = time.monotonic()
        while not self.stopping:
            try:
                self.sync()
                last_ok = time.monotonic()
            except Exception as error:  # the API server may be restarting
                if time.monotonic() - last_ok > GIVE_UP_SECONDS:
                    log("API server unreachable for a minute: stopping", error=str(error))
                    break
            time.sleep(interval)
        for key in list(self.running):
            self.stop(key, "pod runner stopping")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    runner = PodRunner(args.kubeconfig, args.state_dir, args.python)

    def stop(*_: object) -> None:
        runner.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log("pod runner started", kubeconfig=args.kubeconfig, pid=os.getpid())
    with contextlib.suppress(KeyboardInterrupt):
        runner.run(args.interval)
    log("pod runner stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
