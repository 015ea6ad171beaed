"""The documented FastAPI integration (examples/fastapi_app.py), served by a real uvicorn.

uvicorn runs in a thread with its own asyncio loop, on a listening socket the
test bound on a random loopback port beforehand: the port is known before the
server starts, and requests made before it is ready wait in the backlog, so
nothing polls for readiness.  Requests are real HTTP (httpx).  The cluster is
a thread-backed embedded one; ``FASTWORKER_DISCOVERY_ADDRESS`` points the
app's ``Client()`` at it, set before the module is imported afresh.

Reading ``GET /result/{task_id}`` until the task is done is the documented
user flow, so that is what the tests do, in a bounded loop.

The last test runs the deployment the example's docstring describes, as
processes: ``python -m fastworker.node --task-modules examples.tasks`` and
``uvicorn examples.fastapi_app:app``.
"""

from __future__ import annotations

import importlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn
from multiprocess import REPO_ROOT, node_env, start_node

from fastworker.testing import ClusterThread, cluster

pytestmark = pytest.mark.timeout(30)

MODULE = "examples.fastapi_app"
NOT_FOUND = {"error": "Result not found"}


@pytest.fixture(scope="module")
def fastapi_cluster() -> Iterator[ClusterThread]:
    with cluster(task_modules=["examples.tasks"], workers=2) as c:
        yield c


@pytest.fixture
def app_module(fastapi_cluster: ClusterThread, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """examples.fastapi_app imported afresh, its ``Client()`` reading the cluster's address."""
    monkeypatch.setenv("FASTWORKER_DISCOVERY_ADDRESS", fastapi_cluster.discovery_address)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    with warnings.catch_warnings():
        # The documented app uses @app.on_event, which FastAPI marks deprecated.
        warnings.filterwarnings(
            "ignore", message=r"\s*on_event is deprecated", category=DeprecationWarning
        )
        module = importlib.import_module(MODULE)
    assert module.client.discovery_address == fastapi_cluster.discovery_address
    return module


@contextmanager
def serve(app: Any) -> Iterator[httpx.Client]:
    """Serve ``app`` with uvicorn in a thread; an httpx client for it; shut down afterwards."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[listener])
        except BaseException as exc:  # SystemExit on a failed startup, too
            failures.append(exc)

    thread = threading.Thread(target=run, name="uvicorn", daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
    assert not thread.is_alive(), "uvicorn did not shut down"
    assert failures == []


def wait_for_result(http: httpx.Client, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """GET /result/{task_id} until it reports a status (the documented flow), bounded."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/result/{task_id}")
        assert response.status_code == 200
        body = response.json()
        if "status" in body:
            return body
        assert body == NOT_FOUND  # not finished yet
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} not done within {timeout:g} s")
        time.sleep(0.02)


def submit(http: httpx.Client, data: dict[str, Any]) -> str:
    response = http.post("/process/", json=data)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"task_id"}
    assert isinstance(body["task_id"], str)
    assert body["task_id"]
    return body["task_id"]


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastworker-client"]


@pytest.mark.parametrize("app_name", ["app", "lifespan_app"])
def test_process_then_result(app_module: ModuleType, app_name: str) -> None:
    with serve(getattr(app_module, app_name)) as http:
        payloads = [{"order": n, "items": ["a"] * n} for n in range(5)]
        ids = [submit(http, data) for data in payloads]
        assert len(set(ids)) == 5
        bodies = [wait_for_result(http, task_id) for task_id in ids]

    assert bodies == [
        {"status": "success", "result": {"keys": 2, "data": data}} for data in payloads
    ]


@pytest.mark.parametrize("app_name", ["app", "lifespan_app"])
def test_unknown_task_id_is_not_found(app_module: ModuleType, app_name: str) -> None:
    with serve(getattr(app_module, app_name)) as http:
        response = http.get("/result/no-such-task")

    assert response.status_code == 200
    assert response.json() == NOT_FOUND


