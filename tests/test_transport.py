"""Tests for ``fastworker.transport``: the trio <-> ZeroMQ socket adapter.

Every socket comes from the ``sockets`` fixture, which tracks it and closes it
with LINGER 0 at teardown, on a fresh ``zmq.Context`` per test (pyzmq's own
tests/conftest.py idea).  TCP tests bind ``tcp://127.0.0.1:*`` and read the
port back; tests whose assertion needs exact, thread-free queue behaviour
(high-water marks, "everything already queued") use ``inproc://``, where a
send lands in the peer's queue before the call returns.

The adapter's fd wait has a 2 s safety net that re-reads ``EVENTS`` even when
no edge came.  The autouse fixture below turns it off, so a lost wake-up shows
up as a hang caught by ``trio.fail_after`` instead of a silent 2 s stall.
Nothing here sleeps to wait for something: readiness is awaited (a message, an
event, ``wait_all_tasks_blocked``).
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

import pytest
import trio
import trio.testing
import zmq
from zmq.utils.monitor import parse_monitor_message

from fastworker.transport import (
    DEFAULT_MAX_MESSAGE_SIZE,
    PeerUnreachable,
    TransportConfig,
    ZSocket,
    ZSocketStatistics,
    _zsocket,
    open_socket,
)

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "tcp://127.0.0.1:*"
TINY_QUEUES = TransportConfig(send_hwm=2, recv_hwm=2)


# -- fixtures and helpers ----------------------------------------------------


@pytest.fixture(autouse=True)
def _no_safety_net(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lost wake-up must hang (and fail the test), not be rescued after 2 s."""
    monkeypatch.setattr(_zsocket, "_SAFETY_NET_SECONDS", 3600.0)


