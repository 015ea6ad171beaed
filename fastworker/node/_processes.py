"""Supervision of worker processes: start them, restart the ones that die, stop them gracefully.

A worker process can die in ways no code inside it can catch (``kill -9``,
``os._exit``, a segfault in an extension).  Its in-flight tasks are the
control plane's business (Discovery notices the silence and the Scheduler
requeues them); restarting the process is ours.  Restarts back off from
0.1 s up to 5 s while a process keeps dying young, so a crash loop costs
little, and never give up: a node without workers serves nobody.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence

import trio

__all__ = ["RECYCLE_EXIT_CODE", "WorkerProcesses"]

log = logging.getLogger("fastworker.node")

RECYCLE_EXIT_CODE = 75  # a worker asks to be replaced (a thread is stuck in user code)
_MAX_BACKOFF = 5.0
_HEALTHY_AFTER = 30.0  # seconds of life after which a process counts as healthy again


class WorkerProcesses:
    """Runs ``count`` copies of a worker command and keeps them running."""

    def __init__(
        self, count: int, argv: Sequence[str], grace: float, env: Mapping[str, str] | None = None
    ) -> None:
        """``env``: entries added to the processes' environment (their CURVE keys)."""
        self.count = count
        self.argv = list(argv)
        self.env = {**os.environ, **env} if env else None
        self.grace = grace
        self.processes: dict[int, trio.Process] = {}  # slot → process
        self.restarts = 0
        self._stopping = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for slot in range(self.count):
                nursery.start_soon(self._keep_running, slot)
            task_status.started()

    async def _keep_running(self, slot: int) -> None:
        backoff = 0.1
        while not self._stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "fastworker.node", *self.argv],
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
            self.processes[slot] = process
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:
                    # We are being cancelled: never leave an orphan behind.
                    _kill(process)
                    with trio.CancelScope(shield=True):
                        await process.wait()
            if self._stopping:
                return
            if code == RECYCLE_EXIT_CODE:
                log.info("worker process %d recycled itself; starting a fresh one", process.pid)
                backoff = 0.1
                continue
            self.restarts += 1
            lived = trio.current_time() - started
            if lived > _HEALTHY_AFTER:
                backoff = 0.1
            log.warning(
                "worker process %d exited with %s after %.1f s; restarting in %.1f s",
                process.pid,
                _describe_exit(code),
                lived,
                backoff,
            )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def stop(self) -> None:
        """SIGTERM every worker (they drain), wait up to ``grace`` + 5 s, then SIGKILL."""
        self._stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(self.grace + 5.0):
            for process in self.processes.values():
                await process.wait()
        for process in self.processes.values():
            if process.returncode is None:
                log.warning("worker process %d did not drain in time: killed", process.pid)
                _kill(process)
                await process.wait()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes.values() if p.returncode is None]


def _kill(process: trio.Process) -> None:
    try:
        process.kill()
    except ProcessLookupError:
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def parent_alive(original_parent: int) -> bool:
    """False once our parent died (we were re-parented)."""
    return os.getppid() == original_parent
