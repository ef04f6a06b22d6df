"""A crowd of real listeners in a process of its own, driven over a pipe.

The load generator simulates most of an audience and holds a few real listener connections
beside it. In one process they share one interpreter: during a join storm the simulation
kept the listeners from reading for seconds at a time, every listener "heard" the same gap
with no frame lost (the frames waited in its socket), and the simulation's own scrapes
failed. Here the listeners run in a process of their own (`CrowdProcess` spawns it; the
parent sends start/leave and reads back who is connected and what they heard), and the
crowd notes its own stalls, so that a gap can be told apart from the process not running.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import multiprocessing
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp

from townsquare.relay.listener import EdgeJoiner, Joiner, JoinLine, Listener

STALL_PROBE_SECONDS = 0.01
STALL_NOTED_SECONDS = 0.03
"""The crowd's loop woke this much later than asked: its process was not running."""
MakeJoiner = Callable[[aiohttp.ClientSession], Joiner]
"""Builds the joiner in the crowd's process (picklable: a class or functools.partial)."""


def gaps_heard(listeners: Sequence[Listener], wall_offset: float) -> list[dict[str, Any]]:
    """Every interruption the listeners heard, in wall-clock time (Unix seconds, so a
    report can set each beside what the operator did then), oldest first."""
    gaps = [
        {
            "listener": listener.name,
            "at": round(stretch.started + wall_offset, 3),
            "seconds": round(stretch.seconds, 3),
            "cause": stretch.cause,
            "lost": stretch.lost,
        }
        for listener in listeners
        for stretch in listener.stats.interruptions
    ]
    return sorted(gaps, key=lambda gap: gap["at"])


def with_stalls(
    gaps: list[dict[str, Any]], stalls: list[tuple[float, float]]
) -> list[dict[str, Any]]:
    """Each gap with `stalled`: the seconds of it the listeners' own process did not run.

    Stalls follow one another (one probe measures them), so their starts and ends are both
    in order: each gap looks only at the stalls around it (a busy demo has thousands of
    each, and comparing every pair took longer than the load generator may take to stop).
    """
    ordered = sorted(stalls)
    starts = [at for at, _ in ordered]
    ends = [at + d for at, d in ordered]
    for gap in gaps:
        begins, finishes = gap["at"], gap["at"] + gap["seconds"]
        first, last = bisect.bisect_left(ends, begins), bisect.bisect_left(starts, finishes)
        overlap = sum(
            max(0.0, min(finishes, ends[i]) - max(begins, starts[i])) for i in range(first, last)
        )
        gap["stalled"] = round(min(overlap, gap["seconds"]), 3)
    return gaps


class Crowd:
    """The listeners themselves, on the running loop of the crowd's process."""

    def __init__(self, joiner: Joiner) -> None:
        self.joiner = joiner
        self.held: dict[str, tuple[Listener, asyncio.Event, asyncio.Task[None]]] = {}
        self.left: list[Listener] = []
        self.stalls: list[tuple[float, float]] = []
        """(wall time, seconds) this process's loop did not run."""

    def start(
        self, name: str, queue_ticket: str | None = None, line: dict[str, Any] | None = None
    ) -> None:
        """A listener `name`; with the queue ticket it holds, it keeps its place in line
        (and `line`, its way in so far as JoinLine's fields, goes on being timed here)."""
        if queue_ticket and isinstance(self.joiner, EdgeJoiner):
            self.joiner.queue_tickets[name] = queue_ticket
            if line:
                place = line.get("place")
                self.joiner.lines[name] = JoinLine(
                    **{**line, "place": tuple(place) if place else None}
                )
        listener, stop = Listener(name, self.joiner), asyncio.Event()
        self.held[name] = (listener, stop, asyncio.create_task(listener.run(stop)))

    def leave(self, name: str) -> None:
        held = self.held.pop(name, None)
        if held is not None:
            held[1].set()
            self.left.append(held[0])
            if isinstance(self.joiner, EdgeJoiner):
                self.joiner.left_line(name)

    async def close(self) -> None:
        tasks = [task for _, _, task in self.held.values()]
        for name in list(self.held):
            self.leave(name)
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def watch_stalls(self) -> None:
        while True:
            expected = time.monotonic() + STALL_PROBE_SECONDS
            await asyncio.sleep(STALL_PROBE_SECONDS)
            late = time.monotonic() - expected
            if late >= STALL_NOTED_SECONDS:
                self.stalls.append((time.time() - late, late))

    def connected(self) -> list[str]:
        return [name for name, (lst, _, _) in self.held.items() if lst.connected.is_set()]

    def figures(self, each: bool = False) -> dict[str, Any]:
        """What the listeners heard, measured at the receiving end."""
        everyone = [listener for listener, _, _ in self.held.values()] + self.left
        causes: dict[str, dict[str, float]] = {}
        for listener in everyone:
            for stretch in listener.stats.interruptions:
                cause = causes.setdefault(stretch.cause, {"count": 0, "longest_s": 0.0, "lost": 0})
                cause["count"] += 1
                cause["longest_s"] = round(max(cause["longest_s"], stretch.seconds), 3)
                cause["lost"] += stretch.lost
        figures: dict[str, Any] = {
            "listeners": len(everyone),
            "connected": len(self.connected()),
            "frames": sum(lst.stats.frames for lst in everyone),
            "frames_lost": sum(lst.stats.lost for lst in everyone),
            "listeners_that_lost_frames": sum(1 for lst in everyone if lst.stats.lost),
            "longest_gap_s": round(max((lst.stats.longest_gap for lst in everyone), default=0), 3),
            "disconnects": sum(lst.stats.disconnects for lst in everyone),
            "relocations": sum(lst.stats.relocations for lst in everyone),
            "joins": sum(lst.stats.joins for lst in everyone),
            "turned_away": sum(lst.stats.turned_away for lst in everyone),
            "move_notices": dict(sum((lst.stats.moves for lst in everyone), Counter[str]())),
            "refusals": dict(sum((lst.stats.refusals for lst in everyone), Counter[str]())),
            "gaps_by_cause": causes,
            "longest_own_stall_s": round(max((d for _, d in self.stalls), default=0.0), 3),
        }
        if each:
            heard = gaps_heard(everyone, time.time() - time.monotonic())
            figures["gaps"] = with_stalls(heard, self.stalls)
            figures["stalls"] = [
                {"at": round(at, 3), "seconds": round(d, 3)} for at, d in self.stalls
            ]
            if isinstance(self.joiner, EdgeJoiner):
                figures["record"] = self.joiner.record
            figures["each"] = {
                lst.name: {
                    "frames": lst.stats.frames,
                    "lost": lst.stats.lost,
                    "longest_gap_s": round(lst.stats.longest_gap, 3),
                    "relays": lst.stats.relays,
                }
                for lst in everyone
            }
        return figures


