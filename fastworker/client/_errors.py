"""Errors the Client raises; each says what happened and what to do."""

from __future__ import annotations

__all__ = [
    "ClientError",
    "ClientLoopError",
    "ClientNotStartedError",
    "ClientStoppedError",
    "ControlPlaneUnavailableError",
    "PendingLimitError",
    "QueueFullError",
]


class ClientError(Exception):
    """Base of the Client's own errors."""


class ClientNotStartedError(ClientError, RuntimeError):
    """A method that needs the client running was called before ``await client.start()``."""


class ClientStoppedError(ClientError, RuntimeError):
    """The client was stopped; ``await client.start()`` starts it again."""


class ClientLoopError(ClientError, RuntimeError):
    """The client was used from an event loop (or thread) other than the one that started it.

    Raised before anything is queued, so retrying the call elsewhere cannot
    submit a task twice.
    """


class PendingLimitError(ClientError):
    """The client already holds ``max_pending`` unfinished tasks (e.g. no control plane)."""


class QueueFullError(ClientError):
    """The control plane holds as many tasks as it is allowed to (``--max-queued``)."""


class ControlPlaneUnavailableError(ClientError, TimeoutError):
    """The control plane did not answer a query in time."""
