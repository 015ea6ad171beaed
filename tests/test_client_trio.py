"""The Client under trio: its actor runs as a system task of the caller's run, no thread.

Each test runs an embedded ``Cluster`` in the test's own trio run, on random
loopback ports.  Tasks that must stay busy wait on the ``gate`` fixture
(tests/conftest.py), which the test opens; no test sleeps to wait for a
result.  The only real-time wait is the 2 s during which no control plane
exists yet, which is the point of that test.

What a test does with the client is shared with tests/test_client_asyncio.py
through tests/_client_cases.py; what stays here is trio's part.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import _client_cases as cases
import pytest
import trio
import trio.testing
from _client_cases import HeldGate, free_address, started
from multiprocess import open_node

from fastworker import Client, ClientStoppedError, Cluster, TaskStatus
from fastworker.client._host import TrioHost

pytestmark = pytest.mark.timeout(30)

# conftest's Gate is not importable by name; the cases' protocol covers what is used of it.
Gate = HeldGate


@asynccontextmanager
async def examples_cluster(**options: Any) -> AsyncIterator[Cluster]:
    async with Cluster(task_modules=["examples.tasks"], **options) as running:
        yield running


# -- the API round trip -------------------------------------------------------


async def test_a_lone_task_leaves_at_once_and_a_burst_in_one_more_message() -> None:
    async with examples_cluster() as running, started(running.discovery_address) as client:
        await cases.a_lone_task_leaves_at_once_and_a_burst_in_one_more_message(
            client, trio.testing.wait_all_tasks_blocked
        )


async def test_client_runs_in_the_callers_trio_run() -> None:
    async with examples_cluster() as running, started(running.discovery_address) as client:
        assert isinstance(client._host, TrioHost)
        assert not [t for t in threading.enumerate() if t.name == "fastworker-client"]
        assert (await client.submit_task("add", (1, 2))).result == 3


async def test_delay_get_result_status_and_join() -> None:
    with trio.fail_after(20):
        async with (
            examples_cluster(workers=2) as running,
            started(running.discovery_address) as client,
        ):
            await cases.delay_get_result_status_and_join(client)


async def test_submit_task_success_and_failure() -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            on_trio = await client.submit_task("slow_double", (21,))
            await cases.submit_task_success_and_failure(client, name="trio", tag="y")

    assert on_trio.status is TaskStatus.SUCCESS
    assert on_trio.result == 42


async def test_submit_batch_returns_ids_and_all_complete() -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            low = {"task_name": "slow_double", "args": (4,), "priority": "low"}
            await cases.submit_batch_all_complete(client, tail=[(low, 8)])


# -- life cycle -------------------------------------------------------------------


async def seconds_to_stop(address: str, **options: Any) -> float:
    """Under trio the actor is gone when its system task in this run has ended."""
    host, elapsed = await cases.seconds_to_stop(address, **options)
    assert isinstance(host, TrioHost)
    with trio.fail_after(1):
        await host.done.wait()  # the actor's system task has ended
    assert not [t for t in threading.enumerate() if t.name == "fastworker-client"]
    return elapsed


@pytest.mark.multiprocess
async def test_stop_inside_the_run_hands_over_promptly() -> None:
    """A node process: a control plane in this run could not answer while stop() blocks it."""
    async with open_node(
        "--task-modules", "examples.tasks", "--discovery-address", "tcp://127.0.0.1:*"
    ) as node:
        elapsed = await seconds_to_stop(node.discovery_address, connect=True, in_flight=100)
        async with started(node.discovery_address) as reader:
            stats = await reader.stats()

    assert stats["scheduler"]["accepted"] == 101
    assert elapsed < 1.0


async def test_stop_without_a_control_plane_waits_its_timeout_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    elapsed = await seconds_to_stop(free_address(), connect=False, in_flight=10, timeout=0.5)

    assert 0.5 <= elapsed < 1.5
    assert "client stopped with 10 tasks not handed over" in caplog.text


async def test_stop_releases_callers_still_waiting() -> None:
    """join, submit_task and queries in other tasks fail at once, not at their timeouts."""
    client = await cases.pending_client(free_address())
    outcomes: dict[str, BaseException] = {}

    async def call(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            await fn()
        except ClientStoppedError as exc:
            outcomes[name] = exc

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            for name, fn in cases.calls_that_wait(client).items():
                nursery.start_soon(call, name, fn)
            await trio.testing.wait_all_tasks_blocked()
            client.stop(timeout=0.3)  # its one task cannot be handed over: nobody listens

    assert sorted(outcomes) == ["join", "query", "stats", "submit_task"]
    assert all("stopped" in str(exc) for exc in outcomes.values())


async def test_several_clients_at_once() -> None:
    outcomes: dict[int, list[Any]] = {}

    async def one(address: str, n: int) -> None:
        outcomes[n] = await cases.one_of_several_clients(address, n)

    with trio.fail_after(20):
        async with examples_cluster() as running, trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(one, running.discovery_address, n)

    assert outcomes == {n: [n + 1000] + [n + i for i in range(30)] for n in range(4)}


async def test_use_before_start_and_after_stop() -> None:
    await cases.use_before_start_and_after_stop(free_address())


@pytest.mark.parametrize(("argument", "type_name"), cases.UNENCODABLE_ARGUMENTS)
async def test_unencodable_argument_raises_type_error_and_sends_nothing(
    argument: Any, type_name: str
) -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            await cases.unencodable_argument_raises_type_error(client, argument, type_name)
            stats = await running.stats()

    assert stats["scheduler"]["accepted"] == 1  # only the valid task reached the control plane


async def test_tasks_delayed_before_the_control_plane_exists_all_complete() -> None:
    address = free_address()
    with trio.fail_after(20):
        async with started(address) as client:
            await cases.tasks_delayed_before_the_control_plane_complete(
                client,
                sleep=trio.sleep,
                control_plane=partial(examples_cluster, discovery_address=address),
            )


async def test_resent_submission_after_a_lost_ack_runs_once(gate: Gate) -> None:
    executions: list[str] = []
    resent = trio.Event()  # set by the client's actor, a system task of this run

    with trio.fail_after(20):
        async with Cluster(tasks=[cases.counted_task(executions, gate)]) as running:
            async with started(running.discovery_address, ack_timeout=0.2) as client:
                await cases.lost_ack_resent_runs_once(
                    client, gate, resent=resent.set, wait_resent=resent.wait
                )
            stats = await running.stats()

    assert executions == ["once"]
    assert stats["scheduler"]["duplicate_submissions"] >= 1


async def test_cancel_a_queued_task(gate: Gate) -> None:
    executions: list[str] = []
    tasks: list[Callable[..., Any]] = [cases.blocker_task(gate), cases.record_task(executions)]

    with trio.fail_after(20):
        async with Cluster(tasks=tasks, workers=1, concurrency=1, prefetch=0) as c:
            async with started(c.discovery_address) as client:
                await cases.cancel_a_queued_task(client, gate)
            stats = await c.stats()

    assert stats["scheduler"]["cancelled"] == 1  # cancelled by the control plane
    assert executions == ["after"]


async def test_cancel_a_task_that_never_left_the_client() -> None:
    executions: list[str] = []
    address = free_address()
    control_plane = partial(
        Cluster, tasks=[cases.record_task(executions)], discovery_address=address
    )

    with trio.fail_after(20):
        async with started(address) as client:
            await cases.cancel_a_task_that_never_left_the_client(client, control_plane)

    assert executions == ["after"]


@asynccontextmanager
async def slow_task_client(gate: Gate, returns: str) -> AsyncIterator[Client]:
    """A client of a cluster serving only ``slow``, for the two timeout tests."""
    async with (
        Cluster(tasks=[cases.slow_task(gate, returns)]) as running,
        started(running.discovery_address) as client,
    ):
        yield client


async def test_submit_task_timeout_returns_a_failure_naming_it(gate: Gate) -> None:
    with trio.fail_after(20):
        async with slow_task_client(gate, "late") as client:
            await cases.submit_task_timeout_fails_naming_it(client, gate)


async def test_join_timeout_raises_timeout_error(gate: Gate) -> None:
    with trio.fail_after(20):
        async with slow_task_client(gate, "done") as client:
            await cases.join_timeout_raises_timeout_error(client, gate)
