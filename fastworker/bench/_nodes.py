"""The ``python -m fastworker.node`` processes a bench run starts, and their certain end.

Each node runs in a session of its own, so its process group is exactly the
node and the worker processes it supervises, and a Ctrl-C at the terminal
reaches the bench alone: the bench then stops its nodes in order (SIGTERM,
a bounded wait, SIGKILL of the whole group) instead of racing them.

Every node started is in ``_live`` from the moment it exists until it is
stopped; ``stop_all`` (called by the runner on every exit path, and by
``atexit`` as a last resort) stops what is left.  Only a SIGKILL of the bench
itself can leave a node behind; its process group id is its pid.

Waiting for a node's exit does not reap it (``waitid`` with ``WNOWAIT``),
so its pid, which is its group id, cannot be reused while we still signal
the group.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from ._options import BenchError
from ._tasks import MODULE

__all__ = [
    "READY",
    "LocalNode",
    "NoFirstLine",
    "exit_code_unreaped",
    "kill_group",
    "read_first_line",
    "spawn_logged",
    "start_node",
    "stop_all",
    "wait_exit",
]

READY = re.compile(
    r"^fastworker node ready: role=(?P<role>\S+) discovery=(?P<discovery>\S+) "
    r"workers=(?P<workers>\d+) pid=(?P<pid>\d+)(?: http=(?P<http>\S+))?$"
)
READY_TIMEOUT = 30.0
_KILL_WAIT = 5.0
_GRACE = 5.0  # the nodes' --grace: after a run nothing is left to finish


def _package_root() -> str:
    """The directory holding the ``fastworker`` package this bench was imported from."""
    return str(Path(__file__).resolve().parent.parent.parent)


def _node_env() -> dict[str, str]:
    """Our environment, with this very fastworker first on the path of the node."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _package_root() + (os.pathsep + path if path else "")
    return env


def wait_exit(exited: Callable[[], bool], timeout: float) -> bool:
    """Poll ``exited`` (a node process's own check) for up to ``timeout`` s; its last answer."""
    deadline = time.monotonic() + timeout
    while not exited():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def exit_code_unreaped(process: subprocess.Popen[bytes]) -> int | None:
    """The exit code once ``process`` exited (minus the signal if killed), else None.

    ``waitid`` with ``WNOWAIT`` leaves it unreaped, so its pid (the group id of
    a node and its workers) cannot be reused while we may still signal the
    group.  Where ``waitid`` is missing (macOS) reaping is the only way to know.
    """
    if not hasattr(os, "waitid"):
        return process.poll()
    info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
    if info is None:
        return None
    killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
    return -info.si_status if killed else info.si_status


def kill_group(pid: int) -> None:
    """SIGKILL the process group a node leads (the node and its worker processes)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class NoFirstLine(Exception):
    """A helper process printed no first line: ``str()`` says why, for the caller's message."""


def spawn_logged(
    argv: Sequence[str], *, stdin: int, stdout: int | IO[bytes], log_prefix: str
) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """``python -m <argv>`` in a session of its own, stderr to a temporary file kept for errors.

    The caller owns both and closes the file once the process is reaped.
    """
    # Lives as long as the process (closed by the caller), so no `with`.
    log: IO[bytes] = tempfile.TemporaryFile(prefix=log_prefix)  # noqa: SIM115
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=log,
            env=_node_env(),
            start_new_session=True,
        )
    except BaseException:
        log.close()
        raise
    return process, log


