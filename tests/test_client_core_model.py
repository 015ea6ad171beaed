"""The client's sans-I/O core as a checked state machine.

hypothesis plays a control plane and a lossy network against one
``ClientCore``, driven the way both bindings drive it: callers submit tasks
(with and without waiters) and ask join, flush, query, cancel and stats with
deadlines; the link refuses sends (a full socket), loses a wake-up or cannot
schedule one; frames on the way to the control plane are dropped; the control
plane acks some, all or none of what it read, in any order, twice, or after
the client retried; pushes results (lost, duplicated, for unknown ids, before
the ack); answers queries and cancels, or with errors and replies of the wrong
kind; restarts under a new instance id; refuses the CURVE handshake and later
accepts it; the binding restarts the core after a crash, or the client is
stopped and started again (a successor under a new identity); and time
passes.  After every step it checks what a user would notice:

* nothing is lost: every task id ever submitted is in exactly one of
  ``pending`` and ``finished``, or was evicted from ``finished`` by its bound;
* a waiter is set at most once, and only with what its call documents (a
  final record of its own task, None for join/flush at the right moment, a
  CancelReply whose True means the task will not run, an error);
* every unfinished task will be sent again if need be: it is in a request in
  flight, queued to be sent, watched for the lost-push sweep, or held back by
  a Cancel still waiting for its answer;
* a caller's request never overtakes a task submitted before it, and no
  message exceeds the limit the control plane announced;
* a caller still waiting is in one of the core's tables (a join exactly while
  tasks are unfinished); after a tick past a deadline, nothing of that caller
  is left in them;
* no event raises.

At the end the network heals and the control plane behaves: every task
finishes, every waiter that can be answered is, and the tables are empty.

The control plane here is a model, not the real one: it holds, deduplicates
and forgets tasks as protocol.md says, and routes every reply to the current
client (the real gateway routes by identity, so a stopped client's replies
are dropped here too).
"""

from __future__ import annotations

import collections
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fastworker.client._core import (
    CancelTask,
    Channel,
    ClientCore,
    Command,
    Flush,
    Join,
    PendingTask,
    Query,
    StatsRequest,
    task_wire,
)
from fastworker.client._errors import AuthenticationError, ClientStoppedError, QueueFullError
from fastworker.tasks.models import TaskStatus
from fastworker.transport import TransportConfig
from fastworker.wire import (
    MAX_QUERY_IDS,
    Cancel,
    CancelReply,
    ErrorReply,
    Lookup,
    LookupReply,
    Message,
    ResultQuery,
    ResultRecord,
    ResultReply,
    Results,
    StatsQuery,
    StatsReply,
    Submit,
    SubmitAck,
    decode,
    encode,
)

CACHE_SIZE = 4  # small, so the result cache evicts
RETRIES = 2
ACK_TIMEOUT = 1.0
BIG_LIMIT = 1 << 20
SMALL_LIMIT = 6000  # a 1904-byte budget: batches split, a 2500-byte payload fits no message
PAYLOADS = [0, 40, 1500, 2500]
ENDPOINTS = ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"]
# 1 s: silences of 3 s are common; 10 s: the lost-push sweep (after 5 s) runs connected.
HEARTBEATS = [1.0, 10.0]
FINAL = ["success", "failure", "cancelled"]
# What every waiter may get instead of an answer: the key refused, or the client stopped.
GONE = AuthenticationError | ClientStoppedError
# Deadlines a caller gives, in seconds from now; query, cancel and stats are always finite.
WAITS = [0.5, 3.0, 40.0]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Finished(OrderedDict[str, ResultRecord]):
    """``core.finished``, remembering every id that entered: eviction is then accounted for."""

    def __init__(self) -> None:
        super().__init__()
        self.entered: set[str] = set()

    def __setitem__(self, key: str, value: ResultRecord) -> None:
        self.entered.add(key)
        super().__setitem__(key, value)


