"""A randomized fault campaign against a real fastworker cluster.

``python -m fastworker.chaos --duration 60 --seed N`` starts a control plane
and worker nodes as real processes behind fault-injecting TCP proxies, runs
several clients against them while a seeded schedule kills, stops, cuts and
restarts things, then checks the history of every client operation for lost,
duplicated, unexpected and hung tasks and for unhealthy processes.  It prints
one line of figures and exits 1 on any violation.  See design/chaos.md.
"""

from __future__ import annotations

from ._check import Verdict, Violation, check
from ._cli import main
from ._history import Fault, History, Observation, Op, TaskRecord
from ._proxy import Link, Proxy

__all__ = [
    "Fault",
    "History",
    "Link",
    "Observation",
    "Op",
    "Proxy",
    "TaskRecord",
    "Verdict",
    "Violation",
    "check",
    "main",
]
