"""The client's core on the caller's asyncio loop: no thread, no hop per request.

Each socket's file descriptor is watched with ``loop.add_reader``.  ZeroMQ's
fd is edge-triggered and only says "look at ``EVENTS``": a wake-up may stand
for messages, for room to send, or for nothing, and any call on the socket —
a send included — may consume the edge of messages that arrived meanwhile.
So every wake-up reads ``EVENTS`` and drains what is ready, and every send
schedules one more look (``_AioSocket.check_soon``) — the same care as the
trio adapter (``fastworker.transport.ZSocket``).  The core's tick looks at
every socket as well, a safety net against an edge lost all the same.

Supervision is the trio runtime's rule, kept by hand: a handler that raises
restarts the core (its sockets closed and opened again, everything
unfinished re-submitted), at most five times in ten seconds; then the client
fails for good and everybody waiting is told why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, cast

import attrs
import zmq

from .._io import HandshakeJudge, handshake_monitor
from ..transport import ZSocket, open_socket
from ._core import Channel, ClientCore

__all__ = ["AsyncioBinding"]

log = logging.getLogger("fastworker.client")

_MAX_BATCH = 1024  # messages per wake-up before the loop gets a turn
_RESTARTS = 5
_RESTART_WINDOW = 10.0
# Plain ints: pyzmq's enum flags cost microseconds per operation (design/performance.md).
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)


class _AioSocket:
    """One zmq socket read on an asyncio loop; its owner is the binding."""

    __slots__ = ("_check_pending", "_fd", "_loop", "_on_frames", "_on_up", "_sock", "zsock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        zsock: ZSocket,
        on_frames: Callable[[list[list[bytes]]], None],
        on_up: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self.zsock = zsock  # for its options and its close (which stops a monitor first)
        self._sock = zsock.zmq_socket
        self._on_frames = on_frames
        self._on_up = on_up  # told once, when the socket can first send
        self._fd = cast(int, self._sock.getsockopt(zmq.FD))
        self._check_pending = False
        loop.add_reader(self._fd, self.check)  # NotImplementedError on a proactor loop

    def connect(self, endpoint: str) -> None:
        self._sock.connect(endpoint)
        self.check_soon()  # connect processes commands: it may have taken an edge

    def check_soon(self) -> None:
        if not self._check_pending:
            self._check_pending = True
            self._loop.call_soon(self.check)

    def check(self) -> None:
        """Read ``EVENTS``; hand over every ready message and the first writability."""
        self._check_pending = False
        sock = self._sock
        if sock.closed:
            return
        get = sock.get
        events = cast(int, get(_EVENTS))
        if events & _POLLIN:
            batch: list[list[bytes]] = []
            recv = sock.recv_multipart
            # EVENTS between receives rather than receiving until zmq.Again: a raised
            # Again costs more than the read (design/performance.md, step 13).
            while events & _POLLIN and len(batch) < _MAX_BATCH:
                try:
                    batch.append(recv(_NOBLOCK))
                except zmq.Again:
                    break
                events = cast(int, get(_EVENTS))
            if events & _POLLIN:
                self.check_soon()  # more than one batch: the loop's other work goes first
            self._on_frames(batch)
            if sock.closed:
                return  # the core closed it while handling the batch
        if events & _POLLOUT and self._on_up is not None:
            on_up, self._on_up = self._on_up, None
            on_up()

    def try_send(self, body: bytes) -> bool:
        sock = self._sock
        if sock.closed:
            return False
        try:
            sock.send(body, _NOBLOCK)
        except zmq.Again:
            self.check_soon()
            return False
        except BaseException:
            self.check_soon()
            raise
        # The send may have consumed the fd's edge of a reply: EVENTS says.
        # Reading it re-arms the edge, so a reply arriving later wakes the
        # reader; one already here is read on the next turn.
        events = cast(int, sock.get(_EVENTS))
        if events & _POLLIN or (events & _POLLOUT and self._on_up is not None):
            self.check_soon()
        return True

    def close(self, linger_ms: int) -> None:
        if self._sock.closed:
            return
        # Before the close: the fd number is reused by the next socket.
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)
        self.zsock.close(linger_ms=linger_ms)


class AsyncioBinding:
    """Drives a :class:`ClientCore` with callbacks on ``loop``; implements its Link."""

    def __init__(self, core: ClientCore, loop: asyncio.AbstractEventLoop) -> None:
        self.core = core
        self._loop = loop
        self._sockets: dict[Channel, _AioSocket] = {}
        self._monitors: dict[Channel, _AioSocket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._crashes: list[float] = []
        # A wake-up ran at once and nothing came in since: see wake_soon.
        self._woken_at_once = False
        self.on_failure: Callable[[BaseException], None] | None = None
        self.running = False

    def start(self) -> None:
        """Connect and start ticking; raises NotImplementedError where add_reader is not."""
        self.running = True
        try:
            self.core.start(self)
        except BaseException:
            self.shutdown(0)
            raise
        self._schedule_tick()

    def shutdown(self, linger_ms: int) -> None:
        """Stop ticking and close the sockets (the core's ``close_now`` calls ``close``)."""
        self.running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.close(linger_ms)

    # -- running the core, supervised ------------------------------------------

    def _run(self, handler: Callable[..., None], *args: Any) -> None:
        if not self.running:
            return
        try:
            handler(*args)
        except Exception as exc:
            self._crashed(exc)

    def _crashed(self, exc: Exception) -> None:
        now = self._loop.time()
        self._crashes = [t for t in self._crashes if now - t < _RESTART_WINDOW] + [now]
        if len(self._crashes) > _RESTARTS:
            self.shutdown(0)
            if self.on_failure is not None:
                self.on_failure(exc)
            return
        log.error("the client's core failed; restarting it", exc_info=exc)
        try:
            self.close(0)
            self.core.restart(self)
        except Exception as again:
            self._crashed(again)

    def _schedule_tick(self) -> None:
        if self.running:
            self._timer = self._loop.call_later(self.core.interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._woken_at_once = False
        for sock in (*self._sockets.values(), *self._monitors.values()):
            sock.check_soon()  # the safety net (module docstring)
        self._run(self.core.on_tick)
        self._schedule_tick()

    # -- Link -------------------------------------------------------------------

    def send(self, channel: Channel, body: bytes) -> bool:
        sock = self._sockets.get(channel)
        return sock is not None and sock.try_send(body)

    def open(self, channel: Channel, endpoint: str, max_message_size: int) -> None:
        self._close_channel(channel, 0)
        gateway = channel is Channel.GATEWAY
        zsock = open_socket(
            zmq.DEALER,
            attrs.evolve(self.core.transport, max_message_size=max_message_size),
            identity=self.core.client_id.encode() if gateway else None,
            immediate=not gateway,  # results pushed just before the control plane exits
        )
        try:
            monitor = handshake_monitor(zsock)
            on_up = self.core.on_gateway_up if gateway else self.core.on_discovery_up
            sock = _AioSocket(
                self._loop,
                zsock,
                self._on_frames,
                lambda: self._run(on_up),
            )
        except BaseException:
            zsock.close()
            raise
        self._sockets[channel] = sock
        if monitor is not None:
            judge = HandshakeJudge(
                curve=self.core.transport.curve is not None, history=self.core.handshakes
            )
            self._monitors[channel] = _AioSocket(
                self._loop,
                monitor,
                lambda frames: self._on_handshakes(channel, sock, judge, frames),
            )
        try:
            sock.connect(endpoint)
        except BaseException:
            self._close_channel(channel, 0)
            raise

    def _on_handshakes(
        self,
        channel: Channel,
        sock: _AioSocket,
        judge: HandshakeJudge,
        frames: list[list[bytes]],
    ) -> None:
        for message in frames:
            tell, problem = judge.judge(message)
            if tell and self._sockets.get(channel) is sock:
                self._run(self.core.on_handshake, problem)

    def close(self, linger_ms: int) -> None:
        for channel in list(self._sockets):
            self._close_channel(channel, linger_ms)

    def _close_channel(self, channel: Channel, linger_ms: int) -> None:
        sock = self._sockets.pop(channel, None)
        if sock is not None:
            sock.close(linger_ms)  # stops its monitor's events first (ZSocket.close)
        monitor = self._monitors.pop(channel, None)
        if monitor is not None:
            monitor.close(0)

    def wake_soon(self) -> bool:
        """Run the wake-up at once, unless one ran at once and nothing came in since.

        A lone ``submit_task`` goes out before its caller awaits (a turn of
        the loop less per round trip).  The calls after it wait for the next
        turn (``call_soon``), so a burst of ``delay`` calls in one turn leaves
        in one more message.  What ends the wait: frames arriving, the
        deferred wake-up itself, or a tick; within one turn none of these can
        run, and a caller that waits for an answer gets one through a frame.
        """
        if self._woken_at_once:
            try:
                self._loop.call_soon(self._run_deferred_wake)
            except RuntimeError:  # the loop is closed
                return False
            return True
        self._woken_at_once = True
        self._run(self.core.on_wake)
        return True

    def _run_deferred_wake(self) -> None:
        self._woken_at_once = False
        self._run(self.core.on_wake)

    def _on_frames(self, frames: list[list[bytes]]) -> None:
        self._woken_at_once = False
        self._run(self.core.on_frames, frames)
