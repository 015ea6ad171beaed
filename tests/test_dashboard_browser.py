"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

One page load for the whole test: everything after it must appear without
reloading.  Skips, saying why, where Chromium or Playwright is missing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from fastworker import Client, task
from fastworker.testing import cluster

CHROMIUM = os.environ.get("FASTWORKER_CHROMIUM", "/usr/bin/chromium")
if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run does)",
        allow_module_level=True,
    )
pytest.importorskip("hypercorn", reason="needs fastworker[dashboard]")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
expect = sync_api.expect

_release = threading.Event()


@task
def page_add(a: int, b: int) -> int:
    return a + b


@task
def page_explode(x: int) -> None:
    raise KeyError(f"no such key {x}")


@task
def page_hold() -> str:
    """Keeps the only worker slot busy, so that the next task waits in the queue."""
    _release.wait(20)
    return "released"


def run(client_address: str, body: Callable[[Client], Awaitable[Any]]) -> Any:
    """Run ``body`` with a fresh client under asyncio, in a thread of its own: Playwright's
    synchronous API keeps an event loop of its own in the test's thread."""

    async def main() -> Any:
        async with Client(discovery_address=client_address) as client:
            return await body(client)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result(timeout=20)


@pytest.fixture
def dashboard() -> Iterator[tuple[str, str]]:
    _release.clear()
    with cluster(
        tasks=[page_add, page_explode, page_hold],
        concurrency=1,
        prefetch=0,
        http_address="127.0.0.1:0",
        heartbeat_interval=0.5,
    ) as running:
        assert running.cluster is not None
        url = running.cluster.control_plane.http_url
        assert url is not None
        try:
            yield url, running.discovery_address
        finally:
            _release.set()


@pytest.mark.timeout(60)
def test_dashboard_live_in_chromium(dashboard: tuple[str, str]) -> None:
    url, discovery = dashboard
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
        except sync_api.Error as exc:  # installed but unusable here: the machine, not the page
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {exc.message.splitlines()[0]}")
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            page.goto(url)
            loads = []
            page.on("load", lambda _: loads.append(1))

            # A worker and the queues, as soon as the first poll comes back.
            expect(page.locator("#workers tr[data-worker]")).to_have_count(1)
            expect(page.locator("#workers tr[data-worker] td").nth(1)).not_to_be_empty()
            expect(page.locator("#queues tr[data-priority]")).to_have_count(4)
            expect(page.locator("#total-succeeded")).to_have_text("0")

            # Counts change without a reload.
            async def seven(c: Client) -> Any:
                return await asyncio.gather(
                    *(c.submit_task("page_add", args=(i, 1)) for i in range(7))
                )

            run(discovery, seven)
            expect(page.locator("#total-succeeded")).to_have_text("7")
            expect(page.locator("#total-accepted")).to_have_text("7")
            expect(page.locator("#names tr[data-name='page_add'] td").nth(2)).to_have_text("7")

            # A failed task, with its traceback, in the list and by id.
            failed = run(discovery, lambda c: c.submit_task("page_explode", args=(42,)))
            entry = page.locator(f"#failures details[data-task='{failed.task_id}']")
            expect(entry).to_contain_text("KeyError")
            entry.locator("summary").click()
            expect(entry.locator("pre")).to_contain_text("no such key 42")
            expect(entry.locator("pre")).to_contain_text("Traceback (most recent call last)")
            expect(page.locator("#total-failed")).to_have_text("1")
            page.fill("#lookup-id", failed.task_id)
            page.click("#lookup button[type=submit]")
            expect(page.locator("#lookup-status")).to_have_attribute("data-status", "failure")
            expect(page.locator("#lookup-traceback")).to_contain_text("KeyError")

            # A queued task (the only slot is held), found and cancelled from the page.
            async def hold_then_queue(c: Client) -> str:
                await c.delay("page_hold")
                return await c.delay("page_add", 1, 2)

            queued = run(discovery, hold_then_queue)
            normal = page.locator("#queues tr[data-priority='normal'] td").nth(1)
            expect(normal).to_have_text("1")
            page.fill("#lookup-id", queued)
            page.click("#lookup button[type=submit]")
            expect(page.locator("#lookup-status")).to_have_attribute("data-status", "queued")
            page.click("#cancel")
            expect(page.locator("#lookup-status")).to_have_attribute("data-status", "cancelled")
            expect(normal).to_have_text("0")
            expect(page.locator("#total-cancelled")).to_have_text("1")
            _release.set()
            expect(page.locator("#total-succeeded")).to_have_text("8")
            expect(page.locator("#updated")).to_contain_text("updated")
            assert loads == []  # everything above came without reloading the page
        finally:
            browser.close()
