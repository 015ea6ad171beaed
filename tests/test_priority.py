"""Priorities end to end: what runs first on a worker that can run one task at a time.

A worker at concurrency 1 is held by a task waiting on a gate while the
backlog builds; the tasks record the order they ran in.  How far a CRITICAL
task can be overtaken depends only on how many tasks the worker had already
started or taken (its prefetch): the scheduler and the worker's own waiting
queue both go by priority, then arrival.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from fastworker import Client, Cluster, TaskPriority
from fastworker.control._queues import PriorityQueues
from fastworker.runtime import GetStatistics

pytestmark = pytest.mark.timeout(30)

CRITICAL, HIGH, NORMAL, LOW = (
    TaskPriority.CRITICAL,
    TaskPriority.HIGH,
    TaskPriority.NORMAL,
    TaskPriority.LOW,
)


@pytest.mark.parametrize(
    ("prefetch", "lows_ahead"),
    [
        # Nothing beyond the running task is at the worker: CRITICAL is next.
        (0, 0),
        # The worker already holds one LOW task, which it starts the moment the
        # blocker ends; CRITICAL comes right after it.
        (1, 1),
        # Everything is at the worker; its own waiting queue puts CRITICAL first.
        (200, 0),
    ],
    ids=["prefetch-0", "prefetch-1", "prefetch-200"],
)
async def test_a_critical_task_overtakes_a_backlog_of_low_ones(
    gate, poll_until: Callable[..., Awaitable[Any]], prefetch: int, lows_ahead: int
) -> None:
    order: list[str] = []

    def hold() -> None:
        gate.wait()

    def work(tag: str) -> None:
        order.append(tag)

    with trio.fail_after(15):
        async with (
            Cluster(tasks=[hold, work], workers=1, concurrency=1, prefetch=prefetch) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            worker = cluster.workers[0]

            async def worker_stats() -> dict[str, Any]:
                return await worker.ref.ask(GetStatistics())

            await client.delay("hold")
            await gate.entered()
            for i in range(100):
                await client.delay("work", f"low-{i}", priority=LOW)
            # Let the LOW backlog reach the worker (as much of it as its window
            # takes) before the CRITICAL task exists at all.
            at_worker = min(prefetch, 100)
            await poll_until(worker_stats, lambda s: s["waiting"] == at_worker, timeout=5)
            stats = await client.stats()
            assert stats["scheduler"]["queued"]["low"] == 100 - at_worker

            await client.delay("work", "critical", priority=CRITICAL)
            if prefetch > 100:
                await poll_until(worker_stats, lambda s: s["waiting"] == 101, timeout=5)
            else:
                stats = await client.stats()
                assert stats["scheduler"]["queued"]["critical"] == 1

            gate.open()
            await client.join(timeout=10)

    assert len(order) == 101
    assert order.index("critical") == lows_ahead
    assert [tag for tag in order if tag != "critical"] == [f"low-{i}" for i in range(100)]


@pytest.mark.parametrize("prefetch", [0, 50], ids=["prefetch-0", "prefetch-50"])
async def test_strict_priority_order_and_fifo_within_a_priority(gate, prefetch: int) -> None:
    order: list[tuple[str, int]] = []

    def hold() -> None:
        gate.wait()

    def work(priority: str, i: int) -> None:
        order.append((priority, i))

    # Interleaved on purpose, and spelled every accepted way: enum, "high", "HIGH".
    plan = [(p, i) for i in range(5) for p in (LOW, HIGH, NORMAL, CRITICAL)]
    spellings: list[TaskPriority | str] = []
    for p, i in plan:
        spellings.append(p if i % 3 == 0 else p.value if i % 3 == 1 else p.value.upper())

    with trio.fail_after(10):
        async with (
            Cluster(tasks=[hold, work], workers=1, concurrency=1, prefetch=prefetch) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            await client.delay("hold")
            await gate.entered()
            for (p, i), spelled in zip(plan, spellings, strict=True):
                await client.delay("work", p.value, i, priority=spelled)
            await client.stats()  # every submission accepted before the worker frees up
            gate.open()
            await client.join(timeout=5)

    expected = [(p.value, i) for p in (CRITICAL, HIGH, NORMAL, LOW) for i in range(5)]
    assert order == expected


async def test_an_unknown_priority_is_refused_at_the_call() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            with pytest.raises(ValueError, match="unknown priority 'urgent'"):
                await client.delay("work", priority="urgent")
            assert client.pending_count == 0


@attrs.define
class _Item:
    seq: int
    name: str
    priority: int

    @property
    def key(self) -> str:
        return str(self.seq)


@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(["a", "b", "c"]), st.booleans()),
        max_size=60,
    ),
    st.sets(st.sampled_from(["a", "b", "c"])),
)
def test_scheduler_queues_pop_by_priority_then_arrival(
    specs: list[tuple[int, str, bool]], served: set[str]
) -> None:
    """The scheduler's queues: highest priority first, FIFO within one, removed ones gone.

    A worker that serves only some names gets the best task among those names.
    """
    queues: PriorityQueues[_Item] = PriorityQueues()
    items = [_Item(seq, name, priority) for seq, (priority, name, _) in enumerate(specs, 1)]
    for item in items:
        queues.push(item)
    for item, (_, _, cancel) in zip(items, specs, strict=True):
        if cancel:
            assert queues.remove(item)
            assert not queues.remove(item)
    live = [item for item, (_, _, cancel) in zip(items, specs, strict=True) if not cancel]
    assert len(queues) == len(live)
    assert sorted(i.seq for i in queues.items()) == [i.seq for i in live]

    def best_first(chosen: list[_Item]) -> list[_Item]:
        return sorted(chosen, key=lambda item: (item.priority, item.seq))

    popped = []
    while (item := queues.pop_for(served)) is not None:
        popped.append(item)
    assert popped == best_first([item for item in live if item.name in served])

    rest = queues.pop_many(None, len(live) + 1)
    assert rest == best_first([item for item in live if item.name not in served])
    assert len(queues) == 0
    assert queues.counts() == [0, 0, 0, 0]
