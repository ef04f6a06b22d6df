"""Operator scale benchmark on the real cluster (`make bench-scale`, not part of `make test`).

N AudioRooms two days ahead in one namespace, with `minRelays: 0` (no relay pods: thousands
of pods would swamp a 2-core machine; the few rooms with one relay say how many), then one
`townsquare run` process, then two partitions. Figures, each from outside the operator:
- time from start until every room has a phase (the API server's view: one watch of the
  namespace, listed before the operators start, then one LIST to confirm);
- operator RSS and CPU (from /proc), during start-up and at rest;
- API writes per room in the first 5 minutes and per room per minute at rest, counted by the
  API server's own apiserver_request_total, against a naive operator measured the same way
  (it patches every room's status every tick);
- latency from a spec change to the status showing it, p50 and p99 over 40 changes;
- with two partitions: rooms per partition (each operator's own /metrics), overlap, time;
- the CPU every process on the machine used until every room had a phase (/proc/stat), so
  that a case run while other work shares the two cores is told apart from a slow one.
Writes docs/benchmarks-scale.md (generated whole; the hand-written analysis lives in
docs/benchmarks-scale-analysis.md, which this never touches). BENCH_ROOMS="1000 10000"
picks the sizes. BENCH_OPERATOR_CPU=0.2 holds each operator process to that share of a core
with a cgroup CPU quota (the mechanism the kubelet uses for a CPU limit; the chart sets no
CPU limit). Once the quota binds, the start takes about operator CPU / quota, so such a
run shows how the operator's CPU splits between partitions and whether one waits on the
other, not how fast the chart's defaults start. The quota is checked: each operator must
be in its group and throttled at least once, and the report shows the throttling.
"""

from __future__ import annotations

import math
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import REPO, free_loopback_port, wait_until
from kubernetes import client, watch
from rooms import GROUP, PLURAL, VERSION, rfc3339
from test_bench_operator import api_server_writes

from townsquare.partitions import SLOT_LABEL, slot_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.bench]

WITH_RELAY_EVERY = 500
"""One room in this many keeps one relay (minRelays 1), so the relay pod path is exercised."""
FIRST_WINDOW = float(os.environ.get("BENCH_FIRST_WINDOW", 300))
"""Seconds after start that count as start-up (the issue's five minutes)."""
REST_WINDOW = float(os.environ.get("BENCH_REST_WINDOW", 120))
QUIET_SLICE = 30.0
QUIET_CPU = 0.05
"""Quiet: under this share of a core over a slice of QUIET_SLICE seconds."""
NAIVE_TICK = 15.0
LATENCY_SAMPLES = 40
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
QUOTA_PERIOD_US = 100_000
QUOTA_PREFIX = "townsquare-bench-"
CGROUP_V1, CGROUP_V2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")


def _operator_cpu(text: str) -> float:
    """BENCH_OPERATOR_CPU: cores each operator may use, 0 for no limit; a quota under the
    kernel's 1 ms a period would be refused (or silently mean something else)."""
    try:
        cores = float(text)
    except ValueError:
        raise ValueError(f"BENCH_OPERATOR_CPU={text!r}: not a number of cores") from None
    if not math.isfinite(cores) or cores < 0:
        raise ValueError(f"BENCH_OPERATOR_CPU={text!r}: must be 0 (no limit) or more")
    if cores and cores * QUOTA_PERIOD_US < 1000:
        raise ValueError(f"BENCH_OPERATOR_CPU={text!r}: under 0.01 (a 1 ms quota a period)")
    return cores


OPERATOR_CPU = _operator_cpu(os.environ.get("BENCH_OPERATOR_CPU", "0"))
"""Cores each operator process may use (0: no limit)."""


def _cgroup_root() -> Path:
    return CGROUP_V1 if (CGROUP_V1 / "cpu.cfs_quota_us").exists() else CGROUP_V2


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _remove_stale_quotas() -> None:
    """Groups an earlier bench left (killed before its cleanup): those whose bench process
    is gone. rmdir removes only a group with no process in it."""
    for folder in _cgroup_root().glob(f"{QUOTA_PREFIX}*"):
        owner = folder.name.removeprefix(QUOTA_PREFIX).split("-", 1)[0]
        if folder.is_dir() and owner.isdigit() and not _pid_alive(int(owner)):
            try:
                folder.rmdir()
            except OSError as error:
                warnings.warn(f"stale cgroup {folder} stays: {error}", stacklevel=1)


