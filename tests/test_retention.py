"""Retention and salt expiry (`sitewire worker`)."""

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from app.servers.postgres import with_database
from app.settings import Settings
from app.store.salts import get_or_create
from app.store.sites import create_site
from tests.processes import ROOT, AppProcess
from tests.servers import Servers
from tests.support import cover, eventually, metric
from workers.retention import expire_events, run_once


async def _fill(pool: asyncpg.Pool, site: str, old: int, new: int) -> None:
    long_ago = datetime.now(UTC) - timedelta(days=500)
    await cover(pool, long_ago - timedelta(minutes=1), long_ago + timedelta(minutes=1))
    await pool.execute(
        """INSERT INTO events (site, site_offset, event_id, name, url, path, visitor_id, device, ts)
           SELECT $1, g, gen_random_uuid(), 'pageview', 'https://x/', '/', 0, 'desktop',
                  CASE WHEN g <= $2::int THEN $4::timestamptz ELSE now() END
           FROM generate_series(1, $2::int + $3::int) AS g""",
        site,
        old,
        new,
        long_ago,
    )
    await pool.execute("UPDATE sites SET next_offset = $2 WHERE id = $1", site, old + new + 1)


async def test_old_events_go_with_their_month_and_one_contiguous_range_remains(
    own_pool: asyncpg.Pool,
) -> None:
    site = "a.example"
    await create_site(own_pool, site)
    await _fill(own_pool, site, old=2500, new=40)
    report = await expire_events(own_pool, datetime.now(UTC) - timedelta(days=400))
    assert report.dropped_partitions == 1 and report.deleted_events == report.batches == 0
    offsets = [r[0] for r in await own_pool.fetch(
        "SELECT site_offset FROM events WHERE site = $1 ORDER BY site_offset", site)]  # fmt: skip
    assert offsets == list(range(2501, 2541))


async def test_two_workers_at_once_make_one_pass(
    own_pool: asyncpg.Pool, settings: Settings, servers: Servers
) -> None:
    """An outside test ran two passes at once (two workers overlap during a rollout): one
    dropped a month, the other failed on it ("relation does not exist") and did nothing else.
    One pass runs at a time; the other is skipped, and neither fails."""
    site = "b.example"
    await create_site(own_pool, site)
    await _fill(own_pool, site, old=300, new=10)
    dsn = with_database(servers.admin_dsn, await own_pool.fetchval("SELECT current_database()"))
    other = await asyncpg.create_pool(dsn, min_size=0, max_size=3)
    try:
        reports = await asyncio.gather(
            run_once(own_pool, settings.with_(retention_days=400)),
            run_once(other, settings.with_(retention_days=400)),
        )
    finally:
        await other.close()
    assert sorted(r.skipped for r in reports) == [False, True]
    [done] = [r for r in reports if not r.skipped]
    assert done.dropped_partitions == 1
    again = await run_once(own_pool, settings.with_(retention_days=400))  # the lock was let go
    assert not again.skipped and again.dropped_partitions == 0


async def test_salts_expire_after_48_hours(pool: asyncpg.Pool, settings: Settings) -> None:
    today = datetime.now(UTC).date()
    await get_or_create(pool, today - timedelta(days=3))
    await pool.execute(
        "UPDATE salts SET created_at = now() - interval '49 hours' WHERE day = $1",
        today - timedelta(days=3),
    )
    await get_or_create(pool, today)
    report = await run_once(pool, settings.with_(retention_days=0))
    assert report.deleted_salts >= 1
    days = {r[0] for r in await pool.fetch("SELECT day FROM salts")}
    assert today in days and today - timedelta(days=3) not in days


def test_worker_command_runs_one_pass(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url, "SITEWIRE_RETENTION_DAYS": "30"}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "worker", "--once"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "background pass done" in result.stderr


async def test_the_worker_reports_its_passes_on_its_internal_port(
    spawn: Callable[..., AppProcess],
) -> None:
    worker = spawn("worker", SITEWIRE_WORKER_INTERVAL_S="1")
    done = 'sitewire_worker_passes_total{outcome="done"}'
    await eventually(
        lambda: metric_at_least(worker.internal_url, done, 2), 30, 0.2, "two passes done"
    )
    assert await metric(worker.internal_url, "sitewire_worker_interval_seconds") == 1.0
    last = await metric(worker.internal_url, "sitewire_worker_last_pass_timestamp_seconds")
    assert abs(last - time.time()) < 30
    failed = 'sitewire_worker_passes_total{outcome="failed"}'
    assert await metric(worker.internal_url, failed) == 0.0


async def metric_at_least(url: str, name: str, value: float) -> bool:
    return await metric(url, name) >= value
