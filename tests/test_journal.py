"""The journal in one process: the file's contents, torn writes, bounds, a failing disk, a slow one.

The kill -9 tests with real node processes are in tests/faults/test_fault_journal.py.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio

from fastworker import Client, Cluster, QueueFullError, TaskStatus, task
from fastworker.control import _journal_store
from fastworker.control._journal_store import JournalError, JournalStore, WriteBatch
from fastworker.control.journal import JournalConfig, JournalQueue
from fastworker.wire import ResultRecord, TaskEnvelope

pytestmark = pytest.mark.timeout(30)


@task
def triple(x: int) -> int:
    return 3 * x


_flaky = {"fail": True}


@task(name="journal_flaky", max_retries=0)
def journal_flaky(x: int) -> int:
    if _flaky["fail"]:
        raise RuntimeError(f"flaky {x}")
    return 2 * x


def _envelope(n: int) -> TaskEnvelope:
    return TaskEnvelope(f"t-{n}", "triple", 2, 0, b"[[1],{}]", None)


def _result(n: int) -> ResultRecord:
    return ResultRecord(f"t-{n}", "success", b"3", completed_at=1.0, attempts=1, name="triple")


def _open(path: Path, **kwargs: Any) -> tuple[JournalStore, _journal_store.Recovered]:
    kwargs.setdefault("max_results", 100)
    kwargs.setdefault("result_ttl", 3600.0)
    return JournalStore.open(str(path), sync="normal", **kwargs)


def _tasks(ns: range) -> tuple[str, Any]:
    return ("tasks", [(f"t-{n}", b"client-1", list(_envelope(n))) for n in ns])


def test_tasks_results_and_state_come_back_in_order(tmp_path: Path) -> None:
    store, recovered = _open(tmp_path / "j.db")
    assert (recovered.tasks, recovered.results, recovered.state) == ([], [], {})
    cron = cbor2.dumps({"every": [1, 2]})
    store.write([WriteBatch([_tasks(range(10)), ("state", ("cron", cron))])])
    store.write([WriteBatch([("results", [_result(3), _result(7)]), ("state", ("gone", b"\x01"))])])
    store.write([WriteBatch([("state", ("gone", None))])])
    store.close()

    store, recovered = _open(tmp_path / "j.db")
    store.close()
    assert [env.task_id for _, env in recovered.tasks] == [
        f"t-{n}" for n in range(10) if n not in (3, 7)
    ]
    assert recovered.tasks[0] == (b"client-1", _envelope(0))
    assert [record for record, _ in recovered.results] == [_result(3), _result(7)]
    assert all(0 <= age < 60 for _, age in recovered.results)
    assert recovered.state == {"cron": {"every": [1, 2]}}


def test_results_are_stored_in_the_full_form_that_both_protocol_versions_read(
    tmp_path: Path,
) -> None:
    # A plain success goes compact on the wire (protocol 2), never in the file: a
    # journal stays readable by the fastworker that wrote it before the upgrade.
    store, _ = _open(tmp_path / "j.db")
    store.write([WriteBatch([("results", [_result(1)])])])
    store.close()
    with sqlite3.connect(tmp_path / "j.db") as db:
        [(blob,)] = db.execute("SELECT record FROM results").fetchall()
    assert cbor2.loads(blob) == list(_result(1))


def test_results_are_bounded_by_count_and_ttl(tmp_path: Path) -> None:
    store, _ = _open(tmp_path / "j.db", max_results=5)
    for n in range(20):
        store.write([WriteBatch([_tasks(range(n, n + 1)), ("results", [_result(n)])])])
    assert store.counts() == {"tasks": 0, "results": 5, "state": 0}
    store.close()
    store, recovered = _open(tmp_path / "j.db", max_results=5)
    store.close()
    assert [r.task_id for r, _ in recovered.results] == [f"t-{n}" for n in range(15, 20)]
    # Opened with a TTL they have outlived, they are deleted from the file.
    store, recovered = _open(tmp_path / "j.db", max_results=5, result_ttl=1e-9)
    assert recovered.results == []
    assert store.counts()["results"] == 0
    store.close()


def test_a_write_torn_by_a_crash_loses_only_that_transaction(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    store, _ = _open(live / "j.db")
    store.write([WriteBatch([_tasks(range(100))])])
    store.write([WriteBatch([_tasks(range(100, 200))])])
    # A crash now: the files as they are on disk, the last WAL frame cut short.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("j.db", "j.db-wal"):
        shutil.copy(live / name, crashed / name)
    store.close()
    wal = crashed / "j.db-wal"
    wal.write_bytes(wal.read_bytes()[:-100])

    store, recovered = _open(crashed / "j.db")
    ids = [env.task_id for _, env in recovered.tasks]
    assert ids == [f"t-{n}" for n in range(100)]  # the first commit whole, the torn one gone
    store.write([WriteBatch([_tasks(range(100, 200))])])  # and the journal goes on
    store.close()
    assert len(_open(crashed / "j.db")[1].tasks) == 200


def test_an_incompatible_or_foreign_file_is_a_clear_error_and_is_left_alone(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    _open(path)[0].close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(JournalError, match="schema version 99; this fastworker reads version 1"):
        _open(path)
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE mine (x)")
    with pytest.raises(JournalError, match="is not a fastworker journal"):
        _open(tmp_path / "other.db")
    (tmp_path / "text").write_text("not a database at all, " * 100)
    with pytest.raises(JournalError, match="cannot read the journal"):
        _open(tmp_path / "text")
    assert (tmp_path / "text").read_text().startswith("not a database")


async def test_state_documents_go_in_the_next_commit_and_come_back_at_replay(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "j.db")
    async with Cluster(tasks=[triple], journal=path, workers=0) as cluster:
        journal = cluster.control_plane.journal
        assert journal is not None
        with pytest.raises(TypeError, match="journal state 'bad' is not CBOR-able"):
            journal.queue.put_state("bad", object())  # refused at the call, nothing queued
        journal.queue.put_state("schedules", {"every-minute": {"cron": "* * * * *"}})
        journal.queue.put_state("dead-letters", [1, 2])
        journal.queue.put_state("dead-letters", None)
    async with Cluster(tasks=[triple], journal=path, workers=0) as cluster:
        assert cluster.control_plane.recovered_state == {
            "schedules": {"every-minute": {"cron": "* * * * *"}}
        }


def test_a_state_key_written_twice_before_a_commit_is_one_entry() -> None:
    queue = JournalQueue(JournalConfig("unused"))
    for tick in range(100):  # a schedule ticking while the disk cannot write
        queue.put_state("schedule/s", {"next": tick})
    queue.put_state("dead/t", {"x": 1})
    queue.put_state("dead/t", None)
    assert queue.statistics()["pending_entries"] == 2
    pending = queue.take()
    assert pending.batch.ops == [
        ("state", ("schedule/s", cbor2.dumps({"next": 99}))),
        ("state", ("dead/t", None)),
    ]
    queue.committed(pending)
    assert queue.statistics() == {"pending_entries": 0, "pending_bytes": 0}


def _state_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {key for (key,) in db.execute("SELECT key FROM state")}


async def _fail_twice_and_schedule(client: Client) -> tuple[Any, Any, str]:
    failed = await client.submit_task("journal_flaky", args=(21,))
    other = await client.submit_task("journal_flaky", args=(1,))
    assert failed.status is other.status is TaskStatus.FAILURE
    return failed, other, await client.schedule("journal_flaky", repeat_interval=3600, args=[5])


async def test_dead_letters_survive_a_restart_and_a_retried_one_leaves_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    _flaky["fail"] = True
    async with Cluster(tasks=[journal_flaky], journal=str(path)) as cluster:
        failed, other, sid = await _submit(cluster, _fail_twice_and_schedule)
    assert _state_keys(path) == {
        f"dead/{failed.task_id}",
        f"dead/{other.task_id}",
        f"schedule/{sid}",
    }

    _flaky["fail"] = False
    async with (
        Cluster(tasks=[journal_flaky], journal=str(path)) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        letters = {letter.task_id: letter for letter in await client.dead_letters()}
        assert set(letters) == {failed.task_id, other.task_id}
        letter = letters[failed.task_id]
        assert (letter.reason, letter.args, letter.error) == (
            "retries_exhausted",
            (21,),
            "RuntimeError: flaky 21",
        )
        (info,) = await client.schedules()
        assert (info.schedule_id, info.source, info.args) == (sid, "client", (5,))
        assert await client.retry_dead_letter(failed.task_id)
        await client.join(timeout=10)
        result = client.get_result(failed.task_id)
        assert result is not None
        assert (result.status, result.result) == (TaskStatus.SUCCESS, 42)
        assert await client.remove_schedule(sid)
    # The retried letter and the removed schedule left the file; the other letter stays.
    assert _state_keys(path) == {f"dead/{other.task_id}"}
    recovered = _open(path)[1]
    assert recovered.tasks == []
    assert {r.task_id: r.status for r, _ in recovered.results}[failed.task_id] == "success"


def test_the_queue_refuses_new_tasks_past_its_bounds() -> None:
    queue = JournalQueue(JournalConfig("unused", max_pending_entries=10, max_pending_bytes=1000))
    assert queue.refusal() is None
    queue.add_tasks([(b"c", _envelope(n)) for n in range(9)])
    assert queue.refusal() is None
    queue.add_results([_result(0)])
    assert "the journal is behind the disk (10 entries" in (queue.refusal() or "")
    pending = queue.take()
    queue.committed(pending)
    assert queue.refusal() is None
    queue.add_tasks([(b"c", _envelope(1)._replace(payload=b"x" * 2000))])
    assert "bytes waiting to be written" in (queue.refusal() or "")


async def test_a_failing_disk_refuses_new_tasks_then_acknowledges_when_it_writes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("fastworker.control.journal._RETRY_FIRST", 0.05)
    healthy = JournalStore.write
    broken = threading.Event()
    broken.set()

    def write(self: JournalStore, batches: Any) -> int:
        if broken.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        return healthy(self, batches)

    monkeypatch.setattr(JournalStore, "write", write)
    path = tmp_path / "j.db"
    async with Cluster(tasks=[triple], journal=str(path), workers=0) as cluster:
        client = Client(discovery_address=cluster.discovery_address, timeout=20)
        await client.start()
        first = await client.delay("triple", 1)
        journal = cluster.control_plane.journal
        assert journal is not None
        await _wait_for(lambda: journal.queue.failure is not None)
        with pytest.raises(QueueFullError, match="the journal cannot write"):
            await client.submit_task("triple", args=(2,))
        broken.clear()  # the disk has room again: the retry commits, the ack goes out
        with trio.fail_after(10):
            await client.flush()
        assert journal.queue.failure is None
        assert (await cluster.stats())["journal"]["failed_commits"] >= 1
        client.stop()
    recovered = _open(path)[1]
    assert [env.task_id for _, env in recovered.tasks] == [first]


async def test_a_slow_disk_delays_acknowledgements_not_dispatch_or_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy = JournalStore.write
    disk_free = threading.Event()

    def write(self: JournalStore, batches: Any) -> int:
        disk_free.wait(20)
        return healthy(self, batches)

    monkeypatch.setattr(JournalStore, "write", write)
    # A worker silent for 0.3 s is declared dead: the disk is held ten times as long.
    async with Cluster(
        tasks=[triple], journal=str(tmp_path / "j.db"), heartbeat_interval=0.1
    ) as cluster:
        client = Client(discovery_address=cluster.discovery_address, timeout=20)
        await client.start()
        try:
            with trio.fail_after(10):
                result = await client.submit_task("triple", args=(5,))
            assert result.status is TaskStatus.SUCCESS
            assert result.result == 15
            await trio.sleep(3.0)  # what must not happen meanwhile: no event to wait for
            stats = await cluster.stats()
            assert stats["journal"]["commits"] == 0  # the disk has not answered yet
            assert stats["discovery"]["workers_alive"] == 1  # heartbeats flow meanwhile
            assert stats["discovery"]["workers_lost"] == 0
        finally:
            disk_free.set()
        await client.flush()
        client.stop()


async def test_one_message_of_many_tasks_is_one_commit(tmp_path: Path) -> None:
    """Group commit: a batch of 2,000 tasks costs the disk one transaction, not 2,000."""
    async with Cluster(tasks=[triple], journal=str(tmp_path / "j.db"), workers=0) as cluster:
        async with Client(discovery_address=cluster.discovery_address) as client:
            await client.submit_batch([("triple", (n,)) for n in range(2000)])
            await client.flush(timeout=10)
        stats = await cluster.stats()
    assert stats["scheduler"]["held"] == 2000
    assert 1 <= stats["journal"]["commits"] <= 3


@pytest.mark.parametrize(("sync", "level"), [(None, 1), ("full", 2)])
async def test_journal_sync_sets_sqlites_synchronous_level(
    tmp_path: Path, sync: str | None, level: int
) -> None:
    """NORMAL by default (WAL: a power loss may lose the last commits, a crash none);
    --journal-sync full fsyncs every commit.  Read on the control plane's own connection."""
    from fastworker.node._cli import build_parser

    args = ["--journal", str(tmp_path / "j.db")] + (["--journal-sync", sync] if sync else [])
    assert build_parser().parse_args(args).journal_sync == (sync or "normal")
    options = {"journal_sync": sync} if sync else {}
    async with Cluster(tasks=[triple], journal=str(tmp_path / "j.db"), **options) as cluster:
        journal = cluster.control_plane.journal
        assert journal is not None
        assert journal._store is not None
        pragma = journal._store._db.execute("PRAGMA synchronous").fetchone()[0]
    assert pragma == level


