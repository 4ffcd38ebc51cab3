"""`sitewire tail` against real processes, as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import asyncpg
import orjson
import pytest

from app.client import StreamClient
from app.store.sites import get_site
from tests.clients import post_events
from tests.processes import ROOT, AppProcess
from tests.support import FAST, token
from workers.tail import Printer, start_from

pytestmark = pytest.mark.slow


class TailProcess:
    def __init__(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "tail", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        self._reader = asyncio.create_task(asyncio.to_thread(self._read))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode())

    async def wait_lines(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.lines) >= count, f"{len(self.lines)} of {count} lines"

    async def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        return await self.finish()

    async def finish(self) -> tuple[int, str]:
        """Wait for the exit; return its code and what it printed on stderr."""
        code = await asyncio.to_thread(self.proc.wait, 20)
        await self._reader
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code, err


async def test_tail_json_resumes_after_a_gateway_restart(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    found = await get_site(pool, site)
    assert found is not None
    tail = TailProcess(
        site, "--json", "--gateway", gateway.url, "--token", token(site),
        "--since", f"{found.epoch}-0",
    )  # fmt: skip
    await post_events(ingest.url, site, 10)
    await tail.wait_lines(10)
    gateway.kill()
    await post_events(ingest.url, site, 10, start=10)  # while no gateway is up
    replacement = await asyncio.to_thread(gateway.restarted)
    try:
        await post_events(ingest.url, site, 5, start=20)
        await tail.wait_lines(25)
        code, err = await tail.interrupt()
    finally:
        replacement.stop()
    assert code == 0, err
    events = [orjson.loads(line) for line in tail.lines]
    assert [e["offset"] for e in events] == list(range(1, 26))  # resumed, nothing twice
    assert events[0]["site"] == site and events[0]["path"] == "/p/0"


async def test_tail_refuses_a_bad_token(spawn: Callable[..., AppProcess], site: str) -> None:
    gateway = spawn("gateway", **FAST)
    tail = TailProcess(site, "--gateway", gateway.url, "--token", "forged")
    code, err = await tail.finish()
    assert code == 1 and "code 4500" in err
    assert f"a new token: sitewire sites token {site}" in err  # how to fix it


async def test_tail_says_what_it_does_when_the_gateway_is_unreachable() -> None:
    """Pointed at a port nothing listens on, tail says on stderr which gateway failed and
    when it tries again, instead of printing nothing."""
    tail = TailProcess("example.com", "--gateway", "http://127.0.0.1:1", "--token", "t")
    assert tail.proc.stderr is not None
    first = await asyncio.wait_for(asyncio.to_thread(tail.proc.stderr.readline), 20)
    code, _ = await tail.interrupt()
    assert code == 0
    line = first.decode()
    assert line.startswith("! ws://127.0.0.1:1/v1/sites/example.com/stream: ")
    assert "trying again in" in line


async def test_tail_stops_quietly_when_its_reader_goes_away(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """`sitewire tail | head -1`: once head has gone, tail's next write meets a broken pipe and
    tail exits 0, instead of taking it for a lost gateway and reconnecting forever."""
    ingest, gateway = spawn("ingest", **FAST), spawn("gateway", **FAST)
    await post_events(ingest.url, site, 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
    tail = (
        f"{sys.executable} -m workers.cli tail {site} --gateway {gateway.url} --token {token(site)}"
    )
    pipeline = await asyncio.create_subprocess_exec(
        "bash", "-c", f"set -o pipefail; {tail} --last 1 | head -1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    sent = 1
    while pipeline.returncode is None and sent < 200:  # keep tail writing until it stops
        await post_events(ingest.url, site, 1, start=sent)
        sent += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pipeline.wait(), 0.1)
    out, err = await asyncio.wait_for(pipeline.communicate(), 20)
    assert pipeline.returncode == 0, err.decode()
    assert len(out.decode().splitlines()) == 1 and b"trying again" not in err


def test_tail_needs_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "tail", "example.com"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "viewer token is needed" in result.stderr


async def test_tail_reads_its_gateway_and_token_from_the_environment(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    """SITEWIRE_GATEWAY and SITEWIRE_TOKEN are the client's own: no server setting reads them."""
    gateway = spawn("gateway", **FAST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
    env.update(SITEWIRE_GATEWAY=f"http://127.0.0.1:1, {gateway.url}", SITEWIRE_TOKEN="forged")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "workers.cli", "tail", site],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1 and "code 4500" in result.stderr  # reached the gateway
    env["SITEWIRE_GATEWAY"] = "ftp://nowhere"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "workers.cli", "tail", site],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "SITEWIRE_GATEWAY" in result.stderr


