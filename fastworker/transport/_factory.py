"""The one place sockets are created.

Every socket in fastworker comes from :func:`open_socket`, so the options the
rest of the code relies on (ROUTER_MANDATORY, a message-size limit, bounded
queues, a short LINGER) are set in one spot, and CURVE encryption can later be
switched on here for all of them.
"""

from __future__ import annotations

import attrs
import zmq

from ._zsocket import ZSocket

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "TransportConfig", "open_socket", "resolve_endpoint"]

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024


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


def open_socket(
    kind: int,
    config: TransportConfig | None = None,
    *,
    identity: bytes | None = None,
    immediate: bool = True,
    router_handover: bool = False,
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
    """
    cfg = config or TransportConfig()
    ctx = context or zmq.Context.instance()
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
    except BaseException:
        sock.close(linger=0)
        raise
    return ZSocket(sock)


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
