"""The worker's one heap of time limits: due entries fire in order, ended runs leave nothing."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from fastworker.worker._deadlines import Deadlines

pytestmark = pytest.mark.timeout(10)


async def test_entries_fire_at_their_time_in_order_and_disarmed_ones_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fired: list[tuple[Any, int, float]] = []
    deadlines = Deadlines(lambda run, stage: fired.append((run, stage, trio.current_time())))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deadlines.serve)
        start = trio.current_time()
        deadlines.arm(start + 30, "late", 1)
        await trio.sleep(1)
        deadlines.arm(start + 5, "early", 0)  # earlier than the one being waited for
        gone = deadlines.arm(start + 10, "ended", 0)
        deadlines.disarm(gone)
        assert deadlines.armed == 2
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert [(run, stage, at - start) for run, stage, at in fired] == [
        ("early", 0, 5.0),
        ("late", 1, 30.0),
    ]
    assert deadlines.armed == 0


def test_disarmed_entries_release_their_run_at_once_and_are_pruned() -> None:
    class Run:
        pass

    deadlines = Deadlines(lambda run, stage: None)
    runs = [Run() for _ in range(10_000)]
    entries = [deadlines.arm(3600.0 + i, run, 0) for i, run in enumerate(runs)]
    for entry in entries:
        deadlines.disarm(entry)
        assert entry[2] is None  # the run (and its arguments) is no longer held
    assert deadlines.armed == 0
    assert len(deadlines._heap) <= 1024 + 1  # dead entries are pruned, not kept for an hour
