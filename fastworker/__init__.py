"""fastworker: a brokerless distributed task queue on trio and ZeroMQ."""

from ._callback_document import decode_callback_document as decode_callback_document
from .callback_receiver import CallbackReceiver as CallbackReceiver
from .client import AuthenticationError as AuthenticationError
from .client import Client as Client
from .client import ClientError as ClientError
from .client import ClientLoopError as ClientLoopError
from .client import ClientNotStartedError as ClientNotStartedError
from .client import ClientStoppedError as ClientStoppedError
from .client import ControlPlaneBusyError as ControlPlaneBusyError
from .client import ControlPlaneUnavailableError as ControlPlaneUnavailableError
from .client import PendingLimitError as PendingLimitError
from .client import QueueFullError as QueueFullError
from .cluster import Cluster as Cluster
from .tasks.models import CallbackInfo as CallbackInfo
from .tasks.models import DeadLetter as DeadLetter
from .tasks.models import ScheduleInfo as ScheduleInfo
from .tasks.models import Task as Task
from .tasks.models import TaskPriority as TaskPriority
from .tasks.models import TaskResult as TaskResult
from .tasks.models import TaskStatus as TaskStatus
from .tasks.registry import DuplicateTaskError as DuplicateTaskError
from .tasks.registry import task as task
from .tasks.serializer import PickleRefusedError as PickleRefusedError
from .tasks.serializer import SerializationError as SerializationError
from .tasks.serializer import SerializationFormat as SerializationFormat
from .transport import CurveKeys as CurveKeys

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "CallbackInfo",
    "CallbackReceiver",
    "Client",
    "ClientError",
    "ClientLoopError",
    "ClientNotStartedError",
    "ClientStoppedError",
    "Cluster",
    "ControlPlaneBusyError",
    "ControlPlaneUnavailableError",
    "CurveKeys",
    "DeadLetter",
    "DuplicateTaskError",
    "PendingLimitError",
    "PickleRefusedError",
    "QueueFullError",
    "ScheduleInfo",
    "SerializationError",
    "SerializationFormat",
    "Task",
    "TaskPriority",
    "TaskResult",
    "TaskStatus",
    "decode_callback_document",
    "task",
]
