"""Tests for fastworker.wire: the message codec and the TaskWire/ResultWire records."""

from __future__ import annotations

import datetime as dt
import resource
import time
from typing import Any

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastworker import wire
from fastworker.tasks.models import TaskPriority, TaskResult, TaskStatus
from fastworker.tasks.serializer import SerializationFormat, dumps
from fastworker.wire import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    TASK_OPTIONS,
    WIRE_ERROR_REASONS,
    Dispatch,
    ErrorReply,
    HeartbeatAck,
    Lookup,
    LookupReply,
    Message,
    Ready,
    ResultRecord,
    Submit,
    TaskEnvelope,
    WireError,
    decode,
    encode,
)

pytestmark = pytest.mark.timeout(20)

# A valid sample for each accepted-type tuple used in Message.FIELDS.
SAMPLES: dict[tuple[type, ...], Any] = {
    (int,): 7,
    (str,): "abc-✓",
    (float, int): 2.5,
    (list,): [["t1", "add", 2, 0, b"[[1,2],{}]", None], "x"],
    (dict,): {"queued": 3, "nested": {"k": [1.5]}},
    (bool,): True,
    (list, type(None)): ["t1", "t2"],
    (int, type(None)): 12,
}

# A value of a wrong type for each accepted-type tuple: bool where int is expected included.
WRONG: dict[tuple[type, ...], list[Any]] = {
    (int,): [True, 1.0, "1", None, [1]],
    (str,): [b"abc", 1, None, ["a"]],
    (float, int): [True, "1.0", None],
    (list,): [{"a": 1}, "abc", b"", None],
    (dict,): [[("a", 1)], None, "d"],
    (bool,): [1, 0, "true", None],
    (list, type(None)): [{"a": 1}, "abc", b"", 0],
    (int, type(None)): [True, 1.0, "1", [1]],
}


def sample(cls: type[Message]) -> Message:
    return cls(*(SAMPLES[types] for _, types in cls.FIELDS))


def frame(*body: Any) -> bytes:
    return cbor2.dumps(list(body))


def reason_of(data: bytes) -> str:
    with pytest.raises(WireError) as info:
        decode(data)
    assert info.value.reason in WIRE_ERROR_REASONS
    return info.value.reason


# -- the protocol's shape -------------------------------------------------------


def test_every_field_type_has_a_sample() -> None:
    used = {types for cls in MESSAGE_TYPES.values() for _, types in cls.FIELDS}
    assert used <= SAMPLES.keys()
    assert used <= WRONG.keys()


def test_message_types_are_frozen_and_tagged_consistently() -> None:
    for tag, cls in MESSAGE_TYPES.items():
        assert tag == cls.TAG
        assert [f.name for f in attrs.fields(cls)] == [name for name, _ in cls.FIELDS]  # type: ignore[arg-type]
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            setattr(sample(cls), cls.FIELDS[0][0], None)


def test_wire_error_is_a_value_error_with_a_reason() -> None:
    err = WireError("malformed", "nope")
    assert isinstance(err, ValueError)
    assert (err.reason, str(err)) == ("malformed", "nope")


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_every_message_round_trips(cls: type[Message]) -> None:
    message = sample(cls)
    data = encode(message)
    assert type(data) is bytes
    back = decode(data)
    assert type(back) is cls
    assert back == message


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_frame_is_a_plain_cbor_array_of_version_tag_and_fields(cls: type[Message]) -> None:
    # What another-language implementation reads: [1, tag, *fields] in FIELDS order.
    message = sample(cls)
    body = cbor2.loads(encode(message))
    assert body == [PROTOCOL_VERSION, cls.TAG, *(getattr(message, n) for n, _ in cls.FIELDS)]


def test_a_frame_built_by_hand_decodes() -> None:
    assert decode(frame(PROTOCOL_VERSION, 1, 42)) == Lookup(request_id=42)
    assert decode(frame(PROTOCOL_VERSION, 13, "inst", False)) == HeartbeatAck(
        instance_id="inst", known=False
    )


def test_float_fields_accept_integers() -> None:
    reply = decode(frame(PROTOCOL_VERSION, LookupReply.TAG, 5, "i", "tcp://h:1", 3, 1 << 20))
    assert reply == LookupReply(5, "i", "tcp://h:1", 3, 1 << 20)


