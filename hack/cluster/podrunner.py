"""The pod runner: a real `townsquare relay` process for every relay pod of the local cluster.

kwok's pods run nothing. This runner plays the kubelet for the relay pods (label
app.kubernetes.io/component=relay): while a pod is Running with a loopback IP (kwok's pod
CIDR is set inside 127.0.0.0/8 by cluster.sh), it keeps one relay process bound to that IP,
run as the pod's container would be. When the pod goes (deleted, or its IP gone), the
process gets SIGTERM: its listeners are told to go back to the edge, and the connections
really drop. A process that dies while its pod exists is started again, as a kubelet would.

Like a real pod, the process gets no API access: its environment is the container's `env`
(downward-API fields resolved: pod name, namespace, IP, annotations) plus the image's, and
never a kubeconfig or a service-account token. Its ConfigMap and Secret volumes are written
under the runner's state directory the way a kubelet writes them (files behind a `..data`
symlink swapped atomically), and kept up to date while it runs; as there is no mount
namespace here, an env value under a volume's mountPath is pointed at that directory.

There is no cluster DNS either, so the runner also plays the headless Service's records
(`<hostname>.<subdomain>.<ns>.svc` of each Ready relay pod) in one hosts file per room,
named to the relay in $TOWNSQUARE_HOSTS_FILE; that is how a relay finds its parent here.

The API server refuses loopback IPs in Endpoints and EndpointSlices, so the runner also
publishes each relay Service's endpoints itself, as an FQDN-type EndpointSlice whose
addresses are the pods' IPs (ready while the pod is Ready and its process runs).

A relay pod runs here only if its container's args run the reference relay (`[relay]`, set
by spec.relay.args: the image's entrypoint is `townsquare`), its origin ($TOWNSQUARE_ORIGIN,
from the pod annotation townsquare.dev/origin) is an IP in 127.0.0.0/8 and its IP is on
loopback: nothing outside 127.0.0.0/8 is ever contacted (a pod that does not qualify is
left alone, logged once, and never ready; a pod with no origin at all is played by a load
generator, as kwok pods run nothing). Runs until SIGTERM (cluster.sh down), or until the
API server has been unreachable for a minute.

    python hack/cluster/podrunner.py --kubeconfig K --state-dir D [--python P]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import re
import shutil
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
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
GIVE_UP_SECONDS = 60.0
RESTART_SECONDS = 1.0
STOP_GRACE_SECONDS = 5.0
"""A relay's time to tell its listeners to go before it is killed (cluster.sh gives the
runner 10 s in all)."""
SECRET_REFRESH_SECONDS = 10.0
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "MALLOC_ARENA_MAX": "2"}
"""What the image's ENV gives every container (Dockerfile), besides PATH."""
ENTRYPOINT = "townsquare"
"""The townsquare image's entrypoint; a relay container's args must start with `relay`."""


def log(message: str, **fields: Any) -> None:
    record = {"time": time.strftime("%H:%M:%S"), "msg": message, **fields}
    print(json.dumps(record), flush=True)


def die_with_parent() -> None:
    """Run in the child before exec: the kernel sends it SIGTERM when the runner dies, so a
    runner killed outright (SIGKILL, a crash) leaves no relay behind, as a container goes
    when its kubelet's pod sandbox does. Linux only; elsewhere the pid files still reap."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def is_relay_process(pid: int) -> bool:
    """The pid still names a `townsquare relay` (not a recycled pid of something else)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return ENTRYPOINT.encode() in argv and b"relay" in argv


def reap_orphans(pids_dir: Path) -> None:
    """Stop relays a previous runner started and could not stop (it was killed first):
    their pods are read again, and started again by this runner's first sync."""
    for pid_file in pids_dir.iterdir():
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            if is_relay_process(pid):
                os.kill(pid, signal.SIGKILL)
                log("orphaned relay stopped", pid=pid, pod=pid_file.name)
        pid_file.unlink(missing_ok=True)


