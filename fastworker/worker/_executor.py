"""Runs tasks: plain functions in threads, coroutines on trio or on asyncio.

* Plain functions run in a fixed pool of ``concurrency`` threads
  (``_threadpool.py``), fed whole batches in strict priority order: the trio
  loop never blocks on user code and no thread is spawned per task.
* ``async def`` tasks written for trio run as tasks in this worker's nursery.
* ``async def`` tasks written for asyncio run on one asyncio event loop in a
  thread of its own (started on first use), the way FastAPI code expects.

At most ``concurrency`` plain functions run at once (one per thread), and at
most ``concurrency`` coroutines; tasks beyond that wait here, in priority
order.

The executor is part of its Worker's state: only the Worker's ``receive``
changes it.  Threads, the asyncio loop, trio tasks and the time-limit timer
do not call into the worker: they append to deques (runs finished, thread
runs started, time limits due) and wake the worker with one ``_ExecutorWake``
message per batch (``run_sync_soon`` from another thread), the way callers
wake a ClientCore.  The worker then calls :meth:`Executor.collect`, which
takes everything that happened meanwhile, so reporting is batched too.  A
full mailbox loses nothing: the wake then waits for room in a helper task,
and the deques keep what it stands for.

Nothing a task does may reach trio's ``run_sync_soon`` or this worker's loop:
every outcome is turned into a record under a guard (an exception whose text
cannot be had, a result that cannot be encoded, a retry delay that overflows
all fail that one task), and every time limit holds: a run still going a
grace period past its limit (a thread, a coroutine that ignores cancellation,
an asyncio loop blocked by a synchronous call) is reported as timed out,
abandoned, and counted in ``stuck_runs`` so the worker can be recycled.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Coroutine
from typing import Any

import attrs
import trio

from .._io import tell_own_actor
from .._task_context import CURRENT_TASK_ID
from ..runtime import ActorRef, ActorStopped, MailboxFull
from ..tasks.models import TaskStatus
from ..tasks.options import MAX_RETRIES
from ..tasks.registry import TaskDefinition, TaskRegistry
from ..tasks.serializer import SerializationFormat, dumps, loads
from ..wire import UNDECODABLE_PREFIX, ResultRecord, TaskEnvelope
from ._deadlines import Deadlines
from ._errors import error_text, message_text, traceback_text
from ._threadpool import Outcome, TaskThreads

__all__ = ["Collected", "Executor", "ExecutorWake", "TaskTimeout"]

log = logging.getLogger("fastworker.worker")

_FORMATS = (SerializationFormat.JSON, SerializationFormat.CBOR, SerializationFormat.PICKLE)

# Longest retry delay a worker reports: beyond it a task effectively never
# retries, and every hop (the wire, trio deadlines) still accepts the number.
_MAX_RETRY_DELAY = 1e9

# What a time limit's deadline entry does when it comes due (see _expire).
_THREAD_LIMIT = 0  # a thread task is past its limit: report it, replace the thread
_PROBE = 1  # an asyncio task is past its limit: ask its loop whether it still turns
_STUCK = 2  # a coroutine still runs a grace period past its limit: report, abandon


@attrs.frozen(eq=False)
class ExecutorWake:
    """To the worker: ``executor`` has news; call its ``collect()`` (one per batch)."""

    executor: Executor


@attrs.frozen
class Collected:
    """What :meth:`Executor.collect` found: records to report, runs newly abandoned."""

    records: list[ResultRecord]
    stuck: int


class TaskTimeout(Exception):
    """A run took longer than its time limit."""


class _Cancelled(Exception):
    """Marks a run that was cancelled on request."""


class _Run:
    """One task in this worker, from intake to report (a plain slotted class: hot path)."""

    __slots__ = (
        "abandoned",
        "args",
        "asyncio_task",
        "attempt",
        "cancel_requested",
        "cancel_scope",
        "deadline",
        "definition",
        "envelope",
        "finished",
        "future",
        "kwargs",
        "loop_answered",
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
        # The asyncio task running it, once it runs (set and read on the asyncio loop).
        self.asyncio_task: asyncio.Task[Any] | None = None
        self.abandoned = False  # reported already (timed out, cancelled or released)
        self.cancel_requested = False
        self.deadline: list[Any] | None = None  # its entry in the Deadlines heap
        self.finished = False  # its outcome was settled (a second one is ignored)
        self.loop_answered = False  # the asyncio loop ran our probe after the limit

    @property
    def priority(self) -> int:
        return self.envelope.priority

    @property
    def task_id(self) -> str:
        return self.envelope.task_id

    def call(self) -> Any:
        return self.definition.fn(*self.args, **self.kwargs)


class Executor:
    """Runs the tasks a worker accepted; tells ``owner`` an ``ExecutorWake`` when runs end.

    The owner answers a wake with :meth:`collect`: the records to report and
    how many runs were abandoned because they could not be stopped at their
    time limit (the worker decides whether to recycle its process).
    ``submit`` and ``cancel`` return the records they settle at once.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        concurrency: int,
        owner: ActorRef,
        *,
        allow_pickle: bool = False,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.registry = registry
        self.concurrency = concurrency
        self._owner = owner
        self._wake_message = ExecutorWake(self)
        self._allow_pickle = allow_pickle
        self._held: dict[str, _Run] = {}  # every run accepted and not yet reported
        self._async_waiting: list[collections.deque[_Run]] = [collections.deque() for _ in range(4)]
        self._async_running = 0
        # Filled by threads, the asyncio loop and timers; emptied by collect().
        self._done: collections.deque[Outcome] = collections.deque()
        self._started: collections.deque[_Run] = collections.deque()  # thread runs with a limit
        self._expired: collections.deque[tuple[_Run, int]] = collections.deque()
        self._wake_scheduled = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._threads = TaskThreads(concurrency, self._thread_started, self._finished)
        self._deadlines = Deadlines(self._expire)
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._asyncio_thread: threading.Thread | None = None
        self.stuck_runs = 0
        self.completed = 0
        # How long a coroutine may run past its limit before it counts as stuck.
        self.stop_grace = 1.0

    @property
    def armed_deadlines(self) -> int:
        """Time limits being watched: one per running task that has a limit."""
        return self._deadlines.armed

    # -- life cycle ---------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then stop the threads (a thread stuck in user code is left)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._deadlines.serve)
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

    def held_ids(self) -> list[str]:
        """The ids of the tasks accepted and not yet reported."""
        return list(self._held)

    @property
    def waiting(self) -> int:
        return self._threads.waiting() + sum(len(q) for q in self._async_waiting)

    @property
    def running(self) -> int:
        return max(0, len(self._held) - self.waiting)

    def submit(self, envelopes: list[TaskEnvelope]) -> list[ResultRecord]:
        """Accept tasks; returns the records of those that failed at once (unknown, undecodable)."""
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
            except Exception as exc:  # a pickle may raise anything while it loads
                failed.append(_failure(envelope, f"{UNDECODABLE_PREFIX}: {message_text(exc)}"))
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
        if for_threads:
            self._threads.put_many(for_threads)
        self._start_coroutines()
        return failed

    def release_waiting(self) -> list[str]:
        """Give up every task not started yet (draining): their ids, for the scheduler."""
        released = self._threads.take_waiting()
        for q in self._async_waiting:
            released.extend(q)
            q.clear()
        for run in released:
            run.abandoned = True
            self._held.pop(run.task_id, None)
        return [run.task_id for run in released]

    def abandon_all(self) -> list[str]:
        """Give up every task still held (drain past its grace): their ids, to hand back.

        Threads still running one finish it, but its result is dropped: the
        scheduler requeues the task and it runs again elsewhere.
        """
        ids = list(self._held)
        for run in self._held.values():
            run.abandoned = True
            self._deadlines.disarm(run.deadline)
            if run.cancel_scope is not None:
                run.cancel_scope.cancel()
            elif run.future is not None:
                run.future.cancel()
        self._held.clear()
        return ids

    def cancel(self, task_ids: list[str]) -> list[ResultRecord]:
        """Cancel runs; returns the records of those that had not started (CANCELLED now)."""
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
            elif run.future is not None and self._asyncio_loop is not None:
                # Cancel the asyncio task itself, on its loop: it is reported when
                # its coroutine has ended (cleanup done, or the cancellation
                # swallowed and a value returned), and holds its slot until then.
                with contextlib.suppress(RuntimeError):  # its loop already closed: nothing runs
                    self._asyncio_loop.call_soon_threadsafe(_cancel_asyncio_run, run)
            # A running thread cannot be interrupted: it finishes, and reports
            # how it ended (it ran; the control plane does not run it again).
        return cancelled

    # -- time limits ----------------------------------------------------------

    def _thread_started(self, run: _Run) -> None:
        """Called in the task's thread as it starts: its time limit, if any, is armed in collect."""
        if run.timeout is not None:
            self._started.append(run)
            self._wake()

    def _arm_thread_deadline(self, run: _Run) -> None:
        """Watch a thread's time limit (in collect)."""
        if run.finished or run.abandoned or run.timeout is None:
            return
        # The thread took its start time on the wall clock; the heap runs on trio's.
        left = max(0.0, run.started + run.timeout - time.time())
        run.deadline = self._deadlines.arm(trio.current_time() + left, run, _THREAD_LIMIT)

    def _expire(self, run: _Run, stage: int) -> None:
        """A time limit came due (called by the Deadlines task): handled in collect."""
        self._expired.append((run, stage))
        self._wake_here()

    def _expire_now(self, run: _Run, stage: int, records: list[ResultRecord]) -> int:
        """Act on a time limit that came due; returns 1 when the run is abandoned as stuck."""
        run.deadline = None
        if run.finished or run.abandoned or self._held.get(run.task_id) is not run:
            return 0
        assert run.timeout is not None
        limit = f"task exceeded its time limit of {run.timeout:g} s"
        if stage == _PROBE:
            loop = self._asyncio_loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(_answer_probe, run)
                except RuntimeError:
                    pass  # the loop is closed: it will not answer
            run.deadline = self._deadlines.arm(trio.current_time() + self.stop_grace, run, _STUCK)
            return 0
        if stage == _THREAD_LIMIT:
            # A thread cannot be stopped: report now and keep capacity with a
            # fresh thread; the late value is dropped.
            self._threads.add_thread()
        else:
            # A coroutine that outlived its limit by the grace period: it
            # ignored cancellation, or its asyncio loop is blocked.
            run.finished = True
            self._async_running -= 1
            if run.definition.runner == "asyncio" and not run.loop_answered:
                limit += " and its asyncio event loop is blocked (a blocking call in async code?)"
            else:
                limit += " and did not stop when cancelled"
        log.warning(
            "task %s (%s): %s; abandoned",
            run.task_id,
            run.definition.name,
            limit,
            extra={"task_id": run.task_id},
        )
        run.abandoned = True
        self.stuck_runs += 1
        del self._held[run.task_id]
        records.append(
            self._record_safely(Outcome(run, False, TaskTimeout(limit), None, time.time()))
        )
        return 1

    # -- coroutines ---------------------------------------------------------

    def _start_coroutines(self) -> None:
        nursery = self._nursery
        if nursery is None:
            return  # shutting down
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
                nursery.start_soon(self._run_trio, run)
            else:
                self._run_asyncio(run)

    async def _run_trio(self, run: _Run) -> None:
        outcome: Outcome | None = None
        with trio.CancelScope() as scope:
            run.cancel_scope = scope
            if run.timeout is not None:
                scope.deadline = trio.current_time() + run.timeout
                due = scope.deadline + self.stop_grace
                run.deadline = self._deadlines.arm(due, run, _STUCK)
            CURRENT_TASK_ID.set(run.task_id)  # this trio task's own context
            try:
                value = await run.call()
            except (trio.Cancelled, KeyboardInterrupt):
                raise
            except BaseException as exc:  # SystemExit too: a task fails, the worker stays
                outcome = Outcome(run, False, exc, traceback_text(exc), time.time())
            else:
                outcome = Outcome(run, True, value, None, time.time())
        if outcome is None or (scope.cancel_called and not outcome.ok):
            # Our scope was cancelled: by request, or at the time limit.
            if run.cancel_requested:
                outcome = Outcome(run, False, _Cancelled(), None, time.time())
            else:
                limit = TaskTimeout(f"task exceeded its time limit of {run.timeout:g} s")
                outcome = Outcome(run, False, limit, None, time.time())
        # Already on the trio thread: tell the worker now rather than through
        # run_sync_soon's wake-up (measured at ~60 µs here).
        self._done.append(outcome)
        self._wake_here()

    def _run_asyncio(self, run: _Run) -> None:
        coro: Any = None
        try:
            loop = self._ensure_asyncio_loop()
            coro = run.call()  # e.g. wrong arguments: raised before any await
            future = asyncio.run_coroutine_threadsafe(self._on_asyncio(run, coro), loop)
        except Exception as exc:
            if asyncio.iscoroutine(coro):
                coro.close()
            self._finished(Outcome(run, False, exc, traceback_text(exc), time.time()))
            return
        run.future = future
        future.add_done_callback(functools.partial(self._asyncio_future_done, run))
        if run.timeout is not None:
            due = trio.current_time() + run.timeout
            run.deadline = self._deadlines.arm(due, run, _PROBE)

    async def _on_asyncio(self, run: _Run, coro: Coroutine[Any, Any, Any]) -> None:
        """Runs on the asyncio loop: await the task and report its outcome, whatever it is."""
        timeout = run.timeout
        outcome: Outcome
        run.asyncio_task = asyncio.current_task()
        CURRENT_TASK_ID.set(run.task_id)  # this asyncio task's own context, and wait_for's
        try:
            if timeout is None:
                value = await coro
            else:
                value = await asyncio.wait_for(coro, timeout)
        except asyncio.CancelledError:
            outcome = Outcome(run, False, _Cancelled(), None, time.time())
        except TimeoutError as exc:
            if timeout is not None:
                limit = TaskTimeout(f"task exceeded its time limit of {timeout:g} s")
                outcome = Outcome(run, False, limit, None, time.time())
            else:
                outcome = Outcome(run, False, exc, traceback_text(exc), time.time())
        except BaseException as exc:  # SystemExit must not stop the loop for everyone
            outcome = Outcome(run, False, exc, traceback_text(exc), time.time())
        else:
            outcome = Outcome(run, True, value, None, time.time())
        self._finished(outcome)

    def _asyncio_future_done(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
        """A run cancelled before its coroutine started never reports: say CANCELLED here."""
        if future.cancelled():
            self._finished(Outcome(run, False, _Cancelled(), None, time.time()))

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
        """Called from any thread: queue the outcome and wake the worker once."""
        self._done.append(outcome)
        self._wake()

    def _wake(self) -> None:
        """From any thread: one ``ExecutorWake`` to the worker per collect."""
        if self._wake_scheduled:
            return
        self._wake_scheduled = True
        token = self._token
        if token is None:
            return  # not running: the next run's collect takes what is queued
        try:
            token.run_sync_soon(self._tell_wake)
        except trio.RunFinishedError:
            pass  # shutting down: nobody is left to report to

    def _wake_here(self) -> None:
        """On the trio thread: as ``_wake`` without the hop through ``run_sync_soon``."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._tell_wake()

    def _tell_wake(self) -> None:
        """On the trio thread (a run_sync_soon callback: it must never raise)."""
        try:
            self._owner.tell(self._wake_message)
        except MailboxFull:
            # Wait for room in a helper rather than drop the wake: until the
            # worker collects, nothing else would wake it for these results.
            nursery = self._nursery
            if nursery is not None:
                nursery.start_soon(self._send_wake)
            else:
                self._wake_scheduled = False
        except ActorStopped:
            self._wake_scheduled = False  # the worker is gone: nobody to report to

    async def _send_wake(self) -> None:
        if not await tell_own_actor(self._owner, self._wake_message):
            self._wake_scheduled = False

    def collect(self) -> Collected:
        """Settle what happened since the last wake (the worker's answer to ``ExecutorWake``).

        Runs that ended become records; thread runs that started get their
        time limit armed; limits that came due are acted on.  Never raises: a
        run whose bookkeeping fails is reported as failed, alone.
        """
        self._wake_scheduled = False  # before taking: a later append wakes again
        records: list[ResultRecord] = []
        done = self._done
        while done:
            outcome = done.popleft()
            try:
                record = self._settle(outcome)
            except Exception as exc:
                record = self._bookkeeping_failure(outcome.run, exc)
            if record is not None:
                records.append(record)
        self.completed += len(records)
        started = self._started
        while started:
            self._arm_thread_deadline(started.popleft())
        stuck = 0
        expired = self._expired
        while expired:
            run, stage = expired.popleft()
            try:
                stuck += self._expire_now(run, stage, records)
            except Exception:  # bookkeeping: the run stays held, its thread may still end it
                log.exception("worker: handling a time limit failed")
        try:
            self._start_coroutines()
        except Exception:
            log.exception("worker: starting queued coroutines failed")
        return Collected(records, stuck)

    def _settle(self, outcome: Outcome) -> ResultRecord | None:
        """The record for a finished run, or None when it was reported already."""
        run: _Run = outcome.run
        if run.finished:
            return None  # a second outcome (cancelled asyncio run), or a stuck run's late end
        run.finished = True
        if run.definition.runner != "thread":
            self._async_running -= 1
        self._deadlines.disarm(run.deadline)
        run.deadline = None
        if run.abandoned or self._held.pop(run.envelope.task_id, None) is None:
            return None  # reported already (deadline, cancel, release): late value dropped
        if outcome.ok:
            envelope = run.envelope
            try:
                encoded = dumps(_FORMATS[envelope.format], outcome.value)
            except Exception:
                return self._outcome_record(outcome)  # the slow path explains
            return ResultRecord(
                envelope.task_id,
                "success",
                encoded,
                None,
                run.started,
                outcome.completed,
                run.attempt,
                None,
                envelope.format,
                envelope.name,
                None,
            )
        return self._outcome_record(outcome)

    def _bookkeeping_failure(self, run: _Run, exc: Exception) -> ResultRecord:
        """A run whose outcome could not be turned into a record fails alone, saying why."""
        log.error(
            "task %s: its outcome could not be reported",
            run.task_id,
            exc_info=exc,
            extra={"task_id": run.task_id},
        )
        if self._held.get(run.task_id) is run:
            del self._held[run.task_id]
        return _record(
            run,
            TaskStatus.FAILURE,
            error=f"the worker could not report this task's outcome: {error_text(exc)}",
        )

    def _record_safely(self, outcome: Outcome) -> ResultRecord:
        try:
            return self._outcome_record(outcome)
        except Exception as exc:
            return self._bookkeeping_failure(outcome.run, exc)

    def _outcome_record(self, outcome: Outcome) -> ResultRecord:
        run, ok, value = outcome.run, outcome.ok, outcome.value
        tb, completed = outcome.traceback, outcome.completed
        if isinstance(value, _Cancelled):
            # Interrupted on request (or never started): a run that ended by
            # itself reports its outcome, so a result is never said CANCELLED
            # for work that was done.
            return _record(run, TaskStatus.CANCELLED, error="cancelled", completed=completed)
        if ok:
            try:
                encoded = dumps(_FORMATS[run.envelope.format], value)
            except Exception as exc:  # TypeError, or anything a __reduce__ raises
                why = message_text(exc) if type(exc) is TypeError else error_text(exc)
                return _record(
                    run,
                    TaskStatus.FAILURE,
                    error=f"result could not be encoded: {why}",
                    completed=completed,
                )
            return _record(run, TaskStatus.SUCCESS, result=encoded, completed=completed)
        error = error_text(value)
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


def _answer_probe(run: _Run) -> None:
    """Runs on the asyncio loop: it still turns."""
    run.loop_answered = True


def _retry_delay(run: _Run) -> float | None:
    """Seconds until the next attempt, or None when retries are used up.

    Delay ``retry_delay * retry_backoff ** (attempt - 1)``, capped at
    ``retry_backoff_max``; per-call options override the task's defaults.
    """
    definition = run.definition
    opt = run.envelope.option
    # The wire allows up to 10**15 (our client refuses more than MAX_RETRIES at the
    # call); a raw client's choice is clamped here, where it is used.
    max_retries = min(opt("max_retries", definition.max_retries), MAX_RETRIES)
    if run.attempt > max_retries:
        return None
    return backoff_delay(
        opt("retry_delay", definition.retry_delay),
        opt("retry_backoff", definition.retry_backoff),
        opt("retry_backoff_max", definition.retry_backoff_max),
        run.attempt,
    )


def backoff_delay(delay: float, backoff: float, cap: float, attempt: int) -> float:
    """``min(delay * backoff ** (attempt - 1), cap)``, computed so that it cannot raise.

    The options come from clients: each is a finite number in range, but a
    combination (backoff 1e15, attempt 40) overflows a float long before the
    cap applies.  The product is compared with the cap in log space and the
    result is finite, at most ``cap`` and at most ``_MAX_RETRY_DELAY``.
    """
    try:
        delay, backoff, cap = float(delay), float(backoff), float(cap)
        ceiling = min(cap, _MAX_RETRY_DELAY) if cap >= 0 else 0.0  # NaN cap: the ceiling
        exponent = max(0, attempt - 1)
        if not delay > 0 or not ceiling > 0:
            return 0.0
        if exponent == 0 or backoff == 1:
            value = delay
        elif not backoff > 0:
            return 0.0  # 0 ** n
        else:
            log_value = math.log(delay) + exponent * math.log(backoff)
            if not log_value < math.log(ceiling):
                return ceiling
            value = math.exp(log_value)
        return value if value <= ceiling else ceiling
    except (OverflowError, ValueError, TypeError):
        return _MAX_RETRY_DELAY


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


def _cancel_asyncio_run(run: _Run) -> None:
    """On the asyncio loop: cancel the run's task, or its future if the task has not started."""
    task = run.asyncio_task
    if task is not None:
        task.cancel()
    elif run.future is not None:
        run.future.cancel()  # not started: it never will, and is reported CANCELLED now
