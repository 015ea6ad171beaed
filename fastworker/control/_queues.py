"""Four strict-priority queues, FIFO within a priority, routed by task name.

Tasks are kept in one deque per (priority, task name) so that a worker is only
offered names it serves without scanning past tasks it cannot run; FIFO
across names within a priority is kept by comparing the heads' sequence
numbers.  Cancelled tasks are left in place and skipped when they reach the
head (removing from the middle of a deque is O(n)).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Generic, Protocol, TypeVar

__all__ = ["PriorityQueues", "QueueItem"]


class QueueItem(Protocol):
    seq: int

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...


T = TypeVar("T", bound=QueueItem)


class PriorityQueues(Generic[T]):
    def __init__(self, is_live: Callable[[T], bool]) -> None:
        self._levels: list[dict[str, deque[T]]] = [{}, {}, {}, {}]
        self._is_live = is_live
        self._counts = [0, 0, 0, 0]  # live items per priority

    def push(self, item: T) -> None:
        level = self._levels[item.priority]
        queue = level.get(item.name)
        if queue is None:
            queue = level[item.name] = deque()
        queue.append(item)
        self._counts[item.priority] += 1

    def push_front(self, items: Iterable[T]) -> None:
        """Put items back ahead of everything else of their priority and name, oldest first."""
        for item in sorted(items, key=lambda i: i.seq, reverse=True):
            level = self._levels[item.priority]
            queue = level.get(item.name)
            if queue is None:
                queue = level[item.name] = deque()
            queue.appendleft(item)
            self._counts[item.priority] += 1

    def discard(self, item: T) -> None:
        """Account for an item that stopped being live while queued (cancelled)."""
        self._counts[item.priority] -= 1

    def pop_for(self, names: Collection[str] | None) -> T | None:
        """The oldest live item of the highest priority whose name is in ``names``.

        ``names`` None means any name.
        """
        is_live = self._is_live
        for priority, level in enumerate(self._levels):
            if not self._counts[priority]:
                continue
            best: deque[T] | None = None
            best_seq = 0
            for name, queue in level.items():
                if names is not None and name not in names:
                    continue
                while queue and not is_live(queue[0]):
                    queue.popleft()
                if queue and (best is None or queue[0].seq < best_seq):
                    best, best_seq = queue, queue[0].seq
            if best is not None:
                item = best.popleft()
                self._counts[priority] -= 1
                if not best:
                    del level[item.name]
                return item
        return None

    def pop_many(self, names: Collection[str] | None, limit: int) -> list[T]:
        """Up to ``limit`` items in dispatch order, for a worker serving ``names``.

        The common case — this worker serves every name waiting at a priority
        through a single queue — drains that deque in one loop instead of
        re-choosing the best head for every item.
        """
        out: list[T] = []
        is_live = self._is_live
        counts = self._counts
        for priority, level in enumerate(self._levels):
            while len(out) < limit and counts[priority]:
                mine = [(name, q) for name, q in level.items() if names is None or name in names]
                if not mine:
                    break
                if len(mine) == 1:
                    name, queue = mine[0]
                    while queue and len(out) < limit:
                        item = queue.popleft()
                        if is_live(item):
                            out.append(item)
                            counts[priority] -= 1
                    if not queue:
                        del level[name]
                    break
                chosen = self.pop_for(names)
                if chosen is None:
                    break
                out.append(chosen)
            if len(out) >= limit:
                break
        return out

    def take_names_except(self, keep: Collection[str]) -> list[T]:
        """Remove and return every live item whose name is not in ``keep``."""
        taken: list[T] = []
        is_live = self._is_live
        for priority, level in enumerate(self._levels):
            for name in [n for n in level if n not in keep]:
                for item in level.pop(name):
                    if is_live(item):
                        taken.append(item)
                        self._counts[priority] -= 1
        return taken

    def counts(self) -> list[int]:
        """Live queued items per priority, CRITICAL first."""
        return list(self._counts)

    def __len__(self) -> int:
        return sum(self._counts)