class Sockets:
    """Opens sockets on one context and remembers them so teardown closes them all."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.context = context
        self._made: list[ZSocket] = []
        self._inproc = 0

    def __call__(
        self,
        kind: int,
        config: TransportConfig | None = None,
        *,
        identity: bytes | None = None,
        **options: bool,
    ) -> ZSocket:
        return self.adopt(
            open_socket(kind, config, identity=identity, context=self.context, **options)
        )

    def adopt(self, sock: ZSocket | zmq.Socket[bytes]) -> ZSocket:
        zsock = sock if isinstance(sock, ZSocket) else ZSocket(sock)
        self._made.append(zsock)
        return zsock

    def inproc(self) -> str:
        self._inproc += 1
        return f"inproc://test-{self._inproc}"

    async def pair(
        self, kind: int, config: TransportConfig | None = None, *, transport: str = "tcp"
    ) -> tuple[ZSocket, ZSocket]:
        """Two connected sockets of ``kind`` (PAIR or DEALER), with one message
        exchanged each way so the connection is up before the test starts."""
        a = self(kind, config)
        b = self(kind, config)
        endpoint = a.bind(LOOPBACK if transport == "tcp" else self.inproc())
        b.connect(endpoint)
        with trio.fail_after(5):
            await b.send_multipart([b"hello"])
            assert await a.recv_multipart() == [b"hello"]
            await a.send_multipart([b"hello"])
            assert await b.recv_multipart() == [b"hello"]
        return a, b

    def close_all(self) -> None:
        for sock in self._made:
            sock.close(linger_ms=0)


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    made = Sockets(context)
    try:
        yield made
    finally:
        made.close_all()
        # Everything was closed above; destroy() only guards against a socket a
        # test made behind the fixture's back, so teardown can never hang in term().
        context.destroy(linger=0)


def _num(i: int) -> bytes:
    return i.to_bytes(4, "big")


def _int(frame: bytes) -> int:
    return int.from_bytes(frame, "big")


def _drain_nowait(sock: ZSocket) -> list[list[bytes]]:
    """Every message that is already queued (inproc: everything that was sent)."""
    out = []
    while True:
        try:
            out.append(sock.recv_multipart_nowait())
        except trio.WouldBlock:
            return out


def _fill(sock: ZSocket, payload: bytes = b"fill", limit: int = 10_000) -> int:
    """Queue numbered messages with send_multipart_nowait until the socket is full."""
    for i in range(limit):
        try:
            sock.send_multipart_nowait([_num(i), payload])
        except trio.WouldBlock:
            return i
    raise AssertionError(f"{limit} messages queued without reaching the high-water mark")


# -- open_socket -------------------------------------------------------------


def test_open_socket_applies_the_transport_config(sockets: Sockets) -> None:
    config = TransportConfig(
        max_message_size=1024, send_hwm=7, recv_hwm=9, linger_ms=0, heartbeat_ivl_ms=500
    )
    dealer = sockets(zmq.DEALER, config, identity=b"me").zmq_socket
    assert dealer.getsockopt(zmq.MAXMSGSIZE) == 1024
    assert dealer.getsockopt(zmq.SNDHWM) == 7
    assert dealer.getsockopt(zmq.RCVHWM) == 9
    assert dealer.getsockopt(zmq.LINGER) == 0
    assert dealer.getsockopt(zmq.HEARTBEAT_IVL) == 500
    assert dealer.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 1500
    assert dealer.getsockopt(zmq.IMMEDIATE) == 1
    assert dealer.getsockopt(zmq.ROUTING_ID) == b"me"
    router = sockets(zmq.ROUTER).zmq_socket
    assert router.getsockopt(zmq.MAXMSGSIZE) == DEFAULT_MAX_MESSAGE_SIZE
    assert router.getsockopt(zmq.IMMEDIATE) == 0
    assert sockets(zmq.DEALER, immediate=False).zmq_socket.getsockopt(zmq.IMMEDIATE) == 0


def _disconnected(monitor: zmq.Socket[bytes], timeout_ms: int = 5000) -> None:
    """Block until ``monitor`` (a socket monitor) reports EVENT_DISCONNECTED."""
    while True:
        assert monitor.poll(timeout_ms), f"no disconnection within {timeout_ms} ms"
        if parse_monitor_message(monitor.recv_multipart())["event"] == zmq.EVENT_DISCONNECTED:
            return


@pytest.mark.parametrize("immediate", [False, True], ids=["immediate-off", "immediate-on"])
def test_what_a_dealer_had_not_read_survives_its_peer_leaving_only_without_immediate(
    sockets: Sockets, immediate: bool
) -> None:
    """The control plane pushes its last results and exits: the connection drops
    before the client's reader had its turn.  With IMMEDIATE, libzmq throws away
    every unread message of a dropped connection; without it they stay readable
    (why the client's gateway DEALER turns IMMEDIATE off)."""
    dealer = sockets(zmq.DEALER, identity=b"client", immediate=immediate)
    monitor = dealer.zmq_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    peer_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        router = peer_context.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind(LOOPBACK)
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        dealer.zmq_socket.send(b"hello")  # the router learns our routing id from it
        assert router.poll(5000)
        assert router.recv_multipart() == [b"client", b"hello"]
        for i in range(5):
            router.send_multipart([b"client", _num(i)])
        router.close(linger=5000)  # delivered to the kernel before term() returns
    finally:
        peer_context.term()
    try:
        _disconnected(monitor)  # everything the router sent came in before that
    finally:
        dealer.zmq_socket.disable_monitor()
        monitor.close(linger=0)
    unread = dealer.recv_batch_nowait(100)
    assert unread == ([] if immediate else [[_num(i)] for i in range(5)])


async def test_router_handover_lets_a_reconnecting_peer_take_over_its_routing_id(
    sockets: Sockets,
) -> None:
    """A worker reconnecting with its id while its old connection is half-open
    (the old DEALER is silent, its TCP connection not yet given up) is served
    at once: with ROUTER_HANDOVER the new connection takes the id over."""
    router = sockets(zmq.ROUTER, router_handover=True)
    endpoint = router.bind(LOOPBACK)
    old = sockets(zmq.DEALER, identity=b"worker-1")
    old.connect(endpoint)
    with trio.fail_after(5):
        await old.send_multipart([b"from the old connection"])
        assert await router.recv_multipart() == [b"worker-1", b"from the old connection"]
        new = sockets(zmq.DEALER, identity=b"worker-1")  # old stays open and silent
        new.connect(endpoint)
        await new.send_multipart([b"from the new connection"])
        assert await router.recv_multipart() == [b"worker-1", b"from the new connection"]
        await router.send_multipart([b"worker-1", b"reply"])
        assert await new.recv_multipart() == [b"reply"]
    assert old.recv_batch_nowait() == []


async def test_open_socket_closes_the_socket_when_an_option_is_rejected() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with pytest.raises(zmq.ZMQError):
        open_socket(zmq.DEALER, identity=b"", context=context)  # empty routing id: EINVAL
    # term() blocks while any socket of the context is open: it returning proves
    # that the half-configured socket was closed.
    with trio.fail_after(5):
        await trio.to_thread.run_sync(context.term, abandon_on_cancel=True)


# -- 1. the edge-triggered fd ------------------------------------------------


class _MessageSocket(Protocol):
    async def send_multipart(self, frames: list[bytes]) -> None: ...
    async def recv_multipart(self) -> list[bytes]: ...


async def _both_ways_at_once(
    a: _MessageSocket, b: _MessageSocket, n: int, got_a: list[int], got_b: list[int]
) -> None:
    """Four tasks: on each socket one sends ``n`` numbered messages while another receives."""

    async def send(sock: _MessageSocket) -> None:
        for i in range(n):
            await sock.send_multipart([_num(i)])

    async def receive(sock: _MessageSocket, into: list[int]) -> None:
        for _ in range(n):
            (frame,) = await sock.recv_multipart()
            into.append(_int(frame))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, a)
        nursery.start_soon(receive, a, got_a)
        nursery.start_soon(send, b)
        nursery.start_soon(receive, b, got_b)


@pytest.mark.parametrize("kind", [zmq.PAIR, zmq.DEALER], ids=["PAIR", "DEALER"])
@pytest.mark.parametrize(
    "config", [TransportConfig(), TINY_QUEUES], ids=["default-hwm", "hwm-2-backpressure"]
)
async def test_send_and_receive_on_one_socket_from_two_tasks_both_ways(
    sockets: Sockets, kind: int, config: TransportConfig
) -> None:
    """The edge-trigger regression: 10,000 messages each way, both directions at once.

    ``zmq.FD`` is one edge-triggered fd for both directions: it turns readable
    when libzmq queued an internal command (a peer's "you have messages", "you
    have room again"), and *any* zmq call on the socket -- a send, a receive, a
    read of ``EVENTS``, ``connect`` -- processes those commands and drains the
    fd.  After that the fd stays quiet, even though ``EVENTS`` says POLLIN, until
    the next command; and no command comes for further messages on a queue the
    reader has not yet found empty.

    A naive adapter (each op: try NOBLOCK, else ``await wait_readable(fd)``,
    never re-reading ``EVENTS``, never waking the other direction) therefore
    breaks when two tasks share the socket: the receiver parks on the fd, the
    sender's ``send`` swallows the command that announced a message, and the
    receiver sleeps forever next to a full queue.  And when both directions must
    wait (backpressure), trio refuses the second task on the fd with
    ``BusyResourceError``.  ``_NaiveSocket`` below demonstrates both; the
    adapter re-reads ``EVENTS`` after every call and hands readiness on.

    The safety net is off (fixture), so a single lost wake-up fails this test.
    """
    n = 10_000
    a, b = await sockets.pair(kind, config)
    got_a: list[int] = []
    got_b: list[int] = []
    with trio.fail_after(20):
        await _both_ways_at_once(a, b, n, got_a, got_b)
    assert got_a == list(range(n))
    assert got_b == list(range(n))
    for sock in (a, b):
        stats = sock.statistics()
        assert (stats.sent, stats.received) == (n + 1, n + 1)  # + the handshake
        assert (stats.waiting_readers, stats.waiting_writers) == (0, 0)


