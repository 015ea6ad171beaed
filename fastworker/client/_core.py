"""The client's actor: the trio side of ``Client``, owner of its two sockets.

Callers (on asyncio in another thread, or on trio in this one) never touch a
socket.  They put work on ``inbox`` (a deque: appending is thread-safe) and
call ``wake()``; the first wake after a drain schedules one message to this
actor, which then takes everything queued at once and sends it as few
``Submit`` messages as the size bound allows.  That is where the client's
throughput comes from.

The actor keeps every task it submitted until its result arrives.  It
re-sends a request whose ack did not come (same task ids, so the control
plane deduplicates), and when Discovery reports a new control-plane instance
it re-submits everything unfinished.
"""

from __future__ import annotations

import collections
import logging
import time
from collections import OrderedDict
from typing import Any

import attrs
import trio

from .._io import Inbound, connect_dealer, tick
from ..runtime import Actor
from ..tasks.models import TaskStatus
from ..transport import TransportConfig, ZSocket, resolve_endpoint
from ..wire import (
    Cancel,
    CancelReply,
    ErrorReply,
    Lookup,
    LookupReply,
    ResultQuery,
    ResultRecord,
    ResultReply,
    Results,
    StatsQuery,
    StatsReply,
    Submit,
    SubmitAck,
    WireError,
    decode,
    encode,
)
from ._errors import ClientStoppedError, QueueFullError
from ._waiters import Waiter

__all__ = ["ClientCore", "Command", "PendingTask"]

log = logging.getLogger("fastworker.client")

_MAX_TASKS_PER_SUBMIT = 4096
# Well under the 16 MiB message limit, so that a batch of large payloads is split
# rather than refused by the control plane's MAXMSGSIZE (one payload alone is
# bounded by the Client at the call site).
_MAX_SUBMIT_BYTES = 4 * 1024 * 1024
# A result push can be lost (the client was reconnecting, a queue overflowed).
# Tasks acknowledged this long ago without a result are looked up in the
# control plane's cache, so nothing waits forever on a lost push.
_SWEEP_AFTER = 5.0
_SWEEP_BATCH = 4096
# After a queue_full rejection, submissions are refused at once (QueueFullError)
# for this long; then the next one goes out and the control plane decides again.
# Without the expiry nothing would ever be sent again to clear the flag.
_QUEUE_FULL_HOLD = 1.0


class _SweepReply:
    """Receives the answer to a sweep query on the actor's own thread."""

    __slots__ = ("_core",)

    def __init__(self, core: ClientCore) -> None:
        self._core = core

    def set(self, value: Any) -> None:
        if isinstance(value, list):
            self._core._finish([r for r in value if r is not None], None)

    async def wait(self, timeout: float | None) -> tuple[bool, Any]:
        raise NotImplementedError("sweep replies are never awaited")


class PendingTask:
    """A task this client submitted and has no final result for yet (slotted: one per task)."""

    __slots__ = ("sent", "status", "waiters", "wire")

    def __init__(self, wire: list[Any], waiters: list[Waiter] | None = None) -> None:
        self.wire = wire
        self.status = TaskStatus.PENDING
        self.waiters = waiters
        self.sent = False  # part of a request not yet acknowledged or acknowledged


@attrs.define(eq=False, slots=True)
class Command:
    """A request from a caller other than a submission: query, cancel, stats, join."""

    kind: str
    waiter: Waiter
    task_ids: list[str] = attrs.Factory(list)


@attrs.define(eq=False, slots=True)
class _Request:
    task_ids: list[str]
    sent_at: float
    tries: int = 1


@attrs.frozen
class _Wake:
    pass


@attrs.frozen
class _Tick:
    pass


