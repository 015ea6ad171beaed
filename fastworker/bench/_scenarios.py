"""The scenarios; each run returns one flat dict of figures (or one per worker count).

Figures are raw (seconds, bytes turned into MiB, ms) and unrounded: the
report takes medians first and rounds last.  Memory is the peak ``VmRSS``
sampled during the measured part; None where the process is not visible.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..client import Client
from ._chain import floor_round_trips, floor_session
from ._cluster import Cluster, Context, connected, start_local
from ._cpu import read_cpu_seconds
from ._measure import (
    Tally,
    join_all,
    local_worker_pids,
    percentile,
    round_trips,
    scheduler_counter,
    stats,
    submit_each,
    submit_in_batches,
)
from ._options import INTERLEAVE_BLOCK, BenchError
from ._rss import RssSampler, read_rss, to_mib

__all__ = ["INTERLEAVED", "RUNNERS", "Figures", "journal_recovery"]

Figures = dict[str, Any]
Submit = Callable[[Client, Tally], Awaitable[None]]

_NODE_MAX_QUEUED = 1_000_000  # the node's default --max-queued
# Unacknowledged tasks at most while filling a journaled control plane: below the
# journal's own bound (100 000 entries waiting), so none is refused.
_WINDOW = 50_000


def _stream_window(ctx: Context) -> int | None:
    """With --journal, both runs of an invocation (in memory and journaled) keep at most
    ``_WINDOW`` tasks unacknowledged: a journaled control plane acknowledges at the disk's
    pace and refuses new tasks (queue_full) when its writer is too far behind."""
    return _WINDOW if ctx.options.journal else None


async def _journal_written(client: Client) -> None:
    """A journaled run ends when the journal holds it all: results reach clients before
    the writer has them on disk, and a run that left the writer behind would slow the
    next one (or have its first tasks refused)."""
    while (await stats(client)).get("journal", {}).get("pending_entries", 0):  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # a counter in another process: no event to wait on


def _shared(ctx: Context) -> Cluster:
    if ctx.shared is None:
        raise RuntimeError("the shared cluster is started by the runner")
    return ctx.shared


async def _stream(ctx: Context, cluster: Cluster, label: str, submit: Submit) -> Figures:
    """``--tasks`` tasks submitted by ``submit``, clocked until the last result is in."""
    n = ctx.options.tasks
    async with connected(ctx, cluster, capacity=n) as (client, pids):
        failed_before = await scheduler_counter(client, "failed")
        tally = Tally(client)
        with RssSampler(cluster.cp_pid) as rss, ctx.progress.track(ctx.label(label), n, tally.done):
            rss.watch_workers(pids)
            cpu_before = read_cpu_seconds(cluster.cp_pid)
            started = time.perf_counter()
            await submit(client, tally)
            await join_all(client, ctx.options.stall_timeout)
            await _journal_written(client)
            seconds = time.perf_counter() - started
            cpu_after = read_cpu_seconds(cluster.cp_pid)
        failed = await scheduler_counter(client, "failed") - failed_before
    peaks = rss.peaks()
    return {
        "tasks": n,
        "seconds": seconds,
        "tasks_per_s": n / seconds,
        # The control plane's CPU per task: steadier than the rate on a shared machine.
        "cp_cpu_us_per_task": None
        if cpu_before is None or cpu_after is None
        else (cpu_after - cpu_before) / n * 1e6,
        "cp_rss_mb": to_mib(peaks.cp_bytes),
        "worker_rss_mb": to_mib(peaks.worker_bytes),
        "failed": failed,
    }


async def throughput(ctx: Context) -> Figures:
    """One ``delay`` per task from asyncio, until ``join``."""
    n, workload = ctx.options.tasks, ctx.workload

    async def submit(client: Client, tally: Tally) -> None:
        await submit_each(client, workload, n, tally, window=_stream_window(ctx))

    return await _stream(ctx, _shared(ctx), "throughput", submit)


async def batch(ctx: Context) -> Figures:
    """``submit_batch`` in chunks of ``--batch-size``, until ``join``."""
    n, workload, chunk = ctx.options.tasks, ctx.workload, ctx.options.batch_size

    async def submit(client: Client, tally: Tally) -> None:
        await submit_in_batches(client, workload, n, chunk, tally, window=_stream_window(ctx))

    return await _stream(ctx, _shared(ctx), "batch", submit)


async def latency(ctx: Context) -> Figures:
    """Sequential ``submit_task`` round trips on an otherwise idle cluster."""
    n, cluster = ctx.options.latency_count, _shared(ctx)
    async with connected(ctx, cluster, capacity=n) as (client, pids):
        tally = Tally(client)
        with (
            RssSampler(cluster.cp_pid) as rss,
            ctx.progress.track(ctx.label("latency"), n, tally.done),
        ):
            rss.watch_workers(pids)
            times = await round_trips(client, ctx.workload, n, tally)
    return _latency_figures(times, rss)


async def latency_with_floor(ctx: Context) -> tuple[Figures, Figures]:
    """``latency`` and ``floor`` in one run, alternating blocks of round trips.

    What ``latency`` over ``floor`` means is a ratio, and on a shared VM
    the speed of the machine moves within seconds: a ``latency`` run then
    a ``floor`` run a few seconds later compare two machines.  Interleaved,
    each block of ours has the floor's blocks right beside it.
    """
    n, cluster = ctx.options.latency_count, _shared(ctx)
    block = INTERLEAVE_BLOCK
    ours: list[float] = []
    theirs: dict[str, list[float]] = {"direct": [], "thread": []}
    async with (
        connected(ctx, cluster, capacity=n) as (client, pids),
        floor_session(ctx.pids) as floor_processes,
    ):
        tally = Tally(client)
        with (
            RssSampler(cluster.cp_pid) as rss,
            ctx.progress.track(ctx.label("latency + floor"), n, tally.done),
        ):
            rss.watch_workers(pids)
            for start in range(0, n, block):
                count = min(block, n - start)
                ours += await round_trips(client, ctx.workload, count, tally)
                for variant, times in theirs.items():
                    times += await floor_processes.round_trips(variant, count)
    return _latency_figures(ours, rss), _floor_figures(theirs)


def _latency_figures(times: list[float], rss: RssSampler) -> Figures:
    peaks = rss.peaks()
    return {
        "tasks": len(times),
        **_spread(times),
        "cp_rss_mb": to_mib(peaks.cp_bytes),
        "worker_rss_mb": to_mib(peaks.worker_bytes),
    }


def _floor_figures(times: dict[str, list[float]]) -> Figures:
    return {
        "round_trips": len(times["direct"]),
        **_spread(times["direct"]),
        **_spread(times["thread"], "thread_"),
    }


def _spread(times: list[float], prefix: str = "") -> Figures:
    """Total seconds and the percentiles of round trips, under keys starting with ``prefix``."""
    ordered = sorted(times)
    return {
        f"{prefix}seconds": sum(times),
        f"{prefix}p50_ms": percentile(ordered, 0.50) * 1e3,
        f"{prefix}p99_ms": percentile(ordered, 0.99) * 1e3,
        f"{prefix}max_ms": ordered[-1] * 1e3,
        f"{prefix}mean_ms": sum(times) / len(times) * 1e3,
    }


async def floor(ctx: Context) -> Figures:
    """The ``latency`` path's bare transport, no fastworker code: what this machine allows.

    ``thread_*`` figures: the echo answers through a thread hop, as a
    worker does to run a plain function.  See ``_floor`` for the why.
    """
    return _floor_figures(await floor_round_trips(ctx.options.latency_count, ctx.pids))


async def _until_queued(client: Client, n: int, level: list[int], stall_timeout: float) -> None:
    """Poll the scheduler until ``n`` tasks are queued; ``level[0]`` follows the count."""
    quiet_since = time.monotonic()
    while level[0] < n:
        queued = int((await stats(client))["scheduler"]["queued_total"])
        if queued != level[0]:
            level[0], quiet_since = queued, time.monotonic()
        elif time.monotonic() - quiet_since > stall_timeout:
            raise BenchError(
                f"the queue stayed at {queued:,} of {n:,} tasks for {stall_timeout:g} s"
            )
        if level[0] < n:
            await asyncio.sleep(0.1)


async def _first_result(client: Client, timeout: float = 30.0) -> tuple[float, int]:
    """(clock, tasks still unfinished) as soon as the first result of the drain arrives.

    The client counts results on its own thread, so a 1 ms poll of its
    pending count sees the drain begin; the clock starts there, so neither
    Python's start-up nor registration is counted.  Waiting for Discovery
    to list the worker instead took a statistics round trip, and on a busy
    machine the whole queue had drained before it came back.
    """
    before = client.pending_count
    deadline = time.monotonic() + timeout
    while (now := client.pending_count) == before:
        if time.monotonic() >= deadline:
            raise BenchError(f"no task of the backlog finished within {timeout:g} s")
        await asyncio.sleep(0.001)
    return time.perf_counter(), now


async def _watch_worker_pids(ctx: Context, client: Client, rss: RssSampler) -> None:
    """Hand the drain's worker processes to the RSS sampler once Discovery lists them."""
    while True:
        workers = (await stats(client))["discovery"]["workers"]
        if workers:
            break
        await asyncio.sleep(0.02)
    pids = local_worker_pids(workers)
    ctx.pids.update(pids)
    rss.watch_workers(pids)


