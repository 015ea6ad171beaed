"""The campaign's clients: each slot runs one ``fastworker.Client`` at a time (trio host).

A slot submits a seeded random mix of operations, records every call and
its outcome in the ``History``, and watches its tasks' results (``get_result``,
local, no I/O) until each is final.  A *restart* stops the client (as a
process that exits would) and starts a fresh one in the slot: the new client
cannot re-submit the old one's tasks (their ids belong to the old client),
but it knows them and asks the control plane's cache for their results
(``get_task_result``) — what a restarted application can do.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..client import Client
from ..client._errors import ClientStoppedError, ControlPlaneUnavailableError, QueueFullError
from ..client.client import TASK_GOES_ON
from ..tasks.models import TaskResult, TaskStatus
from . import _tasks as t
from ._check import INSTANT_BOUND, must_finish
from ._history import History, Observation, Op, TaskRecord

__all__ = ["Budget", "ClientSlot"]

_QUERY_TIMEOUT = 5.0
_SUBMIT_TIMEOUT = 8.0
_CLIENT_TIMEOUT = 8.0
# What a stop may still wait after a flush that timed out (those tasks stay unsent).
_STOP_AFTER_FLUSH = 0.2
_GUARD = 10.0  # past timeout + this, a call is abandoned (and counted hung)
_MAX_WAITING = 6  # awaited calls in flight per client
_POLL = 0.2
_INHERITED_EVERY = 1.0
_INHERITED_BATCH = 40
LARGE_SIZE = 300_000


class Budget:
    """Caps on the rare, heavy task kinds, shared by the slots (per campaign)."""

    def __init__(self, duration: float) -> None:
        minutes = max(duration / 60.0, 0.5)
        self.left = {
            "crash": round(2 * minutes),
            "stuck": round(2 * minutes),
            "large": round(30 * minutes),
        }

    def take(self, kind: str) -> bool:
        if self.left.get(kind, 1) <= 0:
            return False
        if kind in self.left:
            self.left[kind] -= 1
        return True


def _digest(value: Any) -> Any:
    """Large values are kept as a digest in the history (it is written out as JSON)."""
    if isinstance(value, str):
        return f"{len(value)}:{hashlib.sha256(value.encode()).hexdigest()[:16]}"
    return value


class ClientSlot:
    def __init__(
        self, index: int, discovery_address: str, history: History, seed: int, budget: Budget
    ) -> None:
        self.index = index
        self.discovery_address = discovery_address
        self.history = history
        self.budget = budget
        self.rng = random.Random(f"fastworker-chaos-{seed}-client{index}")
        self.generation = 0
        self.client: Client | None = None
        self.live: dict[str, TaskRecord] = {}  # ids of the current client, not final yet
        self.inherited: dict[str, TaskRecord] = {}  # ids of stopped clients, not final yet
        self.recent: deque[TaskRecord] = deque(maxlen=200)  # finished, to query again
        self._waiting: set[TaskRecord] = set()  # in submit_task: no id known yet
        self._ids: set[str] = set()  # every id the current client gave back
        self._counter = itertools.count(1)
        self.submitting = True
        self._restart: float | None = None
        self._finish = False
        self._scope: trio.CancelScope | None = None

    @property
    def name(self) -> str:
        return f"c{self.index}#{self.generation}"

    # -- life ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run generations of clients until ``finish``; always stops the last one."""
        try:
            await self._start_client()
            task_status.started()
            while True:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    if not self._finish:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._workload)
                            nursery.start_soon(self._poll_loop)
                            nursery.start_soon(self._inherited_loop)
                self._scope = None
                if self._finish or self._restart is None:
                    break
                downtime, self._restart = self._restart, None
                await self._stop_client()
                await trio.sleep(downtime)
                await self._start_client()
        finally:
            with trio.CancelScope(shield=True):
                await self._final_pass()
                await self._stop_client(last=True)

    def restart(self, downtime: float) -> bool:
        """Stop this slot's client and start a new one after ``downtime`` seconds."""
        if self._scope is None or self._finish or self._restart is not None:
            return False
        self._restart = downtime
        self._scope.cancel()
        return True

    def finish(self) -> None:
        self._finish = True
        if self._scope is not None:
            self._scope.cancel()

    def required(self) -> int:
        """Tasks of this slot that must still become final."""
        return sum(1 for rec in self.live.values() if must_finish(self.history, rec)) + sum(
            1 for rec in self.inherited.values() if must_finish(self.history, rec)
        )

    async def _start_client(self) -> None:
        self.generation += 1
        self._ids = set()
        client = Client(
            self.discovery_address,
            timeout=_CLIENT_TIMEOUT,
            retries=3,
            result_cache_size=1_000_000,
        )
        op = self._op("start", None)
        await client.start()
        self._end(op, "ok")
        self.client = client

    async def _stop_client(self, last: bool = False) -> None:
        """Flush, then stop the current client, as the README advises under trio (a bare
        ``stop()`` with tasks not yet acknowledged waits for them, blocking the loop);
        unless it is the ``last`` (the campaign is over), its unfinished tasks pass to the
        next client in the slot, which can only query them."""
        client, self.client = self.client, None
        if client is None:
            return
        self._collect(client)
        self._find_strays(client)
        op = self._op("flush", _CLIENT_TIMEOUT)
        try:
            await client.flush(timeout=_CLIENT_TIMEOUT)
            self._end(op, "ok")
        except ControlPlaneUnavailableError as exc:
            self._end(op, "timeout", str(exc))
        op = self._op("stop", None)
        client.stop(timeout=_STOP_AFTER_FLUSH)
        self._end(op, "ok")
        if last:
            return
        now = time.time()
        for rec in self._waiting:
            rec.untracked = True  # its id never came back: nobody can ask about it
        self._waiting.clear()
        for task_id, rec in self.live.items():
            rec.owner_gone_at = now
            self.inherited[task_id] = rec
        self.live.clear()

    def _find_strays(self, client: Client) -> None:
        """Results in the client's local cache for ids other clients were given (pushed to
        the wrong one).

        The only look inside the client (its cache): there is no public listing.  Task ids
        are independent random values, so an id this client made but never gave back
        (submit_task raised) looks like any other unknown id: only ids known to belong to
        another client prove a misdirected push.
        """
        finished = getattr(getattr(client, "_core", None), "finished", None)
        if not isinstance(finished, dict):
            return
        others = {
            rec.task_id
            for rec in self.history.tasks.values()
            if rec.task_id is not None and rec.client != self.name
        }
        for task_id in finished:
            if task_id not in self._ids and task_id in others:
                self.history.strays.append((self.name, task_id))

    # -- recording ---------------------------------------------------------------

    def _op(self, kind: str, timeout: float | None, keys: list[str] | None = None) -> Op:
        op = Op(self.name, kind, time.time(), timeout=timeout, keys=keys or [])
        self.history.ops.append(op)
        return op

    @staticmethod
    def _end(op: Op, outcome: str, detail: str = "") -> None:
        op.ended = time.time()
        op.outcome = outcome
        op.detail = detail[:300]

    async def _call(
        self,
        kind: str,
        timeout: float | None,
        call: Callable[[], Awaitable[Any]],
        keys: list[str] | None = None,
    ) -> tuple[bool, Any, Op]:
        """Run one client call, recorded: (True, value, op), or (False, None, op) if it raised."""
        op = self._op(kind, timeout, keys)
        guard = (timeout if timeout is not None else INSTANT_BOUND) + _GUARD
        value: Any = None
        done = False
        with trio.move_on_after(guard) as scope:
            try:
                value = await call()
                done = True
                self._end(op, "ok")
            except QueueFullError as exc:
                self._end(op, "rejected", str(exc))
            except ControlPlaneUnavailableError as exc:
                self._end(op, "timeout", str(exc))
            except ClientStoppedError as exc:
                self._end(op, "stopped", str(exc))
            except Exception as exc:
                self._end(op, "error", f"{type(exc).__name__}: {exc}")
            except BaseException:
                if op.ended is None:
                    self._end(op, "interrupted")  # the slot restarts or the campaign ends
                raise
        if scope.cancelled_caught:
            self._end(op, "abandoned", f"no answer within {guard:g} s")
        return done, value, op

    def _new_task(self, kind: str, name: str, expect: Any, max_retries: int = 0) -> TaskRecord:
        key = f"{self.index}.{self.generation}.{next(self._counter)}"
        rec = TaskRecord(key, kind, name, self.name, time.time(), max_retries, expect)
        self.history.tasks[key] = rec
        return rec

    def _submitted(self, recs: list[TaskRecord], ids: list[str] | None) -> None:
        if ids is None:  # the call raised: nothing was submitted
            for rec in recs:
                del self.history.tasks[rec.key]
            return
        for rec, task_id in zip(recs, ids, strict=True):
            rec.task_id = task_id
            self.live[task_id] = rec
            self._ids.add(task_id)

    def _observe(self, rec: TaskRecord, result: TaskResult, via: str) -> None:
        value = result.result
        if rec.kind == "large":
            value = _digest(value)
        rec.finals.append(
            Observation(
                time.time(),
                via,
                result.status.value,
                value,
                (result.error or "")[:500] or None,
                result.task_id,
            )
        )

    def _collect(self, client: Client) -> None:
        """Record every final result the client has for our live tasks (no I/O)."""
        for task_id, rec in list(self.live.items()):
            result = client.get_result(task_id)
            if result is not None:
                self._observe(rec, result, "push")
                del self.live[task_id]
                self.recent.append(rec)
            elif not rec.acked and client.get_status(task_id) == TaskStatus.QUEUED:
                rec.acked = True

    async def _poll_loop(self) -> None:
        while True:
            if self.client is not None:
                self._collect(self.client)
            await trio.sleep(_POLL)

    async def _inherited_loop(self) -> None:
        """Ask the control plane about the tasks of stopped clients (drains as well)."""
        while True:
            await trio.sleep(_INHERITED_EVERY)
            client = self.client
            if client is None:
                continue
            for task_id in list(self.inherited)[:_INHERITED_BATCH]:
                if await self._ask_final(client, task_id, self.inherited[task_id], "inherited"):
                    self.inherited.pop(task_id, None)

    async def _ask_final(self, client: Client, task_id: str, rec: TaskRecord, why: str) -> bool:
        """Query the control plane for one task (recorded as ``query-<why>``); True if final."""
        done, result, _ = await self._call(
            f"query-{why}",
            _QUERY_TIMEOUT,
            functools.partial(client.get_task_result, task_id, timeout=_QUERY_TIMEOUT),
            [rec.key],
        )
        if done and result is not None and TaskStatus(result.status).is_final:
            self._observe(rec, result, "query")
            return True
        return False

    async def _final_pass(self) -> None:
        """At the end: one more local look and one query per task still open."""
        client = self.client
        if client is None:
            return
        self._collect(client)
        with trio.move_on_after(_QUERY_TIMEOUT * 2):
            for task_id in list(self.live) + list(self.inherited):
                rec = self.live.get(task_id) or self.inherited[task_id]
                if await self._ask_final(client, task_id, rec, "final"):
                    self.live.pop(task_id, None)
                    self.inherited.pop(task_id, None)

    # -- the workload --------------------------------------------------------------

    async def _workload(self) -> None:
        choices = [
            (self._delay_ok, 30.0),
            (self._delay_aio, 6.0),
            (self._batch, 8.0),
            (self._submit_task, 8.0),
            (self._flaky, 5.0),
            (self._timeout, 3.0),
            (self._fail, 4.0),
            (self._block, 4.0),
            (self._countdown, 2.0),
            (self._stuck, 0.6),
            (self._large, 1.5),
            (self._crash, 0.4),
            (self._cancel, 4.0),
            (self._query, 4.0),
            (self._probe, 1.0),
        ]
        actions = [a for a, _ in choices]
        weights = [w for _, w in choices]
        async with trio.open_nursery() as waiting:
            while self.submitting:
                await trio.sleep(self.rng.uniform(0.02, 0.08))
                if not self.submitting or self.client is None:
                    break
                action = self.rng.choices(actions, weights)[0]
                await action(waiting)

    def _spawn(self, nursery: trio.Nursery, fn: Callable[[], Awaitable[None]]) -> None:
        """Start an awaited call in the background, unless enough are in flight already."""
        if len(nursery.child_tasks) < _MAX_WAITING:
            nursery.start_soon(fn)

    async def _submit_one(
        self, rec: TaskRecord, kind: str, call: Callable[[Client], Awaitable[str]]
    ) -> None:
        client = self.client
        assert client is not None
        done, task_id, _ = await self._call(kind, None, lambda: call(client), [rec.key])
        self._submitted([rec], [task_id] if done else None)

    async def _delay_ok(self, _: trio.Nursery) -> None:
        a, b = self.rng.randrange(1000), self.rng.randrange(1000)
        rec = self._new_task("ok", t.OK, None)
        rec.expect = t.expected_ok(rec.key, a, b)
        priority = self.rng.choice(("low", "normal", "high", "critical"))
        await self._submit_one(
            rec, "delay", lambda c: c.delay(t.OK, rec.key, a, b, priority=priority)
        )

    async def _delay_aio(self, _: trio.Nursery) -> None:
        a, b = self.rng.randrange(1000), self.rng.randrange(1000)
        seconds = self.rng.uniform(0.0, 0.3)
        rec = self._new_task("aio", t.AIO, None)
        rec.expect = t.expected_ok(rec.key, a, b)
        await self._submit_one(rec, "delay", lambda c: c.delay(t.AIO, rec.key, a, b, seconds))

    async def _countdown(self, _: trio.Nursery) -> None:
        a, b = self.rng.randrange(1000), self.rng.randrange(1000)
        countdown = self.rng.uniform(0.2, 2.0)
        rec = self._new_task("ok", t.OK, None)
        rec.expect = t.expected_ok(rec.key, a, b)
        await self._submit_one(
            rec, "delay-countdown", lambda c: c.delay(t.OK, rec.key, a, b, countdown=countdown)
        )

    async def _fail(self, _: trio.Nursery) -> None:
        rec = self._new_task("fail", t.FAIL, None)
        await self._submit_one(rec, "delay", lambda c: c.delay(t.FAIL, rec.key))

    async def _block(self, _: trio.Nursery) -> None:
        seconds = self.rng.uniform(0.3, 2.0)
        rec = self._new_task("block", t.BLOCK, None)
        rec.expect = t.expected_ok(rec.key, 1, 1)
        await self._submit_one(rec, "delay", lambda c: c.delay(t.BLOCK, rec.key, seconds))

    async def _flaky(self, _: trio.Nursery) -> None:
        failures = self.rng.randint(1, 2)
        rec = self._new_task("flaky", t.FLAKY, None, max_retries=failures)
        rec.expect = t.expected_ok(rec.key, failures, 0)
        await self._submit_one(
            rec,
            "apply_async",
            lambda c: c.apply_async(t.FLAKY, (rec.key, failures), max_retries=failures),
        )

    async def _timeout(self, _: trio.Nursery) -> None:
        retries = self.rng.randint(0, 1)
        rec = self._new_task("timeout", t.SLEEPY, None, max_retries=retries)
        await self._submit_one(
            rec,
            "apply_async",
            lambda c: c.apply_async(
                t.SLEEPY, (rec.key, 3.0), time_limit=0.4, max_retries=retries, retry_delay=0.2
            ),
        )

    async def _stuck(self, _: trio.Nursery) -> None:
        if not self.budget.take("stuck"):
            return
        rec = self._new_task("stuck", t.STUCK, None)
        await self._submit_one(
            rec, "apply_async", lambda c: c.apply_async(t.STUCK, (rec.key, 2.5), time_limit=0.5)
        )

    async def _large(self, _: trio.Nursery) -> None:
        if not self.budget.take("large"):
            return
        rec = self._new_task("large", t.LARGE, None)
        rec.expect = _digest(t.expected_large(rec.key, LARGE_SIZE))
        await self._submit_one(rec, "delay", lambda c: c.delay(t.LARGE, rec.key, LARGE_SIZE))

    async def _crash(self, _: trio.Nursery) -> None:
        if not self.budget.take("crash"):
            return
        rec = self._new_task("crash", t.CRASH, None)
        await self._submit_one(rec, "delay", lambda c: c.delay(t.CRASH, rec.key))

    async def _batch(self, _: trio.Nursery) -> None:
        client = self.client
        assert client is not None
        recs: list[TaskRecord] = []
        specs: list[Any] = []
        for _i in range(self.rng.randint(3, 12)):
            roll = self.rng.random()
            if roll < 0.15:
                rec = self._new_task("fail", t.FAIL, None)
                specs.append((t.FAIL, (rec.key,)))
            elif roll < 0.25:
                rec = self._new_task("block", t.BLOCK, None)
                rec.expect = t.expected_ok(rec.key, 1, 1)
                specs.append((t.BLOCK, (rec.key, self.rng.uniform(0.1, 0.5))))
            else:
                a, b = self.rng.randrange(1000), self.rng.randrange(1000)
                rec = self._new_task("ok", t.OK, None)
                rec.expect = t.expected_ok(rec.key, a, b)
                specs.append((t.OK, (rec.key, a, b)))
            recs.append(rec)
        done, ids, _op = await self._call(
            "submit_batch", None, lambda: client.submit_batch(specs), [r.key for r in recs]
        )
        self._submitted(recs, ids if done else None)

    async def burst(self, size: int) -> int:
        """Submit ``size`` quick tasks in one batch (past --max-queued); how many went in."""
        client = self.client
        if client is None:
            return 0
        recs, specs = [], []
        for _i in range(size):
            a, b = self.rng.randrange(1000), self.rng.randrange(1000)
            rec = self._new_task("burst", t.OK, None)
            rec.expect = t.expected_ok(rec.key, a, b)
            specs.append((t.OK, (rec.key, a, b)))
            recs.append(rec)
        done, ids, _ = await self._call(
            "burst", None, lambda: client.submit_batch(specs), [r.key for r in recs]
        )
        self._submitted(recs, ids if done else None)
        return len(recs) if done else 0

    async def _submit_task(self, nursery: trio.Nursery) -> None:
        client = self.client
        assert client is not None
        a, b = self.rng.randrange(1000), self.rng.randrange(1000)

        async def call() -> None:
            rec = self._new_task("ok", t.OK, None)
            rec.expect = t.expected_ok(rec.key, a, b)
            self._waiting.add(rec)
            try:
                done, result, op = await self._call(
                    "submit_task",
                    _SUBMIT_TIMEOUT,
                    lambda: client.submit_task(t.OK, (rec.key, a, b), timeout=_SUBMIT_TIMEOUT),
                    [rec.key],
                )
            except BaseException:
                rec.untracked = True  # interrupted: its id never came back
                raise
            finally:
                self._waiting.discard(rec)
            if not done:
                rec.untracked = True  # it raised: the task may exist, its id is unknown
                return
            rec.task_id = result.task_id
            self._ids.add(result.task_id)
            if TASK_GOES_ON in (result.error or ""):
                op.outcome = "timeout"
                self.live[result.task_id] = rec
            else:
                self._observe(rec, result, "submit_task")
                self.recent.append(rec)

        self._spawn(nursery, call)

    async def _cancel(self, nursery: trio.Nursery) -> None:
        client = self.client
        if client is None or not self.live:
            return
        task_id = self.rng.choice(list(self.live))
        rec = self.live[task_id]

        async def call() -> None:
            rec.cancel_sent = True
            done, took, _ = await self._call(
                "cancel",
                _QUERY_TIMEOUT,
                lambda: client.cancel_task(task_id, timeout=_QUERY_TIMEOUT),
                [rec.key],
            )
            if done and took:
                rec.cancel_took = True

        self._spawn(nursery, call)

    async def _query(self, nursery: trio.Nursery) -> None:
        client = self.client
        pool = list(self.live.values()) + list(self.recent)
        if client is None or not pool:
            return
        rec = self.rng.choice(pool)
        task_id = rec.task_id
        if task_id is None:
            return

        async def call() -> None:
            done, result, _ = await self._call(
                "query",
                _QUERY_TIMEOUT,
                lambda: client.get_task_result(task_id, timeout=_QUERY_TIMEOUT),
                [rec.key],
            )
            if done and result is not None and TaskStatus(result.status).is_final:
                self._observe(rec, result, "query")
                if self.live.pop(task_id, None) is not None:
                    self.recent.append(rec)

        self._spawn(nursery, call)

    async def _probe(self, nursery: trio.Nursery) -> None:
        client = self.client
        if client is None:
            return
        unknown = f"{self.rng.getrandbits(64):016x}-chaos-unknown"

        async def call() -> None:
            done, result, _ = await self._call(
                "probe",
                _QUERY_TIMEOUT,
                lambda: client.get_task_result(unknown, timeout=_QUERY_TIMEOUT),
            )
            if done:
                self.history.probes.append((unknown, None if result is None else repr(result)))

        self._spawn(nursery, call)
