"""Tests for ``fastworker._io.pump_socket``: a socket reader feeding its actor.

Peers here use ``inproc://`` on the process-wide context (the one
``open_socket`` uses): an inproc send lands in the reader's queue before the
call returns, so "sent before the stop" is exact, without threads or sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from typing import Any

import pytest
import trio
import trio.testing
import zmq

from fastworker._io import Inbound, pump_socket
from fastworker.runtime import Actor
from fastworker.transport import ZSocket, open_socket

pytestmark = pytest.mark.timeout(10)

_endpoints = count()


class Reader(Actor):
    """Owns a bound ROUTER read by ``pump_socket``; records every frame it handles."""

    def __init__(self) -> None:
        super().__init__("reader", mailbox_size=4)
        self.endpoint = f"inproc://pump-{next(_endpoints)}"
        self.frames: list[list[bytes]] = []
        self.sock: ZSocket | None = None

    async def on_start(self, nursery: trio.Nursery) -> None:
        self.sock = open_socket(zmq.ROUTER)
        self.sock.bind(self.endpoint)
        nursery.start_soon(pump_socket, self.sock, self.ref)

    async def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def receive(self, message: Any) -> None:
        assert type(message) is Inbound
        self.frames.extend(message.frames)


@pytest.fixture
def peer() -> Iterator[zmq.Socket[bytes]]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"peer")
    try:
        yield sock
    finally:
        sock.close(linger=0)


async def test_a_graceful_stop_handles_what_peers_sent_before_it(
    peer: zmq.Socket[bytes],
) -> None:
    """The node stops its control plane right after its workers exited: their
    last results may still sit in the scheduler's socket, unread.  The stop
    must hand them to the actor, not close the socket on them."""
    actor = Reader()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            peer.connect(actor.endpoint)
            await trio.testing.wait_all_tasks_blocked()  # the reader waits for input
            # No checkpoint from here to stop(): the reader cannot run in between.
            for i in range(50):
                peer.send(b"%d" % i)
            actor.ref.stop()
    assert actor.frames == [[b"peer", b"%d" % i] for i in range(50)]


async def test_a_stopped_reader_does_not_wait_for_more_input(peer: zmq.Socket[bytes]) -> None:
    """A stop with nothing queued ends the run at once: the reader hands over
    what is there and lets go, it does not wait for peers."""
    actor = Reader()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(actor.run)
            peer.connect(actor.endpoint)
            peer.send(b"early")
            await trio.testing.wait_all_tasks_blocked()
            actor.ref.stop()
    assert actor.frames == [[b"peer", b"early"]]
    assert actor.ref.stopped
