"""``Client``: the documented coroutine API, as a proxy to the client's core.

Every method that submits work encodes the arguments at the call (so an
argument the format cannot hold raises TypeError right there), records the
task locally, and hands its id to the core's inbox: ``delay`` returns without
touching the network.  See ``_core.py`` for what the core does with it, its
bindings for how it runs on the caller's loop, and ``_host.py`` for which
binding runs and how ``stop()`` hands over.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import datetime as dt
import logging
import math
import os
import secrets
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import trio

from .._callback_address import parse_callback_address
from .._defaults import DEFAULT_DISCOVERY_ADDRESS
from ..security import callback_key, load_public_key, load_secret_key
from ..tasks.models import DeadLetter, ScheduleInfo, TaskPriority, TaskResult, TaskStatus
from ..tasks.options import MAX_WAIT as _MAX_WAIT
from ..tasks.options import check_eta, check_seconds, check_task_options
from ..tasks.serializer import SerializationFormat, dumps
from ..transport import DEFAULT_MAX_MESSAGE_SIZE, CurveKeys, TransportConfig
from ..wire import (
    CancelReply,
    DeadLetterQuery,
    DeadLetterReply,
    DeadLetterRetry,
    DeadLetterRetryReply,
    Message,
    ResultRecord,
    ScheduleAdd,
    ScheduleList,
    ScheduleListReply,
    ScheduleRemove,
    ScheduleReply,
    StatsReply,
    encode,
    message_budget,
    task_weight,
)
from ._admin import dead_letter, schedule_info, schedule_wire
from ._core import (
    AdminRequest,
    CancelTask,
    ClientCore,
    Command,
    Flush,
    Join,
    PendingTask,
    Query,
    StatsRequest,
    task_wire,
)
from ._errors import (
    AuthenticationError,
    ClientLoopError,
    ClientNotStartedError,
    ClientStoppedError,
    ControlPlaneUnavailableError,
    PendingLimitError,
    QueueFullError,
)
from ._host import AsyncioHost, ThreadHost, TrioHost, current_library, hand_over_in_thread
from ._ids import new_task_id
from ._waiters import Waiter, new_waiter

__all__ = ["Client"]

_MAX_NAME_LENGTH = 512  # the protocol's limit on a task name
log = logging.getLogger("fastworker.client")

# Priority ranks by enum member and by lowercase name (TaskPriority is a StrEnum,
# so members hash like their values): the hot path's one dict lookup.
_RANKS: dict[str, int] = {p.value: p.rank for p in TaskPriority}
_NORMAL = TaskPriority.NORMAL.rank
# stop() from another thread waits this long beyond its timeout for the client's loop to run it.
_LOOP_STOP_GRACE = 0.5
# What a submit_task that timed out says of its task: not cancelled, wherever it is now
# (in this client waiting to be sent, queued, or running).
TASK_GOES_ON = "the task goes on; its result comes with get_result(task_id)"
# Clients started and not stopped: the program's exit stops them (_stop_at_exit).
_STARTED: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """A program that ends without ``stop()`` — an asyncio loop neither run by
    ``asyncio.run`` nor closed, say — still hands over the ids it was given.

    An ended ``asyncio.run`` or trio run stopped its clients already (and
    logged what it could not hand over); what is left here is a loop simply
    abandoned.
    """
    for client in list(_STARTED):
        host = client._host
        if host is None or host.ended:
            continue  # its run's end handed over and said what it could not
        outstanding = client._core.outstanding()
        if outstanding:
            log.warning(
                "client: the program is exiting without client.stop(); handing over %d tasks now",
                outstanding,
            )
        try:
            client.stop()
        except Exception:  # one client's failure must not keep the others from handing over
            log.exception("client: the hand-over at exit failed")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _curve_options(
    secret: str | os.PathLike[str] | CurveKeys | None,
    server: str | os.PathLike[str] | bytes | None,
) -> tuple[CurveKeys | None, bytes | None]:
    """The client's key pair and the server's public key, from files or values.

    Both or neither: half a CURVE configuration would only ever fail its
    handshake, so it is refused here, with the file at fault named.
    """
    secret = secret if secret is not None else _env("FASTWORKER_CURVE_SECRET_KEY")
    server = server if server is not None else _env("FASTWORKER_CURVE_SERVER_KEY")
    if secret is None and server is None:
        return None, None
    if secret is None or server is None:
        raise ValueError(
            "CURVE needs both curve_secret_key (this client's NAME.key_secret) and "
            "curve_server_key (the control plane's public .key), or neither"
        )
    keys = secret if isinstance(secret, CurveKeys) else load_secret_key(secret)
    server_key = server if isinstance(server, bytes) else load_public_key(server)
    return keys, server_key


def _env_number(name: str, kind: type[int] | type[float]) -> Any:
    raw = _env(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


def _check_settings(**settings: Any) -> None:
    """ValueError or TypeError for a constructor setting the client could not work with.

    Checked here rather than where each is used: a bad ``result_cache_size``
    would otherwise crash the client's core on every result.
    """
    for name in ("timeout", "ack_timeout"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
        if not 0 < value < math.inf:  # NaN fails too
            raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    bounds = {"retries": 0, "max_pending": 1, "result_cache_size": 1, "max_message_size": 4096}
    for name, least in bounds.items():
        value = settings[name]
        if value is None and name == "max_message_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    if settings["max_message_size"] is not None and settings["max_message_size"] >= 2**31:
        raise ValueError("max_message_size must be below 2**31")


def _check_address(address: str) -> None:
    """ValueError unless ``address`` is ``tcp://HOST:PORT`` or ``ipc://PATH``."""
    ok = False
    if address.startswith("tcp://"):
        host, _, port = address[6:].rpartition(":")
        ok = bool(host) and port.isdigit() and 0 < int(port) < 65536
    elif address.startswith("ipc://"):
        ok = len(address) > 6
    if not ok:
        raise ValueError(
            f"discovery_address must look like 'tcp://HOST:PORT' or 'ipc://PATH', got {address!r}"
        )


