"""Tasks used by the examples: a plain function, an asyncio coroutine and a trio one."""

from __future__ import annotations

import asyncio

import trio

from fastworker import task


@task
def add(a: int, b: int) -> int:
    return a + b


@task
def process_data(data: dict) -> dict:
    """What the FastAPI example submits: count the keys and echo the data."""
    return {"keys": len(data), "data": data}


@task
async def fetch_greeting(name: str) -> str:
    """An asyncio-style task, as FastAPI users write them."""
    await asyncio.sleep(0.01)
    return f"hello, {name}"


@task(loop="trio")
async def slow_double(x: int) -> int:
    """A trio-native task."""
    await trio.sleep(0.01)
    return 2 * x


@task(max_retries=2, retry_delay=0.1)
def fails_once_then_works(marker: str) -> str:
    raise ValueError(f"this task always fails ({marker})")
