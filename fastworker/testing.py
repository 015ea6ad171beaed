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

    For a control plane that peers connect to before it listens (started late,
    or restarting).  A port in the ephemeral range can then be taken by
    the connecting socket itself: the kernel picks the same number as its
    source port and the connection opens to itself (TCP simultaneous open),
    and the late bind fails with "address in use" (seen once in CI, and as
    "a restarted Scheduler can fail to bind its port" in the fault campaign).
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
