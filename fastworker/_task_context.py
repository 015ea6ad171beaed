"""The id of the task the current code runs for, so log lines can name it.

The worker sets it around every run: in the task's thread, trio task or
asyncio task, each of which has a context of its own, so concurrent runs
never see each other's id.  ``--log-format json`` reads it for records that
do not name a task themselves, and so a user's own ``logging`` calls inside
a task carry its ``task_id``.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = ["CURRENT_TASK_ID"]

CURRENT_TASK_ID: ContextVar[str | None] = ContextVar("fastworker_task_id", default=None)