class CpuQuota:
    """A cgroup that holds one process to a share of a core (the cpu controller's quota
    per period, the mechanism the kubelet uses for a CPU limit). Configured before the
    process starts, so a failed setup never leaves a process running unlimited."""

    def __init__(self, cores: float) -> None:
        self.name = f"{QUOTA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.path = _cgroup_root() / self.name
        quota = int(cores * QUOTA_PERIOD_US)
        try:
            self.path.mkdir()
            if self.path.parent == CGROUP_V1:
                (self.path / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (self.path / "cpu.max").write_text(f"{quota} {QUOTA_PERIOD_US}")
        except OSError as error:
            self.remove()
            pytest.fail(f"BENCH_OPERATOR_CPU needs a writable cgroup cpu controller: {error}")

    def hold(self, pid: int) -> None:
        """Move the process in, and check the kernel says it is there."""
        (self.path / "cgroup.procs").write_text(str(pid))
        groups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if not any(line.rsplit(":", 1)[-1] == f"/{self.name}" for line in groups):
            raise AssertionError(f"operator {pid} is not in {self.name}: {groups}")

    def throttling(self) -> tuple[int, float]:
        """Periods in which the group hit its quota, and seconds it was held back."""
        stat = dict(
            line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line
        )
        if "throttled_usec" in stat:  # v2
            return int(stat["nr_throttled"]), int(stat["throttled_usec"]) / 1e6
        return int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9

    def remove(self) -> None:
        if not self.path.exists():
            return
        try:
            self.path.rmdir()
        except OSError as error:
            warnings.warn(f"cgroup {self.path} stays: {error}", stacklevel=1)


def _room(name: str, relays: int) -> dict[str, Any]:
    start = datetime.now(UTC) + timedelta(days=2)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": {
            "startTime": rfc3339(start),
            "duration": "1h",
            "expectedAudience": 2000,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": 1000,
                "nodeSelector": {"type": "kwok"},
            },
            "scaling": {"minRelays": relays, "maxRelays": 10},
        },
    }


def _create_rooms(api: client.ApiClient, namespace: str, count: int, labelled: bool) -> None:
    """`labelled`: with the slot label a running operator gives every room it sees created
    (the state any start after the first finds); else bare, as on the first start of
    partitions, when each partition labels its rooms before it can watch them."""
    custom = client.CustomObjectsApi(api)

    def create(index: int) -> None:
        relays = 1 if index % WITH_RELAY_EVERY == 0 else 0
        room = _room(f"room-{index:05d}", relays)
        if labelled:
            slot = slot_of(namespace, room["metadata"]["name"])
            room["metadata"]["labels"] = {SLOT_LABEL: str(slot)}
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, room)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND


def _control_plane_cpu(kubeconfig: Path) -> float:
    """CPU seconds used so far by this cluster's kube-apiserver and etcd (their binaries sit
    in the cluster's directory, beside its kubeconfig): the work every partition shares."""
    binaries = {str(kubeconfig.parent / "bin" / name) for name in ("kube-apiserver", "etcd")}
    total = 0.0
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if entry.name.isdigit() and command in binaries:
                total += _cpu_of(int(entry.name))
        except OSError:
            continue
    return total