def test_unicode_and_big_request_ids_survive() -> None:
    message = ErrorReply(request_id=2**63 - 1, reason="invalid", message="bad 🐍 input")
    assert decode(encode(message)) == message


# -- what decode rejects ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff", b"\x83\x01", b"\x1c", b"\x7f\x61"],
    ids=["empty", "break", "short-array", "reserved-info", "unterminated-text"],
)
def test_not_cbor_is_malformed(data: bytes) -> None:
    assert reason_of(data) == "malformed"


@pytest.mark.parametrize("body", [{}, {"v": 1}, 1, "frame", b"\x01", None, [], [1]], ids=repr)
def test_cbor_that_is_not_a_version_tag_array_is_malformed(body: Any) -> None:
    assert reason_of(cbor2.dumps(body)) == "malformed"


@pytest.mark.parametrize("version", [0, 1, 3, -1, "2", 2.0, True, None, [2], 2**70], ids=repr)
def test_wrong_version_is_rejected(version: Any) -> None:
    assert reason_of(frame(version, Lookup.TAG, 1)) == "version"


@pytest.mark.parametrize("tag", [0, 3, 99, -1, "1", 1.0, True, None, 2**70], ids=repr)
def test_unknown_tag_is_rejected(tag: Any) -> None:
    assert reason_of(frame(PROTOCOL_VERSION, tag, 1)) == "unknown_type"


def test_a_bignum_version_or_tag_is_still_a_wire_error() -> None:
    # repr() of an int past 4300 digits raises ValueError; it must not escape.
    huge = 10**5000
    assert reason_of(frame(huge, 1, 1)) == "version"
    assert reason_of(frame(PROTOCOL_VERSION, huge, 1)) == "unknown_type"


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
def test_wrong_field_count_is_bad_fields(cls: type[Message]) -> None:
    values = [SAMPLES[types] for _, types in cls.FIELDS]
    assert reason_of(frame(PROTOCOL_VERSION, cls.TAG, *values[: cls.REQUIRED - 1])) == "bad_fields"
    assert reason_of(frame(PROTOCOL_VERSION, cls.TAG, *values, 0)) == "bad_fields"


def test_fields_added_later_may_be_left_off_and_take_their_defaults() -> None:
    """Dispatch.number and Ready.seen came after peers spoke both: a frame without
    them is read with null (ours always sends them)."""
    assert decode(frame(PROTOCOL_VERSION, Dispatch.TAG, [])) == Dispatch([], None)
    assert decode(frame(PROTOCOL_VERSION, Ready.TAG, 8, None)) == Ready(8, None, None)
    assert decode(encode(Ready(8, ["t"], 3))) == Ready(8, ["t"], 3)
    assert [cls.__name__ for cls in MESSAGE_TYPES.values() if len(cls.FIELDS) > cls.REQUIRED] == [
        "Ready",
        "Dispatch",
    ]


_WRONG_CASES = [
    pytest.param(cls, index, bad, id=f"{cls.__name__}.{name}={bad!r}")
    for cls in MESSAGE_TYPES.values()
    for index, (name, types) in enumerate(cls.FIELDS)
    for bad in WRONG[types]
]


@pytest.mark.parametrize(("cls", "index", "bad"), _WRONG_CASES)
def test_wrong_field_type_is_bad_fields(cls: type[Message], index: int, bad: Any) -> None:
    values = [SAMPLES[types] for _, types in cls.FIELDS]
    values[index] = bad
    with pytest.raises(WireError) as info:
        decode(frame(PROTOCOL_VERSION, cls.TAG, *values))
    assert info.value.reason == "bad_fields"
    assert cls.FIELDS[index][0] in str(info.value)


def test_bool_is_not_accepted_as_a_request_id() -> None:
    with pytest.raises(WireError, match=r"Lookup\.request_id has type bool") as info:
        decode(frame(PROTOCOL_VERSION, Lookup.TAG, True))
    assert info.value.reason == "bad_fields"


