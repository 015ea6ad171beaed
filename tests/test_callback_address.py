"""Callback addresses: one rule, clear errors, no name resolution."""

from __future__ import annotations

import pytest

from fastworker._callback_address import CallbackAddress, parse_callback_address


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("tcp://127.0.0.1:6000", CallbackAddress("tcp://127.0.0.1:6000", False)),
        ("tcp://receiver.example.com:1", CallbackAddress("tcp://receiver.example.com:1", False)),
        ("tcp://[::1]:65535", CallbackAddress("tcp://[::1]:65535", False)),
        ("ipc:///tmp/cb.sock", CallbackAddress("ipc:///tmp/cb.sock", False)),
        ("ack+tcp://127.0.0.1:6000", CallbackAddress("tcp://127.0.0.1:6000", True)),
    ],
)
def test_valid_addresses_are_accepted(address: str, parsed: CallbackAddress) -> None:
    assert parse_callback_address(address) == parsed


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:6000",
        "udp://127.0.0.1:6000",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:70000",
        "tcp://127.0.0.1:*",
        "tcp://*:6000",
        "tcp://eth0;127.0.0.1:6000",
        "tcp://:6000",
        "tcp://999.1.1.1:6000",
        "tcp://[::zz]:6000",
        "tcp://bad_host!:6000",
        "ipc://",
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