async def _fill(
    ctx: Context, client: Client, cp_pid: int, tally: Tally, *, window: int | None = None
) -> tuple[float, int | None]:
    """Queue ``--backlog-tasks`` with no worker attached; (seconds, control-plane peak RSS)."""
    n, options, level = ctx.options.backlog_tasks, ctx.options, [0]
    with (
        RssSampler(cp_pid) as rss,
        ctx.progress.track(ctx.label("backlog: queue"), n, lambda: level[0]),
    ):
        started = time.perf_counter()
        # Polled while submitting, so the progress line moves from the start.
        queued = asyncio.ensure_future(_until_queued(client, n, level, options.stall_timeout))
        try:
            await submit_in_batches(
                client, ctx.workload, n, options.batch_size, tally, window=window
            )
            await queued
        finally:
            queued.cancel()
        seconds = time.perf_counter() - started
        at_peak = read_rss(cp_pid)  # every task held, none running
    sampled = rss.peaks().cp_bytes
    return seconds, max(at_peak or 0, sampled or 0) or None


async def _drain(
    ctx: Context, client: Client, cp_pid: int, tally: Tally
) -> tuple[int, float, int | None]:
    """Wait for the worker just started to empty the queue; (tasks, seconds, worker peak RSS)."""
    n = ctx.options.backlog_tasks
    with (
        RssSampler(cp_pid) as rss,
        ctx.progress.track(ctx.label("backlog: drain"), n, tally.done),
    ):
        watcher = asyncio.ensure_future(_watch_worker_pids(ctx, client, rss))
        try:
            started, remaining = await _first_result(client)
            await join_all(client, ctx.options.stall_timeout)
            seconds = time.perf_counter() - started
            await asyncio.wait_for(watcher, 30)  # the worker is still registered
        finally:
            watcher.cancel()
    return remaining, seconds, rss.peaks().worker_bytes