class _NaiveSocket:
    """What the adapter looks like without its care: do not copy.

    Each operation tries the non-blocking call and, if it would block, waits
    for the fd to turn readable.  It never re-reads ``EVENTS`` and never wakes
    the other direction, and two tasks waiting at once both wait on the fd.
    """

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self._sock = sock
        self._fd = sock.getsockopt(zmq.FD)

    async def send_multipart(self, frames: list[bytes]) -> None:
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            await trio.lowlevel.checkpoint()
            return

    async def recv_multipart(self) -> list[bytes]:
        while True:
            try:
                frames: list[bytes] = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await trio.lowlevel.wait_readable(self._fd)
                continue
            await trio.lowlevel.checkpoint()
            return frames


@pytest.mark.parametrize("kind", [zmq.PAIR, zmq.DEALER], ids=["PAIR", "DEALER"])
async def test_naive_adapter_fails_the_same_scenario_under_backpressure(
    sockets: Sockets, kind: int
) -> None:
    """The scenario above with HWM 2, on ``_NaiveSocket``: it does not complete.

    Observed failure mode: trio raises ``BusyResourceError`` as soon as a sender
    blocked on a full queue and the receiver of the same socket both wait on the
    fd (deterministic in practice; a hang would also count as failure here).
    With the default HWM senders never wait, and libzmq throttles command
    processing in ``send`` to about once per millisecond, so the naive adapter
    usually gets lucky there; the lost edge itself is shown deterministically by
    ``test_naive_adapter_loses_the_wakeup_its_own_send_swallowed``.
    """
    n = 10_000
    a, b = await sockets.pair(kind, TINY_QUEUES)
    got_a: list[int] = []
    got_b: list[int] = []
    busy = False
    with trio.move_on_after(3) as deadline:
        try:
            await _both_ways_at_once(
                _NaiveSocket(a.zmq_socket), _NaiveSocket(b.zmq_socket), n, got_a, got_b
            )
        except* trio.BusyResourceError:
            busy = True
    assert busy or deadline.cancelled_caught
    assert len(got_a) + len(got_b) < 2 * n


async def _message_lands_then_socket_sends(
    receiver_socket: _MessageSocket, a: ZSocket, b: ZSocket
) -> bool:
    """A task waits to receive on ``a``; then, with no checkpoint in between, the
    peer ``b`` queues a message for it (inproc: the "messages waiting" command is
    in ``a``'s mailbox when the call returns) and ``a`` sends one of its own, as
    the other task of the actor would.  Returns whether the receiver woke up."""
    got = trio.Event()

    async def receive() -> None:
        assert await receiver_socket.recv_multipart() == [b"for a"]
        got.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        b.send_multipart_nowait([b"for a"])
        a.send_multipart_nowait([b"for b"])  # a's first send: it processes the commands
        with trio.move_on_after(0.5):  # it would wake within microseconds
            await got.wait()
        nursery.cancel_scope.cancel()
    return got.is_set()


async def test_naive_adapter_loses_the_wakeup_its_own_send_swallowed(sockets: Sockets) -> None:
    """Deterministic: the send drains the fd, so the naive receiver never wakes
    although its message sits in the queue (``EVENTS`` shows POLLIN)."""
    a = sockets(zmq.PAIR)
    b = sockets(zmq.PAIR)
    b.connect(a.bind(sockets.inproc()))
    with trio.fail_after(5):
        woke = await _message_lands_then_socket_sends(_NaiveSocket(a.zmq_socket), a, b)
    assert not woke
    assert a.zmq_socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
    assert a.recv_multipart_nowait() == [b"for a"]


async def test_a_send_does_not_swallow_the_wakeup_of_a_waiting_receiver(sockets: Sockets) -> None:
    """The same interleaving on the adapter: the receiver gets its message."""
    a = sockets(zmq.PAIR)
    b = sockets(zmq.PAIR)
    b.connect(a.bind(sockets.inproc()))
    with trio.fail_after(5):
        assert await _message_lands_then_socket_sends(a, a, b)
        assert await b.recv_multipart() == [b"for b"]


async def test_a_failed_recv_nowait_does_not_strand_a_blocked_sender(sockets: Sockets) -> None:
    """Regression: a failing ``recv(NOBLOCK)`` processes pending commands, so it
    can swallow the "room again" edge a task blocked in ``send_multipart`` waits
    for.  The adapter used to re-read ``EVENTS`` only after *successful* calls,
    and the sender then slept until the safety net (or forever without it)."""
    a = sockets(zmq.PAIR, TINY_QUEUES)
    b = sockets(zmq.PAIR, TINY_QUEUES)
    b.connect(a.bind(sockets.inproc()))
    queued = _fill(a)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_multipart, [b"last"])
            await trio.testing.wait_all_tasks_blocked()
            assert a.statistics().waiting_writers == 1
            # b reads everything: libzmq tells a "room again" (a command, the fd fires)...
            assert len(_drain_nowait(b)) == queued
            # ...and before trio looks at the fd, another task of a's actor polls.
            with pytest.raises(trio.WouldBlock):
                a.recv_multipart_nowait()
            assert await b.recv_multipart() == [b"last"]


