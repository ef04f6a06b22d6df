"""Nodes before pods, on the real cluster with Karpenter's kwok provider.

Two rooms alike start together; relays fit only on nodes Karpenter adds (a pool of each
room's own: its label and taint), nodes take 30 s to come, relays 5 s to start. The room
with node headroom has every relay Ready before its start; the one without misses it. The
verdicts come from the API server's records of nodes and pods, not from the operator.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import REPO, wait_until
from karpenter import POOL_LABEL, Karpenter, NodePools, ready_since
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import GROUP, VERSION, Recorder, Rooms, rfc3339

from townsquare.kube.karpenter import relays_on_pool

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODE_DELAY = "30s"
RELAY_STARTUP = "5s"
START_IN = 85.0
PREWARM_LEAD = "15s"
NODE_LEAD = "60s"
PLANNED = 3


@pytest.fixture(scope="module")
def karpenter(
    kubeconfig: Path, api_client: client.ApiClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Karpenter]:
    process = Karpenter(kubeconfig, tmp_path_factory.mktemp("karpenter") / "karpenter.log")
    process.start()
    process.wait_served(api_client)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def priority_class(api_client: client.ApiClient) -> str:
    """The chart's headroom PriorityClass, as `helm template` renders it (release `ts` in
    `default`), in the cluster; left there for other sessions on the same cluster."""
    built = subprocess.run(
        [str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=True
    )
    helm = built.stdout.strip().splitlines()[-1]
    rendered = subprocess.run(
        [helm, "template", "ts", str(REPO / "charts" / "townsquare"),
         "--show-only", "templates/priorityclass.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    body = yaml.safe_load(rendered)
    try:
        client.SchedulingV1Api(api_client).create_priority_class(body)
    except ApiException as error:
        if error.status != 409:  # shared by the cluster's sessions; the chart's own object
            raise
    return str(body["metadata"]["name"])


@pytest.fixture
def pools(api_client: client.ApiClient, karpenter: Karpenter) -> Iterator[NodePools]:
    created = NodePools(api_client)
    yield created
    created.delete_all()


@pytest.fixture
def operator(
    kubeconfig: Path, namespace: str, crds: list[str], tmp_path: Path, priority_class: str
) -> Iterator[OperatorProcess]:
    """The operator as the chart runs it: told the name of the chart's PriorityClass."""
    process = OperatorProcess(
        kubeconfig,
        namespace,
        tmp_path / "operator.log",
        "--headroom-priority-class",
        priority_class,
    )
    process.start()
    yield process
    process.stop()


def room_on_pool(
    name: str, pool: str | None, start: datetime, headroom: bool, lead: str = NODE_LEAD
) -> dict[str, Any]:
    """3 relays of 3 CPU (one per 4-CPU node), none before the pre-warm; on the fixed nodes
    when `pool` is None."""
    placement = relays_on_pool(POOL_LABEL, pool) if pool else {"nodeSelector": {"type": "kwok"}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AudioRoom",
        "metadata": {"name": name},
        "spec": {
            "startTime": rfc3339(start),
            "duration": "10s",
            "expectedAudience": 2100,
            "relay": {
                "image": "registry.example/relay:test",
                "listenersPerRelay": 1000,
                "startupSeconds": 5,
                "podAnnotations": {"pod-ready.stage.kwok.x-k8s.io/delay": RELAY_STARTUP},
                "resources": {"requests": {"cpu": "3", "memory": "1Gi"}},
                **placement,
            },
            "scaling": {
                "targetUtilization": 0.7,
                "minRelays": 0,
                "maxRelays": 10,
                "prewarmLead": PREWARM_LEAD,
                "drainTimeout": "3s",
            },
            "nodeHeadroom": {"enabled": headroom, "leadTime": lead},
        },
    }


