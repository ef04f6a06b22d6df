"""PromQL built for rooms: escaped labels, batched grouping, and parsing of the answer."""

from __future__ import annotations

from townsquare.api.models import MetricsSpec
from townsquare.metrics import batched_query, escape_label_value, parse_vector, room_query


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


def test_batched_query_groups_by_room_and_pod() -> None:
    assert batched_query("contract") == (
        "sum by (namespace, room, pod) (audioroom_relay_listeners)"
    )
    assert "livekit_participant_total" in batched_query("livekit")


def test_parse_groups_series_by_room_and_drops_nan() -> None:
    vector = [
        {"metric": {"namespace": "a", "room": "r", "pod": "r-relay-0"}, "value": [100.0, "700"]},
        {"metric": {"namespace": "a", "room": "r", "pod": "r-relay-1"}, "value": [100.0, "650"]},
        {"metric": {"namespace": "b", "room": "r", "pod": "r-relay-0"}, "value": [100.0, "NaN"]},
        {"metric": {"pod": "stray"}, "value": [100.0, "5"]},
    ]
    stamps = {("a", "r", "r-relay-0"): 97.0, ("a", "r", "r-relay-1"): 99.0}
    rooms = parse_vector(vector, stamps)
    assert set(rooms) == {("a", "r")}
    assert rooms[("a", "r")].total == 1350
    assert rooms[("a", "r")].newest_sample == 99.0
