"""The callback document, built from a result without decoding its value.

Receivers get one frame: a map with exactly the documented keys, encoded in
the task's format.  ``result`` and ``callback_data`` are already encoded in
that format (by the worker and the client), so for JSON and CBOR we splice
those bytes into the document instead of decoding and re-encoding them.  A
pickle cannot be spliced into another (their memo indices collide), so a
PICKLE document carries them as the byte strings they are, for the receiver
to unpickle if it trusts them (``fastworker.decode_callback_document``).
Either way the control plane never runs a decoder on user data: unpickling
there would let any client run code in the control plane.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import cbor2

from ..tasks.serializer import SerializationFormat
from ..wire import ResultRecord, from_epoch

__all__ = ["build_callback_payload"]


def _iso(value: float | None) -> str | None:
    stamp = from_epoch(value)
    return None if stamp is None else stamp.isoformat()


def build_callback_payload(record: ResultRecord, callback_data: bytes | None) -> bytes:
    """Encode the documented callback map for ``record`` in the task's format."""
    head: dict[str, Any] = {
        "task_id": record.task_id,
        "status": record.status,
        "error": record.error,
        "started_at": _iso(record.started_at),
        "completed_at": _iso(record.completed_at),
    }
    fmt = SerializationFormat.from_code(record.format)
    if fmt is SerializationFormat.JSON:
        text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
        result = record.result if record.result is not None else b"null"
        data = callback_data if callback_data is not None else b"null"
        return text[:-1] + b',"result":' + result + b',"callback_data":' + data + b"}"
    if fmt is SerializationFormat.CBOR:
        # head has 5 keys; a CBOR map of fewer than 24 entries is one byte 0xa0+n.
        encoded = cbor2.dumps(head)
        result = record.result if record.result is not None else b"\xf6"
        data = callback_data if callback_data is not None else b"\xf6"
        return (
            bytes([0xA0 + len(head) + 2])
            + encoded[1:]
            + cbor2.dumps("result")
            + result
            + cbor2.dumps("callback_data")
            + data
        )
    # Only str, float, None and bytes: unpickling this runs no code (protocol 5
    # writes bytes natively), and a receiver can check that it does not.
    full = dict(head, result=record.result, callback_data=callback_data)
    return pickle.dumps(full, protocol=pickle.HIGHEST_PROTOCOL)
