"""Task callbacks: get a completion notice pushed to a socket you bind.

Start an embedded cluster, bind a PULL socket, submit a task with
``delay_with_callback`` and print the document the control plane pushes to
that socket when the task finishes.

Run it as is: ``python examples/callbacks.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import zmq

# Make `examples.tasks` importable when run from anywhere.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastworker import Client
from fastworker.testing import cluster


async def submit(discovery_address: str, callback_address: str) -> str:
    # `async with` starts the client, and on the way out waits until the control
    # plane holds every submitted task, then stops it.
    async with Client(discovery_address=discovery_address) as client:
        task_id = await client.delay_with_callback(
            "process_data",
            {"order": 42, "items": ["apple", "pear"]},  # the task's arguments, then:
            callback_address=callback_address,
            callback_data={"source": "my_app", "user_id": 123},
        )
        print(f"Task ID: {task_id}")
    return task_id


def main() -> None:
    context = zmq.Context.instance()
    receiver = context.socket(zmq.PULL)
    receiver.setsockopt(zmq.LINGER, 0)
    receiver.setsockopt(zmq.RCVTIMEO, 30_000)  # milliseconds; a missing callback fails loudly
    port = receiver.bind_to_random_port("tcp://127.0.0.1")
    callback_address = f"tcp://127.0.0.1:{port}"
    print(f"Listening for callbacks on {callback_address}")
    try:
        with cluster(task_modules=["examples.tasks"]) as running:
            task_id = asyncio.run(submit(running.discovery_address, callback_address))
            payload = json.loads(receiver.recv())
    finally:
        receiver.close()
    if payload["task_id"] != task_id:
        raise SystemExit(f"callback for an unexpected task: {payload}")
    print("Callback received:", json.dumps(payload, sort_keys=True))


if __name__ == "__main__":
    main()
