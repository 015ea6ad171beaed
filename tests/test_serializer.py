"""Tests for fastworker.tasks.serializer: payload codecs, typed errors, PICKLE refusal."""

from __future__ import annotations

import datetime as dt
import math
import pickle
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastworker
from fastworker.tasks import serializer
from fastworker.tasks.serializer import (
    PayloadDecodeError,
    PickleRefusedError,
    SerializationError,
    SerializationFormat,
    Serializer,
    dumps,
    loads,
)

pytestmark = pytest.mark.timeout(20)

JSON = SerializationFormat.JSON
CBOR = SerializationFormat.CBOR
PICKLE = SerializationFormat.PICKLE

UTC_PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

# Values every format must carry unchanged (JSON turns tuples into lists, so none here).
COMMON_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 + 1,
    -(2**200),
    10**40,
    0.1,
    -0.0,
    1e308,
    5e-324,
    "",
    "plain ascii",
    "ünïcödé ✓ 中文",
    "non-BMP: 🐍𝄞🎉",
    [],
    {},
    [1, [2, [3, [4, []]]]],
    {"nested": {"list": [1, "two", 3.0, None, {"deep": [True]}]}, "k": "v"},
    dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.UTC),
    dt.datetime(1999, 12, 31, 1, 2, 3, tzinfo=UTC_PLUS_0530),
    {
        "when": dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
        "items": [dt.datetime(2001, 1, 1, tzinfo=dt.UTC)],
    },
]


