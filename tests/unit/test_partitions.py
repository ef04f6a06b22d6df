"""Rooms split across operator partitions: one partition per room, stable, near even; within
a partition, kopf's peering rule says which replica acts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from townsquare.partitions import (
    SLOT_LABEL,
    SLOTS,
    UNKNOWN,
    Claim,
    ClaimsDecision,
    ClaimsMemory,
    ClaimsTable,
    ClaimWrite,
    Lease,
    Partition,
    ShortSpell,
    Sighting,
    decide_claims,
    free_slots,
    labelled_slot,
    live_claims,
    may_act,
    partition_of,
    peering_allows,
    report_claims,
    sightings,
    slot_of,
    unlabelled_selector,
)

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=40)


@given(NAMES, NAMES, st.integers(min_value=1, max_value=16))
def test_exactly_one_partition_serves_each_room(namespace: str, room: str, count: int) -> None:
    serving = [i for i in range(count) if Partition(i, count).serves(namespace, room)]
    assert len(serving) == 1


def test_the_split_is_near_even() -> None:
    counts = Counter(partition_of("spaces", f"room-{i}", 4) for i in range(10_000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(n - 2_500) < 0.05 * 2_500 for n in counts.values()), counts


@given(st.integers(min_value=1, max_value=64))
def test_the_partitions_share_the_slots_in_contiguous_ranges(count: int) -> None:
    ranges = [Partition(i, count).slots for i in range(count)]
    assert [slot for share in ranges for slot in share] == list(range(SLOTS))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_one_more_partition_moves_about_half_the_rooms_not_most() -> None:
    """A modulo split would move 2/3 of the rooms from 2 to 3 partitions."""
    names = [f"room-{i}" for i in range(5_000)]
    moved = sum(partition_of("spaces", n, 2) != partition_of("spaces", n, 3) for n in names)
    assert 0.4 < moved / len(names) < 0.55


def test_a_partition_asks_the_api_server_for_its_slots_only() -> None:
    selector = Partition(1, 3).label_selector()
    assert selector == f"{SLOT_LABEL} in ({','.join(map(str, range(86, 171)))})"
    assert Partition().label_selector() is None  # one partition: every room, labelled or not
    assert unlabelled_selector().startswith(f"{SLOT_LABEL} notin (0,1,2,")


@given(NAMES, NAMES, st.integers(min_value=2, max_value=16))
def test_the_label_a_room_gets_decides_the_same_partition_as_its_hash(
    namespace: str, room: str, count: int
) -> None:
    labels = {SLOT_LABEL: str(slot_of(namespace, room))}
    for index in range(count):
        partition = Partition(index, count)
        assert partition.serves_labelled(labels) == partition.serves(namespace, room)


@pytest.mark.parametrize("value", [None, "", "256", "-1", "x"])
def test_a_room_without_a_valid_slot_label_is_nobodys_until_labelled(value: str | None) -> None:
    labels = {} if value is None else {SLOT_LABEL: value}
    assert labelled_slot(labels) is None
    assert not any(Partition(i, 2).serves_labelled(labels) for i in range(2))
    assert Partition().serves_labelled(labels)


def test_the_hash_is_the_same_in_another_process() -> None:
    """Python's own hash() is salted per process; every replica must agree."""
    code = "from townsquare.partitions import partition_of; print(partition_of('a', 'b', 97))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == partition_of("a", "b", 97)


@pytest.mark.parametrize(
    ("namespace", "room", "slot"),
    [
        ("spaces", "campaign-launch", 78),
        ("default", "a", 176),
        ("tenant-7", "room-0", 237),
        ("spaces", "room-41", 3),
        ("x", "y", 187),
    ],
)
def test_the_slot_formula_is_pinned(namespace: str, room: str, slot: int) -> None:
    """A changed formula would move nearly every room to another partition on upgrade
    (relabelled, re-planned, its claims handed over): it must fail here first. Expected
    values from coreutils, not from this code: the last byte of
    `printf %s NAMESPACE/ROOM | b2sum -l 64` (blake2b, 8-byte digest, big-endian, mod 256)."""
    assert slot_of(namespace, room) == slot


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0", "0/257"])
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


