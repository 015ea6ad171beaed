"""SIGTERM to a worker node with tasks in flight: drain, hand back, exit 0, lose nothing.

Its worker stops taking work, lets the running tasks finish within
``--grace``, hands back the ones it held but had not started (``Release``),
and the control plane runs those on the other worker node.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from _nodes import (
    ANY_PORT,
    TASKS,
    client_for,
    fault_node,
    poll,
    process_alive,
    read_runs,
    stats,
    wait_for_workers,
)

from fastworker import TaskStatus

pytestmark = [pytest.mark.multiprocess]

GRACE = 10.0


@pytest.mark.timeout(60)
async def test_sigterm_drains_a_worker_node_and_hands_back_its_tasks(tmp_path: Path) -> None:
    cp_args = ("--role", "control-plane", "--discovery-address", ANY_PORT)
    cp_args += ("--heartbeat-interval", "0.5")
    async with fault_node(*cp_args) as control, client_for(control) as client:
        worker_args = ("--role", "worker", "--discovery-address", control.discovery_address)
        worker_args += ("--workers", "1", "--grace", str(GRACE), "--prefetch", "8", *TASKS)
        async with (
            fault_node(*worker_args, "--concurrency", "4") as leaving,
            fault_node(*worker_args, "--concurrency", "8") as staying,
        ):
            await wait_for_workers(client, 2)
            (drained,) = leaving.children()
            (other,) = staying.children()
            ids = [
                await client.delay("work", n, 0.5 + (n % 4) / 10, str(tmp_path)) for n in range(30)
            ]
            # The leaving worker runs 4 and holds 8 more it has not started.
            await poll(
                lambda: len(read_runs(tmp_path).started_by(drained)) >= 4,
                timeout=15,
                interval=0.01,
                what="4 tasks running on the worker to drain",
            )
            running_at_term = read_runs(tmp_path).started_by(drained)

            started = trio.current_time()
            code = await trio.to_thread.run_sync(leaving.terminate, GRACE + 5)
            took = trio.current_time() - started
            assert code == 0, leaving.stderr_text()[-3000:]
            assert took < GRACE, f"the drain took {took:.1f} s"
            assert leaving.survivors == []
            assert not process_alive(drained)

            with trio.fail_after(30):
                await client.join()
            results = [client.get_result(i) for i in ids]
            assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results), [
                r for r in results if r is None or not r.ok
            ][:3]
            assert [r.result[0] for r in results if r] == [2 * n for n in range(30)]
            runs = read_runs(tmp_path)
            ran_on_drained = runs.started_by(drained)
            # What it had started, it finished and reported itself, within the grace.
            for n_str in ran_on_drained:
                assert results[int(n_str)].result[1] == drained  # type: ignore[union-attr]
            assert runs.duplicated() == {}  # a drain runs nothing twice
            scheduler = (await stats(client))["scheduler"]
            assert scheduler["released"] > 0, scheduler
            assert scheduler["succeeded"] == 30
            assert {r.result[1] for r in results if r} == {drained, other}
            print(
                f"\nSIGTERM drain (--grace {GRACE:g}): exit code {code} after {took:.2f} s; "
                f"{len(running_at_term)} running at SIGTERM finished there "
                f"({len(ran_on_drained)} ran there in all), {scheduler['released']} handed back "
                f"and run on the other node; 30/30 succeeded, 0 lost, 0 run twice"
            )
