"""The client's own share of reliability: bounded tables, checked options, bounded messages,
an honest ``cancel_task``, and no task left waiting forever for a result that was lost.

Each test runs an embedded ``Cluster`` in the test's trio run (the client's
actor runs there too, so a test may look at its tables between awaits), on
random loopback ports.  Faults are made where they happen: a reply or push is
dropped as the client's actor receives it, a send fails as the socket would
when full.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import _client_cases as cases
import pytest
import trio
from _client_cases import HeldGate, free_address, started
from multiprocess import poll

from fastworker import Client, Cluster, ControlPlaneUnavailableError, TaskStatus
from fastworker.client import _core
from fastworker.wire import ResultQuery, ResultReply, Results, Submit, SubmitAck, decode, encode

pytestmark = pytest.mark.timeout(40)


@asynccontextmanager
async def cluster_and_client(
    tasks: list[Callable[..., Any]], *, client: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[tuple[Cluster, Client]]:
    options.setdefault("heartbeat_interval", 0.2)  # the client ticks at this pace
    async with (
        Cluster(tasks=tasks, **options) as running,
        started(running.discovery_address, **(client or {})) as connected,
    ):
        yield running, connected


def drop_incoming(client: Client, kind: type, count: int = 1) -> list[Any]:
    """Make the client's actor lose the next ``count`` messages of ``kind``; returns them."""
    core = client._core
    on_body = core._on_body
    dropped: list[Any] = []

    def lossy(body: bytes) -> None:
        if len(dropped) < count and isinstance(decode(body), kind):
            dropped.append(decode(body))
            return
        on_body(body)

    core._on_body = lossy  # type: ignore[method-assign]
    return dropped


def add(a: int, b: int) -> int:
    return a + b


# -- tables emptied when their callers leave --------------------------------------


async def test_a_query_whose_reply_is_lost_is_forgotten_when_its_caller_stops_waiting() -> None:
    with trio.fail_after(20):
        async with cluster_and_client([add]) as (_, client):
            dropped = drop_incoming(client, ResultReply, count=100)
            for _ in range(3):
                with pytest.raises(ControlPlaneUnavailableError):
                    await client.get_task_result("no-such-task", timeout=0.1)
            with trio.move_on_after(0.1):  # a caller cancelled from outside
                await client.get_task_result("no-such-task", timeout=0.3)
            await poll(lambda: not client._core._queries, timeout=5, what="the queries forgotten")

    assert dropped  # the replies came, and were lost


async def test_join_calls_that_timed_out_are_forgotten(gate: HeldGate) -> None:
    with trio.fail_after(20):
        async with cluster_and_client([cases.slow_task(gate, "done")]) as (_, client):
            await client.delay("slow")
            for _ in range(3):
                with pytest.raises(TimeoutError):
                    await client.join(timeout=0.05)
            await poll(lambda: not client._core._joiners, timeout=5, what="the joins forgotten")
            gate.open()
            await client.join(timeout=10)


# -- options checked at the call ----------------------------------------------------

LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

BAD_CALLS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    # The finding: a backoff that overflows the retry schedule is refused, not clamped.
    (
        "apply_async",
        {"max_retries": 40, "retry_backoff": 1e15, "retry_backoff_max": 0.005},
        ValueError,
        "retry_backoff must be from 1 to 100",
    ),
    ("apply_async", {"retry_backoff": 0.5}, ValueError, "retry_backoff must be from 1"),
    ("apply_async", {"max_retries": 101}, ValueError, "max_retries must be >= 0 and at most 100"),
    ("apply_async", {"max_retries": -1}, ValueError, "max_retries must be >= 0"),
    ("apply_async", {"max_retries": 2.5}, TypeError, "max_retries must be an int"),
    ("apply_async", {"max_retries": True}, TypeError, "max_retries must be an int"),
    ("apply_async", {"retry_delay": math.nan}, ValueError, "retry_delay must be a finite"),
    ("apply_async", {"retry_delay": -1}, ValueError, "retry_delay must be >= 0"),
    ("apply_async", {"retry_delay": "1"}, TypeError, "retry_delay must be a number"),
    ("apply_async", {"retry_backoff_max": 1e9}, ValueError, "retry_backoff_max must be at most"),
    ("apply_async", {"time_limit": 0}, ValueError, "time_limit must be > 0"),
    ("apply_async", {"time_limit": math.inf}, ValueError, "time_limit must be a finite"),
    ("apply_async", {"countdown": -1}, ValueError, "countdown must be >= 0"),
    ("apply_async", {"countdown": "5"}, TypeError, "countdown must be a number"),
    ("apply_async", {"eta": "2030-01-01T00:00:00"}, TypeError, "eta must be a datetime"),
    ("apply_async", {"eta": LATER.replace(tzinfo=None)}, ValueError, "timezone-aware"),
    ("apply_async", {"eta": LATER, "countdown": 1}, ValueError, "countdown or eta, not both"),
    ("apply_async", {"priority": 1}, TypeError, "priority must be a TaskPriority"),
    ("apply_async", {"priority": "urgent"}, ValueError, "unknown priority 'urgent'"),
    ("delay", {"eta": "tomorrow"}, TypeError, "eta must be a datetime"),
    ("delay", {"countdown": math.inf}, ValueError, "countdown must be a finite"),
    ("submit_task", {"timeout": 0}, ValueError, "timeout must be > 0"),
    ("submit_task", {"max_retries": 1000}, ValueError, "max_retries must be >= 0"),
]


