"""The operator as a user runs it: `townsquare run` in its own process, killable at will."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from harness import REPO, wait_until


class OperatorProcess:
    """`python -m townsquare run` for one namespace (all of them when `namespace` is ""),
    with its log in a file."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, *extra: str) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log = log
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.identity: str | None = None
        """The name of its first start (host and process id, the operator's default)."""

    def start(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        command = [sys.executable, "-m", "townsquare", "run"]
        if self.namespace:
            command += ["--namespace", self.namespace]
        # One name across restarts, as a container restarted in its pod keeps its hostname
        # and process id: the restarted operator takes its own claims back at once.
        if self.identity is not None:
            command += ["--identity", self.identity]
        if not any(arg.startswith("--metrics-port") for arg in self.extra):
            command += ["--metrics-port", "0"]  # side by side, no two may share a port
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [*command, "--log-format", "json", *self.extra],
                cwd=REPO,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        if self.identity is None:
            self.identity = f"{socket.gethostname()}-{self.process.pid}"

    def wait_started(self, timeout: float = 120) -> None:
        """Until kopf has logged in: on a busy machine the interpreter alone can take half a
        minute to start, and a test that schedules a room seconds ahead must not lose them."""
        wait_until(lambda: self._started(), timeout, f"the operator to start (log: {self.log})")

    def _started(self) -> bool:
        assert self.alive(), f"the operator exited:\n{self.log_text()[-2000:]}"
        return "Initial authentication has finished" in self.log_text()

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies under the operator."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
