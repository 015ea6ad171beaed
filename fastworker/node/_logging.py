"""How a node's log lines look: readable text by default, or one JSON object per line.

JSON lines are for log shippers (Loki, Elasticsearch, ``jq``): each record
becomes one object with ``time`` (ISO 8601, UTC), ``level``, ``process``
(``node`` or ``worker``), ``pid``, ``actor``, ``logger``, ``event`` (the
message) and, when the record names one, ``task_id``; an exception adds
``exception`` (its traceback text).  A record tells its actor and task with
``extra={"actor": ..., "task_id": ...}``; a record logged while a task runs
(a user's own ``logging`` call in task code) gets that task's id from
``fastworker._task_context``.  Without ``actor`` it is the
fastworker logger's last name (``fastworker.scheduler`` → ``scheduler``), or
the logger's whole name for loggers outside fastworker (users' task code).
"""

from __future__ import annotations

import datetime as dt
import json
import logging

from .._task_context import CURRENT_TASK_ID
from ._stderr import ThreadedStderrHandler

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure_logging", "wait_for_queued_log_lines"]

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "process": self._process,
            "pid": record.process,
            "actor": getattr(record, "actor", None) or _actor_of(record.name),
            "logger": record.name,
            "event": record.getMessage(),
        }
        task_id = getattr(record, "task_id", None)
        if task_id is None:
            task_id = CURRENT_TASK_ID.get()  # logged from inside a task's run
        if task_id is not None:
            doc["task_id"] = task_id
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False, default=str)


def _actor_of(logger_name: str) -> str:
    prefix, _, rest = logger_name.partition(".")
    return rest if prefix == "fastworker" and rest else logger_name


def configure_logging(level: str, log_format: str, *, process: str) -> None:
    """Install the root handler on stderr for a node (``process="node"``) or worker process.

    Lines go out from a writer thread (:mod:`._stderr`): a stderr nobody
    reads must not freeze the trio loop that logged.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = ThreadedStderrHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s [{process} %(process)d] %(name)s: %(message)s"
            )
        )
    logging.basicConfig(level=level, handlers=[handler])


def wait_for_queued_log_lines() -> None:
    """Block (in a thread, never the loop) until lines logged so far reach stderr.

    The node calls it before its ready line, so a supervisor that reads stderr
    once the node is ready sees the start-up warnings (``--workers 0``, the
    open-file limit).  Bounded: a stderr nobody reads holds it at most 2 s
    (``ThreadedStderrHandler.flush``), then the node goes on.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
