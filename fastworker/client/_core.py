"""The client's core, sans I/O: every decision of ``Client``, no socket, no loop, no thread.

In the spirit of h11 and pyzmq's ``_future.py``: events go in as method calls
(frames a socket read, a tick, a wake-up, a handshake's outcome), frames go out
through a :class:`Link` the binding implements (one ``send`` that says whether
the frame went), and completions go out through the callers' waiters.  The
clock is injected.  The bindings — ``_trio_binding`` (a trio actor) and
``_asyncio_binding`` (an asyncio task) — own the sockets and the timers and
run this core on the caller's own loop.

Callers never touch a socket.  They put work on ``inbox`` and call ``wake()``;
the first wake after a drain asks the binding for one ``on_wake()``, which
takes everything queued at once and sends it as few ``Submit`` messages as the
size bound allows.  That is where the client's throughput comes from.

The core keeps every task it submitted until its result arrives.  It re-sends
a request whose ack did not come (same task ids, so the control plane
deduplicates), and when Discovery reports a new control-plane instance it
re-submits everything unfinished.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import attrs

from .._io import HandshakeHistory
from ..tasks.models import TaskStatus
from ..transport import TransportConfig, resolve_endpoint
from ..wire import (
    MAX_QUERY_IDS,
    Cancel,
    CancelReply,
    DeadLetterReply,
    DeadLetterRetryReply,
    ErrorReply,
    Lookup,
    LookupReply,
    Message,
    ResultQuery,
    ResultRecord,
    ResultReply,
    Results,
    ScheduleListReply,
    ScheduleReply,
    StatsQuery,
    StatsReply,
    Submit,
    SubmitAck,
    TaskEnvelope,
    WireError,
    decode,
    encode,
    message_budget,
    split_by_bytes,
    task_weight,
    text_bytes,
)
from ._errors import (
    AuthenticationError,
    ClientStoppedError,
    ControlPlaneBusyError,
    QueueFullError,
)
from ._waiters import Waiter

__all__ = [
    "AdminRequest",
    "CancelTask",
    "Channel",
    "ClientCore",
    "Command",
    "Flush",
    "Join",
    "Link",
    "PendingTask",
    "Query",
    "StatsRequest",
    "task_wire",
]

log = logging.getLogger("fastworker.client")

# Tasks per Submit; the bytes of each are bounded by split_by_bytes under the
# control plane's message limit.
_MAX_TASKS_PER_SUBMIT = 4096
# Replies handed to the caller's waiter as they are.
_PLAIN_REPLIES = (
    StatsReply,
    ScheduleReply,
    ScheduleListReply,
    DeadLetterReply,
    DeadLetterRetryReply,
)
_REPLIES = (ResultReply, CancelReply, *_PLAIN_REPLIES)
# A result push can be lost (the client was reconnecting, a queue overflowed).
# Tasks acknowledged this long ago without a result are looked up in the
# control plane's cache, so nothing waits forever on a lost push.  A task the
# cache does not know is re-submitted after 1, 2, 4, 8 … such answers: the
# control plane deduplicates it if it still holds it, pushes its result again
# (or a FAILURE saying the result expired) if it finished, and runs it if it
# never heard of it.
_SWEEP_AFTER = 5.0
_SWEEP_BATCH = 4096
# A query or cancel whose caller left (timed out, cancelled) is forgotten at
# its deadline; one the client asks itself (a sweep) after this long.
_SWEEP_REPLY_WAIT = 30.0
# After a queue_full rejection, submissions are refused at once (QueueFullError)
# for this long; then the next one goes out and the control plane decides again.
# Without the expiry nothing would ever be sent again to clear the flag.
_QUEUE_FULL_HOLD = 1.0
# Bounds of the heartbeat interval a LookupReply may set (the tick follows it).
_MIN_INTERVAL = 0.05
_MAX_INTERVAL = 60.0
# The control plane's message limit as a LookupReply may set it (MAXMSGSIZE is an int64,
# but a limit past 2³¹ − 1 buys nothing and one below a few KiB carries no task).
_MIN_MESSAGE_SIZE = 4096
_MAX_MESSAGE_SIZE = 2**31 - 1
# libzmq does not reconnect after a server refused our key; we open the
# sockets again this often, so a key added back on the server works again.
_REFUSED_RETRY = 2.0


def task_wire(
    task_id: str, name: str, rank: int, fmt: int, payload: bytes, options: dict[str, Any] | None
) -> list[Any]:
    """The one place a task's wire array is built (protocol.md, TaskWire).

    A list rather than a ``TaskEnvelope``: the client fills in the id of a
    batch entry after validation, and the array is encoded as it is.
    """
    return [task_id, name, rank, fmt, payload, options]


class Channel(enum.Enum):
    """The core's two connections."""

    DISCOVERY = "discovery"
    GATEWAY = "gateway"


