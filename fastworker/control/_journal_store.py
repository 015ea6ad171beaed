"""The journal's SQLite file: schema, one transaction per group commit, and replay.

Plain synchronous code with no trio in it: the Journal actor calls it in a
worker thread (``trio.to_thread.run_sync``), one call at a time, so the
connection is used by one thread at a time (``check_same_thread=False``).
SQLite in WAL mode is the standard library's embedded database: no server,
one file beside its ``-wal`` and ``-shm`` companions, and a transaction is
either all in the file or not at all — a write torn by a crash fails its
checksum and is ignored when the file is opened again.

What the file holds (design/durability.md):

* ``tasks`` — every task the control plane accepted and has not finished:
  the submitting client's routing id and the TaskWire, in submission order
  (rowid);
* ``results`` — final results, with the wall-clock time they were stored,
  bounded like the result cache: at most ``max_results`` (the newest by
  store order) and none older than ``result_ttl``;
* ``state`` — small CBOR documents by key, for other socket-free state that
  must survive a restart (schedules, dead letters), written in the same
  group commits.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import attrs
import cbor2

from ..wire import ResultRecord, TaskEnvelope, WireError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "JournalError",
    "JournalStore",
    "Recovered",
    "WriteBatch",
]

log = logging.getLogger("fastworker.journal")

# "fwjl": tells a fastworker journal from any other SQLite file.
APPLICATION_ID = 0x66776A6C
SCHEMA_VERSION = 1
# The -wal file is cut back to this after a checkpoint (it would keep its peak size).
_WAL_SIZE_LIMIT = 64 << 20
# Expired results are looked for at most this often (a scan of the results table).
_TTL_SWEEP_SECONDS = 60.0

_SCHEMA = (
    "CREATE TABLE tasks (id TEXT PRIMARY KEY, client BLOB NOT NULL, task BLOB NOT NULL)",
    "CREATE TABLE results (id TEXT PRIMARY KEY, stored_at REAL NOT NULL, record BLOB NOT NULL)",
    "CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
)


class JournalError(Exception):
    """The journal cannot be used (wrong version, not a journal, unreadable): said at start."""


@attrs.frozen
class Recovered:
    """What a journal held when it was opened."""

    tasks: list[tuple[bytes, TaskEnvelope]]  # (client routing id, task), submission order
    results: list[tuple[ResultRecord, float]]  # (result, seconds since stored), oldest first
    state: dict[str, Any]
    seconds: float  # how long opening and reading took


@attrs.define
class WriteBatch:
    """Everything one group commit writes, in the order it happened."""

    # ("tasks", [(task_id, client, TaskWire), ...]) | ("results", [ResultRecord, ...]) |
    # ("state", (key, CBOR-encoded document or None to delete))
    ops: list[tuple[str, Any]] = attrs.Factory(list)


class JournalStore:
    """One open journal file; every method runs in the journal's thread."""

    def __init__(
        self, path: str, connection: sqlite3.Connection, *, max_results: int, result_ttl: float
    ) -> None:
        self.path = path
        self._db = connection
        self._max_results = max_results
        self._result_ttl = result_ttl
        self._swept_at = 0.0
        self.commits = 0
        self._lock_fd: int | None = None  # held while open: one control plane per journal

    # -- opening ----------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str, *, sync: str, max_results: int, result_ttl: float
    ) -> tuple[JournalStore, Recovered]:
        """Open (or create) the journal at ``path`` and read what it holds.

        Raises JournalError with one clear sentence for a file that is not a
        fastworker journal, one of another schema version, or one that cannot
        be read; nothing in the file is changed then.
        """
        started = time.monotonic()
        lock = _lock(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(lock)
            raise JournalError(f"cannot open the journal {path}: {exc}") from None
        try:
            store = cls(path, db, max_results=max_results, result_ttl=result_ttl)
            store._lock_fd = lock
            store._prepare(sync)
            recovered = store._read()
        except sqlite3.Error as exc:
            db.close()
            os.close(lock)
            raise JournalError(f"cannot read the journal {path}: {exc}") from None
        except BaseException:
            db.close()
            os.close(lock)
            raise
        return store, attrs.evolve(recovered, seconds=time.monotonic() - started)

    def _prepare(self, sync: str) -> None:
        db = self._db
        application, version = _identity(db)
        fresh = application == 0 and version == 0 and not _tables(db)
        if not fresh:
            if application != APPLICATION_ID:
                raise JournalError(
                    f"{self.path} is not a fastworker journal (SQLite application_id "
                    f"{application:#x}); give --journal a new path or the right file"
                )
            if version != SCHEMA_VERSION:
                raise JournalError(
                    f"the journal {self.path} has schema version {version}; this fastworker "
                    f"reads version {SCHEMA_VERSION}. Run the fastworker that wrote it until "
                    "its queue is empty, or move the file away to start with an empty journal"
                )
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"the journal {self.path} cannot use WAL mode (got {mode!r})")
        db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        if fresh:
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        if os.name == "posix":
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)  # tasks' arguments are the users' data

    def _read(self) -> Recovered:
        db = self._db
        tasks = []
        rows = db.execute("SELECT id, client, task FROM tasks ORDER BY rowid")
        for task_id, client, blob in rows:
            tasks.append((bytes(client), _decode(TaskEnvelope, blob, f"task {task_id!r}")))
        now = time.time()
        self._delete_expired(now)
        self._trim_results()
        results = []
        for task_id, stored_at, blob in db.execute(
            "SELECT id, stored_at, record FROM results ORDER BY rowid"
        ):
            record = _decode(ResultRecord, blob, f"result {task_id!r}")
            results.append((record, max(0.0, now - stored_at)))
        state: dict[str, Any] = {}
        for key, value in db.execute("SELECT key, value FROM state"):
            try:
                state[key] = cbor2.loads(value)
            except (cbor2.CBORDecodeError, ValueError, TypeError):
                # Unreadable: its keeper counts it, logs it and deletes it (keys it
                # does not keep stay as they are); never a crash at start.
                state[key] = None
        return Recovered(tasks, results, state, 0.0)

    # -- writing ----------------------------------------------------------------

    def write(self, batches: Iterable[WriteBatch]) -> int:
        """Write every batch, in order, in one transaction; the number of operations.

        All or nothing: on an error the transaction is rolled back and the
        error raised (sqlite3.Error or OSError), so the caller may retry the
        same batches (every statement is idempotent).
        """
        db = self._db
        now = time.time()
        count = 0
        db.execute("BEGIN")
        try:
            for batch in batches:
                for kind, value in batch.ops:
                    count += self._apply(kind, value, now)
            self._trim_results()
            if now - self._swept_at >= _TTL_SWEEP_SECONDS:
                self._delete_expired(now)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        return count

    def _apply(self, kind: str, value: Any, now: float) -> int:
        db = self._db
        if kind == "tasks":
            db.executemany(
                "INSERT OR REPLACE INTO tasks (id, client, task) VALUES (?, ?, ?)",
                [(task_id, client, cbor2.dumps(wire)) for task_id, client, wire in value],
            )
        elif kind == "results":
            db.executemany("DELETE FROM tasks WHERE id = ?", [(r.task_id,) for r in value])
            db.executemany(
                "INSERT OR REPLACE INTO results (id, stored_at, record) VALUES (?, ?, ?)",
                [(r.task_id, now, cbor2.dumps(tuple(r))) for r in value],
            )
        elif kind == "state":
            key, blob = value  # the document, CBOR-encoded by its writer
            if blob is None:
                db.execute("DELETE FROM state WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, blob))
            return 1
        else:
            raise ValueError(f"unknown journal operation {kind!r}")
        return len(value)

    def _trim_results(self) -> None:
        """Keep the newest ``max_results`` results (rowids grow by one per store)."""
        self._db.execute(
            "DELETE FROM results WHERE rowid <= (SELECT max(rowid) FROM results) - ?",
            (self._max_results,),
        )

    def _delete_expired(self, now: float) -> None:
        self._swept_at = now
        self._db.execute("DELETE FROM results WHERE stored_at < ?", (now - self._result_ttl,))

    # -- introspection ------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        db = self._db
        return {
            table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("tasks", "results", "state")
        }

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None


# A node restarted while the old one still drains (up to its --grace) waits
# for the journal this long; past it, two control planes were given one file.
_LOCK_WAIT = 60.0


def _lock(path: str) -> int:
    """An exclusive lock on ``PATH.lock``, held for the store's life.

    Two control planes replaying one journal would each run every task in
    it.  SQLite's own locks allow that (both read, then take turns writing).
    """
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise JournalError(f"cannot open the journal's lock file {lock_path}: {exc}") from None
    deadline = time.monotonic() + _LOCK_WAIT
    warned = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise JournalError(
                    f"the journal {path} is in use by another control plane ({holder}) "
                    f"for {_LOCK_WAIT:g} s: give each control plane its own --journal"
                ) from None
            if not warned:
                log.warning("the journal %s is in use (%s); waiting for it", path, holder)
                warned = True
            time.sleep(0.2)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        return fd


def _lock_holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid unknown"
    except OSError:
        return "pid unknown"


def _identity(db: sqlite3.Connection) -> tuple[int, int]:
    application = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    return int(application), int(version)


def _tables(db: sqlite3.Connection) -> list[str]:
    return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def _decode(kind: Any, blob: bytes, what: str) -> Any:
    try:
        return kind.from_wire(cbor2.loads(blob))
    except (WireError, ValueError, TypeError, cbor2.CBORDecodeError) as exc:
        # TypeError: a row stored as TEXT (SQLite lets any column hold any type).
        raise JournalError(f"the journal holds an unreadable {what}: {exc}") from None
