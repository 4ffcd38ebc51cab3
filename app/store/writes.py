"""Writing events to PostgreSQL: `commit()` stores a batch in one transaction, in one round
trip through `sitewire_store_rows` when it is small, with COPY otherwise. Offsets are
allocated inside that transaction under each site's row lock, so per site they are gapless and
follow commit order, across every ingest replica (docs/ingest.md explains the choice and its
cost). Ingest's group commit (app.ingest.committer) batches concurrent requests into it. The
columns come from app.schema, both ways by name.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from app.schema import JSON_COLUMNS, NAMES, NewEvent
from app.store import partitions
from app.wire import with_position

log = logging.getLogger(__name__)

#: COPY's columns: the event's position, then its fields.
_COPY_COLUMNS = ("site_offset", *NAMES)


@dataclass(slots=True)
class Stored:
    """The outcome of one submitted event: its offset, and whether it was a retry."""

    event: NewEvent
    epoch: str
    offset: int
    duplicate: bool
    #: The wire bytes (app.wire), set for newly stored events only.
    payload: bytes | None


#: None means the site no longer exists (deleted between validation and commit).
Outcome = Stored | None
#: Commits of at most this many events make one call to `sitewire_store_rows` (one round trip,
#: migrations/0004); larger ones COPY. The function inserts row by row, which costs PostgreSQL
#: more per event than COPY, and the five round trips of the COPY path matter less the more
#: events share them (docs/performance.md).
SMALL_COMMIT_EVENTS = 32

#: One call stores a small commit (migrations/0004): rows as a JSON array of objects keyed by
#: column, filled into the events table's own row type, so no column is named here.
_STORE_ROWS_SQL = (
    "SELECT epoch, site_offset, duplicate FROM sitewire_store_rows($1::jsonb, $2::boolean[])"
)


#: Tries at making a missing partition from the commit path: the requests wait meanwhile, and
#: only a partition being dropped or another attach holds the lock it needs.
PARTITION_ATTEMPTS = 3


async def commit(
    pool: asyncpg.Pool, events: Sequence[NewEvent], small: int = SMALL_COMMIT_EVENTS
) -> list[Outcome]:
    """Store `events` in one transaction; return an outcome per event, in order. Both ways
    lock the sites in id order, skip events already stored, and allocate gapless offsets."""
    try:
        return await _commit(pool, events, small)
    except asyncpg.CheckViolationError as exc:
        if not partitions.is_missing(exc):
            raise
        # No partition takes these events' ts: the worker has not run for a month, or this
        # host's clock is off. The commit rolled back whole, so nothing is stored and no
        # offset taken: make the partitions, and commit again.
        log.warning(
            "no partition for these events; creating it",
            extra={"table": exc.table_name, "events": len(events)},
        )
        # Per UTC day they fall on, not the span from the first to the last: a clock that
        # stepped by years within one batch must not make every month in between.
        for day in sorted({e.ts.astimezone(UTC).date() for e in events}):
            start = datetime.combine(day, time(), UTC)
            for table in partitions.PARTITIONED:
                await partitions.create(pool, table, start, start, attempts=PARTITION_ATTEMPTS)
        return await _commit(pool, events, small)


async def _commit(pool: asyncpg.Pool, events: Sequence[NewEvent], small: int) -> list[Outcome]:
    if len(events) <= small:
        return await _commit_small(pool, events)
    return await _commit_copy(pool, events)


async def _commit_small(pool: asyncpg.Pool, events: Sequence[NewEvent]) -> list[Outcome]:
    # No explicit transaction: the call is its own, so it commits in the same round trip.
    async with pool.acquire() as conn:
        rows = await conn.fetch(_STORE_ROWS_SQL, _json_rows(events), [e.minted for e in events])
    outcomes: list[Outcome] = []
    for e, row in zip(events, rows, strict=True):
        epoch, offset, duplicate = row
        if epoch is None:
            outcomes.append(None)
        elif duplicate:
            outcomes.append(Stored(e, epoch, offset, True, None))
        else:
            outcomes.append(Stored(e, epoch, offset, False, with_position(epoch, offset, e.body)))
    return outcomes


async def _commit_copy(pool: asyncpg.Pool, events: Sequence[NewEvent]) -> list[Outcome]:
    async with pool.acquire() as conn, conn.transaction():
        sites = sorted({e.site for e in events})
        # Lock the site rows in a fixed order (no deadlock between replicas). Holding them
        # makes the duplicate check below race-free and the offsets gapless.
        rows = await conn.fetch(
            "SELECT id, epoch, next_offset FROM sites WHERE id = ANY($1::text[]) "
            "ORDER BY id FOR UPDATE",
            sites,
        )
        epochs = {r["id"]: r["epoch"] for r in rows}
        next_offset = {r["id"]: r["next_offset"] for r in rows}
        seen = await _stored_before(conn, [e for e in events if e.site in epochs])
        outcomes: list[Outcome] = []
        records: list[tuple[Any, ...]] = []
        for e in events:
            epoch = epochs.get(e.site)
            if epoch is None:
                outcomes.append(None)
                continue
            if not e.minted:  # only a client-sent id can repeat, in this batch or before it
                key = (e.site, e.event_id)
                if key in seen:
                    outcomes.append(Stored(e, epoch, seen[key], True, None))
                    continue
                seen[key] = next_offset[e.site]
            offset = next_offset[e.site]
            next_offset[e.site] = offset + 1
            outcomes.append(Stored(e, epoch, offset, False, with_position(epoch, offset, e.body)))
            records.append(_record(offset, e))
        if records:
            await conn.copy_records_to_table("events", records=records, columns=_COPY_COLUMNS)
            await conn.execute(
                "UPDATE sites SET next_offset = v.next FROM unnest($1::text[], $2::bigint[]) "
                "AS v(id, next) WHERE sites.id = v.id",
                list(next_offset),
                list(next_offset.values()),
            )
        return outcomes


async def _stored_before(
    conn: PoolConnectionProxy, events: list[NewEvent]
) -> dict[tuple[str, uuid.UUID], int]:
    """Offsets of events already stored, by (site, event id), within the retry window (48 hours
    at least: app.store.partitions). Only client-sent ids can be retries: a server-minted
    UUIDv7 is new, so batches without client ids skip a round trip (were one ever to collide
    within a day, the day's primary key in `event_ids` fails the commit: nothing is acked)."""
    retried = [e for e in events if not e.minted]
    if not retried:
        return {}
    # A function (migrations/0008), not a query on a table, so that where retries are kept
    # can change under running replicas (0009 moved them to the dedup table `event_ids`).
    rows = await conn.fetch(
        "SELECT site, event_id, site_offset FROM sitewire_stored_offsets($1::text[], $2::uuid[])",
        [e.site for e in retried],
        [e.event_id for e in retried],
    )
    return {(r["site"], r["event_id"]): r["site_offset"] for r in rows}


def _record(offset: int, e: NewEvent) -> tuple[Any, ...]:
    """One COPY row: the position, then each column's value as stored."""
    return (offset, *e.stored)


def _json_rows(events: Sequence[NewEvent]) -> str:
    """The rows for `sitewire_store_rows`: one JSON object per event, keyed by column (orjson
    writes UUIDs and datetimes as PostgreSQL reads them; JSON columns go in as they are)."""
    rows = []
    for e in events:
        row = dict(zip(NAMES, e.stored, strict=True))
        for i in JSON_COLUMNS:
            row[NAMES[i]] = orjson.Fragment(e.stored[i])
        rows.append(row)
    return orjson.dumps(rows).decode()
