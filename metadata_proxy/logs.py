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
import time
from typing import Any, TextIO

# One line per guest request is on the hot path (bench/ has the numbers): the encoder is
# built once, not per line as json.dumps(..., separators=...) does, and the timestamp's
# date and time are formatted once a second.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_this_second: tuple[int, str] = (-1, "")  # one tuple, so a thread never sees half an update


def _now() -> str:
    """UTC, ISO 8601 with milliseconds, as datetime.isoformat gives it: 2025-01-02T03:04:05.678+00:00."""
    global _this_second
    now = time.time()
    second = int(now)
    cached, text = _this_second
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _this_second = (second, text)
    return f"{text}.{int((now - second) * 1000):03d}+00:00"


class AccessLog:
    """Writes one request line; `stream` None means the current sys.stdout."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, entry: dict[str, Any]) -> None:
        stream = self._stream or sys.stdout
        stream.write(_encode({"time": _now(), **entry}) + "\n")
        stream.flush()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _now(),
            "level": record.levelname.lower(),
            "logger": record.name,
            # With several workers, journald files every line under the main process's pid.
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Route every logger (ours, uvicorn's, asyncio's) through JsonFormatter to `stream`
    (stdout), so that no line in the journal is anything but JSON."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # other libraries: what needs attention only
    # uvicorn's own lifecycle lines ("Shutting down", "Waiting for connections to close")
    # repeat ours, once per server; its warnings and errors still come through.
    quieter = max(level, logging.WARNING)
    for name, name_level in (("metadata_proxy", level), ("uvicorn", quieter), ("uvicorn.error", quieter)):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(name_level)
        logger.propagate = True
