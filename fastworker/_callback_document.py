"""Decoding a callback document on the receiving side (design/protocol.md §6).

The format shows in the first byte: ``{`` a JSON object, ``0xa7`` a CBOR map
of 7 entries, ``0x80`` a pickle.  A PICKLE document is a pickled dict of
plain values whose ``result`` and ``callback_data`` are the pickles the worker
and the client made, as byte strings: the control plane carries them without
decoding.  The outer pickle is read by an unpickler that refuses every
global, so reading it runs no code; the inner ones run whatever they hold
when unpickled, so that happens only with ``allow_pickle=True``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from .tasks.serializer import (
    PayloadDecodeError,
    PickleRefusedError,
    SerializationFormat,
    loads,
)

__all__ = ["decode_callback_document"]

KEYS = ("task_id", "status", "error", "started_at", "completed_at", "result", "callback_data")


class _PlainUnpickler(pickle.Unpickler):
    """Builds only built-in values (dict, str, bytes, float, None): no global, no code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"a callback document may not refer to {module}.{name}: it holds plain values only"
        )


def _decode_pickled(document: bytes, allow_pickle: bool) -> dict[str, Any]:
    try:
        outer = _PlainUnpickler(io.BytesIO(document)).load()
    except Exception as exc:
        raise PayloadDecodeError(f"invalid PICKLE callback document: {exc}") from None
    if not isinstance(outer, dict) or tuple(outer) != KEYS:
        raise PayloadDecodeError("a PICKLE callback document must be a dict of the documented keys")
    for key in ("result", "callback_data"):
        value = outer[key]
        if value is None:
            continue
        if not isinstance(value, bytes):
            raise PayloadDecodeError(f"{key} of a PICKLE callback document must be bytes or None")
        if not allow_pickle:
            raise PickleRefusedError(
                f"refusing to unpickle the {key} of task {outer['task_id']!r}'s callback "
                "document: unpickling runs arbitrary code, so it needs allow_pickle=True"
            )
        outer[key] = loads(SerializationFormat.PICKLE, value, allow_pickle=True)
    return outer


def decode_callback_document(document: bytes, *, allow_pickle: bool = False) -> dict[str, Any]:
    """The callback document as a dict, in any of the three formats.

    Raises PayloadDecodeError for bytes that are not a callback document, and
    PickleRefusedError for a PICKLE document carrying a result or callback data
    unless ``allow_pickle`` (unpickling runs arbitrary code: trust the clients
    and workers whose values these are before enabling it).
    """
    head = document[:1]
    if head == b"\x80":
        return _decode_pickled(document, allow_pickle)
    fmt = SerializationFormat.JSON if head == b"{" else SerializationFormat.CBOR
    value = loads(fmt, document)
    if not isinstance(value, dict) or set(value) != set(KEYS):
        raise PayloadDecodeError("not a callback document: a map of the documented keys expected")
    return value
