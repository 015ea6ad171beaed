"""The Gateway actor: owns the client-facing ROUTER socket.

It turns client frames into messages for the actor that owns the state they
touch (submissions and cancels to the Scheduler, result queries to the
ResultCache) and sends whatever those actors want clients to get.  It holds no
task state itself, which keeps the Scheduler free of client I/O.

Plain acknowledgements (nothing rejected) wait up to ``ACK_DELAY_SECONDS``
for the next message to the same client and go out ahead of it, as leading
frames of the same ZeroMQ message.  A trivial task's result follows its ack
closely, and on a small machine a separate ack woke the client's threads at
the very moment the worker needed the CPU (design/performance.md, "Second
session").  Whatever else a client gets after its submission
was accepted still comes after the ack.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import attrs
import trio
import zmq

from .._io import DeadlineTimer, Inbound, bind_again, pump_socket
from ..runtime import Actor, ActorError, ActorRef, GetStatistics
from ..security import CLIENT, KeyRing
from ..transport import TransportConfig, ZSocket, open_socket
from ..wire import (
    MAX_QUERY_IDS,
    Cancel,
    DeadLetterQuery,
    DeadLetterRetry,
    ResultQuery,
    ScheduleAdd,
    ScheduleList,
    ScheduleRemove,
    StatsQuery,
    StatsReply,
    Submit,
    WireError,
    decode,
    encode,
    error_reply,
    message_budget,
)
from ._internal import (
    CancelTask,
    ClientRequest,
    ClientSubmits,
    HeldAcks,
    Outgoing,
    QueryResults,
)
from ._version_log import VersionLog

__all__ = ["Gateway"]

log = logging.getLogger("fastworker.gateway")

_TASKS_PER_FORWARD = 4096
_CLOSE_LINGER_MS = 1000  # see on_stop
# Requests the Scheduler answers from its schedules and dead letters.
_SCHEDULER_REQUESTS = (ScheduleAdd, ScheduleRemove, ScheduleList, DeadLetterQuery, DeadLetterRetry)
# How long a plain SubmitAck may wait for a message to ride with: far below any
# client's ack timeout (ours: 1 s), above a trivial task's round trip.
ACK_DELAY_SECONDS = 0.005
# Statistics queries answered at once; more are refused ("overloaded"), so a
# client looping on stats() cannot pile up helper tasks.
MAX_STATS_QUERIES = 4


@attrs.frozen
class _SendHeldAcks:
    pass


_UNAUTHORIZED = "this CURVE key is not (or no longer) allowed as a client"


class Gateway(Actor):
    def __init__(
        self,
        client_address: str,
        transport: TransportConfig,
        *,
        results: ActorRef,
        scheduler: ActorRef | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        """``keys``: with CURVE, the key ring every message's sender is checked against."""
        super().__init__("gateway", mailbox_size=4096)
        self.keys = keys
        self.client_address = client_address
        self.transport = transport
        self.scheduler: ActorRef | None = scheduler  # set before the run starts
        self.results = results
        self.stats_sources: list[ActorRef] = []  # asked for a StatsQuery, besides our own
        self.endpoint: str | None = None
        self._sock: ZSocket | None = None
        self._nursery: trio.Nursery | None = None
        self._rejected: Counter[str] = Counter()
        self._versions = VersionLog(log, "gateway")
        self._dropped = 0
        self._stats_queries = 0
        self._held_acks: dict[bytes, list[bytes]] = {}  # identity -> SubmitAck bodies
        # When the held acks go out at the latest.
        self._ack_timer = DeadlineTimer(self.ref, _SendHeldAcks())

    async def on_start(self, nursery: trio.Nursery) -> None:
        sock = open_socket(zmq.ROUTER, self.transport, router_handover=True, zap_domain=CLIENT)
        self.endpoint = await bind_again(sock, self.endpoint or self.client_address)
        self._sock = sock
        self._nursery = nursery
        nursery.start_soon(pump_socket, sock, self.ref)
        nursery.start_soon(self._ack_timer.run)

    async def on_stop(self) -> None:
        self._send_held_acks()  # spares clients a re-send after a clean shutdown
        if self._sock is not None:
            # Linger: replies and result pushes handed to the socket just before
            # a shutdown still reach connected clients (the node waits for them).
            self._sock.close(linger_ms=_CLOSE_LINGER_MS)
            self._sock = None

    def receive(self, message: Any) -> Any:
        if type(message) is Outgoing:
            self._send(message.messages)
        elif type(message) is HeldAcks:
            self._hold_acks(message.messages)
        elif type(message) is _SendHeldAcks:
            self._send_held_acks()
        elif type(message) is Inbound:
            self._on_frames(message.frames)
        elif type(message) is GetStatistics:
            return {"rejected": dict(self._rejected), "dropped_replies": self._dropped}
        else:
            raise TypeError(f"gateway got an unexpected message {message!r}")
        return None

    def _send(self, messages: list[list[bytes]]) -> None:
        sock = self._sock
        if sock is None:
            self._dropped += len(messages)
            return
        held = self._held_acks
        for frames in messages:
            if held and frames[0] in held:
                # The acks go first, in the same ZeroMQ message: nothing overtakes
                # them, and the client wakes once for both (protocol.md, §1).
                frames = [frames[0], *held.pop(frames[0]), *frames[1:]]
                if not held:
                    self._ack_timer.set(math.inf)
            if not sock.try_send(frames):
                # The client left or stopped reading.  Everything it could miss
                # here stays available: results in the cache, acks by re-sending.
                self._dropped += 1

    def _hold_acks(self, messages: list[list[bytes]]) -> None:
        if self._nursery is None:  # not started: no timer to send them later
            self._send(messages)
            return
        held = self._held_acks
        for identity, body in messages:
            bodies = held.get(identity)
            if bodies is None:
                held[identity] = [body]
            else:
                bodies.append(body)
        if self._ack_timer.due == math.inf:
            self._ack_timer.set(trio.current_time() + ACK_DELAY_SECONDS)

    def _send_held_acks(self) -> None:
        held, self._held_acks = self._held_acks, {}
        self._ack_timer.set(math.inf)
        self._send([[identity, *bodies] for identity, bodies in held.items()])

    def _error(self, identity: bytes, request_id: int, exc: WireError) -> None:
        self._rejected[exc.reason] += 1
        self._versions.note(exc)
        self._send([[identity, error_reply(exc, request_id)]])

    def _on_frames(self, frames: list[list[bytes]]) -> None:
        submits: list[tuple[bytes, int, list[Any]]] = []
        batched = 0
        keys = self.keys
        for parts in frames:
            # With CURVE, the sender's key, checked per message: a key removed
            # by a reload stops working on connections made before it.
            if keys is not None and not keys.is_client(parts.pop()):
                self._error(parts[0], 0, WireError("unauthorized", _UNAUTHORIZED))
                continue
            if len(parts) != 2:
                if parts and len(parts[0]) > 0:
                    reason = "expected exactly one frame after the identity"
                    self._error(parts[0], 0, WireError("bad_frames", reason))
                else:
                    self._rejected["bad_frames"] += 1
                continue
            identity, body = parts
            try:
                message = decode(body)
            except WireError as exc:
                self._error(identity, 0, exc)
                continue
            if isinstance(message, Submit):
                submits.append((identity, message.request_id, message.tasks))
                batched += len(message.tasks)
                if batched >= _TASKS_PER_FORWARD:
                    # Bounded hand-offs keep each Scheduler turn short (see runtime).
                    assert self.scheduler is not None
                    self._forward(self.scheduler, ClientSubmits(submits))
                    submits, batched = [], 0
            elif isinstance(message, ResultQuery):
                ids = message.task_ids
                if (
                    len(ids) > MAX_QUERY_IDS
                    or not all(type(i) is str for i in ids)
                    or len(set(ids)) != len(ids)
                ):
                    # A repeated id would push its result once per repeat: a 145-byte
                    # query for one 15 MB result 20 times sent 300 MB (hostile review).
                    text = f"a query takes at most {MAX_QUERY_IDS} text ids, none twice"
                    self._error(identity, message.request_id, WireError("invalid", text))
                    continue
                self._forward(self.results, QueryResults(identity, message.request_id, ids))
            elif isinstance(message, (Cancel, *_SCHEDULER_REQUESTS)):
                assert self.scheduler is not None
                if submits:
                    # A request must not overtake a submission that came before it.
                    self._forward(self.scheduler, ClientSubmits(submits))
                    submits, batched = [], 0
                if isinstance(message, Cancel):
                    request: object = CancelTask(identity, message.request_id, message.task_id)
                else:
                    request = ClientRequest(identity, message)
                self._forward(self.scheduler, request)
            elif isinstance(message, StatsQuery):
                if self._stats_queries >= MAX_STATS_QUERIES or self._nursery is None:
                    reason = f"{MAX_STATS_QUERIES} statistics queries are being answered; retry"
                    self._error(identity, message.request_id, WireError("overloaded", reason))
                    continue
                self._stats_queries += 1
                self._nursery.start_soon(self._answer_stats, identity, message.request_id)
            else:
                self._error(
                    identity,
                    0,
                    WireError("unexpected", f"{type(message).__name__} is not a client request"),
                )
        if submits:
            assert self.scheduler is not None
            self._forward(self.scheduler, ClientSubmits(submits))

    def _forward(self, ref: ActorRef, message: object) -> None:
        # A full Scheduler mailbox here means the reader outpaced it; dropping a
        # submit is safe (the client re-sends unacknowledged ones), but count it.
        try:
            ref.tell(message)
        except ActorError:
            self._rejected["overloaded"] += 1

    async def _answer_stats(self, identity: bytes, request_id: int) -> None:
        try:
            stats = await gather_stats(self.stats_sources)
        finally:
            self._stats_queries -= 1
        rejected: Counter[str] = Counter(self._rejected)
        for part in stats.values():
            if isinstance(part, dict):
                rejected.update(part.pop("rejected", {}) or {})
        stats["rejected"] = dict(rejected)
        stats["gateway"] = {"dropped_replies": self._dropped}
        try:
            self.ref.tell(Outgoing([[identity, self._stats_reply(request_id, stats)]]))
        except ActorError:
            self._dropped += 1  # stopping or overloaded: the client's query times out

    def _stats_reply(self, request_id: int, stats: dict[str, Any]) -> bytes:
        """The StatsReply, made to fit a message: the workers' task lists shrink to counts,
        then the per-worker table to a count (workers' names are theirs to choose)."""
        budget = message_budget(self.transport.max_message_size)
        body = encode(StatsReply(request_id, stats))
        workers = (stats.get("discovery") or {}).get("workers")
        if len(body) <= budget or not isinstance(workers, dict):
            return body
        for worker in workers.values():
            if isinstance(worker, dict) and isinstance(worker.get("tasks"), list):
                worker["tasks"] = len(worker["tasks"])
        body = encode(StatsReply(request_id, stats))
        if len(body) > budget:
            stats["discovery"]["workers"] = {"omitted": f"{len(workers)} workers: too large"}
            body = encode(StatsReply(request_id, stats))
        return body


async def gather_stats(sources: list[ActorRef], timeout: float = 2.0) -> dict[str, Any]:
    """Ask each actor for its statistics; one that cannot answer shows as an error string."""
    stats: dict[str, Any] = {}
    for ref in sources:
        try:
            stats[ref.name] = await ref.ask(GetStatistics(), timeout=timeout)
        except ActorError as exc:
            stats[ref.name] = {"error": str(exc)}
    return stats
