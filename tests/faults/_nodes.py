"""Shared helpers of the fault suite: nodes serving ``fault_tasks``, stats, /proc, run logs.

Nodes are started with ``tests/multiprocess.py`` (``open_node``), which stops
each node and kills whatever is left of its process group when the test
ends, pass or fail.  Here they run with ``tests/faults`` as their working
directory, so ``--task-modules fault_tasks`` imports ``fault_tasks.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # tests/: where multiprocess.py lives
    sys.path.insert(0, str(HERE.parent))

from multiprocess import (  # noqa: E402
    CurveFiles,
    Node,
    free_tcp_port,
    open_node,
    poll,
    process_alive,
    start_node,
)

from fastworker import Client  # noqa: E402

__all__ = [
    "ANY_PORT",
    "TASKS",
    "CurveFiles",
    "Node",
    "Runs",
    "client_for",
    "fault_node",
    "fault_node_sync",
    "free_tcp_port",
    "log_time",
    "poll",
    "process_alive",
    "read_runs",
    "rss_kib",
    "stats",
    "wait_for_workers",
    "worker_pids",
]

ANY_PORT = "tcp://127.0.0.1:*"
TASKS = ("--task-modules", "fault_tasks")


@contextlib.asynccontextmanager
async def fault_node(*args: str, stop_timeout: float = 15.0) -> AsyncIterator[Node]:
    """A node serving ``fault_tasks`` (cwd tests/faults), stopped with its workers afterwards."""
    async with open_node(*args, cwd=HERE, stop_timeout=stop_timeout) as node:
        yield node


@contextlib.contextmanager
def fault_node_sync(*args: str, stop_timeout: float = 15.0) -> Iterator[Node]:
    """``fault_node`` for sync (e.g. module-scoped) fixtures."""
    with start_node(*args, cwd=HERE, stop_timeout=stop_timeout) as node:
        yield node


def client_for(node: Node | str, **kwargs: Any) -> Client:
    address = node if isinstance(node, str) else node.discovery_address
    kwargs.setdefault("timeout", 20)
    return Client(discovery_address=address, **kwargs)


async def stats(client: Client) -> dict[str, Any]:
    return await client.stats(timeout=10)


async def wait_for_workers(
    client: Client,
    count: int,
    *,
    gone: Iterable[int] = (),
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Discovery's workers once exactly ``count`` are alive, none with a pid in ``gone``."""
    gone = set(gone)

    async def check() -> dict[str, Any] | None:
        discovery = (await stats(client))["discovery"]
        workers: dict[str, Any] = discovery["workers"]
        pids = {w["pid"] for w in workers.values()}
        if len(workers) == count and len(pids) == count and not pids & gone:
            return workers
        return None

    return await poll(check, timeout=timeout, interval=0.05, what=f"{count} workers alive")


def worker_pids(workers: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in workers.values()}


class Runs:
    """What ``fault_tasks.record`` logged: which process started which task, how often."""

    def __init__(self, by_pid: dict[int, list[str]]) -> None:
        self.by_pid = {pid: [x for x in lines if ":" not in x] for pid, lines in by_pid.items()}
        self.done_by_pid = {
            pid: {x[5:] for x in lines if x.startswith("done:")} for pid, lines in by_pid.items()
        }
        self.counts: Counter[str] = Counter(x for lines in self.by_pid.values() for x in lines)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def duplicated(self) -> dict[str, int]:
        """Task keys that ran more than once, with their number of runs."""
        return {key: n for key, n in self.counts.items() if n > 1}

    def started_by(self, pid: int) -> set[str]:
        return set(self.by_pid.get(pid, []))

    def finished_by(self, pid: int) -> set[str]:
        """Tasks whose run in ``pid`` reached its end (``work`` records it)."""
        return self.done_by_pid.get(pid, set())


def read_runs(log_dir: Path) -> Runs:
    by_pid: dict[int, list[str]] = {}
    for path in log_dir.glob("*.log"):
        if path.stem.isdigit():
            by_pid[int(path.stem)] = path.read_text().split()
    return Runs(by_pid)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(stderr: str, needle: str) -> float | None:
    """Epoch time of the first log line of a node containing ``needle`` (ms resolution)."""
    for line in stderr.splitlines():
        if needle in line:
            match = _LOG_TIME.match(line)
            if match:
                stamp = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()  # local time, like the node's asctime
    return None