LIFETIME = timedelta(seconds=30)


def test_a_claim_reads_back_as_written() -> None:
    claim = Claim(frozenset({*range(0, 86), 200}), NOW, LIFETIME)
    assert Claim.decode(claim.encode()) == claim
    assert Claim.decode("{not json") is None
    assert Claim.decode('{"slots": [[0, 4]]}') is None


def test_slots_claimed_by_another_live_replica_are_not_free() -> None:
    old = Claim(frozenset(range(0, 128)), NOW, LIFETIME)
    dead = Claim(frozenset(range(128, 256)), NOW, LIFETIME)
    seen = {"old": Sighting(old, 1000.0 - 5), "dead": Sighting(dead, 1000.0 - 31)}
    live = live_claims(seen, 1000.0)
    assert set(live) == {"old"}
    assert free_slots(live, "new", range(86, 171)) == frozenset(range(128, 171))
    assert free_slots(live, "old", range(0, 86)) == frozenset(range(0, 86))


@pytest.mark.parametrize("skew", [timedelta(0), timedelta(hours=1), timedelta(hours=-1)])
def test_a_claim_lives_a_lifetime_from_when_it_was_first_seen_whatever_its_stamp(
    skew: timedelta,
) -> None:
    """The writer's clock may be an hour off (or stepped since): its stamp decides nothing."""
    claim = Claim(frozenset({1}), NOW + skew, LIFETIME)
    seen = sightings({}, {"other": claim}, 500.0)
    seen = sightings(seen, {"other": claim}, 520.0)  # read again, unchanged
    assert set(live_claims(seen, 529.9)) == {"other"}
    assert live_claims(seen, 530.0) == {}


def test_a_renewed_claim_is_seen_anew() -> None:
    first = Claim(frozenset({1}), NOW, LIFETIME)
    renewed = Claim(frozenset({1}), NOW + timedelta(seconds=7), LIFETIME)
    seen = sightings({}, {"other": first}, 500.0)
    seen = sightings(seen, {"other": renewed}, 520.0)
    assert set(live_claims(seen, 545.0)) == {"other"}
    assert sightings(seen, {}, 521.0) == {}, "a claim let go is forgotten"


def test_a_replica_acts_half_a_lifetime_after_it_began_writing_its_claim_by_its_own_clock() -> None:
    lease = Lease.after_write(frozenset({3, 4}), 1000.0, LIFETIME)
    assert lease.holds(3, 1014.9) and not lease.holds(5, 1014.9)
    assert not lease.valid(1015.0) and not lease.holds(3, 1015.0)
    assert not Lease().valid(0.0)


class VersionedTable:
    """The claims table as the API server keeps it: a write succeeds only on the version
    read."""

    def __init__(self) -> None:
        self.version = 0
        self.claims: dict[str, Claim] = {}

    def read(self) -> tuple[int, dict[str, Claim]]:
        return self.version, dict(self.claims)

    def write(self, version: int, identity: str, claim: Claim | None) -> bool:
        if version != self.version:
            return False  # 409: read again
        self.version += 1
        if claim is None:
            self.claims.pop(identity, None)
        else:
            self.claims[identity] = claim
        return True


