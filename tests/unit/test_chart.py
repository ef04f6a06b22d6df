"""The Helm chart as a platform team meets it, rendered by a real helm (hack/helm).

Also the tools that judge what the chart ships: promtool for the alerts, hadolint for the
Dockerfile. No cluster here; tests/e2e/test_chart.py installs the chart for real.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from townsquare import observability
from townsquare.api.models import AudioRoomSpec
from townsquare.cli import build_parser
from townsquare.cli import tenant_policy as tenant_policy_of
from townsquare.kube.children import relay_stateful_set
from townsquare.policy import violations

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "townsquare"
NAMESPACE = "townsquare-system"


@cache
def helm() -> str:
    """The pinned helm, built once into ~/.cache/townsquare (minutes the first time)."""
    built = subprocess.run(
        [str(ROOT / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=False
    )
    assert built.returncode == 0, f"building helm failed:\n{built.stderr[-3000:]}"
    return built.stdout.strip().splitlines()[-1]


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=False)


def render(values: dict[str, Any] | None = None, tmp: Path | None = None) -> list[dict[str, Any]]:
    """`helm template` with these values; the documents it prints."""
    args = ["template", "ts", str(CHART), "--namespace", NAMESPACE]
    if values:
        args += ["--set-json", *_set_json(values)]
    result = run_helm(*args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _set_json(values: dict[str, Any]) -> list[str]:
    """`--set-json` arguments for nested values (after a first `--set-json`)."""
    pairs = [f"{path}={json.dumps(value)}" for path, value in _leaves(values)]
    return [arg for pair in pairs for arg in ("--set-json", pair)][1:]


def _leaves(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    leaves: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def tenant_policy(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith("-tenants")]


def drain_policy(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in of_kind(docs, kind) if d["metadata"]["name"].endswith("-drain-first")]


def rules_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("Role", "ClusterRole") for rule in d["rules"]]


def test_the_chart_crd_is_the_generated_crd() -> None:
    shipped = (CHART / "crds" / "audiorooms.townsquare.dev.yaml").read_text()
    generated = (ROOT / "crds" / "audiorooms.townsquare.dev.yaml").read_text()
    assert shipped == generated, "the chart's CRD is stale: run 'make chart-crds'"


def test_helm_lint_strict_passes() -> None:
    result = run_helm("lint", "--strict", str(CHART))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"watch": {"namespaces": ["Not_A_Namespace"]}}, "/watch/namespaces/0"),
        ({"highAvailability": {"replicas": 1}}, "/highAvailability/replicas"),
        ({"metrics": {"port": "9090"}}, "/metrics/port"),
        ({"logFormat": "xml"}, "/logFormat"),
        ({"prometheus": {"url": "prometheus:9090"}}, "/prometheus/url"),
    ],
)
def test_values_schema_refuses_unknown_and_wrong_values(
    values: dict[str, Any], complaint: str
) -> None:
    args = ["template", "ts", str(CHART), "--set-json", *_set_json(values)]
    result = run_helm(*args)
    assert result.returncode != 0
    assert complaint in result.stderr


def test_the_operator_pod_is_locked_down() -> None:
    (deployment,) = of_kind(render(), "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "never two operators at once"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]


def test_every_flag_the_chart_passes_is_one_townsquare_run_accepts() -> None:
    docs = render(
        {
            "watch": {"namespaces": ["a", "b"]},
            "highAvailability": {"enabled": True},
            "prometheus": {"url": "http://prometheus.monitoring:9090"},
        }
    )
    for deployment in of_kind(docs, "Deployment"):
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] != "operator":
            continue  # the edge's flags: tests/unit/test_edge_chart.py
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        parsed = build_parser().parse_args(args)
        assert parsed.command == "run"
        assert parsed.namespace == ["a", "b"]
        assert parsed.prometheus_url == "http://prometheus.monitoring:9090"


def test_rbac_is_least_privilege_in_both_modes() -> None:
    forbidden_verbs = {"*", "delete", "deletecollection", "update", "escalate", "bind"}
    for values in ({}, {"watch": {"namespaces": ["a"]}, "highAvailability": {"enabled": True}}):
        rules = rules_of(render(values))
        assert rules
        for rule in rules:
            assert "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
            verbs = set(rule["verbs"]) - ({"delete"} if rule["resources"] == ["pods"] else set())
            assert not forbidden_verbs & verbs, rule
            assert "secrets" not in rule["resources"], rule
        granted = {
            (g, r, v)
            for rule in rules
            for g in rule["apiGroups"]
            for r in rule["resources"]
            for v in rule["verbs"]
        }
        assert ("apps", "statefulsets", "patch") in granted
        assert ("", "events", "create") in granted
        assert ("", "pods", "get") not in granted
        assert ("", "pods", "create") in granted, "node headroom placeholders are made"
        assert ("", "pods", "delete") in granted, "drained relays are replaced in a rollout"
        assert ("", "events", "list") in granted, "FailedCreate of relay pods"
        assert ("apps", "deployments", "patch") not in granted


def test_limited_to_namespaces_grants_roles_there_and_only_scanning_cluster_wide() -> None:
    docs = render({"watch": {"namespaces": ["spaces", "townhalls"]}})
    roles = of_kind(docs, "Role")
    served = ["spaces", "townhalls", NAMESPACE]  # and the claims table's, the release's
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(served)
    assert sorted(b["metadata"]["namespace"] for b in of_kind(docs, "RoleBinding")) == sorted(
        served
    )
    (claims,) = [r for r in roles if r["metadata"]["namespace"] == NAMESPACE]
    granted = {
        (resource, verb, name)
        for rule in claims["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", ["*"])
    }
    assert granted == {
        ("configmaps", "create", "*"),
        ("configmaps", "get", "townsquare-partitions"),
        ("configmaps", "patch", "townsquare-partitions"),
        ("events", "create", "*"),
    }, "the claims table, and Events on it: nothing else in the release namespace"
    (cluster_role,) = of_kind(docs, "ClusterRole")
    cluster_wide = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_wide == {"customresourcedefinitions", "namespaces"}
    assert all(set(rule["verbs"]) == {"list", "watch"} for rule in cluster_role["rules"])


def test_cluster_scoped_names_carry_the_release_namespace() -> None:
    docs = render()
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        (obj,) = of_kind(docs, kind)
        assert obj["metadata"]["name"] == f"{NAMESPACE}-ts-townsquare"


@pytest.mark.parametrize(
    ("namespaces", "peering_kind"), [([], "ClusterKopfPeering"), (["a", "b"], "KopfPeering")]
)
def test_high_availability_runs_replicas_with_distinct_priorities(
    namespaces: list[str], peering_kind: str
) -> None:
    docs = render({"watch": {"namespaces": namespaces}, "highAvailability": {"enabled": True}})
    deployments = of_kind(docs, "Deployment")
    assert [d["metadata"]["name"] for d in deployments] == [
        "ts-townsquare",
        "ts-townsquare-standby-1",
    ]
    priorities = [
        next(a for a in d["spec"]["template"]["spec"]["containers"][0]["args"] if "--priority" in a)
        for d in deployments
    ]
    assert priorities == ["--priority=100", "--priority=99"]
    peerings = of_kind(docs, peering_kind)
    assert len(peerings) == max(1, len(namespaces))
    assert {p["metadata"]["name"] for p in peerings} == {"ts-townsquare"}
    (budget,) = of_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert not of_kind(render(), "PodDisruptionBudget"), "no budget for a single replica"


def test_partitions_each_run_their_share_with_their_own_peering() -> None:
    docs = render({"partitions": 3, "highAvailability": {"enabled": True}})
    deployments = of_kind(docs, "Deployment")
    assert len(deployments) == 6
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        partition = int(deployment["metadata"]["labels"]["townsquare.dev/partition"])
        flags = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--partition={partition}/3" in flags, (name, flags)
        suffix = f"-p{partition}" if partition else ""
        assert f"--peering=ts-townsquare{suffix}" in flags, (name, flags)
        # One claims table for every partition, so that a new count waits for the old.
        assert f"--claims-namespace={NAMESPACE}" in flags, (name, flags)
    peerings = {p["metadata"]["name"] for p in of_kind(docs, "ClusterKopfPeering")}
    assert peerings == {"ts-townsquare", "ts-townsquare-p1", "ts-townsquare-p2"}
    patchable = [r for r in rules_of(docs) if r.get("resourceNames")]
    assert {n for r in patchable for n in r["resourceNames"]} == peerings
    single = of_kind(render(), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in single["args"] if a.startswith("--partition")]


def test_monitoring_objects_only_when_asked() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    assert not [d for d in render() if d["metadata"]["name"].endswith("-dashboard")]
    on = {"enabled": True}
    docs = render(
        {"metrics": {"serviceMonitor": on, "prometheusRule": on, "dashboard": {"enabled": True}}}
    )
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True, "rooms keep their namespace"
    (service,) = of_kind(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (dashboard,) = [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["townsquare.json"]) == json.loads(
        (CHART / "dashboards" / "townsquare.json").read_text()
    )


# --- alerts ------------------------------------------------------------------------------


def rules_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file."""
    (rule,) = of_kind(render({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    path = tmp_path / "townsquare-rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is not installed: run 'make prometheus' (Debian's prometheus)"
    return found


def test_promtool_accepts_the_alert_rules(tmp_path: Path) -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(rules_file(tmp_path))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


ROOM = 'namespace="spaces", room="launch"'
OK = 'namespace="spaces", room="ok"'
LAUNCH = "spaces/launch"


def _slot_series(partition: str, pod: str, values: str) -> list[dict[str, str]]:
    """One replica's share and claimed slots, as its /metrics shows them when scraped."""
    return [
        {
            "series": f'{name}{{namespace="{NAMESPACE}",partition="{partition}",pod="{pod}"}}',
            "values": values,
        }
        for name in ("townsquare_partition_share_slots", "townsquare_partition_claimed_slots")
    ]


def _up(pod: str, values: str) -> dict[str, str]:
    return {
        "series": f'up{{job="ts-townsquare-metrics",namespace="{NAMESPACE}",pod="{pod}"}}',
        "values": values,
    }


RULE_TESTS: dict[str, Any] = {
    "evaluation_interval": "1m",
    "tests": [
        {
            "name": "pre-warm incomplete 4 minutes before the start fires; complete does not",
            "interval": "1m",
            "input_series": [
                # Start at t=6m: from t=1m on, the start is less than 5 minutes away.
                {"series": f"townsquare_room_start_time_seconds{{{ROOM}}}", "values": "360x10"},
                {
                    "series": f'townsquare_room_relays{{{ROOM}, state="desired"}}',
                    "values": "715x10",
                },
                {"series": f'townsquare_room_relays{{{ROOM}, state="ready"}}', "values": "600x10"},
                {
                    "series": f'townsquare_room_phase{{{ROOM}, phase="PreWarming"}}',
                    "values": "1x10",
                },
                {
                    "series": 'townsquare_room_start_time_seconds{namespace="spaces", room="ok"}',
                    "values": "360x10",
                },
                *(
                    {"series": f'townsquare_room_relays{{{OK}, state="{state}"}}', "values": "4x10"}
                    for state in ("desired", "ready")
                ),
                {
                    "series": 'townsquare_room_phase{namespace="spaces", room="ok", phase="Ready"}',
                    "values": "1x10",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "0m", "alertname": "TownsquarePreWarmIncomplete", "exp_alerts": []},
                {
                    "eval_time": "3m",
                    "alertname": "TownsquarePreWarmIncomplete",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "namespace": "spaces",
                                "room": "launch",
                            },
                            "exp_annotations": {
                                "summary": (
                                    "AudioRoom spaces/launch is not pre-warmed near its start"
                                ),
                                "description": (
                                    "Only 600 relays are Ready, fewer than the operator wants, "
                                    "with the start less than 5 minutes away (or passed less "
                                    "than 15 minutes ago). Run `kubectl -n spaces describe "
                                    "audioroom launch` and look for Pending relay pods (node "
                                    "capacity, quota, image pulls)."
                                ),
                            },
                        }
                    ],
                },
            ],
        },
        {
            "name": "capacity exceeded for 2 minutes fires",
            "interval": "1m",
            "input_series": [
                {
                    "series": f'townsquare_room_condition{{{ROOM}, type="CapacityExceeded"}}',
                    "values": "0 1 1 1 1",
                }
            ],
            "alert_rule_test": [
                {"eval_time": "2m", "alertname": "TownsquareCapacityExceeded", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "TownsquareCapacityExceeded",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "spaces",
                                "room": "launch",
                                "type": "CapacityExceeded",
                            },
                            "exp_annotations": {
                                "summary": f"AudioRoom {LAUNCH} needs more relays than maxRelays"
                            },
                        }
                    ],
                },
            ],
        },
        {
            "name": "a partition whose replicas act on less than its share for 5 minutes",
            "interval": "1m",
            "input_series": [
                *(
                    {
                        "series": f'townsquare_partition_share_slots{{namespace="{NAMESPACE}",'
                        f'partition="{partition}",pod="{pod}"}}',
                        "values": "128x9",
                    }
                    for partition in ("0/2", "1/2")
                    for pod in ("a", "b")
                ),
                {  # an acting replica and its standby: the share is covered
                    "series": f'townsquare_partition_claimed_slots{{namespace="{NAMESPACE}",'
                    'partition="0/2",pod="a"}',
                    "values": "128x9",
                },
                {
                    "series": f'townsquare_partition_claimed_slots{{namespace="{NAMESPACE}",'
                    'partition="0/2",pod="b"}',
                    "values": "0x9",
                },
                {  # its claim cannot be written from minute 2 on
                    "series": f'townsquare_partition_claimed_slots{{namespace="{NAMESPACE}",'
                    'partition="1/2",pod="a"}',
                    "values": "128 128 0x7",
                },
                {
                    "series": f'townsquare_partition_claimed_slots{{namespace="{NAMESPACE}",'
                    'partition="1/2",pod="b"}',
                    "values": "0x9",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "TownsquarePartitionUnclaimed", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "TownsquarePartitionUnclaimed",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "namespace": NAMESPACE,
                                "partition": "1/2",
                            },
                            "exp_annotations": {
                                "summary": "Operator partition 1/2 acts on fewer hash slots "
                                "than its share"
                            },
                        }
                    ],
                },
            ],
        },
        {
            "name": "a whole partition down leaves slots unserved",
            "interval": "1m",
            "input_series": [
                *_slot_series("0/2", "a", "128x20"),
                # partition 1/2 acts for two minutes, then its only pod crash-loops: no samples
                *_slot_series("1/2", "b", "128 128"),
                _up("a", "1x20"),
                _up("b", "1 1 0x18"),
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "TownsquareSlotsUnserved", "exp_alerts": []},
                {
                    "eval_time": "15m",
                    "alertname": "TownsquareSlotsUnserved",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": NAMESPACE}}
                    ],
                },
            ],
        },
        {
            "name": "no partition reports its slots: all unserved",
            "interval": "1m",
            "input_series": [_up("a", "1x20")],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "TownsquareSlotsUnserved",
                    "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": NAMESPACE}}
                    ],
                },
            ],
        },
        {
            "name": "two partitions acting on all slots raise nothing",
            "interval": "1m",
            "input_series": [
                *_slot_series("0/2", "a", "128x20"),
                *_slot_series("1/2", "b", "128x20"),
                *_slot_series("1/2", "b-standby", "0x20"),
            ],
            "alert_rule_test": [
                {"eval_time": "15m", "alertname": "TownsquareSlotsUnserved", "exp_alerts": []},
            ],
        },
        {
            "name": "an operator that is not scraped for 5 minutes is down",
            "interval": "1m",
            "input_series": [
                {
                    "series": f'up{{job="ts-townsquare-metrics", namespace="{NAMESPACE}"}}',
                    "values": "1 1 0 0 0 0 0 0 0",
                }
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "TownsquareOperatorDown", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "TownsquareOperatorDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": "ts-townsquare-metrics",
                                "namespace": NAMESPACE,
                            }
                        }
                    ],
                },
            ],
        },
    ],
}