def stop_processes(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM to all at once, then SIGKILL to whoever is still up after `grace`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class NotRunnableError(Exception):
    """Why a pod gets no process here (logged once per pod and reason)."""


@dataclass(frozen=True)
class Mount:
    """A ConfigMap or Secret volume as a container mounts it."""

    path: str
    volume: str
    kind: str
    """`configMap` or `secret`."""
    source: str
    items: tuple[tuple[str, str], ...]
    """(key, file) pairs; empty: every key under its own name."""
    optional: bool


@dataclass(frozen=True)
class Want:
    """One relay process as a pod asks for it; a changed Want means a new process."""

    namespace: str
    pod: str
    uid: str
    room: str
    ip: str
    env: tuple[tuple[str, str], ...]
    """The container's env, resolved, with paths as the pod sees them."""
    mounts: tuple[Mount, ...]
    args: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.pod}"


@dataclass
class Running:
    want: Want
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0


FIELD = re.compile(r"^metadata\.(annotations|labels)\['([^']+)'\]$")


def field_value(pod: Any, path: str) -> str:
    """A downward-API field of `pod`, as the kubelet resolves it (fieldRef.fieldPath)."""
    meta = pod.metadata
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": pod.status.pod_ip,
        "status.hostIP": pod.status.host_ip,
    }
    if path in simple:
        return str(simple[path] or "")
    match = FIELD.match(path)
    if match:
        found = (meta.annotations if match[1] == "annotations" else meta.labels) or {}
        return str(found.get(match[2], ""))
    raise NotRunnableError(f"env fieldRef {path!r} is not supported here")


def container_env(pod: Any, container: Any) -> tuple[tuple[str, str], ...]:
    env = []
    for entry in container.env or []:
        if entry.value_from is None:
            env.append((entry.name, entry.value or ""))
        elif entry.value_from.field_ref is not None:
            env.append((entry.name, field_value(pod, entry.value_from.field_ref.field_path)))
        else:
            raise NotRunnableError(
                f"env {entry.name}: only values and fieldRefs are supported here"
            )
    return tuple(env)


def container_mounts(pod: Any, container: Any) -> tuple[Mount, ...]:
    volumes = {volume.name: volume for volume in pod.spec.volumes or []}
    mounts = []
    for mount in container.volume_mounts or []:
        volume = volumes.get(mount.name)
        source = None if volume is None else (volume.config_map or volume.secret)
        if volume is None or source is None:
            raise NotRunnableError(f"volume {mount.name}: only configMap and secret are supported")
        kind = "configMap" if volume.config_map is not None else "secret"
        items = tuple((item.key, item.path) for item in source.items or [])
        if any("/" in path for _, path in items):
            raise NotRunnableError(f"volume {mount.name}: nested item paths are not supported")
        name = source.name if kind == "configMap" else source.secret_name
        mounts.append(Mount(mount.mount_path, mount.name, kind, name, items,
                            bool(source.optional)))  # fmt: skip
    return tuple(mounts)


def loopback_origin(env: dict[str, str]) -> str:
    """The origin the relay will contact, refused unless it is an IP in 127.0.0.0/8."""
    origin = env.get("TOWNSQUARE_ORIGIN", "")
    host = origin.rpartition(":")[0] if ":" in origin else origin
    try:
        on_loopback = ipaddress.ip_address(host) in LOOPBACK
    except ValueError:
        on_loopback = False
    if not on_loopback:
        raise NotRunnableError(f"origin {origin!r} is not an IP in 127.0.0.0/8: refused")
    return origin


