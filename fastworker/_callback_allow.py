"""Which callback addresses the control plane agrees to connect to.

A callback address comes from any client, and the control plane connects to
it: without a rule, every client could make the control plane open
connections to any host and port it can reach.  So an address is delivered to
only when one pattern of the allow-list matches it.  The default allows
loopback only; ``--callback-allow PATTERN`` adds patterns.  The syntax
(design/security.md, "Callbacks, payloads and task ids", has the reasoning):

* ``tcp://HOST:PORT``, where HOST is one of

  - ``*``: any host (IP literal or name);
  - an IPv4 literal, or a glob of it with ``*`` for whole octets
    (``10.0.0.*``, ``10.*.*.*``), or a network (``10.0.0.0/8``);
  - a bracketed IPv6 literal or network (``[::1]``, ``[fd00::/8]``);
  - a host name, where ``*`` matches any run of characters inside one label
    (``*.internal`` matches ``a.internal``, not ``a.b.internal``).

  IP patterns match IP literals only (an IPv4-mapped IPv6 literal as its IPv4
  address) and name patterns names only: ``10.0.0.*`` never matches the name
  ``10.0.0.evil``.  Names compare without case and without a trailing dot.
  PORT is ``*``, a number, or a range ``7000-7099``.
* ``ipc://PATH``: ``*`` matches any run of characters but ``/``, ``**`` any
  run at all (``ipc:///run/app/*``, ``ipc://**``).

``ack+`` is a delivery mode, not a peer: ``ack+tcp://h:1`` is allowed exactly
when ``tcp://h:1`` is, and patterns never carry it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import attrs

from ._callback_address import CallbackAddress, IPAddress

__all__ = ["DEFAULT_CALLBACK_ALLOW", "CallbackAllowList", "check_pattern"]

# Loopback: a callback reaches this machine only, as the control plane's own
# default endpoints do.
DEFAULT_CALLBACK_ALLOW: tuple[str, ...] = (
    "tcp://127.0.0.0/8:*",
    "tcp://[::1]:*",
    "tcp://localhost:*",
)

_NAME_PART = re.compile(r"[a-z0-9*-]+")
_IPV4_GLOB = re.compile(r"(?:\*|[0-9]{1,3})(?:\.(?:\*|[0-9]{1,3})){3}")
_PORT = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


@attrs.frozen
class _Pattern:
    """One compiled pattern; ``text`` is what the operator wrote."""

    text: str
    transport: str
    any_host: bool = False
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    octets: tuple[int | None, ...] | None = None  # IPv4 glob: None for "*"
    regex: re.Pattern[str] | None = None  # host names, or the ipc path
    ports: tuple[int, int] = (1, 65535)

    def matches(self, address: CallbackAddress) -> bool:
        if address.transport != self.transport:
            return False
        if self.transport == "ipc":
            assert self.regex is not None
            return self.regex.fullmatch(address.path) is not None
        low, high = self.ports
        if not low <= address.port <= high:
            return False
        if self.any_host:
            return True
        ip = address.ip
        if ip is None:
            return self.regex is not None and self.regex.fullmatch(address.host) is not None
        return self._matches_ip(ip)

    def _matches_ip(self, ip: IPAddress) -> bool:
        if self.network is not None:
            return ip.version == self.network.version and ip in self.network
        if self.octets is not None and ip.version == 4:
            return all(
                want is None or want == got
                for want, got in zip(self.octets, ip.packed, strict=True)
            )
        return False


def _bad(pattern: str, why: str) -> ValueError:
    return ValueError(f"callback allow pattern {pattern!r}: {why}")


def _tcp_pattern(pattern: str, host: str, ports: tuple[int, int]) -> _Pattern:
    """The pattern for ``tcp://HOST:PORTS``, by the kind of ``host``."""
    if host == "*":
        return _Pattern(pattern, "tcp", any_host=True, ports=ports)
    if host.startswith("[") and host.endswith("]"):
        try:
            net6 = ipaddress.IPv6Network(host[1:-1])
        except ValueError:
            raise _bad(pattern, f"{host} is not an IPv6 address or network") from None
        if net6.network_address.ipv4_mapped is not None:
            raise _bad(pattern, "write an IPv4-mapped address as IPv4")
        return _Pattern(pattern, "tcp", network=net6, ports=ports)
    if "/" in host:
        try:
            net4 = ipaddress.IPv4Network(host)
        except ValueError:
            raise _bad(pattern, f"{host!r} is not an IPv4 network like 10.0.0.0/8") from None
        return _Pattern(pattern, "tcp", network=net4, ports=ports)
    if _IPV4_GLOB.fullmatch(host):
        octets = tuple(None if part == "*" else int(part) for part in host.split("."))
        if any(octet is not None and octet > 255 for octet in octets):
            raise _bad(pattern, f"{host!r} has an octet above 255")
        return _Pattern(pattern, "tcp", octets=octets, ports=ports)
    name = host.rstrip(".").lower()
    labels = name.split(".")
    if not name or not all(_NAME_PART.fullmatch(label) for label in labels):
        raise _bad(pattern, f"{host!r} is not a host name, IP address or network pattern")
    if all(label.replace("*", "").isdigit() for label in labels):
        raise _bad(pattern, f"{host!r} looks like an IPv4 address but is not one")
    body = r"\.".join(re.escape(label).replace(r"\*", "[^.]*") for label in labels)
    return _Pattern(pattern, "tcp", regex=re.compile(body), ports=ports)


def _ports(pattern: str, text: str) -> tuple[int, int]:
    if text == "*":
        return (1, 65535)
    match = _PORT.fullmatch(text)
    if match is None:
        raise _bad(pattern, "the port must be *, a number or a range like 7000-7099")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high <= 65535:
        raise _bad(pattern, "ports run from 1 to 65535, the lower bound first")
    return (low, high)


def _compile(pattern: str) -> _Pattern:
    if not isinstance(pattern, str):
        raise TypeError(f"a callback allow pattern must be a string, not {type(pattern).__name__}")
    if pattern.startswith("ack+"):
        raise _bad(pattern, "drop 'ack+': a pattern allows a peer in both delivery modes")
    scheme, sep, rest = pattern.partition("://")
    if not sep or scheme not in ("tcp", "ipc"):
        raise _bad(pattern, "it must look like 'tcp://HOST:PORT' or 'ipc://PATH'")
    if scheme == "ipc":
        if "\x00" in rest or not (rest == "**" or rest.startswith(("/", "@"))):
            raise _bad(pattern, "the path must be absolute (or @name, or **)")
        body = "".join(
            "[^/]*" if part == "*" else ".*" if part == "**" else re.escape(part)
            for part in re.split(r"(\*\*|\*)", rest)
        )
        return _Pattern(pattern, "ipc", regex=re.compile(body, re.DOTALL))
    host, colon, port = rest.rpartition(":")
    if not colon or not host:
        raise _bad(pattern, "a tcp pattern needs a port: write ':*' for any")
    return _tcp_pattern(pattern, host, _ports(pattern, port))


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is valid; ValueError saying why not (for argparse and configs)."""
    _compile(pattern)
    return pattern


class CallbackAllowList:
    """The compiled allow-list; ``match`` is pure computation, no I/O."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(_compile(pattern) for pattern in patterns)

    def match(self, address: CallbackAddress) -> str | None:
        """The first pattern that allows ``address``, or None."""
        for pattern in self.patterns:
            if pattern.matches(address):
                return pattern.text
        return None
