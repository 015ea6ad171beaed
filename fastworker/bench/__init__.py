"""``python -m fastworker.bench``: measure a fastworker installation, like ``redis-benchmark``.

It starts its own node (``python -m fastworker.node`` on a random loopback
port, serving the trivial tasks of ``fastworker.bench._tasks``) or measures
an existing cluster (``--discovery-address``), always through the documented
``Client`` from an asyncio program, over real sockets and processes.

Scenarios: ``throughput`` (``delay``), ``batch`` (``submit_batch``),
``latency`` (sequential ``submit_task``), ``backlog`` (memory per queued task
and drain rate) and ``workers`` (throughput with 1, 2 and 4 worker
processes).  ``floor``, run only when named, times the same round trips
over bare pyzmq + trio with no fastworker code: what ``latency`` cannot
beat on this machine.  Run ``python -m fastworker.bench --help`` for the
options.

Modules, one job each: ``_cli`` (arguments, exit codes), ``_runner`` (the
asyncio program), ``_scenarios``, ``_measure`` (timed client primitives),
``_cluster`` (the cluster under test), ``_nodes`` (node processes),
``_rss`` (memory sampling), ``_progress``, ``_report`` (table, JSON),
``_tasks`` (the tasks workers run), ``_floor`` (the floor's processes) and
``_chain`` (starting and stopping them).
"""

from ._cli import build_parser as build_parser
from ._cli import main as main

__all__ = ["build_parser", "main"]
