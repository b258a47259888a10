"""Structured JSON logs: one object per line, each with the connection and conversation it is about.

`bind(...)` sets the ids for the rest of an invocation (a context variable, so concurrent
invocations in the local emulator's threads do not mix them up); every record carries them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

_fields: contextvars.ContextVar[dict[str, str | None] | None] = contextvars.ContextVar(
    "bridge_log_fields", default=None
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{record.msecs:03.0f}Z",
            "level": record.levelname,
            "message": record.getMessage(),
            "connection_id": None,
            "conversation_id": None,
        }
        line.update(_fields.get() or {})
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def logger() -> logging.Logger:
    log = logging.getLogger("lambda_bridge")
    if not any(isinstance(h.formatter, JsonFormatter) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # Lambda's root handler would print each line a second time, unstructured
    return log


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Add fields (connection_id, conversation_id, route, request_id) to every line logged inside."""
    token = _fields.set({**(_fields.get() or {}), **fields})
    try:
        yield
    finally:
        _fields.reset(token)


def update(**fields: str | None) -> None:
    """Learned mid-invocation (the conversation id comes back from the server): add it to what `bind` set."""
    _fields.set({**(_fields.get() or {}), **fields})
