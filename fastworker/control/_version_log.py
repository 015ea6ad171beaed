"""One log line per foreign protocol version at each endpoint.

A peer of another version is refused frame after frame (a worker re-sends its
Register every heartbeat): the operator needs to see it once, with both
versions named, and the count in the stats (``rejected["version"]``), not a
line per frame.
"""

from __future__ import annotations

import logging

from ..wire import PROTOCOL_VERSION, VersionError, WireError

__all__ = ["VersionLog"]

# Distinct versions logged per endpoint; past that, refusals are only counted.
_MAX_VERSIONS = 16


class VersionLog:
    def __init__(self, log: logging.Logger, endpoint: str) -> None:
        self._log = log
        self._endpoint = endpoint
        self._seen: set[int | None] = set()

    def note(self, exc: WireError) -> None:
        """Log ``exc`` if it is the first refusal of its version here."""
        if not isinstance(exc, VersionError):
            return
        version = exc.peer_version
        if version in self._seen or len(self._seen) >= _MAX_VERSIONS:
            return
        self._seen.add(version)
        shown = (
            "an unreadable protocol version" if version is None else f"protocol version {version}"
        )
        self._log.warning(
            "%s refused a peer speaking %s (this node speaks version %d) and told it so; "
            "further refusals are counted in the stats (rejected: version)",
            self._endpoint,
            shown,
            PROTOCOL_VERSION,
        )
