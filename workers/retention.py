"""Background jobs: event retention (events and dropped-event counts) and salt expiry
(`sitewire worker`).

Retention deletes a site's events older than `SITEWIRE_RETENTION_DAYS` in small batches, each
its own short transaction, oldest offsets first, so it never holds long locks and ingest keeps
committing meanwhile. Deleting the oldest offsets keeps the invariant resumes rely on: what is
stored of a site is one contiguous offset range (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from app.servers.postgres import STORAGE_ERRORS
from app.settings import Settings
from app.store import drops, salts

log = logging.getLogger(__name__)

#: Rows deleted per transaction.
BATCH = 5000


@dataclass
class PassReport:
    deleted_events: int = 0
    batches: int = 0
    deleted_salts: int = 0
    #: Days of dropped-event counts (per site and reason) past retention, as for events.
    deleted_drop_counts: int = 0


async def expire_events(
    pool: asyncpg.Pool, older_than: datetime, batch: int = BATCH, pause_s: float = 0.01
) -> PassReport:
    report = PassReport()
    sites = [r["id"] for r in await pool.fetch("SELECT id FROM sites ORDER BY id")]
    for site in sites:
        while True:
            status = await pool.execute(
                """DELETE FROM events WHERE site = $1 AND site_offset IN (
                       SELECT site_offset FROM events WHERE site = $1 AND ts < $2
                       ORDER BY site_offset LIMIT $3)""",
                site,
                older_than,
                batch,
            )
            deleted = int(status.split()[-1])
            if deleted:
                report.deleted_events += deleted
                report.batches += 1
            if deleted < batch:
                break
            await asyncio.sleep(pause_s)  # let other transactions through between batches
    return report


async def run_once(
    pool: asyncpg.Pool, settings: Settings, now: datetime | None = None
) -> PassReport:
    now = now or datetime.now(UTC)
    report = PassReport()
    if settings.retention_days:
        report = await expire_events(pool, now - timedelta(days=settings.retention_days))
        cutoff = (now - timedelta(days=settings.retention_days)).date()
        report.deleted_drop_counts = await drops.delete_before(pool, cutoff)
    report.deleted_salts = await salts.delete_expired(pool, now)
    log.info(
        "background pass done",
        extra={"deleted_events": report.deleted_events, "batches": report.batches,
               "deleted_salts": report.deleted_salts,
               "deleted_drop_counts": report.deleted_drop_counts},
    )  # fmt: skip
    return report


async def run(settings: Settings, once: bool = False) -> None:
    """One pass (`once`: a failure propagates), or a pass every SITEWIRE_WORKER_INTERVAL_S
    until cancelled (a failed pass is logged and retried next time)."""
    pool = await asyncpg.create_pool(settings.require_database(), min_size=0, max_size=2)
    assert pool is not None
    try:
        if once:
            await run_once(pool, settings)
            return
        while True:
            try:
                await run_once(pool, settings)
            except STORAGE_ERRORS as exc:
                log.warning(
                    "background pass failed; retrying next time", extra={"error": repr(exc)}
                )
            await asyncio.sleep(settings.worker_interval_s)
    finally:
        await pool.close()
