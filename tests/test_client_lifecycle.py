"""The client's life cycle as a user lives it: stop hands over, the cache is really asked,
a client starts again, and one client belongs to one loop.

Every test runs under both loops (``asyncio.run`` and ``trio.run``) and, where
a control plane is involved, against both kinds: an embedded cluster in a
thread of its own (``ClusterThread``) and a real ``python -m fastworker.node``
process.  Either runs outside the caller's loop, as a control plane does in
production; the embedded one inside a trio caller's own run is the one case
``stop()`` cannot serve (it would hold that run still), which the README says.

"Started after the client" means what it says: the control plane is launched
from a background thread at the moment the test picks — right before
``stop()`` or while ``async with`` flushes — and the client must wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import trio
import zmq
from _client_cases import free_address
from multiprocess import REPO_ROOT, Node, node_env

from fastworker import (
    Client,
    ClientLoopError,
    ClientStoppedError,
    ControlPlaneUnavailableError,
    TaskResult,
    TaskStatus,
)
from fastworker.testing import ClusterThread

pytestmark = [pytest.mark.timeout(60), pytest.mark.multiprocess]

T = TypeVar("T")
LOOPS = ["asyncio", "trio"]
KINDS = ["embedded", "node"]


def run_on(loop: str, main: Callable[[], Awaitable[T]]) -> T:
    """``main()`` in a fresh run of ``loop``."""
    if loop == "trio":
        return trio.run(main)  # type: ignore[arg-type]
    return asyncio.run(main())  # type: ignore[arg-type]


async def sleep_on(loop: str, seconds: float) -> None:
    if loop == "trio":
        await trio.sleep(seconds)
    else:
        await asyncio.sleep(seconds)


class LateControlPlane:
    """A control plane serving examples.tasks at ``address``, started when the test says."""

    def __init__(self, kind: str, address: str, **options: Any) -> None:
        self.kind = kind
        self.address = address
        self.options = options
        self.up = threading.Event()
        self._thread: threading.Thread | None = None
        self._node: Node | None = None
        self._cluster: ClusterThread | None = None
        self.error: BaseException | None = None

    def _start(self) -> None:
        try:
            if self.kind == "node":
                args = ["--task-modules", "examples.tasks", "--discovery-address", self.address]
                args += ["--workers", "1", "--grace", "1"]
                for key, value in self.options.items():
                    args += [f"--{key.replace('_', '-')}", str(value)]
                self._node = Node(args)
                self._node.wait_ready()
            else:
                self._cluster = ClusterThread(
                    discovery_address=self.address, task_modules=["examples.tasks"], **self.options
                )
                self._cluster.start()
            self.up.set()
        except BaseException as exc:
            self.error = exc

    def start_soon(self) -> None:
        """Launch it from a background thread and return at once."""
        self._thread = threading.Thread(target=self._start, name="late-control-plane")
        self._thread.start()

    def start_now(self) -> None:
        self._start()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(30)
        if self._node is not None:
            self._node.close()
        if self._cluster is not None:
            self._cluster.stop()
        if self.error is not None:
            raise self.error


@contextlib.contextmanager
def control_plane(
    kind: str, address: str | None = None, **options: Any
) -> Iterator[LateControlPlane]:
    late = LateControlPlane(kind, address or free_address(), **options)
    try:
        yield late
    finally:
        late.close()


@contextlib.contextmanager
def pull_socket() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A PULL socket on a random loopback port: where a callback document arrives."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close()
        context.term()


def read_results(address: str, ids: list[str], timeout: float = 20.0) -> dict[str, TaskResult]:
    """Each id's result from the control plane's cache, asked by a client that did not submit."""

    async def main() -> dict[str, TaskResult]:
        found: dict[str, TaskResult] = {}
        async with Client(address) as reader:
            deadline = time.monotonic() + timeout
            while len(found) < len(ids) and time.monotonic() < deadline:
                for task_id in ids:
                    if task_id not in found:
                        result = await reader.get_task_result(task_id)
                        if result is not None:
                            found[task_id] = result
                if len(found) < len(ids):
                    await asyncio.sleep(0.05)  # the tasks are running: the documented polling
        return found

    return asyncio.run(main())


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastworker-client"]


# -- 1. hand-over on stop ----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_stop_hands_every_returned_id_to_a_control_plane_started_after_the_client(
    loop: str, kind: str
) -> None:
    """The issue's script: start, submit, stop, before any control plane exists."""
    with control_plane(kind) as late, pull_socket() as (sock, callback_address):

        async def main() -> tuple[list[str], str, float]:
            client = Client(late.address)
            await client.start()
            ids = [await client.delay("add", i, 1) for i in range(50)]
            ids.append(await client.apply_async("add", (100, 1), max_retries=1))
            ids += await client.submit_batch([("add", (200 + i, 1)) for i in range(5)])
            callback_id = await client.delay_with_callback(
                "process_data", {"x": 1}, callback_address=callback_address
            )
            late.start_soon()  # the control plane comes up only now
            began = time.monotonic()
            client.stop(timeout=40)
            return ids, callback_id, time.monotonic() - began

        ids, callback_id, elapsed = run_on(loop, main)
        assert late.up.is_set()
        assert sock.poll(10_000), "no callback document arrived"
        document = sock.recv_json()
        results = read_results(late.address, [*ids, callback_id])

    assert client_threads() == []
    expected = [i + 1 for i in range(50)] + [101] + [201 + i for i in range(5)]
    assert [results[i].result if i in results else None for i in ids] == expected
    assert results[callback_id].status is TaskStatus.SUCCESS
    assert document["task_id"] == callback_id  # type: ignore[index]
    assert elapsed < 40


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_async_with_flushes_on_exit_without_blocking_the_loop(loop: str, kind: str) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await sleep_on(loop, 0.01)
            ticks += 1

    with control_plane(kind) as late:

        async def submit_then_leave() -> tuple[list[str], int, bool]:
            """No flush() in the block: leaving it is what must hand the tasks over."""
            async with Client(late.address) as client:
                ids = [await client.delay("add", i, i) for i in range(20)]
                late.start_soon()  # up only while the block's exit waits
                before = ticks
            return ids, ticks - before, late.up.is_set()

        async def main() -> tuple[list[str], int, bool]:
            if loop == "trio":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ticker)
                    left = await submit_then_leave()
                    nursery.cancel_scope.cancel()
                return left
            beat = asyncio.ensure_future(ticker())
            try:
                return await submit_then_leave()
            finally:
                beat.cancel()

        ids, ticks_while_leaving, up = run_on(loop, main)
        results = read_results(late.address, ids)

    assert up  # the exit waited for the late control plane ...
    assert ticks_while_leaving > 0  # ... and the loop kept running meanwhile
    assert [results[i].result for i in ids] == [2 * i for i in range(20)]


