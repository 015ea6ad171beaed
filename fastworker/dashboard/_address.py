"""``--http-address HOST:PORT`` and the bind rule, with no optional dependency imported.

The dashboard has no authentication of its own and can cancel tasks, so it
binds a loopback address unless the operator says ``insecure`` (``--insecure``
on the node): the node and ``ControlPlaneConfig`` check this before anything
is bound.
"""

from __future__ import annotations

import ipaddress

__all__ = ["HttpStartError", "check_http_address", "is_loopback", "parse_http_address"]


class HttpStartError(Exception):
    """The HTTP side cannot start: its address cannot be served, or the extra is missing."""


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6; port 0 picks a free one) → (host, port).

    Raises ValueError saying what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, [{host}]:{port_text}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"the port of {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"the port of {text!r} is not between 0 and 65535")
    return host, port


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP; any other host name may resolve to anything."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_http_address(text: str, *, insecure: bool) -> tuple[str, int]:
    """Parse ``text`` and refuse a non-loopback host unless ``insecure``."""
    host, port = parse_http_address(text)
    if not insecure and not is_loopback(host):
        raise ValueError(
            f"--http-address {text}: the dashboard has no authentication and can cancel "
            "tasks; bind a loopback address (127.0.0.1, [::1], localhost) or pass --insecure"
        )
    return host, port
