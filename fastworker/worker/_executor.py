"""Runs tasks: plain functions in threads, coroutines on trio or on asyncio.

* Plain functions run in a fixed pool of ``concurrency`` threads
  (``_threadpool.py``), fed whole batches in strict priority order: the trio
  loop never blocks on user code and no thread is spawned per task.
* ``async def`` tasks written for trio run as tasks in this worker's nursery.
* ``async def`` tasks written for asyncio run on one asyncio event loop in a
  thread of its own (started on first use), the way FastAPI code expects.

At most ``concurrency`` plain functions run at once (one per thread), and at
most ``concurrency`` coroutines; tasks beyond that wait here, in priority
order.  Finished runs come back to the trio thread through one deque; the
first finisher after a drain schedules a single ``run_sync_soon`` and the
drain takes everything that finished meanwhile, so reporting is batched too.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import trio

from ..tasks.models import TaskStatus
from ..tasks.registry import TaskDefinition, TaskRegistry
from ..tasks.serializer import SerializationError, SerializationFormat, dumps, loads
from ..wire import ResultRecord, TaskEnvelope
from ._threadpool import Outcome, TaskThreads

__all__ = ["Executor", "TaskTimeout"]

log = logging.getLogger("fastworker.worker")

_FORMATS = (SerializationFormat.JSON, SerializationFormat.CBOR, SerializationFormat.PICKLE)


class TaskTimeout(Exception):
    """A run took longer than its time limit."""


class _Cancelled(Exception):
    """Marks a run that was cancelled on request."""


class _Run:
    """One task in this worker, from intake to report (a plain slotted class: hot path)."""

    __slots__ = (
        "abandoned",
        "args",
        "attempt",
        "cancel_requested",
        "cancel_scope",
        "definition",
        "envelope",
        "future",
        "kwargs",
        "started",
        "timeout",
    )

    def __init__(
        self,
        envelope: TaskEnvelope,
        definition: TaskDefinition,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attempt: int,
        timeout: float | None,
    ) -> None:
        self.envelope = envelope
        self.definition = definition
        self.args = args
        self.kwargs = kwargs
        self.attempt = attempt
        self.timeout = timeout
        self.started = 0.0
        self.cancel_scope: trio.CancelScope | None = None
        self.future: concurrent.futures.Future[Any] | None = None
        self.abandoned = False  # reported already (timed out, cancelled or released)
        self.cancel_requested = False

    @property
    def priority(self) -> int:
        return self.envelope.priority

    @property
    def task_id(self) -> str:
        return self.envelope.task_id

    def call(self) -> Any:
        return self.definition.fn(*self.args, **self.kwargs)


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
        self._held: dict[str, _Run] = {}  # every run accepted and not yet reported
        self._async_waiting: list[collections.deque[_Run]] = [collections.deque() for _ in range(4)]
        self._async_running = 0
        self._done: collections.deque[Outcome] = collections.deque()
        self._drain_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._threads = TaskThreads(concurrency, self._thread_started, self._finished)
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._asyncio_thread: threading.Thread | None = None
        self.stuck_threads = 0
        self.completed = 0
        self.max_result_bytes = 16 * 1024 * 1024 - 64 * 1024
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
            self._threads.stop()
            loop, thread = self._asyncio_loop, self._asyncio_thread
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
                if thread is not None:
                    thread.join(1.0)
                if thread is None or not thread.is_alive():
                    loop.close()  # an unclosed loop leaks its self-pipe (ResourceWarning)
                    self._asyncio_loop = self._asyncio_thread = None

    # -- intake -------------------------------------------------------------

    @property
    def held(self) -> int:
        """Tasks accepted and not yet reported (running or waiting)."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        return self._threads.waiting() + sum(len(q) for q in self._async_waiting)

    @property
    def running(self) -> int:
        return max(0, len(self._held) - self.waiting)

    async def wait_idle(self) -> None:
        """Return once every accepted task has been reported."""
        await self._idle.wait()

    def submit(self, envelopes: list[TaskEnvelope]) -> None:
        failed: list[ResultRecord] = []
        for_threads: list[_Run] = []
        held = self._held
        lookup = self.registry.get
        allow_pickle = self._allow_pickle
        for envelope in envelopes:
            task_id = envelope.task_id
            if task_id in held:
                continue  # a duplicate delivery of a task we are already running
            definition = lookup(envelope.name)
            if definition is None:
                failed.append(_failure(envelope, f"unknown task {envelope.name!r} on this worker"))
                continue
            try:
                fmt = _FORMATS[envelope.format]
                decoded = loads(fmt, envelope.payload, allow_pickle=allow_pickle)
                args, kwargs = _split_arguments(decoded)
            except (SerializationError, ValueError) as exc:
                failed.append(_failure(envelope, f"bad task payload: {exc}"))
                continue
            options = envelope.options
            if options is None:
                run = _Run(envelope, definition, args, kwargs, 1, definition.timeout)
            else:
                timeout = options.get("timeout", definition.timeout)
                run = _Run(
                    envelope,
                    definition,
                    args,
                    kwargs,
                    options.get("attempt", 1),
                    float(timeout) if timeout is not None else None,
                )
            held[task_id] = run
            if definition.runner == "thread":
                for_threads.append(run)
            else:
                self._async_waiting[run.priority].append(run)
        if self._held:
            self._idle = trio.Event() if self._idle.is_set() else self._idle
        if for_threads:
            self._threads.put_many(for_threads)
        self._start_coroutines()
        if failed:
            self._report(failed)

    def release_waiting(self) -> list[str]:
        """Give up every task not started yet (draining): their ids, for the scheduler."""
        released = self._threads.take_waiting()
        for q in self._async_waiting:
            released.extend(q)
            q.clear()
        for run in released:
            run.abandoned = True
            self._held.pop(run.task_id, None)
        self._check_idle()
        return [run.task_id for run in released]

    def abandon_all(self) -> list[str]:
        """Give up every task still held (drain past its grace): their ids, to hand back.

        Threads still running one finish it, but its result is dropped: the
        scheduler requeues the task and it runs again elsewhere.
        """
        ids = list(self._held)
        for run in self._held.values():
            run.abandoned = True
            if run.cancel_scope is not None:
                run.cancel_scope.cancel()
        self._held.clear()
        self._check_idle()
        return ids

    def cancel(self, task_ids: list[str]) -> None:
        cancelled: list[ResultRecord] = []
        for task_id in task_ids:
            run = self._held.get(task_id)
            if run is None:
                continue
            run.cancel_requested = True
            if not run.started:
                # Not started: it never will (the thread or the queue skips it).
                run.abandoned = True
                self._held.pop(task_id)
                for q in self._async_waiting:
                    if run in q:
                        q.remove(run)
                cancelled.append(_record(run, TaskStatus.CANCELLED, error="cancelled"))
            elif run.cancel_scope is not None:
                run.cancel_scope.cancel()
            elif run.future is not None:
                run.future.cancel()
            # A running thread cannot be interrupted: it finishes, and its
            # result is reported as CANCELLED (see design/reliability.md).
        self._check_idle()
        if cancelled:
            self._report(cancelled)

    # -- threads ------------------------------------------------------------

    def _thread_started(self, run: _Run) -> None:
        """Called in the task's thread as it starts: arm the time limit if there is one."""
        if run.timeout is not None and self._token is not None:
            try:
                self._token.run_sync_soon(self._arm_deadline, run)
            except trio.RunFinishedError:
                pass

    def _arm_deadline(self, run: _Run) -> None:
        if self._nursery is not None and not run.abandoned:
            self._nursery.start_soon(self._watch_thread_deadline, run)

    async def _watch_thread_deadline(self, run: _Run) -> None:
        assert run.timeout is not None
        remaining = run.started + run.timeout - time.time()
        await trio.sleep(max(0.0, remaining))
        if self._held.get(run.task_id) is run:
            # The thread cannot be stopped: report now, keep capacity with a fresh
            # thread, and let the worker decide to recycle the process once idle.
            run.abandoned = True
            self.stuck_threads += 1
            del self._held[run.task_id]
            limit = TaskTimeout(f"task exceeded its time limit of {run.timeout:g} s")
            self._report([self._outcome_record((run, False, limit, None, time.time()))])
            self._threads.add_thread()
            self._check_idle()

    # -- coroutines ---------------------------------------------------------

    def _start_coroutines(self) -> None:
        while self._async_running < self.concurrency:
            for q in self._async_waiting:
                if q:
                    run = q.popleft()
                    break
            else:
                return
            self._async_running += 1
            run.started = time.time()
            if run.definition.runner == "trio":
                assert self._nursery is not None
                self._nursery.start_soon(self._run_trio, run)
            else:
                self._run_asyncio(run)

    async def _run_trio(self, run: _Run) -> None:
        outcome: Outcome
        with trio.CancelScope() as scope:
            run.cancel_scope = scope
            if run.timeout is not None:
                scope.deadline = trio.current_time() + run.timeout
            try:
                value = await run.call()
            except Exception as exc:
                outcome = (run, False, exc, traceback.format_exc(), time.time())
            else:
                outcome = (run, True, value, None, time.time())
        if scope.cancelled_caught:
            if run.cancel_requested:
                outcome = (run, False, _Cancelled(), None, time.time())
            else:
                limit = TaskTimeout(f"task exceeded its time limit of {run.timeout:g} s")
                outcome = (run, False, limit, None, time.time())
        # Already on the trio thread: report now rather than through
        # run_sync_soon's wake-up (measured at ~60 µs here); the drain still
        # takes everything that finished meanwhile.
        self._done.append(outcome)
        if not self._drain_scheduled:
            self._drain()

    def _run_asyncio(self, run: _Run) -> None:
        loop = self._ensure_asyncio_loop()
        try:
            coro = run.call()
        except Exception as exc:  # e.g. wrong arguments: raised before any await
            self._finished((run, False, exc, traceback.format_exc(), time.time()))
            return
        timeout = run.timeout
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
                limit = TaskTimeout(f"task exceeded its time limit of {timeout:g} s")
                self._finished((run, False, limit, None, now))
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

    def _finished(self, outcome: Outcome) -> None:
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
        held = self._held
        records: list[ResultRecord] = []
        while done:
            outcome = done.popleft()
            run: _Run = outcome[0]
            if run.definition.runner != "thread":
                self._async_running -= 1
            if run.abandoned or held.pop(run.envelope.task_id, None) is None:
                continue  # reported already (deadline, cancel, release): late value dropped
            if outcome[1] and not run.cancel_requested:
                envelope = run.envelope
                try:
                    encoded = dumps(_FORMATS[envelope.format], outcome[2])
                except TypeError:
                    records.append(self._outcome_record(outcome))  # the slow path explains
                    continue
                if len(encoded) <= self.max_result_bytes:
                    records.append(
                        ResultRecord(
                            envelope.task_id,
                            "success",
                            encoded,
                            None,
                            run.started,
                            outcome[4],
                            run.attempt,
                            None,
                            envelope.format,
                            envelope.name,
                            None,
                        )
                    )
                    continue
            records.append(self._outcome_record(outcome))
        self.completed += len(records)
        self._start_coroutines()
        self._check_idle()
        if records:
            self._report(records)

    def _check_idle(self) -> None:
        if not self._held:
            self._idle.set()

    def _outcome_record(self, outcome: Outcome) -> ResultRecord:
        run, ok, value, tb, completed = outcome
        if run.cancel_requested or isinstance(value, _Cancelled):
            return _record(run, TaskStatus.CANCELLED, error="cancelled", completed=completed)
        if ok:
            try:
                encoded = dumps(_FORMATS[run.envelope.format], value)
                if len(encoded) > self.max_result_bytes:
                    raise TypeError(
                        f"it is {len(encoded)} bytes, more than a message may carry "
                        f"({self.max_result_bytes} bytes)"
                    )
            except TypeError as exc:
                return _record(
                    run,
                    TaskStatus.FAILURE,
                    error=f"result could not be encoded: {exc}",
                    completed=completed,
                )
            return _record(run, TaskStatus.SUCCESS, result=encoded, completed=completed)
        error = f"{type(value).__name__}: {value}"
        retry_delay = _retry_delay(run)
        if retry_delay is not None:
            return _record(
                run,
                TaskStatus.RETRYING,
                error=error,
                traceback=tb,
                completed=completed,
                retry_delay=retry_delay,
            )
        return _record(run, TaskStatus.FAILURE, error=error, traceback=tb, completed=completed)


