"""The ResultCache actor: finished results by task id, with a TTL and LRU eviction.

Results are kept encoded (ResultRecord), exactly as workers reported them, so
storing and answering cost no serialization of user data.  Expiry counts
from when the result was stored; eviction goes by last access, and a read
counts as access.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import attrs
import trio

from .._io import tick
from ..runtime import Actor, ActorRef, MailboxFull
from ..tasks.models import TaskStatus
from ..wire import ResultRecord, ResultReply, Results, encode
from ._internal import Outgoing, QueryResults, ResendResults, StoreResults

__all__ = ["ResultCache", "ResultCacheConfig"]


@attrs.frozen
class ResultCacheConfig:
    ttl: float = 3600.0
    max_size: int = 10_000

    def __attrs_post_init__(self) -> None:
        if self.ttl <= 0 or self.max_size <= 0:
            raise ValueError("result cache ttl and size must be positive")


@attrs.frozen
class _Sweep:
    pass


def _gone(task_id: str) -> ResultRecord:
    return ResultRecord(
        task_id,
        TaskStatus.FAILURE.value,
        error="the task finished earlier but its result is no longer in the control plane's "
        "cache (expired or evicted); its outcome is unknown",
        completed_at=time.time(),
    )


class ResultCache(Actor):
    def __init__(self, config: ResultCacheConfig, *, gateway: ActorRef | None = None) -> None:
        super().__init__("result-cache", mailbox_size=4096)
        self.config = config
        self.gateway = gateway
        self._entries: OrderedDict[str, tuple[ResultRecord, float]] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._expired = 0
        self._evicted = 0
        self._dropped_replies = 0

    async def on_start(self, nursery: trio.Nursery) -> None:
        # Reads check expiry themselves; the sweep only bounds the memory held
        # by expired results nobody asks for again.
        period = min(self.config.ttl, 60.0)
        nursery.start_soon(tick, self.ref, lambda: period, _Sweep())

    def receive(self, message: Any) -> Any:
        if isinstance(message, StoreResults):
            self.store(message.records)
        elif isinstance(message, QueryResults):
            found = [self.get(task_id) for task_id in message.task_ids]
            self._reply(message.identity, encode(ResultReply(message.request_id, found)))
        elif isinstance(message, ResendResults):
            # A re-submitted task that finished here before: push its result again.
            # If the result has expired or been evicted, the client still needs a
            # final answer, or it would wait forever: say what happened.
            records = [self.get(i) or _gone(i) for i in message.task_ids]
            self._reply(message.identity, encode(Results(records)))
        elif isinstance(message, _Sweep):
            self.sweep()
        elif message == "stats":
            return self.statistics_dict()
        else:
            raise TypeError(f"result cache got an unexpected message {message!r}")
        return None

    def _reply(self, identity: bytes, body: bytes) -> None:
        if self.gateway is None:
            return
        try:
            self.gateway.tell(Outgoing([[identity, body]]))
        except MailboxFull:
            self._dropped_replies += 1

    def store(self, records: list[ResultRecord]) -> None:
        entries = self._entries
        expires = trio.current_time() + self.config.ttl
        for record in records:
            task_id = record.task_id
            if task_id in entries:  # stored again (a re-run's result): now the newest
                entries.move_to_end(task_id)
            entries[task_id] = (record, expires)
        excess = len(entries) - self.config.max_size
        for _ in range(max(0, excess)):
            entries.popitem(last=False)
        self._evicted += max(0, excess)

    def get(self, task_id: str) -> ResultRecord | None:
        """The stored result, or None when never stored, evicted or expired."""
        entry = self._entries.get(task_id)
        if entry is None:
            self._misses += 1
            return None
        record, expires = entry
        if trio.current_time() >= expires:
            del self._entries[task_id]
            self._expired += 1
            self._misses += 1
            return None
        self._entries.move_to_end(task_id)
        self._hits += 1
        return record

    def sweep(self) -> int:
        now = trio.current_time()
        dead = [task_id for task_id, (_, expires) in self._entries.items() if now >= expires]
        for task_id in dead:
            del self._entries[task_id]
        self._expired += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._entries)

    def statistics_dict(self) -> dict[str, Any]:
        return {
            "size": len(self._entries),
            "max_size": self.config.max_size,
            "ttl": self.config.ttl,
            "hits": self._hits,
            "misses": self._misses,
            "expired": self._expired,
            "evicted": self._evicted,
            "dropped_replies": self._dropped_replies,
        }
