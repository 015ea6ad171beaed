"""The Client under trio: its actor runs as a system task of the caller's run, no thread.

Each test runs an embedded ``Cluster`` in the test's own trio run, on random
loopback ports.  Tasks that must stay busy wait on the ``gate`` fixture
(tests/conftest.py), which the test opens; no test sleeps to wait for a
result.  The only real-time wait is the 2 s during which no control plane
exists yet, which is the point of that test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from fastworker import (
    Client,
    ClientNotStartedError,
    ClientStoppedError,
    Cluster,
    TaskResult,
    TaskStatus,
)
from fastworker.client._host import TrioHost
from fastworker.wire import Submit

pytestmark = pytest.mark.timeout(30)

# The gate fixture's type lives in conftest.py, which is not importable by name.
Gate = Any


@asynccontextmanager
async def started(discovery_address: str, **options: Any) -> AsyncIterator[Client]:
    client = Client(discovery_address, **options)
    await client.start()
    try:
        yield client
    finally:
        client.stop()


def free_address() -> str:
    """A loopback endpoint nobody listens on (its port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


@asynccontextmanager
async def examples_cluster(**options: Any) -> AsyncIterator[Cluster]:
    async with Cluster(task_modules=["examples.tasks"], **options) as running:
        yield running


# -- the API round trip -------------------------------------------------------


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
            ids = [await client.delay("add", i, 10) for i in range(20)]
            assert all(isinstance(task_id, str) for task_id in ids)
            assert len(set(ids)) == 20
            await client.join(timeout=10)
            assert client.pending_count == 0
            assert [client.get_status(i) for i in ids] == [TaskStatus.SUCCESS] * 20
            results = [client.get_result(i) for i in ids]
            assert [r.result if r else None for r in results] == [i + 10 for i in range(20)]
            cached = await client.get_task_result(ids[3])
            assert cached is not None
            assert cached.result == 13


async def test_submit_task_success_and_failure() -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            sync = await client.submit_task("add", (2, 3))
            on_trio = await client.submit_task("slow_double", (21,))
            on_asyncio = await client.submit_task("fetch_greeting", kwargs={"name": "trio"})
            failing = await client.submit_task("fails_once_then_works", ("y",), max_retries=0)

    assert sync.status is TaskStatus.SUCCESS
    assert sync.result == 5
    assert on_trio.status is TaskStatus.SUCCESS
    assert on_trio.result == 42
    assert on_asyncio.status is TaskStatus.SUCCESS
    assert on_asyncio.result == "hello, trio"
    assert failing.status is TaskStatus.FAILURE
    assert failing.error == "ValueError: this task always fails (y)"


async def test_submit_batch_returns_ids_and_all_complete() -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            ids = await client.submit_batch(
                [("add", (i, i)) for i in range(50)]
                + [{"task_name": "slow_double", "args": (4,), "priority": "low"}]
            )
            await client.join(timeout=10)
            results = [client.get_result(i) for i in ids]

    assert len(ids) == len(set(ids)) == 51
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
    assert [r.result for r in results if r] == [2 * i for i in range(50)] + [8]


# -- life cycle -------------------------------------------------------------------


async def test_stop_inside_the_run_returns_promptly() -> None:
    async with examples_cluster() as running:
        client = Client(running.discovery_address)
        await client.start()
        await client.submit_task("add", (1, 1))  # connected
        for i in range(100):
            await client.delay("add", i, i)  # and some in flight
        began = time.monotonic()
        client.stop()
        elapsed = time.monotonic() - began
        assert isinstance(client._host, TrioHost)
        with trio.fail_after(1):
            await client._host._done.wait()  # the actor's system task has ended

    assert elapsed < 1.0


async def test_stop_without_a_control_plane_returns_promptly() -> None:
    client = Client(free_address())
    await client.start()
    for i in range(10):
        await client.delay("add", i, i)
    began = time.monotonic()
    client.stop()
    elapsed = time.monotonic() - began
    assert isinstance(client._host, TrioHost)
    with trio.fail_after(1):
        await client._host._done.wait()

    assert elapsed < 1.0


async def test_stop_releases_callers_still_waiting() -> None:
    """join, submit_task and queries in other tasks fail at once, not at their timeouts."""
    client = Client(free_address())
    await client.start()
    await client.delay("add", 1, 2)
    outcomes: dict[str, BaseException] = {}

    async def call(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await fn(*args, **kwargs)
        except ClientStoppedError as exc:
            outcomes[name] = exc

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, "join", client.join)
            nursery.start_soon(call, "submit_task", client.submit_task, "add", (1, 2))
            nursery.start_soon(call, "query", client.get_task_result, "some-id")
            nursery.start_soon(call, "stats", client.stats)
            await trio.testing.wait_all_tasks_blocked()
            client.stop()

    assert sorted(outcomes) == ["join", "query", "stats", "submit_task"]
    assert all("stopped" in str(exc) for exc in outcomes.values())


async def test_several_clients_at_once() -> None:
    outcomes: dict[int, list[Any]] = {}

    async def one(address: str, n: int) -> None:
        async with started(address) as client:
            ids = [await client.delay("add", n, i) for i in range(30)]
            result = await client.submit_task("add", (n, 1000))
            await client.join(timeout=10)
            outcomes[n] = [result.result] + [client.get_result(i).result for i in ids]  # type: ignore[union-attr]

    with trio.fail_after(20):
        async with examples_cluster() as running, trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(one, running.discovery_address, n)

    assert outcomes == {n: [n + 1000] + [n + i for i in range(30)] for n in range(4)}


async def test_use_before_start_and_after_stop() -> None:
    client = Client(free_address())
    with pytest.raises(ClientNotStartedError, match=r"call `await client.start\(\)`"):
        await client.delay("add", 1, 2)
    with pytest.raises(ClientNotStartedError):
        await client.submit_task("add", (1, 2))
    with pytest.raises(ClientNotStartedError):
        await client.cancel_task("some-id")
    assert isinstance(ClientNotStartedError("x"), RuntimeError)

    await client.start()
    client.stop()
    with pytest.raises(ClientStoppedError, match="this client was stopped; create a new"):
        await client.delay("add", 1, 2)
    with pytest.raises(ClientStoppedError):
        await client.join()
    with pytest.raises(ClientStoppedError):
        await client.start()
    assert isinstance(ClientStoppedError("x"), RuntimeError)
    client.stop()  # idempotent


@pytest.mark.parametrize(
    ("argument", "type_name"), [(object(), "object"), ({1, 2}, "set"), (b"\x00", "bytes")]
)
async def test_unencodable_argument_raises_type_error_and_sends_nothing(
    argument: Any, type_name: str
) -> None:
    with trio.fail_after(20):
        async with examples_cluster() as running, started(running.discovery_address) as client:
            with pytest.raises(TypeError, match=f"Object of type {type_name} is not JSON"):
                await client.delay("add", argument, 1)
            with pytest.raises(TypeError, match=type_name):
                await client.submit_task("add", (1,), {"b": argument})
            with pytest.raises(TypeError, match=type_name):
                await client.submit_batch([("add", (1, 2)), ("add", (argument, 2))])
            assert client.pending_count == 0
            assert (await client.submit_task("add", (1, 2))).result == 3
            stats = await running.stats()

    assert stats["scheduler"]["accepted"] == 1  # only the valid task reached the control plane


async def test_tasks_delayed_before_the_control_plane_exists_all_complete() -> None:
    address = free_address()
    with trio.fail_after(20):
        async with started(address) as client:
            ids = [await client.delay("add", i, 1) for i in range(25)]
            await trio.sleep(2)  # no control plane for 2 s: the point of this test
            assert client.pending_count == 25
            async with examples_cluster(discovery_address=address):
                await client.join(timeout=15)
            results = [client.get_result(i) for i in ids]

    assert [r.result if r else None for r in results] == [i + 1 for i in range(25)]


async def test_resent_submission_after_a_lost_ack_runs_once(gate: Gate) -> None:
    executions: list[str] = []

    def counted(tag: str) -> str:
        executions.append(tag)
        gate.wait()
        return tag

    with trio.fail_after(20):
        async with Cluster(tasks=[counted]) as running:
            async with started(running.discovery_address, ack_timeout=0.2) as client:
                core = client._core
                resent = trio.Event()
                submits: list[str] = []
                send = core._send_gateway

                def spy(message: Any) -> bool:
                    sent = send(message)
                    if sent and isinstance(message, Submit):
                        submits.extend(wire[0] for wire in message.tasks)
                        if len(submits) >= 2:
                            resent.set()
                    return sent

                core._send_gateway = spy  # type: ignore[method-assign]
                core.acks_dropped_for_test = 1
                task_id = await client.delay("counted", "once")
                # The ack is dropped; the task is held, so the re-send finds it unfinished.
                await resent.wait()
                assert submits == [task_id, task_id]
                await gate.entered()
                gate.open()
                await client.join(timeout=10)
                result = client.get_result(task_id)
            stats = await running.stats()

    assert result is not None
    assert result.status is TaskStatus.SUCCESS
    assert result.result == "once"
    assert executions == ["once"]
    assert stats["scheduler"]["duplicate_submissions"] >= 1


async def test_cancel_a_queued_task(gate: Gate) -> None:
    executions: list[str] = []

    def blocker() -> None:
        gate.wait()

    def record(tag: str) -> str:
        executions.append(tag)
        return tag

    with trio.fail_after(20):
        async with Cluster(tasks=[blocker, record], workers=1, concurrency=1, prefetch=0) as c:
            async with started(c.discovery_address) as client:
                await client.delay("blocker")
                await gate.entered()  # the only worker slot is taken
                target = await client.delay("record", "cancelled")
                await client.stats()  # a round trip: the submission has left the client
                cancelled = await client.cancel_task(target)
                gate.open()
                after = await client.submit_task("record", ("after",))
                await client.join(timeout=10)
                status = client.get_status(target)
            stats = await c.stats()

    assert cancelled is True
    assert status is TaskStatus.CANCELLED
    assert after.result == "after"
    assert stats["scheduler"]["cancelled"] == 1  # cancelled by the control plane
    assert executions == ["after"]


async def test_cancel_a_task_that_never_left_the_client() -> None:
    executions: list[str] = []

    def record(tag: str) -> str:
        executions.append(tag)
        return tag

    address = free_address()
    with trio.fail_after(20):
        async with started(address) as client:
            target = await client.delay("record", "cancelled")
            cancelled = await client.cancel_task(target, timeout=5)
            async with Cluster(tasks=[record], discovery_address=address):
                assert (await client.submit_task("record", ("after",))).result == "after"
                await client.join(timeout=10)
            result = client.get_result(target)

    assert cancelled is True
    assert result is not None
    assert result.status is TaskStatus.CANCELLED
    assert executions == ["after"]


async def test_submit_task_timeout_returns_a_failure_naming_it(gate: Gate) -> None:
    def slow() -> str:
        gate.wait()
        return "late"

    with trio.fail_after(20):
        async with Cluster(tasks=[slow]) as running, started(running.discovery_address) as client:
            began = time.monotonic()
            result: TaskResult = await client.submit_task("slow", timeout=0.2)
            waited = time.monotonic() - began
            gate.open()
            await client.join(timeout=10)
            later = client.get_result(result.task_id)

    assert waited < 2
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "timed out after 0.2 s" in result.error
    assert "'slow'" in result.error
    assert later is not None
    assert later.status is TaskStatus.SUCCESS
    assert later.result == "late"


async def test_join_timeout_raises_timeout_error(gate: Gate) -> None:
    def slow() -> str:
        gate.wait()
        return "done"

    with trio.fail_after(20):
        async with Cluster(tasks=[slow]) as running, started(running.discovery_address) as client:
            task_id = await client.delay("slow")
            with pytest.raises(TimeoutError, match=r"1 tasks still unfinished after 0\.3 s"):
                await client.join(timeout=0.3)
            gate.open()
            await client.join(timeout=10)
            assert client.get_status(task_id) is TaskStatus.SUCCESS
