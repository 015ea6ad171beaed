"""A periodic task for the node test (``--task-modules tests.periodic_node_tasks``).

Each run leaves a marker file in ``$FASTWORKER_TEST_TICK_DIR`` (inherited
from the test through the node), so the test counts runs across processes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastworker import task


@task(cron="* * * * * *")
def periodic_node_tick() -> int:
    Path(os.environ["FASTWORKER_TEST_TICK_DIR"], f"{os.getpid()}-{time.monotonic_ns()}").touch()
    return os.getpid()
