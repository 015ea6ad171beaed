"""Encoding of task payloads (arguments, results, callback data) in the user's format.

The control plane never decodes a payload: it carries the bytes the client made
to the worker and back.  Only the two ends run this code, so the format is a
choice between client and worker; the envelope around it is always CBOR.

PICKLE runs arbitrary code on decode, so decoding it is refused unless the
receiving side was explicitly built with ``allow_pickle=True``.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import pickle
from collections.abc import Callable, Iterable
from typing import Any

import cbor2

from .._cbor import NO_REFERENCES

__all__ = [
    "PayloadDecodeError",
    "PickleRefusedError",
    "SerializationError",
    "SerializationFormat",
    "Serializer",
]


class SerializationFormat(enum.StrEnum):
    """How task arguments and results are turned into bytes."""

    JSON = "json"
    CBOR = "cbor"
    PICKLE = "pickle"

    @classmethod
    def _missing_(cls, value: object) -> SerializationFormat | None:
        if isinstance(value, str):
            for member in cls:
                if member.value == value.lower():
                    return member
        return None

    @property
    def code(self) -> int:
        """The small integer that names the format on the wire."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> SerializationFormat:
        try:
            return _BY_CODE[code]
        except (KeyError, TypeError):
            raise PayloadDecodeError(f"unknown serialization format code {code!r}") from None


_BY_CODE = {0: SerializationFormat.JSON, 1: SerializationFormat.CBOR, 2: SerializationFormat.PICKLE}
_CODES = {fmt: code for code, fmt in _BY_CODE.items()}


class SerializationError(ValueError):
    """Bytes that could not be turned back into values."""


class PayloadDecodeError(SerializationError):
    """The payload is not valid in its declared format."""


class PickleRefusedError(SerializationError):
    """A PICKLE payload reached a receiver that does not accept PICKLE."""


# JSON has no datetime: it travels as {"$datetime": "<ISO 8601>"} and comes back
# as a datetime.  A dict with exactly that one key is therefore reserved.
_DATETIME_KEY = "$datetime"


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return {_DATETIME_KEY: value.isoformat()}
    if isinstance(value, (set, frozenset)):
        raise TypeError(
            f"Object of type {type(value).__name__} is not JSON serializable (use a list)"
        )
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _json_object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1 and _DATETIME_KEY in obj:
        raw = obj[_DATETIME_KEY]
        if isinstance(raw, str):
            try:
                return dt.datetime.fromisoformat(raw)
            except ValueError:
                return obj
    return obj