async def test_connect_does_not_strand_a_waiting_receiver(sockets: Sockets) -> None:
    """Regression: ``connect()`` (and ``bind``/``disconnect``) process pending
    commands too, e.g. when an actor dials a new peer while its reader waits."""
    a = sockets(zmq.DEALER)
    b = sockets(zmq.DEALER)
    other = sockets(zmq.ROUTER)
    b.connect(a.bind(sockets.inproc()))
    other_endpoint = other.bind(sockets.inproc())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:
                assert await a.recv_multipart() == [b"hi"]

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            b.send_multipart_nowait([b"hi"])
            a.connect(other_endpoint)


# -- 2. recv_batch -------------------------------------------------------------


async def test_recv_batch_takes_every_queued_message_in_one_call(sockets: Sockets) -> None:
    a = sockets(zmq.PAIR)
    b = sockets(zmq.PAIR)
    b.connect(a.bind(sockets.inproc()))
    for i in range(500):
        b.send_multipart_nowait([_num(i)])
    b.send_multipart_nowait([b"end"])  # inproc: all 501 are in a's queue now
    with trio.fail_after(5):
        batch = await a.recv_batch()
    assert [frames[0] for frames in batch] == [_num(i) for i in range(500)] + [b"end"]
    with pytest.raises(trio.WouldBlock):
        a.recv_multipart_nowait()


async def test_recv_batch_over_tcp_needs_few_wakeups(sockets: Sockets) -> None:
    a, b = await sockets.pair(zmq.DEALER)
    n = 500
    for i in range(n):
        b.send_multipart_nowait([_num(i)])
    b.send_multipart_nowait([b"end"])
    received: list[bytes] = []
    calls = 0
    with trio.fail_after(5):
        while not received or received[-1] != b"end":
            calls += 1
            received.extend(frames[0] for frames in await a.recv_batch())
    assert received == [_num(i) for i in range(n)] + [b"end"]
    assert calls <= 25, f"{calls} calls for {n} messages: batches are not being drained"


async def test_interrupt_reads_ends_a_pending_read_and_drops_nothing(sockets: Sockets) -> None:
    a, b = await sockets.pair(zmq.PAIR, transport="inproc")  # a send is queued at once
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            got: list[list[list[bytes]]] = []

            async def read() -> None:
                got.append(await a.recv_batch())

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            a.interrupt_reads()  # the reader's owner stops: the wait ends with nothing
        assert got == [[]]
        # Set before a read: that read does not wait, and what is queued is still returned.
        b.send_multipart_nowait([b"queued"])
        a.interrupt_reads()
        assert await a.recv_batch() == [[b"queued"]]
        assert await a.recv_batch() == []
        # Spent: the next read waits for a message again.
        b.send_multipart_nowait([b"later"])
        assert await a.recv_batch() == [[b"later"]]


async def test_recv_batch_respects_max_messages(sockets: Sockets) -> None:
    a = sockets(zmq.PAIR)
    b = sockets(zmq.PAIR)
    b.connect(a.bind(sockets.inproc()))
    for i in range(250):
        b.send_multipart_nowait([_num(i)])
    with trio.fail_after(5):
        sizes = []
        received: list[int] = []
        while len(received) < 250:
            batch = await a.recv_batch(max_messages=100)
            sizes.append(len(batch))
            received.extend(_int(frames[0]) for frames in batch)
    assert sizes == [100, 100, 50]
    assert received == list(range(250))
    assert a.statistics().received == 250


async def test_recv_batch_rejects_a_non_positive_limit(sockets: Sockets) -> None:
    a, b = await sockets.pair(zmq.PAIR)
    await b.send_multipart([b"x"])
    with trio.fail_after(5):
        for bad in (0, -1):
            with pytest.raises(ValueError, match="max_messages"):
                await a.recv_batch(max_messages=bad)
        assert await a.recv_batch(max_messages=1) == [[b"x"]]


# -- 3. multipart ----------------------------------------------------------------


MIB = 1024 * 1024


@pytest.mark.parametrize(
    "frames",
    [
        [b""],
        [b"", b""],
        [b"head", b"", b"tail"],
        [b"", os.urandom(MIB), b""],
        [os.urandom(MIB), b"x", os.urandom(7)],
    ],
    ids=["one-empty", "two-empty", "empty-in-middle", "1MiB-between-empty", "1MiB-first"],
)
async def test_multipart_messages_round_trip(sockets: Sockets, frames: list[bytes]) -> None:
    a, b = await sockets.pair(zmq.DEALER)
    with trio.fail_after(10):
        await a.send_multipart(frames)
        assert await b.recv_multipart() == frames
        b.send_multipart_nowait(frames)
        assert await a.recv_batch() == [frames]


# -- 4. ROUTER / DEALER ------------------------------------------------------------


async def test_router_routes_replies_by_identity(sockets: Sockets) -> None:
    router = sockets(zmq.ROUTER)
    endpoint = router.bind(LOOPBACK)
    assert endpoint.startswith("tcp://127.0.0.1:")
    assert int(endpoint.rsplit(":", 1)[1]) != 0
    assert router.endpoint == endpoint
    assert endpoint in repr(router)
    workers = {name: sockets(zmq.DEALER, identity=name) for name in (b"w-1", b"w-2")}
    with trio.fail_after(5):
        for name, dealer in workers.items():
            dealer.connect(endpoint)
            await dealer.send_multipart([b"ready", name])
        hellos = [await router.recv_multipart() for _ in workers]
        assert sorted(hellos) == [[b"w-1", b"ready", b"w-1"], [b"w-2", b"ready", b"w-2"]]
        for name in workers:
            await router.send_multipart([name, b"job for " + name])
        for name, dealer in workers.items():
            assert await dealer.recv_multipart() == [b"job for " + name]


