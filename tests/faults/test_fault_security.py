"""CURVE with real node processes: who is refused, what they get (nothing), what they learn.

Every test runs a node with ``--curve-secret-key``, ``--client-keys`` and
``--worker-keys`` (``CurveFiles``: ``client`` is a client, ``worker`` a
worker, ``fuzz`` both, ``rogue`` neither) and talks to it as a real
``Client``, a real ``--role worker`` node, or a raw pyzmq peer holding a
key, the way an attacker would.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import zmq
from _nodes import (
    ANY_PORT,
    TASKS,
    CurveFiles,
    client_for,
    fault_node,
    poll,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import AuthenticationError, Client
from fastworker.wire import (
    Done,
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Register,
    Registered,
    Unregister,
    decode,
    encode,
)

pytestmark = [pytest.mark.multiprocess]

# Refusals must reach the caller this fast (the issue: "within a second or two").
REFUSAL_SECONDS = 2.0


@contextlib.asynccontextmanager
async def curve_node(curve: CurveFiles, *extra: str) -> AsyncIterator[tuple[Any, Client]]:
    """A ``--role all`` CURVE node serving the fault tasks, and an allowed client of it."""
    node_args = ("--discovery-address", ANY_PORT, *TASKS, *extra, *curve.node_args())
    async with (
        fault_node(*node_args) as node,
        client_for(node, **curve.client_kwargs()) as client,
    ):
        yield node, client


def _raw(curve: CurveFiles, key: str, address: str, identity: bytes | None = None) -> Any:
    """A raw DEALER speaking CURVE with ``key``'s pair, as a hand-written peer would."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    keys = curve.keys(key)
    sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
    sock.curve_serverkey = curve.server_public()
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(address)
    return sock


def _ask(sock: Any, message: Any) -> Any:
    sock.send(encode(message))
    return decode(sock.recv())


def _joined_ids(node: Any) -> list[str]:
    """Worker ids in the order the node's log says they joined."""
    return re.findall(r"worker '([^']+)' joined \(pid", node.stderr_text())  # quoted: %r


async def _first_joined_id(node: Any) -> str:
    """The first worker id the node logged; the line comes from its log-writer thread, so
    it may reach stderr a moment after statistics show the worker."""
    joined: list[str] = await poll(lambda: _joined_ids(node), timeout=5, what="a join logged")
    return joined[0]


async def _refused(client: Client, match: str) -> float:
    """Seconds until ``submit_task`` raised AuthenticationError naming ``match``."""
    await client.start()
    started = time.monotonic()
    try:
        with trio.fail_after(REFUSAL_SECONDS + 3), pytest.raises(AuthenticationError, match=match):
            await client.submit_task("add", [1, 2])
        return time.monotonic() - started
    finally:
        client.stop(timeout=0.1)


@pytest.mark.timeout(60)
async def test_keyless_wrong_key_and_wrong_server_key_clients_are_refused_at_once(
    curve_files: CurveFiles,
) -> None:
    node_args = ("--discovery-address", ANY_PORT, *TASKS, *curve_files.node_args())
    async with fault_node(*node_args) as node:
        address = node.discovery_address
        wrong_server = {
            **curve_files.client_kwargs(),
            "curve_server_key": curve_files.public("rogue"),
        }
        cases = [
            (Client(address, timeout=20), "requires CURVE keys"),
            (Client(address, timeout=20, **curve_files.client_kwargs("rogue")), "refused our"),
            (Client(address, timeout=20, **curve_files.client_kwargs("worker")), "refused our"),
            (Client(address, timeout=20, **wrong_server), "curve_server_key"),
        ]
        for client, match in cases:
            assert await _refused(client, match) < REFUSAL_SECONDS
        async with client_for(node, **curve_files.client_kwargs()) as client:
            assert (await client.submit_task("add", [1, 2])).result == 3
            scheduler = (await stats(client))["scheduler"]
            assert scheduler["accepted"] == 1  # only the allowed client's task
            assert (await stats(client))["zap"]["handshakes"]["refused"] >= 2


