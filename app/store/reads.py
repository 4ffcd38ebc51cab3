"""Reading a site's past events from PostgreSQL by offset (the broker's window comes first:
app.gateway.replay).

Reads return `(offset, payload)` pairs in offset order, in the wire format of app.wire.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import orjson

from app.wire import Event, encode_event_body, with_position


async def site_heads(pool: asyncpg.Pool, sites: list[str]) -> dict[str, int]:
    """The last committed offset of each site, in one query."""
    rows = await pool.fetch(
        "SELECT id, next_offset - 1 AS head FROM sites WHERE id = ANY($1::text[])", sites
    )
    return {r["id"]: r["head"] for r in rows}


#: Stored events of a site after an offset, optionally up to an offset and before a time.
#: Served by the primary key (site, site_offset), so a page costs the same on any size of site.
EVENTS_AFTER_SQL = (
    "SELECT site_offset, event_id, name, url, path, referrer, referrer_host, props, "
    "visitor_id, device, ts FROM events WHERE site = $1 AND site_offset > $2 "
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
    return [(r["site_offset"], encode_row(site, epoch, r)) for r in rows]


def encode_row(site: str, epoch: str, row: asyncpg.Record) -> bytes:
    props: Any = row["props"]
    body = encode_event_body(
        event_id=row["event_id"],
        site=site,
        name=row["name"],
        url=row["url"],
        path=row["path"],
        referrer=row["referrer"],
        referrer_host=row["referrer_host"],
        props=orjson.loads(props) if isinstance(props, str) else props,
        visitor_id=row["visitor_id"],
        device=row["device"],
        ts=row["ts"],
    )
    return with_position(epoch, row["site_offset"], body)
