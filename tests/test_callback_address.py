"""Callback addresses: one rule, clear errors, no name resolution; the allow-list's patterns."""

from __future__ import annotations

import ipaddress

import pytest

from fastworker._callback_address import CallbackAddress, parse_callback_address
from fastworker._callback_allow import DEFAULT_CALLBACK_ALLOW, CallbackAllowList, check_pattern


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        (
            "tcp://127.0.0.1:6000",
            CallbackAddress(
                "tcp://127.0.0.1:6000",
                False,
                "tcp",
                "127.0.0.1",
                6000,
                ip=ipaddress.IPv4Address("127.0.0.1"),
            ),
        ),
        (
            "tcp://Receiver.Example.COM.:1",
            CallbackAddress(
                "tcp://Receiver.Example.COM.:1", False, "tcp", "receiver.example.com", 1
            ),
        ),
        (
            "tcp://[::1]:65535",
            CallbackAddress(
                "tcp://[::1]:65535", False, "tcp", "::1", 65535, ip=ipaddress.IPv6Address("::1")
            ),
        ),
        (
            "ipc:///tmp/cb.sock",
            CallbackAddress("ipc:///tmp/cb.sock", False, "ipc", path="/tmp/cb.sock"),
        ),
        (
            "ipc://@app-callbacks",
            CallbackAddress("ipc://@app-callbacks", False, "ipc", path="@app-callbacks"),
        ),
        (
            "ack+tcp://127.0.0.1:6000",
            CallbackAddress(
                "tcp://127.0.0.1:6000",
                True,
                "tcp",
                "127.0.0.1",
                6000,
                ip=ipaddress.IPv4Address("127.0.0.1"),
            ),
        ),
    ],
)
def test_valid_addresses_are_accepted(address: str, parsed: CallbackAddress) -> None:
    assert parse_callback_address(address) == parsed


def test_an_ipv4_mapped_ipv6_literal_is_its_ipv4_address() -> None:
    parsed = parse_callback_address("tcp://[::ffff:10.1.2.3]:7000")
    assert parsed.ip == ipaddress.IPv4Address("10.1.2.3")
    assert not parsed.is_name


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:6000",
        "udp://127.0.0.1:6000",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:70000",
        "tcp://127.0.0.1:٣٣",
        "tcp://127.0.0.1:*",
        "tcp://*:6000",
        "tcp://eth0;127.0.0.1:6000",
        "tcp://:6000",
        "tcp://999.1.1.1:6000",
        "tcp://[::zz]:6000",
        "tcp://[fe80::1%eth0]:6000",
        "tcp://bad_host!:6000",
        "tcp://host\n:6000",
        "ipc://",
        "ipc://relative/cb.sock",
        "ipc:///run/app/../secret.sock",
        "ack+udp://h:1",
        "tcp://h:" + "1" * 2000,
    ],
)
def test_invalid_addresses_are_refused_with_a_reason(address: str) -> None:
    with pytest.raises(ValueError, match="callback address"):
        parse_callback_address(address)


def test_a_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="callback_address must be a string"):
        parse_callback_address(6000)


def _allowed(patterns: tuple[str, ...], address: str) -> bool:
    return CallbackAllowList(patterns).match(parse_callback_address(address)) is not None


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("tcp://127.0.0.1:6000", True),
        ("tcp://127.255.0.9:1", True),
        ("ack+tcp://127.0.0.1:6000", True),
        ("tcp://[::1]:6000", True),
        ("tcp://[0:0::1]:6000", True),
        ("tcp://[::ffff:127.0.0.1]:6000", True),
        ("tcp://localhost:6000", True),
        ("tcp://LOCALHOST.:6000", True),
        ("tcp://10.0.0.1:6000", False),
        ("tcp://128.0.0.1:6000", False),
        ("tcp://[::2]:6000", False),
        ("tcp://localhost.evil.com:6000", False),
        ("tcp://mylocalhost:6000", False),
        ("ipc:///tmp/cb.sock", False),
    ],
)
def test_the_default_allows_loopback_only(address: str, allowed: bool) -> None:
    assert _allowed(DEFAULT_CALLBACK_ALLOW, address) is allowed


