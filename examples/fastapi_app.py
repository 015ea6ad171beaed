"""The documented FastAPI integration: submit tasks from HTTP handlers, fetch their results.

Start a cluster and the app, from the repository root::

    python -m fastworker.node --task-modules examples.tasks
    uvicorn examples.fastapi_app:app

then ``curl -X POST localhost:8000/process/ -H 'content-type: application/json'
-d '{"a": 1}'`` and ``curl localhost:8000/result/<task_id>``.  The client
finds the control plane at ``FASTWORKER_DISCOVERY_ADDRESS`` (default
``tcp://127.0.0.1:5550``).

``app`` is the documented form, with ``@app.on_event`` hooks (which FastAPI
now marks deprecated).  ``lifespan_app`` is the same API with a lifespan
handler, the form FastAPI recommends: serve it with
``uvicorn examples.fastapi_app:lifespan_app``.

Both keep one module-level ``Client``, started when the app starts and
stopped when it shuts down; a stopped client starts again, so the app can
run several times in one process (tests with several ``TestClient`` blocks, a
reload).  ``client.stop()`` returns once the control plane has acknowledged
every task whose id an endpoint returned; the lifespan form's ``async with``
waits for that without blocking the event loop, then stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from fastworker import Client

# -- the documented app -------------------------------------------------------

app = FastAPI()
client = Client()


@app.on_event("startup")
async def startup_event() -> None:
    await client.start()


@app.on_event("shutdown")
async def shutdown_event() -> None:
    client.stop()


@app.post("/process/")
async def process_endpoint(data: dict[str, Any]) -> dict[str, Any]:
    task_id = await client.delay("process_data", data)
    return {"task_id": task_id}


@app.get("/result/{task_id}")
async def get_result(task_id: str) -> dict[str, Any]:
    result = await client.get_task_result(task_id)
    if result:
        return {"status": result.status.value, "result": result.result}
    return {"error": "Result not found"}


# -- the same API with a lifespan handler ------------------------------------


lifespan_client = Client()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # start(); on the way out, flush (the loop keeps serving) and stop().
    async with lifespan_client:
        yield


lifespan_app = FastAPI(lifespan=lifespan)


@lifespan_app.post("/process/")
async def lifespan_process_endpoint(data: dict[str, Any]) -> dict[str, Any]:
    task_id = await lifespan_client.delay("process_data", data)
    return {"task_id": task_id}


@lifespan_app.get("/result/{task_id}")
async def lifespan_get_result(task_id: str) -> dict[str, Any]:
    result = await lifespan_client.get_task_result(task_id)
    if result:
        return {"status": result.status.value, "result": result.result}
    return {"error": "Result not found"}
