"""Garbage into every bound port while a real client runs 1,000 real tasks.

The three ROUTER endpoints a node binds get a bounded, seeded stream of bad
input, at two levels:

* ZeroMQ messages from DEALER sockets: random bytes, truncated messages,
  extra frames, wrong protocol versions, unknown tags, wrong fields, CBOR
  headers declaring 2^63-byte strings/arrays/maps, invalid UTF-8 (in CBOR
  text, and inside the JSON payload of an otherwise valid Submit), valid
  messages sent to the wrong endpoint, and messages over the node's
  ``--max-message-size 65536`` (100 KiB);
* raw TCP: random bytes instead of a ZMTP greeting, and ZMTP frames whose
  header declares 2^63 or 2^64-1 bytes.

Every message the test sends has an expected verdict, computed locally with
the same ``decode`` and record validation the node runs (an oracle), so the
rejections the node reports in ``stats["rejected"]`` must match them reason
by reason.  Meanwhile all 1,000 real tasks must come back right and the node
must stay up, with the same worker process.

The same campaign runs against a node with CURVE on: the fuzzing peers hold
a key the node allows in both roles (so the oracle's verdicts stand), and a
keyless peer's messages and the raw TCP fuzz must not reach the node at all.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
import trio
import zmq
from _nodes import (
    ANY_PORT,
    TASKS,
    CurveFiles,
    client_for,
    fault_node,
    poll,
    process_alive,
    stats,
    wait_for_workers,
    worker_pids,
)

from fastworker import TaskStatus
from fastworker.wire import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    WIRE_ERROR_REASONS,
    Cancel,
    DeadLetterQuery,
    DeadLetterRetry,
    DeclareSchedules,
    Done,
    Heartbeat,
    Lookup,
    LookupReply,
    Ready,
    Register,
    Registered,
    Release,
    ResultQuery,
    ResultRecord,
    ResultReply,
    Results,
    ScheduleAdd,
    ScheduleList,
    ScheduleRemove,
    StatsQuery,
    Submit,
    TaskEnvelope,
    Unregister,
    WireError,
    decode,
    encode,
)

pytestmark = [pytest.mark.multiprocess]

SEED = 20240611
MAX_MESSAGE = 65536
OVERSIZE = 100 * 1024
REAL_TASKS = 1000

ACCEPTS: dict[str, tuple[type, ...]] = {
    "discovery": (Heartbeat, Lookup, Register, Unregister, DeclareSchedules),
    "gateway": (
        Submit,
        ResultQuery,
        Cancel,
        StatsQuery,
        ScheduleAdd,
        ScheduleRemove,
        ScheduleList,
        DeadLetterQuery,
        DeadLetterRetry,
    ),
    "scheduler": (Done, Ready, Release, Unregister),
}


def verdict(endpoint: str, frames: list[bytes]) -> Counter[str]:
    """The rejections ``frames`` must cause at ``endpoint`` (the node's rules, replayed)."""
    if sum(len(f) for f in frames) > MAX_MESSAGE:
        return Counter()  # libzmq drops the connection; Python never sees it
    if len(frames) != 1:
        return Counter(bad_frames=1)
    try:
        message = decode(frames[0])
    except WireError as exc:
        return Counter({exc.reason: 1})
    if not isinstance(message, ACCEPTS[endpoint]):
        return Counter(unexpected=1)
    invalid = 0
    if isinstance(message, Register):
        names = message.task_names
        names_ok = len(names) <= 10_000 and all(type(n) is str and 0 < len(n) <= 512 for n in names)
        invalid = int(not names_ok or message.concurrency < 1)
    elif isinstance(message, Unregister) and endpoint == "scheduler":
        # A goodbye counts only as "left" and for the connection's own id: never the fuzzer's.
        return Counter(invalid=1) if message.reason != "left" else Counter(forbidden=1)
    elif isinstance(message, Unregister):
        invalid = int(message.reason not in ("left", "crashed"))
    elif isinstance(message, DeclareSchedules):
        invalid = 1  # only a registered worker declares: the fuzzer never is one
    elif isinstance(message, Submit):
        invalid = sum(1 for raw in message.tasks if not _valid(TaskEnvelope.from_wire, raw))
    elif isinstance(message, ResultQuery):
        ids = message.task_ids
        invalid = int(not all(type(i) is str for i in ids) or len(set(ids)) != len(ids))
    elif isinstance(message, Done):
        invalid = sum(1 for raw in message.results if not _valid(ResultRecord.from_wire, raw))
    return Counter(invalid=invalid) if invalid else Counter()


def _valid(parse: Callable[[Any], Any], raw: Any) -> bool:
    try:
        parse(raw)
    except WireError:
        return False
    return True


class Fuzz:
    """Seeded generators of bad (and some valid-but-wrong) messages."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.utf8_tasks: list[str] = []  # valid Submits with invalid UTF-8 in their JSON
        self._n = 0

    def _id(self) -> str:
        self._n += 1
        return f"fuzz-{self._n}"

    def samples(self) -> list[Any]:
        """Valid messages of every kind (truncated, versioned, misrouted by the cases)."""
        task = [self._id(), "add", 2, 0, b"[[1,2],{}]", None]
        result = [self._id(), "success", b"3", None, None, None, 1, None, 0, "add", None]
        return [
            Lookup(1),
            Heartbeat(self._id()),
            Unregister(self._id(), "left"),
            Register("fuzz-worker", ["add"], 0, 1, "fuzz"),  # concurrency 0: refused
            Submit(7, [task]),
            ResultQuery(8, [self._id()]),
            Cancel(9, self._id()),
            Ready(self.rng.choice([0, 5, -3, 2**62])),
            Release([self._id()]),
            Done([result]),
            Results([result]),
            LookupReply(1, "x", "tcp://127.0.0.1:1", 1.0, 1 << 20),
            Registered("x", "tcp://127.0.0.1:1", 1.0, 1 << 20),
        ]

    def random_bytes(self) -> list[bytes]:
        return [self.rng.randbytes(self.rng.randint(0, 300))]

    def truncated(self) -> list[bytes]:
        whole = encode(self.rng.choice(self.samples()))
        return [whole[: self.rng.randint(0, len(whole) - 1)]]

    def extra_frames(self) -> list[bytes]:
        body = encode(self.rng.choice(self.samples()))
        return self.rng.choice([[body, b"extra"], [b"", body], [body, body, body]])

    def wrong_version(self) -> list[bytes]:
        message = self.rng.choice(self.samples())
        version = self.rng.choice([0, 1, 3, -1, 255, 2**70, "2", 2.0, None, True, b"\x02"])
        fields = list(cbor2.loads(encode(message))[2:])
        return [cbor2.dumps([version, message.TAG, *fields])]

    def unknown_tag(self) -> list[bytes]:
        tags = [t for t in range(-5, 300) if t not in MESSAGE_TYPES]
        tag = self.rng.choice([*self.rng.sample(tags, 3), "Submit", 2**64, None, 1.5])
        return [cbor2.dumps([PROTOCOL_VERSION, tag, 1, []])]

    def bad_fields(self) -> list[bytes]:
        cls = self.rng.choice(list(MESSAGE_TYPES.values()))
        junk = [self.rng.choice([None, "s", -1, 2**80, 1.5, [], {}, b"b", True])]
        fields = junk * self.rng.randint(0, len(cls.FIELDS) + 2)
        return [cbor2.dumps([PROTOCOL_VERSION, cls.TAG, *fields])]

    def bad_records(self) -> list[bytes]:
        """Well-formed messages whose tasks/results/ids are invalid (reason "invalid")."""
        bad_task = self.rng.choice(
            [
                [self._id()],
                [self._id(), "add", 9, 0, b"[]", None],  # priority out of range
                [self._id(), "add", 2, 7, b"[]", None],  # unknown format
                [self._id(), "add", 2, 0, b"[]", {"eta": float("nan")}],
                [self._id(), "add", 2, 0, b"[]", {"evil": 1}],
                ["", "add", 2, 0, b"[]", None],
                "not a task",
            ]
        )
        bad_result = [self._id(), "exploded", None, None, None, None, 1, None, 0, "add", None]
        return [
            self.rng.choice(
                [
                    encode(Submit(11, [bad_task])),
                    encode(ResultQuery(12, [1, 2, 3])),  # type: ignore[list-item]
                    encode(Done([bad_result, "junk"])),
                    encode(Register("fuzz-worker", [1, 2], 4, 1, "fuzz")),
                ]
            )
        ]

    def huge_length(self) -> list[bytes]:
        """CBOR heads declaring 2^63 (or 2^64 - 1) bytes/items, bare or inside a message."""
        major = self.rng.choice([0x5B, 0x7B, 0x9B, 0xBB])  # bytes, text, array, map; 8-byte len
        length = self.rng.choice([2**63, 2**64 - 1, 2**63 - 1])
        head = bytes([major]) + struct.pack(">Q", length)
        prefix = self.rng.choice(
            [
                b"",
                b"\x83\x02\x14",  # [2, Submit, <here>
                b"\x84\x02\x14\x07\x81\x86\x66fuzz-0\x63add\x02\x00",  # ... a task's payload
                b"\x83\x02\x20",  # [2, Done, <here>
            ]
        )
        return [prefix + head + self.rng.randbytes(self.rng.randint(0, 16))]

    def invalid_utf8_text(self) -> list[bytes]:
        """A CBOR text string (a task name) that is not UTF-8."""
        return [b"\x86\x02\x14\x07\x81\x86\x66fuzz-0\x63\xff\xfe\xfd"]

    def utf8_submit(self) -> list[bytes]:
        """A valid Submit whose JSON payload is not UTF-8: accepted, fails on the worker."""
        task_id = self._id()
        self.utf8_tasks.append(task_id)
        payload = self.rng.choice(
            [b"\xff\xfe[[1,2],{}]", b'[["\xc3\x28"],{}]', b"[[\xed\xa0\x80],{}]"]
        )
        return [encode(Submit(13, [[task_id, "add", 2, 0, payload, None]]))]

    def oversize(self) -> list[bytes]:
        if self.rng.random() < 0.5:
            return [self.rng.randbytes(OVERSIZE)]
        big = [self._id(), "add", 2, 0, b"[" + b"1," * (OVERSIZE // 2) + b"1]", None]
        return [encode(Submit(14, [big]))]

    def cases(self, endpoint: str) -> list[Callable[[], list[bytes]]]:
        common = [
            self.random_bytes,
            self.truncated,
            self.extra_frames,
            self.wrong_version,
            self.unknown_tag,
            self.bad_fields,
            self.bad_records,
            self.huge_length,
            self.invalid_utf8_text,
            lambda: [encode(self.rng.choice(self.samples()))],  # valid, maybe misrouted
        ]
        if endpoint == "gateway":
            common.append(self.utf8_submit)
        return common


# -- raw TCP (below ZeroMQ) -----------------------------------------------------------

_SIGNATURE = b"\xff" + b"\x00" * 7 + b"\x01\x7f"
_GREETING = _SIGNATURE + bytes([3, 1]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def _ready_command() -> bytes:
    body = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    return bytes([0x04, len(body)]) + body


async def raw_tcp(port: int, steps: list[bytes], wait: float = 1.5) -> str:
    """Send ``steps`` (a pause between each) over plain TCP; "closed" if the node hung up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        for step in steps:
            await stream.send_all(step)
            await trio.sleep(0.05)
        with trio.move_on_after(wait):
            while await stream.receive_some(65536):
                pass
            return "closed"
        return "open"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return "closed"
    finally:
        await stream.aclose()


async def raw_tcp_fuzz(ports: dict[str, int], rng: random.Random) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    zmtp = [_GREETING, _ready_command()]

    async def one(name: str, port: int, steps: list[bytes], must_close: bool) -> None:
        outcome = await raw_tcp(port, steps)
        outcomes[f"{name}: {outcome}"] += 1
        if must_close:
            assert outcome == "closed", f"{name} to {port}: the node kept the connection"

    bad_greeting = _SIGNATURE + b"\x09\x09" + b"E" * 52  # ZMTP 9.9, mechanism "EEEE"
    async with trio.open_nursery() as nursery:
        for port in ports.values():
            nursery.start_soon(one, "random bytes", port, [rng.randbytes(300)], False)
            for length in (2**63, 2**64 - 1, OVERSIZE):
                header = b"\x02" + struct.pack(">Q", length)  # a long ZMTP message frame
                nursery.start_soon(one, f"ZMTP frame of {length}", port, [*zmtp, header], True)
            nursery.start_soon(one, "bad greeting", port, [bad_greeting], False)
    return outcomes


# -- the test -------------------------------------------------------------------------


def _recv_all(sock: zmq.Socket[bytes]) -> list[Any]:
    messages = []
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return messages
        try:
            messages.append(decode(frames[-1]))
        except WireError:
            messages.append(None)


def _request(
    ctx: zmq.Context[zmq.Socket[bytes]],
    address: str,
    message: Any,
    curve: CurveFiles | None = None,
    *,
    reply: bool = True,
) -> Any:
    """One raw request (and its reply) on a fresh DEALER (blocking, bounded)."""
    sock = _keyed(ctx.socket(zmq.DEALER), curve)
    sock.setsockopt(zmq.LINGER, 2000 if not reply else 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        sock.connect(address)
        sock.send(encode(message))
        return decode(sock.recv()) if reply else None
    finally:
        sock.close()


# Reasons only a node with CURVE gives (a key not allowed, or not in that role).
CURVE_REASONS = {"unauthorized", "forbidden"}


def _keyed(sock: zmq.Socket[bytes], curve: CurveFiles | None) -> zmq.Socket[bytes]:
    """A raw socket speaking as the fuzzing peer: with CURVE, its key is allowed in both roles."""
    if curve is not None:
        keys = curve.fuzz_keys()
        sock.curve_publickey, sock.curve_secretkey = keys.public, keys.secret
        sock.curve_serverkey = curve.server_public()
    return sock


async def run_fuzz(messages_per_endpoint: int, curve: CurveFiles | None = None) -> None:
    args = ("--role", "all", "--discovery-address", ANY_PORT, "--workers", "1")
    args += ("--max-message-size", str(MAX_MESSAGE), "--heartbeat-interval", "0.5", *TASKS)
    client_keys: dict[str, Any] = {}
    if curve is not None:
        args += curve.node_args()
        client_keys = curve.client_kwargs()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    try:
        async with (
            fault_node(*args) as node,
            # Configured like the node, so its Submits stay under the node's limit.
            client_for(node, max_message_size=MAX_MESSAGE, **client_keys) as client,
        ):
            (worker,) = worker_pids(await wait_for_workers(client, 1))
            # The endpoints, found the way peers find them: a Lookup and a Register.
            lookup = await trio.to_thread.run_sync(
                _request, ctx, node.discovery_address, Lookup(1), curve
            )
            assert isinstance(lookup, LookupReply)
            probe = Register("fuzz-probe", [], 1, 1, "fuzz")
            registered = await trio.to_thread.run_sync(
                _request, ctx, node.discovery_address, probe, curve
            )
            assert isinstance(registered, Registered)
            await trio.to_thread.run_sync(
                lambda: _request(
                    ctx,
                    node.discovery_address,
                    Unregister("fuzz-probe", "left"),
                    curve,
                    reply=False,
                )
            )
            addresses = {
                "discovery": node.discovery_address,
                "gateway": lookup.client_endpoint,
                "scheduler": registered.worker_endpoint,
            }
            before = (await stats(client))["rejected"]

            def dealer(address: str, keyed: bool = True) -> zmq.Socket[bytes]:
                sock = _keyed(ctx.socket(zmq.DEALER), curve if keyed else None)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
                sockets.append(sock)
                return sock

            # One socket per endpoint for messages the node must see (and answer); one
            # more for the oversize ones, whose connection libzmq drops.
            main = {name: dealer(address) for name, address in addresses.items()}
            big = {name: dealer(address) for name, address in addresses.items()}
            # With CURVE, a peer without a key: nothing it sends may reach the node.
            keyless = (
                {name: dealer(address, keyed=False) for name, address in addresses.items()}
                if curve is not None
                else {}
            )
            fuzz = Fuzz(SEED)
            expected: Counter[str] = Counter()
            sent: Counter[str] = Counter()
            replies: list[Any] = []

            async def real_client() -> None:
                # 1,000 real tasks in Submits well under the 64 KiB limit, spread over the fuzz.
                for start in range(0, REAL_TASKS, 50):
                    for n in range(start, start + 50):
                        ids.append(await client.delay("add", n, n))
                    await trio.sleep(0.1)

            ids: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(real_client)
                for i in range(messages_per_endpoint):
                    for name in addresses:
                        if i % 50 == 49:
                            frames = fuzz.oversize()
                            big[name].send_multipart(frames)  # queued; dropped by the node
                            sent["oversize"] += 1
                            continue
                        frames = fuzz.rng.choice(fuzz.cases(name))()
                        if name in keyless and i % 10 == 0:
                            # Queued for a handshake that never succeeds; the exact
                            # verdict check below proves none of them was read.
                            with contextlib.suppress(zmq.Again):
                                keyless[name].send_multipart(frames, zmq.NOBLOCK)
                                sent["keyless"] += 1
                        try:
                            main[name].send_multipart(frames, zmq.NOBLOCK)
                        except zmq.Again:
                            continue
                        expected += verdict(name, frames)
                        sent[name] += 1
                    replies += _recv_all(main["gateway"])
                    await trio.sleep(0.002)

                # Every message was judged as the oracle said, reason by reason (waiting
                # until the node has read them all).
                async def rejected_now() -> dict[str, int]:
                    counts = Counter((await stats(client))["rejected"]) - Counter(before)
                    return {k: v for k, v in counts.items() if k in WIRE_ERROR_REASONS}

                judged: dict[str, int] = {}

                async def all_judged() -> bool:
                    nonlocal judged
                    judged = await rejected_now()
                    return judged == dict(expected)

                with contextlib.suppress(TimeoutError):
                    await poll(all_judged, timeout=15, interval=0.1, what="every verdict")
                assert judged == dict(expected)
                for reason in set(WIRE_ERROR_REASONS) - CURVE_REASONS:
                    assert judged.get(reason, 0) > 0, reason

                # Below ZeroMQ.  (Random bytes may be taken for a ZMTP 1.0 peer's frames and
                # reach Python: counted too, but not predictable, so after the exact check.)
                raw_outcomes = await raw_tcp_fuzz(
                    {n: int(a.rsplit(":", 1)[1]) for n, a in addresses.items()}, fuzz.rng
                )

            with trio.fail_after(30):
                await client.join()
            results = [client.get_result(i) for i in ids]
            assert len(results) == REAL_TASKS
            bad = [
                (n, r, client._core.finished.get(i))
                for n, (i, r) in enumerate(zip(ids, results, strict=True))
                if r is None or r.status is not TaskStatus.SUCCESS or r.result != 2 * n
            ]
            assert bad == [], [(n, r and r.error, rec and rec.result) for n, r, rec in bad[:2]]

            # The invalid UTF-8 payloads were accepted and failed, cleanly, on the worker.
            utf8_failures: dict[str, str] = {}
            with trio.fail_after(15):
                while len(utf8_failures) < len(fuzz.utf8_tasks):
                    replies += _recv_all(main["gateway"])
                    for message in replies:
                        if isinstance(message, Results):
                            for item in message.results:
                                record = ResultRecord.from_wire(item)
                                if record.task_id in fuzz.utf8_tasks:
                                    text = f"{record.status}: {record.error}"
                                    utf8_failures[record.task_id] = text
                    replies = []
                    await trio.sleep(0.05)
            assert all(
                v.startswith("failure: bad task payload") and "UTF-8" in v
                for v in utf8_failures.values()
            ), utf8_failures

            # The peers whose oversize messages got them disconnected are served again
            # (libzmq reconnects them): a request from the same socket gets its answer.
            for name, request, reply_type in (
                ("discovery", Lookup(2), LookupReply),
                ("gateway", ResultQuery(3, ["none"]), ResultReply),
            ):
                answers: list[Any] = []
                with trio.fail_after(10):
                    while not any(isinstance(a, reply_type) for a in answers):
                        big[name].send(encode(request), zmq.NOBLOCK)
                        await trio.sleep(0.2)
                        answers += _recv_all(big[name])
            after = await stats(client)
            rejected = Counter(after["rejected"]) - Counter(before)
            assert process_alive(node.pid)
            assert worker_pids(await wait_for_workers(client, 1)) == {worker}
            assert "Traceback" not in node.stderr_text()
            print(
                f"\nfuzz (seed {SEED}): {sum(sent.values())} messages "
                f"({', '.join(f'{k} {v}' for k, v in sorted(sent.items()))}), "
                f"{sum(raw_outcomes.values())} raw TCP connections "
                f"({', '.join(f'{k} ×{v}' for k, v in sorted(raw_outcomes.items()))}); "
                f"{REAL_TASKS}/{REAL_TASKS} real tasks correct; {len(utf8_failures)} invalid UTF-8 "
                f"payloads failed on the worker; node and worker alive; rejected by reason "
                f"{dict(sorted(rejected.items()))}"
            )
    finally:
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()


@pytest.mark.timeout(60)
async def test_fuzzing_every_port_while_real_tasks_run() -> None:
    await run_fuzz(messages_per_endpoint=400)


@pytest.mark.timeout(60)
async def test_fuzzing_every_curve_port_while_real_tasks_run(curve_files: CurveFiles) -> None:
    await run_fuzz(messages_per_endpoint=400, curve=curve_files)


@pytest.mark.soak
@pytest.mark.timeout(300)
async def test_soak_fuzzing_every_port() -> None:
    await run_fuzz(messages_per_endpoint=10_000)
