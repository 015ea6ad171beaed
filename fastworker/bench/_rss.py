"""Resident memory of the processes under test, read from ``/proc/<pid>/status``.

No psutil (the runtime dependencies are trio, pyzmq, attrs and cbor2): on
Linux ``VmRSS`` is one line of a text file.  Where there is no ``/proc`` (or
the process is gone, or not ours to read) every figure is None, reported as
null, never as a guess.

The peak of a scenario is sampled (``RssSampler``: every ~100 ms, from a
thread, so a busy event loop cannot delay it) rather than read from
``VmHWM``: the high-water mark covers the whole life of a process, and one
node serves several scenarios.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from types import TracebackType

import attrs

__all__ = ["MIB", "RssPeaks", "RssSampler", "read_rss", "to_mib"]

MIB = 1024 * 1024


def _status_field(pid: int, field: str) -> int | None:
    """A ``Vm*`` field of ``/proc/<pid>/status`` in bytes; None when unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith(field):
                    # "VmRSS:\t   51234 kB"
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None  # a zombie has no Vm* lines


def read_rss(pid: int | None) -> int | None:
    """Current resident set size of ``pid`` in bytes, or None."""
    return None if pid is None else _status_field(pid, "VmRSS:")


def to_mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


@attrs.frozen
class RssPeaks:
    """Peaks seen while sampling: the control plane's, and the largest single worker's."""

    cp_bytes: int | None
    worker_bytes: int | None


class RssSampler:
    """Samples ``VmRSS`` of a control plane and of worker processes until stopped.

    Worker pids may be added while it runs (workers register after their
    node is ready).  Used as a context manager; ``peaks()`` afterwards.
    """

    def __init__(self, cp_pid: int | None, interval: float = 0.1) -> None:
        self._cp_pid = cp_pid
        self._interval = interval
        self._workers: set[int] = set()
        self._cp_peak: int | None = None
        self._worker_peak: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastworker-bench-rss", daemon=True)

    def watch_workers(self, pids: Iterable[int]) -> None:
        with self._lock:
            self._workers.update(pids)

    def _sample(self) -> None:
        with self._lock:
            workers = list(self._workers)
        cp = read_rss(self._cp_pid)
        sizes = [s for s in map(read_rss, workers) if s is not None]
        with self._lock:
            if cp is not None:
                self._cp_peak = max(cp, self._cp_peak or 0)
            if sizes:
                self._worker_peak = max(*sizes, self._worker_peak or 0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the state at the end counts too

    def peaks(self) -> RssPeaks:
        with self._lock:
            return RssPeaks(self._cp_peak, self._worker_peak)
