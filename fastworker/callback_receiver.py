"""The receiving side of a callback address, for plain and acknowledged (``ack+``) addresses.

A plain address (``tcp://``, ``ipc://``) is a PULL socket: each frame is a
document, delivered at most once.  An ``ack+`` address is a ROUTER: each
message is ``[routing id, delivery id, document]``; the receiver answers
``[routing id, delivery id]`` when it hands the document to the application,
and hands each delivery id over only once among the last ``dedupe_window``
ids (the control plane re-sends until acknowledged: at least once on the
wire, once here).  The frames are in design/protocol.md §6, for receivers in
other languages.

``recv()`` blocks (plain code, threads); ``await receive()`` works under trio
and asyncio.  Use one of them at a time on one receiver.  Both return the
document's bytes; ``decode()`` turns them into a dict, unpickling a PICKLE
document's values only when the receiver was made with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from types import TracebackType
from typing import Any

import trio
import zmq
import zmq.asyncio

from ._callback_document import decode_callback_document
from .security import load_secret_key
from .transport import CurveKeys, ZSocket

__all__ = ["CallbackReceiver"]


class CallbackReceiver:
    """Bind ``address`` (``tcp://127.0.0.1:*`` picks a port) and receive callback documents.

    ``address`` is what the receiver binds, with ``ack+`` for acknowledged
    delivery; :attr:`address` then is what to pass to ``delay_with_callback``.
    ``allow_pickle`` lets :meth:`decode` unpickle the result and callback data
    of PICKLE documents: only for documents of clients and workers you trust.
    ``curve_secret_key`` (a ``NAME.key_secret`` file or CurveKeys) makes the
    receiver a CURVE server: pass its :attr:`public_key` (or its ``.key``
    file) as ``callback_server_key`` and documents travel encrypted.
    """

    def __init__(
        self,
        address: str,
        *,
        dedupe_window: int = 100_000,
        linger_ms: int = 1000,
        allow_pickle: bool = False,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve_secret_key: str | os.PathLike[str] | CurveKeys | None = None,
    ) -> None:
        if dedupe_window < 1:
            raise ValueError(f"dedupe_window must be at least 1, not {dedupe_window}")
        self.allow_pickle = allow_pickle
        self.ack = address.startswith("ack+")
        endpoint = address[4:] if self.ack else address
        keys = (
            curve_secret_key
            if isinstance(curve_secret_key, CurveKeys) or curve_secret_key is None
            else load_secret_key(curve_secret_key)
        )
        # The receiver's public key (Z85), for ``callback_server_key=``; None without CURVE.
        self.public_key: str | None = None if keys is None else keys.public.decode()
        self._sock: zmq.Socket[bytes] = (context or zmq.Context.instance()).socket(
            zmq.ROUTER if self.ack else zmq.PULL
        )
        try:
            self._sock.setsockopt(zmq.LINGER, linger_ms)  # acks still go out after close
            if keys is not None:
                # A CURVE server: documents arrive encrypted, from whoever knows our
                # public key (we check no sender's key: see design/security.md).
                self._sock.setsockopt(zmq.CURVE_SERVER, 1)
                self._sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            self._sock.bind(endpoint)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.address = ("ack+" if self.ack else "") + self.endpoint
        self._linger_ms = linger_ms
        self._window = dedupe_window
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._trio: ZSocket | None = None
        self._asyncio: zmq.asyncio.Socket | None = None
        self.duplicates = 0  # re-sent documents acknowledged again, not handed over
        self.malformed = 0  # messages that are not [routing id, delivery id, document]

    def _accept(self, frames: list[bytes]) -> bytes | None:
        """The document in ``frames``, or None for a duplicate or malformed message."""
        if not self.ack:
            if len(frames) != 1:
                self.malformed += 1
                return None
            return frames[0]
        if len(frames) != 3 or not frames[1]:
            self.malformed += 1
            return None
        peer, delivery_id, document = frames
        try:
            self._sock.send_multipart([peer, delivery_id], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the sender left or is full: it re-sends, and we acknowledge again
        if delivery_id in self._seen:
            self.duplicates += 1
            return None
        self._seen[delivery_id] = None
        if len(self._seen) > self._window:
            self._seen.popitem(last=False)
        return document

    def decode(self, document: bytes) -> dict[str, Any]:
        """The document as a dict (see :func:`fastworker.decode_callback_document`)."""
        return decode_callback_document(document, allow_pickle=self.allow_pickle)

    def recv(self, timeout: float | None = None) -> bytes:
        """Block until the next document; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            poll_ms = None if left is None else int(left * 1000)
            if not self._sock.poll(poll_ms, zmq.POLLIN):
                raise TimeoutError(f"no callback document within {timeout} s")
            document = self._accept(self._sock.recv_multipart())
            if document is not None:
                return document

    async def receive(self) -> bytes:
        """Wait for the next document, under trio or asyncio.

        Under trio a cancelled wait loses no message.  Under asyncio a
        cancellation can lose one that pyzmq had just received: in ack mode it
        is not acknowledged, so the control plane sends it again.
        """
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            return await self._receive_asyncio()
        if self._trio is None:
            self._trio = ZSocket(self._sock)
        while True:
            document = self._accept(await self._trio.recv_multipart())
            if document is not None:
                return document

    async def _receive_asyncio(self) -> bytes:
        if self._asyncio is None:
            self._asyncio = zmq.asyncio.Socket.shadow(self._sock.underlying)
        while True:
            document = self._accept(await self._asyncio.recv_multipart())
            if document is not None:
                return document

    def close(self) -> None:
        """Close the socket; acknowledgements already sent still go out (``linger_ms``)."""
        if self._trio is not None:
            self._trio.close(linger_ms=self._linger_ms)
        else:
            self._sock.close()

    def __enter__(self) -> CallbackReceiver:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> CallbackReceiver:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