def read_first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The first line ``process`` prints on its stdout pipe, within ``timeout`` seconds.

    ``select`` plus ``os.read`` rather than ``readline``: a silent process must
    not hang the bench.  Raises :class:`NoFirstLine`.
    """
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if not select.select([fd], [], [], max(left, 0.0))[0]:
            raise NoFirstLine(f"printed no ready line within {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise NoFirstLine("exited before it was ready")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode(errors="replace")


class LocalNode:
    """A node process this bench started; create with ``start_node``."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self.process, self._log = spawn_logged(
            ["fastworker.node", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            log_prefix="fastworker-bench-node-",
        )
        _live.add(self)
        self.pid = self.process.pid
        self.role = ""
        self.discovery_address = ""
        self.http_url: str | None = None  # the node's --http-address, once ready
        self.stopping = False  # stop() has begun: its HTTP side may be gone already
        self.exit_code: int | None = None

    def __repr__(self) -> str:
        return f"<LocalNode pid={self.pid} {self.role or '?'} {self.discovery_address}>"

    # -- starting -------------------------------------------------------------

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Read the ready line; BenchError (with the node's stderr) when it does not come."""
        try:
            line = read_first_line(self.process, timeout)
        except NoFirstLine as exc:
            raise BenchError(self._explain(f"the node {exc}")) from None
        match = READY.match(line)
        if match is None or int(match["pid"]) != self.pid:
            raise BenchError(self._explain(f"unexpected first line {line!r}"))
        self.role = match["role"]
        self.discovery_address = match["discovery"]
        self.http_url = match["http"]

    def log_tail(self, lines: int = 15) -> str:
        """The end of what the node wrote on stderr."""
        if self._log.closed:
            return ""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def _explain(self, what: str) -> str:
        tail = self.log_tail()
        command = "python -m fastworker.node " + " ".join(self.argv)
        return f"{command}: {what}" + (f"; its stderr ends with:\n{tail}" if tail else "")

    # -- stopping -------------------------------------------------------------

    def _exited(self) -> bool:
        """True once the node has exited; does not reap it (see the module docstring)."""
        if self.exit_code is None:
            self.exit_code = exit_code_unreaped(self.process)
        return self.exit_code is not None

    def _wait_exit(self, timeout: float) -> bool:
        return wait_exit(self._exited, timeout)

    def _kill_group(self) -> None:
        kill_group(self.pid)

    def kill(self) -> None:
        """SIGKILL the node's group (a crash, for the journal's recovery) and wait for it."""
        self._kill_group()
        self._wait_exit(_KILL_WAIT)

    def stop(self, grace: float = _GRACE + 10.0) -> None:
        """SIGTERM, up to ``grace`` seconds to drain, then SIGKILL of the group; idempotent.

        A KeyboardInterrupt while waiting (a second Ctrl-C) kills the group at
        once and is re-raised.
        """
        if self not in _live:
            return
        self.stopping = True
        try:
            if not self._exited():
                try:
                    self.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                if not self._wait_exit(grace):
                    self._kill_group()
                    self._wait_exit(_KILL_WAIT)
            # Worker processes its exit left behind (there should be none).
            self._kill_group()
        except KeyboardInterrupt:
            self._kill_group()
            raise
        finally:
            _live.discard(self)
            try:
                self.process.wait(_KILL_WAIT)
            except subprocess.TimeoutExpired:
                pass
            if self.process.stdout is not None:
                self.process.stdout.close()
            self._log.close()


_live: set[LocalNode] = set()


def start_node(
    role: str,
    *,
    discovery_address: str = "tcp://127.0.0.1:*",
    workers: int = 0,
    concurrency: int = 8,
    extra: Sequence[str] = (),
) -> LocalNode:
    """Start a node serving the bench tasks and return once it printed its ready line."""
    argv = [
        "--role",
        role,
        "--discovery-address",
        discovery_address,
        "--workers",
        str(workers),
        "--concurrency",
        str(concurrency),
        "--task-modules",
        MODULE,
        "--grace",
        str(_GRACE),
        "--log-level",
        "WARNING",
        *extra,
    ]
    node = LocalNode(argv)
    try:
        node.wait_ready()
    except BaseException:
        node.stop(grace=2.0)
        raise
    return node


def stop_all() -> None:
    """Stop every node still running (each one bounded); safe to call more than once."""
    for node in list(_live):
        node.stop()


atexit.register(stop_all)
