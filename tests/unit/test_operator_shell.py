"""The operator's shell without a cluster: a stalled pass turns the liveness probe red, one
slow tenant query delays no other room's reading, and a room changes hands (a standby, a new
partition count) without two replicas acting on it at once."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import kopf
import pytest
import structlog
from kubernetes.client.rest import ApiException

from townsquare import handlers, observability
from townsquare.api.models import MetricsSpec
from townsquare.handlers import ListenerPoller, RoomState, Runtime, Settings
from townsquare.kube.client import Cluster, Peering, RelayPod
from townsquare.metrics import PRESETS, PrometheusSource, Reading, RoomListeners
from townsquare.partitions import (
    SLOT_LABEL,
    SLOTS,
    Claim,
    ClaimLapsedError,
    ClaimsTable,
    Lease,
    Partition,
    read_claims,
    slot_of,
)
from townsquare.passes import PassScheduler

PROMETHEUS = "http://127.0.0.1:9"
"""Never reached: the sources below answer from memory."""


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def _runtime(cluster: object, settings: Settings, claimed: bool = True) -> Runtime:
    """A replica; `claimed`: as if its claim on all its slots were written."""
    runtime = Runtime(
        cluster=cast(Cluster, cluster),
        settings=settings,
        loop=asyncio.get_running_loop(),
        indexes={"relay_pod_index": {}, "placeholder_index": {}},
    )
    if claimed:  # for good: a loaded machine may take longer than a lease to run a test
        runtime.act_on(Lease(frozenset(settings.partition.slots), math.inf))
    return runtime


class Unfenced:
    """A fake API server for tests of something other than the claims' fence."""

    def fenced(self, fence: Callable[[], None]) -> Unfenced:
        return self


class StuckApiServer(Unfenced):
    """A read that never answers (a half-open connection) until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def room_if_exists(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.entered.set()
        self.release.wait(30)
        return None  # the room is gone: the pass ends


def test_a_stalled_pass_turns_the_liveness_probe_red_and_green_again() -> None:
    async def scenario() -> None:
        api = StuckApiServer()
        runtime = _runtime(api, Settings(stall_after=timedelta(milliseconds=50)))
        memo = SimpleNamespace(runtime=runtime)
        runner = asyncio.create_task(runtime.passes.run())
        try:
            runtime.register(("spaces", "launch"), {}, generation=1)
            await _until(api.entered.is_set, "the pass to reach the API server")
            await asyncio.sleep(0.1)  # longer than stall_after
            with pytest.raises(kopf.PermanentError, match="spaces/launch"):
                handlers.progress(memo=memo)
            api.release.set()
            await _until(lambda: not runtime.passes.running, "the pass to end")
            # as its claims round does every second
            runtime.claims.ok_at = runtime.claims.round_at = runtime.clock()
            assert handlers.progress(memo=memo) == "reconciling"
        finally:
            api.release.set()
            runner.cancel()

    asyncio.run(scenario())


class TenantPrometheus(PrometheusSource):
    """Answers the batched query at once and one room's own query only when released."""

    def __init__(self, fast_rooms: list[tuple[str, str]]) -> None:
        super().__init__(PROMETHEUS)
        self.fast_rooms = fast_rooms
        self.release = threading.Event()
        self.batched_reads = 0
        self.room_reads = 0

    def read(self, preset: str, queries: Mapping[str, str] = PRESETS) -> Reading:
        self.batched_reads += 1
        sampled = time.time()
        return Reading(
            rooms={
                (namespace, room): RoomListeners({f"{room}-relay-0": 10}, sampled)
                for namespace, room in self.fast_rooms
            }
        )

    def read_room(self, metrics: MetricsSpec, namespace: str, room: str) -> Reading:
        self.room_reads += 1
        self.release.wait(30)
        return Reading(error="answered too late")


def test_a_slow_tenant_query_delays_no_other_room() -> None:
    async def scenario() -> None:
        fast = [("spaces", f"room-{i}") for i in range(5)]
        slow = ("tenant", "custom")
        source = TenantPrometheus(fast)
        runtime = _runtime(object(), Settings(prometheus_url=PROMETHEUS))
        runtime.sources[PROMETHEUS] = source
        for key in fast:
            runtime.rooms[key] = RoomState(metrics=MetricsSpec())
        query = 'sum(audioroom_relay_listeners{room="$room"})'
        runtime.rooms[slow] = RoomState(metrics=MetricsSpec(listeners_query=query))
        poller = ListenerPoller(runtime)
        try:
            poller.tick()
            await _until(
                lambda: all(
                    (reading := runtime.rooms[key].reading) and reading.listeners == 10
                    for key in fast
                ),
                "every other room's reading",
            )
            assert source.room_reads == 1 and not source.release.is_set(), "still waiting"
            assert runtime.rooms[slow].reading is None
            poller.tick()  # the next tick reads the others again, and waits for no one
            await _until(lambda: source.batched_reads == 2, "the next batched read")
            assert source.room_reads == 1, "the slow query is not started twice"
            source.release.set()
            await _until(
                lambda: runtime.rooms[slow].reading is not None, "the slow room's own reading"
            )
            reading = runtime.rooms[slow].reading
            assert reading is not None and reading.listeners is None
            assert reading.problem == "answered too late"
        finally:
            source.release.set()
            await poller.stop()

    asyncio.run(scenario())


