"""Dead letters: tasks that failed for good, kept with their arguments so they can run again.

A task lands here when its last run failed (its retries exhausted), when
it killed its worker too often (poison), when its worker could not decode
its arguments, when no worker serves its name, or when it could not be sent.
The store is bounded in count and bytes: past either bound the oldest
letter goes (counted in ``stats["evicted"]``), so a failure storm costs a
fixed amount of memory.  Socket-free; the Scheduler actor fills it from the
task book's effects and answers the Client's queries from it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs

from ..wire import UNDECODABLE_PREFIX, ResultRecord, TaskEnvelope, WireError

__all__ = ["REASONS", "DeadLetter", "DeadLetters", "DeadLettersConfig"]

REASONS = ("retries_exhausted", "poison", "undecodable", "unknown_task", "too_large")
_MAX_ERROR = 4096  # characters of the last error kept per letter
_STATE_VERSION = 1


def reason_for(record: ResultRecord) -> str:
    """Why a task a worker reported as failed is dead: its own failure, or its arguments'."""
    error = record.error or ""
    if error.startswith(UNDECODABLE_PREFIX):
        return "undecodable"
    if error.startswith("unknown task"):
        return "unknown_task"
    return "retries_exhausted"


@attrs.frozen
class DeadLetter:
    envelope: TaskEnvelope  # as submitted (no "attempt" option): what a retry queues
    reason: str
    error: str
    attempts: int
    failed_at: float  # epoch seconds

    @property
    def weight(self) -> int:
        e = self.envelope
        return len(e.payload) + len(e.task_id) + len(e.name) + len(self.error) + 128

    def to_wire(self) -> list[Any]:
        """DeadLetterWire: ``[task_id, name, priority, format, payload, reason, error,
        attempts, failed_at]``."""
        e = self.envelope
        return [
            e.task_id,
            e.name,
            e.priority,
            e.format,
            e.payload,
            self.reason,
            self.error,
            self.attempts,
            self.failed_at,
        ]


def _letter_state(letter: DeadLetter) -> list[Any]:
    return [list(letter.envelope), *letter.to_wire()[5:]]


def _failed_at(item: Any) -> float:
    """A saved letter's failure time, for ordering; 0 for one too broken to say."""
    if type(item) is list and len(item) == 5 and type(item[4]) in (int, float):
        return float(item[4])
    return 0.0


@attrs.frozen
class DeadLettersConfig:
    max_letters: int = 10_000
    max_bytes: int = 64 << 20


class DeadLetters:
    def __init__(self, config: DeadLettersConfig) -> None:
        self.config = config
        self._letters: OrderedDict[str, DeadLetter] = OrderedDict()  # oldest first
        self._bytes = 0
        self.stats: Counter[str] = Counter()
        # Ids whose letter came, went or was evicted since take_changes(), once watch() is
        # called (a journal); a dict, so they are written in the order they changed.
        self._changed: dict[str, None] | None = None

    def __len__(self) -> int:
        return len(self._letters)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._letters

    def add(
        self,
        envelope: TaskEnvelope,
        reason: str,
        error: str | None,
        attempts: int,
        failed_at: float,
    ) -> None:
        """Keep a task that failed for good (a second failure of one id replaces the first)."""
        options = envelope.options
        if options is not None and "attempt" in options:
            options = {k: v for k, v in options.items() if k != "attempt"} or None
            envelope = envelope._replace(options=options)
        letter = DeadLetter(envelope, reason, (error or "")[:_MAX_ERROR], attempts, failed_at)
        self._put(letter)
        self.stats[reason] += 1

    def _put(self, letter: DeadLetter) -> None:
        task_id = letter.envelope.task_id
        self.take(task_id)
        if letter.weight > self.config.max_bytes:
            self.stats["evicted"] += 1
            return
        letters = self._letters
        letters[task_id] = letter
        self._bytes += letter.weight
        self._note(task_id)
        while len(letters) > self.config.max_letters or self._bytes > self.config.max_bytes:
            evicted, oldest = letters.popitem(last=False)
            self._bytes -= oldest.weight
            self.stats["evicted"] += 1
            self._note(evicted)

    def take(self, task_id: str) -> DeadLetter | None:
        """Remove and return a letter (to queue its task again)."""
        letter = self._letters.pop(task_id, None)
        if letter is not None:
            self._bytes -= letter.weight
            self._note(task_id)
        return letter

    def _note(self, task_id: str) -> None:
        changed = self._changed
        if changed is not None:
            changed.pop(task_id, None)
            changed[task_id] = None

    def put_back(self, letter: DeadLetter) -> None:
        """A letter taken for a retry that could not be queued (queue full) stays dead."""
        self._put(letter)

    def newest(self, limit: int) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for letter in reversed(self._letters.values()):
            if len(out) >= limit:
                break
            out.append(letter)
        return out

    # -- state for a journal ----------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Every letter, oldest first, as plain CBOR-able values."""
        return {
            "version": _STATE_VERSION,
            "letters": [_letter_state(letter) for letter in self._letters.values()],
        }

    def watch(self) -> None:
        """Record which letters change from now on, for ``take_changes`` (a journal)."""
        self._changed = {}

    def take_changes(self) -> list[tuple[str, dict[str, Any] | None]]:
        """``(task id, state)`` per letter added, taken or evicted since the last call: a
        ``to_state`` holding that one letter, or None when it is gone.

        Only after ``watch()``; the changes are forgotten once taken.
        """
        changed = self._changed
        if not changed:
            return []
        self._changed = {}
        letters = self._letters
        out: list[tuple[str, dict[str, Any] | None]] = []
        for task_id in changed:
            letter = letters.get(task_id)
            state = (
                None
                if letter is None
                else {"version": _STATE_VERSION, "letters": [_letter_state(letter)]}
            )
            out.append((task_id, state))
        return out

    @classmethod
    def from_state(cls, state: Any, config: DeadLettersConfig) -> DeadLetters:
        """The letters ``to_state`` saved; an unreadable one is dropped and counted."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a dead-letters state this version can read")
        store = cls(config)
        store._load(state.get("letters") or [])
        return store

    @classmethod
    def from_states(cls, states: Iterable[Any], config: DeadLettersConfig) -> DeadLetters:
        """``from_state`` over several saved states (one per letter, as a journal keeps
        them), oldest failure first: the order they are kept in, so the oldest go first
        past a bound.  A state of another version counts as unreadable."""
        store = cls(config)
        items: list[Any] = []
        for state in states:
            if isinstance(state, dict) and state.get("version") == _STATE_VERSION:
                items.extend(state.get("letters") or [])
            else:
                store.stats["unreadable"] += 1
        items.sort(key=_failed_at)
        store._load(items)
        return store

    def _load(self, items: Iterable[Any]) -> None:
        for item in items:
            try:
                raw, reason, error, attempts, failed_at = item
                envelope = TaskEnvelope.from_wire(list(raw))
                if reason not in REASONS or type(error) is not str or type(attempts) is not int:
                    raise ValueError("bad letter fields")
                if type(failed_at) not in (int, float):
                    raise ValueError("bad failure time")
            except (ValueError, TypeError, WireError):
                self.stats["unreadable"] += 1
                continue
            self._put(DeadLetter(envelope, reason, error, attempts, float(failed_at)))

    def audit(self) -> list[str]:
        problems = []
        weight = sum(letter.weight for letter in self._letters.values())
        if weight != self._bytes:
            problems.append(f"bytes {self._bytes} but letters weigh {weight}")
        if len(self._letters) > self.config.max_letters or self._bytes > self.config.max_bytes:
            problems.append("over a bound")
        return problems
