"""Judging a campaign's history: the five kinds of violation (design/chaos.md).

Pure functions of a ``History``: no clock, no I/O.

* **lost** — a task not final at the end although somebody was bound to
  finish it: it was acknowledged (or is still held by a live client), and no
  control-plane restart came after every client that knew it had stopped.
* **duplicated** — a task run more often than at-least-once allows:
  ``runs > (max_retries + 1) × (1 + requeuing events while it was held)``.
* **unexpected** — a final result that cannot be right: a wrong or crossed
  value, a success of a task that never succeeds, an error that is neither the
  task's own nor one the system documents, CANCELLED without a cancel, a
  cancel that took effect without CANCELLED, two finals that disagree, a run
  of a key nobody submitted, an answer about an id nobody submitted.
* **hung** — a caller that waited past its own timeout (plus slack).
* **health** — problems the campaign found in the processes (gave up, RSS).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs

from ._history import History, Observation, TaskRecord

__all__ = [
    "INSTANT_BOUND",
    "KINDS",
    "RESUBMIT_WINDOW",
    "SYSTEM_ERRORS",
    "TIMEOUT_SLACK",
    "VIOLATION_KINDS",
    "KindRule",
    "Verdict",
    "Violation",
    "check",
    "must_finish",
    "outcome_class",
]

VIOLATION_KINDS = ("lost", "duplicated", "unexpected", "hung", "health")

# A caller may wait this much past its own timeout before it counts as hung:
# the campaign shares two cores with its nodes, so wake-ups come late.
TIMEOUT_SLACK = 2.0
# Calls that must return without waiting for the network (delay, stop, ...).
INSTANT_BOUND = 3.0
# A client that stops this soon after a control-plane restart may not have had
# its re-submission acknowledged by the new instance yet (it re-sends after
# 1, 2, 4 and 8 s before it gives up): its tasks may be lost with it.
RESUBMIT_WINDOW = 15.0
# Slack around a task's window when counting the events that could requeue it
# (the poller sees a final up to a tick late; log lines have millisecond times).
WINDOW_SLACK = 1.0

# Failures the system itself reports, allowed for any task (README, reliability.md).
SYSTEM_ERRORS = {
    "rejected": "rejected by the control plane (queue_full)",
    "unacknowledged": "did not acknowledge the submission",
    "poison": "poison task",
    "gone": "no longer in the control plane's cache",
}


@attrs.frozen
class KindRule:
    """What a task of one kind may end with."""

    succeeds: bool  # a SUCCESS is right (with the expected value)
    own_errors: tuple[str, ...] = ()  # substrings of the failures the task causes itself


KINDS: dict[str, KindRule] = {
    "ok": KindRule(True),
    "aio": KindRule(True),
    "block": KindRule(True),
    "large": KindRule(True),
    "flaky": KindRule(True),
    "burst": KindRule(True),
    "fail": KindRule(False, ("ChaosFailure",)),
    "timeout": KindRule(False, ("time limit",)),
    "stuck": KindRule(False, ("time limit",)),
    "crash": KindRule(False, ("poison task",)),
}


@attrs.frozen
class Violation:
    kind: str
    subject: str  # a task key, an op, a process
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


@attrs.define
class Verdict:
    violations: list[Violation] = attrs.Factory(list)
    outcomes: Counter[str] = attrs.Factory(Counter)
    superseded: int = 0  # client-made "not acknowledged" failures a real result followed

    def by_kind(self) -> dict[str, int]:
        counts = Counter(v.kind for v in self.violations)
        return {kind: counts.get(kind, 0) for kind in VIOLATION_KINDS}


def outcome_class(task: TaskRecord) -> str:
    """success, failed (the task's own failure), cancelled, rejected, unacknowledged, poison,
    gone, unfinished, or untracked (submit_task never told its id)."""
    final = task.final
    if final is None:
        return "untracked" if task.untracked else "unfinished"
    if final.status == "success":
        return "success"
    if final.status == "cancelled":
        return "cancelled"
    error = final.error or ""
    rule = KINDS.get(task.kind)
    if rule is not None and any(mark in error for mark in rule.own_errors):
        return "failed"
    for name, mark in SYSTEM_ERRORS.items():
        if mark in error:
            return name
    return "failed"


def check(history: History) -> Verdict:
    verdict = Verdict()
    out = verdict.violations
    for task in history.tasks.values():
        verdict.outcomes[outcome_class(task)] += 1
        _check_lost(history, task, out)
        _check_runs(history, task, out)
        verdict.superseded += _check_finals(task, out)
    _check_ids(history, out)
    _check_ops(history, out)
    for key in sorted(set(history.runs) - set(history.tasks)):
        out.append(Violation("unexpected", key, "a run of a key no client submitted"))
    for task_id, answer in history.probes:
        if answer is not None:
            out.append(
                Violation("unexpected", task_id, f"a query for an unknown id answered {answer!r}")
            )
    for client, task_id in history.strays:
        out.append(
            Violation("unexpected", task_id, f"{client} got a result for an id it never submitted")
        )
    for problem in history.health:
        out.append(Violation("health", "processes", problem))
    return verdict


def _restart_after(history: History, moment: float) -> bool:
    """Did a control-plane restart end after ``moment - RESUBMIT_WINDOW``?"""
    return any(
        f.kind.startswith("cp-") and f.end + RESUBMIT_WINDOW >= moment for f in history.faults
    )


def must_finish(history: History, task: TaskRecord) -> bool:
    """Whether ``task`` must become final: a live client holds it, or it was acknowledged
    and no control-plane restart came after its client stopped."""
    if task.untracked:
        return False
    if task.owner_gone_at is None:
        return True
    return task.acked and not _restart_after(history, task.owner_gone_at)


def _check_lost(history: History, task: TaskRecord, out: list[Violation]) -> None:
    if task.final is not None or not must_finish(history, task):
        return
    if task.owner_gone_at is None:
        state = "acknowledged" if task.acked else "held by its live client"
        out.append(Violation("lost", task.key, f"{task.kind} {task.task_id}: {state}, never final"))
        return
    out.append(
        Violation(
            "lost",
            task.key,
            f"{task.kind} {task.task_id}: acknowledged, its client stopped at "
            f"{task.owner_gone_at - history.started:.1f} s with no control-plane restart "
            f"after, never final",
        )
    )


def requeuing_events(history: History, start: float, end: float, pids: set[int]) -> int:
    """Events that could have made a task held in [start, end] and run by ``pids`` run again.

    A run is repeated only when the worker process that started it is lost to
    the control plane (killed, stopped, cut off, recycled) or the control plane
    restarts: an event that hit other workers cannot repeat it.
    """
    lo, hi = start - WINDOW_SLACK, end + WINDOW_SLACK
    return sum(
        1
        for f in history.faults
        if f.requeues and f.start <= hi and f.end >= lo and (not f.pids or pids & set(f.pids))
    )


def allowed_runs(history: History, task: TaskRecord) -> int:
    final = task.final
    end = final.at if final is not None else history.ended
    pids = {pid for _, pid in history.runs.get(task.key, [])}
    return (task.max_retries + 1) * (1 + requeuing_events(history, task.submitted_at, end, pids))


def _check_runs(history: History, task: TaskRecord, out: list[Violation]) -> None:
    runs = history.runs.get(task.key, [])
    allowed = allowed_runs(history, task)
    if len(runs) > allowed:
        when = ", ".join(f"{t - history.started:.2f} s on {pid}" for t, pid in runs)
        out.append(
            Violation(
                "duplicated",
                task.key,
                f"{task.kind} {task.task_id}: {len(runs)} runs (at {when}), at most "
                f"{allowed} allowed",
            )
        )


def _check_finals(task: TaskRecord, out: list[Violation]) -> int:
    """Judge the first final and compare the others with it; returns 1 if it was superseded."""
    first = task.final
    if first is None:
        return 0
    problem = _judge(task, first)
    if problem:
        out.append(Violation("unexpected", task.key, f"{task.kind} {task.task_id}: {problem}"))
    superseded = 0
    for later in task.finals[1:]:
        if (later.status, later.value, later.error) == (first.status, first.value, first.error):
            continue
        if SYSTEM_ERRORS["unacknowledged"] in (first.error or "") and not _judge(task, later):
            superseded = 1  # the client gave up on the ack; the task still ran: documented
            continue
        out.append(
            Violation(
                "unexpected",
                task.key,
                f"{task.kind} {task.task_id}: final {_show(first)} via {first.via}, later "
                f"{_show(later)} via {later.via}",
            )
        )
    return superseded


def _show(obs: Observation) -> str:
    if obs.status == "success":
        return f"success {_short(obs.value)}"
    return f"{obs.status} {_short(obs.error)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _judge(task: TaskRecord, obs: Observation) -> str:
    """Why ``obs`` cannot be a right final result of ``task`` ('' when it can)."""
    if obs.task_id is not None and task.task_id is not None and obs.task_id != task.task_id:
        return f"a result naming another task id {obs.task_id}"
    rule = KINDS.get(task.kind)
    if rule is None:
        return f"unknown task kind {task.kind!r}"
    if task.cancel_took and obs.status != "cancelled":
        return f"cancel_task returned True but the final is {_show(obs)}"
    if obs.status == "success":
        if not rule.succeeds:
            return f"a {task.kind} task cannot succeed, got {_show(obs)}"
        if obs.value != task.expect:
            return f"wrong value {_short(obs.value)}, expected {_short(task.expect)}"
        return ""
    if obs.status == "cancelled":
        return "" if task.cancel_sent else "cancelled although nobody cancelled it"
    if obs.status == "failure":
        error = obs.error or ""
        if any(mark in error for mark in rule.own_errors):
            return ""
        if any(mark in error for mark in SYSTEM_ERRORS.values()):
            return ""
        return f"an unexplained failure {_short(error)}"
    return f"a non-final status {obs.status!r} reported as final"


def _check_ids(history: History, out: list[Violation]) -> None:
    seen: dict[str, str] = {}
    for task in history.tasks.values():
        if task.task_id is None:
            continue
        other = seen.setdefault(task.task_id, task.key)
        if other != task.key:
            out.append(
                Violation("unexpected", task.key, f"task id {task.task_id} also given to {other}")
            )


def _check_ops(history: History, out: list[Violation]) -> None:
    for op in history.ops:
        label = f"{op.client} {op.kind} at {op.started - history.started:.2f} s"
        if op.outcome == "abandoned":
            out.append(Violation("hung", label, f"still waiting when abandoned ({op.detail})"))
            continue
        if op.ended is None:
            continue
        took = op.ended - op.started
        bound = INSTANT_BOUND if op.timeout is None else op.timeout + TIMEOUT_SLACK
        if took > bound:
            out.append(
                Violation("hung", label, f"took {took:.2f} s, bound {bound:g} s ({op.outcome})")
            )
