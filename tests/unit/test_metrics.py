"""PromQL built for rooms: escaped labels, batched grouping, and parsing of the answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from townsquare.api.models import MetricsSpec
from townsquare.lifecycle import Metrics
from townsquare.metrics import (
    Reading,
    Source,
    aged,
    batched_query,
    choose_prometheus,
    covering,
    escape_label_value,
    parse_vector,
    room_metrics,
    room_query,
)


def test_label_values_cannot_change_the_query() -> None:
    hostile = 'x"} or vector(1) or {a="'
    escaped = escape_label_value(hostile)
    assert escaped == 'x\\"} or vector(1) or {a=\\"'
    metrics = MetricsSpec(listeners_query='sum(my_listeners{room="$room", ns="$namespace"})')
    query = room_query(metrics, "spaces", hostile)
    assert query == 'sum(my_listeners{room="' + escaped + '", ns="spaces"})'
    assert query.count('"') - query.count('\\"') == 4, "no quote escapes its literal"


def test_backslashes_and_newlines_are_escaped() -> None:
    assert escape_label_value("a\\b\nc") == "a\\\\b\\nc"


def test_batched_query_asks_for_everything_at_once() -> None:
    query = batched_query("contract")
    assert "sum by (namespace, room, pod) (audioroom_relay_listeners)" in query
    assert "timestamp(audioroom_relay_listeners)" in query
    assert "audioroom_edge_waiting_listeners" in query
    assert "livekit_participant_total" in batched_query("livekit")


def _series(kind: str, ns: str, room: str, value: str, pod: str | None = None) -> dict[str, Any]:
    labels = {"series": kind, "namespace": ns, "room": room}
    if pod:
        labels["pod"] = pod
    return {"metric": labels, "value": [100.0, value]}


ANSWER = [
    _series("listeners", "a", "r", "700", "r-relay-0"),
    _series("listeners", "a", "r", "650", "r-relay-1"),
    _series("sampled", "a", "r", "97", "r-relay-0"),
    _series("sampled", "a", "r", "99", "r-relay-1"),
    _series("waiting", "a", "r", "40"),
    _series("listeners", "b", "r", "NaN", "r-relay-0"),
    {"metric": {"pod": "stray"}, "value": [100.0, "5"]},
]


def test_parse_groups_series_by_room_and_drops_nan() -> None:
    rooms = parse_vector(ANSWER)
    assert set(rooms) == {("a", "r")}
    assert rooms[("a", "r")].total == 1350
    assert rooms[("a", "r")].oldest_sample == 97.0
    assert rooms[("a", "r")].waiting == 40


def test_room_metrics_by_relay_ordinal_and_staleness() -> None:
    reading = Reading(rooms=parse_vector(ANSWER))
    fresh = room_metrics(reading, ("a", "r"), NOW, timedelta(seconds=30))
    assert fresh.listeners == 1350
    assert dict(fresh.by_relay) == {0: 700, 1: 650}
    assert fresh.waiting == 40
    stale = room_metrics(reading, ("a", "r"), NOW + timedelta(minutes=5), timedelta(seconds=30))
    assert stale.listeners is None
    assert "old" in stale.problem
    missing = room_metrics(reading, ("a", "other"), NOW, timedelta(seconds=30))
    assert missing.listeners is None
    down = room_metrics(Reading(error="Prometheus unreachable"), ("a", "r"), NOW, timedelta(1))
    assert down.listeners is None and down.problem == "Prometheus unreachable"


NOW = datetime.fromtimestamp(100, tz=UTC)


def test_infinite_values_count_as_missing() -> None:
    rooms = parse_vector([_series("listeners", "a", "r", "+Inf", "r-relay-0")])
    assert rooms == {}


def test_a_reading_that_stopped_updating_counts_as_missing() -> None:
    fresh = room_metrics(Reading(rooms=parse_vector(ANSWER)), ("a", "r"), NOW, timedelta(30))
    assert aged(fresh, NOW + timedelta(seconds=10), timedelta(seconds=30)).listeners == 1350
    frozen = aged(fresh, NOW + timedelta(minutes=5), timedelta(seconds=30))
    assert frozen.listeners is None and "no listener reading" in frozen.problem


def test_a_room_may_only_name_a_prometheus_the_operator_trusts() -> None:
    default = "http://prometheus:9090"
    assert choose_prometheus(None, default, ()) == Source(default)
    assert choose_prometheus(default, default, ()) == Source(default)
    allowed = "http://tenant-prom:9090"
    assert choose_prometheus(allowed, default, [allowed]) == Source(allowed)
    refused = choose_prometheus("http://169.254.169.254/", default, [allowed])
    assert refused.url is None
    assert "is not allowed by the operator" in refused.refusal
    assert choose_prometheus(None, None, ()) == Source(None)


def test_a_relay_missing_from_the_reading_is_unknown_not_zero() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    long_ago, just_now = now - timedelta(minutes=5), now - timedelta(seconds=5)
    reading = Metrics(listeners=900, by_relay={0: 450, 1: 450}, sampled_at=now)
    grace = timedelta(seconds=60)
    partial = covering(reading, {0: long_ago, 1: long_ago, 2: long_ago}, now, grace)
    assert partial.listeners is None
    assert "2" in partial.problem and "1 of 3" in partial.problem
    # A relay Ready for seconds may not have been scraped yet: the reading stands.
    assert covering(reading, {0: long_ago, 1: long_ago, 2: just_now}, now, grace) == reading


def test_prometheus_slower_than_the_timeout_is_a_reading_without_data() -> None:
    """A listening socket that never answers: the read gives up after the timeout."""
    import socket

    from townsquare.metrics import PrometheusSource

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        source = PrometheusSource(f"http://127.0.0.1:{silent.getsockname()[1]}", 0.5)
        reading = source.read("contract")
        assert reading.error is not None and "did not answer within 0.5s" in reading.error


def test_a_room_with_waiting_joins_but_no_relay_series_keeps_its_waiting_count() -> None:
    from datetime import UTC, datetime, timedelta

    from townsquare.metrics import Reading, parse_vector, room_metrics

    rooms = parse_vector(
        [{"metric": {"namespace": "ns", "room": "r", "series": "waiting"}, "value": [1000.0, "42"]}]
    )
    now = datetime.fromtimestamp(1001, tz=UTC)
    metrics = room_metrics(Reading(rooms=rooms), ("ns", "r"), now, timedelta(seconds=60))
    assert metrics.listeners is None, "no relay series: connected listeners stay unknown"
    assert metrics.waiting == 42
    assert metrics.sampled_at == datetime.fromtimestamp(1000, tz=UTC)


def test_a_platform_s_named_query_is_batched_like_the_presets() -> None:
    from townsquare.metrics import PRESETS, batched_query

    janus = "sum by (namespace, room, pod) (janus_listeners)"
    query = batched_query("janus", {**PRESETS, "janus": janus})
    assert f"sum by (namespace, room, pod) ({janus})" in query
    assert "audioroom_edge_waiting_listeners" in query
