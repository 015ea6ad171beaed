"""pytest plugin registered through the ``pytest11`` entry point.

Fixtures:

* ``fastworker_tasks`` — the task functions the cluster serves; override it.
* ``fastworker_cluster`` — a running embedded cluster (thread-backed, so it
  works for sync, asyncio and trio tests alike) with ``discovery_address``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .cluster import ClusterThread


@pytest.fixture
def fastworker_tasks() -> list[Callable[..., Any]]:
    """Override to list the task functions ``fastworker_cluster`` serves."""
    return []


@pytest.fixture
def fastworker_cluster(fastworker_tasks: list[Callable[..., Any]]) -> Iterator[ClusterThread]:
    with ClusterThread(tasks=fastworker_tasks, workers=1) as running:
        yield running
