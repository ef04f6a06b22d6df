"""Karpenter's kwok provider on the local cluster: the process, and node pools for a test.

The process is hack/cluster/karpenter/run.sh (the real Karpenter, built from its module);
each test gets NodePools of its own, labelled and tainted so that only the pods it means to
place there fit their nodes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness import REPO, wait_until
from kubernetes import client
from kubernetes.client.rest import ApiException

from townsquare.api.types import parse_duration
from townsquare.kube.karpenter import KARPENTER, KWOK, kwok_node_class, node_pool, passed_on

RUN_SCRIPT = REPO / "hack" / "cluster" / "karpenter" / "run.sh"
POOL_LABEL = "townsquare.dev/e2e-pool"


class Karpenter:
    """`run.sh` in its own process, with its log in a file."""

    def __init__(self, kubeconfig: Path, log: Path, **options: str) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = passed_on(os.environ)
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [str(RUN_SCRIPT), str(self.kubeconfig)],
                env={**env, **self.options},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def wait_served(self, api: client.ApiClient, timeout: float = 180) -> None:
        """Until the API server serves Karpenter's kinds: run.sh installs its CRDs before it
        starts Karpenter, and on a cold machine that takes a while after `start`."""
        extensions = client.ApiextensionsV1Api(api)

        def served() -> bool:
            assert self.alive(), f"Karpenter stopped early:\n{self.log_text()[-2000:]}"
            names = ("nodepools.karpenter.sh", "kwoknodeclasses.karpenter.kwok.sh")
            return all(_established(extensions, name) for name in names)

        wait_until(served, timeout, "Karpenter's CRDs to be served")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _established(extensions: client.ApiextensionsV1Api, name: str) -> bool:
    try:
        crd = extensions.read_custom_resource_definition(name)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    conditions = crd.status.conditions or [] if crd.status else []
    return any(c.type == "Established" and c.status == "True" for c in conditions)


class NodePools:
    """NodePools and their KWOKNodeClasses for one test, removed with their nodes at the end."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.names: list[str] = []
        self.delays: dict[str, float] = {}

    def create(self, name: str, registration_delay: str) -> None:
        """A pool whose nodes appear `registration_delay` after Karpenter asks for them,
        carry `POOL_LABEL=name` and a NoSchedule taint of the same, and go once empty."""
        node_class = kwok_node_class(name, registration_delay)
        pool = node_pool(name, POOL_LABEL)
        self.custom.create_cluster_custom_object(*KWOK, "kwoknodeclasses", node_class)
        self.custom.create_cluster_custom_object(*KARPENTER, "nodepools", pool)
        self.names.append(name)
        self.delays[name] = parse_duration(registration_delay).total_seconds()
        wait_until(lambda: self._ready(name), 60, f"Karpenter to mark NodePool {name} Ready")

    def _ready(self, name: str) -> bool:
        pool = self.custom.get_cluster_custom_object(*KARPENTER, "nodepools", name)
        conditions = (pool.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def nodes(self, name: str) -> list[client.V1Node]:
        return list(self.core.list_node(label_selector=f"{POOL_LABEL}={name}").items)

    def node_claims(self, name: str) -> list[dict[str, Any]]:
        claims = self.custom.list_cluster_custom_object(
            *KARPENTER, "nodeclaims", label_selector=f"karpenter.sh/nodepool={name}"
        )
        return list(claims["items"])

    def delete_all(self) -> None:
        """Delete the pools (Karpenter then removes their nodes), waiting until they are gone.

        A NodeClaim deleted before its node registered still gets its node later: the kwok
        provider creates it after the delay whatever happened meanwhile. Such orphans (no
        claim, no Karpenter to remove them) are deleted here once the delay has passed.
        """
        unregistered = any(
            not (claim.get("status") or {}).get("nodeName")
            for name in self.names
            for claim in self.node_claims(name)
        )
        for name in self.names:
            for plural, group in (("nodepools", KARPENTER), ("kwoknodeclasses", KWOK)):
                try:
                    self.custom.delete_cluster_custom_object(*group, plural, name)
                except ApiException as error:
                    if error.status != 404:
                        raise
        for name in self.names:
            wait_until(lambda name=name: not self.node_claims(name), 120, f"{name}'s nodes gone")
        if unregistered:
            time.sleep(max(self.delays.values(), default=0) + 5)
        for name in self.names:
            for node in self.nodes(name):
                self.core.delete_node(node.metadata.name)


def ready_since(node: client.V1Node) -> float | None:
    """When the node became Ready (epoch seconds), as the API server recorded it."""
    ready = next((c for c in node.status.conditions or [] if c.type == "Ready"), None)
    if ready is None or ready.status != "True":
        return None
    return float(ready.last_transition_time.timestamp())