def _machine_cpu() -> float:
    """CPU seconds all processes on the machine used so far (busy time, all cores)."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND


class PhaseWatch:
    """Rooms with a phase, followed by one watch of the namespace, listed before the
    operators start (`wait_listed`). Listing every room every few seconds instead cost the
    API server about a fifth of its CPU at 10,000 rooms, on the two cores the operators and
    the API server share: it slowed what it measured."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.names: set[str] = set()
        self.stream = watch.Watch()
        self.stopped = threading.Event()
        self.listed = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def wait_listed(self) -> None:
        if not self.listed.wait(120):
            raise AssertionError("the watch's first listing did not finish in 120 s")

    def count(self) -> int:
        return len(self.names)

    def _follow(self) -> None:
        while not self.stopped.is_set():
            try:  # (again) from a listing, so an expired watch loses nothing
                names, version = self._listed()
                self.names = names
                self.listed.set()
                for event in self.stream.stream(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace,
                    PLURAL, resource_version=version, timeout_seconds=600,
                ):  # fmt: skip
                    room = event["object"]
                    name = room["metadata"]["name"]
                    if event["type"] != "DELETED" and (room.get("status") or {}).get("phase"):
                        self.names.add(name)
                    else:
                        self.names.discard(name)
            except Exception:  # a watch that ended or expired starts again
                time.sleep(1)

    def _listed(self) -> tuple[set[str], str]:
        names, token, version = set(), None, ""
        while True:
            page = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, limit=500, _continue=token
            )
            version = version or page["metadata"]["resourceVersion"]
            names |= {
                room["metadata"]["name"]
                for room in page["items"]
                if (room.get("status") or {}).get("phase")
            }
            token = page["metadata"].get("continue")
            if not token:
                return names, version

    def stop(self) -> None:
        self.stopped.set()
        self.stream.stop()


def _phased(api: client.ApiClient, namespace: str) -> int:
    """Rooms with a phase, listed in pages as kubectl would."""
    custom = client.CustomObjectsApi(api)
    done, token = 0, None
    while True:
        page = custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, limit=500, _continue=token
        )
        done += sum(1 for room in page["items"] if (room.get("status") or {}).get("phase"))
        token = page["metadata"].get("continue")
        if not token:
            return done


