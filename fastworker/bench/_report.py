"""Turning figures into what the user reads: medians of runs, rounding, the table, the JSON line.

Medians are taken on raw figures, leaf by leaf (a worker-count scenario
nests one dict per count), and rounding happens only here, once, by the
kind of figure its key names.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from typing import Any

from ._options import INTERLEAVE_BLOCK, Options

__all__ = ["combine_runs", "failed_tasks", "render_json", "render_table", "tidy"]

Figures = dict[str, Any]


def _median(values: list[Any]) -> Any:
    if all(isinstance(v, dict) for v in values):
        return {key: _median([v.get(key) for v in values]) for key in values[0]}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    return values[0] if all(v == values[0] for v in values) else None


def combine_runs(runs: Sequence[Figures]) -> Figures:
    """One run as is; several as the median of each figure plus ``runs`` with each one."""
    if len(runs) == 1:
        return dict(runs[0])
    combined: Figures = _median(list(runs))
    combined["runs"] = list(runs)
    return combined


def _round(key: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _round(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(key, v) for v in value]
    if not isinstance(value, float):
        return value
    if key.endswith("_ms"):
        return round(value, 3)
    if key.endswith("_mb") or key.endswith("seconds"):
        return round(value, 3 if key.endswith("seconds") else 1)
    if key.endswith("_per_s") or key.endswith("_bytes") or key in ("tasks", "drain_tasks"):
        return round(value)
    return round(value, 3)


def tidy(results: Figures) -> Figures:
    """Every float rounded for reading (ms to µs, MB to 0.1, rates and bytes to units)."""
    return {key: _round(key, value) for key, value in results.items()}


def failed_tasks(results: Figures) -> int:
    """Tasks that ended in FAILURE anywhere in the results (then no figure is trustworthy)."""
    total = 0
    for key, value in results.items():
        if key == "failed" and isinstance(value, (int, float)):
            total += int(value)
        elif isinstance(value, dict) and key != "meta":
            total += failed_tasks(value)
    return total


def render_json(results: Figures) -> str:
    """The one-line JSON object (the last line of stdout with ``--json``)."""
    return json.dumps(tidy(results), separators=(", ", ": "))


# -- the table -----------------------------------------------------------------

_COLUMNS = ("scenario", "tasks", "seconds", "tasks/s", "cp MB", "worker MB", "")


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{round(value):,}"


def _mb(value: Any) -> str:
    return "n/a" if value is None else f"{value:,.1f} MB"


def _runs_note(figures: Figures, key: str) -> str:
    runs = figures.get("runs")
    if not runs:
        return ""
    return "runs: " + " / ".join(_num(run.get(key)) for run in runs)


def _stream_row(label: str, f: Figures, note: str = "") -> list[str]:
    return [
        label,
        _num(f["tasks"]),
        _num(f["seconds"], 3),
        _num(f["tasks_per_s"]),
        _num(f["cp_rss_mb"], 1),
        _num(f["worker_rss_mb"], 1),
        note or _runs_note(f, "tasks_per_s"),
    ]


def _spread_note(f: Figures, prefix: str = "") -> str:
    p50, p99, top = (f[f"{prefix}{key}_ms"] for key in ("p50", "p99", "max"))
    return f"p50 {p50:.3f} ms, p99 {p99:.3f} ms, max {top:.3f} ms"


def _floor_row(label: str, f: Figures, prefix: str) -> list[str]:
    """Round trips in the task columns; no fastworker process, so no memory to show."""
    n, seconds = f["round_trips"], f[f"{prefix}seconds"]
    return [label, _num(n), _num(seconds, 3), _num(n / seconds), "-", "-", _spread_note(f, prefix)]


def _rows(name: str, f: Figures) -> list[list[str]]:
    if "skipped" in f:
        return [[name, "", "", "", "", "", f"skipped: {f['skipped']}"]]
    if name in ("throughput", "batch"):
        return [_stream_row(name, f)]
    if name == "latency":
        rate = {**f, "tasks_per_s": f["tasks"] / f["seconds"]}
        return [_stream_row(name, rate, _spread_note(f))]
    if name == "journal recovery":
        n = f["tasks"]
        return [
            [
                "journal queue",
                _num(n),
                _num(f["queue_seconds"], 3),
                _num(f["queue_tasks_per_s"]),
                "",
                "-",
                f"{_num(f['journal_per_task_bytes'])} B/task on disk ({_mb(f['journal_mb'])})",
            ],
            [
                "journal recovery",
                _num(f["recovered_tasks"]),
                _num(f["recovery_seconds"], 3),
                _num(f["recovered_tasks"] / f["recovery_seconds"]),
                _num(f["cp_rss_mb"], 1),
                "-",
                f"kill -9, then start to ready; the file read in {f['read_seconds']:.3f} s",
            ],
        ]
    if name == "floor":
        return [_floor_row("floor", f, ""), _floor_row("floor thread", f, "thread_")]
    if name == "backlog":
        per_task = f["rss_per_task_bytes"]
        idle = f["cp_idle_rss_mb"]
        queue_note = (
            f"{_num(per_task)} B/task over idle {_mb(idle)}"
            if per_task is not None
            else "RSS not readable here"
        )
        queue = [
            "backlog queue",
            _num(f["tasks"]),
            _num(f["queue_seconds"], 3),
            _num(f["queue_tasks_per_s"]),
            _num(f["cp_rss_mb"], 1),
            "-",
            queue_note,
        ]
        drain = [
            "backlog drain",
            _num(f["drain_tasks"]),
            _num(f["drain_seconds"], 3),
            _num(f["drain_tasks_per_s"]),
            "",
            _num(f["worker_rss_mb"], 1),
            _runs_note(f, "drain_tasks_per_s") or "1 worker process",
        ]
        return [queue, drain]
    if name == "workers":
        rows = []
        for count, figures in f.items():
            if count == "runs":
                continue
            per_run = [run[count] for run in f.get("runs", [])]
            note = "runs: " + " / ".join(_num(r["tasks_per_s"]) for r in per_run) if per_run else ""
            rows.append(_stream_row(f"workers={count}", figures, note))
        return rows
    return []


def _header(options: Options, results: Figures) -> list[str]:
    where = (
        f"existing cluster at {options.discovery_address}"
        if options.discovery_address
        else f"{options.workers} worker process{'es' if options.workers != 1 else ''}"
    )
    runs = f"median of {options.runs} runs" if options.runs > 1 else "1 run"
    payload = f"payload {options.payload_bytes:,} B" if options.payload_bytes else "no payload"
    lines = [
        f"fastworker bench: {options.tasks:,} tasks, {where}, concurrency "
        f"{options.concurrency}, {options.serialization_format}, {payload}, {runs}"
    ]
    idle = results.get("idle")
    if idle:
        lines.append(
            f"idle RSS (before any task): control plane {_mb(idle['cp_rss_mb'])}, "
            f"largest worker {_mb(idle['worker_rss_mb'])}"
        )
    return lines


_VARIANTS = {"curve": "CURVE", "journal": "journal", "http": "http"}


def render_table(options: Options, results: Figures) -> str:
    """The human-readable report: a header, then one row per measured phase."""
    rows = [list(_COLUMNS)]
    for name, figures in results.items():
        if name in _VARIANTS:  # the same scenarios on another node: labelled rows
            for inner, inner_figures in figures.items():
                for row in _rows(inner, inner_figures):
                    rows.append([f"{row[0]} ({_VARIANTS[name]})", *row[1:]])
        elif name not in ("meta", "idle", "handshake"):
            rows.extend(_rows(name, figures))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [*_header(options, results), ""]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    lines.append("")
    if "curve" in results:
        plain, curve = results.get("handshake"), results["curve"].get("handshake")
        if plain and curve:
            lines.append(
                f"handshake (connect to ready): plain p50 {plain['p50_ms']:.2f} ms, "
                f"CURVE p50 {curve['p50_ms']:.2f} ms (max {curve['max_ms']:.2f} ms)"
            )
    lines.append("MB = MiB of resident memory (VmRSS), peak sampled every 100 ms; n/a: not visible")
    if "floor" in results:
        lines.append(_FLOOR_NOTE)
    return "\n".join(lines)


_FLOOR_NOTE = (
    "floor = the latency path's 3 processes and 4 socket hops on bare pyzmq + trio, no\n"
    "fastworker code: round trips client -> relay -> echo -> relay -> client on loopback;\n"
    "floor thread: the echo answers through trio.to_thread.run_sync, a thread hop like a\n"
    "worker's for a plain-function task; run with latency, the two alternate in blocks\n"
    f"of {INTERLEAVE_BLOCK} round trips"
)
