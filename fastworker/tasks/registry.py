"""``@task``: naming functions so workers can run them by name.

A worker serves exactly the names in its registry.  Registration happens at
import time, so two functions claiming one name is an import-time error that
names both, not a mystery at run time.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar, overload

import attrs

from .options import check_task_options
from .schedule import ScheduleRule, check_schedule

__all__ = [
    "DuplicateTaskError",
    "TaskDefinition",
    "TaskRegistry",
    "default_registry",
    "registry_from",
    "task",
]

F = TypeVar("F", bound=Callable[..., Any])
Runner = Literal["thread", "trio", "asyncio"]

_ATTRIBUTE = "__fastworker_task__"
_MAX_SCHEDULE_ID_LENGTH = 200  # the protocol's limit (design/protocol.md, §4.3)


class DuplicateTaskError(ValueError):
    """Two different functions were registered under one task name."""


def _describe(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _mentions(code: types.CodeType, name: str) -> bool:
    if name in code.co_names:
        return True
    return any(isinstance(c, types.CodeType) and _mentions(c, name) for c in code.co_consts)


def _choose_runner(fn: Callable[..., Any], loop: str | None) -> Runner:
    """Sync functions go to threads; coroutines to trio or asyncio.

    An ``async def`` cannot tell us which event loop it was written for, so
    ``loop=`` says it; without it, a coroutine whose code refers to ``trio``
    and not ``asyncio`` runs on trio and every other one on asyncio (what
    FastAPI users write).  See design/architecture.md, "Running tasks".
    """
    if not inspect.iscoroutinefunction(fn):
        if loop is not None:
            raise ValueError(f"loop={loop!r} applies only to async def tasks ({_describe(fn)})")
        return "thread"
    if loop in ("trio", "asyncio"):
        return loop  # type: ignore[return-value]
    if loop is not None:
        raise ValueError(f"loop must be 'trio' or 'asyncio', got {loop!r}")
    code = fn.__code__
    if _mentions(code, "trio") and not _mentions(code, "asyncio"):
        return "trio"
    return "asyncio"


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class TaskDefinition:
    """A registered task: the function, how it runs, and its default policies."""

    name: str
    fn: Callable[..., Any] = attrs.field(eq=False)
    runner: Runner
    max_retries: int = attrs.field(default=0, validator=_non_negative)
    retry_delay: float = attrs.field(default=1.0, validator=_non_negative)
    retry_backoff: float = attrs.field(default=2.0, validator=_non_negative)
    retry_backoff_max: float = attrs.field(default=300.0, validator=_non_negative)
    timeout: float | None = attrs.field(default=None, validator=_non_negative)
    # Run periodically with no arguments: the control plane keeps the schedule
    # (its id is the task's name), whichever workers declare it.
    schedule: ScheduleRule | None = None

    @classmethod
    def for_function(cls, fn: Callable[..., Any]) -> TaskDefinition:
        """The definition ``@task`` attached to ``fn``, or defaults for a plain function."""
        found = getattr(fn, _ATTRIBUTE, None)
        if isinstance(found, TaskDefinition):
            return found
        if not callable(fn):
            raise TypeError(f"tasks must be callables, got {fn!r}")
        return cls(name=fn.__name__, fn=fn, runner=_choose_runner(fn, None))


class TaskRegistry:
    """Task definitions by name."""

    def __init__(self, definitions: Iterable[TaskDefinition] = ()) -> None:
        self._by_name: dict[str, TaskDefinition] = {}
        for definition in definitions:
            self.add(definition)

    def add(self, definition: TaskDefinition) -> None:
        existing = self._by_name.get(definition.name)
        if existing is not None and _describe(existing.fn) != _describe(definition.fn):
            raise DuplicateTaskError(
                f"task name {definition.name!r} is registered twice: by "
                f"{_describe(existing.fn)} and by {_describe(definition.fn)}"
            )
        # Same function again (a module imported twice, e.g. as __main__): keep the newest.
        self._by_name[definition.name] = definition

    def get(self, name: str) -> TaskDefinition | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)


default_registry = TaskRegistry()


@overload
def task(fn: F, /) -> F: ...
@overload
def task(
    *,
    name: str | None = None,
    max_retries: int = 0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_backoff_max: float = 300.0,
    timeout: float | None = None,
    loop: str | None = None,
    repeat_interval: float | None = None,
    cron: str | None = None,
    timezone: str | None = None,
) -> Callable[[F], F]: ...
def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    max_retries: int = 0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_backoff_max: float = 300.0,
    timeout: float | None = None,
    loop: str | None = None,
    repeat_interval: float | None = None,
    cron: str | None = None,
    timezone: str | None = None,
) -> Any:
    """Register a function as a task; it stays callable as a plain function.

    ``max_retries``/``retry_delay``/``retry_backoff``/``retry_backoff_max``:
    a failed run is retried after ``retry_delay * retry_backoff ** (n - 1)``
    seconds (capped at ``retry_backoff_max``); the limits are in
    ``fastworker.tasks.options`` and a value outside them raises ValueError
    (TypeError for a non-number) here.  ``timeout``: seconds a run may
    take.  ``loop``: "trio" or "asyncio" for ``async def`` tasks (see
    ``_choose_runner`` for the default).

    ``repeat_interval`` (seconds) or ``cron`` (with ``timezone``, an IANA
    name; UTC by default) make it periodic: the control plane runs it with
    no arguments once per tick, however many workers serve it (see
    design/schedules.md).  A bad expression raises ValueError here.
    """

    check_task_options(
        max_retries=max_retries,
        retry_delay=retry_delay,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        timeout=timeout,
    )
    rule = None
    if cron is not None or repeat_interval is not None or timezone is not None:
        rule = check_schedule(cron, repeat_interval, timezone)

    def register(func: F) -> F:
        if rule is not None and len(name or func.__name__) > _MAX_SCHEDULE_ID_LENGTH:
            raise ValueError(
                f"a periodic task's name is its schedule's id: at most "
                f"{_MAX_SCHEDULE_ID_LENGTH} characters, got {len(name or func.__name__)}"
            )
        definition = TaskDefinition(
            name=name or func.__name__,
            fn=func,
            runner=_choose_runner(func, loop),
            max_retries=max_retries,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            timeout=timeout,
            schedule=rule,
        )
        default_registry.add(definition)
        setattr(func, _ATTRIBUTE, definition)
        return func

    if fn is not None:
        return register(fn)
    return register


def registry_from(
    task_modules: Iterable[str] = (), tasks: Iterable[Callable[..., Any]] = ()
) -> TaskRegistry:
    """A registry of the ``@task`` functions of ``task_modules`` plus ``tasks``.

    Importing a module registers its tasks in ``default_registry``; we take the
    ones whose function lives in one of those modules, so a worker serves what
    it was asked to serve and not every task the process happens to import.
    """
    registry = TaskRegistry()
    modules = [importlib.import_module(m) for m in task_modules]
    module_names = {m.__name__ for m in modules}
    for definition in default_registry:
        if definition.fn.__module__ in module_names:
            registry.add(definition)
    for fn in tasks:
        registry.add(TaskDefinition.for_function(fn))
    return registry
