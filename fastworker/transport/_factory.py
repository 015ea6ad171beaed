"""The one place sockets are created.

Every socket in fastworker comes from :func:`open_socket`, so the options the
rest of the code relies on (ROUTER_MANDATORY, a message-size limit, bounded
queues, a short LINGER, CURVE) are set in one spot.
"""

from __future__ import annotations

import attrs
import zmq

from ._zsocket import ZSocket

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "CurveKeys",
    "TransportConfig",
    "open_socket",
    "resolve_endpoint",
]

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_ZAP_ENFORCE_DOMAIN = 93  # ZMQ_ZAP_ENFORCE_DOMAIN (libzmq >= 4.3; pyzmq lists it as draft)


@attrs.frozen(repr=False)
class CurveKeys:
    """One CURVE key pair (Z85 text as bytes, as libzmq's socket options take them)."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # never print a secret key into a log
        return f"CurveKeys(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


@attrs.frozen
class TransportConfig:
    """Socket options shared by every socket of a process.

    ``max_message_size`` maps to ``MAXMSGSIZE``: a peer sending a bigger message
    is disconnected by libzmq before the bytes reach Python.  The high-water
    marks bound what queues in libzmq per peer (messages, and ours are batches).
    """

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    send_hwm: int = 100_000
    recv_hwm: int = 100_000
    linger_ms: int = 0
    heartbeat_ivl_ms: int = 0
    # Sockets that serve (opened with ``zap_domain``: the control plane's
    # ROUTERs) drop a connection that has not finished its ZMTP/CURVE
    # handshake within this time (libzmq's default is 30 s), so idle
    # connections that never greet cannot pile up and exhaust descriptors.
    handshake_ivl_ms: int = 5000
    # CURVE: our own key pair; with it a socket opened with ``zap_domain``
    # is a CURVE server, any other a CURVE client of ``curve_server_key``.
    curve: CurveKeys | None = None
    curve_server_key: bytes | None = None
    # A control plane with CURVE has a context of its own: the ZAP handler's
    # inproc address is one per context, and tests run several in a process.
    context: zmq.Context[zmq.Socket[bytes]] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def secure(self) -> bool:
        return self.curve is not None


def open_socket(
    kind: int,
    config: TransportConfig | None = None,
    *,
    identity: bytes | None = None,
    immediate: bool = True,
    router_handover: bool = False,
    zap_domain: str | None = None,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
) -> ZSocket:
    """Create a configured, non-blocking socket of ``kind`` (``zmq.ROUTER``, ``zmq.DEALER``…).

    ``immediate`` (DEALER and PUSH): queue only to a connected peer, so a send
    before the connection is up raises ``trio.WouldBlock`` instead of waiting
    in ZeroMQ.  Its price: when the connection drops, libzmq discards every
    message received on it that the application has not read yet.  A socket
    whose peer pushes unasked results it must not lose (the client's gateway
    DEALER: the control plane exits right after pushing the last results of a
    graceful stop) passes ``immediate=False``.

    ``router_handover`` (ROUTER): a peer connecting with a routing id that is
    already connected takes it over, instead of being refused until TCP gives
    up on the old, half-open connection.  For ROUTERs whose peers keep their
    id across reconnections (workers, clients).

    ``zap_domain`` (a socket that binds): with ``config.curve`` set, the
    socket is a CURVE server whose peers are checked by the ZAP handler under
    that domain, and each received message ends with the sender's key (see
    ``ZSocket``).  Without it, a config with ``curve`` and ``curve_server_key``
    makes a CURVE client.
    """
    cfg = config or TransportConfig()
    ctx = context or cfg.context or zmq.Context.instance()
    sock: zmq.Socket[bytes] = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_size)
        sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
        sock.setsockopt(zmq.RCVHWM, cfg.recv_hwm)
        if cfg.heartbeat_ivl_ms:
            sock.setsockopt(zmq.HEARTBEAT_IVL, cfg.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, cfg.heartbeat_ivl_ms * 3)
        if kind == zmq.ROUTER:
            # Unroutable messages raise EHOSTUNREACH instead of vanishing.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if router_handover:
                sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if immediate and kind in (zmq.DEALER, zmq.PUSH):
            # Queue only to connected peers, so a dead address cannot swallow messages.
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if zap_domain is not None and cfg.handshake_ivl_ms:
            sock.setsockopt(zmq.HANDSHAKE_IVL, cfg.handshake_ivl_ms)
        curve_server = False
        if cfg.curve is not None and zap_domain is not None:
            curve_server = True
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, cfg.curve.secret)
            sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
            # No ZAP handler answering (not started yet, or gone) refuses the
            # handshake; libzmq's default would let every key in.
            sock.setsockopt(_ZAP_ENFORCE_DOMAIN, 1)
        elif cfg.curve is not None and cfg.curve_server_key is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, cfg.curve_server_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, cfg.curve.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, cfg.curve.secret)
    except BaseException:
        sock.close(linger=0)
        raise
    return ZSocket(sock, with_peer_key=curve_server)


def resolve_endpoint(endpoint: str, discovery_address: str) -> str:
    """An endpoint Discovery handed out, made reachable from here.

    A control plane bound to ``0.0.0.0`` reports that wildcard; the peer
    replaces it by the host it reached Discovery at.
    """
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            host = discovery_address[6:].rsplit(":", 1)[0]
            return f"tcp://{host}:{endpoint[len(wildcard) :]}"
    return endpoint
