"""Actors: a mailbox, a synchronous handler and a run loop on trio.

An :class:`Actor` owns a mailbox (a trio memory channel) and handles its
messages one at a time in :meth:`Actor.receive`. Others hold its
:class:`ActorRef` and talk to it with :meth:`~ActorRef.tell` (fire and
forget), :meth:`~ActorRef.send` (wait for room) or :meth:`~ActorRef.ask`
(request/reply).

The mailbox belongs to the actor, not to one run of it: when a run crashes the
mailbox stays open, so a supervisor can start the next run on the same
messages. Only a graceful stop or :meth:`Actor.close_mailbox` ends it.

**Stopping.** :meth:`ActorRef.stop` closes the *sending* side of the mailbox.
Nothing new gets in (``tell``/``send``/``ask`` raise :class:`ActorStopped`,
and so do producers blocked in ``send`` on a full mailbox), while everything
already queued is still delivered, and the run loop ends when trio reports the
end of the channel. We chose closing over a sentinel message because it needs
no room in the mailbox: a stop on a full mailbox takes effect at once, lands
exactly behind the messages already queued, and costs the loop no per-message
check.

**Idle delivery.** A ``tell`` to an actor that is idle (its loop waits
for mail and nothing is queued) runs its ``receive`` at once, in the
teller's task, instead of queueing the message and waking the loop a
scheduling batch later.  Each hop between actors would otherwise cost a
turn of trio's run loop, and a task's round trip crosses five of them
(design/performance.md).  The actor sees the same thing either way: one
message at a time, in the order told; a ``receive`` that raises crashes
the actor, not the teller.  What is told to it during such a delivery (by
itself, or by an actor it told) is handled right after, in the same call,
for at most the drain budget.  A busy actor, a stopped one, an ``ask``, an
awaited ``send`` and ``post`` always go through the mailbox.

**Feeds.** A socket reader is a helper whose input was sent *before* a stop
but may still sit in its socket. It takes a :class:`Feed` (``ref.open_feed()``),
its own clone of the mailbox's sending side: a stop ends the feed's pending
read (``Feed.on_stop``), the reader hands over what its socket already holds and closes the feed,
and the run ends only once every feed is closed (trio ends a channel when its
last sending clone closes). So a graceful stop handles what peers sent before
it instead of closing the socket on it.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

__all__ = [
    "Actor",
    "ActorError",
    "ActorRef",
    "ActorStatistics",
    "ActorStopped",
    "AskTimeout",
    "Feed",
    "GetStatistics",
    "MailboxFull",
]

logger = logging.getLogger("fastworker.runtime")

# Longest stretch an actor handles already-queued messages without yielding.
_DRAIN_BUDGET = 0.005


class ActorError(Exception):
    """Base class of the errors raised by the actor runtime."""


class MailboxFull(ActorError):
    """``tell`` found the mailbox full: the actor is not keeping up.

    Producers that can wait should use :meth:`ActorRef.send` instead.
    """


class ActorStopped(ActorError):
    """The actor no longer accepts messages, or stopped before it replied."""


class AskTimeout(ActorError, TimeoutError):
    """The actor did not reply to an ``ask`` within its timeout."""


@attrs.frozen
class ActorStatistics:
    """A snapshot of one actor, as returned by :meth:`Actor.statistics`."""

    name: str
    mailbox_size: int
    queued: int
    processed: int
    restarts: int


@attrs.frozen
class GetStatistics:
    """Asks an actor for its counters; the reply is a JSON-ready dict.

    One message type that every actor of a node answers, so a gatherer asks
    them all alike, and a typo is a ``TypeError`` instead of a silent miss.
    """


# Told to a parked loop after an idle delivery it must follow up: a failure to
# raise, or messages told meanwhile that it owes before its mailbox.
_WAKE = object()


def _receivers_counter(inbox: trio.MemoryReceiveChannel[object]) -> Callable[[], int]:
    """How many tasks wait in ``inbox.receive()`` (trio hands a sent message to one at once).

    ``statistics().tasks_waiting_receive`` says it, but builds a statistics
    object on every call, and idle delivery asks on every ``tell``
    (design/performance.md).  The channel's table of waiting receivers,
    read directly where this trio has it, says the same for a tenth of the
    cost; otherwise the statistics.
    """
    receivers = getattr(getattr(inbox, "_state", None), "receive_tasks", None)
    if isinstance(receivers, collections.OrderedDict):
        return receivers.__len__
    return lambda: inbox.statistics().tasks_waiting_receive


class _Ask:
    """The envelope of an ``ask``: the message plus a one-shot reply slot.

    The asking task parks itself with trio's low-level primitives instead of a
    :class:`trio.Event`, which saves an event and its parking lot per ask. The
    reply may be settled before the asker parks (the actor can run while the
    asker is still in ``send``), hence the ``done`` flag.
    """

    __slots__ = ("_error", "_task", "_value", "done", "message")

    def __init__(self, message: object) -> None:
        self.message = message
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._task: trio.lowlevel.Task | None = None

    def resolve(self, value: object) -> None:
        if not self.done:
            self.done = True
            self._value = value
            self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)

    def _abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # The asker was cancelled (usually its timeout): forget it, so that a
        # late reply has nobody to wake.
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        """Park until the reply is settled. Not a checkpoint if it already is."""
        if not self.done:
            self._task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)

    def result(self) -> Any:
        """Return the reply, or raise the error the actor settled it with."""
        error = self._error
        if error is not None:
            # Drop our reference so the traceback does not keep the envelope
            # (and everything its frames hold) alive in a cycle.
            self._error = None
            raise error
        return self._value


class Feed:
    """A helper's own way into its actor's mailbox, open through a graceful stop.

    Made by :meth:`ActorRef.open_feed`. Use it as a context manager: the
    actor's run does not end after a stop until the feed is closed. Between
    :meth:`ActorRef.stop` and :meth:`close` the feed still delivers, so the
    helper can hand over what it already took in; :attr:`stopping` tells it
    to finish, and the stop calls what :meth:`on_stop` registered (a socket
    reader's "return from the pending read").
    """

    __slots__ = ("_on_stop", "_ref", "_send", "stopping")

    def __init__(self, ref: ActorRef, send: trio.MemorySendChannel[object]) -> None:
        self._ref = ref
        self._send = send
        self._on_stop: Callable[[], object] | None = None
        self.stopping = False

    def on_stop(self, interrupt: Callable[[], object]) -> None:
        """Have the actor's stop call ``interrupt`` (at once if it already happened).

        For ending a pending wait for input without a cancel scope around
        every wait: a reader's socket returns from its read, and the reader
        sees :attr:`stopping`.
        """
        self._on_stop = interrupt
        if self.stopping:
            interrupt()

    def _stop(self) -> None:
        self.stopping = True
        if self._on_stop is not None:
            self._on_stop()

    def tell(self, message: object) -> None:
        """As :meth:`ActorRef.tell`, also after the actor was asked to stop."""
        handle_now = self._ref._handle_now
        if handle_now is not None and handle_now(message):
            return
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(f"mailbox of actor {self._ref.name!r} is full") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._ref._stopped_error() from None

    async def send(self, message: object) -> None:
        """As :meth:`ActorRef.send`, also after the actor was asked to stop."""
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._ref._stopped_error() from None

    def keep(self, message: object) -> None:
        """Hand ``message`` to the actor's next run, after what its mailbox holds now.

        For a helper cancelled (its actor crashed) while waiting for room:
        what it took in is not lost with it.
        """
        self._ref._tail.append(message)

    def close(self) -> None:
        """Done handing over: once every feed is closed, a stopped actor's run ends."""
        self._ref._feeds.discard(self)
        self._send.close()

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActorRef:
    """Handle others use to talk to an actor.

    Stays valid across restarts: the mailbox outlives one run of the actor.
    Refs are created by :class:`Actor`; do not construct them yourself.
    """

    __slots__ = ("_capacity", "_feeds", "_handle_now", "_send", "_stopped", "_tail", "name")

    def __init__(self, name: str, send: trio.MemorySendChannel[object], capacity: int) -> None:
        self.name = name
        self._send = send
        self._capacity = capacity
        self._stopped = False
        self._feeds: set[Feed] = set()
        # Messages helpers could not queue before a crash (Feed.keep): the next
        # run handles them once its mailbox is empty.
        self._tail: list[object] = []
        # Set by the actor: handles a told message in the teller's task when
        # the actor is idle (see "Idle delivery" in the module docstring).
        self._handle_now: Callable[[object], bool] | None = None

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "open"
        return f"<ActorRef {self.name!r} {state}>"

    def _stopped_error(self) -> ActorStopped:
        return ActorStopped(f"actor {self.name!r} is stopped")

    def tell(self, message: object) -> None:
        """Queue ``message`` without waiting.

        Raises :class:`MailboxFull` if the mailbox has no room and
        :class:`ActorStopped` if it is closed. If the actor's ``receive``
        raises for this message, the actor crashes (its supervisor decides
        what happens next); the sender is not told.

        An idle actor handles the message before ``tell`` returns (see the
        module docstring); otherwise it waits in the mailbox.
        """
        handle_now = self._handle_now
        if handle_now is not None and handle_now(message):
            return
        self.post(message)

    def post(self, message: object) -> None:
        """As :meth:`tell`, but always through the mailbox: handled at the actor's next turn.

        Never before this returns, even when the actor is idle: for a wake-up
        that should gather what the caller does until it yields (a burst of
        submissions sent as one message).
        """
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            raise MailboxFull(
                f"mailbox of actor {self.name!r} is full ({self._capacity} messages)"
            ) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._stopped_error() from None

    async def send(self, message: object) -> None:
        """Queue ``message``, waiting for room if the mailbox is full.

        This is the backpressure path for producers such as socket readers.
        Raises :class:`ActorStopped` if the mailbox is closed, including while
        waiting for room. Cancellation never leaves the message half-sent.
        """
        try:
            await self._send.send(message)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise self._stopped_error() from None

    # A deadline per ask is the point of ask (pykka's shape), hence the noqa.
    async def ask(self, message: object, timeout: float = 5.0) -> Any:
        """Send ``message`` and return what the actor's ``receive`` returned.

        If ``receive`` raised an :class:`Exception`, that same exception is
        raised here, in the asker's task, and the actor keeps running. The
        ``timeout`` (seconds, on trio's clock) covers waiting for room in the
        mailbox and for the reply; past it, :class:`AskTimeout` is raised. An
        actor that times out an ask still handles the message later: the reply
        is then dropped. Raises :class:`ActorStopped` if the actor is stopped,
        or if its mailbox is closed before it replies.
        """
        envelope = _Ask(message)
        try:
            with trio.fail_after(timeout):
                await self.send(envelope)
                await envelope.wait()
        except trio.TooSlowError:
            # The reply may have landed in the same tick as the deadline.
            if not envelope.done:
                raise AskTimeout(
                    f"actor {self.name!r} did not reply to {type(message).__name__} "
                    f"within {timeout} s"
                ) from None
        return envelope.result()

    def open_feed(self) -> Feed:
        """A :class:`Feed` into this mailbox for a helper task (a socket reader).

        Raises :class:`ActorStopped` if the actor is already stopped.
        """
        try:
            send = self._send.clone()
        except trio.ClosedResourceError:
            raise self._stopped_error() from None
        feed = Feed(self, send)
        self._feeds.add(feed)
        return feed

    def stop(self) -> None:
        """Ask the actor to stop once it has handled what is already queued.

        Closes the sending side of the mailbox (see the module docstring), so
        it works even on a full mailbox, and tells every open :class:`Feed` to
        finish: the run ends once they are closed. Idempotent.
        """
        self._stopped = True
        self._send.close()
        for feed in list(self._feeds):
            feed._stop()

    @property
    def stopped(self) -> bool:
        """True once the mailbox accepts no more messages.

        That is, after :meth:`stop` or :meth:`Actor.close_mailbox`; queued
        messages may still be in the middle of being handled.
        """
        return self._stopped


class Actor:
    """Base class of actors.

    Subclasses call ``super().__init__(name, mailbox_size=...)`` and implement
    :meth:`receive`; they may override :meth:`on_start` and :meth:`on_stop`.
    ``stop_timeout`` (seconds) bounds :meth:`on_stop`.

    The runtime's own state uses double-underscore names so it cannot collide
    with the single-underscore attributes of subclasses.
    """

    name: str
    ref: ActorRef
    stop_timeout: float = 5.0

    def __init__(self, name: str, *, mailbox_size: int = 1024) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size must be at least 1, got {mailbox_size}")
        self.name = name
        send, inbox = trio.open_memory_channel[object](mailbox_size)
        self.ref = ActorRef(name, send, mailbox_size)
        self.__inbox = inbox
        # Owed before the mailbox: a crashed batch's leftover (__keep_leftover), and
        # what was told during an idle delivery that could not finish (__handle_now).
        self.__first: collections.deque[object] = collections.deque()
        self.__mailbox_size = mailbox_size
        self.__processed = 0
        self.__runs = 0
        self.__running = False
        # True while the run loop waits in ``inbox.receive()``: see __handle_now.
        self.__parked = False
        # An idle delivery is under way (further up the stack): see __handle_now.
        self.__handling_now = False
        self.__told_meanwhile: collections.deque[object] = collections.deque()
        # What an idle delivery's ``receive`` raised, for the run loop to raise.
        self.__failure_now: Exception | None = None
        self.__loop_waits = _receivers_counter(inbox)
        self.ref._handle_now = self.__handle_now

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    async def on_start(self, nursery: trio.Nursery) -> None:
        """Open resources and start helper tasks in ``nursery``.

        ``nursery`` belongs to this run: its tasks are cancelled when the run
        ends, and one that raises crashes the actor. The actor is reported
        started (and handles messages) only after this returns.
        """

    async def on_stop(self) -> None:
        """Release resources. Awaited at the end of every run, however it ended.

        Runs after the helper tasks are gone, shielded from cancellation but
        bounded by ``stop_timeout``. An exception here is logged, not raised:
        it must neither hide the reason the run ended nor turn a clean stop
        into a crash.
        """

    def receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to an ``ask``.

        Synchronous on purpose: an actor handles one message at a time and
        never blocks its mailbox. Work that must await belongs in a helper
        task started from :meth:`on_start`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement receive()")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the actor once: start it, handle messages until stopped.

        Returns normally when a :meth:`ActorRef.stop` took effect, after
        closing the mailbox. Raises the exception of a crash: ``receive``
        raising for a told message (that message is consumed), or an
        ``on_start``/helper-task failure. A single exception is raised as
        itself, not wrapped in an exception group. After a crash the mailbox
        stays open so that a restart loses no message. :meth:`on_stop` is
        awaited in every case.
        """
        if self.__running:
            raise RuntimeError(f"actor {self.name!r} is already running")
        self.__running = True
        self.__runs += 1
        try:
            failure: BaseException | None = None
            try:
                async with trio.open_nursery() as nursery:
                    await self.on_start(nursery)
                    task_status.started()
                    await self.__loop()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # trio's nurseries always wrap; a crash nearly always has one
                # cause, and the supervisor (and users) want that exception
                # itself, the same object, to match on. Several stay grouped.
                if len(group.exceptions) != 1:
                    raise
                failure = group.exceptions[0]
            if failure is not None:
                raise failure
            self.close_mailbox()
        finally:
            self.__running = False
            with trio.move_on_after(self.stop_timeout, shield=True) as scope:
                await self.__on_stop()
            if scope.cancelled_caught:
                logger.warning(
                    "on_stop of actor %s did not finish within %s s",
                    self.name,
                    self.stop_timeout,
                    extra={"actor": self.name},
                )

    async def __on_stop(self) -> None:
        try:
            await self.on_stop()
        except Exception:
            logger.exception("on_stop of actor %s failed", self.name, extra={"actor": self.name})

    async def __loop(self) -> None:
        # The hot path. Each wake-up takes one message with a (checkpointing)
        # receive, then drains whatever else is queued without yielding — but
        # for at most _DRAIN_BUDGET seconds, so that a burst to one actor never
        # starves the others of the same process (heartbeats must keep flowing
        # while the scheduler chews through a million submissions).
        inbox = self.__inbox
        receive_nowait = inbox.receive_nowait
        handle = self.receive
        clock = time.perf_counter
        tail = self.ref._tail
        first = self.__first
        while True:
            self.__raise_failure_now()
            if first:
                # What a crashed run left of its last message, or what an idle
                # delivery could not finish, comes before the mailbox.
                message = first.popleft()
            elif tail:
                # A helper's message that found no room before the last crash:
                # once the mailbox queued before it is handled.
                try:
                    message = receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    message = tail.pop(0)
            else:
                self.__parked = True
                try:
                    message = await inbox.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    self.__raise_failure_now()
                    if first:
                        continue  # accepted before the stop: handled before the end
                    return
                finally:
                    self.__parked = False
            deadline = clock() + _DRAIN_BUDGET
            while True:
                if message is _WAKE:
                    break  # the next turn raises the failure or takes what is owed
                if type(message) is _Ask:
                    try:
                        reply = handle(message.message)
                    except Exception as exc:
                        message.fail(exc)
                    except BaseException:
                        message.fail(ActorStopped(f"actor {self.name!r} stopped before replying"))
                        raise
                    else:
                        message.resolve(reply)
                else:
                    try:
                        handle(message)
                    except Exception:
                        self.__keep_leftover(message)
                        raise
                self.__processed += 1
                if clock() > deadline:
                    break  # yield: the next receive() is a checkpoint
                if first:
                    message = first.popleft()
                    continue
                try:
                    message = receive_nowait()
                except trio.WouldBlock:
                    break
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    if tail:
                        break
                    return

    def __handle_now(self, message: object) -> bool:
        """Handle a told ``message`` in the teller's task if this actor is idle; else False.

        Idle: the run loop is parked in ``inbox.receive()`` and trio has not
        handed it a message yet (so the mailbox is empty and nothing told
        before is still on its way), no stop was asked, and no earlier
        failure waits to be raised.  ``receive`` is synchronous, so nothing
        else of this actor can run meanwhile: the result is what the loop
        would have done one scheduling batch later.  An exception does not
        reach the teller: it is kept, and the loop is woken to raise it in
        the actor's own task, so the actor crashes as if it had handled the
        message itself.
        """
        if self.__handling_now:
            # Told from inside that delivery (by this actor, or by one it told):
            # handled right after the message in hand, in the same call, unless
            # something was posted or asked meanwhile (then the mailbox keeps the order).
            if self.ref._stopped or not self.__loop_waits():
                return False
            self.__told_meanwhile.append(message)
            return True
        if (
            not self.__parked
            or self.ref._stopped
            or self.__failure_now is not None
            or not self.__loop_waits()
        ):
            return False
        self.__parked = False
        self.__handling_now = True
        told = self.__told_meanwhile
        deadline = 0.0  # read the clock only if something was told meanwhile
        try:
            while True:
                try:
                    self.receive(message)
                except Exception as exc:
                    self.__processed += 1
                    self.__keep_leftover(message)
                    self.__failure_now = exc
                    self.__owe(told)
                    return True
                self.__processed += 1
                if not told:
                    break
                if not deadline:
                    deadline = time.perf_counter() + _DRAIN_BUDGET
                elif time.perf_counter() > deadline:
                    self.__owe(told)  # the loop takes over, yielding as it goes
                    return True
                message = told.popleft()
            self.__parked = True
            return True
        finally:
            self.__handling_now = False

    def __owe(self, told: collections.deque[object]) -> None:
        """Leave what was told meanwhile to the loop, ahead of its mailbox, and wake it.

        If the wake cannot be queued the mailbox is full or closing, and the
        loop wakes anyway and finds what it owes.
        """
        self.__first.extend(told)
        told.clear()
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self.ref._send.send_nowait(_WAKE)

    def __raise_failure_now(self) -> None:
        failure = self.__failure_now
        if failure is not None:
            self.__failure_now = None
            raise failure

    def __keep_leftover(self, message: object) -> None:
        """A told batch whose handler raised: keep what it had not reached for the next run.

        A message with a ``leftover()`` method (an ``Inbound`` batch of frames)
        says what is left after the item that failed; the failing item alone
        is lost (the crash is logged, the supervisor restarts the actor).
        """
        leftover = getattr(message, "leftover", None)
        if callable(leftover):
            rest = leftover()
            if rest is not None:
                self.__first.appendleft(rest)

    def close_mailbox(self) -> int:
        """Close the mailbox for good and return how many messages were dropped.

        Every queued ``ask`` fails with :class:`ActorStopped`; queued tells
        are dropped, with a warning when there were any. Call it when the
        actor is finally done and not running (a supervisor does this for its
        children). Idempotent.
        """
        self.ref.stop()
        inbox = self.__inbox
        dropped = len(self.ref._tail) + len(self.__first)
        self.ref._tail.clear()
        self.__first.clear()
        while True:
            try:
                message = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if type(message) is _Ask:
                message.fail(ActorStopped(f"actor {self.name!r} stopped before replying"))
            dropped += message is not _WAKE
        inbox.close()
        if dropped:
            logger.warning(
                "actor %s stopped with %d unprocessed messages",
                self.name,
                dropped,
                extra={"actor": self.name},
            )
        return dropped

    def statistics(self) -> ActorStatistics:
        """Return a snapshot of the mailbox and counters.

        ``restarts`` counts the runs after the first, whoever started them.
        """
        return ActorStatistics(
            name=self.name,
            mailbox_size=self.__mailbox_size,
            queued=self.__inbox.statistics().current_buffer_used,
            processed=self.__processed,
            restarts=max(0, self.__runs - 1),
        )
