"""Tests for fastworker.runtime._actor: mailbox, tell/send/ask, run loop, hooks."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import trio
import trio.testing

from fastworker._io import DeadlineTimer
from fastworker.runtime import (
    Actor,
    ActorError,
    ActorStatistics,
    ActorStopped,
    AskTimeout,
    MailboxFull,
)

pytestmark = pytest.mark.timeout(10)


class Boom(Exception):
    pass


class Recorder(Actor):
    """Records told messages; answers asks; raises on request."""

    def __init__(self, name: str = "rec", *, mailbox_size: int = 16) -> None:
        super().__init__(name, mailbox_size=mailbox_size)
        self.seen: list[Any] = []
        self.events: list[str] = []

    def receive(self, message: Any) -> Any:
        match message:
            case ("boom", text):
                raise Boom(text)
            case "get":
                return list(self.seen)
            case ("double", n):
                return 2 * n
            case _:
                self.seen.append(message)
                return None

    async def on_stop(self) -> None:
        self.events.append("on_stop")


async def test_tell_then_ask_returns_reply() -> None:
    actor = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            actor.ref.tell("a")
            await actor.ref.send("b")
            assert await actor.ref.ask(("double", 21)) == 42
            assert await actor.ref.ask("get") == ["a", "b"]
            actor.ref.stop()
    assert actor.statistics() == ActorStatistics(
        name="rec", mailbox_size=16, queued=0, processed=4, restarts=0
    )


async def test_ask_reraises_the_actors_exception_and_the_actor_keeps_serving() -> None:
    actor = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            with pytest.raises(Boom, match="for you") as info:
                await actor.ref.ask(("boom", "for you"))
            assert type(info.value) is Boom
            actor.ref.tell("after")
            assert await actor.ref.ask("get") == ["after"]
            actor.ref.stop()
    assert actor.events == ["on_stop"]


async def test_ask_past_its_timeout_raises_ask_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = Recorder("slowpoke")  # never run: nobody will answer
    start = trio.current_time()
    with trio.fail_after(60), pytest.raises(AskTimeout) as info:
        await actor.ref.ask(("double", 1), timeout=2.5)
    assert trio.current_time() - start == pytest.approx(2.5)
    message = str(info.value)
    assert "'slowpoke'" in message
    assert "tuple" in message
    assert "2.5 s" in message
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, ActorError)


async def test_ask_timeout_covers_waiting_for_room(autojump_clock: trio.testing.MockClock) -> None:
    actor = Recorder(mailbox_size=1)
    actor.ref.tell("fill")
    with trio.fail_after(60), pytest.raises(AskTimeout):
        await actor.ref.ask("get", timeout=1)
    assert actor.statistics().queued == 1


async def test_messages_to_a_stopped_actor_raise_actor_stopped() -> None:
    actor = Recorder("gone")
    actor.ref.stop()
    actor.ref.stop()  # idempotent
    assert actor.ref.stopped
    with pytest.raises(ActorStopped, match="'gone'"):
        actor.ref.tell("x")
    with trio.fail_after(5):
        with pytest.raises(ActorStopped, match="'gone'"):
            await actor.ref.send("x")
        with pytest.raises(ActorStopped, match="'gone'"):
            await actor.ref.ask("get")


async def test_pending_ask_fails_when_the_actor_stops_before_replying(
    caplog: pytest.LogCaptureFixture,
) -> None:
    actor = Recorder("quitter")  # not running, so the ask stays queued
    outcome: list[BaseException] = []

    async def asker() -> None:
        try:
            await actor.ref.ask("get")
        except ActorStopped as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(asker)
            await trio.testing.wait_all_tasks_blocked()
            actor.ref.tell("dropped")
            with caplog.at_level(logging.WARNING, logger="fastworker.runtime"):
                assert actor.close_mailbox() == 2
    assert len(outcome) == 1
    assert "'quitter'" in str(outcome[0])
    assert "actor quitter stopped with 2 unprocessed messages" in caplog.messages
    assert actor.close_mailbox() == 0  # idempotent
    with pytest.raises(ActorStopped):
        actor.ref.tell("late")


async def test_stop_on_a_full_mailbox_still_takes_effect() -> None:
    actor = Recorder(mailbox_size=2)
    actor.ref.tell("a")
    actor.ref.tell("b")
    blocked: list[BaseException] = []

    async def producer() -> None:
        try:
            await actor.ref.ask("get")  # waits for room
        except ActorStopped as exc:
            blocked.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            actor.ref.stop()
            # Already queued messages are still handled, then run returns.
            await actor.run()
    assert len(blocked) == 1
    assert actor.seen == ["a", "b"]
    assert actor.events == ["on_stop"]


async def test_tell_on_a_full_mailbox_raises_and_send_waits_for_room() -> None:
    actor = Recorder("busy", mailbox_size=2)
    actor.ref.tell(1)
    actor.ref.tell(2)
    with pytest.raises(MailboxFull, match=r"'busy' is full \(2 messages\)"):
        actor.ref.tell(3)
    sent = trio.Event()

    async def producer() -> None:
        await actor.ref.send(3)
        sent.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(producer)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            await nursery.start(actor.run)
            await sent.wait()
            assert await actor.ref.ask("get") == [1, 2, 3]
            actor.ref.stop()


async def test_queued_messages_are_handled_in_one_wake_up_in_fifo_order() -> None:
    # A task that bumps `ticks` whenever it is scheduled: if the actor yielded
    # to the scheduler between two messages, they would see different ticks.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    class Batcher(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.ticks: list[int] = []

        def receive(self, message: Any) -> Any:
            self.ticks.append(ticks)
            return super().receive(message)

    actor = Batcher()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            # Queued before the run starts: the loop finds them all at its first wake-up.
            for n in range(10):
                actor.ref.tell(n)
            await nursery.start(actor.run)
            await actor.ref.ask("get")
            actor.ref.stop()
            nursery.cancel_scope.cancel()
    assert actor.seen == list(range(10))
    assert len(actor.ticks) == 11
    assert len(set(actor.ticks[:10])) == 1


class Relay(Recorder):
    """Tells every message it gets to ``target`` (and to itself once, for "echo")."""

    def __init__(self, name: str, target: Actor | None = None) -> None:
        super().__init__(name)
        self.target = target

    def receive(self, message: Any) -> Any:
        if message == "echo":
            self.ref.tell("echoed")
        if self.target is not None and message != "get":
            self.target.ref.tell(message)
        return super().receive(message)


async def test_an_idle_actor_handles_a_told_message_before_tell_returns() -> None:
    last = Recorder("last")
    first = Relay("first", last)
    async with trio.open_nursery() as nursery:
        await nursery.start(last.run)
        await nursery.start(first.run)
        await trio.testing.wait_all_tasks_blocked()
        first.ref.tell("a")  # both idle: handled by both within this call
        assert first.seen == ["a"]
        assert last.seen == ["a"]
        assert last.statistics().processed == 1
        assert last.statistics().queued == 0
        # A tell from inside receive to the actor itself is handled right after
        # the message in hand, in the same call: one message at a time, in order.
        first.ref.tell("echo")
        assert first.seen == ["a", "echo", "echoed"]
        assert last.seen == ["a", "echo", "echoed"]
        # Once something waits in the mailbox (a post), later tells queue behind it.
        first.ref.post("posted")
        first.ref.tell("told")
        assert first.seen == ["a", "echo", "echoed"]
        assert await first.ref.ask("get") == ["a", "echo", "echoed", "posted", "told"]
        first.ref.stop()
        last.ref.stop()


async def test_post_and_a_busy_actor_go_through_the_mailbox_in_order() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        actor.ref.post(0)  # never handled within the call, even by an idle actor
        assert actor.seen == []
        # The loop was handed 0 and is due to run: the actor is not idle.
        actor.ref.tell(1)
        actor.ref.tell(2)
        assert actor.seen == []
        assert actor.statistics().queued == 2
        assert await actor.ref.ask("get") == [0, 1, 2]
        actor.ref.stop()


async def test_a_told_message_that_raises_when_idle_crashes_the_actor_not_the_teller() -> None:
    actor = Hooked()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            run_ended: list[BaseException] = []

            async def run() -> None:
                try:
                    await actor.run()
                except Boom as exc:
                    run_ended.append(exc)

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            actor.ref.tell(("boom", "idle"))  # does not raise here
            actor.ref.tell("kept")  # the actor is failing: this one waits in the mailbox
            await trio.testing.wait_all_tasks_blocked()
    assert [str(e) for e in run_ended] == ["idle"]
    assert actor.events == ["on_start", "helper done", "on_stop"]
    assert not actor.ref.stopped
    assert actor.statistics().queued == 1
    actor.ref.stop()
    with trio.fail_after(5):
        await actor.run()  # the next run (a supervisor's restart) gets what was told after
    assert actor.seen == ["kept"]


async def test_a_stopped_actor_takes_no_idle_delivery() -> None:
    actor = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        await trio.testing.wait_all_tasks_blocked()
        feed = actor.ref.open_feed()
        actor.ref.stop()
        feed.tell("after stop")  # a reader's hand-over still arrives, through the mailbox
        assert actor.seen == []
        feed.close()
    assert actor.seen == ["after stop"]


class Hooked(Recorder):
    """Starts a helper task in on_start and records how things end."""

    def __init__(self, *, helper_fails: bool = False, on_stop_hangs: bool = False) -> None:
        super().__init__("hooked")
        self.helper_fails = helper_fails
        self.on_stop_hangs = on_stop_hangs
        self.stop_timeout = 3.0

    async def on_start(self, nursery: trio.Nursery) -> None:
        self.events.append("on_start")
        await nursery.start(self._helper)

    async def _helper(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        try:
            if self.helper_fails:
                await trio.sleep(1)
                raise Boom("helper")
            await trio.sleep_forever()
        finally:
            self.events.append("helper done")

    async def on_stop(self) -> None:
        self.events.append("on_stop")
        if self.on_stop_hangs:
            await trio.sleep_forever()


async def test_stop_cancels_helpers_then_runs_on_stop_and_closes_mailbox() -> None:
    actor = Hooked()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            actor.ref.tell("x")
            actor.ref.stop()
    assert actor.events == ["on_start", "helper done", "on_stop"]
    assert actor.seen == ["x"]
    with pytest.raises(ActorStopped):
        actor.ref.tell("y")


async def test_crash_on_a_told_message_raises_it_and_keeps_the_mailbox() -> None:
    actor = Hooked()
    actor.ref.tell(("boom", "told"))
    actor.ref.tell("kept")
    with trio.fail_after(5), pytest.raises(Boom, match="told"):
        await actor.run()
    assert actor.events == ["on_start", "helper done", "on_stop"]
    assert not actor.ref.stopped
    assert actor.statistics().queued == 1
    # A second run (what a supervisor does) sees the message queued before.
    actor.ref.stop()
    with trio.fail_after(5):
        await actor.run()
    assert actor.seen == ["kept"]
    assert actor.statistics().restarts == 1


async def test_a_failing_helper_crashes_the_actor(autojump_clock: trio.testing.MockClock) -> None:
    actor = Hooked(helper_fails=True)
    with trio.fail_after(60), pytest.raises(Boom, match="helper"):
        await actor.run()
    assert actor.events == ["on_start", "helper done", "on_stop"]


async def test_cancellation_runs_on_stop_bounded_by_stop_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    actor = Hooked(on_stop_hangs=True)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            start = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(actor.stop_timeout)
    assert actor.events == ["on_start", "helper done", "on_stop"]
    assert "on_stop of actor hooked did not finish within 3.0 s" in caplog.messages
    # Cancellation is not a stop: the mailbox stays open for whoever owns it.
    assert not actor.ref.stopped


async def test_a_failing_on_stop_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class BadStop(Recorder):
        async def on_stop(self) -> None:
            raise Boom("cleanup")

    actor = BadStop("bad")
    actor.ref.stop()
    with trio.fail_after(5):
        await actor.run()
    assert "on_stop of actor bad failed" in caplog.messages


async def test_run_refuses_a_second_concurrent_run() -> None:
    actor = Recorder()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            with pytest.raises(RuntimeError, match="already running"):
                await actor.run()
            actor.ref.stop()


def test_base_receive_and_mailbox_size_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Actor("zero", mailbox_size=0)
    with pytest.raises(NotImplementedError):
        Actor("plain").receive("x")


class TimedRecorder(Recorder):
    """A Recorder with a DeadlineTimer that tells it ("due", time) when it fires."""

    def __init__(self) -> None:
        super().__init__("timed")
        self.timer = DeadlineTimer(self.ref, "due")

    async def on_start(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.timer.run)

    def receive(self, message: Any) -> Any:
        if message == "due":
            self.seen.append(("due", trio.current_time()))
            return None
        return super().receive(message)


async def test_a_deadline_timer_fires_once_at_its_latest_due_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actor = TimedRecorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        start = trio.current_time()
        actor.timer.set(start + 5)
        actor.timer.set(start + 8)  # moved later: only this one counts
        await trio.sleep(20)
        assert actor.seen == [("due", start + 8)]
        assert actor.timer.due == math.inf  # fired: not armed any more

        actor.timer.set(trio.current_time() + 1)
        actor.timer.set(math.inf)  # disarmed before it fired
        await trio.sleep(20)
        assert len(actor.seen) == 1
        actor.ref.stop()


async def test_the_idle_check_counts_the_tasks_waiting_in_receive_as_trio_does() -> None:
    """Idle delivery's check agrees with trio's statistics, through its cheap table or not."""
    from fastworker.runtime._actor import _receivers_counter

    class WithoutTable:
        """A channel whose internals this trio does not have: the statistics answer."""

        def __init__(self, inbox: trio.MemoryReceiveChannel[object]) -> None:
            self._inbox = inbox

        def statistics(self) -> Any:
            return self._inbox.statistics()

    send, inbox = trio.open_memory_channel[object](4)
    fast = _receivers_counter(inbox)
    slow = _receivers_counter(WithoutTable(inbox))  # type: ignore[arg-type]
    # This trio has the table: the check does not build statistics objects.
    assert getattr(fast, "__self__", None) is inbox._state.receive_tasks
    assert fast() == slow() == inbox.statistics().tasks_waiting_receive == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.receive)
        await trio.testing.wait_all_tasks_blocked()
        assert fast() == slow() == inbox.statistics().tasks_waiting_receive == 1
        send.send_nowait("handed over")  # straight to the waiting task
        assert fast() == slow() == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(inbox.receive)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()  # an aborted receive stops counting at once
        assert fast() == slow() == 0
