"""The operator's own /metrics, as Prometheus (and so the alerts and dashboard) read it."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from townsquare import observability
from townsquare.api.models import AudioRoomStatus

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)


def status(**overrides: object) -> AudioRoomStatus:
    body = {
        "phase": "PreWarming",
        "observedGeneration": 2,
        "plan": {
            "expectedAudience": 500_000,
            "relays": 715,
            "capacity": 500_500,
            "prewarmAt": "2026-12-01T22:45:00Z",
            "readyBy": "2026-12-01T22:59:00Z",
        },
        "relays": {"desired": 715, "ready": 600, "draining": 0, "summary": "600/715"},
        "listeners": {"current": 10, "forecast": 20, "capacity": 500_500, "waiting": 0},
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "PreWarming",
                "lastTransitionTime": "2026-12-01T22:45:00Z",
            },
            {
                "type": "CapacityExceeded",
                "status": "True",
                "reason": "AudienceBeyondMaxRelays",
                "lastTransitionTime": "2026-12-01T22:45:00Z",
            },
            {
                "type": "MetricsAvailable",
                "status": "Unknown",
                "reason": "NotQueriedYet",
                "lastTransitionTime": "2026-12-01T22:45:00Z",
            },
        ],
    }
    body.update(overrides)
    return AudioRoomStatus.model_validate(body)


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics' text, keyed by name and sorted labels."""
    text = generate_latest(observability.REGISTRY).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def room_sample(name: str, **labels: str) -> float | None:
    key = (name, tuple(sorted({"namespace": "spaces", "room": "launch", **labels}.items())))
    return scrape().get(key)


@pytest.fixture(autouse=True)
def no_rooms() -> Iterator[None]:
    observability.forget_all_rooms()
    yield
    observability.forget_all_rooms()


def test_a_room_is_published_as_its_status_says() -> None:
    observability.observe_room("spaces", "launch", status(), START)

    assert room_sample("townsquare_room_phase", phase="PreWarming") == 1
    assert room_sample("townsquare_room_relays", state="planned") == 715
    assert room_sample("townsquare_room_relays", state="ready") == 600
    assert room_sample("townsquare_room_listeners", kind="capacity") == 500_500
    assert room_sample("townsquare_room_start_time_seconds") == START.timestamp()
    assert room_sample("townsquare_room_prewarm_time_seconds") == START.timestamp() - 15 * 60
    assert room_sample("townsquare_room_condition", type="CapacityExceeded") == 1
    assert room_sample("townsquare_room_condition", type="Ready") == 0
    assert room_sample("townsquare_room_condition", type="MetricsAvailable") is None
    assert room_sample("townsquare_admission_queueing") == 0


def test_rooms_by_phase_counts_every_phase_and_forgets_deleted_rooms() -> None:
    observability.observe_room("spaces", "launch", status(), START)
    observability.observe_room("spaces", "townhall", status(phase="Live"), START)
    observability.observe_room("other", "launch", status(phase="Live"), START)
    samples = scrape()
    by_phase = {dict(k[1])["phase"]: v for k, v in samples.items() if k[0] == "townsquare_rooms"}
    assert by_phase == {
        "Scheduled": 0,
        "PreWarming": 1,
        "Ready": 0,
        "Live": 2,
        "Draining": 0,
        "Ended": 0,
    }

    observability.forget_room("spaces", "launch")
    assert room_sample("townsquare_room_phase", phase="PreWarming") is None
    assert room_sample("townsquare_room_relays", state="planned") is None


def test_waiting_listeners_mean_the_admission_queue_is_holding_joins() -> None:
    listeners = {"current": 15_000, "forecast": 40_000, "capacity": 15_000, "waiting": 2_500}
    observability.observe_room("spaces", "launch", status(listeners=listeners), START)
    assert room_sample("townsquare_admission_queueing") == 1
    assert room_sample("townsquare_admission_waiting_listeners") == 2_500

    observability.observe_room("spaces", "launch", status(), START, admission="queueing")
    assert room_sample("townsquare_admission_queueing") == 1


def test_decisions_are_counted_by_a_closed_set_of_reasons() -> None:
    def count() -> float:
        return scrape().get(
            ("townsquare_decisions_total", (("direction", "up"), ("reason", "forecast"))), 0.0
        )

    before = count()
    observability.record_decision("up", "forecast")
    assert count() == before + 1
    with pytest.raises(ValueError, match="unknown decision reason"):
        observability.record_decision("up", "listeners 1,234")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({"drain_timed_out": True, "metrics_available": False}, "drain-timeout"),
        ({"metrics_available": False, "capacity_exceeded": True}, "metrics-unavailable"),
        ({"capacity_exceeded": True, "plan_floor_binding": True}, "capacity-exceeded"),
        ({"plan_floor_binding": True}, "plan-floor"),
        ({"direction": "hold"}, "stabilized"),
        ({}, "forecast"),
    ],
)
def test_the_most_urgent_rule_names_the_decision(facts: dict[str, object], expected: str) -> None:
    given: dict[str, object] = {
        "metrics_available": True,
        "capacity_exceeded": False,
        "plan_floor_binding": False,
        "drain_timed_out": False,
        "direction": "up",
        **facts,
    }
    assert observability.decision_reason(**given) == expected  # type: ignore[arg-type]


def test_reconcile_and_query_timers_count_failures_by_exception_class() -> None:
    def value(name: str, **labels: str) -> float:
        return scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    reconciles = value("townsquare_reconcile_duration_seconds_count")
    errors = value("townsquare_reconcile_errors_total", error="TimeoutError")
    with observability.time_reconcile():
        pass
    with pytest.raises(TimeoutError), observability.time_reconcile():
        raise TimeoutError
    assert value("townsquare_reconcile_duration_seconds_count") == reconciles + 2
    assert value("townsquare_reconcile_errors_total", error="TimeoutError") == errors + 1

    failures = value("townsquare_prometheus_query_errors_total", error="ConnectionError")
    with pytest.raises(ConnectionError), observability.time_prometheus_query():
        raise ConnectionError
    assert value("townsquare_prometheus_query_errors_total", error="ConnectionError") == (
        failures + 1
    )


def test_metrics_are_served_over_http() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = observability.serve(port, "127.0.0.1")
    try:
        observability.observe_room("spaces", "launch", status(), START)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'townsquare_room_relays{namespace="spaces",room="launch",state="ready"} 600.0' in body
    assert "townsquare_build_info{" in body
    assert "process_resident_memory_bytes" in body


def test_a_query_timed_by_its_caller_counts_its_error_under_a_safe_name() -> None:
    def value(name: str, **labels: str) -> float:
        return scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    queries = value("townsquare_prometheus_query_duration_seconds_count")
    unreachable = value("townsquare_prometheus_query_errors_total", error="Unreachable")
    other = value("townsquare_prometheus_query_errors_total", error="Other")
    observability.record_prometheus_query(0.02)
    observability.record_prometheus_query(5.0, "Unreachable")
    observability.record_prometheus_query(5.0, "Prometheus unreachable: 10.0.0.1 refused")
    assert value("townsquare_prometheus_query_duration_seconds_count") == queries + 3
    assert value("townsquare_prometheus_query_errors_total", error="Unreachable") == unreachable + 1
    assert value("townsquare_prometheus_query_errors_total", error="Other") == other + 1
