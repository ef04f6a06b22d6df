"""Plots of a simulation: demand, capacity and Ready relays per policy (needs matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from townsquare.sim.model import Result

STRIDE = 10
"""Plot every tenth second: the curves look the same and the file stays small."""


def plot(results: Mapping[str, Result], capacity: int, title: str, path: str | Path) -> None:
    """One panel per policy; waiting listeners shaded amber, overloaded ones red."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError(
            "plotting needs matplotlib: install the `plot` extra (pip install townsquare[plot])"
        ) from None

    runs = [(name, r.series) for name, r in results.items() if r.series is not None]
    figure, axes = plt.subplots(
        len(runs), 1, figsize=(11, 2.6 * len(runs)), sharex=True, squeeze=False
    )
    for axis, (name, series) in zip(axes[:, 0], runs, strict=True):
        assert series is not None
        minutes = [t / 60 for t in series.t[::STRIDE]]
        demand = series.demand[::STRIDE]
        ready_capacity = [n * capacity for n in series.ready[::STRIDE]]
        axis.plot(minutes, demand, color="black", linewidth=1.2, label="demand (listeners)")
        axis.plot(minutes, ready_capacity, color="tab:blue", linewidth=1, label="Ready capacity")
        axis.fill_between(
            minutes, 0, series.waiting[::STRIDE], color="orange", alpha=0.6, label="waiting"
        )
        axis.fill_between(
            minutes, 0, series.overloaded[::STRIDE], color="red", alpha=0.35, label="overloaded"
        )
        axis.set_ylabel("listeners")
        axis.set_title(name, loc="left", fontsize=10)
        relays = axis.twinx()
        relays.plot(minutes, series.ready[::STRIDE], color="grey", linewidth=0.8, linestyle=":")
        relays.set_ylabel("Ready relays", color="grey")
        axis.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel("minutes from the start")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
