"""Every code example of the Client usage guide (shared/spec/client-usage.md), run as written.

The guide's examples are asyncio code, so each test here is a plain function
that runs them with ``asyncio.run`` against a thread-backed embedded cluster
(``fastworker.testing.cluster``) on a random loopback port, with
``FASTWORKER_DISCOVERY_ADDRESS`` pointing at it so the guide's bare
``Client()`` finds it.  The snippets are copied into the ``example_*``
coroutines below line for line; only the names the guide leaves to the
reader (``arg1``, ``value``, ``data_arg`` …) are parameters.

Departures from the text, each unavoidable:

* ``delay_with_callback``: the guide passes ``callback_address=`` by keyword
  and then a positional argument, which is a SyntaxError; we run both valid
  spellings: the keyword after the task's arguments
  (``delay_with_callback("process_data", data_arg, callback_address=address, ...)``)
  and the address as second positional argument.
* The FastAPI example is served by a real uvicorn in ``test_fastapi.py``.

Nothing sleeps to wait for a result: tests wait with ``join``,
``submit_task`` or a bounded socket poll.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import zmq

from fastworker import (
    Client,
    ClientNotStartedError,
    SerializationFormat,
    TaskPriority,
    TaskResult,
    TaskStatus,
)
from fastworker.security import generate_certificate, load_secret_key
from fastworker.testing import ClusterThread, cluster

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")

ENV_VARS = (
    "FASTWORKER_DISCOVERY_ADDRESS",
    "FASTWORKER_SERIALIZATION_FORMAT",
    "FASTWORKER_TIMEOUT",
    "FASTWORKER_RETRIES",
    "FASTWORKER_CURVE_SECRET_KEY",
    "FASTWORKER_CURVE_SERVER_KEY",
)
CALLBACK_KEYS = {
    "task_id",
    "status",
    "result",
    "error",
    "started_at",
    "completed_at",
    "callback_data",
}


# -- the tasks the guide's examples call --------------------------------------


def task_name(arg1: Any, arg2: Any, keyword_arg: Any = None) -> dict[str, Any]:
    """The guide's ``task_name``; ``keyword_arg="explode"`` makes it fail."""
    if keyword_arg == "explode":
        raise ValueError(f"task_name was asked to fail ({arg1}, {arg2})")
    return {"args": [arg1, arg2], "keyword_arg": keyword_arg}


def my_task() -> str:
    return "my_task done"


def _failing_tasks() -> list[Callable[..., Any]]:
    def my_task() -> str:  # the same name, for a cluster where it always fails
        raise RuntimeError("my_task failed on purpose")

    return [my_task]


# -- fixtures and helpers -----------------------------------------------------


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Client reads these; a developer's shell must not change what a test sees."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


SpecCluster = tuple[ClusterThread, dict[str, str]]


@pytest.fixture(scope="module", params=["plain", "curve"])
def spec_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SpecCluster]:
    """The guide's cluster, once as is and once with CURVE on every socket.

    With CURVE the guide's code is unchanged: the client's keys come from
    FASTWORKER_CURVE_SECRET_KEY and FASTWORKER_CURVE_SERVER_KEY.
    """
    options: dict[str, Any] = {}
    env: dict[str, str] = {}
    if request.param == "curve":
        keys = tmp_path_factory.mktemp("keys")
        generate_certificate("server", keys / "server")
        public, _ = generate_certificate("client", keys / "client")
        (keys / "clients").mkdir()
        public.rename(keys / "clients" / public.name)  # a secret there is refused
        options = {
            "curve": load_secret_key(keys / "server" / "server.key_secret"),
            "client_keys_dir": keys / "clients",
        }
        env = {
            "FASTWORKER_CURVE_SECRET_KEY": str(keys / "client" / "client.key_secret"),
            "FASTWORKER_CURVE_SERVER_KEY": str(keys / "server" / "server.key"),
        }
    with cluster(
        task_modules=["examples.tasks"], tasks=[task_name, my_task], workers=2, **options
    ) as c:
        yield c, env


