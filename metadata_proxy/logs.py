"""Logging to stdout for journald: one flat JSON object per line.

Two kinds of line: one per guest request (`AccessLog`, fields fixed by SPEC section 8)
and lifecycle/diagnostic lines from the `logging` module (`JsonFormatter`). Neither ever
carries a token: request lines hold names, ids and codes only, and every log call in
this package passes values, not headers.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AccessLog:
    """Writes one request line; `stream` None means the current sys.stdout."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, entry: dict[str, Any]) -> None:
        stream = self._stream or sys.stdout
        stream.write(json.dumps({"time": _now(), **entry}, separators=(",", ":")) + "\n")
        stream.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _now(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Route our loggers and uvicorn's through JsonFormatter to `stream` (stdout)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    for name in ("metadata_proxy", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler] if name != "uvicorn.error" else []
        logger.setLevel(level)
        logger.propagate = name == "uvicorn.error"