class _Waiter:
    """Records what the core hands a caller; ``check`` judges it at the moment it is set."""

    def __init__(self, what: str, check: Callable[[Any], None]) -> None:
        self.what = what
        self.check = check
        self.values: list[Any] = []

    def set(self, value: Any) -> None:
        assert not self.values, f"{self.what} set twice: {self.values[0]!r}, then {value!r}"
        self.check(value)
        self.values.append(value)

    async def wait(self, timeout: float | None) -> tuple[bool, Any]:
        """The Waiter protocol's other half; the model reads ``values`` instead."""
        return (True, self.values[0]) if self.values else (False, None)


class _Link:
    """The binding's side: two outboxes the control plane reads, sends that can be refused."""

    def __init__(self, on_send: Callable[[Channel, bytes], None]) -> None:
        self.on_send = on_send
        self.outbox: dict[Channel, collections.deque[bytes]] = {
            Channel.DISCOVERY: collections.deque(),
            Channel.GATEWAY: collections.deque(),
        }
        self.endpoints: dict[Channel, str] = {}
        self.refuse: set[Channel] = set()
        self.wake_ok = True
        self.wake_requested = False

    def send(self, channel: Channel, body: bytes) -> bool:
        if channel in self.refuse or channel not in self.endpoints:
            return False
        self.on_send(channel, body)
        self.outbox[channel].append(body)
        return True

    def open(self, channel: Channel, endpoint: str, max_message_size: int) -> None:
        assert max_message_size > 0
        self.endpoints[channel] = endpoint
        self.outbox[channel].clear()  # the old socket closes with linger 0

    def close(self, linger_ms: int) -> None:
        self.endpoints.clear()
        for box in self.outbox.values():
            box.clear()

    def wake_soon(self) -> bool:
        if not self.wake_ok:
            return False
        self.wake_requested = True
        return True


class _Submitted:
    """A Submit the control plane read; its verdict is decided once, at reading."""

    def __init__(self, request_id: int, task_ids: list[str], rejected: list[Any]) -> None:
        self.request_id = request_id
        self.task_ids = task_ids
        self.rejected = rejected


class _Plane:
    """One control-plane instance: what it holds, what it read and has not answered yet."""

    def __init__(self, number: int, limit: int, endpoint: str, heartbeat: float) -> None:
        self.instance = f"cp{number}"
        self.limit = limit
        self.endpoint = endpoint
        self.heartbeat = heartbeat  # silent for 3 of these: the client calls it gone
        self.held: dict[str, list[Any]] = {}
        self.results: dict[str, ResultRecord] = {}
        self.submits: list[_Submitted] = []
        self.lookups: list[int] = []
        self.queries: list[tuple[int, list[str]]] = []
        self.cancels: list[tuple[int, list[ResultRecord], CancelReply]] = []
        self.stats: list[int] = []

    def finish(self, task_id: str, status: str, error: str | None = None) -> ResultRecord:
        wire = self.held.pop(task_id)
        record = ResultRecord(task_id, status, error=error, format=wire[3], name=wire[1])
        self.results[task_id] = record
        return record

    def asked(self) -> list[int]:
        """Request ids of queries, cancels and stats read and not answered."""
        return [q[0] for q in self.queries] + [c[0] for c in self.cancels] + self.stats

    def forget_requests(self) -> None:
        """Everything read and not answered yet."""
        self.lookups, self.submits, self.queries, self.cancels, self.stats = [], [], [], [], []

    def forget_request(self, request_id: int) -> None:
        self.queries = [q for q in self.queries if q[0] != request_id]
        self.cancels = [c for c in self.cancels if c[0] != request_id]
        self.stats = [s for s in self.stats if s != request_id]


class ClientCoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = _Clock()
        self.link = _Link(self._sent)
        self.core = ClientCore(
            client_id="client-1",
            discovery_address="tcp://127.0.0.1:9",
            retries=RETRIES,
            ack_timeout=ACK_TIMEOUT,
            result_cache_size=CACHE_SIZE,
            transport=TransportConfig(),
            clock=self.clock,
        )
        self.finished = _Finished()
        self.core.finished = self.finished
        self.planes = 0
        self.plane = self._new_plane(BIG_LIMIT, ENDPOINTS[0])
        self.submitted: list[str] = []
        self.task_waiters: dict[str, _Waiter] = {}
        self.commands: list[Command] = []
        # each flush with the ids not acknowledged when it was called
        self.flushes: list[tuple[Flush, set[str]]] = []
        self.accepted: set[str] = set()  # ids some control plane acknowledged
        self.promised: set[str] = set()  # ids a CancelReply True said will not run
        self.core.start(self.link)

    def _new_plane(self, limit: int, endpoint: str, heartbeat: float = 1.0) -> _Plane:
        self.planes += 1
        return _Plane(self.planes, limit, endpoint, heartbeat)

    # -- checks made when the core acts -----------------------------------------

    def _sent(self, channel: Channel, body: bytes) -> None:
        """Every frame the core hands the link."""
        core = self.core
        message = decode(body)
        if channel is Channel.DISCOVERY:
            assert isinstance(message, Lookup), f"{message!r} sent to Discovery"
            return
        assert len(body) <= core.max_message_size, "a message over the control plane's limit"
        if isinstance(message, Submit):
            for wire in message.tasks:
                entry = core.pending.get(wire[0])
                assert entry is not None, f"submitted {wire[0]}, which is not unfinished"
                assert not entry.cancelling, f"{wire[0]} re-sent while a Cancel is out"
                assert wire[0] not in self.promised, f"{wire[0]} sent after cancel said True"
            return
        assert isinstance(message, ResultQuery | Cancel | StatsQuery), f"sent {message!r}"
        if isinstance(message, ResultQuery):
            assert 0 < len(message.task_ids) <= MAX_QUERY_IDS
        if isinstance(core._queries.get(message.request_id), Command):
            # A caller's request never overtakes a task submitted before it.
            for task_id in core._unsent:
                entry = core.pending.get(task_id)
                assert entry is None or entry.sent or entry.cancelling, (
                    f"{type(message).__name__} overtook {task_id}, queued before it"
                )

    def _task_check(self, task_id: str) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if isinstance(value, GONE):
                return  # the task stays: it goes out once accepted, or from the successor
            assert task_id not in self.core.pending, "a waiter set while its task is unfinished"
            if isinstance(value, ResultRecord):
                assert value.task_id == task_id, value
                assert value.is_final, value
            else:
                assert isinstance(value, QueueFullError), value

        return check

    def _join_check(self, value: Any) -> None:
        if value is None:
            assert not self.core.pending, "join answered with tasks unfinished"
        else:
            assert isinstance(value, GONE), value

    def _flush_check(self, value: Any) -> None:
        """Whether the ids were acknowledged is checked after the step (``flushes_answered_right``):
        the core answers a flush while it handles the ack, before it marks the tasks."""
        assert value is None or isinstance(value, GONE), value

    def _query_check(self, task_ids: list[str]) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if isinstance(value, list):
                assert len(value) == len(task_ids)
                for task_id, record in zip(task_ids, value, strict=True):
                    assert record is None or (
                        isinstance(record, ResultRecord) and record.task_id == task_id
                    ), record
            else:
                assert isinstance(value, RuntimeError | GONE), value

        return check

    def _cancel_check(self, task_id: str) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if not isinstance(value, CancelReply):
                assert isinstance(value, RuntimeError | GONE), value
                return
            if not value.cancelled:
                return
            # True: the task will not run.
            assert value.status == "cancelled", value
            assert task_id not in self.core.pending, "cancel said True; the task is unfinished"
            assert task_id not in self.plane.held, "cancel said True; the control plane holds it"
            for body in self.link.outbox[Channel.GATEWAY]:
                message = decode(body)
                if isinstance(message, Submit):
                    assert task_id not in [w[0] for w in message.tasks], (
                        "cancel said True with the task on its way to the control plane"
                    )
            self.promised.add(task_id)

        return check

    def _stats_check(self, value: Any) -> None:
        assert isinstance(value, StatsReply | RuntimeError | GONE), value

    # -- the control plane's side ---------------------------------------------

    def _deliver(self, *messages: Message) -> None:
        self.core.on_frames([[encode(m)] for m in messages])

    def _read(self, body: bytes, verdict: str | None) -> None:
        """The control plane reads one frame, as the real one would."""
        plane = self.plane
        message = decode(body)
        if isinstance(message, Lookup):
            plane.lookups.append(message.request_id)
        elif isinstance(message, Submit):
            ids: list[str] = []
            rejected: list[Any] = []
            for wire in message.tasks:
                task_id = wire[0]
                ids.append(task_id)
                assert task_id not in self.promised, f"{task_id} reached a control plane"
                if task_id in plane.held or task_id in plane.results:
                    continue  # deduplicated
                if verdict is not None:
                    rejected.append([task_id, verdict, "no"])
                else:
                    plane.held[task_id] = wire
            plane.submits.append(_Submitted(message.request_id, ids, rejected))
        elif isinstance(message, ResultQuery):
            plane.queries.append((message.request_id, message.task_ids))
        elif isinstance(message, Cancel):
            task_id = message.task_id
            if task_id in plane.held:
                record = plane.finish(task_id, "cancelled", "cancelled by request")
                reply = CancelReply(message.request_id, True, "cancelled")
                plane.cancels.append((message.request_id, [record], reply))
            else:
                status = "finished" if task_id in plane.results else "unknown"
                reply = CancelReply(message.request_id, False, status)
                plane.cancels.append((message.request_id, [], reply))
        elif isinstance(message, StatsQuery):
            plane.stats.append(message.request_id)
        else:
            raise AssertionError(f"the control plane got {message!r}")

    @rule(data=st.data(), lossy=st.booleans())
    def plane_reads(self, data: st.DataObject, lossy: bool) -> None:
        """The control plane reads what reached it, in order; a lossy network drops some.

        What it read it answers at once, or later (``plane_answers_*``), or never.
        """
        plane = self.plane
        for channel in (Channel.DISCOVERY, Channel.GATEWAY):
            box = self.link.outbox[channel]
            frames = list(box)
            box.clear()
            for body in frames:
                if lossy and data.draw(st.booleans(), label="dropped"):
                    continue
                verdict = None
                if isinstance(decode(body), Submit):
                    verdict = data.draw(
                        st.sampled_from([None, None, None, "queue_full", "invalid"]),
                        label="verdict",
                    )
                self._read(body, verdict)
                if not data.draw(st.booleans(), label="answered at once"):
                    continue
                if plane.lookups:
                    self._answer_lookup(plane.lookups.pop())
                elif plane.submits:
                    self._ack(plane.submits.pop())
                elif plane.queries:
                    self._answer_query(plane.queries.pop(), data.draw(st.booleans()))
                elif plane.cancels:
                    self._answer_cancel(plane.cancels.pop(), data.draw(st.booleans()))
                elif plane.stats:
                    self._answer_stats(plane.stats.pop())

    def _answer_lookup(self, request_id: int) -> None:
        plane = self.plane
        self._deliver(
            LookupReply(request_id, plane.instance, plane.endpoint, plane.heartbeat, plane.limit)
        )

    def _ack(self, submitted: _Submitted) -> None:
        refused = {r[0] for r in submitted.rejected}
        self.accepted.update(t for t in submitted.task_ids if t not in refused)
        self._deliver(SubmitAck(submitted.request_id, submitted.rejected))

    def _answer_query(self, query: tuple[int, list[str]], pushed_first: bool) -> None:
        """A ResultReply; with ``pushed_first`` known results go as a push and ``true``."""
        request_id, task_ids = query
        push: list[ResultRecord] = []
        answers: list[Any] = []
        for task_id in task_ids:
            record = self.plane.results.get(task_id)
            if record is not None and pushed_first:
                push.append(record)
                answers.append(True)
            else:
                answers.append(record)
        reply = ResultReply(request_id, answers)
        self._deliver(*([Results(push)] if push else []), reply)

    def _answer_cancel(
        self, cancel: tuple[int, list[ResultRecord], CancelReply], push_lost: bool
    ) -> None:
        """The CANCELLED push goes before the reply; it may be lost on the way."""
        _, push, reply = cancel
        self._deliver(*([Results(push)] if push and not push_lost else []), reply)

    def _answer_stats(self, request_id: int) -> None:
        self._deliver(StatsReply(request_id, {"queued": len(self.plane.held)}))

    @precondition(lambda self: self.plane.lookups)
    @rule(data=st.data(), keep=st.booleans())
    def plane_answers_lookup(self, data: st.DataObject, keep: bool) -> None:
        request_id = data.draw(st.sampled_from(self.plane.lookups))
        if not keep:
            self.plane.lookups.remove(request_id)
        self._answer_lookup(request_id)

    @precondition(lambda self: self.plane.submits)
    @rule(data=st.data(), keep=st.booleans())
    def plane_acks(self, data: st.DataObject, keep: bool) -> None:
        """Any Submit read, in any order; kept ones are acked again later (a duplicate)."""
        submitted = data.draw(st.sampled_from(self.plane.submits))
        if not keep:
            self.plane.submits.remove(submitted)
        self._ack(submitted)

    @rule(
        data=st.data(),
        status=st.sampled_from(FINAL),
        lost=st.booleans(),
        junk=st.booleans(),
    )
    def plane_pushes(self, data: st.DataObject, status: str, lost: bool, junk: bool) -> None:
        """Results of held tasks (maybe lost on the way), duplicates, and unknown ids."""
        plane = self.plane
        candidates = sorted(plane.held) + sorted(plane.results) + ["never-submitted"]
        chosen = data.draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=4))
        records: list[Any] = []
        for task_id in chosen:
            if task_id in plane.held:
                records.append(plane.finish(task_id, status))
            elif task_id in plane.results:
                records.append(plane.results[task_id])
            else:
                records.append(ResultRecord(task_id, status))
        if junk:
            # Not final, and not a result at all: both ignored.
            records += [ResultRecord(chosen[0], "retrying", retry_delay=1.0), ["junk"]]
        if not lost:
            self._deliver(Results(records))

    @precondition(lambda self: self.plane.queries)
    @rule(data=st.data(), keep=st.booleans(), pushed_first=st.booleans())
    def plane_answers_query(self, data: st.DataObject, keep: bool, pushed_first: bool) -> None:
        query = data.draw(st.sampled_from(self.plane.queries))
        if not keep:
            self.plane.queries.remove(query)
        self._answer_query(query, pushed_first)

    @precondition(lambda self: self.plane.cancels)
    @rule(data=st.data(), keep=st.booleans(), push_lost=st.booleans())
    def plane_answers_cancel(self, data: st.DataObject, keep: bool, push_lost: bool) -> None:
        cancel = data.draw(st.sampled_from(self.plane.cancels))
        if not keep:
            self.plane.cancels.remove(cancel)
        self._answer_cancel(cancel, push_lost)

    @precondition(lambda self: self.plane.stats)
    @rule(data=st.data())
    def plane_answers_stats(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(self.plane.stats))
        self.plane.stats.remove(request_id)
        self._answer_stats(request_id)

    @precondition(lambda self: self.plane.asked())
    @rule(data=st.data(), answer=st.sampled_from(["invalid", "unauthorized", "wrong kind"]))
    def plane_answers_badly(self, data: st.DataObject, answer: str) -> None:
        """An ErrorReply (``unauthorized``: our key was removed), or replies of the wrong kind."""
        request_id = data.draw(st.sampled_from(self.plane.asked()))
        self.plane.forget_request(request_id)
        if answer == "wrong kind":
            self._deliver(CancelReply(request_id, False, "unknown"))
            self._deliver(StatsReply(request_id, {}))
        else:
            self._deliver(ErrorReply(request_id, answer, "no"))

    # -- trouble: rarer than the flow above, so one rule for all of it ----------

    @rule(
        data=st.data(),
        kind=st.sampled_from(
            [
                "plane restarts",
                "garbage",
                "wake lost",
                "wakes impossible",
                "wakes possible",
                "refuse sends",
                "accept sends",
                "connection up",
                "handshake refused",
                "handshake accepted",
                "binding restarts",
                "client restarts",
            ]
        ),
    )
    def trouble(self, data: st.DataObject, kind: str) -> None:
        core = self.core
        link = self.link
        if kind == "plane restarts":
            # A new instance knows nothing; frames still queued reach it.
            limit = data.draw(st.sampled_from([BIG_LIMIT, SMALL_LIMIT]))
            endpoint = data.draw(st.sampled_from(ENDPOINTS))
            self.plane = self._new_plane(limit, endpoint, data.draw(st.sampled_from(HEARTBEATS)))
        elif kind == "garbage":
            core.on_frames([[b"\xffnot cbor"], [encode(Results([["x"], 7]))]])
        elif kind == "wake lost" and link.wake_requested:
            # The binding could not deliver the wake-up it scheduled (a full mailbox).
            link.wake_requested = False
            core.wake_lost()
        elif kind in ("wakes impossible", "wakes possible"):
            link.wake_ok = kind == "wakes possible"
        elif kind in ("refuse sends", "accept sends"):
            # A full socket: ``send`` says False until it drains.
            channel = data.draw(st.sampled_from(list(Channel)))
            if kind == "refuse sends":
                link.refuse.add(channel)
            else:
                link.refuse.discard(channel)
        elif kind == "connection up":
            if data.draw(st.booleans()):
                core.on_discovery_up()
            else:
                core.on_gateway_up()
        elif kind.startswith("handshake"):
            core.on_handshake(None if kind.endswith("accepted") else "refused our key")
        elif kind == "binding restarts":
            # The binding's supervision caught a crash: connections closed, the core restarted.
            link.close(0)
            core.restart(link)
        elif kind == "client restarts":
            # stop() then start(): callers released, a successor under a new identity
            # takes the unfinished tasks (as Client.start does after a stop).
            core.fail_waiters("the client was stopped")
            core.close_now(linger_ms=0)
            link.wake_requested = False  # the old binding's wake-up dies with it
            # Replies are routed to the old identity's closed sockets: none arrives.
            self.plane.forget_requests()
            self.core = core.successor(f"client-{self.planes}-{len(self.submitted)}")
            self.core.start(link)

    # -- the binding's side -------------------------------------------------------

    @precondition(lambda self: self.link.wake_requested)
    @rule()
    def wake_delivered(self) -> None:
        self.link.wake_requested = False
        self.core.on_wake()

    @rule(seconds=st.sampled_from([0.05, 0.3, 1.0, 2.5, 6.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        self.core.on_tick()
        self._tables_hold_only_live_entries()

    # -- callers ------------------------------------------------------------------

    @initialize(connected=st.booleans(), heartbeat=st.sampled_from(HEARTBEATS))
    def maybe_connect(self, connected: bool, heartbeat: float) -> None:
        """Half the runs begin with the client already talking to the control plane."""
        self.plane.heartbeat = heartbeat
        if connected:
            for body in self.link.outbox[Channel.DISCOVERY]:
                self._read(body, None)
            self.link.outbox[Channel.DISCOVERY].clear()
            for request_id in self.plane.lookups:
                self._answer_lookup(request_id)
            self.plane.lookups = []

    @rule(
        count=st.integers(1, 3),
        payload=st.sampled_from(PAYLOADS),
        wait=st.booleans(),
        prompt=st.booleans(),
    )
    def submit(self, count: int, payload: int, wait: bool, prompt: bool) -> None:
        """As ``Client._enqueue``: the entry in ``pending``, its id in the inbox, one wake."""
        core = self.core
        if core.queue_full:
            return  # the Client raises QueueFullError before touching the core
        for _ in range(count):
            task_id = f"t{len(self.submitted)}"
            self.submitted.append(task_id)
            waiters = None
            if wait:
                waiter = _Waiter(f"the waiter of {task_id}", self._task_check(task_id))
                self.task_waiters[task_id] = waiter
                waiters = [waiter]
            wire = task_wire(task_id, "add", 5, 0, b"x" * payload, None)
            core.pending[task_id] = PendingTask(wire, waiters)  # type: ignore[arg-type]
            core.inbox.append(task_id)
        core.wake()
        if prompt:
            self._wake_comes()

    def _command(self, command: Command) -> None:
        self.commands.append(command)
        self.core.inbox.append(command)
        self.core.wake()
        self._wake_comes()

    def _wake_comes(self) -> None:
        """The binding delivers the wake-up it was asked for, if it was (now, not later)."""
        if self.link.wake_requested:
            self.wake_delivered()

    def _deadline(self, wait: float) -> float:
        return self.clock.now + wait

    @rule(kind=st.sampled_from(["join", "flush", "stats"]), data=st.data())
    def wait_for(self, kind: str, data: st.DataObject) -> None:
        """join and flush may wait for ever; stats, like every request, has a deadline."""
        waits = WAITS if kind == "stats" else [*WAITS, math.inf]
        deadline = self._deadline(data.draw(st.sampled_from(waits), label="wait"))
        if kind == "join":
            self._command(Join(_Waiter("a join", self._join_check), deadline))
        elif kind == "flush":
            pending = self.core.pending.items()
            unacked = {t for t, e in pending if e.status is TaskStatus.PENDING}
            command = Flush(_Waiter("a flush", self._flush_check), deadline)
            self.flushes.append((command, unacked))
            self._command(command)
        else:
            self._command(StatsRequest(_Waiter("a stats request", self._stats_check), deadline))

    def _some_task_id(self, data: st.DataObject) -> st.SearchStrategy[str]:
        """Mostly a task still unfinished (the interesting ones), else any id, or an unknown one."""
        unfinished = list(self.core.pending)[-6:]
        choice = data.draw(st.integers(0, 3), label="unfinished")
        if unfinished and choice:
            return st.sampled_from(unfinished)
        return st.sampled_from([*self.submitted[-6:], "never-submitted"])

    @rule(data=st.data(), wait=st.sampled_from(WAITS))
    def query(self, data: st.DataObject, wait: float) -> None:
        ids = data.draw(st.lists(self._some_task_id(data), min_size=1, max_size=3))
        waiter = _Waiter("a query", self._query_check(ids))
        self._command(Query(waiter, self._deadline(wait), ids))

    @rule(data=st.data(), wait=st.sampled_from(WAITS))
    def cancel(self, data: st.DataObject, wait: float) -> None:
        task_id = data.draw(self._some_task_id(data))
        waiter = _Waiter(f"a cancel of {task_id}", self._cancel_check(task_id))
        self._command(CancelTask(waiter, self._deadline(wait), task_id))

    # -- invariants -------------------------------------------------------------

    @invariant()
    def nothing_is_lost(self) -> None:
        core = self.core
        assert len(core.finished) <= CACHE_SIZE
        for task_id in self.submitted:
            unfinished = task_id in core.pending
            finished = task_id in core.finished
            assert not (unfinished and finished), f"{task_id} both unfinished and finished"
            if not unfinished and not finished:
                assert task_id in self.finished.entered, f"{task_id} lost"
                assert len(core.finished) == CACHE_SIZE, f"{task_id} evicted below the bound"

    @invariant()
    def acknowledged_means_accepted(self) -> None:
        for task_id, entry in self.core.pending.items():
            if entry.status is TaskStatus.QUEUED:
                assert task_id in self.accepted, f"{task_id} QUEUED, never acknowledged"

    @invariant()
    def unfinished_tasks_will_be_sent_again(self) -> None:
        core = self.core
        requested = {t for r in core._requests.values() for t in r.task_ids}
        unsent = set(core._unsent)
        inbox = {i for i in core.inbox if isinstance(i, str)}
        watched = {t for _, ids in core._watch for t in ids}
        asking = [*core._queries.values(), *core._parked, *core.inbox]
        cancels = {c.task_id for c in asking if isinstance(c, CancelTask)}
        for task_id, entry in core.pending.items():
            if entry.cancelling:
                assert task_id in cancels, f"{task_id} held back for a Cancel nobody waits on"
            elif core.instance_id is None:
                continue  # a successor: the first LookupReply re-submits everything
            elif not entry.sent:
                assert task_id in unsent or task_id in inbox, f"{task_id} will never be sent"
            elif entry.status is TaskStatus.PENDING:
                assert task_id in requested, f"{task_id} sent, no request waits for its ack"
            else:
                assert task_id in requested or (entry.watched and task_id in watched), (
                    f"{task_id} acknowledged, but nothing looks for its lost result"
                )

    @invariant()
    def waiting_callers_are_held(self) -> None:
        core = self.core
        now = self.clock.now
        held: list[Any] = [
            *core.inbox,
            *core._queries.values(),
            *core._parked,
            *core._joiners,
            *(command for _, command in core._flushers),
        ]
        for command in self.commands:
            if command.waiter.values:  # type: ignore[attr-defined]
                continue
            assert command.deadline < now or any(command is c for c in held), (
                f"{type(command).__name__} dropped with its caller still waiting"
            )
            if isinstance(command, Join) and any(command is c for c in core._joiners):
                assert core.pending, "a join kept waiting with nothing unfinished"

    @invariant()
    def flushes_answered_right(self) -> None:
        """A flush answered None: every id returned before it was acknowledged or finished."""
        for command, unacked in self.flushes:
            if command.waiter.values == [None]:  # type: ignore[attr-defined]
                for task_id in unacked:
                    entry = self.core.pending.get(task_id)
                    assert entry is None or entry.status is TaskStatus.QUEUED, (
                        f"flush answered with {task_id} not acknowledged"
                    )

    @invariant()
    def a_scheduled_wake_will_come(self) -> None:
        if self.core._wake_scheduled:
            assert self.link.wake_requested, "wake() suppressed, and no wake-up is coming"

    def _tables_hold_only_live_entries(self) -> None:
        """Right after a tick: nothing past its deadline is left."""
        core = self.core
        now = self.clock.now
        for request in core._requests.values():
            assert now - request.sent_at < ACK_TIMEOUT * 2 ** (request.tries - 1)
        for entry in [*core._queries.values(), *core._parked, *core._joiners]:
            assert entry.deadline >= now, f"{entry!r} outlived its deadline"
        for _, command in core._flushers:
            assert command.deadline >= now, "a flush outlived its deadline"

    # -- the end: the network heals and the control plane behaves ---------------

    def _heal_round(self, seconds: float) -> None:
        core = self.core
        plane = self.plane
        self.clock.now += seconds
        core.on_tick()
        if self.link.wake_requested:
            self.wake_delivered()
        for channel in (Channel.DISCOVERY, Channel.GATEWAY):
            frames = list(self.link.outbox[channel])
            self.link.outbox[channel].clear()
            for body in frames:
                self._read(body, None)
        for request_id in plane.lookups:
            self._answer_lookup(request_id)
        for submitted in plane.submits:
            self._ack(submitted)
        done = [plane.finish(t, "success") for t in sorted(plane.held)]
        if done:
            self._deliver(Results(done))
        for query in plane.queries:
            self._answer_query(query, pushed_first=False)
        for cancel in plane.cancels:
            self._answer_cancel(cancel, push_lost=False)
        for request_id in plane.stats:
            self._answer_stats(request_id)
        plane.forget_requests()

    def teardown(self) -> None:
        core = self.core
        self.link.refuse.clear()
        self.link.wake_ok = True
        core.on_handshake(None)
        for _ in range(120):
            self._heal_round(0.5)
            if not core.pending:
                break
        assert not core.pending, f"{len(core.pending)} tasks never finished: {core.pending}"
        for task_id, waiter in self.task_waiters.items():
            assert waiter.values, f"the waiter of {task_id} was never answered"
        # Past every deadline: every caller was answered or forgotten.
        self._heal_round(100.0)
        self._heal_round(0.1)
        for command in self.commands:
            if command.deadline == math.inf:
                assert command.waiter.values, f"{command!r} never answered"  # type: ignore[attr-defined]
        tables = {
            "requests": core._requests,
            "queries": core._queries,
            "parked": core._parked,
            "joiners": core._joiners,
            "flushers": core._flushers,
            "watch": core._watch,
            "unsent": core._unsent,
            "inbox": core.inbox,
        }
        left = {name: table for name, table in tables.items() if table}
        assert not left, f"tables not emptied: {left}"


ClientCoreMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# About 10 s when it passes; the bound leaves hypothesis room to shrink a failure.
test_client_core_model = pytest.mark.timeout(300)(ClientCoreMachine.TestCase)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_client_core_model_soak() -> None:
    """The same machine, far longer: ``pytest -m soak tests/test_client_core_model.py``."""

    class Soak(ClientCoreMachine):
        pass

    Soak.TestCase.settings = settings(
        max_examples=10_000,
        stateful_step_count=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Soak.TestCase().runTest()
