"""Periodic tasks and dead letters on an embedded cluster, through the Client.

Real sockets and actors, real time: a one-second cron declared by three
workers runs once per tick; client schedules are added, listed, run and
removed; tasks that exhausted their retries, were poisoned or could not be
decoded are listed as dead letters, and a retried one succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import zoneinfo
from typing import Any

import pytest
import trio

from fastworker import Client, Cluster, TaskStatus, task
from fastworker.control._internal import WorkerLost
from fastworker.control._schedules import tick_task_id
from fastworker.tasks.serializer import SerializationFormat, dumps
from fastworker.testing import cluster

# Set by each test inside its trio run; the trio tasks below run on the same run.
_state: dict[str, Any] = {}


def _reset(**values: Any) -> None:
    _state.clear()
    _state.update(values)


def _record_run(at: float) -> int:
    """A periodic task ran at ``at``: note it, and say so once the test's target is reached."""
    runs: list[float] = _state["runs"]
    runs.append(at)
    if len(runs) >= _state["target"]:
        _state["reached"].set()
    return len(runs)


@task(name="periodic_every_second", cron="* * * * * *", loop="trio")
async def periodic_every_second() -> int:
    return _record_run(time.time())


@task(name="periodic_echo", loop="trio")
async def periodic_echo(value: str) -> str:
    _state["echoed"].append(value)
    _state["echo"].set()
    return value


@task(name="periodic_flaky", max_retries=1, retry_delay=0.01, loop="trio")
async def periodic_flaky(x: int) -> int:
    if _state["fail"]:
        raise RuntimeError(f"flaky {x}")
    return x * 2


@task(name="periodic_hang", loop="trio")
async def periodic_hang() -> str:
    _state["started"].set()
    await _state["release"].wait()
    return "done"


@task(name="periodic_interval", repeat_interval=1, loop="trio")
async def periodic_interval() -> int:
    return _record_run(trio.current_time())


