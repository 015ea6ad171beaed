"""What the client commands print: plain tables for people, one JSON document with --json.

Results go to stdout; a failed task's error and traceback go to stderr
unless --json asked for the whole record on stdout.  Statistics come from
the control plane's ``stats()`` map; a part an actor could not supply
(``{"error": ...}``) shows as ``?``, never as a crash.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Mapping
from typing import Any

from ..tasks.models import TaskResult, TaskStatus

__all__ = ["cancelled", "rates", "status", "submitted", "task_result", "workers"]

# Counters whose change over the sampling interval is shown as a rate.
RATE_COUNTERS = ("accepted", "dispatched", "succeeded", "failed", "retried")
_TASKS_COLUMN = 60


def _default(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def _dumps(doc: object) -> str:
    return json.dumps(doc, ensure_ascii=False, default=_default)


def _print_json(doc: object) -> None:
    print(_dumps(doc), flush=True)


def submitted(task_id: str, *, as_json: bool) -> None:
    _print_json({"task_id": task_id}) if as_json else print(task_id, flush=True)


def result_document(outcome: TaskResult) -> dict[str, Any]:
    return {
        "task_id": outcome.task_id,
        "task_name": outcome.task_name,
        "status": outcome.status.value,
        "result": outcome.result,
        "error": outcome.error,
        "traceback": outcome.traceback,
        "attempts": outcome.attempts,
        "started_at": outcome.started_at,
        "completed_at": outcome.completed_at,
    }


def task_result(outcome: TaskResult, *, as_json: bool) -> None:
    """The value on success (a string as is, anything else as JSON); else why, on stderr."""
    if as_json:
        _print_json(result_document(outcome))
        return
    if outcome.status is TaskStatus.SUCCESS:
        value = outcome.result
        print(value if isinstance(value, str) else _dumps(value), flush=True)
        return
    name = f" ({outcome.task_name})" if outcome.task_name else ""
    message = f"task {outcome.task_id}{name} {outcome.status.value}"
    if outcome.error:
        message += f": {outcome.error}"
    if outcome.traceback:
        message += "\n" + outcome.traceback.rstrip("\n")
    print(message, file=sys.stderr, flush=True)


def cancelled(task_id: str, done: bool, *, as_json: bool) -> None:
    if as_json:
        _print_json({"task_id": task_id, "cancelled": done})
    elif done:
        print(f"cancelled {task_id}", flush=True)
    else:
        print(
            f"not cancelled: task {task_id} is running at a worker (asked to stop; its result "
            "says how it ended), has finished, or is unknown",
            file=sys.stderr,
            flush=True,
        )


def _part(stats: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    part = stats.get(name)
    return part if isinstance(part, Mapping) and "error" not in part else {}


def rates(first: Mapping[str, Any], second: Mapping[str, Any], elapsed: float) -> dict[str, Any]:
    """Per-second changes of the scheduler's counters between two samples."""
    a, b = _part(first, "scheduler"), _part(second, "scheduler")
    per_second: dict[str, Any] = {"interval": round(elapsed, 3)}
    for key in RATE_COUNTERS:
        if isinstance(a.get(key), int) and isinstance(b.get(key), int) and elapsed > 0:
            per_second[key] = round((b[key] - a[key]) / elapsed, 1)
        else:
            per_second[key] = None
    return per_second


def _n(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "?"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}" if value != int(value) else f"{int(value):,}"
    return "?"