def test_alerts_fire_when_on_call_needs_them(tmp_path: Path) -> None:
    rules = rules_file(tmp_path)
    fixed = {  # annotations without templating, as the rules file states them
        rule["alert"]: {k: v for k, v in rule["annotations"].items() if "{{" not in v}
        for group in yaml.safe_load(rules.read_text())["groups"]
        for rule in group["rules"]
    }
    for case in RULE_TESTS["tests"]:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                given = alert.get("exp_annotations", {})
                alert["exp_annotations"] = {**fixed[check["alertname"]], **given}
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], **RULE_TESTS}))
    result = subprocess.run(
        [promtool(), "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# --- dashboard ---------------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "by", "count", "or", "and", "on", "vector", "rate", "increase", "time",
    "histogram_quantile", "le", "absent", "without", "ignoring", "unless",
}  # fmt: skip


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CHART / "dashboards" / "townsquare.json").read_text())
    return loaded


def dashboard_queries() -> list[str]:
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    queries = [t["expr"] for p in panels for t in p["targets"]]
    queries += [
        v["query"]["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"
    ]
    return queries


def metric_names(query: str) -> set[str]:
    """Identifiers of a PromQL query that name series (not functions, labels or keywords)."""
    bare = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", query)  # Grafana's variable query
    bare = re.sub(r'"[^"]*"', '""', bare)  # label values
    bare = re.sub(r"\{[^}]*\}", "{}", bare)  # matchers
    bare = re.sub(r"\[[^\]]*\]", "[]", bare)  # ranges
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)  # grouping labels
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare))
    return {n for n in names if not re.search(rf"\b{n}\s*\(", bare)} - PROMQL_WORDS


