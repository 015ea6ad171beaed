"""``kill -9`` of a worker process in the middle of a run: nothing lost, duplicates bounded.

The victim is the worker process of a ``--role all`` node, with
``--concurrency 100 --prefetch 0``: it holds up to 100 tasks, all running.
A second node's worker keeps serving meanwhile.  Every task records its start
in a per-process file (``fault_tasks.record``), so the test knows which runs
the victim had started and how often each task ran in total.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from _nodes import (
    ANY_PORT,
    TASKS,
    client_for,
    fault_node,
    log_time,
    poll,
    read_runs,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import TaskStatus

pytestmark = [pytest.mark.multiprocess]

HEARTBEAT = 1.0
LIVENESS = 3  # missed heartbeats (the control plane's default)
# Discovery's reaper runs every interval / 2: a silent worker is declared dead
# between LIVENESS and LIVENESS + 0.5 intervals after its last heartbeat.
DETECTION_LIMIT = (LIVENESS + 0.5) * HEARTBEAT
# What seeing it in the stats adds: the polling interval and a stats round trip.
OBSERVATION_SLACK = 0.5


def duration(n: int) -> float:
    """20 to 50 ms, varying from task to task."""
    return 0.020 + (n % 31) / 1000


def _count_starts(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b"\n") - data.count(b"done:")


async def run_kill_9(tmp_path: Path, *, tasks: int, kills: int) -> None:
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    common = ("--heartbeat-interval", str(HEARTBEAT), "--grace", "2", *TASKS)
    # The poison guard fails a task that was running at --max-worker-deaths deaths of its
    # worker; with several kills an innocent requeued task can be running at each of them,
    # so the limit is set above the number of kills (the guard has a test of its own).
    common += ("--max-worker-deaths", str(kills + 1))
    victim_args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "1")
    victim_args += ("--concurrency", "100", "--prefetch", "0", *common)
    async with fault_node(*victim_args) as node:
        helper_args = ("--role", "worker", "--discovery-address", node.discovery_address)
        helper_args += ("--workers", "1", "--concurrency", "4", "--prefetch", "0", *common)
        async with (
            fault_node(*helper_args) as helper,
            client_for(node, result_cache_size=tasks) as client,
        ):
            pids = worker_pids(await wait_for_workers(client, 2))
            (victim,) = set(node.children())
            (survivor,) = set(helper.children())
            assert pids == {victim, survivor}

            specs = [("work", [n, duration(n), str(log_dir)]) for n in range(tasks)]
            ids = await client.submit_batch(specs)
            killed: list[int] = []
            detections: list[float] = []
            requeued_total = 0
            for round_ in range(kills):
                # Wait until the victim has started a full window (100 runs) and kill it mid-run.
                victim_log = log_dir / f"{victim}.log"
                await poll(
                    lambda: _count_starts(victim_log) >= 100,  # noqa: B023 (used at once)
                    timeout=20,
                    interval=0.002,
                    what="the victim running a full window",
                )
                before = (await stats(client))["scheduler"]["requeued"]
                os.kill(victim, signal.SIGKILL)  # our node's child: a process we started
                killed_at = time.time()
                killed.append(victim)

                # Detection: the moment the control plane requeues the victim's tasks.
                async def requeued_since() -> dict[str, Any] | None:
                    found: dict[str, Any] = (await stats(client))["scheduler"]
                    return found if found["requeued"] > before else None  # noqa: B023

                scheduler = await poll(requeued_since, timeout=15, interval=0.02, what="requeue")
                seen_at = time.time()
                requeued = scheduler["requeued"] - before
                requeued_total += requeued
                observed = seen_at - killed_at
                missed = f"(pid {victim}) missed"  # written by the node's log-writer thread
                declared = await poll(
                    lambda m=missed: log_time(node.stderr_text(), m),
                    timeout=5,
                    what=f"the log line {missed!r}",
                )
                detection = declared - killed_at
                detections.append(detection)
                print(
                    f"\nkill -9 #{round_ + 1}: {requeued} tasks in flight requeued; declared dead "
                    f"{detection:.2f} s after the kill (stats showed it after {observed:.2f} s; "
                    f"heartbeat {HEARTBEAT:g} s)"
                )
                assert 0 < requeued <= 100
                if round_ == 0:
                    assert requeued >= 80, "the victim was not holding a full window"
                assert detection <= DETECTION_LIMIT, f"detection took {detection:.2f} s"
                assert observed <= DETECTION_LIMIT + OBSERVATION_SLACK, observed
                if round_ + 1 < kills:
                    # The node restarts its worker process; kill the new one next.
                    workers = await wait_for_workers(client, 2, gone=killed)
                    (victim,) = worker_pids(workers) - {survivor}

            with trio.fail_after(60):
                await client.join()
            results = [client.get_result(task_id) for task_id in ids]
            lost = [i for i, r in enumerate(results) if r is None]
            assert lost == []
            bad = [
                (n, r)
                for n, r in enumerate(results)
                if r is None or r.status is not TaskStatus.SUCCESS or r.result[0] != 2 * n
            ]
            assert bad == [], bad[:3]

            runs = read_runs(log_dir)
            assert set(runs.counts) == {str(n) for n in range(tasks)}  # every task ran
            duplicated = runs.duplicated()
            extra_runs = sum(n - 1 for n in duplicated.values())
            started_on_victims = set().union(*(runs.started_by(pid) for pid in killed))
            # Only a run that had started on a killed process can run again.
            assert set(duplicated) <= started_on_victims, set(duplicated) - started_on_victims
            assert extra_runs <= requeued_total <= 100 * kills
            interrupted = sum(len(runs.started_by(pid) - runs.finished_by(pid)) for pid in killed)
            for n, result in enumerate(results):
                # Every result comes from a run that reached its end (none from a killed run).
                assert str(n) in runs.finished_by(result.result[1])  # type: ignore[union-attr]
            # Each run a kill cut short ran again; the other extra runs had finished but not
            # reported yet (results are coalesced for a few ms).
            assert interrupted <= extra_runs
            scheduler = (await stats(client))["scheduler"]
            assert scheduler["succeeded"] == tasks
            assert scheduler["failed"] == 0
            print(
                f"kill -9 ×{kills} over {tasks} tasks: detected in "
                f"{', '.join(f'{d:.2f}' for d in detections)} s, 0 lost, {extra_runs} duplicate "
                f"runs ({len(duplicated)} tasks, ≤ {requeued_total} in flight at the kills, "
                f"{interrupted} runs cut short by the kills)"
            )


@pytest.mark.timeout(90)
async def test_kill_9_of_a_worker_holding_100_tasks_loses_none(tmp_path: Path) -> None:
    await run_kill_9(tmp_path, tasks=2000, kills=1)


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_soak_repeated_kill_9_of_workers(tmp_path: Path) -> None:
    await run_kill_9(tmp_path, tasks=20_000, kills=5)
