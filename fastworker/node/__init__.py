"""The node command: ``python -m fastworker.node`` (also installed as ``fastworker``)."""

from ._cli import build_parser as build_parser
from ._cli import main as main

__all__ = ["build_parser", "main"]
