"""Scheduler and worker policies that shape dispatch: the poison guard and adaptive prefetch.

The poison guard is exercised end to end by tests/faults/test_fault_poison.py
with real processes; here its dispatch rule is checked directly on the
Scheduler, without sockets, so each case is exact.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from fastworker import Client, Cluster
from fastworker._io import Inbound
from fastworker.control._internal import ClientSubmits, WorkerJoined, WorkerLost
from fastworker.control.scheduler import Scheduler, SchedulerConfig
from fastworker.runtime import Actor
from fastworker.tasks.serializer import SerializationFormat, dumps
from fastworker.wire import Dispatch, Ready, decode, encode

pytestmark = pytest.mark.timeout(60)


class _Sink(Actor):
    def __init__(self, name: str) -> None:
        super().__init__(name, mailbox_size=100_000)

    def receive(self, message: Any) -> None:
        return None


class _Wire:
    """Stands in for the worker socket: records what the scheduler dispatches to whom."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, list[str]]] = []
        self.numbers: list[int | None] = []  # each Dispatch's number, in order

    def try_send(self, frames: list[bytes]) -> bool:
        message = decode(frames[1])
        if isinstance(message, Dispatch):
            self.sent.append((frames[0], [t[0] for t in message.tasks]))
            self.numbers.append(message.number)
        return True

    def close(self) -> None:
        pass

    def to(self, worker: bytes) -> list[str]:
        return [tid for who, ids in self.sent if who == worker for tid in ids]


def _scheduler(max_worker_deaths: int = 3) -> tuple[Scheduler, _Wire]:
    sinks = [_Sink(n) for n in ("gateway", "results", "callbacks")]
    scheduler = Scheduler(
        SchedulerConfig(max_worker_deaths=max_worker_deaths),
        gateway=sinks[0].ref,
        results=sinks[1].ref,
        callbacks=sinks[2].ref,
    )
    wire = _Wire()
    scheduler._sock = wire  # type: ignore[assignment]
    return scheduler, wire


def _join(scheduler: Scheduler, worker: str, window: int) -> None:
    scheduler.receive(WorkerJoined(worker, frozenset({"t"}), 1))
    scheduler.receive(Inbound([[worker.encode(), encode(Ready(window))]]))


def _submit(scheduler: Scheduler, *task_ids: str) -> None:
    payload = dumps(SerializationFormat.JSON, [[], {}])
    tasks = [[tid, "t", 2, 0, payload, None] for tid in task_ids]
    scheduler.receive(ClientSubmits([(b"client", 1, tasks)]))


async def test_tasks_from_one_crash_run_freely_on_the_next_worker() -> None:
    scheduler, wire = _scheduler()
    _join(scheduler, "a", 10)
    _submit(scheduler, "p", "x", "y")
    assert sorted(wire.to(b"a")) == ["p", "x", "y"]
    _join(scheduler, "b", 10)
    scheduler.receive(WorkerLost("a", "died"))
    # One death each: not the last chance yet, so all three go to b at once.
    assert sorted(wire.to(b"b")) == ["p", "x", "y"]


async def test_a_last_chance_task_runs_apart_from_other_suspects() -> None:
    scheduler, wire = _scheduler(max_worker_deaths=3)
    _join(scheduler, "a", 10)
    _submit(scheduler, "p", "x")
    for dying, heir in (("a", "b"), ("b", "c")):
        _join(scheduler, heir, 10)
        scheduler.receive(WorkerLost(dying, "died"))
    # p and x died twice together: both are on their last chance now, and c may
    # hold only one of them; the other waits for a worker without suspects.
    assert len([t for t in wire.to(b"c") if t in ("p", "x")]) == 1, wire.sent
    _join(scheduler, "d", 10)
    scheduler.book.dispatch()
    scheduler._send_effects()
    assert len([t for t in wire.to(b"d") if t in ("p", "x")]) == 1
    # A fresh task still goes anywhere, suspects or not.
    _submit(scheduler, "fresh")
    assert "fresh" in wire.to(b"c") + wire.to(b"d")


