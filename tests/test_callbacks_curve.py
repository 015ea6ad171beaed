"""Callback documents over CURVE: ``callback_server_key`` with a receiver that holds the key.

Without the option a document travels in clear (design/security.md); with
it the control plane connects as a CURVE client of the receiver's key, so
only the holder of the matching secret key can take the document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from fastworker import CallbackReceiver, Client, Cluster, CurveKeys, task
from fastworker.security import generate_certificate

pytestmark = pytest.mark.timeout(30)


@task(name="curve_add")
def add(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize("control_plane_curve", [False, True], ids=["plain-cp", "curve-cp"])
@pytest.mark.parametrize("ack", [False, True], ids=["push", "ack"])
async def test_a_document_reaches_a_curve_receiver_given_its_key(
    control_plane_curve: bool, ack: bool, tmp_path: Any
) -> None:
    options: dict[str, Any] = {}
    client_options: dict[str, Any] = {}
    if control_plane_curve:
        server, clients = tmp_path / "server", tmp_path / "clients"
        generate_certificate("server", server)
        public, secret = generate_certificate("client", tmp_path / "client")
        clients.mkdir()
        public.rename(clients / public.name)  # a secret key there is refused
        options = {"curve": CurveKeys.generate(), "client_keys_dir": clients}
        client_options = {
            "curve_secret_key": str(secret),
            "curve_server_key": options["curve"].public,
        }
    receiver = CallbackReceiver(
        ("ack+" if ack else "") + "tcp://127.0.0.1:*", curve_secret_key=CurveKeys.generate()
    )
    assert receiver.public_key is not None
    with receiver, trio.fail_after(20):
        async with (
            Cluster(tasks=[add], **options) as cluster,
            Client(discovery_address=cluster.discovery_address, **client_options) as client,
        ):
            task_id = await client.delay_with_callback(
                "curve_add",
                2,
                3,
                callback_address=receiver.address,
                callback_data={"k": "v"},
                callback_server_key=receiver.public_key,
            )
            document = receiver.decode(await receiver.receive())
    assert document["task_id"] == task_id
    assert document["result"] == 5
    assert document["callback_data"] == {"k": "v"}


async def test_a_curve_receiver_gets_nothing_sent_without_its_key_or_with_another(
    poll_until: Callable[..., Awaitable[Any]], tmp_path: Any
) -> None:
    receiver = CallbackReceiver("tcp://127.0.0.1:*", curve_secret_key=CurveKeys.generate())
    generate_certificate("other", tmp_path)
    with receiver, trio.fail_after(20):
        async with (
            Cluster(tasks=[add], callback_timeout=0.5) as cluster,
            Client(discovery_address=cluster.discovery_address) as client,
        ):
            await client.delay_with_callback("curve_add", 1, 1, callback_address=receiver.address)
            await client.delay_with_callback(
                "curve_add",
                1,
                2,
                callback_address=receiver.address,
                callback_server_key=tmp_path / "other.key",
            )
            await client.join()
            stats = await poll_until(
                client.stats, lambda s: s["callbacks"]["dropped"] >= 2, timeout=10
            )
            assert stats["callbacks"]["handed_to_zmq"] == 0
            with trio.move_on_after(0.3) as nothing:
                await receiver.receive()
            assert nothing.cancelled_caught


async def test_callback_server_key_is_checked_at_the_call(tmp_path: Any) -> None:
    async with (
        Cluster(tasks=[add]) as cluster,
        Client(discovery_address=cluster.discovery_address) as client,
    ):
        with pytest.raises(ValueError, match="goes with a callback address"):
            await client.apply_async("curve_add", (1, 2), callback_server_key="x" * 40)
        with pytest.raises(ValueError, match=r"Z85|CURVE"):
            await client.delay_with_callback(
                "curve_add",
                1,
                2,
                callback_address="tcp://127.0.0.1:9",
                callback_server_key="#" * 40,
            )
