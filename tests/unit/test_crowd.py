"""The real listeners' own stalls, set against the gaps they heard."""

from __future__ import annotations

from townsquare.relay.crowd import with_stalls


def gap(at: float, seconds: float) -> dict[str, float | str]:
    return {"listener": "listener-0", "at": at, "seconds": seconds, "cause": "no notice", "lost": 0}


def test_each_gap_counts_the_stalls_it_overlaps_and_no_others() -> None:
    stalls = [(10.0, 0.5), (11.0, 0.2), (20.0, 1.0)]
    gaps = with_stalls([gap(9.8, 0.6), gap(10.9, 0.5), gap(15.0, 0.1), gap(20.5, 0.2)], stalls)
    assert [g["stalled"] for g in gaps] == [0.4, 0.2, 0.0, 0.2]


def test_thousands_of_gaps_and_stalls_are_matched_as_a_pairwise_sum_would() -> None:
    stalls = [(i * 1.0, 0.3) for i in range(3000)]
    gaps = [gap(i * 0.2 + 0.1, 0.15) for i in range(15000)]
    placed = with_stalls([dict(g) for g in gaps], stalls)
    for g in placed[:500]:
        begins, ends = float(g["at"]), float(g["at"]) + float(g["seconds"])
        pairwise = sum(max(0.0, min(ends, a + d) - max(begins, a)) for a, d in stalls)
        assert g["stalled"] == round(min(pairwise, float(g["seconds"])), 3)