class DeletedMeanwhile(Unfenced):
    """The room is read as deleted, by a pass that began before its deletion."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.reads: list[str] = []
        self.released: list[str] = []

    def release_room(self, room: Mapping[str, Any]) -> None:
        self.released.append(room["metadata"]["name"])

    def room_if_exists(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append(name)
        self.entered.set()
        self.release.wait(30)
        meta = {"name": name, "namespace": namespace, "generation": 2, "uid": "u"}
        return {"metadata": {**meta, "deletionTimestamp": "2026-12-01T23:00:00Z"}, "spec": {}}


def test_a_pass_that_began_before_the_deletion_does_not_release_the_room() -> None:
    async def scenario() -> None:
        api = DeletedMeanwhile()
        runtime = _runtime(api, Settings())
        runner = asyncio.create_task(runtime.passes.run())
        key = ("spaces", "leaving")
        try:
            runtime.register(key, {}, generation=1)
            await _until(api.entered.is_set, "an ordinary pass to read the room")
            state = runtime.rooms[key]
            state.deleting = True  # as the room's deletion event does
            runtime.passes.wake(key)
            api.release.set()
            await _until(lambda: len(api.reads) >= 2, "the draining pass that follows")
            assert api.released == [], "released before any drain"
        finally:
            api.release.set()
            runner.cancel()

    asyncio.run(scenario())


class PeeringObject:
    """kopf's peering object, in memory: a write based on an older read is refused, as the
    API server refuses a stale resourceVersion."""

    def __init__(self) -> None:
        self.peers: dict[str, Any] = {}
        self.holder: str | None = None
        self.version = 0

    def join(self, identity: str, priority: int) -> None:
        lastseen = datetime.now(UTC).isoformat()
        self.peers[identity] = {"priority": priority, "lifetime": 30, "lastseen": lastseen}
        self.version += 1

    def read_peers(self, name: str, namespaces: tuple[str, ...]) -> list[Peering]:
        return [Peering(name, None, str(self.version), dict(self.peers), self.holder)]

    def hold_peering(self, peering: Peering, holder: str | None) -> None:
        if peering.version != str(self.version):
            raise RuntimeError("409 Conflict")
        self.holder, self.version = holder, self.version + 1


def test_a_hand_over_to_a_higher_priority_waits_for_the_passes_in_flight() -> None:
    async def scenario() -> None:
        peering = PeeringObject()
        in_pass, finish = asyncio.Event(), asyncio.Event()
        passes_by: list[str] = []

        def replica(identity: str, priority: int) -> Runtime:
            settings = Settings(peering="ha", identity=identity, priority=priority)
            runtime = _runtime(peering, settings)

            async def slow_pass(key: tuple[str, str]) -> float | None:
                passes_by.append(identity)
                in_pass.set()
                await finish.wait()
                return None

            runtime.passes = PassScheduler(slow_pass)
            runtime.passes.paused = True
            return runtime

        async def follow(runtime: Runtime) -> None:
            peerings = peering.read_peers("ha", ())
            await handlers._follow(runtime, peerings, True, set(), logging.getLogger("test"))

        standby = replica("standby", 99)
        peering.join("standby", 99)
        await follow(standby)
        assert not standby.passes.paused and peering.holder == "standby", "alone: it acts"
        runner = asyncio.create_task(standby.passes.run())
        standby.passes.wake(("spaces", "room"))
        await asyncio.wait_for(in_pass.wait(), 5)

        primary = replica("primary", 100)
        peering.join("primary", 100)
        await follow(primary)
        assert primary.passes.paused, "the standby still has a pass in flight"
        stepping_down = asyncio.create_task(follow(standby))
        await _until(lambda: standby.passes.paused, "the standby to pause")
        await follow(primary)
        assert primary.passes.paused and peering.holder == "standby", "its pass runs on"

        finish.set()
        await asyncio.wait_for(stepping_down, 5)
        assert peering.holder is None, "the standby let go once its pass ended"
        await follow(primary)
        assert not primary.passes.paused and peering.holder == "primary"
        assert passes_by == ["standby"]
        runner.cancel()

    asyncio.run(scenario())


class ClaimsConfigMap:
    """The claims table as the API server keeps it, in memory: a write on an older version
    is refused (409), and so is a create once it exists. Records which replica passes each
    room, and when."""

    def __init__(self) -> None:
        self.version = 0
        self.exists = False
        self.incarnation = 0
        self.data: dict[str, str] = {}
        self.passes: list[tuple[str, str, float, float]] = []
        self.events: list[tuple[str, str, str]] = []
        self.unreachable = False
        self.failure: Exception = TimeoutError("read timed out")
        """What a read raises while `unreachable`."""
        self.on_write: Callable[[str, Claim | None], None] = lambda identity, claim: None
        """Runs as a write arrives (before it is applied)."""

    def read_claims(self, namespace: str) -> ClaimsTable:
        if self.unreachable:
            raise self.failure
        if not self.exists:
            return ClaimsTable({})
        return ClaimsTable(read_claims(self.data), str(self.version), f"uid-{self.incarnation}")

    def post_claims_event(
        self, namespace: str, kind: str, reason: str, message: str, now: datetime
    ) -> None:
        self.events.append((kind, reason, message))

    def write_claim(
        self,
        namespace: str,
        version: str | None,
        identity: str,
        claim: Claim | None,
        expired: list[str] | tuple[str, ...] = (),
    ) -> str:
        self.on_write(identity, claim)
        if version != (str(self.version) if self.exists else None):
            raise RuntimeError("409 Conflict")
        if not self.exists:
            self.exists, self.incarnation = True, self.incarnation + 1
        self.version += 1
        for key in [*expired, identity]:
            self.data.pop(key, None)
        if claim is not None:
            self.data[identity] = claim.encode()
        return f"uid-{self.incarnation}"

    def delete(self) -> None:
        """`kubectl delete configmap townsquare-partitions`."""
        self.exists, self.data = False, {}


def test_a_new_partition_count_waits_for_the_old_replica_to_let_go_of_each_room() -> None:
    """Partitions go from 1 to 2 with the old replica still running: the new replica of
    partition 1/2 acts on none of its rooms until the old one finished its pass in flight
    and let go; then at once (not a lifetime later)."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        finish = asyncio.Event()
        log = logging.getLogger("test")
        in_pass: dict[str, int] = {}
        overlaps: list[tuple[str, str]] = []
        passed_by: list[str] = []

        def replica(identity: str, partition: Partition) -> Runtime:
            settings = Settings(identity=identity, partition=partition, namespaces=("spaces",))
            runtime = _runtime(table, settings, claimed=False)

            async def one_pass(key: tuple[str, str]) -> float | None:
                room = key[1]
                if in_pass.get(room):
                    overlaps.append((identity, room))
                in_pass[room] = in_pass.get(room, 0) + 1
                passed_by.append(identity)
                await finish.wait()
                in_pass[room] -= 1
                return None

            runtime.passes = PassScheduler(
                one_pass, may_run=lambda key: slot_of(*key) in runtime.acting_slots
            )
            return runtime

        room = next(
            ("spaces", f"room-{i}") for i in range(100) if slot_of("spaces", f"room-{i}") >= 128
        )
        old, new = replica("old", Partition(0, 1)), replica("new", Partition(1, 2))
        runners = [asyncio.create_task(r.passes.run()) for r in (old, new)]
        old_renewed = await handlers._claim(old, None, log)
        assert old.acting_slots == frozenset(range(SLOTS))
        old.passes.wake(room)
        await _until(lambda: passed_by == ["old"], "the old replica's pass")

        new_renewed = await handlers._claim(new, None, log)
        assert new.acting_slots == frozenset(), "every slot is the old replica's"
        new.passes.wake(room)
        await asyncio.sleep(0.05)
        assert passed_by == ["old"], "the new replica waits: the room is parked"

        old.pause()  # the old replica is stopping; its pass is still in flight
        old_renewed = await handlers._claim(old, old_renewed, log)
        assert old_renewed is not None and "old" in table.data, "kept while its pass runs"
        new_renewed = await handlers._claim(new, new_renewed, log)
        assert new.acting_slots == frozenset()

        finish.set()
        await _until(lambda: not old.passes.running, "the old pass to end")
        assert await handlers._claim(old, old_renewed, log) is None
        assert "old" not in table.data, "let go once no pass was in flight"
        await handlers._claim(new, new_renewed, log)
        assert new.acting_slots == frozenset(range(128, 256))
        await _until(lambda: passed_by == ["old", "new"], "the new replica's pass")
        assert overlaps == []
        for runner in runners:
            runner.cancel()

    asyncio.run(scenario())


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("stamped_ago", [timedelta(seconds=29), timedelta(hours=-1)])
def test_a_killed_replicas_slots_are_taken_a_lifetime_after_it_was_last_seen_renewing(
    stamped_ago: timedelta,
) -> None:
    """Its wall-clock stamp decides nothing (29 s old, or an hour in the future from a
    clock that runs ahead): the slots are taken one lifetime after this replica first read
    the claim as it stands, by its own monotonic clock, and not a moment before."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        log = logging.getLogger("test")
        killed = Claim(frozenset(range(SLOTS)), datetime.now(UTC) - stamped_ago, LIFE)
        table.write_claim("spaces", None, "killed", killed)
        settings = Settings(identity="new", partition=Partition(0, 2), namespaces=("spaces",))
        new = _runtime(table, replace(settings, peering_lifetime=LIFE), claimed=False)
        new.clock = clock = FakeClock()
        await handlers._claim(new, None, log)
        assert new.acting_slots == frozenset()
        clock.now += LIFE.total_seconds() - 0.5
        await handlers._claim(new, None, log)
        assert new.acting_slots == frozenset(), "not before a lifetime since it was seen"
        clock.now += 1.0
        await handlers._claim(new, None, log)
        assert new.acting_slots == frozenset(range(128))
        assert set(table.data) == {"new"}, "the dead replica's claim was dropped"

    asyncio.run(scenario())


def test_a_standby_has_seen_the_claims_before_it_must_take_them_over() -> None:
    """A paused replica reads the table too, so that when the primary dies it takes the
    slots a lifetime after the primary's last renewal, not a lifetime after it resumed."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        log = logging.getLogger("test")
        primary = Claim(frozenset(range(SLOTS)), datetime.now(UTC), LIFE)
        table.write_claim("spaces", None, "primary", primary)
        settings = Settings(identity="standby", peering="ha", namespaces=("spaces",))
        standby = _runtime(table, replace(settings, peering_lifetime=LIFE), claimed=False)
        standby.clock = clock = FakeClock()
        assert standby.passes.paused
        assert await handlers._claim(standby, None, log) is None  # paused: claims nothing
        clock.now += LIFE.total_seconds() + 0.5  # the primary was killed: no renewal since
        standby.resume()
        await handlers._claim(standby, None, log)
        assert standby.acting_slots == frozenset(range(SLOTS))

    asyncio.run(scenario())


