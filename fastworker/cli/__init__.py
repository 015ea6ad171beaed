"""The ``fastworker`` command: run a node, submit and follow tasks, inspect a cluster.

``fastworker node …`` is ``python -m fastworker.node …``, ``fastworker bench …``
is ``python -m fastworker.bench …`` and ``fastworker keys …`` is ``python -m
fastworker.keys …``; ``submit``, ``result``, ``cancel``, ``status`` and
``workers`` talk to a control plane through the Client.
"""

from ._main import build_parser as build_parser
from ._main import main as main

__all__ = ["build_parser", "main"]
