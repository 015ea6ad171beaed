"""Messages to bytes and back: one frame, ``cbor([version, tag, *fields])``.

``decode`` is the trust boundary for every frame that arrives: whatever the
bytes, it returns a valid message or raises WireError with a countable reason.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import cbor2

from ._errors import WireError, preview
from ._messages import MESSAGE_TYPES, Done, Message, ResultReply, Results
from ._records import results_to_wire

__all__ = ["PROTOCOL_VERSION", "decode", "encode"]

# 2: the compact ResultWire of a plain success (protocol.md §4.2).
PROTOCOL_VERSION = 2

_GETTERS = {cls: attrgetter(*(name for name, _ in cls.FIELDS)) for cls in MESSAGE_TYPES.values()}


def _refuse_reference(decoder: Any, *_: Any) -> Any:
    raise ValueError("shared and string references are refused")


# Tags 28/29 (value sharing) and 25/256 (string references) let a small frame
# decode into a structure far larger than itself (one 1 MiB payload referenced
# by ten thousand tasks), past every bound checked on the frame's size.
_NO_REFERENCES = {
    28: _refuse_reference,
    29: _refuse_reference,
    25: _refuse_reference,
    256: _refuse_reference,
}


def encode(message: Message) -> bytes:
    """One frame; every ResultRecord inside goes in its wire form (compact when it can)."""
    cls = type(message)
    values = _GETTERS[cls](message)
    if len(cls.FIELDS) == 1:
        if cls is Results or cls is Done:
            return cbor2.dumps([PROTOCOL_VERSION, cls.TAG, results_to_wire(values)])
        return cbor2.dumps([PROTOCOL_VERSION, cls.TAG, values])
    if cls is ResultReply:
        request_id, results = values
        return cbor2.dumps([PROTOCOL_VERSION, cls.TAG, request_id, results_to_wire(results)])
    return cbor2.dumps([PROTOCOL_VERSION, cls.TAG, *values])


def decode(data: bytes) -> Message:
    try:
        body: Any = cbor2.loads(data, semantic_decoders=_NO_REFERENCES)
    except Exception as exc:  # cbor2 raises a zoo of types on garbage; all mean the same
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ValueError) and "references are refused" in str(cause):
            raise WireError("malformed", "CBOR shared and string references are refused") from None
        raise WireError("malformed", f"frame is not valid CBOR: {type(exc).__name__}") from None
    if type(body) is not list or len(body) < 2:
        raise WireError("malformed", "frame is not a [version, tag, ...] array")
    version, tag = body[0], body[1]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise WireError(
            "version",
            f"protocol version {preview(version)} not supported (speak {PROTOCOL_VERSION})",
        )
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {preview(tag)}")
    fields = body[2:]
    spec = cls.FIELDS
    if len(fields) != len(spec):
        raise WireError("bad_fields", f"{cls.__name__} takes {len(spec)} fields, got {len(fields)}")
    for value, (name, types) in zip(fields, spec, strict=True):
        if type(value) not in types:
            raise WireError("bad_fields", f"{cls.__name__}.{name} has type {type(value).__name__}")
    return cls(*fields)
