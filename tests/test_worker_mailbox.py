"""The Worker owns its state: its executor reports through the mailbox, and loses nothing.

Task threads, trio tasks and timers never call into the worker: they queue
what happened and wake it with one ``ExecutorWake`` per batch.  These tests
check what a user would notice if that went wrong: results lost to a full
mailbox, a drain that waits out its whole grace although nothing runs any
more, a worker handed out before it can take tasks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from fastworker import Client, Cluster, TaskStatus
from fastworker.runtime import Actor, GetStatistics
from fastworker.tasks.registry import TaskDefinition, TaskRegistry
from fastworker.tasks.serializer import SerializationFormat, dumps
from fastworker.wire import ResultRecord, TaskEnvelope
from fastworker.worker import Worker, WorkerConfig
from fastworker.worker._executor import Executor, ExecutorWake

pytestmark = pytest.mark.timeout(30)


def add(a: int, b: int) -> int:
    return a + b


async def add_on_trio(a: int, b: int) -> int:
    return a + b


_REGISTRY = TaskRegistry(
    [
        TaskDefinition(name="add", fn=add, runner="thread"),
        TaskDefinition(name="add_on_trio", fn=add_on_trio, runner="trio"),
    ]
)


def _envelope(task_id: str, name: str, a: int, b: int) -> TaskEnvelope:
    payload = dumps(SerializationFormat.CBOR, [[a, b], {}])
    return TaskEnvelope(task_id, name, 2, SerializationFormat.CBOR.code, payload)


class _Owner(Actor):
    """Stands in for the Worker: collects on every wake, counts what it got."""

    def __init__(self, want: int) -> None:
        super().__init__("owner", mailbox_size=1)
        self.records: list[ResultRecord] = []
        self.wakes = 0
        self.want = want
        self.all_in = trio.Event()

    def receive(self, message: Any) -> None:
        if type(message) is ExecutorWake:  # anything else is the filler
            self.wakes += 1
            self.records += message.executor.collect().records
            if len(self.records) >= self.want:
                self.all_in.set()


async def test_results_are_not_lost_while_the_workers_mailbox_is_full() -> None:
    """Runs end while the mailbox has no room: once it has, every result is reported once.

    Before, a wake that met a full mailbox was dropped and nothing woke the
    worker again for those results; now the wake waits for room.
    """
    owner = _Owner(want=200)
    owner.ref.tell("filler")  # the mailbox (one message) is full; nobody reads it yet
    executor = Executor(_REGISTRY, 4, owner.ref)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(executor.run)
            ids = [f"t{i}" for i in range(200)]
            envelopes = [
                _envelope(task_id, "add_on_trio" if i % 2 else "add", i, 1)
                for i, task_id in enumerate(ids)
            ]
            assert executor.submit(envelopes) == []
            # The trio tasks end, and their wake meets the full mailbox.
            await trio.testing.wait_all_tasks_blocked()
            assert owner.records == []
            nursery.start_soon(owner.run)
            await owner.all_in.wait()
            owner.ref.stop()
            nursery.cancel_scope.cancel()
    assert sorted(r.task_id for r in owner.records) == sorted(ids)
    assert all(r.status == "success" for r in owner.records)
    assert {r.task_id: r.result for r in owner.records}["t7"] == dumps(SerializationFormat.CBOR, 8)
    assert owner.wakes < 200  # batched: one wake stands for many results
    assert executor.held == 0


_release = threading.Event()
_started = threading.Event()


def slow() -> str:
    _started.set()
    if not _release.wait(20):
        raise TimeoutError("never released")
    return "slow done"


def quick(n: int) -> int:
    return n


_TASKS: list[Callable[..., Any]] = [slow, quick]


async def test_a_drain_ends_when_its_last_task_ends_not_at_its_grace() -> None:
    """The worker learns from its executor that nothing runs any more, and stops waiting."""
    _release.clear()
    _started.clear()
    with trio.fail_after(20):
        async with (
            Cluster(tasks=_TASKS, workers=0, concurrency=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            worker = await cluster.add_worker()
            slow_id = await client.delay("slow")
            quick_ids = [await client.delay("quick", n) for n in range(3)]
            await trio.to_thread.run_sync(_started.wait)
            handed_back: list[int] = []

            async def drain() -> None:
                handed_back.append(await worker.drain(grace=60.0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert not worker.drained.is_set()  # the slow task still runs
                began = trio.current_time()
                _release.set()
            took = trio.current_time() - began
            await cluster.add_worker()  # runs what the drained worker handed back
            await client.join(timeout=10)
            slow_result = client.get_result(slow_id)
            quick_results = [client.get_result(i) for i in quick_ids]
            stats = await worker.ref.ask(GetStatistics())
    assert took < 5.0, f"the drain waited {took:.1f} s after its last task ended"
    assert slow_result is not None
    assert slow_result.status is TaskStatus.SUCCESS
    assert slow_result.result == "slow done"
    assert [r.result if r else None for r in quick_results] == [0, 1, 2]
    assert handed_back[0] <= 3  # the quick tasks it held and had not started
    assert stats["held"] == 0


async def test_a_worker_that_crashes_while_draining_still_ends_its_drain() -> None:
    """The restarted worker holds nothing: the drain ends at once, its task runs elsewhere."""
    _release.clear()
    _started.clear()
    with trio.fail_after(20):
        async with (
            Cluster(tasks=_TASKS, workers=0, concurrency=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            worker = await cluster.add_worker()
            first_id = worker.worker_id
            slow_id = await client.delay("slow")
            await trio.to_thread.run_sync(_started.wait)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.drain, 60.0)
                await trio.testing.wait_all_tasks_blocked()
                worker.ref.tell("not a worker message")  # receive raises: a crash
            # The drain returned with the slow task still running in the old thread.
            _release.set()
            await cluster.add_worker()
            await client.join(timeout=10)
            slow_result = client.get_result(slow_id)
            stats = await worker.ref.ask(GetStatistics())
    assert worker.statistics().restarts == 1
    assert worker.worker_id != first_id  # it left under its old id, handing the task back
    assert stats["held"] == 0
    assert slow_result is not None
    assert slow_result.status is TaskStatus.SUCCESS


async def test_a_started_worker_has_registered_and_takes_tasks() -> None:
    """``nursery.start(worker.serve)`` returns once the worker joined: a task runs at once."""
    with trio.fail_after(20):
        async with (
            Cluster(tasks=_TASKS, workers=0) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
            trio.open_nursery() as nursery,
        ):
            worker = Worker(
                _REGISTRY_FOR_SERVE,
                WorkerConfig(discovery_address=cluster.discovery_address),
            )
            await nursery.start(worker.serve)
            stats = await worker.ref.ask(GetStatistics())
            result = await client.submit_task("quick", args=(5,), timeout=10)
            worker.ref.stop()
    assert stats["connected"]
    assert stats["instance_id"] is not None
    assert result.result == 5


_REGISTRY_FOR_SERVE = TaskRegistry([TaskDefinition(name="quick", fn=quick, runner="thread")])


async def test_a_task_that_crashes_the_worker_actor_counts_deaths_until_it_fails_as_poison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not the process: the Worker actor itself raises on this task's Dispatch.  Each
    restart tells Discovery its old id crashed, which is a death for what it held;
    the first release's poison guard never saw these, so the task went round for ever."""
    real = Worker._on_dispatch

    def crash_on_poison(self: Worker, raw_tasks: list[Any]) -> None:
        if any(raw[1] == "add_on_trio" for raw in raw_tasks):
            raise RuntimeError("this task breaks the worker actor")
        real(self, raw_tasks)

    monkeypatch.setattr(Worker, "_on_dispatch", crash_on_poison)
    with trio.fail_after(25):
        async with (
            # Liveness far beyond the test's time: only the crash report can count deaths.
            Cluster(
                tasks=[add, add_on_trio], workers=1, concurrency=1, heartbeat_interval=5
            ) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            poison = await client.submit_task("add_on_trio", args=(1, 2), timeout=20)
            innocent = await client.submit_task("add", args=(2, 3), timeout=10)
            stats = await client.stats()
    assert poison.status is TaskStatus.FAILURE
    assert "poison task" in (poison.error or "")
    assert innocent.result == 5
    assert cluster.workers[0].statistics().restarts == 3
    assert stats["discovery"]["workers_alive"] == 1


async def test_a_worker_names_the_last_dispatch_it_received_when_it_lists_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: the number the Scheduler gives each Dispatch comes back as Ready.seen
    with the worker's list of what it holds (the Scheduler's rule for lost dispatches)."""
    from fastworker.control._taskbook import TaskBook

    lists: list[tuple[int | None, int]] = []
    third_seen = trio.Event()
    real = TaskBook.holding

    def record(self: TaskBook, worker: bytes, task_ids: list[str], seen: int | None = None) -> None:
        lists.append((seen, self._workers[worker].dispatched if worker in self._workers else -1))
        if seen == 3:
            third_seen.set()
        real(self, worker, task_ids, seen)

    monkeypatch.setattr(TaskBook, "holding", record)
    with trio.fail_after(20):
        async with (
            Cluster(tasks=[add], workers=1, heartbeat_interval=0.05) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            for i in range(3):
                assert (await client.submit_task("add", args=(i, i), timeout=10)).result == 2 * i
            await third_seen.wait()
            stats = await client.stats()
    assert all(seen is None or 0 < seen <= issued for seen, issued in lists), lists
    assert stats["scheduler"]["lost_dispatches"] == 0