@pytest.mark.parametrize(
    "data",
    [
        b"\x9b" + b"\xff" * 8,  # array of 2**64-1 items
        b"\x5b" + b"\xff" * 8,  # byte string of 2**64-1 bytes
        b"\x7b" + b"\xff" * 8,  # text string of 2**64-1 bytes
        b"\xbb" + b"\xff" * 8,  # map of 2**64-1 pairs
        b"\x9a\x7f\xff\xff\xff" + b"\x01" * 64,  # 2**31 items, 64 present
        b"\x5a\x7f\xff\xff\xff" + b"\x00" * 64,  # 2 GiB byte string, 64 bytes present
        b"\x83\x02\x14\x9b" + b"\x00\x00\x00\x10\x00\x00\x00\x00",  # Submit with 2**36 tasks
    ],
    ids=["array", "bytes", "text", "map", "array-2G", "bytes-2G", "nested"],
)
@pytest.mark.timeout(5)
def test_huge_length_claims_fail_fast_without_allocating(data: bytes) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    assert reason_of(data) == "malformed"
    assert time.perf_counter() - start < 1.0
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 200


# -- fuzzing: a Message or a WireError, nothing else -------------------------------


def _decode_or_wire_error(data: bytes) -> Message | None:
    reason = None
    try:
        message = decode(data)
    except WireError as exc:
        reason = exc.reason
    if reason is not None:
        assert reason in WIRE_ERROR_REASONS
        return None
    assert isinstance(message, Message)
    assert decode(encode(message)) == message
    return message


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=128))
def test_random_bytes_decode_to_message_or_wire_error(data: bytes) -> None:
    _decode_or_wire_error(data)


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, database=None)
@given(body=_cbor_values)
def test_random_cbor_values_decode_to_message_or_wire_error(body: Any) -> None:
    _decode_or_wire_error(cbor2.dumps(body))


@settings(max_examples=100, deadline=None, database=None)
@given(
    version=st.sampled_from([2, 2, 2, 0, 1, 3, True, 2.0]),
    tag=st.sampled_from(sorted(MESSAGE_TYPES)) | st.integers(-2, 40),
    fields=st.lists(_cbor_values, max_size=5),
)
def test_random_frames_near_the_protocol_decode_to_message_or_wire_error(
    version: Any, tag: int, fields: list[Any]
) -> None:
    message = _decode_or_wire_error(frame(version, tag, *fields))
    if message is not None:
        assert tag == type(message).TAG


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.binary(min_size=1, max_size=64), cut=st.integers(0, 63))
def test_truncated_or_corrupted_valid_frames_are_wire_errors_or_messages(
    data: bytes, cut: int
) -> None:
    good = encode(sample(Submit))
    _decode_or_wire_error(good[: cut % len(good)])
    _decode_or_wire_error(good[:cut] + data + good[cut:])


# -- TaskEnvelope --------------------------------------------------------------------

GOOD_TASK: list[Any] = ["task-1", "add", 2, 0, b"[[1,2],{}]", None]
ALL_OPTIONS: dict[str, Any] = {
    "cb": "tcp://127.0.0.1:6000",
    "cbd": b"{}",  # one JSON value, as the task's format (JSON) says
    "cbk": bytes(32),
    "eta": 1_700_000_000.5,
    "timeout": 30,
    "max_retries": 3,
    "retry_delay": 0.5,
    "retry_backoff": 2,
    "retry_backoff_max": 60.0,
    "attempt": 2,
}


def test_all_documented_options_are_covered() -> None:
    assert ALL_OPTIONS.keys() == TASK_OPTIONS.keys()


@pytest.mark.parametrize("options", [None, {}, ALL_OPTIONS, {"timeout": 1.5}], ids=repr)
def test_task_envelope_round_trips(options: dict[str, Any] | None) -> None:
    item = [*GOOD_TASK[:5], options]
    envelope = TaskEnvelope.from_wire(item)
    assert list(envelope.to_wire()) == item
    assert TaskEnvelope.from_wire(cbor2.loads(cbor2.dumps(envelope.to_wire()))) == envelope


def test_task_envelope_accessors() -> None:
    envelope = TaskEnvelope.from_wire([*GOOD_TASK[:5], {"timeout": 9}])
    assert envelope.priority_enum is TaskPriority.NORMAL
    assert envelope.option("timeout") == 9
    assert envelope.option("eta") is None
    assert envelope.option("eta", 5) == 5
    assert TaskEnvelope.from_wire(GOOD_TASK).option("timeout", 1) == 1


@pytest.mark.parametrize(("rank", "priority"), list(enumerate(TaskPriority)))
def test_task_envelope_priority_ranks(rank: int, priority: TaskPriority) -> None:
    envelope = TaskEnvelope.from_wire(["t", "n", rank, 0, b"", None])
    assert envelope.priority_enum is priority


def _task(index: int, value: Any) -> list[Any]:
    item = list(GOOD_TASK)
    item[index] = value
    return item


