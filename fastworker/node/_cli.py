"""``python -m fastworker.node``: run a control plane, worker processes, or both.

Roles:

* ``all`` (default): the control plane in this process and ``--workers``
  worker processes beside it, supervised.
* ``control-plane``: only the control plane.
* ``worker``: only ``--workers`` worker processes, joining the control plane
  at ``--discovery-address`` (started before it, they keep trying until it
  answers).

SIGINT/SIGTERM shut down gracefully: workers stop taking work, finish what
they run within ``--grace`` seconds and hand back the rest; then the control
plane stops; the exit code is 0.
"""

from __future__ import annotations

import argparse
import errno
import gc
import importlib
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import trio
import zmq

from .._argtypes import (
    MIN_MESSAGE_SIZE,
    _address,
    _interval,
    _message_size,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
)
from .._callback_allow import DEFAULT_CALLBACK_ALLOW, check_pattern
from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from ..control import ControlPlane, ControlPlaneConfig
from ..control._taskbook import default_max_queued_bytes
from ..control.journal import JournalError
from ..control.result_cache import default_result_cache_bytes
from ..dashboard import HttpStartError, check_http_address
from ..runtime import Supervisor
from ..security import CertificateError
from ..tasks.registry import TaskRegistry, registry_from
from ..transport import DEFAULT_MAX_MESSAGE_SIZE, TransportConfig
from ..worker import Worker, WorkerConfig
from ._logging import LOG_FORMATS, configure_logging, wait_for_queued_log_lines
from ._processes import RECYCLE_EXIT_CODE, WorkerProcesses, parent_alive
from ._security import NodeSecurity, SecurityError, add_security_arguments, node_security

__all__ = ["build_parser", "main"]

log = logging.getLogger("fastworker.node")

PROG = "python -m fastworker.node"
# EX_CONFIG: the journal cannot be used; restarting on the same file would fail again.
JOURNAL_EXIT_CODE = 78

_E = TypeVar("_E", bound=BaseException)