async def test_a_task_that_keeps_killing_its_worker_fails_as_poison() -> None:
    scheduler, _ = _scheduler(max_worker_deaths=3)
    _join(scheduler, "w0", 10)
    _submit(scheduler, "p")
    for n in range(1, 4):
        _join(scheduler, f"w{n}", 10)
        scheduler.receive(WorkerLost(f"w{n - 1}", "died"))
    assert scheduler.book.status_of("p") is None
    assert scheduler.statistics_dict()["failed"] == 1


async def test_a_worker_holds_more_work_while_tasks_are_short() -> None:
    def quick(x: int) -> int:
        return x

    async with Cluster(tasks=[quick], workers=1) as cluster:
        worker = cluster.workers[0]
        before = worker.window
        client = Client(discovery_address=cluster.discovery_address)
        await client.start()
        try:
            with trio.fail_after(30):
                for i in range(3000):
                    await client.delay("quick", i)
                await client.join()
        finally:
            client.stop()
        # Trivial tasks: the prefetch grows towards its cap, so messages carry more.
        assert worker.window > before
        assert worker.window <= worker.config.concurrency + 4096


async def test_an_explicit_prefetch_is_left_alone() -> None:
    def quick(x: int) -> int:
        return x

    async with Cluster(tasks=[quick], workers=1, prefetch=3, concurrency=2) as cluster:
        client = Client(discovery_address=cluster.discovery_address)
        await client.start()
        try:
            with trio.fail_after(30):
                for i in range(500):
                    await client.delay("quick", i)
                await client.join()
        finally:
            client.stop()
        assert cluster.workers[0].window == 5


async def test_fifty_registered_workers_share_the_work() -> None:
    """Fifty workers' registrations and heartbeats in one control plane (no speed asserted)."""

    def quick(x: int) -> int:
        return x

    async with Cluster(tasks=[quick], workers=50, concurrency=1, prefetch=0) as cluster:
        client = Client(discovery_address=cluster.discovery_address)
        await client.start()
        try:
            with trio.fail_after(60):
                ids = [await client.delay("quick", i) for i in range(500)]
                await client.join()
                stats = await client.stats()
        finally:
            client.stop()
        assert stats["discovery"]["workers_alive"] == 50
        assert all(client.get_result(t).result == i for i, t in enumerate(ids))  # type: ignore[union-attr]
        assert sum(1 for w in cluster.workers if w.executor.completed) > 1


async def test_a_result_reported_before_its_resubmission_finishes_it_without_a_rerun() -> None:
    """After a control-plane restart a worker may report a task before its client re-sends it."""
    from fastworker._io import Inbound
    from fastworker.wire import Done, ResultRecord, encode

    scheduler, wire = _scheduler()
    _join(scheduler, "w", 10)
    done = ResultRecord("early", "success", b"42", None, 1.0, 2.0, 1, None, 0, "t", None)
    scheduler.receive(Inbound([[b"w", encode(Done([done]))]]))
    _submit(scheduler, "early", "late")
    assert wire.to(b"w") == ["late"]  # "early" was not dispatched again
    stats = scheduler.statistics_dict()
    assert stats["recovered_results"] == 1
    assert stats["succeeded"] == 1


async def test_a_name_nobody_serves_fails_once_workers_have_joined() -> None:
    """Submitted before any worker existed, an unknown name must not wait forever."""

    def quick(x: int) -> int:
        return x

    async with Cluster(tasks=[quick], workers=0, unknown_task_grace=0.2) as cluster:
        client = Client(discovery_address=cluster.discovery_address)
        await client.start()
        try:
            with trio.fail_after(20):
                typo = await client.delay("quikc", 1)
                fine = await client.delay("quick", 2)
                await client.stats()  # both are queued at the control plane by now
                await cluster.add_worker()
                await client.join()
        finally:
            client.stop()
        failed = client.get_result(typo)
        assert failed is not None
        assert failed.status.value == "failure"
        assert "unknown task 'quikc'" in (failed.error or "")
        assert client.get_result(fine).result == 2  # type: ignore[union-attr]


