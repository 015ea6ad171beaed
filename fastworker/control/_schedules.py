"""The control plane's schedules: which periodic tasks exist and when each runs next.

Socket-free and clock-injected like the TaskBook: the Scheduler actor asks
``due()`` when its timer fires and submits one task per schedule that came
due, whatever the number of workers serving it — the control plane alone
decides a tick, so a tick runs once.  Every tick gets a task id made from
the schedule id and the tick's time, so a tick submitted twice (a restart
from a journal written just before the run was recorded) is deduplicated by
the task book like any re-submitted task.

Ticks that fell while nobody looked (the control plane down, or a journal
restored hours later) run once when it looks again, not once per missed
tick: ``due()`` returns each schedule at most once and moves it to its first
tick after now.  design/schedules.md has the rules; tests/test_schedules.py
proves them against a model.
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs

from ..tasks.schedule import ScheduleRule, check_schedule
from ..wire import TaskEnvelope

__all__ = [
    "MAX_SCHEDULE_ID_LENGTH",
    "ScheduleSpec",
    "Schedules",
    "SchedulesConfig",
    "tick_task_id",
]

MAX_SCHEDULE_ID_LENGTH = 200  # leaves room for "@<ISO time>" in a 256-character task id
# Runs one due() hands out at most: ten thousand schedules due in the same second
# make many short Scheduler turns (a few ms each), not one long one; the rest stay due.
MAX_RUNS_PER_TURN = 64
_MAX_NAME_LENGTH = 512
_SOURCES = ("declared", "client")
_STATE_VERSION = 1


def tick_task_id(schedule_id: str, tick: float) -> str:
    """The task id of one tick's run: the same tick always gets the same id."""
    when = dt.datetime.fromtimestamp(tick, dt.UTC).isoformat(timespec="milliseconds")
    return f"{schedule_id}@{when}"


@attrs.frozen
class ScheduleSpec:
    """One schedule: what runs (task, arguments already encoded, priority) and when."""

    schedule_id: str
    task_name: str
    rule: ScheduleRule
    priority: int
    format: int
    payload: bytes
    source: str

    @classmethod
    def from_wire(cls, item: Any, source: str) -> ScheduleSpec:
        """Validate an untrusted ScheduleWire; ValueError (or TypeError) saying what is wrong."""
        if type(item) is not list or len(item) != 8:
            raise ValueError("a schedule must be an array of 8 items")
        schedule_id, name, cron, interval, timezone, priority, fmt, payload = item
        if type(schedule_id) is not str or not 0 < len(schedule_id) <= MAX_SCHEDULE_ID_LENGTH:
            raise ValueError(
                f"schedule id must be a string of 1-{MAX_SCHEDULE_ID_LENGTH} characters"
            )
        if type(name) is not str or not 0 < len(name) <= _MAX_NAME_LENGTH:
            raise ValueError(f"schedule {schedule_id}: task name must be 1-512 characters")
        if type(priority) is not int or not 0 <= priority <= 3:
            raise ValueError(f"schedule {schedule_id}: priority must be 0-3")
        if type(fmt) is not int or not 0 <= fmt <= 2:
            raise ValueError(f"schedule {schedule_id}: format must be 0-2")
        if type(payload) is not bytes:
            raise ValueError(f"schedule {schedule_id}: payload must be bytes")
        if source not in _SOURCES:
            raise ValueError(f"schedule source must be one of {_SOURCES}")
        try:
            rule = check_schedule(cron, interval, timezone)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"schedule {schedule_id}: {exc}") from None
        return cls(schedule_id, name, rule, priority, fmt, payload, source)

    def to_wire(self) -> list[Any]:
        rule = self.rule
        return [
            self.schedule_id,
            self.task_name,
            rule.cron,
            rule.interval,
            rule.timezone,
            self.priority,
            self.format,
            self.payload,
        ]

    @property
    def weight(self) -> int:
        """Bytes this schedule holds, near enough to bound the store."""
        return len(self.payload) + len(self.schedule_id) + len(self.task_name) + 128

    def envelope(self, tick: float) -> TaskEnvelope:
        """The task one tick runs."""
        return TaskEnvelope(
            tick_task_id(self.schedule_id, tick),
            self.task_name,
            self.priority,
            self.format,
            self.payload,
            None,
        )


@attrs.define(eq=False)
class _Entry:
    spec: ScheduleSpec
    anchor: float  # interval schedules tick at anchor + k * interval
    next_due: float
    last_run: float | None = None
    token: int = 0  # of its live entry in the heap
    ticks: Any = None  # a cron schedule's croniter, positioned at next_due (made lazily)


def _entry_state(e: _Entry) -> list[Any]:
    return [e.spec.to_wire(), e.spec.source, e.anchor, e.next_due, e.last_run]


