"""Four strict-priority queues, FIFO within a priority, routed by task name.

Tasks are kept in one ordered map per (priority, task name), keyed by task id,
so that a worker is only offered names it serves without scanning past tasks
it cannot run, and so that a task leaving the queue early (cancelled, or
finished by a late report) is removed at once.  There are no dead entries to
skip: an item is in a queue exactly once or not at all, and the counts are
the sizes of the maps.  FIFO across names within a priority is kept by
comparing the heads' sequence numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["PriorityQueues", "QueueItem"]


class QueueItem(Protocol):
    seq: int

    @property
    def key(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...


T = TypeVar("T", bound=QueueItem)


class PriorityQueues(Generic[T]):
    def __init__(self) -> None:
        self._levels: list[dict[str, OrderedDict[str, T]]] = [{}, {}, {}, {}]
        self._counts = [0, 0, 0, 0]  # items per priority

    def _queue(self, item: T) -> OrderedDict[str, T]:
        level = self._levels[item.priority]
        queue = level.get(item.name)
        if queue is None:
            queue = level[item.name] = OrderedDict()
        return queue

    def push(self, item: T) -> None:
        queue = self._queue(item)
        if item.key in queue:
            raise ValueError(f"{item.key} is queued already")
        queue[item.key] = item
        self._counts[item.priority] += 1

    def push_front(self, items: Iterable[T]) -> None:
        """Put items back ahead of everything else of their priority and name, oldest first."""
        for item in sorted(items, key=lambda i: i.seq, reverse=True):
            queue = self._queue(item)
            if item.key in queue:
                raise ValueError(f"{item.key} is queued already")
            queue[item.key] = item
            queue.move_to_end(item.key, last=False)
            self._counts[item.priority] += 1

    def remove(self, item: T) -> bool:
        """Take ``item`` out wherever it stands; False when it was not queued."""
        level = self._levels[item.priority]
        queue = level.get(item.name)
        if queue is None or queue.pop(item.key, None) is None:
            return False
        self._counts[item.priority] -= 1
        if not queue:
            del level[item.name]
        return True

    def __contains__(self, item: T) -> bool:
        queue = self._levels[item.priority].get(item.name)
        return queue is not None and item.key in queue

    def pop_for(self, names: Collection[str] | None) -> T | None:
        """The oldest item of the highest priority whose name is in ``names`` (None: any)."""
        for priority, level in enumerate(self._levels):
            if not self._counts[priority]:
                continue
            best: OrderedDict[str, T] | None = None
            best_seq = 0
            for name, queue in level.items():
                if names is not None and name not in names:
                    continue
                head = queue[next(iter(queue))]
                if best is None or head.seq < best_seq:
                    best, best_seq = queue, head.seq
            if best is not None:
                _, item = best.popitem(last=False)
                self._counts[priority] -= 1
                if not best:
                    del level[item.name]
                return item
        return None

    def pop_many(self, names: Collection[str] | None, limit: int) -> list[T]:
        """Up to ``limit`` items in dispatch order, for a worker serving ``names``.

        The common case — this worker serves every name waiting at a priority
        through a single queue — drains that map in one loop instead of
        re-choosing the best head for every item.
        """
        out: list[T] = []
        counts = self._counts
        for priority, level in enumerate(self._levels):
            while len(out) < limit and counts[priority]:
                mine = [(name, q) for name, q in level.items() if names is None or name in names]
                if not mine:
                    break
                if len(mine) == 1:
                    name, queue = mine[0]
                    take = min(limit - len(out), len(queue))
                    for _ in range(take):
                        out.append(queue.popitem(last=False)[1])
                    counts[priority] -= take
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
        """Remove and return every item whose name is not in ``keep``."""
        taken: list[T] = []
        for priority, level in enumerate(self._levels):
            for name in [n for n in level if n not in keep]:
                queue = level.pop(name)
                taken.extend(queue.values())
                self._counts[priority] -= len(queue)
        return taken

    def items(self) -> Iterator[T]:
        """Every queued item (for checks and introspection, not the hot path)."""
        for level in self._levels:
            for queue in level.values():
                yield from queue.values()

    def heads(self) -> Iterator[list[T]]:
        """Per priority, CRITICAL first: the first item of each name's queue."""
        for level in self._levels:
            yield [queue[next(iter(queue))] for queue in level.values()]

    def counts(self) -> list[int]:
        """Queued items per priority, CRITICAL first."""
        return list(self._counts)

    def __len__(self) -> int:
        return sum(self._counts)