@settings(max_examples=400)
@example(  # a replica cut off from the table for a lifetime, seen by another just before
    1, 2, [(2, "read"), (2, "write"), (0, "read"), (1, "wait"), (1, "wait"), (0, "write")],
    set(), [0] * 10,
)  # fmt: skip
@given(
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=5),
    st.lists(
        st.tuples(st.integers(0, 9), st.sampled_from(["read", "write", "stop", "wait"])),
        max_size=80,
    ),
    st.sets(st.integers(0, 4)),
    st.lists(st.integers(-3600, 3600), min_size=10, max_size=10),
)
def test_while_the_partition_count_changes_no_slot_has_two_actors_and_none_is_orphaned(
    old_count: int,
    new_count: int,
    steps: list[tuple[int, str]],
    killed: set[int],
    skews: list[int],
) -> None:
    """Replicas of K and K' partitions alive at once, reading and writing the table in any
    order, their wall clocks up to an hour apart; the old ones stop (gracefully: they let
    go; or killed: their claims expire). The verdict is on what each replica acts on (its
    lease, by its own clock), not on the table: at no moment do two replicas act on one
    slot; at the end the new replicas act on all."""
    table = VersionedTable()
    replicas = {f"old-{i}": Partition(i, old_count) for i in range(old_count)}
    replicas |= {f"new-{i}": Partition(i, new_count) for i in range(new_count)}
    names = sorted(replicas)
    wall = {name: timedelta(seconds=skews[i]) for i, name in enumerate(names)}
    read: dict[str, tuple[int, dict[str, Claim]]] = {}
    seen: dict[str, dict[str, Sighting]] = {name: {} for name in names}
    leases = {name: Lease() for name in names}
    stopped: set[str] = set()
    now = 1000.0

    def claim_step(name: str) -> None:
        if name in stopped:
            return
        if name not in read:
            read[name] = table.read()
            others = {k: c for k, c in read[name][1].items() if k != name}
            seen[name] = sightings(seen[name], others, now)
            return
        version, _ = read.pop(name)
        wanted = free_slots(live_claims(seen[name], now), name, replicas[name].slots)
        stamp = NOW + timedelta(seconds=now) + wall[name]
        if table.write(version, name, Claim(wanted, stamp, LIFETIME)):
            leases[name] = Lease.after_write(wanted, now, LIFETIME)

    def acting_twice() -> set[int]:
        acting = [
            lease.slots for n, lease in leases.items() if n not in stopped and lease.valid(now)
        ]
        return {s for i, a in enumerate(acting) for b in acting[i + 1 :] for s in a & b}

    for who, action in steps:
        name = names[who % len(names)]
        now += 1.0
        if action == "wait":  # half a lifetime without a step: a replica cut off renews not
            now += LIFETIME.total_seconds() / 2
        elif action == "stop" and name.startswith("old"):
            stopped.add(name)
            if int(name.split("-")[1]) not in killed:  # graceful: let go of its slots
                while not table.write(table.version, name, None):
                    pass
        else:
            claim_step(name)
        assert not acting_twice()
    # The old replicas are gone; the killed ones' claims expire a lifetime after each new
    # replica has seen them.
    stopped |= {n for n in names if n.startswith("old")}
    read.clear()
    for name in names:
        claim_step(name)  # each new replica reads the table
    now += LIFETIME.total_seconds()
    read.clear()
    for name in names:
        claim_step(name)  # then reads and writes at once
        claim_step(name)
        assert not acting_twice()
    acting = [
        lease.slots for n, lease in leases.items() if n.startswith("new") and lease.valid(now)
    ]
    assert sorted(s for slots in acting for s in slots) == list(range(SLOTS))


# The claims round, decided by `decide_claims` from the table as read and what the replica
# knew before; `ROUND` is one round's arguments at lease-clock time 1000 s.

SHARE = frozenset(range(128))
ROUND: dict[str, Any] = {
    "me": "me",
    "share": SHARE,
    "lifetime": LIFETIME,
    "table": ClaimsTable({}),
    "memory": ClaimsMemory(),
    "written": None,
    "lease": Lease(),
    "renewed": None,
    "paused": False,
    "in_flight": False,
    "now": 1000.0,
    "stamp": NOW,
}


def _claim(slots: Iterable[int]) -> Claim:
    return Claim(frozenset(slots), NOW, LIFETIME)


def _round(**changes: Any) -> ClaimsDecision:
    return decide_claims(**(ROUND | changes))


