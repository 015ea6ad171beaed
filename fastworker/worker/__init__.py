"""The worker side: the Worker actor and the executor that runs task code."""

from .worker import Worker as Worker
from .worker import WorkerConfig as WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
