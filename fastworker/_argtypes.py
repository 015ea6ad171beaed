"""argparse value types shared by the command-line tools (node and bench).

Each refuses what would break the program later (NaN, infinities, negative
counts) with a message argparse prints as one ``error:`` line.
"""

from __future__ import annotations

import argparse
import math

__all__: list[str] = []


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:  # also refuses NaN, which every comparison fails
        raise argparse.ArgumentTypeError(f"must be positive, got {value:g}")
    return value


def _interval(text: str) -> float:
    value = _positive_float(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError("must be a finite number of seconds, got inf")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


# Below this a message cannot hold even one ordinary task next to its envelope.
MIN_MESSAGE_SIZE = 64 * 1024


def _message_size(text: str) -> int:
    value = _int(text)
    if value < MIN_MESSAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_MESSAGE_SIZE} bytes (64 KiB), got {value}"
        )
    return value


def _address(text: str) -> str:
    if "://" not in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a ZeroMQ endpoint (expected e.g. tcp://127.0.0.1:5550)"
        )
    return text