_json_encoder = json.JSONEncoder(
    default=_json_default, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_json_decoder = json.JSONDecoder(object_hook=_json_object_hook)
# The C scanner without the object hook or the whitespace regexes of
# JSONDecoder.decode: several times cheaper for a small payload, and each
# task's arguments and result are decoded once each (design/performance.md).
# Used only when the text cannot hold a $datetime (nor an escape that could
# spell one).
_plain_json_decoder: Any = json.JSONDecoder()  # scan_once is not in the type stubs
_scan_plain_json: Callable[[str, int], tuple[Any, int]] = _plain_json_decoder.scan_once


def _decode_json(text: str, raw: bytes) -> Any:
    if b"$datetime" not in raw and b"\\u" not in raw:
        try:
            value, end = _scan_plain_json(text, 0)
        except StopIteration:
            pass  # e.g. leading whitespace: the full decoder says what is wrong
        else:
            if end == len(text):
                return value
    return _json_decoder.decode(text)


def _make_json_encode() -> Callable[[Any], str]:
    """One JSON encoder built once: ``JSONEncoder.encode`` rebuilds its C encoder per call.

    Payloads are encoded once per task at each end, so this is on the hot
    path (design/performance.md has the figures).  The cached encoder has
    no circular-reference table (it would be shared between calls); a
    circular value ends in RecursionError instead, which ``dumps`` reports as
    the TypeError it is.  Where the C encoder is missing, use the stdlib path.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    c_encode_basestring = getattr(json.encoder, "c_encode_basestring", None)
    if c_make_encoder is None or c_encode_basestring is None:
        return _json_encoder.encode
    encoder: Callable[[Any, int], Iterable[str]] = c_make_encoder(
        None, _json_default, c_encode_basestring, None, ":", ",", False, False, False
    )

    def encode(value: Any) -> str:
        return "".join(encoder(value, 0))

    return encode


_json_encode = _make_json_encode()


def _cbor_default(encoder: cbor2.CBOREncoder, value: Any) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not CBOR serializable")


class Serializer:
    """Encodes and decodes payloads in one format, with PICKLE off unless asked for."""

    __slots__ = ("allow_pickle", "format")

    def __init__(self, format: SerializationFormat, *, allow_pickle: bool = False) -> None:
        self.format = SerializationFormat(format)
        self.allow_pickle = allow_pickle

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raises TypeError naming the type that the format cannot hold."""
        return dumps(self.format, value)

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; raises a SerializationError subclass for bad bytes."""
        return loads(self.format, data, allow_pickle=self.allow_pickle)


def dumps(format: SerializationFormat, value: Any) -> bytes:
    """Encode ``value`` in ``format``; TypeError names the first type the format cannot hold."""
    if type(format) is not SerializationFormat:
        format = SerializationFormat(format)  # "json" as well as SerializationFormat.JSON
    if format is SerializationFormat.JSON:
        if isinstance(value, bytes):
            raise TypeError("Object of type bytes is not JSON serializable")
        try:
            return _json_encode(value).encode("utf-8")
        except ValueError as exc:  # NaN/inf
            raise TypeError(f"value is not JSON serializable: {exc}") from None
        except RecursionError:
            raise TypeError(
                "value is not JSON serializable: Circular reference detected (or nested too deeply)"
            ) from None
    if format is SerializationFormat.CBOR:
        try:
            return cbor2.dumps(value, default=_cbor_default)
        except cbor2.CBOREncodeError as exc:
            cause = exc.__cause__ or exc
            raise TypeError(f"value is not CBOR serializable: {cause}") from None
    if format is SerializationFormat.PICKLE:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError) as exc:
            raise TypeError(f"value cannot be pickled: {exc}") from None
    raise ValueError(f"unknown serialization format {format!r}")


def loads(format: SerializationFormat, data: bytes, *, allow_pickle: bool = False) -> Any:
    """Decode ``data`` from ``format``; bad bytes raise PayloadDecodeError, never anything else."""
    if type(format) is not SerializationFormat:
        format = SerializationFormat(format)
    if format is SerializationFormat.JSON:
        try:
            return _decode_json(data.decode("utf-8"), data)
        except UnicodeDecodeError as exc:
            raise PayloadDecodeError(f"JSON payload is not valid UTF-8: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise PayloadDecodeError(f"invalid JSON payload: {exc}") from None
    if format is SerializationFormat.CBOR:
        try:
            return cbor2.loads(data, semantic_decoders=NO_REFERENCES)
        except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, MemoryError) as exc:
            raise PayloadDecodeError(f"invalid CBOR payload: {exc}") from None
    if format is SerializationFormat.PICKLE:
        if not allow_pickle:
            raise PickleRefusedError(
                "refusing a PICKLE payload: unpickling runs arbitrary code, so this receiver "
                "accepts PICKLE only when started with allow_pickle=True (--allow-pickle)"
            )
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise PayloadDecodeError(f"invalid PICKLE payload: {exc}") from None
    raise ValueError(f"unknown serialization format {format!r}")


def describe_bytes(data: bytes, limit: int = 32) -> str:
    """A short printable preview of untrusted bytes for error messages and logs."""
    head = data[:limit]
    return base64.b16encode(head).decode() + ("…" if len(data) > limit else "")