def test_the_dashboard_is_grafana_json_whose_queries_name_exported_metrics() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    queries = dashboard_queries()
    assert len(queries) >= 15
    exported = observability.exported_names() | {"up"}
    for query in queries:
        names = metric_names(query)
        assert names, query
        assert names <= exported, f"{query}: {names - exported} are not exported"
    shown = set().union(*(metric_names(q) for q in queries))
    for family in ("townsquare_rooms", "townsquare_decisions_total", "townsquare_room_relays"):
        assert family in shown


# --- Dockerfile --------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = ROOT / ".venv" / "bin" / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev dependencies: run 'make venv'"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_its_base_and_runs_unprivileged() -> None:
    """One Dockerfile for every base: both stages FROM the BASE argument, whose default is
    the upstream image pinned exactly. tests/e2e/test_image.py builds and runs it."""
    text = (ROOT / "Dockerfile").read_text()
    (default,) = re.findall(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert re.search(r":\d+\.\d+\.\d+-|@sha256:", default), f"{default} is not pinned exactly"
    assert re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE) == ["${BASE}", "${BASE}"]
    assert "--no-dev" in text
    assert re.search(r"^USER 65532", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["townsquare"\]', text, re.MULTILINE)


def test_the_tenant_policy_carries_its_values_into_cel_and_the_operator_flags() -> None:
    docs = render(
        {
            "watch": {"namespaces": ["spaces"]},
            "prometheus": {"url": "http://prometheus.monitoring:9090"},
            "tenantPolicy": {
                "allowedRegistries": ["registry.example/", "ghcr.io/acme"],
                "maxRelaysPerRoom": 300,
                "allowedPrometheusUrls": ["http://prom.monitoring:9090"],
                "listenerQueries": {"janus": "sum by (namespace, room, pod) (janus_listeners)"},
                "freePromQLNamespaces": ["platform"],
            },
        }
    )
    (policy,) = tenant_policy(docs, "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert json.loads(variables["registries"]) == ["registry.example", "ghcr.io/acme"]
    assert variables["maxRelays"] == "300"
    assert json.loads(variables["queryNames"]) == ["contract", "livekit", "janus"]
    assert json.loads(variables["freePromQLNamespaces"]) == ["platform"]
    assert json.loads(variables["prometheusUrls"]) == [
        "http://prom.monitoring:9090",
        "http://prometheus.monitoring:9090",  # the operator's own, which rooms may name
    ]
    (binding,) = tenant_policy(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == ["spaces"], "the policy covers the namespaces served"
    (deployment,) = (
        d
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.allowed_registry == ["registry.example/", "ghcr.io/acme"]
    assert parsed.max_relays_per_room == 300
    assert parsed.listener_query == ["janus=sum by (namespace, room, pod) (janus_listeners)"]
    assert parsed.free_promql_namespaces == "platform"
    assert parsed.allow_prometheus_url == ["http://prom.monitoring:9090"]
    # The operator refuses, on its own, the URLs the admission policy refuses.
    operator_policy, _ = tenant_policy_of(parsed)
    for url, allowed in [
        ("http://prom.monitoring:9090", True),
        ("http://prometheus.monitoring:9090", True),
        ("http://169.254.169.254/latest", False),
    ]:
        room = AudioRoomSpec.model_validate(
            {
                "startTime": "2026-12-01T23:00:00Z",
                "duration": "1h",
                "expectedAudience": 100,
                "relay": {"image": "registry.example/relay:1"},
                "scaling": {"maxRelays": 300},
                "metrics": {"prometheusUrl": url},
            }
        )
        assert bool(violations(room, "spaces", operator_policy)) != allowed, url


def test_the_tenant_policy_can_be_left_out_but_the_operator_keeps_its_flags() -> None:
    docs = render({"tenantPolicy": {"enabled": False}})
    assert not tenant_policy(docs, "ValidatingAdmissionPolicy")
    (deployment,) = of_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--free-promql-namespaces=" in args, "no free PromQL unless listed"


def test_the_chart_ships_the_headroom_priority_class_rooms_default_to() -> None:
    from townsquare.kube.placeholders import PRIORITY_CLASS, headroom_priority_class

    docs = render({"nodeHeadroom": {"priorityClass": {"name": "spare"}}})
    (priority_class,) = of_kind(docs, "PriorityClass")
    (deployment,) = of_kind(docs, "Deployment")
    parsed = build_parser().parse_args(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert priority_class["metadata"]["name"] == parsed.headroom_priority_class == "spare"
    assert parsed.headroom_image == "registry.k8s.io/pause:3.10"
    docs = render()
    (default,) = of_kind(docs, "PriorityClass")
    (deployment,) = of_kind(docs, "Deployment")
    parsed = build_parser().parse_args(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert default["metadata"]["name"] == parsed.headroom_priority_class
    assert default["metadata"]["name"] == f"{NAMESPACE}-ts-townsquare-headroom", "one a release"
    assert -10 <= priority_class["value"] < 0, "below relays, above the autoscaler's cutoff"
    assert priority_class["preemptionPolicy"] == "Never"
    assert priority_class["globalDefault"] is False
    built = headroom_priority_class(PRIORITY_CLASS)
    for key in ("value", "preemptionPolicy", "globalDefault", "description"):
        assert priority_class[key] == built[key], f"the demo's PriorityClass differs in {key}"
    assert not of_kind(
        render({"nodeHeadroom": {"priorityClass": {"create": False}}}), "PriorityClass"
    )


def test_the_drain_policy_keeps_relays_until_their_stateful_set_has_none() -> None:
    """Installed by default: the garbage collector (a foreground deletion) may delete a relay
    StatefulSet only once the drain brought it to 0 replicas."""
    docs = render({"watch": {"namespaces": ["spaces"]}})
    (policy,) = drain_policy(docs, "ValidatingAdmissionPolicy")
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
        ["apps"], ["statefulsets"], ["DELETE"],
    )  # fmt: skip
    spec = AudioRoomSpec.model_validate(
        {
            "startTime": "2026-12-01T23:00:00Z",
            "duration": "1h",
            "expectedAudience": 100,
            "relay": {"image": "registry.example/relay:1"},
        }
    )
    labels = relay_stateful_set("r", "spaces", "uid", spec, 3)["metadata"]["labels"]
    selected = policy["spec"]["matchConstraints"]["objectSelector"]["matchLabels"]
    assert selected.items() <= labels.items(), "the relay StatefulSets are the ones it guards"
    (validation,) = policy["spec"]["validations"]
    assert "oldObject.spec.replicas == 0" in validation["expression"]
    (binding,) = drain_policy(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0]
    assert selector["values"] == ["spaces"]
    off = render({"drainBeforeDeletion": {"enabled": False}})
    assert not drain_policy(off, "ValidatingAdmissionPolicy")
