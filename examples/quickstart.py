"""The whole thing in one process: start an embedded cluster, submit tasks, print results.

Run it as is: ``python examples/quickstart.py``.  It prints the address of the live
dashboard (``pip install -e '.[dashboard]'``); ``--keep`` keeps the cluster running after the
examples until Ctrl-C, to look at it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading

# Make `examples.tasks` importable when run from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastworker import Client, TaskPriority, TaskStatus
from fastworker.testing import cluster


async def main(discovery_address: str) -> None:
    client = Client(discovery_address=discovery_address)
    await client.start()

    # Non-blocking: an id at once, the result later.
    task_id = await client.delay("add", 2, 3, priority="high")
    print(f"Task ID: {task_id}")

    # Blocking: wait for the result.
    result = await client.submit_task(
        task_name="fetch_greeting", args=("world",), priority=TaskPriority.NORMAL
    )
    if result.status == TaskStatus.SUCCESS:
        print(f"Result: {result.result}")
    else:
        print(f"Error: {result.error}")

    # Many at once, then wait for all of them.
    ids = [await client.delay("slow_double", i) for i in range(10)]
    await client.join(timeout=30)
    print("Doubled:", [client.get_result(i).result for i in ids])  # type: ignore[union-attr]

    cached = await client.get_task_result(task_id)
    print(f"add(2, 3) from the control plane's cache: {cached.result if cached else None}")
    client.stop()


if __name__ == "__main__":
    with cluster(task_modules=["examples.tasks"], workers=2, http_address="127.0.0.1:0") as running:
        print(f"Embedded cluster up; discovery at {running.discovery_address}")
        print(f"Dashboard and /metrics at {running.http_url}")
        asyncio.run(main(running.discovery_address))
        if "--keep" in sys.argv[1:]:
            print("Running until Ctrl-C.", flush=True)
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass
    print("Done.")
