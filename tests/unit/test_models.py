"""The AudioRoom models: defaults, and every bad value refused with the field named."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from townsquare.api.manifest import ManifestError, parse_room
from townsquare.api.types import format_duration, parse_duration

VALID = """\
apiVersion: townsquare.dev/v1alpha1
kind: AudioRoom
metadata: {name: campaign-launch, namespace: spaces}
spec:
  startTime: 2026-12-01T23:00:00Z
  duration: 90m
  expectedAudience: 500000
  relay: {image: "registry.example/relay:1.4"}
"""


def _with(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new)


def test_defaults_fill_what_the_producer_left_out() -> None:
    room = parse_room(VALID)
    assert room.spec.relay.listeners_per_relay == 1000
    assert room.spec.scaling.target_utilization == 0.7
    assert room.spec.scaling.prewarm_lead is None
    assert room.spec.scaling.scale_down_stabilization == timedelta(minutes=10)
    assert room.spec.sharding.shards == 4096
    assert room.spec.duration == timedelta(minutes=90)
    assert room.spec.start_time.utcoffset() == timedelta(0)


def test_round_trip_keeps_the_wire_format() -> None:
    spec = parse_room(VALID).spec
    wire: dict[str, Any] = spec.model_dump(by_alias=True, mode="json")
    assert wire["startTime"] == "2026-12-01T23:00:00Z"
    assert wire["duration"] == "1h30m"
    assert wire["scaling"]["scaleDownStabilization"] == "10m"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("500000", "-5", "spec.expectedAudience: input should be greater than or equal to 0"),
        ("90m", "0s", "spec.duration: must be longer than zero"),
        ("90m", "1.5h", "spec.duration: must be a duration such as 90m"),
        ("2026-12-01T23:00:00Z", "2026-12-01 23:00", "spec.startTime: must be an RFC 3339 time"),
        ("2026-12-01T23:00:00Z", "2026-12-01T23:00:00", "spec.startTime: must be an RFC 3339"),
        ('{image: "registry.example/relay:1.4"}', "{}", "spec.relay.image: is required"),
        ("relay: {", "relay: {replicas: 3, ", "spec.relay.replicas: is not a known field"),
        (
            "relay: {",
            "scaling: {minRelays: 5, maxRelays: 3}\n  relay: {",
            "spec.scaling.minRelays: must not exceed maxRelays",
        ),
        (
            "relay: {",
            "scaling: {targetUtilization: 1.5}\n  relay: {",
            "spec.scaling.targetUtilization: input should be less than or equal to 1",
        ),
        (
            "relay: {",
            "scaling: {targetUtilization: 0}\n  relay: {",
            "spec.scaling.targetUtilization: input should be greater than 0",
        ),
        ("relay: {", "relay: {port: 9090, ", "spec.relay.metricsPort: must differ from port"),
        ("relay: {", "relay: {resources: {requests: {cpu: lots}}, ", "spec.relay.resources"),
        ("relay: {", "sharding: {fanout: 1}\n  relay: {", "spec.sharding.fanout"),
        ("name: campaign-launch", "name: " + "a" * 41, "metadata.name must be at most 40"),
        ("name: campaign-launch", "name: 9lives", "metadata.name must be at most 40"),
        ("kind: AudioRoom", "kind: Room", "kind: input should be 'AudioRoom'"),
    ],
)
def test_bad_values_are_refused_naming_the_field(old: str, new: str, expected: str) -> None:
    with pytest.raises(ManifestError) as refused:
        parse_room(_with(old, new))
    message = str(refused.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_unreadable_yaml_names_the_line() -> None:
    with pytest.raises(ManifestError, match="not valid YAML at line 3"):
        parse_room("a: 1\nb: 2\nc: d: e\n")


@pytest.mark.parametrize(
    ("text", "seconds"), [("90m", 5400), ("1h30m", 5400), ("45s", 45), ("2h", 7200)]
)
def test_durations_parse_and_print_back(text: str, seconds: int) -> None:
    parsed = parse_duration(text)
    assert parsed.total_seconds() == seconds
    assert parse_duration(format_duration(parsed)) == parsed
