"""The real components behind the e2e fixtures: the local cluster and a Prometheus server.

Everything here starts real processes and talks to them over loopback; nothing is faked.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "hack" / "cluster" / "cluster.sh"

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2
) -> T:
    """Polls until probe returns something truthy and returns it; fails naming `what`.

    Exceptions from the probe count as "not yet"; the last one is shown on timeout.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
            if result:
                return result
            last = result
        except Exception as error:
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {last!r}")
        time.sleep(interval)


@contextmanager
def local_cluster() -> Iterator[Path]:
    """The local cluster for one test session; yields its kubeconfig.

    Starts it if it is not running. Sessions may run side by side (xdist's workers are
    sessions too): each holds a shared lock while it uses the cluster, and the last one out
    deletes the cluster if a test session started it (a mark in the cluster's own
    directory, which goes with the cluster), whichever session that was. A cluster started
    by `make cluster-up` is left running, and so is any with TOWNSQUARE_KEEP_CLUSTER.
    """
    cache = Path(os.environ.get("TOWNSQUARE_CACHE", Path.home() / ".cache" / "townsquare"))
    name = os.environ.get("TOWNSQUARE_CLUSTER", "townsquare")
    sessions = cache / "kwok" / f".sessions-{name}"
    sessions.parent.mkdir(parents=True, exist_ok=True)
    with sessions.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        kubeconfig = Path(_cluster_script("status") or _started_by_tests())
        yield kubeconfig
        if os.environ.get("TOWNSQUARE_KEEP_CLUSTER"):
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses it: the last one out decides
        if (kubeconfig.parent / STARTED_BY_TESTS).exists():
            _cluster_script("down")


STARTED_BY_TESTS = "started-by-tests"
"""A mark in the cluster's directory: a test session started this cluster, so the last
session to finish deletes it (before, only the starter could, and under xdist it was often
not the last: CI runs left their cluster running)."""


def _started_by_tests() -> str:
    kubeconfig = _cluster_script("up")
    (Path(kubeconfig).parent / STARTED_BY_TESTS).touch()
    return kubeconfig


def _cluster_script(command: str) -> str:
    """Runs hack/cluster/cluster.sh; its last line of output, or "" if `status` says down."""
    done = subprocess.run(
        [str(CLUSTER_SCRIPT), command], stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        if command == "status":
            return ""
        raise RuntimeError(f"{CLUSTER_SCRIPT} {command} failed ({done.returncode}); see above")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A real Prometheus server of our own: 1s scrapes, targets from a file we rewrite.

    stop() and start() keep the port and the data, as a restarted server would.
    """

    SCRAPE_SECONDS = 1

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        found = binary or os.environ.get("TOWNSQUARE_PROMETHEUS") or shutil.which("prometheus")
        if not found:
            raise RuntimeError("prometheus is not installed: run 'make prometheus'")
        self.binary = found
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.targets_file = workdir / "targets.json"
        self.log_file = workdir / "prometheus.log"
        self._targets: list[dict[str, object]] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._write_targets()
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(self._config()))

    def _config(self) -> dict[str, object]:
        interval = f"{self.SCRAPE_SECONDS}s"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": "e2e",
                    # Relays label their own series (namespace, room, pod): keep those.
                    "honor_labels": True,
                    "file_sd_configs": [
                        {"files": [str(self.targets_file)], "refresh_interval": interval}
                    ],
                }
            ],
        }

    def add_target(self, address: str, labels: dict[str, str] | None = None) -> None:
        """Scrapes `address` (host:port on loopback) from now on, with extra target labels.

        Prometheus batches discovery updates: a new target is scraped within about 6s.
        """
        self._targets.append({"targets": [address], "labels": labels or {}})
        self._write_targets()

    def remove_target(self, address: str) -> None:
        self._targets = [t for t in self._targets if t["targets"] != [address]]
        self._write_targets()

    def _write_targets(self) -> None:
        # Prometheus may read the file at any moment: replace it whole, never half-written.
        partial = self.targets_file.with_suffix(".tmp")
        partial.write_text(json.dumps(self._targets))
        partial.replace(self.targets_file)

    def start(self, timeout: float = 30) -> None:
        if self.running:
            return
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._ready, timeout, f"Prometheus to be ready at {self.url}")

    def _ready(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            tail = self.log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Prometheus exited; its log ends with:\n{tail}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def client(self) -> PrometheusConnect:
        """A prometheus-api-client connection that fails fast instead of retrying."""
        return PrometheusConnect(url=self.url, retry=Retry(total=0), timeout=5)

    def value(self, query: str) -> float | None:
        """The single value of an instant query, or None when the result is empty."""
        result = self.client().custom_query(query)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{query} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])


def chart_documents(
    template: str, namespace: str, values: dict[str, object]
) -> list[dict[str, object]]:
    """The chart's `template` (e.g. templates/drain-policy.yaml) as `helm template` renders it
    with `values` (top-level keys, as JSON), by the pinned helm (built once, then cached)."""
    helm = (
        subprocess.run(
            [str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    command = [helm, "template", "e2e", str(REPO / "charts" / "townsquare"),
               "--namespace", namespace, "--show-only", template]  # fmt: skip
    for key, value in values.items():
        command += ["--set-json", f"{key}={json.dumps(value)}"]
    rendered = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]
