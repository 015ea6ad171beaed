"""The Callback dispatcher actor: delivers completion documents to callback addresses.

Two modes, chosen by the address (design/protocol.md §6 has the frames):

* ``tcp://`` / ``ipc://`` (plain): we connect a PUSH socket and send one
  frame, the document; the receiver binds a PULL socket.  At most once:
  "handed to ZeroMQ" is all we can know, and ZeroMQ discards what it still
  queues for a connection that drops.
* ``ack+tcp://`` / ``ack+ipc://`` (acknowledged): we connect a DEALER and
  send ``[delivery id, document]``; the receiver binds a ROUTER and answers
  ``[delivery id]``.  We re-send every ``resend_interval`` until it does or
  ``delivery_timeout`` runs out (then counted as dropped): at least once, and
  :class:`fastworker.CallbackReceiver` removes the duplicates.

A slow, absent or broken receiver must never slow the scheduler, so each
address gets its own bounded queue and its own sender task; what cannot be
delivered within ``delivery_timeout`` is dropped, counted and logged.

Addresses come from any client, so only those the allow-list matches are
reached (``_callback_allow.py``; refused ones are dropped and counted
``not_allowed``).  A host name is resolved here, in a thread, within
``resolve_timeout``, and the socket connects to the IP: libzmq would resolve
it synchronously in its I/O thread, stalling every socket of the process.
"""

from __future__ import annotations

import itertools
import logging
import socket
import uuid
from collections import Counter
from typing import Any

import attrs
import trio
import zmq
from zmq.utils import z85

from .._callback_address import CallbackAddress, parse_callback_address
from .._callback_allow import DEFAULT_CALLBACK_ALLOW, CallbackAllowList
from ..runtime import Actor, GetStatistics
from ..transport import CurveKeys, TransportConfig, ZSocket, open_socket
from ._internal import CallbackJobs

__all__ = ["CallbackConfig", "CallbackDispatcher"]

log = logging.getLogger("fastworker.callbacks")

_MAX_RESOLVED = 4  # addresses of one host name we connect to


@attrs.frozen
class CallbackConfig:
    delivery_timeout: float = 10.0  # per document, while ZeroMQ retries the connection
    max_pending_per_address: int = 10_000
    # Bytes of documents waiting to be sent, or sent and not yet acknowledged, over
    # every address: 10 000 per address x 256 addresses of results up to a message
    # each would otherwise be unbounded in practice.  Past it, new documents drop.
    max_held_bytes: int = 256 << 20
    # Addresses with a live sender (one ZeroMQ socket each) at once: well under
    # libzmq's 1023 sockets per context, which every other socket shares.
    max_addresses: int = 256
    idle_close: float = 30.0  # close an address's socket after this long unused
    resend_interval: float = 1.0  # ack mode: re-send an unacknowledged document this often
    ack_window: int = 256  # ack mode: documents sent and not yet acknowledged, per address
    transport: TransportConfig = TransportConfig()
    allow: tuple[str, ...] = DEFAULT_CALLBACK_ALLOW  # patterns of addresses we may connect to
    resolve_timeout: float = 5.0  # a host name that does not resolve in time: its documents drop


