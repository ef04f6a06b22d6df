"""Rooms split across operator partitions: one partition per room, stable, near even."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from townsquare.partitions import Partition, partition_of

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
