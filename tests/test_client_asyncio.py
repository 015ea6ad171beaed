"""The Client under asyncio: its actor runs in a thread of its own, the caller on ``asyncio.run``.

Each test is a plain function running one ``asyncio.run`` against a
thread-backed embedded cluster on random loopback ports.  Tasks that must
stay busy wait on a ``Gate`` (threading events) that the test opens, so no
test sleeps to wait for a result; the only real-time wait is the 2 s during
which no control plane exists yet, which is the point of that test.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest

from fastworker import (
    Client,
    ClientNotStartedError,
    ClientStoppedError,
    SerializationFormat,
    TaskResult,
    TaskStatus,
)
from fastworker.testing import ClusterThread, cluster
from fastworker.wire import Submit

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


# -- helpers --------------------------------------------------------------------


class Gate:
    """Holds task functions (in worker threads) until the test opens it."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.opened = threading.Event()

    def wait(self) -> None:
        self.arrived.set()
        if not self.opened.wait(10):
            raise TimeoutError("the test did not open the gate within 10 s")

    async def entered(self) -> None:
        assert await asyncio.to_thread(self.arrived.wait, 10), "no task reached the gate"


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    try:
        yield held
    finally:
        held.opened.set()  # whatever happened, no worker thread stays stuck


def run(main: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """``asyncio.run(main())``, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main()

    return asyncio.run(bounded())


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


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastworker-client"]


@pytest.fixture(scope="module")
def examples_cluster() -> Iterator[ClusterThread]:
    with cluster(task_modules=["examples.tasks"], workers=2) as c:
        yield c


def fails(reason: str) -> None:
    raise LookupError(reason)


# -- the API round trip -------------------------------------------------------


def test_delay_get_result_status_and_join(examples_cluster: ClusterThread) -> None:
    async def main() -> None:
        async with started(examples_cluster.discovery_address) as client:
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

    run(main)


def test_submit_task_success_and_failure(examples_cluster: ClusterThread) -> None:
    async def main() -> tuple[TaskResult, TaskResult, TaskResult]:
        async with started(examples_cluster.discovery_address) as client:
            sync = await client.submit_task("add", (2, 3))
            coroutine = await client.submit_task("fetch_greeting", kwargs={"name": "asyncio"})
            failing = await client.submit_task("fails_once_then_works", ("x",), max_retries=0)
            return sync, coroutine, failing

    sync, coroutine, failing = run(main)

    assert sync.status is TaskStatus.SUCCESS
    assert sync.result == 5
    assert coroutine.status is TaskStatus.SUCCESS
    assert coroutine.result == "hello, asyncio"
    assert failing.status is TaskStatus.FAILURE
    assert failing.error == "ValueError: this task always fails (x)"
    assert failing.traceback
    assert "ValueError" in failing.traceback


def test_unknown_task_fails_with_a_clear_error(examples_cluster: ClusterThread) -> None:
    async def main() -> TaskResult:
        async with started(examples_cluster.discovery_address) as client:
            return await client.submit_task("no_such_task", (1,))

    result = run(main)

    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "no_such_task" in result.error


def test_submit_batch_returns_ids_and_all_complete(examples_cluster: ClusterThread) -> None:
    async def main() -> tuple[list[str], list[TaskResult | None]]:
        async with started(examples_cluster.discovery_address) as client:
            ids = await client.submit_batch(
                [("add", (i, i)) for i in range(50)]
                + [("process_data", ({"k": 1},), {})]
                + [{"task_name": "slow_double", "args": (21,), "priority": "critical"}]
            )
            await client.join(timeout=10)
            return ids, [client.get_result(i) for i in ids]

    ids, results = run(main)

    assert len(ids) == len(set(ids)) == 52
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
    assert [r.result for r in results[:50] if r] == [2 * i for i in range(50)]
    assert results[50] is not None
    assert results[50].result == {"keys": 1, "data": {"k": 1}}
    assert results[51] is not None
    assert results[51].result == 42


def test_cbor_client(examples_cluster: ClusterThread) -> None:
    async def main() -> TaskResult:
        async with started(examples_cluster.discovery_address, serialization_format="cbor") as c:
            assert c.serialization_format is SerializationFormat.CBOR
            return await c.submit_task("process_data", ({"raw": b"\x00\x01"},))

    result = run(main)

    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"keys": 1, "data": {"raw": b"\x00\x01"}}


# -- life cycle -------------------------------------------------------------------


def test_stop_inside_a_running_loop_returns_promptly(examples_cluster: ClusterThread) -> None:
    async def main() -> float:
        client = Client(examples_cluster.discovery_address)
        await client.start()
        await client.submit_task("add", (1, 1))  # connected
        for i in range(100):
            await client.delay("add", i, i)  # and some in flight
        began = time.monotonic()
        client.stop()
        return time.monotonic() - began

    elapsed = run(main)

    assert elapsed < 1.0
    assert client_threads() == []


def test_stop_without_a_control_plane_returns_promptly() -> None:
    async def main() -> float:
        client = Client(free_address())
        await client.start()
        for i in range(10):
            await client.delay("add", i, i)
        began = time.monotonic()
        client.stop()
        return time.monotonic() - began

    elapsed = run(main)

    assert elapsed < 1.0
    assert client_threads() == []


def test_stop_releases_callers_still_waiting() -> None:
    """join, submit_task and queries in other tasks fail at once, not at their timeouts."""

    async def main() -> tuple[list[BaseException | None], float]:
        client = Client(free_address())
        await client.start()
        await client.delay("add", 1, 2)
        waiting = [
            asyncio.ensure_future(call)
            for call in (
                client.join(),
                client.submit_task("add", (1, 2)),
                client.get_task_result("some-id"),
                client.stats(),
            )
        ]
        await asyncio.sleep(0)  # let each of them start waiting
        began = time.monotonic()
        client.stop()
        done, _ = await asyncio.wait(waiting, timeout=2)
        return [task.exception() for task in waiting if task in done], time.monotonic() - began

    errors, elapsed = run(main)

    assert len(errors) == 4
    assert elapsed < 1.0
    assert all(isinstance(error, ClientStoppedError) for error in errors)
    assert all("stopped" in str(error) for error in errors)


def test_several_clients_at_once(examples_cluster: ClusterThread) -> None:
    async def one(n: int) -> list[Any]:
        async with started(examples_cluster.discovery_address) as client:
            ids = [await client.delay("add", n, i) for i in range(30)]
            result = await client.submit_task("add", (n, 1000))
            await client.join(timeout=10)
            return [result.result] + [client.get_result(i).result for i in ids]  # type: ignore[union-attr]

    async def main() -> list[list[Any]]:
        return list(await asyncio.gather(*(one(n) for n in range(4))))

    outcomes = run(main)

    assert outcomes == [[n + 1000] + [n + i for i in range(30)] for n in range(4)]
    assert client_threads() == []


def test_use_before_start_and_after_stop() -> None:
    async def main() -> None:
        client = Client(free_address())
        with pytest.raises(ClientNotStartedError, match=r"call `await client.start\(\)`"):
            await client.delay("add", 1, 2)
        with pytest.raises(ClientNotStartedError):
            await client.submit_task("add", (1, 2))
        with pytest.raises(ClientNotStartedError):
            await client.join()
        assert isinstance(ClientNotStartedError("x"), RuntimeError)

        await client.start()
        client.stop()
        with pytest.raises(ClientStoppedError, match="this client was stopped; create a new"):
            await client.delay("add", 1, 2)
        with pytest.raises(ClientStoppedError):
            await client.get_task_result("some-id")
        with pytest.raises(ClientStoppedError):
            await client.start()
        assert isinstance(ClientStoppedError("x"), RuntimeError)
        client.stop()  # idempotent

    run(main)


@pytest.mark.parametrize(
    ("argument", "type_name"), [(object(), "object"), ({1, 2}, "set"), (b"\x00", "bytes")]
)
def test_unencodable_argument_raises_type_error_and_sends_nothing(
    examples_cluster: ClusterThread, argument: Any, type_name: str
) -> None:
    async def main() -> tuple[int, int]:
        async with started(examples_cluster.discovery_address) as client:
            before = (await client.stats())["scheduler"]["accepted"]
            with pytest.raises(TypeError, match=f"Object of type {type_name} is not JSON"):
                await client.delay("add", argument, 1)
            with pytest.raises(TypeError, match=type_name):
                await client.submit_task("add", (1,), {"b": argument})
            with pytest.raises(TypeError, match=type_name):
                await client.submit_batch([("add", (1, 2)), ("add", (argument, 2))])
            assert client.pending_count == 0
            assert (await client.submit_task("add", (1, 2))).result == 3
            return before, (await client.stats())["scheduler"]["accepted"]

    before, after = run(main)

    assert after == before + 1  # only the valid task reached the control plane


def test_tasks_delayed_before_the_control_plane_exists_all_complete() -> None:
    address = free_address()

    async def main() -> list[Any]:
        async with started(address) as client:
            ids = [await client.delay("add", i, 1) for i in range(25)]
            await asyncio.sleep(2)  # no control plane for 2 s: the point of this test
            assert client.pending_count == 25
            late = ClusterThread(task_modules=["examples.tasks"], discovery_address=address)
            await asyncio.to_thread(late.start)
            try:
                await client.join(timeout=15)
            finally:
                late.stop()
            return [client.get_result(i).result for i in ids]  # type: ignore[union-attr]

    assert run(main) == [i + 1 for i in range(25)]


def test_resent_submission_after_a_lost_ack_runs_once(gate: Gate) -> None:
    executions: list[str] = []

    def counted(tag: str) -> str:
        executions.append(tag)
        gate.wait()
        return tag

    async def main() -> TaskResult:
        async with started(running.discovery_address, ack_timeout=0.2) as client:
            core = client._core
            resent = threading.Event()
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
            assert await asyncio.to_thread(resent.wait, 10), "the client never re-sent"
            assert submits == [task_id, task_id]
            await gate.entered()
            gate.opened.set()
            await client.join(timeout=10)
            stats = await client.stats()
            assert stats["scheduler"]["duplicate_submissions"] >= 1
            result = client.get_result(task_id)
            assert result is not None
            return result

    with cluster(tasks=[counted]) as running:
        result = run(main)

    assert result.status is TaskStatus.SUCCESS
    assert result.result == "once"
    assert executions == ["once"]


def test_cancel_a_queued_task(gate: Gate) -> None:
    executions: list[str] = []

    def blocker() -> None:
        gate.wait()

    def record(tag: str) -> str:
        executions.append(tag)
        return tag

    async def main() -> tuple[bool, TaskStatus | None, dict[str, Any]]:
        async with started(running.discovery_address) as client:
            await client.delay("blocker")
            await gate.entered()  # the only worker slot is taken
            target = await client.delay("record", "cancelled")
            await client.stats()  # a round trip: the submission has left the client
            cancelled = await client.cancel_task(target)
            gate.opened.set()
            after = await client.submit_task("record", ("after",))
            assert after.result == "after"
            await client.join(timeout=10)
            return cancelled, client.get_status(target), await client.stats()

    with cluster(tasks=[blocker, record], workers=1, concurrency=1, prefetch=0) as running:
        cancelled, status, stats = run(main)

    assert cancelled is True
    assert status is TaskStatus.CANCELLED
    assert stats["scheduler"]["cancelled"] == 1  # cancelled by the control plane
    assert executions == ["after"]


def test_cancel_a_task_that_never_left_the_client() -> None:
    executions: list[str] = []

    def record(tag: str) -> str:
        executions.append(tag)
        return tag

    address = free_address()

    async def main() -> tuple[bool, TaskResult | None]:
        async with started(address) as client:
            target = await client.delay("record", "cancelled")
            cancelled = await client.cancel_task(target, timeout=5)
            late = ClusterThread(tasks=[record], discovery_address=address)
            await asyncio.to_thread(late.start)
            try:
                assert (await client.submit_task("record", ("after",))).result == "after"
                await client.join(timeout=10)
            finally:
                late.stop()
            return cancelled, client.get_result(target)

    cancelled, result = run(main)

    assert cancelled is True
    assert result is not None
    assert result.status is TaskStatus.CANCELLED
    assert executions == ["after"]


def test_submit_task_timeout_returns_a_failure_naming_it(gate: Gate) -> None:
    def slow() -> str:
        gate.wait()
        return "late"

    async def main() -> tuple[TaskResult, TaskResult | None]:
        async with started(running.discovery_address) as client:
            began = time.monotonic()
            result = await client.submit_task("slow", timeout=0.2)
            assert time.monotonic() - began < 2
            gate.opened.set()
            await client.join(timeout=10)
            return result, client.get_result(result.task_id)

    with cluster(tasks=[slow]) as running:
        result, later = run(main)

    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "timed out after 0.2 s" in result.error
    assert "'slow'" in result.error
    assert later is not None
    assert later.status is TaskStatus.SUCCESS
    assert later.result == "late"


def test_join_timeout_raises_timeout_error(gate: Gate) -> None:
    def slow() -> str:
        gate.wait()
        return "done"

    async def main() -> None:
        async with started(running.discovery_address) as client:
            task_id = await client.delay("slow")
            with pytest.raises(TimeoutError, match=r"1 tasks still unfinished after 0\.3 s"):
                await client.join(timeout=0.3)
            gate.opened.set()
            await client.join(timeout=10)
            assert client.get_status(task_id) is TaskStatus.SUCCESS

    with cluster(tasks=[slow]) as running:
        run(main)