class RecordingApi:
    """The API server under a real `Cluster`: every call is recorded in order; a read of the
    room answers `room`; `on_call` runs as a call is made (to move the clock meanwhile)."""

    def __init__(self, room: dict[str, Any], on_call: Callable[[str], None]) -> None:
        self.room = room
        self.on_call = on_call
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            self.on_call(name)
            if name == "get_namespaced_custom_object":
                return self.room
            return SimpleNamespace(data=b'{"metadata": {"resourceVersion": "7"}}')

        return call


def _fenced_cluster(api: RecordingApi) -> Cluster:
    from kubernetes import client

    cluster = Cluster(client.ApiClient(), identity="replica")
    cluster.core = cluster.apps = cluster.policy = cluster.custom = api  # type: ignore[assignment]
    cluster._apply_by_kind = dict.fromkeys(cluster._apply_by_kind, api.apply_child)
    return cluster


def _prewarming_room() -> dict[str, Any]:
    """A room starting in a minute: its first pass holds it, writes its status, posts its
    Events and applies its four children."""
    start = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    return {
        "metadata": {
            "name": "launch", "namespace": "spaces", "uid": "u1", "generation": 1,
            "resourceVersion": "5",
        },
        "spec": {
            "startTime": start, "duration": "10m", "expectedAudience": 3000,
            "relay": {"image": "relay:1", "listenersPerRelay": 1000, "startupSeconds": 5},
            "scaling": {"minRelays": 1, "prewarmLead": "2m"},
        },
    }  # fmt: skip


