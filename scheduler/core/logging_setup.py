"""Structured logs: every line says which job and stage it is about.

``configure_logging(level)`` installs one root handler: JSON lines when stderr
is not a terminal (log shippers parse them), a compact human format when it is.
The job id and stage come from context variables set with ``log_context``
around a stage's work, so code deep in the hand-off or the upload logs as
usual and still gets them -- threads started inside the context inherit
nothing (contextvars are per thread), which is right for heartbeat threads.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

_job_id: ContextVar[str | None] = ContextVar("reelfarm_job_id", default=None)
_stage: ContextVar[str | None] = ContextVar("reelfarm_stage", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job=%(job_id)s stage=%(stage)s] %(message)s"


@contextmanager
def log_context(job_id: str | None = None, stage: str | None = None) -> Iterator[None]:
    """Every log record inside the block carries ``job_id`` and ``stage``."""
    tokens = [_job_id.set(job_id), _stage.set(str(stage) if stage is not None else None)]
    try:
        yield
    finally:
        _stage.reset(tokens[1])
        _job_id.reset(tokens[0])


class ContextFilter(logging.Filter):
    """Adds ``job_id`` and ``stage`` to each record (an explicit ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get() or "-"
        if getattr(record, "stage", None) is None:
            record.stage = _stage.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, stage, pid (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", "-"),
            "stage": getattr(record, "stage", "-"),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None, json_lines: bool | None = None) -> None:
    """Replace the root handlers with one structured handler; ``json_lines=None`` means JSON unless a TTY."""
    stream = stream if stream is not None else sys.stderr
    use_json = (not stream.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if use_json else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
