"""One-shot replies from the client's core to a caller on asyncio or trio.

The core runs on the caller's own loop (or, for a hand-over or a loop that
cannot watch a file descriptor, in a trio thread).  A waiter is how it hands a
value to one awaiting caller without knowing which.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import trio

__all__ = ["AsyncioWaiter", "TrioWaiter", "Waiter", "new_waiter"]


class Waiter(Protocol):
    def set(self, value: Any) -> None:
        """Deliver the value; called on the core's loop, at most once."""

    async def wait(self, timeout: float | None) -> tuple[bool, Any]:
        """(True, value) once set, or (False, None) after ``timeout`` seconds."""


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        if isinstance(value, BaseException):
            future.set_exception(value)
            # The caller may have timed out and left: an error nobody awaits is
            # not worth asyncio's "exception was never retrieved" at exit.
            future.add_done_callback(_retrieve)
        else:
            future.set_result(value)


def _retrieve(future: asyncio.Future[Any]) -> None:
    future.exception()


class _TimedOut(Exception):
    """What an AsyncioWaiter's own timer settles its future with: distinct from any value."""


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(_TimedOut())


class AsyncioWaiter:
    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._future: asyncio.Future[Any] = loop.create_future()

    def set(self, value: Any) -> None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            # The core runs on the caller's loop: no thread to cross, and no
            # self-pipe write per reply.
            _resolve(self._future, value)
            return
        try:
            self._loop.call_soon_threadsafe(_resolve, self._future, value)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is waiting any more

    async def wait(self, timeout: float | None) -> tuple[bool, Any]:
        # The future itself, with one timer that settles it: wait_for(shield(...))
        # chains three futures, each resolved one event-loop turn after the other,
        # and asyncio.timeout cancels and un-cancels the task, on every round trip
        # (a late value after a timeout is harmless: _resolve skips a done future).
        future = self._future
        if timeout is None:
            return True, await future
        timer = self._loop.call_at(self._loop.time() + timeout, _time_out, future)
        try:
            value = await future
        except _TimedOut:
            return False, None
        finally:
            timer.cancel()
        return True, value


class TrioWaiter:
    __slots__ = ("_event", "_value")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._value: Any = None

    def set(self, value: Any) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    async def wait(self, timeout: float | None) -> tuple[bool, Any]:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            await self._event.wait()
        if not self._event.is_set():
            return False, None
        if isinstance(self._value, BaseException):
            raise self._value
        return True, self._value


def new_waiter(on_trio: bool) -> Waiter:
    if on_trio:
        return TrioWaiter()
    return AsyncioWaiter(asyncio.get_running_loop())
