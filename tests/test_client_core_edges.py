"""The client's sans-I/O core at the edges a hostile review found: long outages, hostile lookups.

Driven directly, with a fake link and a fake clock (as ``test_client_core_model``
does at random): each test here is one story a user hit.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from fastworker.client._core import Channel, ClientCore, PendingTask, task_wire
from fastworker.transport import TransportConfig
from fastworker.wire import LookupReply, Submit, SubmitAck, decode, encode

pytestmark = pytest.mark.timeout(30)


class _Link:
    def __init__(self) -> None:
        self.sent: list[tuple[Channel, Any]] = []
        self.endpoints: dict[Channel, str] = {}

    def send(self, channel: Channel, body: bytes) -> bool:
        if channel not in self.endpoints:
            return False
        self.sent.append((channel, decode(body)))
        return True

    def open(self, channel: Channel, endpoint: str, max_message_size: int) -> None:
        self.endpoints[channel] = endpoint

    def close(self, linger_ms: int) -> None:
        self.endpoints.clear()

    def wake_soon(self) -> bool:
        return True

    def submits(self) -> list[Submit]:
        return [m for channel, m in self.sent if isinstance(m, Submit)]


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _core(clock: _Clock) -> tuple[ClientCore, _Link]:
    core = ClientCore(
        client_id="client-test",
        discovery_address="tcp://127.0.0.1:9",
        retries=3,
        ack_timeout=1.0,
        result_cache_size=100,
        transport=TransportConfig(),
        clock=clock,
    )
    link = _Link()
    core.start(link)
    return core, link


def _lookup(instance: str = "one", heartbeat: float = 1.0, size: int = 1 << 20) -> bytes:
    return encode(LookupReply(1, instance, "tcp://127.0.0.1:10", heartbeat, size))


def _delay(core: ClientCore, task_id: str) -> None:
    core.pending[task_id] = PendingTask(task_wire(task_id, "add", 2, 0, b"[[1,2],{}]", None))
    core.inbox.append(task_id)
    core.on_wake()


def test_an_outage_longer_than_every_retry_fails_no_task_and_sends_it_again() -> None:
    """A delay()ed id is a promise: 15 s and more without an ack hold the task, never fail it."""
    clock = _Clock()
    core, link = _core(clock)
    core.on_frames([[_lookup()]])
    _delay(core, "t1")
    assert [s.tasks[0][0] for s in link.submits()] == ["t1"]
    for _ in range(400):  # 40 s of ticks: the control plane is frozen, nothing is acknowledged
        clock.now += 0.1
        core.on_tick()
    assert "t1" in core.pending
    assert "t1" not in core.finished
    assert not core.connected  # it gave up on this connection, not on the task
    before = len(link.submits())
    core.on_frames([[_lookup()]])  # the same control plane answers again
    assert len(link.submits()) == before + 1
    last = link.submits()[-1]
    assert [w[0] for w in last.tasks] == ["t1"]
    core.on_frames([[encode(SubmitAck(last.request_id, []))]])
    assert core.outstanding() == 0


@pytest.mark.parametrize("heartbeat", [0.0, -1.0, 1e-6, math.nan, math.inf])
def test_a_lookup_reply_with_an_absurd_heartbeat_cannot_make_the_client_spin(
    heartbeat: float,
) -> None:
    clock = _Clock()
    core, _ = _core(clock)
    core.on_frames([[_lookup(heartbeat=heartbeat)]])
    assert 0.05 <= core.interval <= 60.0


def test_a_lookup_reply_with_an_absurd_limit_is_clamped() -> None:
    clock = _Clock()
    core, link = _core(clock)
    core.on_frames([[_lookup(size=1 << 62)]])
    assert core.max_message_size == 2**31 - 1
    assert core.connected
    assert Channel.GATEWAY in link.endpoints


def test_a_lookup_reply_whose_endpoint_cannot_be_opened_is_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    core, link = _core(clock)

    def refuse(channel: Channel, endpoint: str, max_message_size: int) -> None:
        raise ValueError("libzmq refused it")

    link.open = refuse  # type: ignore[method-assign]
    core.on_frames([[_lookup()]])
    assert not core.connected
    assert "cannot connect" in caplog.text


def test_a_stats_query_refused_as_overloaded_raises_the_busy_error() -> None:
    """More than four statistics queries at the control plane: a clear error to retry on."""
    from fastworker import ControlPlaneBusyError
    from fastworker.client._core import StatsRequest
    from fastworker.wire import ErrorReply, StatsQuery

    class _Waiter:
        value: Any = None

        def set(self, value: Any) -> None:
            self.value = value

    clock = _Clock()
    core, link = _core(clock)
    core.on_frames([[_lookup()]])
    waiter = _Waiter()
    core.inbox.append(StatsRequest(waiter))  # type: ignore[arg-type]
    core.on_wake()
    (query,) = [m for _, m in link.sent if isinstance(m, StatsQuery)]
    refusal = ErrorReply(query.request_id, "overloaded", "4 statistics queries are being answered")
    core.on_frames([[encode(refusal)]])
    assert isinstance(waiter.value, ControlPlaneBusyError)
    assert isinstance(waiter.value, RuntimeError)  # what it was before: callers catching that
