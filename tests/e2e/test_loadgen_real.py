"""The load generator's audience as real connections: on a cluster whose relays are real
processes (the pod runner's), the first `--real-listeners` listeners join through the edge and
hold TCP connections to the relays; the rest is simulated and reported apart.

Verdicts: the relays' own counts in Prometheus (scraped from the pod IPs) equal the real part,
and the summary the load generator writes at exit carries what each real listener heard.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audience import edge, origin
from harness import REPO, Prometheus, free_loopback_port, wait_until
from kubernetes import client
from operator_process import OperatorProcess
from rooms import Rooms, rfc3339, write_trace

pytestmark = [pytest.mark.e2e]

ROOM = "hall"
AUDIENCE, REAL = 12, 8


def room(origin_address: str) -> dict[str, Any]:
    return {
        "apiVersion": "townsquare.dev/v1alpha1",
        "kind": "AudioRoom",
        "metadata": {"name": ROOM},
        "spec": {
            "startTime": rfc3339(datetime.now(UTC) + timedelta(seconds=3)),
            "duration": "30m",
            "expectedAudience": 10,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": 10,
                "startupSeconds": 1,
                "args": ["relay"],  # the reference relay, as the pod runner requires
                "podAnnotations": {
                    "pod-ready.stage.kwok.x-k8s.io/delay": "1s",
                    "townsquare.dev/origin": origin_address,
                },
                "nodeSelector": {"type": "kwok"},
            },
            "scaling": {
                "targetUtilization": 0.7,
                "minRelays": 2,
                "maxRelays": 2,
                "prewarmLead": "3s",
                "planHold": "5s",
            },
            "sharding": {"shards": 32, "fanout": 4},
        },
    }


def test_the_loadgen_holds_real_listeners_up_to_its_cap_and_simulates_the_rest(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    relay_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    key = secrets.token_bytes(32)
    key_file = tmp_path / "ticket.key"
    key_file.write_bytes(key)
    rooms.core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="townsquare-tickets"),
            data={"key": base64.b64encode(key).decode()},
        ),
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    origin_process, origin_address = origin(tmp_path, namespace, ROOM, key_file, kubeconfig, env)
    edge_process, edge_url = edge(tmp_path, namespace, key_file, prometheus.url, env)
    load: subprocess.Popen[bytes] | None = None
    log = tmp_path / "loadgen.log"
    record = tmp_path / "loadgen.jsonl"
    try:
        rooms.create(room(origin_address))
        relay_ips: set[str] = set()

        def relays_up() -> bool:
            pods = rooms.core.list_namespaced_pod(
                namespace, label_selector=f"townsquare.dev/room={ROOM}"
            ).items
            relay_ips.update(p.status.pod_ip for p in pods if p.status.pod_ip)
            return len(relay_ips) == 2 and rooms.relays(ROOM) == (2, 2)

        wait_until(relays_up, 60, "two Ready relay pods")
        assert all(ip.startswith("127.") for ip in relay_ips), (
            f"relay pods must have loopback IPs ({relay_ips}): is the cluster's pod runner up?"
        )
        for ip in relay_ips:
            prometheus.add_target(f"{ip}:9090", {"source": "relay"})
        trace = write_trace(tmp_path / "trace.csv", [(0, AUDIENCE), (3600, AUDIENCE)])
        port = free_loopback_port()
        prometheus.add_target(f"127.0.0.1:{port}", {"source": "loadgen"})
        command = [
            sys.executable, "-m", "townsquare", "loadgen", "--room", f"{namespace}/{ROOM}",
            "--trace", str(trace), "--port", str(port), "--record", str(record),
            "--edge", edge_url, "--real-listeners", str(REAL), "--check-every", "2",
            "--ticket-key-file", str(key_file),
        ]  # fmt: skip
        with log.open("wb") as sink:
            load = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)

        # -- the relays themselves count the real part; the load generator the simulated part
        def counted(source: str) -> float | None:
            return prometheus.value(
                f'sum(audioroom_relay_listeners{{namespace="{namespace}",source="{source}"}})'
            )

        wait_until(lambda: counted("relay") == REAL and counted("loadgen") == AUDIENCE - REAL,
                   60, "the relays holding the real listeners, the rest simulated")  # fmt: skip
        split = {
            r["metric"]["kind"]: float(r["value"][1])
            for r in prometheus.client().custom_query(
                f'audioroom_loadgen_audience{{namespace="{namespace}"}}'
            )
        }
        assert split == {"real": REAL, "simulated": AUDIENCE - REAL}
        time.sleep(2)  # a hundred frames for every real listener at 50 a second
        load.terminate()
        assert load.wait(timeout=15) == 0, log.read_text()[-2000:]

        # -- what every real listener heard, measured at its end
        lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
        summary = next(line for line in lines if line.get("event") == "summary")
        assert summary["audience"] == {"real": REAL, "simulated": AUDIENCE - REAL}
        assert summary["relays_real"] and summary["real_cap"] == REAL
        heard = summary["real"]
        print("loadgen real-listener figures:", json.dumps({k: v for k, v in heard.items()
                                                            if k != "each"}))  # fmt: skip
        assert heard["listeners"] == REAL
        assert len(heard["each"]) == REAL
        relay_pods = {f"{ROOM}-relay-{i}" for i in range(2)}
        for name, each in heard["each"].items():
            assert each["frames"] >= 50, f"{name} heard {each['frames']} frames"
            assert each["lost"] == 0, f"{name} lost {each['lost']} frames"
            assert set(each["relays"]) <= relay_pods and each["relays"], name
        assert heard["frames_lost"] == 0 and heard["listeners_that_lost_frames"] == 0
    except BaseException:
        print("loadgen log:\n", log.read_text()[-3000:] if log.exists() else "")
        print("origin log:\n", origin_process.tail())
        print("edge log:\n", edge_process.tail())
        raise
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        edge_process.stop()
        origin_process.stop()
