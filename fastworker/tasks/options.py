"""The one rule for a task's policy options, checked where a user chooses them.

``@task(...)`` and the Client's per-call options (``apply_async``,
``submit_task``, ``submit_batch``) go through these checks, so a bad value
fails at the call with a ValueError or TypeError naming the option, before
anything is queued or sent.

The ceilings make the retry schedule safe to compute anywhere:
``retry_delay * retry_backoff ** (attempt - 1)`` with ``retry_delay`` at most
``MAX_DELAY``, ``retry_backoff`` at most ``MAX_RETRY_BACKOFF`` and
``attempt`` at most ``MAX_RETRIES`` is at most 86400 * 100**99 (about 1e203),
a finite float: no overflow, whatever the cap ``retry_backoff_max`` says.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any

__all__ = [
    "MAX_DELAY",
    "MAX_RETRIES",
    "MAX_RETRY_BACKOFF",
    "check_count",
    "check_eta",
    "check_seconds",
    "check_task_options",
]

MAX_RETRIES = 100
"""Retries a task may ask for (``max_retries``)."""

MAX_RETRY_BACKOFF = 100.0
"""Largest ``retry_backoff`` factor; the smallest is 1 (a delay that never shrinks)."""

MAX_WAIT = 10 * 365 * 86_400.0
"""Furthest ahead an ``eta`` or ``countdown`` may be, in seconds (ten years)."""

MAX_DELAY = 86_400.0
"""Largest ``retry_delay`` and ``retry_backoff_max``, in seconds (one day)."""


def _number(name: str, value: object) -> float:
    # bool is an int, but `retry_delay=True` is a mistake, not one second.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_seconds(
    name: str,
    value: object,
    *,
    positive: bool = False,
    at_most: float = math.inf,
) -> float:
    """A duration in seconds: a finite number >= 0 (> 0 when ``positive``), at most ``at_most``."""
    number = _number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    if positive and number == 0:
        raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
    if number > at_most:
        raise ValueError(f"{name} must be at most {at_most:g} seconds, got {value!r}")
    return number


def check_count(name: str, value: object, *, at_most: int) -> int:
    """A whole number from 0 to ``at_most``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= at_most:
        raise ValueError(f"{name} must be >= 0 and at most {at_most}, got {value!r}")
    return value


def check_eta(eta: object) -> float:
    """A timezone-aware datetime, as a POSIX timestamp."""
    if not isinstance(eta, dt.datetime):
        raise TypeError(
            f"eta must be a datetime (e.g. datetime.now(timezone.utc) + timedelta(minutes=5)), "
            f"not {type(eta).__name__}"
        )
    if eta.tzinfo is None or eta.tzinfo.utcoffset(eta) is None:
        raise ValueError("eta must be timezone-aware (e.g. datetime.now(timezone.utc))")
    stamp = eta.timestamp()
    if stamp > time.time() + MAX_WAIT:
        raise ValueError(f"eta must be at most {MAX_WAIT / 86_400 / 365:g} years ahead, got {eta}")
    return stamp


def check_task_options(
    *,
    max_retries: object = None,
    retry_delay: object = None,
    retry_backoff: object = None,
    retry_backoff_max: object = None,
    timeout: object = None,
    timeout_name: str = "timeout",
) -> dict[str, Any]:
    """The options that were given (not None), checked; the names are the wire's option keys.

    ``timeout`` is a task run's time limit, called ``timeout_name`` in errors
    (``time_limit`` at the Client).
    """
    options: dict[str, Any] = {}
    if max_retries is not None:
        options["max_retries"] = check_count("max_retries", max_retries, at_most=MAX_RETRIES)
    if retry_delay is not None:
        options["retry_delay"] = check_seconds("retry_delay", retry_delay, at_most=MAX_DELAY)
    if retry_backoff is not None:
        backoff = _number("retry_backoff", retry_backoff)
        if not 1 <= backoff <= MAX_RETRY_BACKOFF:
            raise ValueError(
                f"retry_backoff must be from 1 to {MAX_RETRY_BACKOFF:g}, got {retry_backoff!r}"
            )
        options["retry_backoff"] = backoff
    if retry_backoff_max is not None:
        options["retry_backoff_max"] = check_seconds(
            "retry_backoff_max", retry_backoff_max, at_most=MAX_DELAY
        )
    if timeout is not None:
        options["timeout"] = check_seconds(timeout_name, timeout, positive=True)
    return options
