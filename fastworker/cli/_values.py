"""What ``fastworker submit`` makes of its words: task arguments, keyword arguments, priority."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..tasks.models import TaskPriority

__all__ = ["parse_kwargs", "parse_task_arg", "priority_name"]


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; "NaN" on a command line is more likely a word.
    raise ValueError(name)


def parse_task_arg(text: str) -> Any:
    """The JSON value ``text`` spells, or ``text`` itself when it is not JSON.

    So ``3`` is the number 3, ``'"3"'`` the string "3", ``'[1, 2]'`` a list
    and ``hello`` the string "hello": shells make typing quoted JSON strings
    painful, and a word that is not JSON can only have meant itself.
    """
    try:
        return json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return text


def parse_kwargs(text: str) -> dict[str, Any]:
    """An argparse type for ``--kwargs``: a JSON object, else an error saying what it got."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object, got {type(value).__name__}: {text!r}"
        )
    return value


def priority_name(text: str) -> str:
    """An argparse type: a priority's name in any case, as its lowercase value."""
    try:
        return TaskPriority(text).value
    except ValueError:
        valid = ", ".join(p.value for p in TaskPriority)
        raise argparse.ArgumentTypeError(f"expected one of {valid}, got {text!r}") from None
