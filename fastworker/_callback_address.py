"""The one rule for callback addresses, shared by the client and the control plane.

A callback address is where the control plane *connects* to deliver a
completion document, so it must name one concrete peer: ``tcp://HOST:PORT``
(HOST an IPv4 literal, a bracketed IPv6 literal or a DNS name; PORT 1-65535)
or ``ipc://PATH`` (an absolute path, or ``@name`` in Linux's abstract
namespace: a relative path would depend on the control plane's working
directory).  Wildcards, interfaces (``tcp://eth0;...``), ``.``/``..`` path
segments and other transports are refused.  Prefixing the scheme with
``ack+`` (``ack+tcp://...``) asks for acknowledged, at-least-once delivery
(design/protocol.md).

Host names are checked for shape only: nothing here resolves a name, so the
check costs no I/O.  Which addresses the control plane agrees to reach is a
separate decision, its allow-list (``_callback_allow.py``).
"""

from __future__ import annotations

import ipaddress
import re

import attrs

__all__ = ["CallbackAddress", "IPAddress", "parse_callback_address"]

_MAX_LENGTH = 1024
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")  # fullmatch: "$" lets a "\n" through
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: str.isdigit() also takes "٣"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class CallbackAddress:
    """A validated callback address.

    ``endpoint`` is what ZeroMQ connects to (after ``ack+``); for a host name
    the control plane resolves ``host`` itself and connects to the IP instead.
    ``host`` is lowercase, without a trailing dot or IPv6 brackets; ``ip`` is
    set when it is a literal (an IPv4-mapped IPv6 literal is its IPv4 address).
    """

    endpoint: str
    ack: bool
    transport: str = "tcp"  # "tcp" or "ipc"
    host: str = ""
    port: int = 0
    path: str = ""
    ip: IPAddress | None = None

    @property
    def is_name(self) -> bool:
        """A DNS name: it must be resolved before connecting."""
        return self.transport == "tcp" and self.ip is None


def _parse_host(host: str, address: str) -> tuple[str, IPAddress | None]:
    """The normalized host and its IP when it is a literal; ValueError saying why not."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"callback address {address!r}: bad IPv6 literal {host}") from None
        if ip6.scope_id is not None:
            raise ValueError(f"callback address {address!r}: IPv6 zone ids are not supported")
        return str(ip6), ip6.ipv4_mapped or ip6
    try:
        ip4 = ipaddress.IPv4Address(host)
        return str(ip4), ip4
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"callback address {address!r}: {host!r} is not a host name or IP address")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"callback address {address!r}: {host!r} is not a valid IPv4 address")
    return host.rstrip(".").lower(), None


def _check_path(path: str, address: str) -> None:
    if not path or "\x00" in path or "*" in path:
        raise ValueError(f"callback address {address!r}: ipc needs a file path")
    if path.startswith("@"):
        return
    if not path.startswith("/"):
        raise ValueError(
            f"callback address {address!r}: the ipc path must be absolute "
            "(a relative one would depend on the control plane's working directory)"
        )
    if any(segment in (".", "..") for segment in path.split("/")):
        raise ValueError(f"callback address {address!r}: '.' and '..' are not allowed in the path")


def parse_callback_address(address: object) -> CallbackAddress:
    """Validate a callback address; raises ValueError (TypeError for a non-string) saying why."""
    if not isinstance(address, str):
        raise TypeError(
            f"callback_address must be a string like 'tcp://127.0.0.1:6000', "
            f"not {type(address).__name__}"
        )
    if len(address) > _MAX_LENGTH:
        raise ValueError(f"callback address is longer than {_MAX_LENGTH} characters")
    ack = address.startswith("ack+")
    endpoint = address[4:] if ack else address
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise ValueError(
            f"callback address {address!r} must look like 'tcp://HOST:PORT' or 'ipc://PATH' "
            "(optionally 'ack+tcp://…' for acknowledged delivery)"
        )
    if scheme == "ipc":
        _check_path(rest, address)
        return CallbackAddress(endpoint, ack, "ipc", path=rest)
    host, colon, port = rest.rpartition(":")
    if not colon or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"callback address {address!r} needs a port from 1 to 65535")
    name, ip = _parse_host(host, address)
    return CallbackAddress(endpoint, ack, "tcp", name, int(port), ip=ip)
