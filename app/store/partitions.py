"""The time partitions of `events` (by month of ts) and of the dedup table `event_ids` (by day):
made ahead by the worker, made on demand by a commit that found none, and dropped whole once
past retention (events) or the retry window (event_ids). Schema: migrations/0009; design and
costs: docs/decisions.md, "The events table partitioned by month".

Dropping a month of events keeps what resumes rely on, that what is stored of a site is one
contiguous offset range. Offsets follow ts only closely, not exactly: ts is taken when ingest
handles the request and the offset when the commit holds the site's lock, so two replicas (or
one whose clock is a little behind) can commit a smaller offset with a later ts. An event just
after the boundary may then have a smaller offset than one in the partition being dropped (a
"straggler"); it is deleted in the same transaction as the partition is detached, so no hole
opens below what remains. Only stragglers within STRAGGLER_TOLERANCE of the boundary are taken:
an event whose ts is hours off (a broken clock) is never a reason to delete a site's newer
events, and the hole it may leave is reported to a viewer as a gap (app.gateway.replay).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from app.store.locking import Conn, with_short_locks

log = logging.getLogger(__name__)

_Step = Callable[[], Awaitable[None]]

#: The partitioned tables, each with its partition period (migrations/0009).
EVENTS = "events"
EVENT_IDS = "event_ids"
PARTITIONED = (EVENTS, EVENT_IDS)
#: How long a retry is recognised at least (docs/ingest.md): a day of `event_ids` is dropped
#: once its end is this far in the past, so entries live 48 to 72 hours.
RETRY_WINDOW = timedelta(hours=48)
#: How far ahead the worker keeps partitions: next month's before it begins (so ingest needs
#: the worker to have run once in a month), and two days of entries.
AHEAD = {EVENTS: timedelta(days=31), EVENT_IDS: timedelta(days=2)}
#: The most a ts may be out of offset order and still be deleted as a straggler.
STRAGGLER_TOLERANCE = timedelta(hours=1)
#: A detached partition is renamed so before it is dropped: a pass stopped between the two
#: leaves a name the next pass knows to drop (a table an operator detached keeps its own).
EXPIRED_PREFIX = "sitewire_expired_"


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    #: None: unbounded (the first partition of a migrated table, events_legacy, has no lower).
    lower: datetime | None
    upper: datetime | None


def is_missing(exc: BaseException) -> bool:
    """Whether a commit failed because no partition takes one of its rows (PostgreSQL raises
    check_violation naming the parent, with no constraint)."""
    return (
        isinstance(exc, asyncpg.CheckViolationError)
        and exc.constraint_name is None
        and exc.table_name in PARTITIONED
    )


async def listed(pool: asyncpg.Pool | Conn, table: str) -> list[Partition]:
    """The partitions of `table`, oldest first."""
    rows = await pool.fetch(
        "SELECT name, lower_bound, upper_bound FROM sitewire_partitions($1::regclass) "
        "ORDER BY lower_bound NULLS FIRST",
        table,
    )
    return [Partition(r["name"], r["lower_bound"], r["upper_bound"]) for r in rows]


async def create(
    pool: asyncpg.Pool, table: str, since: datetime, until: datetime, attempts: int | None = None
) -> int:
    """Make the partitions of `table` covering since..until that are missing; how many."""
    async with pool.acquire() as conn:

        async def make() -> int:
            made = await conn.fetchval(
                "SELECT sitewire_create_partitions($1, $2, $3)", table, since, until
            )
            return int(made)

        what = f"creating partitions of {table}"
        made = await with_short_locks(conn, make, what, attempts=attempts)
    if made:
        log.info("partitions created", extra={"table": table, "count": made})
    return made


async def create_ahead(pool: asyncpg.Pool, now: datetime) -> int:
    """The worker's pass: partitions up to AHEAD of `now`, and for `now` itself."""
    return sum([await create(pool, t, now, now + AHEAD[t]) for t in PARTITIONED])


async def drop_events(pool: asyncpg.Pool, part: Partition) -> int:
    """Drop a partition of `events` whose every event is past retention, with its stragglers;
    how many stragglers. Finding them reads by index (a probe per site), outside any strong
    lock; deleting them and detaching the partition is one short transaction under ACCESS
    EXCLUSIVE on the parent (a monthly pause of ingest of at most the lock timeout plus a few
    milliseconds)."""
    assert part.upper is not None, "a partition with no upper bound is never past retention"
    async with pool.acquire() as conn:
        found = await conn.fetch(_STRAGGLERS_SQL.format(part=_ident(part.name)),
                                 part.upper, STRAGGLER_TOLERANCE)  # fmt: skip
        sites = [r["site"] for r in found]
        offsets = [r["site_offset"] for r in found]

        async def delete_stragglers() -> None:
            if sites:
                await conn.execute(_DELETE_STRAGGLERS_SQL, sites, offsets, part.upper)

        await _detach_and_drop(conn, EVENTS, part.name, delete_stragglers)
    return len(sites)


