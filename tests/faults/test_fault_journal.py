"""``kill -9`` of a control plane running with ``--journal``: what it acknowledged survives.

Without a journal, recovery rests on clients re-submitting (test_fault_control_plane_restart);
here no client needs to be alive: the restarted control plane takes its tasks back from the
file.  Runs are counted from the tasks' own logs (``fault_tasks.work``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from _nodes import (
    ANY_PORT,
    TASKS,
    client_for,
    fault_node,
    free_tcp_port,
    poll,
    read_runs,
    stats,
    wait_for_workers,
)
from multiprocess import Node, run_node

from fastworker import TaskStatus
from fastworker.control._journal_store import APPLICATION_ID
from fastworker.control._schedules import tick_task_id
from fastworker.tasks.serializer import SerializationFormat, dumps
from fastworker.wire import Submit, SubmitAck, decode, encode

pytestmark = [pytest.mark.multiprocess]

FAST = ("--heartbeat-interval", "0.5")
# How long the control plane stays down after its kill -9 (ticks fall meanwhile).
OUTAGE_SECONDS = 2.5


def _control_plane(address: str, journal: Path) -> tuple[str, ...]:
    return ("--role", "control-plane", "--discovery-address", address, "--journal", str(journal))


def _workers(address: str, concurrency: int = 8) -> tuple[str, ...]:
    return (
        "--role",
        "worker",
        "--discovery-address",
        address,
        "--workers",
        "1",
        "--concurrency",
        str(concurrency),
        "--grace",
        "2",
        *FAST,
        *TASKS,
    )


async def _kill_9(node: Node) -> None:
    node.signal(signal.SIGKILL)
    assert await trio.to_thread.run_sync(node.wait_exit, 10.0)


async def _all_ran(log_dir: Path, keys: set[str], timeout: float = 30.0) -> Any:
    return await poll(
        lambda: keys <= set((runs := read_runs(log_dir)).counts) and runs,
        timeout=timeout,
        interval=0.05,
        what=f"{len(keys)} tasks run",
    )


def _journal_and_runs(tmp_path: Path) -> tuple[Path, Path, str]:
    """The journal's path, a directory for the tasks' run logs, and a fixed discovery address
    (a restarted node must come back where its clients look)."""
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    return tmp_path / "journal.db", log_dir, f"tcp://127.0.0.1:{free_tcp_port()}"


@pytest.mark.timeout(60)
async def test_1000_queued_tasks_run_after_a_kill_9_with_no_client_alive(tmp_path: Path) -> None:
    journal, log_dir, _ = _journal_and_runs(tmp_path)
    async with contextlib.AsyncExitStack() as nodes:
        control = await nodes.enter_async_context(
            fault_node(*_control_plane(ANY_PORT, journal), *FAST)
        )
        async with client_for(control) as client:
            await client.submit_batch([("work", [n, 0, str(log_dir)]) for n in range(1000)])
            await client.flush()  # acknowledged: on disk
        await _kill_9(control)

        control = await nodes.enter_async_context(
            fault_node(*_control_plane(ANY_PORT, journal), *FAST)
        )
        await nodes.enter_async_context(fault_node(*_workers(control.discovery_address)))
        runs = await _all_ran(log_dir, {str(n) for n in range(1000)})
        assert runs.total == 1000  # none lost, none twice: nothing was running at the kill
        async with client_for(control) as client:
            final = await poll(
                lambda: _settled(client), timeout=10, interval=0.05, what="an empty queue"
            )
        assert final["journal"]["recovered"]["tasks"] == 1000
        assert final["scheduler"]["succeeded"] == 1000
    with sqlite3.connect(journal) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0


async def _settled(client: Any) -> dict[str, Any] | None:
    current = await stats(client)
    done = current["scheduler"]["held"] == 0 and current["journal"]["pending_entries"] == 0
    return current if done else None


@pytest.mark.timeout(60)
async def test_tasks_running_at_the_kill_run_again_and_results_from_before_it_are_kept(
    tmp_path: Path,
) -> None:
    journal, log_dir, address = _journal_and_runs(tmp_path)
    async with contextlib.AsyncExitStack() as nodes:
        control = await nodes.enter_async_context(
            fault_node(*_control_plane(address, journal), *FAST)
        )
        await nodes.enter_async_context(fault_node(*_workers(address, concurrency=4)))
        async with client_for(address) as client:
            await wait_for_workers(client, 1)
            before = await client.submit_task("work", args=(100, 0, str(log_dir)))
            assert before.status is TaskStatus.SUCCESS
            slow = [await client.delay("work", n, 1.0, str(log_dir)) for n in range(8)]
            await client.flush()
        # The client is gone; four tasks are running, four queued at the worker or here.
        await poll(lambda: read_runs(log_dir).total >= 5, timeout=15, what="4 tasks running")
        await _kill_9(control)
        control = await nodes.enter_async_context(
            fault_node(*_control_plane(address, journal), *FAST)
        )
        async with client_for(address) as client:
            kept = await client.get_task_result(before.task_id)
            assert kept is not None
            assert kept.status is TaskStatus.SUCCESS
            assert kept.result == before.result
            for n, task_id in enumerate(slow):
                result = await poll(
                    lambda t=task_id: client.get_task_result(t),  # type: ignore[misc]
                    timeout=20,
                    interval=0.05,
                    what=f"task {n}'s result",
                )
                assert result.status is TaskStatus.SUCCESS
                assert result.result[0] == 2 * n
        runs = read_runs(log_dir)
        assert {str(n) for n in range(8)} <= set(runs.counts)
        assert runs.counts["100"] == 1  # finished before the kill: not run again


@pytest.mark.timeout(60)
async def test_a_client_alive_across_the_kill_gets_every_result_it_waits_for(
    tmp_path: Path,
) -> None:
    journal, log_dir, address = _journal_and_runs(tmp_path)
    async with contextlib.AsyncExitStack() as nodes:
        control = await nodes.enter_async_context(
            fault_node(*_control_plane(address, journal), *FAST)
        )
        await nodes.enter_async_context(fault_node(*_workers(address)))
        client = await nodes.enter_async_context(client_for(address))
        await wait_for_workers(client, 1)
        ids = await client.submit_batch([("work", [n, 0.01, str(log_dir)]) for n in range(400)])
        await poll(lambda: client.pending_count <= 300, timeout=20, interval=0.01, what="100 done")
        await _kill_9(control)
        await nodes.enter_async_context(fault_node(*_control_plane(address, journal), *FAST))
        with trio.fail_after(40):
            await client.join()
        results = [client.get_result(task_id) for task_id in ids]
        wrong = [
            n
            for n, r in enumerate(results)
            if r is None or r.status is not TaskStatus.SUCCESS or r.result[0] != 2 * n
        ]
        assert wrong == []
        final = await stats(client)
        assert final["journal"]["recovered"]["tasks"] > 0


def _burst(endpoint: str, log_dir: Path, killed: threading.Event, kill: Any) -> set[str]:
    """Pipeline Submits of 100 tasks on a raw DEALER; kill the control plane after 10 acks;
    the ids of every task acknowledged before it died."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent: dict[int, list[str]] = {}
    acked: set[str] = set()
    answered = 0
    try:
        for request in range(1, 61):
            tasks: list[list[Any]] = []
            for k in range(100):
                n = request * 100 + k
                payload = dumps(SerializationFormat.JSON, [[n, 0, str(log_dir)], {}])
                tasks.append([f"burst-{n}", "work", 2, 0, payload, None])
            sent[request] = [f"burst-{request * 100 + k}" for k in range(100)]
            sock.send(encode(Submit(request, tasks)))
            while sock.poll(0 if request < 60 else 1000):
                for frame in sock.recv_multipart():
                    message = decode(frame)
                    if isinstance(message, SubmitAck):
                        assert message.rejected == []
                        acked.update(sent[message.request_id])
                        answered += 1
                if answered >= 10 and not killed.is_set():
                    kill()
                    killed.set()
    finally:
        sock.close()
    return acked