class Operator:
    """`townsquare run` with its own /metrics port, measured through /proc."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, *extra: str) -> None:
        self.port = free_loopback_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MALLOC_ARENA_MAX": "2"}  # the chart's
        command = [
            sys.executable, "-m", "townsquare", "run", "--namespace", namespace,
            "--metrics-port", str(self.port), "--log-format", "json", *extra,
        ]  # fmt: skip
        self.quota = CpuQuota(OPERATOR_CPU) if OPERATOR_CPU else None
        try:
            with log.open("ab") as sink:
                self.process = subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT
                )
        except BaseException:
            if self.quota is not None:
                self.quota.remove()
            raise
        try:
            if self.quota is not None:
                self.quota.hold(self.process.pid)
        except BaseException:  # never leave an operator running outside its quota
            self.stop()
            raise
        self.peak_rss = 0.0

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
                self.peak_rss = max(self.peak_rss, rss)
                return rss
        return 0.0

    def cpu_seconds(self) -> float:
        return _cpu_of(self.process.pid)

    def throttling(self) -> tuple[int, float] | None:
        return None if self.quota is None else self.quota.throttling()

    def rooms_served(self) -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {
            line.split('room="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("townsquare_room_start_time_seconds{")
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.quota is not None:
            self.quota.remove()


def _sample_rss(operators: list[Operator], stop: threading.Event) -> None:
    while not stop.wait(2):
        for operator in operators:
            operator.rss_mib()


def _latencies(api: client.ApiClient, namespace: str, count: int) -> list[float]:
    """Seconds from a spec change to the status showing its generation, one room at a time."""
    custom = client.CustomObjectsApi(api)
    found = []
    for sample in range(LATENCY_SAMPLES):
        name = f"room-{(sample * 7919) % count:05d}"
        changed = custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"expectedAudience": 3000 + sample}}
        )
        began, generation = time.monotonic(), changed["metadata"]["generation"]
        wait_until(
            lambda n=name, g=generation: (
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n)
                .get("status", {})
                .get("observedGeneration")
                == g
            ),
            60,
            f"{name} to show generation {generation}",
            interval=0.02,
        )
        found.append(time.monotonic() - began)
        time.sleep(0.5)
    return found


def _naive_writes(api: client.ApiClient, kubeconfig: Path, namespace: str, count: int) -> float:
    """A naive operator, measured: every tick it patches every room's status (the same
    figures again), as an operator that writes what it computes without comparing does."""
    custom = client.CustomObjectsApi(api)
    before, began = api_server_writes(kubeconfig), time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() - began < 60:
            tick = time.monotonic()
            list(
                pool.map(
                    lambda i: custom.patch_namespaced_custom_object_status(
                        GROUP,
                        VERSION,
                        namespace,
                        PLURAL,
                        f"room-{i:05d}",
                        {"status": {"observedGeneration": 1}},
                    ),
                    range(count),
                )
            )
            time.sleep(max(0.0, NAIVE_TICK - (time.monotonic() - tick)))
    minutes = (time.monotonic() - began) / 60
    return (api_server_writes(kubeconfig) - before) / count / minutes


def _first_window_and_quiet(
    operator: Operator, kubeconfig: Path, started: float, writes_before: float
) -> tuple[float, float]:
    """API writes in the first window after start, and when the operator went quiet: the
    start of the first 30 s in which it used under 5% of a core (kopf still handles the
    watch events of the start-up's writes for a while after every room has a phase). At
    rest is measured from then, or from the end of the first window if that is later."""
    first: float | None = None
    quiet_at: float | None = None
    slice_cpu, slice_at = operator.cpu_seconds(), time.monotonic()
    while first is None or quiet_at is None:
        time.sleep(1)
        now = time.monotonic()
        if first is None and now - started >= FIRST_WINDOW:
            first = api_server_writes(kubeconfig) - writes_before
        if quiet_at is None and now - slice_at >= QUIET_SLICE:
            if (operator.cpu_seconds() - slice_cpu) / (now - slice_at) < QUIET_CPU:
                quiet_at = slice_at
            else:
                slice_cpu, slice_at = operator.cpu_seconds(), now
        if now - started > 1800:
            raise AssertionError("the operator was not quiet 30 minutes after its start")
    return first, quiet_at


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _namespace(api: client.ApiClient, name: str) -> str:
    core = client.CoreV1Api(api)
    wait_until(  # the garbage collector's deletions of an earlier run would count as writes
        lambda: (
            not [
                n for n in core.list_namespace().items if n.metadata.name.startswith("bench-scale-")
            ]
        ),
        1800,
        "earlier bench namespaces to be deleted",
        interval=5,
    )
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
    )
    return name


def _delete_namespace(api: client.ApiClient, name: str) -> None:
    custom = client.CustomObjectsApi(api)
    token = None
    while True:  # kopf's finalizers go first, or the namespace stays Terminating
        page = custom.list_namespaced_custom_object(
            GROUP, VERSION, name, PLURAL, limit=500, _continue=token
        )
        for room in page["items"]:
            if room["metadata"].get("finalizers"):
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, name, PLURAL, room["metadata"]["name"],
                    {"metadata": {"finalizers": None}},
                )  # fmt: skip
        token = page["metadata"].get("continue")
        if not token:
            break
    client.CoreV1Api(api).delete_namespace(name, propagation_policy="Background")


def _run(
    api: client.ApiClient,
    kubeconfig: Path,
    tmp_path: Path,
    count: int,
    partitions: int,
    labelled: bool = False,
) -> dict[str, Any]:
    suffix = "-labelled" if labelled else ""
    namespace = _namespace(api, f"bench-scale-{count}-{partitions}{suffix}-{os.getpid()}")
    figures: dict[str, Any] = {
        "rooms": count,
        "partitions": partitions,
        "labelled": labelled,
        "operator_cpu": OPERATOR_CPU,
    }
    try:
        began = time.monotonic()
        _create_rooms(api, namespace, count, labelled)
        figures["create_seconds"] = time.monotonic() - began
        phases = PhaseWatch(api, namespace)
        operators: list[Operator] = []
        stop = threading.Event()
        try:
            phases.wait_listed()  # so the clock starts with the watch already following
            writes_before = api_server_writes(kubeconfig)
            started, control_plane = time.monotonic(), _control_plane_cpu(kubeconfig)
            machine = _machine_cpu()
            for index in range(partitions):
                operators.append(
                    Operator(
                        kubeconfig,
                        namespace,
                        tmp_path / f"operator-{count}-{partitions}{suffix}-{index}.log",
                        *(["--partition", f"{index}/{partitions}"] if partitions > 1 else []),
                    )
                )
            threading.Thread(target=_sample_rss, args=(operators, stop), daemon=True).start()
            wait_until(lambda: phases.count() == count, 1800, f"all {count} rooms", interval=0.5)
            reconciled_at = time.monotonic()
            figures["machine_cpu"] = _machine_cpu() - machine
            figures["reconcile_seconds"] = reconciled_at - started
            # Each process's CPU until then: how the work split, whatever the shared cores
            # let the processes run side by side.
            figures["reconcile_cpu"] = [operator.cpu_seconds() for operator in operators]
            figures["throttling"] = [operator.throttling() for operator in operators]
            if OPERATOR_CPU:  # a quota that never bit held nothing: the run is not one
                assert all(t is not None and t[0] > 0 for t in figures["throttling"]), (
                    f"BENCH_OPERATOR_CPU={OPERATOR_CPU:g} but an operator was never "
                    f"throttled: {figures['throttling']}"
                )
            figures["load"] = os.getloadavg()[0]
            figures["control_plane_cpu"] = _control_plane_cpu(kubeconfig) - control_plane
            figures["machine_cores"] = os.cpu_count() or 1
            figures["other_cpu"] = (
                figures["machine_cpu"]
                - sum(figures["reconcile_cpu"])
                - figures["control_plane_cpu"]
            )
            phases.stop()
            assert _phased(api, namespace) == count, "the watch and a listing disagree"
            figures["writes_until_reconciled_per_room"] = (
                api_server_writes(kubeconfig) - writes_before
            ) / count
            served = [operator.rooms_served() for operator in operators]
            figures["served"] = [len(rooms) for rooms in served]
            figures["overlap"] = len(set.intersection(*served)) if partitions > 1 else 0
            if partitions == 1:
                first, quiet_at = _first_window_and_quiet(
                    operators[0], kubeconfig, started, writes_before
                )
                figures["writes_first_5min_per_room"] = first / count
                figures["quiet_after_reconciled"] = quiet_at - reconciled_at
                cpu_before, rest_began = operators[0].cpu_seconds(), time.monotonic()
                rest_before = api_server_writes(kubeconfig)
                time.sleep(REST_WINDOW)
                rest_minutes = (time.monotonic() - rest_began) / 60
                rest = api_server_writes(kubeconfig) - rest_before
                figures["writes_rest_per_room_minute"] = rest / count / rest_minutes
                figures["cpu_rest"] = (operators[0].cpu_seconds() - cpu_before) / (
                    rest_minutes * 60
                )
                figures["rss_rest"] = operators[0].rss_mib()
                latencies = _latencies(api, namespace, count)
                figures["latency_p50"] = statistics.median(latencies)
                figures["latency_p99"] = _percentile(latencies, 0.99)
                figures["latency_samples"] = len(latencies)
            figures["rss_peak"] = max(operator.peak_rss for operator in operators)
            figures["cpu_total"] = sum(operator.cpu_seconds() for operator in operators)
        finally:
            stop.set()
            phases.stop()
            for operator in operators:
                operator.stop()
        if partitions == 1:
            figures["naive_per_room_minute"] = _naive_writes(api, kubeconfig, namespace, count)
    finally:
        _delete_namespace(api, namespace)
    return figures


def test_scale(
    api_client: client.ApiClient, kubeconfig: Path, crds: list[str], tmp_path: Path
) -> None:
    _remove_stale_quotas()
    sizes = [int(n) for n in os.environ.get("BENCH_ROOMS", "1000 10000").split()]
    results = []
    partitions = [int(n) for n in os.environ.get("BENCH_PARTITIONS", "1 2").split()]
    for count in sizes:
        for split in partitions:
            for labelled in [False, True] if split > 1 else [False]:
                results.append(_run(api_client, kubeconfig, tmp_path, count, split, labelled))
                print(results[-1], flush=True)
    for figures in results:
        assert sum(figures["served"]) == figures["rooms"], figures
        assert figures["overlap"] == 0, figures
    if 1 in partitions:
        (REPO / "docs" / "benchmarks-scale.md").write_text(_report(results))
        print(_report(results))


def _floor(r: dict[str, Any]) -> float:
    """Seconds this start needs at least: the shared cores' work, or the busiest operator's
    CPU at its quota."""
    shared = (sum(r["reconcile_cpu"]) + r["control_plane_cpu"]) / r["machine_cores"]
    quota = r.get("operator_cpu", 0)
    return max(shared, max(r["reconcile_cpu"]) / quota if quota else 0.0)


def _throttled(r: dict[str, Any]) -> str:
    if "throttling" not in r:
        return "not recorded"
    counts = [t for t in r["throttling"] if t is not None]
    if not counts:
        return "no quota"
    return " + ".join(f"{periods:,} ({seconds:.1f} s)" for periods, seconds in counts)


def _report(results: list[dict[str, Any]]) -> str:
    one = [r for r in results if r["partitions"] == 1]
    two = {r["rooms"]: r for r in results if r["partitions"] == 2 and r["labelled"]}
    first = {r["rooms"]: r for r in results if r["partitions"] == 2 and not r["labelled"]}
    lines = [
        "# Operator at scale (real cluster)",
        "",
        "Measured by `make bench-scale` (tests/e2e/test_bench_scale.py) on the local kwok",
        "cluster, on a shared 2-core machine. Rooms start two days ahead with `minRelays: 0`,",
        f"except one room in {WITH_RELAY_EVERY} with one relay; no Prometheus. Writes are",
        "counted by the API server's own `apiserver_request_total` (POST, PUT, PATCH, APPLY,",
        "DELETE on rooms, their status, their children and Events); RSS and CPU from /proc.",
        "A room booked ahead with no relay gets no children until its pre-warm, so most rooms",
        "here cost a status write; the rooms with a relay get their finalizer and four children.",
        "Quiet after: from every room having a phase to the first 30 s in which the operator",
        "used under 5% of a core; at rest is measured from then (or from the end of the first",
        f"window, {FIRST_WINDOW:.0f} s after start, if later) for {REST_WINDOW:.0f} s.",
        *(
            [
                f"Each operator process was held to {OPERATOR_CPU:g} of a core by a cgroup CPU",
                "quota (the kubelet's mechanism for a CPU limit; the chart sets none, and",
                "requests 250m). Once the quota binds, the time is about operator CPU / quota,",
                "so such a run shows how the operator's CPU splits and whether a partition",
                "waits on another, not how fast the chart's defaults start: that is a run",
                "without BENCH_OPERATOR_CPU.",
            ]
            if OPERATOR_CPU
            else []
        ),
        "",
        "Analysis and earlier runs (hand-written, never rewritten by the bench):",
        "[benchmarks-scale-analysis.md](benchmarks-scale-analysis.md).",
        "",
        "| rooms | all reconciled after (load) | operator CPU until then (a room) "
        "| RSS peak / at rest | quiet after | CPU at rest "
        "| writes/room, first 5 min | writes/room/min at rest "
        "| naive operator (status every 15 s), writes/room/min "
        "| spec change -> status, p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in one:
        lines.append(
            f"| {r['rooms']:,} | {r['reconcile_seconds']:.0f} s ({r['load']:.1f}) "
            f"| {r['reconcile_cpu'][0]:.0f} s ({1000 * r['reconcile_cpu'][0] / r['rooms']:.1f} ms) "
            f"| {r['rss_peak']:.0f} / "
            f"{r['rss_rest']:.0f} MiB | {r['quiet_after_reconciled']:.0f} s "
            f"| {100 * r['cpu_rest']:.2f}% of a core "
            f"| {r['writes_first_5min_per_room']:.2f} | {r['writes_rest_per_room_minute']:.4f} "
            f"| {r['naive_per_room_minute']:.2f} | {r['latency_p50']:.2f} / "
            f"{r['latency_p99']:.2f} s ({r['latency_samples']} changes) |"
        )
    lines += [
        "",
        "Two partitions (two `townsquare run --partition i/2` processes, same machine), each",
        "watching only its own rooms (a label selector on the slot label). Rooms labelled: as",
        "every start after the first finds them (a running operator labels a room when it is",
        "created; here the bench wrote the same label at creation). First start: rooms",
        "without the label, as after going from one partition to two; each partition labels",
        "its rooms (one write each) before its watch shows them.",
        "",
        "| rooms | all reconciled after: one / two, rooms labelled (ratio) / two, first start "
        "| load average at the end of each | operator CPU until then: one / each of two "
        "(labelled) / each of two (first start) | writes a room until then: one / two / "
        "first start | kube-apiserver + etcd CPU until then: one / two / first start "
        "| rooms per partition | rooms served by both | RSS peak of the larger |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in one:
        p, f = two.get(r["rooms"]), first.get(r["rooms"])
        if p is None or f is None:
            continue
        lines.append(
            f"| {r['rooms']:,} | {r['reconcile_seconds']:.0f} s / {p['reconcile_seconds']:.0f} s "
            f"({p['reconcile_seconds'] / r['reconcile_seconds']:.2f}) / "
            f"{f['reconcile_seconds']:.0f} s "
            f"| {r['load']:.1f} / {p['load']:.1f} / {f['load']:.1f} "
            f"| {r['reconcile_cpu'][0]:.1f} s / "
            f"{' + '.join(f'{c:.1f} s' for c in p['reconcile_cpu'])} / "
            f"{' + '.join(f'{c:.1f} s' for c in f['reconcile_cpu'])} "
            f"| {r['writes_until_reconciled_per_room']:.2f} / "
            f"{p['writes_until_reconciled_per_room']:.2f} / "
            f"{f['writes_until_reconciled_per_room']:.2f} "
            f"| {r['control_plane_cpu']:.0f} s / {p['control_plane_cpu']:.0f} s / "
            f"{f['control_plane_cpu']:.0f} s "
            f"| {' / '.join(f'{n:,}' for n in p['served'])} | {p['overlap']}, {f['overlap']} "
            f"| {max(p['rss_peak'], f['rss_peak']):.0f} MiB |"
        )
    lines += [
        "",
        "Where the machine's CPU went until every room had a phase (/proc). Everything else:",
        "other sessions on the machine, the bench itself, the rest of the cluster. Floor: the",
        "shortest this start could take here with nothing else running: the operators' and",
        "the API server's (with etcd's) CPU spread over every core, or, with a quota, the",
        "busiest operator's CPU over its quota, whichever is longer. Throttled: periods",
        "(100 ms) in which each operator's cgroup hit its quota, and the time it was held",
        "back (cpu.stat).",
        "",
        "| rooms | partitions | all with a phase after | cores busy (of "
        f"{results[0].get('machine_cores', 0) if results else 0}) | operators | "
        "kube-apiserver + etcd | everything else | floor | throttled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "machine_cpu" not in r:
            continue
        case = f"{r['partitions']}" + (
            "" if r["partitions"] == 1 else " (labelled)" if r["labelled"] else " (first start)"
        )
        operators = sum(r["reconcile_cpu"])
        lines.append(
            f"| {r['rooms']:,} | {case} | {r['reconcile_seconds']:.0f} s "
            f"| {r['machine_cpu'] / r['reconcile_seconds']:.2f} | {operators:.0f} s "
            f"| {r['control_plane_cpu']:.0f} s | {r['other_cpu']:.0f} s | {_floor(r):.0f} s "
            f"| {_throttled(r)} |"
        )
    knobs = [
        f"{name}={value!r}" if " " in value else f"{name}={value}"
        for name, value in sorted(os.environ.items())
        if name.startswith("BENCH_")
    ]
    command = " ".join([*knobs, "make bench-scale"])
    lines += ["", f"Measured by `{command}` ({datetime.now(UTC):%d %b %Y, %H:%M} UTC, at the end)."]
    return "\n".join(lines) + "\n"
