"""The HTTP actor: Hypercorn's trio server running the dashboard app in the control plane's run.

It is the last child of the control plane's supervisor (started once every
other actor answers, stopped first).  A failure to bind at start is fatal, with
a message naming the address: the operator asked for the dashboard.  After
that the HTTP side can never take the control plane down: a server that
fails is logged and started again on the same port, with a growing pause,
from inside this actor's own helper task, so the supervisor never sees a crash
(its restart budget is the control plane's, not the dashboard's).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from ..runtime import Actor, GetStatistics
from ._address import HttpStartError
from ._app import LOOPBACK_HOSTS, build_app
from ._view import ControlPlaneView

__all__ = ["HttpServer"]

log = logging.getLogger("fastworker.http")

_FIRST_PAUSE = 0.5
_MAX_PAUSE = 30.0


class HttpServer(Actor):
    def __init__(
        self, host: str, port: int, view: ControlPlaneView, *, loopback_only: bool = True
    ) -> None:
        super().__init__("http", mailbox_size=4096)
        self.host = host
        self.port = port  # the bound one once started (a requested 0 becomes real)
        self.url: str | None = None
        hosts = (*LOOPBACK_HOSTS, host) if loopback_only else ("*",)
        self.view = view
        self._app = build_app(view, allowed_hosts=hosts)
        self._restarts = 0
        self._listener: socket.socket | None = None
        self._starts = 0  # servers that listened, restarts included
        self._started = trio.Event()

    def _config(self) -> Config:
        assert self._listener is not None
        config = Config()
        # Hypercorn serves (and in the end closes) a copy of our listening socket:
        # the port stays ours across restarts, and a bind error is raised here.
        config.bind = [f"fd://{os.dup(self._listener.fileno())}"]
        config.accesslog = None
        config.errorlog = log
        config.graceful_timeout = 1.0
        config.keep_alive_timeout = 30.0
        config.read_timeout = 30  # a client that sends nothing gives its connection back
        config.h11_max_incomplete_size = 64 * 1024
        config.include_server_header = False
        return config

    async def on_start(self, nursery: trio.Nursery) -> None:
        self._listener = self._listen()
        self.port = self._listener.getsockname()[1]
        binds: list[str] = await nursery.start(self._run)
        self.url = binds[0]
        log.info("dashboard and /metrics at %s", self.url)

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise HttpStartError(
                f"cannot serve HTTP at {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        return sock

    async def on_stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _serve_once(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await serve(self._app, self._config(), task_status=task_status, mode="asgi")  # type: ignore[arg-type]

    async def _run(self, *, task_status: trio.TaskStatus[list[str]]) -> None:
        """Serve; once started, whatever ends the server, serve again (never raise)."""
        pause = _FIRST_PAUSE
        started = False
        while True:
            began = trio.current_time()
            try:
                async with trio.open_nursery() as inner:
                    binds = await inner.start(self._serve_once)
                    self._starts += 1
                    self._started.set()
                    self._started = trio.Event()
                    if not started:
                        task_status.started(binds)
                        started = True
                log.warning("the HTTP server stopped by itself; starting it again in %g s", pause)
            except Exception:
                if not started:
                    raise
                log.exception("the HTTP server failed; starting it again in %g s", pause)
            self._restarts += 1
            if trio.current_time() - began > _MAX_PAUSE:
                pause = _FIRST_PAUSE  # it served well a while: a new failure starts afresh
            await trio.sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE)

    async def serving(self, count: int = 1) -> None:
        """Return once ``count`` servers in all have started listening (restarts count)."""
        while self._starts < count:
            await self._started.wait()

    def receive(self, message: Any) -> Any:
        if type(message) is GetStatistics:
            return {"url": self.url, "restarts": self._restarts}
        raise TypeError(f"http server got an unexpected message {message!r}")
