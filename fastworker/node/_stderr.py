"""Log lines reach stderr from a writer thread, never from the trio loop.

A node's stderr is a pipe or a terminal somebody else drains.  When nobody
reads it (a supervisor that only collects output at the end, a paused
terminal, a stuck log shipper), a write blocks once the pipe's 64 KiB are
full; written from the trio loop, that froze the whole control plane —
handshakes, replies, even SIGTERM — for good (issue #12: the "327 SIGHUP
reloads" hang was the 327th pair of reload lines filling the pipe).

Here ``emit`` only formats and queues; a daemon thread writes with
``os.write`` (no Python-level lock is held while it blocks, so neither
``logging.shutdown`` nor interpreter exit can deadlock on it).  The queue is
bounded in bytes: past the bound a line is dropped and counted, and the
count is written as a line of its own once stderr moves again.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

__all__ = ["DEFAULT_MAX_QUEUED_BYTES", "ThreadedStderrHandler"]

# Generous for bursts (a few thousand lines), small next to a control plane's memory.
DEFAULT_MAX_QUEUED_BYTES = 1 << 20
# How long close() (at exit) waits for queued lines when stderr does not move.
_CLOSE_WAIT = 2.0


class ThreadedStderrHandler(logging.Handler):
    """A ``StreamHandler`` for file descriptor ``fd`` whose writes never block the caller."""

    def __init__(self, fd: int = 2, *, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        super().__init__()
        self._fd = fd
        self._max_bytes = max_queued_bytes
        self._lines: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._writing = False
        self.dropped = 0
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            if self._closed or self._queued_bytes + len(line) > self._max_bytes:
                self.dropped += 1
                return
            self._lines.append(line)
            self._queued_bytes += len(line)
            self._cond.notify()

    def _write_loop(self) -> None:
        reported = 0
        while True:
            with self._cond:
                while not self._lines and not self._closed:
                    self._cond.wait()
                line = self._lines.popleft() if self._lines else None
                self._writing = line is not None
                dropped = self.dropped
            try:
                if dropped > reported:
                    lost = dropped - reported
                    self._write(
                        f"fastworker: {lost} log lines dropped: stderr was not read\n".encode()
                    )
                    reported = dropped
                if line is not None:
                    self._write(line)
            except OSError:
                pass  # stderr closed under us: nowhere left to say it
            if line is None:
                return  # closed, and everything queued is out
            with self._cond:
                self._queued_bytes -= len(line)
                self._writing = False
                self._cond.notify_all()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def flush(self) -> None:
        """Wait briefly for queued lines (at exit); never for a stderr that does not move."""
        deadline = time.monotonic() + _CLOSE_WAIT
        with self._cond:
            while self._lines or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        super().close()
