"""The partitioned event store (migrations/0009, app.store.partitions): partitions made ahead
and on demand, retries recognised across partitions, months dropped whole with one contiguous
offset range left, the retry window trimmed by day, reads by offset through every partition's
index."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from app.schema import NewEvent
from app.settings import Settings
from app.store import partitions
from app.store.reads import EVENTS_AFTER_SQL, from_postgres
from app.store.sites import create_site
from app.store.writes import commit
from tests.support import new
from workers.retention import expire_events, run_once

#: `small` for commit(): every commit through the function, or every commit through COPY.
PATHS = {"function": 10_000, "copy": 0}
MS = timedelta(milliseconds=1)


def month_start(when: datetime, months: int = 0) -> datetime:
    """The first instant (UTC) of the month `months` after the one `when` is in."""
    index = when.year * 12 + when.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def at(event: NewEvent, ts: datetime) -> NewEvent:
    return dataclasses.replace(event, ts=ts)


async def new_site(pool: asyncpg.Pool, name: str = "a.example") -> str:
    await create_site(pool, name)
    return name


async def offsets(pool: asyncpg.Pool, site: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT site_offset FROM events WHERE site = $1 ORDER BY site_offset", site
    )
    return [r[0] for r in rows]


async def names(pool: asyncpg.Pool, table: str) -> list[str]:
    return [p.name for p in await partitions.listed(pool, table)]


async def test_a_new_install_has_this_month_and_the_next(own_pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    this, following = month_start(now), month_start(now, 1)
    assert await names(own_pool, "events") == [f"events_{this:%Y_%m}", f"events_{following:%Y_%m}"]
    days = await names(own_pool, "event_ids")
    assert f"event_ids_{now:%Y_%m_%d}" in days
    assert f"event_ids_{now + timedelta(days=2):%Y_%m_%d}" in days
    assert await partitions.create_ahead(own_pool, now) == 0  # made already: nothing to do


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("missing", ["month and day", "day"])
async def test_a_commit_the_worker_was_late_for_makes_its_partitions(
    own_pool: asyncpg.Pool, path: str, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Three months ahead there is no partition yet (no worker ran), five days ahead no day of
    event_ids: the commit fails inside PostgreSQL, stores nothing, makes what is missing, and
    commits again."""
    site = await new_site(own_pool)
    now = datetime.now(UTC)
    later = month_start(now, 3) + timedelta(days=4) if missing != "day" else now + timedelta(days=5)
    with caplog.at_level(logging.WARNING, "app.store.writes"):
        out = await commit(own_pool, [at(new(site, uuid.uuid4()), later), new(site)], PATHS[path])
    assert [(o.offset, o.duplicate) for o in out if o] == [(1, False), (2, False)]
    assert "no partition for these events" in caplog.text
    assert f"events_{later:%Y_%m}" in await names(own_pool, "events")
    assert f"event_ids_{later:%Y_%m_%d}" in await names(own_pool, "event_ids")
    assert await offsets(own_pool, site) == [1, 2]


@pytest.mark.parametrize("path", PATHS)
async def test_a_retry_in_a_later_partition_is_recognised(
    own_pool: asyncpg.Pool, path: str
) -> None:
    """A retry gets a new ts, so it may land in the next day of event_ids and the next month of
    events: it is still answered with the original offset and stored once."""
    small = PATHS[path]
    site = await new_site(own_pool)
    boundary = month_start(datetime.now(UTC), 1)
    x, y = uuid.uuid4(), uuid.uuid4()
    first = await commit(own_pool, [at(new(site, x, 1), boundary - MS), new(site, y, 2)], small)
    again = await commit(
        own_pool, [at(new(site, x, 1), boundary + MS), at(new(site, y, 2), boundary + MS)], small
    )
    assert [(o.offset, o.duplicate) for o in first if o] == [(1, False), (2, False)]
    assert [(o.offset, o.duplicate) for o in again if o] == [(1, True), (2, True)]
    assert await offsets(own_pool, site) == [1, 2]
    entries = await own_pool.fetch("SELECT event_id, site_offset FROM event_ids WHERE site = $1",
                                   site)  # fmt: skip
    assert sorted((r[1], r[0]) for r in entries) == [(1, x), (2, y)]  # one entry per event