BAD_TASKS = {
    "not-a-list": {"task_id": "t"},
    "tuple": tuple(GOOD_TASK),
    "too-short": GOOD_TASK[:5],
    "too-long": [*GOOD_TASK, None],
    "empty-id": _task(0, ""),
    "int-id": _task(0, 1),
    "bytes-id": _task(0, b"t"),
    "id-too-long": _task(0, "x" * 257),
    "empty-name": _task(1, ""),
    "name-none": _task(1, None),
    "priority-4": _task(2, 4),
    "priority-minus-1": _task(2, -1),
    "priority-bool": _task(2, True),
    "priority-float": _task(2, 1.0),
    "priority-str": _task(2, "high"),
    "format-3": _task(3, 3),
    "format-bool": _task(3, False),
    "payload-str": _task(4, "[[],{}]"),
    "payload-none": _task(4, None),
    "options-list": _task(5, []),
    "unknown-option": _task(5, {"priority": 1}),
    "int-option-key": _task(5, {1: 1}),
    "bignum-option-key": _task(5, {10**5000: 1}),
    "cb-bytes": _task(5, {"cb": b"tcp://x:1"}),
    "cbd-str": _task(5, {"cbd": "data"}),
    "timeout-str": _task(5, {"timeout": "5"}),
    "timeout-bool": _task(5, {"timeout": True}),
    "max-retries-float": _task(5, {"max_retries": 1.0}),
    "max-retries-bool": _task(5, {"max_retries": False}),
    "attempt-none": _task(5, {"attempt": None}),
    "timeout-nan": _task(5, {"timeout": float("nan")}),
    "timeout-inf": _task(5, {"timeout": float("inf")}),
    "timeout-negative": _task(5, {"timeout": -1}),
    "retry-delay-bignum": _task(5, {"retry_delay": 10**400}),
    "max-retries-negative": _task(5, {"max_retries": -1}),
    "eta-nan": _task(5, {"eta": float("nan")}),
    "eta-inf": _task(5, {"eta": float("inf")}),
    # Callback data is written into the callback document as it came: one value only.
    "cbd-json-two-values": _task(5, {"cbd": b'null,"task_id":"someone-else"'}),
    "cbd-json-garbage": _task(5, {"cbd": b"{"}),
    "cbd-json-empty": _task(5, {"cbd": b""}),
    "cbd-cbor-two-values": ["t", "n", 0, 1, b"", {"cbd": cbor2.dumps(None) + cbor2.dumps("k")}],
    "cbd-cbor-truncated": ["t", "n", 0, 1, b"", {"cbd": cbor2.dumps([1, 2])[:-1]}],
    "cbd-cbor-reference": ["t", "n", 0, 1, b"", {"cbd": b"\xd8\x1c" + cbor2.dumps([1])}],
}


@pytest.mark.parametrize("item", BAD_TASKS.values(), ids=BAD_TASKS.keys())
def test_task_envelope_rejects_malformed_items(item: Any) -> None:
    with pytest.raises(WireError) as info:
        TaskEnvelope.from_wire(item)
    assert info.value.reason == "invalid"


@pytest.mark.parametrize(
    ("fmt", "data"),
    [(0, b'{"user": 7}'), (0, b" 5 "), (1, cbor2.dumps({"user": 7})), (2, b"not read at all")],
    ids=["json", "json-spaced", "cbor", "pickle"],
)
def test_callback_data_of_one_value_is_accepted(fmt: int, data: bytes) -> None:
    envelope = TaskEnvelope.from_wire(["t", "n", 0, fmt, b"", {"cbd": data}])
    assert envelope.option("cbd") == data


def test_task_envelope_error_names_the_task_and_field() -> None:
    with pytest.raises(WireError, match=r"task t-9: priority must be 0-3"):
        TaskEnvelope.from_wire(["t-9", "n", 7, 0, b"", None])
    with pytest.raises(WireError, match=r"unknown task option 'colour'"):
        TaskEnvelope.from_wire(["t-9", "n", 0, 0, b"", {"colour": "red"}])


# -- ResultRecord ------------------------------------------------------------------

STARTED = 1_700_000_000.25
COMPLETED = 1_700_000_001.75


