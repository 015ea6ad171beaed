"""The embedded cluster end to end: a Client on trio against ``Cluster(...)`` in the same run.

Everything goes over real loopback ZeroMQ sockets on random ports.  Nothing
here sleeps to wait: tests wait for ``join``, ``submit_task``, a gate a task
reached, or a reply that is known to travel behind the thing awaited.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os

import pytest
import trio
import zmq

from fastworker import (
    Client,
    Cluster,
    ControlPlaneUnavailableError,
    TaskPriority,
    TaskResult,
    TaskStatus,
)
from fastworker.transport import ZSocket, open_socket
from fastworker.wire import (
    ErrorReply,
    ResultRecord,
    Results,
    StatsQuery,
    StatsReply,
    Submit,
    SubmitAck,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(30)


def add(a: int, b: int) -> int:
    return a + b


def fail(message: str) -> None:
    raise RuntimeError(message)


async def test_a_thousand_delayed_tasks_over_two_workers_all_complete() -> None:
    with trio.fail_after(20):
        async with (
            Cluster(tasks=[add], workers=2) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            ids = [await client.delay("add", i, i) for i in range(1000)]
            await client.join(timeout=15)
            results = [client.get_result(task_id) for task_id in ids]

    assert len(set(ids)) == 1000
    assert all(r is not None and r.status is TaskStatus.SUCCESS for r in results)
    assert [r.result for r in results if r is not None] == [2 * i for i in range(1000)]
    # A worker holds at most concurrency + prefetch (8 + 64) tasks, so the
    # other one necessarily gets part of a 1,000-task backlog.
    done = [worker.executor.completed for worker in cluster.workers]
    assert sum(done) == 1000
    assert all(n > 0 for n in done), done


async def test_a_thousand_tasks_submitted_as_one_batch_all_complete() -> None:
    # Both item forms: (name, args) tuples and mappings with kwargs.
    specs = [
        ("add", (i, i)) if i % 2 else {"task_name": "add", "args": [i], "kwargs": {"b": i}}
        for i in range(1000)
    ]
    with trio.fail_after(20):
        async with (
            Cluster(tasks=[add], workers=2) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            ids = await client.submit_batch(specs)
            await client.join(timeout=15)
            results = [client.get_result(task_id) for task_id in ids]
            stats = await client.stats()

    assert [r.result for r in results if r is not None and r.ok] == [2 * i for i in range(1000)]
    assert stats["scheduler"]["succeeded"] == 1000
    done = [worker.executor.completed for worker in cluster.workers]
    assert sum(done) == 1000
    assert all(n > 0 for n in done), done


async def test_status_moves_from_pending_through_queued_to_success_by_itself(gate) -> None:
    def hold() -> None:
        gate.wait()

    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add, hold], workers=1, concurrency=1, prefetch=0) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            await client.delay("hold")
            task_id = await client.delay("add", 2, 3)
            # delay() returns before anything touched the network.
            assert client.get_status(task_id) is TaskStatus.PENDING
            assert client.get_result(task_id) is None

            await gate.entered()
            # A stats round trip travels behind the submission and its
            # acknowledgement, so the task is known to be queued by now.
            stats = await client.stats()
            assert stats["scheduler"]["queued"]["normal"] == 1
            assert client.get_status(task_id) is TaskStatus.QUEUED

            gate.open()
            await client.join(timeout=5)
            status = client.get_status(task_id)
            result = client.get_result(task_id)

    assert status is TaskStatus.SUCCESS
    assert isinstance(result, TaskResult)
    assert (result.task_id, result.status, result.result) == (task_id, TaskStatus.SUCCESS, 5)
    assert result.error is None
    assert result.task_name == "add"
    assert result.started_at is not None
    assert result.completed_at is not None
    assert result.started_at.tzinfo is not None
    assert result.started_at <= result.completed_at <= dt.datetime.now(dt.UTC)


async def test_status_and_result_of_a_task_this_client_never_submitted_are_none() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            assert client.get_status("no-such-task") is None
            assert client.get_result("no-such-task") is None
            assert await client.get_task_result("no-such-task") is None


async def test_stats_show_workers_queues_outcomes_cache_callbacks_and_rejections(gate) -> None:
    def hold() -> None:
        gate.wait()

    with trio.fail_after(15):
        async with (
            Cluster(tasks=[add, fail, hold], workers=2, concurrency=1, prefetch=0) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            before = await client.stats()
            assert before["discovery"]["workers_alive"] == 2
            assert before["scheduler"]["workers_connected"] == 2
            assert before["scheduler"]["queued"] == {
                "critical": 0,
                "high": 0,
                "normal": 0,
                "low": 0,
            }
            assert before["scheduler"]["running"] == 0
            assert before["scheduler"]["succeeded"] == 0
            assert before["scheduler"]["failed"] == 0
            assert before["result-cache"]["size"] == 0
            assert before["callbacks"]["handed_to_zmq"] == 0
            assert before["callbacks"]["dropped"] == 0
            assert before["rejected"] == {}

            # Both workers busy, then a backlog in every priority.
            await client.delay("hold")
            await client.delay("hold")
            await gate.entered(2)
            for priority, count in [("critical", 1), ("high", 2), ("normal", 3), ("low", 4)]:
                for i in range(count):
                    await client.delay("add", i, i, priority=TaskPriority(priority))
            busy = await client.stats()
            assert busy["scheduler"]["queued"] == {"critical": 1, "high": 2, "normal": 3, "low": 4}
            assert busy["scheduler"]["queued_total"] == 10
            assert busy["scheduler"]["running"] == 2

            gate.open()
            failed = await client.submit_task("fail", args=("on purpose",), timeout=5)
            assert failed.status is TaskStatus.FAILURE
            await client.join(timeout=5)
            after = await client.stats()
            assert after["scheduler"]["queued"] == {"critical": 0, "high": 0, "normal": 0, "low": 0}
            assert after["scheduler"]["running"] == 0
            assert after["scheduler"]["succeeded"] == 12  # 10 add + 2 hold
            assert after["scheduler"]["failed"] == 1
            assert after["result-cache"]["size"] == 13

            # A frame that is not a message: rejected, answered, and counted.
            async with open_socket(zmq.DEALER) as raw:
                gateway = cluster.control_plane.gateway.endpoint
                assert gateway is not None
                raw.connect(gateway)
                await raw.send_multipart([b"\xffnot a message"])
                [reply] = await raw.recv_multipart()
            error = decode(reply)
            assert isinstance(error, ErrorReply)
            assert error.reason == "malformed"
            rejected = await client.stats()
            assert rejected["rejected"] == {"malformed": 1}
            # Still serving after the bad frame.
            assert (await client.submit_task("add", args=(1, 1), timeout=5)).result == 2


async def test_a_cancelled_queued_task_never_runs(gate) -> None:
    ran: list[str] = []

    def hold() -> None:
        gate.wait()

    def record(tag: str) -> str:
        ran.append(tag)
        return tag

    with trio.fail_after(10):
        async with (
            Cluster(tasks=[hold, record], workers=1, concurrency=1, prefetch=0) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
            Client(discovery_address=cluster.discovery_address) as other,
        ):
            await client.delay("hold")
            victim = await client.delay("record", "victim")
            await gate.entered()
            stats = await client.stats()
            assert stats["scheduler"]["queued"]["normal"] == 1  # the victim, at the control plane

            assert await client.cancel_task(victim) is True
            assert client.get_status(victim) is TaskStatus.CANCELLED

            gate.open()
            after = await client.submit_task("record", args=("after",), timeout=5)
            await client.join(timeout=5)
            seen_elsewhere = await other.get_task_result(victim)
            stats = await client.stats()

    assert after.result == "after"
    assert ran == ["after"]
    result = client.get_result(victim)
    assert result is not None
    assert result.status is TaskStatus.CANCELLED
    assert seen_elsewhere is not None
    assert seen_elsewhere.status is TaskStatus.CANCELLED
    assert stats["scheduler"]["cancelled"] == 1


async def test_cancelling_a_finished_or_unknown_task_returns_false() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            done = await client.submit_task("add", args=(1, 2), timeout=5)
            assert done.status is TaskStatus.SUCCESS
            assert await client.cancel_task(done.task_id) is False
            assert client.get_status(done.task_id) is TaskStatus.SUCCESS
            assert await client.cancel_task("no-such-task") is False


async def _bodies(raw: ZSocket, count: int) -> list[object]:
    """The next ``count`` messages from the gateway, however they are grouped into frames."""
    messages: list[object] = []
    while len(messages) < count:
        messages.extend(decode(body) for body in await raw.recv_multipart())
    return messages


def _task_wire(task_id: str, name: str, *args: object) -> list[object]:
    """A TaskWire as a client in any language would build it (JSON payload, no options)."""
    payload = json.dumps([list(args), {}]).encode()
    return [task_id, name, TaskPriority.NORMAL.rank, 0, payload, None]


async def test_a_held_back_ack_comes_before_any_later_reply_and_without_a_result(gate) -> None:
    """Plain acks wait a moment for a message to ride with, but never hold up anything else."""

    def hold() -> None:
        gate.wait()

    with trio.fail_after(10):
        async with (
            Cluster(tasks=[hold], workers=1, concurrency=1, prefetch=0) as cluster,
            open_socket(zmq.DEALER, identity=b"raw-client") as raw,
        ):
            gateway = cluster.control_plane.gateway.endpoint
            assert gateway is not None
            raw.connect(gateway)
            await raw.send_multipart([encode(Submit(1, [_task_wire("held-1", "hold")]))])
            await raw.send_multipart([encode(StatsQuery(2))])
            first, second = await _bodies(raw, 2)
            # The task is still running: the ack came without a result, before the stats.
            assert first == SubmitAck(1, [])
            assert isinstance(second, StatsReply)
            assert second.request_id == 2

            gate.open()
            [results] = await _bodies(raw, 1)

    assert isinstance(results, Results)
    records = [ResultRecord.from_wire(r) for r in results.results]
    assert [(r.task_id, r.status) for r in records] == [("held-1", "success")]


async def test_a_quick_tasks_ack_rides_just_ahead_of_its_result() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add], workers=1) as cluster,
            open_socket(zmq.DEALER, identity=b"raw-client") as raw,
        ):
            gateway = cluster.control_plane.gateway.endpoint
            assert gateway is not None
            raw.connect(gateway)
            await raw.send_multipart([encode(Submit(7, [_task_wire("quick-1", "add", 2, 3)]))])
            ack, pushed = await _bodies(raw, 2)

    assert ack == SubmitAck(7, [])
    assert isinstance(pushed, Results)
    records = [ResultRecord.from_wire(r) for r in pushed.results]
    assert [(r.task_id, r.status, r.result) for r in records] == [("quick-1", "success", b"5")]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.timeout(60)
async def test_clusters_and_clients_started_and_stopped_leave_no_file_descriptors_behind() -> None:
    # Handshake monitors once kept libzmq from reaping closed sockets: about
    # nine descriptors per client and fourteen per worker, until "Too many
    # open files" stopped the suite.
    async def one_round() -> None:
        async with Cluster(tasks=[add], workers=2) as cluster:
            for _ in range(3):
                async with Client(discovery_address=cluster.discovery_address) as client:
                    assert (await client.submit_task("add", [1, 2])).result == 3

    await one_round()
    before = _open_fds()
    for _ in range(4):
        await one_round()
    # libzmq reaps closed sockets in its own thread: give it its moment.
    for _ in range(100):
        if _open_fds() <= before:
            break
        await trio.sleep(0.05)
    assert _open_fds() <= before


@pytest.mark.timeout(30)
async def test_a_connection_cut_mid_handshake_is_no_refusal_and_the_client_carries_on() -> None:
    # What a control plane killed or restarting during a client's handshake looks
    # like, or another service on the port: the listener accepts, writes what is
    # no ZMTP greeting, and closes.  That once left the client raising
    # AuthenticationError for good; it must simply wait for the real one.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    three_cut = trio.Event()

    async def cut_every_connection() -> None:
        cut = 0
        while True:
            conn, _ = await listener.accept()
            with contextlib.suppress(OSError):
                await conn.send(b"SSH-2.0-OpenSSH_9.2\r\n")
            conn.close()
            cut += 1
            if cut >= 3:
                three_cut.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cut_every_connection)
        client = Client(discovery_address=f"tcp://127.0.0.1:{port}", timeout=10)
        await client.start()
        try:
            task_id = await client.delay("add", 1, 2)
            with trio.fail_after(10):
                await three_cut.wait()
            # Not a refusal: no answer yet, as with nobody there.
            with pytest.raises(ControlPlaneUnavailableError):
                await client.stats(timeout=0.5)
            nursery.cancel_scope.cancel()
            listener.close()
            async with Cluster(tasks=[add], discovery_address=f"tcp://127.0.0.1:{port}"):
                with trio.fail_after(10):
                    await client.join()
            result = client.get_result(task_id)
            assert result is not None
            assert result.result == 3
        finally:
            client.stop(timeout=0)
