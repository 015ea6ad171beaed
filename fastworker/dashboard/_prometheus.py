"""The Prometheus text exposition of a ``ControlPlaneView.stats()`` answer.

Built with prometheus_client's metric families and its own ``generate_latest``
(a fresh registry per scrape, holding one collector over the snapshot): the
control plane keeps its counts in plain Python, asked for once per scrape, so
nothing here is a second copy of the state that could drift.  Names and
labels are listed in design/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..control._task_metrics import BUCKETS
from ._view import PRIORITIES

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TASK_EVENTS = ("accepted", "succeeded", "failed", "retried", "cancelled")
_LE = [("+Inf" if b == float("inf") else repr(b)) for b in BUCKETS]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class _Snapshot(Collector):
    def __init__(self, stats: dict[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        metrics = _dict(stats.get("metrics"))
        yield from self._tasks(metrics)
        yield from self._queues(metrics)
        yield from self._workers(metrics, _dict(stats.get("discovery")))
        yield from self._callbacks(_dict(stats.get("callbacks")))
        yield from self._cache(_dict(stats.get("result-cache")))
        yield from self._rejected(stats)
        up = GaugeMetricFamily(
            "fastworker_actor_answering",
            "1 when the control plane actor answered this scrape's statistics request in time",
            labels=["actor"],
        )
        for name, part in stats.items():
            actor = "scheduler" if name == "metrics" else name  # its MetricsQuery answer
            up.add_metric([actor], 0.0 if "error" in _dict(part) else 1.0)
        yield up

    def _tasks(self, metrics: dict[str, Any]) -> Iterator[Metric]:
        tasks = _dict(metrics.get("tasks"))
        for event in _TASK_EVENTS:
            family = CounterMetricFamily(
                f"fastworker_tasks_{event}", f"Tasks {event}, by task name", labels=["task"]
            )
            for name, counts in tasks.items():
                family.add_metric([name], counts.get(event, 0))
            yield family
        rejected = CounterMetricFamily(
            "fastworker_tasks_rejected",
            "Submitted tasks the control plane refused, by task name and reason",
            labels=["task", "reason"],
        )
        for name, reason, count in metrics.get("rejected", []):
            rejected.add_metric([name, reason], count)
        yield rejected
        for key, metric, what in (
            ("round_trip", "fastworker_task_round_trip_seconds", "acceptance to final result"),
            ("run_time", "fastworker_task_run_seconds", "a worker's run of the final attempt"),
        ):
            histogram = HistogramMetricFamily(metric, f"Seconds from {what}", labels=["task"])
            for name, h in _dict(metrics.get(key)).items():
                histogram.add_metric(
                    [name], list(zip(_LE, h["buckets"], strict=True)), sum_value=h["sum"]
                )
            yield histogram

    def _queues(self, metrics: dict[str, Any]) -> Iterator[Metric]:
        book = _dict(metrics.get("book"))
        queued = _dict(book.get("queued"))
        depth = GaugeMetricFamily(
            "fastworker_queue_depth", "Tasks waiting for a worker", labels=["priority"]
        )
        age = GaugeMetricFamily(
            "fastworker_queue_oldest_age_seconds",
            "Seconds since the oldest waiting task was accepted (0 when none waits)",
            labels=["priority"],
        )
        oldest = metrics.get("oldest_queued_age") or [None] * len(PRIORITIES)
        for name, seconds in zip(PRIORITIES, oldest, strict=True):
            depth.add_metric([name], queued.get(name, 0))
            age.add_metric([name], seconds or 0.0)
        yield depth
        yield age
        for key, help_text in (
            ("running", "Tasks dispatched to a worker and not finished"),
            ("scheduled", "Tasks waiting for their eta or retry delay"),
            ("held", "Tasks the control plane holds (queued, scheduled, running)"),
            ("held_bytes", "Bytes of the tasks the control plane holds"),
        ):
            if key in book:
                yield GaugeMetricFamily(f"fastworker_tasks_{key}", help_text, value=book[key])

    def _workers(self, metrics: dict[str, Any], discovery: dict[str, Any]) -> Iterator[Metric]:
        inflight = _dict(metrics.get("inflight"))
        workers = _dict(discovery.get("workers"))
        up = GaugeMetricFamily(
            "fastworker_worker_up",
            "1 for each worker registered and heartbeating (a silent one is reaped)",
            labels=["worker", "hostname", "pid"],
        )
        beat = GaugeMetricFamily(
            "fastworker_worker_heartbeat_age_seconds",
            "Seconds since the worker's last heartbeat",
            labels=["worker"],
        )
        running = GaugeMetricFamily(
            "fastworker_worker_inflight",
            "Tasks dispatched to the worker and not reported yet",
            labels=["worker"],
        )
        for worker_id, info in workers.items():
            if not isinstance(info, dict):
                continue
            up.add_metric([worker_id, str(info.get("hostname")), str(info.get("pid"))], 1.0)
            beat.add_metric([worker_id], info.get("heartbeat_age") or 0.0)
        for worker_id, count in inflight.items():
            running.add_metric([worker_id], count)
        yield up
        yield beat
        yield running
        if "workers_lost" in discovery:
            yield CounterMetricFamily(
                "fastworker_workers_lost",
                "Workers declared dead (silent past their liveness)",
                value=discovery["workers_lost"],
            )

    def _callbacks(self, callbacks: dict[str, Any]) -> Iterator[Metric]:
        if "handed_to_zmq" not in callbacks:
            return
        yield CounterMetricFamily(
            "fastworker_callbacks_sent",
            "Callback documents handed to ZeroMQ (plain addresses)",
            value=callbacks["handed_to_zmq"],
        )
        yield CounterMetricFamily(
            "fastworker_callbacks_acknowledged",
            "Callback documents acknowledged by their receiver (ack+tcp addresses)",
            value=callbacks.get("acknowledged", 0),
        )
        dropped = CounterMetricFamily(
            "fastworker_callbacks_dropped",
            "Callback documents dropped, by reason",
            labels=["reason"],
        )
        for reason, count in _dict(callbacks.get("dropped_by_reason")).items():
            dropped.add_metric([reason], count)
        yield dropped

    def _cache(self, cache: dict[str, Any]) -> Iterator[Metric]:
        if "size" not in cache:
            return
        yield GaugeMetricFamily(
            "fastworker_result_cache_size", "Results cached", value=cache["size"]
        )
        yield GaugeMetricFamily(
            "fastworker_result_cache_max_size",
            "Results the cache keeps at most (--result-cache-size)",
            value=cache["max_size"],
        )
        for key, help_text in (
            ("evicted", "Results evicted as least recently used"),
            ("expired", "Results removed past their TTL"),
            ("hits", "Result queries answered from the cache"),
            ("misses", "Result queries for results not in the cache"),
        ):
            yield CounterMetricFamily(
                f"fastworker_result_cache_{key}", help_text, value=cache.get(key, 0)
            )

    def _rejected(self, stats: dict[str, Any]) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "fastworker_messages_rejected",
            "Messages refused by a control plane actor, by reason",
            labels=["actor", "reason"],
        )
        for actor, part in stats.items():
            source = _dict(part).get("book") if actor == "metrics" else part
            for reason, count in _dict(_dict(source).get("rejected")).items():
                family.add_metric(["scheduler" if actor == "metrics" else actor, reason], count)
        yield family


def render_metrics(stats: dict[str, Any]) -> bytes:
    """The text format for one scrape of ``stats`` (``ControlPlaneView.stats()``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return generate_latest(registry)
