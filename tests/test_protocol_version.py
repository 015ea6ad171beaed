"""Peers of another protocol version are refused with an answer they can read, and nobody hangs.

A version-1 peer's decoder refuses every frame not marked version 1, so the
control plane answers its frames in version 1 (ErrorReply has the same shape
in every version); a version-2 peer reads the ErrorReply of a version-1
control plane whatever its version.  Frames are built by hand here, as a
peer of the other version would send them.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import cbor2
import pytest
import trio
import zmq

from fastworker import Client, Cluster
from fastworker.tasks.registry import TaskDefinition, TaskRegistry
from fastworker.transport import ZSocket, open_socket
from fastworker.wire import (
    PROTOCOL_VERSION,
    ErrorReply,
    Lookup,
    Ready,
    Register,
    StatsQuery,
    Submit,
    VersionError,
    WireError,
    decode,
    error_reply,
)
from fastworker.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(30)

OLD = 1  # the version before the compact result record


def add(a: int, b: int) -> int:
    return a + b


def _v1(tag: int, *fields: Any) -> bytes:
    """A frame as a version-1 peer encodes it: the same layout, the old version number."""
    return cbor2.dumps([OLD, tag, *fields])


def _as_v1_decoder_reads(frame: bytes) -> list[Any]:
    """What a version-1 decoder accepts: version 1, ErrorReply's tag and three fields."""
    body: list[Any] = cbor2.loads(frame)
    assert body[:2] == [OLD, ErrorReply.TAG]
    assert [type(v) for v in body[2:]] == [int, str, str]
    return body[2:]


def _names_both_versions(text: str) -> bool:
    return f"version {OLD} " in text and f"version {PROTOCOL_VERSION}" in text


# -- the codec ------------------------------------------------------------------------


def test_a_v1_request_is_refused_with_an_answer_in_v1_carrying_its_request_id() -> None:
    with pytest.raises(VersionError) as info:
        decode(_v1(StatsQuery.TAG, 41))
    assert info.value.reason == "version"
    request_id, reason, text = _as_v1_decoder_reads(error_reply(info.value))
    assert (request_id, reason) == (41, "version")
    assert _names_both_versions(text)


@pytest.mark.parametrize(
    "frame",
    [
        cbor2.dumps(["1", Lookup.TAG, 3]),  # not an integer version
        cbor2.dumps([2**70, Lookup.TAG, 3]),  # nothing to echo back
        cbor2.dumps([-1, Lookup.TAG, 3]),
    ],
    ids=["text", "bignum", "negative"],
)
def test_a_version_no_peer_could_speak_is_answered_in_ours(frame: bytes) -> None:
    with pytest.raises(WireError) as info:
        decode(frame)
    answer = decode(error_reply(info.value))
    assert answer == ErrorReply(3, "version", str(info.value))


def test_a_float_version_is_told_it_must_be_an_integer() -> None:
    with pytest.raises(VersionError) as info:
        decode(cbor2.dumps([2.0, Lookup.TAG, 6]))
    assert "must be an integer, not float" in str(info.value)
    assert "is not supported" not in str(info.value)  # 2.0 is no other version
    assert decode(error_reply(info.value)) == ErrorReply(6, "version", str(info.value))


def test_a_frame_that_is_no_request_is_answered_with_request_id_0() -> None:
    with pytest.raises(VersionError) as info:
        decode(_v1(Ready.TAG, 8, None))  # its first field is a window, not a request id
    assert _as_v1_decoder_reads(error_reply(info.value))[:2] == [0, "version"]


def test_a_v1_control_planes_error_reply_is_read() -> None:
    # Exactly what a version-1 control plane answers a version-2 frame.
    frame = _v1(ErrorReply.TAG, 0, "version", "protocol version 2 not supported (speak 1)")
    assert decode(frame) == ErrorReply(0, "version", "protocol version 2 not supported (speak 1)")
    # Any other message of another version stays refused.
    with pytest.raises(VersionError):
        decode(_v1(Lookup.TAG, 1))


# -- the control plane ----------------------------------------------------------------


async def _answer(sock: ZSocket, frames: list[bytes]) -> list[Any]:
    await sock.send_multipart(frames)
    parts = await sock.recv_multipart()
    return _as_v1_decoder_reads(parts[-1])


