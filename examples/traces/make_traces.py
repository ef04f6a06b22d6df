"""Regenerate the shipped traces: `python examples/traces/make_traces.py` (deterministic)."""

from __future__ import annotations

import math
import random
from pathlib import Path

HERE = Path(__file__).parent


def write(name: str, rows: list[tuple[float, float, int]]) -> None:
    lines = ["t_seconds,listeners,relay_failures"]
    lines += [f"{t:g},{round(v)},{f}" for t, v, f in rows]
    (HERE / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def noisy(rows: list[tuple[float, float, int]], share: float, seed: int) -> list[tuple[float, float, int]]:
    rng = random.Random(seed)
    return [(t, max(0.0, v * (1 + rng.uniform(-share, share))), f) for t, v, f in rows]


def launch() -> list[tuple[float, float, int]]:
    """500,000 declared; a join storm at the start, 750,000 by +20m, 30 relays fail at +25m."""
    rows = [(-1800, 0, 0), (-600, 2_000, 0), (-120, 20_000, 0), (0, 60_000, 0)]
    rows += [(60, 250_000, 0), (180, 480_000, 0), (600, 600_000, 0), (1200, 750_000, 0)]
    rows += [(t, 745_000, 0) for t in range(1260, 4200, 60)]
    rows = noisy(rows, 0.01, 1)
    rows += [(1503, 745_000, 30)]
    rows.sort()
    rows += [(4800, 520_000, 0), (5400, 240_000, 0), (5700, 30_000, 0), (6000, 0, 0)]
    return rows


def flash_crowd() -> list[tuple[float, float, int]]:
    """2,000 declared; at +10m a clip goes viral: 150,000 in three minutes, 220,000 by +20m."""
    rows = [(-900, 0, 0), (0, 1_500, 0), (600, 2_000, 0), (660, 40_000, 0), (780, 150_000, 0)]
    rows += [(1200, 220_000, 0), (2400, 200_000, 0), (3000, 60_000, 0), (3600, 5_000, 0)]
    rows += [(3900, 0, 0)]
    return rows


def no_show() -> list[tuple[float, float, int]]:
    """500,000 declared, 20,000 came."""
    rows = [(-1800, 0, 0), (-300, 1_000, 0), (0, 8_000, 0), (600, 20_000, 0)]
    rows += noisy([(t, 20_000, 0) for t in range(660, 5400, 60)], 0.03, 2)
    rows += [(5700, 0, 0), (6000, 0, 0)]
    return rows


def oscillating() -> list[tuple[float, float, int]]:
    """100,000 declared; the room swings between 50,000 and 150,000 every 20 minutes."""
    rows = [(-900, 0, 0), (-300, 10_000, 0), (0, 60_000, 0), (300, 100_000, 0)]
    for t in range(360, 7200, 60):
        rows.append((t, 100_000 + 50_000 * math.sin(2 * math.pi * (t - 300) / 1200), 0))
    rows += [(7500, 0, 0), (7800, 0, 0)]
    return noisy(rows, 0.01, 3)


def slow_burn() -> list[tuple[float, float, int]]:
    """200,000 declared; 30,000 at the start, word of mouth brings the rest over two hours."""
    rows = [(-900, 0, 0), (-300, 5_000, 0), (0, 30_000, 0)]
    rows += [(t, 30_000 + 170_000 * (t / 7200) ** 1.5, 0) for t in range(60, 7260, 60)]
    rows += [(7500, 20_000, 0), (7800, 0, 0)]
    return noisy(rows, 0.01, 4)


def may_2023_launch() -> list[tuple[float, float, int]]:
    """The May 2023 campaign launch as reported: the room opened and filled while the host
    was almost 30 minutes late; about 420,000 listed listeners at the peak."""
    rows = [(-1800, 0, 0), (-900, 0, 0), (-300, 40_000, 0), (0, 120_000, 0)]
    rows += [(600, 250_000, 0), (1200, 350_000, 0), (1680, 420_000, 0)]
    rows += [(t, 420_000 - 40_000 * (t - 1680) / 4200, 0) for t in range(1740, 5880, 60)]
    rows = noisy(rows, 0.01, 5)
    rows += [(6300, 120_000, 0), (6600, 0, 0), (7200, 0, 0)]
    return rows


if __name__ == "__main__":
    for name, make in [
        ("launch", launch),
        ("may-2023-launch", may_2023_launch),
        ("flash-crowd", flash_crowd),
        ("no-show", no_show),
        ("oscillating", oscillating),
        ("slow-burn", slow_burn),
    ]:
        write(name, make())
