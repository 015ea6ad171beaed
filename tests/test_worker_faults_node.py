"""A misbehaving task fails alone in a real worker process: the process survives.

Before these fixes, an exception whose ``str()`` raises, or retry options
whose backoff overflows a float, raised inside trio's ``run_sync_soon`` and
ended the worker process with ``TrioInternalError``; the node restarted it
and every task running beside it ran again (7 accepted tasks, 21 runs).
Here the bystanders run beside the bad task and each must run exactly once,
on the same worker process, which must still be the only one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from _raw_submit import submit_raw
from multiprocess import Node, open_node, poll

from fastworker import Client, TaskStatus

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

ARGS = (
    "--role",
    "all",
    "--discovery-address",
    "tcp://127.0.0.1:*",
    "--workers",
    "1",
    "--concurrency",
    "12",
    "--heartbeat-interval",
    "0.2",
    "--grace",
    "1",
    "--task-modules",
    "tests.node_tasks",
)
BYSTANDERS = 7


async def _only_worker_pid(client: Client) -> int:
    async def check() -> int | None:
        workers = (await client.stats(timeout=5))["discovery"]["workers"]
        pids = {w["pid"] for w in workers.values()}
        return pids.pop() if len(pids) == 1 else None

    pid: int = await poll(check, timeout=20, what="one worker alive")
    return pid


def _runs(marker_dir: Path) -> Counter[str]:
    """Runs per task, from the files each run leaves (``<tag>-<pid>-<ns>``)."""
    return Counter(path.name.split("-")[0] for path in marker_dir.iterdir())


async def _bystanders(client: Client, marker_dir: Path) -> list[str]:
    return [
        await client.delay("sleepy", 1.0, str(marker_dir), f"bystander{n}")
        for n in range(BYSTANDERS)
    ]


async def _check_survival(
    node: Node, client: Client, pid: int, bystanders: list[str], marker_dir: Path
) -> dict[str, Any]:
    results = [client.get_result(i) for i in bystanders]
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results), results
    assert {r.result[1] for r in results if r is not None} == {pid}
    runs = _runs(marker_dir)
    assert [runs[f"bystander{n}"] for n in range(BYSTANDERS)] == [1] * BYSTANDERS
    assert await _only_worker_pid(client) == pid
    assert "TrioInternalError" not in node.stderr_text()
    stats: dict[str, Any] = await client.stats(timeout=5)
    assert stats["scheduler"]["requeued"] == 0
    assert stats["discovery"]["workers_lost"] == 0
    return stats


async def test_an_exception_whose_str_raises_does_not_end_the_worker_process(
    tmp_path: Path,
) -> None:
    async with (
        open_node(*ARGS) as node,
        Client(discovery_address=node.discovery_address, timeout=20) as client,
    ):
        pid = await _only_worker_pid(client)
        bystanders = await _bystanders(client, tmp_path)
        bad = {
            name: await client.delay(name, str(tmp_path))
            for name in ("bad_str_thread", "bad_str_asyncio", "bad_str_trio")
        }
        with trio.fail_after(30):
            await client.join()
        for name, task_id in bad.items():
            result = client.get_result(task_id)
            assert result is not None
            assert (result.status, result.attempts) == (TaskStatus.FAILURE, 1), name
            assert result.error == "BadStr: <exception str() failed: RuntimeError>", name
        await _check_survival(node, client, pid, bystanders, tmp_path)
        runs = _runs(tmp_path)
        assert [runs[name] for name in bad] == [1, 1, 1]


async def test_a_retry_backoff_that_overflows_does_not_end_the_worker_process(
    tmp_path: Path,
) -> None:
    async with (
        open_node(*ARGS) as node,
        Client(discovery_address=node.discovery_address, timeout=20) as client,
    ):
        pid = await _only_worker_pid(client)
        bystanders = await _bystanders(client, tmp_path)
        options = {
            "max_retries": 40,
            "retry_delay": 0.001,
            "retry_backoff": 1e15,  # refused by our client, legal on the wire
            "retry_backoff_max": 0.005,
        }
        task_id = submit_raw(client, "always_fail", (str(tmp_path),), options)
        with trio.fail_after(30):
            await client.join()
        result = client.get_result(task_id)
        assert result is not None
        assert (result.status, result.attempts) == (TaskStatus.FAILURE, 41)
        assert result.error == "RuntimeError: always fails"
        stats = await _check_survival(node, client, pid, bystanders, tmp_path)
        assert _runs(tmp_path)["always_fail"] == 41
        assert stats["scheduler"]["retried"] == 40


async def test_an_asyncio_task_blocking_its_loop_fails_in_time_and_its_process_is_recycled() -> (
    None
):
    async with (
        open_node(*ARGS) as node,
        Client(discovery_address=node.discovery_address, timeout=20) as client,
    ):
        pid = await _only_worker_pid(client)
        started = trio.current_time()
        task_id = await client.apply_async("blocks_its_loop", (6.0,), time_limit=0.3)
        with trio.fail_after(30):
            await client.join()
        took = trio.current_time() - started
        result = client.get_result(task_id)
        assert result is not None
        assert result.status is TaskStatus.FAILURE
        assert result.error is not None
        assert "its asyncio event loop is blocked" in result.error
        assert took < 4.0, f"answered after {took:.2f} s; the blocking call takes 6 s"

        async def replaced() -> int | None:
            current = await _only_worker_pid(client)
            return current if current != pid else None

        await poll(replaced, timeout=20, what="the worker process recycled")
        assert f"worker process {pid} recycled itself" in node.stderr_text()
        after = await client.submit_task("add_where", args=(2, 3), timeout=20)
        assert after.result[0] == 5


async def test_a_stuck_thread_recycles_its_process_under_steady_load(tmp_path: Path) -> None:
    """A thread stuck past its limit retires the worker even while quick tasks keep coming.

    Before, the process recycled only once nothing else ran, which a steady
    stream never allows: the stuck thread lived on and the stream ran beside it
    for ever.
    """
    async with (
        open_node(*ARGS) as node,
        Client(discovery_address=node.discovery_address, timeout=20) as client,
    ):
        pid = await _only_worker_pid(client)
        stuck = await client.apply_async("sleepy", (30.0, str(tmp_path), "stuck"), time_limit=0.3)
        stream: list[str] = []

        async def keep_busy() -> None:
            # Always several tasks running beside the stuck one, started at staggered
            # times: the worker is never idle, not even for a moment.
            while True:
                unfinished = [i for i in stream if client.get_result(i) is None]
                if len(unfinished) < 6:
                    stream.append(await client.delay("sleepy", 1.0, None, str(len(stream))))
                await trio.sleep(0.1)

        async def replaced() -> int | None:
            current = await _only_worker_pid(client)
            return current if current != pid else None

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep_busy)
                new_pid = await poll(replaced, timeout=30, what="the process recycled")
                nursery.cancel_scope.cancel()
            await client.join()
        result = client.get_result(stuck)
        assert result is not None
        assert result.status is TaskStatus.FAILURE
        assert "time limit" in (result.error or "")
        outcomes = [client.get_result(i) for i in stream]
        assert all(r is not None and r.status is TaskStatus.SUCCESS for r in outcomes)
        assert {r.result[1] for r in outcomes if r is not None} <= {pid, new_pid}
        assert f"worker process {pid} recycled itself" in node.stderr_text()


async def test_a_task_that_never_ends_cannot_keep_its_process_alive() -> None:
    """It is reported at its limit; the process recycles even though its run cannot end."""
    async with (
        open_node(*ARGS) as node,
        Client(discovery_address=node.discovery_address, timeout=20) as client,
    ):
        pid = await _only_worker_pid(client)
        task_id = await client.apply_async("never_cancels", time_limit=0.3)
        with trio.fail_after(10):
            await client.join()
        result = client.get_result(task_id)
        assert result is not None
        assert "did not stop when cancelled" in (result.error or "")

        async def replaced() -> int | None:
            current = await _only_worker_pid(client)
            return current if current != pid else None

        await poll(replaced, timeout=30, what="the process forced out and replaced")
        assert "shutdown stuck" in node.stderr_text()
        after = await client.submit_task("add_where", args=(2, 3), timeout=20)
        assert after.result[0] == 5