def write_volume(directory: Path, files: dict[str, bytes], mode: int) -> bool:
    """Write `files` into `directory` as the kubelet's atomic writer does; False if unchanged.

    The files go into a fresh hidden directory, the `..data` symlink is swapped to it in one
    rename, and each name is a symlink through `..data`: a reader sees the old set or the
    new one, never a mix, and the path's inode changes with every update.
    """
    data = directory / "..data"
    if data.is_dir() and {p.name: p.read_bytes() for p in data.iterdir()} == files:
        return False
    directory.mkdir(parents=True, exist_ok=True)
    fresh = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    fresh.mkdir()
    for name, content in files.items():
        (fresh / name).write_bytes(content)
        (fresh / name).chmod(mode)
    old = data.resolve() if data.is_symlink() else None
    swap = directory / "..data_tmp"
    swap.unlink(missing_ok=True)
    swap.symlink_to(fresh.name)
    swap.replace(data)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for link in directory.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    if old is not None and old != fresh.resolve():
        shutil.rmtree(old, ignore_errors=True)
    return True


def process_env(want: Want, volumes: dict[str, Path], hosts_file: Path) -> dict[str, str]:
    """The relay's whole environment: the image's and the container's, nothing of ours
    (no KUBECONFIG, no service-account variables), plus where the room's records are."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", **IMAGE_ENV}
    for name, value in want.env:
        for mount in want.mounts:
            prefix = mount.path.rstrip("/")
            if value == prefix or value.startswith(prefix + "/"):
                value = str(volumes[mount.volume]) + value[len(prefix) :]
        env[name] = value
    env["TOWNSQUARE_HOSTS_FILE"] = str(hosts_file)
    return env


def dns_records(pod: Any) -> list[str]:
    """The pod's names under its headless Service (a StatefulSet sets hostname and subdomain)."""
    hostname, subdomain = pod.spec.hostname, pod.spec.subdomain
    if not hostname or not subdomain:
        return []
    return [f"{hostname}.{subdomain}.{pod.metadata.namespace}.svc"]