@attrs.frozen
class SchedulesConfig:
    max_schedules: int = 10_000
    max_bytes: int = 64 << 20  # payloads, ids and names of every schedule held


class Schedules:
    def __init__(self, config: SchedulesConfig, *, wall_clock: Callable[[], float]) -> None:
        self.config = config
        self._wall = wall_clock
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        # (next_due, token, id); an entry whose token is not its schedule's is stale.
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = 0
        self.stats: Counter[str] = Counter()
        # Ids whose state changed since take_changes(), once watch() is called (a journal).
        self._changed: set[str] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, schedule_id: object) -> bool:
        return schedule_id in self._entries

    def add(self, spec: ScheduleSpec) -> str | None:
        """Add or replace a schedule; None when done, else why it was refused.

        The same schedule again (a worker declaring it at each registration)
        changes nothing, its next tick included; a changed one starts afresh.
        """
        entries = self._entries
        old = entries.get(spec.schedule_id)
        if old is not None and old.spec == spec:
            return None
        if old is None and len(entries) >= self.config.max_schedules:
            self.stats["refused"] += 1
            return f"{len(entries)} schedules held: the limit"
        freed = 0 if old is None else old.spec.weight
        if self._bytes - freed + spec.weight > self.config.max_bytes:
            self.stats["refused"] += 1
            return f"schedules hold {self._bytes} bytes: the limit is {self.config.max_bytes}"
        now = self._wall()
        rule = spec.rule
        ticks = None
        try:
            if rule.cron is None:
                next_due = rule.next_after(now, now)
            else:
                ticks = rule.cron_ticks(now)
                next_due = float(ticks.get_next(float))
        except Exception as exc:  # a cron that stops firing (croniter gives up)
            self.stats["refused"] += 1
            return f"schedule {spec.schedule_id} has no next tick: {exc}"
        self._bytes += spec.weight - freed
        self._place(_Entry(spec, now, next_due, ticks=ticks))
        self._note(spec.schedule_id)
        return None

    def _place(self, entry: _Entry) -> None:
        """(Re)file an entry in the heap under a fresh token."""
        self._tokens += 1
        entry.token = self._tokens
        self._entries[entry.spec.schedule_id] = entry
        heapq.heappush(self._heap, (entry.next_due, entry.token, entry.spec.schedule_id))
        if len(self._heap) > 2 * len(self._entries) + 64:
            # Replaced and removed schedules must not pile up in the heap.
            live = self._entries
            self._heap = [h for h in self._heap if h[2] in live and live[h[2]].token == h[1]]
            heapq.heapify(self._heap)

    def _prune(self) -> None:
        heap, live = self._heap, self._entries
        while heap and (heap[0][2] not in live or live[heap[0][2]].token != heap[0][1]):
            heapq.heappop(heap)

    def remove(self, schedule_id: str) -> bool:
        entry = self._entries.pop(schedule_id, None)
        if entry is None:
            return False
        self._bytes -= entry.spec.weight
        self._prune()
        self._note(schedule_id)
        return True

    def next_due(self) -> float:
        """Wall-clock time (epoch seconds) of the earliest tick; inf when none."""
        self._prune()
        return self._heap[0][0] if self._heap else math.inf

    def due(self, limit: int = MAX_RUNS_PER_TURN) -> list[tuple[ScheduleSpec, float]]:
        """Each schedule whose tick has come, with the tick it runs for, once.

        A schedule that missed several ticks runs for the first one missed
        and moves to its first tick after now: missed ticks run once.  At
        most ``limit`` runs; past that, the rest stay due for the next call.
        """
        now = self._wall()
        runs: list[tuple[ScheduleSpec, float]] = []
        heap = self._heap
        while heap and heap[0][0] <= now and len(runs) < limit:
            _, token, schedule_id = heapq.heappop(heap)
            entry = self._entries.get(schedule_id)
            if entry is None or entry.token != token:
                continue  # removed or replaced
            tick = entry.next_due
            runs.append((entry.spec, tick))
            entry.last_run = tick
            try:
                entry.next_due = self._following(entry, tick, now)
            except Exception:  # croniter found no later tick: the schedule is spent
                entry.next_due = math.inf
            self._place(entry)
            self._note(schedule_id)
        self._prune()
        self.stats["runs"] += len(runs)
        return runs

    def _following(self, entry: _Entry, tick: float, now: float) -> float:
        """The schedule's first tick after ``now``, counting a collapse of missed ticks."""
        rule = entry.spec.rule
        if rule.interval is not None:
            if rule.next_after(tick, entry.anchor) <= now:
                self.stats["collapsed"] += 1  # this run stands for several ticks
            return rule.next_after(now, entry.anchor)
        ticks = entry.ticks
        if ticks is None:
            ticks = entry.ticks = rule.cron_ticks(tick)
        following = float(ticks.get_next(float))
        if following > now:
            return following
        self.stats["collapsed"] += 1
        ticks = entry.ticks = rule.cron_ticks(now)
        return float(ticks.get_next(float))

    def listing(self) -> Iterator[list[Any]]:
        """``[ScheduleWire, next_run, last_run, source]`` per schedule, by id, made as
        they are taken (a reply stops taking when its message is full)."""
        for key in sorted(self._entries):
            e = self._entries[key]
            yield [
                e.spec.to_wire(),
                None if e.next_due == math.inf else e.next_due,
                e.last_run,
                e.spec.source,
            ]

    # -- state for a journal ----------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Every schedule and where it stands, as plain CBOR-able values."""
        return {
            "version": _STATE_VERSION,
            "schedules": [
                _entry_state(e) for e in self._entries.values() if e.next_due != math.inf
            ],
        }

    def watch(self) -> None:
        """Record which schedules change from now on, for ``take_changes`` (a journal)."""
        self._changed = set()

    def _note(self, schedule_id: str) -> None:
        if self._changed is not None:
            self._changed.add(schedule_id)

    def take_changes(self) -> list[tuple[str, dict[str, Any] | None]]:
        """``(id, state)`` per schedule changed since the last call: a ``to_state`` holding
        that one schedule, or None when it is gone (removed, or spent: no tick left).

        Only after ``watch()``; the changes are forgotten once taken.
        """
        changed = self._changed
        if not changed:
            return []
        self._changed = set()
        out: list[tuple[str, dict[str, Any] | None]] = []
        for schedule_id in changed:
            entry = self._entries.get(schedule_id)
            if entry is None or entry.next_due == math.inf:
                out.append((schedule_id, None))
            else:
                out.append(
                    (schedule_id, {"version": _STATE_VERSION, "schedules": [_entry_state(entry)]})
                )
        return out

    @classmethod
    def from_state(
        cls, state: Any, config: SchedulesConfig, *, wall_clock: Callable[[], float]
    ) -> Schedules:
        """The schedules ``to_state`` saved, next ticks as they were (so missed ones run once).

        An entry that no longer passes the checks (say, a time zone this
        machine does not know) is dropped and counted, not fatal.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("not a schedules state this version can read")
        return cls.from_states([state], config, wall_clock=wall_clock)

    @classmethod
    def from_states(
        cls, states: Iterable[Any], config: SchedulesConfig, *, wall_clock: Callable[[], float]
    ) -> Schedules:
        """``from_state`` over several saved states (one per schedule, as a journal keeps
        them); a state of another version counts as unreadable, it does not stop the rest."""
        schedules = cls(config, wall_clock=wall_clock)
        items: list[Any] = []
        for state in states:
            if isinstance(state, dict) and state.get("version") == _STATE_VERSION:
                items.extend(state.get("schedules") or [])
            else:
                schedules.stats["unreadable"] += 1
        for item in items:
            try:
                wire, source, anchor, next_due, last_run = item
                spec = ScheduleSpec.from_wire(wire, source)
                if not all(type(v) in (int, float) for v in (anchor, next_due)):
                    raise ValueError("times must be numbers")
                if last_run is not None and type(last_run) not in (int, float):
                    raise ValueError("last run must be a number or null")
            except (ValueError, TypeError):
                schedules.stats["unreadable"] += 1
                continue
            if spec.schedule_id in schedules._entries:
                continue
            if len(schedules) >= config.max_schedules:
                schedules.stats["refused"] += 1
                continue
            schedules._place(
                _Entry(
                    spec,
                    float(anchor),
                    float(next_due),
                    None if last_run is None else float(last_run),
                )
            )
            schedules._bytes += spec.weight
        return schedules

    def audit(self) -> list[str]:
        """Broken invariants, as text (empty when sound); for tests."""
        problems = []
        weight = sum(e.spec.weight for e in self._entries.values())
        if weight != self._bytes:
            problems.append(f"bytes {self._bytes} but schedules weigh {weight}")
        if len(self._entries) > self.config.max_schedules:
            problems.append("over max_schedules")
        expected = min((e.next_due for e in self._entries.values()), default=math.inf)
        if expected != self.next_due():
            problems.append(f"next due {self.next_due()} but earliest is {expected}")
        live = {(e.next_due, e.token, key) for key, e in self._entries.items()}
        if not live <= set(self._heap):
            problems.append("a schedule is missing from the heap")
        for key, e in self._entries.items():
            if key != e.spec.schedule_id:
                problems.append(f"{key} holds {e.spec.schedule_id}")
        return problems