def result_item(**changes: Any) -> list[Any]:
    record = ResultRecord(
        task_id="task-1",
        status="success",
        result=dumps(
            SerializationFormat.CBOR, {"sum": 3, "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}
        ),
        error=None,
        started_at=STARTED,
        completed_at=COMPLETED,
        attempts=1,
        traceback=None,
        format=SerializationFormat.CBOR.code,
        name="add",
        retry_delay=None,
    )
    return list(record._replace(**changes))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"status": "failure", "result": None, "error": "ValueError: x", "traceback": "Tb..."},
        {"status": "retrying", "result": None, "retry_delay": 0.5, "attempts": 2},
        {"status": "cancelled", "result": None, "started_at": None, "completed_at": None},
        {"started_at": 1_700_000_000, "completed_at": 0},
        {"name": "", "format": 0, "result": b"[1,2]"},
    ],
    ids=repr,
)
def test_result_record_round_trips(changes: dict[str, Any]) -> None:
    item = result_item(**changes)
    record = ResultRecord.from_wire(item)
    assert list(record) == item
    assert ResultRecord.from_wire(cbor2.loads(cbor2.dumps(item))) == record
    # Whatever form it takes on the wire, it comes back the same record.
    assert ResultRecord.from_wire(cbor2.loads(cbor2.dumps(record.to_wire()))) == record


# A success with no error, traceback or retry delay, and each way to be anything else.
_NOT_PLAIN_SUCCESS: dict[str, dict[str, Any]] = {
    "failure": {"status": "failure", "result": None, "error": "ValueError: x"},
    "cancelled": {"status": "cancelled", "result": None},
    "retrying": {"status": "retrying", "result": None, "retry_delay": 0.0},
    "success-with-error": {"error": ""},
    "success-with-traceback": {"traceback": ""},
    "success-with-retry-delay": {"retry_delay": 0.0},
}


def test_a_plain_success_goes_on_the_wire_in_the_compact_form() -> None:
    record = ResultRecord.from_wire(result_item())
    form = record.to_wire()
    assert list(form) == [
        "task-1",
        record.result,
        STARTED,
        COMPLETED,
        1,
        SerializationFormat.CBOR.code,
        "add",
    ]
    # Also with nothing known but its id: null result and timestamps, no name.
    bare = ResultRecord("t", "success")
    assert list(bare.to_wire()) == ["t", None, None, None, 0, 0, ""]
    assert ResultRecord.from_wire(list(bare.to_wire())) == bare


@pytest.mark.parametrize("changes", _NOT_PLAIN_SUCCESS.values(), ids=_NOT_PLAIN_SUCCESS.keys())
def test_anything_else_keeps_the_full_form(changes: dict[str, Any]) -> None:
    # Empty texts and a zero delay count as present: the compact form must lose nothing.
    record = ResultRecord.from_wire(result_item(**changes))
    assert record.to_wire() is record
    results = cbor2.loads(encode(wire.Results([record])))[2]
    assert results == [list(record)]


def test_messages_carry_each_record_in_its_wire_form() -> None:
    plain = ResultRecord.from_wire(result_item())
    failed = ResultRecord.from_wire(result_item(**_NOT_PLAIN_SUCCESS["failure"]))
    for message in (wire.Results([plain, failed]), wire.Done([plain, failed])):
        sent = cbor2.loads(encode(message))[2]
        assert [len(item) for item in sent] == [7, 11]
        back = decode(encode(message))
        assert [ResultRecord.from_wire(item) for item in back.results] == [plain, failed]  # type: ignore[attr-defined]
    reply = cbor2.loads(encode(wire.ResultReply(4, [plain, None, True, failed])))
    assert reply[3] == [list(plain.to_wire()), None, True, list(failed)]
    # An array that is not a ResultRecord is sent as it was given (tests build bad ones).
    junk = ["t", "success", b"1", None, None, None, 1, None, 0, "n", None, "extra"]
    assert cbor2.loads(encode(wire.Done([junk, "x"])))[2] == [junk, "x"]


def test_the_compact_form_saves_bytes_on_a_typical_result() -> None:
    record = ResultRecord(
        "9f86d081884c7d659a2feaa0c55ad015",
        "success",
        b"5",
        None,
        1_700_000_000.25,
        1_700_000_000.5,
        1,
        None,
        0,
        "add",
        None,
    )
    assert (len(cbor2.dumps(record)), len(cbor2.dumps(record.to_wire()))) == (72, 61)


def _compact(index: int, value: Any) -> list[Any]:
    item = list(ResultRecord.from_wire(result_item()).to_wire())
    item[index] = value
    return item


