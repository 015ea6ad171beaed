"""The Scheduler actor: the binding of the task book to the worker socket, timers and actors.

All task bookkeeping — queues, due times, worker slots and credit windows,
finished and orphan memory, the poison guard — is the ``TaskBook``
(``_taskbook.py``), a socket-free class proven by a stateful model test.
This actor owns the worker-facing ROUTER socket; it decodes and validates
what arrives, feeds the book one event at a time, and sends what the book
says must be sent: dispatches to workers (split by bytes), cancels, results
to the ResultCache, pushes to clients through the Gateway, documents to the
Callback dispatcher — in batches, once per incoming message, never per task.

The actor also owns the schedules (``_schedules.py``) and the dead letters
(``_deadletters.py``): a tick that comes due is a task submitted to the book
like any other (so exactly one run per tick, whatever the workers), and a
task the book finishes as a failure becomes a dead letter.  The one timer
serves the book's due times and the schedules' next tick.

Flow control is credit based: a worker announces a *window* (``Ready``), and
the book never has more than that many of its tasks outstanding; every
result returns a credit.  So a busy worker is never flooded and an idle one
is refilled as soon as it reports.

With a journal (``--journal``, design/durability.md), the tasks a message
accepted and the results it decided are added to the ``JournalQueue``, and
that message's acks go out only after the journal's next commit; while the
journal is behind or cannot write, new tasks are refused (``queue_full``).
What changed in the schedules and dead letters goes in the same commit
(``_journal_state.py``), and so does each tick's task; replies to
``ScheduleAdd``/``ScheduleRemove`` wait for it.  Nothing else here waits for
the disk.

An exception while handling one message is logged and counted
(``internal_errors``) and the actor keeps serving: bookkeeping must never
take the control plane down with it.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from typing import Any

import attrs
import trio
import zmq

from .._io import DeadlineTimer, Inbound, bind_again, pump_socket
from ..runtime import Actor, ActorRef, ActorStopped, GetStatistics, MailboxFull
from ..security import WORKER, KeyRing
from ..transport import TransportConfig, ZSocket, open_socket
from ..wire import (
    CancelReply,
    CancelRunning,
    DeadLetterRetry,
    DeadLetterRetryReply,
    Dispatch,
    Done,
    Ready,
    Release,
    ResultRecord,
    Results,
    ScheduleAdd,
    ScheduleRemove,
    SubmitAck,
    TaskEnvelope,
    Unregister,
    WireError,
    decode,
    encode,
    error_reply,
    message_budget,
    result_chunks,
    split_by_bytes,
    task_weight,
)
from ._callback_payload import build_callback_payload
from ._deadletters import DeadLetters, DeadLettersConfig
from ._internal import (
    CallbackJobs,
    CancelTask,
    ClientRequest,
    ClientSubmits,
    DeclaredSchedules,
    EvictWorker,
    HeldAcks,
    LookupTask,
    MetricsQuery,
    Outgoing,
    ResendResults,
    StoreResults,
    WorkerJoined,
    WorkerLost,
)
from ._journal_state import restore as restore_state
from ._journal_state import save as save_state
from ._requests import answer
from ._schedules import Schedules, SchedulesConfig, ScheduleSpec
from ._task_metrics import TaskMetrics
from ._taskbook import Effects, TaskBook, TaskBookConfig, default_max_queued_bytes
from ._version_log import VersionLog
from .journal import JournalError, JournalQueue, Recovered

__all__ = ["Scheduler", "SchedulerConfig"]

log = logging.getLogger("fastworker.scheduler")

# Requests whose reply, with a journal, waits for the commit of what they changed.  Not
# DeadLetterRetry: its task runs at once, and its result must not reach the client
# before the reply that makes the client hold it (design/durability.md).
_CHANGING_REQUESTS = (ScheduleAdd, ScheduleRemove)


@attrs.frozen
class SchedulerConfig:
    worker_address: str = "tcp://127.0.0.1:*"
    max_queued: int = 1_000_000  # tasks held (queued, scheduled, running) before rejecting
    max_queued_bytes: int = attrs.field(factory=default_max_queued_bytes)
    max_worker_deaths: int = 3  # poison guard: runs that may kill their worker
    # Tasks queued while no worker was registered, for names no worker serves,
    # fail this long after the last worker joined (time for the others to join).
    unknown_task_grace: float = 5.0
    finished_memory: int = 200_000  # finished task ids remembered for deduplication
    transport: TransportConfig = TransportConfig()
    schedules: SchedulesConfig = SchedulesConfig()
    dead_letters: DeadLettersConfig = DeadLettersConfig()

    def book_config(self) -> TaskBookConfig:
        return TaskBookConfig(
            max_queued=self.max_queued,
            max_queued_bytes=self.max_queued_bytes,
            max_worker_deaths=self.max_worker_deaths,
            unknown_task_grace=self.unknown_task_grace,
            finished_memory=self.finished_memory,
            max_message_size=self.transport.max_message_size,
        )


@attrs.frozen
class _Due:
    """Timer: scheduled tasks or retries may have come due."""


class Scheduler(Actor):
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        gateway: ActorRef,
        results: ActorRef,
        callbacks: ActorRef,
        keys: KeyRing | None = None,
        journal: JournalQueue | None = None,
        metrics: TaskMetrics | None = None,
    ) -> None:
        """``keys``: with CURVE, the key ring every message's sender is checked against."""
        super().__init__("scheduler", mailbox_size=4096)
        self.metrics = metrics  # only when something reads them (the HTTP side)
        self.keys = keys
        # With CURVE: the key each registered worker id joined with; its
        # connection counts only when it speaks with that key.
        self._worker_keys: dict[bytes, bytes] = {}
        self._evicting: set[bytes] = set()  # told to Discovery, until they join again
        self.discovery: ActorRef | None = None  # set before the run starts
        self.config = config
        self._gateway = gateway
        self._results = results
        self._callbacks = callbacks
        # With a journal, accepted tasks and final results are queued for its
        # next commit, and acks go out only after it (design/durability.md).
        self._journal = journal
        self.book = TaskBook(config.book_config(), clock=trio.current_time, wall_clock=time.time)
        self._budget = message_budget(config.transport.max_message_size)
        self.schedules = Schedules(config.schedules, wall_clock=time.time)
        self.dead_letters = DeadLetters(config.dead_letters)
        if journal is not None:
            # Their changes go in the journal's commits (_journal_state.py).
            self.schedules.watch()
            self.dead_letters.watch()
        # eta, retries, the unserved check, the next schedule tick
        self._timer = DeadlineTimer(self.ref, _Due())
        self._sock: ZSocket | None = None
        self.endpoint: str | None = None
        self._dropped: Counter[str] = Counter()
        self._internal_errors = 0
        self._versions = VersionLog(log, "scheduler")

    # -- life cycle ---------------------------------------------------------

    def restore(self, recovered: Recovered) -> None:
        """Take back what the journal held, before the actor starts: unfinished tasks go to
        their queues (or due-time heap), finished ids are remembered for deduplication.

        A task the book refuses now (the limits were lowered since it was
        accepted) is a JournalError: the node says so at start rather than
        dropping an acknowledged task.
        """
        book = self.book
        for client, envelope in recovered.tasks:
            verdict = book.submit(client, envelope)
            if verdict is not None:
                raise JournalError(
                    f"cannot take back journaled task {envelope.task_id}: {verdict[1]}; "
                    "start with the limits it was accepted under"
                )
        book.remember_finished([record.task_id for record, _ in recovered.results])
        book.take()  # nothing to send: no worker and no client is connected yet
        restored = restore_state(
            recovered.state,
            self.config.schedules,
            self.config.dead_letters,
            wall_clock=time.time,
        )
        self.schedules, self.dead_letters = restored.schedules, restored.dead_letters
        if restored.stale and self._journal is not None:
            log.warning(
                "journal: %d schedules or dead letters could not be taken back "
                "(unreadable, or past the bounds); they are deleted from it",
                len(restored.stale),
            )
            for key in restored.stale:
                self._journal.put_state(key, None)

    async def on_start(self, nursery: trio.Nursery) -> None:
        sock = open_socket(
            zmq.ROUTER, self.config.transport, router_handover=True, zap_domain=WORKER
        )
        # Rebind the same port after a restart, so workers reconnect by themselves.
        self.endpoint = await bind_again(sock, self.endpoint or self.config.worker_address)
        self._sock = sock
        nursery.start_soon(pump_socket, sock, self.ref)
        nursery.start_soon(self._timer.run)

    async def on_stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- messages -----------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if type(message) is GetStatistics:
            return self.statistics_dict()
        if type(message) is MetricsQuery:
            return self._metrics_snapshot()
        if type(message) is LookupTask:
            return self.book.describe(message.task_id)
        reply = None
        try:
            if type(message) is Inbound:
                self._on_worker_frames(message.frames)
            elif type(message) is ClientSubmits:
                self._on_submits(message)
            elif type(message) is _Due:
                self.book.advance()
                self._run_schedules()
            elif type(message) is WorkerJoined:
                if self.keys is not None:
                    self._worker_keys[message.worker_id.encode()] = message.key
                self._evicting.discard(message.worker_id.encode())
                self.book.worker_joined(message.worker_id.encode(), message.task_names)
            elif type(message) is WorkerLost:
                self._worker_keys.pop(message.worker_id.encode(), None)
                self._evicting.discard(message.worker_id.encode())
                self.book.worker_lost(message.worker_id.encode(), died=message.reason != "left")
                log.log(
                    logging.INFO if message.reason == "left" else logging.WARNING,
                    "worker %s %s; its tasks were requeued",
                    message.worker_id,
                    message.reason,
                )
            elif type(message) is CancelTask:
                reply = self._on_cancel(message)
            elif type(message) is ClientRequest:
                self._on_request(message)
            elif type(message) is DeclaredSchedules:
                self._on_declared(message)
            else:
                raise TypeError(f"scheduler got an unexpected message {message!r}")
            self.book.dispatch()
        except Exception:
            # Never reached by any sequence the model test found; if it happens,
            # one message's handling is lost, not the control plane.
            self._internal_errors += 1
            log.exception("scheduler failed handling %s", type(message).__name__)
        try:
            self._send_effects()
        except Exception:
            # What was taken and not sent is recovered by the protocol: a dispatch
            # its worker never lists is queued again, a result the client's sweep asks for.
            self._internal_errors += 1
            log.exception("scheduler failed sending what %s caused", type(message).__name__)
        self._timer.set(min(self.book.next_deadline(), self._next_tick()))
        return reply

    def _next_tick(self) -> float:
        """The schedules' next tick on the trio clock (theirs is the wall clock)."""
        due = self.schedules.next_due()
        if due == math.inf:
            return math.inf
        return trio.current_time() + max(0.0, due - time.time())

    # -- output -------------------------------------------------------------

    def _send_effects(self) -> None:
        book = self.book
        while out := book.take():
            self._send_dispatches(out)  # may fail tasks (book.fail): loop for their results
            for worker, number in out.markers:  # unsent: the next list asks for another
                self._send_worker(worker, Dispatch([], number))
            self._send_cancels(out)
            self._send_results(out)
            for envelope, record, reason in out.dead:
                self.dead_letters.add(
                    envelope,
                    reason,
                    record.error,
                    record.attempts,
                    record.completed_at or time.time(),
                )
        if self._journal is not None:
            save_state(self._journal, self.schedules, self.dead_letters)

    def _send_dispatches(self, out: Effects) -> None:
        book = self.book
        for worker, batch, weight, number in out.dispatches:
            if weight <= self._budget:  # the common case: one message, nothing to weigh
                if not self._send_worker(worker, Dispatch(batch, number)):
                    self._unreachable(worker, [e.task_id for e in batch])
                continue

            def cannot_fit(envelope: TaskEnvelope) -> None:
                book.fail(
                    envelope.task_id,
                    f"task needs {task_weight(envelope)} bytes, more than a message may carry",
                )

            chunks = split_by_bytes(batch, task_weight, self._budget, cannot_fit)
            for i, chunk in enumerate(chunks):
                if i:  # each part its own number: a list made between parts must not lose one
                    number = book.renumber(worker, [e.task_id for e in chunk])
                if not self._send_worker(worker, Dispatch(chunk, number)):
                    self._unreachable(worker, [e.task_id for rest in chunks[i:] for e in rest])
                    break

    def _evict(self, worker: bytes, reason: str) -> None:
        if worker in self._evicting or self.discovery is None:
            return
        self._evicting.add(worker)
        log.warning("worker %r: %s; evicted, its tasks requeued", worker, reason)
        self._tell(
            self.discovery, EvictWorker(worker.decode(errors="replace"), reason), "evictions"
        )

    def _unreachable(self, worker: bytes, task_ids: list[str]) -> None:
        """The worker vanished between its last message and now: its tasks go back to
        the queue until it announces itself again."""
        log.info("worker %r unreachable; %d tasks requeued", worker, len(task_ids))
        self.book.unsent(worker, task_ids)

    def _send_cancels(self, out: Effects) -> None:
        for worker, task_ids in out.cancels.items():
            # A worker that is gone or full: its result will be ignored anyway.
            self._send_worker(worker, CancelRunning(task_ids))

    def _send_worker(self, worker: bytes, message: Any) -> bool:
        if self._sock is None:
            return False
        return self._sock.try_send([worker, encode(message)])

    def _send_results(self, out: Effects) -> None:
        if out.records and self.metrics is not None:
            self.metrics.finished(out.records, out.accepted_at, trio.current_time(), time.time())
        if out.records and self._journal is not None:
            self._journal.add_results(out.records)
        if out.pushes:
            # Before the cache: an idle gateway sends them within this call
            # (actor.py, idle delivery), and a query for these ids can only
            # arrive after this handler, when the cache has them too.
            messages = [
                [client, encode(Results(chunk))]
                for client, records in out.pushes.items()
                for chunk in result_chunks(records, self._budget)
            ]
            self._tell(self._gateway, Outgoing(messages), "result pushes")
        if out.records:
            self._tell(self._results, StoreResults(out.records), "results")
        if out.callbacks:
            jobs = [
                (address, build_callback_payload(record, data), key)
                for address, record, data, key in out.callbacks
            ]
            self._tell(self._callbacks, CallbackJobs(jobs), "callbacks")
        for client, task_ids in out.resends.items():
            self._tell(self._results, ResendResults(client, task_ids), "result resends")

    def _tell(self, ref: ActorRef, message: object, what: str) -> None:
        try:
            ref.tell(message)
        except MailboxFull:
            # Results stay queryable (the job is finished here either way); the
            # loss is a push or a callback, counted so it is never silent.
            self._dropped[what.replace(" ", "_")] += 1
            log.warning("%s mailbox full: dropped %s", ref.name, what)
        except ActorStopped:
            # The node is stopping and that actor is done (Discovery and the
            # Gateway stop before us): what it would have done no longer can be.
            self._dropped[what.replace(" ", "_")] += 1

    # -- input --------------------------------------------------------------

    def _on_submits(self, message: ClientSubmits) -> None:
        replies: list[list[bytes]] = []
        plain_acks: list[list[bytes]] = []
        journaled: list[tuple[bytes, TaskEnvelope]] = []
        try:
            self._accept(message, replies, plain_acks, journaled)
        finally:
            # Even after an internal error: what the book took is journaled.
            self._acknowledge(replies, plain_acks, journaled)

    def _accept(
        self,
        message: ClientSubmits,
        replies: list[list[bytes]],
        plain_acks: list[list[bytes]],
        journaled: list[tuple[bytes, TaskEnvelope]],
    ) -> None:
        book = self.book
        journal = self._journal
        refusal = None if journal is None else journal.refusal()
        metrics = self.metrics
        # Accepted tasks by name, handed to the metrics once per message (hot path).
        accepted: dict[str, int] | None = None if metrics is None else {}
        for identity, request_id, raw_tasks in message.submits:
            rejected: list[list[str]] = []
            room = self._budget // 2  # for rejection texts; ids and reasons always fit
            for raw in raw_tasks:
                try:
                    envelope = TaskEnvelope.from_wire(raw)
                    if envelope.options is not None and "attempt" in envelope.options:
                        raise WireError("invalid", "option 'attempt' is set by the control plane")
                except WireError as exc:
                    book.rejected["invalid"] += 1
                    task_id = raw[0] if type(raw) is list and raw and type(raw[0]) is str else ""
                    if metrics is not None:
                        name = raw[1] if type(raw) is list and len(raw) > 1 else None
                        metrics.rejected(name if type(name) is str else "", "invalid")
                    text = str(exc)
                    room -= len(text)
                    rejected.append([task_id, "invalid", text if room > 0 else ""])
                    continue
                new = journal is not None and (
                    book.status_of(envelope.task_id) is None
                    and not book.is_finished(envelope.task_id)
                )
                if new and refusal is not None:
                    book.rejected["queue_full"] += 1
                    verdict: tuple[str, str] | None = ("queue_full", refusal)
                else:
                    before = book.accepted
                    verdict = book.submit(identity, envelope)
                    if new and verdict is None:
                        journaled.append((identity, envelope))
                    if accepted is not None and book.accepted != before:
                        name = envelope.name
                        accepted[name] = accepted.get(name, 0) + 1
                if verdict is not None and metrics is not None:
                    metrics.rejected(envelope.name, verdict[0])
                if verdict is not None:
                    room -= len(verdict[1])
                    reason, text = verdict
                    rejected.append([envelope.task_id, reason, text if room > 0 else ""])
            ack = [identity, encode(SubmitAck(request_id, rejected))]
            if journal is not None and len(rejected) == len(raw_tasks):
                # Nothing in it to make durable: the refusal goes out at once,
                # even while the journal cannot write.
                self._tell(self._gateway, Outgoing([ack]), "acks")
                continue
            (replies if rejected else plain_acks).append(ack)
        if accepted:
            assert metrics is not None
            for name, count in accepted.items():
                metrics.accepted(name, count)

    def _acknowledge(
        self,
        replies: list[list[bytes]],
        plain_acks: list[list[bytes]],
        journaled: list[tuple[bytes, TaskEnvelope]],
    ) -> None:
        journal = self._journal
        if journal is not None:
            # Acknowledged only once these tasks are committed (with all before them).
            journal.add_tasks(journaled)
            journal.add_acks(plain_acks, replies)
            return
        if replies:
            self._tell(self._gateway, Outgoing(replies), "acks")
        if plain_acks:
            self._tell(self._gateway, HeldAcks(plain_acks), "acks")

    def _on_worker_frames(self, frames: list[list[bytes]]) -> None:
        for parts in frames:
            try:
                self._on_worker_frame(parts)
            except Exception:
                # Never reached by any sequence the model test found; if it is,
                # one frame is lost, not the rest of the batch (other workers' results).
                self._internal_errors += 1
                log.exception("scheduler failed handling a worker's frame")

    def _on_worker_frame(self, parts: list[bytes]) -> None:
        book = self.book
        keys = self.keys
        if keys is not None:
            key = parts.pop()  # the sender's CURVE key, added by the socket
            if not keys.is_worker(key):
                book.rejected["unauthorized"] += 1
                return
            bound = self._worker_keys.get(parts[0]) if parts else None
            if bound is not None and bound != key:
                # Another key holds that worker's routing id: the worker was cut
                # off (what we dispatch goes to the impostor). Drop it: its tasks
                # go back, and it joins again with its next heartbeat.
                book.rejected["forbidden"] += 1
                self._evict(parts[0], "its connection was taken by another key")
                return
        if len(parts) != 2:
            book.rejected["bad_frames"] += 1
            return
        identity, body = parts
        try:
            message = decode(body)
        except WireError as exc:
            book.rejected[exc.reason] += 1
            if exc.reason == "version" and self._sock is not None:
                # The one refusal answered here: a worker of another version
                # cannot find out otherwise why it is never sent work.
                self._versions.note(exc)
                self._sock.try_send([identity, error_reply(exc)])
            return
        if isinstance(message, Done):
            for raw in message.results:
                try:
                    record = ResultRecord.from_wire(raw)
                except WireError:
                    book.rejected["invalid"] += 1
                    continue
                if self.metrics is not None and record.status == "retrying":
                    before = book.stats["retried"]
                    book.report(identity, record)
                    if book.stats["retried"] != before:
                        self.metrics.retried(record.name)
                    continue
                book.report(identity, record)
        elif isinstance(message, Ready):
            book.ready(identity, message.window)
            if message.held is not None:
                book.holding(identity, [i for i in message.held if type(i) is str], message.seen)
        elif isinstance(message, Release):
            book.release(identity, [i for i in message.task_ids if type(i) is str])
        elif isinstance(message, Unregister):
            self._on_goodbye(identity, message)
        else:
            book.rejected["unexpected"] += 1

    def _on_goodbye(self, identity: bytes, message: Unregister) -> None:
        """A worker leaving, on its own connection: after its last Done and Release.

        Handled here rather than at Discovery because only this connection
        orders it behind those: the tasks still in flight are requeued now,
        none whose result was on its way.  Discovery forgets the member next.
        """
        book = self.book
        if message.reason != "left":
            book.rejected["invalid"] += 1  # "crashed" names an earlier id: Discovery's
            return
        if message.worker_id.encode() != identity or (
            self.keys is not None and identity not in self._worker_keys
        ):
            book.rejected["forbidden"] += 1
            return
        book.worker_lost(identity, died=False)
        if self.discovery is not None:
            self._tell(self.discovery, EvictWorker(message.worker_id, "left"), "evictions")

    def _run_schedules(self) -> None:
        """Submit one task per schedule whose tick came (no client: results go to the cache).

        With a journal a tick's task is journaled in the commit that moves its
        schedule past the tick: after a crash either both are in the file (the
        task runs from it) or neither (the tick comes due again, same task id).
        """
        book = self.book
        journal = self._journal
        journaled: list[tuple[bytes, TaskEnvelope]] = []
        for spec, tick in self.schedules.due():
            envelope = spec.envelope(tick)
            new = journal is not None and (
                book.status_of(envelope.task_id) is None and not book.is_finished(envelope.task_id)
            )
            refusal = None if not new or journal is None else journal.refusal()
            verdict = ("queue_full", refusal) if refusal else book.submit(b"", envelope)
            if verdict is not None:
                self.schedules.stats["runs_refused"] += 1
                log.warning("schedule %s: its run was refused: %s", spec.schedule_id, verdict[1])
            elif new:
                journaled.append((b"", envelope))
        if journaled and journal is not None:
            journal.add_tasks(journaled)

    def _on_request(self, message: ClientRequest) -> None:
        request = message.message
        journal = self._journal
        refusal = None
        if journal is not None and isinstance(request, DeadLetterRetry):
            refusal = journal.refusal()  # a retry is a new task for the journal
        if refusal is not None:
            assert isinstance(request, DeadLetterRetry)
            reply: Any = DeadLetterRetryReply(request.request_id, False, refusal, None)
        else:
            reply = answer(
                message.identity,
                request,
                book=self.book,
                schedules=self.schedules,
                dead=self.dead_letters,
                budget=self._budget,
            )
        if journal is not None and isinstance(reply, DeadLetterRetryReply) and reply.task:
            # Journaled in the commit that deletes its letter: the retry survives a crash.
            journal.add_tasks([(message.identity, TaskEnvelope.from_wire(reply.task))])
        # A retried dead letter's acceptance is decided: send its effects first.
        self._send_effects()
        out = [message.identity, encode(reply)]
        if journal is not None and isinstance(request, _CHANGING_REQUESTS):
            # "Added" and "removed" must hold after a crash: the reply waits
            # for the commit of what the request changed.
            journal.add_acks([], [out])
            return
        self._tell(self._gateway, Outgoing([out]), "replies")

    def _on_declared(self, message: DeclaredSchedules) -> None:
        """Schedules a worker's ``@task``s declare: an upsert each, so N workers make one."""
        for raw in message.schedules:
            try:
                spec = ScheduleSpec.from_wire(raw, "declared")
            except (ValueError, TypeError) as exc:
                self.schedules.stats["refused"] += 1
                log.warning("worker %s declared a bad schedule: %s", message.worker_id, exc)
                continue
            refusal = self.schedules.add(spec)
            if refusal is not None:
                log.warning("worker %s: schedule refused: %s", message.worker_id, refusal)

    def _on_cancel(self, message: CancelTask) -> tuple[bool, str]:
        """Cancel for a client (replied through the Gateway) or, with no identity, for an
        ``ask`` from inside the control plane (the dashboard), which gets the answer."""
        cancelled, status = self.book.cancel(message.task_id)
        # The CANCELLED result goes to the submitter ahead of the reply, so a
        # client that sees cancel_task() return True already knows the status.
        self._send_effects()
        if not message.identity:
            # Asked by the dashboard: the answer goes back to the ask. With a journal
            # the CANCELLED result is committed in the next commit, after this answer.
            return cancelled, status
        reply = [message.identity, encode(CancelReply(message.request_id, cancelled, status))]
        if cancelled and self._journal is not None:
            # "Will not run" must survive a crash: the reply waits for the commit
            # of the CANCELLED result (or the restarted control plane runs it).
            self._journal.add_acks([], [reply])
            return cancelled, status
        self._tell(self._gateway, Outgoing([reply]), "cancel replies")
        return cancelled, status

    # -- introspection ------------------------------------------------------

    def _metrics_snapshot(self) -> dict[str, Any]:
        book = self.book
        now = trio.current_time()
        snapshot = self.metrics.snapshot() if self.metrics is not None else {}
        snapshot["oldest_queued_age"] = [
            None if accepted is None else now - accepted for accepted in book.oldest_queued()
        ]
        snapshot["inflight"] = {
            worker.decode(errors="replace"): count
            for worker, count in book.inflight_by_worker().items()
        }
        snapshot["failures"] = [] if self.metrics is None else self.metrics.recent_failures()
        snapshot["book"] = self.statistics_dict()
        return snapshot

    def statistics_dict(self) -> dict[str, Any]:
        stats = self.book.statistics()
        stats["dropped"] = dict(self._dropped)
        stats["rejected"] = dict(self.book.rejected)
        stats["internal_errors"] = self._internal_errors
        stats["schedules"] = {"held": len(self.schedules), **self.schedules.stats}
        stats["dead_letters"] = {"held": len(self.dead_letters), **self.dead_letters.stats}
        return stats
