"""The ``fastworker`` command against a real node process, as scripts and people use it.

One node serves the module (its start is the slow part); every test runs the
real command in a subprocess and checks what a user sees: the exit code, the
text, and that ``--json`` output parses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from multiprocess import (
    REPO_ROOT,
    CurveFiles,
    Node,
    free_tcp_port,
    node_env,
    run_node,
    start_node,
)

from fastworker.cli import main as cli_main
from fastworker.cli._values import parse_task_arg

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


def fastworker(*args: str, timeout: float = 20.0, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastworker.cli", *args],
        cwd=REPO_ROOT,
        env=node_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with start_node(
        "--discovery-address",
        "tcp://127.0.0.1:*",
        "--task-modules",
        "tests.node_tasks",
        "--workers",
        "1",
        "--grace",
        "1",
    ) as running:
        yield running


def on(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return fastworker(*args, "--discovery-address", node.discovery_address)


def test_submit_wait_prints_the_result_and_exits_0(node: Node) -> None:
    done = on(node, "submit", "add_where", "2", "3", "--wait")
    assert done.returncode == 0, done.stderr
    total, pid = json.loads(done.stdout)
    assert total == 5
    assert pid in node.children()


def test_submit_prints_an_id_that_result_and_json_agree_on(node: Node) -> None:
    done = on(node, "submit", "add_where", "--kwargs", '{"a": 1, "b": 2}', "--wait", "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "success"
    assert record["result"][0] == 3
    assert record["task_name"] == "add_where"
    again = on(node, "result", record["task_id"], "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["result"] == record["result"]
    plain = on(node, "result", record["task_id"])
    assert json.loads(plain.stdout) == record["result"]

    submitted = on(node, "submit", "add_where", "1", "1", "--priority", "HIGH", "--json")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["task_id"]
    bare = on(node, "submit", "add_where", "1", "1")
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.strip().split() == [bare.stdout.strip()]  # just the id


def test_a_failing_task_exits_1_with_its_error(node: Node, tmp_path: Path) -> None:
    failed = on(node, "submit", "always_fail", str(tmp_path), "--wait")
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert "failure: RuntimeError: always fails" in failed.stderr
    assert "Traceback" in failed.stderr  # the worker's, for the user to read

    unknown = on(node, "submit", "no_such_task", "--wait", "--json")
    assert unknown.returncode == 1
    record = json.loads(unknown.stdout)
    assert record["status"] == "failure"
    assert "unknown task 'no_such_task'" in record["error"]
    cached = on(node, "result", record["task_id"])
    assert cached.returncode == 1


def test_cancel_a_scheduled_task_then_again(node: Node) -> None:
    task_id = on(node, "submit", "sleepy", "5", "--countdown", "60").stdout.strip()
    first = on(node, "cancel", task_id)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"cancelled {task_id}"
    second = on(node, "cancel", task_id, "--json")
    assert second.returncode == 4
    assert json.loads(second.stdout) == {"task_id": task_id, "cancelled": False}
    result = on(node, "result", task_id, "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["status"] == "cancelled"


def test_result_of_an_unfinished_task_and_a_wait_that_times_out_exit_4(node: Node) -> None:
    waited = on(
        node, "submit", "sleepy", "5", "--countdown", "60", "--wait", "--wait-timeout", "0.3"
    )
    assert waited.returncode == 4
    assert "no result for task" in waited.stderr
    task_id = waited.stderr.split("no result for task ", 1)[1].split()[0]
    pending = on(node, "result", task_id)
    assert pending.returncode == 4
    assert pending.stdout == ""
    as_json = on(node, "result", task_id, "--json")  # still one JSON document on stdout
    assert as_json.returncode == 4
    assert json.loads(as_json.stdout) == {"task_id": task_id, "found": False}
    assert on(node, "cancel", task_id).returncode == 0


def test_status_and_workers(node: Node) -> None:
    assert on(node, "submit", "add_where", "1", "2", "--wait").returncode == 0
    status = on(node, "status", "--interval", "0.2", "--json")
    assert status.returncode == 0, status.stderr
    doc: dict[str, Any] = json.loads(status.stdout)
    assert doc["discovery_address"] == node.discovery_address
    assert doc["stats"]["discovery"]["workers_alive"] == 1
    assert set(doc["stats"]["scheduler"]["queued"]) == {"critical", "high", "normal", "low"}
    assert doc["stats"]["scheduler"]["succeeded"] >= 1
    assert doc["rates"]["interval"] >= 0.2
    assert doc["rates"]["accepted"] is not None

    table = on(node, "status", "--interval", "0")
    assert table.returncode == 0, table.stderr
    for label in ("workers", "queued", "in flight", "result cache", "callbacks"):
        assert label in table.stdout
    assert "rates" not in table.stdout  # one sample: no rates

    listing = on(node, "workers", "--json")
    assert listing.returncode == 0, listing.stderr
    (worker,) = json.loads(listing.stdout)["workers"]
    assert worker["pid"] in node.children()
    assert "add_where" in worker["tasks"]
    people = on(node, "workers")
    assert people.stdout.splitlines()[0].split() == [
        "WORKER",
        "HOST",
        "PID",
        "CONCURRENCY",
        "TASKS",
    ]
    assert str(worker["pid"]) in people.stdout


UNREACHABLE = [
    ["submit", "add_where", "1", "2"],
    ["submit", "add_where", "1", "2", "--wait"],
    ["result", "some-id"],
    ["cancel", "some-id"],
    ["status", "--json"],
    ["workers"],
]


def test_an_unreachable_control_plane_exits_3_within_the_timeout() -> None:
    address = f"tcp://127.0.0.1:{free_tcp_port()}"
    env = node_env(FASTWORKER_DISCOVERY_ADDRESS=address)
    started = time.monotonic()
    # All at once: each waits out its --timeout, and they need not do it in turn.
    running = [
        subprocess.Popen(
            [sys.executable, "-m", "fastworker.cli", *command, "--timeout", "0.5"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in UNREACHABLE
    ]
    for command, process in zip(UNREACHABLE, running, strict=True):
        with process:
            stdout, stderr = process.communicate(timeout=20)
        assert process.returncode == 3, (command, stderr)
        assert stdout == ""
        assert f"no control plane at {address} answered within 0.5 s" in stderr
        assert "Traceback" not in stderr
    # 0.5 s each plus starting Python, six at once on a busy machine; well under the
    # Client's own 30 s default, which would mean --timeout was not applied.
    assert time.monotonic() - started < 15.0


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["submit"], "the following arguments are required: TASK"),
        (["submit", "t", "--priority", "urgent"], "expected one of critical, high"),
        (["submit", "t", "--kwargs", "[1]"], "expected a JSON object, got list"),
        (["submit", "t", "--kwargs", "{"], "not valid JSON"),
        (["submit", "t", "--countdown", "-1"], "--countdown: must be >= 0"),
        (["submit", "t", "--wait-timeout", "0"], "--wait-timeout: must be positive"),
        (["status", "--timeout", "0"], "--timeout: must be positive"),
        (["status", "--interval", "nan"], "--interval: must be >= 0"),
        (["status", "--discovery-address", "localhost:5550"], "is not a ZeroMQ endpoint"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], mentions: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    (line,) = [line for line in stderr.splitlines() if "error:" in line]
    assert mentions in line


def test_a_bad_environment_value_is_a_usage_error() -> None:
    done = fastworker("status", FASTWORKER_TIMEOUT="soon")
    assert done.returncode == 2
    assert "FASTWORKER_TIMEOUT='soon'" in done.stderr


def test_node_bench_and_keys_are_the_same_commands(tmp_path: Path) -> None:
    for argv in (["--bogus"], ["--workers", "-1", "--discovery-address", "tcp://127.0.0.1:*"]):
        ours = fastworker("node", *argv)
        theirs = run_node(*argv)
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr,
        )
    bench = fastworker("bench", "--help")
    assert bench.returncode == 0
    assert "--scenarios" in bench.stdout
    keys = fastworker("keys", "generate", "server", "--dir", str(tmp_path))
    assert keys.returncode == 0, keys.stderr
    assert (tmp_path / "server.key").exists()
    assert (tmp_path / "server.key_secret").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("word", "value"),
    [
        ("3", 3),
        ("2.5", 2.5),
        ("true", True),
        ("null", None),
        ('"3"', "3"),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ("hello", "hello"),
        ("NaN", "NaN"),
        ("-1", -1),
        ("", ""),
    ],
)
def test_each_arg_is_json_when_it_parses_else_a_string(word: str, value: object) -> None:
    assert parse_task_arg(word) == value


def test_version_and_help_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == "fastworker 0.1.0"
    with pytest.raises(SystemExit) as exited:
        cli_main(["--help"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out
    for command in ("node", "submit", "result", "cancel", "status", "workers", "bench", "keys"):
        assert f"    {command} " in listing


def test_curve_keys_from_the_environment_reach_the_client(tmp_path: Path) -> None:
    """The Client's FASTWORKER_CURVE_* variables work here too; a refused key exits 3."""
    curve = CurveFiles(tmp_path)
    with start_node(
        "--discovery-address",
        "tcp://127.0.0.1:*",
        "--workers",
        "0",
        *curve.node_args(),
    ) as node:

        def as_(name: str) -> subprocess.CompletedProcess[str]:
            return fastworker(
                "workers",
                "--json",
                "--timeout",
                "3",
                FASTWORKER_DISCOVERY_ADDRESS=node.discovery_address,
                FASTWORKER_CURVE_SECRET_KEY=str(curve.secret(name)),
                FASTWORKER_CURVE_SERVER_KEY=str(curve.public("server")),
            )

        allowed = as_("client")
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout) == {"workers": []}
        flags = fastworker(
            "workers",
            "--json",
            "--discovery-address",
            node.discovery_address,
            "--curve-secret-key",
            str(curve.secret("client")),
            "--curve-server-key",
            str(curve.public("server")),
        )
        assert flags.returncode == 0, flags.stderr
        refused = as_("rogue")
    assert refused.returncode == 3
    assert refused.stdout == ""
    assert "refused this client" in refused.stderr
    assert "Traceback" not in refused.stderr
