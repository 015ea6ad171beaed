"""The asyncio program of a bench run: start what is needed, run each scenario, always clean up.

The documented ``Client`` is driven from ``asyncio.run``, as most programs
do.  Cleanup does not depend on how the run ends: scenarios stop their own
nodes in ``finally`` blocks, and ``run`` stops whatever is left
(``stop_all``) whether it returns, fails, is interrupted by Ctrl-C (asyncio
cancels the main task) or receives SIGTERM (turned into the same
cancellation here).
"""

from __future__ import annotations

import asyncio
import os
import platform
import signal
import sys
from typing import Any

from .. import __version__
from ._cluster import Cluster, Context, idle_figures, start_local
from ._measure import Workload
from ._nodes import stop_all
from ._options import LOCAL_ONLY, SCENARIOS, Options
from ._progress import Progress
from ._report import combine_runs
from ._scenarios import RUNNERS

__all__ = ["Terminated", "run"]

_SHARED_BY = frozenset({"throughput", "batch", "latency"})


class Terminated(Exception):
    """The run was stopped by SIGTERM (after cleaning up)."""


def _meta(options: Options, ctx: Context) -> dict[str, Any]:
    return {
        "fastworker": __version__,
        "python": platform.python_version(),
        "platform": sys.platform,
        "cpus": os.cpu_count(),
        "discovery_address": options.discovery_address,
        "workers": options.workers if options.local else None,
        "concurrency": options.concurrency if options.local else None,
        "format": options.serialization_format,
        "payload_bytes": options.payload_bytes,
        "runs": options.runs,
        "pids": sorted(ctx.pids),
    }


async def _scenarios(ctx: Context, results: dict[str, Any]) -> None:
    options = ctx.options
    wanted = [name for name in SCENARIOS if name in options.scenarios]
    if _SHARED_BY & set(wanted):
        if options.local:
            ctx.shared = start_local(ctx, options.workers)
        else:
            assert options.discovery_address is not None
            ctx.shared = Cluster(options.discovery_address)
        results["idle"] = await idle_figures(ctx, ctx.shared)
    try:
        for name in wanted:
            if name in LOCAL_ONLY and not options.local:
                reason = "needs worker processes of its own; not run against an existing cluster"
                results[name] = {"skipped": reason}
                ctx.progress.note(f"{name}: skipped ({reason})")
                continue
            runs = [await RUNNERS[name](ctx) for _ in range(options.runs)]
            results[name] = combine_runs(runs)
    finally:
        if ctx.shared is not None:
            ctx.shared.stop()


async def run(options: Options, progress: Progress) -> dict[str, Any]:
    """Every selected scenario, ``options.runs`` times each; results keyed by scenario.

    Raises ``Terminated`` on SIGTERM; Ctrl-C surfaces as KeyboardInterrupt
    from ``asyncio.run``.  No node outlives this call.
    """
    ctx = Context(options, progress, Workload.for_options(options))
    results: dict[str, Any] = {}
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        main.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError):  # not the main thread, or not Unix
        pass
    try:
        await _scenarios(ctx, results)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise
    finally:
        progress.clear()
        stop_all()
        try:
            loop.remove_signal_handler(signal.SIGTERM)
        except (NotImplementedError, RuntimeError):
            pass
    return {"meta": _meta(options, ctx), **results}
