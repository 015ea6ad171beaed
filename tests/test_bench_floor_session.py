"""The floor's processes kept up for blocks of round trips (the bench's interleaved latency run)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fastworker.bench._chain import floor_session
from fastworker.bench._options import BenchError

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def _alive(pids: set[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def test_a_session_times_blocks_of_each_variant_then_stops_its_three_processes() -> None:
    pids: set[int] = set()

    async def main() -> list[list[float]]:
        async with floor_session(pids) as floor:
            return [
                await floor.round_trips("thread", 20),
                await floor.round_trips("direct", 7),
                await floor.round_trips("thread", 1),
            ]

    blocks = asyncio.run(main())
    assert [len(block) for block in blocks] == [20, 7, 1]
    assert all(0 < seconds < 5 for block in blocks for seconds in block)
    assert len(pids) == 3  # the relay, the echo and the serving client
    if Path("/proc").is_dir():
        assert _alive(pids) == []


def test_a_block_the_client_cannot_run_fails_with_its_reason_and_stops_the_rest() -> None:
    pids: set[int] = set()

    async def main() -> None:
        async with floor_session(pids) as floor:
            await floor.round_trips("sideways", 3)

    with pytest.raises(BenchError, match="expected 'VARIANT COUNT'"):
        asyncio.run(main())
    if Path("/proc").is_dir():
        assert _alive(pids) == []