class CallbackDispatcher(Actor):
    def __init__(self, config: CallbackConfig) -> None:
        super().__init__("callbacks", mailbox_size=4096)
        self.config = config
        self._allow = CallbackAllowList(config.allow)  # a bad pattern fails here, at start
        self._senders: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._nursery: trio.Nursery | None = None
        self._counts: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()  # by reason
        self._held_bytes = 0  # documents queued, or sent and waiting for their ack
        # Delivery ids: unique per control-plane process, never reused.
        self._id_prefix = uuid.uuid4().hex[:16].encode()
        self._ids = itertools.count(1)
        # Our CURVE pair towards receivers with a key: the control plane's own, or one made
        # for this dispatcher when the control plane runs without CURVE.
        self._own_keys: CurveKeys | None = None

    async def on_start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._senders.clear()  # after a restart the old sender tasks are gone
        self._held_bytes = 0  # ... and the documents they held

    def receive(self, message: Any) -> Any:
        if type(message) is CallbackJobs:
            # One log line per refused address and reason per batch, not per
            # document: a client's burst to a refused address must not flood the log.
            refused: Counter[tuple[str, str, str]] = Counter()
            for address, payload, key in message.jobs:
                refusal = self._enqueue(address, payload, key)
                if refusal is not None:
                    refused[refusal] += 1
            for (reason, address, detail), count in refused.items():
                self._drop(reason, address, count, detail)
            return None
        if type(message) is GetStatistics:
            return {
                "handed_to_zmq": self._counts["handed_to_zmq"],
                "acknowledged": self._counts["acknowledged"],
                "resent": self._counts["resent"],
                "dropped": self._dropped.total(),
                "dropped_by_reason": dict(self._dropped),
                "addresses": len(self._senders),
                "held_bytes": self._held_bytes,
            }
        raise TypeError(f"callback dispatcher got an unexpected message {message!r}")

    def _drop(self, reason: str, address: str, count: int = 1, detail: str = "") -> None:
        if count:
            self._dropped[reason] += count
            log.warning(
                "%d callback document(s) to %r dropped (%s%s)",
                count,
                address if len(address) <= 200 else address[:200] + "…",
                reason,
                f": {detail}" if detail else "",
            )

    def _enqueue(
        self, address: str, payload: bytes, key: bytes | None = None
    ) -> tuple[str, str, str] | None:
        """Queue ``payload`` for ``address``; a refusal to count is returned, not counted.

        With ``key`` (the receiver's CURVE public key) the document goes over a
        CURVE connection of its own: one sender per address and key, so a
        document never travels in clear to an address another task gave a key.
        """
        slot = address if key is None else f"{address}\x00{key.hex()}"
        if self._held_bytes + len(payload) > self.config.max_held_bytes:
            detail = f"callback documents hold {self._held_bytes} bytes, the limit"
            return ("queue_full", address, detail)
        sender = self._senders.get(slot)
        if sender is None:
            try:
                parsed = parse_callback_address(address)
            except (TypeError, ValueError) as exc:
                return ("bad_address", address, str(exc))
            if self._allow.match(parsed) is None:
                return ("not_allowed", address, "no --callback-allow pattern matches it")
            if len(self._senders) >= self.config.max_addresses or self._nursery is None:
                return ("too_many_addresses", address, "")
            if key is not None and len(key) != 32:
                return ("bad_address", address, "a CURVE key (option cbk) must be 32 bytes")
            sender, receiver = trio.open_memory_channel[bytes](self.config.max_pending_per_address)
            self._senders[slot] = sender
            self._nursery.start_soon(self._deliver, address, parsed, receiver, key, slot)
        try:
            sender.send_nowait(payload)
        except trio.WouldBlock:
            return ("queue_full", address, "")
        self._held_bytes += len(payload)
        return None

    def _release(self, payload: bytes) -> None:
        self._held_bytes -= len(payload)

    def _discard_queued(self, inbox: trio.MemoryReceiveChannel[bytes]) -> int:
        "Empty an address's queue without waiting; how many documents it held."
        discarded = 0
        while True:
            try:
                self._release(inbox.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return discarded
            discarded += 1

    async def _deliver(
        self,
        address: str,
        parsed: CallbackAddress,
        inbox: trio.MemoryReceiveChannel[bytes],
        key: bytes | None = None,
        slot: str | None = None,
    ) -> None:
        """Own one socket to ``address`` and drain its queue in order."""
        slot = slot or address
        endpoints = [parsed.endpoint]
        if parsed.is_name:
            endpoints = []  # stays so when the name does not resolve in time
            with trio.move_on_after(self.config.resolve_timeout):
                endpoints = await _resolve(parsed)
            if not endpoints:
                self._give_up(slot, inbox, "unresolved", address)
                return
        try:
            sock = open_socket(zmq.DEALER if parsed.ack else zmq.PUSH, self._transport(key))
        except zmq.ZMQError as exc:
            # Out of sockets or file descriptors: these documents cannot go now,
            # and the dispatcher must live on (counted, never silent).
            log.warning("no socket for callback address %s: %s", address, exc)
            self._give_up(slot, inbox, "no_socket", address)
            return
        try:
            try:
                if any("[" in endpoint for endpoint in endpoints):
                    sock.zmq_socket.setsockopt(zmq.IPV6, 1)
                for endpoint in endpoints:
                    sock.connect(endpoint)
            except zmq.ZMQError as exc:
                log.warning("bad callback address %s: %s", address, exc)
                self._give_up(slot, inbox, "bad_address", address)
                return
            if parsed.ack:
                await _AckedDelivery(self, address, sock, inbox, slot).run()
            else:
                await self._deliver_plain(address, sock, inbox, slot)
        finally:
            sock.close(linger_ms=0)

    def _transport(self, key: bytes | None) -> TransportConfig:
        """Plain, or a CURVE client of the receiver's ``key``: with the control plane's own
        pair when it has one, else a pair made for this dispatcher."""
        transport = self.config.transport
        if key is None:
            return attrs.evolve(transport, curve_server_key=None)
        if self._own_keys is None:
            self._own_keys = transport.curve or CurveKeys.generate()
        return attrs.evolve(transport, curve=self._own_keys, curve_server_key=z85.encode(key))

    def _give_up(
        self,
        slot: str,
        inbox: trio.MemoryReceiveChannel[bytes],
        reason: str,
        address: str | None = None,
    ) -> None:
        """Drop every queued document of ``slot`` (counted before closing, which
        would hide them) and retire its sender."""
        self._senders.pop(slot, None)
        self._drop(reason, address or slot, self._discard_queued(inbox))
        inbox.close()

    def _retire(self, slot: str, inbox: trio.MemoryReceiveChannel[bytes]) -> bool:
        """An idle address gives up its sender, unless a document raced in."""
        if inbox.statistics().current_buffer_used:
            return False
        self._senders.pop(slot, None)
        inbox.close()
        return True

    async def _deliver_plain(
        self,
        address: str,
        sock: ZSocket,
        inbox: trio.MemoryReceiveChannel[bytes],
        slot: str,
    ) -> None:
        while True:
            payload = None
            with trio.move_on_after(self.config.idle_close):
                payload = await inbox.receive()
            if payload is None:
                if self._retire(slot, inbox):
                    return
                continue
            self._release(payload)  # out of the queue: one per address from here on
            with trio.move_on_after(self.config.delivery_timeout) as scope:
                await sock.send_multipart([payload])
            if scope.cancelled_caught:
                # Nobody took it within the timeout: what waits behind it would
                # only wait as long again, one by one.  Drop the queue now
                # (counted), and give later documents a fresh chance.
                self._drop("unreachable", address, 1 + self._discard_queued(inbox))
                if self._retire(slot, inbox):
                    return  # its socket goes back at once: dead addresses must not starve live ones
            else:
                self._counts["handed_to_zmq"] += 1

    def _new_delivery_id(self) -> bytes:
        return b"%s-%x" % (self._id_prefix, next(self._ids))


class _AckedDelivery:
    """Ack mode for one address: a window of documents re-sent until acknowledged.

    Two tasks share this object: ``run`` (takes documents, sends, re-sends,
    expires) and ``_read_acks``; an ack wakes ``run`` by cancelling its wait.
    """

    def __init__(
        self,
        dispatcher: CallbackDispatcher,
        address: str,
        sock: ZSocket,
        inbox: trio.MemoryReceiveChannel[bytes],
        slot: str,
    ) -> None:
        self._dispatcher = dispatcher
        self._config = dispatcher.config
        self._counts = dispatcher._counts
        self._address = address
        self._slot = slot  # its key among the dispatcher's senders
        self._sock = sock
        self._inbox = inbox
        # delivery id -> [document, deadline, next re-send]; oldest first.
        self._outstanding: dict[bytes, list[Any]] = {}
        self._wait: trio.CancelScope | None = None
        # A new address's first send fails (not connected yet): with a timeout no
        # longer than the re-send interval, the document was dropped before its
        # first re-send ever went.  Four tries fit in any timeout.
        self._resend = min(self._config.resend_interval, self._config.delivery_timeout / 4)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_acks)
            await self._send_loop()
            nursery.cancel_scope.cancel()

    async def _send_loop(self) -> None:
        config = self._config
        outstanding = self._outstanding
        idle_since = trio.current_time()
        while True:
            now = trio.current_time()
            if outstanding and next(iter(outstanding.values()))[1] <= now:
                # The oldest was not acknowledged in time: as in plain mode, what
                # waits behind it would only wait as long again.  Drop it all.
                for entry in outstanding.values():
                    self._dispatcher._release(entry[0])
                dropped = len(outstanding) + self._dispatcher._discard_queued(self._inbox)
                outstanding.clear()
                self._dispatcher._drop("unacknowledged", self._address, dropped)
            for delivery_id, entry in outstanding.items():
                if entry[2] <= now:
                    entry[2] = now + self._resend
                    if self._send(delivery_id, entry[0]):
                        self._counts["resent"] += 1
            while len(outstanding) < config.ack_window:
                try:
                    payload = self._inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                self._take(payload, now)
            if outstanding:
                idle_since = now
                oldest = next(iter(outstanding.values()))[1]
                wake_at = min(oldest, *(entry[2] for entry in outstanding.values()))
            else:
                wake_at = idle_since + config.idle_close
            taken: bytes | None = None
            with trio.CancelScope(deadline=wake_at) as scope:
                self._wait = scope
                if len(outstanding) < config.ack_window:
                    taken = await self._inbox.receive()
                else:
                    await trio.sleep_forever()
            self._wait = None
            if taken is not None:
                self._take(taken, trio.current_time())
            elif (
                not outstanding
                and trio.current_time() >= wake_at
                and self._dispatcher._retire(self._slot, self._inbox)
            ):
                return

    def _take(self, payload: bytes, now: float) -> None:
        delivery_id = self._dispatcher._new_delivery_id()
        deadline = now + self._config.delivery_timeout
        self._outstanding[delivery_id] = [payload, deadline, now + self._resend]
        self._send(delivery_id, payload)

    def _send(self, delivery_id: bytes, payload: bytes) -> bool:
        # False when not connected (IMMEDIATE) or full: the re-send timer retries.
        return self._sock.try_send([delivery_id, payload])

    async def _read_acks(self) -> None:
        while True:
            frames = await self._sock.recv_batch()
            acked = 0
            for parts in frames:
                entry = self._outstanding.pop(parts[0], None) if len(parts) == 1 else None
                if entry is not None:
                    self._dispatcher._release(entry[0])
                    acked += 1
            if acked:
                self._counts["acknowledged"] += acked
                if self._wait is not None:
                    self._wait.cancel()  # room in the window: take more


async def _resolve(parsed: CallbackAddress) -> list[str]:
    """Endpoints for the addresses ``parsed``'s host name resolves to (in a thread).

    All of them (up to ``_MAX_RESOLVED``), since a name like ``localhost`` has
    an IPv4 and an IPv6 address and the receiver may listen on one only: the
    socket connects to each, and sends only where a connection came up.
    """
    try:
        infos = await trio.socket.getaddrinfo(parsed.host, parsed.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.warning("callback host %r does not resolve: %s", parsed.host, exc)
        return []
    endpoints: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        if family == socket.AF_INET:
            endpoint = f"tcp://{ip}:{parsed.port}"
        elif family == socket.AF_INET6 and "%" not in ip:  # no link-local zones
            endpoint = f"tcp://[{ip}]:{parsed.port}"
        else:
            continue
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    if not endpoints:
        log.warning("callback host %r has no usable address", parsed.host)
    return endpoints[:_MAX_RESOLVED]
