"""Structured logs: one JSON object per line on stderr.

Never log personal data: no IP addresses, user agents, tokens or event payloads.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _not_an_access_line(record: logging.LogRecord) -> bool:
    """uvicorn logs each WebSocket handshake ('<ip>:<port> - "WebSocket /path?token=..."')
    and every open/close on its error logger: that is an access log carrying client IPs and
    viewer tokens. Drop those lines; the gateway's metrics count connections instead."""
    message = record.getMessage()
    return '"WebSocket ' not in message and message not in ("connection open", "connection closed")


def configure(role: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    handler.addFilter(_not_an_access_line)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would record client addresses; we keep it off.
    logging.getLogger("uvicorn.access").disabled = True
