"""Rooms split across operator partitions: one partition per room, stable, near even; within
a partition, kopf's peering rule says which replica acts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from townsquare.partitions import Partition, may_act, partition_of, peering_allows

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)


@given(NAMES, NAMES, st.integers(min_value=1, max_value=16))
def test_exactly_one_partition_serves_each_room(namespace: str, room: str, count: int) -> None:
    serving = [i for i in range(count) if Partition(i, count).serves(namespace, room)]
    assert len(serving) == 1


def test_the_split_is_near_even() -> None:
    counts = Counter(partition_of("spaces", f"room-{i}", 4) for i in range(10_000))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) - min(counts.values()) < 0.06 * 2_500


def test_the_hash_is_the_same_in_another_process() -> None:
    """Python's own hash() is salted per process; every replica must agree."""
    code = "from townsquare.partitions import partition_of; print(partition_of('a', 'b', 97))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == partition_of("a", "b", 97)


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_bad_partitions_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ValueError, match="partition"):
        Partition.parse(text)


def test_parse() -> None:
    assert Partition.parse("1/3") == Partition(1, 3)


NOW = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)


def _peer(priority: int, seen_ago: float, lifetime: int = 30) -> dict[str, object]:
    lastseen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lifetime": lifetime, "lastseen": lastseen}


def test_the_highest_live_replica_acts_and_the_others_wait() -> None:
    peers = {"primary": _peer(100, 2), "standby": _peer(99, 1)}
    assert peering_allows(peers, "primary", 100, NOW)
    assert not peering_allows(peers, "standby", 99, NOW)


def test_a_replica_whose_keepalive_expired_no_longer_holds_the_others() -> None:
    peers = {"primary": _peer(100, 31), "standby": _peer(99, 1)}
    assert peering_allows(peers, "standby", 99, NOW)


def test_replicas_of_equal_priority_all_wait_as_kopf_makes_them() -> None:
    peers = {"a": _peer(100, 1), "b": _peer(100, 1)}
    assert not peering_allows(peers, "a", 100, NOW)
    assert not peering_allows(peers, "b", 100, NOW)


def test_a_replica_alone_or_among_removed_peers_acts() -> None:
    assert peering_allows({}, "alone", 0, NOW)
    assert peering_allows({"alone": _peer(0, 1), "gone": None}, "alone", 0, NOW)


def test_a_replica_taking_over_from_a_live_one_waits_until_it_lets_go() -> None:
    """A higher priority appeared: the standby that acted must finish its passes first."""
    peers = {"primary": _peer(100, 1), "standby": _peer(99, 1)}
    assert not may_act(peers, "standby", "primary", 100, NOW), "the standby still holds"
    assert may_act(peers, None, "primary", 100, NOW), "let go"
    assert may_act(peers, "primary", "primary", 100, NOW)
    assert not may_act(peers, None, "standby", 99, NOW), "kopf's rule still applies"


def test_a_holder_that_died_lets_go_when_its_lifetime_ends() -> None:
    peers = {"primary": _peer(100, 31), "standby": _peer(99, 1)}
    assert may_act(peers, "primary", "standby", 99, NOW)
    assert may_act({"standby": _peer(99, 1)}, "gone", "standby", 99, NOW)
