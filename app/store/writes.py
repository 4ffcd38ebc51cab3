"""Writing events to PostgreSQL: `commit()` stores a batch in one transaction, in one round
trip through `sitewire_store_events` when it is small, with COPY otherwise. Offsets are
allocated inside that transaction under each site's row lock, so per site they are gapless and
follow commit order, across every ingest replica (docs/ingest.md explains the choice and its
cost). Ingest's group commit (app.ingest.committer) batches concurrent requests into it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from app.wire import encode_event_body, with_position

log = logging.getLogger(__name__)


_COLUMNS = (
    "site", "site_offset", "event_id", "name", "url", "path", "referrer", "referrer_host",
    "props", "visitor_id", "device", "ts",
)  # fmt: skip


# Not frozen: these are built per event on the hot path, and a frozen dataclass's __init__
# (object.__setattr__ per field) costs twice as much. Nothing mutates them after creation.
@dataclass(slots=True)
class NewEvent:
    """A validated, enriched event waiting to be stored."""

    site: str
    event_id: uuid.UUID
    name: str
    url: str
    path: str
    referrer: str | None
    referrer_host: str | None
    props: dict[str, Any]
    visitor_id: int
    device: str
    ts: datetime
    #: True when the server minted `event_id` (a fresh UUIDv7): it cannot already be stored,
    #: so the commit skips its duplicate lookup.
    minted: bool = False
    #: The wire bytes without the position, and `props` as JSON text for the COPY. Encoded
    #: when the event is built (while its request is handled) rather than in the commit, which
    #: every waiting request and PostgreSQL wait on (docs/performance.md).
    body: bytes = field(init=False)
    props_json: str = field(init=False)

    def __post_init__(self) -> None:
        self.body = encode_event_body(
            event_id=self.event_id,
            site=self.site,
            name=self.name,
            url=self.url,
            path=self.path,
            referrer=self.referrer,
            referrer_host=self.referrer_host,
            props=self.props,
            visitor_id=self.visitor_id,
            device=self.device,
            ts=self.ts,
        )
        self.props_json = orjson.dumps(self.props).decode()


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
#: Commits of at most this many events make one call to `sitewire_store_events` (one round trip,
#: migrations/0003); larger ones COPY. The function inserts row by row, which costs PostgreSQL
#: more per event than COPY, and the five round trips of the COPY path matter less the more
#: events share them (docs/performance.md).
SMALL_COMMIT_EVENTS = 32

_STORE_EVENTS_SQL = (
    "SELECT epoch, site_offset, duplicate FROM sitewire_store_events("
    "$1::text[], $2::uuid[], $3::boolean[], $4::text[], $5::text[], $6::text[], $7::text[], "
    "$8::text[], $9::jsonb[], $10::bigint[], $11::text[], $12::timestamptz[])"
)


async def commit(
    pool: asyncpg.Pool, events: Sequence[NewEvent], small: int = SMALL_COMMIT_EVENTS
) -> list[Outcome]:
    """Store `events` in one transaction; return an outcome per event, in order. Both ways
    lock the sites in id order, skip events already stored, and allocate gapless offsets."""
    if len(events) <= small:
        return await _commit_small(pool, events)
    return await _commit_copy(pool, events)


async def _commit_small(pool: asyncpg.Pool, events: Sequence[NewEvent]) -> list[Outcome]:
    # No explicit transaction: the call is its own, so it commits in the same round trip.
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            _STORE_EVENTS_SQL,
            [e.site for e in events], [e.event_id for e in events], [e.minted for e in events],
            [e.name for e in events], [e.url for e in events], [e.path for e in events],
            [e.referrer for e in events], [e.referrer_host for e in events],
            [e.props_json for e in events], [e.visitor_id for e in events],
            [e.device for e in events], [e.ts for e in events],
        )  # fmt: skip
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
            await conn.copy_records_to_table("events", records=records, columns=_COLUMNS)
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
    """Offsets of events already stored, by (site, event id). Only client-sent ids can be
    retries: a server-minted UUIDv7 is new, so batches without client ids skip a round trip
    (were one ever to collide, the unique constraint fails the commit: nothing is acked)."""
    retried = [e for e in events if not e.minted]
    if not retried:
        return {}
    rows = await conn.fetch(
        "SELECT e.site, e.event_id, e.site_offset FROM events e "
        "JOIN unnest($1::text[], $2::uuid[]) AS k(site, event_id) USING (site, event_id)",
        [e.site for e in retried],
        [e.event_id for e in retried],
    )
    return {(r["site"], r["event_id"]): r["site_offset"] for r in rows}


def _record(offset: int, e: NewEvent) -> tuple[Any, ...]:
    return (
        e.site, offset, e.event_id, e.name, e.url, e.path, e.referrer, e.referrer_host,
        e.props_json, e.visitor_id, e.device, e.ts,
    )  # fmt: skip
