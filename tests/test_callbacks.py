"""Completion callbacks as a receiver sees them: one frame on a PULL socket it binds.

The document has exactly the documented keys, in the task's serialization
format (JSON by default, CBOR when the client uses CBOR).  A receiver that is
not there must not slow anything down: its documents are dropped after the
delivery timeout and counted.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import cbor2
import pytest
import trio
import zmq

from fastworker import Client, Cluster, TaskStatus
from fastworker.control._internal import CallbackJobs
from fastworker.control.callbacks import CallbackConfig, CallbackDispatcher
from fastworker.runtime import GetStatistics
from fastworker.transport import ZSocket, open_socket

pytestmark = pytest.mark.timeout(30)

DOCUMENTED_KEYS = {
    "task_id",
    "status",
    "result",
    "error",
    "started_at",
    "completed_at",
    "callback_data",
}
DECODERS: dict[str, Callable[[bytes], Any]] = {"json": json.loads, "cbor": cbor2.loads}


def add(a: int, b: int) -> int:
    return a + b


def reject(n: int) -> None:
    raise ValueError(f"bad input {n}")


@pytest.fixture
async def receiver() -> AsyncIterator[ZSocket]:
    """A PULL socket bound on a random loopback port (``receiver.endpoint``)."""
    sock = open_socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:*")
    try:
        yield sock
    finally:
        sock.close()


def _timestamp(value: Any) -> dt.datetime:
    assert isinstance(value, str)
    stamp = dt.datetime.fromisoformat(value)
    assert stamp.tzinfo is not None, f"{value!r} is not timezone-aware"
    return stamp


@pytest.mark.parametrize("fmt", ["json", "cbor"])
async def test_the_callback_document_has_the_documented_keys(receiver: ZSocket, fmt: str) -> None:
    address = receiver.endpoint
    assert address is not None
    extra = {"source": "my_app", "user_id": 123}
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add, reject]) as cluster,
            Client(discovery_address=cluster.discovery_address, serialization_format=fmt) as client,
        ):
            ok_id = await client.delay_with_callback("add", address, 2, 3, callback_data=extra)
            failed_id = await client.delay_with_callback(
                "reject", address, 7, callback_data=["a", 1]
            )
            bare_id = await client.delay_with_callback("add", address, 1, 1)
            documents = {}
            for _ in range(3):
                [frame] = await receiver.recv_multipart()
                document = DECODERS[fmt](frame)
                documents[document["task_id"]] = document
            await client.join(timeout=5)

    assert set(documents) == {ok_id, failed_id, bare_id}
    for document in documents.values():
        assert set(document) == DOCUMENTED_KEYS
        started, completed = (
            _timestamp(document["started_at"]),
            _timestamp(document["completed_at"]),
        )
        assert started <= completed <= dt.datetime.now(dt.UTC)

    ok = documents[ok_id]
    assert (ok["status"], ok["result"], ok["error"]) == ("success", 5, None)
    assert ok["callback_data"] == extra

    failed = documents[failed_id]
    assert failed["status"] == "failure"
    assert failed["result"] is None
    assert "ValueError: bad input 7" in failed["error"]
    assert failed["callback_data"] == ["a", 1]

    assert documents[bare_id]["callback_data"] is None
    assert documents[bare_id]["result"] == 2


async def test_cbor_callback_data_keeps_bytes(receiver: ZSocket) -> None:
    address = receiver.endpoint
    assert address is not None
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address, serialization_format="cbor") as c,
        ):
            await c.delay_with_callback("add", address, 1, 2, callback_data={"blob": b"\x00\xff"})
            [frame] = await receiver.recv_multipart()
    document = cbor2.loads(frame)
    assert document["callback_data"] == {"blob": b"\x00\xff"}
    assert document["result"] == 3


async def test_an_absent_receiver_slows_nothing_and_its_drops_are_counted(
    receiver: ZSocket, poll_until: Callable[..., Awaitable[Any]]
) -> None:
    # An address nobody listens on: bound once for a free port, then closed.
    probe = open_socket(zmq.PULL)
    dead = probe.bind("tcp://127.0.0.1:*")
    probe.close()
    live = receiver.endpoint
    assert live is not None

    with trio.fail_after(15):
        async with (
            Cluster(tasks=[add], callback_timeout=0.2) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            ids = [
                await client.delay_with_callback("add", dead, i, i, callback_data=i)
                for i in range(500)
            ]
            # Waiting for the deliveries one after another would take
            # 500 x 0.2 s = 100 s; the tasks themselves must not wait at all.
            with trio.fail_after(5):
                await client.join()
            results = [client.get_result(task_id) for task_id in ids]
            assert [r.result for r in results if r is not None and r.ok] == [
                2 * i for i in range(500)
            ]

            # Another receiver is not stuck behind the absent one's backlog.
            with trio.fail_after(5):
                live_id = await client.delay_with_callback("add", live, 4, 4)
                [frame] = await receiver.recv_multipart()
            assert json.loads(frame)["task_id"] == live_id

            stats = await poll_until(
                client.stats,
                lambda s: s["callbacks"]["dropped"] >= 1 and s["callbacks"]["handed_to_zmq"] == 1,
                timeout=5,
            )

    callbacks = stats["callbacks"]
    assert set(callbacks["dropped_by_reason"]) == {"unreachable"}
    assert callbacks["dropped"] == callbacks["dropped_by_reason"]["unreachable"]
    assert stats["scheduler"]["succeeded"] == 501
    assert client.get_status(live_id) is TaskStatus.SUCCESS


async def test_every_document_for_an_address_that_cannot_connect_is_counted() -> None:
    """Passes the scheme check, fails in connect(): all queued documents count as dropped."""
    dispatcher = CallbackDispatcher(CallbackConfig())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            bad = "tcp://no host here"
            dispatcher.ref.tell(
                CallbackJobs([(bad, b"one", None), (bad, b"two", None), (bad, b"three", None)])
            )
            while (await dispatcher.ref.ask(GetStatistics()))["addresses"]:
                await trio.lowlevel.checkpoint()  # the sender task has not failed yet
            stats = await dispatcher.ref.ask(GetStatistics())
            dispatcher.ref.stop()

    assert stats["dropped_by_reason"] == {"bad_address": 3}
    assert stats["handed_to_zmq"] == 0


async def test_more_addresses_than_sockets_allow_are_all_counted_and_the_dispatcher_lives(
    receiver: ZSocket, poll_until: Callable[..., Awaitable[Any]]
) -> None:
    """1,100 distinct unreachable addresses: every document is counted, none vanishes.

    Before, the dispatcher ran out of ZeroMQ sockets at about 1,020 addresses
    ("Too many open files"), crashed, and the documents it held were neither
    sent nor counted; a live receiver then got nothing either.
    """
    # Loopback addresses other than 127.0.0.1, where nothing of ours listens: a fixed
    # port range on 127.0.0.1 met, now and then, a listener another process bound there.
    addresses = [f"tcp://127.0.{2 + i // 250}.{1 + i % 250}:9" for i in range(1100)]
    live = receiver.endpoint
    assert live is not None
    with trio.fail_after(40):
        async with (
            Cluster(tasks=[add], callback_timeout=0.3) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            for i, address in enumerate(addresses):
                await client.delay_with_callback("add", address, i, i)
            await client.join()
            stats = await poll_until(
                client.stats,
                lambda s: s["callbacks"]["dropped"] == len(addresses),
                timeout=20,
            )
            await client.delay_with_callback("add", live, 4, 4)
            with trio.fail_after(10):
                [frame] = await receiver.recv_multipart()
            assert json.loads(frame)["result"] == 8
            restarts = cluster.control_plane.supervisor.statistics().restarts
    assert stats["callbacks"]["dropped_by_reason"]["too_many_addresses"] > 0
    assert restarts.get("callbacks", 0) == 0
