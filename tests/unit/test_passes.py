"""One scheduler runs every room's passes: when due or woken, never two of one room at once,
at most `workers` at a time, none while another replica acts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from townsquare.passes import PassScheduler

T = TypeVar("T")


async def _until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)
    assert check(), what


def _run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())


def test_a_woken_room_is_passed_and_again_when_its_pass_said() -> None:
    async def scenario() -> list[str]:
        passed: list[str] = []

        async def one_pass(key: str) -> float | None:
            passed.append(key)
            return 0.01 if len(passed) < 3 else None  # due again soon, twice; then only woken

        scheduler = PassScheduler(one_pass)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("a")
        await _until(lambda: len(passed) == 3, "three passes")
        await asyncio.sleep(0.05)
        runner.cancel()
        return passed

    assert _run(scenario) == ["a", "a", "a"], "no pass without a due time or a wake-up"


def test_a_room_woken_during_its_pass_runs_again_after_it_never_beside_it() -> None:
    async def scenario() -> tuple[int, int]:
        release = asyncio.Event()
        inside, most, passes = 0, 0, 0

        async def one_pass(key: str) -> float | None:
            nonlocal inside, most, passes
            inside += 1
            most = max(most, inside)
            passes += 1
            if passes == 1:
                await release.wait()
            inside -= 1
            return None

        scheduler = PassScheduler(one_pass)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("a")
        await _until(lambda: passes == 1, "the first pass")
        scheduler.wake("a")
        scheduler.wake("a")
        await asyncio.sleep(0.02)
        assert passes == 1, "not beside the running pass"
        release.set()
        await _until(lambda: passes == 2, "the pass asked for meanwhile")
        await asyncio.sleep(0.05)
        runner.cancel()
        return most, passes

    assert _run(scenario) == (1, 2), "two wake-ups during a pass make one pass after it"


def test_at_most_workers_passes_run_at_once_and_every_room_gets_its_turn() -> None:
    async def scenario() -> tuple[int, set[int]]:
        inside, most = 0, 0
        passed: set[int] = set()

        async def one_pass(key: int) -> float | None:
            nonlocal inside, most
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.002)
            passed.add(key)
            inside -= 1
            return None

        scheduler = PassScheduler(one_pass, workers=3)
        runner = asyncio.create_task(scheduler.run())
        for key in range(50):
            scheduler.wake(key)
        await _until(lambda: len(passed) == 50, "all 50 rooms")
        runner.cancel()
        return most, passed

    most, passed = _run(scenario)
    assert most == 3 and passed == set(range(50))


def test_a_room_forgotten_during_its_pass_is_not_passed_again() -> None:
    async def scenario() -> int:
        release = asyncio.Event()
        passes = 0

        async def one_pass(key: str) -> float | None:
            nonlocal passes
            passes += 1
            await release.wait()
            return 0.0  # would be due at once

        scheduler = PassScheduler(one_pass)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("gone")
        await _until(lambda: passes == 1, "the pass")
        scheduler.forget("gone")
        release.set()
        await asyncio.sleep(0.05)
        assert "gone" not in scheduler
        runner.cancel()
        return passes

    assert _run(scenario) == 1


def test_nothing_runs_while_paused_and_every_room_runs_on_resume() -> None:
    async def scenario() -> list[str]:
        passed: list[str] = []

        async def one_pass(key: str) -> float | None:
            passed.append(key)
            return 3600.0  # next due in an hour

        scheduler = PassScheduler(one_pass)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("a")
        scheduler.wake("b")
        await _until(lambda: len(passed) == 2, "both rooms")
        scheduler.paused = True
        scheduler.wake("a")
        await asyncio.sleep(0.05)
        assert len(passed) == 2, "no pass while paused"
        scheduler.resume()
        await _until(lambda: len(passed) == 4, "both rooms again, due in an hour or not")
        runner.cancel()
        return passed

    assert sorted(_run(scenario)) == ["a", "a", "b", "b"]


def test_a_failing_pass_is_retried() -> None:
    async def scenario() -> int:
        passes = 0

        async def one_pass(key: str) -> float | None:
            nonlocal passes
            passes += 1
            if passes == 1:
                raise RuntimeError("the API server refused")
            return None

        scheduler = PassScheduler(one_pass, retry_seconds=0.01)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("a")
        await _until(lambda: passes == 2, "the retry")
        runner.cancel()
        return passes

    assert _run(scenario) == 2


def test_a_room_another_replica_holds_is_parked_until_let_run_then_passed_at_once() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        passed: list[str] = []
        ours = {"a"}

        async def one_pass(key: str) -> float | None:
            passed.append(key)
            return None

        scheduler = PassScheduler(one_pass, may_run=lambda key: key in ours)
        runner = asyncio.create_task(scheduler.run())
        scheduler.wake("a")
        scheduler.wake("b")
        await _until(lambda: passed == ["a"], "the room we hold")
        await asyncio.sleep(0.05)
        before = list(passed)
        scheduler.wake("b")  # a wake-up of a parked room waits too
        await asyncio.sleep(0.05)
        assert "b" in scheduler
        ours.add("b")
        assert scheduler.unpark() == ["b"]
        await _until(lambda: passed == ["a", "b"], "the room let go to us")
        runner.cancel()
        return before, passed

    before, after = _run(scenario)
    assert before == ["a"]
    assert after == ["a", "b"]
