"""A one-line progress indicator on stderr for the long phases of a run.

It is drawn by a thread of its own, because the loop that submits tasks
never yields to the event loop (``delay`` returns without suspending) and
must not pay for drawing.  The line is rewritten with ``\\r`` at most ten
times a second and erased when the phase ends, so stdout (the table or the
JSON line) is never touched and a terminal is left clean.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Draws ``label  done/total  pct  rate`` for one phase at a time, or nothing when disabled."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._interval = interval
        self._width = 0

    @contextmanager
    def track(self, label: str, total: int, done: Callable[[], int]) -> Iterator[None]:
        """Show the progress of ``done()`` towards ``total`` while the block runs."""
        if not self.enabled or total <= 0:
            yield
            return
        stop = threading.Event()
        started = time.perf_counter()

        def draw() -> None:
            while not stop.wait(self._interval):
                self._draw(label, total, done(), time.perf_counter() - started)

        thread = threading.Thread(target=draw, name="fastworker-bench-progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.clear()

    def _draw(self, label: str, total: int, done: int, elapsed: float) -> None:
        done = max(0, min(done, total))
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"{label}  {done:,}/{total:,}  {100 * done / total:5.1f}%  {rate:,.0f}/s"
        self._write(line)

    def _write(self, line: str) -> None:
        padding = " " * max(0, self._width - len(line))
        self._width = len(line)
        try:
            self._stream.write(f"\r{line}{padding}")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed under us: progress is a nicety

    def clear(self) -> None:
        if self._width:
            try:
                self._stream.write("\r" + " " * self._width + "\r")
                self._stream.flush()
            except (OSError, ValueError):
                pass
            self._width = 0

    def note(self, message: str) -> None:
        """A line for the user on stderr (a skipped scenario, a warning), clear of the bar."""
        self.clear()
        print(message, file=self._stream, flush=True)
