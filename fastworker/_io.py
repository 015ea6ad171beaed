"""Socket reader tasks: the bridge from a socket into its owner actor's mailbox."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator

import attrs
import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from .runtime import ActorRef, ActorStopped, Feed, MailboxFull
from .transport import TransportConfig, ZSocket, open_socket

__all__ = [
    "DeadlineTimer",
    "HandshakeHistory",
    "HandshakeJudge",
    "Inbound",
    "bind_again",
    "connect_dealer",
    "handshake_monitor",
    "pump_socket",
    "tell_own_actor",
    "tick",
]


class _Frames(list[list[bytes]]):
    """The frames of one Inbound; iterating them records how far the handler got."""

    __slots__ = ("handled",)

    def __init__(self, frames: Iterable[list[bytes]] = ()) -> None:
        super().__init__(frames)
        self.handled: int | None = None  # None: never iterated

    def __iter__(self) -> Iterator[list[bytes]]:
        self.handled = 0
        for count, parts in enumerate(super().__iter__(), 1):
            self.handled = count
            yield parts


@attrs.frozen
class Inbound:
    """Frames a socket reader took in one wake-up, for its own actor's loop.

    Iterate ``frames`` once, in order: if the handler raises on one frame,
    :meth:`leftover` holds the frames after it, and the actor runtime hands
    them to the restarted actor first (a bad frame fails alone).
    """

    frames: _Frames = attrs.field(converter=_Frames)

    def leftover(self) -> Inbound | None:
        """The frames after the last one handed out, or None."""
        handled = self.frames.handled
        if handled is None or handled >= len(self.frames):
            return None
        return Inbound(self.frames[handled:])


log = logging.getLogger("fastworker.io")

# On a stop, a reader hands over at most this many messages its socket still
# holds (the default receive high-water mark): a bound on the final drain.
_FINAL_DRAIN_MESSAGES = 100_000


async def pump_socket(sock: ZSocket, owner: ActorRef, max_batch: int = 1024) -> None:
    """Forward every ready frame of ``sock`` to ``owner`` as one Inbound per wake-up.

    ``send`` waits when the owner's mailbox is full: we stop reading, ZeroMQ's
    queues fill, and TCP pushes back on the peers.  That is the backpressure
    path; nothing is dropped here.  Returns when the owner closes the socket.

    When ``owner`` is asked to stop, the pending read returns at once
    (``interrupt_reads``: it never drops a message it took) and what the
    socket already holds — sent by peers before the stop — is handed over
    before the reader lets the actor's run end (:class:`~fastworker.runtime.Feed`).
    """
    try:
        feed = owner.open_feed()
    except ActorStopped:
        return
    with feed:
        feed.on_stop(sock.interrupt_reads)
        while not feed.stopping:
            try:
                frames = await sock.recv_batch(max_batch)
            except trio.ClosedResourceError:
                return
            if frames and not await _hand_over(feed, Inbound(frames)):
                return
        left = _FINAL_DRAIN_MESSAGES
        while left > 0:
            try:
                frames = sock.recv_batch_nowait(min(max_batch, left))
            except trio.ClosedResourceError:
                return
            if not frames or not await _hand_over(feed, Inbound(frames)):
                return
            left -= len(frames)


async def _hand_over(feed: Feed, message: Inbound) -> bool:
    """Queue ``message`` for the reader's actor; False once the actor is gone."""
    try:
        feed.tell(message)  # room in the mailbox: no extra turn of the run loop
    except MailboxFull:
        try:
            await feed.send(message)  # full: wait (backpressure)
        except ActorStopped:
            return False
        except trio.Cancelled:
            feed.keep(message)  # the actor crashed: its next run gets these frames
            raise
    except ActorStopped:
        return False
    return True


async def tell_own_actor(owner: ActorRef, message: object) -> bool:
    """From a helper task of ``owner``: queue ``message``; False once ``owner`` has stopped.

    A helper (socket reader, ticker, timer) can wake between its actor's stop
    and the end of the actor's run.  That is no crash: the helper should just
    end.  Raising ActorStopped into the actor's nursery instead would log a
    "crashed while stopping" traceback and cut short the drain of its mailbox.
    """
    try:
        await owner.send(message)
    except ActorStopped:
        return False
    return True


async def tick(owner: ActorRef, period: Callable[[], float], message: object) -> None:
    """Send ``message`` to ``owner`` every ``period()`` seconds until ``owner`` stops.

    ``period`` is read before each wait, so an actor can change its pace (a
    client backing off, a worker adopting the control plane's interval).
    """
    while True:
        await trio.sleep(period())
        if not await tell_own_actor(owner, message):
            return


