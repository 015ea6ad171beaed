"""The cluster a scenario measures, and a connected, warmed-up client for it.

A cluster is either one the bench started (it knows the control plane's pid
from the ready line and how many workers to wait for) or an existing one at
``--discovery-address`` (no control-plane pid: its memory is reported as
null; worker pids come from Discovery's statistics and are read only when
they run on this host).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs

from ..client import Client
from ._measure import Workload, local_worker_pids, stats, wait_for_workers
from ._nodes import LocalNode, start_node
from ._options import BenchError, Options
from ._progress import Progress
from ._rss import read_rss, to_mib

__all__ = ["Cluster", "Context", "connected", "idle_figures", "start_local"]

DEFAULT_MAX_PENDING = 1_000_000  # the Client's own default; raised when a run needs more


@attrs.define(eq=False)
class Cluster:
    """Where tasks go, and what we know of its processes."""

    discovery_address: str
    cp_pid: int | None = None
    workers: int | None = None  # worker processes to wait for; None: at least one
    node: LocalNode | None = None  # set when the bench started it

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()


@attrs.define(eq=False)
class Context:
    """What every scenario gets: the options, the progress line, the shared cluster."""

    options: Options
    progress: Progress
    workload: Workload
    shared: Cluster | None = None
    pids: set[int] = attrs.Factory(set)  # every node and worker process seen
    run_note: str = ""  # " (run 2/3)" while repeating scenarios
    # What a variant (--curve) adds to every node started and every client.
    node_extra: tuple[str, ...] = ()
    client_options: dict[str, Any] = attrs.Factory(dict)

    def label(self, phase: str) -> str:
        """What the progress line calls a phase."""
        return phase + self.run_note

    def start_node(
        self,
        role: str,
        *,
        workers: int = 0,
        discovery_address: str = "tcp://127.0.0.1:*",
        extra: Sequence[str] = (),
    ) -> LocalNode:
        """A node with this run's concurrency, its pid remembered for the report."""
        node = start_node(
            role,
            discovery_address=discovery_address,
            workers=workers,
            concurrency=self.options.concurrency,
            extra=(*self.node_extra, *extra),
        )
        self.pids.add(node.pid)
        return node


def start_local(ctx: Context, workers: int) -> Cluster:
    """A fresh ``--role all`` node with ``workers`` worker processes."""
    node = ctx.start_node("all", workers=workers)
    return Cluster(node.discovery_address, node.pid, workers, node)


@asynccontextmanager
async def connected(
    ctx: Context, cluster: Cluster, *, capacity: int, ready: bool = True
) -> AsyncIterator[tuple[Client, list[int]]]:
    """A started client and the local worker pids; stopped on the way out.

    With ``ready`` it first waits for the workers and makes one round trip,
    so connecting, registration and first-use costs stay out of the clock.
    """
    client = Client(
        discovery_address=cluster.discovery_address,
        serialization_format=ctx.options.serialization_format,
        max_pending=max(DEFAULT_MAX_PENDING, capacity),
        **ctx.client_options,
    )
    await client.start()
    try:
        pids: list[int] = []
        if ready:
            workers = await wait_for_workers(client, ctx.workload.task_name, cluster.workers)
            pids = local_worker_pids(workers)
            ctx.pids.update(pids)
            warm = await client.submit_task(ctx.workload.task_name, ctx.workload.args(0))
            if not warm.ok:
                raise BenchError(f"the warm-up task failed: {warm.error}")
        else:
            await stats(client)  # connected: the control plane has met this client
        yield client, pids
    finally:
        client.stop()


async def idle_figures(ctx: Context, cluster: Cluster) -> dict[str, float | None]:
    """Memory of a cluster that has not run a task yet (its workers registered)."""
    client = Client(
        discovery_address=cluster.discovery_address,
        serialization_format=ctx.options.serialization_format,
        **ctx.client_options,
    )
    await client.start()
    try:
        workers = await wait_for_workers(client, ctx.workload.task_name, cluster.workers)
    finally:
        client.stop()
    pids = local_worker_pids(workers)
    ctx.pids.update(pids)
    sizes = [s for s in map(read_rss, pids) if s is not None]
    return {
        "cp_rss_mb": to_mib(read_rss(cluster.cp_pid)),
        "worker_rss_mb": to_mib(max(sizes)) if sizes else None,
    }
