"""Simulation results as JSON, as a table, and as the benchmark page."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from townsquare.sim.model import Result

COLUMNS = (
    ("unserved_listener_seconds", "unserved l·s"),
    ("overloaded_listener_seconds", "overloaded l·s"),
    ("waiting_listener_seconds", "waiting l·s"),
    ("relay_seconds", "relay·s"),
    ("cost_vs_oracle", "cost/oracle"),
    ("migrated_listeners", "migrated"),
    ("scale_events", "scale events"),
    ("peak_relays", "peak relays"),
)


def as_json(results: Mapping[str, Result]) -> dict[str, Any]:
    """The one JSON object `simulate -o json` prints."""
    return {"policies": {name: result.figures() for name, result in results.items()}}


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else f"{value:,}"


def rows(results: Mapping[str, Result]) -> list[list[str]]:
    """Header and one row per policy, numbers formatted for people."""
    header = ["policy"] + [label for _, label in COLUMNS]
    body = [
        [name] + [_cell(result.figures()[key]) for key, _ in COLUMNS]
        for name, result in results.items()
    ]
    return [header, *body]


def as_table(results: Mapping[str, Result]) -> str:
    """Aligned columns for a terminal."""
    table = rows(results)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def as_markdown(results: Mapping[str, Result]) -> str:
    """A Markdown table of the same figures."""
    table = rows(results)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)
