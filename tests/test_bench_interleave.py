"""``latency`` and ``floor`` measured together alternate blocks, so each ratio compares one moment.

The cluster, the client and the floor's processes are replaced by recorders:
what is checked is the order of the blocks and which times end up in which
figures, the part an end-to-end run cannot see.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from fastworker.bench import _scenarios
from fastworker.bench._cluster import Cluster, Context
from fastworker.bench._measure import Workload
from fastworker.bench._options import INTERLEAVE_BLOCK, Options
from fastworker.bench._progress import Progress
from fastworker.bench._rss import RssPeaks

pytestmark = pytest.mark.timeout(30)

# Seconds each side reports per round trip: which figures they land in tells them apart.
_OURS, _DIRECT, _THREAD = 0.003, 0.001, 0.002


class _Recorder:
    def __init__(self) -> None:
        self.blocks: list[tuple[str, int]] = []

    async def ours(self, client: object, work: object, count: int, tally: object) -> list[float]:
        self.blocks.append(("ours", count))
        return [_OURS] * count

    async def round_trips(self, variant: str, count: int) -> list[float]:
        """The floor session's: a block of ``variant``."""
        self.blocks.append((variant, count))
        return [_DIRECT if variant == "direct" else _THREAD] * count


class _NoRss:
    def __init__(self, cp_pid: int | None) -> None:
        pass

    def __enter__(self) -> _NoRss:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def watch_workers(self, pids: Iterable[int]) -> None:
        pass

    def peaks(self) -> RssPeaks:
        return RssPeaks(None, None)


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    recorder = _Recorder()

    @asynccontextmanager
    async def connected(ctx: Any, cluster: Any, *, capacity: int) -> AsyncIterator[Any]:
        yield object(), []

    @asynccontextmanager
    async def floor_session(pids: set[int]) -> AsyncIterator[Any]:
        yield recorder

    monkeypatch.setattr(_scenarios, "connected", connected)
    monkeypatch.setattr(_scenarios, "floor_session", floor_session)
    monkeypatch.setattr(_scenarios, "round_trips", recorder.ours)
    monkeypatch.setattr(_scenarios, "RssSampler", _NoRss)
    return recorder


def _run(count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = Context(
        options=Options(latency_count=count),
        progress=Progress(enabled=False),
        workload=Workload("add"),
        shared=Cluster("tcp://127.0.0.1:5550"),
    )
    return asyncio.run(_scenarios.latency_with_floor(ctx))


def test_each_block_of_ours_is_followed_by_a_block_of_each_floor_variant(
    recorder: _Recorder,
) -> None:
    count = 2 * INTERLEAVE_BLOCK + 37  # a short last block too
    ours, floor = _run(count)

    sizes = [INTERLEAVE_BLOCK, INTERLEAVE_BLOCK, 37]
    assert recorder.blocks == [
        block for size in sizes for block in (("ours", size), ("direct", size), ("thread", size))
    ]
    assert ours["tasks"] == count
    assert ours["p50_ms"] == pytest.approx(_OURS * 1e3)
    assert floor["round_trips"] == count
    assert floor["p50_ms"] == pytest.approx(_DIRECT * 1e3)
    assert floor["thread_p50_ms"] == pytest.approx(_THREAD * 1e3)
