"""What one worker key can make Discovery hold or log (issue #12).

Task names are bounded in bytes, per Register and over every member; a
worker id must be usable as a routing id and neither it nor the host name
may carry control characters into log lines.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fastworker._io import Inbound
from fastworker.control._register_checks import MAX_NAMES_COST, MAX_TOTAL_NAMES_COST, names_cost
from fastworker.control.discovery import Discovery, DiscoveryConfig
from fastworker.runtime import GetStatistics
from fastworker.wire import ErrorReply, Register, Registered, Unregister, decode, encode

pytestmark = pytest.mark.timeout(30)


class _Scheduler:
    name = "scheduler"

    def tell(self, message: object) -> None:
        pass


class _Wire:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def try_send(self, frames: list[bytes]) -> bool:
        self.sent.append(frames)
        return True


def _discovery() -> tuple[Discovery, _Wire]:
    discovery = Discovery(
        DiscoveryConfig(max_workers=100_000),
        instance_id="i",
        scheduler=_Scheduler(),  # type: ignore[arg-type]
        endpoints=lambda: ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
    )
    wire = _Wire()
    discovery._sock = wire  # type: ignore[assignment]
    return discovery, wire


def _register(discovery: Discovery, wire: _Wire, message: Any) -> Any:
    discovery.receive(Inbound([[b"peer", encode(message)]]))
    return decode(wire.sent[-1][1])


def _long_names(prefix: str, count: int = 10_000) -> list[str]:
    return [f"{prefix}{j:06d}".ljust(512, "n") for j in range(count)]


async def test_a_register_with_over_a_mebibyte_of_names_is_refused() -> None:
    discovery, wire = _discovery()
    reply = _register(discovery, wire, Register("hog", _long_names("a"), 1, 1, "h"))
    assert isinstance(reply, ErrorReply)
    assert reply.reason == "invalid"
    assert "bytes" in reply.message
    assert discovery.receive(GetStatistics())["workers_alive"] == 0
    # Within the bound it is fine.
    assert isinstance(
        _register(discovery, wire, Register("ok", _long_names("b", 1000), 1, 1, "h")), Registered
    )


async def test_names_over_all_members_are_bounded_and_given_back_when_a_worker_leaves() -> None:
    discovery, wire = _discovery()
    per_worker = _long_names("x", 1500)
    assert names_cost(per_worker) <= MAX_NAMES_COST
    fits = MAX_TOTAL_NAMES_COST // names_cost(per_worker)
    for i in range(fits):
        assert isinstance(
            _register(discovery, wire, Register(f"w{i}", per_worker, 1, 1, "h")), Registered
        )
    refused = _register(discovery, wire, Register("one-more", per_worker, 1, 1, "h"))
    assert isinstance(refused, ErrorReply)
    assert refused.reason == "overloaded"
    # Registering again with the same names replaces, not adds.
    assert isinstance(_register(discovery, wire, Register("w0", per_worker, 1, 1, "h")), Registered)
    discovery.receive(Inbound([[b"peer", encode(Unregister("w0", "left"))]]))
    assert isinstance(
        _register(discovery, wire, Register("one-more", per_worker, 1, 1, "h")), Registered
    )


@pytest.mark.parametrize(
    ("worker_id", "hostname", "says"),
    [
        ("", "h", "empty"),
        ("w" * 256, "h", "255"),
        ("é" * 128, "h", "255"),  # 256 UTF-8 bytes
        ("\0w", "h", "NUL"),
        ("w\nfastworker.discovery: worker root joined", "h", "control characters"),
        ("w\x1b[2J", "h", "control characters"),
        ("w\u202e", "h", "control characters"),  # a bidi override reorders the line
        ("w", "host\r\nforged", "hostname"),
    ],
)
async def test_worker_ids_and_hostnames_that_cannot_be_routed_or_would_forge_logs_are_refused(
    worker_id: str, hostname: str, says: str, caplog: pytest.LogCaptureFixture
) -> None:
    discovery, wire = _discovery()
    with caplog.at_level(logging.INFO, "fastworker.discovery"):
        reply = _register(discovery, wire, Register(worker_id, ["t"], 1, 1, hostname))
    assert isinstance(reply, ErrorReply)
    assert reply.reason == "invalid"
    assert says in reply.message
    assert discovery.receive(GetStatistics())["workers_alive"] == 0
    assert "joined" not in caplog.text


async def test_a_worker_id_of_255_bytes_is_accepted_and_logged_quoted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    discovery, wire = _discovery()
    with caplog.at_level(logging.INFO, "fastworker.discovery"):
        reply = _register(discovery, wire, Register("w" * 255, ["t"], 1, 1, "box 1"))
    assert isinstance(reply, Registered)
    assert f"worker {'w' * 255!r} joined (pid 1 on 'box 1', 1 tasks)" in caplog.text
