"""Schedules and dead letters in the journal: one state key per schedule and per letter.

With ``--journal`` the Scheduler's two socket-free stores survive a crash
(design/durability.md, "Schedules and dead letters").  Each schedule is the
document ``schedule/<schedule id>`` and each dead letter ``dead/<task id>``
in the journal's ``state`` table, written by ``save`` after every message
that changed them — in the group commit of that message's tasks and results —
and deleted when the store lets them go: a schedule removed or spent, a
letter retried or evicted past the store's bounds.  So what a commit writes
follows what changed (one tick: one schedule's document), never the size of
the stores, and the file holds at most what the stores hold.

``restore`` builds both stores from the documents read at start and names
the keys they did not take back (unreadable, or past bounds lowered since):
the Scheduler deletes those, so the file keeps nothing the stores dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ._deadletters import DeadLetters, DeadLettersConfig
from ._schedules import Schedules, SchedulesConfig
from .journal import JournalQueue

__all__ = ["DEAD_KEY", "SCHEDULE_KEY", "Restored", "restore", "save"]

SCHEDULE_KEY = "schedule/"
DEAD_KEY = "dead/"


@attrs.frozen
class Restored:
    schedules: Schedules
    dead_letters: DeadLetters
    stale: list[str]  # keys read that the stores did not take back


def restore(
    state: dict[str, Any],
    schedules_config: SchedulesConfig,
    dead_config: DeadLettersConfig,
    *,
    wall_clock: Callable[[], float],
) -> Restored:
    """Both stores as the journal left them, each watching its changes from now on.

    Keys of other prefixes belong to other keepers and are left alone.
    """
    scheduled = {k: v for k, v in state.items() if k.startswith(SCHEDULE_KEY)}
    dead = {k: v for k, v in state.items() if k.startswith(DEAD_KEY)}
    schedules = Schedules.from_states(scheduled.values(), schedules_config, wall_clock=wall_clock)
    letters = DeadLetters.from_states(dead.values(), dead_config)
    stale = [k for k in scheduled if k[len(SCHEDULE_KEY) :] not in schedules]
    stale += [k for k in dead if k[len(DEAD_KEY) :] not in letters]
    schedules.watch()
    letters.watch()
    return Restored(schedules, letters, stale)


def save(queue: JournalQueue, schedules: Schedules, dead_letters: DeadLetters) -> None:
    """Queue what changed in either store since the last call for the next commit."""
    for schedule_id, document in schedules.take_changes():
        queue.put_state(SCHEDULE_KEY + schedule_id, document)
    for task_id, document in dead_letters.take_changes():
        queue.put_state(DEAD_KEY + task_id, document)
