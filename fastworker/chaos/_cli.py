"""``python -m fastworker.chaos``: run one campaign, print one line of figures.

Exit codes: 0 no violation, 1 violations (listed on stderr), 2 the campaign
itself could not run (a node did not start, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from .._argtypes import _positive_float, _positive_int
from ._campaign import Campaign, Settings

__all__ = ["figures_line", "main"]

PROG = "python -m fastworker.chaos"
_SHOWN = 40  # violations listed on stderr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run a randomized fault campaign against a real local cluster."
    )
    parser.add_argument("--duration", type=_positive_float, default=60.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=1, help="the fault schedule and workload")
    parser.add_argument("--clients", type=_positive_int, default=3)
    parser.add_argument("--worker-nodes", type=_positive_int, default=2)
    parser.add_argument("--workers-per-node", type=_positive_int, default=2)
    parser.add_argument("--max-queued", type=_positive_int, default=400)
    parser.add_argument(
        "--drain-timeout", type=_positive_float, default=45.0,
        help="seconds to wait, faults over, for every task to be final",
    )  # fmt: skip
    parser.add_argument("--rss-bound", type=_positive_int, default=300, help="control plane, MiB")
    parser.add_argument(
        "--log-dir", type=Path, default=None,
        help="keep node logs, run log, plan and history here (kept in a temporary "
        "directory anyway when there are violations)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--verbose", action="store_true", help="print the plan and each fault")
    return parser


def figures_line(figures: dict[str, Any]) -> str:
    def counts(values: dict[str, int]) -> str:
        return ",".join(f"{k}:{v}" for k, v in sorted(values.items())) or "-"

    return (
        f"chaos seed={figures['seed']} duration={figures['duration']:g} "
        f"seconds={figures['seconds']} ops={figures['ops']} tasks={figures['tasks']} "
        f"runs={figures['runs']} outcomes={counts(figures['outcomes'])} "
        f"faults={counts(figures['faults'])} events={counts(figures['events'])} "
        f"violations={counts(figures['violations'])} "
        f"superseded={figures['superseded']} drain_seconds={figures['drain_seconds']} "
        f"cp_rss_max_mib={figures['cp_rss_max_mib']} loop_lag_max={figures['loop_lag_max']} "
        f"verdict={figures['verdict']}"
    )


def _innermost(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings(
        duration=args.duration,
        seed=args.seed,
        clients=args.clients,
        worker_nodes=args.worker_nodes,
        workers_per_node=args.workers_per_node,
        max_queued=args.max_queued,
        drain_timeout=args.drain_timeout,
        rss_bound_mib=args.rss_bound,
        log_dir=args.log_dir,
        verbose=args.verbose,
    )
    campaign = Campaign(settings)
    try:
        try:
            verdict = trio.run(campaign.run)
        except Exception as exc:
            traceback.print_exception(exc)
            print(f"{PROG}: the campaign could not run: {_innermost(exc)}", file=sys.stderr)
            keep = args.log_dir or Path(tempfile.mkdtemp(prefix="fastworker-chaos-logs-"))
            campaign.save(keep)
            print(f"{PROG}: logs in {keep}", file=sys.stderr)
            return 2
        figures = campaign.figures()
        keep = args.log_dir
        if verdict.violations:
            for violation in verdict.violations[:_SHOWN]:
                print(f"violation {violation}", file=sys.stderr)
            if len(verdict.violations) > _SHOWN:
                print(f"... and {len(verdict.violations) - _SHOWN} more", file=sys.stderr)
            keep = keep or Path(tempfile.mkdtemp(prefix="fastworker-chaos-logs-"))
        if keep is not None:
            campaign.save(keep)
            print(f"{PROG}: logs, runs, plan and history in {keep}", file=sys.stderr)
        if args.json:
            figures["violation_list"] = [str(v) for v in verdict.violations]
            print(json.dumps(figures, sort_keys=True))
        else:
            print(figures_line(figures))
        return 1 if verdict.violations else 0
    finally:
        campaign.cleanup()
