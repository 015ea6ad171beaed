"""What the HTTP side reads from the control plane: every answer an ``ask`` with a deadline.

The HTTP handlers never touch an actor's state: they ask the actor that owns
it, as any other actor would, and an actor that does not answer in time
shows as an error in the answer rather than a request that hangs.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio

from .._cbor import NO_REFERENCES
from ..control._internal import CancelTask, LookupTask, MetricsQuery
from ..control.gateway import gather_stats
from ..runtime import ActorError, ActorRef
from ..wire import ResultRecord

__all__ = ["PRIORITIES", "ControlPlaneView", "DashboardBusy"]

PRIORITIES = ("critical", "high", "normal", "low")
ASK_TIMEOUT = 2.0
# Requests that ask the actors at once; more wait up to ASK_TIMEOUT, then get 503: a flood
# of requests (many open pages, a scraper loop) cannot pile asks on the Scheduler.
MAX_CONCURRENT = 4
MAX_TASK_ID = 1024
_PREVIEW_BYTES = 64 * 1024  # results larger than this are not decoded for display
_PREVIEW_CHARS = 2000


def _preview(record: ResultRecord) -> str | None:
    """The result as text for a person; never unpickled, never large."""
    data = record.result
    if data is None:
        return None
    if len(data) > _PREVIEW_BYTES or record.format == 2:
        kind = "pickled " if record.format == 2 else ""
        return f"({len(data):,} {kind}bytes, not shown)"
    try:
        if record.format == 0:
            text = data.decode("utf-8", errors="replace")
        else:
            # No shared values: json.dumps would write out every reference, and a
            # few hundred bytes of nested sharing hold the control plane's loop for good.
            text = json.dumps(cbor2.loads(data, semantic_decoders=NO_REFERENCES), default=repr)
    except Exception as exc:  # user data: any decoding error is shown, not raised
        text = f"(cannot decode: {type(exc).__name__})"
    return text if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…"


def _record_dict(record: ResultRecord) -> dict[str, Any]:
    return {
        "task_id": record.task_id,
        "status": record.status,
        "name": record.name,
        "result": _preview(record),
        "error": record.error,
        "traceback": record.traceback,
        "started_at": record.started_at,
        "completed_at": record.completed_at,
        "attempts": record.attempts,
    }


class DashboardBusy(ActorError):
    """Too many requests are being answered; the caller retries."""


class ControlPlaneView:
    """The control plane's actors as the dashboard and /metrics see them."""

    def __init__(
        self,
        *,
        scheduler: ActorRef,
        results: ActorRef,
        callbacks: ActorRef,
        discovery: ActorRef,
        gateway: ActorRef,
        extra: list[ActorRef] | None = None,
        timeout: float = ASK_TIMEOUT,
    ) -> None:
        """``extra``: more actors whose statistics go in (the ZAP handler, the journal)."""
        self.scheduler = scheduler
        self.results = results
        self.timeout = timeout
        self._sources = [results, callbacks, discovery, gateway, *(extra or [])]
        self._slots = trio.Semaphore(MAX_CONCURRENT)

    @asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        with trio.move_on_after(self.timeout) as waiting:
            await self._slots.acquire()
        if waiting.cancelled_caught:
            raise DashboardBusy(f"{MAX_CONCURRENT} requests are being answered; retry")
        try:
            yield
        finally:
            self._slots.release()

    async def stats(self) -> dict[str, Any]:
        """Every actor's statistics and the Scheduler's metrics, in one dict."""
        async with self._turn():
            stats = await gather_stats(self._sources, timeout=self.timeout)
            try:
                stats["metrics"] = await self.scheduler.ask(MetricsQuery(), timeout=self.timeout)
            except ActorError as exc:
                stats["metrics"] = {"error": str(exc)}
        return stats

    async def overview(self) -> dict[str, Any]:
        """What the dashboard page shows, in one answer (the page polls it)."""
        stats = await self.stats()
        metrics = stats["metrics"]
        book = metrics.get("book", {})
        discovery = stats.get("discovery", {})
        inflight = metrics.get("inflight", {})
        workers = []
        for worker_id, info in (discovery.get("workers") or {}).items():
            if isinstance(info, dict):
                workers.append(
                    {
                        "id": worker_id,
                        "hostname": info.get("hostname"),
                        "pid": info.get("pid"),
                        "concurrency": info.get("concurrency"),
                        "running": inflight.get(worker_id, 0),
                        "heartbeat_age": info.get("heartbeat_age"),
                        "tasks": info.get("tasks"),
                    }
                )
        oldest = metrics.get("oldest_queued_age") or [None] * len(PRIORITIES)
        queued = book.get("queued", {})
        queues = [
            {"priority": name, "depth": queued.get(name, 0), "oldest_age": age}
            for name, age in zip(PRIORITIES, oldest, strict=True)
        ]
        totals = {
            key: book.get(key)
            for key in (
                "accepted",
                "succeeded",
                "failed",
                "cancelled",
                "retried",
                "queued_total",
                "running",
                "scheduled",
            )
        }
        return {
            "time": time.time(),
            "workers": workers,
            "queues": queues,
            "totals": totals,
            "tasks": metrics.get("tasks", {}),
            "timeline": metrics.get("timeline", []),
            "failures": metrics.get("failures", [])[-20:],
            "errors": {
                name: part["error"]
                for name, part in stats.items()
                if isinstance(part, dict) and "error" in part
            },
        }

    async def failures(self) -> list[dict[str, Any]]:
        async with self._turn():
            metrics = await self.scheduler.ask(MetricsQuery(), timeout=self.timeout)
        return list(metrics.get("failures", []))

    async def task(self, task_id: str) -> dict[str, Any] | None:
        """Where the task is (held by the Scheduler), else its cached result, else None."""
        async with self._turn():
            held = await self.scheduler.ask(LookupTask(task_id), timeout=self.timeout)
            if held is not None:
                held = dict(held)
                held["priority"] = PRIORITIES[held["priority"]]
                return held
            record = await self.results.ask(LookupTask(task_id), timeout=self.timeout)
        return None if record is None else _record_dict(record)

    async def cancel(self, task_id: str) -> tuple[bool, str]:
        """Through the clients' own path (the Scheduler's CancelTask): (cancelled, status)."""
        async with self._turn():
            answer = await self.scheduler.ask(CancelTask(b"", 0, task_id), timeout=self.timeout)
        if answer is None:
            raise ActorError("the scheduler could not handle the cancel (see its log)")
        cancelled, status = answer
        return bool(cancelled), str(status)