def test_process_rejects_a_body_that_is_not_an_object(app_module: ModuleType) -> None:
    with serve(app_module.app) as http:
        response = http.post("/process/", json=[1, 2])

    assert response.status_code == 422


def test_startup_starts_and_shutdown_stops_the_client(app_module: ModuleType) -> None:
    with serve(app_module.app) as http:
        submit(http, {"x": 1})
        assert repr(app_module.client).endswith("started>")

    assert repr(app_module.client).endswith("stopped>")
    assert client_threads() == []


@pytest.mark.parametrize(
    ("app_name", "client_name"), [("app", "client"), ("lifespan_app", "lifespan_client")]
)
def test_two_sessions_in_one_process(
    app_module: ModuleType, app_name: str, client_name: str
) -> None:
    """Two uvicorn runs of one app: its one Client stops with the first and starts again."""
    app = getattr(app_module, app_name)
    bodies = []
    for run in (1, 2):
        with serve(app) as http:
            task_id = submit(http, {"run": run})
            bodies.append(wait_for_result(http, task_id))
        assert repr(getattr(app_module, client_name)).endswith("stopped>")

    assert bodies == [
        {"status": "success", "result": {"keys": 1, "data": {"run": run}}} for run in (1, 2)
    ]
    assert client_threads() == []


@pytest.mark.parametrize("app_name", ["app", "lifespan_app"])
# Starlette's TestClient asks for an httpx fork this environment does not have; httpx works.
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_two_testclient_sessions_in_one_process(app_module: ModuleType, app_name: str) -> None:
    """FastAPI's TestClient runs each session on a new event loop in a new thread."""
    from fastapi.testclient import TestClient

    app = getattr(app_module, app_name)
    ids = []
    for run in (1, 2):
        with TestClient(app) as http:
            response = http.post("/process/", json={"session": run})
            assert response.status_code == 200
            ids.append(response.json()["task_id"])
        # Shut down: every returned id was handed over; the result is the control plane's.
    with TestClient(app) as http:
        deadline = time.monotonic() + 10
        bodies = {}
        while len(bodies) < 2 and time.monotonic() < deadline:
            for task_id in ids:
                body = http.get(f"/result/{task_id}").json()
                if "status" in body:
                    bodies[task_id] = body
            time.sleep(0.02)

    assert [bodies.get(task_id) for task_id in ids] == [
        {"status": "success", "result": {"keys": 1, "data": {"session": run}}} for run in (1, 2)
    ]
    assert client_threads() == []


# -- as processes ---------------------------------------------------------------

UVICORN_READY = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def read_until(proc: subprocess.Popen[bytes], pattern: re.Pattern[bytes], timeout: float) -> int:
    """Read ``proc``'s stderr until ``pattern`` matches; its first group as an int."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + timeout
    seen = b""
    while True:
        match = pattern.search(seen)
        if match:
            return int(match[1])
        left = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(left, 0))
        chunk = os.read(fd, 4096) if readable else b""
        if not chunk:
            raise AssertionError(f"uvicorn did not report its port; it said:\n{seen.decode()}")
        seen += chunk


@pytest.mark.multiprocess
def test_documented_deployment_node_and_uvicorn_processes() -> None:
    with start_node(
        "--task-modules", "examples.tasks", "--discovery-address", "tcp://127.0.0.1:*"
    ) as node:
        env = node_env(FASTWORKER_DISCOVERY_ADDRESS=node.discovery_address)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                f"{MODULE}:app",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-access-log",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            port = read_until(proc, UVICORN_READY, timeout=20)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                task_id = submit(http, {"deployed": True})
                body = wait_for_result(http, task_id)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(10)
            assert proc.stderr is not None
            said = proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            assert proc.stderr is not None
            proc.stderr.close()

    assert body == {"status": "success", "result": {"keys": 1, "data": {"deployed": True}}}
    # uvicorn shuts down gracefully (running the shutdown hook), then re-raises the signal.
    assert code in (0, -signal.SIGTERM), said
    assert "Application shutdown complete." in said