def _report(scheduler: Scheduler, worker: str, record: Any) -> None:
    from fastworker._io import Inbound
    from fastworker.wire import Done, encode

    scheduler.receive(Inbound([[worker.encode(), encode(Done([record]))]]))


async def test_a_retry_reported_by_a_worker_declared_dead_does_not_queue_the_task_twice() -> None:
    """The report arrives after the task was requeued: it is stale, the task runs once at a time.

    The first release queued such a task twice, dispatched it twice in one
    message, and its queue count went negative (then every message crashed
    the Scheduler).
    """
    from fastworker.control.scheduler import _Due
    from fastworker.wire import ResultRecord

    scheduler, wire = _scheduler()
    _join(scheduler, "a", 10)
    _submit(scheduler, "r")
    assert wire.to(b"a") == ["r"]
    scheduler.receive(WorkerLost("a", "died"))  # stopped past its deadline: requeued
    retrying = ResultRecord("r", "retrying", None, "boom", 1.0, 2.0, 1, None, 0, "t", 0.0)
    _report(scheduler, "a", retrying)  # SIGCONT: its run reports, late
    scheduler.receive(_Due())
    _join(scheduler, "b", 10)
    assert wire.to(b"b") == ["r"]
    stats = scheduler.statistics_dict()
    assert stats["queued_total"] == 0
    assert stats["running"] == 1
    assert stats["stale_results"] == 1


async def test_ready_from_a_peer_that_never_registered_creates_no_worker() -> None:
    from fastworker._io import Inbound
    from fastworker.wire import Ready, encode

    scheduler, wire = _scheduler()
    strangers = [[f"stranger-{i}".encode(), encode(Ready(100))] for i in range(2000)]
    scheduler.receive(Inbound(strangers))
    _submit(scheduler, "x")
    assert wire.sent == []  # nobody registered: nothing dispatched
    _join(scheduler, "w", 1)
    assert wire.to(b"w") == ["x"]
    stats = scheduler.statistics_dict()
    assert stats["workers_connected"] == 1
    assert stats["ready_from_unknown"] == 2000
    assert len(scheduler.book._unknown_peers) <= scheduler.book.config.unknown_peers


async def test_a_large_batch_is_dispatched_in_messages_under_the_size_limit() -> None:
    """200 tasks of 200 KB for a worker with a wide window: no Dispatch over the limit."""
    from fastworker.transport import TransportConfig

    sizes: list[int] = []
    sinks = [_Sink(n) for n in ("gateway", "results", "callbacks")]
    scheduler = Scheduler(
        SchedulerConfig(transport=TransportConfig(max_message_size=4 * 1024 * 1024)),
        gateway=sinks[0].ref,
        results=sinks[1].ref,
        callbacks=sinks[2].ref,
    )
    wire = _Wire()
    original = wire.try_send

    def measure(frames: list[bytes]) -> bool:
        sizes.append(len(frames[1]))
        return original(frames)

    wire.try_send = measure  # type: ignore[method-assign]
    scheduler._sock = wire  # type: ignore[assignment]
    _join(scheduler, "w", 1000)
    payload = dumps(SerializationFormat.JSON, [["x" * 200_000], {}])
    tasks = [[f"big-{i}", "t", 2, 0, payload, None] for i in range(200)]
    scheduler.receive(ClientSubmits([(b"client", 1, tasks)]))
    assert len(wire.to(b"w")) == 200
    assert len(sizes) > 1
    assert max(sizes) <= 4 * 1024 * 1024
    # Each part is a Dispatch of its own number: a worker's list made between two
    # parts names the first, and the second's tasks are not taken for lost.
    assert wire.numbers == list(range(1, len(sizes) + 1))
    first = wire.sent[0][1]
    scheduler.receive(Inbound([[b"w", encode(Ready(1000, first, 1))]]))
    assert scheduler.statistics_dict()["lost_dispatches"] == 0