class Link(Protocol):
    """What a binding does for the core: the sockets, and scheduling a wake-up."""

    def send(self, channel: Channel, body: bytes) -> bool:
        """Hand one frame to ``channel`` without waiting; False when it cannot go now."""

    def open(self, channel: Channel, endpoint: str, max_message_size: int) -> None:
        """(Re)connect ``channel`` to ``endpoint``, closing what it had; the gateway's
        routing id is the core's ``client_id``."""

    def close(self, linger_ms: int) -> None:
        """Close both connections."""

    def wake_soon(self) -> bool:
        """Have ``on_wake`` called on the core's loop, soon or before returning;
        False when it cannot be.  Only the caller's side wakes the core, never
        one of its own handlers, so running it at once is safe."""


class PendingTask:
    """A task this client submitted and has no final result for yet (slotted: one per task)."""

    __slots__ = (
        "cancelling",
        "ever_sent",
        "misses",
        "sent",
        "status",
        "waiters",
        "watched",
        "wire",
    )

    def __init__(self, wire: list[Any], waiters: list[Waiter] | None = None) -> None:
        self.wire = wire
        self.status = TaskStatus.PENDING
        self.waiters = waiters
        self.sent = False  # part of a request not yet acknowledged or acknowledged
        self.ever_sent = False  # a control plane may hold it: only it can cancel it
        self.cancelling = False  # a Cancel is on its way: not re-sent meanwhile
        self.watched = False  # in the sweep's watch list
        self.misses = 0  # sweep answers "not in the cache"


# -- commands: what a caller asks of the core besides submitting ---------------


@attrs.define(eq=False, slots=True)
class Command:
    """A caller's request; ``waiter`` gets the answer.  ``deadline`` (on the
    core's clock): after it nobody waits for the answer, and the entry goes."""

    waiter: Waiter
    deadline: float = math.inf


@attrs.define(eq=False, slots=True)
class Join(Command):
    """Answered (None) once no task of this client is unfinished."""


@attrs.define(eq=False, slots=True)
class Flush(Command):
    """Answered (None) once every id returned so far was acknowledged."""


@attrs.define(eq=False, slots=True)
class Query(Command):
    """The control plane's cached records of ``task_ids`` (a list, None where unknown)."""

    task_ids: list[str] = attrs.Factory(list)


@attrs.define(eq=False, slots=True)
class CancelTask(Command):
    """A CancelReply for ``task_id``."""

    task_id: str = ""


@attrs.define(eq=False, slots=True)
class StatsRequest(Command):
    """The control plane's StatsReply."""


@attrs.define(eq=False, slots=True)
class AdminRequest(Command):
    """A schedules or dead-letters request: ``build(request_id)`` is the message."""

    build: Callable[[int], Message] | None = None


@attrs.define(eq=False, slots=True)
class _Sweep:
    """A ResultQuery the core asked itself, for tasks whose result push never came."""

    task_ids: list[str]
    deadline: float


@attrs.define(eq=False, slots=True)
class _Request:
    task_ids: list[str]
    sent_at: float
    tries: int = 1


