"""The node processes of a campaign: start, signal, observe, and certainly reap.

Each node is ``python -m fastworker.node`` started with the bench's
``spawn_logged`` (a session of its own, so its process group is the node and
its worker processes) and its ready line read with ``read_first_line``.
Whether it still runs is asked with ``waitid(WNOWAIT)``, which does not reap
it: its pid, which is its group id, stays ours until ``close`` reaps it, so
killing the group never reaches a stranger.  Logs go to a temporary file
the campaign reads (``log_text``) and may copy out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import trio

from ..bench._nodes import (
    READY,
    NoFirstLine,
    exit_code_unreaped,
    kill_group,
    read_first_line,
    spawn_logged,
    wait_exit,
)

__all__ = ["NodeProcess", "NodeStartError", "children_of", "log_events", "rss_kib"]

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")
_KILL_WAIT = 5.0


class NodeStartError(Exception):
    """A node printed no ready line; ``str()`` has its stderr."""


class NodeProcess:
    """One node process; ``close()`` (idempotent) stops and reaps it and its group."""

    def __init__(self, name: str, argv: Sequence[str]) -> None:
        self.name = name
        self.argv = list(argv)
        self.process: subprocess.Popen[bytes]
        self._log: IO[bytes]
        self.process, self._log = spawn_logged(
            ["fastworker.node", *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            log_prefix=f"fastworker-chaos-{name}-",
        )
        self.pid = self.process.pid
        self.exit_code: int | None = None
        self.started_at = time.time()
        self._closed = False

    def __repr__(self) -> str:
        return f"<NodeProcess {self.name} pid={self.pid}>"

    async def wait_ready(self, timeout: float) -> None:
        try:
            line = await trio.to_thread.run_sync(read_first_line, self.process, timeout)
        except NoFirstLine as exc:
            tail = self.log_text()[-3000:]
            raise NodeStartError(f"{self.name}: {exc}; stderr:\n{tail}") from None
        match = READY.match(line)
        if match is None or int(match["pid"]) != self.pid:
            raise NodeStartError(f"{self.name}: unexpected first line {line!r}")

    # -- observing -------------------------------------------------------------

    def exited(self) -> bool:
        """True once the node exited; never reaps it (see the module docstring)."""
        if self.exit_code is None:
            self.exit_code = exit_code_unreaped(self.process)
        return self.exit_code is not None

    def children(self) -> list[int]:
        """The node's live worker processes, oldest pid first."""
        return [] if self.exited() else children_of(self.pid)

    def log_text(self) -> str:
        if self._log.closed:
            return ""
        size = os.fstat(self._log.fileno()).st_size
        return os.pread(self._log.fileno(), size, 0).decode(errors="replace")

    def save_log(self, path: Path) -> None:
        path.write_text(self.log_text())

    # -- acting ----------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Signal the node itself (not its workers), unless it has exited."""
        if not self.exited():
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def _kill_group(self) -> None:
        kill_group(self.pid)

    def _wait_exit(self, timeout: float) -> bool:
        return wait_exit(self.exited, timeout)

    def close(self, grace: float = 5.0) -> None:
        """SIGTERM, ``grace`` seconds, then SIGKILL of the whole group; reaps; idempotent."""
        if self._closed:
            return
        try:
            # Stopped workers cannot exit on SIGTERM: wake the group first.
            try:
                os.killpg(self.pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            if grace > 0 and not self.exited():
                self.signal(signal.SIGTERM)
                self._wait_exit(grace)
            self._kill_group()  # whatever is left, workers included
            self._wait_exit(_KILL_WAIT)
        finally:
            self._closed = True
            try:
                self.process.wait(_KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass
            if self.process.stdout is not None:
                self.process.stdout.close()

    def release_log(self) -> None:
        self._log.close()


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return sorted(found)


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB, None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def log_events(text: str, marker: str) -> Iterator[tuple[float, str]]:
    """(epoch time, line) of each log line containing ``marker`` (the nodes' asctime format)."""
    for line in text.splitlines():
        if marker in line:
            match = _LOG_TIME.match(line)
            if match is not None:
                when = time.mktime(time.strptime(match[1], "%Y-%m-%d %H:%M:%S"))
                yield when + int(match[2]) / 1000, line
