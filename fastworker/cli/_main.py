"""The ``fastworker`` command line: the parser, and which module carries out each command.

``node`` and ``bench`` hand their arguments untouched to their own command
lines (``fastworker node ARGS`` is ``python -m fastworker.node ARGS``, flag
for flag, help and exit codes included), so they are dispatched on the
first word before this parser sees anything.  ``keys`` reuses
``fastworker.keys``'s parser.  The client commands share the options that
say where the control plane is and how long to wait for it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import trio

from .. import __version__
from .. import keys as _keys
from .._argtypes import _address, _non_negative_float, _positive_float
from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from ..client import AuthenticationError
from ._commands import cancel, result, status, submit, workers
from ._exits import EXIT_UNREACHABLE, CliFailure
from ._values import parse_kwargs, priority_name

__all__ = ["build_parser", "main"]

PROG = "fastworker"
DEFAULT_TIMEOUT = 5.0

_DESCRIPTION = """\
Run a fastworker node, submit tasks and follow them, look at a running cluster.

exit codes: 0 done; 1 the task failed (or was cancelled); 2 bad arguments;
3 no control plane answered within --timeout (or it refused this client's
CURVE key); 4 no result (yet), not cancelled, or --wait-timeout passed.
With --json every client command prints one JSON document on stdout;
errors go to stderr as one line.
"""

_CLIENT_EPILOG = f"""\
The control plane is found at --discovery-address, else
$FASTWORKER_DISCOVERY_ADDRESS, else {DEFAULT_DISCOVERY_ADDRESS}.  The Client also
reads $FASTWORKER_SERIALIZATION_FORMAT, $FASTWORKER_RETRIES,
$FASTWORKER_CURVE_SECRET_KEY and $FASTWORKER_CURVE_SERVER_KEY, and
$FASTWORKER_TIMEOUT when --timeout is not given.
"""


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--discovery-address",
        type=_address,
        default=None,
        metavar="ADDRESS",
        help="the control plane's discovery endpoint "
        f"(default: $FASTWORKER_DISCOVERY_ADDRESS or {DEFAULT_DISCOVERY_ADDRESS})",
    )
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help=f"how long to wait for the control plane to answer before exit code 3 "
        f"(default: $FASTWORKER_TIMEOUT or {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        help="this client's secret certificate (NAME.key_secret) for a CURVE control plane "
        "(default: $FASTWORKER_CURVE_SECRET_KEY)",
    )
    common.add_argument(
        "--curve-server-key",
        metavar="FILE",
        help="the control plane's public certificate (its NAME.key) "
        "(default: $FASTWORKER_CURVE_SERVER_KEY)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the client library's own log messages on stderr",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _client_options()

    def client_command(
        name: str, run: Callable[..., object], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog=_CLIENT_EPILOG,
        )
        sub.set_defaults(run=run)
        return sub

    # Listed for --help only: main() hands their arguments over before parsing.
    commands.add_parser(
        "node",
        add_help=False,
        help="run a control plane and/or worker processes (python -m fastworker.node; "
        "fastworker node --help)",
    )

    sub = client_command("submit", submit, "submit a task; print its id, or with --wait its result")
    sub.add_argument("task", metavar="TASK", help="the registered task name")
    sub.add_argument(
        "task_args",
        nargs="*",
        metavar="ARG",
        help="positional arguments: JSON when an ARG parses as JSON (1, true, null, "
        '[1,2], "1"), else the string itself; put -- before an ARG that starts with -',
    )
    sub.add_argument(
        "--kwargs",
        type=parse_kwargs,
        default={},
        metavar="JSON",
        help="keyword arguments as a JSON object",
    )
    sub.add_argument(
        "--priority",
        type=priority_name,
        default="normal",
        metavar="P",
        help="critical, high, normal (default) or low",
    )
    sub.add_argument(
        "--countdown",
        type=_non_negative_float,
        default=None,
        metavar="S",
        help="run no sooner than S seconds from now",
    )
    sub.add_argument(
        "--wait",
        action="store_true",
        help="wait for the result and print it; the exit code says how the task ended",
    )
    sub.add_argument(
        "--wait-timeout",
        type=_positive_float,
        default=None,
        metavar="S",
        help="--wait, but give up after S seconds with exit code 4 (default: wait as "
        "long as it takes); the task stays with the control plane either way",
    )

    sub = client_command(
        "result", result, "print the result the control plane's result cache holds for a task"
    )
    sub.add_argument("task_id", metavar="ID")

    sub = client_command(
        "cancel", cancel, "cancel a task; exit code 0 when it will not run, 4 when it ran"
    )
    sub.add_argument("task_id", metavar="ID")

    sub = client_command(
        "status",
        status,
        "the cluster at a glance: workers, queues per priority, in flight, rates, "
        "result cache, callbacks",
    )
    sub.add_argument(
        "--interval",
        type=_non_negative_float,
        default=1.0,
        metavar="S",
        help="rates are the change between two statistics samples taken S seconds apart "
        "(default 1; 0 takes one sample and shows no rates)",
    )

    client_command("workers", workers, "the worker processes the control plane knows")

    commands.add_parser(
        "bench",
        add_help=False,
        help="measure throughput, latency and memory (python -m fastworker.bench; "
        "fastworker bench --help)",
    )
    keys = commands.add_parser(
        "keys",
        help="manage CURVE keys (python -m fastworker.keys)",
        description="Manage fastworker's CURVE keys.",
    )
    _keys.build_parser(keys)
    return parser


def _client_timeout(args: argparse.Namespace) -> float | None:
    """--timeout, else None when $FASTWORKER_TIMEOUT is set (the Client reads it), else ours."""
    if args.timeout is not None:
        return float(args.timeout)
    if os.environ.get("FASTWORKER_TIMEOUT"):
        return None
    return DEFAULT_TIMEOUT


def _quiet_library(verbose: bool) -> None:
    """The command reports what matters itself; the library's log lines only with -v."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(levelname)s: %(message)s")
    if not verbose:
        logging.getLogger("fastworker").setLevel(logging.CRITICAL + 1)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Imported on use: the client commands need not load the control plane and worker.
    if argv and argv[0] == "node":
        from ..node import main as node_main

        return node_main(argv[1:])
    if argv and argv[0] == "bench":
        from ..bench._cli import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keys":
        return _keys.run(args)
    _quiet_library(args.verbose)
    prog = f"{PROG} {args.command}"
    try:
        return int(trio.run(args.run, args, _client_timeout(args)))
    except CliFailure as failure:
        print(f"{prog}: error: {failure}", file=sys.stderr)
        return failure.code
    except AuthenticationError as exc:  # CURVE keys from FASTWORKER_CURVE_* refused
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): what is left to print has nobody to read it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
