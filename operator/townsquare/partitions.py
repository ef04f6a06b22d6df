"""Which operator acts on a room: the partition that serves it, by a stable hash of the room
that every replica of every partition agrees on without talking to the others, and within
the partition the replica that kopf's peering lets act. Pure.

A room's hash falls in one of `SLOTS` slots, written on the room as the `SLOT_LABEL` label;
partition i of K serves a contiguous range of slots. The label does not depend on K, so
changing the number of partitions relabels nothing, and each partition asks the API server
for its own rooms only (a label selector), instead of receiving and dropping the others'."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

SLOTS = 256
"""Hash slots: enough for an even split over any partition count up to a few dozen."""
SLOT_LABEL = "townsquare.dev/slot"
"""On a room: its hash slot, set by the partition that serves it (see `slot_of`)."""


@dataclass(frozen=True)
class Partition:
    """This operator's share of the rooms: `index` of `count` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"partition {self.index}/{self.count}: need 0 <= index < count")
        if self.count > SLOTS:
            raise ValueError(f"partition {self.index}/{self.count}: at most {SLOTS} partitions")

    @classmethod
    def parse(cls, text: str) -> Partition:
        """`INDEX/COUNT`, as `townsquare run --partition 1/4` takes it."""
        index, sep, count = text.partition("/")
        if not sep or not index.isdigit() or not count.isdigit():
            raise ValueError(f"partition {text!r}: expected INDEX/COUNT, e.g. 0/2")
        return cls(int(index), int(count))

    @property
    def slots(self) -> range:
        """The slots this partition serves: a contiguous share, so going from K to K+1
        partitions moves about half the rooms, not K/(K+1) of them as a modulo would."""
        return range(
            -(-self.index * SLOTS // self.count), -(-(self.index + 1) * SLOTS // self.count)
        )

    @property
    def name(self) -> str:
        """As `--partition` takes it, and as /metrics and Events name it: `INDEX/COUNT`."""
        return f"{self.index}/{self.count}"

    def serves(self, namespace: str, room: str) -> bool:
        """True for exactly one partition of `count` for every room."""
        return self.count == 1 or slot_of(namespace, room) in self.slots

    def serves_labelled(self, labels: Mapping[str, str]) -> bool:
        """Whether the room with these labels is ours: by its slot label, the one thing the
        API server can filter on (one partition of K: every room, labelled or not)."""
        if self.count == 1:
            return True
        slot = labelled_slot(labels)
        return slot is not None and slot in self.slots

    def label_selector(self) -> str | None:
        """The API server's filter for this partition's rooms (None: every room)."""
        if self.count == 1:
            return None
        return f"{SLOT_LABEL} in ({','.join(str(slot) for slot in self.slots)})"


def unlabelled_selector() -> str:
    """Rooms with no valid slot label (new ones, or one edited by hand): the API server's
    filter for the rooms a partition must label before it can see them."""
    return f"{SLOT_LABEL} notin ({','.join(str(slot) for slot in range(SLOTS))})"


def slot_of(namespace: str, room: str) -> int:
    """The slot of a room: the same in every process and Python version (no `hash()`,
    which is salted per process)."""
    digest = hashlib.blake2b(f"{namespace}/{room}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SLOTS


def labelled_slot(labels: Mapping[str, str]) -> int | None:
    """The slot a room's label names (None: none, or not a slot)."""
    value = labels.get(SLOT_LABEL, "")
    return int(value) if value.isdigit() and int(value) < SLOTS else None


def partition_of(namespace: str, room: str, count: int) -> int:
    """The partition of `count` that serves a room."""
    return slot_of(namespace, room) * count // SLOTS


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


@dataclass(frozen=True)
class Claim:
    """The slots one replica acts on, as it wrote them in the claims table. `renewed` is
    the writer's wall clock, for people reading the table (`kubectl get cm -o yaml`); no
    replica decides by it (see `Sighting`)."""

    slots: frozenset[int]
    renewed: datetime
    lifetime: timedelta

    def encode(self) -> str:
        return json.dumps(
            {
                "slots": _ranges(self.slots),
                "renewed": self.renewed.isoformat(),
                "lifetime": self.lifetime.total_seconds(),
            },
            separators=(",", ":"),
        )

    @staticmethod
    def decode(text: str) -> Claim | None:
        """A claim as stored (None: unreadable, which claims nothing)."""
        try:
            data = json.loads(text)
            renewed = datetime.fromisoformat(data["renewed"])
            slots = frozenset(s for start, stop in data["slots"] for s in range(start, stop))
            lifetime = timedelta(seconds=float(data["lifetime"]))
        except (ValueError, KeyError, TypeError):
            return None
        if renewed.tzinfo is None:
            renewed = renewed.replace(tzinfo=UTC)
        return Claim(slots, renewed, lifetime)


def read_claims(data: Mapping[str, str]) -> dict[str, Claim]:
    """The claims table's entries (replica -> claim) as stored; an unreadable one claims
    nothing."""
    claims = {identity: Claim.decode(text) for identity, text in data.items()}
    return {identity: claim for identity, claim in claims.items() if claim is not None}


@dataclass(frozen=True)
class Sighting:
    """Another replica's claim, and when this replica first read it as it stands now, by
    this replica's own lease clock (see `Lease`).

    Why not the claim's own stamp: clocks of two machines differ, and a clock can be
    stepped (NTP, a VM resumed). A claim judged by its writer's wall-clock stamp against
    the reader's wall clock lives `lifetime` plus or minus the skew between them, so a
    skew of half a lifetime would let two replicas act at once. Judged from the moment the
    reader first saw it (as Kubernetes' leader election judges a Lease), a claim lives at
    least `lifetime` after its writer wrote it, whatever either wall clock says: the reader
    can only see a write after it happened. Only the rate of the clocks matters (parts per
    million). A replica that starts fresh therefore waits a whole lifetime for a claim it
    finds, even one whose writer died long ago: safe, and at most one lifetime late."""

    claim: Claim
    first_seen: float

    def alive(self, now: float) -> bool:
        return now < self.first_seen + self.claim.lifetime.total_seconds()


def sightings(
    previous: Mapping[str, Sighting], claims: Mapping[str, Claim], now: float
) -> dict[str, Sighting]:
    """The table's claims as just read (at `now`, lease clock, taken after the read returned),
    each with when it was first seen as it stands: a claim renewed since (a new stamp, new
    slots) is seen anew, one unchanged keeps its first sighting."""
    seen: dict[str, Sighting] = {}
    for identity, claim in claims.items():
        earlier = previous.get(identity)
        seen[identity] = earlier if earlier and earlier.claim == claim else Sighting(claim, now)
    return seen


def live_claims(seen: Mapping[str, Sighting], now: float) -> dict[str, Claim]:
    """The claims that may still be acted on by their writers, as far as this reader knows."""
    return {identity: sighting.claim for identity, sighting in seen.items() if sighting.alive(now)}


def free_slots(live: Mapping[str, Claim], identity: str, wanted: Iterable[int]) -> frozenset[int]:
    """The slots this replica may claim: those it wants that no other live claim holds.

    Every replica, of every partition count, claims its slots in one table before it acts
    on their rooms, and a write to the table succeeds only on the version it read. So while
    the number of partitions changes (old and new replicas alive at once, their slots
    overlapping), each slot has one actor: a new replica takes a slot when the old one let
    go of it (after its passes in flight) or stopped renewing it for a lifetime."""
    taken: set[int] = set()
    for other, claim in live.items():
        if other != identity:
            taken |= claim.slots
    return frozenset(wanted) - taken


UNKNOWN = "(unknown: the claims table was deleted or replaced)"
"""The holder, in a replica's own sightings, of every slot it cannot know about after the
claims table vanished: never a table entry (a ConfigMap key cannot have spaces)."""


@dataclass(frozen=True)
class ClaimsTable:
    """The claims table as read: `uid` names this incarnation of the ConfigMap (None: there
    is none), `version` is what a write must be based on (None: create it)."""

    claims: Mapping[str, Claim]
    version: str | None = None
    uid: str | None = None


@dataclass(frozen=True)
class ClaimsMemory:
    """What a replica carries from one claims round to the next."""

    seen: Mapping[str, Sighting] = field(default_factory=dict)
    """Other replicas' claims, with when this replica first read each as it stands (and
    `UNKNOWN`'s, after the table vanished)."""
    table: str | None = None
    """The uid of the table's incarnation last read or written (None: none seen yet)."""


@dataclass(frozen=True)
class ClaimWrite:
    """One write to the table, based on the version read: this replica's entry (None:
    remove it) and the entries of replicas gone that it drops."""

    claim: Claim | None
    expired: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClaimsDecision:
    """What one claims round does. In this order: stop acting (`let_go`), send `write`,
    and once it landed act on `lease` (None: the lease stands as it is)."""

    memory: ClaimsMemory
    write: ClaimWrite | None = None
    lease: Lease | None = None
    kept: frozenset[int] = frozenset()
    """Slots of `lease` nobody else can have acted on since this replica last did (its
    entry stood as it wrote it, or its lease still held): their rooms are not read afresh."""
    let_go: bool = False
    renewed: float | None = None
    """When the claim standing after this round was written (None: none is)."""


def decide_claims(
    me: str,
    share: Iterable[int],
    lifetime: timedelta,
    table: ClaimsTable,
    memory: ClaimsMemory,
    written: Claim | None,
    lease: Lease,
    renewed: float | None,
    *,
    paused: bool,
    in_flight: bool,
    now: float,
    stamp: datetime,
) -> ClaimsDecision:
    """One claims round of replica `me`, from the table just read at `now` (lease clock,
    taken after the read returned): which slots it claims, whether the claim is written
    (renewed every quarter of a lifetime), which dead entries go, and what it acts on.

    `share`: its partition's slots; `written`/`renewed`: its last claim written, and when;
    `lease`: what it acts on now; `paused`: another replica of its partition acts (kopf's
    peering), `in_flight`: passes still run. A paused replica keeps only the slots its
    passes in flight need, and lets go once none runs: it stops acting before it publishes
    that (a replica taking the slots over may act the moment it reads the release).

    A table that vanished, or was replaced, since this replica last read it (a new uid)
    leaves every slot unknown for a lifetime, except those this replica's lease still
    holds (nobody can have taken them: see `Sighting`): whoever acted on the others may
    still act, and its entry is gone. `stamp` (wall clock) is for people reading the table;
    it only has to differ from the entry it replaces."""
    others = {identity: claim for identity, claim in table.claims.items() if identity != me}
    seen = sightings(memory.seen, others, now)
    unknown = memory.seen.get(UNKNOWN)
    if memory.table is not None and table.uid != memory.table:
        held = lease.slots if lease.valid(now) else frozenset()
        unknown = Sighting(Claim(frozenset(range(SLOTS)) - held, stamp, lifetime), now)
    if unknown is not None and unknown.alive(now):
        seen[UNKNOWN] = unknown
    # A table still missing leaves `memory.table` as it was: a table created meanwhile by
    # another replica and deleted again would be unknown to this one, so each round that
    # finds it missing or replaced marks every slot unknown anew.
    memory = ClaimsMemory(seen, table.uid if table.uid is not None else memory.table)
    own = table.claims.get(me)
    if paused and not in_flight:
        return ClaimsDecision(memory, ClaimWrite(None) if own else None, let_go=True)
    live = live_claims(seen, now)
    wanted = free_slots(live, me, lease.slots if paused else share)
    due = renewed is None or now - renewed >= lifetime.total_seconds() / 4
    if not due and own and own.slots == wanted and lease.valid(now):
        return ClaimsDecision(memory, renewed=renewed)
    # Nobody can have acted on our slots since our last write while our entry stands as we
    # wrote it: a replica takes slots only from a claim it takes for dead, and drops that
    # claim's entry in the same write (`expired`). So after a lapse (an API outage longer
    # than half a lifetime) the rooms are not all read afresh; only when the entry went.
    # Nor while the lease still holds (the table deleted: the entry went, nobody acted).
    kept = written.slots if written and own == written else frozenset()
    kept |= lease.slots if lease.valid(now) else frozenset()
    # Only the dead entries whose slots this write takes (or that claim none): another
    # partition's entry that merely looks dead after an outage must stand as its writer
    # wrote it, or that replica reads all its rooms afresh for nothing (see `kept`).
    expired = tuple(
        identity
        for identity, other in others.items()
        if identity not in live and (other.slots & wanted or not other.slots)
    )
    if own is not None and stamp <= own.renewed:
        # Readers see a renewal only as an entry that changed: a wall clock stepped back
        # (or too coarse) must not write the same entry again, which reads as no renewal.
        stamp = own.renewed + timedelta(microseconds=1)
    claim = Claim(wanted, stamp, lifetime)
    return ClaimsDecision(
        memory,
        ClaimWrite(claim, expired),
        Lease.after_write(wanted, now, lifetime),
        kept,
        renewed=now,
    )


@dataclass(frozen=True)
class ShortSpell:
    """A spell in which a replica meant to act acts on less than its partition's share:
    `since` when (lease clock; None: no spell), and whether it was warned of (once)."""

    since: float | None = None
    warned: bool = False


@dataclass(frozen=True)
class ClaimsReport:
    """What a replica says of its claiming after a round: the slots it acts on (for
    /metrics), its spell, and an Event to post on the claims table (kind, reason, message)."""

    acting: frozenset[int]
    spell: ShortSpell
    event: tuple[str, str, str] | None = None


def report_claims(
    me: str,
    partition: Partition,
    lease: Lease,
    seen: Mapping[str, Sighting],
    spell: ShortSpell,
    *,
    paused: bool,
    error: str,
    lifetime: timedelta,
    now: float,
) -> ClaimsReport:
    """Once a replica meant to act has acted on less than its share for two lifetimes, a
    Warning naming who holds the rest, or why its own claim fails (`error`); a Normal one
    when it acts on all of them again. A paused replica is not meant to act (another of
    its partition does): no spell, and it never says that it acts."""
    share = frozenset(partition.slots)
    acting = lease.slots if lease.valid(now) else frozenset()
    if paused:
        return ClaimsReport(acting, ShortSpell())
    if acting >= share:
        if not spell.warned:
            return ClaimsReport(acting, ShortSpell())
        message = f"replica {me} acts on all {len(share)} slots of partition {partition.name} again"
        return ClaimsReport(acting, ShortSpell(), ("Normal", "SlotsClaimed", message))
    since = now if spell.since is None else spell.since
    if spell.warned or now - since < 2 * lifetime.total_seconds():
        return ClaimsReport(acting, ShortSpell(since, spell.warned))
    missing = share - acting
    live = live_claims(seen, now)
    holders = sorted(identity for identity, claim in live.items() if claim.slots & missing)
    if UNKNOWN in holders:
        why = "unknown to it since the claims table was deleted or replaced, for a lifetime"
    elif holders:
        why = f"held by {', '.join(holders)}, whose rooms wait until it lets go of them"
    else:
        why = f"nobody acts on their rooms: its claim fails ({error or 'no answer'})"
    message = (
        f"replica {me} of partition {partition.name} has acted on {len(acting)} of its "
        f"{len(share)} slots for {now - since:.0f}s; the other {len(missing)} are {why}"
    )
    return ClaimsReport(acting, ShortSpell(since, True), ("Warning", "SlotsUnclaimed", message))


class ClaimLapsedError(Exception):
    """A pass's write refused: this replica's claim on the room's slot lapsed (or moved)."""


@dataclass(frozen=True)
class Lease:
    """What this replica may act on: `slots`, until `until` on its own lease clock: the
    time since boot, suspend included (CLOCK_BOOTTIME). Not CLOCK_MONOTONIC, which stops
    while the machine is suspended: a replica resumed after a suspend longer than its
    lease would take its lease for still valid while others took its slots.

    A claim written at lease-clock time t (taken before the write was sent, so no later than
    the API server stored it) is acted on until t + lifetime/2, and never by the wall clock:
    a clock stepped back cannot extend it. Every other replica takes the claim for alive
    until at least t + lifetime (see `Sighting`), so the half lifetime in between is for
    writes in flight. Each write of a pass checks the lease just before it is sent (the
    operator's fence), and a write takes at most the client's request timeout (connect
    5 s + read 10 s = 15 s): a write sent before t + lifetime/2 lands before anyone else may
    act as long as that timeout is at most half a lifetime (30 s lifetimes: 15 s)."""

    slots: frozenset[int] = frozenset()
    until: float = float("-inf")

    @staticmethod
    def after_write(slots: frozenset[int], written_at: float, lifetime: timedelta) -> Lease:
        return Lease(slots, written_at + lifetime.total_seconds() / 2)

    def valid(self, now: float) -> bool:
        return now < self.until

    def holds(self, slot: int, now: float) -> bool:
        return slot in self.slots and self.valid(now)


def _ranges(slots: Iterable[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for slot in sorted(slots):
        if ranges and ranges[-1][1] == slot:
            ranges[-1][1] = slot + 1
        else:
            ranges.append([slot, slot + 1])
    return ranges
