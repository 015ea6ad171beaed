"""The whole cluster in one trio run: for tests, notebooks and the quickstart.

``async with Cluster(tasks=[add]) as cluster:`` runs Discovery, the control
plane and ``workers`` worker actors in the current process, on random
loopback ports, and returns once every worker has registered: a task
submitted right after ``__aenter__`` has somewhere to run.  Everything goes
over real ZeroMQ sockets, exactly as between processes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import trio

from .control import ControlPlane, ControlPlaneConfig
from .tasks.registry import TaskRegistry, registry_from
from .transport import CurveKeys, TransportConfig
from .worker import Worker, WorkerConfig

__all__ = ["Cluster", "ClusterThread"]


class Cluster:
    """An embedded cluster; see the module docstring.

    ``control_plane`` takes any ControlPlaneConfig field (``result_ttl``,
    ``heartbeat_interval``, ``max_queued`` …) as a keyword argument; with
    ``curve`` (the control plane's CurveKeys) and ``client_keys_dir``, every
    socket uses CURVE and the embedded workers get a key of their own.
    ``allow_pickle`` applies to the workers: the control plane never decodes
    a payload, so it has no such switch.
    """

    def __init__(
        self,
        task_modules: Iterable[str] = (),
        tasks: Iterable[Callable[..., Any]] = (),
        *,
        workers: int = 1,
        concurrency: int = 8,
        prefetch: int | None = None,
        discovery_address: str = "tcp://127.0.0.1:*",
        allow_pickle: bool = False,
        **control_plane: Any,
    ) -> None:
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.registry: TaskRegistry = registry_from(task_modules, tasks)
        curve: CurveKeys | None = control_plane.get("curve")
        # With CURVE, the embedded workers get a key pair of their own, trusted
        # by this control plane only (as a --role all node's worker processes).
        worker_keys = CurveKeys.generate() if curve is not None else None
        if worker_keys is not None:
            own = frozenset(control_plane.get("own_worker_keys", ()))
            control_plane["own_worker_keys"] = own | {worker_keys.public}
        self.control_plane = ControlPlane(
            ControlPlaneConfig(discovery_address=discovery_address, **control_plane)
        )
        self._worker_count = workers
        self._worker_options: dict[str, Any] = {
            "concurrency": concurrency,
            "prefetch": prefetch,
            "allow_pickle": allow_pickle,
            "heartbeat_interval": self.control_plane.config.heartbeat_interval,
        }
        if curve is not None:
            self._worker_options["transport"] = TransportConfig(
                curve=worker_keys, curve_server_key=curve.public
            )
        self.workers: list[Worker] = []
        self._stack: contextlib.AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def discovery_address(self) -> str:
        return self.control_plane.discovery_address

    @property
    def http_url(self) -> str | None:
        """The dashboard's ``http://host:port`` when started with ``http_address=``."""
        return self.control_plane.http_url

    async def __aenter__(self) -> Cluster:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)
            await self._nursery.start(self.control_plane.run)
            for _ in range(self._worker_count):
                await self.add_worker()
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def add_worker(self, **options: Any) -> Worker:
        """Start one more worker actor and return once it has registered."""
        assert self._nursery is not None, "the cluster is not running"
        config = WorkerConfig(
            discovery_address=self.discovery_address, **{**self._worker_options, **options}
        )
        worker = Worker(self.registry, config)
        with trio.fail_after(10):
            await self._nursery.start(worker.serve)  # started: registered
        self.workers.append(worker)
        return worker

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def stats(self) -> dict[str, Any]:
        return await self.control_plane.stats()


class ClusterThread:
    """A Cluster running in a background thread, for asyncio and plain synchronous code.

    ``with ClusterThread(tasks=[add]) as cluster:`` returns once the cluster
    is ready; leaving the block stops it and joins the thread.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._kwargs = kwargs
        self.cluster: Cluster | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def discovery_address(self) -> str:
        assert self.cluster is not None, "the cluster is not running"
        return self.cluster.discovery_address

    @property
    def http_url(self) -> str | None:
        assert self.cluster is not None, "the cluster is not running"
        return self.cluster.http_url

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                self._scope = scope
                async with Cluster(*self._args, **self._kwargs) as cluster:
                    self.cluster = cluster
                    self._ready.set()
                    await trio.sleep_forever()

        try:
            trio.run(main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 30.0) -> ClusterThread:
        self._thread = threading.Thread(target=self._main, name="fastworker-cluster", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the embedded cluster did not start within {timeout:g} s")
        if self._error is not None:
            raise RuntimeError("the embedded cluster failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._token is not None and self._scope is not None:
            scope = self._scope
            try:
                self._token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """The control plane's statistics, fetched from the cluster's thread."""
        assert self._token is not None
        assert self.cluster is not None
        cluster = self.cluster
        return trio.from_thread.run(cluster.stats, trio_token=self._token)

    def __enter__(self) -> ClusterThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
