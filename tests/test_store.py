"""The group commit's two ways to store events, against real PostgreSQL: one round trip through
`sitewire_store_rows` for small commits, COPY for large ones. They must agree exactly."""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid

import asyncpg
import orjson
import pytest

from app.schema import NewEvent
from app.store.sites import create_site
from app.store.writes import Stored, commit
from tests.support import new

#: `small` for commit(): every commit through the function, or every commit through COPY.
PATHS = {"function": 10_000, "copy": 0}


async def new_site(pool: asyncpg.Pool) -> str:
    site = f"s{secrets.token_hex(4)}.example"
    await create_site(pool, site)
    return site


async def offsets(pool: asyncpg.Pool, site: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT site_offset FROM events WHERE site = $1 ORDER BY site_offset", site
    )
    return [r["site_offset"] for r in rows]


@pytest.mark.parametrize("path", PATHS)
async def test_offsets_duplicates_and_unknown_sites(pool: asyncpg.Pool, path: str) -> None:
    small = PATHS[path]
    a, b = await new_site(pool), await new_site(pool)
    gone = f"gone-{secrets.token_hex(4)}.example"  # never registered: no row to lock
    x = uuid.uuid4()
    first = await commit(
        pool, [new(a, n=1), new(b, n=1), new(gone), new(a, x, 2), new(a, x, 2), new(b, n=2)], small
    )
    assert first[2] is None
    got = [(o.event.site, o.offset, o.duplicate) for o in first if o is not None]
    assert got == [(a, 1, False), (b, 1, False), (a, 2, False), (a, 2, True), (b, 2, False)]
    again = await commit(pool, [new(a, x, 2), new(a, n=3)], small)
    assert [(o.offset, o.duplicate) for o in again if o is not None] == [(2, True), (3, False)]

    assert await offsets(pool, a) == [1, 2, 3]
    assert await offsets(pool, b) == [1, 2]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE site = $1", gone) == 0
    nexts = dict(await pool.fetch("SELECT id, next_offset FROM sites WHERE id = ANY($1)", [a, b]))
    assert nexts == {a: 4, b: 3}

    stored = [o for o in first + again if isinstance(o, Stored)]
    for o in stored:
        if o.duplicate:
            assert o.payload is None
            continue
        assert o.payload is not None
        event = orjson.loads(o.payload)
        assert event["cursor"] == f"{o.epoch}-{o.offset}" and event["offset"] == o.offset
        assert event["id"] == str(o.event.event_id) and event["props"] == o.event.props
    row = await pool.fetchrow("SELECT * FROM events WHERE site = $1 AND site_offset = 2", a)
    assert row["event_id"] == x and row["path"] == "/p/2"
    assert orjson.loads(row["props"]) == {"n": 2}


async def test_concurrent_commits_of_both_kinds_agree(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Commits racing on three sites (as from several ingest replicas), some through the
    function and some through COPY, retrying the same client ids: the site locks serialise
    them, so each site's offsets are 1..N with no gap and no repeat, every client id is stored
    once, and every retry reports the offset it was stored at."""
    sites = [await new_site(pool) for _ in range(3)]
    ids = [uuid.uuid4() for _ in range(30)]
    home = {x: sites[i % 3] for i, x in enumerate(ids)}
    rng = random.Random(7)

    def batch() -> list[NewEvent]:
        size = rng.choice([1, 3, 20, 40, 90])
        retried = rng.sample(ids, min(size // 2, 10))
        fresh = [new(rng.choice(sites)) for _ in range(size - len(retried))]
        return [new(home[x], x) for x in retried] + fresh

    batches = [batch() for _ in range(30)]
    # A second pool stands for a second ingest replica.
    pools = [pool, await asyncpg.create_pool(database_url, min_size=4, max_size=4)]
    try:
        results = await asyncio.gather(*(commit(pools[i % 2], b) for i, b in enumerate(batches)))
    finally:
        await pools[1].close()
    stored_at: dict[uuid.UUID, set[int]] = {}
    for outcomes in results:
        for o in outcomes:
            assert o is not None
            if not o.event.minted:
                stored_at.setdefault(o.event.event_id, set()).add(o.offset)
    assert all(len(at) == 1 for at in stored_at.values())  # a retry names the first offset
    for site in sites:
        stored = await offsets(pool, site)
        assert stored == list(range(1, len(stored) + 1))
        fresh = sum(1 for b in batches for e in b if e.site == site and e.minted)
        assert len(stored) == fresh + sum(1 for x in stored_at if home[x] == site)


async def test_a_site_with_events_cannot_be_deleted(pool: asyncpg.Pool) -> None:
    """No foreign key from events to sites (migrations/0002), but a trigger keeps what it did:
    a site re-registered after a delete would restart at offset 1 over its old rows."""
    site = await new_site(pool)
    await commit(pool, [new(site)])
    with pytest.raises(asyncpg.ForeignKeyViolationError, match="still has events"):
        await pool.execute("DELETE FROM sites WHERE id = $1", site)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute("UPDATE sites SET id = $2 WHERE id = $1", site, f"x{site}")
    await pool.execute("UPDATE sites SET domains = '{a.example}' WHERE id = $1", site)
    await pool.execute("DELETE FROM events WHERE site = $1", site)
    await pool.execute("DELETE FROM sites WHERE id = $1", site)
