"""Audience traces: CSV `t_seconds,listeners[,relay_failures]`, t relative to the start."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("t_seconds", "listeners")
OPTIONAL = ("relay_failures",)


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the line and the problem."""


@dataclass(frozen=True)
class Trace:
    """Listeners wanting a relay over time (linear between rows), and what else happens.

    Besides the CSV's rows, a generated trace (`townsquare.sim.families`) may carry metric
    outages, single-scrape glitches and the producer moving `startTime` mid-flight.
    """

    times: tuple[float, ...]
    listeners: tuple[float, ...]
    failures: tuple[tuple[float, int], ...] = ()
    """(t, relays that crash at t)."""
    outages: tuple[tuple[float, float], ...] = ()
    """(from, until): Prometheus returns nothing for the room (every policy sees no data)."""
    glitches: tuple[tuple[float, float], ...] = ()
    """(t, factor): the first scrape at or after t reads the listeners times `factor`."""
    start_moves: tuple[tuple[float, float], ...] = ()
    """(t, new start): at t the producer moves startTime to `new start` seconds after the
    announced one (a late host); t and `new start` are relative to the announced start."""

    @property
    def start(self) -> int:
        return math.floor(self.times[0])

    @property
    def end(self) -> int:
        return math.ceil(self.times[-1])

    def per_second(self) -> list[float]:
        """Demand at every whole second from `start` to `end` inclusive."""
        out: list[float] = []
        times, values, last = self.times, self.listeners, len(self.times) - 1
        row = 0
        for t in range(self.start, self.end + 1):
            while row < last and times[row + 1] <= t:
                row += 1
            if row == last or t <= times[row]:
                out.append(values[row])
            else:
                share = (t - times[row]) / (times[row + 1] - times[row])
                out.append(values[row] + (values[row + 1] - values[row]) * share)
        return out

    def listener_seconds(self) -> float:
        return sum(self.per_second())


def parse_trace(text: str, name: str = "trace") -> Trace:
    """Read a trace, refusing anything a replay would silently get wrong."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise TraceError(f"{name}: header must name t_seconds,listeners (missing {missing[0]})")
    unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise TraceError(f"{name}: unknown column {unknown[0]!r}")
    times: list[float] = []
    listeners: list[float] = []
    failures: list[tuple[float, int]] = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TraceError(f"{name}: line {line}: expected {len(header)} fields, got {len(row)}")
        fields = dict(zip(header, (cell.strip() for cell in row), strict=True))
        try:
            t = float(fields["t_seconds"])
            count = float(fields["listeners"])
            failed = int(fields.get("relay_failures") or 0)
        except ValueError:
            raise TraceError(f"{name}: line {line}: not a number in {row}") from None
        if not math.isfinite(t) or not math.isfinite(count) or count < 0 or failed < 0:
            raise TraceError(f"{name}: line {line}: values must be finite and not negative")
        if times and t <= times[-1]:
            raise TraceError(
                f"{name}: line {line}: t_seconds {t:g} is not after {times[-1]:g}; "
                "rows must be sorted in time"
            )
        times.append(t)
        listeners.append(count)
        if failed:
            failures.append((t, failed))
    if len(times) < 2:
        raise TraceError(f"{name}: needs at least two rows")
    return Trace(tuple(times), tuple(listeners), tuple(failures))


def load_trace(path: str | Path) -> Trace:
    """Read a trace file, naming it in any error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file") from None
    return parse_trace(text, str(path))
