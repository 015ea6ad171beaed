"""The Client: the documented coroutine API over a trio actor."""

from ._errors import AuthenticationError as AuthenticationError
from ._errors import ClientError as ClientError
from ._errors import ClientLoopError as ClientLoopError
from ._errors import ClientNotStartedError as ClientNotStartedError
from ._errors import ClientStoppedError as ClientStoppedError
from ._errors import ControlPlaneBusyError as ControlPlaneBusyError
from ._errors import ControlPlaneUnavailableError as ControlPlaneUnavailableError
from ._errors import PendingLimitError as PendingLimitError
from ._errors import QueueFullError as QueueFullError
from .client import Client as Client

__all__ = [
    "AuthenticationError",
    "Client",
    "ClientError",
    "ClientLoopError",
    "ClientNotStartedError",
    "ClientStoppedError",
    "ControlPlaneBusyError",
    "ControlPlaneUnavailableError",
    "PendingLimitError",
    "QueueFullError",
]
