"""``python -m fastworker.keys generate``: ZeroMQ certificate files, the secret one private."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq.auth

from fastworker.security import CertificateError, load_public_keys, load_secret_key

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
