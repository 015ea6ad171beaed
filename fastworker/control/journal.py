"""The Journal actor: a write-ahead journal on SQLite, so a control-plane crash loses nothing.

Who does what (design/durability.md):

* The Scheduler adds to a ``JournalQueue`` what each message it handles
  changed — the tasks it accepted, the final results it decided — together
  with the ``SubmitAck``s of that message.  It never waits: the queue is a
  plain object in the same trio thread, and adding cannot fail.
* The Journal actor owns the SQLite connection and runs one writer task:
  it takes *everything* queued since its last commit and writes it in one
  transaction in a worker thread (``trio.to_thread.run_sync``) — a group
  commit, so a burst costs one transaction per commit, not per task, and
  the busier the control plane the larger each commit.  Only once that
  transaction is committed does it hand the acks to the Gateway: an
  acknowledged task is on disk.
* Dispatch, heartbeats and result pushes never wait for the disk; only
  acknowledgements do.

Why a thread per commit (``to_thread.run_sync``) and not one long-lived
thread with a queue: trio keeps the thread warm between calls, the call is
not abandoned on cancellation (a stop waits for the commit in progress, so
what the queue lost is exactly what the file gained), and there is no
second life cycle to supervise — the writer is a helper task of an actor in
the control plane's supervision tree, restarted with it.

Bounds: what is queued or being written is bounded in entries and bytes
(``max_pending_entries``, ``max_pending_bytes``).  Past either, and while the
disk refuses writes (full, I/O error), the Scheduler rejects *new* tasks
with ``queue_full`` and a reason naming the journal; clients retry later.
Results and acks of tasks already accepted are still queued (each accepted
task finishes once), so memory stays within the bound plus one message's
worth.  A failed commit is rolled back and retried (1 s, doubling to 30 s)
with everything it held: nothing is dropped, the control plane does not
crash, and acks resume when the disk does.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from typing import Any

import attrs
import cbor2
import trio

from ..runtime import Actor, ActorError, ActorRef, GetStatistics
from ..wire import ResultRecord, TaskEnvelope
from ._internal import HeldAcks, Outgoing
from ._journal_store import JournalError, JournalStore, Recovered, WriteBatch

__all__ = ["Journal", "JournalConfig", "JournalError", "JournalQueue", "Recovered"]

log = logging.getLogger("fastworker.journal")

_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0
# A commit takes whole messages' worth until it holds this many entries: under a
# sustained burst acks flow every ~half second instead of after one huge commit.
_COMMIT_ENTRIES = 20_000
_OVERHEAD = 64  # bytes counted per entry beyond its payload and texts


@attrs.frozen
class JournalConfig:
    path: str
    sync: str = "normal"  # "normal" (WAL, no fsync per commit) or "full" (fsync per commit)
    # About two seconds of writing on a small machine: past it, acks would come
    # so late that clients re-send (their first ack timeout is 1 s).
    max_pending_entries: int = 100_000
    max_pending_bytes: int = 64 << 20
    max_results: int = 10_000  # the result cache's size
    result_ttl: float = 3600.0

    def __attrs_post_init__(self) -> None:
        if self.sync not in ("normal", "full"):
            raise ValueError(f"journal sync must be 'normal' or 'full', not {self.sync!r}")


@attrs.define
class _Pending:
    batch: WriteBatch = attrs.Factory(WriteBatch)
    held_acks: list[list[bytes]] = attrs.Factory(list)
    acks: list[list[bytes]] = attrs.Factory(list)
    entries: int = 0
    bytes: int = 0
    # Where each state key's latest write sits in batch.ops (only while open).
    state_at: dict[str, int] = attrs.Factory(dict)

    def __bool__(self) -> bool:
        return bool(self.batch.ops or self.held_acks or self.acks)

    def extend(self, later: _Pending) -> None:
        self.batch.ops.extend(later.batch.ops)
        self.held_acks.extend(later.held_acks)
        self.acks.extend(later.acks)
        self.entries += later.entries
        self.bytes += later.bytes


class JournalQueue:
    """What waits for the next commit: written by the Scheduler, taken by the journal's writer.

    Both live in the control plane's trio thread; nothing here awaits except
    ``wait``.  ``refusal()`` is the backpressure: the Scheduler asks it before
    accepting a new task.
    """

    def __init__(self, config: JournalConfig) -> None:
        self.config = config
        # One entry per Scheduler message that acknowledged something (its
        # changes, then its acks), oldest first; then what is still open.
        self._closed: deque[_Pending] = deque()
        self._next = _Pending()
        self._entries = 0  # queued or being written
        self._bytes = 0
        self._wake = trio.Event()
        self.failure: str | None = None  # why the last commit failed, until one succeeds

    # -- the Scheduler's side ---------------------------------------------------

    def add_tasks(self, tasks: list[tuple[bytes, TaskEnvelope]]) -> None:
        """Tasks just accepted: ``(client routing id, task)`` each."""
        if not tasks:
            return
        size = sum(len(env.payload) + len(env.task_id) + _OVERHEAD for _, env in tasks)
        wires = [(env.task_id, client, list(env)) for client, env in tasks]
        self._add(("tasks", wires), len(tasks), size)

    def add_results(self, records: list[ResultRecord]) -> None:
        """Final results: their tasks leave the journal, the results enter it."""
        if not records:
            return
        size = sum(
            len(r.result or b"") + len(r.error or "") + len(r.traceback or "") + _OVERHEAD
            for r in records
        )
        self._add(("results", list(records)), len(records), size)

    def put_state(self, key: str, document: Any) -> None:
        """Write a CBOR-able document under ``key`` (None deletes it) in the next commit.

        For socket-free state that must survive a restart beside the tasks
        (schedules, dead letters: ``to_state()``); read back at replay in
        ``Recovered.state``.  A key written again before the next commit
        takes one entry, not two: while the disk cannot write, a schedule
        ticking every second queues one write, not one per tick.
        """
        if not isinstance(key, str) or not key:
            raise ValueError("a journal state key must be non-empty text")
        # Encoded here, so a document CBOR cannot hold fails its caller, not the writer.
        try:
            blob = None if document is None else cbor2.dumps(document)
        except cbor2.CBOREncodeError as exc:
            raise TypeError(f"journal state {key!r} is not CBOR-able: {exc}") from None
        size = len(key) + len(blob or b"") + _OVERHEAD
        pending = self._next
        index = pending.state_at.get(key)
        if index is None:
            pending.state_at[key] = len(pending.batch.ops)
            self._add(("state", (key, blob)), 1, size)
            return
        # Same transaction either way: the earlier write's place holds the newer value.
        _, (_, older) = pending.batch.ops[index]
        pending.batch.ops[index] = ("state", (key, blob))
        grown = size - (len(key) + len(older or b"") + _OVERHEAD)
        pending.bytes += grown
        self._bytes += grown

    def add_acks(self, held: list[list[bytes]], now: list[list[bytes]]) -> None:
        """SubmitAcks to hand to the Gateway once everything queued before them is committed."""
        pending = self._next
        pending.held_acks.extend(held)
        pending.acks.extend(now)
        if pending:
            self._closed.append(pending)
            self._next = _Pending()
        self._wake.set()

    def refusal(self) -> str | None:
        """Why a new task cannot be accepted now, or None."""
        if self.failure is not None:
            return f"{self.failure}; retry later"
        config = self.config
        if self._entries >= config.max_pending_entries or self._bytes >= config.max_pending_bytes:
            return (
                f"the journal is behind the disk ({self._entries} entries, {self._bytes} bytes "
                "waiting to be written); retry later"
            )
        return None

    def _add(self, op: tuple[str, Any], entries: int, size: int) -> None:
        pending = self._next
        pending.batch.ops.append(op)
        pending.entries += entries
        pending.bytes += size
        self._entries += entries
        self._bytes += size
        self._wake.set()

    # -- the writer's side --------------------------------------------------------

    async def wait(self) -> None:
        """Until something is queued."""
        if not self._closed and not self._next:
            self._wake = trio.Event()
            await self._wake.wait()

    def take(self, limit: int = _COMMIT_ENTRIES) -> _Pending:
        """The oldest queued changes, whole messages at a time, until ``limit`` entries."""
        taken = _Pending()
        closed = self._closed
        while closed and (not taken or taken.entries < limit):
            taken.extend(closed.popleft())
        if not closed and self._next and taken.entries < limit:
            taken.extend(self._next)
            self._next = _Pending()
        return taken

    def put_back(self, pending: _Pending) -> None:
        """A commit failed: its content goes first in the next one."""
        self._closed.appendleft(pending)

    def committed(self, pending: _Pending) -> None:
        self._entries -= pending.entries
        self._bytes -= pending.bytes

    def statistics(self) -> dict[str, Any]:
        return {"pending_entries": self._entries, "pending_bytes": self._bytes}


class Journal(Actor):
    """Owns the journal file; its writer commits the queue and then releases acks."""

    def __init__(self, config: JournalConfig, *, gateway: ActorRef) -> None:
        super().__init__("journal", mailbox_size=1024)
        self.config = config
        self.queue = JournalQueue(config)
        self._gateway = gateway
        self._store: JournalStore | None = None
        self._commits = 0
        self._written = 0
        self._failures = 0
        self._dropped_acks = 0
        self._recovery: dict[str, Any] = {}

    async def open(self) -> Recovered:
        """Open the file and read it (in a thread); JournalError when it cannot be used."""
        config = self.config
        store, recovered = await trio.to_thread.run_sync(
            lambda: JournalStore.open(
                config.path,
                sync=config.sync,
                max_results=config.max_results,
                result_ttl=config.result_ttl,
            )
        )
        self._store = store
        self._recovery = {
            "tasks": len(recovered.tasks),
            "results": len(recovered.results),
            "state": len(recovered.state),
            "seconds": round(recovered.seconds, 3),
        }
        return recovered

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    async def on_start(self, nursery: trio.Nursery) -> None:
        if self._store is None:
            raise JournalError("the journal must be opened before its actor starts")
        nursery.start_soon(self._write_loop)

    async def on_stop(self) -> None:
        # What the Scheduler queued before it stopped is still written: the
        # supervisor stops the journal last.
        if self._store is None:
            return
        pending = self.queue.take(limit=1 << 62)
        if not pending:
            return
        try:
            await self._commit(pending)
        except BaseException as exc:
            # Kept for the next run (after a crash) or for nobody (the end): never
            # acknowledged without being written.
            self.queue.put_back(pending)
            if not isinstance(exc, sqlite3.Error | OSError):
                raise
            log.error("journal: the last commit failed (%s); its tasks stay unacknowledged", exc)

    def receive(self, message: Any) -> Any:
        if type(message) is GetStatistics:
            return self.statistics_dict()
        raise TypeError(f"journal got an unexpected message {message!r}")

    async def _write_loop(self) -> None:
        queue = self.queue
        delay = _RETRY_FIRST
        while True:
            await queue.wait()
            pending = queue.take()
            try:
                await self._commit(pending)
            except (sqlite3.Error, OSError) as exc:
                queue.put_back(pending)
                self._failures += 1
                if queue.failure is None:
                    log.error(
                        "journal %s: a commit failed (%s: %s); new tasks are refused and acks "
                        "wait until a retry succeeds",
                        self.config.path,
                        type(exc).__name__,
                        exc,
                    )
                queue.failure = f"the journal cannot write ({type(exc).__name__}: {exc})"
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            except BaseException:
                queue.put_back(pending)
                raise
            if queue.failure is not None:
                log.warning("journal %s: writing again", self.config.path)
                queue.failure = None
            delay = _RETRY_FIRST

    async def _commit(self, pending: _Pending) -> None:
        store = self._store
        assert store is not None
        if pending.batch.ops:
            # Not abandoned on cancellation: a stop waits for the transaction.
            self._written += await trio.to_thread.run_sync(store.write, [pending.batch])
            self._commits += 1
        self.queue.committed(pending)
        self._release(HeldAcks(pending.held_acks) if pending.held_acks else None)
        self._release(Outgoing(pending.acks) if pending.acks else None)

    def _release(self, message: HeldAcks | Outgoing | None) -> None:
        if message is None:
            return
        try:
            self._gateway.tell(message)
        except ActorError:
            # The client re-sends an unacknowledged submission; the task is
            # journaled, so the re-sent one is acknowledged, not queued twice.
            self._dropped_acks += len(message.messages)

    def statistics_dict(self) -> dict[str, Any]:
        stats = {
            "path": self.config.path,
            "sync": self.config.sync,
            "commits": self._commits,
            "written": self._written,
            "failed_commits": self._failures,
            "failing": self.queue.failure,
            "dropped_acks": self._dropped_acks,
            "recovered": dict(self._recovery),
        }
        stats.update(self.queue.statistics())
        return stats
