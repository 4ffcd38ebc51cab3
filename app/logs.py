"""Logs on stderr: one JSON object per line for machines, one plain line per record for a
person at a terminal. `SITEWIRE_LOG_FORMAT` chooses: `json`, `text`, or `auto` (the default:
text when stderr is a terminal, JSON otherwise).

Never log personal data: no IP addresses, user agents, tokens or event payloads.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from typing import Literal, TextIO

import orjson

from app.settings import LogFormat

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}
#: uvicorn restates some messages with ANSI colour codes for its own console handler; kept,
#: they put escape sequences into JSON and repeat the message.
_DROPPED = {"color_message"}


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, object]]:
    """What the call passed in `extra=`, minus what is only presentation."""
    for key, value in record.__dict__.items():
        if key not in _STANDARD and key not in _DROPPED:
            yield key, value


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
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`14:02:07 warning gateway redis pub/sub connection lost error="Connection reset"`:
    local time, level, role, message, then the extras as key=value; a traceback below."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [when, f"{record.levelname.lower():<7}", f"{self.role:<7}", record.getMessage()]
        parts += [f"{key}={_text_value(value)}" for key, value in _extras(record)]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: object) -> str:
    """A value as it reads in a text line: bare when it is one word, else quoted."""
    text = str(value)
    if text and not any(c.isspace() or c in "\"'=" for c in text):
        return text
    return orjson.dumps(text).decode()


def resolve(log_format: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """The format `auto` stands for on `stream`: text for a person, JSON for a pipe or file."""
    if log_format != "auto":
        return log_format
    return "text" if stream.isatty() else "json"


def _not_an_access_line(record: logging.LogRecord) -> bool:
    """uvicorn logs each WebSocket handshake ('<ip>:<port> - "WebSocket /path?token=..."')
    and every open/close on its error logger: that is an access log carrying client IPs and
    viewer tokens. Drop those lines; the gateway's metrics count connections instead."""
    message = record.getMessage()
    return '"WebSocket ' not in message and message not in ("connection open", "connection closed")


class ClientCaused:
    """uvicorn's lines about a malformed request, which any client causes at will (an outside
    test wrote 2,000 a second, each with its traceback, from one client): each written at most
    once per `every_s`; the next one written says how many were left out (`left_out`)."""

    MESSAGES = frozenset({"Invalid HTTP request received.", "Unsupported upgrade request."})
    #: websockets' lines for each refused upgrade (a wrong version, path or token).
    PREFIXES = ("connection rejected (", "HTTP response sent (")

    def __init__(self, every_s: float = 10.0) -> None:
        self._every_s = every_s
        self._written: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("uvicorn", "websockets")):
            return True
        if record.msg not in self.MESSAGES and not str(record.msg).startswith(self.PREFIXES):
            return True
        message = str(record.msg)
        now = time.monotonic()
        if now - self._written.get(message, -self._every_s) < self._every_s:
            self._left_out[message] = self._left_out.get(message, 0) + 1
            return False
        self._written[message] = now
        left_out = self._left_out.pop(message, 0)
        if left_out:
            record.left_out = left_out
        return True


def configure(role: str, level: str, log_format: LogFormat = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    chosen = resolve(log_format, sys.stderr)
    handler.setFormatter(TextFormatter(role) if chosen == "text" else JsonFormatter(role))
    handler.addFilter(_not_an_access_line)
    handler.addFilter(ClientCaused())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log would record client addresses; we keep it off.
    logging.getLogger("uvicorn.access").disabled = True


class Repeats:
    """A message that an outage repeats (one per failed commit, per unpublished batch) written
    at most once per `every_s`: an outside test counted 32,696 lines of one PostgreSQL outage
    at 100 events/s. The first is written at once; those that follow within the period are
    folded into one line written when it ends, saying how many it stands for (`repeated`) with
    their numbers summed (`summed`, e.g. events) and the last one's other fields."""

    def __init__(
        self, logger: logging.Logger, every_s: float = 10.0, level: int = logging.WARNING
    ) -> None:
        self._log = logger
        self._every_s = every_s
        self._level = level
        #: Per message: when it was last written, and what was folded since (count, sums,
        #: the last one's extra fields).
        self._held: dict[str, tuple[float, int, dict[str, int], dict[str, object]]] = {}

    def write(self, message: str, summed: dict[str, int], **extra: object) -> None:
        now = time.monotonic()
        written, folded, sums, _ = self._held.get(message, (-self._every_s, 0, {}, {}))
        if now - written >= self._every_s:
            self._held[message] = (now, 0, {}, {})
            self._log.log(self._level, message, extra={**extra, **summed})
            return
        totals = {key: sums.get(key, 0) + value for key, value in summed.items()}
        self._held[message] = (written, folded + 1, totals, extra)
        if not folded:  # the period's first fold: its line is written when the period ends
            asyncio.get_running_loop().call_later(
                written + self._every_s - now, self._flush, message
            )

    def _flush(self, message: str) -> None:
        _, folded, sums, extra = self._held[message]
        self._held[message] = (time.monotonic(), 0, {}, {})
        self._log.log(self._level, message, extra={**extra, **sums, "repeated": folded})