class ClientCore(Actor):
    def __init__(
        self,
        *,
        client_id: str,
        discovery_address: str,
        retries: int,
        ack_timeout: float,
        result_cache_size: int,
        transport: TransportConfig,
    ) -> None:
        super().__init__("client", mailbox_size=4096)
        self.client_id = client_id
        self.discovery_address = discovery_address
        self.retries = retries
        self.ack_timeout = ack_timeout
        self.transport = transport
        # Shared with the caller side (plain dict/deque operations only).
        self.inbox: collections.deque[str | Command] = collections.deque()
        self.pending: dict[str, PendingTask] = {}
        self.finished: OrderedDict[str, ResultRecord] = OrderedDict()
        self.result_cache_size = result_cache_size
        self._queue_full_until = 0.0  # time.monotonic(); see queue_full
        self.token: trio.lowlevel.TrioToken | None = None
        self._wake_scheduled = False
        # Trio side only.
        self._unsent: collections.deque[str] = collections.deque()
        self._requests: dict[int, _Request] = {}
        self._queries: dict[int, Command] = {}
        self._joiners: list[Waiter] = []
        self._parked: list[Command] = []  # commands waiting for a connection
        # (acknowledged at, task ids), oldest first: candidates for the lost-push sweep
        self._watch: collections.deque[tuple[float, list[str]]] = collections.deque()
        self._next_request = 1
        self._discovery: ZSocket | None = None
        self._gateway: ZSocket | None = None
        self._gateway_endpoint: str | None = None
        self._nursery: trio.Nursery | None = None
        self.instance_id: str | None = None
        self._interval = 0.1
        self._heartbeat = 1.0
        self._last_reply = 0.0
        self.connected = trio.Event()
        self.acks_dropped_for_test = 0  # tests set this to lose acknowledgements on purpose
        self.resubmitted = 0
        self.failure: Exception | None = None  # set when the actor is gone for good
        self._starts = 0

    # -- caller side (any thread) -------------------------------------------

    @property
    def queue_full(self) -> bool:
        """True for ``_QUEUE_FULL_HOLD`` s after the control plane rejected a task as queue_full."""
        return time.monotonic() < self._queue_full_until

    def wake(self) -> None:
        """From another thread: ask the actor to look at ``inbox``, once per drain."""
        if not self._wake_scheduled and self.token is not None:
            self._wake_scheduled = True
            try:
                self.token.run_sync_soon(self._tell_wake)
            except trio.RunFinishedError:
                self._wake_scheduled = False

    def wake_here(self) -> None:
        """From the actor's own thread (a trio caller): no thread hop needed."""
        if not self._wake_scheduled:
            self._wake_scheduled = True
            self._tell_wake()

    def _tell_wake(self) -> None:
        try:
            self.ref.tell(_Wake())
        except Exception:
            # Mailbox full (or the actor restarting): the next tick drains the
            # inbox anyway, so nothing queued there is lost.
            self._wake_scheduled = False

    # -- life cycle ---------------------------------------------------------

    async def on_start(self, nursery: trio.Nursery) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._nursery = nursery
        self._starts += 1
        if self._starts > 1:
            # Restarted after a crash: the old sockets are closed and replies to
            # what we sent are lost; reconnect and send everything unfinished again
            # (the control plane deduplicates by task id).
            self._gateway = None
            self._gateway_endpoint = None
            self.connected = trio.Event()
            self._resubmit_all()
        self._discovery = connect_dealer(nursery, self.ref, self.discovery_address, self.transport)
        nursery.start_soon(tick, self.ref, lambda: self._interval, _Tick())
        self._lookup()

    async def on_stop(self) -> None:
        self.close_now(linger_ms=500)

    def close_now(self, linger_ms: int) -> int:
        """Send what can be sent without waiting, close the sockets; returns what is left unsent."""
        if self.inbox:
            # Also without a gateway: ids still in the inbox count as unsent.
            self._drain_inbox()
            self._send_unsent()
        left = len(self._unsent)
        for sock in (self._gateway, self._discovery):
            if sock is not None:
                sock.close(linger_ms=linger_ms)
        self._gateway = self._discovery = None
        return left

    def fail_waiters(self, message: str) -> None:
        """The client stopped: every caller still waiting gets ClientStoppedError now."""
        # list(): callers in other threads may add to pending while we look.
        waiters = [w for entry in list(self.pending.values()) for w in entry.waiters or ()]
        waiters += self._joiners
        waiters += [command.waiter for command in self._parked]
        waiters += [command.waiter for command in self._queries.values()]
        waiters += [item.waiter for item in list(self.inbox) if isinstance(item, Command)]
        self._joiners, self._parked = [], []
        self._queries.clear()
        for waiter in waiters:
            waiter.set(ClientStoppedError(message))

    # -- messages -----------------------------------------------------------

    def receive(self, message: Any) -> Any:
        if type(message) is Inbound:
            for parts in message.frames:
                self._on_frame(parts)
        elif type(message) is _Wake:
            self._wake_scheduled = False  # before draining: a later append wakes again
            self._drain_inbox()
            self._send_unsent()
        elif type(message) is _Tick:
            self._on_tick()
        else:
            raise TypeError(f"client got an unexpected message {message!r}")
        return None

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, str):
                entry = self.pending.get(item)
                if entry is not None and not entry.sent:
                    self._unsent.append(item)
            else:
                self._on_command(item)

    def _on_command(self, command: Command) -> None:
        if command.kind == "join":
            if self.pending:
                self._joiners.append(command.waiter)
            else:
                command.waiter.set(None)
            return
        if command.kind == "cancel":
            entry = self.pending.get(command.task_ids[0])
            if entry is not None and not entry.sent:
                # Never left this process: cancel here, it will never run.
                wire = entry.wire
                record = ResultRecord(
                    wire[0],
                    TaskStatus.CANCELLED.value,
                    error="cancelled",
                    format=wire[3],
                    name=wire[1],
                )
                self._finish([record], None)
                command.waiter.set(CancelReply(0, True, TaskStatus.CANCELLED.value))
                return
        if self._gateway is None or not self.connected.is_set():
            self._park_command(command)
            return
        self._send_unsent()  # a request never overtakes a task submitted before it
        request_id = self._new_request_id()
        if command.kind == "query":
            message: Any = ResultQuery(request_id, command.task_ids)
        elif command.kind == "cancel":
            message = Cancel(request_id, command.task_ids[0])
        elif command.kind == "stats":
            message = StatsQuery(request_id)
        else:
            raise ValueError(f"unknown client command {command.kind!r}")
        self._queries[request_id] = command
        if not self._send_gateway(message):
            del self._queries[request_id]
            self._park_command(command)

    def _park_command(self, command: Command) -> None:
        # Not connected: retried on the next tick; the caller's own timeout bounds it.
        self._parked.append(command)

    def _new_request_id(self) -> int:
        request_id = self._next_request
        self._next_request += 1
        return request_id

    # -- sending ------------------------------------------------------------

    def _send_gateway(self, message: Any) -> bool:
        if self._gateway is None:
            return False
        try:
            self._gateway.send_multipart_nowait([encode(message)])
        except trio.WouldBlock:
            return False
        return True

    def _send_unsent(self) -> None:
        if self._gateway is None or not self.connected.is_set():
            return
        unsent = self._unsent
        pending = self.pending
        now = trio.current_time()
        max_bytes = min(_MAX_SUBMIT_BYTES, self.transport.max_message_size // 2)
        while unsent:
            ids: list[str] = []
            wires: list[Any] = []
            size = 0
            while unsent and len(ids) < _MAX_TASKS_PER_SUBMIT and size < max_bytes:
                task_id = unsent.popleft()
                entry = pending.get(task_id)
                if entry is None or entry.sent:
                    continue  # cancelled locally, or finished meanwhile
                ids.append(task_id)
                wires.append(entry.wire)
                size += len(entry.wire[4])
            if not ids:
                return
            request_id = self._new_request_id()
            if not self._send_gateway(Submit(request_id, wires)):
                unsent.extendleft(reversed(ids))
                return
            for task_id in ids:
                pending[task_id].sent = True
            self._requests[request_id] = _Request(ids, now)

    def _lookup(self) -> None:
        if self._discovery is None:
            return
        try:
            self._discovery.send_multipart_nowait([encode(Lookup(self._new_request_id()))])
        except trio.WouldBlock:
            pass  # discovery not reachable yet: the next tick asks again

    def _on_tick(self) -> None:
        now = trio.current_time()
        if self.connected.is_set() and now - self._last_reply > self._heartbeat * 3:
            log.warning("client: control plane silent for %.1f s", now - self._last_reply)
            self.connected = trio.Event()
            self._interval = 0.1
        if not self.connected.is_set():
            self._interval = min(self._interval * 2, self._heartbeat)
        self._lookup()
        if self.inbox:
            self._drain_inbox()  # in case a wake was lost to a full mailbox
        self._retry_unacked(now)
        self._sweep(now)
        if self._parked and self.connected.is_set():
            parked, self._parked = self._parked, []
            for command in parked:
                self._on_command(command)
        self._send_unsent()

    def _sweep(self, now: float) -> None:
        """Look up tasks acknowledged long ago whose result push never came."""
        if not self.connected.is_set() or self._gateway is None:
            return
        watch = self._watch
        pending = self.pending
        stale: list[str] = []
        while watch and now - watch[0][0] > _SWEEP_AFTER and len(stale) < _SWEEP_BATCH:
            _, task_ids = watch.popleft()
            missing = [task_id for task_id in task_ids if task_id in pending]
            if missing:
                stale.extend(missing)
                watch.append((now, missing))  # look again later if still missing
        if stale:
            request_id = self._new_request_id()
            self._queries[request_id] = Command("sweep", _SweepReply(self), stale)
            if not self._send_gateway(ResultQuery(request_id, stale)):
                del self._queries[request_id]

    def _retry_unacked(self, now: float) -> None:
        for request_id, request in list(self._requests.items()):
            if now - request.sent_at < self.ack_timeout * 2 ** (request.tries - 1):
                continue
            del self._requests[request_id]
            live = [t for t in request.task_ids if t in self.pending]
            if request.tries > self.retries:
                self._fail_locally(
                    live,
                    f"the control plane did not acknowledge the submission after "
                    f"{request.tries} attempts",
                )
                continue
            wires = [self.pending[t].wire for t in live]
            if not wires:
                continue
            new_id = self._new_request_id()
            if self._send_gateway(Submit(new_id, wires)):
                self._requests[new_id] = _Request(live, now, request.tries + 1)
            else:
                for task_id in live:
                    self.pending[task_id].sent = False
                self._unsent.extendleft(reversed(live))

    # -- receiving ----------------------------------------------------------

    def _on_frame(self, parts: list[bytes]) -> None:
        # One message per frame; the gateway puts held acks in front of the
        # message they ride with (protocol.md, §1): handle them in order.
        for body in parts:
            self._on_body(body)

    def _on_body(self, body: bytes) -> None:
        try:
            message = decode(body)
        except WireError as exc:
            log.warning("client ignored a bad frame from the control plane: %s", exc)
            return
        self._last_reply = trio.current_time()
        if isinstance(message, Results):
            self._on_results(message.results)
        elif isinstance(message, SubmitAck):
            self._on_ack(message)
        elif isinstance(message, LookupReply):
            self._on_lookup(message)
        elif isinstance(message, ResultReply):
            command = self._queries.pop(message.request_id, None)
            if command is not None:
                records = [None if raw is None else _safe_record(raw) for raw in message.results]
                command.waiter.set(records)
        elif isinstance(message, (CancelReply, StatsReply)):
            command = self._queries.pop(message.request_id, None)
            if command is not None:
                command.waiter.set(message)
        elif isinstance(message, ErrorReply):
            command = self._queries.pop(message.request_id, None)
            error = RuntimeError(f"control plane rejected a request: {message.message}")
            if command is not None:
                command.waiter.set(error)
            else:
                log.error("%s", error)

    def _on_lookup(self, reply: LookupReply) -> None:
        self._heartbeat = reply.heartbeat_interval
        self._interval = reply.heartbeat_interval
        endpoint = resolve_endpoint(reply.client_endpoint, self.discovery_address)
        if reply.instance_id != self.instance_id:
            if self.instance_id is not None:
                log.warning(
                    "client: control plane restarted (%s → %s); re-submitting %d unfinished tasks",
                    self.instance_id,
                    reply.instance_id,
                    len(self.pending),
                )
            self.instance_id = reply.instance_id
            self._resubmit_all()
        if endpoint != self._gateway_endpoint:
            self._open_gateway(endpoint)
        if not self.connected.is_set():
            self.connected.set()
        self._send_unsent()

    def _resubmit_all(self) -> None:
        self._requests.clear()
        self._watch.clear()
        self._unsent.clear()
        for task_id, entry in list(self.pending.items()):
            if entry.sent:
                self.resubmitted += 1
            entry.sent = False
            self._unsent.append(task_id)
        # Replies to questions asked of the old instance will never come.
        for command in self._queries.values():
            if command.kind != "sweep":
                self._parked.append(command)
        self._queries.clear()

    def _open_gateway(self, endpoint: str) -> None:
        assert self._nursery is not None
        if self._gateway is not None:
            self._gateway.close()
        self._gateway = connect_dealer(
            self._nursery,
            self.ref,
            endpoint,
            self.transport,
            identity=self.client_id.encode(),
            when_up=lambda _: _Wake(),  # send what waited for the connection
            keep_unread=True,  # results pushed just before the control plane exits
        )
        self._gateway_endpoint = endpoint

    def _on_ack(self, ack: SubmitAck) -> None:
        if self.acks_dropped_for_test > 0:
            self.acks_dropped_for_test -= 1
            return
        request = self._requests.pop(ack.request_id, None)
        if not ack.rejected:
            self._queue_full_until = 0.0
        if request is None:
            return
        for item in ack.rejected:
            if type(item) is not list or len(item) != 3:
                continue
            task_id, reason, text = item
            if reason == "queue_full":
                self._queue_full_until = time.monotonic() + _QUEUE_FULL_HOLD
            self._fail_locally(
                [task_id],
                f"rejected by the control plane ({reason}): {text}",
                error_type=QueueFullError if reason == "queue_full" else None,
            )
        self._watch.append((trio.current_time(), request.task_ids))
        pending = self.pending
        queued = TaskStatus.QUEUED
        for task_id in request.task_ids:
            entry = pending.get(task_id)
            if entry is not None:
                entry.status = queued

    def _fail_locally(
        self, task_ids: list[str], error: str, error_type: type[Exception] | None = None
    ) -> None:
        records = []
        for task_id in task_ids:
            entry = self.pending.get(task_id)
            if entry is None:
                continue
            wire = entry.wire
            records.append(
                ResultRecord(
                    task_id, TaskStatus.FAILURE.value, error=error, format=wire[3], name=wire[1]
                )
            )
        self._finish(records, error_type(error) if error_type is not None else None)

    def _on_results(self, raw_results: list[Any]) -> None:
        records = [r for r in map(_safe_record, raw_results) if r is not None]
        self._finish(records, None)

    def _finish(self, records: list[ResultRecord], raise_in_waiters: Exception | None) -> None:
        pending = self.pending
        finished = self.finished
        for record in records:
            if not record.is_final:
                continue
            entry = pending.pop(record.task_id, None)
            finished[record.task_id] = record
            if entry is not None and entry.waiters:
                for waiter in entry.waiters:
                    waiter.set(raise_in_waiters if raise_in_waiters is not None else record)
        while len(finished) > self.result_cache_size:
            finished.popitem(last=False)
        if not pending and self._joiners:
            joiners, self._joiners = self._joiners, []
            for waiter in joiners:
                waiter.set(None)


def _safe_record(raw: Any) -> ResultRecord | None:
    try:
        return ResultRecord.from_wire(raw)
    except WireError:
        log.warning("client ignored an invalid result from the control plane")
        return None
