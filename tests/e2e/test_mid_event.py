"""Every phase re-entered on the real cluster: a re-armed room, a room deleted mid-event, a
room growing from no relay at all. Listeners come from the load generator, which places
them by the shard map the operator publishes and reports them per relay pod."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from audience import Audience, origin
from edges import EdgeFleet
from harness import Prometheus, chart_documents, wait_until
from holdings import RelayPods
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_process import OperatorProcess
from rooms import (
    GROUP,
    PLURAL,
    VERSION,
    LoadGenerator,
    Recorder,
    Rooms,
    rfc3339,
    room_manifest,
    scaling_room,
    ticket_secret,
    write_trace,
)
from sampling import Sampler, alive, listeners_by_pod

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class PodWatch(Sampler):
    """The relay pods as the API server has them, beside the listeners the load generator
    counts on each (and the real listeners, each by the relay that welcomed it)."""

    def __init__(
        self,
        rooms: Rooms,
        room: str,
        load: LoadGenerator,
        real: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.rooms, self.room, self.load, self.real = rooms, room, load, real
        self.samples: list[tuple[float, dict[str, str], dict[str, float]]] = []
        """(time, pod name -> uid of pods not being deleted, listeners by pod name)."""
        self.map_moves: list[tuple[float, str]] = []
        """(time first seen, the room's stored `movedAt`) for each new value: when its map
        moved shards (a move shows twice when re-dated to its map's publication), for
        failure messages."""
        super().__init__()

    def sample(self) -> None:
        counted = listeners_by_pod(self.load)
        for pod, held in (self.real() if self.real else {}).items():
            counted[pod] = counted.get(pod, 0) + held
        pods = alive(
            self.rooms.core.list_namespaced_pod(
                self.rooms.namespace, label_selector="app.kubernetes.io/component=relay"
            ).items
        )
        self.samples.append((time.time(), {p.metadata.name: p.metadata.uid for p in pods}, counted))
        with contextlib.suppress(ApiException):
            status = self.rooms.get(self.room).get("status", {})
            moved = (status.get("scalingState") or {}).get("movedAt")
            if moved and (not self.map_moves or self.map_moves[-1][1] != moved):
                self.map_moves.append((time.time(), moved))

    def removals(self) -> list[tuple[float, str, dict[str, float]]]:
        """(when, pod, listeners counted just before) for every pod that went away."""
        found = []
        for before, after in pairwise(self.samples):
            for pod, uid in before[1].items():
                if after[1].get(pod) != uid:
                    found.append((after[0], pod, before[2]))
        return found

    def history(self, pod: str, until: float, seconds: float = 8.0) -> str:
        """The pod's count in each sample of the last `seconds` before `until` (s before
        it, count, and "(gone)" once the pod was): for a failure message."""
        return ", ".join(
            f"{t - until:.1f}s: {counted.get(pod, 0):g}{'' if pod in pods else ' (gone)'}"
            for t, pods, counted in self.samples
            if until - seconds <= t <= until
        )


def test_an_ended_room_re_armed_by_a_new_start_time_runs_again(
    api_client: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    rooms = Rooms(api_client, namespace)
    rooms.create(room_manifest("again", start_in=15, prewarm_lead="5s", duration="4s"))
    wait_until(lambda: rooms.phase("again") == "Ended", 60, "the first run to end")
    assert rooms.relays("again") == (0, 0)

    recorder = Recorder(rooms, "again")
    try:
        start = datetime.now(UTC) + timedelta(seconds=10)
        rooms.patch_spec("again", {"startTime": rfc3339(start)})
        wait_until(lambda: rooms.phase("again") == "Live", 60, "the re-armed room to go live")
        wait_until(lambda: rooms.relays("again") == (4, 4), 30, "its planned relays")
        wait_until(lambda: rooms.phase("again") == "Ended", 60, "the second run to end")
    finally:
        recorder.stop()
    assert recorder.phases()[0] == "Ended"
    assert "Scheduled" in recorder.phases() or "PreWarming" in recorder.phases()
    assert recorder.phases()[-2:] == ["Draining", "Ended"]
    rearmed = [e for e in rooms.events("again") if e.reason == "Replanned"]
    assert rearmed and "re-armed for the occurrence starting" in rearmed[0].message
    reasons = rooms.reasons("again")
    assert reasons.count("Ended") == 2
    assert "Live" in reasons[reasons.index("Replanned") :], "the re-armed room went live"


@pytest.fixture
def drain_policy(api_client: client.ApiClient, namespace: str) -> Iterator[str]:
    """The chart's drain-first admission policy, for this namespace only."""
    only_here = {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
    policy, binding = chart_documents(
        "templates/drain-policy.yaml",
        namespace,
        {"drainBeforeDeletion": {"enabled": True, "namespaceSelector": only_here}},
    )
    admission = client.AdmissionregistrationV1Api(api_client)
    admission.create_validating_admission_policy(policy)
    admission.create_validating_admission_policy_binding(binding)
    name = str(policy["metadata"]["name"])  # type: ignore[index]
    try:
        yield name
    finally:
        admission.delete_validating_admission_policy_binding(name)
        admission.delete_validating_admission_policy(name)


def refused_deletion(rooms: Rooms, stateful_set: str) -> str | None:
    """The API server's refusal of deleting `stateful_set` (asked as a dry run), or None."""
    try:
        rooms.apps.delete_namespaced_stateful_set(stateful_set, rooms.namespace, dry_run="All")
    except ApiException as error:
        if error.status in (400, 403, 422):
            return str(json.loads(error.body)["message"])
        raise
    return None


@pytest.mark.parametrize("cascade", ["Background", "Foreground"])
def test_a_room_deleted_mid_event_drains_before_its_relays_go(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    relay_operator: OperatorProcess,
    drain_policy: str,
    tmp_path: Path,
    cascade: str,
) -> None:
    """`kubectl delete` (Background) and `kubectl delete --cascade=foreground` alike: with the
    chart's drain policy the garbage collector cannot take the relays before the drain.

    And the drain removes each relay as it empties: when the audience has fallen to a few
    listeners spread over the relays, those on the higher relays are moved down (within
    the migration budget), and the relays go one by one from the top, each with nobody on
    it when it goes, long before the lingering listeners leave and the drain timeout;
    nobody lingering is dropped. The relays are real processes and
    the 20 lingering listeners real connections to them, which judge that themselves."""
    rooms = Rooms(api_client, namespace)
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    key_file = tmp_path / "ticket.key"
    key_file.write_text(edges.key)
    ticket_secret(rooms, edges.key.encode())
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    origin_process, origin_address = origin(
        tmp_path, namespace, "leaving", key_file, kubeconfig, env, "--frame-interval", "0.05"
    )
    # Processes start slowly on a busy machine: the room starts once they can be up.
    manifest = scaling_room("leaving", start_in=30, duration="10m", audience=300)
    manifest["spec"]["relay"]["args"] = ["relay"]  # the reference relay, run by the pod runner
    manifest["spec"]["relay"]["podAnnotations"]["townsquare.dev/origin"] = origin_address
    manifest["spec"]["scaling"]["drainTimeout"] = "2m"
    manifest["spec"]["sharding"]["maxMigrationsPerMinute"] = MIGRATIONS_PER_MINUTE
    start = datetime.fromisoformat(manifest["spec"]["startTime"]).timestamp()
    rooms.create(manifest)
    relay_pods = RelayPods(rooms.core, namespace, "leaving", prometheus)
    # 300 simulated listeners stay until the room has been deleted a while, then leave over
    # 7 s; 20 real ones (spread over the relays by their shards) linger 25 s more.
    trace = write_trace(
        tmp_path / "leaving.csv", [(-20, 0), (0, 300), (38, 300), (45, 0), (300, 0)]
    )
    load = LoadGenerator(kubeconfig, namespace, "leaving", trace, edges, real_listeners=0)
    prometheus.add_target(load.address, {"source": "loadgen"})
    lingering = Audience(edges.urls[0], namespace, "leaving")
    watch = PodWatch(rooms, "leaving", load, lambda: (relay_pods(), lingering.by_pod())[1])
    try:
        wait_until(lambda: "origin started" in origin_process.tail(), 60, "the origin")
        wait_until(lambda: (listeners_by_pod(load), True)[1], 60, "the load generator")
        wait_until(lambda: time.time() > start, 30, "the start")
        lingering.add(LINGERING)
        wait_until(lingering.hearing, 60, f"{LINGERING} real listeners hearing their relays")
        queued_before = lingering.joiner.queued
        wait_until(
            lambda: sum(listeners_by_pod(load).values()) >= 300, 90, "300 listeners connected"
        )
        refusal = wait_until(
            lambda: refused_deletion(rooms, "leaving-relay"), 30, "the drain policy in force"
        )
        assert "still runs" in refusal and drain_policy in refusal
        wait_until(lambda: time.time() > start + 12, 30, "mid-event")
        map_before = rooms.core.read_namespaced_config_map("leaving-shards", namespace)
        deleted_at = time.time()
        marked = rooms.custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "leaving",
            body=client.V1DeleteOptions(propagation_policy=cascade),
        )  # fmt: skip
        # The room as the deletion left it (a later read may come after the garbage
        # collector has already taken `foregroundDeletion` off again).
        finalizers = marked["metadata"].get("finalizers", [])
        assert ("foregroundDeletion" in finalizers) == (cascade == "Foreground")

        # The edge places and moves listeners by the shard map all through the drain. In the
        # foreground the garbage collector deletes it at once; the operator puts it back.
        def shard_map_uid() -> str:
            found = rooms.core.read_namespaced_config_map("leaving-shards", namespace)
            return str(found.metadata.uid)

        if cascade == "Foreground":
            wait_until(
                lambda: shard_map_uid() != map_before.metadata.uid,
                30,
                "the operator to put back the shard map the garbage collector deleted",
            )
        else:
            assert shard_map_uid() == map_before.metadata.uid

        def gone() -> bool:
            try:
                rooms.get("leaving")
            except ApiException as error:
                return error.status == 404
            return False

        wait_until(lambda: time.time() > start + LEAVE, 120, "the lingering listeners to leave")
        lingering.remove(list(lingering.listeners))
        # The drain takes up to drainTimeout (2 m); the room goes as soon as it has drained.
        wait_until(gone, 180, "the room to be drained and released")
        gone_at = time.time()
        wait_until(
            lambda: not rooms.apps.list_namespaced_stateful_set(namespace).items,
            60,
            "the garbage collector to remove the drained relays' StatefulSet",
        )
        # the watch sees every relay pod go, any the collector is still deleting too
        wait_until(lambda: watch.samples and not watch.samples[-1][1], 60, "no relay pod left")
    except BaseException:
        print("origin log:\n", origin_process.tail())
        raise
    finally:
        watch.stop()
        lingering.stop()
        load.stop()
        edges.stop()
        origin_process.stop()

    removals = watch.removals()
    sampled = [t - deleted_at for t, _, _ in watch.samples]
    assert removals, (
        f"relays were removed: {len(sampled)} samples, the last {sampled[-1]:.0f}s after the "
        f"deletion, with pods {sorted(watch.samples[-1][1])}"
        if sampled
        else "no sample"
    )
    # Who a relay still held when it went is the relays' own count at their end, not a
    # sample's count just before: a sample reads the listeners before the pods, and in
    # between the last listener may move off, a scrape show its relay empty and the operator
    # remove it. The simulated listeners by the load generator's record (it plays their
    # side of the relays); the real ones judge it themselves (none lost its relay, below).
    dropped = [e for e in load.events() if e["event"] == "dropped"]
    assert not dropped, "relays went with listeners on them: " + "; ".join(
        f"{e['listener']} on {e['pod']}: {watch.history(e['pod'], e['at'])}" for e in dropped[:5]
    )
    last_full = max(t for t, _, counted in watch.samples if sum(counted.values()) >= 300)
    assert last_full > deleted_at + 5, "listeners stayed connected well after the deletion"
    at_deletion = max(
        (sample for sample in watch.samples if sample[0] <= deleted_at),
        key=lambda sample: sample[0],
    )
    carrying = {pod for pod in at_deletion[1] if at_deletion[2].get(pod, 0) > 0}
    assert carrying, "listeners were on relays when the room was deleted"
    early = [pod for t, pod, _ in removals if pod in carrying and t <= deleted_at + 5]
    # A relay an ordinary scale-down was already draining may empty and go at once (nobody
    # was on it, above); the garbage collector would take every relay, listeners and all.
    assert len(early) < len(carrying), f"{early} went at the deletion: every relay carrying"
    draining = [e for e in rooms.events("leaving") if e.reason == "Draining"]
    assert draining and "the room was deleted" in draining[0].message
    _relays_go_as_the_lingering_listeners_move_down(watch, start)
    _the_lingering_listeners_heard_no_drop(lingering, queued_before)
    last = max(t for t, _, _ in removals)
    print(
        f"{cascade}: first relay removed {min(t for t, _, _ in removals) - deleted_at:.0f}s "
        f"after the deletion, the last {last - deleted_at:.0f}s; the room gone "
        f"{gone_at - last:.0f}s after its last relay"
    )


LINGERING = 20
LEAVE = 85
"""Seconds after the start when the lingering listeners leave."""
EMPTY_TO_GONE = 20.0
"""Seconds from a relay's last listener leaving (as the listeners see it) to its pod going:
a scrape, a count the operator reads, and a pass, on a busy machine."""
MIGRATIONS_PER_MINUTE = 240
"""Four moves a second: the relays' last listeners move down a few at a time (each relay
tells its own at its share of that, the budget over the relays in the map)."""


def _the_lingering_listeners_heard_no_drop(lingering: Audience, queued_before: int) -> None:
    """Judged by the real listeners themselves: none was turned away (410) or put in line
    (429) once seated, none closed for outstaying a move notice, none lost its connection
    or had to join again, and every move was make-before-break."""
    joiner = lingering.joiner
    assert joiner.closed == 0, f"{joiner.closed} joins turned away (410): the room was closed"
    assert joiner.queued == queued_before, "a seated listener was put in line (429)"
    for listener in lingering.gone:
        stats = listener.stats
        told = dict(stats.moves)
        assert not [r for r in told if r.endswith("grace-over")], (listener.name, told)
        assert stats.turned_away == 0 and not stats.refusals, (listener.name, stats.refusals)
        assert (stats.joins, stats.disconnects) == (1, 0), (listener.name, stats.relays)
        assert stats.relocations == len(stats.relays) - 1, (listener.name, stats.relays)
    relocated = sum(lst.stats.relocations for lst in lingering.gone)
    print(f"the {len(lingering.gone)} lingering listeners moved {relocated} times, all "
          "make-before-break; none dropped, queued or turned away")  # fmt: skip


def _ordinal(pod: str) -> int:
    return int(pod.rsplit("-", 1)[1])


def _relays_go_as_the_lingering_listeners_move_down(watch: PodWatch, start: float) -> None:
    """Judged by the load generator's counts per relay pod (the listeners' side) and the
    pods the API server has, not by the shard map."""
    fallen = [s for s in watch.samples if start + 47 <= s[0] <= start + LEAVE - 2]
    assert fallen, "samples while only the lingering listeners were left"
    at_fall = fallen[0]
    carrying = sorted(_ordinal(p) for p, n in at_fall[2].items() if n > 0 and p in at_fall[1])
    assert max(carrying) >= 1, f"listeners lingered above relay 0: on relays {carrying}"
    lingering = [sum(counted.values()) for _, _, counted in fallen]
    assert min(lingering) == LINGERING, f"nobody lingering was dropped: {min(lingering)}"
    gone = sorted(
        # a removal is timed by the first sample without the pod: one timed at_fall went before
        ((t, _ordinal(pod)) for t, pod, _ in watch.removals() if t > at_fall[0]),
        key=lambda removal: (removal[0], -removal[1]),
    )
    before_leaving = [o for t, o in gone if t < start + LEAVE]
    above = [o for o in at_fall[1] if _ordinal(o) >= 1]
    assert len(before_leaving) == len(above), (
        f"every relay above relay 0 ({sorted(above)}) went while the {LINGERING} listeners "
        f"still listened, long before the drain timeout: only {before_leaving} did"
    )
    # Each went as it emptied: soon after the listeners' side last saw anyone on it or on a
    # relay above it (a StatefulSet removes its highest ordinal first; a relay whose only
    # listeners were the simulated ones empties when they leave, and waits for those above
    # it), a scrape, a count and a pass later; not when the relays below it emptied too.
    lags = {}
    for removed_at, ordinal in gone:
        above = [p for p in at_fall[1] if _ordinal(p) >= ordinal]
        held = [
            t
            for t, _, counted in watch.samples
            if t < removed_at and any(counted.get(pod, 0) for pod in above)
        ]
        lags[ordinal] = removed_at - max(held, default=at_fall[0])
    late = {
        o: round(lag, 1) for o, lag in lags.items() if o in before_leaving and lag > EMPTY_TO_GONE
    }
    moves = [round(t - start, 1) for t, _ in watch.map_moves if t > start]
    assert not late, (
        f"relays went well after they emptied (s after the last listener): {late}; removals "
        f"(s after the start, relay) {[(round(t - start, 1), o) for t, o in gone]}; the map "
        f"moved shards at (s after the start) {moves}"
    )
    print(
        f"lingering on relays {carrying} at the fall; relays {before_leaving} removed "
        + ", ".join(f"{t - start:.1f}" for t, o in gone if o in before_leaving)
        + f" s after the start, {', '.join(f'{lags[o]:.1f}' for o in before_leaving)} s after "
        + f"each emptied; the listeners left at {LEAVE} s"
    )


def test_a_min_relays_zero_room_grows_from_zero_when_joins_wait(
    api_client: client.ApiClient,
    namespace: str,
    kubeconfig: Path,
    prometheus: Prometheus,
    scaling_operator: OperatorProcess,
    tmp_path: Path,
) -> None:
    rooms = Rooms(api_client, namespace)
    manifest: dict[str, Any] = scaling_room("empty", start_in=3, duration="10m", audience=0)
    manifest["spec"]["scaling"]["minRelays"] = 0
    rooms.create(manifest)
    wait_until(lambda: rooms.phase("empty") == "Live", 90, "the room to go live")
    assert rooms.relays("empty") == (0, 0), "no audience declared, no relay"
    trace = write_trace(tmp_path / "joins.csv", [(-20, 0), (0, 250), (600, 250)])
    edges = EdgeFleet(kubeconfig, namespace, prometheus, tmp_path, replicas=1)
    load = LoadGenerator(kubeconfig, namespace, "empty", trace, edges)
    prometheus.add_target(load.address)
    try:
        wait_until(lambda: rooms.relays("empty")[0] >= 4, 60, "relays for the waiting joins")
        wait_until(
            lambda: sum(listeners_by_pod(load).values()) >= 250, 60, "the joins to be served"
        )
    finally:
        load.stop()
        edges.stop()
    scaled = [e for e in rooms.events("empty") if e.reason == "ScaledUp"]
    assert scaled and "waiting" in scaled[0].message
