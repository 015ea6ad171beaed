"""``SIGSTOP`` of a worker past its liveness, then ``SIGCONT``: first result wins, once.

The stopped worker's tasks are requeued and run elsewhere; when it wakes up
its own runs finish and report, late: the control plane counts those results
as stale and records nothing twice.  Every task has a callback to a PULL
socket the test binds: each must get exactly one.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

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
    process_alive,
    read_runs,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import Client, TaskStatus

pytestmark = [pytest.mark.multiprocess]

TASKS_PER_WORKER = 4
# Requeued tasks of a worker that died are poison suspects, and a worker runs
# one suspect at a time: the survivor runs the victim's 4 one after another.
TASK_SECONDS = 1.0


class CallbackSink:
    """A PULL socket the control plane PUSHes callback documents (JSON) to."""

    def __init__(self) -> None:
        self.address = f"tcp://127.0.0.1:{free_tcp_port()}"
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(self.address)
        self.documents: list[dict[str, object]] = []

    def collect(self) -> list[dict[str, object]]:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return self.documents
            self.documents.append(json.loads(frame))

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


async def counter_reached(client: Client, name: str, value: int) -> bool:
    return bool((await stats(client))["scheduler"][name] >= value)


async def run_sigstop(tmp_path: Path, *, heartbeat: float, stopped_for: float) -> None:
    log_dir = tmp_path / "runs"
    log_dir.mkdir()
    common = ("--heartbeat-interval", str(heartbeat), "--grace", "2", *TASKS)
    common += ("--concurrency", str(TASKS_PER_WORKER), "--prefetch", "0", "--workers", "1")
    sink = CallbackSink()
    victim = 0
    try:
        async with fault_node("--role", "all", "--discovery-address", ANY_PORT, *common) as node:
            address = node.discovery_address
            async with (
                fault_node("--role", "worker", "--discovery-address", address, *common) as other,
                client_for(node) as client,
            ):
                await wait_for_workers(client, 2)
                (victim,) = node.children()
                (survivor,) = other.children()
                ids = [
                    await client.delay_with_callback(
                        "work", sink.address, n, TASK_SECONDS, str(log_dir), callback_data=n
                    )
                    for n in range(2 * TASKS_PER_WORKER)
                ]
                # Both workers hold a full window, all running: stop the victim now.
                await poll(
                    lambda: len(read_runs(log_dir).started_by(victim)) >= TASKS_PER_WORKER,
                    timeout=15,
                    interval=0.01,
                    what="the victim running its tasks",
                )
                held = read_runs(log_dir).started_by(victim)
                os.kill(victim, signal.SIGSTOP)  # our node's child
                stopped_at = trio.current_time()

                # Declared dead, its tasks requeued onto the survivor, which runs them.
                await poll(
                    lambda: counter_reached(client, "requeued", len(held)),
                    timeout=stopped_for,
                    what="the stopped worker's tasks requeued",
                )
                detected = trio.current_time() - stopped_at
                with trio.fail_after(30):
                    await client.join()
                finished = trio.current_time() - stopped_at
                assert finished < stopped_for, "every task finished while the victim was stopped"
                results = [client.get_result(task_id) for task_id in ids]
                assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
                assert [r.result[0] for r in results if r] == [2 * n for n in range(len(ids))]
                for n_str in held:
                    assert results[int(n_str)].result[1] == survivor  # type: ignore[union-attr]

                await trio.sleep_until(stopped_at + stopped_for)
                os.kill(victim, signal.SIGCONT)
                # Awake, its runs end (their sleeps are long over) and report: stale.
                await poll(
                    lambda: counter_reached(client, "stale_results", len(held)),
                    timeout=15,
                    what="its late results counted as stale",
                )
                await trio.sleep(1.0)  # room for a wrong second callback to arrive
                scheduler = (await stats(client))["scheduler"]
                callbacks = (await stats(client))["callbacks"]
                documents = sink.collect()

                per_task = Counter(str(d["task_id"]) for d in documents)
                assert {i: n for i, n in per_task.items() if n != 1} == {}
                assert set(per_task) == set(ids)
                assert all(d["status"] == "success" for d in documents)
                assert sorted(d["callback_data"] for d in documents) == list(range(len(ids)))
                assert scheduler["succeeded"] == len(ids)  # not recorded twice
                assert scheduler["stale_results"] == len(held)
                assert callbacks["handed_to_zmq"] == len(ids)
                runs = read_runs(log_dir)
                assert runs.duplicated().keys() == held  # the stopped runs, and only those
                # It is still alive and rejoins the pool after its pause.
                assert process_alive(victim)
                pool = worker_pids(await wait_for_workers(client, 2))
                assert pool == {victim, survivor}
                print(
                    f"\nSIGSTOP {stopped_for:g} s at heartbeat {heartbeat:g} s (liveness "
                    f"{3 * heartbeat:g} s): {len(held)} tasks requeued after {detected:.2f} s, all "
                    f"{len(ids)} done {finished:.2f} s after the stop; after SIGCONT "
                    f"{scheduler['stale_results']} stale results, {scheduler['succeeded']} "
                    f"recorded, {len(documents)} callbacks for {len(ids)} tasks (1 each)"
                )
    finally:
        if victim:
            try:
                os.kill(victim, signal.SIGCONT)  # never leave a stopped process behind
            except ProcessLookupError:
                pass
        sink.close()


@pytest.mark.timeout(60)
async def test_sigstop_past_liveness_then_sigcont_gives_stale_results_and_one_callback(
    tmp_path: Path,
) -> None:
    await run_sigstop(tmp_path, heartbeat=0.5, stopped_for=10.0)


@pytest.mark.soak
@pytest.mark.timeout(90)
async def test_soak_sigstop_at_the_default_heartbeat(tmp_path: Path) -> None:
    await run_sigstop(tmp_path, heartbeat=1.0, stopped_for=10.0)
