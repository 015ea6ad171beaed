"""``python -m fastworker.keys generate``: ZeroMQ certificate files, the secret one private."""

from __future__ import annotations

import argparse
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from fastworker.node._security import NodeSecurity, SecurityError, node_security
from fastworker.security import (
    CertificateError,
    generate_certificate,
    load_public_keys,
    load_secret_key,
)

pytestmark = pytest.mark.timeout(30)


def test_generate_writes_a_pair_zmq_auth_reads_with_the_secret_file_private(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastworker.keys", "generate", "server", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "server.key_secret" in done.stdout
    public, secret = zmq.auth.load_certificate(tmp_path / "server.key_secret")
    assert zmq.auth.load_certificate(tmp_path / "server.key") == (public, None)
    assert secret is not None
    assert zmq.curve_public(secret) == public
    assert stat.S_IMODE((tmp_path / "server.key_secret").stat().st_mode) == 0o600
    assert load_secret_key(tmp_path / "server.key_secret").public == public
    with pytest.raises(CertificateError, match="a secret key in a public directory"):
        load_public_keys(tmp_path)  # generate's own directory is not yet one to deploy
    (tmp_path / "server.key_secret").rename(tmp_path / "server.secret")
    assert load_public_keys(tmp_path) == {public}


def test_generate_never_overwrites_a_key_unless_forced(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "fastworker.keys", "generate", "w", "--dir", str(tmp_path)]
    subprocess.run(argv, check=True, capture_output=True)
    before = (tmp_path / "w.key").read_bytes()
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert (tmp_path / "w.key").read_bytes() == before
    subprocess.run([*argv, "--force"], check=True, capture_output=True)
    assert (tmp_path / "w.key").read_bytes() != before


def test_a_public_certificate_is_not_a_secret_key_and_a_missing_directory_is_an_error(
    tmp_path: Path,
) -> None:
    subprocess.run(
        [sys.executable, "-m", "fastworker.keys", "generate", "c", "--dir", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(CertificateError, match="no secret key"):
        load_secret_key(tmp_path / "c.key")
    with pytest.raises(CertificateError, match="not a directory"):
        load_public_keys(tmp_path / "nope")


def _args(**given: object) -> argparse.Namespace:
    defaults: dict[str, object] = {
        "worker_process": False,
        "role": "all",
        "workers": 1,
        "discovery_address": "tcp://127.0.0.1:5550",
        "client_address": None,
        "worker_address": None,
        "curve_secret_key": None,
        "curve_server_key": None,
        "client_keys": None,
        "worker_keys": None,
        "insecure": False,
    }
    return argparse.Namespace(**{**defaults, **given})


def test_insecure_allows_a_public_bind_without_keys_and_nothing_else_does() -> None:
    public = {"discovery_address": "tcp://0.0.0.0:5550"}
    with pytest.raises(SecurityError, match="reachable from other machines"):
        node_security(_args(**public))
    assert node_security(_args(**public, insecure=True)) == NodeSecurity()
    for local in ("tcp://127.0.0.1:*", "tcp://localhost:1", "tcp://[::1]:2", "ipc:///tmp/s"):
        assert node_security(_args(discovery_address=local)) == NodeSecurity()


def test_a_curve_node_keys_its_own_workers_and_hands_them_the_keys_in_the_environment(
    tmp_path: Path,
) -> None:
    generate_certificate("server", tmp_path)
    generate_certificate("client", tmp_path / "secret")
    (tmp_path / "clients").mkdir()
    (tmp_path / "secret" / "client.key").rename(tmp_path / "clients" / "client.key")
    security = node_security(
        _args(
            curve_secret_key=str(tmp_path / "server.key_secret"),
            client_keys=str(tmp_path / "clients"),
            discovery_address="tcp://0.0.0.0:5550",  # allowed: CURVE is on
        )
    )
    assert security.server is not None
    assert security.own_workers
    assert security.worker is not None
    env = security.worker_env()
    child = node_security(_args(worker_process=True), environ=env)
    assert child.worker == security.worker
    assert child.server_public == security.server.public
    assert security.server.secret.decode() not in repr(security)  # never in a log line
