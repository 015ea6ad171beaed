"""Where the client's core runs: on the caller's own loop, or (rarely) a thread.

* Under trio the core's actor (``_trio_binding``) is a system task of the
  caller's run; under asyncio the core runs as callbacks on the caller's
  loop (``_asyncio_binding``).  No extra thread, no hop per request.
* ``stop()`` is synchronous and shares the caller's thread with the core, so
  it cannot wait for acks there: when something is unacknowledged it hands
  those tasks to a successor core run by a trio actor in a thread of its own
  (``ThreadHost``) and joins that.  The same thread host serves asyncio loops
  that cannot watch a file descriptor (Windows' proactor loop).

Either way ``stop()`` blocks its caller only while the hand-over needs it:
not at all beyond closing sockets when nothing is outstanding, and at most
``timeout`` (plus the thread's wind-down) when the control plane cannot be
reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable

import trio

from ..runtime import Supervisor
from ._asyncio_binding import AsyncioBinding
from ._core import ClientCore, Flush
from ._errors import AuthenticationError, ClientError
from ._trio_binding import TrioClientActor
from ._waiters import TrioWaiter

__all__ = ["AsyncioHost", "ThreadHost", "TrioHost", "current_library", "hand_over_in_thread"]

log = logging.getLogger("fastworker.client")

# Beyond the hand-over's own timeout: what stop() allows the actor's thread to
# close its sockets and end its trio run before giving up on joining it.
_WIND_DOWN = 2.0
_STOPPED = "the client was stopped before the reply or result arrived"


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


async def _hand_over(core: ClientCore, timeout: float) -> int:
    """Wait (at most ``timeout`` s) until no returned id is unacknowledged; how many still are.

    Not at all while the control plane refuses our key: nothing could be
    acknowledged, and stop() would only sit out its timeout.
    """
    if timeout > 0 and core.failure is None and core.refused is None and core.outstanding():
        waiter = TrioWaiter()
        core.inbox.append(Flush(waiter))
        core.wake()
        try:
            await waiter.wait(timeout)
        except AuthenticationError:
            pass  # refused: what is left is counted and reported by the caller
    return core.outstanding()


def _failed(core: ClientCore, exc: BaseException) -> None:
    """The client's actor is gone for good: say so, and release everybody waiting on it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    log.error("the client's actor failed and was not restarted", exc_info=exc)
    core.failure = ClientError(f"the client failed: {type(exc).__name__}: {exc}")
    core.failure.__cause__ = exc
    core.fail_waiters(str(core.failure))


def _stop_here(core: ClientCore, timeout: float, heir_id: str) -> int:
    """Release the callers, close the core's sockets; hand over what is unacknowledged.

    Called on the core's own thread with its loop not running the core (a
    synchronous ``stop()``): the hand-over runs a successor in a thread.
    """
    core.fail_waiters(_STOPPED)
    core.close_now(linger_ms=0)  # before the successor takes over what is unacknowledged
    return hand_over_in_thread(core, timeout, heir_id)


def hand_over_in_thread(core: ClientCore, timeout: float, heir_id: str) -> int:
    """Send what ``core`` holds unacknowledged from a successor in a thread of its own.

    Blocks at most ``timeout`` s (plus the thread's wind-down); returns how
    many tasks are still unacknowledged.  ``core``'s sockets must be closed.
    """
    left = core.outstanding()
    if left and timeout > 0:
        left = ThreadHost(core.successor(heir_id, hand_over=True)).hand_over(timeout)
    return left


def _hand_over_at_loop_end(core: ClientCore, timeout: float, where: str) -> None:
    """The caller's loop ended without ``stop()``: stop here, so that no id is a broken promise.

    What the control plane has not acknowledged is handed over as ``stop()``
    would (blocking the loop's last moments at most ``timeout`` s), and the
    sockets are closed rather than left to the garbage collector.
    """
    outstanding = core.outstanding()
    if outstanding:
        log.warning(
            "client: %s ended without client.stop(); handing over %d tasks now", where, outstanding
        )
    left = _stop_here(core, timeout, f"client-{secrets.token_hex(16)}")
    if left:
        log.error(
            "client stopped at the end of its %s with %d tasks not handed over to the control "
            "plane within %g s: they did not run; client.stop() or start() again sends them",
            where,
            left,
            timeout,
        )


