"""Which operator acts on a room: the partition that serves it, by a stable hash of the room
that every replica of every partition agrees on without talking to the others, and within
the partition the replica that kopf's peering lets act. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any


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
        return self.count == 1 or partition_of(namespace, room, self.count) == self.index


def partition_of(namespace: str, room: str, count: int) -> int:
    """The partition of a room: the same in every process and Python version (no `hash()`,
    which is salted per process)."""
    digest = hashlib.blake2b(f"{namespace}/{room}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def peering_allows(
    peers: Mapping[str, Mapping[str, Any] | None], identity: str, priority: int, now: datetime
) -> bool:
    """Whether this replica may act, by kopf's peering rule: no other live replica in the
    peering object (`status`: identity -> priority, lifetime, lastseen) has a priority as
    high as ours. Replicas of equal priority all wait, as kopf makes them."""
    for other, peer in peers.items():
        if other == identity or not peer:
            continue
        if _alive(peer, now) and int(peer.get("priority", 0)) >= priority:
            return False
    return True


def may_act(
    peers: Mapping[str, Mapping[str, Any] | None],
    holder: str | None,
    identity: str,
    priority: int,
    now: datetime,
) -> bool:
    """Whether this replica may start passes: kopf's rule lets it, and no other live replica
    still holds the rooms. A replica that kopf's rule pauses (a higher priority appeared)
    finishes the passes it has in flight before it lets go, so two replicas never act at
    once; one that died lets go when its lifetime ends."""
    if not peering_allows(peers, identity, priority, now):
        return False
    if not holder or holder == identity:
        return True
    return not _alive(peers.get(holder), now)


def _alive(peer: Mapping[str, Any] | None, now: datetime) -> bool:
    if not peer:
        return False
    seen = peer.get("lastseen")
    lastseen = datetime.fromisoformat(str(seen)) if seen else now
    if lastseen.tzinfo is None:
        lastseen = lastseen.replace(tzinfo=UTC)
    return lastseen + timedelta(seconds=int(peer.get("lifetime", 60))) > now