MINE = _claim(SHARE)
"""This replica's claim as it wrote it at 990 s: its lease runs until 1005 s."""
HOLDING: dict[str, Any] = {
    "table": ClaimsTable({"me": MINE}, "7", "uid-1"),
    "memory": ClaimsMemory({}, "uid-1"),
    "written": MINE,
    "lease": Lease.after_write(SHARE, 990.0, LIFETIME),
    "renewed": 990.0,
}


@pytest.mark.parametrize(
    ("case", "changes", "writes", "acts_on", "kept"),
    [
        ("a first round on no table: claims its share", {}, SHARE, SHARE, frozenset()),
        (
            "another live replica's slots wait",
            {"table": ClaimsTable({"old": _claim(range(64, 256))}, "3", "uid-1")},
            frozenset(range(64)),
            frozenset(range(64)),
            frozenset(),
        ),
        ("renewal not due: nothing written", HOLDING | {"now": 997.0}, None, None, None),
        ("a quarter lifetime since: renewed", HOLDING, SHARE, SHARE, SHARE),
        (
            "its lease lapsed and its entry went (taken meanwhile): every room read afresh",
            HOLDING | {"table": ClaimsTable({}, "9", "uid-1"), "lease": Lease(SHARE, 995.0)},
            SHARE,
            SHARE,
            frozenset(),
        ),
        (
            "paused with passes in flight: keeps what they act on",
            HOLDING | {"paused": True, "in_flight": True, "lease": Lease(frozenset({5}), 1005.0)},
            frozenset({5}),
            frozenset({5}),
            SHARE,
        ),
        (
            "the lease lapsed but its entry stood as written: nothing read afresh",
            HOLDING | {"lease": Lease.after_write(SHARE, 980.0, LIFETIME), "now": 1000.0},
            SHARE,
            SHARE,
            SHARE,
        ),
    ],
)
def test_a_claims_round_decides_what_to_write_and_act_on(
    case: str,
    changes: dict[str, Any],
    writes: frozenset[int] | None,
    acts_on: frozenset[int] | None,
    kept: frozenset[int] | None,
) -> None:
    decision = _round(**changes)
    assert not decision.let_go, case
    if writes is None:
        assert decision.write is None and decision.lease is None, case
        assert decision.renewed == changes["renewed"], "the claim written stands"
        return
    assert decision.write is not None and decision.write.claim is not None, case
    assert decision.write.claim.slots == writes, case
    assert decision.lease == Lease(acts_on or frozenset(), 1000.0 + LIFETIME.total_seconds() / 2)
    assert decision.kept == kept, case
    assert decision.renewed == 1000.0


def test_a_round_drops_only_the_dead_entries_whose_slots_it_takes_or_that_claim_none() -> None:
    """Dead: unchanged for a lifetime since this replica first read it. Another partition's
    entry that merely looks dead (an outage) stands as its writer wrote it."""
    dead_here, dead_elsewhere, dead_empty = _claim(range(64)), _claim(range(200, 256)), _claim(())
    alive = _claim(range(100, 128))
    claims = {"a": dead_here, "b": dead_elsewhere, "c": dead_empty, "d": alive}
    seen = {name: Sighting(claim, 960.0) for name, claim in claims.items() if name != "d"}
    seen["d"] = Sighting(alive, 990.0)
    decision = _round(table=ClaimsTable(claims, "5", "u"), memory=ClaimsMemory(seen, "u"))
    assert decision.write == ClaimWrite(_claim(range(100)), ("a", "c"))


def test_a_paused_replica_with_no_pass_in_flight_lets_go_and_stops_acting_first() -> None:
    decision = _round(**HOLDING | {"paused": True})
    assert decision.let_go and decision.write == ClaimWrite(None)
    assert decision.lease is None and decision.renewed is None
    nothing_held = _round(paused=True, table=ClaimsTable({}, "5", "u"))
    assert nothing_held.let_go and nothing_held.write is None, "no entry: nothing to remove"