async def backlog(ctx: Context) -> Figures:
    """Queue ``--backlog-tasks`` with no worker, weigh the control plane, then drain."""
    n = ctx.options.backlog_tasks
    max_queued = max(n + 1_000, _NODE_MAX_QUEUED)
    cp = ctx.start_node("control-plane", extra=("--max-queued", str(max_queued)))
    try:
        cluster = Cluster(cp.discovery_address, cp.pid)
        async with connected(ctx, cluster, capacity=n, ready=False) as (client, _):
            tally = Tally(client)
            idle = read_rss(cp.pid)
            queue_seconds, peak = await _fill(ctx, client, cp.pid, tally)
            worker = ctx.start_node("worker", discovery_address=cp.discovery_address, workers=1)
            try:
                drained, drain_seconds, worker_peak = await _drain(ctx, client, cp.pid, tally)
            finally:
                worker.stop()
            failed = await scheduler_counter(client, "failed")
    finally:
        cp.stop()
    return {
        "tasks": n,
        "cp_idle_rss_mb": to_mib(idle),
        "cp_rss_mb": to_mib(peak),
        "rss_per_task_bytes": None if peak is None or idle is None else (peak - idle) / n,
        "queue_seconds": queue_seconds,
        "queue_tasks_per_s": n / queue_seconds,
        "drain_tasks": drained,
        "drain_seconds": drain_seconds,
        # None: the whole queue drained between two polls, too fast to time.
        "drain_tasks_per_s": drained / drain_seconds if drained else None,
        "worker_rss_mb": to_mib(worker_peak),
        "failed": failed,
    }