@pytest.mark.parametrize("loop", LOOPS)
def test_without_a_control_plane_stop_waits_its_timeout_then_names_the_count(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """And the tasks stay with the client: started again, it sends them."""
    client = Client(free_address())

    async def submit_and_stop() -> tuple[list[str], float]:
        await client.start()
        ids = [await client.delay("add", i, 2) for i in range(7)]
        with pytest.raises(ControlPlaneUnavailableError, match="7 tasks not acknowledged"):
            await client.flush(timeout=0.2)
        began = time.monotonic()
        client.stop(timeout=0.5)
        return ids, time.monotonic() - began

    with caplog.at_level(logging.ERROR, logger="fastworker.client"):
        ids, elapsed = run_on(loop, submit_and_stop)

    assert 0.5 <= elapsed < 2.0
    assert "client stopped with 7 tasks not handed over" in caplog.text
    assert client.pending_count == 7

    with control_plane("embedded", client.discovery_address) as late:
        late.start_now()

        async def again() -> list[Any]:
            await client.start()
            await client.join(timeout=20)
            results = [client.get_result(i) for i in ids]
            client.stop()
            return [r.result if r else None for r in results]

        assert run_on(loop, again) == [i + 2 for i in range(7)]


@pytest.mark.parametrize("loop", LOOPS)
def test_async_with_and_no_control_plane_logs_what_it_could_not_hand_over_without_raising(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The README: ``async with`` logs, rather than raises from the block's exit."""

    async def main() -> None:
        async with Client(free_address(), timeout=0.3) as client:
            for i in range(3):
                await client.delay("add", i, 1)

    with caplog.at_level(logging.ERROR, logger="fastworker.client"):
        run_on(loop, main)

    assert "client stopped with 3 tasks not handed over" in caplog.text


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_stop_with_nothing_outstanding_returns_at_once(loop: str, kind: str) -> None:
    with control_plane(kind) as late:
        late.start_now()

        async def main() -> float:
            client = Client(late.address)
            await client.start()
            await client.submit_task("add", (1, 2))
            for i in range(100):
                await client.delay("add", i, 0)
            await client.flush()
            began = time.monotonic()
            client.stop()
            return time.monotonic() - began

        elapsed = run_on(loop, main)

    assert elapsed < 0.5


# -- 2. get_task_result asks the control plane every time ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_get_task_result_shows_the_control_planes_ttl_and_lru(loop: str, kind: str) -> None:
    with control_plane(kind, result_ttl=1.0, result_cache_size=3) as late:
        late.start_now()

        async def main() -> None:
            async with Client(late.address) as client:
                first = await client.submit_task("add", (1, 1))
                for i in range(3):
                    await client.submit_task("add", (i, 0))  # three more: the first is evicted
                assert await client.get_task_result(first.task_id) is None
                local = client.get_result(first.task_id)
                assert local is not None
                assert local.result == 2  # the client's own copy, read without I/O
                last = await client.submit_task("add", (5, 5))
                cached = await client.get_task_result(last.task_id)
                assert cached is not None
                assert cached.result == 10
                await sleep_on(loop, 1.5)  # past --result-ttl: the point of the test
                assert await client.get_task_result(last.task_id) is None
                assert client.get_status(last.task_id) is TaskStatus.SUCCESS

        run_on(loop, main)


# -- 3. started again ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_client_starts_again_after_stop_on_new_loops_of_either_kind(kind: str) -> None:
    with control_plane(kind) as late:
        late.start_now()
        client = Client(late.address)

        async def session(n: int) -> int:
            await client.start()
            assert repr(client).endswith("started>")
            result = (await client.submit_task("add", (n, 100))).result
            task_id = await client.delay("add", n, 1000)
            client.stop()
            assert repr(client).endswith("stopped>")
            assert client.get_status(task_id) is not TaskStatus.PENDING  # handed over
            return int(result)

        outcomes = [run_on(loop, lambda n=n: session(n)) for n, loop in enumerate(LOOPS * 2)]

    assert outcomes == [100, 101, 102, 103]
    assert client_threads() == []


# -- 5. one client, one loop -------------------------------------------------------------------


def call_elsewhere(other: str, call: Callable[[], Awaitable[Any]]) -> BaseException | None:
    """Run ``call`` in a fresh ``other`` loop in another thread; the exception it raised."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        async def main() -> None:
            await call()

        try:
            run_on(other, main)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    return outcome[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("other", LOOPS)
@pytest.mark.parametrize("loop", LOOPS)
def test_calls_from_another_loop_raise_before_anything_is_queued(
    loop: str, other: str, kind: str
) -> None:
    with control_plane(kind) as up:
        up.start_now()

        async def main() -> None:
            client = Client(up.address)
            await client.start()
            done = await client.submit_task("add", (1, 1), timeout=10)
            calls: list[Callable[[], Awaitable[Any]]] = [
                lambda: client.delay("add", 2, 2),
                lambda: client.submit_batch([("add", (3, 3))]),
                lambda: client.apply_async("add", (4, 4)),
                lambda: client.delay_with_callback(
                    "add", 5, 5, callback_address="tcp://127.0.0.1:9"
                ),
                lambda: client.submit_task("add", (6, 6), timeout=1),
                lambda: client.get_task_result(done.task_id, timeout=1),
                lambda: client.cancel_task(done.task_id, timeout=1),
                lambda: client.stats(timeout=1),
                lambda: client.schedules(timeout=1),
                lambda: client.dead_letters(timeout=1),
                lambda: client.join(timeout=1),
                lambda: client.flush(timeout=1),
                client.start,  # running on another loop: not started twice
            ]
            for call in calls:
                error = call_elsewhere(other, call)
                assert isinstance(error, ClientLoopError), error
                assert "use it from the loop that started it" in str(error)
            assert client.pending_count == 0  # nothing was queued by any of them
            # Plain methods work from anywhere, a plain thread included.
            seen: list[Any] = []
            thread = threading.Thread(
                target=lambda: seen.extend(
                    [client.get_status(done.task_id), client.get_result(done.task_id)]
                )
            )
            thread.start()
            thread.join(5)
            assert seen[0] is TaskStatus.SUCCESS
            assert seen[1].result == 2
            # ... and the starting loop still has the client, untouched.
            assert (await client.submit_task("add", (7, 7), timeout=10)).result == 14
            client.stop(timeout=5)
            with pytest.raises(ClientStoppedError):
                await client.delay("add", 1, 1)

        run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_from_outside_after_the_starting_run_ended_still_hands_over(loop: str) -> None:
    """A script that forgot stop() inside its run can still call it afterwards, from plain code.

    The run's end tried to hand over already (for the client's 1 s timeout,
    with no control plane yet); the later stop() tries again and succeeds.
    """
    with control_plane("embedded") as late:
        client = Client(late.address, timeout=1)

        async def main() -> list[str]:
            await client.start()
            return [await client.delay("add", i, 3) for i in range(10)]

        ids = run_on(loop, main)  # the run ends; the client was not stopped
        late.start_soon()
        stopper = threading.Thread(target=client.stop, kwargs={"timeout": 30})
        stopper.start()  # from another thread than the one that started it
        stopper.join(40)
        results = read_results(late.address, ids)

    assert not stopper.is_alive()
    assert [results[i].result for i in ids] == [i + 3 for i in range(10)]
    assert client_threads() == []


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_that_ends_without_stop_hands_over_what_it_was_given(loop: str) -> None:
    """A script that never calls stop(): the ids it got still run, and the next run
    of either library can start the client again (or stop it: nothing left to do)."""
    with control_plane("embedded") as up:
        up.start_now()
        client = Client(up.address)

        async def forgetful() -> list[str]:
            await client.start()
            return [await client.delay("add", i, 3) for i in range(20)]  # and no stop()

        ids = run_on(loop, forgetful)
        results = read_results(up.address, ids)

        async def unstarted() -> None:
            with pytest.raises(ClientStoppedError, match="start"):
                await client.delay("add", 1, 1)  # stopped with its run, not "used elsewhere"

        run_on(loop, unstarted)

        async def again() -> int:
            await client.start()  # the ended run's client is not "started elsewhere"
            return (await client.submit_task("add", (1, 1))).result

        assert run_on(loop, again) == 2
        client.stop()
        client.stop()  # again: nothing left

    assert [results[i].result for i in ids] == [i + 3 for i in range(20)]
    assert client_threads() == []


@pytest.mark.parametrize("loop", LOOPS)
def test_stop_from_a_thread_returns_near_its_timeout_while_the_loop_is_blocked(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """stop(timeout) from another thread waits for the client's loop only that long; the
    loop, once free again, stops the client itself and hands over what it holds."""
    with control_plane("embedded") as up:
        up.start_now()
        client = Client(up.address)
        elapsed: list[float] = []

        def stop_from_thread() -> None:
            began = time.monotonic()
            client.stop(timeout=0.5)
            elapsed.append(time.monotonic() - began)

        async def main() -> str:
            await client.start()
            task_id = await client.delay("add", 4, 3)
            stopper = threading.Thread(target=stop_from_thread)
            stopper.start()
            time.sleep(2.5)  # noqa: ASYNC251 -- the loop is blocked: the point of this test
            stopper.join(10)
            await sleep_on(loop, 0)  # the loop runs the stop it was asked for
            return task_id

        task_id = run_on(loop, main)
        results = read_results(up.address, [task_id])

    assert elapsed
    assert elapsed[0] < 1.5
    assert "did not finish stop()" in caplog.text
    assert "not handed over" not in caplog.text  # the loop's own stop hands it over
    assert results[task_id].result == 7


def test_stop_after_the_asyncio_loop_was_closed_hands_over_and_leaves_no_pending_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``run_until_complete``, ``loop.close()``, then ``stop()``: the ids still run, and
    asyncio does not complain of a task destroyed while pending."""
    with control_plane("embedded") as up:
        up.start_now()
        client = Client(up.address)
        loop = asyncio.new_event_loop()

        async def main() -> list[str]:
            await client.start()
            return [await client.delay("add", i, 5) for i in range(10)]

        try:
            ids = loop.run_until_complete(main())
        finally:
            loop.close()
        client.stop()
        gc.collect()  # the client's task on the closed loop is collected here
        results = read_results(up.address, ids)

    assert [results[i].result for i in ids] == [i + 5 for i in range(10)]
    assert "destroyed but it is pending" not in caplog.text


_ABANDONED_LOOP = """
import asyncio, json, sys
from fastworker import Client

client = Client(sys.argv[1])

async def main():
    await client.start()
    return [await client.delay("add", i, 7) for i in range(10)]

# Neither asyncio.run (which ends the client) nor stop() nor loop.close():
print(json.dumps(asyncio.new_event_loop().run_until_complete(main())), flush=True)
"""


def test_a_program_that_exits_without_stopping_its_client_hands_over_at_exit() -> None:
    with control_plane("embedded") as up:
        up.start_now()
        done = subprocess.run(
            [sys.executable, "-c", _ABANDONED_LOOP, up.address],
            capture_output=True,
            text=True,
            timeout=40,
            env=node_env(),
            cwd=REPO_ROOT,
        )
        assert done.returncode == 0, done.stderr
        ids = json.loads(done.stdout)
        results = read_results(up.address, ids)

    assert [results[i].result for i in ids] == [i + 7 for i in range(10)]
    assert "exiting without client.stop(); handing over" in done.stderr


def test_constructor_settings_the_client_could_not_work_with_are_refused() -> None:
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"result_cache_size": -1}, ValueError, "result_cache_size must be at least 1"),
        ({"result_cache_size": 0}, ValueError, "result_cache_size must be at least 1"),
        ({"ack_timeout": 0}, ValueError, "ack_timeout must be > 0"),
        ({"ack_timeout": math.nan}, ValueError, "ack_timeout must be > 0"),
        ({"retries": 2.5}, TypeError, "retries must be an integer"),
        ({"max_message_size": 0}, ValueError, "max_message_size must be at least 4096"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds"),
        ({"discovery_address": "tcp://127.0.0.1"}, ValueError, "tcp://HOST:PORT"),
    ]
    for options, error, message in bad:
        with pytest.raises(error, match=message):
            Client(**options)