@pytest.mark.parametrize("table", [ClaimsTable({}), ClaimsTable({}, "40", "uid-2")])
def test_a_table_deleted_or_replaced_leaves_every_slot_unknown_for_a_lifetime_but_the_held(
    table: ClaimsTable,
) -> None:
    """Whoever acted on a slot may still act on it, and its entry is gone: this replica
    claims again only what its own lease still holds, and the rest of its share a lifetime
    after it noticed, whatever it reads meanwhile."""
    holding = HOLDING | {"lease": Lease(frozenset(range(32)), 1005.0)}
    seen_before = {"other": Sighting(_claim(range(128, 256)), 995.0)}
    noticed = _round(**holding | {"table": table, "memory": ClaimsMemory(seen_before, "uid-1")})
    assert noticed.write is not None and noticed.write.claim is not None
    assert noticed.write.claim.slots == frozenset(range(32))
    assert noticed.lease is not None and noticed.lease.slots == frozenset(range(32))
    assert noticed.kept == frozenset(range(32)), "held all along: its rooms not read afresh"
    memory = replace(noticed.memory, table="uid-3")  # its create (or write) landed
    mine = ClaimsTable({"me": noticed.write.claim}, "41", "uid-3")
    lease = noticed.lease
    for now, acts_on in [(1020.0, range(32)), (1029.9, range(32)), (1030.0, SHARE)]:
        later = _round(
            **holding | {"table": mine, "memory": memory, "lease": lease, "renewed": None},
            now=now,
        )
        assert later.lease is not None and later.lease.slots == frozenset(acts_on), now
        memory, lease = later.memory, later.lease


def test_a_replica_that_never_saw_a_table_takes_a_missing_one_for_a_first_install() -> None:
    """Nobody can have acted before the table's first write: no lifetime to wait. (A replica
    that starts while a deleted table is missing cannot tell the two apart.)"""
    decision = _round(memory=ClaimsMemory({}, None))
    assert decision.lease is not None and decision.lease.slots == SHARE


class ApiServerTable:
    """The claims ConfigMap as the API server keeps it: a write lands only on the version
    it was based on (a create only while there is none); a delete ends this incarnation,
    and the next create starts another (a new uid)."""

    def __init__(self, exists: bool) -> None:
        self.version, self.incarnation = 1, 1
        self.claims: dict[str, Claim] | None = {} if exists else None

    def read(self) -> ClaimsTable:
        if self.claims is None:
            return ClaimsTable({})
        return ClaimsTable(dict(self.claims), str(self.version), f"uid-{self.incarnation}")

    def write(self, version: str | None, identity: str, write: ClaimWrite) -> str | None:
        """The table's uid once written, None: refused (409)."""
        if version != (str(self.version) if self.claims is not None else None):
            return None
        if self.claims is None:
            self.claims, self.incarnation = {}, self.incarnation + 1
        self.version += 1
        for gone in (*write.expired, identity):
            self.claims.pop(gone, None)
        if write.claim is not None:
            self.claims[identity] = write.claim
        return f"uid-{self.incarnation}"

    def delete(self) -> None:
        self.claims = None


@dataclass
class ModelReplica:
    """One replica as its shell keeps it: what its claims rounds remember, and its lease."""

    share: frozenset[int]
    offset: float
    """Its lease clock minus the real time (boot times differ)."""
    skew: timedelta
    """Its wall clock minus the real time: only in the stamps."""
    memory: ClaimsMemory = field(default_factory=ClaimsMemory)
    written: Claim | None = None
    lease: Lease = field(default_factory=Lease)
    renewed: float | None = None
    paused: bool = False
    in_flight: bool = False
    killed: bool = False
    sent: tuple[str | None, ClaimsDecision] | None = None
    """A write sent (on the version read) and not landed yet."""


ACTIONS = ["round", "land", "wait", "pause", "resume", "passes end", "kill", "delete table"]
WAITS = [0.5, 1.0, 7.5, 14.9, 15.0, 30.0, 30.1]


