"""A fixed pool of threads running plain-function tasks, fed in strict priority order.

Why not one queue.put per task: every put that wakes a sleeping thread costs
a futex wake and a GIL hand-off, and profiling showed that hand-off as the
worker's largest cost with short tasks.  Here the trio side appends whole
batches to four deques (one per priority) and takes the lock once per batch,
only to wake threads that sleep; busy threads take the next task without any
lock at all (``deque.popleft`` is atomic), so under load tasks flow through
with no wake-ups.  ``concurrency`` threads bound how many run at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs

from .._task_context import CURRENT_TASK_ID
from ._errors import traceback_text

__all__ = ["Outcome", "TaskThreads"]

log = logging.getLogger("fastworker.worker")


class ThreadRun(Protocol):
    """What the pool needs of a run."""

    priority: int
    started: float
    abandoned: bool

    def call(self) -> Any: ...


@attrs.frozen
class Outcome:
    """How one run ended, handed from the thread that ran it to the worker's mailbox.

    ``value`` is the return value when ``ok``, else the exception; ``completed``
    is the wall-clock time it ended (the record's ``completed_at``).
    """

    run: Any
    ok: bool
    value: Any
    traceback: str | None
    completed: float


class TaskThreads:
    def __init__(
        self,
        size: int,
        on_start: Callable[[Any], None],
        on_done: Callable[[Outcome], None],
    ) -> None:
        self.size = size
        self._on_start = on_start
        self._on_done = on_done
        self._queues: list[collections.deque[Any]] = [collections.deque() for _ in range(4)]
        self._cond = threading.Condition(threading.Lock())
        self._sleeping = 0
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def put_many(self, runs: list[Any]) -> None:
        """Queue runs (from the trio thread) and wake as many sleeping threads as needed."""
        queues = self._queues
        for run in runs:
            queues[run.priority].append(run)
        self._ensure_threads()
        with self._cond:
            if self._sleeping:
                self._cond.notify(min(len(runs), self._sleeping))

    def take_waiting(self) -> list[Any]:
        """Remove and return every run no thread has picked up yet (for draining)."""
        taken = []
        for q in self._queues:
            while True:
                try:
                    taken.append(q.popleft())
                except IndexError:
                    break
        return taken

    def waiting(self) -> int:
        return sum(len(q) for q in self._queues)

    def add_thread(self) -> None:
        """Replace a thread stuck in user code, so capacity stays at ``size``."""
        self.size += 1
        self._ensure_threads()

    def _ensure_threads(self) -> None:
        while len(self._threads) < self.size:
            thread = threading.Thread(
                target=self._main, name=f"fastworker-task-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _next(self) -> Any | None:
        for q in self._queues:
            try:
                return q.popleft()
            except IndexError:
                continue
        return None

    def _main(self) -> None:
        while True:
            run = self._next()
            if run is None:
                with self._cond:
                    while not self._stopping and not any(self._queues):
                        self._sleeping += 1
                        self._cond.wait()
                        self._sleeping -= 1
                    if self._stopping:
                        return
                continue
            if run.abandoned:
                continue  # cancelled or released while it waited: already reported
            run.started = time.time()
            outcome: Outcome
            try:
                self._on_start(run)
                token = CURRENT_TASK_ID.set(run.task_id)
                try:
                    value = run.call()
                except BaseException as exc:  # a task's SystemExit must not end this thread
                    outcome = Outcome(run, False, exc, traceback_text(exc), time.time())
                else:
                    outcome = Outcome(run, True, value, None, time.time())
                finally:
                    CURRENT_TASK_ID.reset(token)
                self._on_done(outcome)
            except Exception:  # bookkeeping: never lose the thread to it
                log.exception("worker: a task thread's bookkeeping failed")

    def stop(self, timeout: float = 1.0) -> None:
        """Ask threads to exit and wait briefly; a thread stuck in user code is left (daemon)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
