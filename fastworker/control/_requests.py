"""Answers to the Client's schedule and dead-letter requests (protocol tags 61-69).

Socket-free: the Scheduler actor calls ``answer`` with the stores it owns
and sends the reply it returns.  Every list reply is cut to fit one message
(``total`` tells the client how many there are), and every refusal is a
reply that says why, never an exception in the Scheduler's loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import cbor2

from ..wire import (
    DeadLetterQuery,
    DeadLetterReply,
    DeadLetterRetry,
    DeadLetterRetryReply,
    Message,
    ScheduleAdd,
    ScheduleList,
    ScheduleListReply,
    ScheduleRemove,
    ScheduleReply,
)
from ._deadletters import DeadLetters
from ._schedules import Schedules, ScheduleSpec
from ._taskbook import TaskBook

__all__ = ["MAX_DEAD_LETTER_QUERY", "answer"]

MAX_DEAD_LETTER_QUERY = 10_000  # letters one DeadLetterQuery may ask for


def _fit(items: Iterable[Any], budget: int) -> list[Any]:
    """The leading items whose encoding fits ``budget`` bytes together."""
    out = []
    room = budget
    for item in items:
        room -= len(cbor2.dumps(item))
        if room < 0:
            break
        out.append(item)
    return out


def answer(
    identity: bytes,
    message: Message,
    *,
    book: TaskBook,
    schedules: Schedules,
    dead: DeadLetters,
    budget: int,
) -> Message:
    """The reply to one request; retried dead letters go to ``book`` under ``identity``."""
    if isinstance(message, ScheduleAdd):
        try:
            spec = ScheduleSpec.from_wire(message.schedule, "client")
        except (ValueError, TypeError) as exc:
            schedules.stats["refused"] += 1
            return ScheduleReply(message.request_id, False, str(exc))
        refusal = schedules.add(spec)
        return ScheduleReply(message.request_id, refusal is None, refusal or "")
    if isinstance(message, ScheduleRemove):
        removed = schedules.remove(message.schedule_id)
        text = "" if removed else f"no schedule {message.schedule_id!r}"
        return ScheduleReply(message.request_id, removed, text)
    if isinstance(message, ScheduleList):
        return ScheduleListReply(
            message.request_id, _fit(schedules.listing(), budget), len(schedules)
        )
    if isinstance(message, DeadLetterQuery):
        limit = max(0, min(message.limit, MAX_DEAD_LETTER_QUERY))
        letters = [letter.to_wire() for letter in dead.newest(limit)]
        return DeadLetterReply(message.request_id, _fit(letters, budget), len(dead))
    if isinstance(message, DeadLetterRetry):
        letter = dead.take(message.task_id)
        if letter is None:
            return DeadLetterRetryReply(
                message.request_id, False, f"no dead letter for task {message.task_id!r}", None
            )
        verdict = book.revive(identity, letter.envelope)
        if verdict is not None:
            dead.put_back(letter)
            return DeadLetterRetryReply(message.request_id, False, verdict[1], None)
        dead.stats["retried"] += 1
        return DeadLetterRetryReply(message.request_id, True, "", list(letter.envelope))
    raise TypeError(f"{type(message).__name__} is not a schedule or dead-letter request")