WRITES = {
    "patch_namespaced_custom_object",
    "patch_namespaced_custom_object_status",
    "create_namespaced_event",
    "apply_child",
    "create_namespaced_pod",
    "delete_namespaced_pod",
}


ApiT = TypeVar("ApiT", bound=RecordingApi)


def _lapsing_during_status_write(
    make_api: Callable[[dict[str, Any], Callable[[str], None]], ApiT],
) -> tuple[ApiT, Runtime, Callable[[], Lease]]:
    """A pre-warming room on a fenced cluster whose lease runs out (by the monotonic clock)
    during the first status write, and that holds a fresh lease now; `lease()` gives
    another, as a claim written again would."""
    clock, lifetime = FakeClock(), Settings().peering_lifetime
    lapses = [lifetime.total_seconds() / 2 + 1]

    def lapse_during_status_write(name: str) -> None:
        if name == "patch_namespaced_custom_object_status" and lapses:
            clock.now += lapses.pop()

    def lease() -> Lease:
        return Lease.after_write(frozenset(range(SLOTS)), clock(), lifetime)

    api = make_api(_prewarming_room(), lapse_during_status_write)
    runtime = _runtime(_fenced_cluster(api), Settings(), claimed=False)
    runtime.clock = clock
    runtime.act_on(lease())
    return api, runtime, lease


def test_a_pass_whose_claim_lapses_mid_pass_writes_nothing_more() -> None:
    """The lease runs out (by the monotonic clock) while the room's status write is in
    flight: the children that would follow are never sent, the pass ends as failed, and
    what it decided is forgotten (the room is read afresh next time). The Events of the
    status that landed still go out: no later pass derives them again (see the next test)."""

    async def scenario() -> None:
        api, runtime, lease = _lapsing_during_status_write(RecordingApi)
        key = ("spaces", "launch")
        state = runtime.room(key)
        outcome, failed = await handlers._reconcile_once(runtime, state, key)
        writes = [call for call in api.calls if call in WRITES]
        assert writes[:2] == [
            "patch_namespaced_custom_object",
            "patch_namespaced_custom_object_status",
        ]
        assert set(writes[2:]) == {"create_namespaced_event"}, "Events only, no child"
        assert outcome is None and failed
        assert state.scaling is None, "what it decided but did not write: read afresh"

        runtime.act_on(lease())
        outcome, failed = await handlers._reconcile_once(runtime, state, key)
        assert not failed and "apply_child" in api.calls

    asyncio.run(scenario())


