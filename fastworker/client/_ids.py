"""Task ids: 128 independent random bits each, so one id reveals nothing about another.

An id is a capability: whoever knows it can query or cancel the task.  Ids
are 32 lowercase hex digits from ``os.urandom`` (the operating system's
CSPRNG), drawn 256 at a time because one system call per id was half of
their cost (design/performance.md has the figures).  A forked child drops
the ids it inherited, or parent and child would hand out the same ones.
"""

from __future__ import annotations

import os

__all__ = ["new_task_id"]

_BATCH = 256
_pool: list[str] = []


def _refill() -> None:
    text = os.urandom(16 * _BATCH).hex()
    _pool.extend([text[i : i + 32] for i in range(0, 32 * _BATCH, 32)])


def new_task_id() -> str:
    """A fresh task id; safe from any thread (the GIL makes ``pop`` atomic)."""
    while True:
        try:
            return _pool.pop()
        except IndexError:
            _refill()


os.register_at_fork(after_in_child=_pool.clear)