def relay_ready_times(rooms: Rooms, room: str) -> list[float]:
    """When each of the room's relay pods became Ready, as the API server recorded it."""
    times = []
    for pod in rooms.core.list_namespaced_pod(
        rooms.namespace,
        label_selector=f"townsquare.dev/room={room},app.kubernetes.io/component=relay",
    ).items:
        ready = next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)
        if ready is not None and ready.status == "True":
            times.append(ready.last_transition_time.timestamp())
    return times


def placeholders(rooms: Rooms) -> list[str]:
    pods = rooms.core.list_namespaced_pod(
        rooms.namespace, label_selector="app.kubernetes.io/component=headroom"
    ).items
    return [p.metadata.name for p in pods]


def test_headroom_has_nodes_ready_before_the_prewarm_and_without_it_the_start_is_missed(
    api_client: client.ApiClient,
    namespace: str,
    crds: list[str],
    operator: OperatorProcess,
    karpenter: Karpenter,
    pools: NodePools,
    priority_class: str,
) -> None:
    began = time.monotonic()
    rooms = Rooms(api_client, namespace)
    suffix = secrets.token_hex(3)
    pool_on, pool_off = f"headroom-on-{suffix}", f"headroom-off-{suffix}"
    for pool in (pool_on, pool_off):
        pools.create(pool, NODE_DELAY)
    # Declared far ahead first: the clock starts once the operator has taken both rooms (a
    # busy machine may take half a minute to start it), as it would for rooms declared days
    # ahead.
    far = datetime.now(UTC) + timedelta(minutes=30)
    rooms.create(room_on_pool("with", pool_on, far, headroom=True))
    rooms.create(room_on_pool("without", pool_off, far, headroom=False))
    for room in ("with", "without"):
        wait_until(lambda room=room: rooms.phase(room) == "Scheduled", 120, f"{room} scheduled")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=START_IN)
    prewarm_at = (start - timedelta(seconds=15)).timestamp()
    for room in ("with", "without"):
        rooms.patch_spec(room, {"startTime": rfc3339(start)})
    recorder = Recorder(rooms, "with")
    try:
        wait_until(lambda: rooms.phase("with") == "Ready", 120, "'with' to be Ready")
        # Read now: once the room has ended its relays go, and then Karpenter's nodes.
        relays_ready = relay_ready_times(rooms, "with")
        nodes_on = pools.nodes(pool_on)
        wait_until(lambda: not placeholders(rooms), 15, "placeholders to give way to relays")
        wait_until(lambda: rooms.phase("without") == "Live", 60, "'without' to go live")
        for room in ("with", "without"):
            wait_until(lambda room=room: rooms.phase(room) == "Ended", 120, f"{room} to end")
    finally:
        recorder.stop()
    log = operator.log_text()[-3000:]

    # With headroom: Karpenter's nodes were Ready before the pre-warm, every relay before
    # the start (the API server's timestamps).
    assert len(nodes_on) == PLANNED, [n.metadata.name for n in nodes_on]
    node_ready = [ready_since(n) for n in nodes_on]
    assert all(t is not None and t < prewarm_at for t in node_ready), (node_ready, prewarm_at)
    assert len(relays_ready) == PLANNED, log
    assert max(relays_ready) < start.timestamp(), "every planned relay Ready before the start"
    assert recorder.in_phase("Ready"), log
    reasons = rooms.reasons("with")
    for expected in ("NodesRequested", "NodesReady", "PreWarmed"):
        assert reasons.count(expected) == 1, reasons
    assert (
        reasons.index("NodesRequested")
        < reasons.index("NodesReady")
        < reasons.index("PreWarmStarted")
    )
    events = {e.reason: e.message for e in rooms.events("with")}
    assert events["NodesRequested"].startswith(f"{PLANNED} placeholder pods ask")
    assert "before pre-warm" in events["NodesReady"], events["NodesReady"]
    assert "PreWarmIncomplete" not in reasons
    conditions = {c["type"]: c for c in rooms.get("with")["status"]["conditions"]}
    assert conditions["NodesReady"]["status"] == "True"

    # Without: the relays waited for nodes past the start, and the Event says which and why.
    incomplete = [e for e in rooms.events("without") if e.reason == "PreWarmIncomplete"]
    assert len(incomplete) == 1, rooms.reasons("without")
    message = incomplete[0].message
    assert incomplete[0].type == "Warning"
    assert "Pending (without-relay-" in message, message
    assert "nodes are available" in message, message
    assert "NodesRequested" not in rooms.reasons("without")

    # After the event: no placeholder is left, and Karpenter removes the empty nodes.
    assert placeholders(rooms) == []
    for pool in (pool_on, pool_off):
        wait_until(
            lambda pool=pool: not pools.node_claims(pool) and not pools.nodes(pool),
            150,
            f"Karpenter to remove {pool}'s empty nodes",
        )
    assert karpenter.alive(), karpenter.log_text()[-2000:]
    print(
        f"\nnode headroom e2e: {time.monotonic() - began:.0f}s; 'with' relays Ready "
        f"{start.timestamp() - max(relays_ready):.1f}s before the start; nodes Ready "
        f"{prewarm_at - max(t for t in node_ready if t):.1f}s before the pre-warm\n"
        + "\n".join(f"  with: {reason}: {text}" for reason, text in events.items())
        + f"\n  without: PreWarmIncomplete: {message}"
    )


