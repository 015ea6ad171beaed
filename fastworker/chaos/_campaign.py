"""One campaign: a real cluster behind fault proxies, clients, a fault schedule, a verdict.

Layout (every arrow is a ``Proxy`` whose ``Link`` the schedule can break)::

    client i ──cdisc<i>──▶ Discovery ◀──wdisc<j>── worker node j (2 worker processes)
    client i ──gateway───▶ Gateway
                           Scheduler ◀──wsched──── every worker process

The control plane binds fixed ports and advertises the proxies' ports, so
whatever Discovery hands out goes through a proxy; a restarted control
plane binds the same ports.  Everything runs in one trio nursery; node
processes are closed in ``finally`` blocks, whatever ends the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio

from ..testing import free_loopback_port
from ._check import Verdict, check
from ._clients import Budget, ClientSlot
from ._cluster import NodeProcess, log_events, rss_kib
from ._history import Fault, History
from ._proxy import Link, Mode, Proxy
from ._schedule import Planned, plan
from ._tasks import CRASH, MODULE, RUNLOG_ENV

__all__ = ["Campaign", "Settings"]

_READY_TIMEOUT = 30.0
_SETTLE_TIMEOUT = 30.0
_LIVENESS = 3  # heartbeats a worker may miss (the control plane's default)
_DEAD_PID = re.compile(r"\(pid (\d+)\)")
_LOGGER_PID = re.compile(r"\[worker (\d+)\]")
_CRASHED = re.compile(r"actor \S+ crashed")
# Events the campaign did not inject but saw (run log, node logs, a control plane's death).
_OBSERVED = frozenset(
    {"crash-run", "declared-dead", "recycle", "worker-actor-restart", "cp-died", "campaign-stall"}
)
# A wake-up this late stalls every proxied link past a share of the workers' liveness.
_LAG_FAULT = 0.3


@attrs.define
class Settings:
    duration: float = 60.0
    seed: int = 1
    clients: int = 3
    worker_nodes: int = 2
    workers_per_node: int = 2
    concurrency: int = 4
    heartbeat: float = 0.25
    max_queued: int = 400
    drain_timeout: float = 45.0
    rss_bound_mib: int = 300
    log_dir: Path | None = None
    verbose: bool = False


def _free_port() -> int:
    # Below the ephemeral range: a proxy reconnecting to a control plane that is
    # down must not take its port by connecting to itself (see free_loopback_port).
    return free_loopback_port()


class Campaign:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.history = History(started=time.time(), seed=settings.seed)
        self.links: dict[str, Link] = {}
        self.proxies: dict[str, Proxy] = {}
        self.nodes: list[NodeProcess] = []  # every node ever started, for logs and cleanup
        self.cp: NodeProcess | None = None
        self.worker_nodes: list[NodeProcess] = []
        self.slots: list[ClientSlot] = []
        self.cp_rss_max_kib = 0
        self.lag_max = 0.0  # seconds: how late this process's loop woke up, at worst
        self._cp_count = 0
        self._cp_lock = trio.Lock()  # one restart of the control plane at a time
        self.workdir = Path(tempfile.mkdtemp(prefix="fastworker-chaos-"))
        self.runlog = self.workdir / "runs.log"
        self.plan: list[Planned] = []
        self.verdict: Verdict | None = None
        self.drain_seconds = 0.0
        self.wall_seconds = 0.0

    # -- the run ---------------------------------------------------------------

    async def run(self) -> Verdict:
        began = time.monotonic()
        os.environ[RUNLOG_ENV] = str(self.runlog)  # inherited by the nodes we start
        self.runlog.touch()
        # The clients' own warnings (reconnecting, re-submitting) go with the node logs.
        handler = logging.FileHandler(self.workdir / "clients.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("fastworker").addHandler(handler)
        logging.getLogger("fastworker").propagate = False
        self._ports = {"discovery": _free_port(), "client": _free_port(), "worker": _free_port()}
        try:
            async with trio.open_nursery() as nursery:
                await self._open_proxies(nursery)
                await self._start_cluster()
                budget = Budget(self.s.duration)
                for i in range(self.s.clients):
                    address = f"tcp://127.0.0.1:{self.proxies[f'cdisc{i}'].port}"
                    slot = ClientSlot(i, address, self.history, self.s.seed, budget)
                    self.slots.append(slot)
                async with trio.open_nursery() as clients:
                    for slot in self.slots:
                        await clients.start(slot.run)
                    await self._settle()
                    await self._campaign(nursery)
                    for slot in self.slots:
                        slot.finish()
                self._health()
                nursery.cancel_scope.cancel()  # proxies, samplers
        finally:
            self._stop_nodes()
        self._read_evidence()
        self.verdict = check(self.history)
        self.wall_seconds = time.monotonic() - began
        return self.verdict

    async def _open_proxies(self, nursery: trio.Nursery) -> None:
        targets = {"gateway": self._ports["client"], "wsched": self._ports["worker"]}
        for i in range(self.s.clients):
            targets[f"cdisc{i}"] = self._ports["discovery"]
        for j in range(self.s.worker_nodes):
            targets[f"wdisc{j}"] = self._ports["discovery"]
        for name, port in targets.items():
            link = Link(name)
            proxy = Proxy(link, port)
            await nursery.start(proxy.run)
            self.links[name] = link
            self.proxies[name] = proxy

    def _cp_argv(self) -> list[str]:
        p = self._ports
        return [
            "--role", "control-plane",
            "--discovery-address", f"tcp://127.0.0.1:{p['discovery']}",
            "--client-address", f"tcp://127.0.0.1:{p['client']}",
            "--worker-address", f"tcp://127.0.0.1:{p['worker']}",
            "--advertise-client-address", f"tcp://127.0.0.1:{self.proxies['gateway'].port}",
            "--advertise-worker-address", f"tcp://127.0.0.1:{self.proxies['wsched'].port}",
            "--heartbeat-interval", str(self.s.heartbeat),
            "--max-queued", str(self.s.max_queued),
            "--result-cache-size", "1000000",
            "--grace", "1",
            "--log-level", "INFO",
        ]  # fmt: skip

    async def _start_cp(self) -> None:
        self._cp_count += 1
        node = NodeProcess(f"cp{self._cp_count}", self._cp_argv())
        self.nodes.append(node)
        await node.wait_ready(_READY_TIMEOUT)
        self.cp = node

    async def _start_cluster(self) -> None:
        await self._start_cp()
        for j in range(self.s.worker_nodes):
            node = NodeProcess(
                f"node{j}",
                [
                    "--role", "worker",
                    "--discovery-address", f"tcp://127.0.0.1:{self.proxies[f'wdisc{j}'].port}",
                    "--workers", str(self.s.workers_per_node),
                    "--concurrency", str(self.s.concurrency),
                    "--prefetch", "2",
                    "--heartbeat-interval", str(self.s.heartbeat),
                    "--task-modules", MODULE,
                    "--grace", "2",
                    "--log-level", "INFO",
                ],
            )  # fmt: skip
            self.nodes.append(node)
            await node.wait_ready(_READY_TIMEOUT)
            self.worker_nodes.append(node)

    async def _settle(self) -> None:
        """Wait until every worker process has registered, then start the clock."""
        client = self.slots[0].client
        assert client is not None
        want = self.s.worker_nodes * self.s.workers_per_node
        seen = -1
        with trio.move_on_after(_SETTLE_TIMEOUT):
            while True:
                try:
                    stats = await client.stats(timeout=5.0)
                    seen = int(stats.get("discovery", {}).get("workers_alive", 0))
                except Exception:  # not up yet: ask again
                    seen = -1
                if seen >= want:
                    break
                await trio.sleep(0.2)
        if seen < want:
            raise RuntimeError(f"only {seen} of {want} worker processes registered in time")
        self.history.started = time.time()

    async def _campaign(self, nursery: trio.Nursery) -> None:
        s = self.s
        self.plan = plan(
            s.seed,
            s.duration,
            worker_nodes=s.worker_nodes,
            workers_per_node=s.workers_per_node,
            clients=s.clients,
            links=sorted(self.links),
        )
        if s.verbose:
            for p in self.plan:
                print(f"chaos plan: {p.describe()}", flush=True)
        nursery.start_soon(self._watch_cp)
        nursery.start_soon(self._watch_lag)
        t0 = trio.current_time()
        with trio.CancelScope() as faults:
            async with trio.open_nursery() as injectors:
                for planned in self.plan:
                    await trio.sleep_until(t0 + planned.at)
                    injectors.start_soon(self._inject, planned)
                await trio.sleep_until(t0 + s.duration)
                faults.cancel()  # every fault restores what it broke on its way out
        for slot in self.slots:
            slot.submitting = False
        drain_start = time.time()
        with trio.move_on_after(s.drain_timeout):
            # The slots learn finals by polling their clients' local caches: no event to wait on.
            while sum(slot.required() for slot in self.slots):  # noqa: ASYNC110
                await trio.sleep(0.25)
        self.history.ended = time.time()
        self.drain_seconds = self.history.ended - drain_start

    async def _watch_cp(self) -> None:
        """Sample the control plane's RSS; replace it if it died by itself (a violation)."""
        while True:
            cp = self.cp
            if cp is not None and not self._cp_lock.locked():
                if cp.exited():
                    self.history.health.append(
                        f"control plane {cp.name} exited by itself (code {cp.exit_code}) at "
                        f"{time.time() - self.history.started:.1f} s; started another"
                    )
                    fault = self._fault("cp-died", cp.name, time.time(), True)
                    async with self._cp_lock:
                        try:
                            await trio.to_thread.run_sync(cp.close, 0.0)
                            await self._start_cp()
                        finally:
                            fault.end = time.time()
                else:
                    rss = rss_kib(cp.pid)
                    if rss is not None:
                        self.cp_rss_max_kib = max(self.cp_rss_max_kib, rss)
            await trio.sleep(0.5)

    async def _watch_lag(self) -> None:
        """Measure how late this process's own loop wakes up.

        The proxies live in this loop: while it is stalled, every link is stalled too, which
        is a fault on every worker (recorded as one, so what it causes is not blamed on the
        system) and a figure to watch.
        """
        tick = 0.1
        while True:
            before = time.time()
            await trio.sleep(tick)
            lag = time.time() - before - tick
            self.lag_max = max(self.lag_max, lag)
            if lag > _LAG_FAULT:
                fault = self._fault("campaign-stall", "every link", before, True)
                fault.end = time.time() + self.s.heartbeat * _LIVENESS + 1.0

    # -- faults --------------------------------------------------------------------

    def _fault(
        self, kind: str, target: str, start: float, requeues: bool, pids: list[int] | None = None
    ) -> Fault:
        fault = Fault(kind, target, start, start, requeues, pids or [])
        self.history.faults.append(fault)
        return fault

    async def _inject(self, p: Planned) -> None:
        if self.s.verbose:
            print(f"chaos fault: {p.describe()}", flush=True)
        if p.kind in ("kill9", "sigstop"):
            await self._hit_worker(p)
        elif p.kind == "net":
            await self._break_link(p)
        elif p.kind == "cp-restart":
            await self._restart_cp(p)
        elif p.kind == "client-restart":
            slot = self.slots[int(p.target.removeprefix("client"))]
            now = time.time()
            if slot.restart(p.duration):
                self._fault("client-restart", slot.name, now, False).end = now + p.duration
        elif p.kind == "burst":
            slot = self.slots[int(p.target.removeprefix("client"))]
            fault = self._fault("burst", slot.name, time.time(), False)
            await slot.burst(self.s.max_queued + 150)
            fault.end = time.time()

    async def _hit_worker(self, p: Planned) -> None:
        node_index, slot = (int(x) for x in p.target.removeprefix("node").split("/"))
        pids = self.worker_nodes[node_index].children()
        if not pids:
            return  # between a death and its replacement: nothing to hit
        pid = pids[slot % len(pids)]
        liveness = self.s.heartbeat * _LIVENESS + 1.0
        now = time.time()
        if p.kind == "kill9":
            fault = self._fault("kill9", f"{p.target} pid {pid}", now, True, [pid])
            _signal(pid, signal.SIGKILL)
            fault.end = now + liveness
            return
        fault = self._fault("sigstop", f"{p.target} pid {pid}", now, True, [pid])
        _signal(pid, signal.SIGSTOP)
        try:
            await trio.sleep(p.duration)
        finally:
            _signal(pid, signal.SIGCONT)
            fault.end = time.time() + liveness

    async def _break_link(self, p: Planned) -> None:
        link = self.links[p.target]
        # A slow or stalled Scheduler link loses nothing and ends no worker's membership:
        # it cannot make a run repeat.  Everything else on a worker's link may.
        worker_side = p.target.startswith("w")
        requeues = worker_side and not (p.target == "wsched" and p.mode in ("slow", "stall"))
        node = None  # wsched reaches every worker; wdisc<j> the workers of node j
        if p.target.startswith("wdisc"):
            node = self.worker_nodes[int(p.target.removeprefix("wdisc"))]
        pids = node.children() if node is not None else []
        fault = self._fault(f"net-{p.mode}", p.target, time.time(), requeues, pids)
        mode: Mode = p.mode  # type: ignore[assignment]  # the schedule only picks MODES
        link.set(mode, p.delay)
        try:
            await trio.sleep(p.duration)
        finally:
            link.set("pass")
            fault.end = time.time() + (self.s.heartbeat * _LIVENESS + 1.0 if worker_side else 0)
            if node is not None:  # and those its workers were replaced by meanwhile
                fault.pids = sorted(set(fault.pids) | set(node.children()))

    async def _restart_cp(self, p: Planned) -> None:
        async with self._cp_lock:  # the watcher may be replacing one that died by itself
            old = self.cp
            assert old is not None
            fault = self._fault(f"cp-{p.mode}", old.name, time.time(), True)
            try:
                old.signal(signal.SIGKILL if p.mode == "kill" else signal.SIGTERM)
                await trio.to_thread.run_sync(old.close, 10.0)
                await trio.sleep(p.duration)
            finally:
                with trio.CancelScope(shield=True):
                    if self.cp is old:
                        await self._start_cp()
                    fault.end = time.time()

    # -- the end ----------------------------------------------------------------------

    def _health(self) -> None:
        h = self.history.health
        cp = self.cp
        if cp is None or cp.exited():
            h.append(f"the control plane {cp} is not running at the end")
        for node in self.worker_nodes:
            if node.exited():
                h.append(f"worker node {node.name} exited (code {node.exit_code})")
        bound = self.s.rss_bound_mib * 1024
        if self.cp_rss_max_kib > bound:
            h.append(
                f"control plane RSS reached {self.cp_rss_max_kib // 1024} MiB, "
                f"bound {self.s.rss_bound_mib} MiB"
            )
        self.history.figures["cp_rss_max_mib"] = self.cp_rss_max_kib // 1024

    def _stop_nodes(self) -> None:
        for node in reversed(self.nodes):
            node.close(grace=3.0)

    def _read_evidence(self) -> None:
        """Runs from the run log; gave-ups and requeuing events from the nodes' logs."""
        runs: dict[str, list[tuple[float, int]]] = {}
        liveness = self.s.heartbeat * _LIVENESS + 1.0
        for line in self.runlog.read_text().splitlines():
            parts = line.split()
            if len(parts) != 4:
                continue
            key, name, pid, started = parts
            runs.setdefault(key, []).append((float(started), int(pid)))
            if name == CRASH:
                crash = self._fault("crash-run", f"pid {pid}", float(started), True, [int(pid)])
                crash.end = crash.start + liveness
        self.history.runs = runs
        for node in self.nodes:
            text = node.log_text()
            for marker, kind in (
                ("declared dead", "declared-dead"),
                ("recycling (a task thread is stuck)", "recycle"),
                ("restarted as", "worker-actor-restart"),
            ):
                for at, line in log_events(text, marker):
                    # "(pid N)" names the dead worker; otherwise the worker logged it itself.
                    found = _DEAD_PID.search(line) or _LOGGER_PID.search(line)
                    pids = [int(found[1])] if found else []
                    self._fault(kind, node.name, at - 1.0, True, pids).end = at + 1.0
            for line in text.splitlines():
                # An actor that crashed let an exception reach its loop (common rules).
                if "gave up" in line or _CRASHED.search(line):
                    self.history.health.append(f"{node.name}: {line.strip()[:300]}")

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.save_log(directory / f"{node.name}.log")
        shutil.copy(self.runlog, directory / "runs.log")
        clients_log = self.workdir / "clients.log"
        if clients_log.exists():
            shutil.copy(clients_log, directory / "clients.log")
        (directory / "plan.txt").write_text("\n".join(p.describe() for p in self.plan) + "\n")
        (directory / "history.json").write_text(json.dumps(self.history.to_json(), default=repr))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.release_log()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the figures ----------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        assert self.verdict is not None
        injected = Counter(f.kind for f in self.history.faults if f.kind not in _OBSERVED)
        observed = Counter(f.kind for f in self.history.faults if f.kind in _OBSERVED)
        return {
            "seed": self.s.seed,
            "duration": self.s.duration,
            "seconds": round(self.wall_seconds, 1),
            "drain_seconds": round(self.drain_seconds, 1),
            "ops": len(self.history.ops),
            "ops_by_outcome": dict(Counter(op.outcome for op in self.history.ops)),
            "tasks": len(self.history.tasks),
            "runs": sum(len(r) for r in self.history.runs.values()),
            "outcomes": dict(self.verdict.outcomes),
            "superseded": self.verdict.superseded,
            "faults": dict(injected),
            "events": dict(observed),
            "violations": self.verdict.by_kind(),
            "cp_rss_max_mib": self.history.figures.get("cp_rss_max_mib", 0),
            "loop_lag_max": round(self.lag_max, 2),
            "verdict": "FAIL" if self.verdict.violations else "PASS",
        }


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
