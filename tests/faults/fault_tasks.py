"""Tasks for the fault suite (``--task-modules fault_tasks``, node cwd ``tests/faults``).

Tasks that must be counted record each run *as it starts* (``work`` also as
it ends, ``done:<n>``) by appending one line to ``<log_dir>/<pid>.log``: an
``O_APPEND`` write of a short line is atomic, so the lines of concurrent
threads never interleave, and a line is on disk before the process can be
killed in the middle of the run.  The test then counts executions per task
(duplicates) and which process started and finished what.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import trio

from fastworker import task


def _mark(path: str) -> None:
    Path(path).write_text(f"cancelled {time.time()}")


def record(log_dir: str, line: str) -> None:
    """Append ``line`` to this process's log in ``log_dir`` (atomic, survives kill -9)."""
    path = os.path.join(log_dir, f"{os.getpid()}.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


@task
def work(n: int, seconds: float, log_dir: str) -> list[int]:
    """Record the start, sleep ``seconds`` in a thread, record the end, return ``[2 * n, pid]``."""
    record(log_dir, str(n))
    time.sleep(seconds)
    record(log_dir, f"done:{n}")
    return [2 * n, os.getpid()]


@task
def blob_len(blob: str, seconds: float = 0.0) -> int:
    """A task with a big argument (memory tests): sleeps ``seconds``, returns the length."""
    time.sleep(seconds)
    return len(blob)


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def where() -> int:
    """The pid of the worker process that ran it."""
    return os.getpid()


@task
def poison() -> None:
    """Kills its worker process every time it runs."""
    os._exit(1)


@task
def started_at() -> float:
    """The wall-clock time at which it started."""
    return time.time()


@task(timeout=0.5)
def overrun(seconds: float) -> str:
    """A thread task past its 0.5 s limit: it cannot be interrupted."""
    time.sleep(seconds)
    return "finished"


@task(timeout=0.5, loop="asyncio")
async def overrun_asyncio(seconds: float, marker: str) -> str:
    """An asyncio task past its 0.5 s limit; writes ``marker`` when it is cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _mark(marker)
        raise
    return "finished"


@task(timeout=0.5, loop="trio")
async def overrun_trio(seconds: float, marker: str) -> str:
    """A trio task past its 0.5 s limit; writes ``marker`` when it is cancelled."""
    try:
        await trio.sleep(seconds)
    except trio.Cancelled:
        _mark(marker)
        raise
    return "finished"


@task(max_retries=2, retry_delay=0.1)
def flaky(log_dir: str, failures: int) -> int:
    """Fails its first ``failures`` runs, then returns the attempt number (counted in a file)."""
    path = Path(log_dir, "flaky.log")
    with path.open("a") as f:
        f.write(f"{time.time()}\n")
    attempt = len(path.read_text().splitlines())
    if attempt <= failures:
        raise RuntimeError(f"failure on attempt {attempt}")
    return attempt


@task(max_retries=2, retry_delay=0.1)
def always_fails(log_dir: str) -> None:
    """Fails every run; records each run's start time."""
    with Path(log_dir, "always.log").open("a") as f:
        f.write(f"{time.time()}\n")
    raise RuntimeError("always fails")


@task(max_retries=3, retry_delay=0.05)
def slow_fail(log_dir: str, seconds: float) -> None:
    """Records its start, sleeps ``seconds`` in a thread, then fails (and retries)."""
    record(log_dir, "slow_fail")
    time.sleep(seconds)
    raise RuntimeError("slow failure")