def serve_crowd(conn: Connection, make_joiner: MakeJoiner, final: str) -> None:
    """The crowd's process: obey ("start", name, ticket), ("leave", name), ("status",) and
    ("close",) from `conn`. It speaks only when asked, ("status", connected, figures): a
    parent too busy to read never fills the pipe, so the crowd never waits on it. At the
    end it writes everything the listeners heard to the file `final` (JSON) and exits."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        closing = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            crowd = Crowd(make_joiner(session))
            watching = asyncio.create_task(crowd.watch_stalls())

            def on_message() -> None:
                try:
                    while conn.poll():
                        command, *args = conn.recv()
                        if command == "start":
                            crowd.start(*args)
                        elif command == "leave":
                            crowd.leave(*args)
                        elif command == "status":
                            conn.send(("status", crowd.connected(), crowd.figures()))
                        elif command == "close":
                            closing.set()
                except (EOFError, OSError):
                    closing.set()  # the parent is gone

            loop.add_reader(conn.fileno(), on_message)
            await closing.wait()
            loop.remove_reader(conn.fileno())
            await crowd.close()
            watching.cancel()
            began = time.monotonic()
            partial = Path(final).with_suffix(".partial")
            partial.write_text(json.dumps(crowd.figures(each=True)))
            partial.replace(final)
            took = round(time.monotonic() - began, 3)
            closed = {"event": "crowd closed", "listeners": len(crowd.left), "write_s": took}
            print(json.dumps(closed), flush=True)

    uvloop.run(main())


class CrowdProcess:
    """The parent's handle on a crowd in a process of its own."""

    def __init__(self, make_joiner: MakeJoiner) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
        self.conn, child = context.Pipe()
        handle, path = tempfile.mkstemp(prefix="townsquare-crowd-", suffix=".json")
        os.close(handle)
        self.final_file = Path(path)
        self.process = context.Process(
            target=serve_crowd,
            args=(child, make_joiner, str(self.final_file)),
            name="real-listeners",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.connected: set[str] = set()
        self.latest: dict[str, Any] = {}
        self.final: dict[str, Any] | None = None
        self.asked = False
        """A status request is out: the next waits for its answer."""

    def start(
        self, name: str, queue_ticket: str | None = None, line: dict[str, Any] | None = None
    ) -> None:
        self.conn.send(("start", name, queue_ticket, line))

    def leave(self, name: str) -> None:
        self.connected.discard(name)
        self.conn.send(("leave", name))

    def refresh(self) -> None:
        """Take the crowd's last answer, if it came, and ask again (never waits)."""
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll():
                kind, *body = self.conn.recv()
                if kind == "status":
                    self.connected, self.latest = set(body[0]), body[1]
                    self.asked = False
            if not self.asked and self.final is None:
                self.conn.send(("status",))
                self.asked = True

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Every listener leaves; what they heard, each of them included (blocks until the
        crowd has written it, at most `timeout`; else its last status)."""
        self.asked = True  # no more status requests
        with contextlib.suppress(OSError):
            self.conn.send(("close",))
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            self.refresh()  # the answer to a request still out, so the crowd never waits
            self.process.join(timeout=0.2)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()
        try:
            self.final = json.loads(self.final_file.read_text() or "null")
        except (OSError, ValueError):
            self.final = None
        finally:
            self.final_file.unlink(missing_ok=True)
        if self.final is None:
            missing = {"event": "crowd gave no final figures", "exit": self.process.exitcode}
            print(json.dumps(missing), flush=True)
            return self.latest
        return self.final
