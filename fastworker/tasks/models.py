"""The records users see: priorities, statuses, tasks and their results.

These are the types the documented API hands out (``from fastworker.tasks.models
import TaskPriority``).  They are plain attrs records: the wire codec in
``fastworker.wire`` maps them to and from bytes, they never do it themselves.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import attrs

__all__ = [
    "CallbackInfo",
    "DeadLetter",
    "ScheduleInfo",
    "Task",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
]


class TaskPriority(enum.StrEnum):
    """Strict dispatch order: every CRITICAL task goes before any HIGH one, and so on."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def _missing_(cls, value: object) -> TaskPriority | None:
        # Accept "HIGH" as well as "high": people type both.
        if isinstance(value, str):
            lowered = value.lower()
            for member in cls:
                if member.value == lowered:
                    return member
        return None

    @classmethod
    def coerce(cls, value: TaskPriority | str) -> TaskPriority:
        """The priority for an enum member or its name, with an error listing the valid ones."""
        if isinstance(value, TaskPriority):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"unknown priority {value!r}; expected one of {valid}") from None

    @property
    def rank(self) -> int:
        """0 for CRITICAL up to 3 for LOW: the number carried on the wire."""
        return _RANKS[self]

    @classmethod
    def from_rank(cls, rank: int) -> TaskPriority:
        return _BY_RANK[rank]


_BY_RANK = (TaskPriority.CRITICAL, TaskPriority.HIGH, TaskPriority.NORMAL, TaskPriority.LOW)
_RANKS = {p: i for i, p in enumerate(_BY_RANK)}


class TaskStatus(enum.StrEnum):
    """Where a task is in its life; ``.value`` is the lowercase name used on the wire."""

    PENDING = "pending"  # known to the client, not yet acknowledged by the control plane
    SCHEDULED = "scheduled"  # accepted, held until its countdown/eta
    QUEUED = "queued"  # accepted, waiting for a worker
    RUNNING = "running"  # handed to a worker
    RETRYING = "retrying"  # failed, waiting for its next attempt
    SUCCESS = "success"
    FAILURE = "failure"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in _FINAL


_FINAL = frozenset({TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED})


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"timestamps must be timezone-aware, got naive {value!r}")
    return value


def _check_aware(_inst: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    _aware(value)


def _non_empty(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _priority(value: TaskPriority | str) -> TaskPriority:
    return TaskPriority.coerce(value)


@attrs.frozen
class CallbackInfo:
    """Where to send the completion notice of a task, and what to echo back in it."""

    address: str = attrs.field(validator=_non_empty)
    data: Any = None

    def __attrs_post_init__(self) -> None:
        if "://" not in self.address:
            raise ValueError(
                f"callback address {self.address!r} is not a ZeroMQ endpoint "
                "(expected e.g. 'tcp://127.0.0.1:6000')"
            )


@attrs.frozen
class Task:
    """A task as a worker runs it: the name of the function and its decoded arguments."""

    task_id: str = attrs.field(validator=_non_empty)
    name: str = attrs.field(validator=_non_empty)
    args: tuple[Any, ...] = attrs.field(default=(), converter=tuple)
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    priority: TaskPriority = attrs.field(default=TaskPriority.NORMAL, converter=_priority)
    callback: CallbackInfo | None = None
    timeout: float | None = None
    attempt: int = 1


@attrs.frozen
class TaskResult:
    """The outcome of one task, as the control plane and the client report it.

    ``result`` holds the return value on SUCCESS; ``error`` a one-line
    ``"ExceptionType: message"`` on FAILURE, with the worker's traceback text in
    ``traceback``.  Timestamps are timezone-aware (UTC).
    """

    task_id: str = attrs.field(validator=_non_empty)
    status: TaskStatus = attrs.field(converter=TaskStatus)
    result: Any = None
    error: str | None = None
    started_at: dt.datetime | None = attrs.field(default=None, validator=_check_aware)
    completed_at: dt.datetime | None = attrs.field(default=None, validator=_check_aware)
    task_name: str | None = None
    attempts: int = 0
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is TaskStatus.SUCCESS


@attrs.frozen
class ScheduleInfo:
    """A periodic task as the control plane holds it (``Client.schedules()``).

    ``args``/``kwargs`` are None when this client cannot decode them (a format
    it does not accept).  ``source`` is "declared" for a ``@task(cron=...)``
    schedule (its id is the task's name) and "client" for ``Client.schedule``.
    """

    schedule_id: str
    task_name: str
    cron: str | None
    repeat_interval: float | None
    timezone: str | None
    priority: TaskPriority
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None
    next_run: dt.datetime | None
    last_run: dt.datetime | None
    source: str


@attrs.frozen
class DeadLetter:
    """A task that failed for good, kept by the control plane (``Client.dead_letters()``).

    ``reason``: "retries_exhausted" (its last run failed), "poison" (its runs
    killed workers, ``--max-worker-deaths``), "undecodable" (the worker could
    not decode its arguments), "unknown_task" (no worker serves its name) or
    "too_large" (it could not be sent).  ``error`` is its last error.
    """

    task_id: str
    task_name: str
    args: tuple[Any, ...] | None
    kwargs: dict[str, Any] | None
    priority: TaskPriority
    reason: str
    error: str
    attempts: int
    failed_at: dt.datetime
