"""Tasks and results as they travel inside messages.

Both are CBOR arrays, not maps: a batch of ten thousand tasks should not
repeat ten thousand sets of key names.  ``from_wire`` is the validation
boundary: anything that came from the network goes through it before use.

They are NamedTuples rather than attrs classes on purpose: each record *is*
its own wire form (cbor2 encodes a tuple as an array), so forwarding one
costs no conversion, and building one from a validated array is a single
``tuple.__new__``.  These two types sit on the per-task hot path of every
hop; everything else in the project is attrs.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections.abc import Iterable
from operator import itemgetter
from typing import Any, NamedTuple

import cbor2

from .._cbor import NO_REFERENCES
from ..tasks.models import TaskPriority, TaskResult, TaskStatus
from ..tasks.serializer import SerializationFormat, loads
from ._errors import WireError, preview

__all__ = [
    "EXPIRED_PREFIX",
    "TASK_OPTIONS",
    "UNDECODABLE_PREFIX",
    "ResultRecord",
    "TaskEnvelope",
    "epoch",
    "from_epoch",
    "results_to_wire",
]

# Option keys a TaskWire may carry, with the types they accept.
TASK_OPTIONS: dict[str, tuple[type, ...]] = {
    "cb": (str,),  # callback address
    "cbd": (bytes,),  # callback data, encoded in the task's format
    "cbk": (bytes,),  # the callback receiver's CURVE public key (32 bytes): deliver with CURVE
    "eta": (float, int),  # do not start before this time (epoch seconds, UTC)
    "timeout": (float, int),  # seconds a run may take
    "max_retries": (int,),
    "retry_delay": (float, int),
    "retry_backoff": (float, int),
    "retry_backoff_max": (float, int),
    "attempt": (int,),  # control plane → worker: which run this is (1-based)
}

_STATUS_BY_VALUE = {s.value: s for s in TaskStatus}
_FINAL_VALUES = frozenset(s.value for s in TaskStatus if s.is_final)
_new_tuple = tuple.__new__
# How a control plane says "this task finished, but its result left the cache".
EXPIRED_PREFIX = "result expired"
# How a worker's failure says "this task's arguments could not be decoded":
# the control plane files such a task as an undecodable dead letter.
UNDECODABLE_PREFIX = "bad task payload"
_MAX_ID_LENGTH = 256
_MAX_NAME_LENGTH = 512
# Numbers from the network end up in trio deadlines, float() and datetimes: NaN,
# infinities, negative durations and bignums would raise far from here.
_MAX_SECONDS = 1e15
_MIN_EPOCH = -62135596800.0  # 0001-01-01T00:00:00Z, the first datetime
_MAX_EPOCH = 253402214400.0  # 9999-12-31T00:00:00Z, near the last one
# A result's run number (1-based; 0 for a record no run made, such as "expired").
_MAX_ATTEMPTS = 2**31 - 1
_JSON = SerializationFormat.JSON.code
_CBOR = SerializationFormat.CBOR.code


def _seconds_ok(value: Any) -> bool:
    """A finite, non-negative number of seconds (comparisons are False for NaN)."""
    return type(value) in (float, int) and 0 <= value <= _MAX_SECONDS


def _epoch_ok(value: Any) -> bool:
    """Epoch seconds that ``from_epoch`` can turn into a datetime."""
    return type(value) in (float, int) and _MIN_EPOCH <= value <= _MAX_EPOCH


def _one_value(fmt: int, data: bytes) -> bool:
    """Whether ``data`` is exactly one JSON or CBOR value (pickled data is not read).

    The control plane writes callback data into the callback document as it
    came, after the document's own keys: anything more than one value would
    add keys of the sender's choosing (a JSON reader keeps the last of two).
    """
    if fmt == _JSON:
        try:
            json.loads(data)
        except (ValueError, RecursionError):
            return False
        return True
    if fmt == _CBOR:
        stream = io.BytesIO(data)
        try:
            cbor2.CBORDecoder(stream, semantic_decoders=NO_REFERENCES).decode()
        except Exception:  # cbor2 raises a zoo of types on garbage
            return False
        return stream.tell() == len(data)
    return True


def epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def from_epoch(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


def _check_options(options: Any) -> dict[str, Any] | None:
    if options is None:
        return None
    if not isinstance(options, dict):
        raise WireError("invalid", "task options must be a map or null")
    for key, value in options.items():
        types = TASK_OPTIONS.get(key)
        if types is None:
            raise WireError("invalid", f"unknown task option {preview(key)}")
        if not isinstance(value, types) or isinstance(value, bool):
            raise WireError("invalid", f"task option {key!r} has the wrong type")
        if key == "eta":
            if not _epoch_ok(value):
                raise WireError("invalid", f"task option 'eta' is out of range: {preview(value)}")
        elif int in types and not _seconds_ok(value):
            raise WireError("invalid", f"task option {key!r} is out of range: {preview(value)}")
    return options


class TaskEnvelope(NamedTuple):
    """A task with its arguments still encoded: what clients, scheduler and workers pass on.

    Wire form: ``[task_id, name, priority, format, payload, options]`` with
    priority 0 (CRITICAL) … 3 (LOW), format 0 JSON / 1 CBOR / 2 PICKLE, payload
    the encoded ``[args, kwargs]`` and options a map (see TASK_OPTIONS) or null.
    """

    task_id: str
    name: str
    priority: int
    format: int
    payload: bytes
    options: dict[str, Any] | None = None

    def to_wire(self) -> TaskEnvelope:
        return self

    @classmethod
    def from_wire(cls, item: Any) -> TaskEnvelope:
        """Validate one untrusted TaskWire; raises WireError("invalid", …)."""
        if type(item) is not list or len(item) != 6:
            raise WireError("invalid", "a task must be an array of 6 items")
        task_id, name, priority, fmt, payload, options = item
        if type(task_id) is not str or not 0 < len(task_id) <= _MAX_ID_LENGTH:
            raise WireError("invalid", "task id must be a string of 1-256 characters")
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME_LENGTH:
            raise WireError("invalid", f"task {task_id}: name must be a non-empty string")
        if type(priority) is not int or not 0 <= priority <= 3:
            raise WireError("invalid", f"task {task_id}: priority must be 0-3")
        if type(fmt) is not int or not 0 <= fmt <= 2:
            raise WireError("invalid", f"task {task_id}: format must be 0-2")
        if type(payload) is not bytes:
            raise WireError("invalid", f"task {task_id}: payload must be bytes")
        if options is not None:
            _check_options(options)
            data = options.get("cbd")
            if data is not None and not _one_value(fmt, data):
                raise WireError(
                    "invalid", f"task {task_id}: callback data must be exactly one encoded value"
                )
        return _new_tuple(cls, item)

    @property
    def priority_enum(self) -> TaskPriority:
        return TaskPriority.from_rank(self.priority)

    def option(self, key: str, default: Any = None) -> Any:
        return default if self.options is None else self.options.get(key, default)


class ResultRecord(NamedTuple):
    """A result with its value still encoded, as the control plane stores and forwards it.

    Full wire form: ``[task_id, status, result, error, started_at,
    completed_at, attempts, traceback, format, name, retry_delay]``: status is
    a TaskStatus value, result the encoded return value or null, timestamps
    epoch seconds (UTC) or null, retry_delay the seconds to wait before the
    next attempt (only with status "retrying").

    Compact wire form, for a success with no error, traceback or retry delay
    (nearly every result): ``[task_id, result, started_at, completed_at,
    attempts, format, name]``.  It leaves out exactly the four fields such a
    record holds as constants, so it decodes back into the same record.
    """

    task_id: str
    status: str
    result: bytes | None = None
    error: str | None = None
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    traceback: str | None = None
    format: int = 0
    name: str = ""
    retry_delay: float | None = None

    def to_wire(self) -> tuple[Any, ...]:
        if _is_plain_success(self):
            compact: tuple[Any, ...] = _compact(self)
            return compact
        return self

    @classmethod
    def from_wire(cls, item: Any) -> ResultRecord:
        """Validate one untrusted ResultWire, full or compact; raises WireError("invalid", …).

        The compact form is checked first and inline: it is nearly every result.
        """
        if type(item) is not list:
            raise WireError("invalid", _SHAPE)
        size = len(item)
        if size == 7:
            tid, result, started, completed, attempts, fmt, name = item
            if type(tid) is not str or not tid:
                raise WireError("invalid", "result task id must be a non-empty string")
            ok = (
                (result is None or type(result) is bytes)
                and (started is None or _epoch_ok(started))
                and (completed is None or _epoch_ok(completed))
                and type(attempts) is int
                and 0 <= attempts <= _MAX_ATTEMPTS
                and type(fmt) is int
                and 0 <= fmt <= 2
                and type(name) is str
            )
            if not ok:
                raise WireError("invalid", f"result {tid}: a field has the wrong type")
            full = (
                tid,
                _SUCCESS,
                result,
                None,
                started,
                completed,
                attempts,
                None,
                fmt,
                name,
                None,
            )
            return _new_tuple(cls, full)
        if size != 11:
            raise WireError("invalid", _SHAPE)
        tid, status, result, error, started, completed, attempts, tb, fmt, name, retry = item
        if type(tid) is not str or not tid:
            raise WireError("invalid", "result task id must be a non-empty string")
        if type(status) is not str or status not in _STATUS_BY_VALUE:
            raise WireError("invalid", f"result {tid}: unknown status {preview(status)}")
        ok = (
            (result is None or type(result) is bytes)
            and (error is None or type(error) is str)
            and (started is None or _epoch_ok(started))
            and (completed is None or _epoch_ok(completed))
            and type(attempts) is int
            and 0 <= attempts <= _MAX_ATTEMPTS
            and (tb is None or type(tb) is str)
            and type(fmt) is int
            and 0 <= fmt <= 2
            and type(name) is str
            and (retry is None or _seconds_ok(retry))
        )
        if not ok:
            raise WireError("invalid", f"result {tid}: a field has the wrong type")
        return _new_tuple(cls, item)

    @property
    def is_final(self) -> bool:
        return self.status in _FINAL_VALUES

    @property
    def is_expired(self) -> bool:
        """The control plane's answer for a task that finished but whose result it no longer has.

        Final (a caller waiting for the task stops waiting, with this FAILURE),
        yet "not found" to ``get_task_result``: the outcome is unknown.
        """
        return (
            self.status == "failure"
            and self.attempts == 0
            and self.error is not None
            and self.error.startswith(EXPIRED_PREFIX)
        )

    def to_task_result(self, *, allow_pickle: bool = False) -> TaskResult:
        """Decode the value: what the Client hands to users.

        A result whose bytes cannot be decoded becomes a FAILURE that says why,
        rather than an exception far from its cause.
        """
        value = None
        status = _STATUS_BY_VALUE[self.status]
        error = self.error
        if self.result is not None:
            try:
                fmt = SerializationFormat.from_code(self.format)
                value = loads(fmt, self.result, allow_pickle=allow_pickle)
            except ValueError as exc:
                status, error = TaskStatus.FAILURE, f"result could not be decoded: {exc}"
        return TaskResult(
            task_id=self.task_id,
            status=status,
            result=value,
            error=error,
            started_at=from_epoch(self.started_at),
            completed_at=from_epoch(self.completed_at),
            task_name=self.name or None,
            attempts=self.attempts,
            traceback=self.traceback,
        )


_SUCCESS = TaskStatus.SUCCESS.value
# Positions the compact form keeps: all but status, error, traceback and retry_delay.
_compact = itemgetter(0, 2, 4, 5, 6, 8, 9)
_SHAPE = "a result must be an array of 11 items, or 7 for a plain success"


def _is_plain_success(record: ResultRecord) -> bool:
    return record[1] == _SUCCESS and record[3] is None and record[7] is None and record[10] is None


def results_to_wire(items: Iterable[Any]) -> list[Any]:
    """Each ResultRecord in ``items`` in its wire form; anything else as it is.

    The one place records go compact on their way out (``encode`` calls it for
    Done, Results and ResultReply).  The test is written out rather than
    calling ``to_wire``: it runs once per result on every hop, and a call per
    record would cost more than the four fields it saves cbor2.
    """
    compact, record_type, success = _compact, ResultRecord, _SUCCESS
    return [
        compact(r)
        if type(r) is record_type
        and r[1] == success
        and r[3] is None
        and r[7] is None
        and r[10] is None
        else r
        for r in items
    ]
