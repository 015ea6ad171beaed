"""Client behaviours checked under both event loops (not a test module).

tests/test_client_asyncio.py and tests/test_client_trio.py test the same
documented ``Client`` under each loop.  What a test does with the client is
written here once, so the two files cannot drift apart; each test there keeps
only what belongs to its loop: running it, hosting the cluster, timeouts,
events, sleeping and concurrency.  That is why a case that needs any of those
takes it as an argument instead of importing asyncio or trio: the code here
awaits nothing but ``Client`` coroutines and what it is given, so it runs
unchanged under both.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import pytest
from multiprocess import free_tcp_port

from fastworker import Client, ClientNotStartedError, ClientStoppedError, TaskResult, TaskStatus
from fastworker.client._core import ClientCore
from fastworker.wire import Submit, SubmitAck


class HeldGate(Protocol):
    """What the cases need of a gate; the asyncio file's ``Gate`` and conftest's both fit.

    They differ only in how ``entered`` waits (a thread under asyncio, a trio
    event under trio), which is why the cases take the gate as an argument.
    """

    def wait(self) -> None: ...

    async def entered(self) -> None: ...

    def open(self) -> None: ...


ControlPlane = Callable[[], AbstractAsyncContextManager[object]]
"""Starts a control plane where a client dials: in a thread under asyncio, in the run under trio."""

UNENCODABLE_ARGUMENTS = [(object(), "object"), ({1, 2}, "set"), (b"\x00", "bytes")]
"""(argument, the type name the error must give) pairs that JSON cannot carry."""


@asynccontextmanager
async def started(discovery_address: str, **options: Any) -> AsyncIterator[Client]:
    """A started client that is flushed and stopped on the way out, whether the test passed or not.

    Flushed first (as ``async with Client(...)`` does): under trio the
    control plane may run in the test's own run, which a blocking ``stop()``
    would hold still; a test that failed does not wait long for it.
    """
    client = Client(discovery_address, **options)
    await client.start()
    try:
        yield client
        await client.flush(timeout=5)
    finally:
        client.stop(timeout=0)


def free_address() -> str:
    """A loopback endpoint nobody listens on (its port was free a moment ago; below the
    ephemeral range, so that connecting to it cannot take it: see free_tcp_port)."""
    return f"tcp://127.0.0.1:{free_tcp_port()}"


# -- task functions -------------------------------------------------------------
# Clusters serve tasks under their function's __name__, so each factory's inner
# function carries the name the cases submit.


def record_task(executions: list[str]) -> Callable[[str], str]:
    """``record``: lists what ran, so a test can tell a cancelled task never did."""

    def record(tag: str) -> str:
        executions.append(tag)
        return tag

    return record


def counted_task(executions: list[str], gate: HeldGate) -> Callable[[str], str]:
    """``counted``: lists each run and then holds, so a re-send finds the task unfinished."""

    def counted(tag: str) -> str:
        executions.append(tag)
        gate.wait()
        return tag

    return counted


def blocker_task(gate: HeldGate) -> Callable[[], None]:
    """``blocker``: holds a worker slot until the test opens the gate."""

    def blocker() -> None:
        gate.wait()

    return blocker


def slow_task(gate: HeldGate, returns: str) -> Callable[[], str]:
    """``slow``: finishes only once the test opens the gate, outlasting any short timeout."""

    def slow() -> str:
        gate.wait()
        return returns

    return slow


# -- the API round trip (examples.tasks) ---------------------------------------


async def delay_get_result_status_and_join(client: Client) -> None:
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


async def submit_task_success_and_failure(client: Client, name: str, tag: str) -> TaskResult:
    """Returns the failure, for what only one loop's test checks of it."""
    sync = await client.submit_task("add", (2, 3))
    greeting = await client.submit_task("fetch_greeting", kwargs={"name": name})
    failing = await client.submit_task("fails_once_then_works", (tag,), max_retries=0)
    assert sync.status is TaskStatus.SUCCESS
    assert sync.result == 5
    assert greeting.status is TaskStatus.SUCCESS
    assert greeting.result == f"hello, {name}"
    assert failing.status is TaskStatus.FAILURE
    assert failing.error == f"ValueError: this task always fails ({tag})"
    return failing


async def submit_batch_all_complete(client: Client, tail: Sequence[tuple[Any, Any]]) -> None:
    """50 ``add`` tuples, then ``tail``'s (entry, expected result) pairs.

    ``tail`` is the loop's own, so between them the two files try every entry form.
    """
    ids = await client.submit_batch(
        [("add", (i, i)) for i in range(50)] + [entry for entry, _ in tail]
    )
    await client.join(timeout=10)
    results = [client.get_result(i) for i in ids]
    assert len(ids) == len(set(ids)) == 50 + len(tail)
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
    expected = [2 * i for i in range(50)] + [result for _, result in tail]
    assert [r.result for r in results if r] == expected


