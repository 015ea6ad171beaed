"""``--http``: read a node's /metrics and dashboard data once a second while the bench runs.

That is what a Prometheus server and one open dashboard page cost the control
plane; comparing runs with and without ``--http`` measures it
(design/operations.md has the figures).  A thread, not a task: the bench's
own event loop measures, and must not wait on this.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable

__all__ = ["Scraper"]

INTERVAL = 1.0
_PATHS = ("/metrics", "/api/overview")


class Scraper:
    """Polls ``url`` until ``stop()`` or until ``gone()`` says the node exited."""

    def __init__(self, url: str, gone: Callable[[], bool]) -> None:
        self.url = url
        self.scrapes = 0
        self.failures = 0
        self._gone = gone
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._main, name="fastworker-bench-scrape", daemon=True
        )
        self._thread.start()

    def _main(self) -> None:
        while not self._gone():
            for path in _PATHS:
                try:
                    with urllib.request.urlopen(self.url + path, timeout=5) as response:
                        response.read()
                    self.scrapes += 1
                except OSError:
                    if not self._gone():  # a node being stopped closes its HTTP side first
                        self.failures += 1
            if self._stop.wait(INTERVAL):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
