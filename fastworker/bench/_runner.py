"""The asyncio program of a bench run: start what is needed, run each scenario, always clean up.

The documented ``Client`` is driven from ``asyncio.run``, as most programs
do.  Cleanup does not depend on how the run ends: scenarios stop their own
nodes in ``finally`` blocks, and ``run`` stops whatever is left
(``stop_all``) whether it returns, fails, or is stopped by Ctrl-C or
SIGTERM (``_signals`` turns both into cancellation of the main task).
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..client import ClientStoppedError
from ._cluster import Cluster, Context, idle_figures, start_local
from ._measure import Workload
from ._nodes import stop_all
from ._options import LOCAL_ONLY, SCENARIOS, Options
from ._progress import Progress
from ._report import combine_runs
from ._scenarios import INTERLEAVED, RUNNERS, journal_recovery
from ._signals import stop_on_signals
from ._variants import Variant, curve_variant, handshake_ms, http_variant, journal_variant

__all__ = ["run"]

_SHARED_BY = frozenset({"throughput", "batch", "latency"})
# Read as a ratio (latency over the machine's floor), so measured together, in
# blocks that alternate within each run: the speed of a shared VM drifts by
# half within seconds, and runs of each one after the other compared two
# different machines (design/performance.md).
_PAIRED = {"latency": "floor"}


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
        "http": {
            "scrapes": sum(s.scrapes for s in ctx.scrapers),
            "failed_scrapes": sum(s.failures for s in ctx.scrapers),
        }
        if options.http
        else None,
    }


async def _run_each(
    ctx: Context, names: list[str], results: dict[str, Any], partners: Sequence[str] = ()
) -> None:
    """Each scenario ``runs`` times; with its partner (``_PAIRED``), if wanted, interleaved."""
    runs = ctx.options.runs
    for name in names:
        partner = _PAIRED.get(name)
        if partner not in partners:
            partner = None
        figures, partner_figures = [], []
        for i in range(runs):
            ctx.run_note = f" (run {i + 1}/{runs})" if runs > 1 else ""
            if partner is None:
                figures.append(await RUNNERS[name](ctx))
                continue
            ours, theirs = await INTERLEAVED[name, partner](ctx)
            figures.append(ours)
            partner_figures.append(theirs)
        results[name] = combine_runs(figures)
        if partner is not None:
            results[partner] = combine_runs(partner_figures)


async def _shared_scenarios(
    ctx: Context,
    shared: list[str],
    results: dict[str, Any],
    variant: Variant | None = None,
    partners: Sequence[str] = (),
) -> None:
    """One cluster for throughput, batch and latency, stopped before the scenarios
    that start their own so it does not compete for the CPUs."""
    options = ctx.options
    if variant is not None:
        ctx.node_extra, ctx.client_options = variant.node_args, dict(variant.client_options)
    try:
        if options.local:
            ctx.shared = start_local(ctx, options.workers)
        else:
            assert options.discovery_address is not None
            ctx.shared = Cluster(options.discovery_address)
        try:
            results["idle"] = await idle_figures(ctx, ctx.shared)
            await _run_each(ctx, shared, results, partners)
            if options.curve:  # the handshake, beside the other variant's
                results["handshake"] = await asyncio.to_thread(
                    handshake_ms, ctx.shared.discovery_address, variant
                )
        finally:
            ctx.shared.stop()
    finally:
        ctx.node_extra, ctx.client_options = (), {}


async def _scenarios(ctx: Context, results: dict[str, Any]) -> None:
    options = ctx.options
    wanted = [name for name in SCENARIOS if name in options.scenarios]
    shared = [name for name in wanted if name in _SHARED_BY]
    if shared:
        await _shared_scenarios(ctx, shared, results, partners=wanted)
        if options.curve and options.local:
            results["curve"] = {}
            await _shared_scenarios(ctx, shared, results["curve"], curve_variant())
        if options.http and options.local:
            results["http"] = {}
            await _shared_scenarios(ctx, shared, results["http"], http_variant())
        if options.journal and options.local:
            with tempfile.TemporaryDirectory(prefix="fastworker-bench-journal-") as directory:
                results["journal"] = {}
                variant = journal_variant(Path(directory))
                await _shared_scenarios(ctx, shared, results["journal"], variant)
    if options.journal:
        results["journal recovery"] = await _journal_recovery(ctx)
    for name in wanted:
        if name in LOCAL_ONLY and not options.local:
            reason = "needs worker processes of its own; not run against an existing cluster"
            results[name] = {"skipped": reason}
            ctx.progress.note(f"{name}: skipped ({reason})")
    # Then what starts processes of its own: ``floor`` measures this host
    # (on loopback) whichever cluster is measured.
    await _run_each(ctx, [name for name in wanted if name not in results], results)


async def _journal_recovery(ctx: Context) -> dict[str, Any]:
    if not ctx.options.local:
        reason = "needs a node of its own; not run against an existing cluster"
        ctx.progress.note(f"journal recovery: skipped ({reason})")
        return {"skipped": reason}
    with tempfile.TemporaryDirectory(prefix="fastworker-bench-journal-") as directory:
        return await journal_recovery(ctx, directory)


async def run(options: Options, progress: Progress) -> dict[str, Any]:
    """Every selected scenario, ``options.runs`` times each; results keyed by scenario.

    Raises ``Stopped`` on SIGINT/SIGTERM (see ``_signals``).  No node outlives
    this call, however it ends.
    """
    ctx = Context(options, progress, Workload.for_options(options))
    results: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_about_stopped_clients)
    try:
        with stop_on_signals():
            await _scenarios(ctx, results)
    finally:
        progress.clear()
        stop_all()
        for scraper in ctx.scrapers:
            scraper.stop()
    return {"meta": _meta(options, ctx), **results}


def _quiet_about_stopped_clients(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Drop asyncio's "exception never retrieved" for calls abandoned by an interrupted run.

    When a run is interrupted, the bench stops its client while a ``join``
    or ``submit_task`` is still outstanding; the client then fails that
    call's future with ClientStoppedError, which nobody awaits any more.
    That is expected here and says nothing to the user.
    """
    if isinstance(context.get("exception"), ClientStoppedError):
        return
    loop.default_exception_handler(context)
