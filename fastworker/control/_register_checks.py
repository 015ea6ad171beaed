"""What a Register may ask the control plane to hold, and to write in its logs.

Discovery keeps every registered worker's task names until it leaves or
dies, and a worker key may register up to ``max_workers`` ids: counts alone
let one key make the control plane hold ~8 MiB per Register (issue #12).
So the names are also bounded in bytes, per Register and over all members.

A worker id becomes a ZeroMQ routing id (at most 255 bytes, not starting
with a NUL, which libzmq reserves) and a word in log lines: an id or host
name with control characters could forge log lines, so both are refused.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "MAX_HOSTNAME_BYTES",
    "MAX_NAMES_COST",
    "MAX_TOTAL_NAMES_COST",
    "MAX_WORKER_ID_BYTES",
    "bad_hostname",
    "bad_worker_id",
    "names_cost",
]

# What one name costs us beyond its UTF-8 bytes: a str object and a set slot.
_NAME_OVERHEAD = 96
# Per Register: ~10 000 names of ~10 characters, or fewer longer ones.
MAX_NAMES_COST = 1 << 20
# Over all registered workers.
MAX_TOTAL_NAMES_COST = 64 << 20
# A routing id's limit in libzmq.
MAX_WORKER_ID_BYTES = 255
MAX_HOSTNAME_BYTES = 255


def names_cost(names: Iterable[str]) -> int:
    """Bytes the control plane holds for ``names`` (UTF-8 plus a per-object estimate)."""
    return sum(len(name.encode("utf-8", "surrogatepass")) + _NAME_OVERHEAD for name in names)


def bad_worker_id(worker_id: str) -> str | None:
    """Why ``worker_id`` cannot be a worker's id; None when it can."""
    if not worker_id:
        return "a worker id must not be empty"
    if len(worker_id.encode("utf-8", "surrogatepass")) > MAX_WORKER_ID_BYTES:
        return f"a worker id must be at most {MAX_WORKER_ID_BYTES} UTF-8 bytes"
    if worker_id[0] == "\0":
        return "a worker id must not start with a NUL (libzmq reserves such routing ids)"
    # isprintable refuses control, format (bidi overrides) and line-separator characters.
    if not worker_id.isprintable():
        return "a worker id must not contain control characters"
    return None


def bad_hostname(hostname: str) -> str | None:
    """Why ``hostname`` is refused in a Register; None when it is fine."""
    if len(hostname.encode("utf-8", "surrogatepass")) > MAX_HOSTNAME_BYTES:
        return f"a hostname must be at most {MAX_HOSTNAME_BYTES} UTF-8 bytes"
    if not hostname.isprintable():
        return "a hostname must not contain control characters"
    return None