def _retry_delay(run: _Run) -> float | None:
    """Seconds until the next attempt, or None when retries are used up.

    Delay ``retry_delay * retry_backoff ** (attempt - 1)``, capped at
    ``retry_backoff_max``; per-call options override the task's defaults.
    """
    definition = run.definition
    opt = run.envelope.option
    max_retries = opt("max_retries", definition.max_retries)
    if run.attempt > max_retries:
        return None
    delay = float(opt("retry_delay", definition.retry_delay))
    backoff = float(opt("retry_backoff", definition.retry_backoff))
    cap = float(opt("retry_backoff_max", definition.retry_backoff_max))
    return min(delay * backoff ** (run.attempt - 1), cap)


def _failure(envelope: TaskEnvelope, error: str) -> ResultRecord:
    now = time.time()
    return ResultRecord(
        envelope.task_id,
        TaskStatus.FAILURE.value,
        None,
        error,
        now,
        now,
        envelope.option("attempt", 1),
        None,
        envelope.format,
        envelope.name,
        None,
    )


def _record(
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


def _split_arguments(decoded: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The payload is ``[args, kwargs]``; anything else is a bad payload."""
    if type(decoded) is list and len(decoded) == 2:
        args, kwargs = decoded
        if type(args) is list and type(kwargs) is dict:
            for key in kwargs:
                if type(key) is not str:
                    raise ValueError("payload keyword names must be strings")
            return tuple(args), kwargs
    if (
        isinstance(decoded, (list, tuple))
        and len(decoded) == 2
        and isinstance(decoded[0], (list, tuple))
        and isinstance(decoded[1], dict)
        and all(isinstance(k, str) for k in decoded[1])
    ):
        return tuple(decoded[0]), decoded[1]
    raise ValueError("payload must be [args, kwargs]")