@pytest.mark.timeout(40)
async def test_v1_frames_to_each_endpoint_get_the_version_answer_and_the_node_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload = json.dumps([[2, 3], {}]).encode()
    v1_task = ["0" * 32, "add", 2, 0, payload, None]
    caplog.set_level(logging.WARNING, "fastworker")
    with trio.fail_after(30):
        async with (
            Cluster(tasks=[add], workers=1) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
            open_socket(zmq.DEALER, identity=b"client-v1") as gateway,
            open_socket(zmq.DEALER) as discovery,
            open_socket(zmq.DEALER, identity=b"worker-v1") as scheduler,
        ):
            plane = cluster.control_plane
            assert plane.gateway.endpoint is not None
            assert plane.scheduler.endpoint is not None
            gateway.connect(plane.gateway.endpoint)
            discovery.connect(cluster.discovery_address)
            scheduler.connect(plane.scheduler.endpoint)

            answers = [
                await _answer(gateway, [_v1(Submit.TAG, 7, [v1_task])]),
                await _answer(gateway, [_v1(StatsQuery.TAG, 8)]),
                await _answer(discovery, [_v1(Lookup.TAG, 9)]),
                await _answer(discovery, [_v1(Register.TAG, "worker-v1", ["add"], 1, 1, "h")]),
                await _answer(scheduler, [_v1(Ready.TAG, 8, None)]),
            ]
            # Everybody else is served as before.
            result = await client.submit_task("add", args=(2, 3), timeout=10)
            stats = await client.stats()

    assert [(rid, reason) for rid, reason, _ in answers] == [
        (7, "version"),
        (8, "version"),
        (9, "version"),
        (0, "version"),
        (0, "version"),
    ]
    assert all(_names_both_versions(text) for _, _, text in answers)
    assert result.result == 5
    assert stats["rejected"] == {"version": 5}
    assert stats["discovery"]["workers_alive"] == 1  # the version-1 worker never joined
    # One line per endpoint, however many frames it refused.
    lines = [r.getMessage() for r in caplog.records if "speaking protocol version 1" in r.message]
    assert sorted(line.split()[0] for line in lines) == ["discovery", "gateway", "scheduler"]


# -- a version-2 peer meeting a version-1 control plane -----------------------------------


async def _v1_control_plane(sock: ZSocket) -> None:
    """Answers every frame as version-1 Discovery did: ErrorReply(0, "version"), in version 1."""
    refusal = _v1(ErrorReply.TAG, 0, "version", "protocol version 2 not supported (speak 1)")
    while True:
        identity, *_ = await sock.recv_multipart()
        await sock.send_multipart([identity, refusal])


async def test_a_client_call_fails_at_once_naming_both_versions() -> None:
    with trio.fail_after(20):
        async with open_socket(zmq.ROUTER) as old, trio.open_nursery() as nursery:
            address = old.bind("tcp://127.0.0.1:*")
            nursery.start_soon(_v1_control_plane, old)
            async with Client(discovery_address=address, timeout=15) as client:
                with pytest.raises(
                    RuntimeError, match=r"protocol version 2 not supported \(speak 1\)"
                ):
                    await client.stats()
            nursery.cancel_scope.cancel()


class _Seen(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged (in the trio thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_a_worker_logs_that_the_control_plane_speaks_another_version() -> None:
    seen = _Seen("protocol version 2 not supported (speak 1)")
    logger = logging.getLogger("fastworker")
    logger.addHandler(seen)
    registry = TaskRegistry([TaskDefinition(name="add", fn=add, runner="thread")])
    try:
        with trio.fail_after(20):
            async with open_socket(zmq.ROUTER) as old, trio.open_nursery() as nursery:
                address = old.bind("tcp://127.0.0.1:*")
                nursery.start_soon(_v1_control_plane, old)
                worker = Worker(registry, WorkerConfig(discovery_address=address))
                nursery.start_soon(worker.run)
                await seen.event.wait()
                worker.ref.stop()
                nursery.cancel_scope.cancel()
    finally:
        logger.removeHandler(seen)


@pytest.mark.timeout(30)
async def test_a_peer_reconnecting_with_its_id_while_its_old_connection_is_open_is_answered() -> (
    None
):
    """The Gateway and the Scheduler set ROUTER_HANDOVER: a client or worker that comes
    back with its routing id while its old connection is half-open (still open here)
    is served at once, not ignored until TCP gives the old one up."""
    with trio.fail_after(20):
        async with Cluster(tasks=[add], workers=0) as cluster:
            plane = cluster.control_plane
            assert plane.gateway.endpoint is not None
            assert plane.scheduler.endpoint is not None
            for endpoint, identity in (
                (plane.gateway.endpoint, b"client-again"),
                (plane.scheduler.endpoint, b"worker-again"),
            ):
                async with open_socket(zmq.DEALER, identity=identity) as old:
                    old.connect(endpoint)
                    assert (await _answer(old, [_v1(StatsQuery.TAG, 1)]))[1] == "version"
                    async with open_socket(zmq.DEALER, identity=identity) as new:
                        new.connect(endpoint)
                        assert (await _answer(new, [_v1(StatsQuery.TAG, 2)]))[1] == "version"
