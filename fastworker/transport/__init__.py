"""trio ↔ ZeroMQ: the socket adapter and the single place sockets are made."""

from ._factory import DEFAULT_MAX_MESSAGE_SIZE as DEFAULT_MAX_MESSAGE_SIZE
from ._factory import CurveKeys as CurveKeys
from ._factory import TransportConfig as TransportConfig
from ._factory import open_socket as open_socket
from ._factory import resolve_endpoint as resolve_endpoint
from ._zsocket import PeerUnreachable as PeerUnreachable
from ._zsocket import ZSocket as ZSocket
from ._zsocket import ZSocketStatistics as ZSocketStatistics

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "CurveKeys",
    "PeerUnreachable",
    "TransportConfig",
    "ZSocket",
    "ZSocketStatistics",
    "open_socket",
    "resolve_endpoint",
]