def _same(a: Any, b: Any) -> bool:
    """Equality that also tells -0.0 from 0.0, True from 1 and datetime offsets apart."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dt.datetime):
        return bool(a == b and a.utcoffset() == b.utcoffset())
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


# -- round trips --------------------------------------------------------------


@pytest.mark.parametrize("fmt", [JSON, CBOR, PICKLE])
@pytest.mark.parametrize("value", COMMON_VALUES, ids=repr)
def test_value_round_trips_in_every_format(fmt: SerializationFormat, value: Any) -> None:
    data = dumps(fmt, value)
    assert isinstance(data, bytes)
    back = loads(fmt, data, allow_pickle=True)
    assert _same(back, value)


@pytest.mark.parametrize("fmt", [JSON, CBOR, PICKLE])
def test_tz_aware_datetime_comes_back_aware_with_its_offset(fmt: SerializationFormat) -> None:
    when = dt.datetime(2024, 6, 1, 12, 30, 15, 250000, tzinfo=UTC_PLUS_0530)
    back = Serializer(fmt, allow_pickle=True).loads(Serializer(fmt).dumps({"at": when}))
    assert back["at"] == when
    assert back["at"].utcoffset() == dt.timedelta(hours=5, minutes=30)


def test_json_carries_datetimes_as_a_documented_one_key_object() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert dumps(JSON, [when]) == b'[{"$datetime":"2024-01-02T03:04:05+00:00"}]'
    # A peer writing that object by hand gets a datetime back.
    assert loads(JSON, b'{"$datetime":"2024-01-02T03:04:05Z"}') == when


def test_json_leaves_lookalike_datetime_objects_alone() -> None:
    not_a_date = {"$datetime": "tomorrow-ish"}
    assert loads(JSON, dumps(JSON, not_a_date)) == not_a_date
    two_keys = {"$datetime": "2024-01-02T03:04:05+00:00", "other": 1}
    assert loads(JSON, dumps(JSON, two_keys)) == two_keys
    assert loads(JSON, b'{"$datetime": 5}') == {"$datetime": 5}


@pytest.mark.parametrize(
    "data",
    [
        b' [ [1, 2] , {"b": "x"} ] ',  # another encoder's whitespace
        b'[[1,2],{"b":"\\u0078"}]',  # escapes
        b'[[1,2],{"b":"x"}]',
    ],
    ids=repr,
)
def test_json_from_other_encoders_decodes_the_same(data: bytes) -> None:
    assert loads(JSON, data) == [[1, 2], {"b": "x"}]


def test_json_datetime_spelled_with_escapes_is_still_a_datetime() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert loads(JSON, b'{"\\u0024datetime":"2024-01-02T03:04:05Z"}') == when


def test_json_is_compact_utf8_not_ascii_escaped() -> None:
    data = dumps(JSON, {"name": "🐍"})
    assert data == '{"name":"🐍"}'.encode()


@pytest.mark.parametrize("fmt", [CBOR, PICKLE])
@pytest.mark.parametrize("value", [b"", b"\x00\xff" * 100, {"blob": [b"a", b"b"]}], ids=repr)
def test_bytes_round_trip_in_cbor_and_pickle(fmt: SerializationFormat, value: Any) -> None:
    assert loads(fmt, dumps(fmt, value), allow_pickle=True) == value


def test_cbor_and_pickle_keep_tuples_and_sets_json_turns_tuples_into_lists() -> None:
    assert loads(PICKLE, dumps(PICKLE, (1, {2, 3})), allow_pickle=True) == (1, {2, 3})
    assert loads(CBOR, dumps(CBOR, {1, 2})) == {1, 2}
    assert loads(JSON, dumps(JSON, (1, 2))) == [1, 2]


def test_module_functions_accept_format_names_as_strings() -> None:
    assert loads("json", dumps("json", {"a": 1})) == {"a": 1}  # type: ignore[arg-type]
    assert loads("CBOR", dumps("CBOR", [1])) == [1]  # type: ignore[arg-type]


# -- what a format cannot hold: TypeError naming the type ----------------------


@pytest.mark.parametrize("value", [b"raw", [1, {"k": b"nested"}]], ids=["top", "nested"])
def test_json_refuses_bytes_with_type_error_naming_bytes(value: Any) -> None:
    with pytest.raises(TypeError, match=r"\bbytes\b"):
        dumps(JSON, value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [float("-inf")]], ids=repr)
def test_json_refuses_non_finite_floats(value: Any) -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps(JSON, value)


@pytest.mark.parametrize("value", [{1, 2}, frozenset({"a"}), {"k": {3}}], ids=repr)
def test_json_refuses_sets_and_says_to_use_a_list(value: Any) -> None:
    with pytest.raises(TypeError, match=r"(set|frozenset) is not JSON serializable \(use a list\)"):
        dumps(JSON, value)


def test_json_refuses_circular_structures_with_type_error() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="Circular reference"):
        dumps(JSON, loop)


class Opaque:
    pass


@pytest.mark.parametrize("value", [Opaque(), [1, {"k": Opaque()}]], ids=["top", "nested"])
def test_cbor_refuses_arbitrary_objects_naming_the_type(value: Any) -> None:
    with pytest.raises(TypeError, match=r"Object of type Opaque is not CBOR serializable"):
        dumps(CBOR, value)


def test_json_refuses_arbitrary_objects_naming_the_type() -> None:
    with pytest.raises(TypeError, match=r"Object of type Opaque is not JSON serializable"):
        dumps(JSON, {"x": Opaque()})


def test_cbor_refuses_naive_datetimes() -> None:
    with pytest.raises(TypeError, match="naive datetime"):
        dumps(CBOR, dt.datetime(2024, 1, 1))


def test_pickle_refuses_unpicklable_values_with_type_error() -> None:
    with pytest.raises(TypeError):
        dumps(PICKLE, lambda: None)
    with pytest.raises(TypeError):
        dumps(PICKLE, (i for i in range(3)))


# -- bad bytes: PayloadDecodeError and nothing else ----------------------------


def test_error_hierarchy() -> None:
    assert issubclass(PayloadDecodeError, SerializationError)
    assert issubclass(PickleRefusedError, SerializationError)
    assert issubclass(SerializationError, ValueError)
    assert fastworker.SerializationError is SerializationError
    assert fastworker.PickleRefusedError is PickleRefusedError


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        (JSON, b""),
        (JSON, b"{"),
        (JSON, b"[1,]"),
        (JSON, b'{"a" 1}'),
        (JSON, b"[" * 100_000),
        (JSON, b"1" * 5000),  # past CPython's int-string limit
        (CBOR, b""),
        (CBOR, b"\xff"),
        (CBOR, b"\x82\x01"),  # array of 2, one item
        (CBOR, b"\x81" * 100_000),  # nested too deep
        (CBOR, b"\x5b" + b"\xff" * 8),  # claims a 16 EiB byte string
        (CBOR, b"\x9b" + b"\xff" * 8),  # claims a 2**64-1 item array
        (CBOR, cbor2.dumps(cbor2.CBORTag(1, "not a timestamp"))),
        (CBOR, cbor2.dumps(cbor2.CBORTag(30, [1, 0]))),  # rational with zero denominator
        (CBOR, cbor2.dumps(cbor2.CBORTag(35, "("))),  # invalid regular expression
        (CBOR, cbor2.dumps(cbor2.CBORTag(37, b"short"))),  # invalid UUID
        (CBOR, cbor2.dumps(cbor2.CBORTag(29, 7))),  # shared reference to nothing
    ],
    ids=repr,
)
def test_garbage_gives_payload_decode_error(fmt: SerializationFormat, data: bytes) -> None:
    with pytest.raises(PayloadDecodeError):
        loads(fmt, data)


def test_invalid_utf8_json_says_utf8() -> None:
    with pytest.raises(PayloadDecodeError, match="UTF-8"):
        loads(JSON, b'{"a": "\xff\xfe"}')


def test_garbage_pickle_with_pickle_allowed_gives_payload_decode_error() -> None:
    with pytest.raises(PayloadDecodeError, match="PICKLE"):
        loads(PICKLE, b"definitely not a pickle", allow_pickle=True)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=256))
def test_random_bytes_never_escape_as_anything_but_payload_decode_error(data: bytes) -> None:
    for fmt in (JSON, CBOR):
        try:
            loads(fmt, data)
        except PayloadDecodeError:
            pass


_json_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _json_text
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # "$datetime" is the one reserved key (a one-key dict of it comes back as a datetime).
    keys = _json_text.filter(lambda k: k != "$datetime")
    return st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)


@settings(max_examples=100, deadline=None, database=None)
@given(value=st.recursive(_json_scalars, _containers, max_leaves=8))
def test_json_round_trips_arbitrary_json_values(value: Any) -> None:
    assert _same(loads(JSON, dumps(JSON, value)), value)


@settings(max_examples=100, deadline=None, database=None)
@given(value=st.recursive(_json_scalars | st.binary(max_size=20), _containers, max_leaves=8))
def test_cbor_round_trips_arbitrary_values(value: Any) -> None:
    assert _same(loads(CBOR, dumps(CBOR, value)), value)


# -- PICKLE is refused unless enabled ------------------------------------------

SIDE_EFFECTS: list[str] = []


def _record_side_effect(tag: str) -> str:
    SIDE_EFFECTS.append(tag)
    return tag


class Booby:
    """Unpickling this calls _record_side_effect: stands in for os.system."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_side_effect, ("pwned",))


