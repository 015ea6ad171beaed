"""Callback delivery guarantees: plain addresses (at most once, counted as far as
they can be) and ``ack+`` addresses (acknowledged, at least once, de-duplicated
by :class:`fastworker.CallbackReceiver`).

The scenario is the one that showed documents vanishing uncounted: a receiver
reads 20 documents and closes while 1,000 are on their way, then binds the
same address again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import zmq

from fastworker import CallbackReceiver, Client, Cluster
from fastworker.control._internal import CallbackJobs
from fastworker.control.callbacks import CallbackConfig, CallbackDispatcher
from fastworker.runtime import GetStatistics

pytestmark = pytest.mark.timeout(60)

TASKS = 1000


def add(a: int, b: int) -> int:
    return a + b


async def rebind(address: str) -> CallbackReceiver:
    """Bind ``address`` again; the closed socket's listener goes in libzmq's own time."""
    with trio.fail_after(5):
        while True:
            try:
                return CallbackReceiver(address)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
            await trio.sleep(0.01)


async def test_ack_mode_loses_nothing_when_the_receiver_closes_and_binds_again(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    first = CallbackReceiver("ack+tcp://127.0.0.1:*")
    address = first.address
    assert address.startswith("ack+tcp://127.0.0.1:")
    with trio.fail_after(50):
        async with (
            Cluster(tasks=[add], callback_timeout=30) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            with first:
                ids = [await client.delay_with_callback("add", address, i, i) for i in range(TASKS)]
                early = [json.loads(await first.receive())["task_id"] for _ in range(20)]
            await client.join(timeout=20)
            later: list[str] = []
            async with await rebind(address) as second:
                while len(set(early) | set(later)) < TASKS:
                    later.append(json.loads(await second.receive())["task_id"])
                stats = await poll_until(
                    client.stats, lambda s: s["callbacks"]["acknowledged"] == TASKS, timeout=10
                )
                assert second.malformed == 0

    assert len(set(early)) == 20
    assert len(later) == len(set(later))  # the receiver hands each delivery over once
    assert set(early) | set(later) == set(ids)
    callbacks = stats["callbacks"]
    assert (callbacks["acknowledged"], callbacks["dropped"]) == (TASKS, 0)
    assert callbacks["handed_to_zmq"] == 0  # a plain-mode counter


async def test_plain_mode_counts_documents_handed_to_zeromq_not_deliveries(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    first = CallbackReceiver("tcp://127.0.0.1:*")
    address = first.address
    with trio.fail_after(50):
        async with (
            Cluster(tasks=[add], callback_timeout=30) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            with first:
                for i in range(TASKS):
                    await client.delay_with_callback("add", address, i, i)
                for _ in range(20):
                    await first.receive()
            await client.join(timeout=20)
            async with await rebind(address):
                stats = await poll_until(
                    client.stats,
                    lambda s: s["callbacks"]["handed_to_zmq"] + s["callbacks"]["dropped"] == TASKS,
                    timeout=30,
                )
    callbacks = stats["callbacks"]
    # Every document is accounted for as handed to ZeroMQ or dropped (and why);
    # nothing claims it was delivered: plain mode cannot know.
    assert callbacks["handed_to_zmq"] + callbacks["dropped"] == TASKS
    assert callbacks["dropped"] == sum(callbacks["dropped_by_reason"].values())
    assert callbacks["acknowledged"] == 0
    assert "sent" not in callbacks


async def test_an_unacknowledged_document_is_dropped_and_counted_after_the_timeout(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    """A receiver that reads but never acknowledges (a plain ROUTER): re-sent,
    then dropped at the timeout, and counted."""
    config = CallbackConfig(delivery_timeout=1.0, resend_interval=0.2)
    dispatcher = CallbackDispatcher(config)
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(dispatcher.run)
                dispatcher.ref.tell(CallbackJobs([(f"ack+tcp://127.0.0.1:{port}", b"doc", None)]))
                stats = await poll_until(
                    lambda: dispatcher.ref.ask(GetStatistics()),
                    lambda s: s["dropped"] > 0,
                    timeout=5,
                )
                dispatcher.ref.stop()
        seen = []
        while silent.poll(0):
            seen.append(silent.recv_multipart())
    finally:
        silent.close(linger=0)
    assert stats["dropped_by_reason"] == {"unacknowledged": 1}
    assert stats["acknowledged"] == 0
    assert stats["resent"] >= 1
    assert len(seen) >= 2  # the first send and at least one re-send ...
    assert len({frames[1] for frames in seen}) == 1  # ... of one delivery id
    assert {frames[2] for frames in seen} == {b"doc"}


def test_the_blocking_receiver_acknowledges_and_hands_each_delivery_over_once() -> None:
    with CallbackReceiver("ack+tcp://127.0.0.1:*") as receiver:
        sender = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sender.connect(receiver.endpoint)
            sender.send_multipart([b"id-1", b"one"])
            sender.send_multipart([b"id-1", b"one"])  # a re-send: its ack was lost
            sender.send_multipart([b"id-2", b"two"])
            sender.send_multipart([b"only one frame"])
            assert receiver.recv(timeout=5) == b"one"
            assert receiver.recv(timeout=5) == b"two"
            with pytest.raises(TimeoutError):
                receiver.recv(timeout=0.05)
            acks = [sender.recv_multipart() for _ in range(3)]
        finally:
            sender.close(linger=0)
    assert acks == [[b"id-1"], [b"id-1"], [b"id-2"]]
    assert (receiver.duplicates, receiver.malformed) == (1, 1)


def test_the_receiver_works_under_asyncio() -> None:
    import asyncio

    async def main() -> bytes:
        async with CallbackReceiver("tcp://127.0.0.1:*") as receiver:
            sender = zmq.Context.instance().socket(zmq.PUSH)
            try:
                sender.connect(receiver.endpoint)
                sender.send(b"doc")
                return await asyncio.wait_for(receiver.receive(), 5)
            finally:
                sender.close(linger=0)

    assert asyncio.run(main()) == b"doc"


async def test_a_timeout_no_longer_than_the_resend_interval_still_delivers(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    """A new address's first send fails (not connected yet); with a 1 s timeout and
    the 1 s re-send interval, the document was dropped before it was ever re-sent."""
    dispatcher = CallbackDispatcher(CallbackConfig(delivery_timeout=1.0, resend_interval=1.0))
    with CallbackReceiver("ack+tcp://127.0.0.1:*") as receiver, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            dispatcher.ref.tell(CallbackJobs([(receiver.address, b"doc", None)]))
            assert await receiver.receive() == b"doc"
            stats = await poll_until(
                lambda: dispatcher.ref.ask(GetStatistics()),
                lambda s: s["acknowledged"] == 1,
                timeout=5,
            )
            dispatcher.ref.stop()
    assert stats["dropped"] == 0


async def test_documents_are_bounded_in_bytes_and_give_their_bytes_back(
    poll_until: Callable[..., Awaitable[Any]],
) -> None:
    """Past max_held_bytes a document drops (counted queue_full); acknowledged and
    dropped documents give their bytes back, so delivery goes on afterwards."""
    dispatcher = CallbackDispatcher(
        CallbackConfig(delivery_timeout=1.0, resend_interval=0.2, max_held_bytes=1000)
    )
    silent = zmq.Context.instance().socket(zmq.ROUTER)  # reads, never acknowledges
    try:
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        with CallbackReceiver("ack+tcp://127.0.0.1:*") as receiver, trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(dispatcher.run)
                nobody = f"ack+tcp://127.0.0.1:{port}"
                dispatcher.ref.tell(CallbackJobs([(nobody, b"x" * 400, None)] * 3))
                full = await poll_until(
                    lambda: dispatcher.ref.ask(GetStatistics()),
                    lambda s: s["dropped_by_reason"].get("queue_full") == 1,
                    timeout=5,
                )
                assert full["held_bytes"] == 800
                expired = await poll_until(
                    lambda: dispatcher.ref.ask(GetStatistics()),
                    lambda s: s["dropped_by_reason"].get("unacknowledged") == 2,
                    timeout=5,
                )
                assert expired["held_bytes"] == 0
                dispatcher.ref.tell(CallbackJobs([(receiver.address, b"y" * 900, None)]))
                assert await receiver.receive() == b"y" * 900
                done = await poll_until(
                    lambda: dispatcher.ref.ask(GetStatistics()),
                    lambda s: s["acknowledged"] == 1,
                    timeout=5,
                )
                dispatcher.ref.stop()
    finally:
        silent.close(linger=0)
    assert done["held_bytes"] == 0
