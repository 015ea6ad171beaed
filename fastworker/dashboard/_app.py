"""The Starlette application: /metrics, the /api routes and the dashboard page.

Routes (design/operations.md lists their answers):

* ``GET /`` — the dashboard (one static page that polls ``/api/overview``);
* ``GET /metrics`` — Prometheus text format;
* ``GET /api/overview``, ``/api/stats``, ``/api/workers``, ``/api/queues``,
  ``/api/failures``, ``/api/tasks/{task_id}``;
* ``POST /api/tasks/{task_id}/cancel`` — needs the header ``X-Fastworker: cancel``:
  a cross-origin page cannot send a custom header without a CORS preflight,
  which is never granted, so another site open in the operator's browser
  cannot cancel tasks through it.

An actor that does not answer in time gives 503 with the reason, never a hang.

On a loopback address only requests naming a loopback host are served (``Host``
header; others get 400): a web page whose name an attacker re-points at
127.0.0.1 (DNS rebinding) would otherwise be same-origin with the dashboard.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..runtime import ActorError
from ._prometheus import CONTENT_TYPE, render_metrics
from ._view import MAX_TASK_ID, ControlPlaneView

__all__ = ["CANCEL_HEADER", "LOOPBACK_HOSTS", "build_app"]

CANCEL_HEADER = "x-fastworker"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


def _page() -> str:
    return resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")


def _unavailable(exc: ActorError) -> JSONResponse:
    return JSONResponse({"error": f"the control plane did not answer: {exc}"}, status_code=503)


def _task_id(request: Request) -> str | JSONResponse:
    task_id = str(request.path_params["task_id"])
    if not task_id or len(task_id) > MAX_TASK_ID:
        return JSONResponse(
            {"error": f"a task id is 1 to {MAX_TASK_ID} characters"}, status_code=400
        )
    return task_id


def build_app(view: ControlPlaneView, *, allowed_hosts: tuple[str, ...] = ("*",)) -> Starlette:
    """The app over ``view``; ``allowed_hosts``: the Host header values it answers."""
    page = _page()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def metrics(request: Request) -> Response:
        # Rendering many task names takes milliseconds: off the control plane's loop
        # (the snapshot is a copy; nothing else touches it).
        body = await trio.to_thread.run_sync(render_metrics, await view.stats())
        return Response(body, media_type=CONTENT_TYPE)

    async def overview(request: Request) -> Response:
        return JSONResponse(await view.overview())

    async def stats(request: Request) -> Response:
        return JSONResponse(await view.stats())

    async def workers(request: Request) -> Response:
        return JSONResponse((await view.overview())["workers"])

    async def queues(request: Request) -> Response:
        return JSONResponse((await view.overview())["queues"])

    async def failures(request: Request) -> Response:
        return JSONResponse(await view.failures())

    async def task(request: Request) -> Response:
        task_id = _task_id(request)
        if isinstance(task_id, JSONResponse):
            return task_id
        found = await view.task(task_id)
        if found is None:
            body: dict[str, Any] = {
                "task_id": task_id,
                "status": "unknown",
                "error": "not held by the control plane and no result cached",
            }
            return JSONResponse(body, status_code=404)
        return JSONResponse(found)

    async def cancel(request: Request) -> Response:
        if request.headers.get(CANCEL_HEADER) != "cancel":
            return JSONResponse(
                {"error": f"a cancel needs the header '{CANCEL_HEADER}: cancel'"}, status_code=403
            )
        task_id = _task_id(request)
        if isinstance(task_id, JSONResponse):
            return task_id
        cancelled, status = await view.cancel(task_id)
        return JSONResponse({"task_id": task_id, "cancelled": cancelled, "status": status})

    async def actor_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ActorError)
        return _unavailable(exc)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/metrics", metrics),
            Route("/api/overview", overview),
            Route("/api/stats", stats),
            Route("/api/workers", workers),
            Route("/api/queues", queues),
            Route("/api/failures", failures),
            Route("/api/tasks/{task_id:path}/cancel", cancel, methods=["POST"]),
            Route("/api/tasks/{task_id:path}", task),
        ],
        exception_handlers={ActorError: actor_error},
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))],
    )
