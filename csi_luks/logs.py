"""Log set-up: text or one JSON object a line, and the request id of the call a line was logged in."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from enum import Enum
from typing import Any

# The id of the gRPC call the current thread is serving; every line logged during it carries it.
_request_id: ContextVar[str | None] = ContextVar("csi_luks_request_id", default=None)

# The `extra` key under which the server's one line per call passes its fields (method, code, ...).
CALL_FIELDS = "csi_call"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFormat(Enum):
    TEXT = "text"
    JSON = "json"


def new_request_id() -> str:
    return secrets.token_hex(8)


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Lines logged inside carry request_id (the thread pool reuses threads: reset on the way out)."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    return _request_id.get()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request id and the call's fields.

    The message is the same text the text format prints, so what is stripped there is stripped here.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        fields = getattr(record, CALL_FIELDS, None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if v is not None})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, log_format: LogFormat = LogFormat.TEXT) -> None:
    """Log to stderr at level ("debug", "info", ...) in the given format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
