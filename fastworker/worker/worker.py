"""The Worker actor: joins a control plane, takes work as it has room, reports results.

It owns two DEALER sockets: one to Discovery (register, heartbeats) and one to
the Scheduler (Ready, Dispatch, Done).  The Scheduler's endpoint comes from
Discovery, so a worker needs only the discovery address, and may start
before the control plane: it keeps registering, once per heartbeat interval,
until answered.

Liveness both ways: Discovery declares a worker dead after ``liveness``
missed heartbeats; the worker treats the control plane as gone after the
same number of unanswered ones, and re-registers when it answers again — with
a new instance id after a restart, at which point unreported results go to
the new instance (which accepts them if a client re-submitted those tasks).

The worker owns its state: the executor's threads and timers report through
the mailbox (``ExecutorWake``), a drain is a message (``drain()`` sends it
and waits for the ``drained`` event the worker sets), retirement ends with
the ``recycle`` event, and a starter learns that the worker registered from
``nursery.start(worker.serve)``.  Nobody else reads or writes its fields to
drive it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any

import attrs
import trio

from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from .._io import HandshakeHistory, Inbound, connect_dealer, tell_own_actor, tick
from ..runtime import Actor, ActorStopped, GetStatistics, Supervisor
from ..tasks.models import TaskPriority
from ..tasks.registry import TaskRegistry
from ..tasks.schedule import rule_fields
from ..tasks.serializer import SerializationFormat, dumps
from ..transport import TransportConfig, ZSocket, resolve_endpoint
from ..wire import (
    CancelRunning,
    DeclareSchedules,
    Dispatch,
    Done,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Ready,
    Register,
    Registered,
    Release,
    ResultRecord,
    TaskEnvelope,
    Unregister,
    WireError,
    decode,
    encode,
    message_budget,
    result_weight,
    split_by_bytes,
    text_bytes,
)
from ._errors import type_name
from ._executor import Executor, ExecutorWake

__all__ = ["Worker", "WorkerConfig"]

# A declared schedule runs its task with no arguments, at normal priority.
_CBOR = SerializationFormat.CBOR.code
_NO_ARGUMENTS = dumps(SerializationFormat.CBOR, [[], {}])
_NORMAL_RANK = TaskPriority.NORMAL.rank

log = logging.getLogger("fastworker.worker")

# Every this many heartbeat ticks, Ready lists the tasks the worker holds.
_HELD_EVERY_TICKS = 5
_MAX_CRASH_REPORTS = 64  # old ids waiting to be reported (restarts are bounded well below)

_MAX_RESULTS_PER_MESSAGE = 2048
_COALESCE_SECONDS = 0.002
_MAX_PREFETCH = 4096
_PREFETCH_TARGET_SECONDS = 0.05


def _new_worker_id() -> str:
    # 128 random bits: the id is the worker's routing id at the Scheduler, and
    # a peer that knew it could take over that connection (design/security.md).
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(16)}"


@attrs.frozen
class WorkerConfig:
    discovery_address: str = DEFAULT_DISCOVERY_ADDRESS
    concurrency: int = 8
    # Tasks held beyond concurrency.  None: adaptive, from max(concurrency, 64)
    # while tasks are slow up to _MAX_PREFETCH while they are very short.
    prefetch: int | None = None
    heartbeat_interval: float = 1.0  # until Discovery says otherwise
    liveness: int = 3
    allow_pickle: bool = False
    transport: TransportConfig = TransportConfig()
    worker_id: str | None = None
    # None: a run stuck in user code is replaced and the worker goes on (an
    # embedded Cluster cannot replace its process).  A number (the node's
    # --grace): the worker stops taking work, lets running tasks finish
    # within that many seconds, hands the rest back and sets
    # ``Worker.recycle`` so that its process can be replaced.
    recycle_grace: float | None = attrs.field(default=None)

    @recycle_grace.validator
    def _check_recycle_grace(self, _attribute: Any, value: float | None) -> None:
        if value is not None and not 0 <= value < float("inf"):
            raise ValueError(f"recycle_grace must be a finite number >= 0 or None, got {value!r}")


@attrs.frozen
class _Tick:
    pass


@attrs.frozen
class _Flush:
    pass


@attrs.frozen
class _Connected:
    sock: ZSocket


@attrs.frozen
class _Handshake:
    """A handshake of one of our sockets ended (``problem`` None: accepted)."""

    sock: ZSocket
    problem: str | None


# libzmq does not reconnect after a server refused our key; we open the
# discovery socket again this often, so a key added back works again.
_REFUSED_RETRY = 2.0


@attrs.frozen
class _RetireNow:
    """The recycle grace is over: hand back what still runs."""


@attrs.frozen
class _Drain:
    """Stop taking work; running tasks get ``grace`` seconds (see ``Worker.drain``)."""

    grace: float


@attrs.frozen
class _DrainOver:
    """The drain's grace is over: hand back what still runs."""


