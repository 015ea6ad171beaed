"""A trio adapter for one non-blocking pyzmq socket.

Why this is delicate: ``zmq.FD`` is edge-triggered and shared by both
directions.  It becomes readable when the socket's ``EVENTS`` *may* have
changed, and any zmq call on the socket (send, recv, reading ``EVENTS``) can
consume that notification.  So readiness is always decided by reading
``EVENTS``; the fd only says "go and re-read".  Two consequences shape the code:

* trio lets one task wait on an fd at a time, so the first waiter becomes the
  *watcher* of the fd and everybody else parks; whenever the watcher wakes it
  wakes all parked tasks so each re-reads ``EVENTS`` for its own direction.
* after every zmq call on the socket -- a send or receive *that failed* as
  much as one that succeeded, ``bind``/``connect``/``disconnect``, and a
  waiter's own read of ``EVENTS`` -- we re-read ``EVENTS``: if a direction
  somebody waits for became ready while our call swallowed the edge, nobody
  would ever be told, so we wake the waiters ourselves (and kick the watcher
  off the fd).  A failing ``recv(NOBLOCK)`` and ``connect()`` process pending
  commands unthrottled, so "only after success" is not enough.
* a ROUTER reports ``POLLOUT`` while *any* peer has room, so a send to one
  full peer can fail although ``EVENTS`` says the socket is writable.  Such a
  sender cannot wait for ``POLLOUT`` (it would retry without ever yielding);
  it retries on every wake-up of the socket and on a short, growing timer.

Operations follow trio's checkpoint discipline (see ``trio/_socket.py``):
check for cancellation, try the non-blocking call, wait for readiness if it
would block, and on success leave through a cancel-shielded checkpoint, so a
received message is never dropped by a cancellation.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import cast

import attrs
import trio
import zmq

__all__ = ["PeerUnreachable", "ZSocket", "ZSocketStatistics"]

# The fd wait is bounded as a safety net: even if an edge were lost (a bug in
# this file or in libzmq), a waiter re-reads EVENTS at least this often.
_SAFETY_NET_SECONDS = 2.0

# A send that fails although EVENTS shows POLLOUT (a ROUTER whose target peer is
# full) is retried on every wake-up of the socket and at least this often.
_PEER_RETRY_FIRST_SECONDS = 0.001
_PEER_RETRY_MAX_SECONDS = 0.05

# Plain ints: pyzmq's constants are enums, and every ``events & zmq.POLLIN`` on
# an enum builds a new enum member, several times per message on the hot path.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
# Frames at least this large are sent without a copy; smaller ones are cheaper
# to copy than to track (pyzmq's own threshold).
_ZERO_COPY_BYTES = 65536


def _recv_with_peer_key(sock: zmq.Socket[bytes], flags: int) -> list[bytes]:
    """One message, plus the sender's ``User-Id`` (its Z85 CURVE key) as a last part.

    Reading a frame's metadata needs ``copy=False``; the copies are made here,
    so the owner sees plain bytes like every other socket's.
    """
    frames = sock.recv_multipart(flags, copy=False)
    try:
        peer = frames[-1].get("User-Id")
    except zmq.ZMQError:  # no ZAP handler gave this connection an id
        peer = ""
    parts = [frame.bytes for frame in frames]
    parts.append(peer.encode() if isinstance(peer, str) else b"")
    return parts


class PeerUnreachable(Exception):
    """A ROUTER socket was asked to send to an identity that is not connected.

    Raised instead of the silent drop ZeroMQ does by default (we set
    ``ROUTER_MANDATORY``), so the sender can count or re-route the message.
    """


@attrs.frozen
class ZSocketStatistics:
    sent: int
    received: int
    waiting_readers: int
    waiting_writers: int
    unsent: int  # messages try_send could not hand over (full, or no such peer)


class ZSocket:
    """Trio-friendly wrapper around a ``zmq.Socket`` (composition, not subclassing).

    One actor owns each ZSocket; several tasks of that actor may use it at once
    (typically a reader task blocked in ``recv_batch`` while the actor's loop
    sends), which is exactly the case a naive adapter deadlocks on.  Create
    instances with :func:`fastworker.transport.open_socket`, the one place that
    applies the socket options the project relies on.
    """

    __slots__ = (
        "_closed",
        "_fd",
        "_lot",
        "_monitored",
        "_peer_writers",
        "_readers",
        "_reads_interrupted",
        "_received",
        "_recv",
        "_sent",
        "_sock",
        "_unsent",
        "_watch_scope",
        "_writers",
        "endpoint",
    )

    def __init__(self, sock: zmq.Socket[bytes], *, with_peer_key: bool = False) -> None:
        """``with_peer_key``: every received message gets one more part at its end,
        the sender's CURVE public key in Z85 (the ``User-Id`` our ZAP handler
        gave the connection), so the owner checks each message against the
        sender's role.  Only for sockets with a ZAP domain (CURVE servers)."""
        self._sock = sock
        self._monitored = False  # a socket monitor publishes its events (see close)
        self._recv = (
            functools.partial(_recv_with_peer_key, sock) if with_peer_key else sock.recv_multipart
        )
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._lot = trio.lowlevel.ParkingLot()
        self._watch_scope: trio.CancelScope | None = None
        self._readers = 0
        self._reads_interrupted = False
        self._writers = 0
        self._peer_writers = 0
        self._closed = False
        self._sent = 0
        self._received = 0
        self._unsent = 0
        self.endpoint: str | None = None

    # -- set-up -------------------------------------------------------------

    @property
    def zmq_socket(self) -> zmq.Socket[bytes]:
        """The wrapped socket, for options only: never send or receive on it directly.

        Reading ``EVENTS`` on it, or any call that processes zmq's pending
        commands, can swallow the fd's edge and stall the tasks waiting here.
        """
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def monitor(self, address: str, events: int) -> None:
        """Publish ``events`` of this socket on the PAIR endpoint ``address``.

        Never ask for ``zmq.EVENT_MONITOR_STOPPED``: it would be sent, blocking,
        when this socket closes.
        """
        self._check_open()
        self._sock.monitor(address, events)
        self._monitored = True

    def bind(self, address: str) -> str:
        """Bind and return the real endpoint (``tcp://127.0.0.1:*`` resolves its port)."""
        self._check_open()
        try:
            self._sock.bind(address)
        finally:
            self._after_io()  # bind processes pending commands: it can swallow an edge
        endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint = endpoint
        return endpoint

    def connect(self, address: str) -> None:
        self._check_open()
        try:
            self._sock.connect(address)
        finally:
            self._after_io()

    def disconnect(self, address: str) -> None:
        self._check_open()
        try:
            self._sock.disconnect(address)
        finally:
            self._after_io()

    # -- sending ------------------------------------------------------------

    def send_multipart_nowait(self, frames: Sequence[bytes]) -> None:
        """Queue a message without waiting.

        Raises ``trio.WouldBlock`` when the socket cannot take it now (high-water
        mark reached) and :class:`PeerUnreachable` when a ROUTER has no peer of
        that identity.  The socket owner decides what that means: senders that
        must not stall (the scheduler) count and re-route rather than wait.
        """
        self._check_open()
        sock = self._sock
        try:
            last = len(frames) - 1
            for index, frame in enumerate(frames):
                sock.send(
                    frame,
                    _NOBLOCK if index == last else _NOBLOCK_MORE,
                    copy=len(frame) < _ZERO_COPY_BYTES,
                )
        except zmq.Again:
            raise trio.WouldBlock from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(f"no connected peer for identity {frames[0]!r}") from None
            raise
        else:
            self._sent += 1
        finally:
            # Also after a failure: the attempt may have processed pending commands.
            self._after_io()

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Hand a message to ZeroMQ if it can take it now; ``False`` if not.

        For owners that must never stall on one peer (an actor's loop answering
        many): a message that would block, or whose ROUTER peer is gone, is not
        sent and is counted in :attr:`ZSocketStatistics.unsent`.  The caller
        decides what is lost, and says why it can afford it: a later tick
        re-sends, or the peer asks again.
        """
        try:
            self.send_multipart_nowait(frames)
        except (trio.WouldBlock, PeerUnreachable):
            self._unsent += 1
            return False
        return True

    async def send_multipart(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message, waiting for room if the socket is full.

        On a ROUTER, "full" is per peer: the send waits until *that* peer has
        room (``PeerUnreachable`` if it disconnects meanwhile).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        peer_retry = 0.0
        while True:
            try:
                self.send_multipart_nowait(frames)
            except trio.WouldBlock:
                if peer_retry:
                    # EVENTS said POLLOUT yet the send would block: a ROUTER whose
                    # target peer is full.  Waiting for POLLOUT again would return at
                    # once and spin without a checkpoint; wait for any change instead.
                    await self._wait_for_change(peer_retry)
                    peer_retry = min(peer_retry * 2, _PEER_RETRY_MAX_SECONDS)
                else:
                    await self._wait_for(_POLLOUT)
                    peer_retry = _PEER_RETRY_FIRST_SECONDS
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return

    async def wait_writable(self) -> None:
        """Return once a send would not block (for a DEALER: once a peer is connected)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_for(_POLLOUT)

    # -- receiving ----------------------------------------------------------

    def recv_multipart_nowait(self) -> list[bytes]:
        """One message if one is ready, else ``trio.WouldBlock``."""
        self._check_open()
        try:
            frames: list[bytes] = self._recv(_NOBLOCK)
        except zmq.Again:
            raise trio.WouldBlock from None
        else:
            self._received += 1
        finally:
            # A failing recv processes pending commands (unthrottled): it can
            # swallow the edge that a task blocked in send_multipart waits for.
            self._after_io()
        return frames

    async def recv_multipart(self) -> list[bytes]:
        """Wait for one multipart message."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                frames = self.recv_multipart_nowait()
            except trio.WouldBlock:
                await self._wait_for(_POLLIN)
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frames

    def recv_batch_nowait(self, max_messages: int = 1024) -> list[list[bytes]]:
        """Every message already queued, up to ``max_messages``; empty if none."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        self._check_open()
        recv = self._recv
        batch: list[list[bytes]] = []
        if self._events() & _POLLIN:
            while len(batch) < max_messages:
                try:
                    batch.append(recv(_NOBLOCK))
                except zmq.Again:
                    break
        self._after_io()
        self._received += len(batch)
        return batch

    def interrupt_reads(self) -> None:
        """Have the pending :meth:`recv_batch`, or the next one, return without waiting.

        It returns what it holds, maybe nothing.  For a reader whose owner
        stops (``Feed.on_stop``): cheaper than a cancel scope around every
        read, and, like a cancellation, it never drops a message taken.
        """
        self._reads_interrupted = True
        if self._readers:
            self._wake_all()

    async def recv_batch(self, max_messages: int = 1024) -> list[list[bytes]]:
        """Wait for at least one message, then take every message already queued.

        Draining in one wake-up is what makes batching work: under load a reader
        pays one task switch for hundreds of messages instead of one each.
        Raises ``ValueError`` if ``max_messages`` is below 1.
        """
        if max_messages < 1:
            # With 0 the loop below would never receive and never wait: a spin.
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        recv = self._recv
        batch: list[list[bytes]] = []
        yielded = False
        # Ask EVENTS before receiving: on an idle socket a failing recv costs
        # a raised zmq.Again, dearer than the read, and every wake-up of a
        # latency-bound reader starts on an empty socket.
        ready = self._events()
        self._hand_off(ready & ~_POLLIN)  # the read may have swallowed a writer's edge
        known: int | None = ready
        while True:
            if ready & _POLLIN:
                try:
                    batch.append(recv(_NOBLOCK))
                except zmq.Again:
                    self._after_io()  # the failed attempt may have swallowed an edge
                    known = None
                else:
                    break
            yielded = await self._wait_for(_POLLIN, known) or yielded
            known = None
            self._check_open()
            if self._reads_interrupted:
                self._reads_interrupted = False
                if not yielded:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return batch  # empty: nothing was taken
            ready = _POLLIN  # _wait_for returns once EVENTS shows it
        # One message in hand.  Read EVENTS (which hands readiness on, as after
        # any zmq call) rather than receiving until zmq.Again: raising Again
        # costs more than the read, and a lone message is the common case.
        events = self._events()
        if events & _POLLIN:
            while len(batch) < max_messages:
                try:
                    batch.append(recv(_NOBLOCK))
                except zmq.Again:
                    break
            events = self._events()
        self._hand_off(events)
        self._received += len(batch)
        if not yielded:
            # As trio's own sockets do: an operation that completed without
            # waiting still yields once; one that waited has yielded already
            # (each skipped yield is a turn of the run loop saved per message).
            await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    # -- readiness ----------------------------------------------------------

    def _after_io(self) -> None:
        """Our call may have swallowed the fd's edge: hand readiness on to waiters."""
        if self._readers or self._writers:
            self._hand_off(self._events())

    def _events(self) -> int:
        """Read ``EVENTS``; this processes zmq's pending commands and drains the fd."""
        return cast(int, self._sock.get(_EVENTS))

    def _hand_off(self, events: int) -> None:
        """Wake everybody if ``events`` shows a direction that somebody waits for."""
        if (events & _POLLIN and self._readers) or (events & _POLLOUT and self._writers):
            self._wake_all()

    def _wake_all(self) -> None:
        self._lot.unpark_all()
        if self._watch_scope is not None:
            self._watch_scope.cancel()

    async def _wait_for(self, flag: int, events: int | None = None) -> bool:
        """Return once ``EVENTS`` shows ``flag`` (POLLIN or POLLOUT), the socket
        closed, or (reading) ``interrupt_reads`` was called.

        ``events``: what the caller just read from ``EVENTS`` (and handed on),
        with no zmq call since; it saves the first read.  Returns whether it
        yielded to the scheduler on the way (a checkpoint).
        """
        reading = flag == _POLLIN
        if reading:
            self._readers += 1
        else:
            self._writers += 1
        yielded = False
        try:
            while True:
                self._check_open()
                if reading and self._reads_interrupted:
                    return yielded
                if events is None:
                    events = self._events()
                    # Reading EVENTS may itself have swallowed the edge that the other
                    # direction's watcher waits for: hand that readiness on.
                    self._hand_off(events & ~flag)
                if events & flag:
                    return yielded
                yielded = True
                if self._watch_scope is None:
                    await self._watch_fd()
                else:
                    await self._lot.park()
                events = None
        finally:
            if reading:
                self._readers -= 1
            else:
                self._writers -= 1

    async def _wait_for_change(self, retry_after: float) -> None:
        """Wait for the socket's next wake-up (fd edge, hand-off) or ``retry_after`` seconds.

        For a sender whose failure ``EVENTS`` cannot describe (one full ROUTER
        peer).  Such senders are not counted as writers: a hand-off on ``POLLOUT``
        would wake them for nothing, and two of them would wake each other forever.
        """
        self._peer_writers += 1
        try:
            with trio.move_on_after(retry_after):
                self._check_open()
                if self._watch_scope is None:
                    await self._watch_fd()
                else:
                    await self._lot.park()
        finally:
            self._peer_writers -= 1
        self._check_open()

    async def _watch_fd(self) -> None:
        """Be the one task waiting on the fd; wake everybody when it fires."""
        scope = trio.CancelScope(deadline=trio.current_time() + _SAFETY_NET_SECONDS)
        self._watch_scope = scope
        try:
            with scope:
                await trio.lowlevel.wait_readable(self._fd)
        finally:
            self._watch_scope = None
            # Whoever parked while we watched must re-read EVENTS too, and one of
            # them must take over the fd if we leave (also on cancellation).
            self._lot.unpark_all()

    # -- closing ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this ZeroMQ socket was closed")

    def close(self, linger_ms: int = 0) -> None:
        """Close now; waiters get ``trio.ClosedResourceError``.

        ``linger_ms`` bounds how long ZeroMQ keeps trying to deliver what is
        still queued (0 drops it at once).  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        # RuntimeError: not inside trio.run (closing from plain code), nobody can be waiting.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._fd)
        self._lot.unpark_all()
        if self._monitored:
            # libzmq sends monitor events with a blocking send: an event for
            # this socket arriving after the watcher closed its end would hang
            # the context's I/O thread.  Stopping the monitor first sends
            # nothing (EVENT_MONITOR_STOPPED is never asked for).
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
        self._sock.close(linger=linger_ms)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ZSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> ZSocketStatistics:
        return ZSocketStatistics(
            sent=self._sent,
            received=self._received,
            waiting_readers=self._readers,
            waiting_writers=self._writers + self._peer_writers,
            unsent=self._unsent,
        )

    def __repr__(self) -> str:
        # Socket.socket_type is deprecated (a DeprecationWarning on every repr).
        kind = zmq.SocketType(cast(int, self._sock.type)).name if not self._closed else "closed"
        return f"<ZSocket {kind} {self.endpoint or ''}>"
