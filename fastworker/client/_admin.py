"""The Client's side of schedules and dead letters: checks before sending, records after.

What a caller passes is checked here, in the caller's thread, with the
rule the control plane applies again (``tasks/schedule.py``); what comes
back is turned into the public records ``ScheduleInfo`` and ``DeadLetter``,
an entry of the wrong shape skipped with a warning rather than raised.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..tasks.models import DeadLetter, ScheduleInfo, TaskPriority
from ..tasks.schedule import check_schedule, rule_fields
from ..tasks.serializer import SerializationFormat, dumps, loads
from ..wire import from_epoch

__all__ = ["MAX_SCHEDULE_ID_LENGTH", "dead_letter", "schedule_info", "schedule_wire"]

MAX_SCHEDULE_ID_LENGTH = 200  # the control plane's limit (control/_schedules.py)
_MAX_NAME_LENGTH = 512
log = logging.getLogger("fastworker.client")


def schedule_wire(
    schedule_id: str,
    task_name: str,
    *,
    cron: object,
    repeat_interval: object,
    timezone: object,
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None,
    priority: TaskPriority | str,
    fmt: SerializationFormat,
) -> list[Any]:
    """A checked ScheduleWire; ValueError or TypeError naming what is wrong."""
    if not isinstance(schedule_id, str) or not 0 < len(schedule_id) <= MAX_SCHEDULE_ID_LENGTH:
        raise ValueError(
            f"schedule_id must be a string of 1 to {MAX_SCHEDULE_ID_LENGTH} characters, "
            f"got {schedule_id!r:.60}"
        )
    if not isinstance(task_name, str) or not 0 < len(task_name) <= _MAX_NAME_LENGTH:
        raise ValueError(f"task_name must be a string of 1 to {_MAX_NAME_LENGTH} characters")
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise TypeError(f"args must be a list or tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    if not isinstance(priority, str):
        raise TypeError(f"priority must be a TaskPriority or its name, not {type(priority)}")
    rank = TaskPriority.coerce(priority).rank
    rule = check_schedule(cron, repeat_interval, timezone)
    payload = dumps(fmt, [list(args), dict(kwargs or {})])
    return [schedule_id, task_name, *rule_fields(rule), rank, fmt.code, payload]


def _arguments(
    fmt: Any, payload: Any, allow_pickle: bool
) -> tuple[tuple[Any, ...] | None, dict[str, Any] | None]:
    """The decoded ``[args, kwargs]``, or (None, None) when this client cannot read them."""
    try:
        decoded = loads(SerializationFormat.from_code(fmt), payload, allow_pickle=allow_pickle)
        args, kwargs = decoded
        return tuple(args), dict(kwargs)
    except Exception:  # any payload a client cannot read (format, pickle refused, shape)
        return None, None


def schedule_info(raw: Any, allow_pickle: bool) -> ScheduleInfo | None:
    try:
        wire, next_run, last_run, source = raw
        schedule_id, name, cron, interval, timezone, priority, fmt, payload = wire
        args, kwargs = _arguments(fmt, payload, allow_pickle)
        return ScheduleInfo(
            schedule_id=schedule_id,
            task_name=name,
            cron=cron,
            repeat_interval=interval,
            timezone=timezone,
            priority=TaskPriority.from_rank(priority),
            args=args,
            kwargs=kwargs,
            next_run=from_epoch(next_run),
            last_run=from_epoch(last_run),
            source=source,
        )
    except (ValueError, TypeError, IndexError, OverflowError, OSError):
        log.warning("client ignored an invalid schedule from the control plane")
        return None


def dead_letter(raw: Any, allow_pickle: bool) -> DeadLetter | None:
    try:
        task_id, name, priority, fmt, payload, reason, error, attempts, failed_at = raw
        args, kwargs = _arguments(fmt, payload, allow_pickle)
        failed = from_epoch(failed_at)
        if failed is None:
            raise TypeError("a dead letter needs its failure time")
        return DeadLetter(
            task_id=task_id,
            task_name=name,
            args=args,
            kwargs=kwargs,
            priority=TaskPriority.from_rank(priority),
            reason=reason,
            error=error,
            attempts=attempts,
            failed_at=failed,
        )
    except (ValueError, TypeError, IndexError, OverflowError, OSError):
        log.warning("client ignored an invalid dead letter from the control plane")
        return None
