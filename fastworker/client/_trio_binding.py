"""The client's core on trio: an actor that owns the two DEALERs and drives the core.

It runs as a system task of the caller's own trio run (``TrioHost``), or in a
thread of its own for the hand-over at ``stop()`` and for asyncio loops that
cannot watch a file descriptor (``ThreadHost``).  Everything the core decides
happens in ``receive``; the actor only turns socket readiness, ticks and
handshake outcomes into the core's events, and implements its :class:`Link`.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import trio

from .._io import Inbound, connect_dealer, tick
from ..runtime import Actor
from ..transport import ZSocket
from ._core import Channel, ClientCore

__all__ = ["TrioClientActor"]


@attrs.frozen
class _Wake:
    """What ``ClientCore.wake`` scheduled: drain the inbox."""


@attrs.frozen
class _Tick:
    pass


@attrs.frozen
class _Up:
    """``channel``'s connection is up."""

    channel: Channel


@attrs.frozen
class _Handshake:
    """A CURVE handshake of ``sock`` ended (``problem`` None: accepted)."""

    channel: Channel
    sock: ZSocket
    problem: str | None


class TrioClientActor(Actor):
    """Drives a :class:`ClientCore` on trio; ``cross_thread``: callers run in another thread."""

    def __init__(self, core: ClientCore, *, cross_thread: bool = False) -> None:
        super().__init__("client", mailbox_size=4096)
        self.core = core
        self._cross_thread = cross_thread
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._sockets: dict[Channel, ZSocket] = {}
        self._starts = 0
        self._woken_at_once = False  # see _tell_wake

    async def on_start(self, nursery: trio.Nursery) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery
        self._starts += 1
        nursery.start_soon(tick, self.ref, lambda: self.core.interval, _Tick())
        if self._starts > 1:
            self.close(0)  # what the crashed run had open
            self.core.restart(self)
        else:
            self.core.start(self)

    async def on_stop(self) -> None:
        self.core.close_now(linger_ms=500)

    def receive(self, message: Any) -> Any:
        core = self.core
        kind = type(message)
        if kind is Inbound:
            self._woken_at_once = False
            core.on_frames(message.frames)
        elif kind is _Wake:
            self._woken_at_once = False
            core.on_wake()
        elif kind is _Tick:
            self._woken_at_once = False
            core.on_tick()
        elif kind is _Up:
            if message.channel is Channel.DISCOVERY:
                core.on_discovery_up()
            else:
                core.on_gateway_up()
        elif kind is _Handshake:
            if self._sockets.get(message.channel) is message.sock:  # not one closed since
                core.on_handshake(message.problem)
        else:
            raise TypeError(f"client got an unexpected message {message!r}")
        return None

    # -- Link -----------------------------------------------------------------

    def send(self, channel: Channel, body: bytes) -> bool:
        sock = self._sockets.get(channel)
        return sock is not None and sock.try_send([body])

    def open(self, channel: Channel, endpoint: str, max_message_size: int) -> None:
        assert self._nursery is not None
        old = self._sockets.pop(channel, None)
        if old is not None:
            old.close()
        gateway = channel is Channel.GATEWAY
        self._sockets[channel] = connect_dealer(
            self._nursery,
            self.ref,
            endpoint,
            attrs.evolve(self.core.transport, max_message_size=max_message_size),
            identity=self.core.client_id.encode() if gateway else None,
            when_up=lambda _: _Up(channel),
            keep_unread=gateway,  # results pushed just before the control plane exits
            on_handshake=functools.partial(_Handshake, channel),
            handshake_history=self.core.handshakes,
        )

    def close(self, linger_ms: int) -> None:
        for sock in self._sockets.values():
            sock.close(linger_ms=linger_ms)
        self._sockets.clear()

    def wake_soon(self) -> bool:
        if not self._cross_thread:
            return self._tell_wake()
        if self._token is None:
            return False
        try:
            self._token.run_sync_soon(self._tell_wake)
        except trio.RunFinishedError:
            return False
        return True

    def _tell_wake(self) -> bool:
        """Handle the wake-up at once, unless one was and nothing came in since.

        An idle actor handles a ``tell`` before it returns (idle delivery): a
        lone ``submit_task`` goes out before its caller awaits.  The wakes
        after it are posted (handled at the actor's next turn), so a burst of
        ``delay`` calls made without yielding leaves in one more message.  The
        posted ``_Wake``, frames arriving and ticks end the wait (as on asyncio).
        """
        try:
            if self._woken_at_once:
                self.ref.post(_Wake())
                return True
            self.ref.tell(_Wake())
            self._woken_at_once = True  # after the tell: its receive cleared it
        except Exception:
            # Mailbox full (or the actor restarting): the next tick drains the
            # inbox anyway, so nothing queued there is lost.
            self.core.wake_lost()
            return False
        return True
