"""``--log-format json``: one JSON object per log line, from the node and its workers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from multiprocess import REPO_ROOT, node_env, start_node

from fastworker.node._logging import JsonFormatter

KEYS = {"time", "level", "process", "pid", "actor", "logger", "event"}


def test_a_record_becomes_one_json_line_with_its_task_and_exception() -> None:
    formatter = JsonFormatter("worker")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        record = logging.getLogger("fastworker.worker").makeRecord(
            "fastworker.worker",
            logging.ERROR,
            __file__,
            1,
            "task %s: its outcome could not be reported",
            ("t-1",),
            sys.exc_info(),
            extra={"task_id": "t-1"},
        )
    line = formatter.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert KEYS | {"task_id", "exception"} == set(doc)
    assert doc["level"] == "ERROR"
    assert doc["process"] == "worker"
    assert doc["actor"] == "worker"
    assert doc["task_id"] == "t-1"
    assert doc["event"] == "task t-1: its outcome could not be reported"
    assert doc["time"].endswith("+00:00")
    assert "RuntimeError: boom" in doc["exception"]

    user = logging.LogRecord("myapp.tasks", logging.INFO, __file__, 1, "hello", (), None)
    user_doc = json.loads(formatter.format(user))
    assert user_doc["actor"] == "myapp.tasks"  # outside fastworker: the logger's name
    assert "task_id" not in user_doc

    named = logging.LogRecord("fastworker.runtime", logging.WARNING, __file__, 1, "x", (), None)
    named.actor = "scheduler"
    assert json.loads(formatter.format(named))["actor"] == "scheduler"


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_json_node_and_its_workers_log_json_lines() -> None:
    with start_node(
        "--discovery-address",
        "tcp://127.0.0.1:*",
        "--task-modules",
        "tests.node_tasks",
        "--workers",
        "1",
        "--grace",
        "1",
        "--max-message-size",
        "65536",
        "--log-format",
        "json",
    ) as node:
        env = node_env(FASTWORKER_DISCOVERY_ADDRESS=node.discovery_address)
        commands = {
            name: ["submit", name, f"hello from {name}", "--wait", "--json"]
            for name in ("logs", "logs_asyncio", "logs_trio")
        }
        commands["text_of"] = ["submit", "text_of", "100000", "--wait", "--json"]
        running = {
            name: subprocess.Popen(
                [sys.executable, "-m", "fastworker.cli", *argv],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, argv in commands.items()
        }
        task_ids = {}
        for name, process in running.items():
            with process:
                stdout, stderr = process.communicate(timeout=30)
            record = json.loads(stdout)
            task_ids[name] = record["task_id"]
            # text_of's result did not fit the message limit: a failure
            assert record["status"] == ("failure" if name == "text_of" else "success"), stderr
        assert node.terminate() == 0
        lines = node.stderr_text().splitlines()
    docs = [json.loads(line) for line in lines]  # every line is JSON
    assert all(set(doc) >= KEYS for doc in docs)
    by_event = {doc["event"]: doc for doc in docs}
    joined = next(doc for event, doc in by_event.items() if "joined (pid" in event)
    assert (joined["process"], joined["actor"], joined["pid"]) == ("node", "discovery", node.pid)
    too_large = next(doc for event, doc in by_event.items() if "exceeds the" in event)
    assert too_large["process"] == "worker"
    assert too_large["task_id"] == task_ids["text_of"]
    for name in ("logs", "logs_asyncio", "logs_trio"):  # users' own log calls in tasks
        doc = by_event[f"hello from {name}"]
        assert (doc["actor"], doc["level"]) == ("tests.node_tasks", "WARNING")
        assert doc["task_id"] == task_ids[name]
    assert "task_id" not in joined
    assert any(doc["event"].startswith("SIGTERM received") for doc in docs)