@pytest.mark.timeout(60)
async def test_every_task_acknowledged_before_a_kill_9_during_a_burst_runs(tmp_path: Path) -> None:
    journal, log_dir, _ = _journal_and_runs(tmp_path)
    client_endpoint = f"tcp://127.0.0.1:{free_tcp_port()}"
    cp_args = (*_control_plane(ANY_PORT, journal), "--client-address", client_endpoint, *FAST)
    async with contextlib.AsyncExitStack() as nodes:
        control = await nodes.enter_async_context(fault_node(*cp_args))
        killed = threading.Event()
        acked = await trio.to_thread.run_sync(
            _burst, client_endpoint, log_dir, killed, lambda: control.signal(signal.SIGKILL)
        )
        assert killed.is_set()
        assert len(acked) >= 1000
        assert await trio.to_thread.run_sync(control.wait_exit, 10.0)

        control = await nodes.enter_async_context(fault_node(*cp_args))
        await nodes.enter_async_context(fault_node(*_workers(control.discovery_address)))
        runs = await _all_ran(log_dir, {key.removeprefix("burst-") for key in acked})
        async with client_for(control) as client:
            final = await poll(
                lambda: _settled(client), timeout=10, interval=0.05, what="an empty queue"
            )
        recovered = final["journal"]["recovered"]["tasks"]
        print(
            f"\nkill -9 during a burst: {len(acked)} tasks acknowledged, {recovered} recovered "
            f"from the journal, {runs.total} runs, none lost"
        )
        assert recovered >= len(acked)


