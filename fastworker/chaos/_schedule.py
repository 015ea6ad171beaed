"""The seeded fault schedule: the same seed and duration give the same plan.

``plan`` is a pure function; what each fault hits at run time (which pid a
"worker 1 of node 0" is then) follows from it.  Rates are per minute and
scale with the duration; see design/chaos.md for the table.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["RATES", "Planned", "plan"]

# Faults per minute of campaign, by kind.
RATES: dict[str, float] = {
    "kill9": 4.0,
    "sigstop": 4.0,
    "net": 10.0,
    "cp-restart": 2.0,
    "client-restart": 3.0,
    "burst": 2.0,
}
NET_MODES = ("cut", "stall", "slow", "half_open")
_MARGIN = 3.0  # no fault in the first and last seconds: start-up, and room to end


@attrs.frozen
class Planned:
    at: float  # seconds after the campaign's start
    kind: str
    target: str  # "node<i>/<slot>", a link name, "cp", "client<i>"
    duration: float = 0.0  # how long it lasts (stopped, cut, down)
    mode: str = ""  # net: the proxy mode; cp-restart: "kill" or "term"
    delay: float = 0.0  # net "slow": seconds per chunk

    def describe(self) -> str:
        extra = f" {self.mode}" if self.mode else ""
        extra += f" delay={self.delay:.2f}" if self.delay else ""
        return f"{self.at:6.2f}s {self.kind} {self.target}{extra} for {self.duration:.2f}s"


def plan(
    seed: int,
    duration: float,
    *,
    worker_nodes: int,
    workers_per_node: int,
    clients: int,
    links: list[str],
) -> list[Planned]:
    """The faults of one campaign, sorted by time."""
    rng = random.Random(f"fastworker-chaos-{seed}")
    span = max(duration - 2 * _MARGIN, 1.0)
    out: list[Planned] = []

    def count(kind: str) -> int:
        expected = RATES[kind] * span / 60.0
        whole = int(expected)
        return whole + (1 if rng.random() < expected - whole else 0)

    def place(target: str, length: float) -> float | None:
        for _ in range(20):
            at = _MARGIN + rng.random() * span
            # One fault at a time per target, a second apart, so each one is seen.
            spans = _spans(out, target)
            if all(at >= end + 1.0 or at + length <= start - 1.0 for start, end in spans):
                return at
        return None

    for kind in RATES:
        for _ in range(count(kind)):
            if kind == "kill9" or kind == "sigstop":
                target = f"node{rng.randrange(worker_nodes)}/{rng.randrange(workers_per_node)}"
                length = 0.0 if kind == "kill9" else rng.uniform(1.2, 3.0)
                at = place(target, length)
                if at is not None:
                    out.append(Planned(at, kind, target, length))
            elif kind == "net":
                link = rng.choice(links)
                mode = rng.choice(NET_MODES)
                # Mostly short; one in five outlasts the client's ack retries (1+2+4+8 s).
                length = rng.uniform(0.5, 4.0) if rng.random() < 0.8 else rng.uniform(4.0, 16.0)
                delay = rng.uniform(0.02, 0.3) if mode == "slow" else 0.0
                at = place(link, length)
                if at is not None:
                    out.append(Planned(at, kind, link, length, mode, delay))
            elif kind == "cp-restart":
                length = rng.uniform(0.2, 2.0)
                at = place("cp", length + 4.0)  # and let it settle before the next
                if at is not None:
                    out.append(Planned(at, kind, "cp", length, rng.choice(("kill", "term"))))
            elif kind == "client-restart":
                target = f"client{rng.randrange(clients)}"
                length = rng.uniform(0.0, 1.0)
                at = place(target, length + 2.0)
                if at is not None:
                    out.append(Planned(at, kind, target, length))
            else:  # burst
                target = f"client{rng.randrange(clients)}"
                at = place(f"burst-{target}", 2.0)
                if at is not None:
                    out.append(Planned(at, kind, target, 0.0))
    out.sort(key=lambda p: (p.at, p.kind, p.target))
    return out


def _spans(planned: list[Planned], target: str) -> list[tuple[float, float]]:
    return [(p.at, p.at + p.duration) for p in planned if _target_key(p) == target]


def _target_key(p: Planned) -> str:
    return f"burst-{p.target}" if p.kind == "burst" else p.target
