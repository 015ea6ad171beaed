"""The runnable examples, run exactly as their docstrings say: ``python examples/<name>.py``.

Each runs as a subprocess from the repository root with this interpreter and
must exit 0 with its expected output.  The FastAPI example is an app, not a
script: tests/test_fastapi.py serves it with uvicorn.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str) -> list[str]:
    env = dict(os.environ)
    env.pop("FASTWORKER_DISCOVERY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # the example must make itself importable
    done = subprocess.run(
        [sys.executable, f"examples/{name}"],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def test_quickstart() -> None:
    lines = run_example("quickstart.py")

    assert re.fullmatch(r"Embedded cluster up; discovery at tcp://127\.0\.0\.1:\d+", lines[0])
    assert re.fullmatch(r"Dashboard and /metrics at http://127\.0\.0\.1:\d+", lines[1])
    task_id = re.fullmatch(r"Task ID: (\S+)", lines[2])
    assert task_id is not None
    assert "Result: hello, world" in lines
    assert "Doubled: [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]" in lines
    assert "add(2, 3) from the control plane's cache: 5" in lines
    assert lines[-1] == "Done."


def test_callbacks() -> None:
    lines = run_example("callbacks.py")

    assert re.fullmatch(r"Listening for callbacks on tcp://127\.0\.0\.1:\d+", lines[0])
    task_id = re.fullmatch(r"Task ID: (\S+)", lines[1])
    assert task_id is not None
    prefix = "Callback received: "
    assert lines[2].startswith(prefix)
    payload = json.loads(lines[2][len(prefix) :])
    assert payload["task_id"] == task_id[1]
    assert payload["status"] == "success"
    assert payload["result"] == {
        "keys": 2,
        "data": {"order": 42, "items": ["apple", "pear"]},
    }
    assert payload["error"] is None
    assert payload["callback_data"] == {"source": "my_app", "user_id": 123}
    assert payload["started_at"]
    assert payload["completed_at"]
    assert len(lines) == 3


def test_fastapi_example_imports_with_both_apps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module builds both apps and an unstarted default client, no network."""
    monkeypatch.delenv("FASTWORKER_DISCOVERY_ADDRESS", raising=False)
    monkeypatch.delitem(sys.modules, "examples.fastapi_app", raising=False)
    with warnings.catch_warnings():
        # The documented app uses @app.on_event, which FastAPI marks deprecated.
        warnings.filterwarnings(
            "ignore", message=r"\s*on_event is deprecated", category=DeprecationWarning
        )
        module = importlib.import_module("examples.fastapi_app")

    for app in (module.app, module.lifespan_app):
        paths = {(route.path, *sorted(route.methods)) for route in app.routes}
        assert {("/process/", "POST"), ("/result/{task_id}", "GET")} <= paths
    assert repr(module.client) == "<Client tcp://127.0.0.1:5550 json new>"