@pytest.mark.timeout(60)
async def test_a_client_schedule_and_a_dead_letter_survive_a_kill_9_and_missed_ticks_run_once(
    tmp_path: Path,
) -> None:
    journal, log_dir, address = _journal_and_runs(tmp_path)
    start = time.time()
    async with contextlib.AsyncExitStack() as nodes:
        control = await nodes.enter_async_context(
            fault_node(*_control_plane(address, journal), *FAST)
        )
        await nodes.enter_async_context(fault_node(*_workers(address)))
        async with client_for(address) as client:
            await wait_for_workers(client, 1)
            sid = await client.schedule(
                "work", cron="* * * * * *", args=[7, 0, str(log_dir)], schedule_id="each-second"
            )
            lost = await client.submit_task("no_such_task")  # no worker serves it: dead
            assert lost.status is TaskStatus.FAILURE
        await poll(lambda: read_runs(log_dir).counts["7"] >= 2, timeout=10, what="two ticks run")
        await _kill_9(control)
        killed = time.time()
        await trio.sleep(OUTAGE_SECONDS)  # the outage itself: ticks fall while nobody can run them
        await nodes.enter_async_context(fault_node(*_control_plane(address, journal), *FAST))
        async with client_for(address) as client:
            (info,) = await client.schedules()
            assert (info.schedule_id, info.source, info.args) == (
                sid,
                "client",
                (7, 0, str(log_dir)),
            )
            assert [letter.task_id for letter in await client.dead_letters()] == [lost.task_id]
            ran = read_runs(log_dir).counts["7"]
            await poll(lambda: read_runs(log_dir).counts["7"] >= ran + 3, timeout=10, what="ticks")
            assert await client.remove_schedule(sid)
            after = await poll(
                lambda: _settled(client), timeout=10, interval=0.05, what="an empty queue"
            )
            found = [
                second
                for second in range(math.floor(start), math.ceil(time.time()) + 1)
                if await client.get_task_result(tick_task_id(sid, second)) is not None
            ]
    runs = read_runs(log_dir).counts["7"]
    gaps = [(a, b) for a, b in itertools.pairwise(found) if b - a > 1]
    print(f"\nticks with a result: {found}; killed at {killed:.2f}; runs {runs}")
    # One run (the first missed tick's, run late) stood for the ticks that fell while the
    # control plane was down and while the new one started: one gap, from a tick at most a
    # second after the kill to the first tick after the restart.  Its length depends on
    # where in its second the kill fell (2 or more), so it is bounded by the times.
    assert len(gaps) == 1
    assert gaps[0][0] <= killed + 1
    assert gaps[0][1] > killed + OUTAGE_SECONDS
    assert after["scheduler"]["schedules"]["collapsed"] == 1
    # Every run has its tick's result; a tick running at the kill may run twice.
    assert len(found) <= runs <= len(found) + 1
    with sqlite3.connect(journal) as db:
        keys = {key for (key,) in db.execute("SELECT key FROM state")}
    assert keys == {f"dead/{lost.task_id}"}  # the removed schedule left the file


@pytest.mark.timeout(30)
def test_a_journal_of_another_version_stops_the_node_with_a_clear_error_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("PRAGMA user_version=7")
        db.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY)")
    done = run_node(
        "--role", "control-plane", "--discovery-address", ANY_PORT, "--journal", str(path)
    )
    assert done.returncode == 78, done.stderr
    assert "schema version 7; this fastworker reads version 1" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "notes.txt").write_text("my notes " * 1000)
    done = run_node(
        "--role",
        "control-plane",
        "--discovery-address",
        ANY_PORT,
        "--journal",
        str(tmp_path / "notes.txt"),
    )
    assert done.returncode == 78, done.stderr
    assert "cannot read the journal" in done.stderr
    assert (tmp_path / "notes.txt").read_text().startswith("my notes")
    done = run_node("--role", "worker", "--journal", str(path))
    assert done.returncode == 2
    assert "--journal belongs to the control plane" in done.stderr