async def test_router_send_to_unknown_identity_raises_peer_unreachable(sockets: Sockets) -> None:
    router = sockets(zmq.ROUTER)
    dealer = sockets(zmq.DEALER, identity=b"known")
    dealer.connect(router.bind(LOOPBACK))
    with trio.fail_after(5):
        await dealer.send_multipart([b"hi"])
        assert await router.recv_multipart() == [b"known", b"hi"]
        with pytest.raises(PeerUnreachable, match="ghost"):
            router.send_multipart_nowait([b"ghost", b"lost?"])
        with pytest.raises(PeerUnreachable):
            await router.send_multipart([b"ghost", b"lost?"])
        assert router.statistics().sent == 0
        # The socket is still fine for known peers.
        await router.send_multipart([b"known", b"reply"])
        assert await dealer.recv_multipart() == [b"reply"]


async def test_try_send_counts_what_it_could_not_hand_over(sockets: Sockets) -> None:
    router = sockets(zmq.ROUTER)
    dealer = sockets(zmq.DEALER, TINY_QUEUES, identity=b"known")
    endpoint = router.bind(LOOPBACK)
    assert not dealer.try_send([b"before connect"])  # IMMEDIATE: no peer yet
    dealer.connect(endpoint)
    with trio.fail_after(5):
        await dealer.wait_writable()
        assert dealer.try_send([b"hi"])
        assert await router.recv_multipart() == [b"known", b"hi"]
        assert not router.try_send([b"ghost", b"lost"])
        assert router.try_send([b"known", b"reply"])
        assert await dealer.recv_multipart() == [b"reply"]
    assert (dealer.statistics().sent, dealer.statistics().unsent) == (1, 1)
    assert (router.statistics().sent, router.statistics().unsent) == (1, 1)


@pytest.mark.timeout(15)  # the old bug spun without a checkpoint: only this could stop it
async def test_router_send_to_a_full_peer_waits_while_other_peers_are_served(
    sockets: Sockets,
) -> None:
    """Regression: a ROUTER reports POLLOUT while *any* peer has room, so a send
    to a full peer used to retry forever without a checkpoint, freezing the
    whole trio run (here: even the peers that would drain it).  Two such
    senders must also not keep waking each other (``wait_all_tasks_blocked``
    would never return)."""
    router = sockets(zmq.ROUTER, TINY_QUEUES)
    endpoint = router.bind(sockets.inproc())
    peers = {name: sockets(zmq.DEALER, TINY_QUEUES, identity=name) for name in (b"p1", b"p2")}
    idle = sockets(zmq.DEALER, TINY_QUEUES, identity=b"idle")
    with trio.fail_after(10):
        for name, dealer in [*peers.items(), (b"idle", idle)]:
            dealer.connect(endpoint)
            await dealer.send_multipart([b"hi"])
            assert await router.recv_multipart() == [name, b"hi"]
        queued = {}
        for name in peers:
            queued[name] = _fill_router(router, name)
        assert router.zmq_socket.getsockopt(zmq.EVENTS) & zmq.POLLOUT  # "idle" has room
        async with trio.open_nursery() as nursery:
            for name in peers:
                nursery.start_soon(router.send_multipart, [name, b"last"])
            await trio.testing.wait_all_tasks_blocked()
            assert router.statistics().waiting_writers == 2
            # The ROUTER keeps serving everybody else meanwhile.
            await router.send_multipart([b"idle", b"ping"])
            assert await idle.recv_multipart() == [b"ping"]
            await idle.send_multipart([b"pong"])
            assert await router.recv_multipart() == [b"idle", b"pong"]
            # Once a full peer reads, its pending message follows the queued ones.
            for name, dealer in peers.items():
                got = [await dealer.recv_multipart() for _ in range(queued[name] + 1)]
                assert got == [[_num(i), b"fill"] for i in range(queued[name])] + [[b"last"]]


def _fill_router(router: ZSocket, identity: bytes) -> int:
    for i in range(10_000):
        try:
            router.send_multipart_nowait([identity, _num(i), b"fill"])
        except trio.WouldBlock:
            return i
    raise AssertionError("the peer's high-water mark was never reached")


# -- 5. cancellation ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["recv_multipart", "recv_batch"])
async def test_a_receiver_cancelled_over_and_over_loses_no_message(
    sockets: Sockets, method: str
) -> None:
    """A canceller cancels the receiver's current scope at every one of its
    turns while a sender streams messages: every message still arrives exactly
    once and in order (a received message leaves through a shielded checkpoint)."""
    a, b = await sockets.pair(zmq.PAIR)
    n = 2_000
    received: list[int] = []
    current: list[trio.CancelScope] = []
    cancelled = 0
    done = trio.Event()

    async def receive() -> None:
        nonlocal cancelled
        while len(received) < n:
            with trio.CancelScope() as scope:
                current[:] = [scope]
                if method == "recv_batch":
                    batch = await a.recv_batch(max_messages=7)
                else:
                    batch = [await a.recv_multipart()]
                received.extend(_int(frames[0]) for frames in batch)
            cancelled += scope.cancelled_caught
        done.set()

    async def cancel_constantly() -> None:
        while not done.is_set():
            if current:
                current[0].cancel()
            await trio.lowlevel.checkpoint()

    async def send() -> None:
        for i in range(n):
            await b.send_multipart([_num(i)])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(cancel_constantly)
            nursery.start_soon(send)
    assert received == list(range(n))
    assert cancelled > 0
    assert a.statistics().waiting_readers == 0