@pytest.fixture
def discovery(spec_cluster: SpecCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cluster's address, also in FASTWORKER_DISCOVERY_ADDRESS for the guide's ``Client()``."""
    thread, env = spec_cluster
    monkeypatch.setenv("FASTWORKER_DISCOVERY_ADDRESS", thread.discovery_address)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return thread.discovery_address


def run(main: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """``asyncio.run(main())``, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main()

    return asyncio.run(bounded())


@asynccontextmanager
async def started(client: Client | None = None) -> AsyncIterator[Client]:
    """The guide's start/stop pair around a block, stop guaranteed."""
    client = client or Client()
    await client.start()
    try:
        yield client
    finally:
        client.stop()


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastworker-client"]


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


# -- Creating a Client --------------------------------------------------------


def test_constructor_defaults_match_the_table() -> None:
    client = Client()

    assert client.discovery_address == "tcp://127.0.0.1:5550"
    assert client.serialization_format is SerializationFormat.JSON
    assert client.timeout == 30
    assert client.retries == 3


def test_constructor_parameters_example() -> None:
    client = Client(discovery_address="tcp://10.0.0.1:5550", timeout=60, retries=5)

    assert client.discovery_address == "tcp://10.0.0.1:5550"
    assert client.timeout == 60
    assert client.retries == 5
    assert client.serialization_format is SerializationFormat.JSON


def test_environment_fills_unpassed_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWORKER_DISCOVERY_ADDRESS", "tcp://10.1.2.3:7000")
    monkeypatch.setenv("FASTWORKER_SERIALIZATION_FORMAT", "cbor")
    monkeypatch.setenv("FASTWORKER_TIMEOUT", "45")
    monkeypatch.setenv("FASTWORKER_RETRIES", "7")

    from_env = Client()
    assert from_env.discovery_address == "tcp://10.1.2.3:7000"
    assert from_env.serialization_format is SerializationFormat.CBOR
    assert from_env.timeout == 45
    assert from_env.retries == 7

    explicit = Client(
        discovery_address="tcp://127.0.0.1:9",
        serialization_format=SerializationFormat.JSON,
        timeout=5,
        retries=0,
    )
    assert explicit.discovery_address == "tcp://127.0.0.1:9"
    assert explicit.serialization_format is SerializationFormat.JSON
    assert explicit.timeout == 5
    assert explicit.retries == 0


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("FASTWORKER_TIMEOUT", "soon", "FASTWORKER_TIMEOUT='soon' is not a valid float"),
        ("FASTWORKER_RETRIES", "2.5", "FASTWORKER_RETRIES='2.5' is not a valid int"),
        ("FASTWORKER_TIMEOUT", "0", "timeout must be > 0"),
        ("FASTWORKER_RETRIES", "-1", "retries must be at least 0"),
        ("FASTWORKER_SERIALIZATION_FORMAT", "xml", "unknown serialization format 'xml'"),
    ],
)
def test_invalid_environment_values_are_rejected_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str, message: str
) -> None:
    monkeypatch.setenv(name, raw)
    with pytest.raises(ValueError, match=message):
        Client()


# -- Starting and Stopping ----------------------------------------------------


def test_starting_and_stopping_example_as_written(discovery: str) -> None:
    async def main():  # type: ignore[no-untyped-def]
        client = Client()

        # Start the client
        await client.start()

        # Use the client...

        # Stop the client
        client.stop()

    asyncio.run(main())

    assert client_threads() == []


def test_starting_and_stopping_example_with_a_use(discovery: str) -> None:
    async def main() -> TaskResult:
        client = Client()
        await client.start()
        result = await client.submit_task("my_task")
        client.stop()
        return result

    result = run(main)

    assert result.status is TaskStatus.SUCCESS
    assert result.result == "my_task done"
    assert client_threads() == []


# -- Submitting Tasks ---------------------------------------------------------


async def example_non_blocking(client: Client, arg1: Any, arg2: Any) -> str:
    # Returns task ID immediately
    task_id = await client.delay("task_name", arg1, arg2, priority="high")
    print(f"Task ID: {task_id}")

    # Check result later
    result = await client.get_task_result(task_id)
    if result:
        print(f"Result: {result.result}")
    return task_id


