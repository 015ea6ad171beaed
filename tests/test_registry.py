"""Tests for fastworker.tasks.registry: @task, runner detection, duplicates, registry_from."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.lowlevel

import examples.tasks  # registers the example tasks once, before any test snapshots
import fastworker
from fastworker.tasks.registry import (
    DuplicateTaskError,
    TaskDefinition,
    TaskRegistry,
    default_registry,
    registry_from,
    task,
)

pytestmark = pytest.mark.timeout(10)

EXAMPLE_TASKS = ["add", "fails_once_then_works", "fetch_greeting", "process_data", "slow_double"]


@pytest.fixture(autouse=True)
def isolated_default_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests register into a copy of the process-wide registry; the original comes back after."""
    before = dict(default_registry._by_name)
    monkeypatch.setattr(default_registry, "_by_name", dict(before))
    yield
    monkeypatch.undo()
    assert default_registry._by_name == before


def _never_decorated(x: int) -> int:
    """Left undecorated: @task marks the function object itself, which no fixture undoes."""
    return x + 1


def _sync(x: int) -> int:
    return x


# -- @task ---------------------------------------------------------------------------


def test_bare_decorator_registers_under_the_function_name_and_keeps_it_callable() -> None:
    @task
    def bare_reg_double(x: int) -> int:
        return 2 * x

    assert bare_reg_double(21) == 42
    definition = default_registry.get("bare_reg_double")
    assert definition is not None
    assert definition.fn is bare_reg_double
    assert (definition.runner, definition.max_retries, definition.timeout) == ("thread", 0, None)
    assert TaskDefinition.for_function(bare_reg_double) is definition
    assert "bare_reg_double" in default_registry


def test_decorator_with_options() -> None:
    @task(name="reg.options", max_retries=3, retry_delay=0.25, timeout=4.5)
    def with_options(a: int, b: int = 1) -> int:
        return a - b

    assert with_options(5, b=2) == 3
    definition = default_registry.get("reg.options")
    assert definition is not None
    assert definition.name == "reg.options"
    assert (definition.max_retries, definition.retry_delay, definition.timeout) == (3, 0.25, 4.5)
    assert default_registry.get("with_options") is None


def test_task_is_exported_from_the_package() -> None:
    assert fastworker.task is task
    assert fastworker.DuplicateTaskError is DuplicateTaskError


async def test_async_task_stays_awaitable() -> None:
    @task(name="reg.awaitable")
    async def awaitable(x: int) -> int:
        await trio.lowlevel.checkpoint()
        return x * 3

    assert await awaitable(2) == 6


@pytest.mark.parametrize(
    "options",
    [{"max_retries": -1}, {"retry_delay": -0.5}, {"timeout": -1}, {"retry_backoff_max": -1}],
    ids=repr,
)
def test_negative_policies_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        task(name="reg.negative", **options)(_sync)
    assert "reg.negative" not in default_registry


# -- duplicates -------------------------------------------------------------------------


def test_two_functions_under_one_name_raise_naming_both() -> None:
    @task(name="reg.clash")
    def first() -> None:
        pass

    with pytest.raises(DuplicateTaskError) as info:

        @task(name="reg.clash")
        def second() -> None:
            pass

    message = str(info.value)
    assert "'reg.clash'" in message
    assert (
        f"{__name__}.test_two_functions_under_one_name_raise_naming_both.<locals>.first" in message
    )
    assert (
        f"{__name__}.test_two_functions_under_one_name_raise_naming_both.<locals>.second" in message
    )
    assert isinstance(info.value, ValueError)
    definition = default_registry.get("reg.clash")
    assert definition is not None
    assert definition.fn is first  # the first registration stands


def test_registering_the_same_function_again_is_allowed() -> None:
    def again() -> None:
        pass

    task(name="reg.again")(again)
    task(name="reg.again", max_retries=2)(again)
    definition = default_registry.get("reg.again")
    assert definition is not None
    assert definition.max_retries == 2  # the newest registration wins


def test_same_module_and_qualname_counts_as_the_same_function() -> None:
    # What happens when a module is imported twice (once as __main__, say).
    made = []
    for _ in range(2):

        @task(name="reg.reimported")
        def reimported() -> int:
            return 1

        made.append(reimported)
    definition = default_registry.get("reg.reimported")
    assert definition is not None
    assert definition.fn is made[-1]


def test_a_registry_of_its_own_detects_duplicates_too() -> None:
    def one() -> None:
        pass

    def two() -> None:
        pass

    registry = TaskRegistry([TaskDefinition(name="x", fn=one, runner="thread")])
    with pytest.raises(DuplicateTaskError, match=r"\.one and by .*\.two"):
        registry.add(TaskDefinition(name="x", fn=two, runner="thread"))
    assert len(registry) == 1
    assert registry.names() == ["x"]


