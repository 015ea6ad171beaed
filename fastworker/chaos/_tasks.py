"""The tasks a chaos campaign runs, served by its worker nodes (``--task-modules``).

Every task takes a campaign-unique ``key`` first and records each run *as it
starts* by appending ``"<key> <name> <pid> <epoch>"`` to the run log named by
``FASTWORKER_CHAOS_RUNLOG``: an ``O_APPEND`` write of a line this short is
atomic, so lines of concurrent workers never interleave, and the line is on
disk before the run can be killed.  The checker counts runs per key from it.

Every successful value is a pure function of the arguments (``expected_*``
below), so the checker can tell a right result from a wrong or crossed one.
"""

from __future__ import annotations

import asyncio
import os
import time

import trio

from ..tasks.registry import task

__all__ = [
    "AIO",
    "BLOCK",
    "CRASH",
    "FAIL",
    "FLAKY",
    "LARGE",
    "MODULE",
    "OK",
    "RUNLOG_ENV",
    "SLEEPY",
    "STUCK",
    "ChaosFailure",
    "expected_large",
    "expected_ok",
]

MODULE = __name__
RUNLOG_ENV = "FASTWORKER_CHAOS_RUNLOG"

OK = "chaos.ok"
AIO = "chaos.aio"
FAIL = "chaos.fail"
FLAKY = "chaos.flaky"
SLEEPY = "chaos.sleepy"
BLOCK = "chaos.block"
STUCK = "chaos.stuck"
LARGE = "chaos.large"
CRASH = "chaos.crash"


class ChaosFailure(Exception):
    """What the failing tasks raise: its name in a result's error proves the task itself failed."""


def _runlog() -> str:
    path = os.environ.get(RUNLOG_ENV)
    if not path:
        raise RuntimeError(f"{RUNLOG_ENV} is not set: chaos tasks run only under a campaign")
    return path


def _record(key: str, name: str) -> None:
    line = f"{key} {name} {os.getpid()} {time.time():.3f}\n".encode()
    fd = os.open(_runlog(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _runs_of(key: str) -> int:
    """How many runs of ``key`` the log holds (this one included)."""
    prefix = f"{key} ".encode()
    with open(_runlog(), "rb") as log:
        return sum(1 for line in log if line.startswith(prefix))


def expected_ok(key: str, a: int, b: int) -> dict[str, object]:
    return {"key": key, "v": a * 7 + b}


def expected_large(key: str, size: int) -> str:
    unit = f"{key};"
    return (unit * (size // len(unit) + 1))[:size]


@task(name=OK)
def ok(key: str, a: int, b: int) -> dict[str, object]:
    """A plain function in a worker thread: the ordinary case."""
    _record(key, OK)
    return expected_ok(key, a, b)


@task(name=AIO)
async def aio(key: str, a: int, b: int, seconds: float) -> dict[str, object]:
    """An asyncio coroutine on the worker's asyncio loop."""
    _record(key, AIO)
    await asyncio.sleep(seconds)
    return expected_ok(key, a, b)


@task(name=FAIL)
def fail(key: str) -> None:
    """Always raises; never retried unless the call asks for it."""
    _record(key, FAIL)
    raise ChaosFailure(f"{key} failed on purpose")


@task(name=FLAKY, retry_delay=0.2, retry_backoff=1.0)
def flaky(key: str, failures: int) -> dict[str, object]:
    """Raises on its first ``failures`` runs, then succeeds (the call gives max_retries)."""
    _record(key, FLAKY)
    if _runs_of(key) <= failures:
        raise ChaosFailure(f"{key} fails before its retry")
    return expected_ok(key, failures, 0)


@task(name=SLEEPY, loop="trio")
async def sleepy(key: str, seconds: float) -> dict[str, object]:
    """A trio coroutine: cancelled cleanly at its time limit when ``seconds`` exceeds it."""
    _record(key, SLEEPY)
    await trio.sleep(seconds)
    return expected_ok(key, 0, 0)


@task(name=BLOCK)
def block(key: str, seconds: float) -> dict[str, object]:
    """Holds a worker thread for ``seconds``."""
    _record(key, BLOCK)
    time.sleep(seconds)
    return expected_ok(key, 1, 1)


@task(name=STUCK)
def stuck(key: str, seconds: float) -> dict[str, object]:
    """A thread past its time limit: cannot be interrupted, so its worker process recycles."""
    _record(key, STUCK)
    time.sleep(seconds)
    return expected_ok(key, 2, 2)


@task(name=LARGE)
def large(key: str, size: int) -> str:
    """A result of ``size`` characters."""
    _record(key, LARGE)
    return expected_large(key, size)


@task(name=CRASH)
def crash(key: str) -> None:
    """Kills its worker process: the poison guard must end it FAILURE after a few deaths."""
    _record(key, CRASH)
    os._exit(3)
