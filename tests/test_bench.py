"""``python -m fastworker.bench``: smoke runs of the real command, and its pure parts.

These tests never assert a speed: machines differ and CI is noisy.  They
check that each scenario runs end to end (real node processes, the
documented Client), reports the documented keys with sane values, exits 0,
and leaves no process behind, including when it is interrupted.

Every bench started here carries a unique marker in its environment, which
the node and worker processes inherit: scanning ``/proc/*/environ`` for it
finds every process of that run, whatever pid it had, so a test can assert
that none survives (and kills any that does, so a failure never leaks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from multiprocess import REPO_ROOT, node_env

from fastworker.bench import build_parser
from fastworker.bench._cpu import read_cpu_seconds
from fastworker.bench._measure import percentile
from fastworker.bench._options import Options
from fastworker.bench._report import combine_runs, failed_tasks, render_json, render_table
from fastworker.bench._rss import read_rss

MARKER = "FASTWORKER_BENCH_TEST_RUN"
HAS_PROC = Path("/proc/self/status").exists()


@pytest.fixture(autouse=True)
def _soak_only_when_asked(request: pytest.FixtureRequest) -> None:
    """``@pytest.mark.soak`` tests run only under ``-m soak`` (as setup.cfg documents)."""
    if request.node.get_closest_marker("soak") and "soak" not in (
        request.config.getoption("markexpr") or ""
    ):
        pytest.skip("soak test: run with -m soak")


# -- running the command ---------------------------------------------------------


def processes_marked(marker: str) -> list[int]:
    """Pids of running processes whose environment holds ``marker`` (zombies excluded)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every process of a run; the pids that were still there."""
    survivors = processes_marked(marker)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


@pytest.fixture
def marker() -> Iterator[str]:
    """A fresh marker; whatever still carries it at teardown is killed (and fails the test)."""
    value = uuid.uuid4().hex
    yield value
    if HAS_PROC:
        leaked = kill_marked(value)
        assert not leaked, f"processes of the bench outlived it: {leaked}"


def bench_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastworker.bench", *args]


def bench_env(marker: str) -> dict[str, str]:
    return node_env(**{MARKER: marker})


def run_bench(marker: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the bench to its end; on a timeout it is killed (and ``marker`` cleans up its nodes)."""
    return subprocess.run(
        bench_command(*args),
        cwd=REPO_ROOT,
        env=bench_env(marker),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def json_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    report: dict[str, Any] = json.loads(last)
    return report


def assert_all_gone(marker: str, report: dict[str, Any]) -> None:
    if not HAS_PROC:
        return
    assert processes_marked(marker) == []
    pids = report["meta"]["pids"]
    assert pids, "the bench reports the processes it measured"
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


def assert_rss(value: Any) -> None:
    """A memory figure: MiB on Linux (a Python process is more than 1 MiB), else null."""
    if HAS_PROC:
        assert isinstance(value, (int, float))
        assert value > 1
    else:
        assert value is None


def assert_stream(figures: dict[str, Any], tasks: int) -> None:
    assert figures["tasks"] == tasks
    assert figures["seconds"] > 0
    assert figures["tasks_per_s"] > 0
    assert figures["failed"] == 0
    assert_rss(figures["cp_rss_mb"])
    assert_rss(figures["worker_rss_mb"])
    if HAS_PROC:  # in clock ticks (10 ms): a run this short may not use a whole one
        assert figures["cp_cpu_us_per_task"] >= 0
    else:
        assert figures["cp_cpu_us_per_task"] is None


# -- smoke runs ----------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_throughput_batch_and_latency_report_the_documented_keys(marker: str) -> None:
    result = run_bench(
        marker,
        *("--tasks", "1000", "--scenarios", "throughput", "batch", "latency"),
        *("--latency-count", "50", "--batch-size", "300", "--json"),
        timeout=60,
    )
    report = json_report(result)
    assert set(report) == {"meta", "idle", "throughput", "batch", "latency"}
    assert_stream(report["throughput"], 1000)
    assert_stream(report["batch"], 1000)
    latency = report["latency"]
    assert latency["tasks"] == 50
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    assert_rss(latency["cp_rss_mb"])
    assert_rss(report["idle"]["cp_rss_mb"])
    assert report["meta"]["runs"] == 1
    assert "runs" not in report["throughput"]
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_curve_runs_the_shared_scenarios_again_on_a_curve_node_and_times_both_handshakes(
    marker: str,
) -> None:
    result = run_bench(
        marker,
        *("--tasks", "500", "--scenarios", "throughput", "latency", "--curve"),
        *("--latency-count", "30", "--json"),
        timeout=60,
    )
    report = json_report(result)
    assert set(report) == {"meta", "idle", "throughput", "latency", "handshake", "curve"}
    curve = report["curve"]
    assert set(curve) == {"idle", "throughput", "latency", "handshake"}
    assert_stream(curve["throughput"], 500)
    assert curve["latency"]["tasks"] == 30
    for handshake in (report["handshake"], curve["handshake"]):
        assert 0 < handshake["p50_ms"] <= handshake["max_ms"]
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_journal_runs_the_shared_scenarios_again_on_a_journaled_node_and_times_a_recovery(
    marker: str,
) -> None:
    result = run_bench(
        marker,
        *("--journal", "--tasks", "500", "--scenarios", "throughput", "latency"),
        *("--latency-count", "20", "--backlog-tasks", "1000", "--json"),
        timeout=75,
    )
    report = json_report(result)
    assert set(report) == {"meta", "idle", "throughput", "latency", "journal", "journal recovery"}
    journal = report["journal"]
    assert set(journal) == {"idle", "throughput", "latency"}
    assert_stream(journal["throughput"], 500)
    assert journal["latency"]["tasks"] == 20
    recovery = report["journal recovery"]
    assert recovery["recovered_tasks"] == recovery["tasks"] == 1000
    assert recovery["journal_per_task_bytes"] > 0
    assert 0 < recovery["read_seconds"] < recovery["recovery_seconds"]
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_http_serves_the_dashboard_from_its_node_and_reads_it(marker: str) -> None:
    result = run_bench(
        marker, "--http", "--scenarios", "throughput", "--tasks", "300", "--json", timeout=45
    )
    report = json_report(result)
    assert_stream(report["throughput"], 300)  # without, then the same on the http node
    assert_stream(report["http"]["throughput"], 300)
    http = report["meta"]["http"]
    assert http["scrapes"] >= 2  # /metrics and /api/overview at least once
    assert http["failed_scrapes"] == 0
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_backlog_weighs_the_queue_then_drains_it(marker: str) -> None:
    report = json_report(
        run_bench(marker, "--scenarios", "backlog", "--backlog-tasks", "2000", "--json", timeout=45)
    )
    backlog = report["backlog"]
    assert backlog["tasks"] == 2000
    assert_rss(backlog["cp_rss_mb"])
    assert_rss(backlog["cp_idle_rss_mb"])
    if HAS_PROC:
        assert isinstance(backlog["rss_per_task_bytes"], int)
    assert backlog["queue_tasks_per_s"] > 0
    assert 0 < backlog["drain_tasks"] <= 2000
    assert backlog["drain_tasks_per_s"] > 0
    assert backlog["failed"] == 0
    assert "idle" not in report  # no shared node was needed
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_workers_runs_one_fresh_node_per_count_and_prints_a_table(marker: str) -> None:
    result = run_bench(
        marker, "--scenarios", "workers", "--tasks", "300", "--worker-counts", "1", "2", timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fastworker bench: 300 tasks")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("workers=")}
    assert set(rows) == {"workers=1", "workers=2"}
    assert rows["workers=2"][1] == "300"
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])  # without --json: the table only
    if HAS_PROC:
        assert processes_marked(marker) == []


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_floor_times_the_bare_transport_in_both_variants_and_stops_its_processes(
    marker: str,
) -> None:
    report = json_report(
        run_bench(marker, "--scenarios", "floor", "--latency-count", "50", "--json", timeout=45)
    )
    assert set(report) == {"meta", "floor"}  # no node was needed
    floor = report["floor"]
    assert floor["round_trips"] == 50
    for prefix in ("", "thread_"):
        assert floor[f"{prefix}seconds"] > 0
        assert 0 < floor[f"{prefix}p50_ms"] <= floor[f"{prefix}p99_ms"] <= floor[f"{prefix}max_ms"]
        assert floor[f"{prefix}mean_ms"] > 0
    assert len(report["meta"]["pids"]) == 3  # the relay, the echo and the client
    assert_all_gone(marker, report)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
