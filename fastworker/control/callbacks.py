"""The Callback dispatcher actor: delivers completion documents to callback addresses.

Protocol (fixed, so receivers can be written in any language): we connect a
ZeroMQ PUSH socket to the task's ``callback_address`` and send one frame, the
document encoded in the task's format; the receiver binds a PULL socket.

A slow, absent or broken receiver must never slow the scheduler, so each
address gets its own bounded queue and its own sender task; a document that
cannot be handed to a connected receiver within ``delivery_timeout`` (ZeroMQ
keeps reconnecting meanwhile) is dropped, counted and logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import attrs
import trio
import zmq

from ..runtime import Actor
from ..transport import TransportConfig, open_socket
from ._internal import CallbackJobs

__all__ = ["CallbackConfig", "CallbackDispatcher"]

log = logging.getLogger("fastworker.callbacks")

_SCHEMES = ("tcp://", "ipc://")


@attrs.frozen
class CallbackConfig:
    delivery_timeout: float = 10.0  # per document, while ZeroMQ retries the connection
    max_pending_per_address: int = 10_000
    max_addresses: int = 1024  # addresses with a live sender at once
    idle_close: float = 30.0  # close an address's socket after this long unused
    transport: TransportConfig = TransportConfig()


class CallbackDispatcher(Actor):
    def __init__(self, config: CallbackConfig) -> None:
        super().__init__("callbacks", mailbox_size=4096)
        self.config = config
        self._senders: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self._counts: Counter[str] = Counter()

    async def on_start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._senders.clear()  # after a restart the old sender tasks are gone

    def receive(self, message: Any) -> Any:
        if type(message) is CallbackJobs:
            for address, payload in message.jobs:
                self._enqueue(address, payload)
            return None
        if message == "stats":
            return {
                "sent": self._counts["sent"],
                "dropped": sum(v for k, v in self._counts.items() if k.startswith("dropped")),
                "dropped_by_reason": {
                    k[8:]: v for k, v in self._counts.items() if k.startswith("dropped_")
                },
                "addresses": len(self._senders),
            }
        raise TypeError(f"callback dispatcher got an unexpected message {message!r}")

    def _drop(self, reason: str, address: str, count: int = 1) -> None:
        self._counts[f"dropped_{reason}"] += count
        log.warning("%d callback document(s) to %s dropped (%s)", count, address, reason)

    def _enqueue(self, address: str, payload: bytes) -> None:
        sender = self._senders.get(address)
        if sender is None:
            if not address.startswith(_SCHEMES):
                self._drop("bad_address", address)
                return
            if len(self._senders) >= self.config.max_addresses or self._nursery is None:
                self._drop("too_many_addresses", address)
                return
            sender, receiver = trio.open_memory_channel[bytes](self.config.max_pending_per_address)
            self._senders[address] = sender
            self._nursery.start_soon(self._deliver, address, receiver)
        try:
            sender.send_nowait(payload)
        except trio.WouldBlock:
            self._drop("queue_full", address)

    async def _deliver(self, address: str, inbox: trio.MemoryReceiveChannel[bytes]) -> None:
        """Own one PUSH socket to ``address`` and drain its queue in order."""
        sock = open_socket(zmq.PUSH, self.config.transport)
        try:
            try:
                sock.connect(address)
            except zmq.ZMQError as exc:
                log.warning("bad callback address %s: %s", address, exc)
                self._senders.pop(address, None)
                # Nothing was taken yet: every queued document is dropped (count
                # them before closing, which would hide them).
                self._drop("bad_address", address, _discard_queued(inbox))
                inbox.close()
                return
            while True:
                payload = None
                with trio.move_on_after(self.config.idle_close):
                    payload = await inbox.receive()
                if payload is None:
                    # Idle: retire this address, unless a document raced in.
                    if inbox.statistics().current_buffer_used == 0:
                        self._senders.pop(address, None)
                        inbox.close()
                        return
                    continue
                with trio.move_on_after(self.config.delivery_timeout) as scope:
                    await sock.send_multipart([payload])
                if scope.cancelled_caught:
                    # Nobody took it within the timeout: what waits behind it would
                    # only wait as long again, one by one.  Drop the queue now
                    # (counted), and give later documents a fresh chance.
                    self._drop("unreachable", address, 1 + _discard_queued(inbox))
                else:
                    self._counts["sent"] += 1
        finally:
            sock.close(linger_ms=0)


def _discard_queued(inbox: trio.MemoryReceiveChannel[bytes]) -> int:
    """Empty an address's queue without waiting; how many documents it held."""
    discarded = 0
    while True:
        try:
            inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return discarded
        discarded += 1