@pytest.mark.timeout(60)
async def test_a_client_key_removed_and_sighup_is_refused_even_on_its_open_connection(
    curve_files: CurveFiles,
) -> None:
    node_args = ("--discovery-address", ANY_PORT, *TASKS, *curve_files.node_args())
    async with (
        fault_node(*node_args) as node,
        client_for(node, **curve_files.client_kwargs()) as client,
        client_for(node, **curve_files.client_kwargs("fuzz")) as observer,
    ):
        assert (await client.submit_task("add", [1, 2])).result == 3
        os.remove(curve_files.clients / "client.key")
        node.signal(signal.SIGHUP)

        async def reloaded() -> bool:
            return bool((await stats(observer))["zap"]["client_keys"] == 1)

        await poll(reloaded, timeout=10, what="the keys reloaded")
        with trio.fail_after(REFUSAL_SECONDS + 3), pytest.raises(AuthenticationError):
            await client.submit_task("add", [2, 3])
        late = Client(node.discovery_address, timeout=20, **curve_files.client_kwargs())
        assert await _refused(late, "refused our") < REFUSAL_SECONDS
        scheduler = (await stats(observer))["scheduler"]
        assert scheduler["accepted"] == 1
        assert scheduler["held"] == 0


@pytest.mark.timeout(60)
async def test_workers_without_a_worker_key_get_no_task(curve_files: CurveFiles) -> None:
    cp_args = ("--role", "control-plane", "--discovery-address", ANY_PORT)
    async with (
        fault_node(*cp_args, *curve_files.node_args()) as control,
        client_for(control, **curve_files.client_kwargs()) as client,
    ):
        ids = [await client.delay("add", i, i) for i in range(5)]
        await client.flush()
        worker_args = ("--role", "worker", "--discovery-address", control.discovery_address)
        for name, extra, complaint in (
            ("keyless", (), "requires CURVE keys"),
            ("rogue", curve_files.worker_args("rogue"), "refused our CURVE key"),
            ("client", curve_files.worker_args("client"), "needs a worker key"),
            (
                "wrong-server-key",
                ("--curve-secret-key", str(curve_files.secret("worker")),
                 "--curve-server-key", str(curve_files.public("rogue"))),
                "curve_server_key is not the control plane's public key",
            ),
        ):  # fmt: skip
            async with fault_node(*worker_args, *TASKS, *extra) as intruder:
                await poll(
                    lambda i=intruder, c=complaint: c in i.stderr_text(),
                    timeout=10,
                    what=f"the {name} worker's complaint",
                )
                scheduler = (await stats(client))["scheduler"]
                assert scheduler["dispatched"] == 0, name
                assert (await stats(client))["discovery"]["workers_alive"] == 0, name
        async with fault_node(*worker_args, *TASKS, *curve_files.worker_args()):
            with trio.fail_after(20):
                await client.join()
        assert [client.get_result(i).result for i in ids] == [0, 2, 4, 6, 8]


@pytest.mark.timeout(60)
async def test_spoofed_heartbeats_and_unregisters_for_another_worker_count_for_nothing(
    curve_files: CurveFiles,
) -> None:
    async with curve_node(curve_files, "--heartbeat-interval", "0.3") as (node, client):
        workers = await wait_for_workers(client, 1)
        (shown,) = workers
        (pid,) = worker_pids(workers)
        # With CURVE, statistics cut worker ids (a worker's id is its routing id);
        # the attacker here is assumed to have learnt it anyway, from the node's log.
        victim = await _first_joined_id(node)
        assert shown.endswith("…")
        assert victim.startswith(shown[:-1])
        assert len(victim) > len(shown)
        spoofer = _raw(curve_files, "worker", node.discovery_address)
        try:
            # A live worker is not evicted by somebody else's Unregister …
            reply = await trio.to_thread.run_sync(_ask, spoofer, Unregister(victim, "crashed"))
            assert isinstance(reply, ErrorReply)
            assert reply.reason == "forbidden"
            assert shown in (await stats(client))["discovery"]["workers"]
            # … and a dead one is not kept alive by somebody else's heartbeats.
            os.kill(pid, signal.SIGSTOP)
            try:
                with trio.fail_after(15):
                    while shown in (await stats(client))["discovery"]["workers"]:
                        reply = await trio.to_thread.run_sync(_ask, spoofer, Heartbeat(victim))
                        if isinstance(reply, HeartbeatAck):
                            # Reaped between the stats and this heartbeat: not revived.
                            assert reply.known is False
                            break
                        assert isinstance(reply, ErrorReply)
                        assert reply.reason == "forbidden"
                        await trio.sleep(0.1)
            finally:
                os.kill(pid, signal.SIGCONT)
        finally:
            spoofer.close()


