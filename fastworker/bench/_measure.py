"""The timed primitives every scenario is made of, all through the documented ``Client``.

Nothing here takes a shortcut: tasks go through ``delay``/``submit_batch``/
``submit_task`` from an asyncio program, over the sockets, to the control
plane and the worker processes, and the clock stops when the client holds
every result (``join``).  A run that stops making progress fails with a
clear ``BenchError`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import attrs

from ..client import Client, ClientError
from ._options import BenchError, Options
from ._tasks import ADD, ECHO, MODULE

__all__ = [
    "Tally",
    "Workload",
    "join_all",
    "local_worker_pids",
    "percentile",
    "round_trips",
    "scheduler_counter",
    "stats",
    "submit_each",
    "submit_in_batches",
    "wait_for_workers",
]

_STATS_TIMEOUT = 10.0
# ``delay`` and ``submit_batch`` return without suspending, so a submitting
# loop never lets the event loop run: Ctrl-C (a cancellation) would wait for
# the whole loop.  A zero sleep every 1024 tasks is where it lands instead,
# at a cost too small to see in the figures.
_CHECKPOINT_EVERY = 1023


@attrs.frozen
class Workload:
    """Which bench task each submission names, and its arguments."""

    task_name: str
    payload: str | None = None

    @classmethod
    def for_options(cls, options: Options) -> Workload:
        if options.payload_bytes:
            return cls(ECHO, "x" * options.payload_bytes)
        return cls(ADD)

    def args(self, i: int) -> tuple[Any, ...]:
        return (self.payload,) if self.payload is not None else (i, i)


@attrs.define
class Tally:
    """How many tasks were handed to the client; with its pending count, how many are done."""

    client: Client
    submitted: int = 0

    def done(self) -> int:
        return self.submitted - self.client.pending_count


async def stats(client: Client) -> dict[str, Any]:
    """The control plane's statistics, or a BenchError that names the address."""
    try:
        return await client.stats(timeout=_STATS_TIMEOUT)
    except ClientError as exc:
        raise BenchError(
            f"no control plane answered at {client.discovery_address}: {exc}"
        ) from None


async def scheduler_counter(client: Client, name: str) -> int:
    return int((await stats(client))["scheduler"][name])


def local_worker_pids(workers: dict[str, Any]) -> list[int]:
    """Pids of the workers (from Discovery's statistics) that run on this host."""
    here = socket.gethostname()
    return sorted(w["pid"] for w in workers.values() if w.get("hostname") == here and w.get("pid"))


async def wait_for_workers(
    client: Client, task_name: str, count: int | None, timeout: float = 30.0
) -> dict[str, Any]:
    """Discovery's workers once ``count`` (None: at least one) serve ``task_name``.

    Waiting for ready workers keeps start-up out of every measurement.
    """
    deadline = time.monotonic() + timeout
    while True:
        workers: dict[str, Any] = (await stats(client))["discovery"]["workers"]
        serving = {k: w for k, w in workers.items() if task_name in w.get("tasks", ())}
        if (count is None and serving) or (count is not None and len(serving) == count):
            return serving
        # An existing cluster whose workers lack the bench tasks will not grow them.
        if count is None and workers and not serving:
            raise BenchError(
                f"none of the {len(workers)} workers at {client.discovery_address} serves "
                f"{task_name!r}; start them with --task-modules {MODULE}"
            )
        if time.monotonic() >= deadline:
            wanted = "a worker" if count is None else f"{count} workers"
            raise BenchError(
                f"{wanted} serving {task_name!r} did not register within {timeout:g} s "
                f"({len(serving)} did)"
            )
        await asyncio.sleep(0.05)


async def join_all(client: Client, stall_timeout: float) -> None:
    """``client.join()``, but a BenchError after ``stall_timeout`` s without a single result."""
    joined = asyncio.ensure_future(client.join())
    last = client.pending_count
    quiet_since = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({joined}, timeout=0.5)
            if done:
                joined.result()
                return
            now = client.pending_count
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since > stall_timeout:
                raise BenchError(
                    f"no result arrived for {stall_timeout:g} s; {now:,} tasks unfinished"
                )
    finally:
        joined.cancel()


async def submit_each(
    client: Client, workload: Workload, n: int, tally: Tally, *, window: int | None = None
) -> None:
    """``n`` tasks, one ``delay`` each: what most programs do; with ``window``, at most
    that many unacknowledged (as ``submit_in_batches``)."""
    name = workload.task_name
    flushed = 0
    for i in range(n):
        if window is not None and i - flushed >= window:
            await client.flush()
            flushed = i
        await client.delay(name, *workload.args(i))
        tally.submitted += 1
        if not i & _CHECKPOINT_EVERY:
            await asyncio.sleep(0)


async def submit_in_batches(
    client: Client,
    workload: Workload,
    n: int,
    chunk: int,
    tally: Tally,
    *,
    window: int | None = None,
) -> None:
    """``n`` tasks through ``submit_batch``, ``chunk`` at a time; with ``window``, at most
    that many unacknowledged (a journaled control plane acknowledges at the disk's pace and
    refuses new tasks when too far behind)."""
    name = workload.task_name
    flushed = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if window is not None and stop - flushed > window:
            await client.flush()
            flushed = start
        await client.submit_batch([(name, workload.args(i)) for i in range(start, stop)])
        tally.submitted += stop - start
        await asyncio.sleep(0)


async def round_trips(client: Client, workload: Workload, n: int, tally: Tally) -> list[float]:
    """``n`` sequential ``submit_task`` calls; the seconds each took, submit to result."""
    seconds = []
    for i in range(n):
        started = time.perf_counter()
        result = await client.submit_task(workload.task_name, workload.args(i))
        seconds.append(time.perf_counter() - started)
        if not result.ok:
            raise BenchError(f"{workload.task_name} failed: {result.error}")
        tally.submitted += 1
    return seconds


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually measured, never an interpolation."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]
