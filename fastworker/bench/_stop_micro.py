"""How long ``Client.stop()`` holds the caller's event loop: the figures the README states.

A measurement, not a test (benchmarks are never asserted).  One node with a
worker process; for each loop (asyncio, trio) and each number of tasks just
submitted with ``delay`` (0, 10, 1 000, 10 000), a fresh client starts,
submits, and calls ``stop()``, which returns once the control plane has
acknowledged them all: the time it takes is how long the loop is held.
Seven rounds of each; the median and the range are printed.
``python -m fastworker.bench._stop_micro`` (README, "Use the Client").
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from collections.abc import Awaitable, Callable

import trio

from fastworker import Client

from ._nodes import start_node, stop_all
from ._tasks import ADD

COUNTS = (0, 10, 1_000, 10_000)
ROUNDS = 7


async def _one_stop(address: str, count: int) -> float:
    client = Client(address, timeout=30)
    await client.start()
    if count:
        await client.submit_task(ADD, (0, 0), timeout=30)  # connected before we time
    for i in range(count):
        await client.delay(ADD, i, i)
    started = time.perf_counter()
    client.stop()
    return time.perf_counter() - started


def _run(loop: str, main: Callable[[], Awaitable[float]]) -> float:
    if loop == "trio":
        return trio.run(main)
    return asyncio.run(main())  # type: ignore[arg-type]


def main() -> None:
    node = start_node("all", workers=1)
    try:
        print(f"stop() with tasks just submitted, {ROUNDS} rounds each (median, min-max):")
        for count in COUNTS:
            line = [f"{count:>6} tasks:"]
            for loop in ("asyncio", "trio"):
                times = sorted(
                    _run(loop, functools.partial(_one_stop, node.discovery_address, count))
                    for _ in range(ROUNDS)
                )
                line.append(
                    f"{loop} {statistics.median(times) * 1e3:.1f} ms "
                    f"({times[0] * 1e3:.1f}-{times[-1] * 1e3:.1f})"
                )
            print("  ".join(line))
    finally:
        stop_all()


if __name__ == "__main__":
    main()