def connect_dealer(
    nursery: trio.Nursery,
    owner: ActorRef,
    endpoint: str,
    transport: TransportConfig,
    *,
    identity: bytes | None = None,
    when_up: Callable[[ZSocket], object] | None = None,
    keep_unread: bool = False,
    on_handshake: Callable[[ZSocket, str | None], object] | None = None,
    handshake_history: HandshakeHistory | None = None,
) -> ZSocket:
    """A DEALER connected to ``endpoint``, read into ``owner``'s mailbox.

    ``when_up(sock)`` is told to ``owner`` once the connection is up: with
    IMMEDIATE set, a send right after ``connect`` usually finds no peer yet,
    and what waited should go at once rather than a heartbeat tick later.

    ``keep_unread=True`` turns IMMEDIATE off, so that what the peer sent
    before its connection dropped can still be read (see ``open_socket``);
    sends then queue in ZeroMQ until the connection is up, and ``when_up`` is
    told at once.

    ``on_handshake(sock, problem)`` is told after each handshake: ``problem``
    None when it succeeded, else why the server refused it (a key it does not
    allow, a wrong server key, CURVE on one side only), so that a wrong key is
    an error at once, not a silent wait until a timeout.  ``handshake_history``, shared
    by the owner's sockets, keeps a network fault after a success from being taken
    for a refusal (see HandshakeHistory).
    """
    sock = open_socket(zmq.DEALER, transport, identity=identity, immediate=not keep_unread)
    monitor = handshake_monitor(sock) if on_handshake is not None else None
    if monitor is not None and on_handshake is not None:
        nursery.start_soon(
            _watch_handshakes,
            sock,
            monitor,
            owner,
            functools.partial(on_handshake, sock),
            transport.curve is not None,
            handshake_history,
        )
    try:
        sock.connect(endpoint)
    except BaseException:
        sock.close()  # its handshake watcher, if any, ends with it
        raise
    nursery.start_soon(pump_socket, sock, owner)
    if when_up is not None:
        nursery.start_soon(_tell_when_writable, sock, owner, when_up)
    return sock


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
# Not EVENT_MONITOR_STOPPED: libzmq sends it, blocking, when the watched socket
# closes, and if our end is already gone (the watcher was cancelled first) the
# sending thread hangs: sockets were never reaped and their fds leaked.  The
# watcher instead notices the close by itself (_WATCH_POLL).
_WATCH_POLL = 1.0
_MECHANISM_MISMATCH = 0x11000002  # ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH


_monitor_ids = itertools.count(1)


def handshake_monitor(sock: ZSocket) -> ZSocket | None:
    """A PAIR socket receiving ``sock``'s handshake events; None if libzmq refused one.

    Set up before ``connect``, so the first handshake's events are not
    missed.  pyzmq's ``get_monitor_socket`` names the endpoint after the fd,
    which the next socket reuses while our watcher has not closed the old
    one yet: each monitor gets a name of its own here.
    """
    address = f"inproc://fastworker-monitor-{os.getpid()}-{next(_monitor_ids)}"
    try:
        sock.monitor(address, _HANDSHAKE_EVENTS)
        pair: zmq.Socket[bytes] = sock.zmq_socket.context.socket(zmq.PAIR)
    except zmq.ZMQError as exc:
        log.warning("no handshake monitor for a socket (%s): refusals surface as timeouts", exc)
        return None
    pair.setsockopt(zmq.LINGER, 0)
    pair.connect(address)
    return ZSocket(pair)


# A handshake failure that may be a connection cut mid-handshake (a control
# plane restarting) counts as a refusal only after this many in a row.
_AMBIGUOUS_FAILURES = 3


def describe_handshake(event: int, value: int, *, curve: bool) -> tuple[str | None, bool]:
    """(what a user should check, or None when it succeeded or says nothing; whether certain).

    Certain: the server refused our key (ZAP), or one side uses CURVE and the
    other does not.  Not certain: the server dropped the handshake without a
    word — a wrong ``curve_server_key`` looks like that, and so does a
    connection cut while a control plane restarts.
    """
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return None, True
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
        if not curve:
            return (
                "the handshake failed: the control plane requires CURVE keys "
                "(curve_secret_key and curve_server_key; design/security.md)"
            ), True
        return (
            "security mismatch: one side uses CURVE keys and the other does not "
            "(give both curve_secret_key and curve_server_key, or neither)"
        ), True
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return (
            f"the server refused our CURVE key (ZAP status {value}): its public certificate "
            "is not in the control plane's --client-keys/--worker-keys directory, or was removed"
        ), True
    if not curve:
        if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value == errno.EPIPE:
            # A CURVE server hangs up on a keyless peer's greeting while the peer
            # still writes it; the mechanism mismatch that says so for certain
            # reaches the peer only now and then.  (A service that is not
            # ZeroMQ answers with bytes and a reset: ECONNRESET, ignored below.)
            return (
                "the handshake failed: the control plane hangs up on our greeting; it "
                "most likely requires CURVE keys (curve_secret_key and curve_server_key; "
                "design/security.md), unless a proxy in front of it closes every connection "
                "while it is down",
                False,
            )
        return None, False  # not a fastworker control plane: the caller's timeout says it
    return (
        "the CURVE handshake failed: the server dropped it, most likely because "
        "curve_server_key is not the control plane's public key"
    ), False


