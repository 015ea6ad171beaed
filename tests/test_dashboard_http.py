"""--http-address: /metrics checked with prometheus_client's own parser, the JSON API,
the bind rule, and the HTTP side failing without the control plane noticing."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
import trio

pytest.importorskip("prometheus_client", reason="needs fastworker[dashboard]")
pytest.importorskip("hypercorn", reason="needs fastworker[dashboard]")

import zmq
from prometheus_client.parser import text_string_to_metric_families

from fastworker import (
    CallbackReceiver,
    Client,
    Cluster,
    CurveKeys,
    QueueFullError,
    TaskStatus,
    task,
)
from fastworker.control import ControlPlaneConfig
from fastworker.dashboard import (
    HttpStartError,
    _server,
    _view,
    check_http_address,
)
from fastworker.node._cli import main as node_main
from fastworker.runtime import GetStatistics
from fastworker.wire import ResultRecord
from fastworker.worker import Worker, WorkerConfig


@task
def dash_add(a: int, b: int) -> int:
    return a + b


@task
def dash_boom(x: int) -> None:
    raise ValueError(f"boom {x}")


@task(max_retries=1, retry_delay=0)
def dash_flaky() -> None:
    raise RuntimeError("flaky always fails")


HOLD = threading.Event()


@task
def dash_hold() -> str:
    """Runs until the test lets it go, so that a worker is seen holding it."""
    HOLD.wait(20)
    return "held"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by (name, labels), parsed by prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(scrape: dict[Any, float], name: str, **labels: str) -> float:
    return scrape[(name, frozenset(labels.items()))]


def with_label(scrape: dict[Any, float], name: str, key: str) -> Iterator[tuple[str, float]]:
    for (sample, labels), number in scrape.items():
        if sample == name:
            yield dict(labels)[key], number


@pytest.mark.timeout(30)
async def test_metrics_and_api_report_what_ran() -> None:
    async with (
        Cluster(
            tasks=[dash_add, dash_boom, dash_flaky], http_address="127.0.0.1:0", max_queued=3
        ) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
        httpx.AsyncClient(base_url=cluster.control_plane.http_url, timeout=10) as http,
    ):
        worker_id = cluster.workers[0].worker_id
        for i in range(5):
            assert (await client.submit_task(task_name="dash_add", args=(i, i))).result == 2 * i
        failed = [await client.submit_task(task_name="dash_boom", args=(i,)) for i in range(2)]
        assert (await client.submit_task(task_name="dash_flaky")).status == TaskStatus.FAILURE
        later = [await client.delay("dash_add", 1, 1, countdown=60) for _ in range(3)]
        with pytest.raises(QueueFullError):
            await client.submit_task(task_name="dash_add", args=(0, 0), countdown=60)

        # A held task is found where it is; cancelling needs the header, then works.
        found = (await http.get(f"/api/tasks/{later[0]}")).json()
        assert (found["status"], found["name"], found["priority"]) == (
            "scheduled",
            "dash_add",
            "normal",
        )
        refused = await http.post(f"/api/tasks/{later[0]}/cancel")
        assert refused.status_code == 403
        cancel = await http.post(
            f"/api/tasks/{later[0]}/cancel", headers={"X-Fastworker": "cancel"}
        )
        assert cancel.json() == {"task_id": later[0], "cancelled": True, "status": "cancelled"}
        assert await client.cancel_task(later[1])
        assert await client.cancel_task(later[2])
        again = await http.post(f"/api/tasks/{later[0]}/cancel", headers={"X-Fastworker": "cancel"})
        assert again.json()["cancelled"] is False
        # Finished tasks come from the result cache, with their traceback.
        looked = (await http.get(f"/api/tasks/{failed[0].task_id}")).json()
        assert looked["status"] == "failure"
        assert "ValueError: boom 0" in looked["traceback"]
        assert (await http.get(f"/api/tasks/{later[0]}")).json()["status"] == "cancelled"
        assert (await http.get("/api/tasks/no-such-task")).status_code == 404
        rebound = await http.get("/api/overview", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400  # a name re-pointed at 127.0.0.1 gets nothing
        failures = (await http.get("/api/failures")).json()
        assert [f["name"] for f in failures] == ["dash_boom", "dash_boom", "dash_flaky"]
        assert "RuntimeError: flaky always fails" in failures[2]["traceback"]

        scrape = samples((await http.get("/metrics")).text)
        workers = (await http.get("/api/workers")).json()
        queues = (await http.get("/api/queues")).json()
        await client.flush()

    expected = {
        ("dash_add", "accepted"): 8,
        ("dash_add", "succeeded"): 5,
        ("dash_add", "cancelled"): 3,
        ("dash_add", "failed"): 0,
        ("dash_boom", "accepted"): 2,
        ("dash_boom", "failed"): 2,
        ("dash_flaky", "accepted"): 1,
        ("dash_flaky", "retried"): 1,
        ("dash_flaky", "failed"): 1,
        ("dash_flaky", "succeeded"): 0,
    }
    for (name, event), count in expected.items():
        assert value(scrape, f"fastworker_tasks_{event}_total", task=name) == count, (name, event)
    assert (
        value(scrape, "fastworker_tasks_rejected_total", task="dash_add", reason="queue_full") == 1
    )
    assert (
        value(scrape, "fastworker_messages_rejected_total", actor="scheduler", reason="queue_full")
        == 1
    )
    # Round trips: every final result; run times: every result a worker ran to the end.
    assert value(scrape, "fastworker_task_round_trip_seconds_count", task="dash_add") == 8
    assert value(scrape, "fastworker_task_run_seconds_count", task="dash_add") == 5
    assert value(scrape, "fastworker_task_run_seconds_bucket", task="dash_add", le="+Inf") == 5
    assert value(scrape, "fastworker_task_round_trip_seconds_sum", task="dash_boom") > 0
    for priority in ("critical", "high", "normal", "low"):
        assert value(scrape, "fastworker_queue_depth", priority=priority) == 0
        assert value(scrape, "fastworker_queue_oldest_age_seconds", priority=priority) == 0
    assert dict(with_label(scrape, "fastworker_worker_inflight", "worker")) == {worker_id: 0}
    assert dict(with_label(scrape, "fastworker_worker_up", "worker")) == {worker_id: 1}
    assert 0 <= value(scrape, "fastworker_worker_heartbeat_age_seconds", worker=worker_id) < 3
    assert value(scrape, "fastworker_result_cache_size") == 5 + 2 + 1 + 3
    assert value(scrape, "fastworker_result_cache_evicted_total") == 0
    assert value(scrape, "fastworker_callbacks_sent_total") == 0
    assert [w["id"] for w in workers] == [worker_id]
    assert workers[0]["running"] == 0
    assert [(q["priority"], q["depth"]) for q in queues] == [
        ("critical", 0),
        ("high", 0),
        ("normal", 0),
        ("low", 0),
    ]


@pytest.mark.timeout(40)
async def test_metrics_count_callbacks_evictions_lost_workers_and_held_tasks(
    poll_until: Any,
) -> None:
    """The metrics the first test sees only at zero, each moved by what it counts."""
    HOLD.clear()
    async with (
        Cluster(
            tasks=[dash_add, dash_hold],
            http_address="127.0.0.1:0",
            result_cache_size=2,
            heartbeat_interval=0.1,
            callback_timeout=1,
        ) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
        httpx.AsyncClient(base_url=cluster.control_plane.http_url, timeout=10) as http,
        trio.open_nursery() as nursery,
    ):
        worker_id = cluster.workers[0].worker_id

        async def scrape() -> dict[Any, float]:
            return samples((await http.get("/metrics")).text)

        # A task held at the worker: in flight there, and on the dashboard's worker row.
        held = await client.delay("dash_hold")
        workers = await poll_until(
            lambda: http.get("/api/workers"), lambda r: r.json()[0]["running"] == 1, timeout=10
        )
        assert workers.json()[0]["id"] == worker_id
        assert dict(with_label(await scrape(), "fastworker_worker_inflight", "worker")) == {
            worker_id: 1
        }
        HOLD.set()
        # Four results through a cache of two: two evicted.
        for i in range(3):
            assert (await client.submit_task(task_name="dash_add", args=(i, 1))).result == i + 1
        assert client.get_result(held).result == "held"  # type: ignore[union-attr]
        # One callback acknowledged by its receiver, one to nobody: dropped at the timeout.
        unacknowledged = frozenset({("reason", "unacknowledged")})
        with CallbackReceiver("ack+tcp://127.0.0.1:*") as receiver:
            await client.delay_with_callback("dash_add", receiver.address, 1, 1)
            await receiver.receive()
            await client.delay_with_callback("dash_add", "ack+tcp://127.0.0.1:9", 2, 2)
            await poll_until(
                scrape,
                lambda m: (
                    m.get(("fastworker_callbacks_dropped_total", unacknowledged)) == 1
                    and m.get(("fastworker_callbacks_acknowledged_total", frozenset())) == 1
                ),
                timeout=10,
            )
        # A frame Discovery cannot decode, counted by its reason.
        with zmq.Context.instance().socket(zmq.DEALER) as raw:
            raw.setsockopt(zmq.LINGER, 0)
            raw.connect(cluster.discovery_address)
            raw.send(b"\xff\x00 not CBOR")
            await poll_until(
                scrape,
                lambda m: (("fastworker_messages_rejected_total",
                    frozenset({("actor", "discovery"), ("reason", "malformed")}))) in m,
                timeout=10,
            )  # fmt: skip
        # A second worker that falls silent (no goodbye) is declared dead.
        extra = Worker(cluster.registry, WorkerConfig(
            discovery_address=cluster.discovery_address, heartbeat_interval=0.1))  # fmt: skip
        silent = trio.CancelScope()

        async def serve_until_silenced() -> None:
            with silent:
                await extra.serve()

        nursery.start_soon(serve_until_silenced)
        await poll_until(
            scrape,
            lambda m: len(list(with_label(m, "fastworker_worker_up", "worker"))) == 2,
            timeout=10,
        )
        silent.cancel()
        final = await poll_until(
            scrape, lambda m: m.get(("fastworker_workers_lost_total", frozenset())) == 1, timeout=10
        )
        overview = (await http.get("/api/stats")).json()
        assert (await http.get("/api/tasks/" + "x" * 1025)).status_code == 400

    assert value(final, "fastworker_result_cache_size") == 2
    assert value(final, "fastworker_result_cache_evicted_total") == 4  # 6 results, room for 2
    assert value(final, "fastworker_callbacks_acknowledged_total") == 1
    assert value(final, "fastworker_callbacks_dropped_total", reason="unacknowledged") == 1
    assert (
        value(final, "fastworker_messages_rejected_total", actor="discovery", reason="malformed")
        == 1
    )
    assert dict(with_label(final, "fastworker_worker_up", "worker")) == {worker_id: 1}
    assert overview["discovery"]["workers_lost"] == 1
    assert overview["callbacks"]["acknowledged"] == 1


@pytest.mark.timeout(20)
async def test_queue_depth_and_oldest_age_while_tasks_wait() -> None:
    async with (
        Cluster(tasks=[dash_add], workers=0, http_address="127.0.0.1:0") as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
        httpx.AsyncClient(base_url=cluster.control_plane.http_url, timeout=10) as http,
    ):
        for _ in range(3):
            await client.delay("dash_add", 1, 2, priority="high")
        await client.flush()
        queues = {q["priority"]: q for q in (await http.get("/api/queues")).json()}
        scrape = samples((await http.get("/metrics")).text)
    assert queues["high"]["depth"] == 3
    assert queues["high"]["oldest_age"] >= 0
    assert queues["normal"]["depth"] == 0
    assert queues["normal"]["oldest_age"] is None
    assert value(scrape, "fastworker_queue_depth", priority="high") == 3
    assert value(scrape, "fastworker_queue_oldest_age_seconds", priority="high") > 0
    assert value(scrape, "fastworker_tasks_accepted_total", task="dash_add") == 3


def test_http_address_binds_loopback_unless_insecure(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_http_address("127.0.0.1:0", insecure=False) == ("127.0.0.1", 0)
    assert check_http_address("[::1]:9000", insecure=False) == ("::1", 9000)
    assert check_http_address("localhost:80", insecure=False) == ("localhost", 80)
    assert check_http_address("0.0.0.0:9000", insecure=True) == ("0.0.0.0", 9000)
    for bad, why in [
        ("0.0.0.0:9000", "--insecure"),
        ("dashboard.example:80", "--insecure"),
        ("127.0.0.1", "HOST:PORT"),
        ("127.0.0.1:http", "not a number"),
        ("127.0.0.1:70000", "between 0 and 65535"),
        ("::1:80", "brackets"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_http_address(bad, insecure=False)
    with pytest.raises(ValueError, match="--insecure"):
        ControlPlaneConfig(http_address="10.1.2.3:9000")
    with pytest.raises(ValueError, match="--insecure"):  # keys do not make it safe: no login
        ControlPlaneConfig(http_address="10.1.2.3:9000", curve=CurveKeys.generate())
    ControlPlaneConfig(http_address="10.1.2.3:9000", insecure=True)
    with pytest.raises(SystemExit) as exit_info:
        node_main(["--role", "control-plane", "--http-address", "0.0.0.0:9000"])
    assert exit_info.value.code == 2
    assert "pass --insecure" in capsys.readouterr().err


@pytest.mark.timeout(20)
async def test_address_in_use_fails_the_start_with_its_reason() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BaseException) as failure:  # noqa: PT011 (a group or itself)
            async with Cluster(tasks=[dash_add], http_address=f"127.0.0.1:{port}"):
                pass
    found = failure.value
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    assert isinstance(found, HttpStartError)
    assert f"127.0.0.1:{port}" in str(found)


@pytest.mark.timeout(30)
async def test_a_failing_http_server_comes_back_and_the_control_plane_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_serve = _server.serve
    crash = trio.Event()
    calls = 0

    async def serve_then_fail(app: Any, config: Any, *, task_status: Any, mode: str) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            await real_serve(app, config, task_status=task_status, mode=mode)
            return
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(functools.partial(real_serve, app, config, mode=mode))
            task_status.started(binds)
            await crash.wait()
            raise RuntimeError("the HTTP side broke")

    monkeypatch.setattr(_server, "serve", serve_then_fail)
    async with (
        Cluster(tasks=[dash_add], http_address="127.0.0.1:0") as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
        httpx.AsyncClient(base_url=cluster.control_plane.http_url, timeout=10) as http,
    ):
        assert (await http.get("/metrics")).status_code == 200
        crash.set()
        # The control plane serves tasks while its HTTP side is down and coming back.
        assert (await client.submit_task(task_name="dash_add", args=(2, 3))).result == 5
        assert cluster.control_plane.http is not None
        with trio.fail_after(10):
            await cluster.control_plane.http.serving(2)
        response = await http.get("/api/overview")
        assert response.json()["totals"]["succeeded"] == 1
        assert calls == 2
        stats = await cluster.control_plane.http.ref.ask(GetStatistics())
        assert stats["restarts"] == 1
        assert (await client.submit_task(task_name="dash_add", args=(4, 4))).result == 8


@pytest.mark.multiprocess
@pytest.mark.timeout(40)
def test_node_serves_http_and_prints_where() -> None:
    from multiprocess import run_node, start_node

    with start_node(
        "--http-address", "127.0.0.1:0", "--workers", "1", "--task-modules", "node_tasks",
        "--discovery-address", "tcp://127.0.0.1:*", "--grace", "1",
        cwd=Path(__file__).parent,
    ) as node:  # fmt: skip
        assert node.http_url is not None
        scrape = samples(httpx.get(node.http_url + "/metrics", timeout=10).text)
        assert ("fastworker_queue_depth", frozenset({("priority", "normal")})) in scrape
    refused = run_node("--role", "worker", "--http-address", "127.0.0.1:0")
    assert refused.returncode == 2
    assert "not with --role worker" in refused.stderr


@pytest.mark.timeout(20)
async def test_requests_beyond_the_limit_wait_then_get_503() -> None:
    from fastworker.dashboard import _view

    async with (
        Cluster(tasks=[dash_add], http_address="127.0.0.1:0") as cluster,
        httpx.AsyncClient(base_url=cluster.control_plane.http_url, timeout=10) as http,
    ):
        assert cluster.control_plane.http is not None
        view = cluster.control_plane.http.view
        view.timeout = 0.2
        for _ in range(_view.MAX_CONCURRENT):  # every slot taken, as by slow requests
            await view._slots.acquire()
        busy = await http.get("/api/overview")
        assert busy.status_code == 503
        assert "requests are being answered" in busy.json()["error"]
        for _ in range(_view.MAX_CONCURRENT):
            view._slots.release()
        assert (await http.get("/api/overview")).status_code == 200


@pytest.mark.timeout(10)
def test_a_result_made_of_shared_references_is_refused_not_expanded_for_display() -> None:
    """402 bytes of nested value sharing would be 2**60 items once written out as JSON:
    a worker posting that result must not hold the control plane's loop (the dashboard
    runs in it) when an operator looks the task up."""
    nested: list[Any] = ["x"]
    for _ in range(60):
        nested = [nested, nested]
    bomb = cbor2.dumps(nested, value_sharing=True)
    record = ResultRecord("t-1", "success", bomb, None, None, None, 1, None, 1, "n", None)

    assert _view._record_dict(record)["result"] == "(cannot decode: CBORDecodeError)"