async def test_a_dispatch_that_never_reached_its_worker_is_queued_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A Dispatch into a broken connection is lost without a trace; the worker's list says so.

    Before, its tasks stayed RUNNING at that worker, their credits used, for as
    long as the worker lived: the fault campaign lost 400 tasks this way.
    """
    scheduler, wire = _scheduler()
    _join(scheduler, "a", 1)
    _submit(scheduler, "lost")
    assert wire.to(b"a") == ["lost"]  # ...and the bytes went nowhere

    def holding(ids: list[str]) -> None:
        scheduler.receive(Inbound([[b"a", encode(Ready(1, ids))]]))

    holding([])  # too recent to tell from one still on its way
    assert wire.to(b"a") == ["lost"]
    await trio.sleep(scheduler.book.config.lost_dispatch_seconds)
    holding(["something-else"])
    assert wire.to(b"a") == ["lost", "lost"]  # queued again, and sent again
    assert scheduler.statistics_dict()["lost_dispatches"] == 1
    holding(["lost"])  # now it has it: nothing more happens
    assert wire.to(b"a") == ["lost", "lost"]


async def test_a_list_delayed_behind_its_dispatch_on_a_stalled_link_requeues_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The 10-minute campaign (seed 11): the worker link stalled 6.75 s with a Dispatch
    and a Ready listing what the worker held (made before that Dispatch arrived) both
    in it.  By age the tasks looked lost, were sent again, and ran twice.  The list
    names the last Dispatch the worker had; later ones are still on their way."""
    scheduler, wire = _scheduler()
    _join(scheduler, "a", 4)
    _submit(scheduler, "first")
    _submit(scheduler, "stalled")
    assert wire.to(b"a") == ["first", "stalled"]
    assert wire.numbers == [1, 2]

    def holding(ids: list[str], seen: int | None) -> None:
        scheduler.receive(Inbound([[b"a", encode(Ready(4, ids, seen))]]))

    await trio.sleep(10 * scheduler.book.config.lost_dispatch_seconds)
    holding(["first"], 1)  # made before Dispatch 2 arrived, delivered long after
    assert wire.to(b"a") == ["first", "stalled"]
    assert scheduler.statistics_dict()["lost_dispatches"] == 0
    assert wire.numbers == [1, 2, 3]  # ... so a marker goes behind Dispatch 2, empty
    holding(["first", "stalled"], 3)  # it came, behind Dispatch 2: nothing was lost
    assert scheduler.statistics_dict()["lost_dispatches"] == 0
    assert wire.to(b"a") == ["first", "stalled"]


