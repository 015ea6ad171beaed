"""The chaos campaign: its TCP proxy, its history checker, its schedule, and a real run.

The proxy and checker tests are fast and use no node.  The campaign test
runs ``python -m fastworker.chaos`` for 60 s against real node processes
(marked ``multiprocess``); the ``soak`` variant runs 5 minutes.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio
from multiprocess import REPO_ROOT, node_env

from fastworker.chaos import Fault, History, Link, Observation, Op, Proxy, TaskRecord, check
from fastworker.chaos._check import INSTANT_BOUND, TIMEOUT_SLACK
from fastworker.chaos._schedule import RATES, plan
from fastworker.chaos._tasks import expected_ok

# -- the proxy ---------------------------------------------------------------------

_QUIET = 0.3  # how long "nothing arrives" is watched for


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def _start_proxy(nursery: trio.Nursery) -> tuple[Link, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    echo_port = listeners[0].socket.getsockname()[1]
    link = Link("test")
    port = await nursery.start(Proxy(link, echo_port).run)
    return link, port


async def _receive(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[Link, int]]:
    async with trio.open_nursery() as nursery:
        yield await _start_proxy(nursery)
        nursery.cancel_scope.cancel()


async def test_proxy_pass_forwards_both_ways(proxied: tuple[Link, int]) -> None:
    link, port = proxied
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"x" * 200_000)
        with trio.fail_after(5):
            assert await _receive(stream, 200_000) == b"x" * 200_000
    assert link.forwarded_bytes >= 400_000


async def test_proxy_slow_delays_every_chunk(proxied: tuple[Link, int]) -> None:
    link, port = proxied
    link.set("slow", 0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        began = trio.current_time()
        await stream.send_all(b"ping")
        with trio.fail_after(5):
            assert await _receive(stream, 4) == b"ping"
        assert trio.current_time() - began >= 0.4  # up and down, 0.2 s each


async def test_proxy_stall_holds_bytes_and_releases_them(proxied: tuple[Link, int]) -> None:
    link, port = proxied
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"a")
        with trio.fail_after(5):
            assert await _receive(stream, 1) == b"a"
        link.set("stall")
        await stream.send_all(b"held")
        with trio.move_on_after(_QUIET) as quiet:
            await stream.receive_some(10)
        assert quiet.cancelled_caught, "a stalled link forwarded bytes"
        link.set("pass")
        with trio.fail_after(5):
            assert await _receive(stream, 4) == b"held"  # the same connection, nothing lost


async def test_proxy_cut_closes_connections_and_refuses_new_ones(
    proxied: tuple[Link, int],
) -> None:
    link, port = proxied
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"a")
        with trio.fail_after(5):
            assert await _receive(stream, 1) == b"a"
        link.set("cut")
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""  # closed by the proxy
    fresh = await trio.open_tcp_stream("127.0.0.1", port)
    async with fresh:
        with trio.fail_after(5):
            assert await fresh.receive_some(10) == b""  # accepted and closed at once
    link.set("pass")
    again = await trio.open_tcp_stream("127.0.0.1", port)
    async with again:
        await again.send_all(b"b")
        with trio.fail_after(5):
            assert await _receive(again, 1) == b"b"


async def test_proxy_half_open_forwards_one_way_then_resets() -> None:
    received = trio.Event()
    got: list[bytes] = []

    async def sink(stream: trio.SocketStream) -> None:
        async with stream:
            data = await stream.receive_some(10)
            got.append(data)
            received.set()
            await stream.send_all(b"reply")  # will be thrown away
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, sink, 0, host="127.0.0.1")
        )
        link = Link("test")
        port = await nursery.start(Proxy(link, listeners[0].socket.getsockname()[1]).run)
        link.set("half_open")
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"up")
            with trio.fail_after(5):
                await received.wait()
            assert got == [b"up"]  # client → target went through
            with trio.move_on_after(_QUIET) as quiet:
                await stream.receive_some(10)
            assert quiet.cancelled_caught, "the reply crossed a half-open link"
            assert link.dropped_bytes == len(b"reply")  # read within the quiet time, thrown away
            link.set("pass")
            with trio.fail_after(5):
                assert await stream.receive_some(10) == b""  # reset: its stream had a hole
        nursery.cancel_scope.cancel()


def test_link_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown proxy mode"):
        Link("x").set("flaky")  # type: ignore[arg-type]


# -- the checker --------------------------------------------------------------------

T0 = 1_000_000.0


def _history(*tasks: TaskRecord, faults: tuple[Fault, ...] = ()) -> History:
    history = History(started=T0, ended=T0 + 100)
    for task in tasks:
        history.tasks[task.key] = task
        history.runs.setdefault(task.key, [(task.submitted_at + 0.1, 100)])
    history.faults.extend(faults)
    return history


def _ok_task(key: str = "0.1.1", **changes: object) -> TaskRecord:
    task = TaskRecord(key, "ok", "chaos.ok", "c0#1", T0 + 10, expect=expected_ok(key, 1, 2))
    task.task_id = f"id-{key}"
    task.acked = True
    for name, value in changes.items():
        setattr(task, name, value)
    return task


def _final(task: TaskRecord, status: str = "success", value: object = None, **kw: object) -> None:
    if value is None and status == "success":
        value = task.expect
    task.finals.append(
        Observation(task.submitted_at + 1, "push", status, value, task_id=task.task_id, **kw)  # type: ignore[arg-type]
    )


def _kinds(history: History) -> dict[str, int]:
    return {k: v for k, v in check(history).by_kind().items() if v}


def test_a_clean_history_passes() -> None:
    task = _ok_task()
    _final(task)
    assert _kinds(_history(task)) == {}


def test_lost_acknowledged_and_never_final() -> None:
    assert _kinds(_history(_ok_task())) == {"lost": 1}


def test_lost_also_when_a_live_client_still_holds_it_unacknowledged() -> None:
    assert _kinds(_history(_ok_task(acked=False))) == {"lost": 1}


def test_not_lost_when_its_client_stopped_and_the_control_plane_restarted_after() -> None:
    gone = _ok_task(owner_gone_at=T0 + 20)
    restart = Fault("cp-kill", "cp1", T0 + 30, T0 + 31, True)
    assert _kinds(_history(gone, faults=(restart,))) == {}


def test_lost_when_its_client_stopped_but_the_control_plane_kept_running() -> None:
    gone = _ok_task(owner_gone_at=T0 + 20)
    early = Fault("cp-kill", "cp1", T0 + 1, T0 + 2, True)  # long before: the client re-submitted
    assert _kinds(_history(gone, faults=(early,))) == {"lost": 1}


def test_an_unacknowledged_task_of_a_stopped_client_may_vanish() -> None:
    assert _kinds(_history(_ok_task(acked=False, owner_gone_at=T0 + 20))) == {}


def test_duplicated_two_runs_without_any_fault() -> None:
    task = _ok_task()
    _final(task)
    history = _history(task)
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.2, 101)]
    assert _kinds(history) == {"duplicated": 1}


def test_a_rerun_after_its_worker_was_declared_dead_is_legal() -> None:
    task = _ok_task()
    _final(task)
    death = Fault("declared-dead", "cp1", T0 + 10.3, T0 + 10.5, True, [100])
    history = _history(task, faults=(death,))
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.6, 101)]
    assert _kinds(history) == {}


def test_a_restart_of_the_control_plane_excuses_a_rerun_on_any_worker() -> None:
    task = _ok_task()
    _final(task)
    restart = Fault("cp-kill", "cp1", T0 + 10.3, T0 + 10.5, True)
    history = _history(task, faults=(restart,))
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.6, 100)]
    assert _kinds(history) == {}


def test_the_death_of_another_worker_does_not_excuse_a_rerun() -> None:
    task = _ok_task()
    _final(task)
    elsewhere = Fault("kill9", "node1/0 pid 300", T0 + 10.3, T0 + 11.5, True, [300])
    history = _history(task, faults=(elsewhere,))
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.6, 101)]
    assert _kinds(history) == {"duplicated": 1}


def test_a_fault_outside_the_tasks_window_does_not_excuse_a_rerun() -> None:
    task = _ok_task()
    _final(task)  # final at T0 + 11
    later = Fault("kill9", "node0/0 pid 100", T0 + 50, T0 + 51, True, [100])
    client_side = Fault("net-cut", "gateway", T0 + 10, T0 + 12, False)  # cannot requeue
    history = _history(task, faults=(later, client_side))
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.6, 101)]
    assert _kinds(history) == {"duplicated": 1}


def test_retries_multiply_the_allowance() -> None:
    task = _ok_task(kind="flaky", max_retries=2)
    _final(task)
    history = _history(task)
    history.runs[task.key] = [(T0 + 10.1, 100), (T0 + 10.3, 100), (T0 + 10.5, 101)]
    assert _kinds(history) == {}
    history.runs[task.key].append((T0 + 10.7, 101))
    assert _kinds(history) == {"duplicated": 1}


def test_unexpected_wrong_value() -> None:
    task = _ok_task()
    _final(task, value={"key": task.key, "v": 0})
    assert _kinds(_history(task)) == {"unexpected": 1}


def test_unexpected_a_result_naming_another_id() -> None:
    task = _ok_task()
    _final(task)
    task.finals[0].task_id = "someone-else"
    assert _kinds(_history(task)) == {"unexpected": 1}


def test_unexpected_success_of_a_task_that_always_fails() -> None:
    task = _ok_task(kind="fail", expect=None)
    _final(task, value=1)
    assert _kinds(_history(task)) == {"unexpected": 1}


def test_own_and_documented_failures_are_expected() -> None:
    failing = _ok_task("0.1.1", kind="fail", expect=None)
    _final(failing, "failure", error="ChaosFailure: 0.1.1 failed on purpose")
    rejected = _ok_task("0.1.2")
    _final(rejected, "failure", error="rejected by the control plane (queue_full): full")
    strange = _ok_task("0.1.3")
    _final(strange, "failure", error="KeyError: 'x'")
    assert _kinds(_history(failing, rejected)) == {}
    assert _kinds(_history(strange)) == {"unexpected": 1}


def test_cancelled_needs_a_cancel_and_a_cancel_that_took_needs_cancelled() -> None:
    uncalled = _ok_task("0.1.1")
    _final(uncalled, "cancelled")
    called = _ok_task("0.1.2", cancel_sent=True)
    _final(called, "cancelled")
    ignored = _ok_task("0.1.3", cancel_sent=True, cancel_took=True)
    _final(ignored)
    assert _kinds(_history(called)) == {}
    assert _kinds(_history(uncalled, ignored)) == {"unexpected": 2}


def test_two_finals_that_disagree_are_unexpected_unless_the_first_was_a_give_up() -> None:
    flip = _ok_task("0.1.1")
    _final(flip)
    _final(flip, "failure", error="ChaosFailure")
    gave_up = _ok_task("0.1.2")
    _final(gave_up, "failure", error="the control plane did not acknowledge the submission")
    _final(gave_up)
    verdict = check(_history(gave_up))
    assert verdict.by_kind()["unexpected"] == 0
    assert verdict.superseded == 1
    assert _kinds(_history(flip)) == {"unexpected": 1}


def test_unexpected_runs_of_unknown_keys_and_answers_about_unknown_ids() -> None:
    history = _history()
    history.runs["9.9.9"] = [(T0, 100)]
    history.probes.append(("nobody", "TaskResult(...)"))
    history.probes.append(("nobody-else", None))
    assert _kinds(history) == {"unexpected": 2}


def test_unexpected_a_result_pushed_to_a_client_that_never_submitted_it() -> None:
    history = _history()
    history.strays.append(("c1#2", "somebody-elses-id"))
    assert _kinds(history) == {"unexpected": 1}


def test_hung_callers() -> None:
    history = _history()
    quick = Op("c0#1", "query", T0, T0 + 5.0, timeout=5.0, outcome="timeout")
    late = Op("c0#1", "query", T0, T0 + 5.0 + TIMEOUT_SLACK + 0.5, timeout=5.0, outcome="ok")
    slow_delay = Op("c0#1", "delay", T0, T0 + INSTANT_BOUND + 1, outcome="ok")
    abandoned = Op("c0#1", "cancel", T0, T0 + 20, timeout=5.0, outcome="abandoned")
    history.ops.extend([quick, late, slow_delay, abandoned])
    assert _kinds(history) == {"hung": 3}


def test_health_problems_are_violations() -> None:
    history = _history()
    history.health.append("cp1: supervisor 'control-plane' gave up on 'scheduler'")
    assert _kinds(history) == {"health": 1}


# -- the schedule ----------------------------------------------------------------------


def _plan(seed: int, duration: float = 60.0) -> list[object]:
    links = ["cdisc0", "gateway", "wdisc0", "wsched"]
    return plan(seed, duration, worker_nodes=2, workers_per_node=2, clients=3, links=links)  # type: ignore[return-value]


def test_the_schedule_is_a_function_of_the_seed() -> None:
    assert _plan(7) == _plan(7)
    assert _plan(7) != _plan(8)
    faults = _plan(7, 600.0)
    kinds = {p.kind for p in faults}  # type: ignore[attr-defined]
    assert kinds == set(RATES)
    expected = sum(RATES.values()) * 9.9  # per minute, over the 594 s between the margins
    assert 0.8 * expected <= len(faults) <= 1.05 * expected  # some do not fit: one per target


# -- the campaign ------------------------------------------------------------------------

FIGURES = re.compile(
    r"^chaos seed=(?P<seed>\d+) duration=\S+ seconds=\S+ ops=(?P<ops>\d+) tasks=(?P<tasks>\d+) "
    r"runs=\d+ outcomes=\S+ faults=(?P<faults>\S+) events=\S+ violations=(?P<violations>\S+) "
    r"superseded=\d+ drain_seconds=\S+ cp_rss_max_mib=\d+ loop_lag_max=\S+ "
    r"verdict=(?P<verdict>PASS|FAIL)$"
)


def _campaign(seed: int, duration: int, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fastworker.chaos",
            "--duration",
            str(duration),
            "--seed",
            str(seed),
        ],
        cwd=REPO_ROOT,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_passed(done: subprocess.CompletedProcess[str], seed: int) -> None:
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    match = FIGURES.match(last)
    assert match is not None, (
        f"no figures line; stdout {done.stdout!r}, stderr {done.stderr[-3000:]}"
    )
    assert int(match["seed"]) == seed
    assert int(match["ops"]) > 500
    assert int(match["tasks"]) > 500
    assert "kill9" in match["faults"]
    assert "cp-" in match["faults"]
    assert done.returncode == 0, f"{last}\n{done.stderr[-5000:]}"
    assert match["verdict"] == "PASS"
    assert set(match["violations"].split(",")) == {
        "duplicated:0", "health:0", "hung:0", "lost:0", "unexpected:0"
    }  # fmt: skip


@pytest.mark.multiprocess
@pytest.mark.timeout(150)
def test_a_60_second_campaign_finds_no_violation() -> None:
    """Seed 462 half-opens the Scheduler link mid-campaign: before lost dispatches were
    reconciled, three acknowledged tasks never ran (lost:3)."""
    _assert_passed(_campaign(seed=462, duration=60, timeout=140), seed=462)


@pytest.mark.multiprocess
@pytest.mark.soak
@pytest.mark.timeout(480)
def test_a_5_minute_campaign_finds_no_violation(request: pytest.FixtureRequest) -> None:
    if "soak" not in (request.config.getoption("markexpr", "") or ""):
        pytest.skip("soak variant: run with -m soak")
    seed = int(os.environ.get("FASTWORKER_CHAOS_SEED", "11"))
    _assert_passed(_campaign(seed=seed, duration=300, timeout=460), seed=seed)
