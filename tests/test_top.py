"""`sitewire top`: the live aggregates in the terminal (#18)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson

from tests.clients import post_events
from tests.processes import ROOT, AppProcess
from tests.support import FAST, eventually, token
from workers.top import Top, render, sparkline

STATS: dict[str, Any] = {
    "site": "example.com", "epoch": "9f8ba6a8", "window_minutes": 30, "offset": 7,
    "complete": True, "visitors_now": 2, "visitors": 3, "pageviews": 6, "events": 7,
    "per_minute": [
        {"minute": "", "visitors": 0, "pageviews": n % 3, "events": 0} for n in range(30)
    ],
    "pages": [{"value": "/pricing", "count": 4}, {"value": "/", "count": 2}],
    "entry_pages": [], "sources": [{"value": "(direct)", "count": 6}],
    "countries": [{"value": "GB", "count": 6}], "devices": [], "browsers": [], "os": [],
    "goals": [{"value": "Signup", "count": 1, "props": {"plan": [{"value": "pro", "count": 1}]}}],
}  # fmt: skip


def test_render_shows_totals_sparkline_lists_and_goal_props() -> None:
    text = render(STATS, width=100)
    assert "visitors now 2" in text and "pageviews 6" in text and "events 7" in text
    assert sparkline([0, 1, 2]) == " ▄█" and sparkline([0, 0]) == "  "
    assert re.search(r"^/pricing +4\b", text, re.MULTILINE)
    assert "Signup.plan: pro 1" in text


def test_goal_props_keep_their_counts_in_80_columns() -> None:
    """An outside tester's 80-column terminal showed `Signup.plan: pro 23, tea`: each value
    must keep its count, a long one (an outbound URL) cut instead."""
    url = "https://partner.example.org/deals/" + "x" * 120
    goals = [
        {"value": "Signup", "count": 30, "props": {"plan": [
            {"value": "pro", "count": 23}, {"value": "team", "count": 5},
            {"value": "starter", "count": 2}]}},
        {"value": "Outbound Link: Click", "count": 3, "props": {"url": [
            {"value": url, "count": 3}]}},
    ]  # fmt: skip
    text = render({**STATS, "goals": goals}, width=80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "Signup.plan: pro 23, team 5, starter 2" in lines
    [outbound] = [line for line in lines if line.startswith("Outbound Link: Click.url: ")]
    assert outbound.endswith("… 3") and "partner.example.org" in outbound


def test_json_mode_prints_one_object_per_update() -> None:
    out = io.StringIO()
    screen = Top(out, io.StringIO(), as_json=True, in_place=False)
    screen.notice({"type": "welcome", "stats": "only"})
    screen.notice({"type": "stats", "stats": STATS})
    screen.notice({"type": "stats", "stats": {**STATS, "events": 8}})
    assert [orjson.loads(line)["events"] for line in out.getvalue().splitlines()] == [7, 8]


def test_json_mode_escapes_what_a_terminal_would_obey() -> None:
    """An outside test: a source decoded from a visitor's URL reached `top --json` with a raw
    U+009B (CSI) and U+202E; `tail --json` already escaped them."""
    out = io.StringIO()
    screen = Top(out, io.StringIO(), as_json=True, in_place=False)
    sources = [{"value": "\x9b31m\u202emoc.elgoog", "count": 1}]
    screen.notice({"type": "stats", "stats": {**STATS, "sources": sources}})
    line = out.getvalue()
    assert "\x9b" not in line and "\u202e" not in line
    assert orjson.loads(line)["sources"] == sources


async def test_sitewire_top_follows_the_site(spawn: Callable[..., AppProcess], site: str) -> None:
    ingest, gateway = spawn("ingest", **FAST), spawn("gateway", **FAST)
    viewer = ("--gateway", gateway.url, "--token", token(site))
    procs = [
        start_top(site, "--json", *viewer),
        start_top(site, "--json", "--where", "page=/p/1", *viewer),
    ]
    lines: list[list[dict[str, Any]]] = [[], []]

    def read(proc: subprocess.Popen[bytes], into: list[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(orjson.loads(line))

    readers = [
        asyncio.create_task(asyncio.to_thread(read, proc, into))
        for proc, into in zip(procs, lines, strict=True)
    ]
    everything, only = lines
    try:
        await eventually(lambda: everything and only, timeout=20, what="first stats objects")
        assert everything[0]["site"] == site and everything[0]["events"] == 0
        await post_events(ingest.url, site, 4)
        await eventually(lambda: everything[-1]["pageviews"] == 4, timeout=20, what="counted")
        await eventually(lambda: only[-1]["offset"] == 4, timeout=20, what="filtered, counted")
        assert only[-1]["pageviews"] == 1 and only[-1]["filters"] == {"page": "/p/1"}
    finally:
        for proc in procs:
            proc.terminate()
            await asyncio.to_thread(proc.wait, 20)
        await asyncio.gather(*readers)
        for proc in procs:
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.close()
            proc.stderr.close()
    assert [proc.returncode for proc in procs] == [0, 0]


def test_a_bad_where_is_refused() -> None:
    proc = start_top("example.com", "--where", "planet=mars", "--token", "x")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"--where" in err


def start_top(*args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "top", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
