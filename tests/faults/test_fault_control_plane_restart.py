"""``kill -9`` of the control plane mid-run and a restart on the same discovery address.

Task state lives only in the control plane's memory, so recovery rests on the
client: it notices the new instance (a new instance id from Discovery) and
re-submits everything it has no result for.  Nothing may be lost; tasks may
run twice (at-least-once), and the test counts how many did.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import pytest
import trio
from _nodes import (
    TASKS,
    client_for,
    fault_node,
    free_tcp_port,
    poll,
    read_runs,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import TaskStatus

pytestmark = [pytest.mark.multiprocess]


async def run_restarts(tmp_path: Path, *, tasks: int, restarts: int) -> None:
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    heartbeat = ("--heartbeat-interval", "0.5")
    cp_args = ("--role", "control-plane", "--discovery-address", address, *heartbeat)
    worker_args = ("--role", "worker", "--discovery-address", address, "--workers", "1")
    worker_args += ("--concurrency", "10", "--grace", "2", *heartbeat, *TASKS)
    async with contextlib.AsyncExitStack() as nodes:
        # Every node started here is stopped (or reaped, when killed) on the way out.
        control = await nodes.enter_async_context(fault_node(*cp_args))
        await nodes.enter_async_context(fault_node(*worker_args))
        client = await nodes.enter_async_context(client_for(address, result_cache_size=tasks))
        (worker,) = worker_pids(await wait_for_workers(client, 1))
        ids = await client.submit_batch([("work", [n, 0.01, str(log_dir)]) for n in range(tasks)])
        recoveries: list[float] = []
        for round_ in range(restarts):
            # Kill it when a share of the run is done, with work queued and in flight.
            target = tasks * (round_ + 1) // (restarts + 2)
            await poll(
                lambda: tasks - client.pending_count >= target,  # noqa: B023 (used at once)
                timeout=30,
                interval=0.01,
                what=f"{target} results",
            )
            done_before = tasks - client.pending_count
            control.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            assert await trio.to_thread.run_sync(control.wait_exit, 10.0)
            control = await nodes.enter_async_context(fault_node(*cp_args))
            assert control.discovery_address == address
            # The worker rejoins the new instance by itself; the client re-submits.
            await poll(
                lambda: tasks - client.pending_count > done_before,  # noqa: B023
                timeout=20,
                interval=0.01,
                what="results flowing again",
            )
            recoveries.append(time.monotonic() - killed_at)
        with trio.fail_after(60 * restarts):
            await client.join()
        final = await stats(client)
        assert worker_pids(await wait_for_workers(client, 1)) == {worker}

        results = [client.get_result(task_id) for task_id in ids]
        lost = [n for n, r in enumerate(results) if r is None]
        assert lost == []
        bad = [
            (n, r)
            for n, r in enumerate(results)
            if r is None or r.status is not TaskStatus.SUCCESS or r.result[0] != 2 * n
        ]
        assert bad == [], bad[:3]
        runs = read_runs(log_dir)
        assert set(runs.counts) == {str(n) for n in range(tasks)}
        duplicated = runs.duplicated()
        extra_runs = sum(n - 1 for n in duplicated.values())
        resubmitted = client._core.resubmitted
        print(
            f"\ncontrol plane kill -9 + restart ×{restarts} during {tasks} tasks: 0 lost, "
            f"{resubmitted} re-submitted by the client, {extra_runs} duplicate runs "
            f"({len(duplicated)} tasks), results flowing again "
            f"{', '.join(f'{r:.2f}' for r in recoveries)} s after each kill; last instance "
            f"{final['scheduler']['succeeded']} succeeded, "
            f"{final['scheduler']['duplicate_submissions']} duplicate submissions, "
            f"{final['scheduler']['stale_results']} stale results"
        )
        assert resubmitted > 0
        # Only re-submitted tasks can run again.
        assert extra_runs <= resubmitted


@pytest.mark.timeout(90)
async def test_control_plane_kill_9_and_restart_loses_no_task(tmp_path: Path) -> None:
    await run_restarts(tmp_path, tasks=2000, restarts=1)


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_soak_control_plane_restarted_three_times(tmp_path: Path) -> None:
    await run_restarts(tmp_path, tasks=20_000, restarts=3)
