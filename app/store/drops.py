"""Counts of events dropped on purpose, per site, UTC day and reason (table `dropped_events`).

Dropped events are never stored, so these counts are the only trace of them: what
`sitewire sites stats SITE` shows beside the events stored. Written by ingest in batches
(app/ingest/drops.py), read by the command, trimmed by the retention worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

import asyncpg

#: (site, day, reason) -> events.
DropKey = tuple[str, date, str]


async def add(pool: asyncpg.Pool, counts: Mapping[DropKey, int]) -> None:
    """Add `counts` to the stored ones, in one statement."""
    if not counts:
        return
    sites, days, reasons = zip(*counts, strict=True)
    await pool.execute(
        """INSERT INTO dropped_events (site, day, reason, count)
           SELECT * FROM unnest($1::text[], $2::date[], $3::text[], $4::bigint[])
           ON CONFLICT (site, day, reason)
           DO UPDATE SET count = dropped_events.count + EXCLUDED.count""",
        list(sites),
        list(days),
        list(reasons),
        list(counts.values()),
    )


async def by_day(
    pool: asyncpg.Connection | asyncpg.Pool, site: str, since: date
) -> dict[date, dict[str, int]]:
    """The site's dropped counts from `since` on: day -> reason -> events."""
    rows = await pool.fetch(
        "SELECT day, reason, count FROM dropped_events WHERE site = $1 AND day >= $2",
        site,
        since,
    )
    found: dict[date, dict[str, int]] = {}
    for row in rows:
        found.setdefault(row["day"], {})[row["reason"]] = row["count"]
    return found


async def delete_before(pool: asyncpg.Pool, day: date) -> int:
    """Remove the counts of days before `day`; return how many rows."""
    status = await pool.execute("DELETE FROM dropped_events WHERE day < $1", day)
    return int(status.split()[-1])
