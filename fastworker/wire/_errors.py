"""The one error type for bytes from the network that cannot be accepted."""

from __future__ import annotations

from typing import Any

__all__ = ["WIRE_ERROR_REASONS", "WireError"]

# Every reason a message or a part of one is rejected; stats count by these.
WIRE_ERROR_REASONS = (
    "malformed",  # not CBOR, or not an array
    "version",  # protocol version we do not speak
    "unknown_type",  # tag not in the protocol
    "bad_fields",  # wrong number or types of fields
    "invalid",  # a task or result inside the message is invalid
    "bad_frames",  # wrong number of ZeroMQ frames
    "unexpected",  # a valid message that this endpoint does not accept
    "unauthorized",  # CURVE: the sender's key is not (or no longer) allowed here
    "forbidden",  # CURVE: the sender's key may not send this (a client key registering)
)


class WireError(ValueError):
    """A message from the network that cannot be accepted.

    ``reason`` is one of WIRE_ERROR_REASONS, so receivers can count rejections
    by cause and answer the sender with something precise.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def preview(value: Any, limit: int = 60) -> str:
    """A bounded repr of an untrusted value for error messages.

    ``repr`` of a CBOR bignum past 4300 digits raises ValueError, and a
    rejected value may be megabytes long: neither may escape as anything but
    a WireError, nor bloat one.
    """
    if type(value) in (str, bytes):
        text = repr(value[: limit + 1])
    elif value is None or type(value) in (bool, float):
        text = repr(value)
    elif type(value) is int:
        text = repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"
    else:
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"