@pytest.mark.skipif(not HAS_PROC, reason="finds the node processes through /proc")
def test_ctrl_c_stops_every_node_and_exits_130(marker: str) -> None:
    proc = subprocess.Popen(
        bench_command("--tasks", "10000000", "--scenarios", "throughput"),
        cwd=REPO_ROOT,
        env=bench_env(marker),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        # The bench, its node and the node's worker process: the run is under way.
        while len(processes_marked(marker)) < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the node did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in stderr
    assert stdout == ""
    assert processes_marked(marker) == []


@pytest.mark.multiprocess
@pytest.mark.soak
@pytest.mark.timeout(600)
def test_every_scenario_three_times_reports_each_run_and_the_median(marker: str) -> None:
    result = run_bench(
        marker,
        *("--tasks", "20000", "--backlog-tasks", "100000", "--runs", "3", "--json"),
        timeout=540,
    )
    report = json_report(result)
    for name in ("throughput", "batch"):
        runs = report[name]["runs"]
        assert len(runs) == 3
        rates = sorted(run["tasks_per_s"] for run in runs)
        assert abs(report[name]["tasks_per_s"] - rates[1]) <= 1  # the median (rounded)
    assert len(report["latency"]["runs"]) == 3
    assert len(report["backlog"]["runs"]) == 3
    assert set(report["workers"]) == {"1", "2", "4", "runs"}
    assert_all_gone(marker, report)


# -- arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--tasks", "0"],
        ["--runs", "zero"],
        ["--scenarios", "speed"],
        ["--format", "pickle"],
        ["--discovery-address", "127.0.0.1:5550"],
        ["--stall-timeout", "nan"],
    ],
)
def test_a_bad_argument_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults_are_the_documented_ones() -> None:
    args = build_parser().parse_args([])
    assert (args.tasks, args.workers, args.runs, args.backlog_tasks) == (100_000, 1, 1, 1_000_000)
    assert args.latency_count == 2000
    assert args.scenarios == ["throughput", "batch", "latency", "backlog", "workers"]
    assert Options().scenarios == tuple(args.scenarios)
    assert build_parser().parse_args(["--scenarios", "floor"]).scenarios == ["floor"]
    assert (args.format, args.json, args.discovery_address) == ("json", False, None)