class CliError(Exception):
    """A problem to report as one line, with exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run a fastworker control plane and/or worker processes.",
    )
    parser.add_argument("--role", choices=("all", "control-plane", "worker"), default="all")
    parser.add_argument(
        "--discovery-address",
        type=_address,
        default=DEFAULT_DISCOVERY_ADDRESS,
        help="where Discovery listens (control plane) or is reached (worker); "
        "tcp://127.0.0.1:* picks a free port, printed when ready",
    )
    parser.add_argument("--client-address", type=_address, help="client endpoint to bind")
    parser.add_argument("--worker-address", type=_address, help="worker endpoint to bind")
    parser.add_argument(
        "--advertise-client-address",
        type=_address,
        help="client endpoint Discovery tells clients to connect to (default: the bound one)",
    )
    parser.add_argument(
        "--advertise-worker-address",
        type=_address,
        help="worker endpoint Discovery tells workers to connect to (default: the bound one)",
    )
    parser.add_argument(
        "--task-modules",
        nargs="+",
        default=[],
        metavar="MOD",
        help="modules whose @task functions workers serve (the current directory is importable)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        help="tasks at once per worker process (default 8)",
    )
    parser.add_argument(
        "--prefetch",
        type=_non_negative_int,
        default=None,
        help="tasks a worker holds beyond --concurrency (default max(concurrency, 64))",
    )
    parser.add_argument("--result-ttl", type=_positive_float, default=3600.0)
    parser.add_argument("--result-cache-size", type=_positive_int, default=10_000)
    parser.add_argument(
        "--result-cache-bytes",
        type=_positive_int,
        default=None,
        help="encoded bytes of results the control plane caches; the least recently used go "
        "(default: an eighth of this machine's memory, between 64 MiB and 4 GiB; at least "
        "--max-message-size)",
    )
    parser.add_argument("--heartbeat-interval", type=_interval, default=1.0)
    parser.add_argument("--max-queued", type=_positive_int, default=1_000_000)
    parser.add_argument(
        "--max-queued-bytes",
        type=_positive_int,
        default=None,
        help="bytes of tasks (arguments, options) the control plane holds before rejecting "
        "(default: an eighth of this machine's memory, between 64 MiB and 4 GiB)",
    )
    parser.add_argument(
        "--max-worker-deaths",
        type=_positive_int,
        default=3,
        help="poison guard: runs of one task that may kill their worker",
    )
    parser.add_argument(
        "--max-message-size",
        type=_message_size,
        default=DEFAULT_MAX_MESSAGE_SIZE,
        help=f"largest ZeroMQ message in bytes (default {DEFAULT_MAX_MESSAGE_SIZE}, "
        f"at least {MIN_MESSAGE_SIZE}); a task or result larger than fits fails alone",
    )
    parser.add_argument(
        "--unknown-task-grace",
        type=_non_negative_float,
        default=5.0,
        help="seconds after a worker joins before queued tasks nobody serves fail (default 5)",
    )
    parser.add_argument("--callback-timeout", type=_positive_float, default=10.0)
    parser.add_argument(
        "--callback-allow",
        action="append",
        type=_callback_pattern,
        default=[],
        metavar="PATTERN",
        help="also deliver callbacks to addresses matching PATTERN (repeatable), beyond "
        "loopback: tcp://10.0.0.*:*, tcp://10.0.0.0/8:7000-7099, tcp://*.internal:7000, "
        "tcp://[fd00::/8]:*, ipc:///run/app/*",
    )
    parser.add_argument(
        "--grace",
        type=_non_negative_float,
        default=30.0,
        help="seconds running tasks get to finish on shutdown (default 30)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="workers accept PICKLE payloads (unpickling runs arbitrary code); the control "
        "plane never decodes payloads, so --role control-plane refuses this flag",
    )
    parser.add_argument(
        "--http-address",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics, a JSON API and a live dashboard there (needs "
        "fastworker[dashboard]; port 0 picks a free one; loopback only unless --insecure: "
        "the dashboard has no authentication and can cancel tasks)",
    )
    parser.add_argument(
        "--journal",
        metavar="PATH",
        help="keep the control plane's tasks and results in this SQLite file (WAL mode) and "
        "take them back when it starts again: a crash loses no acknowledged task "
        "(default: memory only)",
    )
    parser.add_argument(
        "--journal-sync",
        choices=("normal", "full"),
        default="normal",
        help="normal: safe from a process crash; full: an fsync per commit, safe from power "
        "loss, slower (default normal)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        type=str.upper,
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default): readable lines; json: one JSON object per line with time, "
        "level, process, pid, actor, logger, event and task_id where there is one",
    )
    add_security_arguments(parser)
    # Internal: the command line of one worker process, started by a node.
    parser.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    return parser


def _callback_pattern(text: str) -> str:
    try:
        return check_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _load_registry(modules: Sequence[str]) -> TaskRegistry:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise CliError(
                f"cannot import task module {name!r}: {type(exc).__name__}: {exc}"
            ) from None
    return registry_from(modules)


def _worker_argv(args: argparse.Namespace, discovery_address: str) -> list[str]:
    argv = [
        "--worker-process",
        "--discovery-address",
        discovery_address,
        "--concurrency",
        str(args.concurrency),
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--max-message-size",
        str(args.max_message_size),
        "--grace",
        str(args.grace),
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
    ]
    if args.prefetch is not None:
        argv += ["--prefetch", str(args.prefetch)]
    if args.allow_pickle:
        argv.append("--allow-pickle")
    if args.task_modules:
        argv += ["--task-modules", *args.task_modules]
    return argv


async def _wait_for_signal(*, also_when: trio.Event | None = None) -> str:
    """The name of the first SIGINT/SIGTERM, or "recycle" when ``also_when`` fires first."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        result = "recycle"
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                nonlocal result
                async for signum in signals:
                    result = signal.Signals(signum).name
                    nursery.cancel_scope.cancel()

            async def on_event() -> None:
                assert also_when is not None
                await also_when.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            if also_when is not None:
                nursery.start_soon(on_event)
        return result


