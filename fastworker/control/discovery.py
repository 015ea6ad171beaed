"""The Discovery actor: the one address everybody knows.

Clients ask it where the control plane's client endpoint is (and learn the
control plane's instance id, which changes on every restart, so they notice
restarts).  Workers register with it, naming the tasks they serve, and keep
the registration alive with heartbeats; a worker silent for
``liveness`` × ``heartbeat_interval`` is declared dead and the Scheduler
requeues its tasks.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from typing import Any

import attrs
import trio
import zmq

from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from .._io import Inbound, bind_again, pump_socket, tick
from ..runtime import Actor, ActorRef, ActorStopped, GetStatistics, MailboxFull
from ..security import DISCOVERY, KeyRing
from ..transport import TransportConfig, ZSocket, open_socket
from ..wire import (
    DeclareSchedules,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Lookup,
    LookupReply,
    Register,
    Registered,
    Unregister,
    WireError,
    decode,
    encode,
    error_reply,
)
from ._internal import DeclaredSchedules, EvictRevoked, EvictWorker, WorkerJoined, WorkerLost
from ._register_checks import (
    MAX_NAMES_COST,
    MAX_TOTAL_NAMES_COST,
    bad_hostname,
    bad_worker_id,
    names_cost,
)
from ._version_log import VersionLog

__all__ = ["Discovery", "DiscoveryConfig"]

log = logging.getLogger("fastworker.discovery")

_MAX_TASK_NAMES = 10_000
_MAX_NAME_LENGTH = 512


@attrs.frozen
class DiscoveryConfig:
    address: str = DEFAULT_DISCOVERY_ADDRESS
    heartbeat_interval: float = 1.0
    liveness: int = 3  # missed heartbeats before a worker is dead
    max_workers: int = 4096  # registered at once; more are refused
    transport: TransportConfig = TransportConfig()


@attrs.define(eq=False, slots=True)
class _Member:
    worker_id: str
    names: frozenset[str]
    concurrency: int
    pid: int
    hostname: str
    last_seen: float
    key: bytes  # the CURVE key that registered it (b"" without CURVE)
    names_cost: int = 0  # bytes its names hold (_register_checks.names_cost)


@attrs.frozen
class _Reap:
    pass


class Discovery(Actor):
    def __init__(
        self,
        config: DiscoveryConfig,
        *,
        instance_id: str,
        scheduler: ActorRef,
        endpoints: Any,
        keys: KeyRing | None = None,
    ) -> None:
        """``endpoints()`` returns (client endpoint, worker endpoint) as bound right now;
        ``keys``: with CURVE, the key ring every message's sender is checked against."""
        super().__init__("discovery", mailbox_size=4096)
        self.keys = keys
        self.config = config
        self.instance_id = instance_id
        self.scheduler = scheduler
        self._endpoints = endpoints
        self.endpoint: str | None = None
        self._sock: ZSocket | None = None
        self._members: dict[str, _Member] = {}
        self._names_cost = 0  # over all members
        self._rejected: Counter[str] = Counter()
        self._versions = VersionLog(log, "discovery")
        self._lost = 0
        self._last_reap = 0.0  # trio.current_time() of the last reap (see _reap)
        # Membership news the Scheduler's full mailbox could not take yet, per
        # worker id, compacted (see _tell_scheduler): at most three per id.
        self._undelivered: OrderedDict[str, list[WorkerJoined | WorkerLost | DeclaredSchedules]] = (
            OrderedDict()
        )

    async def on_start(self, nursery: trio.Nursery) -> None:
        sock = open_socket(zmq.ROUTER, self.config.transport, zap_domain=DISCOVERY)
        self.endpoint = await bind_again(sock, self.endpoint or self.config.address)
        self._sock = sock
        nursery.start_soon(pump_socket, sock, self.ref)
        self._last_reap = trio.current_time()
        nursery.start_soon(tick, self.ref, lambda: self.config.heartbeat_interval / 2, _Reap())

    async def on_stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def receive(self, message: Any) -> Any:
        if type(message) is Inbound:
            for parts in message.frames:
                self._on_frame(parts)
        elif type(message) is _Reap:
            self._deliver()
            self._reap()
        elif type(message) is EvictWorker:
            self._remove(message.worker_id, message.reason)
        elif type(message) is EvictRevoked:
            self._evict_revoked()
        elif type(message) is GetStatistics:
            now = trio.current_time()
            return {
                "workers_alive": len(self._members),
                "workers": {
                    self._shown_id(m.worker_id): {
                        "tasks": sorted(m.names),
                        "concurrency": m.concurrency,
                        "pid": m.pid,
                        "hostname": m.hostname,
                        "heartbeat_age": round(now - m.last_seen, 3),
                    }
                    for m in self._members.values()
                },
                "workers_lost": self._lost,
                "rejected": dict(self._rejected),
            }
        else:
            raise TypeError(f"discovery got an unexpected message {message!r}")
        return None

    def _reply(self, identity: bytes, body: bytes) -> None:
        if self._sock is None:
            return
        if not self._sock.try_send([identity, body]):
            self._rejected["reply_dropped"] += 1

    def _on_frame(self, parts: list[bytes]) -> None:
        key = b""
        if self.keys is not None:
            key = parts.pop()  # the sender's CURVE key, added by the socket
            if not self.keys.allows(DISCOVERY, key):
                self._refuse(parts[0], "unauthorized", "this CURVE key is no longer allowed")
                return
        if len(parts) != 2:
            self._rejected["bad_frames"] += 1
            return
        identity, body = parts
        try:
            message = decode(body)
        except WireError as exc:
            self._rejected[exc.reason] += 1
            self._versions.note(exc)
            self._reply(identity, error_reply(exc))
            return
        now = trio.current_time()
        if isinstance(message, Lookup):
            client_endpoint, _ = self._endpoints()
            reply = LookupReply(
                message.request_id,
                self.instance_id,
                client_endpoint,
                self.config.heartbeat_interval,
                self.config.transport.max_message_size,
            )
            self._reply(identity, encode(reply))
        elif not isinstance(message, Heartbeat | Register | Unregister | DeclareSchedules):
            self._rejected["unexpected"] += 1
            err = ErrorReply(
                0, "unexpected", f"{type(message).__name__} is not a discovery request"
            )
            self._reply(identity, encode(err))
        elif self.keys is not None and not self.keys.is_worker(key):
            self._refuse(identity, "forbidden", f"{type(message).__name__} needs a worker key")
        elif isinstance(message, Register):
            self._register(identity, message, now, key)
        elif not self._owns(message.worker_id, key):
            # A worker's heartbeats, schedules and leaving count only from the key
            # that registered it: nobody keeps a dead worker alive or evicts a live one.
            self._refuse(identity, "forbidden", "that worker id was registered by another key")
        elif isinstance(message, Heartbeat):
            member = self._members.get(message.worker_id)
            if member is not None:
                member.last_seen = now
            self._reply(identity, encode(HeartbeatAck(self.instance_id, member is not None)))
        elif isinstance(message, DeclareSchedules):
            if message.worker_id not in self._members or len(message.schedules) > _MAX_TASK_NAMES:
                # Only a registered worker declares; it does so after each Registered.
                self._rejected["invalid"] += 1
                return
            self._tell_scheduler(DeclaredSchedules(message.worker_id, message.schedules))
        else:
            if message.reason not in ("left", "crashed"):
                self._rejected["invalid"] += 1
                err = ErrorReply(0, "invalid", "Unregister.reason must be 'left' or 'crashed'")
                self._reply(identity, encode(err))
                return
            self._remove(message.worker_id, message.reason)

    def _shown_id(self, worker_id: str) -> str:
        """A worker's id as statistics show it: whole without CURVE; with it, cut.

        With CURVE the id is a secret: it is the worker's routing id at the
        Scheduler, and any worker key that knew it could take that connection
        over.  Statistics go to every client key.
        """
        if self.keys is None:
            return worker_id
        keep = max(4, len(worker_id) - 24)
        return worker_id[:keep] + "…"

    def _evict_revoked(self) -> None:
        keys = self.keys
        if keys is None:
            return
        for member in list(self._members.values()):
            if not keys.is_worker(member.key):
                log.warning("worker %s: its key was revoked; its tasks go back", member.worker_id)
                self._remove(member.worker_id, "revoked")

    def _owns(self, worker_id: str, key: bytes) -> bool:
        """Without CURVE every peer is trusted (loopback only); with it, the registrant's key."""
        member = self._members.get(worker_id)
        return member is None or member.key == key

    def _refuse(self, identity: bytes, reason: str, text: str) -> None:
        self._rejected[reason] += 1
        self._reply(identity, encode(ErrorReply(0, reason, text)))

    def _register(self, identity: bytes, message: Register, now: float, key: bytes) -> None:
        names = message.task_names
        if (
            len(names) > _MAX_TASK_NAMES
            or not all(type(n) is str and 0 < len(n) <= _MAX_NAME_LENGTH for n in names)
            or message.concurrency < 1
        ):
            self._rejected["invalid"] += 1
            err = ErrorReply(
                0,
                "invalid",
                f"task names must be at most {_MAX_TASK_NAMES} strings of 1-{_MAX_NAME_LENGTH} "
                "characters, concurrency >= 1",
            )
            self._reply(identity, encode(err))
            return
        problem = bad_worker_id(message.worker_id) or bad_hostname(message.hostname)
        if problem is not None:
            self._refuse(identity, "invalid", problem)
            return
        cost = names_cost(frozenset(names))
        if cost > MAX_NAMES_COST:
            self._refuse(
                identity, "invalid", f"task names hold {cost} bytes: at most {MAX_NAMES_COST}"
            )
            return
        if not self._owns(message.worker_id, key):
            self._refuse(identity, "forbidden", "that worker id was registered by another key")
            return
        if message.worker_id not in self._members and len(self._members) >= self.config.max_workers:
            self._rejected["overloaded"] += 1
            err = ErrorReply(0, "overloaded", f"{len(self._members)} workers registered: the limit")
            self._reply(identity, encode(err))
            return
        old = self._members.get(message.worker_id)
        held = self._names_cost - (old.names_cost if old is not None else 0)
        if held + cost > MAX_TOTAL_NAMES_COST:
            text = f"workers' task names hold {held} bytes: the limit is {MAX_TOTAL_NAMES_COST}"
            self._refuse(identity, "overloaded", text)
            return
        self._names_cost = held + cost
        member = _Member(
            message.worker_id,
            frozenset(names),
            message.concurrency,
            message.pid,
            message.hostname,
            now,
            key,
            cost,
        )
        known = message.worker_id in self._members
        self._members[message.worker_id] = member
        if not known:
            log.info(  # %r: the id and host name are the worker's to choose
                "worker %r joined (pid %d on %r, %d tasks)",
                message.worker_id,
                message.pid,
                message.hostname,
                len(names),
            )
        self._tell_scheduler(
            WorkerJoined(message.worker_id, member.names, message.concurrency, key=key)
        )
        _, worker_endpoint = self._endpoints()
        reply = Registered(
            self.instance_id,
            worker_endpoint,
            self.config.heartbeat_interval,
            self.config.transport.max_message_size,
        )
        self._reply(identity, encode(reply))

    def _reap(self) -> None:
        limit = self.config.heartbeat_interval * self.config.liveness
        now = trio.current_time()
        late = now - self._last_reap - self.config.heartbeat_interval / 2
        self._last_reap = now
        if late > self.config.heartbeat_interval and self._members:
            # We could not read heartbeats meanwhile (the process was stopped, or
            # its loop blocked): the silence was ours.  Members get that time
            # back, or a thawed control plane declares every healthy worker dead
            # and their tasks run twice; a worker that really died is found a
            # liveness limit later.
            log.warning("discovery: stalled for %.1f s; worker silence over it is forgiven", late)
            for member in self._members.values():
                member.last_seen += late
        for member in list(self._members.values()):
            if now - member.last_seen > limit:
                log.warning(
                    "worker %s (pid %d) missed %d heartbeats: declared dead",
                    member.worker_id,
                    member.pid,
                    self.config.liveness,
                )
                self._remove(member.worker_id, "died")

    def _remove(self, worker_id: str, reason: str) -> None:
        member = self._members.pop(worker_id, None)
        if member is not None:
            self._names_cost -= member.names_cost
            self._lost += reason != "left"
            self._tell_scheduler(WorkerLost(worker_id, reason))

    def _tell_scheduler(self, message: WorkerJoined | WorkerLost | DeclaredSchedules) -> None:
        """Membership changes must reach the Scheduler: a full mailbox delays, never loses.

        What waits is compacted per worker id so it stays bounded by the
        members: a join replaces a waiting join, a declaration of schedules a
        waiting declaration (each declares them all); a loss replaces everything
        waiting for that id (the Scheduler treats a loss of a worker it never
        saw join as nothing), and a death among them stays a death.
        """
        key = message.worker_id
        waiting = self._undelivered.get(key)
        if waiting is None:
            self._undelivered[key] = [message]
        elif isinstance(message, (WorkerJoined, DeclaredSchedules)):
            same = [i for i, m in enumerate(waiting) if type(m) is type(message)]
            if same:
                waiting[same[0]] = message
            else:
                waiting.append(message)
        else:
            died = [m for m in waiting if isinstance(m, WorkerLost) and m.reason != "left"]
            self._undelivered[key] = [died[0] if died and message.reason == "left" else message]
        self._deliver()

    def _deliver(self) -> None:
        undelivered = self._undelivered
        while undelivered:
            key, waiting = next(iter(undelivered.items()))
            while waiting:
                try:
                    self.scheduler.tell(waiting[0])
                except MailboxFull:
                    return  # retried on the next reap tick
                except ActorStopped:
                    undelivered.clear()  # the node is stopping: no Scheduler to tell
                    return
                waiting.pop(0)
            del undelivered[key]
