"""What a bench run was asked to do: one frozen record, built by ``_cli``, read by everyone else.

Keeping the options apart from argument parsing lets the scenarios be driven
without a command line (and keeps ``_cli`` about text, not about measuring).
"""

from __future__ import annotations

import attrs

__all__ = [
    "DEFAULT_SCENARIOS",
    "INTERLEAVE_BLOCK",
    "LOCAL_ONLY",
    "SCENARIOS",
    "BenchError",
    "Options",
]

DEFAULT_SCENARIOS = ("throughput", "batch", "latency", "backlog", "workers")
# ``floor`` measures the machine, not fastworker: run only when asked for.
SCENARIOS = (*DEFAULT_SCENARIOS, "floor")
# Scenarios that start and stop processes: impossible against a cluster we do not own.
LOCAL_ONLY = frozenset({"backlog", "workers"})
# Round trips per block when ``latency`` and ``floor`` run together, alternating:
# a tenth of a second or so each, shorter than the drifts of a shared VM's speed.
INTERLEAVE_BLOCK = 100


class BenchError(Exception):
    """A failure to report as one line (exit code 1): a node that did not start, a stall."""


@attrs.frozen
class Options:
    """Every knob of a run, with the documented defaults."""

    tasks: int = 100_000
    workers: int = 1
    concurrency: int = 8
    serialization_format: str = "json"
    payload_bytes: int = 0
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    discovery_address: str | None = None
    json: bool = False
    runs: int = 1
    backlog_tasks: int = 1_000_000
    latency_count: int = 2_000
    batch_size: int = 10_000
    worker_counts: tuple[int, ...] = (1, 2, 4)
    progress: bool = False
    stall_timeout: float = 60.0
    curve: bool = False  # the shared scenarios again with CURVE on
    # The shared scenarios again on a node with --journal, and a journal's
    # recovery timed (design/durability.md).
    journal: bool = False
    # The shared scenarios again on a node serving --http-address, read once a second.
    http: bool = False

    @property
    def local(self) -> bool:
        """True when the bench starts (and may stop, and resize) its own nodes."""
        return self.discovery_address is None
