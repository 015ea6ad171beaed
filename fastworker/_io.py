"""Socket reader tasks: the bridge from a socket into its owner actor's mailbox."""

from __future__ import annotations

import attrs
import trio

from .runtime import ActorRef
from .transport import ZSocket

__all__ = ["Inbound", "pump_socket"]


@attrs.frozen
class Inbound:
    """Frames a socket reader took in one wake-up, for its own actor's loop."""

    frames: list[list[bytes]]
    sock: ZSocket | None = None  # which socket, for actors that own several


async def pump_socket(
    sock: ZSocket, owner: ActorRef, max_batch: int = 1024, *, tag: bool = False
) -> None:
    """Forward every ready frame of ``sock`` to ``owner`` as one Inbound per wake-up.

    ``send`` waits when the owner's mailbox is full: we stop reading, ZeroMQ's
    queues fill, and TCP pushes back on the peers.  That is the backpressure
    path; nothing is dropped here.  Returns when the owner closes the socket.
    """
    origin = sock if tag else None
    while True:
        try:
            frames = await sock.recv_batch(max_batch)
        except trio.ClosedResourceError:
            return
        await owner.send(Inbound(frames, origin))
