"""The Client under asyncio: its core runs on the caller's own loop, with no thread of its own.

Each test is a plain function running one ``asyncio.run`` against a
thread-backed embedded cluster on random loopback ports.  Tasks that must
stay busy wait on a ``Gate`` (threading events) that the test opens, so no
test sleeps to wait for a result; the only real-time wait is the 2 s during
which no control plane exists yet, which is the point of that test.

What a test does with the client is shared with tests/test_client_trio.py
through tests/_client_cases.py; what stays here is asyncio's part.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import _client_cases as cases
import pytest
from _client_cases import free_address, started

from fastworker import Client, ClientStoppedError, SerializationFormat, TaskResult, TaskStatus
from fastworker.testing import ClusterThread, cluster

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

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    try:
        yield held
    finally:
        held.open()  # whatever happened, no worker thread stays stuck


def run(main: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """``asyncio.run(main())``, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main()

    return asyncio.run(bounded())


def run_with_client(address: str, case: Callable[[Client], Awaitable[T]], **options: Any) -> T:
    """``case`` on a client that lives exactly as long as one bounded ``asyncio.run``."""

    async def main() -> T:
        async with started(address, **options) as client:
            return await case(client)

    return run(main)


@asynccontextmanager
async def late_cluster(address: str, **options: Any) -> AsyncIterator[ClusterThread]:
    """A control plane that starts only now, in a thread so the loop keeps serving the client."""
    late = ClusterThread(discovery_address=address, **options)
    await asyncio.to_thread(late.start)
    try:
        yield late
    finally:
        late.stop()


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastworker-client"]


@pytest.fixture(scope="module")
def examples_cluster() -> Iterator[ClusterThread]:
    with cluster(task_modules=["examples.tasks"], workers=2) as c:
        yield c


# -- the API round trip -------------------------------------------------------


def test_delay_get_result_status_and_join(examples_cluster: ClusterThread) -> None:
    run_with_client(examples_cluster.discovery_address, cases.delay_get_result_status_and_join)


def test_the_client_runs_on_the_callers_loop_with_no_thread_of_its_own(
    examples_cluster: ClusterThread,
) -> None:
    """No thread is started, and replies are handled on the loop's own thread."""
    address = examples_cluster.discovery_address

    async def main() -> tuple[int, int, set[int]]:
        before = threading.active_count()
        async with started(address) as client:
            during = threading.active_count()
            handled_on: set[int] = set()
            core = client._core
            on_body = core._on_body

            def spy(body: bytes) -> None:
                handled_on.add(threading.get_ident())
                on_body(body)

            core._on_body = spy  # type: ignore[method-assign]
            results = await asyncio.gather(*(client.submit_task("add", [i, 1]) for i in range(200)))
            assert [r.result for r in results] == [i + 1 for i in range(200)]
        return before, during, handled_on

    before, during, handled_on = run(main)

    assert during == before
    assert handled_on == {threading.get_ident()}
    assert client_threads() == []


