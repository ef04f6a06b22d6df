"""Which operator partition serves a room: a stable hash of the room, so every replica of
every partition agrees without talking to the others. Pure."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    """This operator's share of the rooms: `index` of `count` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index}/{self.count}: need 0 <= index < count")

    @classmethod
    def parse(cls, text: str) -> Partition:
        """`INDEX/COUNT`, as `townsquare run --partition 1/4` takes it."""
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise ValueError(f"partition {text!r}: expected INDEX/COUNT, e.g. 0/2")
        return cls(int(index), int(count))

    def serves(self, namespace: str, room: str) -> bool:
        """True for exactly one partition of `count` for every room."""
        return partition_of(namespace, room, self.count) == self.index


def partition_of(namespace: str, room: str, count: int) -> int:
    """The partition of a room: the same in every process and Python version (no `hash()`,
    which is salted per process)."""
    digest = hashlib.blake2b(f"{namespace}/{room}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count
