"""A one-second cron on a real node with three worker processes: one run per tick."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from multiprocess import open_node, poll

from fastworker import Client, TaskStatus
from fastworker.control._schedules import tick_task_id

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def runs(directory: Path) -> int:
    """Runs so far: each leaves one marker file."""
    return len(list(directory.iterdir()))


async def test_a_one_second_cron_runs_once_per_tick_with_three_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FASTWORKER_TEST_TICK_DIR", str(tmp_path))
    args = ("--discovery-address", "tcp://127.0.0.1:*", "--workers", "3")
    modules = ("--task-modules", "tests.periodic_node_tasks")
    async with (
        open_node(*args, *modules) as node,
        Client(discovery_address=node.discovery_address, timeout=15) as client,
    ):

        async def three_workers_declared() -> bool:
            stats = await client.stats()
            return stats["discovery"]["workers_alive"] == 3 and bool(await client.schedules())

        await poll(three_workers_declared, timeout=20, what="three workers and their schedule")
        (info,) = await client.schedules()
        assert (info.schedule_id, info.source) == ("periodic_node_tick", "declared")
        start = time.time()
        await poll(lambda: runs(tmp_path) >= 3, timeout=15, what="three runs")
        assert await client.remove_schedule("periodic_node_tick")
        submitted = (await client.stats())["scheduler"]["schedules"]["runs"]
        await poll(lambda: runs(tmp_path) >= submitted, timeout=10, what="every run")
        end = time.time()
        found = []
        for second in range(math.floor(start) - 1, math.ceil(end) + 1):
            result = await client.get_task_result(tick_task_id(info.schedule_id, second))
            if result is not None:
                assert result.status is TaskStatus.SUCCESS
                found.append(second)
        # Each tick ran once, in one of the three processes, under its own id.
        assert len(found) == submitted == runs(tmp_path)
        assert found == list(range(found[0], found[0] + len(found)))
