"""Idle delivery, checked against the mailbox it replaces: hypothesis drives random sequences.

An actor that handles a ``tell`` in the teller's task when it is idle must
behave exactly as if every message had gone through its mailbox: each
accepted message handled once, in the order it was accepted, one at a
time, whoever told it (the test, another actor from inside its ``receive``,
the actor itself), with ``post`` and ``ask`` mixed in; a message whose
``receive`` raises crashes the run, is consumed, and the next run (a
supervisor's restart) goes on with what was accepted after it.  The
invariants are checked after every step, while messages are in flight.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastworker.runtime import Actor, ActorRef, _actor

pytestmark = pytest.mark.timeout(120)


class Boom(Exception):
    pass


class Batch:
    """Several items in one message, like ``Inbound``: a crash keeps what it had not reached."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.handed = 0

    def leftover(self) -> Batch | None:
        return Batch(self.items[self.handed :]) if self.handed < len(self.items) else None


class Target(Actor):
    """Records what it handles; ``("boom", n)`` raises; ``("again", n)`` tells itself
    ``("self", n)``, ``("again2", n)`` two messages, ``("again-boom", n)`` a boom and
    ``("again-batch", n)`` a batch that crashes, then one more."""

    def __init__(self, accepted: list[Any]) -> None:
        super().__init__("target", mailbox_size=10_000)
        self.handled: list[Any] = []
        self.in_receive = False
        self.accepted = accepted

    def receive(self, message: Any) -> Any:
        assert not self.in_receive, "two messages handled at once"
        self.in_receive = True
        try:
            if message == "get":
                return list(self.handled)
            if isinstance(message, Batch):
                for item in message.items[message.handed :]:
                    message.handed += 1
                    self._one(item)
            else:
                self._one(message)
            return None
        finally:
            self.in_receive = False

    def _one(self, message: Any) -> None:
        self.handled.append(message)
        kind, n = message
        if kind == "boom":
            raise Boom(n)
        if kind == "again":
            tell_and_note(self.ref, self.accepted, ("self", n))
        elif kind == "again2":
            tell_and_note(self.ref, self.accepted, ("self", n))
            tell_and_note(self.ref, self.accepted, ("self2", n))
        elif kind == "again-boom":
            tell_and_note(self.ref, self.accepted, ("boom", n))
        elif kind == "again-batch":
            # A batch that crashes on its first item, then one more message.
            items = [("boom", n), ("self", n)]
            self.accepted.extend(items)
            self.ref.tell(Batch(items))
            tell_and_note(self.ref, self.accepted, ("self2", n))


class Relay(Actor):
    """Tells the target what it is told, from inside its own ``receive``."""

    def __init__(self, target: ActorRef, accepted: list[Any]) -> None:
        super().__init__("relay", mailbox_size=10_000)
        self.target = target
        self.accepted = accepted

    def receive(self, message: Any) -> Any:
        tell_and_note(self.target, self.accepted, message)


def tell_and_note(ref: ActorRef, accepted: list[Any], message: Any) -> None:
    """Tell, then note the message as accepted: the order of the notes is the order owed."""
    accepted.append(message)
    ref.tell(message)


OPERATIONS: st.SearchStrategy[list[tuple[str, Any]]] = st.lists(
    st.one_of(
        st.tuples(st.just("tell"), st.integers(0, 9)),
        st.tuples(st.just("post"), st.integers(0, 9)),
        st.tuples(st.just("relay"), st.integers(0, 9)),
        st.tuples(st.just("boom"), st.integers(0, 9)),
        st.tuples(st.just("again"), st.integers(0, 9)),
        st.tuples(st.just("again-boom"), st.integers(0, 9)),
        st.tuples(st.just("again2"), st.integers(0, 9)),
        st.tuples(st.just("again-batch"), st.integers(0, 9)),
        st.tuples(
            st.just("batch"), st.lists(st.sampled_from(["tell", "boom", "again2"]), max_size=4)
        ),
        st.tuples(st.just("ask"), st.just(0)),
        st.tuples(st.just("checkpoint"), st.just(0)),
        st.tuples(st.just("settle"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS, st.sampled_from([None, 0.0]))
def test_idle_delivery_handles_every_accepted_message_once_in_order(
    operations: list[tuple[str, Any]], budget: float | None
) -> None:
    """``budget`` 0: every message told during a delivery is left to the loop (``__owe``)."""

    async def main() -> None:
        accepted: list[Any] = []
        target = Target(accepted)
        relay = Relay(target.ref, accepted)
        crashes = 0

        async def supervise() -> None:
            nonlocal crashes
            while True:
                try:
                    await target.run()
                    return
                except Boom:
                    crashes += 1

        def check() -> None:
            # What was handled is what was accepted, in order, up to what is still on its way.
            assert target.handled == accepted[: len(target.handled)]

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(supervise)
                await nursery.start(relay.run)
                await trio.testing.wait_all_tasks_blocked()
                for seq, (kind, n) in enumerate(operations, 1):
                    if kind == "batch":
                        items = [(k, seq * 10 + i) for i, k in enumerate(n)]  # type: ignore[arg-type]
                        accepted.extend(items)
                        target.ref.tell(Batch(items))
                        check()
                        continue
                    message = (kind, seq * 10 + n)
                    if kind in ("tell", "boom", "again", "again-boom", "again2", "again-batch"):
                        tell_and_note(target.ref, accepted, message)
                    elif kind == "post":
                        accepted.append(message)
                        target.ref.post(message)
                    elif kind == "relay":
                        relay.ref.tell(message)
                    elif kind == "ask":
                        reply = await target.ref.ask("get")  # what was handled before it
                        assert reply == target.handled[: len(reply)]
                    elif kind == "checkpoint":
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.testing.wait_all_tasks_blocked()
                    check()
                await trio.testing.wait_all_tasks_blocked()
                check()
                assert len(target.handled) == len(accepted)
                assert crashes == sum(1 for kind, _ in target.handled if kind == "boom")
                relay.ref.stop()
                target.ref.stop()

    with mock.patch.object(
        _actor, "_DRAIN_BUDGET", _actor._DRAIN_BUDGET if budget is None else budget
    ):
        trio.run(main)
