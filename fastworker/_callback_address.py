"""The one rule for callback addresses, shared by the client and the control plane.

A callback address is where the control plane *connects* to deliver a
completion document, so it must name one concrete peer: ``tcp://HOST:PORT``
(HOST an IPv4 literal, a bracketed IPv6 literal or a DNS name; PORT 1-65535)
or ``ipc://PATH``.  Wildcards, interfaces (``tcp://eth0;...``) and other
transports are refused.  Prefixing the scheme with ``ack+`` (``ack+tcp://...``)
asks for acknowledged, at-least-once delivery (design/protocol.md).

Host names are checked for shape only: nothing here resolves a name, so the
check costs no I/O on the control plane's loop.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

__all__ = ["CallbackAddress", "parse_callback_address"]

_MAX_LENGTH = 1024
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@attrs.frozen
class CallbackAddress:
    """A validated callback address: ``endpoint`` is what ZeroMQ connects to."""

    endpoint: str
    ack: bool


def _check_host(host: str, address: str) -> None:
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"callback address {address!r}: bad IPv6 literal {host}") from None
        return
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"callback address {address!r}: {host!r} is not a host name or IP address")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"callback address {address!r}: {host!r} is not a valid IPv4 address")


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
        if not rest or "\x00" in rest or "*" in rest:
            raise ValueError(f"callback address {address!r}: ipc needs a file path")
        return CallbackAddress(endpoint, ack)
    host, colon, port = rest.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"callback address {address!r} needs a port from 1 to 65535")
    _check_host(host, address)
    return CallbackAddress(endpoint, ack)
