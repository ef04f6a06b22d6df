"""Karpenter objects for a local cluster with Karpenter's kwok provider: a node class whose
nodes take a set time to come, and a NodePool whose nodes only chosen pods fit. Pure.

Used by `townsquare demo --nodes` and the end-to-end tests; the operator itself never
talks to Karpenter (it only creates placeholder pods, which any node autoscaler serves).
"""

from __future__ import annotations

from collections.abc import Mapping

from townsquare.kube.children import Manifest

KARPENTER = ("karpenter.sh", "v1")
KWOK = ("karpenter.kwok.sh", "v1alpha1")
INSTANCE_TYPE = "c-4x-amd64-linux"
"""A 4-CPU kwok instance type: one relay asking for 3 CPU per node, so N relays need N."""


def kwok_node_class(name: str, registration_delay: str) -> Manifest:
    """Nodes that register `registration_delay` (e.g. "30s") after Karpenter asks for them."""
    return {
        "apiVersion": "/".join(KWOK),
        "kind": "KWOKNodeClass",
        "metadata": {"name": name},
        "spec": {"nodeRegistrationDelay": registration_delay},
    }


def node_pool(
    name: str, label: str, *, instance_type: str = INSTANCE_TYPE, consolidate_after: str = "0s"
) -> Manifest:
    """Nodes of the node class `name`, labelled and tainted `label=name`: only pods that
    select the label and tolerate the taint run there. Empty nodes are removed."""
    return {
        "apiVersion": "/".join(KARPENTER),
        "kind": "NodePool",
        "metadata": {"name": name},
        "spec": {
            "disruption": {
                "consolidationPolicy": "WhenEmpty",
                "consolidateAfter": consolidate_after,
                "budgets": [{"nodes": "100%"}],
            },
            "template": {
                "metadata": {"labels": {label: name}},
                "spec": {
                    "expireAfter": "Never",
                    "taints": [{"key": label, "value": name, "effect": "NoSchedule"}],
                    "requirements": [
                        {
                            "key": "node.kubernetes.io/instance-type",
                            "operator": "In",
                            "values": [instance_type],
                        },
                        {
                            "key": "karpenter.sh/capacity-type",
                            "operator": "In",
                            "values": ["on-demand"],
                        },
                    ],
                    "nodeClassRef": {"group": KWOK[0], "kind": "KWOKNodeClass", "name": name},
                },
            },
        },
    }


def relays_on_pool(label: str, name: str) -> Manifest:
    """The `spec.relay` fields that put relays (and so placeholders) on that pool only."""
    return {
        "nodeSelector": {label: name},
        "tolerations": [{"key": label, "operator": "Equal", "value": name, "effect": "NoSchedule"}],
    }


def passed_on(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment `run.sh` gets: what finds and builds it (PATH, HOME, Go's settings,
    townsquare's cache), and nothing Karpenter would read as one of its options."""
    return {
        key: value
        for key, value in environ.items()
        if key in ("PATH", "HOME") or key.startswith(("GO", "TOWNSQUARE_"))
    }
