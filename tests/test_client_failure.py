"""A client whose actor keeps crashing fails loudly, releases its callers, spares the run."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from fastworker import Client, ClientError
from fastworker.client import _core

pytestmark = pytest.mark.timeout(30)


async def test_a_client_actor_past_its_restart_limit_fails_without_killing_the_trio_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_tick(self: Any) -> None:
        raise RuntimeError("tick handler broken")

    # Nobody listens at this address: the client only ticks, and every tick crashes it.
    monkeypatch.setattr(_core.ClientCore, "_on_tick", broken_tick)
    client = Client(discovery_address="tcp://127.0.0.1:9")
    await client.start()
    # The waiting caller is released with the reason, not left to its 15 s timeout.
    with trio.fail_after(10), pytest.raises(ClientError, match="tick handler broken"):
        await client.submit_task("anything", timeout=15)
    with pytest.raises(ClientError, match="tick handler broken"):
        await client.delay("anything")
    client.stop()
    await trio.lowlevel.checkpoint()  # the run goes on


def test_the_same_under_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    def broken_tick(self: Any) -> None:
        raise RuntimeError("tick handler broken")

    monkeypatch.setattr(_core.ClientCore, "_on_tick", broken_tick)

    async def main() -> None:
        client = Client(discovery_address="tcp://127.0.0.1:9")
        await client.start()
        with pytest.raises(ClientError, match="tick handler broken"):
            await asyncio.wait_for(client.submit_task("anything", timeout=15), 10)
        with pytest.raises(ClientError, match="tick handler broken"):
            await client.delay("anything")
        client.stop()

    asyncio.run(main())
