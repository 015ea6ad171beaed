"""Submitting a task exactly as the wire allows, past the Python client's call-site checks.

Our client refuses options it judges unreasonable (``retry_backoff=1e15``);
a client written in another language from design/protocol.md may still send
them, since the wire accepts any number from 0 to 10**15.  Workers must
survive such tasks, so their tests submit them this way.
"""

from __future__ import annotations

from typing import Any

from fastworker import Client
from fastworker.tasks.serializer import SerializationFormat, dumps


def submit_raw(
    client: Client, name: str, args: tuple[Any, ...] = (), options: dict[str, Any] | None = None
) -> str:
    """Queue one task with these wire options (NORMAL priority, JSON); its id."""
    payload = dumps(SerializationFormat.JSON, [list(args), {}])
    wire: list[Any] = ["", name, 2, 0, payload, options]
    (task_id,) = client._enqueue([("", wire)])
    return task_id
