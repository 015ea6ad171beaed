"""PICKLE callback documents: built without unpickling, unpickled only where allowed.

The control plane carries the worker's and the client's pickles as byte
strings; a receiver unpickles them only with ``allow_pickle=True``.  A pickle
that runs code when loaded proves who loaded it.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
from typing import Any

import cbor2
import pytest
import trio

import fastworker
from fastworker import (
    CallbackReceiver,
    Client,
    Cluster,
    PickleRefusedError,
    decode_callback_document,
)
from fastworker.control._callback_payload import build_callback_payload
from fastworker.tasks.serializer import PayloadDecodeError, SerializationFormat
from fastworker.wire import ResultRecord

pytestmark = pytest.mark.timeout(30)

LOADED: list[str] = []  # who ran a Trap's code


def _record(name: str) -> str:
    LOADED.append(name)
    return name


class Trap:
    """Unpickles into whatever ``_record`` returns, noting that it was unpickled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (_record, (self.name,))


def make_set(n: int) -> set[int]:
    return set(range(n))


def _pickled_record(result: object) -> ResultRecord:
    return ResultRecord(
        "t1",
        "success",
        pickle.dumps(result),
        None,
        1700000000.25,
        1700000000.5,
        1,
        None,
        SerializationFormat.PICKLE.code,
        "add",
        None,
    )


def test_the_control_plane_builds_a_pickle_document_without_unpickling() -> None:
    LOADED.clear()
    document = build_callback_payload(_pickled_record(Trap("result")), pickle.dumps(Trap("data")))
    assert LOADED == []

    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        decode_callback_document(document)
    assert LOADED == []

    decoded = decode_callback_document(document, allow_pickle=True)
    assert LOADED == ["result", "data"]
    assert decoded == {
        "task_id": "t1",
        "status": "success",
        "error": None,
        "started_at": "2023-11-14T22:13:20.250000+00:00",
        "completed_at": "2023-11-14T22:13:20.500000+00:00",
        "result": "result",
        "callback_data": "data",
    }
    # For receivers in other languages: the values are the pickles, as byte strings.
    raw = pickle.loads(document)
    assert raw["result"] == pickle.dumps(Trap("result"))


def test_a_pickle_document_without_values_needs_no_permission() -> None:
    failed = _pickled_record(None)._replace(status="failure", result=None, error="E: x")
    decoded = decode_callback_document(build_callback_payload(failed, None))
    assert (decoded["status"], decoded["result"], decoded["callback_data"]) == (
        "failure",
        None,
        None,
    )


def test_a_forged_outer_pickle_is_refused_without_running_it() -> None:
    LOADED.clear()
    forged = pickle.dumps({"task_id": Trap("outer")})
    with pytest.raises(PayloadDecodeError, match="may not refer to"):
        decode_callback_document(forged, allow_pickle=True)
    assert LOADED == []
    with pytest.raises(PayloadDecodeError, match="documented keys"):
        decode_callback_document(pickle.dumps({"task_id": "t"}), allow_pickle=True)


@pytest.mark.parametrize("encode", [json.dumps, cbor2.dumps])
def test_json_and_cbor_documents_decode_too(encode: Any) -> None:
    document = {
        "task_id": "t",
        "status": "success",
        "error": None,
        "started_at": None,
        "completed_at": None,
        "result": 5,
        "callback_data": None,
    }
    data = encode(document)
    assert decode_callback_document(data if isinstance(data, bytes) else data.encode()) == document


def test_decode_callback_document_is_public() -> None:
    assert "decode_callback_document" in fastworker.__all__


async def test_pickle_values_reach_a_receiver_that_allows_them() -> None:
    """End to end: the control plane (which has no pickle switch) passes them through."""
    since = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with trio.fail_after(15):
        async with (
            Cluster(tasks=[make_set], allow_pickle=True) as cluster,
            Client(
                discovery_address=cluster.discovery_address,
                serialization_format="pickle",
                allow_pickle=True,
            ) as client,
            CallbackReceiver("ack+tcp://127.0.0.1:*", allow_pickle=True) as receiver,
        ):
            task_id = await client.delay_with_callback(
                "make_set", receiver.address, 3, callback_data=frozenset({"a"})
            )
            frame = await receiver.receive()
            document = receiver.decode(frame)

    assert document["task_id"] == task_id
    assert document["result"] == {0, 1, 2}
    assert document["callback_data"] == frozenset({"a"})
    assert dt.datetime.fromisoformat(document["completed_at"]) >= since
    with pytest.raises(PickleRefusedError):  # a receiver that did not opt in
        decode_callback_document(frame)
