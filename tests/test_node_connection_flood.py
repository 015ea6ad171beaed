"""Idle TCP connections that never greet do not lock clients out (issue #12).

A control plane started under a soft open-file limit of 1024 raises it to
the hard limit, so ~1100 idle connections leave room for a client; and each
such connection is dropped once its handshake has taken 5 s.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import zmq
from multiprocess import READY, REPO_ROOT, CurveFiles, node_command, node_env

from fastworker.wire import Lookup, LookupReply, decode, encode

pytestmark = [pytest.mark.multiprocess]

IDLE = 1100
SOFT = 1024


def _soft_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, hard))


def _lookup(curve: CurveFiles, address: str) -> object:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    keys = curve.keys("client")
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.curve_serverkey = curve.server_public()
    sock.linger = 0
    sock.rcvtimeo = 5000
    try:
        sock.connect(address)
        sock.send(encode(Lookup(1)))
        return decode(sock.recv())
    finally:
        sock.close(0)


def _closed_by_peer(conn: socket.socket) -> bool:
    """Reads what is there (the server's greeting); True once the peer has closed."""
    try:
        while True:
            if not conn.recv(4096):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_all_closed(conns: list[socket.socket], timeout: float) -> None:
    open_ = {conn.fileno(): conn for conn in conns}
    poller = select.poll()
    for fd in open_:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while open_:
        assert time.monotonic() < deadline, f"{len(open_)} idle connections kept"
        for fd, _ in poller.poll(500):
            if _closed_by_peer(open_[fd]):
                poller.unregister(fd)
                del open_[fd]


@pytest.mark.timeout(40)
def test_idle_connections_neither_exhaust_descriptors_nor_stay_past_the_handshake_time(
    curve_files: CurveFiles,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * IDLE + 200:
        pytest.skip(f"hard open-file limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # our end of the connections
    args = ("--role", "control-plane", "--discovery-address", "tcp://127.0.0.1:*")
    proc = subprocess.Popen(
        node_command(*args, *curve_files.node_args()),
        cwd=REPO_ROOT,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_soft_limit,
    )
    idle: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        ready = READY.match(proc.stdout.readline().decode().strip())
        assert ready is not None
        address = ready["discovery"]
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
        assert line.split()[3] == str(hard)  # the soft limit, raised

        host, port = address[len("tcp://") :].rsplit(":", 1)
        for _ in range(IDLE):
            conn = socket.create_connection((host, int(port)), timeout=5)
            conn.setblocking(False)
            idle.append(conn)
        assert isinstance(_lookup(curve_files, address), LookupReply)

        # None of them greeted: the node drops each one after 5 s (not libzmq's 30 s).
        started = time.monotonic()
        _wait_all_closed(idle, timeout=15)
        assert time.monotonic() - started > 2  # ...not at once
    finally:
        for conn in idle:
            conn.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
