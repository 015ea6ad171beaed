"""Tables keyed by peers stay bounded: Discovery's undelivered membership news, stats queries.

Discovery must never lose a membership change when the Scheduler's mailbox
is full, and must not pile them up either; a client looping on ``stats()``
must not pile up helper tasks in the Gateway.  And a worker whose actor
crashed says so, so the poison guard counts the death.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from fastworker._io import Inbound
from fastworker.control._internal import DeclaredSchedules, WorkerJoined, WorkerLost
from fastworker.control.discovery import Discovery, DiscoveryConfig, _Reap
from fastworker.control.gateway import MAX_STATS_QUERIES, Gateway
from fastworker.runtime import GetStatistics, MailboxFull
from fastworker.transport import TransportConfig
from fastworker.wire import (
    MAX_QUERY_IDS,
    DeclareSchedules,
    ErrorReply,
    Register,
    ResultQuery,
    StatsQuery,
    Unregister,
    decode,
    encode,
)


class _Scheduler:
    """Stands in for the Scheduler's ref: full until opened, then records what it is told."""

    name = "scheduler"

    def __init__(self) -> None:
        self.full = False
        self.told: list[Any] = []

    def tell(self, message: object) -> None:
        if self.full:
            raise MailboxFull("scheduler mailbox full")
        self.told.append(message)


def _discovery(scheduler: _Scheduler) -> Discovery:
    return Discovery(
        DiscoveryConfig(),
        instance_id="i",
        scheduler=scheduler,  # type: ignore[arg-type]
        endpoints=lambda: ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
    )


def _frame(identity: bytes, message: Any) -> Inbound:
    return Inbound([[identity, encode(message)]])


async def test_membership_news_waits_compacted_while_the_scheduler_is_full() -> None:
    scheduler = _Scheduler()
    discovery = _discovery(scheduler)
    scheduler.full = True
    for _ in range(1000):  # a worker flapping while the Scheduler cannot take news
        discovery._tell_scheduler(WorkerJoined("w", frozenset({"t"}), 1))
        discovery._tell_scheduler(WorkerLost("w", "died"))
        discovery._tell_scheduler(WorkerLost("w", "left"))
        discovery._tell_scheduler(WorkerJoined("w", frozenset({"t", "u"}), 1))
    assert sum(len(v) for v in discovery._undelivered.values()) == 2
    scheduler.full = False
    discovery._deliver()
    # What the Scheduler learns is what happened, in order: the worker died, then is back.
    assert scheduler.told == [WorkerLost("w", "died"), WorkerJoined("w", frozenset({"t", "u"}), 1)]
    assert not discovery._undelivered


async def test_declared_schedules_wait_compacted_and_only_a_member_declares() -> None:
    scheduler = _Scheduler()
    discovery = _discovery(scheduler)
    wire = ["t", "t", None, 5.0, None, 2, 1, b""]
    discovery.receive(_frame(b"peer", DeclareSchedules("stranger", [wire])))
    assert scheduler.told == []  # not a registered worker
    discovery.receive(_frame(b"peer", Register("w", ["t"], 1, 1, "host")))
    scheduler.full = True
    for n in range(1000):  # re-registering and declaring while the Scheduler cannot take news
        discovery._tell_scheduler(WorkerJoined("w", frozenset({"t"}), 1))
        discovery._tell_scheduler(DeclaredSchedules("w", [wire, n]))
    assert sum(len(v) for v in discovery._undelivered.values()) == 2
    scheduler.full = False
    discovery.receive(_frame(b"peer", DeclareSchedules("w", [wire])))
    assert scheduler.told[-2:] == [
        WorkerJoined("w", frozenset({"t"}), 1),
        DeclaredSchedules("w", [wire]),
    ]
    assert discovery.receive(GetStatistics())["rejected"] == {"invalid": 1}


class _AnyWorkerKey:
    """A key ring that lets every key in as a worker (ownership is what is tested)."""

    def allows(self, domain: str, key: bytes) -> bool:
        return True

    def is_worker(self, key: bytes) -> bool:
        return True

    def is_client(self, key: bytes) -> bool:
        return False


async def test_only_the_key_that_registered_a_worker_declares_its_schedules() -> None:
    scheduler = _Scheduler()
    discovery = Discovery(
        DiscoveryConfig(),
        instance_id="i",
        scheduler=scheduler,  # type: ignore[arg-type]
        endpoints=lambda: ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
        keys=_AnyWorkerKey(),  # type: ignore[arg-type]
    )
    wire = ["t", "t", None, 5.0, None, 2, 1, b""]
    discovery.receive(Inbound([[b"peer", encode(Register("w", ["t"], 1, 1, "h")), b"key-a"]]))
    discovery.receive(Inbound([[b"other", encode(DeclareSchedules("w", [wire])), b"key-b"]]))
    assert scheduler.told == [WorkerJoined("w", frozenset({"t"}), 1, key=b"key-a")]
    discovery.receive(Inbound([[b"peer", encode(DeclareSchedules("w", [wire])), b"key-a"]]))
    assert scheduler.told[-1] == DeclaredSchedules("w", [wire])
    assert discovery.receive(GetStatistics())["rejected"] == {"forbidden": 1}


