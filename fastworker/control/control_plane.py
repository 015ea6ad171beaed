"""The control plane: its actors under one supervisor, and the config that shapes them.

Supervision tree (one-for-one; see design/architecture.md)::

    control-plane
    ├── zap            (the ZAP handler's inproc ROUTER; only with CURVE)
    ├── journal        (the SQLite file, with --journal; writes in a thread)
    ├── result-cache   (no socket)
    ├── callbacks      (one PUSH socket per callback address)
    ├── gateway        (client ROUTER)
    ├── scheduler      (worker ROUTER)
    ├── discovery      (discovery ROUTER, the address everybody knows)
    └── http           (only with http_address: /metrics, /api, the dashboard)

Discovery starts after the other sockets: by the time anybody can find the
control plane, every endpoint it hands out is bound.  The journal starts first and stops last, and
it is read (replayed into the Scheduler and the ResultCache) before anything
starts (design/durability.md).  The HTTP server starts last and stops first; it
asks the others for what it shows, like any actor.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio
import zmq

from .._callback_allow import DEFAULT_CALLBACK_ALLOW
from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from ..dashboard import HttpStartError, check_http_address
from ..dashboard._address import is_loopback
from ..runtime import Actor, Supervisor
from ..security import KeyRing, ReloadKeys, ZapHandler
from ..transport import DEFAULT_MAX_MESSAGE_SIZE, CurveKeys, TransportConfig
from ._internal import EvictRevoked
from ._task_metrics import TaskMetrics
from ._taskbook import default_max_queued_bytes
from .callbacks import CallbackConfig, CallbackDispatcher
from .discovery import Discovery, DiscoveryConfig
from .gateway import Gateway, gather_stats
from .journal import Journal, JournalConfig
from .result_cache import ResultCache, ResultCacheConfig, default_result_cache_bytes
from .scheduler import Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from ..dashboard._server import HttpServer

__all__ = ["ControlPlane", "ControlPlaneConfig", "sibling_address"]

log = logging.getLogger("fastworker.control")


def sibling_address(address: str) -> str:
    """A random-port address on the same host as ``address`` (``tcp://h:p`` → ``tcp://h:*``)."""
    if not address.startswith("tcp://") or ":" not in address[6:]:
        raise ValueError(
            f"cannot derive an endpoint from {address!r}: give the client and worker "
            "addresses explicitly for non-tcp transports"
        )
    host = address[6:].rsplit(":", 1)[0]
    return f"tcp://{host}:*"


def _patterns(patterns: Iterable[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise TypeError("callback_allow takes a sequence of patterns, not one string")
    return tuple(patterns)


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
    result_cache_bytes: int = attrs.field(factory=default_result_cache_bytes)
    heartbeat_interval: float = 1.0
    liveness: int = 3
    max_queued: int = 1_000_000
    max_queued_bytes: int = attrs.field(factory=default_max_queued_bytes)
    max_worker_deaths: int = 3
    unknown_task_grace: float = 5.0
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    callback_timeout: float = 10.0
    # CURVE: the control plane's own key pair turns it on for every socket it
    # binds; the directories hold the public certificates allowed per role.
    curve: CurveKeys | None = None
    client_keys_dir: str | os.PathLike[str] | None = None
    worker_keys_dir: str | os.PathLike[str] | None = None
    own_worker_keys: frozenset[bytes] = frozenset()  # the node's own worker processes
    journal: str | None = None  # path of the SQLite journal; None: state in memory only
    journal_sync: str = "normal"  # "full": an fsync per commit, for power-loss safety
    # HOST:PORT for /metrics, /api and the dashboard (fastworker[dashboard]); None: off.
    http_address: str | None = None
    # Allows a non-loopback http_address (the dashboard has no authentication).
    insecure: bool = False

    # Callback addresses the control plane may connect to (_callback_allow.py).
    callback_allow: tuple[str, ...] = attrs.field(
        default=DEFAULT_CALLBACK_ALLOW, converter=_patterns
    )

    def __attrs_post_init__(self) -> None:
        if self.http_address is not None:
            check_http_address(self.http_address, insecure=self.insecure)


class ControlPlane:
    """Builds and runs the control plane's supervision tree in the current trio run."""

    def __init__(self, config: ControlPlaneConfig | None = None) -> None:
        cfg = config or ControlPlaneConfig()
        self.config = cfg
        self.instance_id = uuid.uuid4().hex
        # Documents other state keepers wrote with JournalQueue.put_state, as replayed.
        self.recovered_state: dict[str, Any] = {}
        self.keys: KeyRing | None = None
        self.zap: ZapHandler | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        if cfg.curve is not None:
            # Raises CertificateError for a missing or unreadable directory: at start.
            self.keys = KeyRing(
                cfg.client_keys_dir, cfg.worker_keys_dir, own_workers=cfg.own_worker_keys
            )
            self._context = zmq.Context()
            self.zap = ZapHandler(self.keys, self._context)
        transport = TransportConfig(
            max_message_size=cfg.max_message_size, curve=cfg.curve, context=self._context
        )
        self.results = ResultCache(
            ResultCacheConfig(
                cfg.result_ttl,
                cfg.result_cache_size,
                max_message_size=cfg.max_message_size,
                max_bytes=cfg.result_cache_bytes,
            )
        )
        self.callbacks = CallbackDispatcher(
            CallbackConfig(
                delivery_timeout=cfg.callback_timeout,
                transport=transport,
                allow=cfg.callback_allow,
            )
        )
        self.gateway = Gateway(
            cfg.client_address or sibling_address(cfg.discovery_address),
            transport,
            results=self.results.ref,
            keys=self.keys,
        )
        self.journal: Journal | None = None
        if cfg.journal is not None:
            self.journal = Journal(
                JournalConfig(
                    cfg.journal,
                    sync=cfg.journal_sync,
                    max_results=cfg.result_cache_size,
                    result_ttl=cfg.result_ttl,
                ),
                gateway=self.gateway.ref,
            )
        self.scheduler = Scheduler(
            SchedulerConfig(
                worker_address=cfg.worker_address or sibling_address(cfg.discovery_address),
                max_queued=cfg.max_queued,
                max_queued_bytes=cfg.max_queued_bytes,
                max_worker_deaths=cfg.max_worker_deaths,
                unknown_task_grace=cfg.unknown_task_grace,
                transport=transport,
            ),
            gateway=self.gateway.ref,
            results=self.results.ref,
            callbacks=self.callbacks.ref,
            keys=self.keys,
            journal=None if self.journal is None else self.journal.queue,
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
            keys=self.keys,
        )
        self.scheduler.discovery = self.discovery.ref  # evictions of hijacked workers
        self.gateway.stats_sources = [
            self.scheduler.ref,
            self.results.ref,
            self.callbacks.ref,
            self.discovery.ref,
        ]
        if self.zap is not None:
            self.gateway.stats_sources.append(self.zap.ref)
        actors: list[Actor] = [
            self.results,
            self.callbacks,
            self.gateway,
            self.scheduler,
            self.discovery,
        ]
        if self.journal is not None:
            # First to start, last but the ZAP handler to stop: it commits what
            # the Scheduler queued before it stopped.
            self.gateway.stats_sources.append(self.journal.ref)
            actors.insert(0, self.journal)
        if self.zap is not None:
            # The ZAP handler starts first and stops last: no CURVE socket is ever
            # bound without it (and one that were would refuse every handshake).
            actors.insert(0, self.zap)
        self.http: HttpServer | None = None
        if cfg.http_address is not None:
            self.http = self._http_server(cfg.http_address)
            actors.append(self.http)
        self.supervisor = Supervisor("control-plane", actors)

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
            extra=[part.ref for part in (self.zap, self.journal) if part is not None],
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
        """Replay the journal (if any), then run the actors until stopped.

        JournalError when the journal cannot be used: raised before anything
        is bound, so nobody meets a control plane without its state.
        """
        journal = self.journal
        try:
            if journal is not None:
                await self._replay(journal)
            await self.supervisor.run(task_status=task_status)
        finally:
            if journal is not None:
                journal.close()
            context, self._context = self._context, None
            if context is not None:
                # Every actor closed its sockets; term() lets what they still hold
                # (results pushed at shutdown) go out, bounded in case one was not.
                ender = threading.Thread(target=context.term, name="zmq-term", daemon=True)
                ender.start()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(ender.join, 2.0)

    async def _replay(self, journal: Journal) -> None:
        recovered = await journal.open()
        self.scheduler.restore(recovered)
        self.results.restore(recovered.results)
        self.recovered_state = recovered.state
        schedules, letters = len(self.scheduler.schedules), len(self.scheduler.dead_letters)
        if recovered.tasks or recovered.results or schedules or letters:
            log.info(
                "journal %s: %d unfinished tasks queued again, %d results, %d schedules and "
                "%d dead letters restored in %.2f s",
                journal.config.path,
                len(recovered.tasks),
                len(recovered.results),
                schedules,
                letters,
                recovered.seconds,
            )

    async def reload_keys(self) -> bool:
        """Read the certificate directories again (SIGHUP); False if they could not be read
        (the old keys stay in force) or CURVE is off."""
        if self.zap is None:
            return False
        if not await self.zap.ref.ask(ReloadKeys()):
            return False
        # Workers whose key went: no more tasks for them, theirs go back to the queue.
        self.discovery.ref.tell(EvictRevoked())
        return True

    def stop(self) -> None:
        self.supervisor.stop()

    async def stats(self) -> dict[str, Any]:
        sources = [
            self.scheduler.ref,
            self.results.ref,
            self.callbacks.ref,
            self.discovery.ref,
            self.gateway.ref,
        ]
        if self.journal is not None:
            sources.append(self.journal.ref)
        return await gather_stats(sources)
