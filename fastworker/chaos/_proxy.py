"""A fault-injecting TCP forwarder: the campaign's network between the processes.

Each ``Proxy`` listens on a loopback port and forwards every connection to
one target port.  Its ``Link`` holds the mode, which the campaign changes at
any moment; every connection obeys the new mode at once:

* ``pass``: forward both ways;
* ``slow``: forward, sleeping ``delay`` seconds before each chunk (order kept);
* ``stall``: accept, keep connections open, forward nothing: the bytes wait
  in the kernel's buffers (TCP pushes back) and flow again when the mode
  changes, as on a congested or frozen path;
* ``half_open``: forward client to target only; what the target sends is
  read and thrown away.  A connection that lost bytes this way is reset when
  the mode changes (its byte stream has a hole: a real peer would see the
  connection die too);
* ``cut``: close every connection and refuse new ones (accepted and closed at
  once), as when a peer's host goes away.

Only loopback: the listener binds 127.0.0.1 and targets 127.0.0.1.
"""

from __future__ import annotations

import errno
from typing import Literal

import attrs
import trio

__all__ = ["MODES", "Link", "Mode", "Proxy"]

Mode = Literal["pass", "slow", "stall", "half_open", "cut"]
MODES: tuple[Mode, ...] = ("pass", "slow", "stall", "half_open", "cut")
_CHUNK = 65536
_UP = "up"  # client → target
_DOWN = "down"  # target → client


@attrs.define(eq=False)
class _Connection:
    scope: trio.CancelScope
    lost_bytes: bool = False


class Link:
    """The mode of one proxy, shared by its connections; change it with ``set``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode: Mode = "pass"
        self.delay = 0.0
        self._changed = trio.Event()
        self._connections: set[_Connection] = set()
        self.accepted = 0
        self.forwarded_bytes = 0
        self.dropped_bytes = 0

    def set(self, mode: Mode, delay: float = 0.0) -> None:
        """Switch every connection to ``mode`` now (``delay`` applies to ``slow``)."""
        if mode not in MODES:
            raise ValueError(f"unknown proxy mode {mode!r}; expected one of {MODES}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        self.mode = mode
        self.delay = delay
        for connection in list(self._connections):
            if mode == "cut" or (connection.lost_bytes and mode != "half_open"):
                connection.scope.cancel()
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def __repr__(self) -> str:
        return f"<Link {self.name} {self.mode}>"


class Proxy:
    """Forwards 127.0.0.1:``port`` (chosen at ``run``) to 127.0.0.1:``target_port``."""

    def __init__(self, link: Link, target_port: int) -> None:
        self.link = link
        self.target_port = target_port
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``nursery.start`` returns the listening port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        link = self.link
        link.accepted += 1
        async with client:
            if link.mode == "cut":
                return
            connection = _Connection(trio.CancelScope())
            link._connections.add(connection)
            try:
                with connection.scope:
                    try:
                        target = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                    except OSError:
                        return  # the target is down: the client sees the connection close
                    async with target, trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, target, _UP, connection, nursery)
                        nursery.start_soon(self._pump, target, client, _DOWN, connection, nursery)
            finally:
                link._connections.discard(connection)

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        direction: str,
        connection: _Connection,
        nursery: trio.Nursery,
    ) -> None:
        link = self.link
        try:
            while True:
                await self._wait_open()
                data = await source.receive_some(_CHUNK)
                if not data:
                    break
                while True:
                    mode = link.mode
                    if mode == "half_open" and direction == _DOWN:
                        connection.lost_bytes = True
                        link.dropped_bytes += len(data)
                        data = b""
                        break
                    if mode == "stall" or mode == "cut":
                        await link._wait_change()
                        continue
                    if mode == "slow" and link.delay > 0:
                        await trio.sleep(link.delay)
                    break
                if data:
                    await sink.send_all(data)
                    link.forwarded_bytes += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise
        # One side is done: so is the connection (ZeroMQ never half-closes).
        nursery.cancel_scope.cancel()

    async def _wait_open(self) -> None:
        """Do not even read while stalled: the bytes wait in the kernel, TCP pushes back."""
        while self.link.mode in ("stall", "cut"):
            await self.link._wait_change()
