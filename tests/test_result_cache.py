"""The control plane's result cache: one hour TTL, 10,000 results, LRU by last access.

Time logic is tested on the ResultCache actor itself under a MockClock (its
``store``/``get``/``sweep`` read ``trio.current_time()``).  End to end, a
second Client (which did not submit, so has no local copy) asks the control
plane; expiry end to end runs on a MockClock that follows real time and is
jumped past the TTL, so nothing waits for it to pass.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fastworker import Client, Cluster, TaskStatus
from fastworker.client._core import Query
from fastworker.control import ControlPlaneConfig
from fastworker.control._internal import QueryResults, StoreResults
from fastworker.control.result_cache import ResultCache, ResultCacheConfig
from fastworker.runtime import GetStatistics
from fastworker.wire import ResultRecord, ResultReply, Results, decode

pytestmark = pytest.mark.timeout(30)


def add(a: int, b: int) -> int:
    return a + b


def done(task_id: str) -> ResultRecord:
    return ResultRecord(task_id, TaskStatus.SUCCESS.value, b"1", name="add")


# -- the actor, on a mock clock ----------------------------------------------


async def test_defaults_are_one_hour_and_ten_thousand_results() -> None:
    assert (ResultCacheConfig().ttl, ResultCacheConfig().max_size) == (3600.0, 10_000)
    config = ControlPlaneConfig()
    assert (config.result_ttl, config.result_cache_size) == (3600.0, 10_000)
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add]) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            stats = await client.stats()
    assert stats["result-cache"]["ttl"] == 3600.0
    assert stats["result-cache"]["max_size"] == 10_000


async def test_a_result_expires_ttl_seconds_after_it_was_stored(
    mock_clock: trio.testing.MockClock,
) -> None:
    cache = ResultCache(ResultCacheConfig(ttl=10.0, max_size=100))
    record = done("a")
    cache.store([record])
    mock_clock.jump(5.0)
    assert cache.get("a") == record
    mock_clock.jump(4.5)
    assert cache.get("a") == record  # reading does not extend its life
    mock_clock.jump(0.5)
    assert cache.get("a") is None
    assert len(cache) == 0
    stats = cache.statistics_dict()
    assert (stats["hits"], stats["expired"]) == (2, 1)


async def test_storing_a_result_again_restarts_its_ttl(mock_clock: trio.testing.MockClock) -> None:
    cache = ResultCache(ResultCacheConfig(ttl=10.0, max_size=100))
    cache.store([done("a")])
    mock_clock.jump(8.0)
    cache.store([done("a")])
    mock_clock.jump(8.0)
    assert cache.get("a") is not None


async def test_an_unknown_id_is_not_found() -> None:
    cache = ResultCache(ResultCacheConfig())
    assert cache.get("never-stored") is None
    assert cache.statistics_dict()["misses"] == 1


async def test_sweep_drops_only_expired_results(mock_clock: trio.testing.MockClock) -> None:
    cache = ResultCache(ResultCacheConfig(ttl=10.0, max_size=100))
    cache.store([done("old")])
    mock_clock.jump(6.0)
    cache.store([done("young")])
    mock_clock.jump(4.0)
    assert cache.sweep() == 1
    assert len(cache) == 1
    assert cache.get("young") is not None
    assert cache.statistics_dict()["expired"] == 1


async def test_the_running_cache_frees_results_nobody_reads_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResultCache(ResultCacheConfig(ttl=30.0, max_size=100))
    with trio.fail_after(600):  # virtual seconds
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.ref.tell(StoreResults([done("a"), done("b")]))
            assert (await cache.ref.ask(GetStatistics()))["size"] == 2
            await trio.sleep(29.0)
            assert (await cache.ref.ask(GetStatistics()))["size"] == 2
            # The sweep runs every min(ttl, 60 s): by ttl + one period, both are gone.
            await trio.sleep(31.0)
            stats = await cache.ref.ask(GetStatistics())
            cache.ref.stop()
    assert (stats["size"], stats["expired"]) == (0, 2)


async def test_the_least_recently_stored_result_is_evicted_when_full() -> None:
    cache = ResultCache(ResultCacheConfig(max_size=3))
    cache.store([done("a"), done("b"), done("c")])
    cache.store([done("d")])
    assert cache.get("a") is None
    assert [cache.get(t) is not None for t in ("b", "c", "d")] == [True, True, True]
    assert cache.statistics_dict()["evicted"] == 1


async def test_a_read_makes_a_result_recently_used() -> None:
    cache = ResultCache(ResultCacheConfig(max_size=3))
    cache.store([done("a"), done("b"), done("c")])
    assert cache.get("a") is not None
    cache.store([done("d")])
    assert cache.get("b") is None  # b, not a, was the least recently accessed
    assert [cache.get(t) is not None for t in ("a", "c", "d")] == [True, True, True]


async def test_a_batch_bigger_than_the_cache_keeps_its_newest_results() -> None:
    cache = ResultCache(ResultCacheConfig(max_size=3))
    cache.store([done(str(i)) for i in range(5)])
    assert len(cache) == 3
    assert [cache.get(str(i)) is not None for i in range(5)] == [False, False, True, True, True]
    assert cache.statistics_dict()["evicted"] == 2


async def test_results_are_bounded_in_bytes_as_well_as_in_count() -> None:
    """Ten thousand results of a few MiB each would hold tens of GiB: past max_bytes the
    least recently used go, and a query for one says it expired."""
    big = 300_000
    cache = ResultCache(
        ResultCacheConfig(max_size=100, max_bytes=1 << 20, max_message_size=1 << 20)
    )
    cache.store([ResultRecord(f"r{i}", "success", b"x" * big, name="add") for i in range(3)])
    assert cache.get("r0") is not None  # now the most recently used
    cache.store([ResultRecord("r3", "success", b"x" * big, name="add")])
    stats = cache.statistics_dict()
    assert stats["bytes"] <= 1 << 20
    assert (stats["size"], stats["evicted"]) == (3, 1)
    assert cache.get("r1") is None  # the least recently used
    assert [cache.get(t) is not None for t in ("r0", "r2", "r3")] == [True, True, True]
    with pytest.raises(ValueError, match="one message"):
        ResultCacheConfig(max_bytes=1000, max_message_size=1 << 20)


# -- end to end ---------------------------------------------------------------


async def test_get_task_result_is_none_for_an_evicted_or_unknown_result() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add], result_cache_size=3) as cluster,
            Client(discovery_address=cluster.discovery_address) as submitter,
            Client(discovery_address=cluster.discovery_address) as reader,
        ):
            # One at a time, so they are stored in this order.
            ids = []
            for i in range(4):
                result = await submitter.submit_task("add", args=(i, i), timeout=5)
                ids.append(result.task_id)
            first = await reader.get_task_result(ids[0])
            rest = [await reader.get_task_result(task_id) for task_id in ids[1:]]
            unknown = await reader.get_task_result("no-such-task")
            stats = await reader.stats()
            # The submitter keeps its own copy: the documented local cache.
            local = submitter.get_result(ids[0])

    assert first is None  # "not found or expired", as the usage document says
    assert [(r.status, r.result) for r in rest if r is not None] == [
        (TaskStatus.SUCCESS, 2),
        (TaskStatus.SUCCESS, 4),
        (TaskStatus.SUCCESS, 6),
    ]
    assert unknown is None
    assert stats["result-cache"]["size"] == 3
    assert stats["result-cache"]["evicted"] == 1
    assert local is not None
    assert local.result == 0


async def test_reading_a_result_keeps_it_over_an_unread_one() -> None:
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add], result_cache_size=3) as cluster,
            Client(discovery_address=cluster.discovery_address) as submitter,
            Client(discovery_address=cluster.discovery_address) as reader,
        ):
            ids = []
            for i in range(3):
                ids.append((await submitter.submit_task("add", args=(i, i), timeout=5)).task_id)
            assert await reader.get_task_result(ids[0]) is not None
            ids.append((await submitter.submit_task("add", args=(3, 3), timeout=5)).task_id)
            kept = await reader.get_task_result(ids[0])
            evicted = await reader.get_task_result(ids[1])

    assert kept is not None
    assert kept.result == 0
    assert evicted is None


async def test_get_task_result_is_none_once_the_result_expired(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Real time flows (sockets, heartbeats); jumps add time without waiting for it.
    # Jumps stay well below heartbeat_interval x liveness (3 s): nobody is declared dead.
    mock_clock.rate = 1.0
    with trio.fail_after(10):
        async with (
            Cluster(tasks=[add], result_ttl=1.0) as cluster,
            Client(discovery_address=cluster.discovery_address) as submitter,
            Client(discovery_address=cluster.discovery_address) as reader,
        ):
            task_id = (await submitter.submit_task("add", args=(20, 22), timeout=5)).task_id
            fresh = await reader.get_task_result(task_id)
            mock_clock.jump(0.5)
            halfway = await reader.get_task_result(task_id)
            mock_clock.jump(0.5)
            expired = await reader.get_task_result(task_id)
            stats = await reader.stats()

    assert fresh is not None
    assert fresh.result == 42
    assert halfway is not None
    assert expired is None
    assert stats["result-cache"]["expired"] == 1
    assert stats["result-cache"]["size"] == 0


async def test_a_query_answers_expired_for_a_result_that_left_and_none_for_a_stranger(
    mock_clock: trio.testing.MockClock,
) -> None:
    """The cache remembers (bounded) which ids it had, so nobody waits on a result that left."""
    cache = ResultCache(ResultCacheConfig(ttl=10.0, max_size=2, gone_memory=3))
    replies: list[object] = []

    class _Gateway:
        name = "gateway"

        def tell(self, message: object) -> None:
            replies.append(message)

    cache.gateway = _Gateway()  # type: ignore[assignment]
    cache.store([done("a"), done("b"), done("c")])  # "a" evicted
    mock_clock.jump(10.0)
    cache.sweep()  # "b" and "c" expired
    cache.receive(QueryResults(b"client", 7, ["a", "b", "c", "never"]))
    (reply,) = replies
    answer = decode(reply.messages[0][1])  # type: ignore[attr-defined]
    assert isinstance(answer, ResultReply)
    assert answer.request_id == 7
    gone = [ResultRecord.from_wire(r) for r in answer.results[:3]]
    assert [(r.task_id, r.status) for r in gone] == [("a", "failure")] + [
        (i, "failure") for i in "bc"
    ]
    assert all(r.is_expired for r in gone)
    assert answer.results[3] is None
    cache.store([done(i) for i in "defg"])  # the memory of gone ids is bounded too
    assert len(cache._gone) <= 3


async def test_a_reply_too_big_for_one_message_pushes_the_rest_just_before_it() -> None:
    cache = ResultCache(ResultCacheConfig(max_size=100, max_message_size=64 * 1024))
    sent: list[list[bytes]] = []

    class _Gateway:
        name = "gateway"

        def tell(self, message: object) -> None:
            sent.extend(message.messages)  # type: ignore[attr-defined]

    cache.gateway = _Gateway()  # type: ignore[assignment]
    big = [ResultRecord(f"r{i}", "success", b"x" * 20_000, name="add") for i in range(6)]
    cache.store(big)
    cache.receive(QueryResults(b"client", 9, [r.task_id for r in big]))
    messages = [decode(frames[1]) for frames in sent]
    assert all(len(frames[1]) <= 64 * 1024 for frames in sent)
    *pushes, reply = messages
    assert isinstance(reply, ResultReply)
    assert pushes
    assert all(isinstance(m, Results) for m in pushes)
    pushed = {ResultRecord.from_wire(r).task_id for m in pushes for r in m.results}  # type: ignore[attr-defined]
    inline = {ResultRecord.from_wire(r).task_id for r in reply.results if isinstance(r, list)}
    assert inline | pushed == {r.task_id for r in big}
    assert [r is True for r in reply.results].count(True) == len(pushed)


def blob(n: int) -> str:
    return "x" * n


async def test_a_client_query_whose_results_overflow_one_reply_gets_them_all() -> None:
    """Entries that did not fit come as ``true``, their results pushed just before the reply."""
    limit = 128 * 1024
    with trio.fail_after(20):
        async with (
            Cluster(tasks=[blob], max_message_size=limit) as cluster,
            Client(discovery_address=cluster.discovery_address, max_message_size=limit) as writer,
            Client(discovery_address=cluster.discovery_address, max_message_size=limit) as reader,
        ):
            ids = [await writer.delay("blob", 40_000) for _ in range(6)]
            await writer.join()
            records = await reader._command(lambda w, deadline: Query(w, deadline, ids), 5)
    assert [r.task_id for r in records] == ids
    assert all(r.status == "success" for r in records)


async def test_a_query_while_the_gateway_is_stopped_is_dropped_not_a_crash() -> None:
    """At a node's stop the Gateway goes first: queries still queued here must not crash the
    cache (the hostile review: it crashed until its supervisor gave up, and SIGTERM exited 1)."""
    from fastworker.control._internal import QueryResults
    from fastworker.runtime import ActorStopped

    class _StoppedGateway:
        name = "gateway"

        def tell(self, message: object) -> None:
            raise ActorStopped("actor 'gateway' is stopped")

    cache = ResultCache(ResultCacheConfig())
    cache.gateway = _StoppedGateway()  # type: ignore[assignment]
    cache.receive(QueryResults(b"client", 1, ["a", "b"]))
    assert cache.statistics_dict()["dropped_replies"] == 1