def test_non_blocking_example(discovery: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> tuple[str, TaskResult | None]:
        async with started() as client:
            task_id = await example_non_blocking(client, 1, "two")
            await client.join(timeout=10)
            return task_id, await client.get_task_result(task_id)

    task_id, later = run(main)

    assert isinstance(task_id, str)
    assert task_id
    out = lines(capsys)
    assert out[0] == f"Task ID: {task_id}"
    # The first look may come before the task finished (None, nothing printed).
    assert out[1:] in ([], ["Result: {'args': [1, 'two'], 'keyword_arg': None}"])
    assert later is not None
    assert later.status is TaskStatus.SUCCESS
    assert later.result == {"args": [1, "two"], "keyword_arg": None}


async def example_blocking(client: Client, arg1: Any, arg2: Any, value: Any) -> TaskResult:
    result = await client.submit_task(
        task_name="task_name",
        args=(arg1, arg2),
        kwargs={"keyword_arg": value},
        priority=TaskPriority.HIGH,
    )

    if result.status == TaskStatus.SUCCESS:
        print(f"Result: {result.result}")
    else:
        print(f"Error: {result.error}")
    return result


def test_blocking_example_success(discovery: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> TaskResult:
        async with started() as client:
            return await example_blocking(client, 3, 4, "kw")

    result = run(main)

    assert result.status is TaskStatus.SUCCESS
    assert result.result == {"args": [3, 4], "keyword_arg": "kw"}
    assert result.error is None
    assert result.task_name == "task_name"
    assert result.started_at is not None
    assert result.completed_at is not None
    assert result.started_at <= result.completed_at
    assert lines(capsys) == ["Result: {'args': [3, 4], 'keyword_arg': 'kw'}"]


def test_blocking_example_failure(discovery: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> TaskResult:
        async with started() as client:
            return await example_blocking(client, 3, 4, "explode")

    result = run(main)

    assert result.status is TaskStatus.FAILURE
    assert result.result is None
    assert result.error == "ValueError: task_name was asked to fail (3, 4)"
    assert lines(capsys) == ["Error: ValueError: task_name was asked to fail (3, 4)"]


# -- Querying Results ---------------------------------------------------------


async def example_from_control_plane(client: Client, task_id: str) -> TaskResult | None:
    result = await client.get_task_result(task_id)

    if result:
        print(f"Status: {result.status}")
        print(f"Result: {result.result}")
    else:
        print("Result not found or expired")
    return result


def test_query_from_control_plane_example(
    discovery: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second client, which did not submit the task, reads it from the control plane."""

    async def main() -> TaskResult | None:
        async with started() as submitter, started() as reader:
            task_id = await submitter.delay("add", 20, 22)
            await submitter.join(timeout=10)
            assert reader.get_result(task_id) is None  # not in the reader's local cache
            return await example_from_control_plane(reader, task_id)

    result = run(main)

    assert result is not None
    assert result.status is TaskStatus.SUCCESS
    assert result.result == 42
    assert lines(capsys) == ["Status: success", "Result: 42"]


def test_query_from_control_plane_example_unknown_id(
    discovery: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> TaskResult | None:
        async with started() as client:
            return await example_from_control_plane(client, "no-such-task")

    assert run(main) is None
    assert lines(capsys) == ["Result not found or expired"]


def test_query_from_local_cache_example(discovery: str) -> None:
    """get_result/get_status read the client's own cache: no I/O, no polling."""

    async def main() -> None:
        async with started() as client:
            task_id = await client.delay("add", 1, 1)
            status = client.get_status(task_id)
            assert status in (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.SUCCESS)
            if status is not TaskStatus.SUCCESS:
                assert client.get_result(task_id) is None

            await client.join(timeout=10)

            result = client.get_result(task_id)
            status = client.get_status(task_id)
            assert status is TaskStatus.SUCCESS
            assert result is not None
            assert result.status is TaskStatus.SUCCESS
            assert result.result == 2
            assert client.get_result("never-submitted") is None
            assert client.get_status("never-submitted") is None

    run(main)


# -- Task Priority ------------------------------------------------------------


async def example_priorities(client: Client) -> list[str]:
    from fastworker.tasks.models import TaskPriority

    ids = []
    # Using enum
    task_id = await client.delay("my_task", priority=TaskPriority.CRITICAL)
    ids.append(task_id)
    task_id = await client.delay("my_task", priority=TaskPriority.HIGH)
    ids.append(task_id)
    task_id = await client.delay("my_task", priority=TaskPriority.NORMAL)
    ids.append(task_id)
    task_id = await client.delay("my_task", priority=TaskPriority.LOW)
    ids.append(task_id)

    # Using string
    task_id = await client.delay("my_task", priority="high")
    ids.append(task_id)
    return ids


def test_priority_example_every_priority_runs(discovery: str) -> None:
    async def main() -> list[TaskResult | None]:
        async with started() as client:
            ids = await example_priorities(client)
            for name in ("critical", "normal", "low", "HIGH"):
                ids.append(await client.delay("my_task", priority=name))
            assert len(set(ids)) == len(ids) == 9
            await client.join(timeout=10)
            return [client.get_result(task_id) for task_id in ids]

    results = run(main)

    assert [r.status if r else None for r in results] == [TaskStatus.SUCCESS] * 9
    assert {r.result for r in results if r} == {"my_task done"}


def test_unknown_priority_is_a_value_error_and_nothing_is_sent(discovery: str) -> None:
    async def main() -> None:
        async with started() as client:
            with pytest.raises(ValueError, match="unknown priority 'urgent'") as caught:
                await client.delay("my_task", priority="urgent")
            for valid in ("'critical'", "'high'", "'normal'", "'low'"):
                assert valid in str(caught.value)
            with pytest.raises(ValueError, match="unknown priority"):
                await client.submit_task("my_task", priority="urgent")
            assert client.pending_count == 0

    run(main)


# -- Task Callbacks -----------------------------------------------------------


async def example_callback(client: Client, callback_address: str, data_arg: Any) -> str:
    # Submit with callback (the guide's call, with the address passed positionally)
    task_id = await client.delay_with_callback(
        "process_data",
        callback_address,
        data_arg,
        callback_data={"source": "my_app", "user_id": 123},
    )
    return task_id


async def example_callback_by_keyword(client: Client, callback_address: str, data_arg: Any) -> str:
    # Submit with callback (the guide's call, made valid Python the obvious way)
    task_id = await client.delay_with_callback(
        "process_data",
        data_arg,
        callback_address=callback_address,
        callback_data={"source": "my_app", "user_id": 123},
    )
    return task_id


@pytest.fixture
def pull_socket() -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A PULL socket bound on a random loopback port: where callbacks are delivered."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield sock, f"tcp://127.0.0.1:{port}"
    finally:
        sock.close()
        context.term()


def receive_json(sock: zmq.Socket[bytes], timeout: float = 10.0) -> Any:
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"no callback arrived within {timeout:g} s")
    return json.loads(sock.recv())


def assert_iso_timestamp(text: Any) -> dt.datetime:
    assert isinstance(text, str)
    stamp = dt.datetime.fromisoformat(text)
    assert stamp.tzinfo is not None
    return stamp


@pytest.mark.parametrize("example", [example_callback, example_callback_by_keyword])
def test_callback_example_delivers_the_documented_document(
    discovery: str,
    pull_socket: tuple[zmq.Socket[bytes], str],
    example: Callable[[Client, str, Any], Awaitable[str]],
) -> None:
    sock, address = pull_socket

    async def main() -> str:
        async with started() as client:
            task_id = await example(client, address, {"a": 1, "b": [2, 3]})
            await client.join(timeout=10)
            return task_id

    task_id = run(main)
    payload = receive_json(sock)

    assert set(payload) == CALLBACK_KEYS
    assert payload["task_id"] == task_id
    assert payload["status"] == "success"
    assert payload["result"] == {"keys": 2, "data": {"a": 1, "b": [2, 3]}}
    assert payload["error"] is None
    assert payload["callback_data"] == {"source": "my_app", "user_id": 123}
    started_at = assert_iso_timestamp(payload["started_at"])
    completed_at = assert_iso_timestamp(payload["completed_at"])
    assert started_at <= completed_at


def test_callback_on_failure_carries_the_error(
    discovery: str, pull_socket: tuple[zmq.Socket[bytes], str]
) -> None:
    sock, address = pull_socket

    async def main() -> str:
        async with started() as client:
            task_id = await client.delay_with_callback(
                "task_name", address, 5, 6, keyword_arg="explode", callback_data=["echo", 1]
            )
            await client.join(timeout=10)
            return task_id

    task_id = run(main)
    payload = receive_json(sock)

    assert set(payload) == CALLBACK_KEYS
    assert payload["task_id"] == task_id
    assert payload["status"] == "failure"
    assert payload["result"] is None
    assert payload["error"] == "ValueError: task_name was asked to fail (5, 6)"
    assert payload["callback_data"] == ["echo", 1]
    assert_iso_timestamp(payload["completed_at"])


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost:6000", "must look like 'tcp://HOST:PORT'"),
        ("udp://127.0.0.1:6000", "must look like 'tcp://HOST:PORT'"),
        ("tcp://127.0.0.1", "needs a port from 1 to 65535"),
        ("tcp://*:6000", "is not a host name or IP address"),
    ],
)
def test_callback_address_must_name_one_peer(discovery: str, address: str, message: str) -> None:
    """The control plane's own rule (scheme, host, port), at the call, before anything is queued."""

    async def main() -> None:
        async with started() as client:
            with pytest.raises(ValueError, match=re.escape(message)):
                await client.delay_with_callback("process_data", address, {})
            with pytest.raises(ValueError, match=re.escape(message)):
                await client.apply_async("process_data", ({},), callback_address=address)
            assert client.pending_count == 0

    run(main)


# -- Error Handling -----------------------------------------------------------


async def example_error_handling(client: Client, *, wait: bool = False) -> None:
    try:
        task_id = await client.delay("my_task")
        if wait:  # not in the guide: makes the outcome deterministic
            await client.join(timeout=10)
        result = await client.get_task_result(task_id)

        if result and result.status == TaskStatus.FAILURE:
            print(f"Task failed: {result.error}")
        elif result:
            print(f"Task succeeded: {result.result}")
        else:
            print("Task result not available")

    except Exception as e:
        print(f"Client error: {e}")


def test_error_handling_example_as_written(
    discovery: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        async with started() as client:
            await example_error_handling(client)

    run(main)

    assert lines(capsys) in (["Task result not available"], ["Task succeeded: my_task done"])


def test_error_handling_example_success(discovery: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        async with started() as client:
            await example_error_handling(client, wait=True)

    run(main)

    assert lines(capsys) == ["Task succeeded: my_task done"]


def test_error_handling_example_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        async with started() as client:
            await example_error_handling(client, wait=True)

    with cluster(tasks=_failing_tasks()) as failing:
        monkeypatch.setenv("FASTWORKER_DISCOVERY_ADDRESS", failing.discovery_address)
        run(main)

    assert lines(capsys) == ["Task failed: RuntimeError: my_task failed on purpose"]


def test_error_handling_example_client_error(capsys: pytest.CaptureFixture[str]) -> None:
    """The ``except`` branch: the client was never started."""

    async def main() -> None:
        client = Client()
        await example_error_handling(client)

    run(main)

    assert lines(capsys) == ["Client error: call `await client.start()` before using the client"]
    assert issubclass(ClientNotStartedError, RuntimeError)


# -- Result Caching -----------------------------------------------------------


def test_result_cache_defaults(discovery: str) -> None:
    async def main() -> dict[str, Any]:
        async with started() as client:
            return await client.stats()

    stats = run(main)

    assert stats["result-cache"]["ttl"] == 3600
    assert stats["result-cache"]["max_size"] == 10_000


def test_result_cache_evicts_the_least_recently_accessed(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for two results, reading one keeps it; the unread one goes first."""

    async def main() -> tuple[dict[str, TaskResult | None], dict[str, Any]]:
        async with started() as submitter, started() as reader:
            first = await submitter.delay("add", 1, 0)
            second = await submitter.delay("add", 2, 0)
            await submitter.join(timeout=10)
            assert await reader.get_task_result(first) is not None  # an access
            third = await submitter.delay("add", 3, 0)
            await submitter.join(timeout=10)
            seen = {
                "first": await reader.get_task_result(first),
                "second": await reader.get_task_result(second),
                "third": await reader.get_task_result(third),
            }
            return seen, await reader.stats()

    with cluster(task_modules=["examples.tasks"], result_cache_size=2) as small:
        monkeypatch.setenv("FASTWORKER_DISCOVERY_ADDRESS", small.discovery_address)
        seen, stats = run(main)

    assert seen["second"] is None
    assert seen["first"] is not None
    assert seen["first"].result == 1
    assert seen["third"] is not None
    assert seen["third"].result == 3
    assert stats["result-cache"]["max_size"] == 2
    assert stats["result-cache"]["evicted"] == 1


def test_callback_call_without_an_address_says_where_it_goes(discovery: str) -> None:
    """Without ``callback_address=``, the second positional argument must be the address."""

    async def main() -> None:
        async with started() as client:
            with pytest.raises(TypeError, match="second positional argument"):
                await client.delay_with_callback("process_data", {"a": 1})
            with pytest.raises(ValueError, match="second positional argument"):
                await client.delay_with_callback("process_data", "data", callback_data=1)
            with pytest.raises(TypeError, match="needs a callback address"):
                await client.delay_with_callback("process_data")
            assert client.pending_count == 0

    run(main)
