"""``python -m fastworker.node`` with real processes: roles, worker supervision, shutdown.

Every node is a real subprocess started by ``multiprocess.open_node``, which
stops it and kills whatever is left of its process group when the test ends,
pass or fail.  The client runs natively on the test's trio run.  Waiting is
for events (a ready line, a process exit) or a condition polled in a bounded
loop (``poll``): statistics from the control plane, marker files written by
running tasks.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from multiprocess import (
    Node,
    free_tcp_port,
    open_node,
    parent_of,
    poll,
    process_alive,
)

from fastworker import Client, TaskResult, TaskStatus

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]

ANY_PORT = "tcp://127.0.0.1:*"
MODULES = ("--task-modules", "examples.tasks", "tests.node_tasks")
FAST = ("--heartbeat-interval", "0.2")  # a dead worker is noticed after ~0.6 s


def client_for(node: Node) -> Client:
    return Client(discovery_address=node.discovery_address, timeout=15)


async def wait_for_workers(
    client: Client,
    count: int,
    *,
    gone: set[int] | frozenset[int] = frozenset(),
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Discovery's workers once exactly ``count`` are alive and none has a pid in ``gone``."""

    async def check() -> dict[str, Any] | None:
        discovery = (await client.stats(timeout=5))["discovery"]
        workers: dict[str, Any] = discovery["workers"]
        pids = {w["pid"] for w in workers.values()}
        if discovery["workers_alive"] == count and len(pids) == count and not pids & gone:
            return workers
        return None

    return await poll(check, timeout=timeout, what=f"{count} workers alive")


def worker_pids(workers: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in workers.values()}


def markers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def wait_for_markers(directory: Path, count: int, timeout: float = 15.0) -> list[str]:
    """The marker files of ``count`` tasks that have started running."""
    return await poll(
        lambda: (found := markers(directory)) and len(found) >= count and found,
        timeout=timeout,
        what=f"{count} tasks running",
    )


def assert_final(result: TaskResult | None) -> TaskResult:
    assert result is not None
    assert result.status in (TaskStatus.SUCCESS, TaskStatus.FAILURE), result
    if result.status is TaskStatus.FAILURE:
        assert result.error, result  # a failure says why
    return result


def assert_no_traceback(node: Node) -> None:
    text = node.stderr_text()
    assert "Traceback" not in text, f"the node logged a traceback:\n{text}"


# -- role all -----------------------------------------------------------------


async def test_a_thousand_tasks_over_two_worker_processes() -> None:
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2", *MODULES)
    async with open_node(*args) as node, client_for(node) as client:
        assert (node.role, node.workers) == ("all", 2)
        pids = worker_pids(await wait_for_workers(client, 2))
        assert len(pids) == 2
        assert node.pid not in pids
        assert os.getpid() not in pids
        assert set(node.children()) == pids  # the node's own supervised children

        ids = [await client.delay("add_where", i, i) for i in range(1000)]
        await client.join(timeout=30)

        results = [client.get_result(task_id) for task_id in ids]
        assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results), [
            r for r in results if r is None or not r.ok
        ][:3]
        assert [r.result[0] for r in results if r] == [2 * i for i in range(1000)]
        assert {r.result[1] for r in results if r} == pids  # both processes did work
        scheduler = (await client.stats())["scheduler"]
        assert scheduler["succeeded"] == 1000
        assert scheduler["failed"] == 0


# -- separate roles -------------------------------------------------------------


async def test_a_worker_node_serves_a_separate_control_plane_node() -> None:
    cp_args = ("--role", "control-plane", "--discovery-address", ANY_PORT, *FAST)
    async with open_node(*cp_args) as control:
        assert (control.role, control.workers) == ("control-plane", 0)
        assert control.children() == []  # no worker processes of its own
        worker_args = ("--role", "worker", "--workers", "1", *FAST, *MODULES)
        async with (
            open_node(*worker_args, "--discovery-address", control.discovery_address) as workers,
            client_for(control) as client,
        ):
            assert (workers.role, workers.workers) == ("worker", 1)
            assert workers.discovery_address == control.discovery_address
            (pid,) = worker_pids(await wait_for_workers(client, 1))
            assert parent_of(pid) == workers.pid

            added = await client.submit_task("add", args=[2, 3])
            assert (added.status, added.result) == (TaskStatus.SUCCESS, 5)
            where = await client.submit_task("add_where", args=[20, 22])
            assert where.result == [42, pid]


async def test_a_worker_started_before_its_control_plane_joins_it() -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    worker_args = ("--role", "worker", "--workers", "1", *FAST, *MODULES)
    async with open_node(*worker_args, "--discovery-address", address) as workers:
        (early,) = await poll(workers.children, timeout=10, what="the worker process started")
        cp_args = ("--role", "control-plane", "--discovery-address", address, *FAST)
        async with open_node(*cp_args) as control, client_for(control) as client:
            assert control.discovery_address == address
            pool = await wait_for_workers(client, 1)
            assert worker_pids(pool) == {early}  # the early process joined, not a replacement
            assert process_alive(early)

            ids = [await client.delay("add", i, 1) for i in range(20)]
            await client.join(timeout=15)
            assert [assert_final(client.get_result(i)).result for i in ids] == [
                i + 1 for i in range(20)
            ]


# -- supervision ----------------------------------------------------------------


