"""The task book as a checked state machine.

hypothesis drives a TaskBook through random interleavings of every event the
Scheduler feeds it — submissions (new, re-sent, of finished ids), worker
joins and losses (declared dead or leaving), credit windows (also from peers
that never registered), reports (final, retrying, cancelled; late, stale and
duplicate, from any worker, including ones declared dead), releases, cancels
racing completion, unsendable dispatches and jumps of the clock — and checks
after every step:

* ``audit()``: each held task is in exactly one place that matches its status,
  counts equal entries and are never negative, bounds hold;
* every dispatch goes to a registered worker that serves the task, and leaves
  that worker within its window; a task is never dispatched while held;
* a final state never changes: one final result per task id, and a finished
  id is never held again;

and at the end, with workers that keep serving, that every accepted task
reaches exactly one final state.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fastworker.control._taskbook import TaskBook, TaskBookConfig
from fastworker.tasks.models import TaskStatus
from fastworker.wire import ResultRecord, TaskEnvelope

TASK_IDS = [f"t{i}" for i in range(8)]
NAMES = ["a", "b"]
WORKERS = [b"w0", b"w1", b"w2"]
CLIENTS = [b"c0", b"c1", b""]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1.7e9 + self.now


class TaskBookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = _Clock()
        self.book = TaskBook(
            TaskBookConfig(
                max_queued=9,
                max_queued_bytes=4_000,
                max_worker_deaths=3,
                unknown_task_grace=2.0,
                orphan_memory=4,
                orphan_bytes=250,
                orphan_seconds=5.0,
                unknown_peers=2,
                unknown_peer_seconds=5.0,
                max_message_size=4096 + 1200,
            ),
            clock=self.clock.monotonic,
            wall_clock=self.clock.wall,
        )
        self.accepted: set[str] = set()
        self.final: dict[str, str] = {}  # task id -> final status, decided once
        self.remembered: set[str] = set()  # ids a journal said finished before (remember_finished)
        self.last_dispatch: list[tuple[bytes, list[str]]] = []

    # -- after every event: what the Scheduler does, and the checks ----------

    def _step(self) -> None:
        book = self.book
        book.dispatch()
        out = book.take()
        for record in out.records:
            assert record.task_id not in self.final, f"{record.task_id} finished twice"
            assert record.status in ("success", "failure", "cancelled")
            self.final[record.task_id] = record.status
            assert book.status_of(record.task_id) is None
        failed = [r.task_id for r in out.records if r.status == "failure"]
        assert [e.task_id for e, _, _ in out.dead] == failed, "every failure is a dead letter"
        for client, records in out.pushes.items():
            assert client, "a push to a task submitted without a client"
            assert all(r.task_id in self.final for r in records)
        for task_ids in out.resends.values():
            assert all(i in self.final or i in self.remembered for i in task_ids)
        for worker, number in out.markers:
            slot = book._workers.get(worker)
            assert slot is not None, "a marker to a worker that is not registered"
            assert 0 < number <= slot.dispatched
        dispatched: set[str] = set()
        self.last_dispatch = []
        for worker, batch, weight, _number in out.dispatches:
            assert weight >= sum(len(e.payload) for e in batch)
            slot = book._workers.get(worker)
            assert slot is not None, "dispatch to a worker that is not registered"
            assert len(slot.inflight) <= slot.window, "a worker got more than its window"
            ids = []
            for envelope in batch:
                assert envelope.name in slot.names, "a worker got a task it does not serve"
                assert envelope.task_id not in dispatched, "one task dispatched twice at once"
                dispatched.add(envelope.task_id)
                assert book.status_of(envelope.task_id) is TaskStatus.RUNNING
                assert slot.inflight[envelope.task_id].envelope.task_id == envelope.task_id
                ids.append(envelope.task_id)
            self.last_dispatch.append((worker, ids))

    @invariant()
    def book_is_sound(self) -> None:
        assert self.book.audit() == []

    @invariant()
    def a_task_cancelled_at_a_worker_never_runs_again(self) -> None:
        # It stays with that worker until its run ends (then it is final), never queued again.
        for job in self.book._jobs.values():
            if job.cancelling:
                assert job.status is TaskStatus.RUNNING
                assert job.worker is not None

    @invariant()
    def final_states_never_change(self) -> None:
        for task_id in self.final:
            assert self.book.status_of(task_id) is None

    # -- events ---------------------------------------------------------------

    @rule(
        task_id=st.sampled_from(TASK_IDS),
        name=st.sampled_from([*NAMES, "nobody-serves-this"]),
        priority=st.integers(0, 3),
        client=st.sampled_from(CLIENTS),
        payload=st.integers(0, 1500),
        eta=st.none() | st.floats(-5, 20),
        callback=st.booleans(),
    )
    def submit(
        self,
        task_id: str,
        name: str,
        priority: int,
        client: bytes,
        payload: int,
        eta: float | None,
        callback: bool,
    ) -> None:
        options: dict[str, object] = {}
        if eta is not None:
            options["eta"] = self.clock.wall() + eta
        if callback:
            options["cb"] = "tcp://127.0.0.1:6000"
            options["cbd"] = b"data"
        envelope = TaskEnvelope(task_id, name, priority, 0, b"x" * payload, options or None)
        was_new = self.book.status_of(task_id) is None and not self.book.is_finished(task_id)
        verdict = self.book.submit(client, envelope)
        if verdict is None and was_new:
            self.accepted.add(task_id)
        if verdict is not None:
            assert verdict[0] in ("queue_full", "too_large")
            assert was_new, "a held or finished task was rejected"
        self._step()

    @rule(
        worker=st.sampled_from(WORKERS),
        names=st.sets(st.sampled_from(NAMES), min_size=1),
        window=st.none() | st.integers(1, 4),
    )
    def join(self, worker: bytes, names: set[str], window: int | None) -> None:
        """A worker registers (again), usually announcing its window right after."""
        self.book.worker_joined(worker, frozenset(names))
        if window is not None:
            self.book.ready(worker, window)
        self._step()

    @rule(worker=st.sampled_from(WORKERS), died=st.booleans())
    def lose(self, worker: bytes, died: bool) -> None:
        self.book.worker_lost(worker, died)
        self._step()

    @precondition(lambda self: any(s.inflight for s in self.book._workers.values()))
    @rule(data=st.data())
    def holder_crashes_and_restarts(self, data: st.DataObject) -> None:
        """A worker holding tasks dies and comes back at once: the poison guard's path."""
        holders = [s for s in self.book._workers.values() if s.inflight]
        slot = data.draw(st.sampled_from(holders))
        names, window = slot.names, slot.window
        self.book.worker_lost(slot.identity, True)
        self._step()
        self.book.worker_joined(slot.identity, names)
        self.book.ready(slot.identity, window)
        self._step()

    @rule(worker=st.sampled_from([*WORKERS, b"stranger"]), window=st.integers(-2, 5))
    def ready(self, worker: bytes, window: int) -> None:
        self.book.ready(worker, window)
        self._step()

    @rule(
        worker=st.sampled_from(WORKERS),
        task_id=st.sampled_from(TASK_IDS),
        status=st.sampled_from(["success", "failure", "retrying", "cancelled", "queued"]),
        delay=st.none() | st.floats(0, 10),
    )
    def report_anything(
        self, worker: bytes, task_id: str, status: str, delay: float | None
    ) -> None:
        """Any worker, any id: late, stale, duplicate and spoofed reports included."""
        self.book.report(worker, ResultRecord(task_id, status, retry_delay=delay, attempts=1))
        self._step()

    @precondition(lambda self: any(s.inflight for s in self.book._workers.values()))
    @rule(
        data=st.data(),
        status=st.sampled_from(["success", "failure", "retrying", "cancelled"]),
        delay=st.none() | st.floats(0, 10),
        twice=st.booleans(),
    )
    def report_held(
        self, data: st.DataObject, status: str, delay: float | None, twice: bool
    ) -> None:
        """The worker holding a task reports it (sometimes twice: a duplicate Done)."""
        holders = [s for s in self.book._workers.values() if s.inflight]
        slot = data.draw(st.sampled_from(holders))
        task_id = data.draw(st.sampled_from(sorted(slot.inflight)))
        record = ResultRecord(task_id, status, retry_delay=delay, attempts=1)
        self.book.report(slot.identity, record)
        if twice:
            self.book.report(slot.identity, record)
        self._step()

    @rule(
        worker=st.sampled_from([*WORKERS, b"stranger"]),
        data=st.data(),
        extra=st.lists(st.sampled_from(TASK_IDS), max_size=3),
    )
    def holding(self, worker: bytes, data: st.DataObject, extra: list[str]) -> None:
        """A worker lists what it holds: some of what it was sent (others were lost), and strays."""
        slot = self.book._workers.get(worker)
        sent = sorted(slot.inflight) if slot is not None else []
        kept = data.draw(st.lists(st.sampled_from(sent), unique=True)) if sent else []
        last = slot.dispatched if slot is not None else 0
        seen = data.draw(st.none() | st.integers(-1, last + 1))  # stale, current, or nonsense
        self.book.holding(worker, kept + extra, seen)
        self._step()

    @rule(worker=st.sampled_from(WORKERS), task_ids=st.lists(st.sampled_from(TASK_IDS)))
    def release(self, worker: bytes, task_ids: list[str]) -> None:
        self.book.release(worker, task_ids)
        self._step()

    @rule(task_id=st.sampled_from([*TASK_IDS, "never-seen"]))
    def cancel(self, task_id: str) -> None:
        before = self.book.status_of(task_id)
        cancelled, status = self.book.cancel(task_id)
        if before is None:
            assert not cancelled
            known = task_id in self.final or task_id in self.remembered
            assert status == ("finished" if known else "unknown")
        elif before.value == "running":
            # Maybe started: never "will not run"; the worker's report decides.
            assert not cancelled
            assert status == "running"
            assert self.book.status_of(task_id) == before
        else:
            assert cancelled
            assert status == "cancelled"
        self._step()

    @precondition(lambda self: bool(self.last_dispatch))
    @rule()
    def last_dispatch_unsent(self) -> None:
        worker, ids = self.last_dispatch[-1]
        self.book.unsent(worker, ids)
        self._step()

    @rule(task_id=st.sampled_from([*TASK_IDS, "never-seen"]))
    def fail(self, task_id: str) -> None:
        """The binding fails a task it cannot send (larger than any message)."""
        self.book.fail(task_id, "task needs more bytes than a message may carry")
        self._step()

    @rule(task_id=st.sampled_from(TASK_IDS), client=st.sampled_from(CLIENTS))
    def revive(self, task_id: str, client: bytes) -> None:
        """A dead letter retried: a failed task queued again under its own id."""
        if self.final.get(task_id) != "failure":
            return
        envelope = TaskEnvelope(task_id, NAMES[0], 2, 0, b"x", None)
        if self.book.revive(client, envelope) is None:
            del self.final[task_id]  # its final state may change once more: it runs again
            self.accepted.add(task_id)
        self._step()

    @rule(task_ids=st.lists(st.sampled_from([*TASK_IDS, "from-the-journal"]), max_size=3))
    def remember_finished(self, task_ids: list[str]) -> None:
        """Ids a journal says finished under a previous instance: held ones are not touched."""
        held = {t for t in task_ids if self.book.status_of(t) is not None}
        self.book.remember_finished(task_ids)
        self.remembered.update(set(task_ids) - held)
        assert all(self.book.status_of(t) is not None for t in held)
        self._step()

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 3.0, 10.0, 100.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += seconds
        self.book.advance()
        self._step()

    # -- the end: workers that keep serving finish everything ----------------

    def teardown(self) -> None:
        book = self.book
        for worker in WORKERS:
            book.worker_lost(worker, False)
        book.worker_joined(b"final", frozenset(NAMES))
        book.ready(b"final", 50)
        for _ in range(200):
            self.clock.now += 1000.0
            book.advance()
            self._step()
            slot = book._workers[b"final"]
            for task_id in list(slot.inflight):
                book.report(b"final", ResultRecord(task_id, "success", attempts=1))
            self._step()
            assert book.audit() == []
            if not len(book):
                break
        assert not len(book), f"{len(book)} tasks never finished"
        assert self.accepted <= set(self.final), "an accepted task never reached a final state"


TaskBookMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_task_book_model = TaskBookMachine.TestCase


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_task_book_model_soak() -> None:
    """The same machine, far longer: ``pytest -m soak tests/test_taskbook_model.py``."""

    class Soak(TaskBookMachine):
        pass

    Soak.TestCase.settings = settings(
        max_examples=20_000,
        stateful_step_count=80,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Soak.TestCase().runTest()
