"""Helpers for tests that run real ``python -m fastworker.node`` processes (not a test module).

``start_node(...)`` (sync) and ``open_node(...)`` (async, for trio tests)
start a node with its arguments, wait for its ready line on stdout, and yield
a ``Node``.  On exit the node gets SIGTERM, a bounded wait, then SIGKILL;
then every process left in its process group (its worker children) is
killed, even when the test failed.

Nothing here sleeps to wait for something:

* a node's exit is an event: a pidfd (``os.pidfd_open``) turns readable when
  the process ends, and it does not reap the process, so the node's pid and
  process group id stay ours until we reap it;
* the ready line is read with ``select`` on the stdout pipe, under a deadline.

Each node runs in a session of its own (``start_new_session``), so its
process group is exactly the node plus the worker processes it starts; a
worker restarted at any moment is still found.  stderr goes to a temporary
file (drained whatever the node logs; ``Node.stderr_text()`` reads it back).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import trio

from fastworker.testing import free_loopback_port

__all__ = [
    "REPO_ROOT",
    "CurveFiles",
    "Node",
    "NodeStartError",
    "free_tcp_port",
    "node_command",
    "node_env",
    "open_node",
    "parent_of",
    "poll",
    "process_alive",
    "run_node",
    "start_node",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

READY = re.compile(
    r"^fastworker node ready: role=(?P<role>\S+) discovery=(?P<discovery>\S+) "
    r"workers=(?P<workers>\d+) pid=(?P<pid>\d+)(?: http=(?P<http>\S+))?$"
)

DEFAULT_READY_TIMEOUT = 20.0
DEFAULT_STOP_TIMEOUT = 15.0  # SIGTERM → exit; tests pass a small --grace
_KILL_TIMEOUT = 5.0


class NodeStartError(RuntimeError):
    """The node exited or stayed silent instead of printing its ready line."""


def node_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastworker.node", *args]


def node_env(**extra: str) -> dict[str, str]:
    """The environment for a node: fastworker importable from any working directory."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    env.pop("FASTWORKER_DISCOVERY_ADDRESS", None)
    env.update(extra)
    return env


def run_node(
    *args: str, timeout: float = 15.0, cwd: str | Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a node that is expected to exit by itself (bad arguments, startup errors).

    On ``timeout`` the node and every process of its group are killed and
    ``subprocess.TimeoutExpired`` is raised: a node that should have refused
    to start never outlives the test.
    """
    command = node_command(*args)
    with subprocess.Popen(
        command,
        cwd=cwd or REPO_ROOT,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: the group id is ours
            stdout, stderr = proc.communicate(timeout=_KILL_TIMEOUT)
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def free_tcp_port() -> int:
    """A loopback port free a moment ago, below the ephemeral range (see free_loopback_port)."""
    return free_loopback_port()


# -- /proc --------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, process group, start time) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def parent_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def _live_processes() -> Iterator[tuple[int, tuple[str, int, int, int]]]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X"):
                yield int(entry.name), stat


# -- the node -------------------------------------------------------------------


class Node:
    """A running ``python -m fastworker.node``; use ``start_node``/``open_node``."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        cwd: str | Path | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.args = list(args)
        self.stop_timeout = stop_timeout
        # Owned by the Node (not a with block): closed in close().
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                node_command(*args),
                cwd=cwd or REPO_ROOT,
                env=node_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                start_new_session=True,
            )
        except BaseException:
            self._stderr.close()
            raise
        self.pid = self.proc.pid
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except BaseException:
            os.killpg(self.pid, signal.SIGKILL)  # not reaped yet: the group id is ours
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._stderr.close()
            raise
        self.ready_line = ""
        self.role = ""
        self.discovery_address = ""
        self.workers = 0
        self.http_url: str | None = None
        self.exit_code: int | None = None
        self.survivors: list[int] = []  # group members still running when the node exited
        self._closed = False

    def __repr__(self) -> str:
        return f"<Node pid={self.pid} {self.role} {self.discovery_address}>"

    # -- start --------------------------------------------------------------

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Read stdout until the ready line; NodeStartError when the node dies or is silent."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(left, 0))
            if not readable:
                raise NodeStartError(self._explain(f"no ready line within {timeout:g} s"))
            chunk = os.read(fd, 4096)
            if not chunk:
                self.wait_exit(_KILL_TIMEOUT)
                raise NodeStartError(self._explain("the node exited before it was ready"))
            buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode()
        match = READY.match(line)
        if match is None:
            raise NodeStartError(self._explain(f"unexpected first line {line!r}"))
        if int(match["pid"]) != self.pid:
            raise NodeStartError(self._explain(f"ready line names another pid: {line!r}"))
        self.ready_line = line
        self.role = match["role"]
        self.discovery_address = match["discovery"]
        self.workers = int(match["workers"])
        self.http_url = match["http"]

    def _explain(self, what: str) -> str:
        code = self.proc.poll() if self.exit_code is None else self.exit_code
        return f"{what} (exit code {code}); {self.args}; stderr:\n{self.stderr_text()}"

    # -- observing ------------------------------------------------------------

    def stderr_text(self) -> str:
        if self._stderr.closed:
            return "<closed>"
        return Path(f"/proc/self/fd/{self._stderr.fileno()}").read_bytes().decode(errors="replace")

    def exited(self) -> bool:
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(readable)

    def children(self) -> list[int]:
        """Running processes whose parent is the node (its worker processes)."""
        if self.exited():
            return []
        return sorted(pid for pid, stat in _live_processes() if stat[1] == self.pid)

    def group(self) -> list[int]:
        """Running processes of the node's process group other than the node itself.

        Only meaningful before the node is reaped (``close``): until then its
        pid, which is the group id, cannot be reused.
        """
        return sorted(
            pid for pid, stat in _live_processes() if stat[2] == self.pid and pid != self.pid
        )

    # -- stopping -------------------------------------------------------------

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the node to exit, without reaping it; True when it did."""
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        if not readable:
            return False
        if self.exit_code is None:
            self.survivors = self.group()
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
            assert info is not None
            if info.si_code == os.CLD_EXITED:
                self.exit_code = info.si_status
            else:
                self.exit_code = -info.si_status
        return True

    def signal(self, signum: int) -> None:
        """Send a signal to the node (not its workers); it must not have been reaped."""
        if not self._closed:
            try:
                signal.pidfd_send_signal(self._pidfd, signum)
            except ProcessLookupError:
                pass  # it has just exited

    def terminate(self, timeout: float | None = None) -> int | None:
        """SIGTERM and wait; the exit code, or None if the node still runs after ``timeout``."""
        if not self.exited():
            self.signal(signal.SIGTERM)
        if not self.wait_exit(self.stop_timeout if timeout is None else timeout):
            return None
        return self.exit_code

    def close(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL) and kill whatever is left of its group."""
        if self._closed:
            return
        try:
            if self.terminate() is None:
                self.signal(signal.SIGKILL)
                self.wait_exit(_KILL_TIMEOUT)
            # The unreaped node holds its pid, so the group id is still ours.
            if self.group():
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + _KILL_TIMEOUT
                for pid in self.group():
                    try:
                        fd = os.pidfd_open(pid)
                    except ProcessLookupError:
                        continue
                    try:
                        select.select([fd], [], [], max(deadline - time.monotonic(), 0))
                    finally:
                        os.close(fd)
        finally:
            self._closed = True
            try:
                self.proc.wait(_KILL_TIMEOUT)
            finally:
                os.close(self._pidfd)
                if self.proc.stdout is not None:
                    self.proc.stdout.close()
                self._stderr.close()


