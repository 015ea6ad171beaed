"""The ResultCache actor: finished results by task id, with a TTL and LRU eviction.

Results are kept encoded (ResultRecord), exactly as workers reported them, so
storing and answering cost no serialization of user data.  Expiry counts
from when the result was stored; eviction goes by last access, and a read
counts as access.

A result that left the cache (expired or evicted) leaves its id behind for a
while (bounded): a query for it then answers a FAILURE saying the result
expired, never "not found", so a caller waiting for that task gets a final
answer instead of waiting forever.  Replies are split by bytes like every
batch (see ``_answer``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import attrs
import trio

from .._io import tick
from ..runtime import Actor, ActorError, ActorRef, GetStatistics
from ..tasks.models import TaskStatus
from ..transport import DEFAULT_MAX_MESSAGE_SIZE
from ..wire import (
    EXPIRED_PREFIX,
    ResultRecord,
    ResultReply,
    Results,
    encode,
    message_budget,
    result_chunks,
    result_weight,
)
from ._internal import LookupTask, Outgoing, QueryResults, ResendResults, StoreResults
from ._taskbook import default_max_queued_bytes

__all__ = ["ResultCache", "ResultCacheConfig", "default_result_cache_bytes"]


def default_result_cache_bytes() -> int:
    """An eighth of this machine's memory, between 64 MiB and 4 GiB (as the queue's)."""
    return default_max_queued_bytes()


@attrs.frozen
class ResultCacheConfig:
    ttl: float = 3600.0
    max_size: int = 10_000
    # Results' encoded bytes kept at most: 10 000 results of a few MiB each would
    # otherwise hold tens of GiB.  The least recently used go first, as by count.
    max_bytes: int = attrs.field(factory=default_result_cache_bytes)
    # Ids of results that left the cache, remembered so queries say "expired".
    gone_memory: int = 100_000
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE

    def __attrs_post_init__(self) -> None:
        if self.ttl <= 0 or self.max_size <= 0:
            raise ValueError("result cache ttl and size must be positive")
        if self.max_bytes < self.max_message_size:
            raise ValueError(
                f"result cache bytes ({self.max_bytes}) must hold one message's worth "
                f"({self.max_message_size})"
            )


@attrs.frozen
class _Sweep:
    pass


def _gone(task_id: str) -> ResultRecord:
    return ResultRecord(
        task_id,
        TaskStatus.FAILURE.value,
        error=f"{EXPIRED_PREFIX}: the task finished, but its result is no longer in the control "
        "plane's cache (past its TTL, or evicted as least recently used); its outcome is unknown",
        completed_at=time.time(),
    )


class ResultCache(Actor):
    def __init__(self, config: ResultCacheConfig, *, gateway: ActorRef | None = None) -> None:
        super().__init__("result-cache", mailbox_size=4096)
        self.config = config
        self.gateway = gateway
        # task id -> (record, expires, weight); least recently used first.
        self._entries: OrderedDict[str, tuple[ResultRecord, float, int]] = OrderedDict()
        self._bytes = 0
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._budget = message_budget(config.max_message_size)
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
            self._answer(message)
        elif isinstance(message, ResendResults):
            # A re-submitted task that finished here before: push its result again.
            # If the result has expired or been evicted, the client still needs a
            # final answer, or it would wait forever: say what happened.
            records = [self.get(i) or _gone(i) for i in message.task_ids]
            self._push(message.identity, records)
        elif isinstance(message, _Sweep):
            self.sweep()
        elif isinstance(message, LookupTask):
            return self.peek(message.task_id)
        elif type(message) is GetStatistics:
            return self.statistics_dict()
        else:
            raise TypeError(f"result cache got an unexpected message {message!r}")
        return None

    def _answer(self, query: QueryResults) -> None:
        """Answer a query in one ResultReply that fits a message.

        Entries follow the queried ids: a result, null (never known here) or
        ``true`` — a result that did not fit this reply, pushed in a Results
        message just before it (protocol.md, ResultReply).
        """
        found: list[ResultRecord | bool | None] = []
        overflow: list[ResultRecord] = []
        room = self._budget
        for task_id in query.task_ids:
            record = self.get(task_id)
            if record is None and task_id in self._gone:
                record = _gone(task_id)
            if record is None:
                found.append(None)
                room -= 9
                continue
            weight = result_weight(record)
            if weight <= room:
                found.append(record)
                room -= weight
            else:
                found.append(True)
                overflow.append(record)
                room -= 9
        if overflow:
            self._push(query.identity, overflow)
        self._reply(query.identity, encode(ResultReply(query.request_id, found)))

    def _push(self, identity: bytes, records: list[ResultRecord]) -> None:
        for chunk in result_chunks(records, self._budget):
            self._reply(identity, encode(Results(chunk)))

    def _forget(self, task_id: str) -> None:
        gone = self._gone
        gone[task_id] = None
        if len(gone) > self.config.gone_memory:
            gone.popitem(last=False)

    def _reply(self, identity: bytes, body: bytes) -> None:
        if self.gateway is None:
            return
        try:
            self.gateway.tell(Outgoing([[identity, body]]))
        except ActorError:  # full, or stopped (the node is stopping): the client asks again
            self._dropped_replies += 1

    def store(self, records: list[ResultRecord]) -> None:
        expires = trio.current_time() + self.config.ttl
        for record in records:
            self._put(record, expires)
        self._evict()

    def _put(self, record: ResultRecord, expires: float) -> None:
        task_id = record.task_id
        old = self._entries.pop(task_id, None)  # stored again (a re-run's): now the newest
        if old is not None:
            self._bytes -= old[2]
        elif self._gone:
            self._gone.pop(task_id, None)
        weight = result_weight(record)
        self._entries[task_id] = (record, expires, weight)
        self._bytes += weight

    def _evict(self, *, counted: bool = True) -> None:
        """Least recently used out until both bounds hold (``counted``: as evictions)."""
        entries = self._entries
        while entries and (
            len(entries) > self.config.max_size or self._bytes > self.config.max_bytes
        ):
            task_id, (_, _, weight) = entries.popitem(last=False)
            self._bytes -= weight
            self._forget(task_id)
            self._evicted += counted

    def _drop(self, task_id: str) -> None:
        self._bytes -= self._entries.pop(task_id)[2]
        self._forget(task_id)

    def restore(self, results: list[tuple[ResultRecord, float]]) -> None:
        """Results read from the journal, oldest first, each with its age in seconds:
        each keeps what is left of its TTL; beyond the size the oldest go."""
        now = trio.current_time()
        ttl = self.config.ttl
        for record, age in results[-self.config.max_size :]:
            if age < ttl:
                self._put(record, now + ttl - age)
        self._evict(counted=False)  # bounds applied to what was read, not evictions

    def get(self, task_id: str) -> ResultRecord | None:
        """The stored result, or None when never stored, evicted or expired."""
        entry = self._entries.get(task_id)
        if entry is None:
            self._misses += 1
            return None
        record, expires, _ = entry
        if trio.current_time() >= expires:
            self._drop(task_id)
            self._expired += 1
            self._misses += 1
            return None
        self._entries.move_to_end(task_id)
        self._hits += 1
        return record

    def peek(self, task_id: str) -> ResultRecord | None:
        """The stored result for a person looking: no LRU move, not a hit or a miss."""
        entry = self._entries.get(task_id)
        if entry is None or trio.current_time() >= entry[1]:
            return None
        return entry[0]

    def sweep(self) -> int:
        now = trio.current_time()
        dead = [task_id for task_id, (_, expires, _) in self._entries.items() if now >= expires]
        for task_id in dead:
            self._drop(task_id)
        self._expired += len(dead)
        return len(dead)

    def __len__(self) -> int:
        return len(self._entries)

    def statistics_dict(self) -> dict[str, Any]:
        return {
            "size": len(self._entries),
            "max_size": self.config.max_size,
            "bytes": self._bytes,
            "max_bytes": self.config.max_bytes,
            "ttl": self.config.ttl,
            "hits": self._hits,
            "misses": self._misses,
            "expired": self._expired,
            "evicted": self._evicted,
            "dropped_replies": self._dropped_replies,
        }
