"""The control plane: five actors under one supervisor, and the config that shapes them.

Supervision tree (one-for-one; see design/architecture.md)::

    control-plane
    ├── result-cache   (no socket)
    ├── callbacks      (one PUSH socket per callback address)
    ├── gateway        (client ROUTER)
    ├── scheduler      (worker ROUTER)
    ├── discovery      (discovery ROUTER, the address everybody knows)
    └── http           (only with http_address: /metrics, /api, the dashboard)

Discovery starts after the other sockets: by the time anybody can find the
control plane, every endpoint it hands out is bound.  The HTTP server starts
last and stops first; it asks the others for what it shows, like any actor.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..dashboard import HttpStartError, check_http_address
from ..dashboard._address import is_loopback
from ..runtime import Actor, Supervisor
from ..transport import DEFAULT_MAX_MESSAGE_SIZE, TransportConfig
from ._task_metrics import TaskMetrics
from ._taskbook import default_max_queued_bytes
from .callbacks import CallbackConfig, CallbackDispatcher
from .discovery import Discovery, DiscoveryConfig
from .gateway import Gateway, gather_stats
from .result_cache import ResultCache, ResultCacheConfig
from .scheduler import Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from ..dashboard._server import HttpServer

__all__ = ["ControlPlane", "ControlPlaneConfig", "sibling_address"]

DEFAULT_DISCOVERY_ADDRESS = "tcp://127.0.0.1:5550"


def sibling_address(address: str) -> str:
    """A random-port address on the same host as ``address`` (``tcp://h:p`` → ``tcp://h:*``)."""
    if not address.startswith("tcp://") or ":" not in address[6:]:
        raise ValueError(
            f"cannot derive an endpoint from {address!r}: give the client and worker "
            "addresses explicitly for non-tcp transports"
        )
    host = address[6:].rsplit(":", 1)[0]
    return f"tcp://{host}:*"


@attrs.frozen
class ControlPlaneConfig:
    discovery_address: str = DEFAULT_DISCOVERY_ADDRESS
    client_address: str | None = None  # default: discovery host, random port
    worker_address: str | None = None  # default: discovery host, random port
    # What Discovery tells clients and workers to connect to, when it is not
    # the bound endpoint (a proxy, NAT, or the fault campaign's TCP proxies).
    advertise_client_address: str | None = None
    advertise_worker_address: str | None = None
    result_ttl: float = 3600.0
    result_cache_size: int = 10_000
    heartbeat_interval: float = 1.0
    liveness: int = 3
    max_queued: int = 1_000_000
    max_queued_bytes: int = attrs.field(factory=default_max_queued_bytes)
    max_worker_deaths: int = 3
    unknown_task_grace: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    callback_timeout: float = 10.0
    allow_pickle: bool = False
    # HOST:PORT for /metrics, /api and the dashboard (fastworker[dashboard]); None: off.
    http_address: str | None = None
    # Allows a non-loopback http_address (the dashboard has no authentication).
    insecure: bool = False

    def __attrs_post_init__(self) -> None:
        if self.http_address is not None:
            check_http_address(self.http_address, insecure=self.insecure)


class ControlPlane:
    """Builds and runs the control plane's supervision tree in the current trio run."""

    def __init__(self, config: ControlPlaneConfig | None = None) -> None:
        cfg = config or ControlPlaneConfig()
        self.config = cfg
        self.instance_id = uuid.uuid4().hex
        transport = TransportConfig(max_message_size=cfg.max_message_size)
        self.results = ResultCache(
            ResultCacheConfig(
                cfg.result_ttl, cfg.result_cache_size, max_message_size=cfg.max_message_size
            )
        )
        self.callbacks = CallbackDispatcher(
            CallbackConfig(delivery_timeout=cfg.callback_timeout, transport=transport)
        )
        self.gateway = Gateway(
            cfg.client_address or sibling_address(cfg.discovery_address),
            transport,
            results=self.results.ref,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                worker_address=cfg.worker_address or sibling_address(cfg.discovery_address),
                max_queued=cfg.max_queued,
                max_queued_bytes=cfg.max_queued_bytes,
                max_worker_deaths=cfg.max_worker_deaths,
                unknown_task_grace=cfg.unknown_task_grace,
                allow_pickle=cfg.allow_pickle,
                transport=transport,
            ),
            gateway=self.gateway.ref,
            results=self.results.ref,
            callbacks=self.callbacks.ref,
            metrics=TaskMetrics() if cfg.http_address is not None else None,
        )
        # The gateway and the scheduler talk both ways: wire the second direction.
        self.gateway.scheduler = self.scheduler.ref
        self.results.gateway = self.gateway.ref
        self.discovery = Discovery(
            DiscoveryConfig(
                address=cfg.discovery_address,
                heartbeat_interval=cfg.heartbeat_interval,
                liveness=cfg.liveness,
                transport=transport,
            ),
            instance_id=self.instance_id,
            scheduler=self.scheduler.ref,
            endpoints=self._endpoints,
        )
        self.gateway.stats_sources = [
            self.scheduler.ref,
            self.results.ref,
            self.callbacks.ref,
            self.discovery.ref,
        ]
        children: list[Actor] = [
            self.results,
            self.callbacks,
            self.gateway,
            self.scheduler,
            self.discovery,
        ]
        self.http: HttpServer | None = None
        if cfg.http_address is not None:
            self.http = self._http_server(cfg.http_address)
            children.append(self.http)
        self.supervisor = Supervisor("control-plane", children)

    def _http_server(self, address: str) -> HttpServer:
        try:
            from ..dashboard._server import HttpServer
            from ..dashboard._view import ControlPlaneView
        except ImportError as exc:
            raise HttpStartError(
                f"--http-address needs the dashboard extra ({exc.name} is missing): "
                "pip install 'fastworker[dashboard]'"
            ) from exc
        host, port = check_http_address(address, insecure=self.config.insecure)
        view = ControlPlaneView(
            scheduler=self.scheduler.ref,
            results=self.results.ref,
            callbacks=self.callbacks.ref,
            discovery=self.discovery.ref,
            gateway=self.gateway.ref,
        )
        # Bound to loopback, it answers loopback Host names only (DNS rebinding).
        return HttpServer(host, port, view, loopback_only=is_loopback(host))

    def _endpoints(self) -> tuple[str, str]:
        assert self.gateway.endpoint is not None
        assert self.scheduler.endpoint is not None
        cfg = self.config
        return (
            cfg.advertise_client_address or self.gateway.endpoint,
            cfg.advertise_worker_address or self.scheduler.endpoint,
        )

    @property
    def discovery_address(self) -> str:
        """The bound discovery endpoint (with the real port when ``*`` was asked for)."""
        if self.discovery.endpoint is None:
            raise RuntimeError("the control plane is not started yet")
        return self.discovery.endpoint

    @property
    def http_url(self) -> str | None:
        """``http://host:port`` of the dashboard once started; None when not served."""
        return None if self.http is None else self.http.url

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.supervisor.run(task_status=task_status)

    def stop(self) -> None:
        self.supervisor.stop()

    async def stats(self) -> dict[str, Any]:
        return await gather_stats(
            [
                self.scheduler.ref,
                self.results.ref,
                self.callbacks.ref,
                self.discovery.ref,
                self.gateway.ref,
            ]
        )
