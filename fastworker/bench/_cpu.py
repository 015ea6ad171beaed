"""CPU time of the control plane, from ``/proc/<pid>/stat``: the cost of a feature on a shared
machine, where wall-clock throughput moves with everybody else's load and CPU time much less.

None where there is no ``/proc`` or the process is not ours, never a guess (as ``_rss``).
"""

from __future__ import annotations

import os

__all__ = ["read_cpu_seconds"]


def read_cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds ``pid`` has used so far; None when unreadable.

    Counted in clock ticks (usually 10 ms): meaningful over runs of seconds.
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # The command name (field 2) may hold spaces: fields count from its ")".
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