async def test_months_past_retention_are_dropped_whole(own_pool: asyncpg.Pool) -> None:
    """Ingest takes ts before the commit takes the offset, so around a month's end a smaller
    offset can carry a later ts. Dropping the month also deletes those stragglers, so what
    remains of the site is one contiguous range, and a read from before it starts at its
    first offset."""
    site = await new_site(own_pool)
    old = month_start(datetime.now(UTC), -14)
    boundary = month_start(old, 1)
    plan = [old + timedelta(days=3)] * 3 + [boundary + MS, boundary - MS]  # 4 after, 5 before
    plan += [boundary + timedelta(days=2)] * 3 + [month_start(old, 2) + timedelta(days=1)] * 2
    for ts in plan:
        await commit(own_pool, [at(new(site), ts)])
    assert await offsets(own_pool, site) == list(range(1, 11))

    report = await expire_events(own_pool, boundary + timedelta(days=1))
    assert (report.dropped_partitions, report.deleted_stragglers) == (1, 1)
    assert f"events_{old:%Y_%m}" not in await names(own_pool, "events")
    assert await offsets(own_pool, site) == list(range(6, 11))
    page = await from_postgres(own_pool, site, "e", 0, 100)  # history from the start
    assert [o for o, _ in page] == list(range(6, 11))
    assert not await own_pool.fetch(
        "SELECT relname FROM pg_class WHERE relname LIKE 'sitewire_expired%'"
    )


async def test_a_broken_clock_never_deletes_newer_events(own_pool: asyncpg.Pool) -> None:
    """An event hours away from its neighbours' order (a host with a wrong clock) is beyond
    the straggler tolerance: its partition is dropped without it deleting the newer events
    that followed it; the hole it leaves is reported to viewers as a gap."""
    site = await new_site(own_pool)
    old = month_start(datetime.now(UTC), -14)
    boundary = month_start(old, 1)
    plan = [old + timedelta(days=3), boundary + timedelta(hours=3), boundary - MS]
    for ts in [*plan, boundary + timedelta(days=2)]:
        await commit(own_pool, [at(new(site), ts)])
    report = await expire_events(own_pool, boundary + timedelta(days=1))
    assert (report.dropped_partitions, report.deleted_stragglers) == (1, 0)
    assert await offsets(own_pool, site) == [2, 4]


async def test_a_pass_drops_days_past_the_retry_window_and_makes_partitions_ahead(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    """Entries live 48 to 72 hours: a retry within the window is a duplicate, one after it is
    a new event (docs/ingest.md)."""
    site = await new_site(own_pool)
    x = uuid.uuid4()
    await commit(own_pool, [new(site, x)])
    later = datetime.now(UTC) + timedelta(days=4)
    report = await run_once(own_pool, settings.with_(retention_days=400), now=later)
    assert report.dropped_entry_days == 5 and report.created_partitions >= 3
    days = await names(own_pool, "event_ids")
    assert days[0] == f"event_ids_{later - timedelta(days=2):%Y_%m_%d}"
    assert days[-1] == f"event_ids_{later + timedelta(days=2):%Y_%m_%d}"
    assert f"events_{month_start(later, 1):%Y_%m}" in await names(own_pool, "events")
    [again] = await commit(own_pool, [at(new(site, x), later)])
    assert again is not None and (again.offset, again.duplicate) == (2, False)


async def test_a_partition_a_stopped_pass_detached_is_dropped_next_time(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    await own_pool.execute("CREATE TABLE sitewire_expired_events_2001_01 (v int)")
    await own_pool.execute("CREATE TABLE events_archive_2001_01 (v int)")  # an operator's own
    await run_once(own_pool, settings.with_(retention_days=400))
    found = await own_pool.fetch("SELECT relname FROM pg_class WHERE relname LIKE '%2001_01'")
    assert [r[0] for r in found] == ["events_archive_2001_01"]


async def test_reads_by_offset_use_every_partitions_index(own_pool: asyncpg.Pool) -> None:
    """Replay, gap repair and history read by (site, offset): a Merge Append of each month's
    primary key, in offset order, across the boundary, with no sort and no scan."""
    site = await new_site(own_pool)
    boundary = month_start(datetime.now(UTC), 1)
    for i in range(30):
        await commit(own_pool, [at(new(site), boundary + (i - 15) * timedelta(minutes=1))])
    plan = "\n".join(
        r[0] for r in await own_pool.fetch("EXPLAIN " + EVENTS_AFTER_SQL, site, 10, 20, None, 5)
    )
    assert "Merge Append" in plan and plan.count("_pkey") == 2, plan
    assert "Sort  (" not in plan and "Seq Scan" not in plan, plan
    page = await from_postgres(own_pool, site, "e", 10, 10)
    assert [o for o, _ in page] == list(range(11, 21))  # 15 and 16 either side of it