BAD_COMPACT_RESULTS = {
    "too-short": _compact(0, "task-1")[:6],
    "eight-items": [*_compact(0, "task-1"), None],
    "tuple": tuple(_compact(0, "task-1")),
    "empty-id": _compact(0, ""),
    "int-id": _compact(0, 5),
    "result-str": _compact(1, "3"),
    "status-in-place-of-result": _compact(1, "success"),
    "started-str": _compact(2, "2024-01-01"),
    "started-nan": _compact(2, float("nan")),
    "started-bool": _compact(2, True),
    "completed-out-of-range": _compact(3, 1e300),
    "attempts-float": _compact(4, 1.0),
    "attempts-none": _compact(4, None),
    "attempts-negative": _compact(4, -3),
    "attempts-bignum": _compact(4, 2**70),
    "format-3": _compact(5, 3),
    "format-bool": _compact(5, False),
    "name-none": _compact(6, None),
}


@pytest.mark.parametrize("item", BAD_COMPACT_RESULTS.values(), ids=BAD_COMPACT_RESULTS.keys())
def test_result_record_rejects_malformed_compact_items(item: Any) -> None:
    with pytest.raises(WireError) as info:
        ResultRecord.from_wire(item)
    assert info.value.reason == "invalid"


def test_result_record_field_order_is_the_documented_layout() -> None:
    assert list(ResultRecord._fields) == [
        "task_id",
        "status",
        "result",
        "error",
        "started_at",
        "completed_at",
        "attempts",
        "traceback",
        "format",
        "name",
        "retry_delay",
    ]


def _result(index: int, value: Any) -> list[Any]:
    item = result_item()
    item[index] = value
    return item


BAD_RESULTS = {
    "not-a-list": "task-1",
    "too-short": result_item()[:10],
    "too-long": [*result_item(), None],
    "empty-id": _result(0, ""),
    "int-id": _result(0, 5),
    "unknown-status": _result(1, "exploded"),
    "uppercase-status": _result(1, "SUCCESS"),
    "status-none": _result(1, None),
    "status-list": _result(1, ["success"]),  # unhashable: must not raise TypeError
    "status-map": _result(1, {"s": 1}),
    "result-str": _result(2, "3"),
    "error-bytes": _result(3, b"err"),
    "started-str": _result(4, "2024-01-01"),
    "started-bool": _result(4, True),
    "started-nan": _result(4, float("nan")),
    "started-inf": _result(4, float("inf")),
    "completed-out-of-range": _result(5, 1e300),
    "completed-bignum": _result(5, 10**400),
    "attempts-float": _result(6, 1.0),
    "attempts-bool": _result(6, True),
    "attempts-negative": _result(6, -1),
    "attempts-bignum": _result(6, 2**31),
    "traceback-int": _result(7, 3),
    "format-3": _result(8, 3),
    "format-bool": _result(8, True),
    "name-none": _result(9, None),
    "retry-delay-str": _result(10, "1"),
    "retry-delay-nan": _result(10, float("nan")),
    "retry-delay-negative": _result(10, -0.5),
}


@pytest.mark.parametrize("item", BAD_RESULTS.values(), ids=BAD_RESULTS.keys())
def test_result_record_rejects_malformed_items(item: Any) -> None:
    with pytest.raises(WireError) as info:
        ResultRecord.from_wire(item)
    assert info.value.reason == "invalid"


def test_to_task_result_decodes_the_value_with_aware_timestamps() -> None:
    result = ResultRecord.from_wire(result_item()).to_task_result()
    assert isinstance(result, TaskResult)
    assert result.ok
    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"sum": 3, "at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}
    assert result.task_name == "add"
    assert result.attempts == 1
    assert result.started_at == dt.datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=dt.UTC)
    assert result.completed_at is not None
    assert result.completed_at.utcoffset() == dt.timedelta(0)
    assert result.completed_at.timestamp() == COMPLETED


def test_to_task_result_for_failures_and_missing_values() -> None:
    record = ResultRecord.from_wire(
        result_item(status="failure", result=None, error="KeyError: 'x'", traceback="Traceback…")
    )
    result = record.to_task_result()
    assert result.status is TaskStatus.FAILURE
    assert not result.ok
    assert (result.result, result.error, result.traceback) == (None, "KeyError: 'x'", "Traceback…")
    bare = ResultRecord.from_wire(result_item(started_at=None, completed_at=None, name=""))
    converted = bare.to_task_result()
    assert (converted.started_at, converted.completed_at, converted.task_name) == (None, None, None)


