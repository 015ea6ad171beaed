"""Ctrl-C and SIGTERM: turned into cancellation of the bench's main task, reliably.

``asyncio.run``'s own Ctrl-C handling cancels the main task once; on
Python 3.11 ``asyncio.wait_for`` (which every ``Client`` call waits in) can
swallow that single cancellation when its result arrives at the same
moment, and the run would carry on as if nothing happened.  So the first
signal is remembered and the main task is cancelled again every 0.2 s until
it ends; the cleanup the cancellation triggers is synchronous and bounded,
so cancelling again cannot interrupt it.  A second Ctrl-C raises
KeyboardInterrupt on the spot, for a user who does not want to wait for a
graceful stop (the nodes are then killed, not drained).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["Stopped", "stop_on_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
    """The run was stopped by a signal, after cleaning up; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Stopper:
    def __init__(self, main: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self.main = main
        self.loop = loop
        self.received: int | None = None

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, even inside a loop
        # that never yields to the event loop (submitting with `delay`).
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        self.main.cancel()
        self.loop.call_soon_threadsafe(lambda: None)  # wake a sleeping event loop

    async def keep_cancelling(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            if self.received is not None and not self.main.done():
                self.main.cancel()


@contextmanager
def stop_on_signals() -> Iterator[_Stopper]:
    """Within the main task: SIGINT/SIGTERM cancel it; ``Stopped`` replaces the CancelledError.

    Outside the main thread (signals cannot be handled there) it does nothing.
    """
    main = asyncio.current_task()
    assert main is not None
    stopper = _Stopper(main, asyncio.get_running_loop())
    try:
        previous = {sig: signal.signal(sig, stopper.on_signal) for sig in _SIGNALS}
    except ValueError:  # not the main thread
        yield stopper
        return
    watchdog = asyncio.ensure_future(stopper.keep_cancelling())
    try:
        yield stopper
    except asyncio.CancelledError:
        if stopper.received is None:
            raise
        raise Stopped(stopper.received) from None
    finally:
        watchdog.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