@pytest.mark.parametrize(
    ("pattern", "address", "allowed"),
    [
        # IPv4 globs: whole octets, IP literals only.
        ("tcp://10.0.0.*:*", "tcp://10.0.0.7:7000", True),
        ("tcp://10.0.0.*:*", "ack+tcp://10.0.0.255:1", True),
        ("tcp://10.0.0.*:*", "tcp://10.0.1.7:7000", False),
        ("tcp://10.0.0.*:*", "tcp://10.0.0.evil:7000", False),
        ("tcp://10.*.*.*:*", "tcp://10.200.3.4:9", True),
        ("tcp://10.0.0.*:*", "tcp://[::ffff:10.0.0.9]:7000", True),
        # Networks.
        ("tcp://10.0.0.0/8:*", "tcp://10.250.1.1:80", True),
        ("tcp://10.0.0.0/8:*", "tcp://11.0.0.1:80", False),
        ("tcp://[fd00::/8]:*", "tcp://[fd12:3456::1]:80", True),
        ("tcp://[fd00::/8]:*", "tcp://[fe80::1]:80", False),
        ("tcp://[fd00::/8]:*", "tcp://253.0.0.1:80", False),
        ("tcp://[2001:db8::7]:443", "tcp://[2001:DB8:0::7]:443", True),
        # Ports.
        ("tcp://10.0.0.1:7000", "tcp://10.0.0.1:7000", True),
        ("tcp://10.0.0.1:7000", "tcp://10.0.0.1:7001", False),
        ("tcp://10.0.0.1:7000-7099", "tcp://10.0.0.1:7099", True),
        ("tcp://10.0.0.1:7000-7099", "tcp://10.0.0.1:7100", False),
        ("tcp://10.0.0.1:7000-7099", "tcp://10.0.0.1:6999", False),
        # Names: case and a trailing dot do not matter; * stays inside one label.
        ("tcp://*.internal:7000", "tcp://api.internal:7000", True),
        ("tcp://*.internal:7000", "tcp://API.Internal.:7000", True),
        ("tcp://*.INTERNAL.:7000", "tcp://api.internal:7000", True),
        ("tcp://*.internal:7000", "tcp://a.b.internal:7000", False),
        ("tcp://*.internal:7000", "tcp://internal:7000", False),
        ("tcp://*.internal:7000", "tcp://api.internal.evil.com:7000", False),
        ("tcp://*.internal:7000", "tcp://api.internal:7001", False),
        ("tcp://cb-*.example.com:*", "tcp://cb-7.example.com:1", True),
        ("tcp://cb-*.example.com:*", "tcp://db-7.example.com:1", False),
        ("tcp://*.internal:*", "tcp://10.0.0.1:1", False),
        # Any host.
        ("tcp://*:7000", "tcp://[2001:db8::1]:7000", True),
        ("tcp://*:7000", "tcp://anything.example:7000", True),
        ("tcp://*:7000", "ipc:///tmp/x", False),
        # ipc: * within a segment, ** across.
        ("ipc:///run/app/*", "ipc:///run/app/cb.sock", True),
        ("ipc:///run/app/*", "ack+ipc:///run/app/cb.sock", True),
        ("ipc:///run/app/*", "ipc:///run/app/sub/cb.sock", False),
        ("ipc:///run/app/*", "ipc:///run/other/cb.sock", False),
        ("ipc:///run/app/**", "ipc:///run/app/sub/cb.sock", True),
        ("ipc://**", "ipc://@abstract", True),
        ("ipc://@app-*", "ipc://@app-1", True),
        ("ipc:///run/app/*", "tcp://127.0.0.1:1", False),
    ],
)
def test_patterns(pattern: str, address: str, allowed: bool) -> None:
    assert check_pattern(pattern) == pattern
    assert _allowed((pattern,), address) is allowed


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("10.0.0.*:*", "must look like"),
        ("udp://10.0.0.1:1", "must look like"),
        ("ack+tcp://10.0.0.1:*", "drop 'ack\\+'"),
        ("tcp://10.0.0.*", "needs a port"),
        ("tcp://:*", "needs a port"),
        ("tcp://10.0.0.1:0", "ports run from 1"),
        ("tcp://10.0.0.1:7099-7000", "ports run from 1"),
        ("tcp://10.0.0.1:70000", "ports run from 1"),
        ("tcp://10.0.0.1:http", "the port must be"),
        ("tcp://10.0.0.256:*", "octet above 255"),
        ("tcp://10.0.0.1/8:*", "IPv4 network"),
        ("tcp://10.0.0:*", "looks like an IPv4"),
        ("tcp://[fd00::zz/8]:*", "IPv6"),
        ("tcp://[::ffff:10.0.0.0/104]:*", "as IPv4"),
        ("tcp://bad_host:*", "not a host name"),
        ("ipc://relative/*", "absolute"),
    ],
)
def test_bad_patterns_are_refused_with_a_reason(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_pattern(pattern)
