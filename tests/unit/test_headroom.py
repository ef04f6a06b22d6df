"""Node headroom: the lead time, how many placeholders and of what shape, and that they go in
every phase (re-planned down and deleted rooms included)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from townsquare import headroom
from townsquare.api.models import (
    AudioRoomSpec,
    AudioRoomStatus,
    Condition,
    NodeHeadroomSpec,
    Phase,
    PlanStatus,
)
from townsquare.headroom import Placeholder, Relays, decide, node_lead_time, wanted_placeholders
from townsquare.kube.children import relay_stateful_set
from townsquare.kube.client import relay_pod
from townsquare.kube.placeholders import (
    placeholder,
    placeholder_pod,
    placeholder_selector,
    room_nodes,
)
from townsquare.lifecycle import Observed, Outcome, reconcile

START = datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
PREWARM = START - timedelta(minutes=2)


def room(audience: int = 7000, lead: str | None = "3m", enabled: bool = True) -> AudioRoomSpec:
    """10 relays (1,000 listeners each at 70%), pre-warm 2 min before the start."""
    node_headroom: dict[str, object] = {"enabled": enabled}
    if lead:
        node_headroom["leadTime"] = lead
    return AudioRoomSpec.model_validate(
        {
            "startTime": START,
            "duration": "10m",
            "expectedAudience": audience,
            "relay": {
                "image": "relay:1",
                "startupSeconds": 5,
                "resources": {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"cpu": "4"}},
                "nodeSelector": {"pool": "relays"},
                "tolerations": [{"key": "dedicated", "value": "relays", "effect": "NoSchedule"}],
            },
            "scaling": {"minRelays": 1, "prewarmLead": "2m", "drainTimeout": "1m"},
            "nodeHeadroom": node_headroom,
        }
    )


def pods(count: int, *, scheduled: int = 0, at: datetime = PREWARM) -> tuple[Placeholder, ...]:
    return tuple(
        Placeholder(
            name=f"room-headroom-{i}",
            created=at - timedelta(minutes=3),
            scheduled_at=at - timedelta(minutes=2) if i < scheduled else None,
        )
        for i in range(count)
    )


def at(
    spec: AudioRoomSpec,
    phase: Phase,
    relays: Relays,
    placeholders: tuple[Placeholder, ...],
    previous: Condition | None,
    now: datetime,
    *,
    deleting: bool = False,
) -> headroom.Headroom:
    plan = plan_of(spec)
    return decide(
        "room", spec.node_headroom, plan, phase, relays, placeholders, previous, now,
        deleting=deleting,
    )  # fmt: skip


# --- lead time ------------------------------------------------------------------------------


def test_lead_time_is_the_spec_field_when_set() -> None:
    spec = NodeHeadroomSpec.model_validate({"enabled": True, "leadTime": "7m"})
    assert node_lead_time(spec, [400.0]) == timedelta(minutes=7)


def test_lead_time_defaults_to_five_minutes_without_history() -> None:
    assert node_lead_time(NodeHeadroomSpec(enabled=True), []) == timedelta(minutes=5)


def test_lead_time_is_learned_from_the_rooms_longest_recent_wait() -> None:
    spec = NodeHeadroomSpec(enabled=True)
    # 40 s slowest wait: 1.5 x 40 + 15 s margin
    assert node_lead_time(spec, [2.0, 40.0, 10.0]) == timedelta(seconds=75)
    # only the newest 20 waits count: an old slow node no longer stretches the lead
    assert node_lead_time(spec, [600.0] + [10.0] * 20) == timedelta(seconds=30)


@given(st.lists(st.floats(min_value=0, max_value=3600), min_size=1, max_size=30))
def test_learned_lead_time_covers_every_recent_wait(waits: list[float]) -> None:
    lead = node_lead_time(NodeHeadroomSpec(enabled=True), waits)
    assert lead.total_seconds() >= max(waits[-headroom.WAIT_SAMPLES :])


# --- count ----------------------------------------------------------------------------------


def plan_of(spec: AudioRoomSpec) -> PlanStatus:
    outcome = reconcile("room", spec, AudioRoomStatus(), Observed(START - timedelta(days=1), 1, 0))
    assert outcome.status.plan is not None
    return outcome.status.plan


def test_no_placeholders_before_the_node_lead_time() -> None:
    spec = room()
    decision = at(
        spec, "Scheduled", Relays(1, 1), (), None, PREWARM - timedelta(minutes=3, seconds=1)
    )
    assert (decision.wanted, decision.create) == (0, ())
    assert decision.wake_at == PREWARM - timedelta(minutes=3)


def test_the_plan_less_the_existing_relays_from_the_node_lead_time_on() -> None:
    spec = room()
    decision = at(spec, "Scheduled", Relays(1, 1), (), None, PREWARM - timedelta(minutes=3))
    assert decision.wanted == 9
    assert decision.create == tuple(f"room-headroom-{i}" for i in range(9))
    assert [e[1] for e in decision.events] == ["NodesRequested"]
    assert (
        "9 placeholder pods ask the node autoscaler for nodes for 10 relays"
        in (decision.events[0][2])
    )
    assert decision.condition is not None and decision.condition.reason == "NodesRequested"


def test_missing_placeholders_are_completed_not_doubled() -> None:
    spec = room()
    existing = (pods(9)[0], pods(9)[4])
    decision = at(
        spec, "Scheduled", Relays(1, 1), existing, _requested(), PREWARM - timedelta(minutes=1)
    )
    assert len(decision.create) == 7
    assert not set(decision.create) & {"room-headroom-0", "room-headroom-4"}
    assert decision.events == ()


def test_placeholders_only_shrink_during_the_prewarm_as_relays_take_their_place() -> None:
    plan = plan_of(room())
    # 4 of 10 relays on nodes: 6 placeholders are still needed, but none are made anew
    assert (
        wanted_placeholders(plan, "PreWarming", Relays(10, 4), 9, PREWARM, PREWARM, enabled=True)
        == 6
    )
    assert (
        wanted_placeholders(plan, "PreWarming", Relays(10, 4), 2, PREWARM, PREWARM, enabled=True)
        == 2
    )
    assert (
        wanted_placeholders(plan, "PreWarming", Relays(10, 10), 9, PREWARM, PREWARM, enabled=True)
        == 0
    )


def test_the_pending_placeholders_go_first() -> None:
    spec = room()
    existing = pods(9, scheduled=5)
    decision = at(
        spec, "PreWarming", Relays(10, 6), existing, _requested(), PREWARM + timedelta(seconds=5)
    )
    assert decision.wanted == 4
    assert len(decision.delete) == 5
    assert set(decision.delete) >= {f"room-headroom-{i}" for i in (5, 6, 7, 8)}, "Pending first"


@pytest.mark.parametrize("phase", ["Ready", "Live", "Draining", "Ended"])
def test_every_placeholder_goes_once_the_room_is_ready_live_or_over(phase: str) -> None:
    spec = room()
    decision = at(spec, phase, Relays(10, 10), pods(9, scheduled=9), _requested(), START)
    assert decision.wanted == 0
    assert len(decision.delete) == 9


def test_every_placeholder_goes_when_the_room_is_deleted() -> None:
    spec = room()
    decision = at(
        spec,
        "Scheduled",
        Relays(1, 1),
        pods(9),
        _requested(),
        PREWARM - timedelta(minutes=1),
        deleting=True,
    )
    assert (decision.wanted, len(decision.delete), decision.events) == (0, 9, ())


def test_every_placeholder_goes_when_headroom_is_turned_off() -> None:
    spec = room(enabled=False)
    decision = at(
        spec, "Scheduled", Relays(1, 1), pods(9), _requested(), PREWARM - timedelta(minutes=1)
    )
    assert (decision.wanted, len(decision.delete), decision.request_at) == (0, 9, None)


def test_replanning_down_removes_the_excess() -> None:
    smaller = room(audience=3500)  # 5 relays
    decision = at(
        smaller,
        "Scheduled",
        Relays(1, 1),
        pods(9, scheduled=9),
        _requested(),
        PREWARM - timedelta(minutes=1),
    )
    assert (decision.wanted, len(decision.delete)) == (4, 5)


def test_replanning_up_asks_for_more_nodes() -> None:
    bigger = room(audience=14000)  # 20 relays
    ready = Condition.model_validate(
        {"type": "NodesReady", "status": "True", "reason": "NodesReady",
         "lastTransitionTime": PREWARM - timedelta(minutes=2)}
    )  # fmt: skip
    decision = at(
        bigger,
        "Scheduled",
        Relays(1, 1),
        pods(9, scheduled=9),
        ready,
        PREWARM - timedelta(minutes=1),
    )
    assert (decision.wanted, len(decision.create)) == (19, 10)
    assert decision.events[0][1] == "NodesRequested"
    assert decision.events[0][2].startswith("10 more placeholder pods")


@given(
    relays=st.integers(min_value=0, max_value=40),
    scheduled=st.integers(min_value=0, max_value=40),
    existing=st.integers(min_value=0, max_value=40),
    phase=st.sampled_from(["Scheduled", "PreWarming", "Ready", "Live", "Draining", "Ended"]),
)
def test_placeholders_and_relays_never_ask_for_more_nodes_than_the_plan(
    relays: int, scheduled: int, existing: int, phase: str
) -> None:
    plan = plan_of(room())
    scheduled = min(scheduled, relays)
    wanted = wanted_placeholders(
        plan, phase, Relays(relays, scheduled), existing, START, PREWARM, enabled=True
    )
    assert wanted >= 0
    assert wanted <= max(0, plan.relays - min(relays if phase == "Scheduled" else scheduled, 10))
    if phase != "Scheduled":
        assert wanted <= existing


# --- Events and the condition ---------------------------------------------------------------


def _requested() -> Condition:
    return Condition.model_validate(
        {"type": "NodesReady", "status": "False", "reason": "NodesRequested",
         "lastTransitionTime": PREWARM - timedelta(minutes=3)}
    )  # fmt: skip


def test_nodes_ready_once_every_placeholder_is_on_a_node() -> None:
    spec = room()
    decision = at(
        spec,
        "Scheduled",
        Relays(1, 1),
        pods(9, scheduled=9),
        _requested(),
        PREWARM - timedelta(seconds=30),
    )
    assert decision.condition is not None
    assert (decision.condition.status, decision.condition.reason) == ("True", "NodesReady")
    (event,) = decision.events
    assert event[1] == "NodesReady"
    # requested 3 min before pre-warm, all on nodes 2 min before it
    assert "ready 1m after they were requested" in event[2]
    assert "2m before pre-warm" in event[2]


def test_nodes_not_ready_at_prewarm_is_said_in_the_condition() -> None:
    spec = room()
    decision = at(
        spec,
        "PreWarming",
        Relays(10, 3),
        pods(9, scheduled=2),
        _requested(),
        PREWARM + timedelta(seconds=5),
    )
    assert decision.condition is not None
    assert (decision.condition.status, decision.condition.reason) == (
        "False",
        "NodesNotReadyAtPreWarm",
    )
    assert "nodes for 5/10 planned relays" in decision.condition.message


def test_headroom_off_says_nothing() -> None:
    spec = room(enabled=False)
    decision = at(spec, "Scheduled", Relays(1, 1), (), None, PREWARM - timedelta(minutes=1))
    assert (decision.condition, decision.events, decision.wake_at) == (None, (), None)


# --- through the room's lifecycle -----------------------------------------------------------


def step(spec: AudioRoomSpec, status: AudioRoomStatus, at: datetime, **seen: object) -> Outcome:
    ready = int(seen.pop("ready", 0))  # type: ignore[call-overload]
    return reconcile("room", spec, status, Observed(at, 1, ready, **seen))


def test_the_room_wakes_for_its_placeholders_and_records_them() -> None:
    spec = room()
    first = step(spec, AudioRoomStatus(), START - timedelta(hours=1), ready=1)
    assert first.wake_at == PREWARM - timedelta(minutes=3)
    second = step(spec, first.status, PREWARM - timedelta(minutes=3), ready=1)
    assert second.headroom is not None and len(second.headroom.create) == 9
    assert "NodesRequested" in [e.reason for e in second.events]
    recorded = second.status.node_headroom
    assert recorded is not None
    assert (recorded.placeholders, recorded.lead_time) == (9, timedelta(minutes=3))


def test_prewarm_incomplete_names_the_pending_relays_and_the_schedulers_reason() -> None:
    spec = room(enabled=False)
    status = step(spec, AudioRoomStatus(), PREWARM + timedelta(seconds=1), ready=1).status
    reason = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    pending = tuple((f"room-relay-{i}", reason) for i in range(3, 10))
    live = step(spec, status, START + timedelta(seconds=1), ready=3, pending_relays=pending)
    incomplete = next(e for e in live.events if e.reason == "PreWarmIncomplete")
    assert incomplete.message.startswith("3/10 relays ready at the start; 7 Pending (")
    assert "room-relay-3, room-relay-4, room-relay-5, room-relay-6, room-relay-7 and 2 more" in (
        incomplete.message
    )
    assert incomplete.message.endswith(reason)


# --- shape ----------------------------------------------------------------------------------


def test_a_placeholder_asks_for_what_a_relay_asks_for() -> None:
    spec = room()
    relay = relay_stateful_set("room", "ns", "uid-1", spec, 3)["spec"]["template"]["spec"]
    pod = placeholder_pod("room", "ns", "uid-1", spec, "room-headroom-0")
    placeholder = pod["spec"]
    assert [c["resources"] for c in placeholder["containers"]] == [
        c["resources"] for c in relay["containers"]
    ]
    assert placeholder["containers"][0]["resources"]["requests"] == {"cpu": "4", "memory": "2Gi"}
    assert placeholder["nodeSelector"] == relay["nodeSelector"] == {"pool": "relays"}
    assert placeholder["tolerations"] == relay["tolerations"]
    assert placeholder["priorityClassName"] == "townsquare-headroom"
    assert placeholder["terminationGracePeriodSeconds"] == 0
    assert pod["metadata"]["labels"].items() >= placeholder_selector("room").items()
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    relay_labels = relay_stateful_set("room", "ns", "uid-1", spec, 3)["spec"]["selector"]
    assert not relay_labels["matchLabels"].items() <= pod["metadata"]["labels"].items(), (
        "a placeholder is never counted as a relay"
    )


def test_the_rooms_pods_say_which_relays_wait_for_a_node_and_how_long_pods_waited() -> None:
    created = "2026-12-01T22:50:00Z"

    def pod(
        name: str, node: str | None, scheduled: str | None, message: str = ""
    ) -> dict[str, Any]:
        condition = {"type": "PodScheduled", "status": "True" if node else "False"}
        condition |= {"lastTransitionTime": scheduled} if scheduled else {"message": message}
        return {
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node} if node else {},
            "status": {"conditions": [condition]},
        }

    reason = "0/3 nodes are available: 3 Insufficient cpu."
    relays = [
        relay_pod(pod("room-relay-0", "n1", "2026-12-01T22:50:40Z"), "room"),
        relay_pod(pod("room-relay-1", None, None, reason), "room"),
    ]
    held = [placeholder(pod("room-headroom-0", "n2", "2026-12-01T22:50:30Z"))]
    nodes = room_nodes("room", [r for r in relays if r], [p for p in held if p])
    assert nodes.relays == Relays(existing=2, scheduled=1)
    assert nodes.pending_relays == (("room-relay-1", reason),)
    assert sorted(nodes.waits) == [30.0, 40.0]
