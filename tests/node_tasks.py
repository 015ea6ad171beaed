"""Tasks for the multi-process node tests (``--task-modules tests.node_tasks``).

Imported by worker processes started with the repository root as their
working directory, where ``tests`` is a namespace package.
"""

from __future__ import annotations

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
