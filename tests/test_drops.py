"""Dropped events are visible where a person looks (#19): a bot's or an automated browser's
event is answered 202 and not stored, and `sitewire sites stats SITE` shows it by reason."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import date, timedelta

import asyncpg
import httpx

from app.store import drops
from app.store.salts import utc_today
from tests.processes import ROOT, AppProcess
from tests.support import BROWSER, FAST

CURL = "curl/8.5.0"
HEADLESS = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/131.0 Safari/537.36"


async def test_drops_are_counted_by_reason_and_shown_by_sites_stats(
    spawn: Callable[..., AppProcess], pool: asyncpg.Pool, site: str, database_url: str
) -> None:
    ingest = spawn("ingest", **FAST)
    event = {"site": site, "name": "pageview", "url": f"https://{site}/"}
    async with httpx.AsyncClient(timeout=10) as client:
        for agent, body in [(CURL, event), (HEADLESS, event), (BROWSER, event)]:
            r = await client.post(
                f"{ingest.url}/api/event", json=body, headers={"User-Agent": agent}
            )
            assert r.status_code == 202
        assert r.json()["ok"] is True and "dropped" not in r.json()  # the browser's is stored
        r = await client.post(
            f"{ingest.url}/api/events", json=[event, event], headers={"User-Agent": CURL}
        )
        assert [x["dropped"] for x in r.json()["results"]] == ["bot", "bot"]
    assert ingest.stop() == 0  # a stop writes the counts not yet written
    counted = await drops.by_day(pool, site, utc_today())
    assert counted == {utc_today(): {"bot": 3, "automation": 1}}

    env = {k: v for k, v in os.environ.items() if not k.startswith("SITEWIRE_")}
    env["DATABASE_URL"] = database_url
    shown = await asyncio.to_thread(sitewire, env, "sites", "stats", site, "--days", "2")
    assert shown.returncode == 0, shown.stderr
    today = shown.stdout.splitlines()[2]
    assert today.split() == [utc_today().isoformat(), "1", "automation", "1,", "bot", "3"]
    assert "curl -A" in shown.stdout  # says how to test with curl
    unknown = await asyncio.to_thread(sitewire, env, "sites", "stats", "nosuch.example")
    assert unknown.returncode == 1 and "unknown site" in unknown.stderr


def sitewire(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


async def test_counts_add_up_and_old_days_are_removed(pool: asyncpg.Pool, site: str) -> None:
    old, today = date(2026, 1, 1), utc_today()
    await drops.add(pool, {(site, old, "bot"): 2, (site, today, "bot"): 1})
    await drops.add(pool, {(site, today, "bot"): 4, (site, today, "automation"): 1})
    assert await drops.by_day(pool, site, old) == {
        old: {"bot": 2},
        today: {"bot": 5, "automation": 1},
    }
    assert await drops.delete_before(pool, today - timedelta(days=1)) >= 1
    assert await drops.by_day(pool, site, old) == {today: {"bot": 5, "automation": 1}}
