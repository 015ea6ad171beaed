"""A task that misbehaves fails alone: the worker's bookkeeping never lets it through.

Each test here is a task doing something its worker must survive: an
exception whose text cannot be had, a result that cannot be encoded or is
too large for any message, retry options whose backoff overflows, time
limits it defeats (blocking its asyncio loop, ignoring cancellation), and a
stuck run under steady load.  Each checks what a user sees (the result, its
error text, how long it took) and that the same worker goes on.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio
from _raw_submit import submit_raw

from fastworker import Client, Cluster, TaskStatus
from fastworker.tasks.options import MAX_RETRIES
from fastworker.transport import TransportConfig
from fastworker.worker._executor import backoff_delay

pytestmark = pytest.mark.timeout(60)


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str exploded")


class NotAStr(Exception):
    def __str__(self) -> Any:
        return 42


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class BadDict(dict[str, int]):
    def items(self) -> Any:
        raise RuntimeError("items exploded")


class _ExplodingQualname(type):
    def __getattribute__(cls, name: str) -> Any:
        if name == "__qualname__":  # what traceback formatting reads
            raise RuntimeError("qualname exploded")
        return super().__getattribute__(name)


class WeirdType(Exception, metaclass=_ExplodingQualname):
    pass


def bad_str_thread() -> None:
    raise BadStr()


def weird_type_thread() -> None:
    raise WeirdType("odd")


def not_a_str_thread() -> None:
    raise NotAStr()


async def bad_str_asyncio() -> None:
    await asyncio.sleep(0)
    raise BadStr()


async def bad_repr_asyncio() -> None:
    await asyncio.sleep(0)
    raise ValueError(BadRepr())  # str() of a one-argument exception is str() of the argument


async def bad_str_trio() -> None:
    await trio.lowlevel.checkpoint()
    raise BadStr()


async def surrogate_trio() -> None:
    await trio.lowlevel.checkpoint()
    raise ValueError("bad \udc80 byte")  # no UTF-8 encoder accepts a lone surrogate


def system_exit_trio_body() -> None:
    raise SystemExit(4)


async def system_exit_trio() -> None:
    await trio.lowlevel.checkpoint()
    system_exit_trio_body()


async def system_exit_asyncio() -> None:
    await asyncio.sleep(0)
    raise SystemExit(5)


def bad_dict() -> BadDict:
    return BadDict(a=1)


def big_value(size: int) -> str:
    return "x" * size


def big_error(size: int) -> None:
    raise ValueError("y" * size)


_runs = itertools.count()


def always_fails() -> None:
    next(_runs)
    raise RuntimeError("always fails")


def add(a: int, b: int) -> int:
    return a + b


def quick(n: int) -> int:
    return n


_unblocked = threading.Event()


async def blocks_its_loop(seconds: float) -> str:
    # A blocking call in async code: the asyncio loop stops turning.
    time.sleep(seconds)  # noqa: ASYNC251 - the fault under test
    _unblocked.set()
    return "finished"


async def greet_on_asyncio(name: str) -> str:
    await asyncio.sleep(0)
    return f"hello, {name}"


_stopped_ignoring = threading.Event()


async def ignores_cancellation_asyncio(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except asyncio.CancelledError:
            pass  # swallowed: wait_for waits for the coroutine to end
    _stopped_ignoring.set()
    return "finished"


async def ignores_cancellation_trio(seconds: float) -> str:
    with trio.CancelScope(shield=True):
        await trio.sleep(seconds)
    return "finished"


_stuck_release = threading.Event()


def stuck(seconds: float) -> str:
    _stuck_release.wait(seconds)
    return "finished"


_steady_runs: dict[int, int] = {}
_steady_lock = threading.Lock()


def steady(n: int) -> int:
    with _steady_lock:
        _steady_runs[n] = _steady_runs.get(n, 0) + 1
    time.sleep(0.02)
    return n


TASKS: list[Callable[..., Any]] = [
    bad_str_thread,
    weird_type_thread,
    not_a_str_thread,
    bad_str_asyncio,
    bad_repr_asyncio,
    bad_str_trio,
    surrogate_trio,
    system_exit_trio,
    system_exit_asyncio,
    bad_dict,
    big_value,
    big_error,
    always_fails,
    add,
    quick,
    blocks_its_loop,
    greet_on_asyncio,
    ignores_cancellation_asyncio,
    ignores_cancellation_trio,
    stuck,
    steady,
]


# -- exceptions whose text cannot be had ----------------------------------------


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("bad_str_thread", "BadStr: <exception str() failed: RuntimeError>"),
        ("not_a_str_thread", "NotAStr: <exception str() failed: TypeError>"),
        ("bad_str_asyncio", "BadStr: <exception str() failed: RuntimeError>"),
        ("bad_repr_asyncio", "ValueError: <exception str() failed: RuntimeError>"),
        ("bad_str_trio", "BadStr: <exception str() failed: RuntimeError>"),
        ("surrogate_trio", "ValueError: bad \\udc80 byte"),
        ("system_exit_trio", "SystemExit: 4"),
        ("system_exit_asyncio", "SystemExit: 5"),
    ],
)
async def test_an_exception_whose_text_fails_fails_its_task_alone(name: str, error: str) -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            failed = await client.submit_task(name, timeout=10)
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            coroutine_after = await client.submit_task("greet_on_asyncio", args=("x",), timeout=10)
            worker = cluster.workers[0]
    assert failed.status is TaskStatus.FAILURE
    assert failed.error == error
    assert failed.traceback is not None
    assert name in failed.traceback  # the task's own frame
    assert (after.result, coroutine_after.result) == (5, "hello, x")
    assert worker.statistics().restarts == 0


async def test_an_exception_whose_traceback_cannot_be_formatted_fails_its_task_alone() -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1, concurrency=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            failed = await client.submit_task("weird_type_thread", timeout=10)
            # concurrency=1: the thread that formatted the traceback runs this too.
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            worker = cluster.workers[0]
    assert failed.status is TaskStatus.FAILURE
    assert failed.error == "WeirdType: odd"
    assert failed.traceback == (
        "WeirdType: odd\n<the traceback could not be formatted: RuntimeError>"
    )
    assert after.result == 5
    assert worker.statistics().restarts == 0


async def test_an_exception_whose_text_fails_is_retried_like_any_other() -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            task_id = await client.apply_async("bad_str_thread", max_retries=2, retry_delay=0.01)
            await client.join()
            result = client.get_result(task_id)
            worker = cluster.workers[0]
    assert result is not None
    assert (result.status, result.attempts) == (TaskStatus.FAILURE, 3)
    assert result.error == "BadStr: <exception str() failed: RuntimeError>"
    assert worker.statistics().restarts == 0


# -- results --------------------------------------------------------------------


async def test_a_result_whose_encoding_raises_fails_its_task_alone() -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            failed = await client.submit_task("bad_dict", timeout=10)
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            worker = cluster.workers[0]
    assert failed.status is TaskStatus.FAILURE
    assert failed.error == "result could not be encoded: RuntimeError: items exploded"
    assert after.result == 5
    assert worker.statistics().restarts == 0


async def test_results_too_large_for_any_message_fail_their_task_saying_so() -> None:
    limit = 100_000
    with trio.fail_after(30):
        async with (
            Cluster(tasks=TASKS, workers=0, max_message_size=limit) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            await cluster.add_worker(transport=TransportConfig(max_message_size=limit))
            too_big = await client.submit_task("big_value", args=(200_000,), timeout=10)
            big_error = await client.submit_task("big_error", args=(200_000,), timeout=10)
            fits = await client.submit_task("big_value", args=(60_000,), timeout=10)
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            worker = cluster.workers[0]
    assert too_big.status is TaskStatus.FAILURE
    assert too_big.error is not None
    assert too_big.error.startswith("result too large: 200")
    assert too_big.error.endswith(f"bytes, limit {limit - 4096}")
    # A failure whose text is too large keeps its status, with the text cut short.
    assert big_error.status is TaskStatus.FAILURE
    assert big_error.error is not None
    assert big_error.error.startswith("ValueError: yyyy")
    assert "characters cut: too large for a message" in big_error.error
    assert len(big_error.error) < limit
    assert (fits.status, len(fits.result)) == (TaskStatus.SUCCESS, 60_000)
    assert after.result == 5
    assert worker.statistics().restarts == 0


# -- retries ----------------------------------------------------------------------


async def test_a_retry_backoff_that_overflows_is_capped_and_the_task_retries() -> None:
    """``1e15 ** 39`` overflows a float; the cap (5 ms) applies to every attempt."""
    start = next(_runs)
    with trio.fail_after(30):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            options = {
                "max_retries": 40,
                "retry_delay": 0.001,
                "retry_backoff": 1e15,  # refused by our client, legal on the wire
                "retry_backoff_max": 0.005,
            }
            task_id = submit_raw(client, "always_fails", (), options)
            started = trio.current_time()
            await client.join()
            took = trio.current_time() - started
            result = client.get_result(task_id)
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            worker = cluster.workers[0]
    assert result is not None
    assert (result.status, result.attempts) == (TaskStatus.FAILURE, 41)
    assert result.error == "RuntimeError: always fails"
    assert next(_runs) - start - 1 == 41  # every attempt ran, once
    assert took < 15  # 40 delays of at most 5 ms, not a retry scheduled for ever
    assert after.result == 5
    assert worker.statistics().restarts == 0


async def test_max_retries_beyond_the_clients_limit_is_clamped_where_it_is_used() -> None:
    """10**6 retries is legal on the wire (our client refuses more than MAX_RETRIES at the
    call); the worker clamps it, so a raw client's always-failing task ends."""
    start = next(_runs)
    with trio.fail_after(30):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            task_id = submit_raw(
                client, "always_fails", (), {"max_retries": 10**6, "retry_delay": 0}
            )
            await client.join()
            result = client.get_result(task_id)
    assert result is not None
    assert (result.status, result.attempts) == (TaskStatus.FAILURE, MAX_RETRIES + 1)
    assert next(_runs) - start - 1 == MAX_RETRIES + 1


