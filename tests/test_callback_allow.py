"""The control plane reaches only allowed callback addresses, and resolves names off libzmq.

A refused address costs the task nothing: it runs, its result is stored and
pushed; only the callback is dropped, counted and logged with the reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
from multiprocess import open_node, poll

from fastworker import CallbackReceiver, Client, Cluster, TaskStatus
from fastworker.control._internal import CallbackJobs
from fastworker.control.callbacks import CallbackConfig, CallbackDispatcher
from fastworker.runtime import GetStatistics
from fastworker.transport import ZSocket, open_socket

pytestmark = pytest.mark.timeout(30)


def add(a: int, b: int) -> int:
    return a + b


@pytest.fixture
async def receiver() -> AsyncIterator[ZSocket]:
    sock = open_socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:*")
    try:
        yield sock
    finally:
        sock.close()


async def test_a_refused_callback_is_counted_and_logged_and_the_task_still_runs(
    receiver: ZSocket,
    poll_until: Callable[..., Awaitable[Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fastworker.callbacks")
    live = receiver.endpoint
    assert live is not None
    with trio.fail_after(15):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            # Passes the client's check (a well-formed address), not the default allow-list.
            refused_id = await client.delay_with_callback(
                "add", "tcp://10.255.255.1:7000", 2, 3, callback_data={"x": 1}
            )
            allowed_id = await client.delay_with_callback("add", live, 4, 4)
            [frame] = await receiver.recv_multipart()
            await client.join(timeout=5)
            stats = await poll_until(
                client.stats, lambda s: s["callbacks"]["dropped"] == 1, timeout=5
            )
            stored = await client.get_task_result(refused_id)

    assert json.loads(frame)["task_id"] == allowed_id
    assert stats["callbacks"]["dropped_by_reason"] == {"not_allowed": 1}
    assert stats["callbacks"]["handed_to_zmq"] == 1
    assert stored is not None
    assert (stored.status, stored.result) == (TaskStatus.SUCCESS, 5)
    assert cluster.control_plane.supervisor.statistics().restarts.get("callbacks", 0) == 0
    [line] = [r.getMessage() for r in caplog.records if "not_allowed" in r.getMessage()]
    assert "tcp://10.255.255.1:7000" in line
    assert "no --callback-allow pattern matches it" in line


async def test_a_host_name_is_resolved_and_patterns_replace_the_default(
    receiver: ZSocket, poll_until: Callable[..., Awaitable[Any]]
) -> None:
    """``localhost`` (IPv4 and IPv6 addresses) reaches a receiver bound on 127.0.0.1 only;
    with the allow-list narrowed to that name, the IP literal itself is refused."""
    live = receiver.endpoint
    assert live is not None
    port = live.rsplit(":", 1)[1]
    with trio.fail_after(15):
        async with (
            Cluster(tasks=[add], callback_allow=["tcp://localhost:*"]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
            CallbackReceiver("ack+tcp://127.0.0.1:*") as acked,
        ):
            named_id = await client.delay_with_callback("add", f"tcp://LocalHost.:{port}", 1, 2)
            [frame] = await receiver.recv_multipart()
            ack_port = acked.endpoint.rsplit(":", 1)[1]
            acked_id = await client.delay_with_callback(
                "add", f"ack+tcp://localhost:{ack_port}", 3, 0
            )
            document = acked.decode(await acked.receive())
            await client.delay_with_callback("add", live, 5, 6)
            await client.join(timeout=5)
            stats = await poll_until(
                client.stats,
                lambda s: s["callbacks"]["dropped"] == 1 and s["callbacks"]["acknowledged"] == 1,
                timeout=5,
            )

    assert json.loads(frame)["task_id"] == named_id
    assert (document["task_id"], document["result"]) == (acked_id, 3)
    assert stats["callbacks"]["dropped_by_reason"] == {"not_allowed": 1}


async def test_a_name_that_does_not_resolve_drops_its_documents(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    dispatcher = CallbackDispatcher(
        CallbackConfig(allow=("tcp://*.invalid:*",), resolve_timeout=3.0)
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            name = "tcp://nowhere.invalid:7000"
            dispatcher.ref.tell(CallbackJobs([(name, b"one", None), (name, b"two", None)]))
            # The resolver thread answers in its own time (or the timeout ends it).
            stats = await poll_until(
                lambda: dispatcher.ref.ask(GetStatistics()), lambda s: not s["addresses"], timeout=8
            )
            dispatcher.ref.stop()

    assert stats["dropped_by_reason"] == {"unresolved": 2}
    assert stats["handed_to_zmq"] == 0


def test_a_bad_pattern_fails_at_start_not_at_delivery() -> None:
    with pytest.raises(ValueError, match=r"callback allow pattern 'tcp://10\.0\.0\.1'"):
        Cluster(tasks=[add], callback_allow=["tcp://10.0.0.1"])
    with pytest.raises(TypeError, match="not one string"):
        Cluster(tasks=[add], callback_allow="tcp://10.0.0.1:*")


@pytest.mark.multiprocess
async def test_the_node_flag_adds_patterns_to_the_loopback_default(tmp_path: Path) -> None:
    """``--callback-allow 'ipc://DIR/*'`` opens that directory, and only it, beside loopback."""
    allowed_dir = tmp_path / "app"
    allowed_dir.mkdir()
    pattern = f"ipc://{allowed_dir}/*"
    async with (
        open_node(
            "--discovery-address",
            "tcp://127.0.0.1:*",
            "--task-modules",
            "examples.tasks",
            "--callback-allow",
            pattern,
        ) as node,
        Client(discovery_address=node.discovery_address, timeout=15) as client,
        CallbackReceiver(f"ipc://{allowed_dir}/cb.sock") as inside,
        CallbackReceiver(f"ipc://{tmp_path}/cb.sock") as outside,
        CallbackReceiver("tcp://127.0.0.1:*") as loopback,
    ):
        with trio.fail_after(20):
            inside_id = await client.delay_with_callback("add", inside.address, 1, 2)
            await client.delay_with_callback("add", outside.address, 3, 4)
            loopback_id = await client.delay_with_callback("add", loopback.address, 5, 6)
            assert inside.decode(await inside.receive())["task_id"] == inside_id
            assert loopback.decode(await loopback.receive())["task_id"] == loopback_id
            await client.join()
            stats = await client.stats()
            # The drop is logged as it is counted; the line reaches stderr from the
            # node's log-writer thread, so it may come a moment after the count.
            dropped = f"'ipc://{tmp_path}/cb.sock' dropped (not_allowed"
            await poll(lambda: dropped in node.stderr_text(), timeout=5, what="the drop logged")
    assert stats["callbacks"]["dropped_by_reason"] == {"not_allowed": 1}


async def test_an_ipv6_literal_is_delivered() -> None:
    sock = open_socket(zmq.PULL)
    sock.zmq_socket.setsockopt(zmq.IPV6, 1)
    try:
        try:
            endpoint = sock.bind("tcp://[::1]:*")
        except zmq.ZMQError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        with trio.fail_after(10):
            async with (
                Cluster(tasks=[add]) as cluster,
                Client(discovery_address=cluster.discovery_address) as client,
            ):
                task_id = await client.delay_with_callback("add", endpoint, 1, 1)
                [frame] = await sock.recv_multipart()
    finally:
        sock.close()
    assert json.loads(frame)["task_id"] == task_id
