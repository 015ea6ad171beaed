"""The Scheduler's task book: every task the control plane holds, and where it is.

This is the bookkeeping that many events touch — submissions, worker
registrations and losses, credit windows, reports of results and retries,
releases, cancels and the passing of time — kept apart from sockets, timers
and the trio loop (as pyzmq's ``_future.py`` keeps its algorithm apart from
the loop binding, and h11 its state machine apart from I/O).  One method per
event; each records what must be sent in ``out``, which the Scheduler actor
takes after every message and turns into socket sends and actor messages.
The clock is injected, so a test can drive the book through any interleaving
of events and jumps in time (tests/test_taskbook_model.py does, with
hypothesis, checking ``audit()`` after every step).

A task is in exactly one place while the book holds it:

* QUEUED — in the priority queues, once;
* SCHEDULED or RETRYING — in the due-time heap, once (stale heap entries are
  recognised by their token and skipped);
* RUNNING — in the in-flight table of exactly one registered worker;

and once final it is gone from all of them, its id remembered (bounded) so a
re-submission gets the stored result instead of a second run.  Late, stale
and duplicate messages are normal inputs: a worker declared dead may report
after its tasks were requeued, a result may arrive twice, a cancel may race
a completion.  The rules for each are in the methods below.
"""

from __future__ import annotations

import heapq
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import attrs

from ..tasks.models import TaskStatus
from ..transport import DEFAULT_MAX_MESSAGE_SIZE
from ..wire import ResultRecord, TaskEnvelope, message_budget, result_weight, task_weight
from ._deadletters import reason_for
from ._queues import PriorityQueues

__all__ = ["Effects", "TaskBook", "TaskBookConfig", "default_max_queued_bytes"]

_QUEUED = TaskStatus.QUEUED
_RUNNING = TaskStatus.RUNNING
_SCHEDULED = TaskStatus.SCHEDULED
_RETRYING = TaskStatus.RETRYING
_CANCELLED_BY_REQUEST = "cancelled by request"
_CANCELLED = TaskStatus.CANCELLED
_FAILURE = TaskStatus.FAILURE
_STATUS_BY_VALUE = {status.value: status for status in TaskStatus}
_FINAL_REPORTS = frozenset({"success", "failure"})
_REPORTABLE = frozenset({"success", "failure", "cancelled", "retrying"})
# What the control plane adds to a task when it dispatches a retry: {"attempt": n}.
_ATTEMPT_WEIGHT = 32
_MAX_WINDOW = 1 << 20
_MAX_RETRY_DELAY = 366 * 86400.0