@contextlib.contextmanager
def start_node(
    *args: str,
    cwd: str | Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
) -> Iterator[Node]:
    """Start a node, wait until it is ready, stop it and its workers afterwards."""
    node = Node(args, cwd=cwd, stop_timeout=stop_timeout)
    try:
        node.wait_ready(ready_timeout)
        yield node
    finally:
        node.close()


@contextlib.asynccontextmanager
async def open_node(
    *args: str,
    cwd: str | Path | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
) -> AsyncIterator[Node]:
    """``start_node`` for trio tests: the blocking waits run in a thread."""
    node = Node(args, cwd=cwd, stop_timeout=stop_timeout)
    try:
        await trio.to_thread.run_sync(node.wait_ready, ready_timeout)
        yield node
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(node.close)


async def poll(
    condition: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str
) -> Any:
    """Call (and await, if need be) ``condition()`` until it returns something truthy.

    Returns that value; TimeoutError naming ``what`` after ``timeout`` seconds.
    """
    with trio.move_on_after(timeout):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    raise TimeoutError(f"{what}: not reached within {timeout:g} s")


class CurveFiles:
    """CURVE certificates for a test, made with ``python -m fastworker.keys``' own code.

    ``server`` is the control plane; ``client`` is in ``clients/``, ``worker``
    in ``workers/``, ``fuzz`` in both; ``rogue`` in neither.
    """

    NAMES = ("server", "client", "worker", "fuzz", "rogue")

    def __init__(self, root: Path) -> None:
        from fastworker.security import generate_certificate

        self.root = root
        self.clients = root / "clients"
        self.workers = root / "workers"
        self.clients.mkdir(parents=True)
        self.workers.mkdir(parents=True)
        for name in self.NAMES:
            public, _ = generate_certificate(name, root / "secret")
            if name in ("client", "fuzz"):
                (self.clients / public.name).write_bytes(public.read_bytes())
            if name in ("worker", "fuzz"):
                (self.workers / public.name).write_bytes(public.read_bytes())

    def secret(self, name: str) -> Path:
        return self.root / "secret" / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.root / "secret" / f"{name}.key"

    def keys(self, name: str) -> Any:
        from fastworker.security import load_secret_key

        return load_secret_key(self.secret(name))

    def fuzz_keys(self) -> Any:
        return self.keys("fuzz")

    def server_public(self) -> bytes:
        return bytes(self.keys("server").public)

    def node_args(self) -> tuple[str, ...]:
        """A control plane's flags: its key, and the client and worker directories."""
        return (
            "--curve-secret-key",
            str(self.secret("server")),
            "--client-keys",
            str(self.clients),
            "--worker-keys",
            str(self.workers),
        )

    def worker_args(self, name: str = "worker") -> tuple[str, ...]:
        """A ``--role worker`` node's flags with key ``name``."""
        return (
            "--curve-secret-key",
            str(self.secret(name)),
            "--curve-server-key",
            str(self.public("server")),
        )

    def client_kwargs(self, name: str = "client") -> dict[str, Any]:
        return {
            "curve_secret_key": str(self.secret(name)),
            "curve_server_key": str(self.public("server")),
        }
