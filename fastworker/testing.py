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

from collections.abc import Callable, Iterable
from typing import Any

from .cluster import ClusterThread

__all__ = ["ClusterThread", "cluster"]


def cluster(
    task_modules: Iterable[str] = (),
    tasks: Iterable[Callable[..., Any]] = (),
    **options: Any,
) -> ClusterThread:
    """A thread-backed embedded cluster; use it as a context manager."""
    return ClusterThread(task_modules, tasks, **options)