@pytest.mark.timeout(60)
async def test_done_from_a_peer_that_did_not_register_changes_nothing(
    curve_files: CurveFiles, tmp_path: Any
) -> None:
    async with curve_node(curve_files) as (node, client):
        await wait_for_workers(client, 1)
        task_id = await client.delay("work", 7, 1.0, str(tmp_path))
        await client.flush()
        probe = _raw(curve_files, "worker", node.discovery_address)
        registered = await trio.to_thread.run_sync(
            _ask, probe, Register("probe", [], 1, 1, "probe")
        )
        probe.close()
        assert isinstance(registered, Registered)
        forger = _raw(curve_files, "worker", registered.worker_endpoint, identity=b"forger")
        forged = [task_id, "success", b"666", None, None, None, 1, None, 0, "work", None]
        forger.send(encode(Done([forged])))

        async def ignored() -> bool:
            rejected = (await stats(client))["rejected"]
            return bool(rejected.get("unregistered", 0) >= 1)

        await poll(ignored, timeout=10, what="the forged Done ignored")
        forger.close()
        with trio.fail_after(20):
            await client.join()
        result = client.get_result(task_id)
        assert result is not None
        assert result.result[0] == 14  # the real run's, not the forged 666


@pytest.mark.timeout(60)
async def test_a_worker_whose_key_is_removed_and_sighup_gets_no_more_tasks_and_its_go_back(
    curve_files: CurveFiles, tmp_path: Any
) -> None:
    cp_args = ("--role", "control-plane", "--discovery-address", ANY_PORT)
    cp_args += ("--heartbeat-interval", "0.3")
    async with (
        fault_node(*cp_args, *TASKS, *curve_files.node_args()) as control,
        client_for(control, **curve_files.client_kwargs()) as client,
    ):
        worker_args = ("--role", "worker", "--discovery-address", control.discovery_address)
        async with fault_node(*worker_args, *TASKS, *curve_files.worker_args()):
            await wait_for_workers(client, 1)
            # A task the revoked worker holds when its key goes: it runs elsewhere.
            held = await client.delay("work", 5, 3.0, str(tmp_path))

            async def running() -> bool:
                return bool((await stats(client))["scheduler"]["running"] == 1)

            await poll(running, timeout=10, what="the task running")
            os.remove(curve_files.workers / "worker.key")
            control.signal(signal.SIGHUP)

            async def evicted() -> bool:
                return bool((await stats(client))["discovery"]["workers_alive"] == 0)

            await poll(evicted, timeout=10, what="the revoked worker evicted")
            later = await client.delay("add", 2, 3)
            await client.flush()
            scheduler = (await stats(client))["scheduler"]
            assert scheduler["running"] == 0  # nothing dispatched to the revoked worker
            assert scheduler["queued_total"] == 2  # its task went back, the new one waits
        async with fault_node(*worker_args, *TASKS, *curve_files.worker_args("fuzz")):
            with trio.fail_after(30):
                result = await client.submit_task("add", [1, 1])
            with trio.fail_after(10):
                await client.join()
        assert result.result == 2
        assert client.get_result(later).result == 5
        assert client.get_result(held).result[0] == 10  # ran again, on the other worker


@pytest.mark.timeout(60)
async def test_a_worker_whose_id_was_taken_while_it_was_paused_joins_again_under_a_new_one(
    curve_files: CurveFiles,
) -> None:
    async with curve_node(curve_files, "--heartbeat-interval", "0.3") as (node, client):
        (pid,) = worker_pids(await wait_for_workers(client, 1))
        victim = await _first_joined_id(node)
        squatter = _raw(curve_files, "worker", node.discovery_address)
        try:
            os.kill(pid, signal.SIGSTOP)
            try:

                async def gone() -> bool:
                    return bool((await stats(client))["discovery"]["workers_alive"] == 0)

                await poll(gone, timeout=10, what="the paused worker declared dead")
                reply = await trio.to_thread.run_sync(
                    _ask, squatter, Register(victim, ["add"], 1, 1, "squat")
                )
                assert isinstance(reply, Registered)  # the id was free: taken
            finally:
                os.kill(pid, signal.SIGCONT)
            # The real worker is refused under its old id and joins under a new one.
            await poll(lambda: len(_joined_ids(node)) >= 3, timeout=15, what="a fresh id joined")
            with trio.fail_after(20):
                results = [await client.submit_task("add", [i, i]) for i in range(3)]
            assert [r.result for r in results] == [0, 2, 4]
        finally:
            squatter.close()
