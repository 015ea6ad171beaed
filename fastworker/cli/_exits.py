"""The exit codes of the ``fastworker`` client commands, and the error that carries one."""

from __future__ import annotations

__all__ = [
    "EXIT_FAILED",
    "EXIT_NOT_DONE",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliFailure",
]

EXIT_OK = 0
EXIT_FAILED = 1  # the task failed or was cancelled
EXIT_USAGE = 2  # bad arguments (argparse's own code)
EXIT_UNREACHABLE = 3  # no control plane answered within --timeout
EXIT_NOT_DONE = 4  # no result (yet), not cancelled, or --wait-timeout passed


class CliFailure(Exception):
    """A one-line message for stderr and the exit code that goes with it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
