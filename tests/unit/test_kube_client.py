"""Relay pods as a watch delivers them, and the versions that tell our writes from others'."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
import urllib3
from kubernetes import client

from townsquare.kube.client import Cluster, RelayPod, child_version, relay_pod, retry_policy


def _pod(name: str, ready: str = "True", **meta: object) -> dict[str, object]:
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-01-01T10:00:00Z", **meta},
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "lastTransitionTime": "2026-01-01T10:00:30Z"}
            ],
            "containerStatuses": [{"restartCount": 0}],
        },
    }


def test_a_ready_relay_pod_carries_its_ordinal_and_start_up_time() -> None:
    pod = relay_pod(_pod("launch-relay-7"), "launch")
    assert pod is not None
    assert (pod.ordinal, pod.ready, pod.startup_seconds) == (7, True, 30.0)
    assert pod.created == datetime(2026, 1, 1, 10, tzinfo=UTC)


def test_other_rooms_pods_and_leaving_pods_are_not_relays_of_the_room() -> None:
    assert relay_pod(_pod("launch-relay-7"), "launc") is None
    assert relay_pod(_pod("launch-relay-x"), "launch") is None
    assert (
        relay_pod(_pod("launch-relay-1", deletionTimestamp="2026-01-01T11:00:00Z"), "launch")
        is None
    )
    starting = relay_pod(_pod("launch-relay-1", ready="False"), "launch")
    assert starting is not None and not starting.ready and starting.startup_seconds is None


def test_child_versions_grow_with_content_changes() -> None:
    assert child_version({"generation": 3, "resourceVersion": "900"}) == ("generation", 3)
    assert child_version({"resourceVersion": "900"}) == ("resourceVersion", 900)


class SlowApiServer(BaseHTTPRequestHandler):
    """An API server slow to answer the first request of each method (queued, etcd slow)
    that still carries it out: every request that arrives is recorded."""

    protocol_version = "HTTP/1.1"
    arrived: ClassVar[list[str]] = []

    def _answer(self) -> None:
        first = self.command not in self.arrived
        self.arrived.append(self.command)
        if first:
            time.sleep(0.6)  # past the client's read timeout below
        body = json.dumps({"kind": "Status", "status": "Success", "items": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_DELETE(self) -> None:
        self._answer()

    def log_message(self, *args: object) -> None:
        pass


def test_a_fenced_write_is_never_re_sent_by_the_client_while_a_timed_out_read_is() -> None:
    """A write that times out is not sent again behind the fence's back (a copy re-sent
    would leave a whole timeout after the claim was last checked); the pass retries it,
    fenced again. A read that times out is re-sent once."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowApiServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = client.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        configuration.retries = retry_policy()
        cluster = Cluster(client.ApiClient(configuration), timeout=(0.5, 0.2))
        checks: list[str] = []
        fenced = cluster.fenced(lambda: checks.append("checked"))
        pod = RelayPod(ordinal=0, ready=True, created=datetime.now(UTC), ready_since=None, uid="u")
        with pytest.raises(urllib3.exceptions.HTTPError):
            fenced.replace_relay("spaces", "launch", pod)
        assert fenced.pod_creation_failures("spaces", "launch") == ()
        time.sleep(0.7)  # anything re-sent would have arrived by now
        assert checks == ["checked"]
        assert SlowApiServer.arrived.count("DELETE") == 1, "the write was sent once"
        assert SlowApiServer.arrived.count("GET") == 2, "the read was re-sent once"
    finally:
        server.shutdown()
        server.server_close()
