"""Every message of the fastworker protocol, as frozen attrs records.

A message is one ZeroMQ frame holding a CBOR array ``[version, tag, *fields]``
(a ROUTER socket adds the peer's identity as a frame before it).  Each class
lists its fields in wire order with the types a decoder must check; tasks and
results inside messages are plain arrays (see ``TaskWire``/``ResultWire`` in
``_records.py``) so a batch of thousands costs one CBOR decode.  The tag
numbers and layouts are documented in ``design/protocol.md``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

__all__ = [
    "MAX_QUERY_IDS",
    "MESSAGE_TYPES",
    "Cancel",
    "CancelReply",
    "CancelRunning",
    "DeadLetterQuery",
    "DeadLetterReply",
    "DeadLetterRetry",
    "DeadLetterRetryReply",
    "DeclareSchedules",
    "Dispatch",
    "Done",
    "ErrorReply",
    "Heartbeat",
    "HeartbeatAck",
    "Lookup",
    "LookupReply",
    "Message",
    "Ready",
    "Register",
    "Registered",
    "Release",
    "ResultQuery",
    "ResultReply",
    "Results",
    "ScheduleAdd",
    "ScheduleList",
    "ScheduleListReply",
    "ScheduleRemove",
    "ScheduleReply",
    "StatsQuery",
    "StatsReply",
    "Submit",
    "SubmitAck",
    "Unregister",
]


class Message:
    """Base of all protocol messages: ``TAG`` names the type on the wire."""

    __slots__ = ()
    TAG: ClassVar[int]
    # (field name, accepted python types) in wire order; filled by _register.
    FIELDS: ClassVar[tuple[tuple[str, tuple[type, ...]], ...]]
    # How many of FIELDS a frame must carry: the rest may be left off (added later).
    REQUIRED: ClassVar[int]


MESSAGE_TYPES: dict[int, type[Message]] = {}

_NONE = type(None)


def _register(tag: int, *types: tuple[type, ...], optional: int = 0) -> Any:
    """``optional``: how many trailing fields a frame may leave off (they take
    their defaults): fields added to a message after peers already spoke it."""

    def wrap(cls: type[Message]) -> type[Message]:
        names = [f.name for f in attrs.fields(cls)]  # type: ignore[arg-type]
        if len(names) != len(types):
            raise TypeError(f"{cls.__name__}: {len(names)} fields but {len(types)} types")
        cls.TAG = tag
        cls.FIELDS = tuple(zip(names, types, strict=True))
        cls.REQUIRED = len(types) - optional
        if tag in MESSAGE_TYPES:
            raise TypeError(f"tag {tag} used twice")
        MESSAGE_TYPES[tag] = cls
        return cls

    return wrap


_S = (str,)
_I = (int,)
_L = (list,)
_D = (dict,)
_B = (bytes,)
_F = (float, int)
_BOOL = (bool,)

# --- client <-> discovery ---------------------------------------------------


@_register(1, _I)
@attrs.frozen
class Lookup(Message):
    """Client → discovery: where is the control plane?"""

    request_id: int


@_register(2, _I, _S, _S, _F, _I)
@attrs.frozen
class LookupReply(Message):
    """Discovery → client: the control plane's instance id, client endpoint and limits.

    ``max_message_size`` is the largest message the control plane accepts: a
    client splits its batches under it and fails a task too large for any
    message at the call that submits it.
    """

    request_id: int
    instance_id: str
    client_endpoint: str
    heartbeat_interval: float
    max_message_size: int


# --- worker <-> discovery ---------------------------------------------------


@_register(10, _S, _L, _I, _I, _S)
@attrs.frozen
class Register(Message):
    """Worker → discovery: join, naming the tasks served and the concurrency."""

    worker_id: str
    task_names: list[str]
    concurrency: int
    pid: int
    hostname: str


@_register(11, _S, _S, _F, _I)
@attrs.frozen
class Registered(Message):
    """Discovery → worker: accepted; where to fetch work, how often to heartbeat.

    ``max_message_size`` is the largest message the control plane accepts:
    the worker cuts its Done messages under it (and its own limit).
    """

    instance_id: str
    worker_endpoint: str
    heartbeat_interval: float
    max_message_size: int


@_register(12, _S)
@attrs.frozen
class Heartbeat(Message):
    worker_id: str


@_register(13, _S, _BOOL)
@attrs.frozen
class HeartbeatAck(Message):
    """Discovery → worker.  ``known`` false means: register again."""

    instance_id: str
    known: bool


@_register(14, _S, _S)
@attrs.frozen
class Unregister(Message):
    """Worker → discovery: this worker id is gone.

    ``reason`` "left": on purpose, after handing back its work; "crashed": the
    worker's actor crashed and starts over under a new id — its runs died, and
    the poison guard counts that as a death of each task it held.
    """

    worker_id: str
    reason: str


# --- client <-> gateway -----------------------------------------------------


@_register(20, _I, _L)
@attrs.frozen
class Submit(Message):
    """Client → control plane: a batch of TaskWire arrays."""

    request_id: int
    tasks: list[Any]


@_register(21, _I, _L)
@attrs.frozen
class SubmitAck(Message):
    """Control plane → client: every task of the request is accepted except ``rejected``.

    ``rejected`` holds ``[task_id, reason, message]`` arrays; reasons are listed
    in design/protocol.md (``queue_full``, ``invalid``).
    """

    request_id: int
    rejected: list[Any]


@_register(22, _L)
@attrs.frozen
class Results(Message):
    """Control plane → client (push) and worker → control plane: ResultWire arrays."""

    results: list[Any]


# Task ids one ResultQuery may carry (more is rejected "invalid"): a decoded
# query waits in the control plane's mailboxes, so this bounds what a flood holds.
MAX_QUERY_IDS = 4096


@_register(23, _I, _L)
@attrs.frozen
class ResultQuery(Message):
    request_id: int
    task_ids: list[str]


@_register(24, _I, _L)
@attrs.frozen
class ResultReply(Message):
    """One ResultWire or null per queried id, in order."""

    request_id: int
    results: list[Any]


@_register(25, _I, _S)
@attrs.frozen
class Cancel(Message):
    request_id: int
    task_id: str


@_register(26, _I, _BOOL, _S)
@attrs.frozen
class CancelReply(Message):
    """``cancelled`` true when it took effect; ``status`` is the task's status after it."""

    request_id: int
    cancelled: bool
    status: str


