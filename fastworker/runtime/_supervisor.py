"""One-for-one supervision of actors (and of other supervisors) on trio.

A :class:`Supervisor` runs its children in one nursery. A child that crashes
is restarted on its own, with the same mailbox, so messages queued while it
was down are kept. A child that crashes too often (more than ``max_restarts``
restarts within ``within`` seconds) is given up on: the supervisor raises the
child's original exception, which cancels the siblings and hands the decision
to whoever runs the supervisor, typically a parent supervisor.

**Who closes mailboxes.** A mailbox is closed when its actor is finally done,
and only the supervisor that decides so closes it: a child that stopped, or
that was cancelled by :meth:`Supervisor.stop`, is closed by its supervisor at
once. When a supervisor itself crashes or is cancelled, a nested one leaves
its children's mailboxes open (its parent may restart it, and then no message
is lost); the outermost one closes every mailbox below it, failing pending
asks with :class:`~fastworker.runtime.ActorStopped`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence

import attrs
import trio

from ._actor import Actor

__all__ = ["Supervisor", "SupervisorStatistics"]

logger = logging.getLogger("fastworker.runtime")


@attrs.frozen
class SupervisorStatistics:
    """A snapshot of a supervisor: restarts so far, per child name."""

    name: str
    restarts: dict[str, int]


class _WatchStarted:
    """Forwards ``task_status.started()`` and remembers that it happened.

    The supervisor needs to tell a failure to start (fatal, like OTP's failed
    init) from a crash after start (restarted).
    """

    __slots__ = ("_inner", "started_called")

    def __init__(self, inner: trio.TaskStatus[None]) -> None:
        self._inner = inner
        self.started_called = False

    def started(self, value: None = None) -> None:
        self.started_called = True
        self._inner.started()


class _Slot:
    """A child during one run of its supervisor."""

    __slots__ = ("child", "done", "scope", "stopping")

    def __init__(self, child: Actor | Supervisor) -> None:
        self.child = child
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.stopping = False


def _stop(child: Actor | Supervisor) -> None:
    if isinstance(child, Actor):
        child.ref.stop()
    else:
        child.stop()


def _close(child: Actor | Supervisor) -> int:
    if isinstance(child, Actor):
        return child.close_mailbox()
    return child._close_mailboxes()


class Supervisor:
    """One-for-one supervision of children in a nursery, with OTP-style restart intensity.

    Children are actors or other supervisors, each with a unique name. Restart
    intensity is counted per child, on trio's clock.
    """

    name: str
    _nested: bool

    def __init__(
        self,
        name: str,
        children: Sequence[Actor | Supervisor],
        *,
        max_restarts: int = 3,
        within: float = 5.0,
        shutdown_timeout: float = 5.0,
    ) -> None:
        names = [child.name for child in children]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"supervisor {name!r}: duplicate child names {duplicates}")
        if max_restarts < 0 or within <= 0 or shutdown_timeout < 0:
            raise ValueError(
                f"supervisor {name!r}: need max_restarts >= 0, within > 0, shutdown_timeout >= 0"
            )
        self.name = name
        self.max_restarts = max_restarts
        self.within = within
        self.shutdown_timeout = shutdown_timeout
        self._children = tuple(children)
        for child in self._children:
            if isinstance(child, Supervisor):
                child._nested = True
        self._nested = False
        self._restarts = dict.fromkeys(names, 0)
        self._recent: dict[str, deque[float]] = {n: deque() for n in names}
        self._slots: list[_Slot] = []
        self._nursery: trio.Nursery | None = None
        self._started = False
        self._stop_requested = False
        self._shutdown_spawned = False

    def __repr__(self) -> str:
        return f"<Supervisor {self.name!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, then supervise them until all are done.

        Each child is started with ``nursery.start``, so the next one starts
        only once the previous one is ready; ``task_status.started()`` follows
        the last. A child that fails before it is started is not restarted:
        its exception is raised here. Returns when every child has finished,
        normally after :meth:`stop`. Raises the original exception of a child
        given up on (as itself, unless several failed at once).
        """
        if self._nursery is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already running")
        for recent in self._recent.values():
            recent.clear()  # a new run gets a fresh restart budget, as in OTP
        self._slots = []
        self._started = False
        self._shutdown_spawned = False
        try:
            failure: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    for child in self._children:
                        slot = _Slot(child)
                        self._slots.append(slot)
                        await nursery.start(self._supervise, slot)
                    self._started = True
                    task_status.started()
                    if self._stop_requested:
                        self._spawn_shutdown()
            except BaseExceptionGroup as group:
                # As in Actor.run: hand back the child's own exception.
                if len(group.exceptions) != 1:
                    raise
                failure = group.exceptions[0]
            if failure is not None:
                raise failure
        finally:
            self._nursery = None
            self._started = False
            if not self._nested:
                self._close_mailboxes()

    async def _supervise(
        self, slot: _Slot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        child = slot.child
        watch = _WatchStarted(task_status)
        status: trio.TaskStatus[None] = watch
        try:
            with slot.scope:
                while True:
                    try:
                        await child.run(task_status=status)
                        break
                    except Exception as exc:
                        if not watch.started_called:
                            exc.add_note(
                                f"actor {child.name!r} failed to start "
                                f"under supervisor {self.name!r}"
                            )
                            raise
                        if slot.stopping:
                            logger.exception(
                                "actor %s crashed while stopping",
                                child.name,
                                extra={"actor": child.name},
                            )
                            break
                        logger.exception(
                            "actor %s crashed", child.name, extra={"actor": child.name}
                        )
                        if not self._may_restart(child.name):
                            exc.add_note(
                                f"supervisor {self.name!r} gave up on {child.name!r}: restart "
                                f"intensity exceeded (more than {self.max_restarts} restarts "
                                f"within {self.within} s)"
                            )
                            raise
                        status = trio.TASK_STATUS_IGNORED
            # Finished for good: stopped, crashed while stopping, or cancelled
            # by our own shutdown (the scope swallowed that cancellation).
            _close(child)
        finally:
            slot.done.set()

    def _may_restart(self, name: str) -> bool:
        """Record a restart of ``name`` unless that exceeds the intensity."""
        now = trio.current_time()
        recent = self._recent[name]
        while recent and recent[0] <= now - self.within:
            recent.popleft()
        if len(recent) >= self.max_restarts:
            return False
        recent.append(now)
        self._restarts[name] += 1
        return True

    def stop(self) -> None:
        """Stop the children gracefully, in reverse start order; ``run`` then returns.

        Each child in turn is asked to stop (an actor finishes what is already
        in its mailbox), given ``shutdown_timeout`` seconds, then cancelled.
        A child that crashes while stopping is logged, not restarted.
        Synchronous, so it can be called from a message handler; the shutdown
        itself runs as a task in the supervisor's nursery. Called before or
        during startup, it takes effect once all children have started.
        Idempotent.
        """
        self._stop_requested = True
        if self._started:
            self._spawn_shutdown()

    def _spawn_shutdown(self) -> None:
        if self._shutdown_spawned or self._nursery is None:
            return
        # With every child already done the nursery may be closing, and there
        # is nothing left to stop.
        if all(slot.done.is_set() for slot in self._slots):
            return
        self._shutdown_spawned = True
        self._nursery.start_soon(self._shutdown)

    async def _shutdown(self) -> None:
        for slot in reversed(self._slots):
            if slot.done.is_set():
                continue
            slot.stopping = True
            _stop(slot.child)
            with trio.move_on_after(self.shutdown_timeout):
                await slot.done.wait()
            if not slot.done.is_set():
                logger.warning(
                    "actor %s did not stop within %s s; cancelling it",
                    slot.child.name,
                    self.shutdown_timeout,
                    extra={"actor": slot.child.name},
                )
                slot.scope.cancel()
                await slot.done.wait()

    def _close_mailboxes(self) -> int:
        """Close the mailboxes of every actor below this supervisor."""
        return sum(_close(child) for child in self._children)

    def statistics(self) -> SupervisorStatistics:
        """Return the restarts so far per child name, over all runs."""
        return SupervisorStatistics(name=self.name, restarts=dict(self._restarts))
