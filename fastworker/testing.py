"""Helpers for testing code that uses fastworker: an embedded cluster, and a pytest fixture.

``with fastworker.testing.cluster(tasks=[add]) as c:`` runs a whole cluster
in a background thread on random loopback ports; point a ``Client`` at
``c.discovery_address``.  Under trio, use ``async with fastworker.Cluster(...)``
directly instead (no thread).

The pytest plugin (installed with fastworker) provides the
``fastworker_cluster`` fixture; override the ``fastworker_tasks`` fixture to
choose which task functions it serves.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Iterable
from typing import Any

from .cluster import ClusterThread

__all__ = ["ClusterThread", "cluster", "free_loopback_port"]


def cluster(
    task_modules: Iterable[str] = (),
    tasks: Iterable[Callable[..., Any]] = (),
    **options: Any,
) -> ClusterThread:
    """A thread-backed embedded cluster; use it as a context manager."""
    return ClusterThread(task_modules, tasks, **options)


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_loopback_port() -> int:
    """A loopback port that was free a moment ago, below the ephemeral range.

    For a control plane bound some time after the port was chosen (started
    late, or restarting).  A port taken with ``bind(port 0)`` comes from the
    ephemeral range, where every other ``bind`` to port 0 (any ``tcp://…:*``
    endpoint of any test or process) draws too: one of them can get the same
    number meanwhile, and the late bind fails with "address in use" (CI, once).
    The kernel never hands out ports below that range by itself.
    """
    top = _ephemeral_start()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, top - 12000), top)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")
