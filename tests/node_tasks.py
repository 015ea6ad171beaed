"""Tasks for the multi-process node tests (``--task-modules tests.node_tasks``).

Imported by worker processes started with the repository root as their
working directory, where ``tests`` is a namespace package.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fastworker import task


@task
def add_where(a: int, b: int) -> list[int]:
    """The sum and the pid of the worker process that computed it."""
    return [a + b, os.getpid()]


@task
def sleepy(seconds: float, marker_dir: str | None = None, tag: str = "") -> list[object]:
    """Announce the start (a file in ``marker_dir``), sleep in a thread, return [tag, pid]."""
    if marker_dir is not None:
        Path(marker_dir, f"{tag or 'task'}-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds)
    return [tag, os.getpid()]


class BadStr(Exception):
    """An exception whose text cannot be had: ``str()`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("str exploded")


def _announce_run(marker_dir: str, name: str) -> None:
    Path(marker_dir, f"{name}-{os.getpid()}-{time.monotonic_ns()}").touch()


@task
def bad_str_thread(marker_dir: str) -> None:
    """Raise BadStr in a thread (announcing the run in ``marker_dir``)."""
    _announce_run(marker_dir, "bad_str_thread")
    raise BadStr()


@task(loop="asyncio")
async def bad_str_asyncio(marker_dir: str) -> None:
    import asyncio  # here: this module is appended to, its imports left alone

    _announce_run(marker_dir, "bad_str_asyncio")
    await asyncio.sleep(0)
    raise BadStr()


@task(loop="trio")
async def bad_str_trio(marker_dir: str) -> None:
    import trio

    _announce_run(marker_dir, "bad_str_trio")
    await trio.lowlevel.checkpoint()
    raise BadStr()


@task
def always_fail(marker_dir: str) -> None:
    """Fail every run; each run leaves a file in ``marker_dir``."""
    _announce_run(marker_dir, "always_fail")
    raise RuntimeError("always fails")


@task(loop="asyncio")
async def blocks_its_loop(seconds: float) -> int:
    """A blocking call in async code: the worker's asyncio loop stops for ``seconds``."""
    time.sleep(seconds)  # noqa: ASYNC251 - the fault under test
    return os.getpid()


@task(loop="trio")
async def never_cancels() -> None:
    """A trio task that swallows every cancellation: it can be abandoned, never stopped."""
    import trio

    while True:
        try:
            await trio.sleep(0.05)
        except trio.Cancelled:  # the misbehaviour under test
            pass


@task
def text_of(size: int) -> str:
    """A string of ``size`` bytes: a result too large for the node's message limit."""
    return "x" * size


@task
def logs(message: str) -> None:
    """Log ``message`` at WARNING from task code, as users' tasks do."""
    logging.getLogger("tests.node_tasks").warning("%s", message)


@task(loop="asyncio")
async def logs_asyncio(message: str) -> None:
    import asyncio

    await asyncio.sleep(0)
    logging.getLogger("tests.node_tasks").warning("%s", message)


@task(loop="trio")
async def logs_trio(message: str) -> None:
    import trio

    await trio.lowlevel.checkpoint()
    logging.getLogger("tests.node_tasks").warning("%s", message)