async def test_a_restarted_control_plane_runs_what_it_held_and_answers_what_it_finished(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "j.db")
    async with Cluster(tasks=[triple], journal=path) as cluster:
        done = await _submit(cluster, lambda client: client.submit_task("triple", args=(7,)))
    async with Cluster(tasks=[triple], journal=path, workers=0) as cluster:
        waiting = await _submit(
            cluster, lambda client: client.submit_batch([("triple", (n,)) for n in range(50)])
        )
    async with Cluster(tasks=[triple], journal=path) as cluster:
        async with Client(discovery_address=cluster.discovery_address) as client:
            again = await client.get_task_result(done.task_id)
            assert again is not None
            assert again.result == 21
            for n, task_id in enumerate(waiting):
                result = await _wait_for(lambda t=task_id: client.get_task_result(t))
                assert result.result == 3 * n
        stats = await cluster.stats()
        assert stats["journal"]["recovered"]["tasks"] == 50
        assert stats["scheduler"]["succeeded"] == 50


async def test_a_cancel_confirmed_by_a_journaled_control_plane_holds_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "j.db")
    async with Cluster(tasks=[triple], journal=path, workers=0) as cluster:
        client = Client(discovery_address=cluster.discovery_address, timeout=20)
        await client.start()
        kept, dropped = await client.submit_batch([("triple", (1,)), ("triple", (2,))])
        await client.flush()
        journal = cluster.control_plane.journal
        assert journal is not None
        held = threading.Event()
        healthy = JournalStore.write

        def write(self: JournalStore, batches: Any) -> int:
            held.wait(20)
            return healthy(self, batches)

        monkeypatch.setattr(JournalStore, "write", write)
        async with trio.open_nursery() as nursery:
            answer: list[bool] = []

            async def cancel() -> None:
                answer.append(await client.cancel_task(dropped))

            nursery.start_soon(cancel)
            try:
                # The CANCELLED result is decided and on its way to the disk.
                await _wait_for(lambda: journal.queue.statistics()["pending_entries"] == 1)
                assert answer == []  # not confirmed while its commit is on the way
            finally:
                held.set()
        assert answer == [True]
        client.stop()
    recovered = _open(Path(path))[1]
    assert [env.task_id for _, env in recovered.tasks] == [kept]
    assert [(r.task_id, r.status) for r, _ in recovered.results] == [(dropped, "cancelled")]


