"""A node whose stderr nobody reads keeps working (issue #12: the SIGHUP-reload "hang").

Each reload logs two lines; once they filled the stderr pipe, the write
blocked the trio loop and the control plane stopped answering anything,
SIGTERM included.  The pipe here is shrunk to one page so that a few dozen
reloads fill it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import subprocess
import threading
import time

import pytest
import zmq
from multiprocess import READY, REPO_ROOT, CurveFiles, node_command, node_env

from fastworker.node._stderr import ThreadedStderrHandler
from fastworker.wire import Lookup, LookupReply, decode, encode

pytestmark = [pytest.mark.multiprocess]

_F_SETPIPE_SZ = 1031


def _dealer(curve: CurveFiles, address: str) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    keys = curve.keys("client")
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.curve_serverkey = curve.server_public()
    sock.linger = 0
    sock.rcvtimeo = 5000
    sock.connect(address)
    return sock


def _lookup(sock: zmq.Socket[bytes], request_id: int) -> object:
    sock.send(encode(Lookup(request_id)))
    return decode(sock.recv())


def _read_all(fd: int, into: list[bytes]) -> None:
    while chunk := os.read(fd, 65536):
        into.append(chunk)


@pytest.mark.timeout(30)
def test_a_node_whose_stderr_is_never_read_answers_after_500_sighups_and_stops_on_sigterm(
    curve_files: CurveFiles,
) -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, _F_SETPIPE_SZ, 4096)
    args = ["--role", "control-plane", "--discovery-address", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(
        node_command(*args, *curve_files.node_args()),
        cwd=REPO_ROOT,
        env=node_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=write_end,
        start_new_session=True,
    )
    os.close(write_end)
    try:
        assert proc.stdout is not None
        ready = READY.match(proc.stdout.readline().decode().strip())
        assert ready is not None
        address = ready["discovery"]
        sock = _dealer(curve_files, address)
        try:
            # A round trip after each signal: the reloads run one by one, not coalesced.
            for i in range(500):
                proc.send_signal(signal.SIGHUP)
                assert isinstance(_lookup(sock, i), LookupReply), i
            # The pipe is full (nobody read it) and the node still answers, also a new peer.
            late = _dealer(curve_files, address)
            assert isinstance(_lookup(late, 1000), LookupReply)
            late.close(0)
        finally:
            sock.close(0)
        # ...and stops on SIGTERM, writing what it had queued once stderr is read.
        drained: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(read_end, drained))
        reader.start()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 10
        reader.join(5)
        log = b"".join(drained)
        # far more than the 4 KiB pipe held: queued, not lost
        assert log.count(b"CURVE keys loaded") > 100
        assert b"SIGTERM received" in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        os.close(read_end)


@pytest.mark.timeout(10)
def test_lines_past_the_queue_bound_are_dropped_and_counted_once_stderr_moves() -> None:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, _F_SETPIPE_SZ, 4096)
    handler = ThreadedStderrHandler(write_end, max_queued_bytes=2000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.stderr_blocked")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        started = time.monotonic()
        for i in range(1000):
            logger.warning("line %04d %s", i, "x" * 90)
        assert time.monotonic() - started < 1.0  # never blocked on the full pipe
        assert handler.dropped > 0
        drained: list[bytes] = []
        reader = threading.Thread(target=_read_all, args=(read_end, drained))
        reader.start()
        logger.warning("after")
        handler.close()
        os.close(write_end)
        reader.join(5)
        text = b"".join(drained).decode()
        notes = re.findall(r"fastworker: (\d+) log lines dropped: stderr was not read", text)
        assert sum(int(n) for n in notes) == handler.dropped  # every drop told, once
        assert text.rstrip().endswith("after")
    finally:
        logger.removeHandler(handler)
        os.close(read_end)
