"""The ZAP handler: a trio actor that answers libzmq's authentication requests.

libzmq asks ``inproc://zeromq.zap.01`` of the socket's context whether a
CURVE peer may complete its handshake (ZeroMQ RFC 27).  The checks are
pyzmq's own (``zmq.auth.base.Authenticator``); what is ours is the socket
loop — the requests arrive through our trio adapter into this actor's
mailbox, rather than on a thread of pyzmq's — and the policy: a
:class:`KeyRing` says which keys may connect to which domain.

Our ZAP socket is a ROUTER rather than the usual REP, so that a burst of
handshakes is read as one batch: libzmq's requests carry the empty delimiter
frame REP would strip, and we add it back to each reply.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import attrs
import trio
import zmq
from zmq.auth.base import Authenticator

from .._io import Inbound, pump_socket
from ..runtime import Actor, GetStatistics
from ..transport import TransportConfig, ZSocket, open_socket
from ._certs import CertificateError
from ._keyring import CLIENT, DISCOVERY, WORKER, KeyRing

__all__ = ["ZAP_ENDPOINT", "ReloadKeys", "ZapHandler"]

log = logging.getLogger("fastworker.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@attrs.frozen
class ReloadKeys:
    """Read the certificate directories again (the node's SIGHUP)."""


class _ReplySocket:
    """What ``Authenticator._send_zap_reply`` writes to: our ROUTER, with the envelope."""

    def __init__(self) -> None:
        self.sock: ZSocket | None = None
        self.envelope: list[bytes] = []
        self.dropped = 0
        self.outcomes: Counter[str] = Counter()

    def send_multipart(self, reply: list[bytes]) -> None:
        if self.sock is None:
            return
        self.outcomes["accepted" if reply[2] == b"200" else "refused"] += 1
        if not self.sock.try_send([*self.envelope, *reply]):
            # The handshake waiting for it times out and the peer retries.
            self.dropped += 1


class _Authenticator(Authenticator):
    """pyzmq's checks with only CURVE admitted, whatever the mechanism asked."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and msg[5] != b"CURVE":
            self._send_zap_reply(msg[1], b"400", b"only CURVE is accepted")
            return
        await super().handle_zap_message(msg)


class ZapHandler(Actor):
    """Answers every ZAP request of one zmq context, from a :class:`KeyRing`.

    It must run before any CURVE server socket of the context binds and
    until the last one closes: the control plane starts it first and stops
    it last.  A handshake that finds no handler is refused, not let in, as
    every server socket sets ``ZAP_ENFORCE_DOMAIN``.
    """

    def __init__(self, keys: KeyRing, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        super().__init__("zap", mailbox_size=1024)
        self.keys = keys
        self._context = context
        self._reply = _ReplySocket()
        self._auth = _Authenticator(context, log=log)
        for domain in (CLIENT, WORKER, DISCOVERY):
            self._auth.configure_curve_callback(domain, keys)
        self._auth.zap_socket = self._reply  # type: ignore[assignment]

    async def on_start(self, nursery: trio.Nursery) -> None:
        sock = open_socket(zmq.ROUTER, TransportConfig(), context=self._context)
        sock.bind(ZAP_ENDPOINT)
        self._reply.sock = sock
        nursery.start_soon(pump_socket, sock, self.ref)

    async def on_stop(self) -> None:
        if self._reply.sock is not None:
            self._reply.sock.close()
            self._reply.sock = None

    def receive(self, message: Any) -> Any:
        if type(message) is Inbound:
            for parts in message.frames:
                self._answer(parts)
        elif type(message) is ReloadKeys:
            try:
                self.keys.reload()
            except CertificateError as exc:
                log.error("CURVE keys not reloaded, the old ones stay in force: %s", exc)
                return False
            return True
        elif type(message) is GetStatistics:
            return {
                "handshakes": dict(self._reply.outcomes),
                "replies_dropped": self._reply.dropped,
                "client_keys": len(self.keys.clients),
                "worker_keys": len(self.keys.workers),
            }
        else:
            raise TypeError(f"zap got an unexpected message {message!r}")
        return None

    def _answer(self, parts: list[bytes]) -> None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism, creds…]
        if len(parts) < 3 or parts[1] != b"":
            self._reply.outcomes["malformed"] += 1
            return
        self._reply.envelope = parts[:2]
        request = parts[2:]
        coro = self._auth.handle_zap_message(request)
        try:
            coro.send(None)
        except StopIteration:
            pass
        except Exception:
            log.exception("ZAP request failed; refused")
            if len(request) >= 2:
                self._auth._send_zap_reply(request[1], b"500", b"internal error")
        else:  # our credentials provider never awaits; refuse rather than hang
            coro.close()
            if len(request) >= 2:
                self._auth._send_zap_reply(request[1], b"500", b"internal error")