async def test_an_unregister_after_a_crash_is_a_death_and_an_odd_reason_is_refused() -> None:
    scheduler = _Scheduler()
    discovery = _discovery(scheduler)
    discovery.receive(_frame(b"peer", Register("w", ["t"], 1, 1, "host")))
    discovery.receive(_frame(b"peer", Unregister("w", "exploded")))
    discovery.receive(_frame(b"peer", Unregister("w", "crashed")))
    assert scheduler.told[-1] == WorkerLost("w", "crashed")
    assert discovery.receive(GetStatistics())["rejected"] == {"invalid": 1}


class _Wire:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def try_send(self, frames: list[bytes]) -> bool:
        self.sent.append(frames)
        return True


async def test_stats_queries_beyond_the_bound_are_refused_at_once() -> None:
    gateway = Gateway("tcp://127.0.0.1:*", TransportConfig(), results=None)  # type: ignore[arg-type]
    wire = _Wire()
    gateway._sock = wire  # type: ignore[assignment]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            gateway._nursery = nursery
            queries = [[b"client", encode(StatsQuery(n))] for n in range(20)]
            gateway.receive(Inbound(queries))
            refused = [decode(frames[1]) for frames in wire.sent]
            assert len(refused) == 20 - MAX_STATS_QUERIES
            assert all(isinstance(m, ErrorReply) and m.reason == "overloaded" for m in refused)
            assert gateway._stats_queries == MAX_STATS_QUERIES
    assert gateway._stats_queries == 0  # every answered query gave its place back


async def test_a_result_query_of_more_than_max_query_ids_is_refused_invalid() -> None:
    """2,500 queries of 50,000 ids each once took a control plane to 7 GB."""

    class _Results:
        def __init__(self) -> None:
            self.told: list[Any] = []

        def tell(self, message: object) -> None:
            self.told.append(message)

    results = _Results()
    gateway = Gateway("tcp://127.0.0.1:*", TransportConfig(), results=results)  # type: ignore[arg-type]
    wire = _Wire()
    gateway._sock = wire  # type: ignore[assignment]
    ids = [f"t{i}" for i in range(MAX_QUERY_IDS + 1)]
    gateway.receive(Inbound([[b"c", encode(ResultQuery(1, ids))]]))
    gateway.receive(Inbound([[b"c", encode(ResultQuery(2, ids[:MAX_QUERY_IDS]))]]))
    # One id twenty times: its result would be pushed twenty times (300 MB for 15 MB).
    gateway.receive(Inbound([[b"c", encode(ResultQuery(3, ["t1"] * 20))]]))
    refusals = [decode(frames[1]) for frames in wire.sent]
    assert all(isinstance(r, ErrorReply) for r in refusals)
    assert [(r.request_id, r.reason) for r in refusals] == [(1, "invalid"), (3, "invalid")]  # type: ignore[attr-defined]
    assert [len(m.task_ids) for m in results.told] == [MAX_QUERY_IDS]


async def test_a_stats_reply_always_fits_a_message() -> None:
    """Workers choose their task names: 4 of 10,000 long names must not make stats() unreadable."""
    limit = 1 << 20
    gateway = Gateway("tcp://127.0.0.1:*", TransportConfig(max_message_size=limit), results=None)  # type: ignore[arg-type]
    names = ["n" * 500 + str(i) for i in range(2000)]
    workers = {f"w{i}": {"tasks": list(names), "pid": i} for i in range(4)}
    stats = {"discovery": {"workers": workers, "workers_alive": 4}, "scheduler": {"held": 0}}
    body = gateway._stats_reply(7, stats)
    assert len(body) <= limit
    reply = decode(body)
    assert reply.stats["discovery"]["workers"]["w0"]["tasks"] == 2000  # type: ignore[attr-defined]
    huge = {f"w{i}": {"tasks": ["x"], "pid": i, "hostname": "h" * 1000} for i in range(2000)}
    body = gateway._stats_reply(8, {"discovery": {"workers": huge}})
    assert len(body) <= limit
    assert "omitted" in decode(body).stats["discovery"]["workers"]  # type: ignore[attr-defined]


async def test_a_control_plane_frozen_past_the_liveness_limit_declares_no_worker_dead(
    mock_clock: trio.testing.MockClock,
) -> None:
    """SIGSTOP of the control plane: at the thaw its workers' silence was its own."""
    scheduler = _Scheduler()
    discovery = _discovery(scheduler)
    discovery._last_reap = trio.current_time()
    discovery.receive(_frame(b"peer", Register("w", ["t"], 1, 1, "host")))
    mock_clock.jump(10)  # frozen: no reap ran, no heartbeat was read
    discovery.receive(_Reap())
    assert not [m for m in scheduler.told if isinstance(m, WorkerLost)]
    for _ in range(8):  # then truly silent, reaped every half heartbeat: dead past the limit
        mock_clock.jump(0.5)
        discovery.receive(_Reap())
    assert [m for m in scheduler.told if isinstance(m, WorkerLost)] == [WorkerLost("w", "died")]
