"""TaskMetrics stays bounded whatever names and failures clients and tasks produce."""

from __future__ import annotations

from fastworker.control._task_metrics import (
    MAX_FAILURES,
    MAX_NAMES,
    MAX_TEXT,
    OTHER_NAMES,
    TIMELINE_SECONDS,
    TaskMetrics,
)
from fastworker.wire import ResultRecord


def result(name: str, status: str = "success", *, traceback: str | None = None) -> ResultRecord:
    return ResultRecord("id-" + name, status, None, "err", 10.0, 10.5, 1, traceback, 0, name, None)


def test_names_beyond_the_bound_share_one_label() -> None:
    metrics = TaskMetrics()
    for i in range(MAX_NAMES + 50):
        metrics.accepted(f"name-{i}")
        metrics.finished([result(f"name-{i}")], [0.0], 0.25, 1000.0)
    snapshot = metrics.snapshot()
    assert len(snapshot["tasks"]) == MAX_NAMES + 1
    assert snapshot["tasks"][OTHER_NAMES]["accepted"] == 50
    assert snapshot["tasks"][OTHER_NAMES]["succeeded"] == 50
    assert snapshot["round_trip"][OTHER_NAMES]["count"] == 50
    assert snapshot["run_time"]["name-0"]["sum"] == 0.5


def test_failures_are_a_ring_with_clipped_texts() -> None:
    metrics = TaskMetrics()
    huge = "x" * (MAX_TEXT * 4)
    for i in range(MAX_FAILURES + 20):
        metrics.finished([result(f"f{i}", "failure", traceback=huge)], [0.0], 1.0, 1000.0 + i)
    failures = metrics.recent_failures()
    assert len(failures) == MAX_FAILURES
    assert failures[0]["name"] == "f20"  # the oldest went first
    assert len(failures[-1]["traceback"]) < MAX_TEXT + 100
    assert "truncated" in failures[-1]["traceback"]


def test_timeline_keeps_one_point_per_second_for_a_bounded_time() -> None:
    metrics = TaskMetrics()
    for second in range(TIMELINE_SECONDS + 30):
        metrics.finished([result("a"), result("b", "failure")], [0.0, 0.0], 2.0, second + 0.5)
    timeline = metrics.snapshot()["timeline"]
    assert len(timeline) == TIMELINE_SECONDS
    assert timeline[-1] == [float(TIMELINE_SECONDS + 29), 1, 1, 2, 4.0, 2.0]
