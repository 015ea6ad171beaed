"""How untrusted CBOR is read everywhere: without shared values or string references.

Tags 28/29 (value sharing) and 25/256 (string references) let a few bytes
decode into a structure whose written-out form is exponentially larger:
402 bytes of nested sharing are 2**60 items once re-encoded, or dumped as
JSON for a page.  Our encoders never write them (cbor2's defaults), so
refusing them costs our peers nothing; every size bound checked on a
frame or a payload then bounds what it holds too.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NO_REFERENCES"]


def _refuse_reference(decoder: Any, *_: Any) -> Any:
    raise ValueError("shared and string references are refused")


# For cbor2's ``semantic_decoders`` (``cbor2.loads``, ``cbor2.CBORDecoder``).
NO_REFERENCES = {
    28: _refuse_reference,
    29: _refuse_reference,
    25: _refuse_reference,
    256: _refuse_reference,
}
