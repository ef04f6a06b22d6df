"""The operator's shell without a cluster: a stalled pass turns the liveness probe red, and
one slow tenant query delays no other room's reading."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import kopf
import pytest

from townsquare import handlers
from townsquare.api.models import MetricsSpec
from townsquare.handlers import ListenerPoller, RoomState, Runtime, Settings
from townsquare.kube.client import Cluster, Peering
from townsquare.metrics import PRESETS, PrometheusSource, Reading, RoomListeners
from townsquare.passes import PassScheduler

PROMETHEUS = "http://127.0.0.1:9"
"""Never reached: the sources below answer from memory."""


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


def _runtime(cluster: object, settings: Settings) -> Runtime:
    return Runtime(
        cluster=cast(Cluster, cluster),
        settings=settings,
        loop=asyncio.get_running_loop(),
        indexes={"relay_pod_index": {}, "placeholder_index": {}},
    )


class StuckApiServer:
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


class DeletedMeanwhile:
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
