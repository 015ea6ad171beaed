"""The order a client's requests leave it in, seen by a fake control plane.

A request must not overtake a task submitted before it: ``delay(...)`` then
``stats()`` must reach the Gateway as Submit, then StatsQuery.  When they
reached it in two reads, the StatsQuery was answered before the Submit was
queued, and the queue looked one task short (how
``test_a_critical_task_overtakes_a_backlog_of_low_ones`` failed on a busy
machine).  Here the fake Gateway reads the raw frames, so the order is exact.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import zmq

from fastworker import Client, ClientStoppedError
from fastworker.transport import open_socket
from fastworker.wire import Lookup, LookupReply, StatsQuery, Submit, SubmitAck, decode, encode

pytestmark = pytest.mark.timeout(30)


async def test_a_request_does_not_overtake_a_task_submitted_before_it() -> None:
    discovery = open_socket(zmq.ROUTER)
    gateway = open_socket(zmq.ROUTER)
    try:
        discovery_address = discovery.bind("tcp://127.0.0.1:*")
        gateway_address = gateway.bind("tcp://127.0.0.1:*")
        client = Client(discovery_address=discovery_address, timeout=30, ack_timeout=20)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def answer_lookups() -> None:
                    while True:
                        peer, body = await discovery.recv_multipart()
                        lookup = decode(body)
                        assert isinstance(lookup, Lookup)
                        reply = LookupReply(lookup.request_id, "i", gateway_address, 1.0, 1 << 24)
                        await discovery.send_multipart([peer, encode(reply)])

                async def receive() -> type:
                    # Acknowledge every Submit, so the client's exit finds nothing to hand over.
                    peer, body = await gateway.recv_multipart()
                    message = decode(body)
                    if isinstance(message, Submit):
                        ack = SubmitAck(message.request_id, [])
                        await gateway.send_multipart([peer, encode(ack)])
                    return type(message)

                async def stats_left_unanswered() -> None:
                    with contextlib.suppress(ClientStoppedError):  # the fake never answers
                        await client.stats()

                nursery.start_soon(answer_lookups)
                await client.start()
                await client.delay("add", 0, 0)
                assert await receive() is Submit  # connected: the first Submit came
                seen = []
                for i in range(20):
                    # The query starts in the same turn (trio runs the two tasks
                    # in either order): often both wait in the client together.
                    await client.delay("add", i, i)
                    nursery.start_soon(stats_left_unanswered)
                    for _ in range(2):
                        seen.append(await receive())
                await client.flush(timeout=10)  # every Submit was acknowledged
                client.stop()
                nursery.cancel_scope.cancel()
        assert seen == [Submit, StatsQuery] * 20
    finally:
        discovery.close()
        gateway.close()
