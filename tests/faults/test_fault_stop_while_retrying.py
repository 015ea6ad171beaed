"""A worker stopped past its deadline while its task fails and retries, then resumed.

The first release's control plane died here: the worker was declared dead, its
task requeued, and on SIGCONT the worker reported that task as *retrying*;
the task then stood in the queue twice, ran twice at once, a queue count went
negative and every later message crashed the Scheduler until its supervisor
gave up.  A report from a worker that no longer holds the task is stale: the
requeued task simply runs again, once at a time, and the control plane keeps
serving.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from _nodes import (
    ANY_PORT,
    TASKS,
    client_for,
    fault_node,
    poll,
    read_runs,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import TaskStatus

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


async def test_a_retry_reported_after_the_worker_was_declared_dead_is_stale(
    tmp_path: Path,
) -> None:
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    args = ("--heartbeat-interval", "0.2", "--grace", "1", "--concurrency", "2", *TASKS)
    async with (
        fault_node("--role", "all", "--discovery-address", ANY_PORT, *args) as node,
        client_for(node) as client,
    ):
        (worker,) = worker_pids(await wait_for_workers(client, 1))
        task_id = await client.delay("slow_fail", str(log_dir), 1.0)
        await poll(lambda: read_runs(log_dir).total >= 1, timeout=15, what="the first run")
        os.kill(worker, signal.SIGSTOP)
        try:

            async def declared_dead() -> bool:
                return (await stats(client))["discovery"]["workers_lost"] >= 1

            await poll(declared_dead, timeout=15, what="the stopped worker declared dead")
            # Stay stopped past the end of the run's sleep (a fault held for a
            # while, not a wait for an event): on SIGCONT the run fails at once
            # and its "retrying" report races the worker's re-registration.
            await trio.sleep(1.5)
        finally:
            os.kill(worker, signal.SIGCONT)  # its run ends and reports "retrying", late
        with trio.fail_after(30):
            result = await client.submit_task("slow_fail", args=(str(log_dir), 0.0))
            await client.join(timeout=25)
        first = client.get_result(task_id)
        assert first is not None
        assert result.status is TaskStatus.FAILURE
        assert first.status is TaskStatus.FAILURE
        assert "slow failure" in (first.error or "")
        scheduler = (await stats(client))["scheduler"]
        assert scheduler["internal_errors"] == 0
        assert scheduler["queued_total"] == 0
        assert scheduler["held"] == 0
        # Each task ran at most its 4 attempts plus the one run the stop cut off.
        assert read_runs(log_dir).counts["slow_fail"] <= 4 + 4 + 1
        assert not node.exited(), "the control plane must still be serving"