async def test_receives_cancelled_in_lockstep_leave_the_socket_usable(sockets: Sockets) -> None:
    """Deterministic variant: each round the receiver is blocked, cancelled,
    blocks again, and only then does its message arrive."""
    a, b = await sockets.pair(zmq.DEALER)

    async def receive(scope: trio.CancelScope, into: list[list[bytes]]) -> None:
        with scope:
            await a.recv_batch()
            raise AssertionError("nothing was sent yet")
        into.extend(await a.recv_batch())

    with trio.fail_after(10):
        for i in range(100):
            received: list[list[bytes]] = []
            scope = trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive, scope, received)
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert a.statistics().waiting_readers == 1
                await b.send_multipart([_num(i)])
            assert received == [[_num(i)]]


@pytest.mark.parametrize("second", ["reader", "writer"])
async def test_waiting_passes_to_another_task_when_the_fd_watcher_is_cancelled(
    sockets: Sockets, second: str
) -> None:
    """The first waiter watches the fd and the next one parks; cancelling the
    watcher must hand the fd over, or the parked task would never wake."""
    a = sockets(zmq.PAIR, TINY_QUEUES)
    b = sockets(zmq.PAIR, TINY_QUEUES)
    b.connect(a.bind(sockets.inproc()))
    queued = _fill(a) if second == "writer" else 0
    finished = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            watcher = trio.CancelScope()

            async def first_reader() -> None:
                with watcher:
                    await a.recv_multipart()
                    raise AssertionError("the watcher was cancelled before any message")

            async def second_task() -> None:
                if second == "reader":
                    assert await a.recv_multipart() == [b"for the second"]
                else:
                    await a.send_multipart([b"from the second"])
                finished.set()

            nursery.start_soon(first_reader)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second_task)
            await trio.testing.wait_all_tasks_blocked()
            stats = a.statistics()
            assert stats.waiting_readers + stats.waiting_writers == 2
            watcher.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
            if second == "reader":
                await b.send_multipart([b"for the second"])
            else:
                assert len(_drain_nowait(b)) == queued
        assert finished.is_set()
        if second == "writer":
            assert await b.recv_multipart() == [b"from the second"]


async def test_a_cancelled_send_is_not_sent(sockets: Sockets) -> None:
    a = sockets(zmq.PAIR, TINY_QUEUES)
    b = sockets(zmq.PAIR, TINY_QUEUES)
    b.connect(a.bind(sockets.inproc()))
    queued = _fill(a)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_multipart, [b"never"])
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert a.statistics().sent == queued
        assert [frames[0] for frames in _drain_nowait(b)] == [_num(i) for i in range(queued)]
        await a.send_multipart([b"after"])
        assert await b.recv_multipart() == [b"after"]


# -- 6. many tasks on one socket ---------------------------------------------------------


async def test_five_receivers_share_one_socket(sockets: Sockets) -> None:
    pull = sockets(zmq.PULL)
    push = sockets(zmq.PUSH)
    push.connect(pull.bind(LOOPBACK))
    n = 5_000
    per_receiver: list[list[int]] = [[] for _ in range(5)]
    total = 0
    all_in = trio.Event()

    async def receive(mine: list[int], batched: bool) -> None:
        nonlocal total
        while True:
            if batched:
                batch = await pull.recv_batch(max_messages=16)
            else:
                batch = [await pull.recv_multipart()]
            mine.extend(_int(frames[0]) for frames in batch)
            total += len(batch)
            if total == n:
                all_in.set()

    async def send() -> None:
        for i in range(n):
            await push.send_multipart([_num(i)])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index, mine in enumerate(per_receiver):
                nursery.start_soon(receive, mine, index % 2 == 1)
            nursery.start_soon(send)
            await all_in.wait()
            nursery.cancel_scope.cancel()
    everything = sorted(i for mine in per_receiver for i in mine)
    assert everything == list(range(n))  # each exactly once
    for mine in per_receiver:
        assert mine == sorted(mine)  # a queue hands messages out in order
    assert sum(1 for mine in per_receiver if mine) >= 2
    assert pull.statistics().received == n


async def test_five_senders_and_a_receiver_share_one_socket(sockets: Sockets) -> None:
    a, b = await sockets.pair(zmq.DEALER)
    per_sender = 1_000
    reply_count = 2_000
    at_b: dict[int, list[int]] = {s: [] for s in range(5)}
    at_a: list[int] = []

    async def send_from_a(sender: int) -> None:
        for i in range(per_sender):
            await a.send_multipart([bytes([sender]), _num(i)])

    async def receive_at_a() -> None:
        while len(at_a) < reply_count:
            at_a.extend(_int(frames[0]) for frames in await a.recv_batch())

    async def send_from_b() -> None:
        for i in range(reply_count):
            await b.send_multipart([_num(i)])

    async def receive_at_b() -> None:
        for _ in range(5 * per_sender):
            sender, seq = await b.recv_multipart()
            at_b[sender[0]].append(_int(seq))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for sender in range(5):
                nursery.start_soon(send_from_a, sender)
            nursery.start_soon(receive_at_a)
            nursery.start_soon(send_from_b)
            nursery.start_soon(receive_at_b)
    assert at_b == {s: list(range(per_sender)) for s in range(5)}
    assert at_a == list(range(reply_count))


# -- 7. closing --------------------------------------------------------------------------


