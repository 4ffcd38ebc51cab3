"""Reading a site's past events from PostgreSQL by offset (the broker's window comes first:
app.gateway.replay).

Reads return `(offset, payload)` pairs in offset order, in the wire format of app.wire.
"""

from __future__ import annotations

from datetime import date, datetime

import asyncpg

from app.schema import NAMES, encode_body, from_row
from app.wire import Event, with_position


async def site_heads(pool: asyncpg.Pool, sites: list[str]) -> dict[str, int]:
    """The last committed offset of each site, in one query."""
    rows = await pool.fetch(
        "SELECT id, next_offset - 1 AS head FROM sites WHERE id = ANY($1::text[])", sites
    )
    return {r["id"]: r["head"] for r in rows}


#: Stored events of a site after an offset, optionally up to an offset and before a time: the
#: position, then every column of app.schema in its order. Served by the primary key (site,
#: site_offset), so a page costs the same on any size of site.
EVENTS_AFTER_SQL = (
    f"SELECT site_offset, {', '.join(NAMES)} FROM events WHERE site = $1 AND site_offset > $2 "
    "AND site_offset <= $3 AND ($4::timestamptz IS NULL OR ts < $4) "
    "ORDER BY site_offset LIMIT $5"
)


async def from_postgres(
    pool: asyncpg.Pool,
    site: str,
    epoch: str,
    after: int,
    limit: int,
    until: int | None = None,
    before: datetime | None = None,
) -> list[Event]:
    """Up to `limit` stored events with offset > after (and <= until, and ts < before), in
    offset order: replay pages, gap repairs and history pages alike."""
    bound = until if until is not None else 2**62
    rows = await pool.fetch(EVENTS_AFTER_SQL, site, after, bound, before, limit)
    return [(r["site_offset"], encode_row(epoch, r)) for r in rows]


def encode_row(epoch: str, row: asyncpg.Record) -> bytes:
    """A stored row (any query returning the position and every column) as the event viewers
    receive: the same bytes as when it was published live."""
    values = from_row([row[name] for name in NAMES])
    return with_position(epoch, row["site_offset"], encode_body(values))


async def stored_by_day(
    pool: asyncpg.Connection | asyncpg.Pool, site: str, since: date
) -> dict[date, int]:
    """The site's stored events per UTC day from `since` on (by the (site, ts) index; a scan of
    those days' rows, fine for a command, not for a request path)."""
    rows = await pool.fetch(
        """SELECT (ts AT TIME ZONE 'UTC')::date AS day, count(*) AS n FROM events
           WHERE site = $1 AND ts >= $2::date::timestamp AT TIME ZONE 'UTC' GROUP BY 1""",
        site,
        since,
    )
    return {row["day"]: row["n"] for row in rows}