async def workers(ctx: Context) -> Figures:
    """The throughput scenario on a fresh node per worker-process count."""
    n, workload = ctx.options.tasks, ctx.workload

    async def submit(client: Client, tally: Tally) -> None:
        await submit_each(client, workload, n, tally)

    figures: Figures = {}
    for count in ctx.options.worker_counts:
        cluster = start_local(ctx, count)
        try:
            figures[str(count)] = await _stream(ctx, cluster, f"workers={count}", submit)
        finally:
            cluster.stop()
    return figures


def _file_bytes(path: str) -> int:
    """The journal's size on disk: the database, its WAL and its shared-memory index."""
    return sum(
        os.path.getsize(path + suffix)
        for suffix in ("", "-wal", "-shm")
        if os.path.exists(path + suffix)
    )


async def journal_recovery(ctx: Context, directory: str) -> Figures:
    """Queue ``--backlog-tasks`` on a control plane with ``--journal``, weigh the file,
    kill -9 it and time a new one's start on the same file (until its ready line)."""
    n = ctx.options.backlog_tasks
    path = os.path.join(directory, "recovery.db")
    extra = ("--journal", path, "--max-queued", str(max(n + 1_000, _NODE_MAX_QUEUED)))
    cp = ctx.start_node("control-plane", extra=extra)
    try:
        cluster = Cluster(cp.discovery_address, cp.pid)
        async with connected(ctx, cluster, capacity=n, ready=False) as (client, _):
            queue_seconds, _ = await _fill(ctx, client, cp.pid, Tally(client), window=_WINDOW)
            await client.flush()  # every task acknowledged: committed
        size = _file_bytes(path)
        cp.kill()
    finally:
        cp.stop()
    started = time.perf_counter()
    cp = ctx.start_node("control-plane", extra=extra)
    ready_seconds = time.perf_counter() - started
    try:
        cluster = Cluster(cp.discovery_address, cp.pid)
        async with connected(ctx, cluster, capacity=1, ready=False) as (client, _):
            journal = (await stats(client))["journal"]
        rss = read_rss(cp.pid)
    finally:
        cp.stop()
    return {
        "tasks": n,
        "queue_seconds": queue_seconds,
        "queue_tasks_per_s": n / queue_seconds,
        "journal_mb": to_mib(size),
        "journal_per_task_bytes": size / n,
        "recovered_tasks": journal["recovered"]["tasks"],
        "read_seconds": journal["recovered"]["seconds"],
        "recovery_seconds": ready_seconds,
        "cp_rss_mb": to_mib(rss),
    }


RUNNERS: dict[str, Callable[[Context], Awaitable[Figures]]] = {
    "throughput": throughput,
    "batch": batch,
    "latency": latency,
    "backlog": backlog,
    "workers": workers,
    "floor": floor,
}

# Pairs measured in one interleaved run when both are asked for (see _runner).
INTERLEAVED: dict[tuple[str, str], Callable[[Context], Awaitable[tuple[Figures, Figures]]]] = {
    ("latency", "floor"): latency_with_floor,
}