async def test_close_wakes_every_waiting_task_with_closed_resource_error(
    sockets: Sockets,
) -> None:
    lonely = sockets(zmq.DEALER)  # never connected: receives and sends both wait
    woken: list[str] = []

    async def expect_closed(name: str, op: Callable[[], Awaitable[object]]) -> None:
        with pytest.raises(trio.ClosedResourceError):
            await op()
        woken.append(name)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(expect_closed, "recv-1", lonely.recv_multipart)
            nursery.start_soon(expect_closed, "recv-2", lonely.recv_multipart)
            nursery.start_soon(expect_closed, "batch", lonely.recv_batch)
            nursery.start_soon(expect_closed, "send", lambda: lonely.send_multipart([b"x"]))
            await trio.testing.wait_all_tasks_blocked()
            stats = lonely.statistics()
            assert (stats.waiting_readers, stats.waiting_writers) == (3, 1)
            lonely.close()
    assert sorted(woken) == ["batch", "recv-1", "recv-2", "send"]
    assert lonely.statistics() == ZSocketStatistics(
        sent=0, received=0, waiting_readers=0, waiting_writers=0, unsent=0
    )


async def test_close_wakes_a_router_send_waiting_for_one_full_peer(sockets: Sockets) -> None:
    router = sockets(zmq.ROUTER, TINY_QUEUES)
    endpoint = router.bind(sockets.inproc())
    full = sockets(zmq.DEALER, TINY_QUEUES, identity=b"full")
    idle = sockets(zmq.DEALER, TINY_QUEUES, identity=b"idle")  # keeps POLLOUT on
    with trio.fail_after(5):
        for dealer in (full, idle):
            dealer.connect(endpoint)
            await dealer.send_multipart([b"hi"])
            await router.recv_multipart()
        _fill_router(router, b"full")
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await router.send_multipart([b"full", b"never"])

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert router.statistics().waiting_writers == 1
            router.close()


async def test_every_operation_after_close_raises_closed_resource_error(sockets: Sockets) -> None:
    sock, _ = await sockets.pair(zmq.DEALER)
    sock.close()
    assert sock.closed
    assert "closed" in repr(sock)
    with pytest.raises(trio.ClosedResourceError):
        sock.send_multipart_nowait([b"x"])
    with pytest.raises(trio.ClosedResourceError):
        sock.recv_multipart_nowait()
    for operation in (lambda: sock.send_multipart([b"x"]), sock.recv_multipart, sock.recv_batch):
        with trio.fail_after(1), pytest.raises(trio.ClosedResourceError):
            await operation()
    for sync_operation in (
        lambda: sock.bind(LOOPBACK),
        lambda: sock.connect("tcp://127.0.0.1:1"),
        lambda: sock.disconnect("tcp://127.0.0.1:1"),
    ):
        with pytest.raises(trio.ClosedResourceError):
            sync_operation()


async def test_close_is_idempotent_and_async_with_closes(sockets: Sockets) -> None:
    with trio.fail_after(5):
        async with sockets(zmq.PAIR) as sock:
            assert not sock.closed
            sock.bind(LOOPBACK)
        assert sock.closed
        sock.close()
        sock.close(linger_ms=100)
        await sock.aclose()
        assert sock.closed
        other = sockets(zmq.PAIR)
        await other.aclose()
        assert other.closed


# -- 8. high-water marks -------------------------------------------------------------------


async def test_send_nowait_would_block_at_the_hwm_and_send_waits_for_the_drain(
    sockets: Sockets,
) -> None:
    a = sockets(zmq.DEALER, TINY_QUEUES)
    b = sockets(zmq.DEALER, TINY_QUEUES)
    a.connect(b.bind(sockets.inproc()))
    queued = _fill(a)
    # inproc: the queue holds the sender's SNDHWM plus the receiver's RCVHWM.
    assert 1 <= queued <= TINY_QUEUES.send_hwm + TINY_QUEUES.recv_hwm
    with pytest.raises(trio.WouldBlock):
        a.send_multipart_nowait([b"still full"])
    sent = trio.Event()

    async def send_last() -> None:
        await a.send_multipart([b"last"])
        sent.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_last)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            assert a.statistics().waiting_writers == 1
            got = [await b.recv_multipart() for _ in range(queued + 1)]
    assert sent.is_set()
    assert got == [[_num(i), b"fill"] for i in range(queued)] + [[b"last"]]
    assert a.statistics().sent == queued + 1


async def test_hwm_over_tcp_loses_nothing_across_would_block(sockets: Sockets) -> None:
    a, b = await sockets.pair(zmq.DEALER, TINY_QUEUES)
    payload = bytes(64 * 1024)  # big frames fill the kernel's buffers quickly
    queued = _fill(a, payload, limit=2_000)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.send_multipart, [b"last", b""])
            got = [await b.recv_multipart() for _ in range(queued + 1)]
    assert got == [[_num(i), payload] for i in range(queued)] + [[b"last", b""]]


async def test_a_dealer_dialing_a_dead_address_waits_until_a_peer_listens(
    sockets: Sockets,
) -> None:
    """IMMEDIATE: a DEALER connected to an address where nobody listens queues
    nothing (the message would sit in limbo); send waits, then goes out once a
    peer binds there.  (Over TCP: an inproc connect makes its pipe at once.)"""
    dealer = sockets(zmq.DEALER)
    # A port the OS gave us, held (bound, not listening) so nobody else takes it
    # while the dealer's connection attempts are refused.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        dealer.connect(endpoint)
        with pytest.raises(trio.WouldBlock):
            dealer.send_multipart_nowait([b"early"])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dealer.send_multipart, [b"hello"])
            await trio.testing.wait_all_tasks_blocked()
            assert dealer.statistics().waiting_writers == 1
            peer = sockets(zmq.DEALER)
            assert peer.bind(endpoint) == endpoint
            assert await peer.recv_multipart() == [b"hello"]


# -- 9. MAXMSGSIZE ---------------------------------------------------------------------------


