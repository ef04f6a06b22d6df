"""Edge replicas as a user runs them: `townsquare edge` processes on loopback, killable."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from harness import REPO, Prometheus, free_loopback_port, wait_until

ADMIT_TTL_SECONDS = 3
REFRESH_SECONDS = 1


class EdgeFleet:
    """`replicas` edge processes serving one namespace, sharing one ticket key."""

    def __init__(
        self, kubeconfig: Path, namespace: str, prometheus: Prometheus, logs: Path, replicas: int
    ) -> None:
        self.key = secrets.token_hex(16)
        self.ports = [free_loopback_port() for _ in range(replicas)]
        self.logs = logs
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "TOWNSQUARE_TICKET_KEY": self.key,
        }
        self.args = [
            "-n", namespace, "--prometheus-url", prometheus.url,
            "--replicas", str(replicas), "--refresh", str(REFRESH_SECONDS),
            "--admit-ttl", str(ADMIT_TTL_SECONDS), "--log-format", "json",
        ]  # fmt: skip
        for index, port in enumerate(self.ports):
            self.processes.append(self._start(index, port))
            prometheus.add_target(f"127.0.0.1:{port}", {"edge": str(index)})
        for url in self.urls:
            wait_until(lambda url=url: _ready(url), 60, f"edge {url} to be ready")

    def _start(self, index: int, port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "townsquare", "edge", "--host", "127.0.0.1"]
        with (self.logs / f"edge-{index}.log").open("ab") as sink:
            return subprocess.Popen(
                [*command, "--port", str(port), *self.args],
                cwd=REPO,
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def kill(self, index: int) -> None:
        """SIGKILL: the replica vanishes mid-request, as when its node dies."""
        process = self.processes[index]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False
