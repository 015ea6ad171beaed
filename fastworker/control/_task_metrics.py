"""Per-task-name counters, latency histograms, recent failures and a per-second timeline.

The Scheduler feeds this as results flow through it (``_send_results``), not
from inside the task book: the book stays the proven model of where tasks are,
and this is only arithmetic on what leaves it.  It exists only when the
control plane serves HTTP (``--http-address``): without a reader, the cost
per task is not worth paying.  Everything is bounded: task names (clients
choose them) beyond ``MAX_NAMES`` share one label, failures are a ring of
``MAX_FAILURES`` with truncated texts, the timeline keeps ``TIMELINE_SECONDS``.

Plain Python on purpose: prometheus_client is an optional dependency, and the
HTTP side (``fastworker/dashboard``) turns a ``snapshot()`` into its format.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from typing import Any

from ..wire import ResultRecord

__all__ = ["BUCKETS", "MAX_FAILURES", "MAX_NAMES", "OTHER_NAMES", "TaskMetrics"]

# Upper bounds in seconds (Prometheus ``le``); the last bucket is +Inf.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
           60.0, 300.0, math.inf)  # fmt: skip
MAX_NAMES = 256
OTHER_NAMES = "(other)"  # the label shared by names beyond MAX_NAMES
MAX_FAILURES = 100
MAX_TEXT = 8192  # characters kept of a failure's error and traceback
TIMELINE_SECONDS = 600
_EVENTS = ("accepted", "succeeded", "failed", "retried", "cancelled", "rejected")


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)  # not cumulative; snapshot() accumulates
        self.total = 0.0


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT // 2] + "\n… truncated …\n" + text[-MAX_TEXT // 2 :]


class TaskMetrics:
    """Counts and timings by task name; mutated by the Scheduler only, read by snapshot()."""

    def __init__(self) -> None:
        self._events: dict[str, dict[str, int]] = {}  # name -> event -> count
        self._rejected: dict[tuple[str, str], int] = {}  # (name, reason) -> count
        self._round_trip: dict[str, _Histogram] = {}
        self._run_time: dict[str, _Histogram] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=MAX_FAILURES)
        # [second, succeeded, failed, finished, round-trip sum, round-trip max] per
        # wall-clock second with a result (idle seconds have no entry).
        self._timeline: deque[list[float]] = deque(maxlen=TIMELINE_SECONDS)

    def _label(self, name: str) -> str:
        if name in self._events or len(self._events) < MAX_NAMES:
            return name
        return OTHER_NAMES

    def _counts(self, name: str) -> dict[str, int]:
        label = self._label(name)
        counts = self._events.get(label)
        if counts is None:
            counts = self._events[label] = dict.fromkeys(_EVENTS, 0)
        return counts

    def accepted(self, name: str, count: int = 1) -> None:
        self._counts(name)["accepted"] += count

    def rejected(self, name: str, reason: str) -> None:
        self._counts(name)["rejected"] += 1
        key = (self._label(name), reason)
        self._rejected[key] = self._rejected.get(key, 0) + 1

    def retried(self, name: str) -> None:
        self._counts(name)["retried"] += 1

    def _histograms(self, name: str) -> tuple[dict[str, int], _Histogram, _Histogram]:
        counts = self._counts(name)
        label = self._label(name)
        round_trip = self._round_trip.get(label)
        if round_trip is None:
            round_trip = self._round_trip[label] = _Histogram()
        run_time = self._run_time.get(label)
        if run_time is None:
            run_time = self._run_time[label] = _Histogram()
        return counts, round_trip, run_time

    def finished(
        self, records: list[ResultRecord], accepted_at: list[float], now: float, wall: float
    ) -> None:
        """Final results leaving the book; ``now`` is the book's clock, ``wall`` epoch seconds.

        On the Scheduler's hot path: the tables of each name are looked up once
        per batch, not once per result.
        """
        by_name: dict[str, tuple[dict[str, int], _Histogram, _Histogram]] = {}
        succeeded = failed = 0
        total = peak = 0.0
        for record, accepted in zip(records, accepted_at, strict=True):
            name = record.name
            tables = by_name.get(name)
            if tables is None:
                tables = by_name[name] = self._histograms(name)
            counts, round_trips, run_times = tables
            round_trip = now - accepted
            if round_trip < 0.0:
                round_trip = 0.0
            round_trips.counts[bisect_left(BUCKETS, round_trip)] += 1
            round_trips.total += round_trip
            total += round_trip
            if round_trip > peak:
                peak = round_trip
            started, completed = record.started_at, record.completed_at
            if started is not None and completed is not None:
                run = completed - started if completed > started else 0.0
                run_times.counts[bisect_left(BUCKETS, run)] += 1
                run_times.total += run
            status = record.status
            if status == "success":
                counts["succeeded"] += 1
                succeeded += 1
            elif status == "failure":
                counts["failed"] += 1
                failed += 1
                self.failures.append(
                    {
                        "task_id": record.task_id,
                        "name": name,
                        "error": _clip(record.error),
                        "traceback": _clip(record.traceback),
                        "attempts": record.attempts,
                        "completed_at": record.completed_at,
                    }
                )
            elif status == "cancelled":
                counts["cancelled"] += 1
        second = float(int(wall))
        timeline = self._timeline
        if not timeline or timeline[-1][0] != second:
            timeline.append([second, 0, 0, 0, 0.0, 0.0])
        point = timeline[-1]
        point[1] += succeeded
        point[2] += failed
        point[3] += len(records)
        point[4] += total
        point[5] = max(point[5], peak)

    def snapshot(self) -> dict[str, Any]:
        """A copy safe to hand to another task: counts, cumulative histograms, timeline."""

        def histograms(table: dict[str, _Histogram]) -> dict[str, dict[str, Any]]:
            out = {}
            for name, h in table.items():
                if not h.total and not any(h.counts):
                    continue  # no result of this name was run by a worker (yet)
                cumulative, running = [], 0
                for count in h.counts:
                    running += count
                    cumulative.append(running)
                out[name] = {"buckets": cumulative, "sum": h.total, "count": running}
            return out

        return {
            "tasks": {name: dict(counts) for name, counts in self._events.items()},
            "rejected": [[name, reason, n] for (name, reason), n in self._rejected.items()],
            "round_trip": histograms(self._round_trip),
            "run_time": histograms(self._run_time),
            "timeline": [list(point) for point in self._timeline],
        }

    def recent_failures(self) -> list[dict[str, Any]]:
        return list(self.failures)
