"""``python -m fastworker.bench``: the command line, and what each way of ending returns.

Exit codes: 0 measured; 1 a one-line error (a node that did not start, a
stall, tasks that failed: their numbers would be meaningless); 2 bad
arguments; 130 Ctrl-C; 143 SIGTERM.  The report goes to stdout (a table,
or with ``--json`` one JSON line), everything else to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from .._argtypes import _address
from ._nodes import stop_all
from ._options import DEFAULT_SCENARIOS, SCENARIOS, BenchError, Options
from ._progress import Progress
from ._report import failed_tasks, render_json, render_table
from ._runner import run
from ._signals import Stopped

__all__ = ["build_parser", "main"]

PROG = "python -m fastworker.bench"

_EPILOG = """\
By default the bench starts its own node (python -m fastworker.node on a random
loopback port) serving fastworker.bench._tasks. With --discovery-address it
measures an existing cluster instead: start that cluster's workers with
--task-modules fastworker.bench._tasks; the backlog and workers scenarios are
then skipped and memory is reported only for processes on this host.
"""


def _count(minimum: int) -> type[int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", "").replace(",", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse  # type: ignore[return-value]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Measure a fastworker installation: throughput, latency, memory.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--tasks",
        type=_count(1),
        default=defaults.tasks,
        metavar="N",
        help="tasks per throughput/batch/workers run (default %(default)s)",
    )
    add(
        "--workers",
        type=_count(1),
        default=defaults.workers,
        metavar="N",
        help="worker processes for throughput, batch and latency (default %(default)s)",
    )
    add(
        "--concurrency",
        type=_count(1),
        default=defaults.concurrency,
        metavar="N",
        help="tasks at once per worker process (default %(default)s)",
    )
    add(
        "--format",
        choices=("json", "cbor"),
        default=defaults.serialization_format,
        help="serialization format of the client (default %(default)s)",
    )
    add(
        "--payload-bytes",
        type=_count(0),
        default=defaults.payload_bytes,
        metavar="N",
        help="each task carries a string of N bytes and returns its length (default 0: "
        "the add task)",
    )
    add(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(DEFAULT_SCENARIOS),
        metavar="NAME",
        help=f"what to run, among {', '.join(SCENARIOS)} (default: all but floor, which "
        "times latency's 3 processes and 4 hops on bare pyzmq + trio, without fastworker: "
        "the floor of this machine)",
    )
    add(
        "--discovery-address",
        type=_address,
        metavar="ADDRESS",
        help="measure the existing cluster there instead of starting a node",
    )
    add(
        "--json",
        action="store_true",
        help="print one JSON object (keyed by scenario) instead of the table",
    )
    add(
        "--runs",
        type=_count(1),
        default=defaults.runs,
        metavar="K",
        help="repeat each scenario K times; report each run and the median",
    )
    add(
        "--backlog-tasks",
        type=_count(1),
        default=defaults.backlog_tasks,
        metavar="N",
        help="tasks queued with no worker in the backlog scenario (default %(default)s)",
    )
    add(
        "--latency-count",
        type=_count(1),
        default=defaults.latency_count,
        metavar="N",
        help="sequential round trips in the latency and floor scenarios (default %(default)s)",
    )
    add(
        "--batch-size",
        type=_count(1),
        default=defaults.batch_size,
        metavar="N",
        help="tasks per submit_batch call (default %(default)s)",
    )
    add(
        "--worker-counts",
        type=_count(1),
        nargs="+",
        default=list(defaults.worker_counts),
        metavar="N",
        help="worker processes per run of the workers scenario (default 1 2 4)",
    )
    add(
        "--stall-timeout",
        type=_seconds,
        default=defaults.stall_timeout,
        metavar="SECONDS",
        help="give up after this long without a single result (default %(default)g)",
    )
    add(
        "--curve",
        action="store_true",
        help="run throughput, batch and latency again on a node with CURVE on every socket "
        "(keys made for the run), and time the handshake of both",
    )
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    return parser


def options_from(args: argparse.Namespace) -> Options:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return Options(
        tasks=args.tasks,
        workers=args.workers,
        concurrency=args.concurrency,
        serialization_format=args.format,
        payload_bytes=args.payload_bytes,
        scenarios=tuple(dict.fromkeys(args.scenarios)),
        discovery_address=args.discovery_address,
        json=args.json,
        runs=args.runs,
        backlog_tasks=args.backlog_tasks,
        latency_count=args.latency_count,
        batch_size=args.batch_size,
        worker_counts=tuple(dict.fromkeys(args.worker_counts)),
        progress=progress,
        stall_timeout=args.stall_timeout,
        curve=args.curve,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = options_from(build_parser().parse_args(argv))
    progress = Progress(options.progress)
    try:
        results = asyncio.run(run(options, progress))
    except Stopped as stop:
        progress.note(f"{PROG}: stopped by {stop}; its nodes are stopped")
        return 128 + stop.signum
    except KeyboardInterrupt:  # a second Ctrl-C: no graceful stop
        progress.note(f"{PROG}: interrupted; its nodes are killed")
        return 130
    except BenchError as exc:
        progress.note(f"{PROG}: error: {exc}")
        return 1
    finally:
        stop_all()
    print(render_json(results) if options.json else render_table(options, results), flush=True)
    failed = failed_tasks(results)
    if failed:
        progress.note(f"{PROG}: error: {failed:,} tasks failed; these figures are not valid")
        return 1
    return 0