# -- figures and report ----------------------------------------------------------------


def test_percentile_is_a_measured_value() -> None:
    values = sorted(float(i) for i in range(1, 101))
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


def test_several_runs_give_the_median_of_each_figure_and_keep_every_run() -> None:
    runs = [
        {"tasks": 10, "tasks_per_s": 300.0, "cp_rss_mb": None, "nested": {"1": {"x": 1.0}}},
        {"tasks": 10, "tasks_per_s": 100.0, "cp_rss_mb": None, "nested": {"1": {"x": 3.0}}},
        {"tasks": 10, "tasks_per_s": 200.0, "cp_rss_mb": None, "nested": {"1": {"x": 2.0}}},
    ]
    combined = combine_runs(runs)
    assert combined["tasks"] == 10
    assert combined["tasks_per_s"] == 200.0
    assert combined["cp_rss_mb"] is None
    assert combined["nested"] == {"1": {"x": 2.0}}
    assert combined["runs"] == runs
    assert combine_runs(runs[:1]) == runs[0]  # one run: no "runs" list


def test_the_json_line_is_rounded_and_failures_are_counted() -> None:
    results = {
        "meta": {"runs": 1},
        "throughput": {"tasks": 5, "seconds": 1.23456, "tasks_per_s": 4.0501, "failed": 2},
        "latency": {"p50_ms": 0.123456, "cp_rss_mb": 51.234},
    }
    line = render_json(results)
    assert "\n" not in line
    assert json.loads(line) == {
        "meta": {"runs": 1},
        "throughput": {"tasks": 5, "seconds": 1.235, "tasks_per_s": 4, "failed": 2},
        "latency": {"p50_ms": 0.123, "cp_rss_mb": 51.2},
    }
    assert failed_tasks(results) == 2


