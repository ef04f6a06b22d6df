"""Replay audience traces through townsquare's own policy and the baselines users would pick.

Nothing here restates a rule of the operator: the townsquare policy in the simulator calls
`townsquare.scaling.decide`, `townsquare.sharding.rebalance` and the planner, exactly as the
live operator does, against a discrete-time model of relays, scrapes and listeners.
"""

from townsquare.sim.model import POLICIES, Result, Settings, simulate
from townsquare.sim.trace import Trace, TraceError, load_trace, parse_trace

__all__ = [
    "POLICIES",
    "Result",
    "Settings",
    "Trace",
    "TraceError",
    "load_trace",
    "parse_trace",
    "simulate",
]
