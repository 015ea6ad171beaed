"""The Scheduler actor: accepts tasks, queues them by priority, feeds workers, collects results.

It owns the worker-facing ROUTER socket.  Flow control is credit based: a
worker announces a *window* (``Ready``), and the scheduler never has more than
that many of its tasks outstanding; every result returns a credit.  So a busy
worker is never flooded and an idle one is refilled as soon as it reports.

Task state lives here and only here; ResultCache, the gateway and the
callback dispatcher are told about finished tasks in batches, once per
incoming message, never per task.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, OrderedDict
from typing import Any

import attrs
import trio
import zmq

from .._io import DeadlineTimer, Inbound, pump_socket
from ..runtime import Actor, ActorRef, MailboxFull
from ..tasks.models import TaskStatus
from ..transport import PeerUnreachable, TransportConfig, ZSocket, open_socket
from ..wire import (
    CancelReply,
    CancelRunning,
    Dispatch,
    Done,
    Ready,
    Release,
    ResultRecord,
    Results,
    SubmitAck,
    TaskEnvelope,
    WireError,
    decode,
    encode,
)
from ._callback_payload import build_callback_payload
from ._internal import (
    CallbackJobs,
    CancelTask,
    ClientSubmits,
    HeldAcks,
    Outgoing,
    ResendResults,
    StoreResults,
    WorkerJoined,
    WorkerLost,
)
from ._queues import PriorityQueues

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger("fastworker.scheduler")

_QUEUED = TaskStatus.QUEUED
_RUNNING = TaskStatus.RUNNING
_SCHEDULED = TaskStatus.SCHEDULED
_RETRYING = TaskStatus.RETRYING
_CANCELLED = TaskStatus.CANCELLED
_STATUS_BY_VALUE = {status.value: status for status in TaskStatus}
_REPORTABLE = frozenset({"success", "failure", "cancelled", "retrying"})
_ORPHAN_MEMORY = 10_000
_ORPHAN_SECONDS = 60.0


@attrs.frozen
class SchedulerConfig:
    worker_address: str = "tcp://127.0.0.1:*"
    max_queued: int = 1_000_000  # tasks held (queued, scheduled, running) before rejecting
    max_worker_deaths: int = 3  # poison guard: runs that may kill their worker
    # Tasks queued while no worker was registered, for names no worker serves,
    # fail this long after the last worker joined (time for the others to join).
    unknown_task_grace: float = 5.0
    finished_memory: int = 200_000  # finished task ids remembered for deduplication
    allow_pickle: bool = False
    transport: TransportConfig = TransportConfig()


class _Job:
    """A task the scheduler holds (a plain slotted class: one per task, on the hot path)."""

    __slots__ = (
        "attempt",
        "client",
        "deaths",
        "envelope",
        "name",
        "priority",
        "seq",
        "status",
        "worker",
    )

    def __init__(self, envelope: TaskEnvelope, client: bytes, seq: int, status: TaskStatus) -> None:
        self.envelope = envelope
        self.client = client
        self.seq = seq
        self.status = status
        self.name = envelope.name
        self.priority = envelope.priority
        self.attempt = 1
        self.worker: bytes | None = None
        self.deaths = 0


@attrs.define(eq=False, slots=True)
class _WorkerSlot:
    identity: bytes
    names: frozenset[str] | None = None  # None until Discovery reports the registration
    window: int = 0
    inflight: dict[str, _Job] = attrs.Factory(dict)
    suspect: str | None = None  # a task here on its last chance (see _may_take)


@attrs.frozen
class _Due:
    """Timer: scheduled tasks or retries may have come due."""


def _is_queued(job: _Job) -> bool:
    return job.status is _QUEUED


def _by_size(records: list[ResultRecord], limit: int) -> list[list[ResultRecord]]:
    """Split a result push so no message nears the size limit (a large one is lost whole)."""
    chunks: list[list[ResultRecord]] = []
    chunk: list[ResultRecord] = []
    size = 0
    for record in records:
        weight = len(record.result or b"") + len(record.traceback or "") + 128
        if chunk and size + weight > limit:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(record)
        size += weight
    if chunk:
        chunks.append(chunk)
    return chunks


class Scheduler(Actor):
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        gateway: ActorRef,
        results: ActorRef,
        callbacks: ActorRef,
    ) -> None:
        super().__init__("scheduler", mailbox_size=4096)
        self.config = config
        self._gateway = gateway
        self._results = results
        self._callbacks = callbacks
        self._jobs: dict[str, _Job] = {}
        self._queues: PriorityQueues[_Job] = PriorityQueues(_is_queued)
        self._timed: list[tuple[float, int, _Job]] = []  # (due, seq, job) heap
        self._timer = DeadlineTimer(self.ref, _Due())  # eta, retries, the unserved check
        self._unserved_check = math.inf  # when to fail queued tasks nobody serves
        self._workers: dict[bytes, _WorkerSlot] = {}
        self._served: frozenset[str] = frozenset()
        self._finished: OrderedDict[str, None] = OrderedDict()  # oldest first, bounded
        # Final results for task ids we did not know when they arrived (see _keep_orphan).
        self._orphans: OrderedDict[str, tuple[float, ResultRecord]] = OrderedDict()
        self._seq = 0
        self._sock: ZSocket | None = None
        self.endpoint: str | None = None
        self._stats: Counter[str] = Counter()
        self._accepted = 0
        self._outcomes = {"success": 0, "failure": 0, "cancelled": 0}
        self._rejected: Counter[str] = Counter()
        # Output of the message being handled, flushed once at its end.
        self._out_records: list[ResultRecord] = []
        self._out_push: dict[bytes, list[Any]] = {}
        self._out_callbacks: list[tuple[str, bytes]] = []

    # -- life cycle ---------------------------------------------------------

    async def on_start(self, nursery: trio.Nursery) -> None:
        sock = open_socket(zmq.ROUTER, self.config.transport, router_handover=True)
        # Rebind the same port after a restart, so workers reconnect by themselves.
        self.endpoint = sock.bind(self.endpoint or self.config.worker_address)
        self._sock = sock
        nursery.start_soon(pump_socket, sock, self.ref)
        nursery.start_soon(self._timer.run)

    async def on_stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _schedule(self, due: float, job: _Job) -> None:
        heapq.heappush(self._timed, (due, job.seq, job))
        self._wake_at(due)

    def _wake_at(self, due: float) -> None:
        if due < self._timer.due:
            self._timer.set(due)

    # -- messages -----------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if type(message) is Inbound:
            self._on_worker_frames(message.frames)
        elif type(message) is ClientSubmits:
            self._on_submits(message)
        elif type(message) is _Due:
            self._on_due()
        elif type(message) is WorkerJoined:
            self._on_worker_joined(message)
        elif type(message) is WorkerLost:
            self._on_worker_lost(message)
        elif type(message) is CancelTask:
            self._on_cancel(message)
        elif message == "stats":
            return self.statistics_dict()
        else:
            raise TypeError(f"scheduler got an unexpected message {message!r}")
        self._flush()
        self._dispatch()
        return None

    def _flush(self) -> None:
        if self._out_records:
            self._tell(self._results, StoreResults(self._out_records), "results")
            self._out_records = []
        if self._out_push:
            messages = [
                [identity, encode(Results(chunk))]
                for identity, wires in self._out_push.items()
                if identity
                for chunk in _by_size(wires, self._max_push_bytes)
            ]
            self._out_push = {}
            if messages:
                self._tell(self._gateway, Outgoing(messages), "result pushes")
        if self._out_callbacks:
            self._tell(self._callbacks, CallbackJobs(self._out_callbacks), "callbacks")
            self._out_callbacks = []

    @property
    def _max_push_bytes(self) -> int:
        return min(4 * 1024 * 1024, self.config.transport.max_message_size // 2)

    def _tell(self, ref: ActorRef, message: object, what: str) -> None:
        try:
            ref.tell(message)
        except MailboxFull:
            # Results stay queryable (the job is finished here either way); the
            # loss is a push or a callback, counted so it is never silent.
            self._stats[f"dropped_{what.replace(' ', '_')}"] += 1
            log.warning("%s mailbox full: dropped %s", ref.name, what)

    # -- submissions --------------------------------------------------------

    def _on_submits(self, message: ClientSubmits) -> None:
        now_wall = time.time()
        now = trio.current_time()
        replies: list[list[bytes]] = []
        plain_acks: list[list[bytes]] = []
        for identity, request_id, raw_tasks in message.submits:
            rejected: list[list[str]] = []
            resend: list[str] = []
            for raw in raw_tasks:
                try:
                    envelope = TaskEnvelope.from_wire(raw)
                    if envelope.options is not None and "attempt" in envelope.options:
                        raise WireError("invalid", "option 'attempt' is set by the control plane")
                except WireError as exc:
                    self._rejected["invalid"] += 1
                    task_id = raw[0] if type(raw) is list and raw and type(raw[0]) is str else ""
                    rejected.append([task_id, "invalid", str(exc)])
                    continue
                verdict = self._accept(envelope, identity, now, now_wall)
                if verdict is None:
                    continue
                if verdict == "finished":
                    resend.append(envelope.task_id)
                else:
                    rejected.append([envelope.task_id, "queue_full", verdict])
            ack = [identity, encode(SubmitAck(request_id, rejected))]
            (replies if rejected else plain_acks).append(ack)
            if resend:
                self._tell(self._results, ResendResults(identity, resend), "result resends")
        if replies:
            self._tell(self._gateway, Outgoing(replies), "acks")
        if plain_acks:
            self._tell(self._gateway, HeldAcks(plain_acks), "acks")

    def _accept(
        self, envelope: TaskEnvelope, identity: bytes, now: float, now_wall: float
    ) -> str | None:
        """Take one task; None when accepted, else "finished" or a rejection message."""
        task_id = envelope.task_id
        known = self._jobs.get(task_id)
        if known is not None:  # a re-send: exactly-once acceptance
            known.client = identity
            self._stats["duplicate_submissions"] += 1
            return None
        if task_id in self._finished:
            self._stats["duplicate_submissions"] += 1
            return "finished"
        orphan = self._orphans.pop(task_id, None)
        if len(self._jobs) >= self.config.max_queued:
            self._rejected["queue_full"] += 1
            return (
                f"queue full: the control plane holds {len(self._jobs)} tasks "
                f"(--max-queued {self.config.max_queued}); retry later"
            )
        self._seq += 1
        job = _Job(envelope, identity, self._seq, _QUEUED)
        self._jobs[task_id] = job
        self._accepted += 1
        if orphan is not None and now - orphan[0] < _ORPHAN_SECONDS:
            # A worker finished this task for our previous instance and reported
            # to us before its client re-submitted it: that run counts.
            self._stats["recovered_results"] += 1
            self._finish(job, orphan[1])
            return None
        options = envelope.options
        eta = None if options is None else options.get("eta")
        if eta is not None and eta > now_wall:
            job.status = _SCHEDULED
            self._schedule(now + (eta - now_wall), job)
        elif self._served and envelope.name not in self._served:
            self._finish_here(job, TaskStatus.FAILURE, f"unknown task {envelope.name!r}")
        else:
            self._queues.push(job)
        return None

    def _keep_orphan(self, record: ResultRecord, now: float) -> None:
        """Remember a final result for a task we do not know (yet), for a short while.

        After a control-plane restart, workers report results of tasks the old
        instance dispatched before the clients have re-submitted them; keeping
        those results lets the re-submission finish at once instead of running
        the task again.  Bounded in count and age.
        """
        orphans = self._orphans
        orphans[record.task_id] = (now, record)
        while len(orphans) > _ORPHAN_MEMORY:
            orphans.popitem(last=False)

    def _on_due(self) -> None:
        now = trio.current_time()
        timed = self._timed
        while timed and timed[0][0] <= now:
            _, _, job = heapq.heappop(timed)
            if job.status is _SCHEDULED or job.status is _RETRYING:
                if self._served and job.name not in self._served:
                    self._finish_here(job, TaskStatus.FAILURE, f"unknown task {job.name!r}")
                    continue
                job.status = _QUEUED
                self._queues.push(job)
        if now >= self._unserved_check:
            self._unserved_check = math.inf
            self._fail_unserved()
        self._timer.set(min(timed[0][0] if timed else math.inf, self._unserved_check))

    def _fail_unserved(self) -> None:
        """Fail queued tasks whose name no registered worker serves (see unknown_task_grace).

        A name unknown at submission fails at once when workers are registered;
        this catches the ones submitted before any worker had joined.
        """
        if not self._served:
            return
        for job in self._queues.take_names_except(self._served):
            self._finish_here(
                job,
                TaskStatus.FAILURE,
                f"unknown task {job.name!r}: no connected worker serves it",
            )

    # -- workers ------------------------------------------------------------

    def _slot(self, identity: bytes) -> _WorkerSlot:
        slot = self._workers.get(identity)
        if slot is None:
            slot = self._workers[identity] = _WorkerSlot(identity)
        return slot

    def _on_worker_joined(self, message: WorkerJoined) -> None:
        slot = self._slot(message.worker_id.encode())
        slot.names = message.task_names
        self._recompute_served()
        self._unserved_check = trio.current_time() + self.config.unknown_task_grace
        self._wake_at(self._unserved_check)
        self._stats["workers_joined"] += 1

    def _on_worker_lost(self, message: WorkerLost) -> None:
        slot = self._workers.pop(message.worker_id.encode(), None)
        if slot is None:
            return
        self._recompute_served()
        died = message.reason != "left"
        back: list[_Job] = []
        for job in slot.inflight.values():
            if job.status is not _RUNNING or job.worker != slot.identity:
                continue
            job.worker = None
            if died:
                job.deaths += 1
                if job.deaths >= self.config.max_worker_deaths:
                    self._finish_here(
                        job,
                        TaskStatus.FAILURE,
                        f"poison task: its runs killed their worker {job.deaths} times "
                        f"(limit --max-worker-deaths {self.config.max_worker_deaths})",
                    )
                    continue
            job.status = _QUEUED
            back.append(job)
        self._queues.push_front(back)
        self._stats["requeued"] += len(back)
        log.log(
            logging.WARNING if died else logging.INFO,
            "worker %s %s with %d tasks in flight; %d requeued",
            message.worker_id,
            message.reason,
            len(slot.inflight),
            len(back),
        )

    def _recompute_served(self) -> None:
        names: set[str] = set()
        for slot in self._workers.values():
            if slot.names is not None:
                names |= slot.names
        self._served = frozenset(names)

    def _on_worker_frames(self, frames: list[list[bytes]]) -> None:
        for parts in frames:
            if len(parts) != 2:
                self._rejected["bad_frames"] += 1
                continue
            identity, body = parts
            try:
                message = decode(body)
            except WireError as exc:
                self._rejected[exc.reason] += 1
                continue
            if isinstance(message, Done):
                self._on_done(identity, message.results)
            elif isinstance(message, Ready):
                self._slot(identity).window = max(0, message.window)
            elif isinstance(message, Release):
                self._on_release(identity, message.task_ids)
            else:
                self._rejected["unexpected"] += 1

    def _on_release(self, identity: bytes, task_ids: list[Any]) -> None:
        slot = self._workers.get(identity)
        if slot is None:
            return
        back = []
        for task_id in task_ids:
            job = slot.inflight.pop(task_id, None) if type(task_id) is str else None
            if job is not None and job.status is _RUNNING and job.worker == identity:
                job.status = _QUEUED
                job.worker = None
                back.append(job)
        self._queues.push_front(back)
        self._stats["released"] += len(back)

    def _on_done(self, identity: bytes, raw_results: list[Any]) -> None:
        slot = self._workers.get(identity)
        now = trio.current_time()
        for raw in raw_results:
            try:
                record = ResultRecord.from_wire(raw)
            except WireError:
                self._rejected["invalid"] += 1
                continue
            task_id = record.task_id
            if record.status not in _REPORTABLE:
                self._rejected["invalid"] += 1  # a worker reports outcomes, nothing else
                continue
            if slot is not None:
                slot.inflight.pop(task_id, None)
                if slot.suspect == task_id:
                    slot.suspect = None
            job = self._jobs.get(task_id)
            if job is None or job.status not in (_RUNNING, _QUEUED):
                # Finished already (first result wins), cancelled, or unknown:
                # a late result from a worker thought dead lands here.
                self._stats["stale_results"] += 1
                if job is None and task_id not in self._finished and record.is_final:
                    self._keep_orphan(record, now)
                continue
            if job.status is _QUEUED:
                self._queues.discard(job)  # requeued, but its old run finished first
            if record.status == "retrying":
                job.status = _RETRYING
                job.worker = None
                job.attempt = record.attempts + 1
                self._stats["retried"] += 1
                self._schedule(now + (record.retry_delay or 0.0), job)
                continue
            self._finish(job, record)

    # -- finishing ----------------------------------------------------------

    def _finish_here(self, job: _Job, status: TaskStatus, error: str) -> None:
        """Finish a task with a result made by the control plane (no worker ran it to the end)."""
        now = time.time()
        record = ResultRecord(
            task_id=job.envelope.task_id,
            status=status.value,
            error=error,
            completed_at=now,
            attempts=job.attempt,
            format=job.envelope.format,
            name=job.envelope.name,
        )
        self._finish(job, record)

    def _finish(self, job: _Job, record: ResultRecord) -> None:
        task_id = record.task_id
        del self._jobs[task_id]
        job.status = _STATUS_BY_VALUE[record.status]
        finished = self._finished
        finished[task_id] = None
        if len(finished) > self.config.finished_memory:
            # OrderedDict, not dict: deleting a dict's first key scans past every
            # slot deleted before it, which made finishing O(n) after 200k tasks.
            finished.popitem(last=False)
        self._outcomes[record.status] += 1
        self._out_records.append(record)
        if job.client:
            push = self._out_push.get(job.client)
            if push is None:
                push = self._out_push[job.client] = []
            push.append(record)
        options = job.envelope.options
        address = None if options is None else options.get("cb")
        if address is not None:
            payload = build_callback_payload(
                record, job.envelope.option("cbd"), allow_pickle=self.config.allow_pickle
            )
            self._out_callbacks.append((address, payload))

    def _on_cancel(self, message: CancelTask) -> None:
        job = self._jobs.get(message.task_id)
        cancelled = False
        if job is not None:
            if job.status is _QUEUED:
                self._queues.discard(job)
            if job.status is _RUNNING and job.worker is not None and self._sock is not None:
                try:
                    self._sock.send_multipart_nowait(
                        [job.worker, encode(CancelRunning([message.task_id]))]
                    )
                except (trio.WouldBlock, PeerUnreachable):
                    pass  # the worker is gone or full; its result will be ignored anyway
            job.status = _CANCELLED  # before _finish, so queues skip it
            self._finish_here(job, _CANCELLED, "cancelled by request")
            cancelled = True
            status = _CANCELLED.value
        else:
            status = "finished" if message.task_id in self._finished else "unknown"
        # The CANCELLED result goes to the submitter ahead of the reply, so a
        # client that sees cancel_task() return True already knows the status.
        self._flush()
        reply = encode(CancelReply(message.request_id, cancelled, status))
        self._tell(self._gateway, Outgoing([[message.identity, reply]]), "cancel replies")

    # -- dispatch -----------------------------------------------------------

    def _dispatch(self) -> None:
        if not len(self._queues) or self._sock is None:
            return
        for slot in list(self._workers.values()):
            free = slot.window - len(slot.inflight)
            if free <= 0 or slot.names is None:
                continue
            batch: list[Any] = []
            jobs: list[_Job] = []
            back: list[_Job] = []
            for job in self._queues.pop_many(slot.names, free):
                if job.deaths:
                    if not self._may_take(slot, job):
                        back.append(job)  # another worker, or this one later, takes it
                        continue
                    if job.deaths >= self.config.max_worker_deaths - 1:
                        slot.suspect = job.envelope.task_id
                job.status = _RUNNING
                job.worker = slot.identity
                slot.inflight[job.envelope.task_id] = job
                envelope = job.envelope
                if job.attempt > 1:
                    envelope = envelope._replace(
                        options=dict(envelope.options or {}, attempt=job.attempt)
                    )
                batch.append(envelope)
                jobs.append(job)
            if back:
                self._queues.push_front(back)
            if batch:
                self._send_dispatch(slot, batch, jobs)
            if not len(self._queues):
                return

    def _may_take(self, slot: _WorkerSlot, job: _Job) -> bool:
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

    def _send_dispatch(self, slot: _WorkerSlot, batch: list[Any], jobs: list[_Job]) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart_nowait([slot.identity, encode(Dispatch(batch))])
        except (trio.WouldBlock, PeerUnreachable) as exc:
            # The worker vanished between its last message and now: undo, and
            # wait for Discovery to declare it lost or for it to come back.
            log.info(
                "worker %r unreachable (%s); %d tasks stay queued", slot.identity, exc, len(jobs)
            )
            for job in jobs:
                slot.inflight.pop(job.envelope.task_id, None)
                job.status = _QUEUED
                job.worker = None
                if slot.suspect == job.envelope.task_id:
                    slot.suspect = None
            self._queues.push_front(jobs)
            slot.window = 0
            return
        self._stats["dispatched"] += len(batch)

    # -- introspection ------------------------------------------------------

    def statistics_dict(self) -> dict[str, Any]:
        counts = self._queues.counts()
        running = sum(len(s.inflight) for s in self._workers.values())
        return {
            "workers_connected": sum(1 for s in self._workers.values() if s.names is not None),
            "queued": {
                "critical": counts[0],
                "high": counts[1],
                "normal": counts[2],
                "low": counts[3],
            },
            "queued_total": sum(counts),
            "running": running,
            "scheduled": sum(1 for j in self._jobs.values() if j.status in (_SCHEDULED, _RETRYING)),
            "held": len(self._jobs),
            "max_queued": self.config.max_queued,
            "succeeded": self._outcomes["success"],
            "failed": self._outcomes["failure"],
            "cancelled": self._outcomes["cancelled"],
            "accepted": self._accepted,
            "dispatched": self._stats["dispatched"],
            "retried": self._stats["retried"],
            "requeued": self._stats["requeued"],
            "released": self._stats["released"],
            "duplicate_submissions": self._stats["duplicate_submissions"],
            "stale_results": self._stats["stale_results"],
            "recovered_results": self._stats["recovered_results"],
            "dropped": {k[8:]: v for k, v in self._stats.items() if k.startswith("dropped_")},
            "rejected": dict(self._rejected),
        }