async def test_a_lost_dispatch_with_none_after_it_is_found_by_a_marker(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The 10-minute campaign (seed 42), after the numbering: the last Dispatches to a worker
    went into a half-open link and none followed (its window was full of them), so no list
    could ever name a later one.  An empty Dispatch, sent when such a task is old enough,
    is the later one: the list naming it shows the task never came."""
    scheduler, wire = _scheduler()
    _join(scheduler, "a", 2)
    _submit(scheduler, "kept")
    _submit(scheduler, "lost")  # Dispatch 2: into the broken link

    def holding(ids: list[str], seen: int | None) -> None:
        scheduler.receive(Inbound([[b"a", encode(Ready(2, ids, seen))]]))

    holding(["kept"], 1)  # too recent to ask about
    assert wire.numbers == [1, 2]
    await trio.sleep(scheduler.book.config.lost_dispatch_seconds)
    holding(["kept"], 1)
    assert wire.numbers == [1, 2, 3]  # the marker
    assert scheduler.statistics_dict()["lost_dispatches"] == 0
    holding(["kept"], 3)  # the marker came and "lost" did not: it never will
    assert wire.to(b"a") == ["kept", "lost", "lost"]
    assert wire.numbers == [1, 2, 3, 4]
    stats = scheduler.statistics_dict()
    assert (stats["lost_dispatches"], stats["dispatch_markers"]) == (1, 1)


async def test_a_result_from_a_peer_that_never_registered_changes_nothing() -> None:
    """A spoofed Done must not end a task its real worker is running (the first release took it)."""
    from fastworker.wire import ResultRecord

    scheduler, _ = _scheduler()
    _join(scheduler, "w", 10)
    _submit(scheduler, "t1")
    spoof = ResultRecord("t1", "success", b'"SPOOFED"', None, 1.0, 2.0, 1, None, 0, "t", None)
    _report(scheduler, "stranger", spoof)
    stats = scheduler.statistics_dict()
    assert stats["running"] == 1
    assert stats["succeeded"] == 0
    assert stats["rejected"]["unregistered"] == 1
    real = ResultRecord("t1", "success", b"42", None, 1.0, 2.0, 1, None, 0, "t", None)
    _report(scheduler, "w", real)
    assert scheduler.statistics_dict()["succeeded"] == 1


async def test_a_result_from_an_unregistered_peer_for_an_id_not_yet_submitted_is_not_kept() -> None:
    """A forged Done for an id that comes later (a periodic tick's id is known in advance)
    must not finish that task when it is submitted: it runs at a real worker."""
    from fastworker.wire import ResultRecord

    scheduler, wire = _scheduler()
    _join(scheduler, "w", 10)
    forged = ResultRecord("tick", "success", b'"FORGED"', None, 1.0, 2.0, 1, None, 0, "t", None)
    _report(scheduler, "stranger", forged)
    _submit(scheduler, "tick")
    assert wire.to(b"w") == ["tick"]
    stats = scheduler.statistics_dict()
    assert (stats["recovered_results"], stats["succeeded"]) == (0, 0)
    assert stats["rejected"]["unregistered"] == 1


def test_orphan_results_finish_only_client_tasks_and_are_bounded_in_bytes() -> None:
    """A registered worker's result for an id not yet submitted: a client's re-submission
    takes it (after a control-plane restart), a periodic tick never does (its id is known
    in advance; the hostile review pre-filled three ticks), and what waits is bounded in
    bytes (80 results of 10 MB took a control plane to 841 MiB)."""
    from fastworker.control._taskbook import TaskBook, TaskBookConfig
    from fastworker.tasks.models import TaskStatus
    from fastworker.wire import ResultRecord, TaskEnvelope

    book = TaskBook(
        TaskBookConfig(orphan_bytes=3_000_000), clock=lambda: 0.0, wall_clock=lambda: 1.7e9
    )
    book.worker_joined(b"w", frozenset({"t"}))
    for task_id in ("tick@1", "client-task"):
        book.report(b"w", ResultRecord(task_id, "success", b"1", attempts=1))
    book.submit(b"", TaskEnvelope("tick@1", "t", 2, 0, b"[]", None))  # as the Scheduler ticks
    book.submit(b"client", TaskEnvelope("client-task", "t", 2, 0, b"[]", None))
    assert book.status_of("tick@1") is TaskStatus.QUEUED  # runs as planned
    assert book.status_of("client-task") is None  # finished by the orphan
    for i in range(5):
        book.report(b"w", ResultRecord(f"big-{i}", "success", b"x" * 1_000_000, attempts=1))
    assert book.audit() == []
    assert sorted(book._orphans) == ["big-3", "big-4"]  # the oldest went first, by bytes


async def test_a_worker_leaving_on_its_own_connection_is_ordered_behind_its_results() -> None:
    """Done, then Unregister on the same connection: the result counts, nothing is requeued.

    Sent to Discovery instead, the goodbye could overtake a Done still on its
    way, and the task would run again elsewhere.
    """
    from fastworker.control._internal import EvictWorker
    from fastworker.wire import Done, ResultRecord, Unregister

    scheduler, wire = _scheduler()
    told: list[Any] = []

    class _Discovery:
        name = "discovery"

        def tell(self, message: object) -> None:
            told.append(message)

    scheduler.discovery = _Discovery()  # type: ignore[assignment]
    _join(scheduler, "a", 10)
    _submit(scheduler, "done", "unreported")
    assert sorted(wire.to(b"a")) == ["done", "unreported"]
    record = ResultRecord("done", "success", b"42", None, 1.0, 2.0, 1, None, 0, "t", None)
    goodbye = Unregister("a", "left")
    scheduler.receive(Inbound([[b"a", encode(Done([record]))], [b"a", encode(goodbye)]]))
    assert scheduler.book.is_finished("done")
    assert scheduler.book.stats["requeued"] == 1  # "unreported" only, and not as a death
    assert told == [EvictWorker("a", "left")]
    _join(scheduler, "b", 10)
    assert wire.to(b"b") == ["unreported"]
    # Another connection cannot say goodbye for b, and "crashed" belongs to Discovery.
    scheduler.receive(Inbound([[b"c", encode(Unregister("b", "left"))]]))
    scheduler.receive(Inbound([[b"b", encode(Unregister("b", "crashed"))]]))
    assert told == [EvictWorker("a", "left")]
    assert scheduler.book.rejected["forbidden"] == 1
    assert scheduler.book.rejected["invalid"] == 1


async def test_a_goodbye_while_discovery_is_stopped_loses_no_other_result() -> None:
    """The node stops Discovery before the Scheduler; a goodbye then must not cost the batch.

    The hostile review: the Scheduler's tell to a stopped Discovery raised, and
    the Done of another worker in the same batch was lost at shutdown.
    """
    from fastworker.runtime import ActorStopped
    from fastworker.wire import Done, ResultRecord, Unregister

    scheduler, wire = _scheduler()

    class _StoppedDiscovery:
        name = "discovery"

        def tell(self, message: object) -> None:
            raise ActorStopped("actor 'discovery' is stopped")

    scheduler.discovery = _StoppedDiscovery()  # type: ignore[assignment]
    _join(scheduler, "a", 1)
    _submit(scheduler, "on-a")  # a is full now
    _join(scheduler, "b", 10)
    _submit(scheduler, "on-b")
    assert wire.to(b"b") == ["on-b"]
    record = ResultRecord("on-b", "success", b"42", None, 1.0, 2.0, 1, None, 0, "t", None)
    scheduler.receive(
        Inbound([[b"a", encode(Unregister("a", "left"))], [b"b", encode(Done([record]))]])
    )
    assert scheduler.book.is_finished("on-b")
    assert scheduler.statistics_dict()["internal_errors"] == 0


async def test_an_exception_in_the_schedulers_bookkeeping_or_sending_is_counted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One message's failure must not reach the actor's loop (the supervisor would restart
    the Scheduler, then give up): it is counted, and the next message is served."""
    scheduler, wire = _scheduler()
    _join(scheduler, "w", 10)
    real_dispatch, real_send = scheduler.book.dispatch, scheduler._send_results
    failures = {"dispatch": 1, "send": 1}

    def dispatch_once_broken() -> None:
        if failures["dispatch"]:
            failures["dispatch"] -= 1
            raise RuntimeError("bookkeeping broke")
        real_dispatch()

    def send_once_broken(out: Any) -> None:
        if failures["send"]:
            failures["send"] -= 1
            raise RuntimeError("sending broke")
        real_send(out)

    monkeypatch.setattr(scheduler.book, "dispatch", dispatch_once_broken)
    monkeypatch.setattr(scheduler, "_send_results", send_once_broken)
    _submit(scheduler, "a")  # the dispatch raises: "a" stays queued
    assert scheduler.statistics_dict()["internal_errors"] == 1
    _submit(scheduler, "b")  # both dispatched, then sending the effects' results raises
    assert scheduler.statistics_dict()["internal_errors"] == 2
    assert sorted(wire.to(b"w")) == ["a", "b"]
    _submit(scheduler, "c")
    assert wire.to(b"w")[-1:] == ["c"]
