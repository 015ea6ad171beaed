"""The bare transport under the ``latency`` scenario, with no fastworker code: this machine's floor.

A ``submit_task`` round trip crosses 4 socket hops through 3 processes
(client -> control plane -> worker -> control plane -> client).  Each hop
is sender -> its ZeroMQ I/O thread -> TCP -> the receiver's I/O thread ->
the receiver, so three threads wake up per hop before any code of ours
runs.  Any design with these processes and hops pays that, whatever its
code; the ``floor`` scenario measures it with the same libraries (trio,
pyzmq) and the same way of waiting (trio on ZeroMQ's edge-triggered fd),
so the ``latency`` figure can be read against what the machine allows.

Three programs, one process each, run by the bench as
``python -m fastworker.bench._floor relay|echo|client`` (or ``serve``):

* ``relay``: the control plane's place; a ROUTER for clients and one for
  workers, forwarding between them.  Its ready line names both endpoints.
* ``echo``: the worker's place; a DEALER sending each message back.  A
  message marked ``t`` first goes through ``trio.to_thread.run_sync``: a
  thread hop like the one a worker takes to run a plain function (fastworker
  has its own pool; the hop's cost is what matters).
* ``client``: sequential round trips through the relay, a warm-up then the
  timed ones, for each variant; prints the seconds of each as one JSON line.
  ``serve`` is the same client timing blocks of round trips the bench asks
  for on stdin, for a ``latency`` run interleaved with its floor.

Only trio, pyzmq and the standard library are used here.  (``python -m``
imports the ``fastworker`` package first, but none of its code runs.)
The relay and the echo exit when their stdin (a pipe from the bench)
closes, so even a killed bench leaves neither behind; the client is
bounded by its timeouts.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import trio
import zmq

__all__ = ["CLIENT_READY", "RELAY_READY", "VARIANTS", "main"]

RELAY_READY = "fastworker floor relay ready:"
CLIENT_READY = "fastworker floor client ready"
# What the client sends first in each message: how the echo answers it.
VARIANTS = {"direct": b"d", "thread": b"t"}
_THREAD = VARIANTS["thread"]
_HELLO = b"hello"
# The first round trip also waits for the echo to connect and say hello.
_FIRST_REPLY_TIMEOUT = 10.0

Socket = zmq.Socket[bytes]


# -- sockets ---------------------------------------------------------------------


def _socket(context: zmq.Context[Socket], kind: int) -> Socket:
    sock: Socket = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


def _fd(sock: Socket) -> int:
    return cast(int, sock.getsockopt(zmq.FD))


def _readable(sock: Socket) -> bool:
    """Re-reading EVENTS is the only truth: the fd only says that something changed."""
    return bool(cast(int, sock.get(zmq.EVENTS)) & zmq.POLLIN)


async def _until_readable(sock: Socket, fd: int) -> None:
    while not _readable(sock):
        await trio.lowlevel.wait_readable(fd)


async def recv(sock: Socket, fd: int) -> list[bytes]:
    """The next message of a socket that only this task uses."""
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            await _until_readable(sock, fd)


def _pump(source: Socket, sink: Socket, route: Callable[[list[bytes]], list[bytes]]) -> None:
    """Forward every message ``source`` holds, without waiting."""
    while True:
        try:
            frames = source.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        sink.send_multipart(route(frames))


# -- the three programs ----------------------------------------------------------


async def relay() -> None:
    """Forward clients' messages to the one echo and its answers back, until stdin closes.

    One task waits on each socket, but whichever wakes forwards both ways:
    the two tasks send on each other's socket, and a send can consume the
    fd edge the other task waits for, so no message may be left for it.
    """
    context: zmq.Context[Socket] = zmq.Context()
    try:
        clients, workers = _bound_router(context), _bound_router(context)
        ready = f"{RELAY_READY} clients={_endpoint(clients)} workers={_endpoint(workers)}"
        print(ready, flush=True)
        worker_id, hello = await recv(workers, _fd(workers))
        if hello != _HELLO:
            raise RuntimeError(f"expected the echo's hello, got {hello!r}")

        def forward_all() -> None:
            _pump(clients, workers, lambda frames: [worker_id, *frames])
            _pump(workers, clients, lambda frames: frames[1:])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_forward_on_wake, clients, forward_all)
            nursery.start_soon(_forward_on_wake, workers, forward_all)
    finally:
        context.destroy(linger=0)


def _bound_router(context: zmq.Context[Socket]) -> Socket:
    sock = _socket(context, zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")  # a free port; the ready line says which
    return sock


def _endpoint(sock: Socket) -> str:
    return cast(bytes, sock.getsockopt(zmq.LAST_ENDPOINT)).decode()


async def _forward_on_wake(sock: Socket, forward_all: Callable[[], None]) -> None:
    fd = _fd(sock)
    while True:
        await _until_readable(sock, fd)
        forward_all()


async def echo(endpoint: str) -> None:
    """Send every message back to the relay, through a thread first when it is marked so."""
    context: zmq.Context[Socket] = zmq.Context()
    try:
        sock = _socket(context, zmq.DEALER)
        sock.connect(endpoint)
        sock.send(_HELLO)
        fd = _fd(sock)
        while True:
            frames = await recv(sock, fd)  # [client id, payload]
            if frames[-1][:1] == _THREAD:
                frames = await trio.to_thread.run_sync(_same, frames)
            sock.send_multipart(frames)
    finally:
        context.destroy(linger=0)


def _same(frames: list[bytes]) -> list[bytes]:
    return frames


async def client(endpoint: str, count: int, warmup: int, timeout: float) -> None:
    """Time ``count`` round trips per variant (after ``warmup``); one JSON line of seconds."""
    context: zmq.Context[Socket] = zmq.Context()
    try:
        sock, fd = await _connected(context, endpoint)
        times: dict[str, list[float]] = {}
        with trio.fail_after(timeout):
            for name, mark in VARIANTS.items():
                await _round_trips(sock, fd, mark, warmup)
                times[name] = await _round_trips(sock, fd, mark, count)
    finally:
        context.destroy(linger=0)
    print(json.dumps(times), flush=True)


async def serve(endpoint: str, warmup: int, timeout: float) -> None:
    """Time round trips in blocks the bench asks for on stdin, until stdin ends.

    After the warm-up, a ready line; then each stdin line ``VARIANT COUNT``
    is answered with one JSON line, the seconds of ``COUNT`` round trips.
    The bench interleaves these blocks with its own ``latency`` round trips,
    so both see the same machine within a tenth of a second
    (design/performance.md).  ``timeout`` bounds each block.
    """
    context: zmq.Context[Socket] = zmq.Context()
    try:
        sock, fd = await _connected(context, endpoint)
        with trio.fail_after(timeout):
            for mark in VARIANTS.values():
                await _round_trips(sock, fd, mark, warmup)
        print(CLIENT_READY, flush=True)
        while line := await trio.to_thread.run_sync(sys.stdin.readline):
            name, count = _block(line)
            with trio.fail_after(timeout):
                times = await _round_trips(sock, fd, VARIANTS[name], count)
            print(json.dumps(times), flush=True)
    finally:
        context.destroy(linger=0)


async def _connected(context: zmq.Context[Socket], endpoint: str) -> tuple[Socket, int]:
    """A client socket to the relay and its fd, once a first round trip came back."""
    sock = _socket(context, zmq.DEALER)
    sock.connect(endpoint)
    fd = _fd(sock)
    with trio.fail_after(_FIRST_REPLY_TIMEOUT):
        await _round_trip(sock, fd, VARIANTS["direct"] + bytes(8))
    return sock, fd


def _block(line: str) -> tuple[str, int]:
    """``VARIANT COUNT`` from the bench; ValueError naming what is wrong."""
    fields = line.split()
    if len(fields) != 2 or fields[0] not in VARIANTS or not fields[1].isdigit():
        raise ValueError(f"expected 'VARIANT COUNT' with a variant of {sorted(VARIANTS)}: {line!r}")
    return fields[0], int(fields[1])


async def _round_trips(sock: Socket, fd: int, mark: bytes, count: int) -> list[float]:
    return [await _round_trip(sock, fd, mark + i.to_bytes(8, "little")) for i in range(count)]


async def _round_trip(sock: Socket, fd: int, payload: bytes) -> float:
    started = time.perf_counter()
    sock.send(payload)
    reply = await recv(sock, fd)
    seconds = time.perf_counter() - started
    if reply != [payload]:
        raise RuntimeError(f"sent {payload!r}, got back {reply!r}")
    return seconds


# -- running one ---------------------------------------------------------------------


async def _until_stdin_closes(program: Callable[[], Awaitable[None]]) -> None:
    """Run ``program``; stop it when stdin, a pipe, ends (the bench closed it, or died).

    Started by hand with another stdin (a terminal, /dev/null), it runs until killed.
    """
    if not _stdin_is_a_pipe():
        await program()
        return
    async with trio.open_nursery() as nursery:

        async def watch_stdin() -> None:
            fd = sys.stdin.fileno()
            while True:
                await trio.lowlevel.wait_readable(fd)
                if not os.read(fd, 4096):
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_stdin)
        await program()
        nursery.cancel_scope.cancel()


def _stdin_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # closed, or no stdin at all
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastworker.bench._floor",
        description="One process of the bench's floor scenario.",
    )
    programs = parser.add_subparsers(dest="program", required=True)
    programs.add_parser("relay", help="print the two endpoints, then forward until stdin closes")
    programs.add_parser("echo", help="answer every message until stdin closes").add_argument(
        "endpoint"
    )
    timed = programs.add_parser("client", help="time round trips, print them as JSON")
    timed.add_argument("endpoint")
    timed.add_argument("--count", type=int, default=2000)
    timed.add_argument("--warmup", type=int, default=100)
    timed.add_argument("--timeout", type=float, default=60.0, help="for all round trips")
    served = programs.add_parser(
        "serve", help="time blocks of round trips asked for on stdin ('VARIANT COUNT' lines)"
    )
    served.add_argument("endpoint")
    served.add_argument("--warmup", type=int, default=100)
    served.add_argument("--timeout", type=float, default=60.0, help="for each block")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program named on the command line; 1 with one line on stderr if it failed."""
    args = _parser().parse_args(argv)
    program: Callable[[], Awaitable[None]]
    if args.program == "relay":
        program = relay
    elif args.program == "echo":
        program = lambda: echo(args.endpoint)  # noqa: E731
    elif args.program == "serve":
        program = lambda: serve(args.endpoint, args.warmup, args.timeout)  # noqa: E731
    else:
        program = lambda: client(args.endpoint, args.count, args.warmup, args.timeout)  # noqa: E731
    try:
        if args.program in ("client", "serve"):
            trio.run(program)  # bounded by its own timeouts; serve ends with its stdin
        else:
            trio.run(_until_stdin_closes, program)
    except Exception as exc:
        leaf = _first_leaf(exc)
        if not isinstance(leaf, trio.TooSlowError):
            traceback.print_exception(exc)
        # The last line of stderr is what the bench reports.
        print(f"floor {args.program}: {_describe(leaf)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no answer in time (is the echo process running?)"
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
