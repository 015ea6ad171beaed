"""The client commands, each one short trio run with its own Client.

Each returns its exit code or raises CliFailure.  A submission counts as
made only once the control plane acknowledged it (``flush``): the process
ends right after, and a task still waiting in the client would end with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import trio

from ..client import Client, ControlPlaneUnavailableError
from ..tasks.models import TaskResult, TaskStatus
from . import _render
from ._exits import EXIT_FAILED, EXIT_NOT_DONE, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliFailure
from ._values import parse_task_arg

__all__ = ["cancel", "result", "status", "submit", "workers"]


@contextlib.asynccontextmanager
async def _client(args: argparse.Namespace, timeout: float | None) -> AsyncIterator[Client]:
    try:
        client = Client(
            discovery_address=args.discovery_address,
            timeout=timeout,
            curve_secret_key=args.curve_secret_key,
            curve_server_key=args.curve_server_key,
        )
    except ValueError as exc:  # a bad FASTWORKER_* value, a missing or unreadable key file
        raise CliFailure(str(exc), EXIT_USAGE) from None
    await client.start()
    try:
        yield client
    finally:
        # Every submission was flushed before this; nothing is left to hand over.
        client.stop(timeout=0)


def _unreachable(client: Client, what: str) -> CliFailure:
    return CliFailure(
        f"no control plane at {client.discovery_address} answered within {client.timeout:g} s"
        f"{what} (is a node running there? --discovery-address, --timeout)",
        EXIT_UNREACHABLE,
    )


def _exit_code(outcome: TaskResult) -> int:
    return EXIT_OK if outcome.status is TaskStatus.SUCCESS else EXIT_FAILED


async def submit(args: argparse.Namespace, timeout: float | None) -> int:
    wait = args.wait or args.wait_timeout is not None
    task_args = [parse_task_arg(word) for word in args.task_args]
    async with _client(args, timeout) as client:
        try:
            task_id = await client.apply_async(
                args.task,
                task_args,
                args.kwargs,
                priority=args.priority,
                countdown=args.countdown,
            )
        except (ValueError, TypeError) as exc:  # the Client's checks of name, size, options
            raise CliFailure(str(exc), EXIT_USAGE) from None
        try:
            await client.flush(timeout=client.timeout)
        except ControlPlaneUnavailableError:
            raise _unreachable(client, "; the task was not submitted") from None
        if client.get_status(task_id) is TaskStatus.FAILURE and not wait:
            # Refused (its queue is full, the task too large): an id would promise a run.
            outcome = client.get_result(task_id)
            assert outcome is not None
            _render.task_result(outcome, as_json=args.json)
            return EXIT_FAILED
        if not wait:
            _render.submitted(task_id, as_json=args.json)
            return EXIT_OK
        try:
            await client.join(timeout=args.wait_timeout)
        except TimeoutError:
            raise CliFailure(
                f"no result for task {task_id} within {args.wait_timeout:g} s; the task is "
                f"still with the control plane (fastworker result {task_id})",
                EXIT_NOT_DONE,
            ) from None
        outcome = client.get_result(task_id)
        assert outcome is not None, "join() returned, so the result is in the local cache"
        _render.task_result(outcome, as_json=args.json)
        return _exit_code(outcome)


T = TypeVar("T")


async def _ask(client: Client, question: Awaitable[T], unanswered: str = "") -> T:
    """One request about a task id: unreachable is exit 3, a bad id (TypeError) exit 2."""
    try:
        return await question
    except ControlPlaneUnavailableError:
        raise _unreachable(client, unanswered) from None
    except TypeError as exc:
        raise CliFailure(str(exc), EXIT_USAGE) from None


async def result(args: argparse.Namespace, timeout: float | None) -> int:
    async with _client(args, timeout) as client:
        outcome = await _ask(client, client.get_task_result(args.task_id))
    if outcome is None:
        if args.json:  # still one JSON document on stdout, as for every other answer
            print(json.dumps({"task_id": args.task_id, "found": False}))
        raise CliFailure(
            f"no result for task {args.task_id}: it has not finished, the id is unknown, "
            "or its result left the cache (--result-ttl, --result-cache-size)",
            EXIT_NOT_DONE,
        )
    _render.task_result(outcome, as_json=args.json)
    return _exit_code(outcome)


async def cancel(args: argparse.Namespace, timeout: float | None) -> int:
    async with _client(args, timeout) as client:
        cancelled = await _ask(client, client.cancel_task(args.task_id), "; nothing was cancelled")
    _render.cancelled(args.task_id, cancelled, as_json=args.json)
    return EXIT_OK if cancelled else EXIT_NOT_DONE


async def _stats(client: Client) -> dict[str, Any]:
    try:
        return await client.stats()
    except ControlPlaneUnavailableError:
        raise _unreachable(client, "") from None


async def status(args: argparse.Namespace, timeout: float | None) -> int:
    async with _client(args, timeout) as client:
        first = await _stats(client)
        before = time.monotonic()
        second: dict[str, Any] | None = None
        if args.interval > 0:
            # A sampling period, not a wait for an event: rates need two samples.
            await trio.sleep(args.interval)
            second = await _stats(client)
        elapsed = time.monotonic() - before
    if second is None:
        _render.status(client.discovery_address, first, None, as_json=args.json)
    else:
        rates = _render.rates(first, second, elapsed)
        _render.status(client.discovery_address, second, rates, as_json=args.json)
    return EXIT_OK


async def workers(args: argparse.Namespace, timeout: float | None) -> int:
    async with _client(args, timeout) as client:
        stats = await _stats(client)
    _render.workers(stats, as_json=args.json)
    return EXIT_OK
