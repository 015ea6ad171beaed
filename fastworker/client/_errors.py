"""Errors the Client raises; each says what happened and what to do."""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "ClientError",
    "ClientLoopError",
    "ClientNotStartedError",
    "ClientStoppedError",
    "ControlPlaneBusyError",
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


class ControlPlaneBusyError(ClientError, RuntimeError):
    """The control plane is answering as many requests of this kind as it allows; retry shortly.

    ``stats()`` gets it when more than four statistics queries are in flight
    at the control plane (each one asks every actor; design/protocol.md §8).
    """


class ControlPlaneUnavailableError(ClientError, TimeoutError):
    """The control plane did not answer a query in time."""


class AuthenticationError(ClientError, PermissionError):
    """The control plane refused this client's CURVE handshake.

    The message says what to check (the client's key is not allowed, the
    server key is wrong, or only one side uses CURVE).  Raised to every
    caller waiting when the refusal arrives and to every call after it, until
    a handshake succeeds; tasks already returned stay queued in the client.
    """