class TrioHost:
    """Runs the core's actor inside the caller's trio run."""

    def __init__(self, core: ClientCore, end_timeout: float) -> None:
        self.core = core
        self._end_timeout = end_timeout  # for the hand-over when the run ends first
        self._scope: trio.CancelScope | None = None
        self._stopping = False
        self.done = trio.Event()  # the actor's system task has ended

    @property
    def ended(self) -> bool:
        """The run ended (or the client was stopped): nothing is left to stop."""
        return self.done.is_set()

    async def start(self) -> None:
        started = trio.Event()
        actor = TrioClientActor(self.core)

        async def main() -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    supervisor = Supervisor("client", [actor], max_restarts=5, within=10.0)
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
                if not self._stopping and self.core.failure is None:
                    # Cancelled without stop(): the run is ending (system tasks are
                    # cancelled when its main task returns).
                    _hand_over_at_loop_end(self.core, self._end_timeout, "trio run")
                self.done.set()

        trio.lowlevel.spawn_system_task(main)
        await started.wait()
        if self.core.failure is not None:
            raise self.core.failure

    def stop(self, timeout: float, heir_id: str) -> int:
        """Hand over, close, end the actor; how many tasks were not handed over."""
        self._stopping = True
        if self._scope is not None:
            self._scope.cancel()
        return _stop_here(self.core, timeout, heir_id)


class AsyncioHost:
    """Runs the core as callbacks on the caller's asyncio loop.

    A sentinel task stands for the client on the loop: ``asyncio.run``
    cancels it when its main coroutine returns, and a client not stopped by
    then hands over and closes there (``_hand_over_at_loop_end``).
    """

    def __init__(self, core: ClientCore, end_timeout: float) -> None:
        self.core = core
        self._end_timeout = end_timeout
        self._binding: AsyncioBinding | None = None
        self._sentinel: asyncio.Task[None] | None = None
        self._stopping = False
        self.ended = False

    async def start(self) -> None:
        """Raises NotImplementedError on a loop that cannot watch a file descriptor."""
        loop = asyncio.get_running_loop()
        binding = AsyncioBinding(self.core, loop)
        binding.on_failure = lambda exc: _failed(self.core, exc)
        self._binding = binding
        binding.start()
        self._sentinel = loop.create_task(self._stand(), name="fastworker-client")

    async def _stand(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            if not self._stopping:
                self._stop_binding()
                _hand_over_at_loop_end(self.core, self._end_timeout, "event loop")
            raise

    def _stop_binding(self) -> None:
        self.ended = True
        if self._binding is not None:
            self._binding.shutdown(0)

    def stop(self, timeout: float, heir_id: str) -> int:
        self._stopping = True
        sentinel = self._sentinel
        if sentinel is not None and not sentinel.done():
            if not sentinel.get_loop().is_closed():  # a closed loop cannot cancel (RuntimeError)
                sentinel.cancel()
            # It ends at the loop's next turn, which a loop closed now (or already)
            # never takes: asyncio would call it "destroyed but pending".
            with contextlib.suppress(AttributeError):
                sentinel._log_destroy_pending = False  # type: ignore[attr-defined]
        self._stop_binding()
        return _stop_here(self.core, timeout, heir_id)


class ThreadHost:
    """Runs the core's actor in a thread of its own with its own trio run."""

    ended = False  # the thread outlives its caller's loop: it is always stopped explicitly

    def __init__(self, core: ClientCore) -> None:
        self.core = core
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._timeout = 0.0
        self._left: int | None = None

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

        self._start_thread(signal)
        await ready

    def hand_over(self, timeout: float) -> int:
        """Run the actor only to hand over its unacknowledged tasks (blocking); what is left."""
        self._timeout = timeout
        self._start_thread(lambda error: None, stop_at_once=True)
        return self._join(timeout)

    def _start_thread(
        self, signal: Callable[[BaseException | None], None], *, stop_at_once: bool = False
    ) -> None:
        self._thread = threading.Thread(
            target=self._main, args=(signal, stop_at_once), name="fastworker-client", daemon=True
        )
        self._thread.start()

    def _main(self, signal: Callable[[BaseException | None], None], stop_at_once: bool) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            if stop_at_once:
                self._stop.set()
            actor = TrioClientActor(self.core, cross_thread=True)
            supervisor = Supervisor("client", [actor], max_restarts=5, within=10.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                signal(None)
                await self._stop.wait()
                self.core.fail_waiters(_STOPPED)
                self._left = await _hand_over(self.core, self._timeout)
                self.core.close_now(linger_ms=0)
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:
            _failed(self.core, exc)
            signal(exc)

    def stop(self, timeout: float) -> int:
        """Hand over (blocking at most ``timeout`` s), close, end the thread; what is left."""
        self._timeout = timeout
        if self._token is not None and self._stop is not None:
            try:
                self._token.run_sync_soon(self._stop.set)
            except trio.RunFinishedError:
                pass
        return self._join(timeout)

    def _join(self, timeout: float) -> int:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout + _WIND_DOWN)
            if thread.is_alive():
                log.warning(
                    "client thread did not finish within %.1f s of its hand-over", _WIND_DOWN
                )
        if self._left is None:  # the actor failed, or did not get that far
            return self.core.outstanding()
        return self._left
