"""How the edge adds up the sources that report one relay pod, and bridges a missed one."""

from __future__ import annotations

from townsquare.edge.admission import Report
from townsquare.edge.reports import MISSING_PART_GRACE, carry_missing_parts, combine

RELAY = ("ns", "launch", "launch-relay-0", "127.80.0.5:9090")
LOAD = ("ns", "launch", "launch-relay-0", "127.0.0.1:9464")
OTHER = ("ns", "launch", "launch-relay-1", "127.0.0.1:9464")


def test_a_pod_reported_by_two_sources_counts_both_and_the_older_time() -> None:
    reports = combine({RELAY: Report(7, 100.0), LOAD: Report(5, 99.5), OTHER: Report(3, 99.5)})
    assert reports == {
        ("ns", "launch", "launch-relay-0"): Report(12, 99.5),
        ("ns", "launch", "launch-relay-1"): Report(3, 99.5),
    }


def test_a_source_that_missed_a_scrape_still_counts_for_a_while() -> None:
    first = carry_missing_parts({RELAY: Report(7, 100.0), LOAD: Report(90, 100.0)}, {}, now=0.0)
    # The load generator's scrape failed: its series is gone, the relay's is not.
    missed = carry_missing_parts({RELAY: Report(7, 101.0)}, first, now=1.0)
    pod = ("ns", "launch", "launch-relay-0")
    assert combine({k: part for k, (part, _) in missed.items()})[pod] == Report(97, 100.0)
    later = carry_missing_parts({RELAY: Report(7, 111.0)}, missed, now=MISSING_PART_GRACE + 1)
    assert combine({k: part for k, (part, _) in later.items()})[pod] == Report(7, 111.0)


def test_a_pod_no_source_reports_any_more_drops_out() -> None:
    first = carry_missing_parts({RELAY: Report(7, 100.0), OTHER: Report(3, 100.0)}, {}, now=0.0)
    assert set(carry_missing_parts({OTHER: Report(3, 101.0)}, first, now=1.0)) == {OTHER}
