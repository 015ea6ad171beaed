"""What the compact success record costs per record against the full form it replaced.

A micro-benchmark, not a test (benchmarks are never asserted): 10 000
success records, encoded in one Results message and decoded back through
``from_wire``, in the compact form that ``encode`` writes and in the 11-item
form every record took in protocol version 1.
``python -m fastworker.bench._records_micro`` prints the figures
(design/performance.md has the ones measured).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import cbor2

from fastworker.wire import ResultRecord, Results, decode, encode

RECORDS = 10_000
ROUNDS = 40


def _records() -> list[ResultRecord]:
    start = 1_700_000_000.25
    return [
        ResultRecord(os.urandom(16).hex(), "success", b"5", None, start + i, start + i + 0.25, 1,
                     None, 0, "add", None)
        for i in range(RECORDS)
    ]  # fmt: skip


def _full_frame(records: list[ResultRecord]) -> bytes:
    """What encode wrote before the compact form: every record as its 11 fields."""
    return cbor2.dumps([1, Results.TAG, records])


def _decode_full(frame: bytes) -> list[ResultRecord]:
    return [ResultRecord.from_wire(item) for item in cbor2.loads(frame)[2]]


def _decode_new(frame: bytes) -> list[ResultRecord]:
    message = decode(frame)
    assert isinstance(message, Results)
    return [ResultRecord.from_wire(item) for item in message.results]


def measure() -> dict[str, float]:
    """Nanoseconds per record (the fastest of ROUNDS runs: the least disturbed) and bytes."""
    records = _records()
    full, compact = _full_frame(records), encode(Results(records))
    assert _decode_full(full) == records == _decode_new(compact)
    works: dict[str, Callable[[], Any]] = {
        "full encode": lambda: _full_frame(records),
        "compact encode": lambda: encode(Results(records)),
        "full decode": lambda: _decode_full(full),
        "compact decode": lambda: _decode_new(compact),
    }
    best = dict.fromkeys(works, float("inf"))
    gc.collect()
    for _ in range(ROUNDS):  # interleaved, so both forms see the same machine load
        for name, work in works.items():
            start = time.perf_counter()
            work()
            best[name] = min(best[name], time.perf_counter() - start)
    figures = {name: seconds * 1e9 / RECORDS for name, seconds in best.items()}
    figures["full bytes"] = len(full) / RECORDS
    figures["compact bytes"] = len(compact) / RECORDS
    return figures


if __name__ == "__main__":
    for key, value in measure().items():
        unit = "bytes/record" if "bytes" in key else "ns/record"
        print(f"{key:>15}: {value:7.1f} {unit}")
