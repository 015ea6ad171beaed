"""Shared fixtures for the in-process cluster tests.

pytest-trio already provides ``mock_clock`` and ``autojump_clock``; what is
here is what several test modules need on top of that:

* ``gate`` holds a plain (thread-run) task until the test opens it, and tells
  the test when a task has reached it: how a test keeps a worker busy on
  purpose without sleeping.
* ``poll_until`` re-reads a statistics endpoint until a counter moves, for
  the few counters that have no event to wait on.  It is bounded.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")


class Gate:
    """A barrier for task functions that run in a worker's threads.

    A task calls ``gate.wait()`` (blocking, in its thread); the test awaits
    ``gate.entered(n)`` to know ``n`` tasks are held, then calls ``open()``.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._opened = threading.Event()
        self._timeout = timeout
        self._count = 0
        self._changed = trio.Event()

    def _arrive(self) -> None:
        self._count += 1
        self._changed.set()
        self._changed = trio.Event()

    def wait(self) -> None:
        """Called by a task, in a worker thread: block until the test opens the gate."""
        trio.from_thread.run_sync(self._arrive, trio_token=self._token)
        if not self._opened.wait(self._timeout):
            raise TimeoutError(f"the test did not open the gate within {self._timeout:g} s")

    async def entered(self, count: int = 1) -> None:
        """Return once ``count`` tasks in total have reached the gate."""
        while self._count < count:
            await self._changed.wait()

    def open(self) -> None:
        self._opened.set()


@pytest.fixture
async def gate() -> AsyncIterator[Gate]:
    """A closed Gate, opened at teardown whatever happened, so no task thread stays stuck."""
    held = Gate()
    try:
        yield held
    finally:
        held.open()


PollUntil = Callable[..., Awaitable[Any]]


@pytest.fixture
def poll_until() -> PollUntil:
    """``await poll_until(client.stats, lambda s: ..., timeout=5)``: the first accepted value.

    For counters that move without any event a test could wait on (a callback
    dropped after its delivery timeout).  Raises ``trio.TooSlowError`` when
    ``timeout`` passes first.
    """

    async def poll(
        probe: Callable[[], Awaitable[T]],
        accept: Callable[[T], bool],
        *,
        timeout: float = 5.0,
        interval: float = 0.01,
    ) -> T:
        with trio.fail_after(timeout):
            while True:
                value = await probe()
                if accept(value):
                    return value
                await trio.sleep(interval)

    return poll


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``soak`` run only when ``-m`` mentions soak (setup.cfg registers it).

    CI runs plain ``pytest``, which must stay within its time budget.
    """
    if "soak" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="soak variant: run with -m soak")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


@pytest.fixture
def curve_files(tmp_path: Any) -> Any:
    """CURVE certificates for one test (see ``multiprocess.CurveFiles``)."""
    from multiprocess import CurveFiles

    return CurveFiles(tmp_path / "keys")
