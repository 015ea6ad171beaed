"""Dead letters: the bounded store (control/_deadletters.py) and how the task book files them."""

from __future__ import annotations

import pytest

from fastworker.control._deadletters import DeadLetters, DeadLettersConfig
from fastworker.control._journal_state import restore
from fastworker.control._schedules import SchedulesConfig
from fastworker.control._taskbook import TaskBook, TaskBookConfig
from fastworker.tasks.models import TaskStatus
from fastworker.wire import ResultRecord, TaskEnvelope


def envelope(task_id: str, payload: bytes = b"[[],{}]", **options: object) -> TaskEnvelope:
    return TaskEnvelope(task_id, "job", 2, 0, payload, dict(options) or None)


class Clock:
    now = 10.0

    def __call__(self) -> float:
        return self.now


def book(**config: object) -> TaskBook:
    clock = Clock()
    return TaskBook(TaskBookConfig(**config), clock=clock, wall_clock=clock)  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_store_keeps_the_newest_within_count_and_bytes() -> None:
    store = DeadLetters(DeadLettersConfig(max_letters=3, max_bytes=10_000))
    for i in range(5):
        store.add(envelope(f"t{i}"), "retries_exhausted", f"boom {i}", 1, 100.0 + i)
    assert [letter.envelope.task_id for letter in store.newest(10)] == ["t4", "t3", "t2"]
    assert store.stats["evicted"] == 2
    store.add(envelope("big", b"x" * 9800), "poison", "e", 1, 1.0)
    assert [letter.envelope.task_id for letter in store.newest(10)] == ["big"]
    store.add(envelope("huge", b"x" * 20_000), "poison", "e", 1, 1.0)  # larger than the store
    assert "huge" not in store
    assert store.audit() == []


@pytest.mark.timeout(10)
def test_a_letter_keeps_its_task_as_submitted_and_its_error_bounded() -> None:
    store = DeadLetters(DeadLettersConfig())
    store.add(envelope("t", max_retries=2, attempt=3), "retries_exhausted", "e" * 10_000, 3, 5.0)
    store.add(envelope("t", max_retries=2, attempt=3), "retries_exhausted", "again", 3, 6.0)
    (letter,) = store.newest(5)
    assert letter.envelope.options == {"max_retries": 2}  # "attempt" is the control plane's
    assert letter.error == "again"
    assert len(store) == 1
    taken = store.take("t")
    assert taken == letter
    assert store.take("t") is None
    assert taken is not None
    store.put_back(taken)
    assert store.newest(1) == [letter]


@pytest.mark.timeout(10)
def test_state_round_trip_drops_unreadable_letters() -> None:
    store = DeadLetters(DeadLettersConfig())
    store.add(envelope("a", cb="tcp://127.0.0.1:9"), "undecodable", "bad task payload: x", 1, 5.0)
    store.add(envelope("b"), "poison", "poison task", 3, 6.0)
    state = store.to_state()
    state["letters"].append([["", "job", 2, 0, b"", None], "poison", "e", 1, 1.0])  # empty id
    state["letters"].append([list(envelope("c")), "no-such-reason", "e", 1, 1.0])
    again = DeadLetters.from_state(state, DeadLettersConfig())
    assert again.newest(10) == store.newest(10)
    assert again.stats["unreadable"] == 2
    with pytest.raises(ValueError, match="version"):
        DeadLetters.from_state({"version": 0}, DeadLettersConfig())