@pytest.mark.parametrize(
    ("delay", "backoff", "cap", "attempt", "expected"),
    [
        (1.0, 2.0, 300.0, 1, 1.0),
        (1.0, 2.0, 300.0, 4, 8.0),
        (1.0, 2.0, 300.0, 100, 300.0),
        (0.001, 1e15, 0.005, 40, 0.005),
        (1e15, 1e15, 1e15, 10**15, 1e9),  # the ceiling: every hop accepts it
        (1.0, 0.0, 300.0, 3, 0.0),
        (0.0, 1e15, 300.0, 40, 0.0),
        (5.0, 1e15, 0.0, 40, 0.0),
        (10**15, 10**15, 10**15, 40, 1e9),  # integers: int ** 39 does not fit a float
    ],
)
def test_the_backoff_delay_never_raises_and_respects_the_cap(
    delay: float, backoff: float, cap: float, attempt: int, expected: float
) -> None:
    value = backoff_delay(delay, backoff, cap, attempt)
    assert math.isfinite(value)
    assert value == pytest.approx(expected)


# -- time limits ------------------------------------------------------------------


def _count_tasks() -> int:
    """Every task of the current trio run (walking nurseries from the root task)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def test_a_finished_thread_task_leaves_no_time_limit_watcher_behind() -> None:
    """1000 quick tasks with an hour's limit: no watcher outlives its task."""
    with trio.fail_after(30):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            warm = await client.submit_task("quick", args=(0,), timeout=10)
            await trio.testing.wait_all_tasks_blocked()
            before = _count_tasks()
            for n in range(1000):
                await client.apply_async("quick", args=(n,), time_limit=3600)
            await client.join()
            await trio.testing.wait_all_tasks_blocked()
            after = _count_tasks()
            executor = cluster.workers[0].executor
            armed = executor.armed_deadlines
            completed = executor.completed
    assert warm.result == 0
    assert completed == 1001
    assert after - before < 10, f"{after - before} more trio tasks after 1000 tasks"
    assert armed == 0


