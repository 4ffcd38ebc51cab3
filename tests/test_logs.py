"""app/logs.py: JSON for machines, text for a person at a terminal."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
from collections.abc import Callable, Iterator

import orjson
import pytest

from app import logs
from app.logs import Repeats
from app.settings import LogFormat
from tests.processes import AppProcess
from tests.support import eventually


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(msg: str = "Started server process [%d]", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, (42,), None)
    record.__dict__.update(extra)
    return record


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure() replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("uvicorn.access").disabled
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = access


@pytest.mark.parametrize(
    ("chosen", "tty", "expected"),
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_the_format_follows_the_setting_else_the_stream(
    chosen: LogFormat, tty: bool, expected: str
) -> None:
    assert logs.resolve(chosen, _Terminal() if tty else io.StringIO()) == expected


@pytest.mark.parametrize(
    ("chosen", "formatter"),
    [("json", logs.JsonFormatter), ("text", logs.TextFormatter)],
)
@pytest.mark.usefixtures("root_logging")
def test_configure_installs_the_chosen_formatter(
    chosen: LogFormat, formatter: type[logging.Formatter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", _Terminal())  # auto would say text
    logs.configure("gateway", "INFO", chosen)
    (handler,) = logging.getLogger().handlers
    assert type(handler.formatter) is formatter


def test_json_keeps_the_extras_but_not_uvicorns_colours() -> None:
    """uvicorn adds `color_message`, the message again with ANSI codes, for its console."""
    record = _record(color_message="Started server process [\x1b[36m%d\x1b[0m]", sites=3)
    line = logs.JsonFormatter("gateway").format(record)
    assert "\x1b" not in line and "\\u001b" not in line
    entry = orjson.loads(line)
    assert entry["msg"] == "Started server process [42]" and entry["sites"] == 3
    assert "color_message" not in entry
    assert entry["level"] == "info" and entry["role"] == "gateway"
    assert entry["logger"] == "uvicorn.error"


def test_a_text_line_reads_time_level_role_message_then_extras() -> None:
    record = _record(color_message="\x1b[36m", sites=3, error="Connection reset by peer")
    line = logs.TextFormatter("gateway").format(record)
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info    gateway Started server process \[42\] "
        r'sites=3 error="Connection reset by peer"',
        line,
    ), line


def test_a_text_line_shows_the_traceback_below() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "app", logging.ERROR, __file__, 1, "it failed", None, sys.exc_info()
        )
    first, *rest = logs.TextFormatter("ingest").format(record).splitlines()
    assert first.endswith(" error   ingest  it failed")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


@pytest.mark.parametrize(
    ("value", "shown"),
    [("ok", "ok"), ("two words", '"two words"'), ("", '""'), ('a"b', '"a\\"b"'), (1.5, "1.5")],
)
def test_text_values_are_quoted_only_when_they_must_be(value: object, shown: str) -> None:
    assert logs.TextFormatter("worker").format(_record("m %d", key=value)).endswith(f" key={shown}")


async def test_a_warning_an_outage_repeats_is_written_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per failed commit flooded an outage's log (32,696 lines at 100 events/s): a
    repeated warning is written once per period, the ones folded into it said at its end,
    even when none follows (the outage is over)."""
    log = logging.getLogger("sitewire.test.repeats")
    repeats = Repeats(log, every_s=0.2)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(5):
            repeats.write("events stored but not published", {"events": 10}, error="down")
        repeats.write("another message", {"events": 1})
        await asyncio.sleep(0.3)
        repeats.write("events stored but not published", {"events": 10}, error="down")
        await asyncio.sleep(0.3)
    lines = [(r.getMessage(), getattr(r, "events", None), getattr(r, "repeated", None))
             for r in caplog.records]  # fmt: skip
    assert lines == [
        ("events stored but not published", 10, None),
        ("another message", 1, None),
        ("events stored but not published", 40, 4),  # the four folded, when the period ended
        ("events stored but not published", 10, 1),  # folded, then said though none followed
    ]


@pytest.mark.parametrize("role", ["ingest", "gateway"])
async def test_malformed_requests_cost_one_log_line_per_period(
    spawn: Callable[..., AppProcess], role: str
) -> None:
    """From an outside test: uvicorn's warning for each malformed request (with its
    traceback) let one client write 2,000 lines a second into both roles' logs."""
    server = spawn(role)
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await reader.read()  # 400, then closed
        writer.close()
    await eventually(lambda: "Invalid HTTP request received." in server.log_path.read_text())
    assert server.log_path.read_text().count("Invalid HTTP request received.") == 1
    # A refused WebSocket upgrade (here a version nobody speaks) is another such line.
    upgrade = (
        b"GET /v1/sites/x.example/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 99\r\n\r\n"
    )
    for _ in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(upgrade)
        await reader.read(65536)
        writer.close()
    await asyncio.sleep(0.5)
    text = server.log_path.read_text()
    assert text.count("connection rejected") + text.count("HTTP response sent") <= 1, text[-2000:]