async def test_an_oversized_message_is_dropped_and_other_peers_are_still_served(
    sockets: Sockets,
) -> None:
    receiver = sockets(zmq.ROUTER, TransportConfig(max_message_size=1024))
    monitor = sockets.adopt(receiver.zmq_socket.get_monitor_socket(zmq.EVENT_DISCONNECTED))
    endpoint = receiver.bind(LOOPBACK)
    offender = sockets(zmq.DEALER, identity=b"offender")
    polite = sockets(zmq.DEALER, identity=b"polite")
    offender.connect(endpoint)
    polite.connect(endpoint)
    with trio.fail_after(10):
        await offender.send_multipart([b"x" * 2048])
        # libzmq cuts the offender off before the bytes reach Python.
        event = parse_monitor_message(await monitor.recv_multipart())
        assert event["event"] == zmq.EVENT_DISCONNECTED
        await polite.send_multipart([b"y" * 1024])  # exactly the limit is fine
        assert await receiver.recv_multipart() == [b"polite", b"y" * 1024]
    with pytest.raises(trio.WouldBlock):
        receiver.recv_multipart_nowait()  # the big one never arrived


# -- 10. statistics ---------------------------------------------------------------------------


async def test_statistics_count_messages_and_waiting_tasks(sockets: Sockets) -> None:
    a = sockets(zmq.PAIR)
    b = sockets(zmq.PAIR)
    b.connect(a.bind(sockets.inproc()))
    assert a.statistics() == ZSocketStatistics(
        sent=0, received=0, waiting_readers=0, waiting_writers=0, unsent=0
    )
    with pytest.raises(trio.WouldBlock):
        a.recv_multipart_nowait()  # failures count for nothing
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.recv_multipart)
            await trio.testing.wait_all_tasks_blocked()
            assert a.statistics().waiting_readers == 1
            for i in range(3):
                await b.send_multipart([_num(i)])
        for i in range(3, 6):
            b.send_multipart_nowait([_num(i)])
        assert a.recv_multipart_nowait() == [_num(1)]
        assert len(await a.recv_batch()) == 4
        await a.send_multipart([b"back"])
    assert a.statistics() == ZSocketStatistics(
        sent=1, received=6, waiting_readers=0, waiting_writers=0, unsent=0
    )
    assert b.statistics() == ZSocketStatistics(
        sent=6, received=0, waiting_readers=0, waiting_writers=0, unsent=0
    )


# -- 11. randomized stress ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_random_mix_of_senders_and_receivers_on_both_ends(
    sockets: Sockets, seed: int
) -> None:
    """Random (but seeded) numbers of senders and receivers on each end of a
    pair, random API choices and extra checkpoints, small or large queues:
    every message arrives exactly once, and each receiver sees every sender's
    messages in order."""
    rng = random.Random(seed)
    kind = rng.choice([zmq.PAIR, zmq.DEALER])
    hwm = rng.choice([1, 3, 50, 100_000])
    transport = rng.choice(["tcp", "inproc"])
    a, b = await sockets.pair(
        kind, TransportConfig(send_hwm=hwm, recv_hwm=hwm), transport=transport
    )
    ends = {"a": a, "b": b}
    senders = {name: rng.randint(1, 4) for name in ends}
    receivers = {name: rng.randint(1, 4) for name in ends}
    count = {name: rng.randint(100, 600) for name in ends}
    seen: dict[str, list[list[tuple[int, int]]]] = {
        name: [[] for _ in range(receivers[name])] for name in ends
    }
    received = dict.fromkeys(ends, 0)
    expected = {"a": senders["b"] * count["b"], "b": senders["a"] * count["a"]}
    complete = {name: trio.Event() for name in ends}

    async def send(name: str, sender: int, task_rng: random.Random) -> None:
        sock = ends[name]
        for seq in range(count[name]):
            frames = [bytes([sender]), _num(seq), os.urandom(task_rng.randint(0, 64))]
            if task_rng.random() < 0.5:
                await sock.send_multipart(frames)
            else:
                try:
                    sock.send_multipart_nowait(frames)
                except trio.WouldBlock:
                    await sock.send_multipart(frames)
            if task_rng.random() < 0.3:
                await trio.lowlevel.checkpoint()

    async def receive(name: str, into: list[tuple[int, int]], task_rng: random.Random) -> None:
        sock = ends[name]
        while True:
            how = task_rng.random()
            if how < 0.4:
                batch = await sock.recv_batch(max_messages=task_rng.randint(1, 64))
            elif how < 0.8:
                batch = [await sock.recv_multipart()]
            else:
                try:
                    batch = [sock.recv_multipart_nowait()]
                except trio.WouldBlock:
                    batch = [await sock.recv_multipart()]
            into.extend((frames[0][0], _int(frames[1])) for frames in batch)
            received[name] += len(batch)
            assert received[name] <= expected[name]
            if received[name] == expected[name]:
                complete[name].set()
            if task_rng.random() < 0.3:
                await trio.lowlevel.checkpoint()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for name in ends:
                for into in seen[name]:
                    nursery.start_soon(receive, name, into, random.Random(rng.random()))
                for sender in range(senders[name]):
                    nursery.start_soon(send, name, sender, random.Random(rng.random()))
            for event in complete.values():
                await event.wait()
            nursery.cancel_scope.cancel()

    for name, other in (("a", "b"), ("b", "a")):
        everything = sorted(item for into in seen[name] for item in into)
        assert everything == [(s, i) for s in range(senders[other]) for i in range(count[other])]
        for into in seen[name]:
            for s in range(senders[other]):
                mine = [i for sender, i in into if sender == s]
                assert mine == sorted(mine)
        with pytest.raises(trio.WouldBlock):
            ends[name].recv_multipart_nowait()
