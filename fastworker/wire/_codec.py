"""Messages to bytes and back: one frame, ``cbor([version, tag, *fields])``.

``decode`` is the trust boundary for every frame that arrives: whatever the
bytes, it returns a valid message or raises WireError with a countable reason.

Versions.  A peer of another protocol version must learn why nothing it
sends works, in a form it can read.  ErrorReply (tag 29, three fields) has
the same shape in every version, so ``decode`` reads one whatever its
version, and ``error_reply`` answers a frame refused for its version in the
*sender's* version: a version-1 decoder, which refuses any other version,
still reads that answer.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import cbor2

from .._cbor import NO_REFERENCES
from ._errors import WireError, preview
from ._messages import MESSAGE_TYPES, Done, ErrorReply, Message, ResultReply, Results
from ._records import results_to_wire

__all__ = ["PROTOCOL_VERSION", "VersionError", "decode", "encode", "error_reply"]

# 2: the compact ResultWire of a plain success (protocol.md §4.2).
PROTOCOL_VERSION = 2
# Versions answered in their own encoding: any a peer could plausibly speak,
# never a bignum or a negative number echoed back.
_ANSWERABLE_VERSIONS = range(1, 1 << 16)
_MAX_REQUEST_ID = (1 << 64) - 1

_GETTERS = {cls: attrgetter(*(name for name, _ in cls.FIELDS)) for cls in MESSAGE_TYPES.values()}


class VersionError(WireError):
    """A frame of another protocol version: what is needed to answer it in that version.

    ``peer_version`` is the sender's version when it is one we can answer in
    (else None); ``request_id`` the frame's request id when it is a request
    whose id could be read (else 0), so the sender's pending call fails.
    """

    def __init__(self, message: str, peer_version: int | None, request_id: int) -> None:
        super().__init__("version", message)
        self.peer_version = peer_version
        self.request_id = request_id


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


def error_reply(exc: WireError, request_id: int = 0) -> bytes:
    """The ErrorReply answering a refused frame, readable by its sender.

    A frame refused for its version is answered in the sender's version, with
    its request id when it had one: ErrorReply's shape is the same in every
    version, so the sender's own decoder reads it.
    """
    if isinstance(exc, VersionError):
        request_id = exc.request_id
        if exc.peer_version is not None:
            reply = [exc.peer_version, ErrorReply.TAG, request_id, exc.reason, str(exc)]
            return cbor2.dumps(reply)
    return encode(ErrorReply(request_id, exc.reason, str(exc)))


def _version_error(version: Any, tag: Any, fields: list[Any]) -> VersionError:
    if type(version) is int:
        problem = f"protocol version {preview(version)} is not supported"
    else:  # 2.0 is not 2: integers travel as CBOR integers (protocol.md §1)
        problem = f"the protocol version must be an integer, not {type(version).__name__}"
    text = (
        f"{problem}: this side speaks version {PROTOCOL_VERSION}; clients, workers and the "
        "control plane must speak the same version"
    )
    peer = version if type(version) is int and version in _ANSWERABLE_VERSIONS else None
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    request_id = 0
    if cls is not None and cls.FIELDS[0][0] == "request_id" and fields:
        first = fields[0]
        if type(first) is int and 0 <= first <= _MAX_REQUEST_ID:
            request_id = first
    return VersionError(text, peer, request_id)


def decode(data: bytes) -> Message:
    try:
        body: Any = cbor2.loads(data, semantic_decoders=NO_REFERENCES)
    except Exception as exc:  # cbor2 raises a zoo of types on garbage; all mean the same
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ValueError) and "references are refused" in str(cause):
            raise WireError("malformed", "CBOR shared and string references are refused") from None
        raise WireError("malformed", f"frame is not valid CBOR: {type(exc).__name__}") from None
    if type(body) is not list or len(body) < 2:
        raise WireError("malformed", "frame is not a [version, tag, ...] array")
    version, tag = body[0], body[1]
    if (version != PROTOCOL_VERSION or type(version) is not int) and not (
        tag == ErrorReply.TAG and type(tag) is int and type(version) is int
    ):
        # Another version's ErrorReply is read as ours (same shape in every version).
        raise _version_error(version, tag, body[2:])
    cls = MESSAGE_TYPES.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError("unknown_type", f"unknown message type {preview(tag)}")
    fields = body[2:]
    spec = cls.FIELDS
    if not cls.REQUIRED <= len(fields) <= len(spec):
        takes = len(spec) if len(spec) == cls.REQUIRED else f"{cls.REQUIRED} to {len(spec)}"
        raise WireError("bad_fields", f"{cls.__name__} takes {takes} fields, got {len(fields)}")
    for value, (name, types) in zip(fields, spec, strict=False):
        if type(value) not in types:
            raise WireError("bad_fields", f"{cls.__name__}.{name} has type {type(value).__name__}")
    return cls(*fields)