class StatusKeepingApi(RecordingApi):
    """As the API server keeps it: the status written is what the next read of the room
    returns, and the Events created are kept (by reason). No child exists yet."""

    def __init__(self, room: dict[str, Any], on_call: Callable[[str], None]) -> None:
        super().__init__(room, on_call)
        self.events: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        from kubernetes.client.rest import ApiException

        recorded = super().__getattr__(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "patch_namespaced_custom_object_status":
                self.room = {**self.room, "status": args[5]["status"]}
            if name in ("read_namespaced_config_map", "read_namespaced_stateful_set_status"):
                raise ApiException(status=404)
            if name == "list_namespaced_event":
                return SimpleNamespace(items=[])
            if name == "create_namespaced_event":
                self.events.append(args[1].reason)
            return recorded(*args, **kwargs)

        return call


def test_a_claim_lapsing_during_the_status_write_loses_no_event() -> None:
    """The status write lands as the lease runs out: the change it records is announced
    (the Events go out with it), and the next pass, finding it recorded, announces it not
    again."""

    async def scenario() -> None:
        api, runtime, lease = _lapsing_during_status_write(StatusKeepingApi)
        key = ("spaces", "launch")
        state = runtime.room(key)
        _, failed = await handlers._reconcile_once(runtime, state, key)
        assert failed and api.events, "the change the status records is announced"
        announced = list(api.events)

        runtime.act_on(lease())
        _, failed = await handlers._reconcile_once(runtime, state, key)
        assert not failed and "apply_child" in api.calls
        assert api.events == announced, "announced once"

    asyncio.run(scenario())


def test_a_room_read_afresh_mid_pass_keeps_its_old_relay_template() -> None:
    """The claims round reads a room afresh (its entry did not stand as written) while a
    pass of it is in flight. The pass goes on with what it read: the relay StatefulSet made
    before pods carried the slot label keeps its template (a new one would roll every
    relay), and the room is read afresh once the pass ends."""

    async def scenario() -> None:
        entered, release = threading.Event(), threading.Event()

        def stall_in_status_write(name: str) -> None:
            if name == "patch_namespaced_custom_object_status" and not entered.is_set():
                entered.set()
                release.wait(10)

        applied: list[dict[str, Any]] = []

        def apply_child(name: str, namespace: str, manifest: Any, **_: Any) -> Any:
            applied.append(manifest)
            return SimpleNamespace(data=b'{"metadata": {"resourceVersion": "7"}}')

        api = RecordingApi(_prewarming_room(), stall_in_status_write)
        cluster = _fenced_cluster(api)
        cluster._apply_by_kind = dict.fromkeys(cluster._apply_by_kind, apply_child)
        runtime = _runtime(cluster, Settings())
        key = ("spaces", "launch")
        _with_a_live_relay(runtime, key)
        state = runtime.room(key)
        made_before_the_label = {
            "template": {"metadata": {"labels": {"townsquare.dev/room": "launch"}}}
        }
        await handlers._on_child("StatefulSet")(
            name="launch-relay", namespace="spaces", labels={"townsquare.dev/room": "launch"},
            meta={"generation": 1}, spec=made_before_the_label, status={"updateRevision": "r1"},
            type="MODIFIED", memo=SimpleNamespace(runtime=runtime),
        )  # fmt: skip
        assert state.relay_pods_labelled is False
        in_flight = asyncio.create_task(handlers._reconcile_once(runtime, state, key))
        await asyncio.to_thread(entered.wait, 10)
        runtime.act_on(runtime.lease, kept=frozenset())  # every room read afresh
        release.set()
        _, failed = await in_flight
        (relays,) = [m for m in applied if m["kind"] == "StatefulSet"]
        labels = relays["spec"]["template"]["metadata"]["labels"]
        assert not failed and SLOT_LABEL not in labels, "the old template kept"
        assert state.relay_pods_labelled is None and not state.applied, "read afresh after"

    asyncio.run(scenario())


def test_a_pass_begun_before_a_lapse_writes_nothing_once_the_slot_is_claimed_again() -> None:
    """ABA: a pass stalls inside its first write; its lease runs out, another replica may
    act meanwhile, and this replica claims the slot again. The stalled pass must not go on
    writing under the new lease (it decided from what it read under the old one): the
    fence refuses every later write, and the room is read afresh once the pass ends."""

    async def scenario() -> None:
        clock = FakeClock()
        lifetime = Settings().peering_lifetime
        entered, release = threading.Event(), threading.Event()

        def stall_in_first_write(name: str) -> None:
            if name == "patch_namespaced_custom_object" and not entered.is_set():
                entered.set()
                release.wait(10)

        api = RecordingApi(_prewarming_room(), stall_in_first_write)
        runtime = _runtime(_fenced_cluster(api), Settings(), claimed=False)
        runtime.clock = clock
        runtime.act_on(Lease.after_write(frozenset(range(SLOTS)), clock(), lifetime))
        key = ("spaces", "launch")
        state = runtime.room(key)
        stalled = asyncio.create_task(handlers._reconcile_once(runtime, state, key))
        await asyncio.to_thread(entered.wait, 10)
        clock.now += lifetime.total_seconds() / 2 + 1  # lease #1 ran out
        runtime.stop_acting()
        clock.now += lifetime.total_seconds() + 5  # another replica could act, and let go
        runtime.act_on(Lease.after_write(frozenset(range(SLOTS)), clock(), lifetime))
        release.set()
        outcome, failed = await stalled
        writes = [call for call in api.calls if call in WRITES]
        assert writes == ["patch_namespaced_custom_object"], "nothing after the stalled write"
        assert outcome is None and failed
        assert state.scaling is None and not state.applied, "read afresh once the pass ended"

        outcome, failed = await handlers._reconcile_once(runtime, state, key)
        assert not failed and "apply_child" in api.calls, "a pass under the new lease acts"

    asyncio.run(scenario())


def test_no_pass_starts_once_the_lease_ran_out_even_before_the_claims_round_notices() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        passed: list[tuple[str, str]] = []
        runtime = _runtime(object(), Settings(), claimed=False)
        runtime.clock = clock
        lifetime = runtime.settings.peering_lifetime
        runtime.act_on(Lease.after_write(frozenset(range(SLOTS)), clock(), lifetime))

        async def one_pass(key: tuple[str, str]) -> float | None:
            passed.append(key)
            return None

        runtime.passes._run_pass = one_pass
        runner = asyncio.create_task(runtime.passes.run())
        try:
            runtime.passes.wake(("spaces", "a"))
            await _until(lambda: passed == [("spaces", "a")], "a pass while the lease holds")
            clock.now += lifetime.total_seconds() / 2  # no renewal: the lease ran out
            assert runtime.acting_slots, "the claims round has not run since"
            runtime.passes.wake(("spaces", "b"))
            await asyncio.sleep(0.1)
            assert passed == [("spaces", "a")], "a room due after the lapse waits"
            with pytest.raises(handlers.ClaimLapsedError):
                runtime.check_claim(("spaces", "a"))
        finally:
            runner.cancel()

    asyncio.run(scenario())


LIFE = timedelta(seconds=30)


def _claimed_slots(partition: str) -> tuple[float | None, float | None]:
    """(share, claimed) as this process's /metrics shows them."""
    sample = observability.REGISTRY.get_sample_value
    return (
        sample("townsquare_partition_share_slots", {"partition": partition}),
        sample("townsquare_partition_claimed_slots", {"partition": partition}),
    )


async def _kept_from_its_slots_for_70_s(
    table: ClaimsConfigMap, log: Any
) -> tuple[Runtime, float | None]:
    """The replica of partition 1/2 while an old replica holds every slot, renewing all
    along: 70 s of claims rounds, 10 s apart (the Events posted meanwhile are in `table`)."""
    settings = Settings(identity="new", partition=Partition(1, 2), namespaces=("spaces",))
    new = _runtime(table, replace(settings, peering_lifetime=LIFE), claimed=False)
    new.clock = clock = FakeClock()
    renewed = None
    for _ in range(8):
        old = Claim(frozenset(range(SLOTS)), datetime.now(UTC), LIFE)
        table.write_claim("spaces", str(table.version) if table.version else None, "old", old)
        renewed = await handlers._claims_round(new, renewed, log)
        await asyncio.gather(*new.claims.posting)
        clock.now += 10
    return new, renewed


def test_a_replica_kept_from_its_slots_says_so_on_the_claims_table_and_stays_alive() -> None:
    """Another live replica holds them (an old partition count still running): after two
    lifetimes one Warning on the claims table names it, /metrics shows 0 of 128, and
    /healthz stays green (a restart would not help; as leader election, waiting is not
    a fault). When they are let go: claimed, and one Normal Event says so."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        log = structlog.get_logger()
        new, renewed = await _kept_from_its_slots_for_70_s(table, log)
        memo = SimpleNamespace(runtime=new)
        assert [(kind, reason) for kind, reason, _ in table.events] == [
            ("Warning", "SlotsUnclaimed")
        ]
        assert "held by old" in table.events[0][2] and "0 of its 128" in table.events[0][2]
        assert _claimed_slots("1/2") == (128, 0)
        assert handlers.progress(memo=memo) == "reconciling"

        table.write_claim("spaces", str(table.version), "old", None)  # it stopped
        renewed = await handlers._claims_round(new, renewed, log)
        await asyncio.gather(*new.claims.posting)
        assert _claimed_slots("1/2") == (128, 128)
        assert [reason for _, reason, _ in table.events] == ["SlotsUnclaimed", "SlotsClaimed"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("failure", "restarted"),
    [
        (TimeoutError("read timed out"), False),
        (ConnectionRefusedError("connection refused"), False),
        (ApiException(status=503, reason="read timed out"), False),
        (ApiException(status=403, reason="read timed out: forbidden"), True),
    ],
)
def test_a_replica_that_cannot_renew_its_claim_turns_healthz_red_only_if_refused(
    failure: Exception, restarted: bool
) -> None:
    """As a leader that cannot renew its lease: it stops acting at once (half a lifetime)
    and warns after two lifetimes that nobody acts on its rooms. Its liveness probe fails
    after `stall_after` only if the API server refuses its credentials (a restart may read
    new ones): an API server out of reach for minutes (every replica alike) restarts no
    replica, as a restart reaches it no better and forgets what the replica kept."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        table.failure = failure
        log = structlog.get_logger()
        settings = Settings(identity="only", namespaces=("spaces",), peering_lifetime=LIFE)
        runtime = _runtime(table, settings, claimed=False)
        runtime.clock = clock = FakeClock()
        memo = SimpleNamespace(runtime=runtime)
        renewed = await handlers._claims_round(runtime, None, log)
        assert runtime.acting_slots == frozenset(range(SLOTS))
        table.unreachable = True
        for _ in range(19):
            clock.now += 10
            renewed = await handlers._claims_round(runtime, renewed, log)
            await asyncio.gather(*runtime.claims.posting)
            if clock.now - 1000 == 20:
                assert runtime.acting_slots == frozenset(), "lapsed: acts on nothing"
        ((kind, reason, message),) = table.events
        assert (kind, reason) == ("Warning", "SlotsUnclaimed")
        assert "nobody acts on their rooms" in message and type(failure).__name__ in message
        assert clock.now - 1000 > Settings().stall_after.total_seconds()
        runtime.poller_tick = time.monotonic()  # the poller ticks all along
        if restarted:
            with pytest.raises(kopf.PermanentError, match=r"(?s)claims table .* forbidden"):
                handlers.progress(memo=memo)
        else:
            assert handlers.progress(memo=memo) == "reconciling"

    asyncio.run(scenario())


def test_a_stuck_claims_loop_turns_healthz_red() -> None:
    """A claims round that never ends (a call hung past every timeout) stops renewals for
    good: the liveness probe fails, so the kubelet restarts the replica."""

    async def scenario() -> None:
        settings = Settings(identity="only", namespaces=("spaces",), peering_lifetime=LIFE)
        runtime = _runtime(ClaimsConfigMap(), settings, claimed=False)
        runtime.clock = clock = FakeClock()
        await handlers._claims_round(runtime, None, structlog.get_logger())
        clock.now += settings.stall_after.total_seconds() - 1
        assert runtime.stalled(clock.now) is None
        clock.now += 2  # no round ended since
        assert "claims loop has not ended a round" in (runtime.stalled(clock.now) or "")

    asyncio.run(scenario())


def _with_a_live_relay(runtime: Runtime, key: tuple[str, str]) -> None:
    """The room has one relay pod, made from template revision r1 (as kopf's index shows)."""
    now = datetime.now(UTC)
    relay = RelayPod(0, True, now - timedelta(minutes=5), now, revision="r1", uid="p0")
    cast(dict[Any, Any], runtime.indexes["relay_pod_index"])[key] = [relay]


def test_a_room_whose_relays_predate_the_slot_label_keeps_its_template() -> None:
    """Relays made by an earlier version carry no slot label: the StatefulSet keeps that
    template (no new revision, so no relay is replaced by the upgrade); a new room's relay
    pods carry the label."""

    async def scenario() -> None:
        applied: list[dict[str, Any]] = []

        def apply_child(name: str, namespace: str, manifest: dict[str, Any], **_: Any) -> Any:
            applied.append(manifest)
            return SimpleNamespace(data=b'{"metadata": {"resourceVersion": "7"}}')

        api = RecordingApi(_prewarming_room(), lambda name: None)
        cluster = _fenced_cluster(api)
        cluster._apply_by_kind = dict.fromkeys(cluster._apply_by_kind, apply_child)
        runtime = _runtime(cluster, Settings())
        key = ("spaces", "launch")

        def template_labels() -> dict[str, str]:
            (relay_set,) = [m for m in applied if m["kind"] == "StatefulSet"]
            applied.clear()
            return dict(relay_set["spec"]["template"]["metadata"]["labels"])

        await handlers._reconcile_once(runtime, runtime.room(key), key)
        assert "townsquare.dev/slot" in template_labels(), "a new room"

        state = runtime.rooms[key] = RoomState()
        _with_a_live_relay(runtime, key)
        child_changed = handlers._on_child("StatefulSet")
        old_template = {"template": {"metadata": {"labels": {"townsquare.dev/room": "launch"}}}}
        await child_changed(
            name="launch-relay", namespace="spaces", labels={"townsquare.dev/room": "launch"},
            meta={"generation": 1}, spec=old_template, status={"updateRevision": "r1"},
            type="MODIFIED", memo=SimpleNamespace(runtime=runtime),
        )  # fmt: skip
        await handlers._reconcile_once(runtime, state, key)
        assert "townsquare.dev/slot" not in template_labels(), "made before the label"

    asyncio.run(scenario())


def test_a_relay_template_made_before_the_label_gains_it_while_the_room_has_no_relay() -> None:
    """A StatefulSet made before pods carried the slot label, with no pod now (a recurring
    room between occurrences): its template gains the label (no relay to replace), so the
    relays of the next pre-warm are seen by the partition's pods watch; and start-up counts
    such templates, not only unlabelled pods, before it filters that watch by the label."""

    async def scenario() -> None:
        applied: list[dict[str, Any]] = []

        def apply_child(name: str, namespace: str, manifest: dict[str, Any], **_: Any) -> Any:
            applied.append(manifest)
            return SimpleNamespace(data=b'{"metadata": {"resourceVersion": "7"}}')

        api = RecordingApi(_prewarming_room(), lambda name: None)
        cluster = _fenced_cluster(api)
        cluster._apply_by_kind = dict.fromkeys(cluster._apply_by_kind, apply_child)
        runtime = _runtime(cluster, Settings())
        key = ("spaces", "launch")
        state = runtime.room(key)
        old_template = {"template": {"metadata": {"labels": {"townsquare.dev/room": "launch"}}}}
        await handlers._on_child("StatefulSet")(
            name="launch-relay", namespace="spaces", labels={"townsquare.dev/room": "launch"},
            meta={"generation": 1}, spec=old_template, status={"updateRevision": "r1"},
            type="MODIFIED", memo=SimpleNamespace(runtime=runtime),
        )  # fmt: skip
        _, failed = await handlers._reconcile_once(runtime, state, key)
        (relay_set,) = [m for m in applied if m["kind"] == "StatefulSet"]
        assert not failed and SLOT_LABEL in relay_set["spec"]["template"]["metadata"]["labels"]
        assert state.relay_pods_labelled is True, "kept labelled from now on"

    asyncio.run(scenario())

    def stateful_set(labels: dict[str, str]) -> dict[str, Any]:
        return {"spec": {"replicas": 0, "template": {"metadata": {"labels": labels}}}}

    listing = {
        "items": [
            stateful_set({"townsquare.dev/room": "weekly"}),
            stateful_set({"townsquare.dev/room": "launch", SLOT_LABEL: "17"}),
        ]
    }
    asked: list[str] = []

    def list_namespaced_stateful_set(namespace: str, label_selector: str, **_: Any) -> Any:
        asked.append(label_selector)
        return SimpleNamespace(data=json.dumps(listing).encode())

    from kubernetes import client

    cluster = Cluster(client.ApiClient())
    cluster.apps = cast(
        Any, SimpleNamespace(list_namespaced_stateful_set=list_namespaced_stateful_set)
    )
    assert cluster.unlabelled_relay_templates(["spaces"]) == 1
    assert asked == ["app.kubernetes.io/component=relay,app.kubernetes.io/managed-by=townsquare"]


def test_after_an_api_outage_a_replica_keeps_another_partitions_entry_standing() -> None:
    """Two partitions, the API server out of reach for everybody for 60 s: each takes the
    other's claim for dead. The first to write again drops no entry whose slots it does
    not take, so the other finds its entry as it wrote it and reads no room afresh."""

    async def scenario() -> None:
        table, log = ClaimsConfigMap(), structlog.get_logger()

        def replica(identity: str, index: int) -> Runtime:
            settings = Settings(
                identity=identity, partition=Partition(index, 2), namespaces=("spaces",),
                peering_lifetime=LIFE,
            )  # fmt: skip
            runtime = _runtime(table, settings, claimed=False)
            runtime.clock = FakeClock()
            return runtime

        a, b = replica("a", 0), replica("b", 1)
        renewed: dict[str, float | None] = {"a": None, "b": None}
        for runtime in (a, b, a, b):  # each has seen the other's claim
            name = runtime.settings.identity
            renewed[name] = await handlers._claims_round(runtime, renewed[name], log)
        key = next(
            (ns, room) for ns, room in (("spaces", f"r{i}") for i in range(50))
            if slot_of(ns, room) in a.acting_slots
        )  # fmt: skip
        state = a.room(key)
        state.scaling = cast(Any, "what the last pass decided")
        table.unreachable = True
        for _ in range(6):
            for runtime in (a, b):
                cast(FakeClock, runtime.clock).now += 10
                name = runtime.settings.identity
                renewed[name] = await handlers._claims_round(runtime, renewed[name], log)
        assert not a.acting_slots and not b.acting_slots, "both lapsed"
        table.unreachable = False
        for runtime in (b, a):  # b happens to write first
            name = runtime.settings.identity
            renewed[name] = await handlers._claims_round(runtime, renewed[name], log)
        assert sorted(table.data) == ["a", "b"]
        assert a.acting_slots == frozenset(Partition(0, 2).slots)
        assert state.scaling is not None, "nobody acted on a's rooms: none read afresh"

    asyncio.run(scenario())


@pytest.mark.parametrize("taken_meanwhile", [False, True])
def test_after_an_api_outage_rooms_are_read_afresh_only_if_another_replica_took_their_slots(
    taken_meanwhile: bool,
) -> None:
    """The claims table is out of reach for 30 s: the lease lapses at 15 s and no room is
    acted on. When it answers again, this replica's own entry still stands as it wrote
    it, so nobody can have acted on its rooms: it goes on from what it knew (no room
    re-read, no child re-applied: 10,000 rooms cost no storm). If another replica took the
    slots meanwhile (dropping that entry), acted and let go, every room is read afresh."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        log = structlog.get_logger()
        settings = Settings(identity="a", namespaces=("spaces",), peering_lifetime=LIFE)
        runtime = _runtime(table, settings, claimed=False)
        runtime.clock = clock = FakeClock()
        state = runtime.room(("spaces", "launch"))
        renewed = await handlers._claims_round(runtime, None, log)
        assert runtime.acting_slots == frozenset(range(SLOTS))
        state.scaling = cast(Any, "what the last pass decided")
        state.applied["StatefulSet/launch-relay"] = (b"digest", ("generation", 3))
        table.unreachable = True
        for _ in range(3):
            clock.now += 10
            renewed = await handlers._claims_round(runtime, renewed, log)
        assert runtime.acting_slots == frozenset(), "lapsed during the outage"
        table.unreachable = False
        if taken_meanwhile:
            other = Claim(frozenset(range(SLOTS)), datetime.now(UTC), LIFE)
            table.write_claim("spaces", str(table.version), "b", other, expired=["a"])
            table.write_claim("spaces", str(table.version), "b", None)
        clock.now += 1
        await handlers._claims_round(runtime, renewed, log)
        assert runtime.acting_slots == frozenset(range(SLOTS))
        if taken_meanwhile:
            assert state.scaling is None and not state.applied, "read afresh"
        else:
            assert state.scaling == "what the last pass decided"
            assert "StatefulSet/launch-relay" in state.applied, "no child re-applied"

    asyncio.run(scenario())


def test_a_paused_replica_never_says_it_acts_on_its_slots() -> None:
    """A replica kept from its slots warned that it acts on none; then another replica of
    its partition took over (kopf's peering paused it). It acts on nothing, so it must not
    post that it acts on all its slots again."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        log = structlog.get_logger()
        new, renewed = await _kept_from_its_slots_for_70_s(table, log)
        clock = cast(FakeClock, new.clock)
        new.pause()
        table.write_claim("spaces", str(table.version), "old", None)  # it stopped
        for _ in range(3):
            renewed = await handlers._claims_round(new, renewed, log)
            clock.now += 10
        await asyncio.gather(*new.claims.posting)
        assert new.acting_slots == frozenset()
        assert [reason for _, reason, _ in table.events] == ["SlotsUnclaimed"]

    asyncio.run(scenario())


def test_a_lease_counts_the_time_the_machine_was_suspended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Suspended for a lifetime (a laptop lid, a paused VM), the replica's lease ran out for
    everyone else, who took its slots: resumed, it must take it for lapsed too, although
    CLOCK_MONOTONIC did not move while it was suspended (CLOCK_BOOTTIME did)."""

    async def scenario() -> None:
        runtime = _runtime(Unfenced(), Settings(), claimed=False)
        lifetime = Settings().peering_lifetime
        runtime.act_on(Lease.after_write(frozenset(range(SLOTS)), runtime.clock(), lifetime))
        runtime.check_claim(("spaces", "a"))  # acts
        suspended = 2 * lifetime.total_seconds()
        real = time.clock_gettime

        def after_suspend(clock: int) -> float:
            return real(clock) + (suspended if clock == time.CLOCK_BOOTTIME else 0.0)

        monkeypatch.setattr(time, "clock_gettime", after_suspend)
        with pytest.raises(ClaimLapsedError):
            runtime.check_claim(("spaces", "a"))
        assert not runtime.passes._may_run(("spaces", "a")), "no pass starts either"

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["a claims round while paused", "the operator stopping"])
def test_a_replica_stops_acting_before_it_publishes_that_it_let_go(how: str) -> None:
    """The replica taking the slots over may act the moment it reads the release: at that
    moment this replica must already act on nothing (no pass starts, no write passes)."""

    async def scenario() -> None:
        table = ClaimsConfigMap()
        settings = Settings(identity="a", namespaces=("spaces",), peering_lifetime=LIFE)
        runtime = _runtime(table, settings, claimed=False)
        renewed = await handlers._claims_round(runtime, None, structlog.get_logger())
        assert runtime.acting_slots == frozenset(range(SLOTS))
        acting_at_release: list[bool] = []

        def on_write(identity: str, claim: Claim | None) -> None:
            if claim is None:
                acting_at_release.append(runtime.lease.valid(runtime.clock()))

        table.on_write = on_write
        if how == "the operator stopping":
            claims_loop = asyncio.create_task(handlers._follow_claims(runtime))
            await handlers.stop_poller(memo=SimpleNamespace(runtime=runtime, tasks=[claims_loop]))
        else:
            runtime.pause()
            await handlers._claims_round(runtime, renewed, structlog.get_logger())
        assert "a" not in table.data, "let go"
        assert acting_at_release == [False]
        with pytest.raises(ClaimLapsedError):
            runtime.check_claim(("spaces", "room"))

    asyncio.run(scenario())


def test_a_deleted_claims_table_lets_no_replica_take_slots_another_acts_on() -> None:
    """The old partition count's replica acts on every slot; the new partition's replica
    waits for its half. The claims table is deleted (by hand, or with its namespace): the
    next writer must not take that half at once. Each replica claims again only what its
    own lease holds; the rest is unknown for a lifetime, by then the old replica's claim is
    back in the table, and the new one waits for it to let go as before."""

    async def scenario() -> None:
        table, log = ClaimsConfigMap(), structlog.get_logger()

        def replica(identity: str, partition: Partition) -> Runtime:
            settings = Settings(
                identity=identity, partition=partition, namespaces=("spaces",),
                peering_lifetime=LIFE,
            )  # fmt: skip
            runtime = _runtime(table, settings, claimed=False)
            runtime.clock = clock
            return runtime

        clock = FakeClock()
        old, new = replica("old", Partition(0, 1)), replica("new", Partition(1, 2))
        renewed: dict[str, float | None] = {"old": None, "new": None}

        async def round_of(runtime: Runtime) -> None:
            name = runtime.settings.identity
            renewed[name] = await handlers._claims_round(runtime, renewed[name], log)

        await round_of(old)
        await round_of(new)
        assert new.acting_slots == frozenset() and old.acting_slots == frozenset(range(SLOTS))
        table.delete()
        for _ in range(8):  # 40 s, every 5 s: the new replica writes first
            clock.now += 5
            await round_of(new)
            assert new.acting_slots == frozenset(), f"{clock.now - 1000:.0f} s after"
            await round_of(old)
            assert old.acting_slots == frozenset(range(SLOTS))
        old.pause()  # it stops: no pass in flight
        await round_of(old)
        clock.now += 1
        await round_of(new)
        assert new.acting_slots == frozenset(range(128, 256)), "let go: taken at once"

    asyncio.run(scenario())