@pytest.mark.timeout(10)
def test_the_journal_keeps_what_the_store_keeps_evictions_and_retries_deleted() -> None:
    store = DeadLetters(DeadLettersConfig(max_letters=3))
    store.watch()
    journal: dict[str, object] = {}

    def commit() -> None:
        for task_id, document in store.take_changes():
            if document is None:
                journal.pop(task_id, None)
            else:
                journal[task_id] = document

    for i in range(5):  # the first two are evicted
        store.add(envelope(f"t{i}"), "retries_exhausted", f"boom {i}", 1, 100.0 + i)
    commit()
    assert set(journal) == {"t2", "t3", "t4"}
    taken = store.take("t3")  # retried
    commit()
    assert set(journal) == {"t2", "t4"}
    assert taken is not None
    store.put_back(taken)  # the retry was refused: dead again
    commit()
    again = DeadLetters.from_states(journal.values(), store.config)
    assert [x.envelope.task_id for x in store.newest(10)] == ["t3", "t4", "t2"]  # put back last
    # Read back, they stand by failure time, newest first.
    assert again.newest(10) == sorted(store.newest(10), key=lambda x: -x.failed_at)
    # Read back under a lower bound: the oldest failures go, and their keys are named stale.
    state = {f"dead/{k}": v for k, v in journal.items()}
    state["dead/junk"] = {"version": 1, "letters": ["junk"]}
    state["schedule/s"] = {"version": 99}
    state["someone-else"] = [1]
    restored = restore(
        state, SchedulesConfig(), DeadLettersConfig(max_letters=2), wall_clock=lambda: 0.0
    )
    assert [x.envelope.task_id for x in restored.dead_letters.newest(10)] == ["t4", "t3"]
    assert sorted(restored.stale) == ["dead/junk", "dead/t2", "schedule/s"]
    assert restored.dead_letters.stats["unreadable"] == 1
    assert restored.schedules.stats["unreadable"] == 1


def _dead(b: TaskBook) -> list[tuple[str, str]]:
    return [(e.task_id, reason) for e, _, reason in b.take().dead]


@pytest.mark.timeout(10)
def test_book_files_each_kind_of_failure() -> None:
    b = book(max_worker_deaths=1, unknown_task_grace=0.0)
    b.worker_joined(b"w", frozenset({"job"}))
    b.ready(b"w", 10)
    for task_id in ("fails", "undecodable", "poison"):
        assert b.submit(b"c", envelope(task_id)) is None
    b.dispatch()
    b.take()
    b.report(b"w", ResultRecord("fails", "failure", error="RuntimeError: x", attempts=2))
    b.report(b"w", ResultRecord("undecodable", "failure", error="bad task payload: not JSON"))
    assert _dead(b) == [("fails", "retries_exhausted"), ("undecodable", "undecodable")]
    b.worker_lost(b"w", died=True)  # "poison" was running on it: one death is the limit here
    assert _dead(b) == [("poison", "poison")]
    b.worker_joined(b"w2", frozenset({"job"}))
    assert b.submit(b"c", TaskEnvelope("u", "nobody", 2, 0, b"[[],{}]", None)) is None
    assert _dead(b) == [("u", "unknown_task")]
    assert b.submit(b"c", envelope("x")) is None
    b.fail("x", "task needs 99 bytes")
    assert _dead(b) == [("x", "too_large")]
    b.cancel("y")  # unknown: nothing
    assert b.submit(b"c", envelope("z")) is None
    b.cancel("z")
    assert _dead(b) == []  # cancelled tasks are not dead letters
    assert b.audit() == []


@pytest.mark.timeout(10)
def test_revive_queues_a_finished_task_again_under_its_id() -> None:
    b = book()
    b.worker_joined(b"w", frozenset({"job"}))
    b.ready(b"w", 10)
    b.submit(b"c", envelope("t"))
    b.dispatch()
    b.take()
    b.report(b"w", ResultRecord("t", "failure", error="boom", attempts=1))
    assert b.is_finished("t")
    assert b.submit(b"c", envelope("t")) is None  # a re-submission: the stored result again
    assert b.take().resends == {b"c": ["t"]}
    assert b.revive(b"d", envelope("t")) is None
    assert b.status_of("t") is TaskStatus.QUEUED
    assert b.revive(b"d", envelope("t")) == ("held", "task t is held already")
    b.dispatch()
    assert [e.task_id for _, batch, _, _ in b.take().dispatches for e in batch] == ["t"]
    b.report(b"w", ResultRecord("t", "success", result=b"1", attempts=1))
    out = b.take()
    assert [r.status for r in out.records] == ["success"]
    assert list(out.pushes) == [b"d"]  # the retrier gets the result
    assert b.audit() == []
