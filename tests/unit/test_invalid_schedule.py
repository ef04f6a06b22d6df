"""A schedule the operator cannot use: refused at apply where the API server can check it,
and otherwise refused by the operator without ever keeping a deleted room Terminating."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from pydantic import ValidationError
from test_lifecycle_reentry import START, reasons, room, seen

from townsquare.api.errors import describe
from townsquare.api.models import CRON_GRAMMAR, AudioRoomSpec, AudioRoomStatus
from townsquare.handlers import _read_spec
from townsquare.lifecycle import reconcile

STORED: dict[str, Any] = {
    "startTime": "2026-12-03T16:00:00Z",
    "duration": "1h",
    "expectedAudience": 7000,
    "relay": {"image": "registry.example/relay:1"},
}


@pytest.mark.parametrize(
    "cron", ["0 17 * * 4", "*/15 9-17 * * MON-FRI", "0 0 1,15 * *", "30 8 1 jan-mar 0-6"]
)
def test_the_cron_grammar_takes_ordinary_schedules(cron: str) -> None:
    assert re.match(CRON_GRAMMAR, cron)
    assert room(schedule={"cron": cron}).schedule is not None


@pytest.mark.parametrize(
    "cron", ["61 * * * *", "0 24 * * *", "0 17 32 * *", "0 17 * 13 *", "0 17 * * 8", "0 17 * *"]
)
def test_a_cron_out_of_range_is_refused_naming_the_field(cron: str) -> None:
    # The same grammar is the CRD's CEL rule, so the API server refuses these at apply.
    assert not re.match(CRON_GRAMMAR, cron)
    with pytest.raises(ValidationError) as refused:
        AudioRoomSpec.model_validate({**STORED, "schedule": {"cron": cron}})
    assert describe(refused.value).startswith("schedule.cron: must be five cron fields")


def test_a_stored_schedule_the_operator_cannot_read_refuses_the_room() -> None:
    # `Europe/Pariss` matches the CRD's pattern: only the operator finds it is no zone.
    stored = {**STORED, "schedule": {"cron": "0 17 * * 4", "timeZone": "Europe/Pariss"}}
    spec, problems = _read_spec(stored)
    assert spec.schedule is None
    assert len(problems) == 1 and problems[0].startswith("spec.schedule.timeZone: ")

    outcome = reconcile("r", spec, AudioRoomStatus(), seen(START), spec_problems=problems)

    assert outcome.refused
    accepted = next(c for c in outcome.status.conditions if c.type == "Accepted")
    assert (accepted.status, accepted.reason) == ("False", "InvalidSpec")
    assert "Europe/Pariss" in accepted.message
    assert reasons(outcome) == ["Refused"]


def test_a_deleted_room_with_an_unreadable_schedule_still_drains() -> None:
    stored = {**STORED, "schedule": {"cron": "0 17 * * 4", "timeZone": "Europe/Pariss"}}
    spec, problems = _read_spec(stored)
    at = START + timedelta(minutes=10)
    live = reconcile("r", spec, AudioRoomStatus(), seen(at, 7)).status

    deleting = reconcile(
        "r",
        spec,
        live,
        seen(at + timedelta(seconds=5), 7, deleting_since=at),
        spec_problems=problems,
    )

    # Still refused (nothing of its spec applied), it winds down by its relay count and map.
    assert deleting.refused and deleting.children
    assert deleting.status.phase == "Draining"
    timeout = at + spec.scaling.drain_timeout
    timed_out = reconcile(
        "r", spec, deleting.status, seen(timeout, 7, deleting_since=at), spec_problems=problems
    )
    assert timed_out.desired_relays == 0
    drained = reconcile(
        "r", spec, timed_out.status, seen(timeout, 0, deleting_since=at), spec_problems=problems
    )
    assert drained.released, "so it never stays Terminating"


def test_a_spec_broken_elsewhere_still_fails_loudly() -> None:
    with pytest.raises(ValidationError):
        _read_spec({**STORED, "expectedAudience": -1})
