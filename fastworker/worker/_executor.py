"""Runs tasks: plain functions in threads, coroutines on trio or on asyncio.

* Plain functions run in a fixed pool of ``concurrency`` threads fed by one
  queue: the trio loop never blocks on user code, and no thread is spawned
  per task.
* ``async def`` tasks written for trio run as tasks in this worker's nursery.
* ``async def`` tasks written for asyncio run on one asyncio event loop in a
  thread of its own (started on first use), the way FastAPI code expects.

Finished runs come back to the trio thread through one deque; the first
finisher after a drain schedules a single ``run_sync_soon`` and the drain
takes everything that finished meanwhile, so reporting is batched too.

``concurrency`` bounds how many tasks run at once across all three runners;
tasks beyond it wait here in strict priority order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ..tasks.models import TaskStatus
from ..tasks.registry import TaskDefinition, TaskRegistry
from ..tasks.serializer import SerializationError, SerializationFormat, Serializer
from ..wire import ResultRecord, TaskEnvelope

__all__ = ["Executor"]

log = logging.getLogger("fastworker.worker")


@attrs.define(eq=False, slots=True)
class _Run:
    envelope: TaskEnvelope
    definition: TaskDefinition | None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = attrs.Factory(dict)
    attempt: int = 1
    started: float = 0.0
    cancel_scope: trio.CancelScope | None = None
    future: concurrent.futures.Future[Any] | None = None
    abandoned: bool = False  # reported already (timed out or cancelled while in a thread)
    cancel_requested: bool = False


# What a runner hands back: (run, ok, value-or-exception, traceback text, completed epoch)
_Outcome = tuple[_Run, bool, Any, str | None, float]


class TaskTimeout(Exception):
    """A run took longer than its time limit."""


class Executor:
    def __init__(
        self,
        registry: TaskRegistry,
        concurrency: int,
        report: Callable[[list[ResultRecord]], None],
        *,
        allow_pickle: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.registry = registry
        self.concurrency = concurrency
        self._report = report
        self._allow_pickle = allow_pickle
        self._pending: list[collections.deque[_Run]] = [collections.deque() for _ in range(4)]
        self._running: dict[str, _Run] = {}
        self._done: collections.deque[_Outcome] = collections.deque()
        self._drain_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._threads: list[threading.Thread] = []
        self._thread_jobs: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._asyncio_thread: threading.Thread | None = None
        self.stuck_threads = 0
        self.completed = 0
        self._idle = trio.Event()
        self._idle.set()

    # -- life cycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then stop the threads (a thread stuck in user code is left)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._shutdown_threads()

    def _shutdown_threads(self) -> None:
        for _ in self._threads:
            self._thread_jobs.put(None)
        if self._asyncio_loop is not None:
            self._asyncio_loop.call_soon_threadsafe(self._asyncio_loop.stop)
        # Threads are daemons: one stuck in user code must not keep the process alive.
        deadline = time.monotonic() + 1.0
        for thread in [*self._threads, self._asyncio_thread]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()

    # -- intake -------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._pending)

    def submit(self, envelopes: list[TaskEnvelope]) -> None:
        failed: list[ResultRecord] = []
        for envelope in envelopes:
            run = _Run(envelope, self.registry.get(envelope.name))
            run.attempt = envelope.option("attempt", 1)
            if run.definition is None:
                failed.append(self._failure(run, f"unknown task {envelope.name!r} on this worker"))
                continue
            try:
                fmt = SerializationFormat.from_code(envelope.format)
                decoded = Serializer(fmt, allow_pickle=self._allow_pickle).loads(envelope.payload)
                run.args, run.kwargs = _split_arguments(decoded)
            except (SerializationError, ValueError) as exc:
                failed.append(self._failure(run, f"bad task payload: {exc}"))
                continue
            self._pending[envelope.priority].append(run)
        if failed:
            self._report(failed)
        self._start_waiting()

    def release_waiting(self) -> list[str]:
        """Give up every task not started yet (draining): their ids, for the scheduler."""
        ids = [run.envelope.task_id for q in self._pending for run in q]
        for q in self._pending:
            q.clear()
        return ids

    def running_ids(self) -> list[str]:
        return list(self._running)

    def cancel(self, task_ids: list[str]) -> None:
        wanted = set(task_ids)
        cancelled: list[ResultRecord] = []
        for q in self._pending:
            for run in [r for r in q if r.envelope.task_id in wanted]:
                q.remove(run)
                cancelled.append(self._record(run, TaskStatus.CANCELLED, error="cancelled"))
        for task_id in wanted:
            active = self._running.get(task_id)
            if active is None:
                continue
            active.cancel_requested = True
            if active.cancel_scope is not None:
                active.cancel_scope.cancel()
            elif active.future is not None:
                active.future.cancel()
            # A thread cannot be interrupted: it finishes, and its result is
            # reported as CANCELLED (see design/reliability.md).
        if cancelled:
            self._report(cancelled)

    # -- starting -----------------------------------------------------------

    def _start_waiting(self) -> None:
        while len(self._running) < self.concurrency:
            for q in self._pending:
                if q:
                    self._start(q.popleft())
                    break
            else:
                return

    async def wait_idle(self) -> None:
        """Return once no task is running (tasks waiting here do not count)."""
        await self._idle.wait()

    def _start(self, run: _Run) -> None:
        assert run.definition is not None
        assert self._nursery is not None
        run.started = time.time()
        if not self._running:
            self._idle = trio.Event()
        self._running[run.envelope.task_id] = run
        runner = run.definition.runner
        timeout = self._timeout(run)
        if runner == "thread":
            self._ensure_threads()
            self._thread_jobs.put(run)
            if timeout is not None:
                self._nursery.start_soon(self._watch_thread_deadline, run, timeout)
        elif runner == "trio":
            self._nursery.start_soon(self._run_trio, run, timeout)
        else:
            self._run_asyncio(run, timeout)

    def _timeout(self, run: _Run) -> float | None:
        assert run.definition is not None
        value = run.envelope.option("timeout")
        return float(value) if value is not None else run.definition.timeout

    # -- threads ------------------------------------------------------------

    def _ensure_threads(self) -> None:
        while len(self._threads) < self.concurrency + self.stuck_threads:
            thread = threading.Thread(
                target=self._thread_main, name=f"fastworker-task-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _thread_main(self) -> None:
        jobs = self._thread_jobs
        while True:
            run = jobs.get()
            if run is None:
                return
            assert run.definition is not None
            try:
                value = run.definition.fn(*run.args, **run.kwargs)
            except BaseException as exc:  # a task's SystemExit must not end this thread
                self._finished((run, False, exc, traceback.format_exc(), time.time()))
            else:
                self._finished((run, True, value, None, time.time()))

    async def _watch_thread_deadline(self, run: _Run, timeout: float) -> None:
        await trio.sleep(timeout)
        if self._running.get(run.envelope.task_id) is run:
            # The thread cannot be stopped: report now, keep capacity with a fresh
            # thread, and let the worker decide to recycle the process once idle.
            run.abandoned = True
            self.stuck_threads += 1
            del self._running[run.envelope.task_id]
            exc = TaskTimeout(f"task exceeded its time limit of {timeout:g} s")
            self._report([self._outcome_record((run, False, exc, None, time.time()))])
            self._ensure_threads()
            self._start_waiting()
            if not self._running:
                self._idle.set()

    # -- coroutines ---------------------------------------------------------

    async def _run_trio(self, run: _Run, timeout: float | None) -> None:
        assert run.definition is not None
        outcome: _Outcome
        with trio.CancelScope() as scope:
            run.cancel_scope = scope
            if timeout is not None:
                scope.deadline = trio.current_time() + timeout
            try:
                value = await run.definition.fn(*run.args, **run.kwargs)
            except Exception as exc:
                outcome = (run, False, exc, traceback.format_exc(), time.time())
            else:
                outcome = (run, True, value, None, time.time())
        if scope.cancelled_caught:
            if run.cancel_requested:
                outcome = (run, False, _Cancelled(), None, time.time())
            else:
                limit = TaskTimeout(f"task exceeded its time limit of {timeout:g} s")
                outcome = (run, False, limit, None, time.time())
        self._finished(outcome)

    def _run_asyncio(self, run: _Run, timeout: float | None) -> None:
        loop = self._ensure_asyncio_loop()
        assert run.definition is not None
        try:
            coro = run.definition.fn(*run.args, **run.kwargs)
        except Exception as exc:  # e.g. wrong arguments: raised before any await
            self._finished((run, False, exc, traceback.format_exc(), time.time()))
            return
        if timeout is not None:
            coro = asyncio.wait_for(coro, timeout)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        run.future = future

        def done(fut: concurrent.futures.Future[Any]) -> None:
            now = time.time()
            if fut.cancelled():
                self._finished((run, False, _Cancelled(), None, now))
                return
            exc = fut.exception()
            if exc is None:
                self._finished((run, True, fut.result(), None, now))
            elif isinstance(exc, TimeoutError) and timeout is not None:
                err = TaskTimeout(f"task exceeded its time limit of {timeout:g} s")
                self._finished((run, False, err, None, now))
            else:
                tb = "".join(traceback.format_exception(exc))
                self._finished((run, False, exc, tb, now))

        future.add_done_callback(done)

    def _ensure_asyncio_loop(self) -> asyncio.AbstractEventLoop:
        if self._asyncio_loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=loop.run_forever, name="fastworker-asyncio", daemon=True
            )
            thread.start()
            self._asyncio_loop, self._asyncio_thread = loop, thread
        return self._asyncio_loop

    # -- completion ---------------------------------------------------------

    def _finished(self, outcome: _Outcome) -> None:
        """Called from any thread: queue the outcome and wake the trio side once."""
        self._done.append(outcome)
        if not self._drain_scheduled:
            self._drain_scheduled = True
            assert self._token is not None
            try:
                self._token.run_sync_soon(self._drain)
            except trio.RunFinishedError:
                pass  # shutting down: nobody is left to report to

    def _drain(self) -> None:
        self._drain_scheduled = False
        done = self._done
        records: list[ResultRecord] = []
        while done:
            outcome = done.popleft()
            run = outcome[0]
            if run.abandoned:
                continue  # reported at its deadline; the late value is dropped
            self._running.pop(run.envelope.task_id, None)
            records.append(self._outcome_record(outcome))
        self.completed += len(records)
        self._start_waiting()
        if not self._running:
            self._idle.set()
        if records:
            self._report(records)

    def _outcome_record(self, outcome: _Outcome) -> ResultRecord:
        run, ok, value, tb, completed = outcome
        if run.cancel_requested or isinstance(value, _Cancelled):
            return self._record(run, TaskStatus.CANCELLED, error="cancelled", completed=completed)
        if ok:
            try:
                fmt = SerializationFormat.from_code(run.envelope.format)
                encoded = Serializer(fmt).dumps(value)
            except TypeError as exc:
                return self._record(
                    run,
                    TaskStatus.FAILURE,
                    error=f"result could not be encoded: {exc}",
                    completed=completed,
                )
            return self._record(run, TaskStatus.SUCCESS, result=encoded, completed=completed)
        error = f"{type(value).__name__}: {value}"
        retry_delay = self._retry_delay(run)
        if retry_delay is not None:
            return self._record(
                run,
                TaskStatus.RETRYING,
                error=error,
                traceback=tb,
                completed=completed,
                retry_delay=retry_delay,
            )
        return self._record(run, TaskStatus.FAILURE, error=error, traceback=tb, completed=completed)

    def _retry_delay(self, run: _Run) -> float | None:
        """Seconds until the next attempt, or None when retries are used up."""
        definition = run.definition
        assert definition is not None
        opt = run.envelope.option
        max_retries = opt("max_retries", definition.max_retries)
        if run.attempt > max_retries:
            return None
        delay = float(opt("retry_delay", definition.retry_delay))
        backoff = float(opt("retry_backoff", definition.retry_backoff))
        cap = float(opt("retry_backoff_max", definition.retry_backoff_max))
        return min(delay * backoff ** (run.attempt - 1), cap)

    def _failure(self, run: _Run, error: str) -> ResultRecord:
        run.started = time.time()
        return self._record(run, TaskStatus.FAILURE, error=error, completed=run.started)

    def _record(
        self,
        run: _Run,
        status: TaskStatus,
        *,
        result: bytes | None = None,
        error: str | None = None,
        traceback: str | None = None,
        completed: float | None = None,
        retry_delay: float | None = None,
    ) -> ResultRecord:
        envelope = run.envelope
        return ResultRecord(
            envelope.task_id,
            status.value,
            result,
            error,
            run.started or None,
            completed if completed is not None else time.time(),
            run.attempt,
            traceback,
            envelope.format,
            envelope.name,
            retry_delay,
        )


class _Cancelled(Exception):
    """Marks a run that was cancelled on request."""


def _split_arguments(decoded: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The payload is ``[args, kwargs]``; anything else is a bad payload."""
    if (
        isinstance(decoded, (list, tuple))
        and len(decoded) == 2
        and isinstance(decoded[0], (list, tuple))
        and isinstance(decoded[1], dict)
        and all(isinstance(k, str) for k in decoded[1])
    ):
        return tuple(decoded[0]), decoded[1]
    raise ValueError("payload must be [args, kwargs]")
