"""Background jobs (`sitewire worker`): partitions made ahead, event retention, the retry
window, dropped-event counts and salt expiry.

`events` is partitioned by month of ts and `event_ids` (retries recognised) by day
(migrations/0009, app.store.partitions). Each pass first makes the partitions ingest will need
(this month and the next; today and two days ahead), so a commit never waits for one while
the worker runs at least monthly. Retention then drops each month whose every event is older
than `SITEWIRE_RETENTION_DAYS`, whole: no row deletes, no bloat, no vacuum. Only the table as it
was before partitioning (`events_legacy`, no lower bound) is still trimmed by the old batched
delete, oldest offsets first, until its last month is past retention too. Either way what is
stored of a site stays one contiguous offset range, which resumes rely on
(docs/operations.md).

One pass runs at a time across every worker (a PostgreSQL advisory lock): two workers overlap
during a rollout, and an outside test found the second pass failing on a month the first had
just dropped (and so making no partitions ahead that time). A pass that finds the lock taken
is skipped: the one holding it does the work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from app.servers.postgres import STORAGE_ERRORS
from app.settings import Settings
from app.store import drops, partitions, salts
from workers.metrics import WorkerMetrics

log = logging.getLogger(__name__)

#: Rows deleted per transaction when trimming events_legacy.
BATCH = 5000
#: The advisory lock one pass holds (pg_try_advisory_lock key; app.store.migrate has its own).
PASS_LOCK_KEY = 0x5377_5061_7373


@dataclass
class PassReport:
    #: Another worker's pass was running: this one did nothing.
    skipped: bool = False
    created_partitions: int = 0
    #: Months of events dropped whole, and the events after their end deleted with them.
    dropped_partitions: int = 0
    deleted_stragglers: int = 0
    #: Rows deleted from events_legacy, and in how many transactions.
    deleted_events: int = 0
    batches: int = 0
    #: Days of retry-window entries dropped.
    dropped_entry_days: int = 0
    deleted_salts: int = 0
    #: Days of dropped-event counts (per site and reason) past retention, as for events.
    deleted_drop_counts: int = 0


async def expire_events(
    pool: asyncpg.Pool, older_than: datetime, batch: int = BATCH, pause_s: float = 0.01
) -> PassReport:
    """Drop the months of events entirely before `older_than`, oldest first, and trim the
    unbounded first partition if it is only partly before it."""
    report = PassReport()
    for part in await partitions.listed(pool, partitions.EVENTS):
        if part.upper is not None and part.upper <= older_than:
            report.deleted_stragglers += await partitions.drop_events(pool, part)
            report.dropped_partitions += 1
        elif part.lower is None:
            deleted, batches = await partitions.trim(pool, part, older_than, batch, pause_s)
            report.deleted_events += deleted
            report.batches += batches
    return report


async def expire_entries(pool: asyncpg.Pool, now: datetime) -> int:
    """Drop the days of `event_ids` that ended more than the retry window ago; how many."""
    dropped = 0
    for part in await partitions.listed(pool, partitions.EVENT_IDS):
        if part.upper is not None and part.upper <= now - partitions.RETRY_WINDOW:
            await partitions.drop_entries(pool, part)
            dropped += 1
    return dropped


async def run_once(
    pool: asyncpg.Pool, settings: Settings, now: datetime | None = None
) -> PassReport:
    """One pass, unless another worker's is running (then a report with `skipped`). Holds one
    of `pool`'s connections for the lock; the pass itself needs one more."""
    async with pool.acquire() as lock:
        if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", PASS_LOCK_KEY):
            log.info("another worker's pass is running; this one is skipped")
            return PassReport(skipped=True)
        try:
            return await _pass(pool, settings, now or datetime.now(UTC))
        finally:
            await lock.execute("SELECT pg_advisory_unlock($1)", PASS_LOCK_KEY)


async def _pass(pool: asyncpg.Pool, settings: Settings, now: datetime) -> PassReport:
    # First what ingest needs; then what a stopped pass left half-dropped.
    created = await partitions.create_ahead(pool, now)
    await partitions.drop_leftovers(pool)
    report = PassReport()
    if settings.retention_days:
        report = await expire_events(pool, now - timedelta(days=settings.retention_days))
        cutoff = (now - timedelta(days=settings.retention_days)).date()
        report.deleted_drop_counts = await drops.delete_before(pool, cutoff)
    report.created_partitions = created
    report.dropped_entry_days = await expire_entries(pool, now)
    report.deleted_salts = await salts.delete_expired(pool, now)
    log.info("background pass done", extra=vars(report))
    return report


async def run(settings: Settings, once: bool = False, metrics: WorkerMetrics | None = None) -> None:
    """One pass (`once`: a failure propagates), or a pass every SITEWIRE_WORKER_INTERVAL_S
    until cancelled (a failed pass is logged and retried next time). `metrics`, when given,
    records each pass's outcome."""
    pool = await asyncpg.create_pool(settings.require_database(), min_size=0, max_size=3)
    assert pool is not None
    try:
        if once:
            _record(metrics, await run_once(pool, settings))
            return
        while True:
            try:
                _record(metrics, await run_once(pool, settings))
            except STORAGE_ERRORS as exc:
                if metrics is not None:
                    metrics.passes.labels("failed").inc()
                log.warning(
                    "background pass failed; retrying next time", extra={"error": repr(exc)}
                )
            await asyncio.sleep(settings.worker_interval_s)
    finally:
        await pool.close()


def _record(metrics: WorkerMetrics | None, report: PassReport) -> None:
    if metrics is None:
        return
    if report.skipped:
        metrics.passes.labels("skipped").inc()
        return
    metrics.passes.labels("done").inc()
    metrics.last_done.set(time.time())
    metrics.partitions_created.inc(report.created_partitions)
    metrics.partitions_dropped.inc(report.dropped_partitions)