async def test_a_killed_worker_process_is_restarted_and_its_tasks_end(tmp_path: Path) -> None:
    args = (
        *("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2"),
        *("--concurrency", "2", "--prefetch", "0", "--grace", "2"),
        *FAST,
        *MODULES,
    )
    async with open_node(*args) as node, client_for(node) as client:
        before = worker_pids(await wait_for_workers(client, 2))
        # Two tasks on each worker (window 2 each), all running before the kill.
        ids = [await client.delay("sleepy", 1.0, str(tmp_path), tag=f"t{i}") for i in range(4)]
        started = await wait_for_markers(tmp_path, 4)
        victim = min(before)
        on_victim = [m for m in started if f"-{victim}-" in m]
        assert on_victim, started
        assert parent_of(victim) == node.pid  # still the node's child: safe to kill
        os.kill(victim, signal.SIGKILL)

        after = worker_pids(await wait_for_workers(client, 2, gone={victim}))
        assert victim not in after
        assert not process_alive(victim)
        assert after - before, "a new worker process joined"
        assert set(node.children()) == after

        # The killed worker's tasks do not hang: each ends, within a bound.
        with trio.fail_after(15):
            await client.join()
        results = [assert_final(client.get_result(i)) for i in ids]
        for result in results:
            if result.ok:
                assert result.result[1] != victim
        scheduler = (await client.stats())["scheduler"]
        assert scheduler["requeued"] >= len(on_victim)

        fresh = await client.submit_task("add_where", args=[1, 2])
        assert fresh.status is TaskStatus.SUCCESS
        assert fresh.result[0] == 3
        assert fresh.result[1] in after


# -- shutdown -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [
        pytest.param(signal.SIGTERM, False, id="SIGTERM-to-the-node"),
        pytest.param(signal.SIGINT, True, id="ctrl-c-to-the-process-group"),
    ],
)
async def test_an_idle_node_exits_0_on_a_signal_and_leaves_no_process(
    signum: int, whole_group: bool
) -> None:
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2", *FAST, *MODULES)
    async with open_node(*args) as node, client_for(node) as client:
        pids = worker_pids(await wait_for_workers(client, 2))
        if whole_group:  # what a terminal does on ctrl-C: the node and its workers at once
            os.killpg(node.pid, signum)
        else:
            node.signal(signum)
        exited = await trio.to_thread.run_sync(node.wait_exit, 15.0)
        assert exited, node.stderr_text()
        assert node.exit_code == 0, node.stderr_text()
        assert node.survivors == []
        assert not any(process_alive(pid) for pid in pids)
        assert_no_traceback(node)


async def test_sigterm_lets_tasks_in_flight_finish_and_deliver_their_results(
    tmp_path: Path,
) -> None:
    grace = 10.0
    args = (
        *("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2"),
        *("--concurrency", "10", "--prefetch", "0", "--grace", str(grace)),
        *FAST,
        *MODULES,
    )
    async with open_node(*args) as node, client_for(node) as client:
        pids = worker_pids(await wait_for_workers(client, 2))
        ids = [await client.delay("sleepy", 1.0, str(tmp_path), tag=f"t{i}") for i in range(20)]
        await wait_for_markers(tmp_path, 20)  # every one of them is running
        assert all(client.get_result(i) is None for i in ids)

        started = trio.current_time()
        code = await trio.to_thread.run_sync(node.terminate, grace + 5)
        took = trio.current_time() - started
        assert code == 0, node.stderr_text()
        assert took < grace, f"exit took {took:.1f} s"
        assert node.survivors == [], "worker processes outlived their node"
        assert not any(process_alive(pid) for pid in pids)

        # The node is gone: whatever arrives now was sent before it exited.
        with trio.fail_after(5):
            await client.join()
        results = [client.get_result(i) for i in ids]
        assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results), results
        assert sorted(r.result[0] for r in results if r) == sorted(f"t{i}" for i in range(20))
        assert {r.result[1] for r in results if r} <= pids
        assert_no_traceback(node)


async def test_tasks_longer_than_the_grace_do_not_hold_up_the_exit(tmp_path: Path) -> None:
    args = (
        *("--role", "all", "--discovery-address", ANY_PORT, "--workers", "1"),
        *("--concurrency", "4", "--prefetch", "0", "--grace", "0.5"),
        *FAST,
        *MODULES,
    )
    async with open_node(*args) as node, client_for(node) as client:
        (pid,) = worker_pids(await wait_for_workers(client, 1))
        ids = [await client.delay("sleepy", 30.0, str(tmp_path), tag=f"t{i}") for i in range(4)]
        await wait_for_markers(tmp_path, 4)

        started = trio.current_time()
        code = await trio.to_thread.run_sync(node.terminate, 15.0)
        took = trio.current_time() - started
        assert code == 0, node.stderr_text()
        assert took < 10, f"exit took {took:.1f} s for a grace of 0.5 s"
        assert node.survivors == []
        assert not process_alive(pid)
        assert "handed back 4 tasks" in node.stderr_text()
        assert all(client.get_result(i) is None for i in ids)  # unfinished, not failed


async def test_a_node_killed_outright_leaves_no_orphan_workers() -> None:
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "2", *FAST, *MODULES)
    async with open_node(*args) as node, client_for(node) as client:
        pids = worker_pids(await wait_for_workers(client, 2))
        node.signal(signal.SIGKILL)
        assert await trio.to_thread.run_sync(node.wait_exit, 5.0)
        assert set(node.survivors) == pids  # orphaned for now ...
        # ... but each notices its node is gone and leaves by itself.
        await poll(
            lambda: not any(process_alive(pid) for pid in pids),
            timeout=10,
            what="orphaned workers exited",
        )
