"""Key-file mistakes at a control plane's start and reload (issue #12), and a refused client.

Every mistake is one ``error:`` line with the usage exit code 2, like the
other key flags; a secret key others can read starts the node with a warning.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiprocess import CurveFiles, open_node, poll, run_node, start_node
from test_node_cli import assert_one_line_error

from fastworker import AuthenticationError, Client

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

CONTROL_PLANE = ("--role", "control-plane", "--discovery-address", "tcp://127.0.0.1:*")


def _node_args(curve: CurveFiles, *, clients: Path | None = None) -> tuple[str, ...]:
    return (
        *CONTROL_PLANE,
        "--curve-secret-key",
        str(curve.secret("server")),
        "--client-keys",
        str(clients or curve.clients),
        "--worker-keys",
        str(curve.workers),
    )


def test_a_junk_key_file_is_one_line_naming_it(curve_files: CurveFiles, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    shutil.copy(curve_files.clients / "client.key", junk)
    (junk / "bad.key").write_text("garbage\n")
    line = assert_one_line_error(run_node(*_node_args(curve_files, clients=junk)), 2)
    assert "--client-keys" in line
    assert "bad.key" in line


def test_an_empty_client_directory_is_refused_like_a_missing_one(
    curve_files: CurveFiles, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = assert_one_line_error(run_node(*_node_args(curve_files, clients=empty)), 2)
    assert "no client could connect" in line
    assert str(empty) in line


def test_a_secret_key_in_a_public_directory_is_refused_at_start(curve_files: CurveFiles) -> None:
    shutil.copy(curve_files.secret("client"), curve_files.clients)
    line = assert_one_line_error(run_node(*_node_args(curve_files)), 2)
    assert "a secret key in a public directory" in line
    assert "client.key_secret" in line


def test_a_secret_key_readable_by_others_gets_a_warning_naming_it(
    curve_files: CurveFiles,
) -> None:
    secret = curve_files.secret("server")
    secret.chmod(0o644)
    with start_node(*_node_args(curve_files)) as node:
        node.signal(signal.SIGTERM)
        assert node.wait_exit(10)
        log = node.stderr_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert any(str(secret) in line and f"chmod 600 {secret}" in line for line in warnings), log


async def test_a_secret_key_in_a_public_directory_is_refused_at_reload(
    curve_files: CurveFiles,
) -> None:
    async with open_node(*_node_args(curve_files)) as node:
        # The reload would drop "client"; refused, the old keys stay in force.
        os.remove(curve_files.clients / "client.key")
        shutil.copy(curve_files.secret("fuzz"), curve_files.clients)
        node.signal(signal.SIGHUP)
        await poll(
            lambda: "a secret key in a public directory" in node.stderr_text(),
            timeout=10,
            what="the reload refused",
        )
        assert "CURVE keys not reloaded, the old ones stay in force" in node.stderr_text()
        async with Client(node.discovery_address, timeout=20, **curve_files.client_kwargs()) as c:
            assert (await c.stats(timeout=10))["zap"]["client_keys"] == 2


def test_keys_generate_names_the_force_flag(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fastworker.keys", "generate", "w", "--dir", str(tmp_path)]
    subprocess.run(argv, check=True, capture_output=True)
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 1
    assert "pass --force" in again.stderr


def test_a_refused_client_stops_at_once_with_its_tasks_kept(curve_files: CurveFiles) -> None:
    async def refused(address: str) -> float:
        client = Client(address, timeout=20, **curve_files.client_kwargs("rogue"))
        await client.start()
        asked = time.monotonic()
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(client.submit_task("add", [1, 2]), 10)
        assert time.monotonic() - asked < 2.0  # the asyncio binding too: told, not timed out
        assert client.pending_count == 1
        started = time.monotonic()
        client.stop()  # its timeout is 20 s: nothing can be handed over to a refusing server
        return time.monotonic() - started

    with start_node(*_node_args(curve_files)) as node:
        assert asyncio.run(refused(node.discovery_address)) < 1.0
