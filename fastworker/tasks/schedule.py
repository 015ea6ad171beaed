"""When a periodic task runs: one rule for ``@task(cron=...)``, the Client and the control plane.

A schedule is either a cron expression (five fields, or six with seconds
last, as croniter reads them; ``@hourly`` and friends too; not croniter's
seven-field form with a year) in an IANA time
zone, or a fixed ``repeat_interval`` in seconds.  The same checks run where a
user writes one (``@task``, ``Client.schedule``) and again on the control
plane for what arrives from the network, so a bad schedule is refused with
a reason at either end and never reaches the Scheduler's loop.  Cron
parsing is croniter's, not ours: design/schedules.md says why.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from typing import Any

import attrs
from croniter import croniter

__all__ = [
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "ScheduleError",
    "ScheduleRule",
    "check_schedule",
]

MIN_INTERVAL = 1.0
"""Shortest ``repeat_interval`` in seconds: a schedule is not a busy loop."""

MAX_INTERVAL = 366 * 86_400.0
"""Longest ``repeat_interval`` in seconds (a year)."""

_MAX_CRON_LENGTH = 256
_MAX_ZONE_LENGTH = 64


class ScheduleError(ValueError):
    """A cron expression, interval or time zone that cannot make a schedule."""


@attrs.frozen
class ScheduleRule:
    """A checked schedule: ``cron`` in ``timezone``, or every ``interval`` seconds."""

    cron: str | None
    interval: float | None
    timezone: str | None

    def next_after(self, now: float, anchor: float) -> float:
        """The first tick strictly after ``now`` (epoch seconds).

        An interval schedule ticks at ``anchor + k * interval``, so a late
        control plane does not drift the ticks that follow.
        """
        if self.interval is not None:
            steps = max(1, math.floor((now - anchor) / self.interval) + 1)
            while anchor + steps * self.interval <= now:  # the division may round down
                steps += 1
            return anchor + steps * self.interval
        return float(self.cron_ticks(now).get_next(float))

    def cron_ticks(self, after: float) -> Any:
        """A croniter positioned at ``after``: each ``get_next(float)`` is the following tick.

        Stepping one costs a fraction of building one (design/performance.md),
        so the store keeps one per cron schedule.
        """
        assert self.cron is not None
        return croniter(self.cron, dt.datetime.fromtimestamp(after, self._zone()))

    def _zone(self) -> dt.tzinfo:
        return dt.UTC if self.timezone is None else zoneinfo.ZoneInfo(self.timezone)


def check_schedule(
    cron: object = None, repeat_interval: object = None, timezone: object = None
) -> ScheduleRule:
    """The rule for these arguments; ScheduleError (a ValueError) or TypeError naming the fault."""
    if cron is None and repeat_interval is None:
        raise ScheduleError("give cron= or repeat_interval=")
    if cron is not None and repeat_interval is not None:
        raise ScheduleError("give cron= or repeat_interval=, not both")
    if repeat_interval is not None:
        if timezone is not None:
            raise ScheduleError("timezone= applies to cron schedules only")
        if isinstance(repeat_interval, bool) or not isinstance(repeat_interval, (int, float)):
            raise TypeError(
                f"repeat_interval must be a number, not {type(repeat_interval).__name__}"
            )
        try:
            seconds = float(repeat_interval)
        except OverflowError:  # an integer past any float (a CBOR bignum)
            seconds = math.inf
        if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:  # False for NaN
            raise ScheduleError(
                f"repeat_interval must be {MIN_INTERVAL:.0f} to {MAX_INTERVAL:.0f} seconds, "
                f"got {repeat_interval!r:.40}"
            )
        return ScheduleRule(None, seconds, None)
    if not isinstance(cron, str):
        raise TypeError(f"cron must be a string, not {type(cron).__name__}")
    fields = len(cron.split())
    if (
        not 0 < len(cron) <= _MAX_CRON_LENGTH
        or not (fields in (5, 6) or (fields == 1 and cron.startswith("@")))
        or not croniter.is_valid(cron)
    ):
        raise ScheduleError(f"cron expression {cron[:80]!r} is not valid")
    if timezone is not None:
        if not isinstance(timezone, str):
            raise TypeError(f"timezone must be a string, not {type(timezone).__name__}")
        if not 0 < len(timezone) <= _MAX_ZONE_LENGTH:
            raise ScheduleError(f"unknown time zone {timezone[:80]!r}")
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ScheduleError(f"unknown time zone {timezone!r}") from None
    rule = ScheduleRule(cron, None, timezone)
    try:
        # Valid field by field yet never true ("0 0 30 2 *"): croniter gives up.
        rule.next_after(0.0, 0.0)
    except Exception as exc:  # croniter's CroniterBadDateError and friends
        raise ScheduleError(f"cron expression {cron!r} never fires: {exc}") from None
    return rule


def rule_fields(rule: ScheduleRule) -> list[Any]:
    """The rule's wire fields: ``[cron, interval, timezone]``."""
    return [rule.cron, rule.interval, rule.timezone]