# -- life cycle -----------------------------------------------------------------


async def seconds_to_stop(
    address: str, *, connect: bool, in_flight: int, timeout: float | None = None
) -> tuple[Any, float]:
    """How long ``stop`` takes with tasks in flight; its host, for the loop to check the actor."""
    client = Client(address)
    await client.start()
    if connect:
        await client.submit_task("add", (1, 1))  # connected
    for i in range(in_flight):
        await client.delay("add", i, i)  # and some in flight
    host = client._host
    began = time.monotonic()
    client.stop(timeout=timeout)
    return host, time.monotonic() - began


async def pending_client(address: str) -> Client:
    """A started client with a task left to hand over, so that its callers have to wait."""
    client = Client(address)
    await client.start()
    await client.delay("add", 1, 2)
    return client


def calls_that_wait(client: Client) -> dict[str, Callable[[], Awaitable[object]]]:
    """The calls ``stop`` must release at once; each loop runs them concurrently its own way."""
    return {
        "join": client.join,
        "submit_task": lambda: client.submit_task("add", (1, 2)),
        "query": lambda: client.get_task_result("some-id"),
        "stats": client.stats,
    }


async def one_of_several_clients(address: str, n: int) -> list[Any]:
    """One of several clients run at once: its results must be its own (``n``-dependent)."""
    async with started(address) as client:
        ids = [await client.delay("add", n, i) for i in range(30)]
        result = await client.submit_task("add", (n, 1000))
        await client.join(timeout=10)
        return [result.result] + [client.get_result(i).result for i in ids]  # type: ignore[union-attr]


async def use_before_start_and_after_stop(address: str) -> None:
    client = Client(address)
    with pytest.raises(ClientNotStartedError, match=r"call `await client.start\(\)`"):
        await client.delay("add", 1, 2)
    with pytest.raises(ClientNotStartedError):
        await client.submit_task("add", (1, 2))
    with pytest.raises(ClientNotStartedError):
        await client.join()
    with pytest.raises(ClientNotStartedError):
        await client.cancel_task("some-id")
    assert isinstance(ClientNotStartedError("x"), RuntimeError)

    await client.start()
    client.stop()
    with pytest.raises(ClientStoppedError, match=r"call `await client.start\(\)` to use it again"):
        await client.delay("add", 1, 2)
    with pytest.raises(ClientStoppedError):
        await client.join()
    with pytest.raises(ClientStoppedError):
        await client.get_task_result("some-id")
    with pytest.raises(ClientStoppedError):
        await client.flush()
    assert isinstance(ClientStoppedError("x"), RuntimeError)
    client.stop()  # idempotent
    assert repr(client).endswith("stopped>")
    await client.start()  # and it starts again
    assert repr(client).endswith("started>")
    client.stop()


async def unencodable_argument_raises_type_error(
    client: Client, argument: Any, type_name: str
) -> None:
    """Checks the client side; whether nothing reached the control plane is read per loop."""
    with pytest.raises(TypeError, match=f"Object of type {type_name} is not JSON"):
        await client.delay("add", argument, 1)
    with pytest.raises(TypeError, match=type_name):
        await client.submit_task("add", (1,), {"b": argument})
    with pytest.raises(TypeError, match=type_name):
        await client.submit_batch([("add", (1, 2)), ("add", (argument, 2))])
    assert client.pending_count == 0
    assert (await client.submit_task("add", (1, 2))).result == 3


async def tasks_delayed_before_the_control_plane_complete(
    client: Client,
    *,
    sleep: Callable[[float], Awaitable[object]],
    control_plane: ControlPlane,
) -> None:
    """``control_plane`` must serve examples.tasks on the client's address."""
    ids = [await client.delay("add", i, 1) for i in range(25)]
    await sleep(2)  # no control plane for 2 s: the point of this test
    assert client.pending_count == 25
    async with control_plane():
        await client.join(timeout=15)
    results = [client.get_result(i) for i in ids]
    assert [r.result if r else None for r in results] == [i + 1 for i in range(25)]