def _bytes(value: object) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _worker_rows(stats: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    listing = _part(stats, "discovery").get("workers")
    if not isinstance(listing, Mapping):
        return [], None
    if "omitted" in listing:
        return [], str(listing["omitted"])
    rows = []
    for worker_id, info in sorted(listing.items()):
        info = info if isinstance(info, Mapping) else {}
        rows.append(
            {
                "worker_id": worker_id,
                "hostname": info.get("hostname"),
                "pid": info.get("pid"),
                "concurrency": info.get("concurrency"),
                "tasks": list(info.get("tasks") or []),
            }
        )
    return rows, None


def _table(lines: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in lines)


def status(
    address: str, stats: Mapping[str, Any], per_second: Mapping[str, Any] | None, *, as_json: bool
) -> None:
    if as_json:
        _print_json({"discovery_address": address, "rates": per_second, "stats": stats})
        return
    sched = _part(stats, "scheduler")
    discovery = _part(stats, "discovery")
    cache = _part(stats, "result-cache")
    callbacks = _part(stats, "callbacks")
    rows, omitted = _worker_rows(stats)
    slots = sum(r["concurrency"] for r in rows if isinstance(r["concurrency"], int))
    queued = sched.get("queued")
    if not isinstance(queued, Mapping):
        queued = {}
    lines = [
        ("control plane", address),
        (
            "workers",
            f"{_n(discovery.get('workers_alive'))} alive, "
            f"{_n(sched.get('workers_connected'))} connected, "
            + (omitted if omitted else f"{slots:,} slots")
            + f"; {_n(discovery.get('workers_lost'))} lost",
        ),
        (
            "queued",
            f"{_n(sched.get('queued_total'))} ("
            + ", ".join(f"{p} {_n(queued.get(p))}" for p in ("critical", "high", "normal", "low"))
            + f"); scheduled {_n(sched.get('scheduled'))}",
        ),
        ("in flight", _n(sched.get("running"))),
        (
            "held",
            f"{_n(sched.get('held'))} of {_n(sched.get('max_queued'))} tasks, "
            f"{_bytes(sched.get('held_bytes'))} of {_bytes(sched.get('max_queued_bytes'))}",
        ),
        (
            "finished",
            f"succeeded {_n(sched.get('succeeded'))}, failed {_n(sched.get('failed'))}, "
            f"cancelled {_n(sched.get('cancelled'))}; retried {_n(sched.get('retried'))}, "
            f"requeued {_n(sched.get('requeued'))}",
        ),
    ]
    if per_second is not None:
        lines.append(
            (
                "rates",
                ", ".join(f"{key} {_n(per_second.get(key))}/s" for key in RATE_COUNTERS)
                + f" (over {per_second['interval']:.1f} s)",
            )
        )
    lines += [
        (
            "result cache",
            f"{_n(cache.get('size'))} of {_n(cache.get('max_size'))} "
            f"(ttl {_n(cache.get('ttl'))} s): hits {_n(cache.get('hits'))}, "
            f"misses {_n(cache.get('misses'))}, expired {_n(cache.get('expired'))}, "
            f"evicted {_n(cache.get('evicted'))}",
        ),
        (
            "callbacks",
            f"sent {_n(callbacks.get('handed_to_zmq'))}, "
            f"acknowledged {_n(callbacks.get('acknowledged'))}, "
            f"resent {_n(callbacks.get('resent'))}, dropped {_n(callbacks.get('dropped'))}",
        ),
    ]
    rejected = stats.get("rejected")
    if isinstance(rejected, Mapping) and rejected:
        lines.append(("rejected", ", ".join(f"{k} {_n(v)}" for k, v in sorted(rejected.items()))))
    missing = [
        name for name, part in stats.items() if isinstance(part, Mapping) and "error" in part
    ]
    if missing:
        lines.append(("unanswered", ", ".join(sorted(missing))))
    print(_table(lines), flush=True)


def workers(stats: Mapping[str, Any], *, as_json: bool) -> None:
    rows, omitted = _worker_rows(stats)
    if as_json:
        doc: dict[str, Any] = {"workers": rows}
        if omitted:
            doc["omitted"] = omitted
        _print_json(doc)
        return
    if omitted:
        print(f"workers not listed: {omitted}", flush=True)
        return
    if not rows:
        print("no workers", flush=True)
        return
    header = ("WORKER", "HOST", "PID", "CONCURRENCY", "TASKS")
    cells = [header]
    for row in rows:
        tasks = ", ".join(row["tasks"])
        if len(tasks) > _TASKS_COLUMN:
            tasks = tasks[: _TASKS_COLUMN - 1] + f"… ({len(row['tasks'])} tasks)"
        cells.append(
            (
                str(row["worker_id"]),
                str(row["hostname"] if row["hostname"] is not None else "?"),
                _n(row["pid"]).replace(",", ""),
                _n(row["concurrency"]),
                tasks,
            )
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(header) - 1)]
    for line in cells:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
            + "  "
            + line[-1],
            flush=True,
        )