async def test_an_asyncio_task_blocking_its_loop_fails_at_its_time_limit() -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            _unblocked.clear()
            started = trio.current_time()
            task_id = await client.apply_async("blocks_its_loop", args=(4.0,), time_limit=0.2)
            await client.join()
            took = trio.current_time() - started
            result = client.get_result(task_id)
            after = await client.submit_task("add", args=(2, 3), timeout=10)
            worker = cluster.workers[0]
            stuck_runs = worker.executor.stuck_runs
            # Let the loop come back before the cluster closes it.
            await trio.to_thread.run_sync(_unblocked.wait, 10)
    assert result is not None
    assert result.status is TaskStatus.FAILURE
    assert result.error == (
        "TaskTimeout: task exceeded its time limit of 0.2 s and its asyncio event loop is "
        "blocked (a blocking call in async code?)"
    )
    assert took < 3.0, f"answered after {took:.2f} s, the blocking call takes 4 s"
    assert stuck_runs == 1
    assert after.result == 5
    assert worker.statistics().restarts == 0


@pytest.mark.parametrize("name", ["ignores_cancellation_asyncio", "ignores_cancellation_trio"])
async def test_a_coroutine_ignoring_cancellation_fails_at_its_time_limit(name: str) -> None:
    _stopped_ignoring.clear()
    with trio.fail_after(20):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            started = trio.current_time()
            task_id = await client.apply_async(name, args=(3.0,), time_limit=0.2)
            await client.join()
            took = trio.current_time() - started
            result = client.get_result(task_id)
            worker = cluster.workers[0]
            stuck_runs = worker.executor.stuck_runs
            coroutine_after = await client.submit_task("greet_on_asyncio", args=("x",), timeout=10)
            if name.endswith("asyncio"):  # let it end before the cluster closes its loop
                await trio.to_thread.run_sync(_stopped_ignoring.wait, 10)
    assert result is not None
    assert result.status is TaskStatus.FAILURE
    assert result.error == (
        "TaskTimeout: task exceeded its time limit of 0.2 s and did not stop when cancelled"
    )
    assert took < 2.5, f"answered after {took:.2f} s, the task ignores cancellation for 3 s"
    assert stuck_runs == 1
    assert coroutine_after.result == "hello, x"
    assert worker.statistics().restarts == 0