def test_the_table_has_a_row_per_phase_and_says_what_was_skipped() -> None:
    stream = {
        "tasks": 1000,
        "seconds": 0.5,
        "tasks_per_s": 2000.0,
        "cp_rss_mb": 40.0,
        "worker_rss_mb": None,
        "failed": 0,
    }
    results = {
        "meta": {},
        "idle": {"cp_rss_mb": 30.0, "worker_rss_mb": None},
        "throughput": stream,
        "latency": {
            "tasks": 10,
            "seconds": 0.01,
            "p50_ms": 0.5,
            "p99_ms": 2.0,
            "max_ms": 3.0,
            "cp_rss_mb": 40.0,
            "worker_rss_mb": 20.0,
        },
        "backlog": {"skipped": "not here"},
        "workers": combine_runs([{"1": stream}, {"1": stream}]),
        "floor": {
            "round_trips": 10,
            **{f"{p}seconds": 0.005 for p in ("", "thread_")},
            **{f"{p}{k}_ms": v for p in ("", "thread_") for k, v in (("p50", 0.4), ("p99", 2.0))},
            **{"max_ms": 3.0, "thread_max_ms": 4.0},
        },
    }
    table = render_table(Options(tasks=1000, runs=2), results)
    rows = {line.split()[0]: line for line in table.splitlines()[3:] if line}
    assert "2,000" in rows["throughput"]
    assert "n/a" in rows["throughput"]  # a memory figure that could not be read
    assert "p50 0.500 ms, p99 2.000 ms, max 3.000 ms" in rows["latency"]
    assert "skipped: not here" in rows["backlog"]
    assert "runs: 2,000 / 2,000" in rows["workers=1"]
    floor_rows = [line for line in table.splitlines() if line.startswith("floor ")]
    assert "p50 0.400 ms, p99 2.000 ms, max 3.000 ms" in floor_rows[0]
    assert floor_rows[1].startswith("floor thread")
    assert "max 4.000 ms" in floor_rows[1]
    assert "median of 2 runs" in table.splitlines()[0]


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc")
def test_rss_of_a_live_process_and_of_no_process() -> None:
    own = read_rss(os.getpid())
    assert own is not None
    assert own > 1024 * 1024
    assert read_rss(None) is None
    assert read_rss(2**22 + 12345) is None  # above the default pid_max: never a process


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc")
def test_cpu_seconds_of_a_live_process_and_of_no_process() -> None:
    before = read_cpu_seconds(os.getpid())
    assert before is not None
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # spend CPU, so the figure must grow
        pass
    after = read_cpu_seconds(os.getpid())
    assert after is not None
    assert after > before
    assert read_cpu_seconds(None) is None
    assert read_cpu_seconds(2**22 + 12345) is None


def test_latency_and_its_floor_are_measured_together_in_each_run_when_both_are_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio
    import types

    from fastworker.bench import _runner

    order: list[str] = []

    def runner(name: str) -> Any:
        async def run(ctx: Any) -> dict[str, Any]:
            order.append(name)
            return {"p50_ms": float(len(order))}

        return run

    async def together(ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        order.append("latency+floor")
        return {"p50_ms": float(len(order))}, {"p50_ms": float(len(order)) / 2}

    monkeypatch.setattr(_runner, "RUNNERS", {n: runner(n) for n in ("latency", "floor")})
    monkeypatch.setattr(_runner, "INTERLEAVED", {("latency", "floor"): together})
    ctx = types.SimpleNamespace(options=types.SimpleNamespace(runs=3), run_note="")
    results: dict[str, Any] = {}
    asyncio.run(_runner._run_each(ctx, ["latency"], results, ["latency", "floor"]))  # type: ignore[arg-type]
    assert order == ["latency+floor"] * 3
    assert [r["p50_ms"] for r in results["latency"]["runs"]] == [1.0, 2.0, 3.0]
    assert [r["p50_ms"] for r in results["floor"]["runs"]] == [0.5, 1.0, 1.5]
    order.clear()
    asyncio.run(_runner._run_each(ctx, ["latency"], {}, ["latency"]))  # type: ignore[arg-type]
    assert order == ["latency"] * 3  # no floor asked for: none run


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_latency_with_its_floor_interleaves_them_and_reports_both(marker: str) -> None:
    report = json_report(
        run_bench(
            marker,
            *("--scenarios", "latency", "floor", "--latency-count", "150", "--json"),
            timeout=75,
        )
    )
    assert set(report) == {"meta", "idle", "latency", "floor"}
    assert report["latency"]["tasks"] == 150
    assert 0 < report["latency"]["p50_ms"] <= report["latency"]["p99_ms"]
    floor = report["floor"]
    assert floor["round_trips"] == 150
    for prefix in ("", "thread_"):
        assert 0 < floor[f"{prefix}p50_ms"] <= floor[f"{prefix}p99_ms"] <= floor[f"{prefix}max_ms"]
    assert_all_gone(marker, report)  # the node, its worker and the floor's three processes
