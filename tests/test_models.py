"""Tests for fastworker.tasks.models: priorities, statuses and the user-facing records."""

from __future__ import annotations

import datetime as dt

import attrs
import pytest

import fastworker
from fastworker.tasks.models import CallbackInfo, Task, TaskPriority, TaskResult, TaskStatus

pytestmark = pytest.mark.timeout(10)

NOW = dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.UTC)


def test_documented_import_paths() -> None:
    from fastworker.tasks.models import TaskPriority as FromModels

    assert FromModels is TaskPriority is fastworker.TaskPriority
    assert fastworker.TaskStatus is TaskStatus
    assert fastworker.Task is Task
    assert fastworker.TaskResult is TaskResult
    assert fastworker.CallbackInfo is CallbackInfo


# -- TaskPriority ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["high", "HIGH", "High"])
def test_priority_from_either_case(text: str) -> None:
    assert TaskPriority(text) is TaskPriority.HIGH
    assert TaskPriority.coerce(text) is TaskPriority.HIGH


def test_priority_values_are_lowercase_names_in_dispatch_order() -> None:
    assert [p.value for p in TaskPriority] == ["critical", "high", "normal", "low"]
    assert [p.rank for p in TaskPriority] == [0, 1, 2, 3]
    assert all(TaskPriority.from_rank(p.rank) is p for p in TaskPriority)
    assert isinstance(TaskPriority.HIGH, str)  # a StrEnum: compares and formats as its value
    assert TaskPriority.HIGH == "high"  # type: ignore[comparison-overlap]
    assert f"{TaskPriority.LOW}" == "low"


@pytest.mark.parametrize("bogus", ["bogus", "", "urgent", 3, None])
def test_coerce_unknown_priority_lists_the_valid_ones(bogus: object) -> None:
    with pytest.raises(ValueError, match="unknown priority") as info:
        TaskPriority.coerce(bogus)  # type: ignore[arg-type]
    message = str(info.value)
    for priority in TaskPriority:
        assert repr(priority.value) in message
    assert repr(bogus) in message


def test_coerce_passes_members_through() -> None:
    assert TaskPriority.coerce(TaskPriority.CRITICAL) is TaskPriority.CRITICAL


def test_plain_constructor_rejects_unknown_priority() -> None:
    with pytest.raises(ValueError, match="bogus"):
        TaskPriority("bogus")


# -- TaskStatus --------------------------------------------------------------------


def test_status_members_and_lowercase_values() -> None:
    names = {s.name for s in TaskStatus}
    assert {
        "PENDING",
        "SCHEDULED",
        "QUEUED",
        "RUNNING",
        "SUCCESS",
        "FAILURE",
        "RETRYING",
        "CANCELLED",
    } <= names
    for status in TaskStatus:
        assert status.value == status.name.lower()
        assert TaskStatus(status.value) is status


def test_only_success_failure_and_cancelled_are_final() -> None:
    final = {s for s in TaskStatus if s.is_final}
    assert final == {TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.CANCELLED}


# -- TaskResult ----------------------------------------------------------------------


def test_task_result_converts_status_strings_and_reports_ok() -> None:
    result = TaskResult(task_id="t1", status="success", result=3, started_at=NOW, completed_at=NOW)
    assert result.status is TaskStatus.SUCCESS
    assert result.ok
    failed = TaskResult(task_id="t1", status=TaskStatus.FAILURE, error="ValueError: x")
    assert not failed.ok
    assert failed.status.is_final


@pytest.mark.parametrize("field", ["started_at", "completed_at"])
def test_task_result_rejects_naive_datetimes_with_a_clear_error(field: str) -> None:
    naive = dt.datetime(2024, 1, 1, 12, 0)
    with pytest.raises(ValueError, match="timezone-aware") as info:
        TaskResult(task_id="t1", status="success", **{field: naive})  # type: ignore[arg-type]
    assert "naive" in str(info.value)


def test_task_result_accepts_any_aware_timezone() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    result = TaskResult(task_id="t1", status="running", started_at=NOW.astimezone(plus_two))
    assert result.started_at == NOW


def test_task_result_rejects_empty_task_id_and_unknown_status() -> None:
    with pytest.raises(ValueError, match="task_id"):
        TaskResult(task_id="", status="success")
    with pytest.raises(ValueError, match="exploded"):
        TaskResult(task_id="t1", status="exploded")


def test_task_result_is_frozen() -> None:
    result = TaskResult(task_id="t1", status="success")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.status = TaskStatus.FAILURE  # type: ignore[misc]


# -- CallbackInfo ------------------------------------------------------------------------


def test_callback_info_accepts_zeromq_endpoints() -> None:
    info = CallbackInfo(address="tcp://127.0.0.1:6000", data={"order": 7})
    assert (info.address, info.data) == ("tcp://127.0.0.1:6000", {"order": 7})
    assert CallbackInfo("ipc:///tmp/cb.sock").data is None


@pytest.mark.parametrize("address", ["127.0.0.1:6000", "localhost", "tcp:/x:1"])
def test_callback_info_rejects_an_address_without_scheme(address: str) -> None:
    with pytest.raises(ValueError, match="not a ZeroMQ endpoint") as info:
        CallbackInfo(address=address)
    assert "tcp://" in str(info.value)  # the error shows what an endpoint looks like


@pytest.mark.parametrize("address", ["", None, 6000])
def test_callback_info_rejects_empty_or_non_string_address(address: object) -> None:
    with pytest.raises(ValueError, match="address"):
        CallbackInfo(address=address)  # type: ignore[arg-type]


# -- Task ----------------------------------------------------------------------------------


def test_task_defaults() -> None:
    task = Task(task_id="t1", name="add")
    assert (task.args, task.kwargs, task.priority) == ((), {}, TaskPriority.NORMAL)
    assert (task.callback, task.timeout, task.attempt) == (None, None, 1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("high", TaskPriority.HIGH),
        ("LOW", TaskPriority.LOW),
        (TaskPriority.CRITICAL, TaskPriority.CRITICAL),
    ],
)
def test_task_coerces_priority(given: str | TaskPriority, expected: TaskPriority) -> None:
    assert Task(task_id="t1", name="add", priority=given).priority is expected


def test_task_rejects_unknown_priority_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown priority 'urgent'; expected one of 'critical'"):
        Task(task_id="t1", name="add", priority="urgent")


def test_task_turns_args_into_a_tuple_and_keeps_callback() -> None:
    callback = CallbackInfo("tcp://127.0.0.1:6000", data=[1])
    task = Task(task_id="t1", name="add", args=[1, 2], kwargs={"c": 3}, callback=callback)  # type: ignore[list-item]
    assert task.args == (1, 2)
    assert task.kwargs == {"c": 3}
    assert task.callback is callback


@pytest.mark.parametrize(("task_id", "name"), [("", "add"), ("t1", ""), (None, "add")])
def test_task_rejects_empty_id_or_name(task_id: object, name: object) -> None:
    with pytest.raises(ValueError, match="non-empty string"):
        Task(task_id=task_id, name=name)  # type: ignore[arg-type]
