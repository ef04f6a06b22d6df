"""The saturation rule of `make bench-relay` and the load generator's measured cap of real
listeners.

The rule is checked on figures written out by hand; the cap is measured for real (an origin,
a relay and a listener process on loopback, a few listeners, short windows), its verdict
coming from what the listeners heard, not from the relay.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import uvloop

from townsquare.relay.saturation import (
    CAP_SHARE,
    MAX_GAP_MS,
    ON_TIME_SHARE,
    Ramp,
    Step,
    measure_listener_cap,
    short_of,
)


def step(listeners: int, on_time: float = 1.0, gap: float = 40.0, **more: float) -> Step:
    server, loadgen = more.get("server", 0.5), more.get("loadgen", 0.5)
    closed = int(more.get("closed", 0))
    return Step(listeners, on_time, on_time, gap, server, loadgen, more.get("load", 1.0), closed)


def test_a_step_is_carried_only_with_frames_on_time_no_long_silence_and_nobody_dropped() -> None:
    assert step(1000).carried
    assert step(1000, on_time=ON_TIME_SHARE).carried
    assert not step(1000, on_time=ON_TIME_SHARE - 0.0005).carried
    assert step(1000, gap=MAX_GAP_MS).carried
    assert not step(1000, gap=MAX_GAP_MS + 1).carried
    assert not step(1000, closed=1).carried


def test_a_ramp_reports_the_largest_count_carried_and_what_ran_out() -> None:
    ramp = Ramp("relay", [step(500), step(1000), step(1500, on_time=0.9, server=0.97),
                          step(1500, on_time=0.5, server=0.95), step(1250)])  # fmt: skip
    assert ramp.carried == 1250
    assert ramp.missed is not None and ramp.missed.listeners == 1500
    assert "the server's core" in short_of(ramp.missed)
    starved = step(2000, on_time=0.2, server=0.4, loadgen=0.6, load=5.2)
    assert "the machine" in short_of(starved) and "load average 5.2" in short_of(starved)
    assert Ramp("echo", [step(250, gap=900)]).carried == 0


def test_the_real_listener_cap_is_measured_by_what_listeners_heard() -> None:
    cap = uvloop.run(measure_listener_cap(steps=(5, 10), seconds=0.5))
    assert cap.carried in (0, 5, 10)
    if cap.carried == 0:  # the measurement doing its job on a machine busier than its cores
        assert cap.load > (os.cpu_count() or 1), "only an overloaded machine misses 5 listeners"
    assert cap.use == int(cap.carried * CAP_SHARE)
    assert cap.as_record()["carried"] == cap.carried


@pytest.mark.parametrize(("given", "expected"), [("-1", "must be 0 or more"), ("lots", "'auto'")])
def test_a_bad_real_listener_count_is_one_line_and_exit_2(given: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "townsquare", "loadgen", "--room", "ns/room", "--trace", "t.csv",
         "--real-listeners", given],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--real-listeners" in lines[0] and expected in lines[0]
