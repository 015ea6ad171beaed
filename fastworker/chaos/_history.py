"""What a campaign saw: every client operation, every task, every fault, every run.

The campaign fills a ``History`` as it goes; ``fastworker.chaos._check``
judges it afterwards, with no I/O, so the rules are tested on histories
written by hand.  Times are epoch seconds (``time.time()``) everywhere, so
they compare with the run log the tasks write and the nodes' log lines.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["Fault", "History", "Observation", "Op", "TaskRecord"]


@attrs.define
class Op:
    """One call a client made, and how it ended."""

    client: str  # "c<slot>#<generation>"
    kind: str  # delay, submit_batch, submit_task, apply_async, cancel, query, probe, burst, ...
    started: float
    ended: float | None = None
    timeout: float | None = None  # the bound the caller gave; None for calls that never wait
    outcome: str = "pending"  # ok, rejected, error, timeout, abandoned
    detail: str = ""
    keys: list[str] = attrs.Factory(list)


@attrs.define
class Observation:
    """A final result of a task, as one path (push, query, submit_task) showed it."""

    at: float
    via: str
    status: str
    value: Any = None
    error: str | None = None
    task_id: str | None = None  # the id the result named


@attrs.define(eq=False)  # identity: the campaign keeps records in sets
class TaskRecord:
    """A task a client submitted, keyed by the campaign-unique ``key`` in its arguments."""

    key: str
    kind: str  # see _check.KINDS
    name: str
    client: str
    submitted_at: float
    max_retries: int = 0
    expect: Any = None  # the value a SUCCESS must carry
    task_id: str | None = None
    acked: bool = False
    cancel_sent: bool = False
    cancel_took: bool = False  # cancel_task returned True
    owner_gone_at: float | None = None  # every client that knew this task stopped then
    untracked: bool = False  # submit_task raised or was interrupted: its id never came back
    finals: list[Observation] = attrs.Factory(list)

    @property
    def final(self) -> Observation | None:
        return self.finals[0] if self.finals else None


@attrs.define
class Fault:
    """An injected fault or an event that can requeue tasks, with the time it was active."""

    kind: str  # kill9, sigstop, net-<mode>, cp-kill, cp-term, client-restart, burst,
    #            crash-run, declared-dead, recycle (the last three read from runs and logs)
    target: str
    start: float
    end: float
    requeues: bool  # can it make a task held by a worker run again?
    pids: list[int] = attrs.Factory(list)  # the worker processes it hit; empty: all of them


@attrs.define
class History:
    started: float
    ended: float = 0.0
    seed: int = 0
    ops: list[Op] = attrs.Factory(list)
    tasks: dict[str, TaskRecord] = attrs.Factory(dict)
    faults: list[Fault] = attrs.Factory(list)
    runs: dict[str, list[tuple[float, int]]] = attrs.Factory(dict)  # key → (start, pid) per run
    probes: list[tuple[str, Any]] = attrs.Factory(list)  # (unknown id, what a query returned)
    strays: list[tuple[str, str]] = attrs.Factory(list)  # (client, id it got a result for
    #                                                       but never submitted)
    health: list[str] = attrs.Factory(list)  # problems found by the health checks
    figures: dict[str, Any] = attrs.Factory(dict)  # measured numbers (RSS, ...)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)
