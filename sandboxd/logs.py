"""The daemon's log lines: human text, or one JSON object per line for a log pipeline.

    sandboxd serve --log-format json

    {"time": "2026-05-01T12:00:00.123Z", "level": "WARNING", "logger": "sandboxd.calls",
     "message": "sandbox.exec failed (not_found): ...", "method": "sandbox.exec", "code": "not_found",
     "sandbox": "sb-1", "peer": "unix", "duration_ms": 0.4}

Fields beyond the first four come from a record's `extra=` (sandbox, snapshot, method, code, field,
peer, duration_ms, ...). A record whose arguments include a wire error code (the wire server logs a
refused client as "refused connection from PEER: CODE: MESSAGE", a broken hello as "closing
connection from PEER: ERROR") gets that code as `code`.
A traceback goes in `exc`. The text format appends the same fields as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from runtime.wire import ERROR_CODES

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "configure"]

FORMATS = ("text", "json")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
    if "code" not in fields and isinstance(record.args, tuple):
        # The wire server logs refusals positionally ("refused connection from %s: %s: %s", peer,
        # code, message; "closing connection from %s: %s", peer, error): its code becomes a field.
        for arg in record.args:
            code = getattr(arg, "code", None) if isinstance(arg, BaseException) else arg
            if isinstance(code, str) and code in ERROR_CODES:
                fields["code"] = code
                break
    return fields


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ms), level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            out.setdefault(key, _json_safe(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, ensure_ascii=False, separators=(", ", ": "))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = _extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_json_safe(v)}" for k, v in fields.items())
        return line


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at `level` or above to `stream` (stderr) in format `fmt`; returns the handler.

    Replaces the root logger's handlers, as `logging.basicConfig(force=True)` does."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
