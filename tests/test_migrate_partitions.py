"""Partitioning a live `events` table (migrations/0009) with ingest committing through it: no
acknowledged event lost or stored twice, offsets gapless, retries from before it still
recognised, ingest never held up for long; then resumes and history read across the old
table and the new partitions exactly, and the old table is trimmed until it can be dropped."""

from __future__ import annotations

import asyncio
import random
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.servers.postgres import create_database, drop_database
from app.settings import Settings
from app.store import partitions
from app.store.migrate import MIGRATIONS_DIR, migrate
from app.store.sites import create_site
from app.store.writes import commit
from app.wire import parse_cursor
from tests.clients import WsViewer
from tests.processes import AppProcess
from tests.servers import Servers
from tests.support import BROWSER, FAST, epoch_of, new, token
from workers.retention import expire_events

pytestmark = pytest.mark.slow

SITE = "live.example"
#: Events in the table before it is partitioned, over its last three days (enough that the
#: migration's backfill and validation take a while).
BEFORE = 60_000


@pytest.fixture
async def unpartitioned(servers: Servers, tmp_path: Path) -> AsyncIterator[str]:
    """A database as the previous release left it (migrations up to 0008), with a site whose
    events span the last three days."""
    folder = tmp_path / "previous"
    folder.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        if path.name < "0009":
            shutil.copy(path, folder)
    dsn = await create_database(servers.admin_dsn, "sw_parts")
    await migrate(dsn, folder)
    conn = await asyncpg.connect(dsn)
    try:
        await create_site(conn, SITE)
        await conn.execute(
            """INSERT INTO events (site, site_offset, event_id, name, url, path, visitor_id,
                                   device, ts)
               SELECT $1, g, gen_random_uuid(), 'pageview', 'https://x/', '/', 0, 'desktop',
                      now() - interval '3 days' * ($2 - g) / $2
               FROM generate_series(1, $2) AS g""",
            SITE,
            BEFORE,
        )
        await conn.execute("UPDATE sites SET next_offset = $2 WHERE id = $1", SITE, BEFORE + 1)
    finally:
        await conn.close()
    yield dsn
    await drop_database(servers.admin_dsn, dsn)


@dataclass
class Poster:
    """Posts batches with client ids to one ingest, and retries ids already acknowledged (some
    from before the migration), until stopped. Remembers every answer."""

    url: str
    retried: list[tuple[uuid.UUID, int]]  # (id, offset) known to be stored
    stored: dict[uuid.UUID, int] = field(default_factory=dict)
    duplicates: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    slowest_s: float = 0.0
    requests: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, per_request: int, seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=30) as client:
            while not self.stop.is_set():
                fresh = [uuid.uuid4() for _ in range(per_request)]
                again = [x for x, _ in rng.sample(self.retried, min(2, len(self.retried)))]
                body = [{"site": SITE, "name": "pageview", "url": f"https://{SITE}/",
                         "id": str(x)} for x in fresh + again]  # fmt: skip
                started = time.perf_counter()
                r = await client.post(f"{self.url}/api/events", json=body)
                self.slowest_s = max(self.slowest_s, time.perf_counter() - started)
                self.requests += 1
                assert r.status_code == 202, r.text
                for x, result in zip(fresh + again, r.json()["results"], strict=True):
                    assert result["status"] == 202, result
                    offset = parse_cursor(result["cursor"])[1]
                    if result["duplicate"]:
                        self.duplicates.append((x, offset))
                    else:
                        assert x not in self.stored, f"{x} stored twice"
                        self.stored[x] = offset
                        self.retried.append((x, offset))


