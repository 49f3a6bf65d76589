"""Logging to stdout for journald: one flat JSON object per line.

Two kinds of line: one per guest request (`AccessLog`, fields fixed by README "Logs")
and lifecycle/diagnostic lines from the `logging` module (`JsonFormatter`). Neither ever
carries a token: request lines hold names, ids and codes only, and every log call in
this package passes values, not headers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

from .batch import Batch

# Request ids: 64 random bits as 16 hex digits. Drawn from os.urandom for many ids at once:
# secrets.token_hex per request costs a getrandom() system call each (bench/). A forked
# worker starts with none, so that no two workers hand out the same ids.
_ID_BATCH = 512
_request_ids: list[str] = []
os.register_at_fork(after_in_child=_request_ids.clear)


def new_request_id() -> str:
    """A fresh request id (X-Request-Id, the log line's `request_id`)."""
    if not _request_ids:
        digits = os.urandom(8 * _ID_BATCH).hex()
        _request_ids.extend(digits[i : i + 16] for i in range(0, len(digits), 16))
    return _request_ids.pop()


# One line per guest request is on the hot path (bench/ has the numbers): its fields are
# fixed, so the line is one format string with each string value escaped as json.dumps
# would (ensure_ascii), half the cost of encoding a dict; the timestamp's date and time
# are formatted once a second.
_this_second: tuple[int, str] = (-1, "")  # one tuple, so a thread never sees half an update
# A timestamp's milliseconds, "000" to "999": an index instead of formatting an int with a
# format spec (int.__format__'s slow path) on every line.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


def _now() -> str:
    """UTC, ISO 8601 with milliseconds, as datetime.isoformat gives it: 2025-01-02T03:04:05.678+00:00."""
    global _this_second
    now = time.time()
    second = int(now)
    cached, text = _this_second
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _this_second = (second, text)
    return f"{text}.{_MILLIS[int((now - second) * 1000)]}+00:00"


class _Escaped(dict[str | None, str]):
    """A string (or None) -> its JSON text, as json.dumps writes it (ensure_ascii), worked
    out once: peers, VM names and ids, methods, routes, codes repeat from line to line, and
    a dict lookup costs a fraction of a call. Emptied when full."""

    MAX = 4096

    def __missing__(self, value: str | None) -> str:
        if len(self) >= self.MAX:
            self.clear()
        text = self[value] = "null" if value is None else encode_basestring_ascii(value)
        return text


_escaped = _Escaped()


def _json_number(value: int | None) -> str:
    return "null" if value is None else repr(value)


def _milliseconds(value: float | None) -> str:
    """A duration in ms with 3 decimals (µs): one float formatting, not a round() and a repr()."""
    return "null" if value is None else f"{value:.3f}"


class AccessLog:
    """Writes one line per request; `stream` None means the current sys.stdout.

    Inside an event loop the lines go out together, batch.DELAY after the first of them
    (`batch.Batch`); call flush() before the loop stops. Outside a loop each line is
    written at once.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._batch = Batch(self.flush)

    def write(
        self,
        *,
        request_id: str,
        peer: str,
        vm: str | None,
        vm_id: str | None,
        method: str | None,
        path: str | None,
        route: str | None,
        status: int,
        code: str | None,
        duration_ms: float | None,
        upstream_status: int | None,
        cache: str | None,
    ) -> None:
        """One request's line, a flat JSON object: `time`, then these fields in this order."""
        e = _escaped  # request ids and paths differ on every line: escaped each time
        line = (
            f'{{"time":"{_now()}","request_id":{encode_basestring_ascii(request_id)},"peer":{e[peer]},'
            f'"vm":{e[vm]},"vm_id":{e[vm_id]},"method":{e[method]},'
            f'"path":{"null" if path is None else encode_basestring_ascii(path)},"route":{e[route]},'
            f'"status":{status:d},"code":{e[code]},"duration_ms":{_milliseconds(duration_ms)},'
            f'"upstream_status":{_json_number(upstream_status)},"cache":{e[cache]}}}\n'
        )
        self._pending.append(line)
        if not self._batch.scheduled:
            self._batch.schedule()

    def flush(self) -> None:
        """Write the pending lines now."""
        if self._pending:
            stream = self._stream or sys.stdout
            stream.write("".join(self._pending))
            self._pending.clear()
            stream.flush()


# sd-daemon(3) priorities. journald files a stdout line at info unless the line starts
# with "<N>" (SyslogLevelPrefix=, on by default), which it strips and keeps as PRIORITY:
# so `journalctl -p warning` finds our warnings and errors.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return 7  # debug


class JsonFormatter(logging.Formatter):
    """A lifecycle line as one JSON object; with `syslog_prefix` (stdout is the journal),
    preceded by its sd-daemon priority, which journald strips. Request lines (AccessLog)
    carry none: they are info, journald's default."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

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
        text = json.dumps(entry, separators=(",", ":"))  # one line: newlines inside are escaped
        return f"<{_priority(record.levelno)}>{text}" if self.syslog_prefix else text


def setup_logging(stream: TextIO | None = None, level: int = logging.INFO, *, syslog_prefix: bool = False) -> None:
    """Route every logger (ours, uvicorn's, asyncio's) through JsonFormatter to `stream`
    (stdout), so that no line in the journal is anything but JSON; `syslog_prefix` when
    that stream is the journal (systemd.connected_to_journal)."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(syslog_prefix=syslog_prefix))
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