def test_placeholders_follow_replanning_and_deletion_and_a_refusal_is_said_once(
    api_client: client.ApiClient,
    kubeconfig: Path,
    namespace: str,
    crds: list[str],
    priority_class: str,
    tmp_path: Path,
) -> None:
    """No Karpenter needed: the fixed nodes have room, so placeholders are scheduled at once."""
    rooms = Rooms(api_client, namespace)
    operator = OperatorProcess(
        kubeconfig,
        namespace,
        tmp_path / "operator.log",
        "--headroom-priority-class",
        priority_class,
    )
    operator.start()
    try:
        start = datetime.now(UTC) + timedelta(minutes=10)
        rooms.create(room_on_pool("early", None, start, headroom=True, lead="15m"))  # due now
        wait_until(lambda: len(placeholders(rooms)) == PLANNED, 60, "3 placeholders")
        wait_until(lambda: "NodesReady" in rooms.reasons("early"), 30, "NodesReady")

        rooms.patch_spec("early", {"expectedAudience": 1400})  # 2 relays
        wait_until(lambda: len(placeholders(rooms)) == 2, 30, "the excess placeholder gone")

        rooms.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "audiorooms", "early"
        )
        wait_until(lambda: not placeholders(rooms), 30, "placeholders gone with the room")
    finally:
        operator.stop()

    refused = OperatorProcess(
        kubeconfig, namespace, tmp_path / "refused.log",
        "--headroom-priority-class", f"missing-{secrets.token_hex(3)}",
    )  # fmt: skip
    refused.start()
    try:
        rooms.create(room_on_pool("orphan", None, start, headroom=True, lead="15m"))
        warning = wait_until(
            lambda: [e for e in rooms.events("orphan") if e.reason == "NodeHeadroomRefused"],
            60,
            "the refusal to be said",
        )
        assert warning[0].type == "Warning"
        assert "PriorityClass" in warning[0].message, warning[0].message
        for audience in (2000, 2100):  # more passes (a new generation each): still one Warning
            rooms.patch_spec("orphan", {"expectedAudience": audience})
            wait_until(
                lambda n=audience: rooms.get("orphan")["status"]["plan"]["expectedAudience"] == n,
                30,
                "the new plan",
            )
        assert rooms.reasons("orphan").count("NodeHeadroomRefused") == 1
        assert rooms.phase("orphan") == "Scheduled", "the room runs on without headroom"
    finally:
        refused.stop()
