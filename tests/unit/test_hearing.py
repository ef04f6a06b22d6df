"""Gaps real listeners heard, placed beside the changes the operator announced."""

from __future__ import annotations

from townsquare.hearing import Gap, longest_near, lost_near, place_gaps

EVENTS = [(100.0, "ScaledUp"), (101.0, "Resharded"), (200.0, "ScaledDown"), (300.0, "Live")]


def gap(at: float, seconds: float, lost: int = 0) -> Gap:
    return Gap(listener="listener-1", at=at, seconds=seconds, cause="relocated: shard", lost=lost)


def test_a_gap_soon_after_an_event_is_placed_near_it_and_others_are_not() -> None:
    placed = place_gaps(
        [gap(104.0, 0.08), gap(205.0, 0.3, lost=4), gap(150.0, 1.2), gap(301.0, 0.5)], EVENTS
    )
    assert [p.near for p in placed] == [("reshard", "scale-up"), ("drain",), (), ()]
    assert longest_near(placed) == {"drain": 0.3, "reshard": 0.08, "scale-up": 0.08}
    assert lost_near(placed) == {"drain": 4, "reshard": 0, "scale-up": 0}


def test_the_listeners_own_stall_does_not_count_against_the_change() -> None:
    stalled = Gap("listener-2", 104.0, 0.9, "no notice", 0, stalled=0.85)
    (placed,) = place_gaps([stalled], EVENTS)
    assert placed.near == ("reshard", "scale-up")
    assert round(longest_near([placed])["reshard"], 3) == 0.05


def test_a_gap_just_before_its_event_still_counts_and_long_after_does_not() -> None:
    # The map is written (and relays act) a moment before the Event is posted.
    before, long_after = place_gaps([gap(199.0, 0.1), gap(216.0, 0.1)], EVENTS)
    assert before.near == ("drain",)
    assert long_after.near == ()


def test_records_as_the_load_generator_writes_them() -> None:
    record = {"listener": "listener-7", "at": 12.5, "seconds": 0.061, "cause": "no notice",
              "lost": 2}  # fmt: skip
    assert Gap.of(record) == Gap("listener-7", 12.5, 0.061, "no notice", 2)
    assert Gap.of({**record, "stalled": 0.05}).beyond_stall == 0.061 - 0.05