class ClientCore:
    """The client's bookkeeping; see the module docstring for how it is driven.

    Every method runs on one loop — the binding's — and raises only on a bug:
    the binding's supervision restarts it with :meth:`restart`.
    """

    def __init__(
        self,
        *,
        client_id: str,
        discovery_address: str,
        retries: int,
        ack_timeout: float,
        result_cache_size: int,
        transport: TransportConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_id = client_id
        self.discovery_address = discovery_address
        self.retries = retries
        self.ack_timeout = ack_timeout
        self.transport = transport
        self.clock = clock
        self.link: Link | None = None
        # The control plane's limit once a LookupReply said it, our own until then.
        self.max_message_size = transport.max_message_size
        # Filled by callers, drained by on_wake (plain deque operations only).
        self.inbox: collections.deque[str | Command] = collections.deque()
        self.pending: dict[str, PendingTask] = {}
        self.finished: OrderedDict[str, ResultRecord] = OrderedDict()
        self.result_cache_size = result_cache_size
        self._queue_full_until = 0.0  # see queue_full
        self._wake_scheduled = False
        self._unsent: collections.deque[str] = collections.deque()
        self._requests: dict[int, _Request] = {}
        self._queries: dict[int, Command | _Sweep] = {}
        self._joiners: list[Join] = []
        # flush() callers: the ids each still waits to see acknowledged
        self._flushers: list[tuple[set[str], Flush]] = []
        self._parked: list[Command] = []  # commands waiting for a connection
        # (acknowledged at, task ids), oldest first: candidates for the lost-push sweep
        self._watch: collections.deque[tuple[float, list[str]]] = collections.deque()
        self._next_request = 1
        self._gateway_endpoint: str | None = None
        self._gateway_limit = 0  # the MAXMSGSIZE of the gateway connection
        self.instance_id: str | None = None
        self.interval = 0.1  # seconds until the binding's next on_tick
        self._heartbeat = 1.0
        self._last_reply = 0.0
        self.connected = False  # a LookupReply came and the control plane is not silent
        self.resubmitted = 0
        self.failure: Exception | None = None  # set when the core is gone for good
        # Why the control plane refused our CURVE handshake; None while it accepts.
        self.refused: str | None = None
        # Shared by the judges of every socket the bindings open (see HandshakeHistory).
        self.handshakes = HandshakeHistory()
        self._refused_at = 0.0

    # -- caller side --------------------------------------------------------

    @property
    def queue_full(self) -> bool:
        """True for ``_QUEUE_FULL_HOLD`` s after the control plane rejected a task as queue_full."""
        return self.clock() < self._queue_full_until

    def wake(self) -> None:
        """Have the inbox drained soon: one wake-up per drain, however many callers."""
        if not self._wake_scheduled and self.link is not None:
            self._wake_scheduled = True
            if not self.link.wake_soon():
                # The binding cannot schedule it now (a full mailbox, a loop
                # ending): the next tick drains the inbox anyway.
                self._wake_scheduled = False

    # -- life cycle (the binding's side) -------------------------------------

    def start(self, link: Link) -> None:
        """Begin talking through ``link``: connect to Discovery and ask it."""
        self.link = link
        self._wake_scheduled = False
        link.open(Channel.DISCOVERY, self.discovery_address, self.transport.max_message_size)
        self._lookup()

    def restart(self, link: Link) -> None:
        """Begin again after the binding's supervision caught a crash.

        The old connections are closed and replies to what was sent are lost:
        reconnect and send everything unfinished again (the control plane
        deduplicates by task id).
        """
        self._gateway_endpoint = None
        self._gateway_limit = 0
        self.connected = False
        self._resubmit_all()
        self.start(link)

    def close_now(self, linger_ms: int) -> int:
        """Close the connections; returns what is left unsent.

        With a linger, what can be sent without waiting goes first; with none
        (``stop()``, which hands over by waiting for acks instead) nothing does.
        """
        if self.inbox and linger_ms > 0:
            # Also without a gateway: ids still in the inbox count as unsent.
            self._drain_inbox()
            self._send_unsent()
        left = len(self._unsent)
        if self.link is not None:
            self.link.close(linger_ms)
        self._gateway_endpoint = None
        self.connected = False
        return left

    def outstanding(self) -> int:
        """Tasks whose ids were returned and that no control plane has acknowledged yet."""
        pending = TaskStatus.PENDING
        return sum(1 for entry in list(self.pending.values()) if entry.status is pending)

    def successor(self, client_id: str, *, hand_over: bool = False) -> ClientCore:
        """A new core for this client's tasks, under a new identity.

        It shares ``pending`` and ``finished``: for a client started again it
        re-submits everything unfinished when it meets the control plane (so
        results come to its identity; the control plane deduplicates).  With
        ``hand_over`` it sends only what was never acknowledged, for ``stop()``
        to hand over from a thread of its own.
        """
        heir = ClientCore(
            client_id=client_id,
            discovery_address=self.discovery_address,
            retries=self.retries,
            ack_timeout=self.ack_timeout,
            result_cache_size=self.result_cache_size,
            transport=self.transport,
            clock=self.clock,
        )
        heir.pending = self.pending
        heir.finished = self.finished
        heir.max_message_size = self.max_message_size
        if hand_over:
            heir.instance_id = self.instance_id
            pending = TaskStatus.PENDING
            for task_id, entry in list(self.pending.items()):
                if entry.status is pending:
                    entry.sent = False
                    heir._unsent.append(task_id)
        return heir

    def fail_waiters(self, message: str) -> None:
        """The client stopped: every caller still waiting gets ClientStoppedError now."""
        waiters = [w for entry in list(self.pending.values()) for w in entry.waiters or ()]
        waiters += [command.waiter for command in self._joiners]
        waiters += [command.waiter for _, command in self._flushers]
        self._flushers = []
        for entry in list(self.pending.values()):
            entry.waiters = None  # released here; a result after a restart wakes nobody
        dropped = [*self._parked, *(c for c in self._queries.values() if isinstance(c, Command))]
        waiters += [command.waiter for command in dropped]
        waiters += [item.waiter for item in list(self.inbox) if isinstance(item, Command)]
        self._joiners, self._parked = [], []
        self._queries.clear()
        for command in dropped:
            self._abandon(command)  # a task held back for a Cancel goes to the successor
        for waiter in waiters:
            waiter.set(ClientStoppedError(message))

    # -- events (the binding's side) ------------------------------------------

    def on_frames(self, frames: Iterable[list[bytes]]) -> None:
        """Messages one connection delivered, in order."""
        for parts in frames:
            # One message per frame; the gateway puts held acks in front of the
            # message they ride with (protocol.md, §1): handle them in order.
            for body in parts:
                self._on_body(body)

    def on_wake(self) -> None:
        """The wake-up ``wake()`` asked for: send what callers queued."""
        self._wake_scheduled = False  # before draining: a later append wakes again
        self._drain_inbox()
        self._send_unsent()

    def on_discovery_up(self) -> None:
        """The Discovery connection is up: ask at once, not a tick later."""
        if not self.connected:
            self._lookup()

    def on_gateway_up(self) -> None:
        """The gateway connection is up: send what waited for it."""
        self._drain_inbox()
        self._send_unsent()

    def on_tick(self) -> None:
        """Every ``interval`` seconds: retries, sweeps, expiries, reconnection."""
        self._on_tick()

    def wake_lost(self) -> None:
        """The binding could not deliver a wake-up it had scheduled: the next wake asks again."""
        self._wake_scheduled = False

    def on_handshake(self, problem: str | None) -> None:
        """A CURVE handshake of one of the current connections ended (None: accepted)."""
        if problem is None:
            if self.refused is not None:
                log.info("client: the control plane accepts our CURVE key again")
                self.refused = None
            return
        self._on_refused(problem)

    def _drain_inbox(self) -> None:
        inbox = self.inbox
        while inbox:
            item = inbox.popleft()
            if isinstance(item, str):
                entry = self.pending.get(item)
                if entry is not None and not entry.sent:
                    self._unsent.append(item)
                    if self.refused is not None and entry.waiters:
                        self._refuse_waiters(entry.waiters)
                        entry.waiters = None  # answered: its result, if it comes, wakes nobody
            else:
                self._on_command(item)

    # -- CURVE handshakes ---------------------------------------------------

    def _on_refused(self, problem: str) -> None:
        if self.refused is None:
            log.error("client: %s", problem)
        self.refused = problem
        self._refused_at = self.clock()
        # Everybody waiting learns it now, not at their timeout.  The tasks
        # stay: they go out if the key is accepted later (see _on_tick); their
        # waiters are answered, so a result arriving then sets none a second time.
        waiters: list[Waiter] = []
        for entry in list(self.pending.values()):
            if entry.waiters:
                waiters += entry.waiters
                entry.waiters = None
        waiters += [command.waiter for command in self._joiners]
        waiters += [command.waiter for _, command in self._flushers]
        dropped = [*self._parked, *(c for c in self._queries.values() if isinstance(c, Command))]
        waiters += [command.waiter for command in dropped]
        self._joiners, self._flushers, self._parked = [], [], []
        self._queries = {k: c for k, c in self._queries.items() if isinstance(c, _Sweep)}
        for command in dropped:
            self._abandon(command)  # a task held back for a Cancel is sent again
        self._refuse_waiters(waiters)

    def _refuse_waiters(self, waiters: list[Waiter]) -> None:
        for waiter in waiters:
            waiter.set(
                AuthenticationError(f"the control plane refused this client: {self.refused}")
            )

    def _reopen_refused(self, now: float) -> None:
        """Open both connections again: libzmq gives up on one whose key was refused."""
        if self.refused is None or now - self._refused_at < _REFUSED_RETRY or self.link is None:
            return
        self._refused_at = now
        self.link.open(Channel.DISCOVERY, self.discovery_address, self.transport.max_message_size)
        if self._gateway_endpoint is not None:
            self._open_gateway(self._gateway_endpoint)

    def _on_command(self, command: Command) -> None:
        if self.refused is not None:
            self._refuse_waiters([command.waiter])
            return
        kind = type(command)
        if kind is Join:
            if self.pending:
                self._joiners.append(command)  # type: ignore[arg-type]
            else:
                command.waiter.set(None)
            return
        if kind is Flush:
            # Every id returned before flush() was called is in pending by now.
            unacked = TaskStatus.PENDING
            waiting = {t for t, entry in self.pending.items() if entry.status is unacked}
            if waiting:
                self._flushers.append((waiting, command))  # type: ignore[arg-type]
            else:
                command.waiter.set(None)
            return
        if isinstance(command, CancelTask):
            entry = self.pending.get(command.task_id)
            if entry is not None and not entry.ever_sent:
                # Never left this process: cancel here, it will never run.
                self._cancel_here(entry)
                command.waiter.set(CancelReply(0, True, TaskStatus.CANCELLED.value))
                return
            if entry is not None:
                # A control plane may hold it: only its answer says whether it
                # will run.  Until then it is not re-sent, so that an answer of
                # "unknown" means it never will be.
                entry.cancelling = True
        if self._gateway_endpoint is None or not self.connected:
            self._park_command(command)
            return
        self._send_unsent()  # a request never overtakes a task submitted before it
        request_id = self._new_request_id()
        message: Message
        if isinstance(command, Query):
            message = ResultQuery(request_id, command.task_ids)
        elif isinstance(command, CancelTask):
            message = Cancel(request_id, command.task_id)
        elif kind is StatsRequest:
            message = StatsQuery(request_id)
        elif isinstance(command, AdminRequest) and command.build is not None:
            message = command.build(request_id)
        else:
            raise TypeError(f"unknown client command {command!r}")
        self._queries[request_id] = command
        if not self._send_gateway(message):
            del self._queries[request_id]
            self._park_command(command)

    def _park_command(self, command: Command) -> None:
        # Not connected: retried on the next tick; the caller's own timeout bounds it.
        self._parked.append(command)

    def _cancel_here(self, entry: PendingTask) -> None:
        wire = entry.wire
        record = ResultRecord(
            wire[0], TaskStatus.CANCELLED.value, error="cancelled", format=wire[3], name=wire[1]
        )
        self._finish([record], None)

    def _on_cancel_reply(self, command: CancelTask, reply: CancelReply) -> CancelReply:
        """True only when the task will not run: cancelled there, or unknown there and held here."""
        entry = self.pending.get(command.task_id)
        if entry is None:
            return reply
        if reply.cancelled:
            # Finished there as CANCELLED.  The push saying so went first but
            # may have been lost (a reconnect); nothing would ask for it again.
            self._cancel_here(entry)
            return reply
        if reply.status == "unknown" and entry.cancelling:
            # The control plane never got it (or lost it), and it was held back
            # since this Cancel went out: it will not run unless we send it.
            self._cancel_here(entry)
            return CancelReply(reply.request_id, True, TaskStatus.CANCELLED.value)
        self._release(command.task_id)
        return reply

    def _abandon(self, command: Command | _Sweep) -> None:
        """Nobody waits for this answer any more; a held-back task may be sent again."""
        if isinstance(command, CancelTask):
            self._release(command.task_id)

    def _release(self, task_id: str) -> None:
        """A Cancel of this task was answered or forgotten: send the task again if need be.

        Not while another Cancel of it is out: that one's "unknown" means "will
        not run" only if the task stayed held back since it left.
        """
        entry = self.pending.get(task_id)
        if entry is None or not entry.cancelling:
            return
        for other in (*self._queries.values(), *self._parked):
            if isinstance(other, CancelTask) and other.task_id == task_id:
                return
        entry.cancelling = False
        if not entry.sent:
            self._unsent.append(task_id)

    def _expire_commands(self) -> None:
        """Forget queries whose callers stopped waiting (timeout, cancellation, lost reply)."""
        now = self.clock()
        for request_id, command in list(self._queries.items()):
            if command.deadline < now:
                del self._queries[request_id]
                self._abandon(command)
        if self._joiners:
            self._joiners = [c for c in self._joiners if c.deadline >= now]
        if self._flushers:
            self._flushers = [f for f in self._flushers if f[1].deadline >= now]
        if self._parked:
            expired = [c for c in self._parked if c.deadline < now]
            self._parked = [c for c in self._parked if c.deadline >= now]
            for command in expired:
                self._abandon(command)

    def _new_request_id(self) -> int:
        request_id = self._next_request
        self._next_request += 1
        return request_id

    # -- sending ------------------------------------------------------------

    def _send_gateway(self, message: Any) -> bool:
        if self._gateway_endpoint is None or self.link is None:
            return False
        return self.link.send(Channel.GATEWAY, encode(message))

    def _send_unsent(self) -> None:
        if self._gateway_endpoint is None or not self.connected:
            return
        unsent = self._unsent
        pending = self.pending
        while unsent:
            wires: list[Any] = []
            while unsent and len(wires) < _MAX_TASKS_PER_SUBMIT:
                task_id = unsent.popleft()
                entry = pending.get(task_id)
                if entry is None or entry.sent or entry.cancelling:
                    continue  # finished or cancelled meanwhile, or a Cancel is out
                wires.append(entry.wire)
            if not self._submit(wires, 1):
                return

    def _submit(self, wires: list[Any], tries: int) -> bool:
        """Send tasks as Submits under the message limit; False (and requeued) when blocked."""
        pending = self.pending
        now = self.clock()
        chunks = split_by_bytes(
            wires, task_weight, message_budget(self.max_message_size), self._too_large
        )
        for n, chunk in enumerate(chunks):
            request_id = self._new_request_id()
            if not self._send_gateway(Submit(request_id, chunk)):
                ids = [wire[0] for rest in chunks[n:] for wire in rest]
                for task_id in ids:
                    pending[task_id].sent = False
                self._unsent.extendleft(reversed(ids))
                return False
            ids = []
            for wire in chunk:
                entry = pending[wire[0]]
                entry.sent = entry.ever_sent = True
                ids.append(wire[0])
            self._requests[request_id] = _Request(ids, now, tries)
        return True

    def _too_large(self, wire: list[Any]) -> None:
        """A task no message can carry (the limit was learned after it was accepted)."""
        self._fail_locally(
            [wire[0]],
            f"the task encodes to {task_weight(wire)} bytes, more than one message to the "
            f"control plane may carry ({message_budget(self.max_message_size)} of its "
            f"{self.max_message_size}-byte limit); pass a reference to the data instead",
        )

    def _lookup(self) -> None:
        if self.link is None:
            return
        # Discovery not reachable yet: the next tick asks again.
        self.link.send(Channel.DISCOVERY, encode(Lookup(self._new_request_id())))

    def _on_tick(self) -> None:
        now = self.clock()
        self._reopen_refused(now)
        if self.connected and now - self._last_reply > self._heartbeat * 3:
            log.warning("client: control plane silent for %.1f s", now - self._last_reply)
            self.connected = False
            self.interval = 0.1
        if not self.connected:
            self.interval = min(self.interval * 2, self._heartbeat)
        self._lookup()
        if self.inbox:
            self._drain_inbox()  # in case a wake was lost
        self._retry_unacked(now)
        self._expire_commands()
        self._sweep(now)
        if self._parked and self.connected:
            parked, self._parked = self._parked, []
            for command in parked:
                self._on_command(command)
        self._send_unsent()

    def _sweep(self, now: float) -> None:
        """Look up tasks acknowledged long ago whose result push never came."""
        if not self.connected or self._gateway_endpoint is None:
            return
        watch = self._watch
        pending = self.pending
        stale: list[str] = []
        while watch and now - watch[0][0] > _SWEEP_AFTER and len(stale) < _SWEEP_BATCH:
            _, task_ids = watch.popleft()
            missing = []
            for task_id in task_ids:
                entry = pending.get(task_id)
                if entry is not None and entry.watched:
                    missing.append(task_id)
            if missing:
                stale.extend(missing)
                watch.append((now, missing))  # look again later if still missing
        deadline = now + _SWEEP_REPLY_WAIT
        budget = message_budget(self.max_message_size)
        chunks = split_by_bytes(stale, _id_weight, budget, _not_asked)
        for ids in (
            c[i : i + MAX_QUERY_IDS] for c in chunks for i in range(0, len(c), MAX_QUERY_IDS)
        ):
            request_id = self._new_request_id()
            self._queries[request_id] = _Sweep(ids, deadline)
            if not self._send_gateway(ResultQuery(request_id, ids)):
                del self._queries[request_id]
                return

    def _on_sweep_reply(self, task_ids: list[str], records: list[ResultRecord | None]) -> None:
        """Final answers finish their tasks; a task the cache does not know is re-sent at times."""
        self._finish([r for r in records if r is not None], None)
        pending = self.pending
        for task_id, record in zip(task_ids, records, strict=False):
            entry = pending.get(task_id)
            if record is not None or entry is None or entry.cancelling:
                continue
            entry.misses += 1
            if entry.misses & (entry.misses - 1) == 0 and entry.sent:  # 1, 2, 4, 8 …
                entry.sent = False
                self._unsent.append(task_id)

    def _retry_unacked(self, now: float) -> None:
        for request_id, request in list(self._requests.items()):
            if now - request.sent_at < self.ack_timeout * 2 ** (request.tries - 1):
                continue
            del self._requests[request_id]
            live = [t for t in request.task_ids if t in self.pending]
            if request.tries > self.retries:
                self._hold_for_next_connection(live, request.tries)
                continue
            wires = []
            for task_id in live:
                entry = self.pending[task_id]
                if entry.cancelling:
                    entry.sent = False  # held back until the Cancel's answer
                else:
                    wires.append(entry.wire)
            if wires:
                self._submit(wires, request.tries + 1)

    def _hold_for_next_connection(self, task_ids: list[str], tries: int) -> None:
        """``retries`` re-sends went unacknowledged: the control plane is gone or frozen.

        An id the caller holds is a promise that the task runs, so nothing is
        failed here: the tasks wait for the next connection (a LookupReply
        sends them again; the control plane deduplicates any it already
        holds), and the client looks Discovery up at once rather than waiting
        for three silent heartbeats.
        """
        held = 0
        for task_id in task_ids:
            entry = self.pending[task_id]
            if entry.sent:
                entry.sent = False
                if not entry.cancelling:
                    self._unsent.append(task_id)
                held += 1
        if self.connected:
            log.warning(
                "client: %d tasks unacknowledged after %d attempts; holding them until the "
                "control plane answers again",
                held,
                tries,
            )
            self.connected = False
            self.interval = 0.1

    # -- receiving ----------------------------------------------------------

    def _on_body(self, body: bytes) -> None:
        try:
            message = decode(body)
        except WireError as exc:
            log.warning("client ignored a bad frame from the control plane: %s", exc)
            return
        self._last_reply = self.clock()
        if isinstance(message, Results):
            self._on_results(message.results)
        elif isinstance(message, SubmitAck):
            self._on_ack(message)
        elif isinstance(message, LookupReply):
            self._on_lookup(message)
        elif isinstance(message, ErrorReply):
            self._on_error_reply(message)
        elif isinstance(message, _REPLIES):
            command = self._queries.pop(message.request_id, None)
            if command is not None:
                self._answer(command, message)
            if isinstance(message, DeadLetterRetryReply) and message.task is not None:
                self._hold_revived(message.task)

    def _answer(self, command: Command | _Sweep, reply: Message) -> None:
        """Give a reply to the command it answers, if it is the kind that command expects."""
        if isinstance(reply, ResultReply) and isinstance(command, Query | _Sweep):
            ids = command.task_ids
            records = [
                self._reply_entry(raw, ids[i] if i < len(ids) else None)
                for i, raw in enumerate(reply.results)
            ]
            if isinstance(command, _Sweep):
                self._on_sweep_reply(ids, records)
            else:
                command.waiter.set(records)
        elif isinstance(reply, CancelReply) and isinstance(command, CancelTask):
            command.waiter.set(self._on_cancel_reply(command, reply))
        elif isinstance(reply, _PLAIN_REPLIES) and isinstance(command, StatsRequest | AdminRequest):
            command.waiter.set(reply)
        else:
            self._abandon(command)
            if isinstance(command, Command):
                command.waiter.set(
                    RuntimeError(
                        f"the control plane answered with a {type(reply).__name__}, "
                        "which does not answer this request"
                    )
                )

    def _on_error_reply(self, message: ErrorReply) -> None:
        if message.reason == "unauthorized":
            # Our key was removed while connected: as a refused handshake.
            self._on_refused(message.message)
            return
        command = self._queries.pop(message.request_id, None)
        error_type = ControlPlaneBusyError if message.reason == "overloaded" else RuntimeError
        error = error_type(f"control plane rejected a request: {message.message}")
        if isinstance(command, Command):
            self._abandon(command)
            command.waiter.set(error)
        else:
            log.error("%s", error)
        if message.reason == "version":
            # Another protocol version (protocol.md §8): calls parked for a connection
            # that cannot come fail now, naming both versions, not at their timeout.
            parked, self._parked = self._parked, []
            for waiting in parked:
                self._abandon(waiting)
                waiting.waiter.set(error)

    def _hold_revived(self, wire: list[Any]) -> None:
        """A dead letter's task queued again for us: hold it like a task we submitted.

        Its result comes to us (``join`` waits for it), and a control plane
        that restarts before it finished gets it again from us.
        """
        try:
            task_id = TaskEnvelope.from_wire(wire).task_id
        except WireError:
            log.warning("client ignored an invalid retried task from the control plane")
            return
        if task_id in self.pending:
            return
        self.finished.pop(task_id, None)
        entry = PendingTask(wire)
        entry.status = TaskStatus.QUEUED
        entry.sent = entry.ever_sent = entry.watched = True
        self.pending[task_id] = entry
        self._watch.append((self.clock(), [task_id]))

    def _on_lookup(self, reply: LookupReply) -> None:
        # Untrusted values, clamped where they are used: a heartbeat of 0 would
        # spin the tick, a limit past 2³¹ − 1 cannot be set on a socket.
        heartbeat = reply.heartbeat_interval
        if not _MIN_INTERVAL <= heartbeat <= _MAX_INTERVAL:  # NaN included
            heartbeat = _MAX_INTERVAL if heartbeat > _MAX_INTERVAL else _MIN_INTERVAL
        limit = min(max(reply.max_message_size, _MIN_MESSAGE_SIZE), _MAX_MESSAGE_SIZE)
        endpoint = resolve_endpoint(reply.client_endpoint, self.discovery_address)
        if not endpoint.startswith(("tcp://", "ipc://")):
            log.warning("client ignored a LookupReply naming the endpoint %.80r", endpoint)
            return
        self.max_message_size = limit
        self._heartbeat = heartbeat
        self.interval = heartbeat
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
        if endpoint != self._gateway_endpoint or self._gateway_limit < limit:
            try:
                self._open_gateway(endpoint)
            except Exception as exc:  # libzmq refused the endpoint Discovery named
                log.warning("client cannot connect to %.80r from Discovery: %s", endpoint, exc)
                self._gateway_endpoint = None
                return
        self.connected = True
        self._send_unsent()

    def _resubmit_all(self) -> None:
        self._requests.clear()
        self._watch.clear()
        self._unsent.clear()
        for task_id, entry in list(self.pending.items()):
            if entry.sent:
                self.resubmitted += 1
            entry.sent = False
            entry.watched = False
            self._unsent.append(task_id)
        # Replies to questions asked of the old instance will never come.
        for command in self._queries.values():
            if isinstance(command, Command):
                self._parked.append(command)
        self._queries.clear()

    def _open_gateway(self, endpoint: str) -> None:
        if self.link is None:
            return
        # Whatever the control plane sends is cut under its own limit: accept up to
        # that, or one large result would cost the connection every time it is sent.
        self._gateway_limit = max(self.transport.max_message_size, self.max_message_size)
        self.link.open(Channel.GATEWAY, endpoint, self._gateway_limit)
        self._gateway_endpoint = endpoint

    def _on_ack(self, ack: SubmitAck) -> None:
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
                self._queue_full_until = self.clock() + _QUEUE_FULL_HOLD
            self._fail_locally(
                [task_id],
                f"rejected by the control plane ({reason}): {text}",
                error_type=QueueFullError if reason == "queue_full" else None,
            )
        if self._flushers:
            self._settled(request.task_ids)
        pending = self.pending
        queued = TaskStatus.QUEUED
        watch = []
        for task_id in request.task_ids:
            entry = pending.get(task_id)
            if entry is not None:
                entry.status = queued
                if not entry.watched:
                    entry.watched = True
                    watch.append(task_id)
        if watch:
            self._watch.append((self.clock(), watch))

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

    def _settled(self, task_ids: list[str]) -> None:
        """These tasks were acknowledged or finished: release flushers left with nothing."""
        waiting = []
        for remaining, command in self._flushers:
            remaining.difference_update(task_ids)
            if remaining:
                waiting.append((remaining, command))
            else:
                command.waiter.set(None)
        self._flushers = waiting

    def _reply_entry(self, raw: Any, task_id: str | None) -> ResultRecord | None:
        """One ResultReply entry: a result, null, or true — pushed in a Results just before."""
        if raw is None:
            return None
        if raw is True:
            return None if task_id is None else self.finished.get(task_id)
        return _safe_record(raw)

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
        if self._flushers:
            self._settled([record.task_id for record in records])
        if not pending and self._joiners:
            joiners, self._joiners = self._joiners, []
            for command in joiners:
                command.waiter.set(None)


def _not_asked(task_id: str) -> None:
    """An id longer than a whole message (a limit below any sane size): it is not asked about."""


def _id_weight(task_id: str) -> int:
    """Upper bound of one task id's CBOR size in a ResultQuery."""
    return 9 + text_bytes(task_id)


def _safe_record(raw: Any) -> ResultRecord | None:
    try:
        return ResultRecord.from_wire(raw)
    except WireError:
        log.warning("client ignored an invalid result from the control plane")
        return None
