"""Faults injected into real components: an API server stopped and restarted, a Prometheus
that loses some series or answers slowly. Nothing here imitates a component."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml
from harness import CLUSTER_SCRIPT, Prometheus, free_loopback_port, wait_until


@contextmanager
def cluster_of_its_own(name: str) -> Iterator[Path]:
    """A kwok cluster for one test (a few seconds to create), so that stopping its API server
    disturbs no test running beside it. Yields its kubeconfig; deletes it afterwards."""
    env = {**os.environ, "TOWNSQUARE_CLUSTER": name, "TOWNSQUARE_NODES": "1"}
    done = subprocess.run(
        [str(CLUSTER_SCRIPT), "up"], env=env, stdout=subprocess.PIPE, text=True, check=True
    )
    try:
        yield Path(done.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "down"], env=env, check=False)


class ApiServer:
    """The cluster's own kube-apiserver process (kwokctl's binary runtime), stopped and
    continued with SIGSTOP/SIGCONT: it answers nothing and closes nothing meanwhile, which
    is what a hung or partitioned API server looks like to its clients (the hardest case:
    no connection is refused, every request must time out). Killing and restarting it works
    too, but on a busy machine another process may take its port in the meantime."""

    def __init__(self, kubeconfig: Path) -> None:
        self.pid = int((kubeconfig.parent / "pids" / "kube-apiserver.pid").read_text())

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        wait_until(lambda: _state(self.pid) == "T", 10, "kube-apiserver to stop")

    def start(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


class FilteringPrometheus(Prometheus):
    """A real Prometheus whose scrapes drop the series of chosen pods (metric relabelling,
    applied by reloading its configuration): what a lost scrape target looks like."""

    def __init__(self, workdir: Path) -> None:
        self.dropped = ""
        super().__init__(workdir)

    def _config(self) -> dict[str, object]:
        config = super()._config()
        if self.dropped:
            for job in config["scrape_configs"]:  # type: ignore[attr-defined]
                job["metric_relabel_configs"] = [
                    {"source_labels": ["pod"], "regex": self.dropped, "action": "drop"}
                ]
        return config

    def drop_pods(self, regex: str) -> None:
        """From the next scrape on, series whose `pod` matches `regex` are dropped ("": none)."""
        self.dropped = regex
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(self._config()))
        assert self._process is not None
        self._process.send_signal(signal.SIGHUP)


class SlowProxy:
    """A loopback TCP proxy in front of a real Prometheus; while `delay` is set, every
    answer is held that many seconds before it is passed on."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay = 0.0
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.5)
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        except OSError:
            client.close()
            return
        asked = threading.Event()  # a request went up; its answer is not back yet
        threading.Thread(
            target=self._pipe, args=(client, upstream, asked, False), daemon=True
        ).start()
        self._pipe(upstream, client, asked, True)

    def _pipe(
        self, source: socket.socket, sink: socket.socket, asked: threading.Event, answers: bool
    ) -> None:
        try:
            while chunk := source.recv(65536):
                if not answers:
                    asked.set()
                elif asked.is_set():
                    asked.clear()
                    if self.delay:
                        time.sleep(self.delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def close(self) -> None:
        self._stopped.set()
        self._server.close()
