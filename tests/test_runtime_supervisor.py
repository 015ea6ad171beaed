"""Tests for fastworker.runtime._supervisor: one-for-one restarts, intensity, shutdown."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from fastworker.runtime import ActorStopped, Supervisor, SupervisorStatistics
from fastworker.runtime._actor import Actor

pytestmark = pytest.mark.timeout(10)


class Boom(Exception):
    pass


class Worker(Actor):
    """Records messages and lifecycle events into a log shared by a test."""

    def __init__(
        self, name: str, log: list[str] | None = None, *, on_stop_hangs: bool = False
    ) -> None:
        super().__init__(name, mailbox_size=64)
        self.log = [] if log is None else log
        self.seen: list[Any] = []
        self.errors: list[Boom] = []
        self.on_stop_hangs = on_stop_hangs
        self.stop_timeout = 2.0

    def receive(self, message: Any) -> Any:
        if message == "boom":
            error = Boom(f"{self.name} exploded #{len(self.errors) + 1}")
            self.errors.append(error)
            raise error
        if message == "get":
            return list(self.seen)
        self.seen.append(message)
        return None

    async def on_start(self, nursery: trio.Nursery) -> None:
        self.log.append(f"start {self.name}")

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")
        if self.on_stop_hangs:
            await trio.sleep_forever()


async def test_a_crashed_child_is_restarted_with_its_queued_messages(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker("w")
    sup = Supervisor("sup", [worker, Worker("other")])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            # Queued in one go: the crash happens with "a" and "b" still queued.
            worker.ref.tell("boom")
            worker.ref.tell("a")
            worker.ref.tell("b")
            assert await worker.ref.ask("get") == ["a", "b"]
            sup.stop()
    assert sup.statistics() == SupervisorStatistics(name="sup", restarts={"w": 1, "other": 0})
    assert worker.statistics().restarts == 1
    crashes = [r for r in caplog.records if r.getMessage() == "actor w crashed"]
    assert len(crashes) == 1
    assert crashes[0].exc_info is not None
    assert crashes[0].exc_info[1] is worker.errors[0]


async def test_crashing_past_the_intensity_raises_the_original_error() -> None:
    log: list[str] = []
    worker = Worker("w", log)
    sibling = Worker("sibling", log)
    sup = Supervisor("sup", [sibling, worker], max_restarts=2)
    for _ in range(3):
        worker.ref.tell("boom")
    worker.ref.tell("never handled")
    with trio.fail_after(5), pytest.raises(Boom) as info:
        await sup.run()
    # The same object the child raised, unwrapped, with a note saying why.
    assert info.value is worker.errors[-1]
    assert str(info.value) == "w exploded #3"
    assert any("restart intensity exceeded" in note for note in info.value.__notes__)
    assert sup.statistics().restarts == {"sibling": 0, "w": 2}
    # The sibling was cancelled, and the outermost supervisor closed every mailbox.
    assert "stop sibling" in log
    assert worker.ref.stopped
    assert sibling.ref.stopped


async def test_giving_up_inside_a_nursery_surfaces_the_same_error() -> None:
    worker = Worker("w")
    sup = Supervisor("sup", [worker], max_restarts=0)
    with trio.fail_after(5), pytest.RaisesGroup(Boom) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            worker.ref.tell("boom")
    assert info.value.exceptions[0] is worker.errors[0]


async def test_old_restarts_age_out_of_the_window(autojump_clock: trio.testing.MockClock) -> None:
    worker = Worker("w")
    sup = Supervisor("sup", [worker], max_restarts=2, within=10)

    async def crash_at(when: float) -> None:
        await trio.sleep_until(when)
        worker.ref.tell("boom")
        await worker.ref.ask("get")  # answered by the restarted run

    with trio.fail_after(100), pytest.RaisesGroup(Boom) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await crash_at(0)
            await crash_at(6)
            assert sup.statistics().restarts == {"w": 2}
            await crash_at(12)  # the crash at 0 has aged out: 6 and 12 remain
            assert sup.statistics().restarts == {"w": 3}
            await trio.sleep_until(13)
            worker.ref.tell("boom")  # a third restart within 10 s: give up
            # The ask queued behind the fatal crash fails once the mailbox closes.
            with pytest.raises(ActorStopped, match="'w' stopped before replying"):
                await worker.ref.ask("get")
            await trio.sleep_forever()  # until the failing supervisor cancels us
    assert info.value.exceptions[0] is worker.errors[3]
    assert trio.current_time() == pytest.approx(13)


async def test_stop_stops_children_in_reverse_order_and_run_returns() -> None:
    log: list[str] = []
    inner = Supervisor("inner", [Worker("b", log), Worker("c", log)])
    first = Worker("a", log)
    sup = Supervisor("outer", [first, inner, Worker("d", log)])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            assert log == ["start a", "start b", "start c", "start d"]
            first.ref.tell("queued before stop")
            sup.stop()
            sup.stop()  # idempotent
    assert log[4:] == ["stop d", "stop c", "stop b", "stop a"]
    assert first.seen == ["queued before stop"]  # graceful: queued work done


async def test_stop_cancels_a_child_past_the_shutdown_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    stuck = Worker("stuck", log, on_stop_hangs=True)
    sup = Supervisor("sup", [Worker("a", log), stuck], shutdown_timeout=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            start = trio.current_time()
            sup.stop()
    # 2 s: stuck's on_stop is shielded but bounded by its stop_timeout.
    assert trio.current_time() - start == pytest.approx(2.0)
    assert log[2:] == ["stop stuck", "stop a"]
    assert "actor stuck did not stop within 1 s; cancelling it" in caplog.messages


async def test_stop_requested_before_run_takes_effect_after_startup() -> None:
    log: list[str] = []
    sup = Supervisor("sup", [Worker("a", log), Worker("b", log)])
    sup.stop()
    with trio.fail_after(5):
        await sup.run()
    assert log == ["start a", "start b", "stop b", "stop a"]


async def test_a_child_that_stops_is_not_restarted_and_its_mailbox_closes() -> None:
    first = Worker("a")
    second = Worker("b")
    sup = Supervisor("sup", [first, second])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            first.ref.stop()
            assert await second.ref.ask("get") == []  # b still serves
            second.ref.stop()
        # run returned on its own once both children were done
    assert sup.statistics().restarts == {"a": 0, "b": 0}
    with pytest.raises(ActorStopped):
        first.ref.tell("x")


async def test_a_child_crashing_while_stopping_is_not_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker("w")
    sup = Supervisor("sup", [worker])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            worker.ref.tell("boom")
            worker.ref.tell("dropped")
            sup.stop()
    assert "actor w crashed while stopping" in caplog.messages
    assert "actor w stopped with 1 unprocessed messages" in caplog.messages
    assert sup.statistics().restarts == {"w": 0}


async def test_a_child_failing_to_start_fails_the_supervisor() -> None:
    log: list[str] = []

    class BadStart(Worker):
        async def on_start(self, nursery: trio.Nursery) -> None:
            raise Boom("cannot bind")

    sup = Supervisor("sup", [Worker("a", log), BadStart("bad", log), Worker("c", log)])
    with trio.fail_after(5), pytest.raises(Boom, match="cannot bind") as info:
        await sup.run()
    assert any("failed to start" in note for note in info.value.__notes__)
    assert log == ["start a", "stop bad", "stop a"]
    assert sup.statistics().restarts == {"a": 0, "bad": 0, "c": 0}


async def test_a_nested_supervisor_is_restarted_with_its_mailboxes_kept() -> None:
    worker = Worker("w")
    inner = Supervisor("inner", [worker], max_restarts=0)
    outer = Supervisor("outer", [inner], max_restarts=1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            worker.ref.tell("boom")  # inner gives up at once; outer restarts inner
            worker.ref.tell("kept")
            assert await worker.ref.ask("get") == ["kept"]
            outer.stop()
    assert outer.statistics().restarts == {"inner": 1}
    assert inner.statistics().restarts == {"w": 0}
    assert worker.statistics().restarts == 1


async def test_cancelling_the_root_stops_the_tree_within_the_stop_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    leaf = Worker("leaf", log, on_stop_hangs=True)
    tree = Supervisor(
        "root",
        [
            Worker("a", log),
            Supervisor("mid", [leaf, Supervisor("deep", [Worker("b", log, on_stop_hangs=True)])]),
        ],
    )
    failures: list[BaseException] = []

    async def asker() -> None:
        try:
            await leaf.ref.ask("get", timeout=1000)
        except ActorStopped as exc:
            failures.append(exc)

    with trio.fail_after(60):
        async with trio.open_nursery() as outside:
            async with trio.open_nursery() as nursery:
                await nursery.start(tree.run)
                start = trio.current_time()
                nursery.cancel_scope.cancel()
                # The leaf is no longer receiving: these stay queued.
                leaf.ref.tell("queued")
                outside.start_soon(asker)
            elapsed = trio.current_time() - start
    assert elapsed == pytest.approx(2.0)  # the hanging on_stops ran concurrently
    assert sorted(log[3:]) == ["stop a", "stop b", "stop leaf"]
    assert leaf.ref.stopped
    assert len(failures) == 1
    assert "actor leaf stopped with 2 unprocessed messages" in caplog.messages


def test_children_need_unique_names_and_sane_limits() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor("sup", [Worker("a"), Worker("a")])
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor("sup", [], max_restarts=-1)