def test_pickle_refused_by_default_with_a_message_that_says_why_and_how() -> None:
    data = dumps(PICKLE, {"a": 1})
    with pytest.raises(PickleRefusedError) as info:
        loads(PICKLE, data)
    message = str(info.value)
    assert "arbitrary code" in message
    assert "allow_pickle=True" in message
    with pytest.raises(PickleRefusedError):
        Serializer(PICKLE).loads(data)


def test_refused_pickle_is_never_executed_but_allowed_pickle_is() -> None:
    SIDE_EFFECTS.clear()
    malicious = pickle.dumps(Booby())
    with pytest.raises(PickleRefusedError):
        loads(PICKLE, malicious)
    with pytest.raises(PickleRefusedError):
        Serializer("pickle").loads(malicious)  # type: ignore[arg-type]
    assert SIDE_EFFECTS == []
    # The probe works: the same bytes do run once pickle is enabled.
    assert loads(PICKLE, malicious, allow_pickle=True) == "pwned"
    assert SIDE_EFFECTS == ["pwned"]
    SIDE_EFFECTS.clear()


def test_pickle_round_trips_when_allowed() -> None:
    value = {"t": (1, 2), "b": b"\x00", "s": {1}, "when": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}
    codec = Serializer(PICKLE, allow_pickle=True)
    assert codec.loads(codec.dumps(value)) == value


# -- SerializationFormat --------------------------------------------------------


def test_serialization_format_is_importable_from_both_places() -> None:
    assert fastworker.SerializationFormat is SerializationFormat
    assert serializer.SerializationFormat is SerializationFormat


@pytest.mark.parametrize(
    ("text", "member"),
    [("json", JSON), ("JSON", JSON), ("Json", JSON), ("cbor", CBOR), ("PICKLE", PICKLE)],
)
def test_format_from_any_case_name(text: str, member: SerializationFormat) -> None:
    assert SerializationFormat(text) is member
    assert Serializer(text).format is member  # type: ignore[arg-type]


def test_format_values_are_lowercase_names() -> None:
    assert [f.value for f in SerializationFormat] == ["json", "cbor", "pickle"]


def test_unknown_format_name_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="xml"):
        SerializationFormat("xml")


@pytest.mark.parametrize("fmt", list(SerializationFormat))
def test_code_round_trips(fmt: SerializationFormat) -> None:
    assert SerializationFormat.from_code(fmt.code) is fmt


def test_codes_are_the_documented_wire_numbers() -> None:
    assert (JSON.code, CBOR.code, PICKLE.code) == (0, 1, 2)


@pytest.mark.parametrize("code", [3, -1, 255, "0", None, [0]], ids=repr)
def test_unknown_code_is_a_payload_decode_error(code: Any) -> None:
    with pytest.raises(PayloadDecodeError, match="unknown serialization format code"):
        SerializationFormat.from_code(code)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("d81c") + cbor2.dumps([1]),  # tag 28: a value marked for sharing
        bytes.fromhex("d901 00") + cbor2.dumps(["ab", "ab"]),  # tag 256: string references
    ],
    ids=["shared-value", "string-reference"],
)
def test_cbor_refuses_shared_values_and_string_references(data: bytes) -> None:
    """Our encoders never write them; read, a few hundred bytes of nested sharing are
    2**60 items for whoever encodes them again (a worker echoing its arguments)."""
    with pytest.raises(PayloadDecodeError, match="invalid CBOR payload"):
        loads(SerializationFormat.CBOR, data)