@settings(max_examples=300, deadline=None)
@example(  # two replicas of one share; the table deleted while the first acts
    [(0, 1), (0, 1)], [0, 5000], True,
    [(0, "round", 0), (0, "land", 0), (1, "round", 0), (1, "land", 0), (0, "delete table", 0),
     (1, "round", 0), (1, "land", 0)],
)  # fmt: skip
@example(  # the first replica cut off from the table: the other takes its slots a lifetime on
    [(0, 1), (0, 2)], [0, -700], True,
    [(0, "round", 0), (0, "land", 0), (1, "round", 0), (1, "land", 0), (1, "wait", 6),
     (1, "round", 0), (1, "land", 0)],
)  # fmt: skip
@given(
    st.lists(
        st.integers(1, 4).flatmap(lambda k: st.tuples(st.integers(0, k - 1), st.just(k))),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.floats(-1e5, 1e5, allow_nan=False), min_size=5, max_size=5),
    st.booleans(),
    st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from(ACTIONS), st.integers(0, len(WAITS) - 1)),
        max_size=120,
    ),
)
def test_with_any_interleaving_no_slot_is_acted_on_by_two_replicas_at_once(
    partitions: list[tuple[int, int]],
    offsets: list[float],
    table_exists: bool,
    steps: list[tuple[int, str, int]],
) -> None:
    """Replicas of any partition counts (several of one share, as HA pairs), each with its
    own lease clock, run claims rounds in any interleaving: a write lands any time after it
    was decided, or is refused if the table moved meanwhile; replicas pause, resume, are
    killed; the table is deleted (once each replica has read one: a replica that never did
    takes a missing table for a first install). The verdict is on the leases as each
    replica's own clock judges them, converted to real time: at no moment do two replicas
    act on one slot. At the end, with the churn over, the shares of the live replicas are
    all acted on."""
    table = ApiServerTable(table_exists)
    replicas = [
        ModelReplica(
            frozenset(Partition(index, count).slots),
            offsets[i],
            timedelta(seconds=offsets[-1 - i] / 10),
        )
        for i, (index, count) in enumerate(partitions)
    ]
    real = 1000.0

    def round_of(replica: ModelReplica, name: str) -> None:
        now = real + replica.offset
        read = table.read()
        decision = decide_claims(
            name, replica.share, LIFETIME, read, replica.memory, replica.written,
            replica.lease, replica.renewed, paused=replica.paused,
            in_flight=replica.in_flight, now=now, stamp=NOW + replica.skew,
        )  # fmt: skip
        replica.memory = decision.memory
        if decision.let_go:
            replica.lease, replica.written = Lease(), None
            replica.renewed = None
        if decision.write is not None:
            replica.sent = (read.version, decision)
        elif decision.lease is not None:
            replica.lease = decision.lease

    def land(replica: ModelReplica, name: str) -> None:
        if replica.sent is None:
            return
        (version, decision), replica.sent = replica.sent, None
        assert decision.write is not None
        uid = table.write(version, name, decision.write)
        if uid is None or replica.killed:
            return
        replica.memory = replace(replica.memory, table=uid)
        replica.written = decision.write.claim
        if not decision.let_go:
            replica.renewed = decision.renewed
        if decision.lease is not None:
            replica.lease = decision.lease

    def acting_twice() -> set[int]:
        acting = [
            r.lease.slots for r in replicas if not r.killed and r.lease.valid(real + r.offset)
        ]
        return {s for i, a in enumerate(acting) for b in acting[i + 1 :] for s in a & b}

    for who, action, wait in steps:
        index = who % len(replicas)
        replica, name = replicas[index], f"replica-{index}"
        if action == "wait":
            real += WAITS[wait]
        elif action == "delete table":
            if all(r.memory.table is not None for r in replicas if not r.killed):
                table.delete()
        elif replica.killed:
            if action == "land":
                land(replica, name)  # a write sent before the kill may still land
        elif action == "round" and replica.sent is None:
            round_of(replica, name)
        elif action == "land":
            land(replica, name)
        elif action == "pause":
            replica.paused, replica.in_flight = True, replica.lease.valid(real + replica.offset)
        elif action == "resume":
            replica.paused = False
        elif action == "passes end":
            replica.in_flight = False
        elif action == "kill":
            replica.killed = True
        assert not acting_twice(), (action, name, real)

    for replica in replicas:  # the churn is over: writes in flight land or are refused
        land(replica, "replica-" + str(replicas.index(replica)))
        replica.paused = replica.in_flight = False
    for _ in range(int(3 * LIFETIME.total_seconds())):
        real += 1.0
        for index, replica in enumerate(replicas):
            if not replica.killed:
                round_of(replica, f"replica-{index}")
                land(replica, f"replica-{index}")
            assert not acting_twice()
    alive = [r for r in replicas if not r.killed]
    wanted = frozenset(s for r in alive for s in r.share)
    acting = frozenset(s for r in alive if r.lease.valid(real + r.offset) for s in r.lease.slots)
    assert acting == wanted


