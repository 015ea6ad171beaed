"""The ``floor`` scenario from the bench's side: start the three ``_floor`` processes, read, stop.

The relay comes first because its ready line says where the echo and the
client connect.  The client writes its figures to a file, not a pipe, so
the bench can wait for it with an asyncio sleep (Ctrl-C stays prompt) and
a large ``--latency-count`` cannot fill a pipe nobody reads yet.

Every process started is stopped in ``finally``, whatever happened: stdin
closed (the relay and the echo exit on that), a bounded wait, then
SIGKILL.  Each runs in a session of its own, like the nodes, so a Ctrl-C
at the terminal reaches the bench alone.  Every wait has a deadline; a
failure is one ``BenchError`` line ending with what the process said.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import IO

from ._nodes import NoFirstLine, read_first_line, spawn_logged
from ._options import BenchError

__all__ = ["FloorSession", "floor_round_trips", "floor_session"]

WARMUP = 100
_READY_TIMEOUT = 10.0
_STOP_WAIT = 2.0
_POLL = 0.05
# The client's own bound for all its round trips: generous, it only stops a hang.
_BASE_TIMEOUT = 30.0
_PER_ROUND_TRIP = 0.01
_NOT_A_BLOCK = "floor: the serving client answered a block with"


class _Helper:
    """One ``python -m fastworker.bench._floor`` process and the file its stderr goes to."""

    def __init__(self, argv: Sequence[str], stdout: int | IO[bytes]) -> None:
        self.name = argv[0]
        self.process, self.stderr = spawn_logged(
            ["fastworker.bench._floor", *argv],
            stdin=subprocess.PIPE,
            stdout=stdout,
            log_prefix="fastworker-bench-floor-",
        )

    def last_words(self) -> str:
        """The last line it wrote on stderr (where ``_floor`` puts its one-line error)."""
        self.stderr.seek(0)
        lines = self.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "nothing on stderr"

    def failure(self, what: str) -> BenchError:
        return BenchError(f"floor: the {self.name} process {what}: {self.last_words()}")

    def stop(self) -> None:
        """Close its stdin (its cue to exit), wait a little, then kill; always reaped."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            try:
                self.process.wait(_STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(_STOP_WAIT)
        except BaseException:  # a second Ctrl-C while waiting: no more patience
            self.process.kill()
            raise
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.stderr.close()


@contextmanager
def _helpers() -> Iterator[list[_Helper]]:
    """A list to start helpers into; each one is stopped on the way out."""
    started: list[_Helper] = []
    try:
        yield started
    finally:
        for helper in reversed(started):
            helper.stop()


def _ready_line(relay: _Helper) -> tuple[str, str]:
    """The relay's (clients, workers) endpoints from its ready line, within the time allowed."""
    from ._floor import RELAY_READY  # see floor_round_trips

    try:
        line = read_first_line(relay.process, _READY_TIMEOUT)
    except NoFirstLine as exc:
        raise relay.failure(str(exc)) from None
    fields = dict(f.split("=", 1) for f in line.removeprefix(RELAY_READY).split() if "=" in f)
    if not line.startswith(RELAY_READY) or set(fields) != {"clients", "workers"}:
        raise BenchError(f"floor: unexpected ready line from the relay: {line!r}")
    return fields["clients"], fields["workers"]


async def _wait_for(client: _Helper, others: Sequence[_Helper], timeout: float) -> None:
    """Until the client exits; a BenchError if it fails, or if a helper it needs dies first."""
    deadline = time.monotonic() + timeout
    while client.process.poll() is None:
        for helper in others:
            if helper.process.poll() is not None:
                raise helper.failure(f"exited (code {helper.process.returncode}) during the run")
        if time.monotonic() >= deadline:
            raise BenchError(f"floor: the client did not finish within {timeout:g} s")
        await asyncio.sleep(_POLL)
    if client.process.returncode != 0:
        raise client.failure(f"failed (exit code {client.process.returncode})")


def _client_times(output: IO[bytes]) -> dict[str, list[float]]:
    from ._floor import VARIANTS  # see floor_round_trips

    output.seek(0)
    text = output.read().decode(errors="replace").strip()
    try:
        times: dict[str, list[float]] = json.loads(text.splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"floor: the client printed no figures ({text[:80]!r})") from None
    if set(times) != set(VARIANTS):
        raise BenchError(f"floor: the client reported {sorted(times)}, not {sorted(VARIANTS)}")
    return times


async def floor_round_trips(count: int, pids: set[int]) -> dict[str, list[float]]:
    """Seconds of ``count`` timed round trips per variant; the helpers' pids go to ``pids``."""
    # Imported only here: ``python -m fastworker.bench._floor`` imports this
    # package first, and runpy warns if that already imported ``_floor``.
    from ._floor import VARIANTS

    timeout = _BASE_TIMEOUT + _PER_ROUND_TRIP * len(VARIANTS) * (count + WARMUP)
    with _helpers() as started, tempfile.TemporaryFile(prefix="fastworker-bench-floor-") as out:
        started.append(_Helper(["relay"], subprocess.PIPE))
        pids.add(started[0].process.pid)
        clients, workers = _ready_line(started[0])
        started.append(_Helper(["echo", workers], subprocess.DEVNULL))
        argv = ["client", clients, "--count", str(count), "--warmup", str(WARMUP)]
        started.append(_Helper([*argv, "--timeout", str(timeout)], out))
        pids.update(helper.process.pid for helper in started)
        # The client's own timeout fires first and says more; this one stops a hang.
        await _wait_for(started[-1], started[:-1], timeout + _READY_TIMEOUT + 5.0)
        return _client_times(out)


class FloorSession:
    """The floor's three processes, kept up to time blocks of round trips on demand.

    For a ``latency`` run interleaved with its floor: the bench's own round
    trips and the floor's alternate in blocks a fraction of a second long,
    so a shared machine whose speed drifts within seconds is the same
    machine for both (design/performance.md).
    """

    def __init__(self, client: _Helper, others: Sequence[_Helper]) -> None:
        self._client = client
        self._others = others
        self._buffer = b""

    async def round_trips(self, variant: str, count: int) -> list[float]:
        """Seconds of ``count`` round trips of ``variant``; BenchError if they do not come."""
        for helper in self._others:
            if helper.process.poll() is not None:
                raise helper.failure(f"exited (code {helper.process.returncode}) during the run")
        stdin = self._client.process.stdin
        assert stdin is not None
        try:
            stdin.write(f"{variant} {count}\n".encode())
            stdin.flush()
        except OSError:
            raise self._client.failure("stopped reading its blocks") from None
        timeout = _BASE_TIMEOUT + _PER_ROUND_TRIP * count
        line = await asyncio.to_thread(self._line, timeout)
        try:
            times = json.loads(line)
        except ValueError:
            raise BenchError(f"{_NOT_A_BLOCK} {line[:80]!r}") from None
        if (
            not isinstance(times, list)
            or len(times) != count
            or not all(isinstance(t, float) for t in times)
        ):
            raise BenchError(f"{_NOT_A_BLOCK} {line[:80]!r}, not {count} seconds")
        return times

    def _line(self, timeout: float) -> str:
        """The client's next stdout line within ``timeout`` seconds (in a thread)."""
        stdout = self._client.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if not select.select([fd], [], [], max(left, 0.0))[0]:
                raise BenchError(f"floor: the serving client gave no block within {timeout:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._client.failure("exited during the run")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode(errors="replace")


@asynccontextmanager
async def floor_session(pids: set[int]) -> AsyncIterator[FloorSession]:
    """The relay, the echo and a serving client, warmed up; all stopped on the way out."""
    from ._floor import CLIENT_READY  # see floor_round_trips

    with _helpers() as started:
        started.append(_Helper(["relay"], subprocess.PIPE))
        pids.add(started[0].process.pid)
        clients, workers = _ready_line(started[0])
        started.append(_Helper(["echo", workers], subprocess.DEVNULL))
        argv = ["serve", clients, "--warmup", str(WARMUP), "--timeout", str(_BASE_TIMEOUT)]
        started.append(_Helper(argv, subprocess.PIPE))
        pids.update(helper.process.pid for helper in started)
        session = FloorSession(started[-1], started[:-1])
        warmup_timeout = _READY_TIMEOUT + _BASE_TIMEOUT
        line = await asyncio.to_thread(session._line, warmup_timeout)
        if line != CLIENT_READY:
            raise BenchError(f"floor: unexpected ready line from the serving client: {line!r}")
        yield session
