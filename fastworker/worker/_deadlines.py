"""Every time limit of a worker in one heap, served by one trio task.

Why not a watcher task per run: a watcher sleeping until ``start + limit``
outlives a task that finished long before, holding the run and its
arguments (a thousand tasks a second with an hour's limit is millions of
sleeping watchers).  Here a run arms one entry; when the run ends the entry
is disarmed at once (it drops its reference to the run) and the dead entry
itself is pruned once dead ones outnumber live ones.  One task sleeps until
the earliest due time; arming an earlier one only moves its cancel scope's
deadline, waking nobody.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["Deadlines"]

log = logging.getLogger("fastworker.worker")

_PRUNE_AT = 1024  # dead entries tolerated before pruning is considered


class Deadlines:
    """Calls ``expire(run, stage)`` on the trio thread when an armed time (trio clock) passes."""

    def __init__(self, expire: Callable[[Any, int], None]) -> None:
        self._expire = expire
        self._heap: list[list[Any]] = []  # [due, seq, run or None, stage]
        self._seq = itertools.count()
        self._dead = 0
        self._scope: trio.CancelScope | None = None

    @property
    def armed(self) -> int:
        """Entries still waiting for a live run."""
        return len(self._heap) - self._dead

    def arm(self, due: float, run: Any, stage: int) -> list[Any]:
        """Call ``expire(run, stage)`` at ``due``; returns the entry, for ``disarm``."""
        entry = [due, next(self._seq), run, stage]
        heapq.heappush(self._heap, entry)
        if self._scope is not None and due < self._scope.deadline:
            self._scope.deadline = due
        return entry

    def disarm(self, entry: list[Any] | None) -> None:
        """Forget an entry (its run ended): the run is released now, the entry pruned later."""
        if entry is None or entry[2] is None:
            return
        entry[2] = None
        self._dead += 1
        if self._dead > _PRUNE_AT and self._dead * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    async def serve(self) -> None:
        """The one timer task: sleep until the earliest due time, expire, repeat."""
        while True:
            heap = self._heap
            due = heap[0][0] if heap else math.inf
            with trio.CancelScope(deadline=due) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            self._fire(trio.current_time())

    def _fire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            run = entry[2]
            if run is None:
                self._dead -= 1
                continue
            entry[2] = None
            try:
                self._expire(run, entry[3])
            except Exception:  # bookkeeping must never end the timer: log and go on
                log.exception("worker: handling a time limit failed")
            heap = self._heap  # expire may have armed (and pruning replaced the list)