HALF = Partition(1, 2)
OLD = {"old": Sighting(_claim(range(SLOTS)), 990.0)}


@pytest.mark.parametrize(
    ("case", "lease", "seen", "spell", "paused", "event", "after"),
    [
        ("acting on its share", Lease(frozenset(HALF.slots), 1010.0), {}, ShortSpell(),
         False, None, ShortSpell()),
        ("short for less than two lifetimes", Lease(), OLD, ShortSpell(941.0), False, None,
         ShortSpell(941.0)),
        ("a spell begins", Lease(), OLD, ShortSpell(), False, None, ShortSpell(1000.0)),
        ("short for two lifetimes: the holder named", Lease(), OLD, ShortSpell(940.0), False,
         ("Warning", "SlotsUnclaimed", "held by old"), ShortSpell(940.0, True)),
        ("nobody holds them: its claim fails", Lease(), {}, ShortSpell(940.0), False,
         ("Warning", "SlotsUnclaimed", "its claim fails (TimeoutError: read timed out)"),
         ShortSpell(940.0, True)),
        ("the table was deleted", Lease(), {UNKNOWN: Sighting(_claim(range(SLOTS)), 990.0)},
         ShortSpell(940.0), False, ("Warning", "SlotsUnclaimed", "claims table was deleted"),
         ShortSpell(940.0, True)),
        ("warned once a spell", Lease(), OLD, ShortSpell(900.0, True), False, None,
         ShortSpell(900.0, True)),
        ("all of its share again", Lease(frozenset(HALF.slots), 1010.0), {},
         ShortSpell(900.0, True), False, ("Normal", "SlotsClaimed", "acts on all 128 slots"),
         ShortSpell()),
        ("a lease that ran out is no acting", Lease(frozenset(HALF.slots), 1000.0), {},
         ShortSpell(), False, None, ShortSpell(1000.0)),
        ("paused: no spell, and never 'acts on all'", Lease(), {}, ShortSpell(900.0, True),
         True, None, ShortSpell()),
    ],
)  # fmt: skip
def test_a_replica_says_when_it_acts_on_less_than_its_share_and_when_on_all_again(
    case: str,
    lease: Lease,
    seen: dict[str, Sighting],
    spell: ShortSpell,
    paused: bool,
    event: tuple[str, str, str] | None,
    after: ShortSpell,
) -> None:
    report = report_claims(
        "new", HALF, lease, seen, spell, paused=paused,
        error="TimeoutError: read timed out", lifetime=LIFETIME, now=1000.0,
    )  # fmt: skip
    assert report.spell == after, case
    assert report.acting == (lease.slots if lease.valid(1000.0) else frozenset()), case
    if event is None:
        assert report.event is None, case
    else:
        assert report.event is not None, case
        kind, reason, words = event
        assert report.event[:2] == (kind, reason) and words in report.event[2], case