@pytest.mark.parametrize(
    ("fmt", "payload"),
    [(0, b"\xff\xfe not json"), (1, b"\xff"), (0, b"{"), (1, b"")],
    ids=["json-bad-utf8", "cbor-break", "json-truncated", "cbor-empty"],
)
def test_undecodable_result_becomes_a_failure_that_says_so(fmt: int, payload: bytes) -> None:
    result = ResultRecord.from_wire(result_item(format=fmt, result=payload)).to_task_result()
    assert result.status is TaskStatus.FAILURE
    assert result.result is None
    assert result.error is not None
    assert result.error.startswith("result could not be decoded")


def test_pickle_result_needs_allow_pickle() -> None:
    item = result_item(
        format=SerializationFormat.PICKLE.code, result=dumps(SerializationFormat.PICKLE, {1, 2})
    )
    record = ResultRecord.from_wire(item)
    refused = record.to_task_result()
    assert refused.status is TaskStatus.FAILURE
    assert refused.error is not None
    assert "allow_pickle" in refused.error
    allowed = record.to_task_result(allow_pickle=True)
    assert (allowed.status, allowed.result) == (TaskStatus.SUCCESS, {1, 2})


def test_is_final_follows_the_status() -> None:
    assert ResultRecord.from_wire(result_item()).is_final
    assert not ResultRecord.from_wire(result_item(status="retrying", retry_delay=1)).is_final


def _check_record(parse: Any, item: Any) -> None:
    reason = None
    try:
        parsed = parse(item)
    except WireError as exc:
        reason = exc.reason
    if reason is not None:
        assert reason == "invalid"
        return
    on_the_wire = list(parsed.to_wire())
    assert parse(on_the_wire) == parsed
    assert (on_the_wire if len(item) == 7 else list(parsed)) == item
    if isinstance(parsed, ResultRecord):
        converted = parsed.to_task_result()  # accepted records always convert
        assert converted.task_id == item[0]


@settings(max_examples=100, deadline=None, database=None)
@given(index=st.integers(0, 10), value=_cbor_values)
def test_result_record_with_one_random_field_is_accepted_or_invalid(index: int, value: Any) -> None:
    item = result_item()
    item[index] = value
    _check_record(ResultRecord.from_wire, item)


@settings(max_examples=100, deadline=None, database=None)
@given(index=st.integers(0, 6), value=_cbor_values)
def test_compact_result_with_one_random_field_is_accepted_or_invalid(
    index: int, value: Any
) -> None:
    _check_record(ResultRecord.from_wire, _compact(index, value))


@settings(max_examples=100, deadline=None, database=None)
@given(
    index=st.integers(0, 5),
    value=_cbor_values,
    option=st.sampled_from(sorted(TASK_OPTIONS)),
    option_value=_cbor_values,
)
def test_task_envelope_with_random_fields_is_accepted_or_invalid(
    index: int, value: Any, option: str, option_value: Any
) -> None:
    item = list(GOOD_TASK)
    item[index] = value
    _check_record(TaskEnvelope.from_wire, item)
    _check_record(TaskEnvelope.from_wire, [*GOOD_TASK[:5], {option: option_value}])


def test_epoch_helpers_round_trip_and_pass_none() -> None:
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 500000, tzinfo=dt.UTC)
    assert wire.from_epoch(wire.epoch(when)) == when
    assert wire.epoch(None) is None
    assert wire.from_epoch(None) is None


@pytest.mark.parametrize("tag", [28, 25, 256])
def test_cbor_references_are_refused_so_a_small_frame_cannot_expand(tag: int) -> None:
    """One payload shared by reference would become many tasks' worth of bytes after decoding."""
    import cbor2

    task = cbor2.dumps(["t1", "name", 2, 0, b"x" * 1000, None])
    head = {28: b"\xd8\x1c", 25: b"\xd8\x19", 256: b"\xd9\x01\x00"}[tag]
    tasks = b"\x82" + head + task + b"\xd8\x1d\x00"
    frame = b"\x84" + cbor2.dumps(1) + cbor2.dumps(Submit.TAG) + cbor2.dumps(7) + tasks
    with pytest.raises(WireError, match="references are refused") as caught:
        decode(frame)
    assert caught.value.reason == "malformed"
