"""Secure by default: without CURVE keys a control plane listens on loopback only."""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_endpoint"]


def is_loopback_endpoint(address: str) -> bool:
    """True when ``address`` can only be reached from this machine.

    ``ipc://`` and ``inproc://`` are local by nature (ipc's reach is the
    file's permissions).  For ``tcp://`` only a loopback IP literal or
    ``localhost`` counts; a wildcard (``*``, ``0.0.0.0``, ``[::]``), an
    interface name or any other host name does not — its reach is decided
    by DNS or the machine's interfaces, which we do not second-guess.
    """
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or ":" not in rest:
        return False
    host = rest.rsplit(":", 1)[0]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