def test_sequential_round_trips_never_miss_a_reply(
    examples_cluster: ClusterThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request at a time: every reply arrives on a socket the client just sent on.

    A send may consume the edge of the fd that announces the reply.  With the
    tick's safety net (a look at every socket) turned off, a client that
    relied on the edge alone would wait forever on the first such reply.
    """
    from fastworker.client import _asyncio_binding

    def tick_without_safety_net(self: Any) -> None:
        self._timer = None
        self._run(self.core.on_tick)
        self._schedule_tick()

    monkeypatch.setattr(_asyncio_binding.AsyncioBinding, "_tick", tick_without_safety_net)
    address = examples_cluster.discovery_address

    async def main() -> None:
        async with started(address) as client:
            for i in range(300):
                assert (await client.submit_task("add", [i, 1], timeout=10)).result == i + 1
                assert await client.get_task_result(f"{i:032x}", timeout=10) is None

    run(main)


def test_a_lone_task_leaves_at_once_and_a_burst_in_one_more_message(
    examples_cluster: ClusterThread,
) -> None:
    run_with_client(
        examples_cluster.discovery_address,
        partial(
            cases.a_lone_task_leaves_at_once_and_a_burst_in_one_more_message,
            settle=partial(asyncio.sleep, 0),
        ),
    )


def test_stop_from_another_thread_while_the_loop_runs_hands_over(
    examples_cluster: ClusterThread,
) -> None:
    """``stop()`` works from anywhere: from a thread, it runs on the client's loop."""
    address = examples_cluster.discovery_address

    async def main() -> list[Any]:
        client = Client(address)
        await client.start()
        ids = [await client.delay("add", i, 1) for i in range(50)]
        await asyncio.to_thread(client.stop)  # the loop keeps running meanwhile
        async with started(address) as other:
            records = []
            for task_id in ids:
                result = None
                while result is None:  # handed over: each runs, and its result is cached
                    result = await other.get_task_result(task_id)
                    if result is None:
                        await asyncio.sleep(0.01)
                records.append(result.result)
            return records

    assert run(main) == [i + 1 for i in range(50)]
    assert client_threads() == []


def test_submit_task_success_and_failure(examples_cluster: ClusterThread) -> None:
    failing = run_with_client(
        examples_cluster.discovery_address,
        partial(cases.submit_task_success_and_failure, name="asyncio", tag="x"),
    )

    assert failing.traceback
    assert "ValueError" in failing.traceback


def test_unknown_task_fails_with_a_clear_error(examples_cluster: ClusterThread) -> None:
    result = run_with_client(
        examples_cluster.discovery_address, lambda client: client.submit_task("no_such_task", (1,))
    )

    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "no_such_task" in result.error


def test_submit_batch_returns_ids_and_all_complete(examples_cluster: ClusterThread) -> None:
    tail: list[tuple[Any, Any]] = [
        (("process_data", ({"k": 1},), {}), {"keys": 1, "data": {"k": 1}}),
        ({"task_name": "slow_double", "args": (21,), "priority": "critical"}, 42),
    ]
    run_with_client(
        examples_cluster.discovery_address, partial(cases.submit_batch_all_complete, tail=tail)
    )


def test_cbor_client(examples_cluster: ClusterThread) -> None:
    async def case(client: Client) -> TaskResult:
        assert client.serialization_format is SerializationFormat.CBOR
        return await client.submit_task("process_data", ({"raw": b"\x00\x01"},))

    result = run_with_client(examples_cluster.discovery_address, case, serialization_format="cbor")

    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"keys": 1, "data": {"raw": b"\x00\x01"}}


# -- life cycle -------------------------------------------------------------------


def seconds_to_stop(address: str, **options: Any) -> float:
    """Under asyncio the actor is gone when its thread is."""
    _, elapsed = run(lambda: cases.seconds_to_stop(address, **options))
    assert client_threads() == []
    return elapsed


def test_stop_inside_a_running_loop_hands_over_promptly(examples_cluster: ClusterThread) -> None:
    elapsed = seconds_to_stop(examples_cluster.discovery_address, connect=True, in_flight=100)

    assert elapsed < 1.0


def test_stop_without_a_control_plane_waits_its_timeout_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    elapsed = seconds_to_stop(free_address(), connect=False, in_flight=10, timeout=0.5)

    assert 0.5 <= elapsed < 1.5
    assert "client stopped with 10 tasks not handed over" in caplog.text


def test_stop_releases_callers_still_waiting() -> None:
    """join, submit_task and queries in other tasks fail at once, not at their timeouts."""

    async def main() -> tuple[list[BaseException | None], float]:
        client = await cases.pending_client(free_address())
        waiting = [asyncio.ensure_future(call()) for call in cases.calls_that_wait(client).values()]
        await asyncio.sleep(0)  # let each of them start waiting
        began = time.monotonic()
        client.stop(timeout=0.3)  # its one task cannot be handed over: nobody listens
        done, _ = await asyncio.wait(waiting, timeout=2)
        return [task.exception() for task in waiting if task in done], time.monotonic() - began

    errors, elapsed = run(main)

    assert len(errors) == 4
    assert elapsed < 1.3
    assert all(isinstance(error, ClientStoppedError) for error in errors)
    assert all("stopped" in str(error) for error in errors)


def test_several_clients_at_once(examples_cluster: ClusterThread) -> None:
    address = examples_cluster.discovery_address

    async def main() -> list[list[Any]]:
        return list(
            await asyncio.gather(*(cases.one_of_several_clients(address, n) for n in range(4)))
        )

    outcomes = run(main)

    assert outcomes == [[n + 1000] + [n + i for i in range(30)] for n in range(4)]
    assert client_threads() == []


