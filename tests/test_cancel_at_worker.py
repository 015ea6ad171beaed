"""Cancelling a task a worker already holds: never "will not run", never run again, never a lie.

``cancel_task`` returns True only when the task will not run.  A task handed
to a worker may have started (a thread cannot be stopped), so the control
plane answers (False, "running"), asks the worker to drop or interrupt it,
and lets the worker's report decide: CANCELLED if it never started or was
interrupted, its real outcome if it ran to the end.  Whatever happens to
that run (a retry, a release, the worker lost), the task does not run again.

The hostile review found the opposite with clients that send at once: a
``delay`` followed by ``cancel_task`` got True for a task that ran, and its
result was thrown away.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from fastworker import Client, Cluster, TaskStatus
from fastworker.control._taskbook import TaskBook, TaskBookConfig
from fastworker.wire import ResultRecord, TaskEnvelope

pytestmark = pytest.mark.timeout(30)


class Clock:
    now = 10.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def book() -> TaskBook:
    clock = Clock()
    book = TaskBook(TaskBookConfig(), clock=clock, wall_clock=clock)
    book.worker_joined(b"w", frozenset({"job"}))
    book.ready(b"w", 10)
    return book


def dispatched(book: TaskBook, task_id: str, **options: Any) -> None:
    book.submit(b"client", TaskEnvelope(task_id, "job", 2, 0, b"[[],{}]", options or None))
    book.dispatch()
    book.take()
    assert book.status_of(task_id) is TaskStatus.RUNNING


def finals(book: TaskBook) -> dict[str, str]:
    return {record.task_id: record.status for record in book.take().records}


def test_a_task_at_a_worker_is_asked_to_stop_and_its_run_decides(book: TaskBook) -> None:
    dispatched(book, "ran")
    assert book.cancel("ran") == (False, "running")
    assert book.take().cancels == {b"w": ["ran"]}
    assert book.cancel("ran") == (False, "running")  # asked again: the same answer
    book.report(b"w", ResultRecord("ran", "success", b"1", attempts=1))
    assert finals(book) == {"ran": "success"}  # it ran to the end: its result, not a lie

    dispatched(book, "dropped")
    book.cancel("dropped")
    book.report(b"w", ResultRecord("dropped", "cancelled", error="cancelled", attempts=1))
    assert finals(book) == {"dropped": "cancelled"}


@pytest.mark.parametrize("what", ["retrying", "released", "worker lost", "worker died", "unsent"])
def test_a_task_cancelled_at_a_worker_does_not_run_again(book: TaskBook, what: str) -> None:
    dispatched(book, "t", max_retries=3)
    book.cancel("t")
    book.take()
    if what == "retrying":
        book.report(b"w", ResultRecord("t", "retrying", error="boom", attempts=1, retry_delay=0.0))
    elif what == "released":
        book.release(b"w", ["t"])
    elif what == "unsent":
        book.unsent(b"w", ["t"])
    else:
        book.worker_lost(b"w", died=what == "worker died")
    assert finals(book) == {"t": "cancelled"}
    book.worker_joined(b"v", frozenset({"job"}))
    book.ready(b"v", 10)
    book.dispatch()
    assert book.take().dispatches == []


async def test_delay_then_cancel_at_once_never_says_true_for_a_task_that_ran() -> None:
    """Each task is sent before ``delay`` returns, so the cancel often finds it at the worker."""
    ran: list[int] = []
    lock = threading.Lock()

    def rec(n: int) -> int:
        with lock:
            ran.append(n)
        return n

    with trio.fail_after(20):
        async with (
            Cluster(tasks=[rec], workers=1, concurrency=4) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            answers = []
            for n in range(150):
                task_id = await client.delay("rec", n)
                answers.append((n, task_id, await client.cancel_task(task_id)))
            await client.join(timeout=15)
    assert answers  # some are cancelled in time, some run: each must say which
    for n, task_id, cancelled in answers:
        result = client.get_result(task_id)
        assert result is not None
        if n in ran:
            assert cancelled is False, f"task {n} ran, yet cancel_task said True"
            assert result.status is TaskStatus.SUCCESS, f"task {n} ran, yet {result.status}"
        else:
            assert result.status is TaskStatus.CANCELLED


async def test_an_asyncio_task_asked_to_stop_is_reported_when_its_coroutine_ends() -> None:
    """Its cleanup runs before the CANCELLED result, and a coroutine that swallows the
    cancellation and returns is reported with its value (the second hostile review: both
    were reported CANCELLED at once, the slot freed while the coroutine still ran)."""
    import asyncio

    from fastworker import task

    started = {name: threading.Event() for name in ("cleanup", "swallow")}
    cleaned: list[str] = []

    @task(name="cleanup", loop="asyncio")
    async def cleanup() -> None:
        started["cleanup"].set()
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.2)  # async cleanup after the cancellation
            cleaned.append("cleanup")

    @task(name="swallow", loop="asyncio")
    async def swallow() -> str:
        started["swallow"].set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "swallowed"
        return "slept"

    with trio.fail_after(20):
        async with (
            Cluster(tasks=[cleanup, swallow], workers=1, concurrency=4) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            ids = {name: await client.delay(name) for name in started}
            for event in started.values():
                assert await trio.to_thread.run_sync(event.wait, 10)
            for task_id in ids.values():
                assert await client.cancel_task(task_id) is False  # running: asked to stop
            await client.join(timeout=10)
            # The results came after the coroutines ended, cleanup included.
            assert cleaned == ["cleanup"]
    stopped = client.get_result(ids["cleanup"])
    assert stopped is not None
    assert stopped.status is TaskStatus.CANCELLED
    swallowed = client.get_result(ids["swallow"])
    assert swallowed is not None
    assert swallowed.status is TaskStatus.SUCCESS
    assert swallowed.result == "swallowed"


def test_the_workers_own_cancelled_record_is_the_final_one(book: TaskBook) -> None:
    """Its start time and error text survive (the second hostile review: started_at was lost)."""
    dispatched(book, "t")
    book.cancel("t")
    book.take()
    record = ResultRecord("t", "cancelled", error="cancelled", started_at=11.0, attempts=1)
    book.report(b"w", record)
    (final,) = book.take().records
    assert final.started_at == 11.0
    assert final.error == "cancelled"