async def test_partitioning_a_live_table_loses_and_repeats_nothing(
    unpartitioned: str, settings: Settings, spawn: Callable[..., AppProcess]
) -> None:
    dsn = unpartitioned
    conn = await asyncpg.connect(dsn)
    # Retries of events stored before, within the retry window (the last 48 hours).
    recent = await conn.fetch(
        "SELECT event_id, site_offset FROM events WHERE ts > now() - interval '47 hours' "
        "ORDER BY random() LIMIT 50"
    )
    ingest = spawn("ingest", settings.with_(database_url=dsn), **FAST)
    poster = Poster(ingest.url, [(r[0], r[1]) for r in recent])
    # Batches of 40 from two clients and single events: commits both through the function
    # (up to 32 events) and through COPY.
    posting = [asyncio.create_task(poster.run(n, seed)) for n, seed in ((40, 1), (40, 2), (1, 3))]
    try:
        await asyncio.sleep(1.0)
        before = poster.requests
        assert await migrate(dsn) == ["0009_events_partitioned.sql"]
        during = poster.requests - before
        await asyncio.sleep(1.0)
    finally:
        poster.stop.set()
        await asyncio.gather(*posting)

    # Ingest went on through the migration, never held for long.
    print(f"requests during the migration: {during}, slowest: {poster.slowest_s:.3f} s")
    assert during > 10 and poster.slowest_s < 2.5, (during, poster.slowest_s)
    assert await conn.fetchval("SELECT relkind::text FROM pg_class WHERE relname = 'events'") == "p"
    legacy, *months = await partitions.listed(conn, "events")
    assert legacy.name == "events_legacy" and legacy.lower is None and len(months) == 2
    # Every acknowledged event stored once, at the offset it was acknowledged with; every
    # retry answered with the first offset; offsets gapless.
    rows = await conn.fetch("SELECT event_id, site_offset FROM events WHERE site = $1", SITE)
    stored = {r[0]: r[1] for r in rows}
    assert len(stored) == len(rows) == BEFORE + len(poster.stored)
    assert all(stored[x] == offset for x, offset in poster.stored.items())
    assert poster.duplicates and all(stored[x] == offset for x, offset in poster.duplicates)
    assert sorted(stored.values()) == list(range(1, len(rows) + 1))
    # Retried now, events from before the migration are recognised through event_ids.
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=10) as client:
        body = [{"site": SITE, "name": "pageview", "url": f"https://{SITE}/", "id": str(r[0])}
                for r in recent]  # fmt: skip
        results = (await client.post(f"{ingest.url}/api/events", json=body)).json()["results"]
    assert [(r["duplicate"], parse_cursor(r["cursor"])[1]) for r in results] == [
        (True, r[1]) for r in recent
    ]

    # Time passes: the next events go to the first new month. A resume from a cursor of the
    # old table gets every later event once, in order, across that boundary, and so does
    # history paged from it.
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        assert months[0].lower is not None
        after_boundary = months[0].lower + timedelta(hours=1)
        later = await commit(pool, [new(SITE, n=i, ts=after_boundary) for i in range(5)])
        head = max(o.offset for o in later if o is not None)
        assert head == len(rows) + 5
        epoch = await epoch_of(pool, SITE)
        since = BEFORE - 100
        gateway = spawn("gateway", settings.with_(database_url=dsn), **FAST)
        viewer = await WsViewer.open(gateway.ws_url, SITE, token(SITE), f"&since={epoch}-{since}")
        try:
            await viewer.wait_for(head - since, timeout=30)
            assert viewer.offsets == list(range(since + 1, head + 1))
            assert (await viewer.wait_notice("welcome"))["recovered"] is True
        finally:
            await viewer.close()
        assert await history(gateway.url, f"{epoch}-{since}") == list(range(since + 1, head + 1))
    finally:
        await pool.close()
        await conn.close()


async def history(base: str, after: str) -> list[int]:
    """Every offset the history endpoint returns after a cursor, page by page."""
    seen: list[int] = []
    cursor: str | None = after
    async with httpx.AsyncClient(timeout=10) as client:
        while cursor is not None:
            r = await client.get(
                f"{base}/v1/sites/{SITE}/history",
                params={"token": token(SITE), "after": cursor, "limit": "500"},
            )
            assert r.status_code == 200, r.text
            seen += [e["offset"] for e in r.json()["events"]]
            cursor = r.json()["next"]
    return seen


async def test_the_old_table_is_trimmed_oldest_first_until_it_can_be_dropped(
    unpartitioned: str,
) -> None:
    """events_legacy holds every month from before the migration, so it cannot be dropped
    whole for a while: the old batched delete trims it, per site, oldest offsets first, never
    past an event clearly inside retention, and then it goes whole like any month."""
    assert await migrate(unpartitioned) == ["0009_events_partitioned.sql"]
    pool = await asyncpg.create_pool(unpartitioned, min_size=1, max_size=2)
    assert pool is not None
    try:
        cutoff = datetime.now(UTC) - timedelta(days=2)  # about the first third is older
        expired = await pool.fetchval("SELECT count(*) FROM events WHERE ts < $1", cutoff)
        assert BEFORE * 0.3 < expired < BEFORE * 0.36
        report = await expire_events(pool, cutoff, batch=7000, pause_s=0)
        assert report.dropped_partitions == 0 and report.batches == -(-expired // 7000)
        assert await offsets(pool) == list(range(expired + 1, BEFORE + 1))
        [legacy, first, _] = await partitions.listed(pool, "events")
        assert legacy.upper is not None
        await commit(pool, [new(SITE, ts=legacy.upper + timedelta(days=1))])
        report = await expire_events(pool, legacy.upper + timedelta(seconds=1))
        assert report.dropped_partitions == 1
        assert await offsets(pool) == [BEFORE + 1]
        assert (await partitions.listed(pool, "events"))[0].name == first.name
    finally:
        await pool.close()


async def offsets(pool: asyncpg.Pool) -> list[int]:
    rows = await pool.fetch("SELECT site_offset FROM events WHERE site = $1 ORDER BY 1", SITE)
    return [r[0] for r in rows]