# -- runner detection ----------------------------------------------------------------


def test_sync_function_runs_in_a_thread() -> None:
    @task(name="reg.sync")
    def sync() -> int:
        return 1

    assert TaskDefinition.for_function(sync).runner == "thread"


def test_async_function_using_trio_runs_on_trio() -> None:
    @task(name="reg.trio")
    async def uses_trio() -> None:
        await trio.sleep(0.001)

    assert TaskDefinition.for_function(uses_trio).runner == "trio"


def test_async_function_using_asyncio_runs_on_asyncio() -> None:
    @task(name="reg.asyncio")
    async def uses_asyncio() -> None:
        await asyncio.sleep(0)

    assert TaskDefinition.for_function(uses_asyncio).runner == "asyncio"


def test_trio_used_only_in_a_nested_function_still_counts() -> None:
    @task(name="reg.trio_nested")
    async def nested() -> None:
        async def inner() -> None:
            await trio.sleep(0.001)

        await inner()

    assert TaskDefinition.for_function(nested).runner == "trio"


@pytest.mark.parametrize(("which", "expected"), [("neither", "asyncio"), ("both", "asyncio")])
def test_ambiguous_coroutines_default_to_asyncio(which: str, expected: str) -> None:
    async def neither() -> int:
        return 1

    async def both() -> None:
        await trio.sleep(0.001)
        await asyncio.sleep(0)

    fn = neither if which == "neither" else both
    task(name=f"reg.ambiguous.{which}")(fn)
    assert TaskDefinition.for_function(fn).runner == expected


@pytest.mark.parametrize(("loop", "uses"), [("asyncio", "trio"), ("trio", "asyncio")])
def test_explicit_loop_wins(loop: str, uses: str) -> None:
    async def on_trio() -> None:
        await trio.sleep(0.001)

    async def on_asyncio() -> None:
        await asyncio.sleep(0)

    fn = on_trio if uses == "trio" else on_asyncio
    task(name=f"reg.explicit.{loop}", loop=loop)(fn)
    definition = default_registry.get(f"reg.explicit.{loop}")
    assert definition is not None
    assert definition.runner == loop


def test_loop_on_a_sync_function_is_an_error() -> None:
    with pytest.raises(ValueError, match="only to async def") as info:
        task(name="reg.sync_loop", loop="trio")(_sync)
    assert f"{__name__}._sync" in str(info.value)
    assert "reg.sync_loop" not in default_registry
    assert not hasattr(_sync, "__fastworker_task__")  # a refused function is left unmarked


def test_unknown_loop_is_an_error() -> None:
    async def coro() -> None:
        pass

    with pytest.raises(ValueError, match="'trio' or 'asyncio'"):
        task(name="reg.bad_loop", loop="curio")(coro)


# -- registry_from -----------------------------------------------------------------------


def test_registry_from_functions() -> None:
    @task(name="reg.from.decorated", max_retries=4)
    def decorated() -> None:
        pass

    def plain() -> None:
        pass

    registry = registry_from(tasks=[decorated, plain])
    assert registry.names() == ["plain", "reg.from.decorated"]
    assert registry.get("reg.from.decorated") is TaskDefinition.for_function(decorated)
    plain_definition = registry.get("plain")
    assert plain_definition is not None
    assert (plain_definition.fn, plain_definition.runner) == (plain, "thread")
    assert "plain" not in default_registry  # registry_from does not register globally


def test_registry_from_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="callables"):
        registry_from(tasks=[42])  # type: ignore[list-item]


def test_registry_from_example_module_serves_exactly_its_tasks() -> None:
    @task(name="reg.from.elsewhere")
    def elsewhere() -> None:
        pass

    registry = registry_from(task_modules=["examples.tasks"])
    assert registry.names() == EXAMPLE_TASKS
    runners = {d.name: d.runner for d in registry}
    assert runners == {
        "add": "thread",
        "process_data": "thread",
        "fetch_greeting": "asyncio",
        "slow_double": "trio",
        "fails_once_then_works": "thread",
    }
    retrying = registry.get("fails_once_then_works")
    assert retrying is not None
    assert (retrying.max_retries, retrying.retry_delay) == (2, 0.1)
    add = registry.get("add")
    assert add is not None
    assert add.fn is examples.tasks.add
    assert add.fn(2, 3) == 5


def test_registry_from_modules_and_functions_together() -> None:
    registry = registry_from(task_modules=["examples.tasks"], tasks=[_never_decorated])
    assert registry.names() == sorted([*EXAMPLE_TASKS, "_never_decorated"])


def test_registry_from_an_unknown_module_raises_import_error() -> None:
    with pytest.raises(ImportError):
        registry_from(task_modules=["examples.no_such_module"])
