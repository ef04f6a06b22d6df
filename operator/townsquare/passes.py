"""Every room's reconcile passes from one task: a heap of due times, not a task per room.

kopf's daemons cost a task, a stopper and a live copy of the object for every room (22 KiB
of Python objects per room measured, over half of it managedFields): at 10,000 rooms that
alone passes the operator's memory budget. Here a room costs an entry in a dict and one in
a heap. A room is never in two passes at once; a wake-up during its pass runs it again
right after. At most `workers` passes run at once, so a start-up of thousands of rooms
queues instead of piling threads and connections on the API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

Pass = Callable[[K], Awaitable[float | None]]
"""One pass over a room; returns the seconds until it is due again (None: only when woken)."""


class PassScheduler(Generic[K]):
    """Runs `run_pass` for each room when it is due or woken, one pass per room at a time."""

    def __init__(
        self,
        run_pass: Pass[K],
        workers: int = 8,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        may_run: Callable[[K], bool] = lambda _: True,
    ) -> None:
        self._run_pass = run_pass
        self._may_run = may_run
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._slots = asyncio.Semaphore(workers)
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = itertools.count()
        self._again: set[K] = set()
        self._dropped: set[K] = set()
        self._parked: set[K] = set()
        """Rooms due while `may_run` said no (their slot is another replica's for now)."""
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.running: dict[K, float] = {}
        """Rooms in a pass now, with when it began (clock): for liveness."""
        self.paused = False
        """While True no pass starts (another replica acts); wake-ups are kept for later."""

    def __contains__(self, key: object) -> bool:
        return key in self._due or key in self.running or key in self._parked

    def __len__(self) -> int:
        return len(self._due.keys() | self.running.keys() | self._parked)

    def wake(self, key: K, delay: float = 0.0) -> None:
        """Run the room's pass `delay` seconds from now, or sooner if it was due sooner.
        Call on the event loop (see `wake_threadsafe` from other threads)."""
        self._dropped.discard(key)
        if key in self._parked:
            return  # runs once `unpark` lets it
        if key in self.running and delay <= 0:
            self._again.add(key)
            return
        self._schedule(key, self._clock() + max(0.0, delay), sooner_only=True)

    def forget(self, key: K) -> None:
        """No more passes for the room (a pass running now still finishes)."""
        self._due.pop(key, None)
        self._again.discard(key)
        self._parked.discard(key)
        if key in self.running:
            self._dropped.add(key)

    def resume(self) -> None:
        """Let passes start again, every known room at once: what another replica did
        meanwhile is read afresh."""
        self.paused = False
        for key in list(self._due):
            self._schedule(key, self._clock(), sooner_only=True)
        self._changed.set()

    def unpark(self) -> list[K]:
        """Run at once the parked rooms that `may_run` now lets run; returns them."""
        ready = [key for key in self._parked if self._may_run(key)]
        for key in ready:
            self._parked.discard(key)
            self._schedule(key, self._clock(), sooner_only=True)
        return ready

    async def idle(self, poll_seconds: float = 0.02) -> None:
        """Return once no pass is running (call while paused: none starts meanwhile)."""
        while self.running:
            await asyncio.sleep(poll_seconds)

    def due_in(self, key: K) -> float | None:
        """Seconds until the room's next pass (None: none is planned)."""
        due = self._due.get(key)
        return None if due is None else due - self._clock()

    async def run(self) -> None:
        """Start passes as rooms fall due, until cancelled (then waits for running ones)."""
        try:
            while True:
                self._changed.clear()
                delay = self._start_due()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start_due(self) -> float | None:
        """Start every pass that is due (while workers are free); the wait until the next."""
        while self._heap and not self.paused:
            due, _, key = self._heap[0]
            if self._due.get(key) != due:
                heapq.heappop(self._heap)  # superseded by an earlier or later due time
                continue
            wait = due - self._clock()
            if wait > 0:
                return wait
            if self._slots.locked():
                return None  # a finishing pass sets `_changed`
            heapq.heappop(self._heap)
            del self._due[key]
            if self._may_run(key):
                self._start(key)
            else:
                self._parked.add(key)
        return None

    def _start(self, key: K) -> None:
        self.running[key] = self._clock()
        task = asyncio.create_task(self._one_pass(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _one_pass(self, key: K) -> None:
        next_in: float | None = None
        async with self._slots:
            try:
                next_in = await self._run_pass(key)
            except Exception:
                logging.getLogger(__name__).exception("a pass failed: %s", key)
                next_in = self._retry_seconds
            finally:
                del self.running[key]
                if key in self._dropped:
                    self._dropped.discard(key)
                    next_in = None
                elif key in self._again:
                    self._again.discard(key)
                    next_in = 0.0
                if next_in is not None:
                    self._schedule(key, self._clock() + max(0.0, next_in), sooner_only=False)
                self._changed.set()

    def _schedule(self, key: K, due: float, sooner_only: bool) -> None:
        current = self._due.get(key)
        if sooner_only and current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._order), key))
        if len(self._heap) > 2 * len(self._due) + 64:  # drop superseded entries
            self._heap = [(d, n, k) for d, n, k in self._heap if self._due.get(k) == d]
            heapq.heapify(self._heap)
        if self._heap[0][2] == key:
            self._changed.set()
