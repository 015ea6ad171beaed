"""Task ids are capabilities: each carries 128 random bits of its own."""

from __future__ import annotations

import itertools
import os
import re

import pytest

from fastworker.client._ids import new_task_id

pytestmark = pytest.mark.timeout(10)


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    ids = [new_task_id() for _ in range(20_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", task_id) for task_id in ids)
    assert len(set(ids)) == len(ids)


def test_one_id_reveals_nothing_about_the_next() -> None:
    """No shared prefix or counter: consecutive ids agree on about 1 digit in 16."""
    ids = [new_task_id() for _ in range(1000)]
    same = sum(a[i] == b[i] for a, b in itertools.pairwise(ids) for i in range(32))
    assert same < 1000 * 32 / 16 * 1.2
    assert len({task_id[:8] for task_id in ids}) > 990


def test_a_forked_child_does_not_reuse_the_parents_ids() -> None:
    new_task_id()  # the pool now holds ids the child would inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, "".join(new_task_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {text[i : i + 32] for i in range(0, len(text), 32)}
    parent = {new_task_id() for _ in range(300)}
    assert len(child) == 300
    assert not child & parent