class PodRunner:
    def __init__(self, kubeconfig: str, state_dir: Path, python: str) -> None:
        self.state_dir = state_dir
        self.python = python
        api = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.published: dict[tuple[str, str], dict[str, Any]] = {}
        self.hosts: dict[tuple[str, str], str] = {}
        self.running: dict[str, Running] = {}
        self.secrets: dict[tuple[str, str], tuple[float, dict[str, bytes] | None]] = {}
        self.warned: set[str] = set()
        self.refused: set[str] = set()
        """Pods that ask for a relay this runner will not run (they are never ready)."""
        self.stopping = False
        for folder in ("logs", "pods", "hosts", "pids"):
            (state_dir / folder).mkdir(parents=True, exist_ok=True)
        (state_dir / "pods").chmod(0o700)
        reap_orphans(state_dir / "pids")

    def pid_file(self, key: str) -> Path:
        return self.state_dir / "pids" / key.replace("/", "_")

    def warn_once(self, key: str, message: str, **fields: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log(message, **fields)

    def want(self, pod: Any) -> Want | None:
        """What the pod asks to run, or None when it runs nothing here (logged once)."""
        meta, status = pod.metadata, pod.status
        key = f"{meta.namespace}/{meta.name}"
        room = (meta.labels or {}).get(ROOM_LABEL)
        if meta.deletion_timestamp is not None or status.phase != "Running" or not room:
            return None
        ip = status.pod_ip
        if not ip:
            return None
        if ipaddress.ip_address(ip) not in LOOPBACK:
            self.warn_once(key + ip, "pod IP not on loopback: not started", pod=key, ip=ip)
            return None
        container = pod.spec.containers[0]
        try:
            env = container_env(pod, container)
            if not dict(env).get("TOWNSQUARE_ORIGIN"):
                self.warn_once(key, "no origin (annotation townsquare.dev/origin): not started",
                               pod=key)  # fmt: skip
                return None
            loopback_origin(dict(env))
            mounts = container_mounts(pod, container)
        except NotRunnableError as reason:
            self.warn_once(key + str(reason), f"not started: {reason}", pod=key)
            self.refused.add(key)
            return None
        args = tuple(container.args or ())
        if args[:1] != ("relay",):
            reason = f"container args {list(args)} do not run `{ENTRYPOINT} relay`"
            self.warn_once(key + reason, f"not started: {reason} (spec.relay.args)", pod=key)
            self.refused.add(key)
            return None
        return Want(meta.namespace, meta.name, meta.uid, room, ip, env, mounts, args)

    def pod_dir(self, want: Want) -> Path:
        return self.state_dir / "pods" / f"{want.namespace}_{want.pod}_{want.uid[:8]}"

    def hosts_file(self, namespace: str, room: str) -> Path:
        return self.state_dir / "hosts" / f"{namespace}_{room}"

    def volume_files(self, want: Want, mount: Mount) -> dict[str, bytes] | None:
        """The files of one volume now, or None when its source is missing."""
        if mount.kind == "configMap":
            try:
                found = self.core.read_namespaced_config_map(mount.source, want.namespace)
            except client.ApiException as error:
                if error.status == 404:
                    return None
                raise
            data = {k: v.encode() for k, v in (found.data or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (found.binary_data or {}).items()})
        else:
            secret = self.secret_data(want.namespace, mount.source)
            if secret is None:
                return None
            data = secret
        if not mount.items:
            return data
        return {path: data[k] for k, path in mount.items if k in data}

    def secret_data(self, namespace: str, name: str) -> dict[str, bytes] | None:
        read, data = self.secrets.get((namespace, name), (-SECRET_REFRESH_SECONDS, None))
        if time.monotonic() - read < SECRET_REFRESH_SECONDS:
            return data
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
            data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        except client.ApiException as error:
            if error.status != 404:
                raise
            data = None
        self.secrets[(namespace, name)] = (time.monotonic(), data)
        return data

    def materialise(
        self, want: Want, sources: dict[tuple[str, str], Any]
    ) -> dict[str, Path] | None:
        """Every volume of the pod written and up to date; None while a required one is
        missing (a kubelet keeps such a pod in ContainerCreating). `sources` shares one
        read of a ConfigMap among the room's relays within a pass."""
        volumes: dict[str, Path] = {}
        for mount in want.mounts:
            cache_key = (mount.kind, f"{want.namespace}/{mount.source}/{mount.items}")
            if cache_key not in sources:
                sources[cache_key] = self.volume_files(want, mount)
            files = sources[cache_key]
            if files is None and not mount.optional:
                self.warn_once(f"{want.key}/{mount.volume}", f"{mount.kind} {mount.source} "
                               "missing: relay waits for it", pod=want.key)  # fmt: skip
                return None
            directory = self.pod_dir(want) / "volumes" / mount.volume
            mode = 0o600 if mount.kind == "secret" else 0o644
            if write_volume(directory, files or {}, mode) and want.key in self.running:
                log("volume updated", pod=want.key, volume=mount.volume)
            volumes[mount.volume] = directory
        return volumes

    def start(self, want: Want, volumes: dict[str, Path], restarts: int = 0) -> None:
        env = process_env(want, volumes, self.hosts_file(want.namespace, want.room))
        command = [self.python, "-m", ENTRYPOINT, *want.args]
        sink = (self.state_dir / "logs" / f"{want.namespace}_{want.pod}.log").open("ab")
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                   cwd=self.pod_dir(want), start_new_session=True,
                                   preexec_fn=die_with_parent)  # fmt: skip
        sink.close()
        self.pid_file(want.key).write_text(str(process.pid))
        self.running[want.key] = Running(want, process, time.monotonic(), restarts)
        log("relay started", pod=want.key, ip=want.ip, pid=process.pid, restarts=restarts,
            origin=env.get("TOWNSQUARE_ORIGIN"))  # fmt: skip

    def stop_all(self, keys: list[str], reason: str) -> None:
        """Stop these relays together: one grace period for all, not one each, so that
        stopping many fits in the time `cluster.sh down` gives the runner."""
        stopping = [self.running.pop(key) for key in keys]
        stop_processes([running.process for running in stopping], STOP_GRACE_SECONDS)
        for running in stopping:
            shutil.rmtree(self.pod_dir(running.want), ignore_errors=True)
            self.pid_file(running.want.key).unlink(missing_ok=True)
            log("relay stopped", pod=running.want.key, pid=running.process.pid, reason=reason)

    def sync(self) -> None:
        pods = self.core.list_pod_for_all_namespaces(label_selector=SELECTOR, timeout_seconds=10)
        self.refused = set()
        wants = {w.key: w for w in map(self.want, pods.items) if w is not None}
        gone = [key for key in self.running if key not in wants]
        changed = [
            key for key in self.running if key in wants and wants[key] != self.running[key].want
        ]
        self.stop_all(gone, "pod gone")
        self.stop_all(changed, "pod changed")
        sources: dict[tuple[str, str], Any] = {}
        for key, want in wants.items():
            volumes = self.materialise(want, sources)
            running = self.running.get(key)
            if volumes is None:
                continue
            if running is None:
                self.start(want, volumes)
            elif running.process.poll() is not None:
                if time.monotonic() - running.started < RESTART_SECONDS:
                    continue
                del self.running[key]
                log("relay exited; starting it again", pod=key, code=running.process.returncode)
                self.start(want, volumes, running.restarts + 1)
        self.publish_endpoints(pods.items, wants)

    def publish_endpoints(self, pods: list[Any], wants: dict[str, Want]) -> None:
        """Each relay Service's endpoints, as an EndpointSlice the edge can read.

        The API server refuses loopback IPs in Endpoints and in IPv4/IPv6 EndpointSlices
        ("may not be in the loopback range"), so the EndpointSlice controller publishes
        nothing for our pods. An FQDN-type slice carries the same pod addresses, written as
        names: ready while the pod is Ready and its relay process runs, as a readiness
        probe would say. A relay pod with no origin runs no process here (a load generator
        plays its relay, as kwok pods run nothing): its readiness is the pod's alone.

        The same readiness decides the room's DNS records in its hosts file (the Service
        publishes no unready addresses).
        """
        by_room: dict[tuple[str, str], list[dict[str, Any]]] = {}
        records: dict[tuple[str, str], list[str]] = {}
        for pod in pods:
            meta, status = pod.metadata, pod.status
            room = (meta.labels or {}).get(ROOM_LABEL)
            ip = status.pod_ip
            if not room or not ip or ipaddress.ip_address(ip) not in LOOPBACK:
                continue
            key = f"{meta.namespace}/{meta.name}"
            running = self.running.get(key)
            if key in wants:
                alive = running is not None and running.process.poll() is None
            else:
                alive = key not in self.refused
            pod_ready = any(
                c.type == "Ready" and c.status == "True" for c in status.conditions or []
            )
            terminating = meta.deletion_timestamp is not None
            lines = records.setdefault((meta.namespace, room), [])
            if pod_ready and alive and not terminating:
                lines += [f"{ip} {name}" for name in dns_records(pod)]
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
        for room_key in set(self.hosts) - set(records):
            records[room_key] = []
        for (namespace, room), lines in records.items():
            self.write_hosts(namespace, room, "".join(f"{line}\n" for line in sorted(lines)))

    def write_hosts(self, namespace: str, room: str, text: str) -> None:
        """The room's DNS records, replaced in one rename so a reader never sees half."""
        if self.hosts.get((namespace, room)) == text:
            return
        path = self.hosts_file(namespace, room)
        if not text:  # the room has no relay pods left
            path.unlink(missing_ok=True)
            self.hosts.pop((namespace, room), None)
            return
        partial = path.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(path)
        self.hosts[(namespace, room)] = text

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
        self.stop_all(list(self.running), "pod runner stopping")


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