def test_use_before_start_and_after_stop() -> None:
    run(lambda: cases.use_before_start_and_after_stop(free_address()))


@pytest.mark.parametrize(("argument", "type_name"), cases.UNENCODABLE_ARGUMENTS)
def test_unencodable_argument_raises_type_error_and_sends_nothing(
    examples_cluster: ClusterThread, argument: Any, type_name: str
) -> None:
    async def case(client: Client) -> tuple[int, int]:
        before = (await client.stats())["scheduler"]["accepted"]
        await cases.unencodable_argument_raises_type_error(client, argument, type_name)
        return before, (await client.stats())["scheduler"]["accepted"]

    # The cluster is shared by the module, so count what this test adds.
    before, after = run_with_client(examples_cluster.discovery_address, case)

    assert after == before + 1  # only the valid task reached the control plane


def test_tasks_delayed_before_the_control_plane_exists_all_complete() -> None:
    address = free_address()
    run_with_client(
        address,
        partial(
            cases.tasks_delayed_before_the_control_plane_complete,
            sleep=asyncio.sleep,
            control_plane=partial(late_cluster, address, task_modules=["examples.tasks"]),
        ),
    )


def test_resent_submission_after_a_lost_ack_runs_once(gate: Gate) -> None:
    executions: list[str] = []
    resent = threading.Event()  # set in the client's actor thread, not on this loop

    async def wait_resent() -> None:
        assert await asyncio.to_thread(resent.wait, 10), "the client never re-sent"

    async def case(client: Client) -> dict[str, Any]:
        await cases.lost_ack_resent_runs_once(
            client, gate, resent=resent.set, wait_resent=wait_resent
        )
        return await client.stats()

    with cluster(tasks=[cases.counted_task(executions, gate)]) as running:
        stats = run_with_client(running.discovery_address, case, ack_timeout=0.2)

    assert stats["scheduler"]["duplicate_submissions"] >= 1
    assert executions == ["once"]


def test_cancel_a_queued_task(gate: Gate) -> None:
    executions: list[str] = []
    tasks: list[Callable[..., Any]] = [cases.blocker_task(gate), cases.record_task(executions)]

    async def case(client: Client) -> dict[str, Any]:
        await cases.cancel_a_queued_task(client, gate)
        return await client.stats()

    with cluster(tasks=tasks, workers=1, concurrency=1, prefetch=0) as running:
        stats = run_with_client(running.discovery_address, case)

    assert stats["scheduler"]["cancelled"] == 1  # cancelled by the control plane
    assert executions == ["after"]


def test_cancel_a_task_that_never_left_the_client() -> None:
    executions: list[str] = []
    address = free_address()
    control_plane = partial(late_cluster, address, tasks=[cases.record_task(executions)])

    run_with_client(
        address,
        partial(cases.cancel_a_task_that_never_left_the_client, control_plane=control_plane),
    )

    assert executions == ["after"]


def test_submit_task_timeout_returns_a_failure_naming_it(gate: Gate) -> None:
    with cluster(tasks=[cases.slow_task(gate, "late")]) as running:
        run_with_client(
            running.discovery_address, partial(cases.submit_task_timeout_fails_naming_it, gate=gate)
        )


def test_join_timeout_raises_timeout_error(gate: Gate) -> None:
    with cluster(tasks=[cases.slow_task(gate, "done")]) as running:
        run_with_client(
            running.discovery_address, partial(cases.join_timeout_raises_timeout_error, gate=gate)
        )


def test_a_cancelled_submit_task_still_runs_its_task_once(gate: Gate) -> None:
    """Cancelling the caller (a timeout around the call) does not cancel the task (README)."""
    executions: list[str] = []

    async def case(client: Client) -> int:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.submit_task("counted", ("once",)), 0.05)
        await gate.entered()  # it runs although its caller gave up
        gate.open()
        await client.join(timeout=10)
        return client.pending_count

    with cluster(tasks=[cases.counted_task(executions, gate)]) as running:
        assert run_with_client(running.discovery_address, case) == 0

    assert executions == ["once"]
