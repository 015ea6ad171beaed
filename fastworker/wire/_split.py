"""One rule for every message that carries many records: split by bytes, never past the limit.

A ZeroMQ socket with ``MAXMSGSIZE`` drops the *connection* of a peer that
sends one message too large, so an oversized batch is not just lost: it cuts
the peer off.  Every sender of Submit, Dispatch, Done, Results, ResultReply
and re-sent results therefore cuts its records into chunks with
``split_by_bytes``, weighing each record with an upper bound of its CBOR size.
A record that cannot fit in any message is handed to the caller's
``oversize`` callback instead of being sent: the caller fails that one task
with a clear error and the rest of the batch goes on.

The weights are upper bounds, not estimates: CBOR spends at most 9 bytes on
any header, integer or float, so a chunk whose weights sum to at most the
budget always encodes to at most the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ._records import ResultRecord

__all__ = [
    "MESSAGE_OVERHEAD",
    "message_budget",
    "result_chunks",
    "result_weight",
    "split_by_bytes",
    "task_weight",
    "text_bytes",
]

T = TypeVar("T")

# Room for everything around the records: the [version, tag, request_id, [...]]
# array and its headers, and leading frames (held acks) the gateway adds.
MESSAGE_OVERHEAD = 4096
_HEAD = 9  # the most CBOR spends on one header, integer or float


def message_budget(max_message_size: int) -> int:
    """Bytes of records one message may carry under ``max_message_size``."""
    return max(1, max_message_size - MESSAGE_OVERHEAD)


def text_bytes(text: str | None) -> int:
    """Encoded length of a string (UTF-8), without encoding it in the common ASCII case."""
    if text is None:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _value_bytes(value: Any) -> int:
    if type(value) is bytes:
        return _HEAD + len(value)
    if type(value) is str:
        return _HEAD + text_bytes(value)
    return _HEAD


def task_weight(task: Sequence[Any]) -> int:
    """Upper bound of a TaskWire's CBOR size: ``[id, name, priority, format, payload, options]``."""
    weight = 7 * _HEAD + text_bytes(task[0]) + text_bytes(task[1]) + len(task[4])
    options = task[5]
    if options:
        for key, value in options.items():
            weight += _HEAD + text_bytes(key) + _value_bytes(value)
    return weight


def result_weight(result: Sequence[Any]) -> int:
    """Upper bound of a ResultWire's CBOR size in either form: the 11 fields of the full one.

    The compact form of a plain success (protocol.md §4.2) is those fields minus four, so
    one weight bounds both and a chunk never depends on the form its records take.
    """
    return (
        12 * _HEAD
        + text_bytes(result[0])
        + text_bytes(result[1])
        + len(result[2] or b"")
        + text_bytes(result[3])
        + text_bytes(result[7])
        + text_bytes(result[9])
    )


def split_by_bytes(
    items: Iterable[T],
    weight: Callable[[T], int],
    budget: int,
    oversize: Callable[[T], None],
) -> list[list[T]]:
    """Cut ``items`` into chunks, in order, each weighing at most ``budget``.

    An item heavier than ``budget`` on its own goes to ``oversize`` and into
    no chunk: it can never be sent, and the caller must say so to whoever
    waits for it.
    """
    chunks: list[list[T]] = []
    chunk: list[T] = []
    size = 0
    for item in items:
        w = weight(item)
        if w > budget:
            oversize(item)
            continue
        if chunk and size + w > budget:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += w
    if chunk:
        chunks.append(chunk)
    return chunks


def too_large_result(record: ResultRecord, budget: int) -> ResultRecord:
    """What a receiver gets instead of a result too large for any message to it."""
    return ResultRecord(
        task_id=record.task_id,
        status="failure",
        error=f"the task's result needs {result_weight(record)} bytes, more than a message "
        f"may carry ({budget}); raise --max-message-size",
        started_at=record.started_at,
        completed_at=record.completed_at,
        attempts=record.attempts,
        format=record.format,
        name=record.name,
    )


def result_chunks(records: Iterable[ResultRecord], budget: int) -> list[list[ResultRecord]]:
    """Results cut for Results messages; one too large for any becomes a failure saying so."""
    too_large: list[ResultRecord] = []
    chunks = split_by_bytes(records, result_weight, budget, too_large.append)
    if too_large:
        chunks.append([too_large_result(record, budget) for record in too_large])
    return chunks