async def _reload_keys_on_sighup(
    control_plane: ControlPlane,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """SIGHUP: read --client-keys and --worker-keys again; a removed key is refused from now.

    Runs until ``scope`` is cancelled (at shutdown).  Started before the
    ready line: a SIGHUP that came before the receiver was open would end
    the process (its default action)."""
    with scope, trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            if await control_plane.reload_keys():
                log.info("SIGHUP: CURVE keys reloaded")


def _control_plane(args: argparse.Namespace, security: NodeSecurity) -> ControlPlane:
    own = frozenset({security.worker.public}) if security.own_workers and security.worker else None
    try:
        return ControlPlane(
            ControlPlaneConfig(
                discovery_address=args.discovery_address,
                client_address=args.client_address,
                worker_address=args.worker_address,
                advertise_client_address=args.advertise_client_address,
                advertise_worker_address=args.advertise_worker_address,
                result_ttl=args.result_ttl,
                result_cache_size=args.result_cache_size,
                result_cache_bytes=args.result_cache_bytes or default_result_cache_bytes(),
                heartbeat_interval=args.heartbeat_interval,
                max_queued=args.max_queued,
                max_queued_bytes=args.max_queued_bytes or default_max_queued_bytes(),
                max_worker_deaths=args.max_worker_deaths,
                unknown_task_grace=args.unknown_task_grace,
                max_message_size=args.max_message_size,
                callback_timeout=args.callback_timeout,
                callback_allow=(*DEFAULT_CALLBACK_ALLOW, *args.callback_allow),
                curve=security.server,
                client_keys_dir=security.client_keys_dir,
                worker_keys_dir=security.worker_keys_dir,
                own_worker_keys=own or frozenset(),
                journal=args.journal,
                journal_sync=args.journal_sync,
                http_address=args.http_address,
                insecure=args.insecure,
            )
        )
    except CertificateError as exc:
        raise CliError(str(exc)) from None


async def _run_node(args: argparse.Namespace, security: NodeSecurity) -> int:
    control_plane: ControlPlane | None = None
    reloading = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        discovery_address = args.discovery_address
        if args.role in ("all", "control-plane"):
            control_plane = _control_plane(args, security)
            await nursery.start(control_plane.run)
            if control_plane.keys is not None:
                await nursery.start(_reload_keys_on_sighup, control_plane, reloading)
            discovery_address = control_plane.discovery_address
        processes: WorkerProcesses | None = None
        if args.role in ("all", "worker") and args.workers > 0:
            processes = WorkerProcesses(
                args.workers,
                _worker_argv(args, discovery_address),
                args.grace,
                env=security.worker_env(),
            )
            await nursery.start(processes.run)
        elif args.role == "all":
            log.warning(
                "--workers 0: this node runs no worker processes; tasks wait in the queue "
                "until workers join from elsewhere (python -m fastworker.node --role worker)"
            )
        http = (
            ""
            if control_plane is None or not control_plane.http_url
            else (f" http={control_plane.http_url}")
        )
        await trio.to_thread.run_sync(wait_for_queued_log_lines)
        print(
            f"fastworker node ready: role={args.role} discovery={discovery_address} "
            f"workers={args.workers if processes else 0} pid={os.getpid()}{http}",
            flush=True,
        )
        name = await _wait_for_signal()
        log.info("%s received: shutting down (grace %g s)", name, args.grace)
        if processes is not None:
            await processes.stop()
        reloading.cancel()
        if control_plane is not None:
            control_plane.stop()
        nursery.cancel_scope.deadline = trio.current_time() + 10.0
    return 0


# How long a worker process may take to end after its drain's grace is over.
_EXIT_MARGIN = 10.0


def _exit_if_stuck_after(seconds: float, worker_id: str) -> None:
    """End the process from a thread if the trio run is still going after ``seconds``.

    A task that swallows cancellation forever keeps its nursery, and so
    ``trio.run``, from ever returning: it was reported and abandoned, but the
    process could not exit.  The node replaces a process that exits with the
    recycle code.
    """

    def force() -> None:
        log.error("worker %s: shutdown stuck for %g s; exiting now", worker_id, seconds)
        logging.shutdown()
        os._exit(RECYCLE_EXIT_CODE)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


async def _run_worker_process(
    args: argparse.Namespace, registry: TaskRegistry, security: NodeSecurity
) -> int:
    """One worker actor in this process; drains on SIGTERM, recycles itself when stuck."""
    parent = os.getppid()
    worker = Worker(
        registry,
        WorkerConfig(
            discovery_address=args.discovery_address,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            heartbeat_interval=args.heartbeat_interval,
            allow_pickle=args.allow_pickle,
            transport=TransportConfig(
                max_message_size=args.max_message_size,
                curve=security.worker,
                curve_server_key=security.server_public,
            ),
            # A stuck run retires the worker even under steady load: no new
            # work, the running tasks get the grace, then the process recycles.
            recycle_grace=args.grace,
        ),
    )
    leave = trio.Event()
    recycling = False

    async def watch_parent() -> None:
        # Leave when our node died under us (no orphan workers).  The parent
        # sends us nothing when it dies, so this is the one thing we poll.
        while True:
            await trio.sleep(min(args.heartbeat_interval, 1.0))
            if not parent_alive(parent):
                break
        log.warning("worker %s: parent node gone; leaving", worker.worker_id)
        leave.set()

    async def watch_recycle() -> None:
        # The worker retired (a run stuck in user code; its work handed back):
        # this process must be replaced.
        nonlocal recycling
        await worker.recycle.wait()
        log.warning("worker %s: recycling (a task thread is stuck)", worker.worker_id)
        recycling = True
        leave.set()

    supervisor = Supervisor("worker-process", [worker], max_restarts=5, within=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch_parent)
            watchers.start_soon(watch_recycle)
            why = await _wait_for_signal(also_when=leave)
            watchers.cancel_scope.cancel()
        _exit_if_stuck_after(args.grace + _EXIT_MARGIN, worker.worker_id)
        handed_back = await worker.drain(args.grace)
        if handed_back:
            log.info("worker %s handed back %d tasks", worker.worker_id, handed_back)
        supervisor.stop()
        nursery.cancel_scope.deadline = trio.current_time() + 5.0
    if why == "recycle" and recycling:
        return RECYCLE_EXIT_CODE
    return 0


def _tune_gc() -> None:
    """Make the cyclic collector rarer in node processes.

    A control plane holds up to millions of long-lived task records; with the
    default thresholds a full collection walks all of them every few thousand
    allocations, which profiling showed as the largest single cost of
    accepting tasks (design/performance.md).  Our records form no cycles, so
    collecting less often costs little memory.  Only node processes do this:
    the Client, a library inside users' programs, leaves their GC alone.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


def _raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now in force.

    Every connection costs the control plane a descriptor, and the soft
    limit (often 1024) is what an unauthenticated connection flood exhausts
    first; the hard limit is ours to take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _tune_gc()
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.workers == 0 and args.role == "worker":
        parser.error("--role worker with --workers 0 would run nothing")
    if args.result_cache_bytes is not None and args.result_cache_bytes < args.max_message_size:
        parser.error(
            f"--result-cache-bytes {args.result_cache_bytes} is less than one message "
            f"(--max-message-size {args.max_message_size}): the cache must hold one result"
        )
    if args.journal is not None and (args.role == "worker" or args.worker_process):
        parser.error("--journal belongs to the control plane; --role worker keeps no journal")
    if args.http_address is not None:
        if args.role == "worker" or args.worker_process:
            parser.error("--http-address is served by the control plane: not with --role worker")
        try:
            check_http_address(args.http_address, insecure=args.insecure)
        except ValueError as exc:
            parser.error(str(exc))
    if args.allow_pickle and args.role == "control-plane":
        parser.error(
            "--allow-pickle applies to worker processes only: the control plane never "
            "decodes a task's payload, result or callback data"
        )
    if args.callback_allow and args.role == "worker":
        parser.error("--callback-allow applies to the control plane: it delivers callbacks")
    try:
        security = node_security(args)
    except SecurityError as exc:
        parser.error(str(exc))
    configure_logging(
        args.log_level, args.log_format, process="worker" if args.worker_process else "node"
    )
    for warning in security.warnings:
        log.warning("%s", warning)
    open_files = _raise_open_file_limit()
    if not args.worker_process:
        log.info("open-file limit: %d descriptors", open_files)
    try:
        if args.worker_process:
            registry = _load_registry(args.task_modules)
            code = trio.run(_run_worker_process, args, registry, security)
        else:
            if args.role != "control-plane":
                _load_registry(args.task_modules)  # fail here, once, rather than in every child
            code = trio.run(_run_node, args, security)
        _deliver_queued_messages()
        return code
    except CliError as exc:
        _print_error(exc)
        return 1
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        # Raised inside the run's nursery, a CliError arrives in an ExceptionGroup.
        cli_error = _find(exc, CliError)
        if cli_error is not None:
            _print_error(cli_error)
            return 1
        journal_error = _find(exc, JournalError)
        if journal_error is not None:
            # Not worth restarting: the same file gives the same error
            # (systemd: RestartPreventExitStatus=78).
            _print_error(journal_error)
            return JOURNAL_EXIT_CODE
        message = _describe_startup_error(exc, args)
        if message is None:
            raise
        _print_error(message)
        return 1


def _print_error(error: object) -> None:
    """The one error line, after every log line queued before it (they go out from a thread)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)


def _deliver_queued_messages(timeout: float = 2.0) -> None:
    """Give ZeroMQ up to ``timeout`` s to send what closed sockets still hold (their linger).

    pyzmq does not terminate its context at exit, and the process's end
    would cut off the last messages (a worker's final results, the results
    the control plane pushed to clients) still queued in ZeroMQ's I/O thread.
    ``term`` waits for them; in a thread, so that a socket somebody left open
    (``term`` would wait forever) costs ``timeout``, not a hang.
    """
    thread = threading.Thread(target=zmq.Context.instance().term, name="zmq-term", daemon=True)
    thread.start()
    thread.join(timeout)


def _describe_startup_error(exc: BaseException, args: Any) -> str | None:
    """One line for errors users cause (address in use, bad address); None for bugs."""
    http = _find(exc, HttpStartError)
    if http is not None:
        return str(http)
    found = _find(exc, zmq.ZMQError)
    if found is None:
        return None
    if found.errno == errno.EADDRINUSE:
        return f"address already in use: {args.discovery_address} (or another bound endpoint)"
    return f"cannot bind or connect: {found.strerror}"


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    if exc.__cause__ is not None:
        return _find(exc.__cause__, kind)
    return None
