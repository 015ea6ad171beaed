"""A task that kills its worker process every time (``os._exit(1)``): the poison guard.

After ``--max-worker-deaths`` runs that killed their worker the task fails
with an error that says so; the tasks submitted with it, some of which die
with it once, all succeed (a requeued task is a suspect, and a worker runs at
most one suspect at a time, so the poison cannot take them down again).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from _nodes import ANY_PORT, TASKS, client_for, fault_node, read_runs, stats, wait_for_workers

from fastworker import TaskStatus

pytestmark = [pytest.mark.multiprocess]


@pytest.mark.timeout(60)
async def test_a_task_that_kills_its_worker_fails_after_the_poison_limit(tmp_path: Path) -> None:
    deaths = 3
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2")
    args += ("--concurrency", "4", "--heartbeat-interval", "0.2", "--grace", "1")
    args += ("--max-worker-deaths", str(deaths), *TASKS)
    async with fault_node(*args) as node, client_for(node) as client:
        await wait_for_workers(client, 2)
        started = trio.current_time()
        before = [await client.delay("work", n, 0.05, str(tmp_path)) for n in range(20)]
        poison = await client.delay("poison")
        after = [await client.delay("work", n, 0.05, str(tmp_path)) for n in range(20, 50)]
        with trio.fail_after(45):
            await client.join()
        took = trio.current_time() - started

        result = client.get_result(poison)
        assert result is not None
        assert result.status is TaskStatus.FAILURE
        assert result.error is not None
        assert f"killed their worker {deaths} times" in result.error, result.error
        others = [client.get_result(i) for i in before + after]
        assert all(r is not None and r.status is TaskStatus.SUCCESS for r in others), [
            r for r in others if r is None or not r.ok
        ][:3]
        assert [r.result[0] for r in others if r] == [2 * n for n in range(50)]
        full = await stats(client)
        assert full["discovery"]["workers_lost"] == deaths
        assert full["scheduler"]["failed"] == 1
        assert full["scheduler"]["succeeded"] == 50
        innocent_reruns = sum(n - 1 for n in read_runs(tmp_path).duplicated().values())
        await wait_for_workers(client, 2)  # the node replaced every dead worker process
        print(
            f"\npoison task: FAILURE after killing {full['discovery']['workers_lost']} worker "
            f"processes ({result.error!r}); the 50 tasks submitted around it all succeeded "
            f"({innocent_reruns} re-ran after dying with it), all done in {took:.1f} s"
        )
