"""The one byte-splitting rule: chunks fit the budget, order is kept, oversize is reported."""

from __future__ import annotations

import cbor2
from hypothesis import given
from hypothesis import strategies as st

from fastworker.wire import (
    ResultRecord,
    TaskEnvelope,
    result_weight,
    split_by_bytes,
    task_weight,
)

_text = st.text(max_size=40)
_options = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "cb": _text,
        "cbd": st.binary(max_size=200),
        "eta": st.floats(0, 1e10),
        "timeout": st.integers(0, 2**40),
        "max_retries": st.integers(0, 2**62),
    },
)
_tasks = st.builds(
    TaskEnvelope,
    task_id=_text.filter(bool),
    name=_text.filter(bool),
    priority=st.integers(0, 3),
    format=st.integers(0, 2),
    payload=st.binary(max_size=3000),
    options=_options,
)
_results = st.builds(
    ResultRecord,
    task_id=_text.filter(bool),
    status=st.sampled_from(["success", "failure", "retrying"]),
    result=st.none() | st.binary(max_size=3000),
    error=st.none() | _text,
    started_at=st.none() | st.floats(0, 1e10),
    completed_at=st.none() | st.floats(0, 1e10),
    attempts=st.integers(0, 2**40),
    traceback=st.none() | st.text(max_size=500),
    format=st.integers(0, 2),
    name=_text,
    retry_delay=st.none() | st.floats(0, 1e6),
)


@given(st.lists(_tasks, max_size=30))
def test_task_weight_bounds_the_encoded_size(tasks: list[TaskEnvelope]) -> None:
    for task in tasks:
        assert len(cbor2.dumps(task)) <= task_weight(task)


@given(st.lists(_results, max_size=30))
def test_result_weight_bounds_the_encoded_size(results: list[ResultRecord]) -> None:
    for result in results:
        assert len(cbor2.dumps(result)) <= result_weight(result)


@given(st.lists(_tasks, max_size=40), st.integers(200, 20_000))
def test_chunks_fit_the_budget_keep_order_and_report_oversize(
    tasks: list[TaskEnvelope], budget: int
) -> None:
    too_big: list[TaskEnvelope] = []
    chunks = split_by_bytes(tasks, task_weight, budget, too_big.append)
    for chunk in chunks:
        assert chunk
        assert len(cbor2.dumps(chunk)) <= budget + 9  # the array's own header
    sent = [t for chunk in chunks for t in chunk]
    assert sent == [t for t in tasks if task_weight(t) <= budget]
    assert too_big == [t for t in tasks if task_weight(t) > budget]