async def test_a_stuck_worker_retires_under_steady_load() -> None:
    """With ``recycle_grace`` a worker with a stuck thread takes no more work, and is done.

    A stream of tasks keeps coming the whole time, so the worker is never
    idle: it stops taking work, hands back what it has not started, lets
    its running tasks finish within the grace period and then sets
    ``recycle``.  Every task of the stream runs exactly once.
    """
    _stuck_release.clear()
    _steady_runs.clear()
    submitted: list[str] = []
    with trio.fail_after(30):
        async with (
            Cluster(tasks=TASKS, workers=0, concurrency=2) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            stuck_worker = await cluster.add_worker(recycle_grace=1.0, prefetch=4)
            stopped = trio.Event()

            async def stream() -> None:
                for n in itertools.count():
                    if stopped.is_set():
                        return
                    submitted.append(await client.delay("steady", n))
                    await trio.sleep(0.02)  # about half of what two threads can do

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream)
                started = trio.current_time()
                await client.apply_async("stuck", args=(20.0,), time_limit=0.3)
                await stuck_worker.recycle.wait()
                retired_after = trio.current_time() - started
                completed_at_retirement = stuck_worker.executor.completed
                other = await cluster.add_worker()
                for n in range(-20, 0):  # the stream goes on: to the other worker only
                    submitted.append(await client.delay("steady", n))
                    await client.submit_task("quick", args=(n,), timeout=10)
                stopped.set()
            await client.join()
            results = [client.get_result(i) for i in submitted]
            completed_later = stuck_worker.executor.completed
            held = stuck_worker.executor.held
            _stuck_release.set()
    assert retired_after < 3.0
    assert completed_later == completed_at_retirement
    assert held == 0
    assert other.executor.completed > 0
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
    assert len(_steady_runs) == len(submitted)
    assert set(_steady_runs.values()) == {1}, "a task of the stream ran more than once"


@pytest.mark.parametrize("grace", [-1.0, math.nan, math.inf])
def test_a_recycle_grace_out_of_range_is_refused_where_it_is_given(grace: float) -> None:
    from fastworker.worker import WorkerConfig

    with pytest.raises(ValueError, match="recycle_grace must be a finite number"):
        WorkerConfig(recycle_grace=grace)