def default_max_queued_bytes() -> int:
    """An eighth of this machine's memory, between 64 MiB and 4 GiB: tasks' own bytes held."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return max(64 << 20, min(4 << 30, memory // 8))


@attrs.frozen
class TaskBookConfig:
    max_queued: int = 1_000_000  # tasks held (queued, scheduled, running) before rejecting
    max_queued_bytes: int = attrs.field(factory=default_max_queued_bytes)
    max_worker_deaths: int = 3  # poison guard: runs that may kill their worker
    # Tasks queued while no worker was registered, for names no worker serves,
    # fail this long after the last worker joined (time for the others to join).
    unknown_task_grace: float = 5.0
    finished_memory: int = 200_000  # finished task ids remembered for deduplication
    orphan_memory: int = 10_000  # final results for ids not known (yet)
    orphan_bytes: int = 64 << 20  # ... and their bytes: a worker chooses how large they are
    orphan_seconds: float = 60.0
    unknown_peers: int = 1024  # Ready windows kept for peers not registered (yet)
    unknown_peer_seconds: float = 30.0
    # A task dispatched this long ago that its worker says it does not hold was lost.
    lost_dispatch_seconds: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE


class Job:
    """A task the book holds (a plain slotted class: one per task, on the hot path)."""

    __slots__ = (
        "accepted_at",
        "attempt",
        "cancelling",
        "client",
        "deaths",
        "due",
        "envelope",
        "key",
        "name",
        "priority",
        "sent_at",
        "sent_in",
        "seq",
        "status",
        "timer",
        "weight",
        "worker",
    )

    def __init__(self, envelope: TaskEnvelope, client: bytes, seq: int, weight: int) -> None:
        self.envelope = envelope
        self.key = envelope.task_id
        self.client = client
        self.seq = seq
        self.weight = weight
        self.status = _QUEUED
        self.name = envelope.name
        self.priority = envelope.priority
        self.attempt = 1
        self.worker: bytes | None = None
        self.deaths = 0
        self.due = 0.0
        self.sent_at = 0.0  # when it was last dispatched
        self.sent_in = 0  # the number of the Dispatch that carried it there
        self.timer = 0  # token of its live entry in the due-time heap; 0 when none
        self.accepted_at = 0.0  # the book's clock when it was accepted (ages, round trips)
        # Cancelled while at a worker: it ends with that run, never runs again.
        self.cancelling = False


@attrs.define(eq=False)
class Slot:
    """A registered worker: what it serves, its credit window, what it holds."""

    identity: bytes
    names: frozenset[str]
    window: int = 0
    inflight: dict[str, Job] = attrs.Factory(dict)
    suspect: str | None = None  # a task here on its last chance (see _may_take)
    dispatched: int = 0  # the number of the last Dispatch to this worker


@attrs.define
class Effects:
    """What the events since the last ``take()`` require to be sent."""

    # Final results, for the result cache, in the order they were decided.
    records: list[ResultRecord] = attrs.Factory(list)
    # When each of ``records``' tasks was accepted (the book's clock), for round trips.
    accepted_at: list[float] = attrs.Factory(list)
    # Final results to push to each submitting client.
    pushes: dict[bytes, list[ResultRecord]] = attrs.Factory(dict)
    # (callback address, final result, encoded callback data) per task asking for one.
    # (address, record, callback data, the receiver's CURVE key or None)
    callbacks: list[tuple[str, ResultRecord, bytes | None, bytes | None]] = attrs.Factory(list)
    # Tasks to send to each worker, in dispatch order, with their total weight
    # (an upper bound of their encoded size: the binding splits only what needs it)
    # and the Dispatch's number (a split one numbers its later parts by ``renumber``).
    dispatches: list[tuple[bytes, list[TaskEnvelope], int, int]] = attrs.Factory(list)
    # Empty Dispatches to send, (worker, number): markers that tell lost from late (holding).
    markers: list[tuple[bytes, int]] = attrs.Factory(list)
    # Task ids each worker should stop running.
    cancels: dict[bytes, list[str]] = attrs.Factory(dict)
    # Finished task ids re-submitted by a client: push their stored result again.
    resends: dict[bytes, list[str]] = attrs.Factory(dict)
    # Tasks that failed for good, for the dead letters: (task as submitted, its
    # final result, why it is dead — see _deadletters.REASONS).
    dead: list[tuple[TaskEnvelope, ResultRecord, str]] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(
            self.records
            or self.pushes
            or self.callbacks
            or self.dispatches
            or self.markers
            or self.cancels
            or self.resends
            or self.dead
        )


class TaskBook:
    def __init__(
        self,
        config: TaskBookConfig,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._now = clock
        self._wall = wall_clock
        self._budget = message_budget(config.max_message_size)
        self.out = Effects()
        self._jobs: dict[str, Job] = {}
        self._held_bytes = 0
        self._queues: PriorityQueues[Job] = PriorityQueues()
        self._heap: list[tuple[float, int, Job]] = []  # (due, token, job)
        self._timed = 0  # jobs SCHEDULED or RETRYING (live heap entries)
        self._tokens = 0
        self._unserved_check = math.inf  # when to fail queued tasks nobody serves
        self._workers: dict[bytes, Slot] = {}
        # The workers with free credit: dispatch looks at these only, so a message
        # costs nothing per worker whose window is full (4 096 full workers: 108 µs).
        self._hungry: dict[bytes, Slot] = {}
        self._served: frozenset[str] = frozenset()
        self._unknown_peers: OrderedDict[bytes, tuple[int, float]] = OrderedDict()
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest first, bounded
        # Final results for task ids we did not know when they arrived (see _keep_orphan).
        self._orphans: OrderedDict[str, tuple[float, ResultRecord]] = OrderedDict()
        self._orphan_bytes = 0
        self._seq = 0
        self._accepted = 0
        self._outcomes = {"success": 0, "failure": 0, "cancelled": 0}
        self.stats: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()

    def take(self) -> Effects:
        """What must be sent now; the book starts a fresh ``out`` (unless nothing was due)."""
        out = self.out
        if out:
            self.out = Effects()
        return out

    # -- submissions --------------------------------------------------------

    def submit(self, client: bytes, envelope: TaskEnvelope) -> tuple[str, str] | None:
        """Take one validated task; None when accepted (or known), else (reason, message).

        A re-submitted id that is held is acknowledged again and nothing else
        (exactly-once acceptance); one that finished gets its stored result
        pushed again.
        """
        task_id = envelope.task_id
        known = self._jobs.get(task_id)
        if known is not None:
            known.client = client
            self.stats["duplicate_submissions"] += 1
            return None
        if task_id in self._finished:
            self.stats["duplicate_submissions"] += 1
            self.out.resends.setdefault(client, []).append(task_id)
            return None
        weight = task_weight(envelope) + _ATTEMPT_WEIGHT
        if weight > self._budget:
            self.rejected["too_large"] += 1
            return (
                "too_large",
                f"task {task_id} needs {weight} bytes in a message; the control plane's "
                f"limit leaves {self._budget} (--max-message-size "
                f"{self.config.max_message_size})",
            )
        if len(self._jobs) >= self.config.max_queued:
            self.rejected["queue_full"] += 1
            return (
                "queue_full",
                f"queue full: the control plane holds {len(self._jobs)} tasks "
                f"(--max-queued {self.config.max_queued}); retry later",
            )
        if self._held_bytes + weight > self.config.max_queued_bytes:
            self.rejected["queue_full"] += 1
            return (
                "queue_full",
                f"queue full: the control plane holds {self._held_bytes} bytes of tasks "
                f"(--max-queued-bytes {self.config.max_queued_bytes}); retry later",
            )
        now = self._now()
        self._seq += 1
        job = Job(envelope, client, self._seq, weight)
        job.accepted_at = now
        self._jobs[task_id] = job
        self._held_bytes += weight
        self._accepted += 1
        # Only a client's task takes an orphan: a tick's id is known in advance, and a
        # worker must not decide a task it was never given.
        orphan = self._pop_orphan(task_id) if client else None
        if orphan is not None and now - orphan[0] < self.config.orphan_seconds:
            # A worker finished this task for our previous instance and reported
            # to us before its client re-submitted it: that run counts.
            self.stats["recovered_results"] += 1
            self._finish(job, orphan[1])
            return None
        eta = envelope.option("eta")
        wall = self._wall()
        if eta is not None and eta > wall:
            self._time(job, _SCHEDULED, now + min(eta - wall, _MAX_RETRY_DELAY))
        elif self._served and envelope.name not in self._served:
            self._finish_here(job, _FAILURE, f"unknown task {envelope.name!r}")
        else:
            self._queues.push(job)
        return None

    def remember_finished(self, task_ids: list[str]) -> None:
        """Ids that finished under a previous instance (read from its journal): a
        re-submission of one gets its stored result pushed again, not a second run."""
        finished = self._finished
        for task_id in task_ids:
            if task_id not in self._jobs:
                finished[task_id] = None
        while len(finished) > self.config.finished_memory:
            finished.popitem(last=False)

    def revive(self, client: bytes, envelope: TaskEnvelope) -> tuple[str, str] | None:
        """Queue a finished task again under its own id (a dead letter retried).

        Its id leaves the finished memory first, or ``submit`` would take it
        for a re-submission; it runs from attempt 1.  None when queued, else
        (reason, message) as from ``submit``.
        """
        if envelope.task_id in self._jobs:
            return ("held", f"task {envelope.task_id} is held already")
        self._finished.pop(envelope.task_id, None)
        return self.submit(client, envelope)

    def _keep_orphan(self, record: ResultRecord) -> None:
        """Remember a final result for a task we do not know (yet), for a short while.

        After a control-plane restart, workers report results of tasks the old
        instance dispatched before the clients have re-submitted them; keeping
        those results lets the re-submission finish at once instead of running
        the task again.  Bounded in count, bytes and age.
        """
        self._pop_orphan(record.task_id)
        self._orphans[record.task_id] = (self._now(), record)
        self._orphan_bytes += result_weight(record)
        while self._orphans and (
            len(self._orphans) > self.config.orphan_memory
            or self._orphan_bytes > self.config.orphan_bytes
        ):
            self._pop_orphan(next(iter(self._orphans)))

    def _pop_orphan(self, task_id: str) -> tuple[float, ResultRecord] | None:
        orphan = self._orphans.pop(task_id, None)
        if orphan is not None:
            self._orphan_bytes -= result_weight(orphan[1])
        return orphan

    # -- time ---------------------------------------------------------------

    def _time(self, job: Job, status: TaskStatus, due: float) -> None:
        self._tokens += 1
        job.status = status
        job.due = due
        job.timer = self._tokens
        self._timed += 1
        heapq.heappush(self._heap, (due, self._tokens, job))

    def _untime(self, job: Job) -> None:
        """Forget a timed job's heap entry (it stays in the heap until due, then is skipped)."""
        job.timer = 0
        self._timed -= 1
        heap = self._heap
        if len(heap) > 2 * self._timed + 64:
            # Far-future entries of cancelled tasks must not pile up.
            self._heap = [entry for entry in heap if entry[2].timer == entry[1]]
            heapq.heapify(self._heap)

    def next_deadline(self) -> float:
        """When ``advance`` next has something to do (may be early, never late)."""
        return min(self._heap[0][0] if self._heap else math.inf, self._unserved_check)

    def advance(self) -> None:
        """Time passed: queue what came due, fail what nobody serves, forget old orphans."""
        now = self._now()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token, job = heapq.heappop(heap)
            if job.timer != token:
                continue  # cancelled, or finished by a late report, while waiting
            job.timer = 0
            self._timed -= 1
            if self._served and job.name not in self._served:
                self._finish_here(job, _FAILURE, f"unknown task {job.name!r}")
                continue
            job.status = _QUEUED
            self._queues.push(job)
        if now >= self._unserved_check:
            self._unserved_check = math.inf
            self._fail_unserved()
        orphans = self._orphans
        while orphans and now - next(iter(orphans.values()))[0] >= self.config.orphan_seconds:
            self._pop_orphan(next(iter(orphans)))
        peers = self._unknown_peers
        while peers and now - next(iter(peers.values()))[1] >= self.config.unknown_peer_seconds:
            peers.popitem(last=False)

    def _fail_unserved(self) -> None:
        """Fail queued tasks whose name no registered worker serves (see unknown_task_grace).

        A name unknown at submission fails at once when workers are registered;
        this catches the ones submitted before any worker had joined.
        """
        if not self._served:
            return
        for job in self._queues.take_names_except(self._served):
            self._finish_here(
                job, _FAILURE, f"unknown task {job.name!r}: no connected worker serves it"
            )

    # -- workers ------------------------------------------------------------

    def worker_joined(self, worker: bytes, names: frozenset[str]) -> None:
        """A worker registered (or registered again, perhaps serving other names)."""
        slot = self._workers.get(worker)
        if slot is None:
            window = self._unknown_peers.pop(worker, (0, 0.0))[0]
            slot = self._workers[worker] = Slot(worker, names, window)
        else:
            slot.names = names
        self._credit(slot)
        self._recompute_served()
        self._unserved_check = self._now() + self.config.unknown_task_grace
        self.stats["workers_joined"] += 1

    def worker_lost(self, worker: bytes, died: bool) -> None:
        """A worker left (``died`` False: on purpose) or was declared dead: requeue its tasks.

        A death counts against every task the worker held (the poison guard):
        a task whose runs killed ``max_worker_deaths`` workers fails instead
        of being requeued.
        """
        self._unknown_peers.pop(worker, None)
        slot = self._workers.pop(worker, None)
        self._hungry.pop(worker, None)
        if slot is None:
            return
        self._recompute_served()
        back: list[Job] = []
        for job in slot.inflight.values():
            job.worker = None
            if job.cancelling:
                self._finish_here(job, _CANCELLED, _CANCELLED_BY_REQUEST)
                continue
            if died:
                job.deaths += 1
                if job.deaths >= self.config.max_worker_deaths:
                    self._finish_here(
                        job,
                        _FAILURE,
                        f"poison task: its runs killed their worker {job.deaths} times "
                        f"(limit --max-worker-deaths {self.config.max_worker_deaths})",
                        dead="poison",
                    )
                    continue
            job.status = _QUEUED
            back.append(job)
        slot.inflight.clear()
        self._queues.push_front(back)
        self.stats["requeued"] += len(back)

    def _recompute_served(self) -> None:
        names: set[str] = set()
        for slot in self._workers.values():
            names |= slot.names
        self._served = frozenset(names)

    def ready(self, worker: bytes, window: int) -> None:
        """A worker's credit window: how many tasks it may hold at once (absolute)."""
        window = min(max(0, window), _MAX_WINDOW)
        slot = self._workers.get(worker)
        if slot is not None:
            slot.window = window
            self._credit(slot)
            return
        # Not registered (yet): its registration may still be on its way to us.
        # Remember the window a short while, bounded, and never dispatch to it.
        self.stats["ready_from_unknown"] += 1
        peers = self._unknown_peers
        peers.pop(worker, None)
        peers[worker] = (window, self._now())
        while len(peers) > self.config.unknown_peers:
            peers.popitem(last=False)

    def holding(self, worker: bytes, task_ids: list[str], seen: int | None = None) -> None:
        """A worker lists every task it holds: queue again what never reached it.

        A Dispatch sent into a connection that broke (half-open, cut) is lost
        without a trace, and its tasks would stay RUNNING here for as long as
        the worker lives, their credits used.  ``seen`` is the number of the
        last Dispatch the worker had received when it made the list: a task
        sent in a Dispatch numbered up to that and not listed never arrived,
        and is queued again, in front.  A task sent later may be on its way
        however long ago it was sent (a stalled link delivers a list and the
        Dispatch after it both late; judging by age ran such tasks twice), or
        lost with no Dispatch after it to say so (its worker's window full of
        such tasks, none would ever come).  So when one of them is at least
        ``lost_dispatch_seconds`` old the worker is sent an empty Dispatch, a
        marker: it travels behind the one in question, and the first list that
        names it settles the matter.  Without a ``seen`` this book issued (a
        peer that does not send it), a task dispatched at least
        ``lost_dispatch_seconds`` ago and not listed stands for a lost one.
        """
        slot = self._workers.get(worker)
        if slot is None:
            return
        held = set(task_ids)
        cutoff = self._now() - self.config.lost_dispatch_seconds
        if seen is not None and 0 < seen <= slot.dispatched:
            lost = [
                job for key, job in slot.inflight.items() if key not in held and job.sent_in <= seen
            ]
            if any(
                key not in held and job.sent_in > seen and job.sent_at <= cutoff
                for key, job in slot.inflight.items()
            ):
                slot.dispatched += 1
                self.out.markers.append((worker, slot.dispatched))
                self.stats["dispatch_markers"] += 1
        else:
            lost = [
                job
                for key, job in slot.inflight.items()
                if key not in held and job.sent_at <= cutoff
            ]
        for job in lost:
            self._leave_worker(slot, job)
            job.status = _QUEUED
        self._queues.push_front(self._not_cancelling(lost))
        self.stats["lost_dispatches"] += len(lost)

    def renumber(self, worker: bytes, task_ids: list[str]) -> int:
        """A number for one more Dispatch to ``worker``, carrying ``task_ids`` (the
        later parts of a batch the binding split by bytes)."""
        slot = self._workers.get(worker)
        if slot is None:
            return 0
        slot.dispatched += 1
        for task_id in task_ids:
            job = slot.inflight.get(task_id)
            if job is not None:
                job.sent_in = slot.dispatched
        return slot.dispatched

    def release(self, worker: bytes, task_ids: list[str]) -> None:
        """A worker hands back tasks it will not start (draining): queue them again, in front."""
        slot = self._workers.get(worker)
        if slot is None:
            return
        back = []
        for task_id in task_ids:
            job = slot.inflight.pop(task_id, None)
            if job is None:
                continue
            if slot.suspect == task_id:
                slot.suspect = None
            job.status = _QUEUED
            job.worker = None
            back.append(job)
        self._credit(slot)
        self._queues.push_front(self._not_cancelling(back))
        self.stats["released"] += len(back)

    def report(self, worker: bytes, record: ResultRecord) -> None:
        """A worker reports a validated result: success, failure, retrying or cancelled.

        * A final result (success or failure) for a task the book holds ends
          it, wherever the task is: the first final result wins.  If another
          worker runs the task meanwhile (this one was thought dead), that run
          is told to stop.
        * ``retrying`` counts only from the worker the task runs at; from any
          other it is stale (the task was requeued and will run again anyway).
        * ``cancelled`` counts only from the worker the task runs at (a run
          that cancelled itself, or that ``cancel`` asked to stop): final.
        * A task cancelled while at a worker (``cancelling``) ends with that
          run: a ``retrying`` report, a release or a lost worker finish it as
          CANCELLED instead of running it again.
        * Anything for a task the book does not hold is stale; a registered
          worker's final result for an id never seen is kept a while as an
          orphan (see _keep_orphan).
        * A report from a peer that is not a registered worker changes no task
          the book holds.
        """
        if record.status not in _REPORTABLE:
            self.rejected["invalid"] += 1  # a worker reports outcomes, nothing else
            return
        task_id = record.task_id
        slot = self._workers.get(worker)
        job = self._jobs.get(task_id)
        if job is None:
            self.stats["stale_results"] += 1
            if task_id in self._finished or record.status not in _FINAL_REPORTS:
                return
            if slot is None:
                # An unregistered peer's result for an id not submitted yet would
                # finish that task when it comes (a periodic tick's id is known in
                # advance): only a registered worker's is kept.
                self.rejected["unregistered"] += 1
                return
            self._keep_orphan(record)
            return
        if slot is None:
            # Only a registered worker may end a task (a peer that never registered,
            # or one declared dead and not back yet): the task runs as planned.
            self.stats["stale_results"] += 1
            self.rejected["unregistered"] += 1
            return
        here = job.status is _RUNNING and job.worker == worker
        status = record.status
        if status not in _FINAL_REPORTS:
            if not here:
                self.stats["stale_results"] += 1
                return
            self._leave_worker(slot, job)
            if status == "retrying" and job.cancelling:
                self._finish_here(job, _CANCELLED, _CANCELLED_BY_REQUEST)  # not retried
            elif status == "retrying":
                job.attempt += 1
                self.stats["retried"] += 1
                delay = min(record.retry_delay or 0.0, _MAX_RETRY_DELAY)
                self._time(job, _RETRYING, self._now() + delay)
            else:  # cancelled by the run itself: final, or it would loop
                self._finish(job, record)
            return
        if job.status is _RUNNING:
            assert job.worker is not None
            holder = self._workers[job.worker]
            self._leave_worker(holder, job)
            if not here:
                self.out.cancels.setdefault(holder.identity, []).append(task_id)
        elif job.status is _QUEUED:
            self._queues.remove(job)  # requeued, but its old run finished first
        else:
            self._untime(job)
        self._finish(job, record)

    def _leave_worker(self, slot: Slot, job: Job) -> None:
        del slot.inflight[job.key]
        job.worker = None
        if slot.suspect == job.key:
            slot.suspect = None
        self._credit(slot)

    def _credit(self, slot: Slot) -> None:
        """Keep ``_hungry`` true for ``slot``: in it exactly while it has free credit."""
        if slot.window > len(slot.inflight):
            self._hungry[slot.identity] = slot
        else:
            self._hungry.pop(slot.identity, None)

    # -- cancel -------------------------------------------------------------

    def cancel(self, task_id: str) -> tuple[bool, str]:
        """Cancel a task the book holds: (cancelled, the task's status after it).

        True only when the task will not run.  One handed to a worker may have
        started, and a thread cannot be stopped: the worker is asked to drop it
        (or interrupt it), the answer is (False, "running"), and the worker's
        report decides how it ends (``cancelled`` if it never started).
        """
        job = self._jobs.get(task_id)
        if job is None:
            return False, "finished" if task_id in self._finished else "unknown"
        if job.status is _QUEUED:
            self._queues.remove(job)
        elif job.status is _RUNNING:
            assert job.worker is not None
            job.cancelling = True
            self.out.cancels.setdefault(self._workers[job.worker].identity, []).append(task_id)
            return False, _RUNNING.value
        else:
            self._untime(job)
        self._finish_here(job, _CANCELLED, _CANCELLED_BY_REQUEST)
        return True, _CANCELLED.value

    def _not_cancelling(self, jobs: list[Job]) -> list[Job]:
        """Jobs going back to the queue, less those cancelled at a worker: they end now."""
        back = []
        for job in jobs:
            if job.cancelling:
                self._finish_here(job, _CANCELLED, _CANCELLED_BY_REQUEST)
            else:
                back.append(job)
        return back

    # -- finishing ----------------------------------------------------------

    def _finish_here(
        self, job: Job, status: TaskStatus, error: str, dead: str | None = None
    ) -> None:
        """Finish a task with a result made by the control plane (no worker ran it to the end)."""
        envelope = job.envelope
        record = ResultRecord(
            task_id=envelope.task_id,
            status=status.value,
            error=error,
            completed_at=self._wall(),
            attempts=job.attempt,
            format=envelope.format,
            name=envelope.name,
        )
        self._finish(job, record, dead)

    def fail(self, task_id: str, error: str) -> None:
        """Fail a held task that cannot go on (the binding could not send it)."""
        job = self._jobs.get(task_id)
        if job is None:
            return
        if job.status is _RUNNING:
            assert job.worker is not None
            self._leave_worker(self._workers[job.worker], job)
        elif job.status is _QUEUED:
            self._queues.remove(job)
        else:
            self._untime(job)
        self._finish_here(job, _FAILURE, error, dead="too_large")

    def _finish(self, job: Job, record: ResultRecord, dead: str | None = None) -> None:
        """``job`` has left every place; record its final result and what to send.

        A failure is a dead letter too: ``dead`` says why when the book
        decided it, else the worker's error does (``reason_for``).
        """
        task_id = job.key
        del self._jobs[task_id]
        self._held_bytes -= job.weight
        job.status = _STATUS_BY_VALUE[record.status]
        finished = self._finished
        finished[task_id] = None
        if len(finished) > self.config.finished_memory:
            # OrderedDict, not dict: deleting a dict's first key scans past every
            # slot deleted before it, which makes finishing O(n) over time.
            finished.popitem(last=False)
        self._outcomes[record.status] += 1
        out = self.out
        out.records.append(record)
        out.accepted_at.append(job.accepted_at)
        if job.client:
            push = out.pushes.get(job.client)
            if push is None:
                push = out.pushes[job.client] = []
            push.append(record)
        options = job.envelope.options
        address = None if options is None else options.get("cb")
        if address is not None:
            out.callbacks.append(
                (address, record, options.get("cbd"), options.get("cbk"))  # type: ignore[union-attr]
            )
        if record.status == "failure":
            out.dead.append((job.envelope, record, dead or reason_for(record)))

    # -- dispatch -----------------------------------------------------------

    def dispatch(self) -> None:
        """Give every worker with free credit the best tasks it serves."""
        queues = self._queues
        if not len(queues):
            return
        for slot in list(self._hungry.values()):
            free = slot.window - len(slot.inflight)
            batch: list[TaskEnvelope] = []
            back: list[Job] = []
            inflight = slot.inflight
            now = self._now()
            weight = 0
            number = slot.dispatched + 1
            for job in queues.pop_many(slot.names, free):
                if job.deaths:
                    if not self._may_take(slot, job):
                        back.append(job)  # another worker, or this one later, takes it
                        continue
                    if job.deaths >= self.config.max_worker_deaths - 1:
                        slot.suspect = job.key
                job.status = _RUNNING
                job.worker = slot.identity
                job.sent_at = now
                job.sent_in = number
                weight += job.weight
                inflight[job.key] = job
                envelope = job.envelope
                if job.attempt > 1:
                    envelope = envelope._replace(
                        options=dict(envelope.options or {}, attempt=job.attempt)
                    )
                batch.append(envelope)
            if back:
                queues.push_front(back)
            self._credit(slot)
            if batch:
                slot.dispatched = number
                self.out.dispatches.append((slot.identity, batch, weight, number))
                self.stats["dispatched"] += len(batch)
            if not len(queues):
                return

    def _may_take(self, slot: Slot, job: Job) -> bool:
        """Whether a task that was on dying workers may go to ``slot`` now (poison guard).

        A death counts against every task its worker held, so a poison task
        must not keep dying in company: a task on its *last chance* (one death
        short of the limit) runs on a worker that holds no other such suspect
        and no task with a death at all, and a worker holding a last-chance
        task takes no other task with a death.  Tasks with fewer deaths run
        freely, so recovering from one crash costs no parallelism.  An innocent
        task can then reach at most ``limit - 1`` deaths from one poison task.
        """
        if slot.suspect is not None:
            return False
        if job.deaths >= self.config.max_worker_deaths - 1:
            return not any(held.deaths for held in slot.inflight.values())
        return True

    def unsent(self, worker: bytes, task_ids: list[str]) -> None:
        """A dispatch could not be sent (the worker vanished): queue its tasks again.

        The worker gets no more until it announces a window again.
        """
        slot = self._workers.get(worker)
        if slot is None:
            return
        back = []
        for task_id in task_ids:
            job = slot.inflight.get(task_id)
            if job is not None:
                self._leave_worker(slot, job)
                job.status = _QUEUED
                back.append(job)
        self._queues.push_front(self._not_cancelling(back))
        slot.window = 0
        self._credit(slot)

    # -- introspection ------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def status_of(self, task_id: str) -> TaskStatus | None:
        job = self._jobs.get(task_id)
        return None if job is None else job.status

    def is_finished(self, task_id: str) -> bool:
        return task_id in self._finished

    @property
    def accepted(self) -> int:
        """Tasks accepted since the book was made (duplicates not counted)."""
        return self._accepted

    def oldest_queued(self) -> list[float | None]:
        """Per priority (CRITICAL first), when the oldest queued task was accepted; None if none.

        Reads the head of each (priority, name) queue: O(names), for a scrape, not the hot path.
        """
        return [
            min((job.accepted_at for job in heads), default=None) for heads in self._queues.heads()
        ]

    def inflight_by_worker(self) -> dict[bytes, int]:
        """Tasks dispatched to each registered worker and not reported yet."""
        return {identity: len(slot.inflight) for identity, slot in self._workers.items()}

    def describe(self, task_id: str) -> dict[str, Any] | None:
        """Where a held task is, for a person looking it up; None when not held."""
        job = self._jobs.get(task_id)
        if job is None:
            return None
        return {
            "task_id": task_id,
            "status": job.status.value,
            "name": job.name,
            "priority": job.priority,
            "attempt": job.attempt,
            "worker": None if job.worker is None else job.worker.decode(errors="replace"),
            "age": self._now() - job.accepted_at,
        }

    def statistics(self) -> dict[str, Any]:
        counts = self._queues.counts()
        return {
            "workers_connected": len(self._workers),
            "queued": {
                "critical": counts[0],
                "high": counts[1],
                "normal": counts[2],
                "low": counts[3],
            },
            "queued_total": sum(counts),
            "running": sum(len(s.inflight) for s in self._workers.values()),
            "scheduled": self._timed,
            "held": len(self._jobs),
            "held_bytes": self._held_bytes,
            "max_queued": self.config.max_queued,
            "max_queued_bytes": self.config.max_queued_bytes,
            "succeeded": self._outcomes["success"],
            "failed": self._outcomes["failure"],
            "cancelled": self._outcomes["cancelled"],
            "accepted": self._accepted,
            "dispatched": self.stats["dispatched"],
            "retried": self.stats["retried"],
            "requeued": self.stats["requeued"],
            "released": self.stats["released"],
            "duplicate_submissions": self.stats["duplicate_submissions"],
            "stale_results": self.stats["stale_results"],
            "recovered_results": self.stats["recovered_results"],
            "ready_from_unknown": self.stats["ready_from_unknown"],
            "lost_dispatches": self.stats["lost_dispatches"],
            "dispatch_markers": self.stats["dispatch_markers"],
        }

    def audit(self) -> list[str]:
        """Every broken invariant, as text (empty when sound); O(tasks), for tests.

        Each held task is in exactly one place matching its status; counts
        equal entries and none is negative; no worker holds more than it has
        ever been allowed; finished ids are not held; bounds hold.
        """
        problems: list[str] = []
        places: Counter[str] = Counter()
        queued = list(self._queues.items())
        for job in queued:
            places[job.key] += 1
            if job.status is not _QUEUED:
                problems.append(f"{job.key} is in a queue but {job.status.value}")
        counts = self._queues.counts()
        if any(c < 0 for c in counts) or sum(counts) != len(queued):
            problems.append(f"queue counts {counts} but {len(queued)} entries")
        live_timers = 0
        for _, token, job in self._heap:
            if job.timer == token:
                live_timers += 1
                places[job.key] += 1
                if job.status not in (_SCHEDULED, _RETRYING):
                    problems.append(f"{job.key} has a timer but is {job.status.value}")
        if live_timers != self._timed or self._timed < 0:
            problems.append(f"timed count {self._timed} but {live_timers} live timers")
        hungry = {i for i, s in self._workers.items() if s.window > len(s.inflight)}
        if set(self._hungry) != hungry:
            problems.append(f"workers with credit {sorted(hungry)} but {sorted(self._hungry)}")
        for identity, slot in self._workers.items():
            for key, job in slot.inflight.items():
                places[key] += 1
                if job.status is not _RUNNING or job.worker != identity or job.key != key:
                    problems.append(f"{key} at worker {identity!r} but {job.status.value}")
        for key, job in self._jobs.items():
            if places[key] != 1:
                problems.append(f"{key} ({job.status.value}) is in {places[key]} places")
            if key in self._finished:
                problems.append(f"{key} is held and finished")
        for key in places:
            if key not in self._jobs:
                problems.append(f"{key} is placed but not held")
        weight = sum(job.weight for job in self._jobs.values())
        if weight != self._held_bytes:
            problems.append(f"held bytes {self._held_bytes} but tasks weigh {weight}")
        if len(self._jobs) > self.config.max_queued:
            problems.append(f"{len(self._jobs)} tasks held over --max-queued")
        if self._held_bytes > self.config.max_queued_bytes:
            problems.append(f"{self._held_bytes} bytes held over --max-queued-bytes")
        if len(self._finished) > self.config.finished_memory:
            problems.append("finished memory over its bound")
        if len(self._orphans) > self.config.orphan_memory:
            problems.append("orphan memory over its bound")
        orphan_bytes = sum(result_weight(record) for _, record in self._orphans.values())
        if orphan_bytes != self._orphan_bytes or orphan_bytes > self.config.orphan_bytes:
            problems.append(f"orphans weigh {orphan_bytes}, counted {self._orphan_bytes}")
        if len(self._unknown_peers) > self.config.unknown_peers:
            problems.append("unknown peers over their bound")
        if self._served != frozenset().union(*(s.names for s in self._workers.values())):
            problems.append("served names out of date")
        return problems
