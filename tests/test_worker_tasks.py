"""What a task's own behaviour turns into: results, failures, and a worker that keeps going.

Plain functions run in the worker's threads, ``async def`` tasks on asyncio
(the default) or on trio (code that uses trio).  Whatever a task does (raise,
take the wrong arguments, return something the format cannot hold, call
``sys.exit``) comes back as a FAILURE that says what happened, and the same
worker runs the next task.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import trio

from fastworker import Client, Cluster, TaskStatus

pytestmark = pytest.mark.timeout(30)


def add(a: int, b: int) -> int:
    return a + b


def explode(n: int) -> None:
    raise ValueError(f"bad input {n}")


async def explode_on_asyncio(n: int) -> None:
    await asyncio.sleep(0)
    raise ValueError(f"bad input {n}")


async def explode_on_trio(n: int) -> None:
    await trio.lowlevel.checkpoint()
    raise ValueError(f"bad input {n}")


async def greet_on_asyncio(name: str) -> str:
    await asyncio.sleep(0.01)
    asyncio.get_running_loop()  # raises unless this really runs on asyncio
    return f"hello, {name}"


async def double_on_trio(x: int) -> int:
    await trio.sleep(0.01)
    return 2 * x


def a_set() -> set[int]:
    return {1, 2}


def an_object() -> object:
    return object()


def leave() -> None:
    sys.exit(3)


TASKS = [
    add,
    explode,
    explode_on_asyncio,
    explode_on_trio,
    greet_on_asyncio,
    double_on_trio,
    a_set,
    an_object,
    leave,
]


async def test_an_unknown_task_fails_naming_it() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            result = await client.submit_task("no_such_task", args=(1,), timeout=5)
            after = await client.submit_task("add", args=(2, 3), timeout=5)
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert "unknown task" in result.error
    assert "'no_such_task'" in result.error
    assert after.result == 5


@pytest.mark.parametrize("name", ["explode", "explode_on_asyncio", "explode_on_trio"])
async def test_a_raising_task_fails_with_its_exception_and_the_worker_goes_on(name: str) -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            failed = await client.submit_task(name, args=(7,), timeout=5)
            after = await client.submit_task("add", args=(2, 3), timeout=5)
            stats = await client.stats()
            worker = cluster.workers[0]

    assert failed.status is TaskStatus.FAILURE
    assert failed.error == "ValueError: bad input 7"
    assert failed.result is None
    assert failed.traceback is not None
    assert "Traceback (most recent call last)" in failed.traceback
    assert name in failed.traceback  # the task's own frame
    assert "ValueError: bad input 7" in failed.traceback
    assert failed.completed_at is not None

    assert (after.status, after.result) == (TaskStatus.SUCCESS, 5)
    assert (stats["scheduler"]["failed"], stats["scheduler"]["succeeded"]) == (1, 1)
    assert stats["discovery"]["workers_alive"] == 1
    assert worker.statistics().restarts == 0


async def test_asyncio_and_trio_tasks_both_succeed() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            greeting = await client.submit_task("greet_on_asyncio", args=("ada",), timeout=5)
            doubled = await client.submit_task("double_on_trio", args=(21,), timeout=5)
            # And many of each at once, interleaved.
            ids = []
            for i in range(20):
                ids.append(await client.delay("greet_on_asyncio", str(i)))
                ids.append(await client.delay("double_on_trio", i))
            await client.join(timeout=5)
            many = [client.get_result(task_id) for task_id in ids]

    assert (greeting.status, greeting.result) == (TaskStatus.SUCCESS, "hello, ada")
    assert (doubled.status, doubled.result) == (TaskStatus.SUCCESS, 42)
    expected = [value for i in range(20) for value in (f"hello, {i}", 2 * i)]
    assert [r.result for r in many if r is not None and r.ok] == expected


async def test_the_example_tasks_module_serves_all_three_kinds() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(task_modules=["examples.tasks"]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            added = await client.submit_task("add", args=(1, 2), timeout=5)
            greeted = await client.submit_task("fetch_greeting", args=("bob",), timeout=5)
            doubled = await client.submit_task("slow_double", args=(4,), timeout=5)
    assert [added.result, greeted.result, doubled.result] == [3, "hello, bob", 8]


@pytest.mark.parametrize(
    ("fmt", "name"), [("json", "a_set"), ("cbor", "an_object")], ids=["json-set", "cbor-object"]
)
async def test_a_result_the_format_cannot_hold_fails_saying_so(fmt: str, name: str) -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address, serialization_format=fmt) as c,
        ):
            result = await c.submit_task(name, timeout=5)
            after = await c.submit_task("add", args=(2, 3), timeout=5)
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert result.error.startswith("result could not be encoded")
    expected_type = "set" if name == "a_set" else "object"
    assert f"type {expected_type} is not" in result.error
    assert after.result == 5


@pytest.mark.parametrize(
    ("name", "args"),
    [("add", (1, 2, 3)), ("greet_on_asyncio", ()), ("double_on_trio", (1, 2))],
    ids=["thread", "asyncio", "trio"],
)
async def test_wrong_arguments_fail_with_a_type_error_not_a_crash(
    name: str, args: tuple[int, ...]
) -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS, workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            result = await client.submit_task(name, args=args, timeout=5)
            after = await client.submit_task("add", args=(2, 3), timeout=5)
            worker = cluster.workers[0]
    assert result.status is TaskStatus.FAILURE
    assert result.error is not None
    assert result.error.startswith("TypeError: ")
    assert name in result.error  # Python names the function it could not call
    assert after.result == 5
    assert worker.statistics().restarts == 0


async def test_a_task_calling_sys_exit_fails_and_the_worker_goes_on() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=TASKS, workers=1, concurrency=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            result = await client.submit_task("leave", timeout=5)
            # concurrency=1: the one task thread that ran sys.exit runs this too.
            after = await client.submit_task("add", args=(2, 3), timeout=5)
    assert result.status is TaskStatus.FAILURE
    assert result.error == "SystemExit: 3"
    assert after.result == 5