class HandshakeHistory:
    """Whether a handshake of one owner (a client, a worker) ever succeeded, across the
    sockets it opens one after another.

    After one success the server evidently accepts our keys (or lack of them):
    an ambiguous failure after that is the network — a proxy that accepts and
    closes at once, a cut link — and must not fail callers as a refusal (the
    fault campaign's cut links did, saying "requires CURVE keys" to a client
    without keys of a control plane without CURVE).  A refusal with a reason
    (ZAP, a mechanism mismatch) is still told at once.
    """

    __slots__ = ("succeeded",)

    def __init__(self) -> None:
        self.succeeded = False


class HandshakeJudge:
    """Turns one socket's handshake events into what its owner should be told.

    A certain refusal is told at once; an ambiguous failure only when
    ``_AMBIGUOUS_FAILURES`` come in a row (a wrong server key fails every
    reconnection, a cut connection once).  Without CURVE the one ambiguous
    failure told is the server hanging up on our greeting (EPIPE): a CURVE
    control plane nearly always answers a keyless peer so, and the mechanism
    mismatch that says it for certain came only after up to 2 s of
    reconnections; anything else there means "not a fastworker control
    plane", which the caller's timeout says better.  Shared by the trio
    watcher below and the client's asyncio binding.
    """

    __slots__ = ("_ambiguous", "_curve", "_history")

    def __init__(self, *, curve: bool, history: HandshakeHistory | None = None) -> None:
        self._curve = curve
        self._ambiguous = 0
        self._history = history or HandshakeHistory()

    def judge(self, frames: list[bytes]) -> tuple[bool, str | None]:
        """(whether to tell, the problem or None for a success) for one monitor message."""
        event = parse_monitor_message(frames)
        problem, certain = describe_handshake(
            int(event["event"]), int(event["value"]), curve=self._curve
        )
        if not certain:
            if problem is None:
                return False, None
            self._ambiguous += 1
            if self._ambiguous < _AMBIGUOUS_FAILURES or self._history.succeeded:
                return False, None
        else:
            self._ambiguous = 0
            if problem is None:
                self._history.succeeded = True
        return True, problem


async def _watch_handshakes(
    sock: ZSocket,
    monitor: ZSocket,
    owner: ActorRef,
    on_handshake: Callable[[str | None], object],
    curve: bool,
    history: HandshakeHistory | None = None,
) -> None:
    """Tell ``owner`` how handshakes of ``sock`` go (see HandshakeJudge); ends within a
    second of the socket's close."""
    judge = HandshakeJudge(curve=curve, history=history)
    try:
        while not sock.closed:
            frames: list[bytes] | None = None
            with trio.move_on_after(_WATCH_POLL):
                frames = await monitor.recv_multipart()
            if frames is None:
                continue
            tell, problem = judge.judge(frames)
            if tell and not await tell_own_actor(owner, on_handshake(problem)):
                return
    finally:
        if not sock.closed:
            # Stop the events before closing their receiver (see _HANDSHAKE_EVENTS).
            with contextlib.suppress(zmq.ZMQError):
                sock.zmq_socket.disable_monitor()
        monitor.close()


async def _tell_when_writable(
    sock: ZSocket, owner: ActorRef, when_up: Callable[[ZSocket], object]
) -> None:
    try:
        await sock.wait_writable()
    except trio.ClosedResourceError:
        return
    await tell_own_actor(owner, when_up(sock))


class DeadlineTimer:
    """Tells its actor ``message`` when the trio clock passes ``due``; runs in its nursery.

    Moving ``due`` only moves a cancel scope's deadline and wakes no task, so
    an actor may re-arm it on every message (the gateway does, per held ack)
    and pay nothing until it actually expires.
    """

    def __init__(self, owner: ActorRef, message: object) -> None:
        self._owner = owner
        self._message = message
        self._scope: trio.CancelScope | None = None
        self.due = math.inf

    def set(self, due: float) -> None:
        """Fire at ``due`` instead (``math.inf``: not at all)."""
        if due == self.due:
            return  # the scheduler re-arms after every message, nearly always unchanged
        self.due = due
        if self._scope is not None:
            self._scope.deadline = due

    async def run(self) -> None:
        while True:
            try:
                with trio.CancelScope(deadline=self.due) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
            finally:
                self._scope = None
            self.due = math.inf
            if not await tell_own_actor(self._owner, self._message):
                return


async def bind_again(sock: ZSocket, address: str, attempts: int = 40, pause: float = 0.05) -> str:
    """Bind ``address``; while its port is still held by our previous run, retry a while.

    An actor restarted by its supervisor binds the endpoint it had (so peers
    reconnect by themselves), but ZeroMQ releases the old listener in its own
    thread, after the close: binding at once fails now and then with
    "Address already in use", and a few such failures used up the
    supervisor's restart budget.  Retries for up to ``attempts * pause`` s.
    """
    for attempt in range(attempts):
        try:
            return sock.bind(address)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or attempt == attempts - 1:
                raise
        await trio.sleep(pause)
    raise AssertionError("unreachable")