EVENT = {
    "cursor": "ab12cd34-7", "offset": 7, "id": "x", "site": "a.com", "name": "Signup",
    "url": "https://a.com/pricing", "path": "/pricing", "referrer": None,
    "referrer_host": "news.ycombinator.com", "props": {}, "visitor": "5c1f0e9a7b3d2a11",
    "device": "mobile", "ts": "2026-11-26T18:47:02.123Z",
}  # fmt: skip


def test_readable_lines_are_aligned_and_filtered() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, as_json=False, colour=False, filter="pric")
    printer.event(EVENT)
    printer.event({**EVENT, "name": "pageview", "path": "/blog"})  # filtered out
    [line] = out.getvalue().splitlines()
    assert line.split()[1:] == ["Signup", "/pricing", "news.ycombinator.com", "mobile", "5c1f0e9a"]
    assert printer.printed == 1


def test_props_are_shown_after_the_columns() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, as_json=False, colour=False)
    printer.event({**EVENT, "props": {"plan": "pro", "seats": 3, "note": "x" * 100}})
    [line] = out.getvalue().splitlines()
    assert line.split()[6:8] == ["plan=pro", "seats=3"] and line.endswith("…")


def test_control_characters_are_printed_as_escapes() -> None:
    """An event stored before ingest refused them must not drive the terminal."""
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, as_json=False, colour=False)
    printer.event({**EVENT, "name": "\x1b[2J\x9bspoof\x7f", "path": "/invoice\u202efdp.exe"})
    line = out.getvalue()
    assert "\x1b" not in line and "\x9b" not in line and "\x7f" not in line
    assert "\\x1b[2J\\x9bspoof\\x7f" in line
    assert "\u202e" not in line and "/invoice\\u202efdp.exe" in line


def test_json_lines_escape_every_control_character() -> None:
    """orjson escapes C0 only; props may hold DEL and C1 (U+009B is CSI to a terminal)."""
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, as_json=True, colour=False)
    event = {**EVENT, "props": {"c1": "\x9b31mred\x7f", "bidi": "\u202egnp.exe", "ok": "é"}}
    printer.event(event)
    line = out.getvalue()
    assert not re.search(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e]", line.rstrip("\n"))
    assert orjson.loads(line) == event and "é" in line


def test_incomplete_recovery_is_visible() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, as_json=True, colour=True)
    printer.notice({"type": "welcome", "recovered": False, "reason": "expired"})
    printer.notice({"type": "gap", "after": "ab12cd34-9", "recovered": False})
    printer.notice({"type": "gap", "after": "ab12cd34-9", "recovered": True})
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and "resume incomplete (expired)" in lines[0]
    assert "\033[33m" in lines[0]  # coloured on a terminal


@pytest.mark.parametrize(
    ("since", "last", "expected"),
    [
        (None, None, {}),
        ("ab12cd34-9", None, {"since": "ab12cd34-9"}),
        ("10m", None, {"minutes": "10.0"}),
        ("2h", None, {"minutes": "120.0"}),
        ("30s", None, {"minutes": "0.5"}),
        ("0.1s", None, {"minutes": "0.001666667"}),  # plain decimals: no 19 digits, no exponent
        ("1d", None, {"minutes": "1440.0"}),
        (None, 50, {"last": "50"}),
    ],
)
def test_start_positions(since: str | None, last: int | None, expected: dict[str, str]) -> None:
    assert start_from(since, last) == expected


def test_a_resume_that_started_elsewhere_moves_the_cursor_there() -> None:
    """After `cursor_ahead` (storage went back) or `epoch_changed`, the welcome's cursor is
    where the stream starts: a reconnect before the next event must resume from it, not from
    the cursor that was refused."""
    client = StreamClient(["ws://127.0.0.1:1"], "a.example", "t", lambda e: None)
    client.cursor = "ab12cd34-30"
    welcome = {"type": "welcome", "cursor": "ab12cd34-25", "recovered": False}
    client._handle({**welcome, "reason": "expired", "cursor": "ab12cd34-30"})
    assert client.cursor == "ab12cd34-30"
    client._handle({**welcome, "reason": "cursor_ahead"})
    assert client.cursor == "ab12cd34-25"
    client._handle({**welcome, "reason": "epoch_changed", "cursor": "ffff0000-7"})
    assert client.cursor == "ffff0000-7"
    client._handle({"type": "welcome", "cursor": "ffff0000-9", "recovered": True})
    assert client.cursor == "ffff0000-7"  # a complete resume starts at our own cursor
