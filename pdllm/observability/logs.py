"""Structured logs: one JSON object per line, each carrying the id of the request it belongs to.

The request id lives in a contextvar, so it follows a request through threads started with
`contextvars.copy_context()` and through asyncio tasks without being passed to every function. It does not cross
process boundaries on its own: a gRPC handler enters `request_context(request.request_id)`; a call to a Ray actor
passes `current_request_id()` as an argument, and the actor method re-enters `request_context(request_id)`.
"""

from __future__ import annotations

import contextvars
import json as _json
import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdllm_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "request_id"}


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The id of the request this code runs for, or None outside any request."""
    return _REQUEST_ID.get()


@contextmanager
def request_context(request_id: str | None = None) -> Iterator[str]:
    """Run the body as part of request `request_id` (a new id when None or empty); yields the id."""
    rid = request_id or new_request_id()
    token = _REQUEST_ID.set(rid)
    try:
        yield rid
    finally:
        _REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamp every record with the current request id (None outside a request), for any formatter to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg", "request_id", **extra, "exc"?} on one line; values that JSON cannot hold
    become their str()."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _json.dumps(doc, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(json: bool = False, level: int | str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Route the root logger to `stream` (stderr) as JSON lines or readable text; returns the handler installed.

    Calling it again replaces the handler it installed before, so a CLI can reconfigure without duplicate lines.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pdllm", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._pdllm = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