async def _submit(cluster: Cluster, submit: Any) -> Any:
    """What ``submit(client)`` returns, from a client that has handed its tasks over."""
    async with Client(discovery_address=cluster.discovery_address) as client:
        return await submit(client)


async def _wait_for(condition: Any, timeout: float = 10.0) -> Any:
    with trio.fail_after(timeout):
        while True:
            value = condition()
            if not isinstance(value, bool | None):
                value = await value
            if value:
                return value
            await trio.sleep(0.01)


def test_a_second_control_plane_on_one_journal_waits_then_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two control planes replaying one file would each run every task in it.
    monkeypatch.setattr(_journal_store, "_LOCK_WAIT", 0.3)
    first, _ = _open(tmp_path / "j.db")
    try:
        with pytest.raises(JournalError, match="in use by another control plane"):
            _open(tmp_path / "j.db")
    finally:
        first.close()
    second, _ = _open(tmp_path / "j.db")  # released by close(): a restart gets it
    second.close()


def test_an_undecodable_state_row_is_unreadable_not_a_crash_and_a_text_task_row_an_error(
    tmp_path: Path,
) -> None:
    store, _ = _open(tmp_path / "j.db")
    store.write([WriteBatch([_tasks(range(2))])])
    store.close()
    db = sqlite3.connect(tmp_path / "j.db")
    db.execute("INSERT INTO state (key, value) VALUES ('dead/x', x'ff00ff')")
    db.commit()
    store, recovered = _open(tmp_path / "j.db")
    store.close()
    assert recovered.state == {"dead/x": None}  # its keeper drops and deletes it
    assert len(recovered.tasks) == 2
    db.execute("UPDATE tasks SET task = 'not bytes' WHERE id = 't-1'")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="unreadable task"):
        _open(tmp_path / "j.db")