@_register(27, _I)
@attrs.frozen
class StatsQuery(Message):
    request_id: int


@_register(28, _I, _D)
@attrs.frozen
class StatsReply(Message):
    request_id: int
    stats: dict[str, Any]


@_register(29, _I, _S, _S)
@attrs.frozen
class ErrorReply(Message):
    """Any endpoint → sender: the request could not be understood.

    ``request_id`` is 0 when the bad message carried none.
    """

    request_id: int
    reason: str
    message: str


# --- worker <-> scheduler ---------------------------------------------------


@_register(30, _I, (list, _NONE), (int, _NONE), optional=1)
@attrs.frozen
class Ready(Message):
    """Worker → scheduler: how many tasks it may hold at once (0 = send no more).

    ``held`` (now and then; null otherwise) lists every task the worker holds,
    and ``seen`` the ``number`` of the last Dispatch it received before making
    the list: a task of a Dispatch numbered up to ``seen`` that is not listed
    was lost on the way (a Dispatch into a broken connection) and is queued
    again.  A list that took long on a stalled link says nothing of Dispatches
    sent after ``seen``.
    """

    window: int
    held: list[Any] | None = None
    seen: int | None = None


@_register(31, _L, (int, _NONE), optional=1)
@attrs.frozen
class Dispatch(Message):
    """Scheduler → worker: TaskWire arrays to run; ``number`` counts Dispatches to
    this worker (echoed as ``Ready.seen``)."""

    tasks: list[Any]
    number: int | None = None


@_register(32, _L)
@attrs.frozen
class Done(Message):
    """Worker → scheduler: ResultWire arrays of finished (or retrying) tasks."""

    results: list[Any]


@_register(33, _L)
@attrs.frozen
class Release(Message):
    """Worker → scheduler: ids of tasks handed back unstarted (draining)."""

    task_ids: list[str]


@_register(34, _L)
@attrs.frozen
class CancelRunning(Message):
    """Scheduler → worker: stop these tasks if they are still running."""

    task_ids: list[str]


# --- schedules and dead letters (design/schedules.md) ------------------------
#
# A ScheduleWire is ``[schedule_id, task_name, cron, interval, timezone,
# priority, format, payload]``; a DeadLetterWire is ``[task_id, name,
# priority, format, payload, reason, error, attempts, failed_at]``.  Their
# fields are checked where they are used (control/_schedules.py,
# control/_deadletters.py), like TaskWire's.


@_register(60, _S, _L)
@attrs.frozen
class DeclareSchedules(Message):
    """Worker → discovery, after each Registered: the schedules its ``@task``s declare.

    An upsert by schedule id (the task's name): three workers declaring the
    same schedule make one schedule, which runs once per tick.
    """

    worker_id: str
    schedules: list[Any]


@_register(61, _I, _L)
@attrs.frozen
class ScheduleAdd(Message):
    """Client → control plane: add (or replace) one schedule, a ScheduleWire."""

    request_id: int
    schedule: list[Any]


@_register(62, _I, _BOOL, _S)
@attrs.frozen
class ScheduleReply(Message):
    """Control plane → client, for ScheduleAdd and ScheduleRemove.

    ``ok`` false: the schedule was refused (``message`` says why) or the one
    to remove was not there.
    """

    request_id: int
    ok: bool
    message: str


@_register(63, _I, _S)
@attrs.frozen
class ScheduleRemove(Message):
    request_id: int
    schedule_id: str


@_register(64, _I)
@attrs.frozen
class ScheduleList(Message):
    request_id: int


@_register(65, _I, _L, _I)
@attrs.frozen
class ScheduleListReply(Message):
    """``[ScheduleWire, next_run, last_run, source]`` per schedule, as many as fit one
    message; ``total`` is how many there are."""

    request_id: int
    schedules: list[Any]
    total: int


@_register(66, _I, _I)
@attrs.frozen
class DeadLetterQuery(Message):
    """Client → control plane: the newest ``limit`` dead letters."""

    request_id: int
    limit: int


@_register(67, _I, _L, _I)
@attrs.frozen
class DeadLetterReply(Message):
    """DeadLetterWire arrays, newest first, as many as fit one message; ``total`` held."""

    request_id: int
    letters: list[Any]
    total: int


@_register(68, _I, _S)
@attrs.frozen
class DeadLetterRetry(Message):
    """Client → control plane: queue this dead letter's task again, under its id."""

    request_id: int
    task_id: str


@_register(69, _I, _BOOL, _S, (list, _NONE))
@attrs.frozen
class DeadLetterRetryReply(Message):
    """``requeued`` true when the task is queued again, ``task`` its TaskWire (the
    client then holds it like a task it submitted); else ``message`` says why."""

    request_id: int
    requeued: bool
    message: str
    task: list[Any] | None
