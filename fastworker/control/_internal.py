"""Messages between the control plane's actors (never on the wire).

Actors talk in batches: one ``StoreResults`` every result a worker reported in one message.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..wire import ResultRecord

__all__ = [
    "CallbackJobs",
    "CancelTask",
    "ClientRequest",
    "ClientSubmits",
    "DeclaredSchedules",
    "EvictRevoked",
    "EvictWorker",
    "HeldAcks",
    "LookupTask",
    "MetricsQuery",
    "Outgoing",
    "QueryResults",
    "ResendResults",
    "StoreResults",
    "WorkerJoined",
    "WorkerLost",
]


@attrs.frozen
class Outgoing:
    """Multipart messages for the gateway to send to clients: ``[identity, body]`` each."""

    messages: list[list[bytes]]


@attrs.frozen
class HeldAcks:
    """Plain SubmitAcks (nothing rejected) the gateway may hold back a moment: ``[identity, body]``.

    They go out with the next message to the same client, or after the
    gateway's ack delay: most tasks finish before that, so their results carry
    the news and the client wakes once, not twice (see Gateway).
    """

    messages: list[list[bytes]]


@attrs.frozen
class ClientSubmits:
    """Submit messages from clients: ``(identity, request_id, raw TaskWire list)`` each."""

    submits: list[tuple[bytes, int, list[Any]]]


@attrs.frozen
class CancelTask:
    identity: bytes
    request_id: int
    task_id: str


@attrs.frozen
class StoreResults:
    records: list[ResultRecord]


@attrs.frozen
class QueryResults:
    identity: bytes
    request_id: int
    task_ids: list[str]


@attrs.frozen
class ResendResults:
    """Push cached results again to a client that re-submitted finished tasks."""

    identity: bytes
    task_ids: list[str]


@attrs.frozen
class CallbackJobs:
    """Callback documents to deliver: ``(address, encoded payload, receiver's CURVE key)`` each
    (the key is None for a receiver without CURVE)."""

    jobs: list[tuple[str, bytes, bytes | None]]


@attrs.frozen
class WorkerJoined:
    worker_id: str
    task_names: frozenset[str]
    concurrency: int
    key: bytes = b""  # the CURVE key it registered with (b"" without CURVE)


@attrs.frozen
class EvictWorker:
    """To Discovery: drop this member (its connection speaks with another key, or its
    key was revoked); it joins again with its next heartbeat if it still may."""

    worker_id: str
    reason: str


@attrs.frozen
class EvictRevoked:
    """To Discovery, after a key reload: drop every member whose key is no longer allowed."""


@attrs.frozen
class WorkerLost:
    worker_id: str
    reason: str


@attrs.frozen
class LookupTask:
    """Asked of the Scheduler (where a held task is) and the ResultCache (its result)."""

    task_id: str


@attrs.frozen
class MetricsQuery:
    """Asked of the Scheduler: its task metrics, queues and workers, for the HTTP side."""


@attrs.frozen
class ClientRequest:
    """A client's schedule or dead-letter request, for the Scheduler that holds both."""

    identity: bytes
    message: Any


@attrs.frozen
class DeclaredSchedules:
    """The ScheduleWire arrays a registered worker's ``@task``s declare (unchecked)."""

    worker_id: str
    schedules: list[Any]
