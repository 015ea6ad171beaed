"""The control plane: Discovery, Gateway, Scheduler, ResultCache and Callback dispatcher."""

from .control_plane import ControlPlane as ControlPlane
from .control_plane import ControlPlaneConfig as ControlPlaneConfig

__all__ = ["ControlPlane", "ControlPlaneConfig"]
