"""``python -m fastworker.node`` as users meet it: arguments, help and one-line startup errors.

Every test runs the real command in a subprocess and reads its exit code and
stderr: users see a one-line ``error:`` message, never a Python traceback.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from multiprocess import run_node

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

PROG = "python -m fastworker.node"
SAFE = ("--discovery-address", "tcp://127.0.0.1:*", "--workers", "0")


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error:" in line]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``error:`` line of a failed run; no traceback anywhere."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "fastworker node ready" not in result.stdout
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    (line,) = lines
    assert line.startswith(f"{PROG}: error: "), line
    assert result.stderr.rstrip("\n").endswith(line), "the error is the last thing printed"
    return line


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--workers", "-1"], "--workers must be >= 0, got -1"),
        (["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
        (["--concurrency", "many"], "--concurrency: expected an integer, got 'many'"),
        (["--role", "nope"], "--role: invalid choice: 'nope'"),
        (["--discovery-address", "127.0.0.1:5550"], "is not a ZeroMQ endpoint"),
        (["--heartbeat-interval", "nan"], "--heartbeat-interval: must be positive, got nan"),
        (["--grace", "nan"], "--grace: must be >= 0, got nan"),
        (["--prefetch", "-1"], "--prefetch: must be >= 0, got -1"),
        (["--max-message-size", "10"], "--max-message-size: must be at least 65536 bytes"),
        (["--max-queued-bytes", "0"], "--max-queued-bytes: must be at least 1, got 0"),
        (["--result-cache-bytes", "1000000"], "less than one message (--max-message-size"),
        (
            ["--role", "worker", "--workers", "0"],
            "--role worker with --workers 0 would run nothing",
        ),
        # Secure by default: no keys, no listening beyond this machine.
        (["--discovery-address", "tcp://0.0.0.0:*"], "--insecure"),
        (["--client-address", "tcp://*:*"], "reachable from other machines"),
        (["--worker-address", "tcp://10.1.2.3:*"], "reachable from other machines"),
        (["--client-keys", "."], "need --curve-secret-key"),
        (["--curve-secret-key", "/nonexistent.key_secret"], "needs --client-keys"),
        (
            ["--curve-secret-key", "/nonexistent.key_secret", "--client-keys", "."],
            "needs --worker-keys",
        ),
        (
            [
                *("--curve-secret-key", "/nonexistent.key_secret"),
                *("--client-keys", ".", "--worker-keys", "."),
            ],
            "cannot read a CURVE certificate",
        ),
        (
            ["--role", "worker", "--workers", "1", "--curve-secret-key", "/x.key_secret"],
            "needs both --curve-secret-key",
        ),
        (
            ["--role", "control-plane", "--allow-pickle"],
            "--allow-pickle applies to worker processes only",
        ),
        (["--callback-allow", "tcp://10.0.0.*"], "a tcp pattern needs a port"),
        (["--callback-allow", "tcp://10.0.0.300:*"], "has an octet above 255"),
        (
            ["--role", "worker", "--workers", "1", "--callback-allow", "tcp://*:7000"],
            "--callback-allow applies to the control plane",
        ),
    ],
)
def test_a_bad_argument_is_a_one_line_usage_error(argv: list[str], mentions: str) -> None:
    # Should the argument be accepted after all, the node must not take the
    # default port or start workers: those two come first, the bad one wins.
    line = assert_one_line_error(run_node(*SAFE, *argv), 2)
    assert mentions in line
    assert "_positive" not in line  # no internal function names


def test_help_lists_the_options_and_exits_0() -> None:
    result = run_node("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for option in (
        "--role",
        "--discovery-address",
        "--task-modules",
        "--workers",
        "--concurrency",
        "--grace",
        "--heartbeat-interval",
        "--result-ttl",
        "--result-cache-size",
        "--log-level",
        "--callback-allow",
    ):
        assert option in result.stdout
    assert "--worker-process" not in result.stdout  # internal


@pytest.mark.parametrize("role", ["all", "control-plane"])
def test_a_discovery_port_in_use_is_a_one_line_error(role: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        address = f"tcp://127.0.0.1:{port}"
        result = run_node("--role", role, "--workers", "0", "--discovery-address", address)
    line = assert_one_line_error(result, 1)
    assert "already in use" in line
    assert address in line


def test_an_unimportable_task_module_is_named() -> None:
    result = run_node(*SAFE, "--task-modules", "no_such_module_xyz")
    line = assert_one_line_error(result, 1)
    assert "'no_such_module_xyz'" in line
    assert "ModuleNotFoundError" in line


@pytest.mark.parametrize(
    ("role", "source", "expected"),
    [
        ("all", 'raise RuntimeError("boom at import")\n', "RuntimeError: boom at import"),
        ("worker", 'raise RuntimeError("boom at import")\n', "RuntimeError: boom at import"),
        ("all", "import no_such_dependency_q\n", "No module named 'no_such_dependency_q'"),
        ("all", "def broken(:\n", "SyntaxError"),
    ],
)
def test_a_task_module_that_fails_to_import_is_reported_with_its_error(
    tmp_path: Path, role: str, source: str, expected: str
) -> None:
    (tmp_path / "user_tasks_broken.py").write_text(source)
    result = run_node(
        "--role",
        role,
        "--discovery-address",
        "tcp://127.0.0.1:*" if role == "all" else "tcp://127.0.0.1:9",
        "--task-modules",
        "user_tasks_broken",
        cwd=tmp_path,  # the working directory is importable; fastworker comes from PYTHONPATH
    )
    line = assert_one_line_error(result, 1)
    assert "'user_tasks_broken'" in line
    assert expected in line


def test_the_working_directory_makes_task_modules_importable(tmp_path: Path) -> None:
    """The counterpart: a fine module in the working directory loads (checked, then exit 1 on
    the port conflict, which proves the import step passed)."""
    (tmp_path / "user_tasks_fine.py").write_text(
        "from fastworker import task\n\n@task\ndef ok() -> int:\n    return 1\n"
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        result = run_node(
            "--discovery-address", address, "--task-modules", "user_tasks_fine", cwd=tmp_path
        )
    line = assert_one_line_error(result, 1)
    assert "already in use" in line


@pytest.mark.multiprocess
@pytest.mark.timeout(40)
def test_a_node_with_no_worker_processes_says_its_tasks_wait_for_workers_from_elsewhere() -> None:
    """--role all --workers 0 is allowed (workers may join from other machines), but a node
    that silently accepted tasks nothing here will run surprised people."""
    from multiprocess import start_node

    with start_node("--workers", "0", "--discovery-address", "tcp://127.0.0.1:*") as node:
        printed = node.stderr_text()  # up to its ready line, which comes after the warning
    assert "this node runs no worker processes; tasks wait in the queue" in printed