@pytest.mark.parametrize(("method", "options", "error", "message"), BAD_CALLS, ids=repr)
async def test_bad_options_raise_at_the_call_and_queue_nothing(
    method: str, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    async with started(free_address()) as client:
        if method == "delay":
            call = client.delay("add", 1, 2, **options)
        else:
            call = getattr(client, method)("add", (1, 2), **options)
        with pytest.raises(error, match=message):
            await call
        if "timeout" not in options:  # submit_task's own wait, not a task option
            with pytest.raises(error, match=message):
                await client.submit_batch([("add", (0, 0)), {"task_name": "add", **options}])
        assert client.pending_count == 0


async def test_a_client_holding_max_pending_unfinished_tasks_refuses_more_and_keeps_them() -> None:
    """With no control plane to take them, the client's table stops at max_pending: the
    next call (or a batch that would cross it) raises and queues nothing."""
    from fastworker import PendingLimitError

    client = Client(free_address(), max_pending=3)
    await client.start()
    try:
        ids = [await client.delay("add", i, i) for i in range(2)]
        with pytest.raises(PendingLimitError, match="max_pending=3"):
            await client.submit_batch([("add", (0, 0)), ("add", (1, 1))])
        ids.append(await client.delay("add", 2, 2))
        with pytest.raises(PendingLimitError, match="is the control plane at"):
            await client.delay("add", 3, 3)
        assert client.pending_count == 3
        assert all(client.get_status(i) == TaskStatus.PENDING for i in ids)
    finally:
        client.stop(timeout=0)


async def test_options_at_their_limits_are_accepted() -> None:
    client = Client(free_address())
    await client.start()
    try:
        await client.apply_async(
            "add",
            (1, 2),
            max_retries=100,
            retry_delay=86_400,
            retry_backoff=100,
            retry_backoff_max=0.005,
            time_limit=1e-3,
            eta=LATER,
        )
        assert client.pending_count == 1
    finally:
        client.stop(timeout=0)  # nobody to hand it to


# -- every message under the limit ------------------------------------------------


async def test_a_task_too_large_for_the_control_planes_limit_fails_at_the_call() -> None:
    """The client's own limit is 16 MiB; the control plane's, learned at lookup, is 64 KiB."""
    with trio.fail_after(20):
        async with cluster_and_client([add], max_message_size=64 * 1024) as (_, client):
            assert (await client.submit_task("add", (1, 2))).result == 3  # met the control plane
            with pytest.raises(ValueError, match=r"encodes to \d+ bytes .*65536-byte limit"):
                await client.delay("add", "x" * 70_000, "")
            with pytest.raises(ValueError, match="65536-byte limit"):
                await client.submit_batch([("add", ("x" * 70_000, ""))])
            with pytest.raises(ValueError, match="65536-byte limit"):
                await client.delay_with_callback(
                    "add", "tcp://127.0.0.1:9", 1, 2, callback_data="y" * 70_000
                )
            assert client.pending_count == 0


async def test_before_meeting_the_control_plane_the_clients_own_limit_applies() -> None:
    async with started(free_address(), max_message_size=32 * 1024) as client:
        with pytest.raises(ValueError, match="32768-byte limit"):
            await client.delay("add", "x" * 40_000, "")
        assert client.pending_count == 0


async def test_batches_are_split_by_bytes_callback_data_included() -> None:
    """60 tasks with small arguments and 20 KB of callback data each, under a 64 KiB limit."""
    limit = 64 * 1024
    sizes: list[int] = []
    with trio.fail_after(30):
        async with cluster_and_client([add], max_message_size=limit) as (_, client):
            await client.submit_task("add", (0, 0))  # the client knows the limit
            core = client._core
            send = core._send_gateway

            def measured(message: Any) -> bool:
                if isinstance(message, Submit):
                    sizes.append(len(encode(message)))
                return send(message)

            core._send_gateway = measured  # type: ignore[method-assign]
            ids = await client.submit_batch(
                [
                    {
                        "task_name": "add",
                        "args": (i, 1),
                        "callback_address": "tcp://127.0.0.1:9",
                        "callback_data": "d" * 20_000,
                    }
                    for i in range(60)
                ]
            )
            await client.join(timeout=20)
            results = [client.get_result(task_id) for task_id in ids]

    assert [r.result if r else None for r in results] == [i + 1 for i in range(60)]
    assert len(sizes) >= 20  # three tasks to a message at most
    assert max(sizes) <= limit


# -- cancel_task says True only for a task that will not run ---------------------------


async def test_cancel_of_a_task_the_control_plane_holds_asks_it(gate: HeldGate) -> None:
    """The target was sent, its ack lost, and the re-send found the socket full.

    It is held by the control plane but marked unsent here: a local "cancelled"
    would be a lie (it would run once the worker is free).
    """
    executions: list[str] = []
    tasks = [cases.blocker_task(gate), cases.record_task(executions)]
    with trio.fail_after(20):
        async with cluster_and_client(
            tasks, workers=1, concurrency=1, prefetch=0, client={"ack_timeout": 0.1}
        ) as (_, client):
            await client.delay("blocker")
            await gate.entered()
            await client.stats()  # a round trip: the blocker's ack has come
            core = client._core
            send = core._send_gateway
            submits: list[Submit] = []
            target = ""

            def full_for_resends(message: Any) -> bool:
                # By name: delay() may send before it returns the id.
                if isinstance(message, Submit) and any(w[1] == "record" for w in message.tasks):
                    submits.append(message)
                    if len(submits) > 1:
                        return False  # every re-send finds the socket full
                return send(message)

            core._send_gateway = full_for_resends  # type: ignore[method-assign]
            cases.lose_acks(core, 1)
            target = await client.delay("record", "cancelled")
            await poll(lambda: len(submits) > 1, timeout=5, what="a re-send refused")
            assert core.pending[target].sent is False
            cancelled = await client.cancel_task(target)
            core._send_gateway = send  # type: ignore[method-assign]
            gate.open()
            after = await client.submit_task("record", ("after",))
            await client.join(timeout=10)

    assert cancelled is True
    assert client.get_status(target) is TaskStatus.CANCELLED
    assert after.result == "after"
    assert executions == ["after"]


async def test_cancel_of_a_task_that_finished_says_false() -> None:
    with trio.fail_after(20):
        async with cluster_and_client([add]) as (_, client):
            done = await client.submit_task("add", (1, 2))
            assert await client.cancel_task(done.task_id) is False
            assert client.get_status(done.task_id) is TaskStatus.SUCCESS


# -- a lost push never leaves a task waiting forever --------------------------------------


async def test_a_lost_push_whose_result_left_the_cache_ends_in_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The push is lost, then the cache (room for one) evicts the result before the sweep."""
    monkeypatch.setattr(_core, "_SWEEP_AFTER", 0.3)
    with trio.fail_after(20):
        async with cluster_and_client([add], result_cache_size=1) as (_, client):
            dropped = drop_incoming(client, Results)
            lost = await client.delay("add", 1, 1)
            await poll(lambda: dropped, timeout=5, what="the push dropped")
            other = await client.submit_task("add", (2, 2))  # evicts the first result
            await client.join(timeout=10)  # hung forever before
            result = client.get_result(lost)

    assert other.result == 4
    assert result is not None
    assert result.status is TaskStatus.FAILURE
    assert "no longer in the control plane's cache" in (result.error or "")


async def test_an_acknowledged_task_the_control_plane_never_heard_of_is_submitted_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Submit is lost on the way, yet the client sees an ack for it (as after a lost
    control-plane state): the sweep's "not found" makes it re-submit, and the task runs."""
    monkeypatch.setattr(_core, "_SWEEP_AFTER", 0.3)
    with trio.fail_after(20):
        async with cluster_and_client([add]) as (_, client):
            core = client._core
            send = core._send_gateway
            lost: list[Submit] = []

            def lossy(message: Any) -> bool:
                if isinstance(message, Submit) and not lost:
                    lost.append(message)
                    return True  # "sent", never arrives
                return send(message)

            core._send_gateway = lossy  # type: ignore[method-assign]
            task_id = await client.delay("add", 20, 22)
            await poll(lambda: lost, timeout=5, what="the Submit lost")
            core._on_ack(SubmitAck(lost[0].request_id, []))  # acknowledged all the same
            assert client.get_status(task_id) is TaskStatus.QUEUED
            await client.join(timeout=10)  # hung forever before

    result = client.get_result(task_id)
    assert result is not None
    assert result.result == 42


async def test_sweep_queries_are_split_by_bytes_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """3000 acknowledged tasks (no worker runs them) swept under a 16 KiB limit."""
    monkeypatch.setattr(_core, "_SWEEP_AFTER", 0.2)
    limit = 16 * 1024
    sizes: list[int] = []
    with trio.fail_after(20):
        async with cluster_and_client([add], workers=0, max_message_size=limit) as (_, client):
            await client.stats()  # the client knows the limit
            core = client._core
            send = core._send_gateway

            def measured(message: Any) -> bool:
                if isinstance(message, ResultQuery):
                    sizes.append(len(encode(message)))
                return send(message)

            core._send_gateway = measured  # type: ignore[method-assign]
            await client.submit_batch([("add", (i, 0)) for i in range(3000)])
            await client.flush(timeout=10)
            await poll(lambda: len(sizes) >= 2, timeout=10, what="the sweep's queries")
            core._send_gateway = send  # type: ignore[method-assign]

    assert max(sizes) <= limit


async def test_an_acknowledged_delivery_address_is_passed_through_as_given() -> None:
    """``ack+tcp://`` asks the control plane for acknowledged delivery; the client just checks."""
    client = Client(free_address())
    await client.start()
    try:
        task_id = await client.delay_with_callback(
            "add", 1, 2, callback_address="ack+tcp://127.0.0.1:6000", callback_data="d"
        )
        options = client._core.pending[task_id].wire[5]
        assert options["cb"] == "ack+tcp://127.0.0.1:6000"
    finally:
        client.stop(timeout=0)  # nobody to hand it to


def big(n: int) -> str:
    return "x" * n


async def test_a_result_larger_than_the_clients_own_limit_still_reaches_it() -> None:
    """The client reads up to the control plane's limit: its own governs what it sends.

    Before, a 2 MB result pushed to a client with ``max_message_size=100_000``
    made ZeroMQ drop the connection, and the same push (or the sweep's reply)
    dropped it again every time: that client never got another result.
    """

    with trio.fail_after(30):
        async with (
            Cluster(tasks=[big, add]) as cluster,
            Client(discovery_address=cluster.discovery_address, max_message_size=100_000) as client,
        ):
            large = await client.submit_task("big", args=(2_000_000,), timeout=20)
            small = await client.submit_task("add", args=(5, 5), timeout=20)
    assert large.status.value == "success"
    assert len(large.result) == 2_000_000
    assert small.result == 10


async def test_values_the_wire_would_refuse_later_are_refused_at_the_call() -> None:
    """Found by a hostile review: each returned an id and failed later, or hung."""
    import datetime as dt
    import math

    with pytest.raises(ValueError, match="timeout"):
        Client(timeout=math.nan)
    with pytest.raises(ValueError, match="discovery_address"):
        Client(discovery_address="garbage")
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            with pytest.raises(ValueError, match="countdown"):
                await client.apply_async("add", (1, 2), countdown=1e300)
            far = dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.UTC)
            with pytest.raises(ValueError, match="eta"):
                await client.apply_async("add", (1, 2), eta=far)
            with pytest.raises(ValueError, match="task_name"):
                await client.delay("x" * 600)
            with pytest.raises(TypeError, match="task_id"):
                await client.cancel_task(None)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="task_id"):
                await client.get_task_result(None)  # type: ignore[arg-type]
            assert client.pending_count == 0
