"""Where the client's actor runs: a trio thread for asyncio callers, or the caller's trio run.

* Under asyncio (``asyncio.run``, FastAPI) the actor gets a thread with its
  own ``trio.run``; ``stop()`` asks it to finish and joins the thread.
* Under trio it runs as a system task of the caller's run: no extra thread,
  and it ends with that run at the latest.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import trio

from ..runtime import Supervisor
from ._core import ClientCore
from ._errors import ClientError

__all__ = ["ThreadHost", "TrioHost", "current_library"]

log = logging.getLogger("fastworker.client")

_STOP_GRACE = 2.0  # seconds stop() may spend handing over what is still queued


def current_library() -> str:
    """ "trio" or "asyncio" for the running event loop; raises RuntimeError outside one."""
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        pass
    else:
        return "trio"
    asyncio.get_running_loop()  # raises RuntimeError when there is no loop
    return "asyncio"


def _shut_down(core: ClientCore) -> None:
    """Close the sockets (handing over what can go at once), then release every waiting caller."""
    left = core.close_now(linger_ms=500)
    if left:
        log.warning("client stopped with %d tasks that could not be sent", left)
    core.fail_waiters("the client was stopped before the reply or result arrived")


def _failed(core: ClientCore, exc: BaseException) -> None:
    """The client's actor is gone for good: say so, and release everybody waiting on it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    log.error("the client's actor failed and was not restarted", exc_info=exc)
    core.failure = ClientError(f"the client failed: {type(exc).__name__}: {exc}")
    core.failure.__cause__ = exc
    core.fail_waiters(str(core.failure))


class TrioHost:
    """Runs the actor inside the caller's trio run."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    async def start(self) -> None:
        started = trio.Event()

        async def main() -> None:
            with trio.CancelScope() as scope:
                self._scope = scope
                supervisor = Supervisor("client", [self.core], max_restarts=5, within=10.0)
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(supervisor.run)
                        started.set()
                except Exception as exc:
                    # A system task must not raise: that would crash the caller's
                    # whole trio run.  The client fails instead, loudly and for good.
                    _failed(self.core, exc)
                finally:
                    started.set()
                    self._done.set()

        trio.lowlevel.spawn_system_task(main)
        await started.wait()
        if self.core.failure is not None:
            raise self.core.failure

    def stop(self) -> None:
        # Same thread as the actor, which is not running right now: flush and
        # close synchronously, then cancel it.
        _shut_down(self.core)
        if self._scope is not None:
            self._scope.cancel()


class ThreadHost:
    """Runs the actor in a thread of its own with its own trio run."""

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        self._thread: threading.Thread | None = None
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def signal(error: BaseException | None) -> None:
            def set_it() -> None:
                if not ready.done():
                    if error is None:
                        ready.set_result(None)
                    else:
                        ready.set_exception(error)

            try:
                loop.call_soon_threadsafe(set_it)
            except RuntimeError:
                pass

        self._thread = threading.Thread(
            target=self._main, args=(signal,), name="fastworker-client", daemon=True
        )
        self._thread.start()
        await ready

    def _main(self, signal: Any) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                supervisor = Supervisor("client", [self.core], max_restarts=5, within=10.0)
                async with trio.open_nursery() as nursery:
                    await nursery.start(supervisor.run)
                    signal(None)

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
            _failed(self.core, exc)
            signal(exc)

    def _shutdown_in_trio(self) -> None:
        _shut_down(self.core)
        if self._scope is not None:
            self._scope.cancel()

    def stop(self) -> None:
        if self._token is not None:
            try:
                self._token.run_sync_soon(self._shutdown_in_trio)
            except trio.RunFinishedError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_STOP_GRACE)
            if self._thread.is_alive():
                log.warning("client thread did not finish within %.1f s", _STOP_GRACE)