class Client:
    """Submits tasks to a fastworker control plane and follows their results.

    Arguments not given are read from ``FASTWORKER_DISCOVERY_ADDRESS``,
    ``FASTWORKER_SERIALIZATION_FORMAT``, ``FASTWORKER_TIMEOUT``,
    ``FASTWORKER_RETRIES``, ``FASTWORKER_CURVE_SECRET_KEY`` and
    ``FASTWORKER_CURVE_SERVER_KEY``, then from the documented defaults.
    ``curve_secret_key`` (this client's ``NAME.key_secret`` file) with
    ``curve_server_key`` (the control plane's public ``.key`` file) encrypts
    and authenticates every connection; a control plane that refuses the key
    raises AuthenticationError in the callers, within a second or two.  ``timeout``
    bounds how long ``submit_task`` and queries wait; ``retries`` how often an
    unacknowledged submission is re-sent.
    """

    def __init__(
        self,
        discovery_address: str | None = None,
        serialization_format: SerializationFormat | str | None = None,
        timeout: float | None = None,
        retries: int | None = None,
        *,
        max_pending: int = 1_000_000,
        result_cache_size: int = 10_000,
        ack_timeout: float = 1.0,
        allow_pickle: bool = False,
        max_message_size: int | None = None,
        curve_secret_key: str | os.PathLike[str] | CurveKeys | None = None,
        curve_server_key: str | os.PathLike[str] | bytes | None = None,
    ) -> None:
        self.discovery_address: str = (
            discovery_address or _env("FASTWORKER_DISCOVERY_ADDRESS") or DEFAULT_DISCOVERY_ADDRESS
        )
        fmt = serialization_format or _env("FASTWORKER_SERIALIZATION_FORMAT") or "json"
        try:
            self.serialization_format = SerializationFormat(fmt)
        except ValueError:
            valid = ", ".join(f.value for f in SerializationFormat)
            raise ValueError(f"unknown serialization format {fmt!r}; expected {valid}") from None
        env_timeout = _env_number("FASTWORKER_TIMEOUT", float)
        self.timeout: float = (
            timeout if timeout is not None else (env_timeout if env_timeout is not None else 30)
        )
        env_retries = _env_number("FASTWORKER_RETRIES", int)
        self.retries: int = (
            retries if retries is not None else (env_retries if env_retries is not None else 3)
        )
        _check_settings(
            timeout=self.timeout,
            retries=self.retries,
            max_pending=max_pending,
            result_cache_size=result_cache_size,
            ack_timeout=ack_timeout,
            max_message_size=max_message_size,
        )
        _check_address(self.discovery_address)
        self.max_pending = max_pending
        self.allow_pickle = allow_pickle
        self.client_id = f"client-{secrets.token_hex(16)}"
        self._format_code = self.serialization_format.code
        curve, server_key = _curve_options(curve_secret_key, curve_server_key)
        transport = TransportConfig(
            max_message_size=max_message_size or DEFAULT_MAX_MESSAGE_SIZE,
            curve=curve,
            curve_server_key=server_key,
        )
        self._core = ClientCore(
            client_id=self.client_id,
            discovery_address=self.discovery_address,
            retries=self.retries,
            ack_timeout=ack_timeout,
            result_cache_size=result_cache_size,
            transport=transport,
        )
        self._host: TrioHost | AsyncioHost | ThreadHost | None = None
        self._on_trio = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._stopped = False

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "started" if self._host else "new"
        return f"<Client {self.discovery_address} {self.serialization_format.value} {state}>"

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        """Start the client's core; returns promptly even with no control plane up yet.

        A stopped client can be started again, on this event loop or another
        (a new ``asyncio.run``, a second FastAPI lifespan): it keeps its local
        results, and tasks it still waits for are re-submitted to the control
        plane under the new connection (deduplicated there by task id).
        Starting a client that runs on another loop raises ClientLoopError.
        """
        if self._host is not None and self._host.ended:
            # Its loop (or trio run) ended without stop(): it handed over and closed then.
            self._host, self._stopped = None, True
        if self._host is not None:
            self._check_loop()  # started here already: nothing to do; elsewhere: an error
            return
        library = current_library()
        if self._stopped:
            self.client_id = f"client-{secrets.token_hex(16)}"
            self._core = self._core.successor(self.client_id)
        self._on_trio = library == "trio"
        if self._on_trio:
            self._loop = None
            self._trio_token = trio.lowlevel.current_trio_token()
        else:
            self._loop = asyncio.get_running_loop()
            self._trio_token = None
        host: TrioHost | AsyncioHost | ThreadHost
        if self._on_trio:
            host = TrioHost(self._core, end_timeout=self.timeout)
        else:
            host = AsyncioHost(self._core, end_timeout=self.timeout)
        self._host = host  # before awaiting: a concurrent start() finds it and returns
        self._stopped = False
        _STARTED.add(self)
        try:
            try:
                await host.start()
            except NotImplementedError:
                # An asyncio loop that cannot watch a file descriptor (Windows'
                # proactor loop): the core runs in a thread of its own instead.
                host = self._host = ThreadHost(self._core)
                await host.start()
        except BaseException:
            self._host = None
            raise

    def stop(self, timeout: float | None = None) -> None:
        """Hand over every task whose id was returned, close the sockets, end the core.

        Synchronous: it returns once the control plane has acknowledged every
        task this client returned an id for (at once when none is waiting for
        an acknowledgement), or after ``timeout`` seconds (default: the
        client's ``timeout``) when the control plane cannot be reached; then it
        logs an error saying how many were not handed over.  Those stay with
        the client and are sent if it is started again.  Callers still
        awaiting ``submit_task``, ``join``, ``flush`` or a query get
        ClientStoppedError.  Prefer ``await client.flush()`` (or ``async
        with Client(...)``) first on a busy event loop: this call blocks it
        while it waits.
        """
        wait = _wait_seconds(timeout, self.timeout, allow_zero=True)
        host, self._host = self._host, None
        _STARTED.discard(self)
        if host is None:
            return
        self._stopped = True
        heir_id = f"client-{secrets.token_hex(16)}"
        if host.ended:
            # Its loop ended without stop(): it closed and handed over then; what it
            # could not hand over (no control plane in time) gets another chance here.
            left = hand_over_in_thread(self._core, wait, heir_id)
        elif isinstance(host, TrioHost):
            left = self._stop_trio_host(host, wait, heir_id)
        elif isinstance(host, AsyncioHost):
            left = self._stop_asyncio_host(host, wait, heir_id)
        else:
            left = host.stop(wait)
        if left:
            why = (
                "it refuses this client's CURVE key"
                if self._core.refused is not None
                else "it did not acknowledge them in time"
            )
            log.error(
                "client stopped with %d tasks not handed over to the control plane at %s (%s): "
                "they run only if this client is started again, which sends them",
                left,
                self.discovery_address,
                why,
            )

    def _stop_asyncio_host(self, host: AsyncioHost, wait: float, heir_id: str) -> int:
        """The core runs on its loop's callbacks: stop it on that loop's thread.

        Directly when called there, or when the loop no longer runs; from any
        other thread through ``call_soon_threadsafe`` (``_stop_over_there``).
        """
        loop = self._loop
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or here is loop or loop.is_closed() or not loop.is_running():
            return host.stop(wait, heir_id)
        try:
            return self._stop_over_there(loop.call_soon_threadsafe, host.stop, wait, heir_id)
        except RuntimeError:  # the loop closed meanwhile
            return host.stop(wait, heir_id)

    def _stop_trio_host(self, host: TrioHost, wait: float, heir_id: str) -> int:
        """The trio host's actor lives in the starting run: stop it from there.

        From that run's thread directly; from any other thread (or another
        trio run) through the run's token; after the run ended, directly.
        """
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        if here is self._trio_token or self._trio_token is None:
            return host.stop(wait, heir_id)
        try:
            return self._stop_over_there(self._trio_token.run_sync_soon, host.stop, wait, heir_id)
        except trio.RunFinishedError:
            return host.stop(wait, heir_id)

    def _stop_over_there(
        self,
        schedule: Callable[[Callable[[], None]], object],
        stop: Callable[[float, str], int],
        wait: float,
        heir_id: str,
    ) -> int:
        """Have ``stop`` run on the client's own loop; wait for it at most ``wait`` s.

        A loop blocked for longer runs the stop when it resumes (and logs what
        it could not hand over then); this call returns at ``wait`` meanwhile,
        counting the tasks not acknowledged yet as not handed over.
        """
        done: concurrent.futures.Future[int] = concurrent.futures.Future()

        def stop_there() -> None:
            try:
                left = stop(wait, heir_id)
            except Exception as exc:  # never raised into the loop: the caller gets it
                if done.set_running_or_notify_cancel():
                    done.set_exception(exc)
                return
            if not done.set_running_or_notify_cancel():
                if left:  # the caller gave up waiting: say what happened after all
                    log.error("client: %d tasks not handed over at its late stop()", left)
                return
            done.set_result(left)

        schedule(stop_there)
        try:
            return done.result(timeout=wait + _LOOP_STOP_GRACE)
        except concurrent.futures.TimeoutError:
            done.cancel()
            log.error(
                "client: its loop did not finish stop() within %g s (is it blocked?); the client "
                "stops when the loop runs again, handing over what it holds then",
                wait + _LOOP_STOP_GRACE,
            )
            return 0  # not lost: the loop's own stop hands them over, and says what it could not

    async def _wait_for(self, kind: type[Join | Flush], timeout: float | None) -> bool:
        """Wait for the core to answer a ``flush`` or ``join``; False when ``timeout`` passed.

        The command carries its deadline, so the core forgets it then either way.
        """
        self._check_running()
        deadline = math.inf
        if timeout is not None:
            timeout = check_seconds("timeout", timeout, positive=True)
            deadline = self._core.clock() + timeout
        waiter = new_waiter(self._on_trio)
        self._core.inbox.append(kind(waiter, deadline))
        self._core.wake()
        done, _ = await waiter.wait(timeout)
        return bool(done)

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until the control plane has acknowledged every task whose id was returned.

        Returns at once when none is waiting for an acknowledgement.  Raises
        ControlPlaneUnavailableError (a TimeoutError) after ``timeout``
        seconds (default: wait as long as it takes).
        """
        done = await self._wait_for(Flush, timeout)
        if not done:
            raise ControlPlaneUnavailableError(
                f"{self._core.outstanding()} tasks not acknowledged by the control plane at "
                f"{self.discovery_address} within {timeout:g} s"
            )

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Flush (up to the client's ``timeout``), then stop."""
        try:
            await self.flush(timeout=self.timeout)
        except (ControlPlaneUnavailableError, AuthenticationError):
            # Waited already, or refused (already logged): stop() logs what is left.
            self.stop(timeout=0)
        except BaseException:
            self.stop()  # cancelled or failed while flushing: stop() still hands over
            raise
        else:
            self.stop()

    def _check_running(self) -> None:
        if self._host is None:
            if self._stopped:
                raise ClientStoppedError(
                    "this client was stopped; call `await client.start()` to use it again"
                )
            raise ClientNotStartedError("call `await client.start()` before using the client")
        self._check_loop()
        if self._core.failure is not None:
            raise self._core.failure

    def _check_loop(self) -> None:
        """ClientLoopError unless the caller runs on the loop that started the client."""
        if self._on_trio:
            try:
                here: object = trio.lowlevel.current_trio_token()
            except RuntimeError:
                here = None
            if here is self._trio_token:
                return
        else:
            try:
                here = asyncio.get_running_loop()
            except RuntimeError:
                here = None
            if here is self._loop:
                return
        if self._host is not None and self._host.ended:
            raise ClientStoppedError(
                f"this client stopped when the {'trio run' if self._on_trio else 'event loop'} "
                "that started it ended; call `await client.start()` to use it again"
            )
        raise ClientLoopError(
            f"this client was started on {'a trio run' if self._on_trio else 'an asyncio loop'} "
            "and is used from another loop or thread; use it from the loop that started it, "
            "stop() it and start() it again here, or give each loop its own Client"
        )

    # -- submitting ---------------------------------------------------------

    @property
    def _fast_payload_limit(self) -> int:
        """A payload this short fits with any id and name the control plane accepts."""
        return message_budget(self._core.max_message_size) - 4096

    def _prepare(
        self,
        task_name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        priority: TaskPriority | str,
        *,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        callback_address: str | None = None,
        callback_data: Any = None,
        callback_server_key: str | os.PathLike[str] | bytes | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[str, list[Any]]:
        """Check and encode one task in the caller's thread: every error surfaces here.

        Raises ValueError or TypeError naming what is wrong, before anything is queued.
        """
        if not isinstance(task_name, str) or not 0 < len(task_name) <= _MAX_NAME_LENGTH:
            raise ValueError(
                f"task_name must be a string of 1 to {_MAX_NAME_LENGTH} characters, "
                f"got {task_name[:40] + '…' if isinstance(task_name, str) else task_name!r}"
            )
        if not isinstance(priority, str):  # TaskPriority is a StrEnum
            raise TypeError(
                f"priority must be a TaskPriority or its name, not {type(priority).__name__}"
            )
        rank = TaskPriority.coerce(priority).rank
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
        fmt = self.serialization_format
        payload = dumps(fmt, [list(args), dict(kwargs or {})])
        opts: dict[str, Any] | None = None
        if countdown is not None and eta is not None:
            raise ValueError("give countdown or eta, not both")
        if eta is not None:
            opts = {"eta": check_eta(eta)}
        elif countdown is not None:
            opts = {"eta": time.time() + check_seconds("countdown", countdown, at_most=_MAX_WAIT)}
        if callback_address is not None:
            parse_callback_address(callback_address)  # ValueError/TypeError saying why
            opts = opts or {}
            opts["cb"] = callback_address
            if callback_data is not None:
                opts["cbd"] = dumps(fmt, callback_data)
            if callback_server_key is not None:
                opts["cbk"] = callback_key(callback_server_key)
        elif callback_server_key is not None:
            raise ValueError("callback_server_key goes with a callback address")
        if options:
            opts = opts or {}
            opts.update(options)
        task_id = new_task_id()
        wire = task_wire(task_id, task_name, rank, self._format_code, payload, opts)
        self._check_size(wire)
        return task_id, wire

    def _check_size(self, wire: list[Any]) -> None:
        """ValueError for a task no message to the control plane can carry.

        The limit is the control plane's (from its LookupReply) once the
        client has met it, and the client's own ``max_message_size`` before.
        """
        limit = self._core.max_message_size
        weight = task_weight(wire)
        if weight > message_budget(limit):
            raise ValueError(
                f"task {wire[1]!r} encodes to {weight} bytes with its options, more than one "
                f"message to the control plane may carry ({message_budget(limit)} of its "
                f"{limit}-byte limit); pass a reference to the data instead"
            )

    def _enqueue(
        self, items: Iterable[tuple[str, list[Any]]], waiter: Waiter | None = None
    ) -> list[str]:
        self._check_running()
        core = self._core
        pending = core.pending
        items = list(items)
        if core.queue_full:
            raise QueueFullError(
                "the control plane reported its queue full (--max-queued); "
                "wait for tasks to finish and retry"
            )
        if len(pending) + len(items) > self.max_pending:
            raise PendingLimitError(
                f"this client already holds {len(pending)} unfinished tasks "
                f"(max_pending={self.max_pending}); is the control plane at "
                f"{self.discovery_address} running?"
            )
        ids = []
        inbox = core.inbox
        for task_id, wire in items:
            if not task_id:
                task_id = new_task_id()
            wire[0] = task_id
            pending[task_id] = PendingTask(wire, [waiter] if waiter is not None else None)
            inbox.append(task_id)
            ids.append(task_id)
        core.wake()
        return ids

    async def delay(
        self,
        task_name: str,
        *args: Any,
        priority: TaskPriority | str = TaskPriority.NORMAL,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        **kwargs: Any,
    ) -> str:
        """Submit and return the task id at once; the result arrives later by itself."""
        if countdown is None and eta is None:
            return self._delay_now(task_name, args, kwargs, priority)
        self._check_running()
        item = self._prepare(task_name, args, kwargs, priority, countdown=countdown, eta=eta)
        return self._enqueue([item])[0]

    def _delay_now(
        self,
        task_name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: TaskPriority | str,
    ) -> str:
        """``delay`` without options: the per-task hot path, kept to the checks that matter."""
        if self._host is None or self._core.failure is not None:
            self._check_running()
        self._check_loop()
        rank = _RANKS.get(priority) if isinstance(priority, str) else None
        if rank is None or type(task_name) is not str or not 0 < len(task_name) <= _MAX_NAME_LENGTH:
            return self._enqueue([self._prepare(task_name, args, kwargs, priority)])[0]
        core = self._core
        pending = core.pending
        if len(pending) >= self.max_pending or core.queue_full:
            return self._enqueue([self._prepare(task_name, args, kwargs, priority)])[0]
        payload = dumps(self.serialization_format, [args, kwargs])
        task_id = new_task_id()
        wire = task_wire(task_id, task_name, rank, self._format_code, payload, None)
        if len(payload) > self._fast_payload_limit:
            self._check_size(wire)
        pending[task_id] = PendingTask(wire)
        core.inbox.append(task_id)
        core.wake()  # a burst of delay() calls in one turn leaves in one or two messages
        return task_id

    async def delay_with_callback(
        self,
        task_name: str,
        *args: Any,
        callback_address: str | None = None,
        callback_data: Any = None,
        callback_server_key: str | os.PathLike[str] | bytes | None = None,
        priority: TaskPriority | str = TaskPriority.NORMAL,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        **kwargs: Any,
    ) -> str:
        """Like ``delay``; the finished task's callback document goes to the callback address.

        ``callback_server_key`` (the receiver's public ``.key`` file, or its
        Z85 key): the control plane delivers over CURVE, encrypted, to a
        receiver holding the matching secret key (``CallbackReceiver(...,
        curve_secret_key=...)``); without it the document travels in clear.

        Two spellings: the address as the second positional argument
        (``delay_with_callback("name", "tcp://127.0.0.1:6000", arg, ...)``), or
        as ``callback_address=`` with every positional argument going to the
        task (``delay_with_callback("name", arg, callback_address="tcp://…")``).
        The address must name one peer (``tcp://HOST:PORT``, ``ipc:///PATH``;
        ``ack+tcp://…`` for acknowledged delivery): anything else raises
        ValueError (TypeError for a non-string) before anything is queued.
        The control plane then delivers only if its allow-list (loopback by
        default, ``--callback-allow``) matches the address; a refused callback
        is dropped and counted there, and the task runs all the same.
        """
        self._check_running()
        if callback_address is None:
            if not args:
                raise TypeError(
                    "delay_with_callback() needs a callback address: the second positional "
                    "argument or callback_address="
                )
            callback_address, args = args[0], args[1:]
            try:
                parse_callback_address(callback_address)
            except (TypeError, ValueError) as exc:
                raise type(exc)(
                    f"{exc} (without callback_address=, the second positional argument of "
                    "delay_with_callback is the callback address)"
                ) from None
        item = self._prepare(
            task_name,
            args,
            kwargs,
            priority,
            countdown=countdown,
            eta=eta,
            callback_address=callback_address,
            callback_data=callback_data,
            callback_server_key=callback_server_key,
        )
        return self._enqueue([item])[0]

    async def apply_async(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        priority: TaskPriority | str = TaskPriority.NORMAL,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        callback_address: str | None = None,
        callback_data: Any = None,
        callback_server_key: str | os.PathLike[str] | bytes | None = None,
        time_limit: float | None = None,
        max_retries: int | None = None,
        retry_delay: float | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
    ) -> str:
        """The general non-blocking form: every per-call option, task id back at once."""
        self._check_running()
        item = self._prepare(
            task_name,
            args,
            kwargs,
            priority,
            countdown=countdown,
            eta=eta,
            callback_address=callback_address,
            callback_data=callback_data,
            callback_server_key=callback_server_key,
            options=_call_options(
                time_limit, max_retries, retry_delay, retry_backoff, retry_backoff_max
            ),
        )
        return self._enqueue([item])[0]

    async def submit_batch(self, tasks: Iterable[Any]) -> list[str]:
        """Submit many tasks in one go (one network message per few thousand); their ids.

        Each item is ``(task_name, args)``, ``(task_name, args, kwargs)`` or a
        mapping with ``task_name`` and optionally ``args``, ``kwargs``,
        ``priority``, ``countdown``, ``eta``, ``callback_address``,
        ``callback_data`` and ``apply_async``'s options (``time_limit``,
        ``max_retries``, ``retry_delay``, ``retry_backoff``,
        ``retry_backoff_max``).  Every item is checked and encoded before any
        is queued: one bad item raises and submits none.
        """
        self._check_running()
        items: list[tuple[str, list[Any]]] = []
        fmt = self.serialization_format
        code = self._format_code
        for spec in tasks:
            # type() first: isinstance() against the Mapping ABC costs more than
            # encoding a small task, and tuples are the common shape.
            if type(spec) not in (tuple, list) and isinstance(spec, Mapping):
                spec = dict(spec)
                if "task_name" not in spec:
                    raise TypeError(f"a submit_batch mapping needs a 'task_name', got {spec!r}")
                name = spec.pop("task_name")
                options = _call_options(*(spec.pop(key, None) for key in _OPTION_KEYS))
                items.append(
                    self._prepare(
                        name,
                        spec.pop("args", ()),
                        spec.pop("kwargs", None),
                        spec.pop("priority", TaskPriority.NORMAL),
                        options=options,
                        **spec,
                    )
                )
                continue
            if not isinstance(spec, (tuple, list)) or not 1 <= len(spec) <= 3:
                raise TypeError(
                    f"submit_batch items are (task_name, args[, kwargs]) or mappings, got {spec!r}"
                )
            name = spec[0]
            args = spec[1] if len(spec) > 1 else ()
            kwargs = spec[2] if len(spec) > 2 else None
            if (
                type(name) is str
                and name
                and type(args) in (tuple, list)
                and type(kwargs) in (dict, type(None))
            ):
                # The common shape: encode directly (what _prepare does, minus options).
                payload = dumps(fmt, [args, kwargs or {}])
                if len(payload) <= self._fast_payload_limit:
                    items.append(("", task_wire("", name, _NORMAL, code, payload, None)))
                    continue
            items.append(self._prepare(name, args, kwargs, TaskPriority.NORMAL))
        return self._enqueue(items)

    async def submit_task(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        priority: TaskPriority | str = TaskPriority.NORMAL,
        *,
        timeout: float | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        callback_address: str | None = None,
        callback_data: Any = None,
        time_limit: float | None = None,
        max_retries: int | None = None,
    ) -> TaskResult:
        """Submit and wait for the result.

        Past ``timeout`` (default: the client's) this returns a FAILURE result
        whose error names the timeout; the task itself stays with the control
        plane and its result still arrives in the local cache later.
        """
        self._check_running()
        wait = _wait_seconds(timeout, self.timeout)
        item = self._prepare(
            task_name,
            args,
            kwargs,
            priority,
            countdown=countdown,
            eta=eta,
            callback_address=callback_address,
            callback_data=callback_data,
            options=_call_options(time_limit, max_retries, None, None, None),
        )
        waiter = new_waiter(self._on_trio)
        task_id = self._enqueue([item], waiter)[0]
        done, record = await waiter.wait(wait)
        if not done:
            return TaskResult(
                task_id=task_id,
                status=TaskStatus.FAILURE,
                error=f"timed out after {wait:g} s waiting for the result of {task_name!r} "
                f"({TASK_GOES_ON})",
                task_name=task_name,
            )
        return self._decode(record)

    def _decode(self, record: ResultRecord) -> TaskResult:
        return record.to_task_result(allow_pickle=self.allow_pickle)

    # -- results ------------------------------------------------------------

    def get_result(self, task_id: str) -> TaskResult | None:
        """The final result of a task this client submitted, if it has arrived.

        This client's own cache (its ``result_cache_size`` most recent
        results), read without I/O and without asking the control plane.
        """
        record = self._core.finished.get(task_id)
        return None if record is None else self._decode(record)

    def get_status(self, task_id: str) -> TaskStatus | None:
        """The status of a task this client submitted as far as it knows, without I/O.

        PENDING until the control plane acknowledged it, QUEUED after, then
        the final status once its result arrived; None for an id it does not know.
        """
        record = self._core.finished.get(task_id)
        if record is not None:
            return TaskStatus(record.status)
        entry = self._core.pending.get(task_id)
        return None if entry is None else entry.status

    async def _command(
        self, make: Callable[[Waiter, float], Command], timeout: float | None
    ) -> Any:
        """Queue the command ``make(waiter, deadline)`` for the core and await its answer."""
        self._check_running()
        wait = _wait_seconds(timeout, self.timeout)
        waiter = new_waiter(self._on_trio)
        # The core forgets the request at its deadline, whether or not an answer came.
        deadline = self._core.clock() + wait
        self._core.inbox.append(make(waiter, deadline))
        self._core.wake()
        done, value = await waiter.wait(wait)
        if not done:
            raise ControlPlaneUnavailableError(
                f"the control plane at {self.discovery_address} did not answer within {wait:g} s"
            )
        return value

    async def _admin(self, build: Callable[[int], Message], timeout: float | None) -> Any:
        """A schedules or dead-letters request: ``build(request_id)`` is its message."""
        return await self._command(
            lambda waiter, deadline: AdminRequest(waiter, deadline, build), timeout
        )

    async def get_task_result(
        self, task_id: str, *, timeout: float | None = None
    ) -> TaskResult | None:
        """Ask the control plane's result cache, every time; None when it has no result.

        None means not finished yet, unknown, or gone from the cache: its
        ``--result-ttl`` expired or it was evicted as least recently used
        (``--result-cache-size``), even when this client still holds a copy in
        its own cache (``get_result``, which never does I/O).  Raises
        ControlPlaneUnavailableError after ``timeout`` seconds (default: the
        client's) without an answer.
        """
        _check_task_id(task_id)
        records = await self._command(
            lambda waiter, deadline: Query(waiter, deadline, [task_id]), timeout
        )
        record = records[0] if records else None
        # An expired or evicted result is "not found" to the caller, as documented.
        return None if record is None or record.is_expired else self._decode(record)

    async def cancel_task(self, task_id: str, *, timeout: float | None = None) -> bool:
        """Cancel a task; True means it will not run (again), False that it finished or ran.

        A task that never left this client is cancelled here.  Any other is
        the control plane's to cancel: it is asked (and, until it answers, the
        task is not re-sent), and its answer decides.  A running task is told
        to stop, but what it already did stays done.  Raises
        ControlPlaneUnavailableError when no answer comes within ``timeout``.
        """
        _check_task_id(task_id)
        reply: CancelReply = await self._command(
            lambda waiter, deadline: CancelTask(waiter, deadline, task_id), timeout
        )
        return reply.cancelled

    async def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The control plane's statistics (workers, queues, cache, callbacks, rejections)."""
        reply: StatsReply = await self._command(StatsRequest, timeout)
        return reply.stats

    # -- schedules and dead letters (design/schedules.md) ---------------------

    async def schedule(
        self,
        task_name: str,
        *,
        cron: str | None = None,
        repeat_interval: float | None = None,
        timezone: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        priority: TaskPriority | str = TaskPriority.NORMAL,
        schedule_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run ``task_name`` periodically from now on; returns the schedule's id.

        ``cron`` (five fields, or six with seconds last; in ``timezone``, an
        IANA name, UTC by default) or ``repeat_interval`` seconds.  The
        control plane submits one task per tick, whatever the number of
        workers, and a tick missed while it was down runs once when it is
        back.  The same ``schedule_id`` again replaces that schedule.  Raises
        ValueError or TypeError for a bad argument (checked here, before
        anything is sent), ValueError when the control plane refuses it (with
        its reason), ControlPlaneUnavailableError when it does not answer.
        """
        schedule_id = secrets.token_hex(8) if schedule_id is None else schedule_id
        wire = schedule_wire(
            schedule_id,
            task_name,
            cron=cron,
            repeat_interval=repeat_interval,
            timezone=timezone,
            args=args,
            kwargs=kwargs,
            priority=priority,
            fmt=self.serialization_format,
        )
        size = len(encode(ScheduleAdd(0, wire)))
        if size > message_budget(self._core.max_message_size):
            raise ValueError(
                f"schedule {schedule_id!r} encodes to {size} bytes, more than one message to "
                "the control plane may carry; pass a reference to the data instead"
            )
        reply: ScheduleReply = await self._admin(
            lambda request_id: ScheduleAdd(request_id, wire), timeout
        )
        if not reply.ok:
            raise ValueError(f"the control plane refused the schedule: {reply.message}")
        return schedule_id

    async def schedules(self, *, timeout: float | None = None) -> list[ScheduleInfo]:
        """Every schedule the control plane holds, by id (as many as one reply carries)."""
        reply: ScheduleListReply = await self._admin(ScheduleList, timeout)
        infos = (schedule_info(raw, self.allow_pickle) for raw in reply.schedules)
        return [info for info in infos if info is not None]

    async def remove_schedule(self, schedule_id: str, *, timeout: float | None = None) -> bool:
        """Stop a schedule; False when there was none by that id.

        A ``@task(cron=...)`` schedule comes back when a worker declaring it
        registers again (design/schedules.md).
        """
        if not isinstance(schedule_id, str) or not schedule_id:
            raise TypeError(f"schedule_id must be a non-empty string, got {schedule_id!r:.60}")
        reply: ScheduleReply = await self._admin(
            lambda request_id: ScheduleRemove(request_id, schedule_id), timeout
        )
        return reply.ok

    async def dead_letters(
        self, *, limit: int = 100, timeout: float | None = None
    ) -> list[DeadLetter]:
        """The newest ``limit`` tasks that failed for good, newest first.

        Each with its arguments, its last error and why it is dead (see
        ``DeadLetter``); as many as one reply carries.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise ValueError(f"limit must be an integer from 1 to 10000, got {limit!r}")
        reply: DeadLetterReply = await self._admin(
            lambda request_id: DeadLetterQuery(request_id, limit), timeout
        )
        letters = (dead_letter(raw, self.allow_pickle) for raw in reply.letters)
        return [letter for letter in letters if letter is not None]

    async def retry_dead_letter(self, task_id: str, *, timeout: float | None = None) -> bool:
        """Queue a dead letter's task again, under its id, from its first attempt.

        True when it is queued: this client then holds it like a task it
        submitted (``join`` waits for it, ``get_result`` shows its new result
        once it arrives).  False when there is no dead letter by that id or
        the control plane could not queue it (the letter stays).
        """
        _check_task_id(task_id)
        reply: DeadLetterRetryReply = await self._admin(
            lambda request_id: DeadLetterRetry(request_id, task_id), timeout
        )
        if not reply.requeued:
            log.info("dead letter %s not retried: %s", task_id, reply.message)
        return reply.requeued

    async def join(self, timeout: float | None = None) -> None:
        """Wait until every task this client submitted has a final result.

        Raises TimeoutError after ``timeout`` seconds (default: wait as long as it takes).
        """
        done = await self._wait_for(Join, timeout)
        if not done:
            raise TimeoutError(
                f"{len(self._core.pending)} tasks still unfinished after {timeout:g} s"
            )

    @property
    def pending_count(self) -> int:
        """Tasks submitted by this client without a final result yet."""
        return len(self._core.pending)


_OPTION_KEYS = ("time_limit", "max_retries", "retry_delay", "retry_backoff", "retry_backoff_max")


def _call_options(
    time_limit: float | None,
    max_retries: int | None,
    retry_delay: float | None,
    retry_backoff: float | None,
    retry_backoff_max: float | None,
) -> dict[str, Any] | None:
    """The per-call options given, checked by the same rule as ``@task`` (tasks/options.py)."""
    options = check_task_options(
        max_retries=max_retries,
        retry_delay=retry_delay,
        retry_backoff=retry_backoff,
        retry_backoff_max=retry_backoff_max,
        timeout=time_limit,
        timeout_name="time_limit",
    )
    return options or None


def _wait_seconds(timeout: float | None, default: float, *, allow_zero: bool = False) -> float:
    """A caller's ``timeout=``: None means the client's default, else a finite number > 0."""
    if timeout is None:
        return default
    return check_seconds("timeout", timeout, positive=not allow_zero)


def _check_task_id(task_id: object) -> None:
    if not isinstance(task_id, str) or not 0 < len(task_id) <= 256:
        raise TypeError(f"task_id must be a string of 1 to 256 characters, got {task_id!r:.60}")