class Worker(Actor):
    def __init__(self, registry: TaskRegistry, config: WorkerConfig | None = None) -> None:
        cfg = config or WorkerConfig()
        self.worker_id = cfg.worker_id or _new_worker_id()
        super().__init__(f"worker {self.worker_id}", mailbox_size=4096)
        self.config = cfg
        self.registry = registry
        self.executor = self._new_executor()
        self.instance_id: str | None = None
        self._registered = trio.Event()  # set by the first Registered (see serve)
        self._discovery: ZSocket | None = None
        self._scheduler: ZSocket | None = None
        self._scheduler_endpoint: str | None = None
        self._nursery: trio.Nursery | None = None
        self._interval = cfg.heartbeat_interval
        self._message_limit = cfg.transport.max_message_size  # and the control plane's, once known
        self._ticks = 0
        self._last_ack = 0.0
        self._connected = False
        self._draining = False
        self._retiring = False
        self.recycle = trio.Event()  # set once a stuck worker handed back all its work
        self.drained = trio.Event()  # set once a drain handed back what it did not finish
        self.handed_back = 0  # tasks the drain handed back
        self._outbox: list[ResultRecord] = []
        # Old ids of ours whose crash Discovery has not been told yet: a report
        # sent on the socket just reopened is often refused (not connected yet).
        self._crash_reports: list[str] = []
        self._dispatch_seen: int | None = None  # the number of the last Dispatch received
        self._handshakes = HandshakeHistory()  # across our sockets (see HandshakeHistory)
        self._flush_armed = False
        self._starts = 0
        self._prefetch = cfg.prefetch if cfg.prefetch is not None else max(cfg.concurrency, 64)
        self._avg_seconds = 0.01  # running mean of task durations, for the prefetch
        self._refused: str | None = None  # why the control plane refused our handshake
        self._refused_at = 0.0

    # -- life cycle ---------------------------------------------------------

    async def on_start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._connected = False
        self._scheduler_endpoint = None
        self._flush_armed = False
        previous = self._restart()
        self._open_discovery()
        if previous is not None:
            # Hand our old identity's tasks back at once (their runs died with it);
            # a crash counts as a death for what it held (the poison guard).
            self._crash_reports = [*self._crash_reports, previous][-_MAX_CRASH_REPORTS:]
            self._send_crash_reports()
        await nursery.start(self.executor.run)
        nursery.start_soon(tick, self.ref, lambda: self._interval, _Tick())
        if self._draining:
            # Crashed while draining: the old identity left above, nothing runs here.
            self._finish_drain()
            return
        self._send_discovery(self._register_message())

    async def serve(
        self,
        *,
        max_restarts: int = 3,
        within: float = 5.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run this worker under its own supervisor; started once it first registered.

        ``await nursery.start(worker.serve)`` is how a starter waits for a
        worker that can take tasks, without reading its fields.
        """
        supervisor = Supervisor(
            f"supervisor {self.name}", [self], max_restarts=max_restarts, within=within
        )

        async def announce() -> None:
            await self._registered.wait()
            task_status.started()

        async with trio.open_nursery() as nursery:
            # A worker stopped before it registered ends serve unstarted: the
            # starter's nursery.start raises rather than wait forever.
            nursery.start_soon(announce)
            await supervisor.run()
            nursery.cancel_scope.cancel()

    def _open_discovery(self) -> None:
        assert self._nursery is not None
        self._discovery = connect_dealer(
            self._nursery,
            self.ref,
            self.config.discovery_address,
            self.config.transport,
            when_up=_Connected,  # the first Register usually found no connection yet
            on_handshake=_Handshake,
            handshake_history=self._handshakes,
        )

    def _on_handshake(self, message: _Handshake) -> None:
        if message.sock is not self._discovery and message.sock is not self._scheduler:
            return
        if message.problem is None:
            if self._refused is not None:
                log.info("worker %s: the control plane accepts our key again", self.worker_id)
            self._refused = None
            return
        if self._refused is None:
            log.error("worker %s: %s", self.worker_id, message.problem)
            self._refused_at = trio.current_time()
        self._refused = message.problem

    def _reopen_refused(self) -> None:
        """Connect again: libzmq gives up on a connection whose key was refused."""
        now = trio.current_time()
        if self._refused is None or now - self._refused_at < _REFUSED_RETRY:
            return
        self._refused_at = now
        if self._discovery is not None:
            self._discovery.close()
        self._open_discovery()
        if self._scheduler is not None and self._scheduler_endpoint is not None:
            self._open_scheduler(self._scheduler_endpoint)

    def _new_executor(self) -> Executor:
        return Executor(
            self.registry,
            self.config.concurrency,
            self.ref,
            allow_pickle=self.config.allow_pickle,
        )

    def _restart(self) -> str | None:
        """After a crash, start over as a new worker; return the old id (None on first start).

        The old executor's runs, threads and results are gone with the crash,
        so the old identity leaves (its tasks are requeued) and a fresh one joins.
        """
        self._starts += 1
        if self._starts == 1:
            return None
        previous = self.worker_id
        self.worker_id = _new_worker_id()
        self.instance_id = None
        self._outbox.clear()
        self._dispatch_seen = None  # a new id: the control plane numbers for it anew
        self._retiring = False  # the new executor has nothing stuck
        self.executor = self._new_executor()
        log.warning("worker %s restarted as %s", previous, self.worker_id)
        return previous

    def _rejoin_as_new(self) -> None:
        """Register again under a new id, with new sockets (the old routing id is lost).

        What runs keeps running: its results are reported under the new id, and
        the control plane takes a final result from any registered worker.
        """
        previous = self.worker_id
        self.worker_id = _new_worker_id()
        self.instance_id = None
        self._connected = False
        for sock in (self._discovery, self._scheduler):
            if sock is not None:
                sock.close()
        self._scheduler = None
        self._scheduler_endpoint = None
        self._open_discovery()
        self._send_discovery(self._register_message())
        log.warning("worker %s: id refused; joining again as %s", previous, self.worker_id)

    async def on_stop(self) -> None:
        for sock in (self._discovery, self._scheduler):
            if sock is not None:
                sock.close(linger_ms=200)
        self._discovery = self._scheduler = None

    # -- messages -----------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if type(message) is ExecutorWake:
            self._on_executor(message)
        elif type(message) is Inbound:
            for parts in message.frames:
                self._on_frame(parts)
        elif type(message) is _Tick:
            self._on_tick()
        elif type(message) is _Flush:
            self._flush_armed = False
            self._flush()
        elif type(message) is _RetireNow:
            self._give_up_running()
        elif type(message) is _Drain:
            self._start_drain(message.grace)
        elif type(message) is _DrainOver:
            self._finish_drain()
        elif type(message) is _Connected:
            if message.sock is self._scheduler and self._connected:
                self._announce()
            elif message.sock is self._discovery and not (self._connected or self._draining):
                # The Register sent at start usually found no connection yet.
                self._send_discovery(self._register_message())
        elif type(message) is _Handshake:
            self._on_handshake(message)
        elif type(message) is GetStatistics:
            return self.statistics_dict()
        else:
            raise TypeError(f"worker got an unexpected message {message!r}")
        return None

    def _on_frame(self, parts: list[bytes]) -> None:
        if len(parts) != 1:
            return
        try:
            message = decode(parts[0])
        except WireError as exc:
            log.warning("worker %s ignored a bad frame: %s", self.worker_id, exc)
            return
        if isinstance(message, Dispatch):
            # The last one received (not the largest): numbers start again with a
            # new control plane, and one connection delivers in order.
            self._dispatch_seen = message.number
            self._on_dispatch(message.tasks)
        elif isinstance(message, HeartbeatAck):
            self._on_ack(message)
        elif isinstance(message, Registered):
            self._on_registered(message)
        elif isinstance(message, CancelRunning):
            ids = [i for i in message.task_ids if type(i) is str]
            self._report(self.executor.cancel(ids))
            self._check_idle()
        elif isinstance(message, ErrorReply):
            log.error("control plane rejected a worker message: %s", message.message)
            if message.reason == "forbidden" and "worker id" in message.message:
                # Our id is held by another key (taken while we were thought dead):
                # join again under a fresh one rather than be refused forever.
                self._rejoin_as_new()

    def _on_dispatch(self, raw_tasks: list[Any]) -> None:
        if not raw_tasks:
            return  # a marker: its number (taken in _on_frame) is the whole message
        envelopes = []
        for raw in raw_tasks:
            try:
                envelopes.append(TaskEnvelope.from_wire(raw))
            except WireError as exc:
                log.warning("worker %s ignored an invalid task: %s", self.worker_id, exc)
        if self._draining or self._retiring:
            self._send_scheduler(Release([e.task_id for e in envelopes]))
            return
        self._report(self.executor.submit(envelopes))

    def _on_ack(self, ack: HeartbeatAck) -> None:
        self._last_ack = trio.current_time()
        if not ack.known or ack.instance_id != self.instance_id:
            # The control plane restarted or forgot us: join again.
            self._connected = False
            self._send_discovery(self._register_message())

    def _on_registered(self, message: Registered) -> None:
        self._last_ack = trio.current_time()
        self._interval = message.heartbeat_interval
        # A Done over the control plane's limit would cost our connection.
        self._message_limit = max(
            1, min(self.config.transport.max_message_size, message.max_message_size)
        )
        if message.instance_id != self.instance_id:
            log.info("worker %s joined control plane %s", self.worker_id, message.instance_id)
            self._dispatch_seen = None  # another control plane numbers its Dispatches anew
        self.instance_id = message.instance_id
        endpoint = resolve_endpoint(message.worker_endpoint, self.config.discovery_address)
        if endpoint != self._scheduler_endpoint:
            self._open_scheduler(endpoint)
        self._connected = True
        self._send_crash_reports()  # the Registered came: the connection is up
        # Right after connect() this Ready usually fails (IMMEDIATE): connect_dealer's when_up
        # and every tick announce the window again.
        self._announce()
        self._declare_schedules()
        self._registered.set()

    def _declare_schedules(self) -> None:
        """Tell the control plane our tasks' schedules, after every registration.

        It keeps one schedule per task name however many workers declare it
        (design/schedules.md), so repeating this is harmless.
        """
        wires = [
            [d.name, d.name, *rule_fields(d.schedule), _NORMAL_RANK, _CBOR, _NO_ARGUMENTS]
            for d in self.registry
            if d.schedule is not None
        ]
        if wires:
            self._send_discovery(DeclareSchedules(self.worker_id, wires))

    def _open_scheduler(self, endpoint: str) -> None:
        assert self._nursery is not None
        if self._scheduler is not None:
            self._scheduler.close()  # its pump task ends with it
        self._scheduler = connect_dealer(
            self._nursery,
            self.ref,
            endpoint,
            self.config.transport,
            identity=self.worker_id.encode(),
            when_up=_Connected,  # announce our window as soon as we can
            on_handshake=_Handshake,
            handshake_history=self._handshakes,
        )
        self._scheduler_endpoint = endpoint

    def _announce(self, with_held: bool = False) -> None:
        """Flush, then tell the scheduler our window (absolute, so repeating it is harmless).

        ``with_held`` also lists every task we hold (the executor's and the
        results not sent yet), so the scheduler can requeue a Dispatch that
        never reached us; left out when the list would not fit a message.
        """
        self._flush()
        held: list[str] | None = None
        if with_held:
            held = [*self.executor.held_ids(), *(record.task_id for record in self._outbox)]
            if sum(text_bytes(i) + 9 for i in held) > message_budget(self._message_limit) // 2:
                held = None
        window = 0 if self._draining or self._retiring else self.window
        self._send_scheduler(Ready(window, held, None if held is None else self._dispatch_seen))

    @property
    def window(self) -> int:
        """Tasks the scheduler may have outstanding here: concurrency + prefetch."""
        return self.config.concurrency + self._prefetch

    def _adapt_prefetch(self, records: list[ResultRecord]) -> None:
        """Hold more tasks while they are short, fewer when they are long.

        Every message costs far more than a trivial task (profiling: ~100 µs
        of CPU per task at a window of 72, ~75 µs at 520), so short tasks
        want big batches; long tasks want a small prefetch, or one worker
        hoards work another could start.  We aim at ~50 ms of queued work
        per worker, between max(concurrency, 64) and _MAX_PREFETCH tasks.
        An explicit ``prefetch`` turns this off.
        """
        if self.config.prefetch is not None:
            return
        for record in records:
            if record.started_at is not None and record.completed_at is not None:
                took = max(0.0, record.completed_at - record.started_at)
                self._avg_seconds += (took - self._avg_seconds) * 0.05
        floor = max(self.config.concurrency, 64)
        wanted = int(
            _PREFETCH_TARGET_SECONDS * self.config.concurrency / max(self._avg_seconds, 1e-6)
        )
        wanted = min(_MAX_PREFETCH, max(floor, wanted))
        if wanted > self._prefetch * 2 or wanted * 2 < self._prefetch:
            self._prefetch = wanted
            self._announce()

    def _on_tick(self) -> None:
        if self.drained.is_set():
            return  # unregistered: a heartbeat now would only make us join again
        self._reopen_refused()
        self._send_crash_reports()
        now = trio.current_time()
        silent = now - self._last_ack
        if self._connected and silent > self._interval * self.config.liveness:
            log.warning(
                "worker %s: control plane silent for %.1f s; waiting for it to come back",
                self.worker_id,
                silent,
            )
            self._connected = False
        if self._connected:
            self._send_discovery(Heartbeat(self.worker_id))
            self._ticks += 1
            # Repeats the window (a lost Ready must not idle us forever) and, every
            # few ticks, what we hold (a lost Dispatch must not hold tasks forever).
            self._announce(with_held=self._ticks % _HELD_EVERY_TICKS == 0)
        else:
            self._send_discovery(self._register_message())

    # -- sending ------------------------------------------------------------

    def _register_message(self) -> Register:
        return Register(
            self.worker_id,
            self.registry.names(),
            self.config.concurrency,
            os.getpid(),
            socket.gethostname(),
        )

    def _send_crash_reports(self) -> None:
        if self._discovery is None:
            return
        self._crash_reports = [
            old
            for old in self._crash_reports
            if not self._discovery.try_send([encode(Unregister(old, "crashed"))])
        ]

    def _send_discovery(self, message: Any) -> None:
        if self._discovery is None:
            return
        self._discovery.try_send([encode(message)])  # not connected yet: the next tick re-sends

    def _send_scheduler(self, message: Any) -> bool:
        return self._send_scheduler_frame(encode(message))

    def _send_scheduler_frame(self, frame: bytes) -> bool:
        if self._scheduler is None:
            return False
        return self._scheduler.try_send([frame])

    def _on_executor(self, message: ExecutorWake) -> None:
        """The executor has news: results to report, perhaps runs stuck in user code."""
        if message.executor is not self.executor:
            return  # the executor of a run that crashed: its work was handed back
        collected = self.executor.collect()
        self._report(collected.records)
        if collected.stuck:
            self._on_stuck()
        self._check_idle()

    def _report(self, records: list[ResultRecord]) -> None:
        """Report results, coalescing them while the worker is busy.

        An idle worker reports at once (latency); a busy one holds results up
        to ``_COALESCE_SECONDS`` or ``_MAX_RESULTS_PER_MESSAGE`` so that one
        Done carries many — and so does the scheduler's next Dispatch, since
        credits come back together.  The records are in the outbox before
        anything can fail, so a failure here loses none of them.
        """
        if not records:
            return
        self._outbox.extend(records)
        try:
            self._adapt_prefetch(records)
            if not self.executor.held or len(self._outbox) >= _MAX_RESULTS_PER_MESSAGE:
                self._flush()
            elif not self._flush_armed and self._nursery is not None:
                self._nursery.start_soon(self._flush_soon)
                self._flush_armed = True
        except Exception:
            log.exception("worker %s: reporting results failed", self.worker_id)

    def _check_idle(self) -> None:
        """Nothing left running: a drain or a retirement need not wait for its grace."""
        if not (self._draining or self._retiring) or self.executor.held:
            return
        if self._draining and not self.drained.is_set():
            self._finish_drain()
        elif self._retiring and not self.recycle.is_set():
            self._give_up_running()

    async def _flush_soon(self) -> None:
        await trio.sleep(_COALESCE_SECONDS)
        await tell_own_actor(self.ref, _Flush())

    def _flush(self) -> None:
        """Send unreported results in Done messages cut by bytes; what cannot go now waits.

        A result too large for any message is not sent (ZeroMQ would drop the
        connection): its task fails instead, saying so.
        """
        if not self._outbox:
            return
        budget = message_budget(self._message_limit)
        replaced: list[ResultRecord] = []

        def oversize(record: ResultRecord) -> None:
            replaced.append(_shrink(record, budget))

        chunks = split_by_bytes(self._outbox, result_weight, budget, oversize)
        if replaced:
            chunks += split_by_bytes(replaced, result_weight, budget, _impossible)
        self._outbox = []
        for index, chunk in enumerate(chunks):
            if not self._send_scheduler_frame(_encode_done(chunk)):
                self._outbox = [record for rest in chunks[index:] for record in rest]
                return

    # -- recycling ----------------------------------------------------------

    def _on_stuck(self) -> None:
        """A run could not be stopped at its time limit (the executor's collect said so).

        With ``recycle_grace`` the worker retires: no new work (``Ready(0)``,
        unstarted tasks handed back at once, later dispatches released), the
        running tasks get ``recycle_grace`` seconds, then the rest is handed
        back and ``recycle`` is set.  Under steady load there is always
        something running, so waiting for an idle moment would never end.
        """
        grace = self.config.recycle_grace
        if grace is None or self._retiring or self._draining or self._nursery is None:
            return
        self._retiring = True
        log.warning(
            "worker %s: a task is stuck in user code; taking no more work, recycling within %g s",
            self.worker_id,
            grace,
        )
        self._send_scheduler(Ready(0))
        waiting = self.executor.release_waiting()
        if waiting:
            self._send_scheduler(Release(waiting))
        # Retired at once when nothing runs any more (_check_idle), else at the grace's end.
        self._nursery.start_soon(self._tell_after, max(0.0, grace), _RetireNow())

    async def _tell_after(self, seconds: float, message: Any) -> None:
        await trio.sleep(seconds)
        await tell_own_actor(self.ref, message)

    def _give_up_running(self) -> None:
        if self.recycle.is_set():
            return  # retired already (nothing ran any more before the grace ended)
        self._flush()  # what finished within the grace period
        given_up = self.executor.abandon_all()
        if given_up:
            self._send_scheduler(Release(given_up))
        log.warning(
            "worker %s: ready to be recycled (%d running tasks handed back)",
            self.worker_id,
            len(given_up),
        )
        self.recycle.set()

    # -- draining -----------------------------------------------------------

    async def drain(self, grace: float) -> int:
        """Stop taking work, let running tasks finish within ``grace``, hand back the rest.

        Returns how many tasks were handed back.  The worker then unregisters;
        stop the actor afterwards.  The drain itself is the worker's: this
        sends it a message and waits for the ``drained`` event it sets.
        """
        try:
            await self.ref.send(_Drain(grace))
        except ActorStopped:
            return 0  # not running: nothing held, nothing to hand back
        await self.drained.wait()
        return self.handed_back

    def _start_drain(self, grace: float) -> None:
        if self._draining:
            return
        self._draining = True
        self._send_scheduler(Ready(0))
        # Unstarted tasks go back at once, so other workers start them now
        # rather than after our grace period.
        waiting = self.executor.release_waiting()
        if waiting:
            self._send_scheduler(Release(waiting))
        self.handed_back += len(waiting)
        if self.executor.held and self._nursery is not None:
            self._nursery.start_soon(self._tell_after, max(0.0, grace), _DrainOver())
        else:
            self._finish_drain()

    def _finish_drain(self) -> None:
        """Hand back what still runs, unregister, and say so with ``drained``."""
        if self.drained.is_set():
            return
        self._flush()  # what finished within the grace period
        given_up = self.executor.abandon_all()
        if given_up:
            self._send_scheduler(Release(given_up))
        self.handed_back += len(given_up)
        goodbye = Unregister(self.worker_id, "left")
        # On the scheduler's connection, behind our last Done and Release: sent
        # to Discovery it could overtake them, and the control plane would
        # requeue tasks whose results are on their way (protocol.md, §6).
        if not (self._connected and self._send_scheduler(goodbye)):
            self._send_discovery(goodbye)
        self.drained.set()

    def statistics_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "instance_id": self.instance_id,
            "connected": self._connected,
            "held": self.executor.held,
            "running": self.executor.running,
            "waiting": self.executor.waiting,
            "completed": self.executor.completed,
            "unreported": len(self._outbox),
            "stuck_runs": self.executor.stuck_runs,
            "retiring": self._retiring,
        }


def _shrink(record: ResultRecord, budget: int) -> ResultRecord:
    """A record too large for any message, made to fit: it says what did not fit.

    A value cannot be cut, so a result becomes a FAILURE; an error or a
    traceback is cut short and the record keeps its status (a retry stays a
    retry).
    """
    size = result_weight(record)
    log.warning(
        "task %s: result of %d bytes exceeds the %d-byte limit",
        record.task_id,
        size,
        budget,
        extra={"task_id": record[0]},
    )
    if record.result is not None:
        return record._replace(
            status="failure",
            result=None,
            error=f"result too large: {size} bytes, limit {budget}",
            traceback=None,
            retry_delay=None,
        )
    keep = max(64, budget // 16)  # characters: at most 4 bytes each in UTF-8
    return record._replace(error=_cut(record.error, keep), traceback=_cut(record.traceback, keep))


def _cut(text: str | None, keep: int) -> str | None:
    if text is None or len(text) <= keep:
        return text
    return f"{text[:keep]}… ({len(text) - keep} characters cut: too large for a message)"


def _impossible(record: ResultRecord) -> None:
    raise AssertionError(f"a shrunk result record is still too large: {record.task_id}")


def _encode_done(records: list[ResultRecord]) -> bytes:
    """``Done(records)`` encoded; a record that cannot be encoded fails its task instead.

    The executor cleans every text it makes, so this is the last line of
    defence: a ``Done`` that cannot be encoded would otherwise escape into
    the executor's bookkeeping and leave every task in it unreported.
    """
    try:
        return encode(Done(records))
    except Exception:
        fixed = []
        for record in records:
            try:
                encode(Done([record]))
            except Exception as exc:
                record = record._replace(
                    status="failure",
                    result=None,
                    error=f"result could not be reported: {type_name(exc)}",
                    traceback=None,
                    retry_delay=None,
                )
            fixed.append(record)
        return encode(Done(fixed))
