"""Variants: the shared scenarios again on a node configured differently, in the same run.

``--curve`` runs throughput, batch and latency a second time on a node with
CURVE on every socket (keys made for the run, in a temporary directory), so
the cost of encryption is read off one invocation on one machine state.
``--journal`` does the same on a node with ``--journal`` (the file in a
temporary directory): the cost of durability (design/durability.md).
``--http`` on a node serving ``--http-address``, whose /metrics and dashboard
data the bench reads once a second meanwhile (``_scrape``): the cost of being
watched (design/operations.md).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import zmq

from ..security import generate_certificate, load_secret_key

__all__ = ["Variant", "curve_variant", "handshake_ms", "http_variant", "journal_variant"]


@attrs.frozen
class Variant:
    name: str
    node_args: tuple[str, ...] = ()
    client_options: dict[str, Any] = attrs.Factory(dict)
    server_public: bytes | None = None
    client_keys_file: Path | None = None


def curve_variant(directory: Path | None = None) -> Variant:
    """Keys for one bench run: the control plane's pair and one client's."""
    root = Path(directory or tempfile.mkdtemp(prefix="fastworker-bench-keys-"))
    generate_certificate("server", root)
    public, _ = generate_certificate("bench", root / "bench")
    # Only the public file in --client-keys: the node refuses a secret there.
    (root / "clients").mkdir(exist_ok=True)
    public.rename(root / "clients" / public.name)
    return Variant(
        "curve",
        node_args=(
            "--curve-secret-key",
            str(root / "server.key_secret"),
            "--client-keys",
            str(root / "clients"),
        ),
        client_options={
            "curve_secret_key": str(root / "bench" / "bench.key_secret"),
            "curve_server_key": str(root / "server.key"),
        },
        server_public=load_secret_key(root / "server.key_secret").public,
        client_keys_file=root / "bench" / "bench.key_secret",
    )


def journal_variant(directory: Path) -> Variant:
    """A journal file in ``directory`` (the caller removes it)."""
    return Variant("journal", node_args=("--journal", str(directory / "journal.db")))


def http_variant() -> Variant:
    """The node serves --http-address on a free loopback port (printed in its ready line)."""
    return Variant("http", node_args=("--http-address", "127.0.0.1:0"))


def handshake_ms(address: str, variant: Variant | None, count: int = 50) -> dict[str, float]:
    """Median and worst time from ``connect`` to a completed ZMTP handshake, in ms.

    Blocking (raw pyzmq with a socket monitor): run it in a thread.  With a
    CURVE variant the handshake includes the key exchange and the ZAP check.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    samples = []
    for i in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if variant is not None and variant.client_keys_file is not None:
            keys = load_secret_key(variant.client_keys_file)
            sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
            assert variant.server_public is not None
            sock.curve_serverkey = variant.server_public
        monitor_address = f"inproc://bench-handshake-{id(sock)}-{i}"
        sock.monitor(monitor_address, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        monitor = ctx.socket(zmq.PAIR)
        monitor.connect(monitor_address)
        try:
            started = time.perf_counter()
            sock.connect(address)
            if not monitor.poll(5000):
                raise TimeoutError(f"no handshake with {address} within 5 s")
            samples.append((time.perf_counter() - started) * 1000)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
    return {"p50_ms": statistics.median(samples), "max_ms": max(samples)}