async def a_lone_task_leaves_at_once_and_a_burst_in_one_more_message(
    client: Client, settle: Callable[[], Awaitable[object]]
) -> None:
    """Needs ``add``.  ``settle`` lets the client's loop go idle (trio: all tasks blocked).

    The first wake-up of a turn sends before the call returns; the calls
    after it in the same turn leave together at the next turn.
    """
    await client.stats()  # connected: a round trip
    await settle()
    core = client._core
    sizes: list[int] = []
    send = core._send_gateway

    def spy(message: Any) -> bool:
        if isinstance(message, Submit):
            sizes.append(len(message.tasks))
        return send(message)

    core._send_gateway = spy  # type: ignore[method-assign]
    first = await client.delay("add", 0, 1)  # delay() does not yield
    assert sizes == [1]
    burst = [await client.delay("add", i, 1) for i in range(1, 51)]
    assert sizes == [1]
    await client.join(timeout=10)
    assert sizes == [1, 50]
    results = [client.get_result(task_id) for task_id in [first, *burst]]
    assert [r.result if r else None for r in results] == [i + 1 for i in range(51)]


def lose_acks(core: ClientCore, count: int) -> None:
    """Make ``core`` miss its next ``count`` acknowledgements, as a lossy network would."""
    on_ack = core._on_ack
    lost = 0

    def lossy(ack: SubmitAck) -> None:
        nonlocal lost
        if lost < count:
            lost += 1
            return
        on_ack(ack)

    core._on_ack = lossy  # type: ignore[method-assign]


async def lost_ack_resent_runs_once(
    client: Client,
    gate: HeldGate,
    *,
    resent: Callable[[], None],
    wait_resent: Callable[[], Awaitable[object]],
) -> None:
    """Needs a cluster serving ``counted_task`` and a client with a short ``ack_timeout``.

    The spy on the client's sends calls ``resent`` where the client's actor
    runs (its own thread under asyncio, the test's run under trio), so the
    loop's test supplies an event that can be set from there.  The loop's test
    checks the executions and the control plane's duplicate count.
    """
    core = client._core
    submits: list[str] = []
    send = core._send_gateway

    def spy(message: Any) -> bool:
        sent = send(message)
        if sent and isinstance(message, Submit):
            submits.extend(wire[0] for wire in message.tasks)
            if len(submits) >= 2:
                resent()
        return sent

    core._send_gateway = spy  # type: ignore[method-assign]
    lose_acks(core, 1)
    task_id = await client.delay("counted", "once")
    # The ack is dropped; the task is held, so the re-send finds it unfinished.
    await wait_resent()
    assert submits == [task_id, task_id]
    await gate.entered()
    gate.open()
    await client.join(timeout=10)
    result = client.get_result(task_id)
    assert result is not None
    assert result.status is TaskStatus.SUCCESS
    assert result.result == "once"


async def cancel_a_queued_task(client: Client, gate: HeldGate) -> None:
    """Needs ``blocker_task`` and ``record_task`` served with one worker slot and no prefetch.

    Only then does the target wait in the control plane's queue, where the cancel must find it.
    """
    await client.delay("blocker")
    await gate.entered()  # the only worker slot is taken
    target = await client.delay("record", "cancelled")
    await client.stats()  # a round trip: the submission has left the client
    cancelled = await client.cancel_task(target)
    gate.open()
    after = await client.submit_task("record", ("after",))
    await client.join(timeout=10)
    assert cancelled is True
    assert client.get_status(target) is TaskStatus.CANCELLED
    assert after.result == "after"


async def cancel_a_task_that_never_left_the_client(
    client: Client, control_plane: ControlPlane
) -> None:
    """``control_plane`` must serve ``record_task`` on the client's address."""
    target = await client.delay("record", "cancelled")
    cancelled = await client.cancel_task(target, timeout=5)
    async with control_plane():
        assert (await client.submit_task("record", ("after",))).result == "after"
        await client.join(timeout=10)
    result = client.get_result(target)
    assert cancelled is True
    assert result is not None
    assert result.status is TaskStatus.CANCELLED


async def submit_task_timeout_fails_naming_it(client: Client, gate: HeldGate) -> None:
    """Needs a cluster serving ``slow_task(gate, "late")``."""
    began = time.monotonic()
    result = await client.submit_task("slow", timeout=0.2)
    assert time.monotonic() - began < 2
    gate.open()
    await client.join(timeout=10)
    later = client.get_result(result.task_id)
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "timed out after 0.2 s" in result.error
    assert "'slow'" in result.error
    assert "the task goes on" in result.error  # not "lost": the caller may still read it
    assert later is not None
    assert later.status is TaskStatus.SUCCESS
    assert later.result == "late"


async def join_timeout_raises_timeout_error(client: Client, gate: HeldGate) -> None:
    """Needs a cluster serving ``slow_task(gate, "done")``."""
    task_id = await client.delay("slow")
    with pytest.raises(TimeoutError, match=r"1 tasks still unfinished after 0\.3 s"):
        await client.join(timeout=0.3)
    gate.open()
    await client.join(timeout=10)
    assert client.get_status(task_id) is TaskStatus.SUCCESS
