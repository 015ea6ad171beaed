"""Time limits, retries and countdowns under a real node.

One node for the module (``--workers 1 --heartbeat-interval 0.2``); each test
has its own client.  The time-limit test leaves the node with a recycled
worker process, which is part of what it checks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from _nodes import (
    ANY_PORT,
    TASKS,
    Node,
    client_for,
    fault_node_sync,
    poll,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import Client, TaskResult, TaskStatus

pytestmark = [pytest.mark.multiprocess]

HEARTBEAT = 0.2
# Slack for a loaded 2-core machine on top of what a spec allows.
SCHEDULING_MARGIN = 0.5


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "1")
    args += ("--concurrency", "4", "--heartbeat-interval", str(HEARTBEAT), "--grace", "1")
    with fault_node_sync(*args, *TASKS) as started:
        yield started


def run_time(result: TaskResult) -> float:
    assert result.started_at is not None
    assert result.completed_at is not None
    return (result.completed_at - result.started_at).total_seconds()


async def the_worker(client: Client) -> int:
    (pid,) = worker_pids(await wait_for_workers(client, 1))
    return pid


# -- time limits ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_sync_task_past_its_time_limit_fails_and_its_process_is_recycled(
    node: Node,
) -> None:
    async with client_for(node) as client:
        first = await the_worker(client)
        started = trio.current_time()
        result = await client.submit_task("overrun", args=[3.0], timeout=10)
        waited = trio.current_time() - started
        assert result.status is TaskStatus.FAILURE
        assert result.error is not None
        assert "time limit of 0.5 s" in result.error, result.error
        ran = run_time(result)
        assert 0.5 <= ran <= 0.5 + SCHEDULING_MARGIN, ran
        assert waited < 3.0  # reported at its limit, not when the thread finished

        # The thread cannot be stopped: once idle, the process is replaced.
        async def replaced() -> int | None:
            pid = await the_worker(client)
            return pid if pid != first else None

        current = await poll(replaced, timeout=15, what="the worker process recycled")
        recycled = trio.current_time() - started
        later = await client.submit_task("where", timeout=10)
        assert (later.status, later.result) == (TaskStatus.SUCCESS, current)
        recycled_line = f"worker process {first} recycled itself"  # from the log-writer thread
        await poll(lambda: recycled_line in node.stderr_text(), timeout=5, what="the log line")
        print(
            f"\nsync task past timeout=0.5: FAILURE {result.error!r} after {ran:.2f} s "
            f"(answer in {waited:.2f} s); worker process {first} recycled to {current} "
            f"{recycled:.2f} s after submission; next task ran on {later.result}"
        )


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
@pytest.mark.timeout(30)
async def test_an_async_task_past_its_time_limit_is_cancelled(
    node: Node, loop: str, tmp_path: Path
) -> None:
    marker = tmp_path / "cancelled"
    async with client_for(node) as client:
        pid = await the_worker(client)
        result = await client.submit_task(f"overrun_{loop}", args=[3.0, str(marker)], timeout=10)
        assert result.status is TaskStatus.FAILURE
        assert "time limit of 0.5 s" in (result.error or ""), result.error
        ran = run_time(result)
        assert 0.5 <= ran <= 0.5 + SCHEDULING_MARGIN, ran
        assert marker.exists(), "the coroutine was not cancelled"
        cancelled_at = float(marker.read_text().split()[1])
        started_at = result.started_at.timestamp()  # type: ignore[union-attr]
        assert cancelled_at - started_at < 0.5 + SCHEDULING_MARGIN
        # A cancelled coroutine leaves nothing stuck: the worker process is kept.
        await trio.sleep(3 * HEARTBEAT)
        assert await the_worker(client) == pid
        print(
            f"\n{loop} task past timeout=0.5: FAILURE {result.error!r} after {ran:.2f} s, "
            f"coroutine cancelled, worker process kept"
        )


# -- retries --------------------------------------------------------------------


def _gaps(path: Path) -> list[float]:
    times = [float(x) for x in path.read_text().split()]
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.timeout(30)
async def test_retries_succeed_on_the_third_attempt_or_fail_after_backoff(
    node: Node, tmp_path: Path
) -> None:
    async with client_for(node) as client:
        flaky = await client.submit_task("flaky", args=[str(tmp_path), 2], timeout=15)
        assert (flaky.status, flaky.result, flaky.attempts) == (TaskStatus.SUCCESS, 3, 3), flaky
        flaky_gaps = _gaps(tmp_path / "flaky.log")

        failing = await client.submit_task("always_fails", args=[str(tmp_path)], timeout=15)
        assert failing.status is TaskStatus.FAILURE
        assert failing.attempts == 3
        assert failing.error == "RuntimeError: always fails"
        assert "RuntimeError" in (failing.traceback or "")
        failing_gaps = _gaps(tmp_path / "always.log")
        for gaps in (flaky_gaps, failing_gaps):
            assert len(gaps) == 2
            # retry_delay 0.1 s, doubled each time (retry_backoff 2)
            assert 0.1 <= gaps[0] < 0.1 + SCHEDULING_MARGIN, gaps
            assert 0.2 <= gaps[1] < 0.2 + SCHEDULING_MARGIN, gaps
        scheduler = (await stats(client))["scheduler"]
        assert scheduler["retried"] >= 4
        print(
            f"\nretries (max_retries=2, retry_delay=0.1): flaky → SUCCESS on attempt "
            f"{flaky.attempts} (gaps {', '.join(f'{g:.3f}' for g in flaky_gaps)} s); "
            f"always failing → FAILURE after {failing.attempts} attempts "
            f"(gaps {', '.join(f'{g:.3f}' for g in failing_gaps)} s)"
        )


# -- countdown ------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_countdown_task_waits_scheduled_then_starts_on_time(node: Node) -> None:
    countdown = 0.5
    async with client_for(node) as client:
        await the_worker(client)
        submitted = time.time()
        task_id = await client.delay("started_at", countdown=countdown)
        await poll(  # acknowledged well before it is due
            lambda: client.get_status(task_id) is not TaskStatus.PENDING,
            timeout=countdown,
            interval=0.005,
            what="the submission acknowledged",
        )
        scheduler = (await stats(client))["scheduler"]
        queried = time.time() - submitted
        assert queried < countdown, "the check came too late to see it scheduled"
        assert scheduler["scheduled"] == 1
        assert scheduler["queued_total"] == 0
        with trio.fail_after(10):
            await client.join()
        result = client.get_result(task_id)
        assert result is not None
        assert result.ok, result
        lateness = result.result - (submitted + countdown)
        assert lateness >= 0, f"started {-lateness:.3f} s early"
        assert lateness <= 0.05 + SCHEDULING_MARGIN, f"started {lateness:.3f} s late"
        assert (await stats(client))["scheduler"]["scheduled"] == 0
        print(
            f"\ncountdown=0.5: SCHEDULED on the control plane {queried:.3f} s after delay(); "
            f"started {lateness * 1000:.0f} ms after it was due"
        )