@pytest.mark.timeout(30)
async def test_a_declared_repeat_interval_runs_once_per_interval_with_two_workers() -> None:
    """``@task(repeat_interval=...)`` declared by every worker serving it: one schedule,
    one run per interval (not one per worker)."""
    _reset(runs=[], target=3, reached=trio.Event())
    async with (
        Cluster(tasks=[periodic_interval], workers=2) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        (info,) = await client.schedules()
        assert (info.schedule_id, info.source, info.repeat_interval) == (
            "periodic_interval",
            "declared",
            1.0,
        )
        with trio.fail_after(10):
            await _state["reached"].wait()
        assert await client.remove_schedule("periodic_interval")
        stats = await client.stats()
    runs = _state["runs"]
    assert stats["scheduler"]["schedules"]["runs"] >= len(runs) >= 3
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert all(gap > 0.5 for gap in gaps), gaps  # two workers, yet never two runs per tick


@pytest.mark.timeout(30)
async def test_a_one_second_cron_runs_once_per_tick_with_three_workers() -> None:
    _reset(runs=[], target=3, reached=trio.Event())
    start = time.time()  # before any worker can declare the schedule
    async with (
        Cluster(tasks=[periodic_every_second], workers=3) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        (info,) = await client.schedules()  # three workers declared it: one schedule
        assert (info.schedule_id, info.source, info.cron) == (
            "periodic_every_second",
            "declared",
            "* * * * * *",
        )
        with trio.fail_after(10):
            await _state["reached"].wait()
        assert await client.remove_schedule("periodic_every_second")
        stats = await client.stats()
        submitted = stats["scheduler"]["schedules"]["runs"]
        _state["target"], _state["reached"] = submitted, trio.Event()
        if len(_state["runs"]) < submitted:
            with trio.fail_after(5):
                await _state["reached"].wait()
        end = time.time()
        # Every whole second in between is a tick; each ran once, under its own task id.
        found = []
        for second in range(math.floor(start), math.ceil(end) + 1):
            result = await client.get_task_result(tick_task_id(info.schedule_id, second))
            if result is not None:
                assert result.status is TaskStatus.SUCCESS
                found.append(second)
        assert len(found) == submitted == len(_state["runs"])
        assert found == list(range(found[0], found[0] + len(found)))  # no tick skipped
        assert await client.schedules() == []


@task(name="periodic_each_second", cron="* * * * * *", loop="trio")
async def periodic_each_second() -> int:
    return _record_run(time.time())


@pytest.mark.timeout(30)
async def test_ticks_missed_while_the_control_plane_was_frozen_run_once() -> None:
    _reset(runs=[], target=1, reached=trio.Event())
    start = time.time()
    # Heartbeats far apart: the freeze must not get the workers declared dead.
    async with (
        Cluster(tasks=[periodic_each_second], workers=2, heartbeat_interval=5.0) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        with trio.fail_after(10):
            await _state["reached"].wait()
        # The whole process stops, control plane included, across three ticks.
        time.sleep(3.3)  # noqa: ASYNC251  (blocking on purpose: an outage, not a wait)
        _state["target"], _state["reached"] = len(_state["runs"]) + 2, trio.Event()
        with trio.fail_after(10):
            await _state["reached"].wait()
        assert await client.remove_schedule("periodic_each_second")
        stats = (await client.stats())["scheduler"]["schedules"]
        _state["target"], _state["reached"] = stats["runs"], trio.Event()
        if len(_state["runs"]) < stats["runs"]:
            with trio.fail_after(5):
                await _state["reached"].wait()
        found = []
        for second in range(math.floor(start), math.ceil(time.time()) + 1):
            tick_id = tick_task_id("periodic_each_second", second)
            if await client.get_task_result(tick_id) is not None:
                found.append(second)
        assert len(found) == stats["runs"] == len(_state["runs"])
        gaps = [b - a for a, b in itertools.pairwise(found) if b - a > 1]
        assert len(gaps) == 1  # the frozen seconds: one run stood for them
        assert gaps[0] >= 3
        assert stats["collapsed"] == 1


@pytest.mark.timeout(30)
async def test_client_schedules_are_added_listed_run_and_removed() -> None:
    _reset(echoed=[], echo=trio.Event())
    async with (
        Cluster(tasks=[periodic_echo], workers=1) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        with pytest.raises(ValueError, match="is not valid"):
            await client.schedule("periodic_echo", cron="every minute")
        with pytest.raises(ValueError, match="unknown time zone"):
            await client.schedule("periodic_echo", cron="* * * * *", timezone="Moon/Base")
        with pytest.raises(ValueError, match="not both"):
            await client.schedule("periodic_echo", cron="* * * * *", repeat_interval=5)
        with pytest.raises(TypeError, match="args must be a list"):
            await client.schedule("periodic_echo", repeat_interval=5, args="abc")

        sid = await client.schedule(
            "periodic_echo", repeat_interval=1, args=["hi"], schedule_id="echo-every-second"
        )
        nightly = await client.schedule(
            "periodic_echo", cron="0 2 * * *", timezone="Europe/Paris", args=["night"]
        )
        listed = {info.schedule_id: info for info in await client.schedules()}
        assert set(listed) == {sid, nightly}
        assert listed[sid].args == ("hi",)
        assert listed[sid].repeat_interval == 1.0
        assert listed[sid].source == "client"
        night = listed[nightly]
        assert night.timezone == "Europe/Paris"
        assert night.next_run is not None
        assert night.next_run.astimezone(zoneinfo.ZoneInfo("Europe/Paris")).hour == 2
        with trio.fail_after(5):
            await _state["echo"].wait()
        assert _state["echoed"][0] == "hi"
        assert await client.remove_schedule(sid)
        assert not await client.remove_schedule(sid)
        assert [info.schedule_id for info in await client.schedules()] == [nightly]


@pytest.mark.timeout(30)
async def test_dead_letters_are_listed_and_a_retried_one_succeeds() -> None:
    _reset(fail=True, started=trio.Event(), release=trio.Event())
    async with (
        Cluster(tasks=[periodic_flaky, periodic_hang], workers=2, max_worker_deaths=1) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        # Retries exhausted: two runs, both failed.
        failed = await client.submit_task(task_name="periodic_flaky", args=(21,))
        assert failed.status is TaskStatus.FAILURE
        flaky_id = failed.task_id

        # Undecodable: a payload that is not JSON, past the client's own encoding.
        wire: list[Any] = ["", "periodic_flaky", 2, 0, b"\xff not json", None]
        (bad_id,) = client._enqueue([("", wire)])
        await client.join(timeout=10)

        # Poison: its worker is declared dead while it runs (one death is the limit here).
        hang_id = await client.delay("periodic_hang")
        with trio.fail_after(5):
            await _state["started"].wait()
        scheduler = cluster.control_plane.scheduler
        holder = scheduler.book._jobs[hang_id].worker
        assert holder is not None
        scheduler.ref.tell(WorkerLost(holder.decode(), "died"))
        await client.join(timeout=10)
        _state["release"].set()

        letters = {letter.task_id: letter for letter in await client.dead_letters()}
        assert set(letters) == {flaky_id, bad_id, hang_id}
        flaky = letters[flaky_id]
        assert (flaky.reason, flaky.task_name, flaky.args, flaky.attempts) == (
            "retries_exhausted",
            "periodic_flaky",
            (21,),
            2,
        )
        assert flaky.error == "RuntimeError: flaky 21"
        assert letters[bad_id].reason == "undecodable"
        assert letters[bad_id].args is None  # this client cannot decode them either
        assert letters[bad_id].error.startswith("bad task payload")
        assert letters[hang_id].reason == "poison"
        assert [letter.task_id for letter in await client.dead_letters(limit=1)] == [hang_id]

        # Retried after the cause is fixed: runs again under its id, from attempt 1.
        _state["fail"] = False
        assert await client.retry_dead_letter(flaky_id)
        assert await client.retry_dead_letter(hang_id)
        assert not await client.retry_dead_letter(flaky_id)  # no longer a dead letter
        assert not await client.retry_dead_letter("never-seen")
        await client.join(timeout=10)
        result = client.get_result(flaky_id)
        assert result is not None
        assert (result.status, result.result, result.attempts) == (TaskStatus.SUCCESS, 42, 1)
        hang = await client.get_task_result(hang_id)
        assert hang is not None
        assert hang.result == "done"
        assert [letter.task_id for letter in await client.dead_letters()] == [bad_id]
        with pytest.raises(ValueError, match="limit"):
            await client.dead_letters(limit=0)


@pytest.mark.timeout(10)
def test_dumps_for_the_raw_payload_is_json() -> None:
    # The undecodable case above relies on JSON being format 0 and rejecting 0xff.
    assert dumps(SerializationFormat.JSON, [[], {}]) == b"[[],{}]"
    assert SerializationFormat.JSON.code == 0


@task(name="periodic_always_fails", loop="asyncio")
async def periodic_always_fails(x: int) -> int:
    raise ValueError(f"no {x}")


@pytest.mark.timeout(30)
def test_schedules_and_dead_letters_under_asyncio() -> None:
    async def main(address: str) -> None:
        async with Client(discovery_address=address) as client:
            sid = await client.schedule("periodic_always_fails", repeat_interval=3600, args=[1])
            assert [info.schedule_id for info in await client.schedules()] == [sid]
            failed = await client.submit_task(task_name="periodic_always_fails", args=(5,))
            (letter,) = await client.dead_letters()
            assert (letter.task_id, letter.args, letter.error) == (
                failed.task_id,
                (5,),
                "ValueError: no 5",
            )
            assert await client.retry_dead_letter(failed.task_id)
            await client.join(timeout=10)
            again = client.get_result(failed.task_id)
            assert again is not None
            assert again.status is TaskStatus.FAILURE  # it failed again: a letter again
            assert [letter.task_id for letter in await client.dead_letters()] == [failed.task_id]
            assert await client.remove_schedule(sid)

    with cluster(tasks=[periodic_always_fails]) as running:
        asyncio.run(asyncio.wait_for(main(running.discovery_address), 20))
