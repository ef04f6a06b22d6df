"""The dashboard and the alerts, asked of a real Prometheus that scrapes the operator's /metrics.

The metrics server is observability.serve, the one `townsquare run` starts; the rooms it
reports are recorded the way the operator records them after each reconcile.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from harness import REPO, Prometheus, free_loopback_port, wait_until

from townsquare import observability
from townsquare.api.models import AudioRoomStatus

pytestmark = [pytest.mark.e2e]

CHART = REPO / "charts" / "townsquare"
VARIABLES = {"$namespace": "spaces", "$room": ".*", "$job": ".*", "$__rate_interval": "1m"}


def live_status(start: datetime) -> AudioRoomStatus:
    moment = start.isoformat().replace("+00:00", "Z")
    return AudioRoomStatus.model_validate(
        {
            "phase": "Live",
            "plan": {
                "expectedAudience": 3000,
                "relays": 4,
                "capacity": 3000,
                "prewarmAt": moment,
                "readyBy": moment,
            },
            "relays": {"desired": 20, "ready": 12, "draining": 0, "summary": "12/20"},
            "listeners": {"current": 15000, "forecast": 40000, "capacity": 9000, "waiting": 600},
            "conditions": [
                {
                    "type": "CapacityExceeded",
                    "status": "True",
                    "reason": "AudienceBeyondMaxRelays",
                    "lastTransitionTime": moment,
                },
                {
                    "type": "MetricsAvailable",
                    "status": "True",
                    "reason": "Fresh",
                    "lastTransitionTime": moment,
                },
            ],
        }
    )


@pytest.fixture
def operator_metrics(prometheus: Prometheus) -> Iterator[Prometheus]:
    """/metrics of this process, with one live room, scraped by the test's Prometheus."""
    # The registry is the process's: unit tests that ran earlier in this xdist worker (the
    # operator shell's) may have left rooms in it, which the queries below would count.
    observability.forget_all_rooms()
    port = free_loopback_port()
    server = observability.serve(port, "127.0.0.1")
    start = datetime.now(UTC) - timedelta(minutes=2)
    observability.observe_room("spaces", "launch", live_status(start), start)
    observability.record_decision("up", "capacity-exceeded")
    observability.record_event("Warning", "AudienceBeyondMaxRelays")
    with observability.time_reconcile():
        pass
    with pytest.raises(TimeoutError), observability.time_reconcile():
        raise TimeoutError
    with pytest.raises(ConnectionError), observability.time_prometheus_query():
        raise ConnectionError
    prometheus.add_target(f"127.0.0.1:{port}")
    wait_until(
        lambda: prometheus.value('townsquare_room_relays{state="ready"}') == 12,
        30,
        "the first scrape of the operator's metrics",
    )
    yield prometheus
    server.shutdown()
    server.server_close()
    observability.forget_all_rooms()


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads((CHART / "dashboards" / "townsquare.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def fill(query: str) -> str:
    for variable, value in VARIABLES.items():
        query = query.replace(variable, value)
    return query


def test_every_dashboard_panel_shows_data(operator_metrics: Prometheus) -> None:
    client = operator_metrics.client()
    queries = dashboard_queries()
    assert len(queries) >= 15

    def all_answer() -> list[str] | None:
        empty = [title for title, expr in queries if not client.custom_query(fill(expr))]
        return None if empty else ["ok"]

    try:
        wait_until(all_answer, 30, "every panel to show data (rates need two scrapes)")
    except AssertionError:
        empty = [f"{t}: {e}" for t, e in queries if not client.custom_query(fill(e))]
        raise AssertionError(f"panels without data: {empty}") from None
    by_phase = {
        r["metric"]["phase"]: float(r["value"][1])
        for r in client.custom_query("sum by (phase) (townsquare_rooms)")
    }
    assert by_phase["Live"] == 1 and by_phase["Scheduled"] == 0


def rendered_alerts() -> list[dict[str, Any]]:
    helm = subprocess.run(
        [str(REPO / "hack" / "helm" / "build.sh")], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    rendered = subprocess.run(
        [helm, "template", "ts", str(CHART), "--set", "metrics.prometheusRule.enabled=true",
         "--show-only", "templates/prometheusrule.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rule = yaml.safe_load(rendered)
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_room_alerts_evaluate_on_real_series(operator_metrics: Prometheus) -> None:
    """The room alerts' expressions, as Prometheus evaluates them, pick out the live room."""
    client = operator_metrics.client()
    alerts = {rule["alert"]: rule["expr"] for rule in rendered_alerts()}
    firing = {  # custom_query raises on an expression Prometheus refuses
        name
        for name, expr in alerts.items()
        if any(r["metric"].get("room") == "launch" for r in client.custom_query(expr))
    }
    # Ready 12 of 20 within 15 minutes after the start; over capacity with joins waiting.
    assert firing == {
        "TownsquarePreWarmIncomplete",
        "TownsquareCapacityExceeded",
        "TownsquareListenersWaiting",
    }