async def drop_entries(pool: asyncpg.Pool, part: Partition) -> None:
    """Drop a day of `event_ids` past the retry window."""
    async with pool.acquire() as conn:
        await _detach_and_drop(conn, EVENT_IDS, part.name, None)


async def drop_leftovers(pool: asyncpg.Pool) -> int:
    """Drop partitions a stopped pass detached but did not drop; how many."""
    names = await pool.fetch(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND NOT relispartition "
        "AND relnamespace = current_schema()::regnamespace AND starts_with(relname, $1)",
        EXPIRED_PREFIX,
    )
    for row in names:
        await pool.execute(f"DROP TABLE {_ident(row['relname'])}")
    return len(names)


async def trim(
    pool: asyncpg.Pool, part: Partition, older_than: datetime, batch: int, pause_s: float
) -> tuple[int, int]:
    """Delete the expired events of a partition that is only partly past retention and has no
    lower bound (events_legacy, the table as it was before partitioning, until its last month
    is past retention and it is dropped whole): per site, the oldest offsets first, in batches
    of their own short transactions, never past an event clearly inside retention. (Deleted
    events, batches.)"""
    deleted = batches = 0
    sql = _TRIM_SQL.format(part=_ident(part.name))
    for row in await pool.fetch("SELECT id FROM sites ORDER BY id"):
        while True:
            status = await pool.execute(sql, row["id"], older_than, batch, STRAGGLER_TOLERANCE)
            count = int(status.split()[-1])
            if count:
                deleted += count
                batches += 1
            if count < batch:
                break
            await asyncio.sleep(pause_s)  # let other transactions through between batches
    return deleted, batches


async def _detach_and_drop(conn: Conn, table: str, name: str, first: _Step | None) -> None:
    expired = EXPIRED_PREFIX + name

    async def detach() -> None:
        # The parent first: from here no reader or writer is inside `table`, so the straggler
        # delete and the detach are seen together or not at all.
        await conn.execute(f"LOCK TABLE ONLY {_ident(table)} IN ACCESS EXCLUSIVE MODE")
        if first is not None:
            await first()
        await conn.execute(f"ALTER TABLE {_ident(table)} DETACH PARTITION {_ident(name)}")
        await conn.execute(f"ALTER TABLE {_ident(name)} RENAME TO {_ident(expired)}")

    await with_short_locks(conn, detach, f"detaching {name}")
    # Its own transaction: unlinking a month of files holds no lock anyone else waits for.
    await conn.execute(f"DROP TABLE {_ident(expired)}")
    log.info("partition dropped", extra={"table": table, "partition": name})


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


#: Events after the partition's end (within the tolerance) whose offset is below its site's
#: newest in the partition. One probe per site for that newest offset (the partition's primary
#: key, backwards), one range per site in the next partition.
_STRAGGLERS_SQL = """
SELECT e.site, e.site_offset FROM events e
JOIN (SELECT s.id AS site,
             (SELECT max(p.site_offset) FROM {part} p WHERE p.site = s.id) AS top
      FROM sites s) m ON e.site = m.site AND e.site_offset <= m.top
WHERE e.ts >= $1 AND e.ts < $1 + $2::interval
"""
_DELETE_STRAGGLERS_SQL = """
DELETE FROM events e USING unnest($1::text[], $2::bigint[]) AS k(site, site_offset)
WHERE e.site = k.site AND e.site_offset = k.site_offset AND e.ts >= $3
"""
#: One batch of a site's expired events: the longest run of its oldest offsets that ends at
#: an expired event ($2 is the cutoff) and reaches no event clearly inside retention (the
#: "wall": ts at least the tolerance past the cutoff), so the deleted part is always a prefix.
_TRIM_SQL = """
WITH head AS (
    SELECT site_offset, ts FROM {part} WHERE site = $1 ORDER BY site_offset LIMIT $3
), wall AS (
    SELECT min(site_offset) AS o FROM head WHERE ts >= $2::timestamptz + $4::interval
), last AS (
    SELECT max(site_offset) AS o FROM head
    WHERE ts < $2 AND site_offset < coalesce((SELECT o FROM wall), 9223372036854775807)
)
DELETE FROM {part} e WHERE e.site = $1 AND e.site_offset <= (SELECT o FROM last)
"""
