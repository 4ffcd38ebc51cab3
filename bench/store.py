"""The group commit's cost in PostgreSQL alone, on the store as it was before a migration and
as it is after, side by side in one run: no HTTP, no Redis, so the schema is all that differs.

    python -m bench.store                  # before 0009 (one events table) against now
    python -m bench.store --before 0007    # any earlier migration

Each database gets one site and the same commits, from app.store.writes.commit: single events
and 32 at a time (the function, migrations/0004 or 0009), 1,000 at a time (COPY); with
server-minted ids (what `make bench`'s ingest rows send: no duplicate lookup) and with client
ids (what the tracking script sends: every commit looks retries up). Prints the median
milliseconds per commit of several rounds, alternating the two databases.

`ceiling` is the other use: how many events one core of PostgreSQL stores a second through
the same commits, by its backend's CPU time (scenario 4 of `make bench` prints it beside the
validate-only baseline, which no ingest can beat by more than PostgreSQL allows).

Servers: DATABASE_URL, else TEST_DATABASE_URL (an embedded PostgreSQL otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from app.schema import NewEvent
from app.servers.postgres import create_database, drop_database
from app.store.migrate import MIGRATIONS_DIR, migrate
from app.store.sites import create_site
from app.store.writes import commit
from workers.embedded import EmbeddedPostgres

SITE = "bench.example"
#: (events per commit, commits per round).
SIZES = ((1, 400), (32, 100), (1000, 15))
ROUNDS = 5
PAD = "x" * 60  # brings an event to ~300 bytes, as in bench/run.py


def event(client_id: bool, site: str = SITE) -> NewEvent:
    return NewEvent(
        event_id=uuid.uuid4(), site=site, name="pageview", url=f"https://{site}/pricing",
        path="/pricing", referrer=None, referrer_host=None, props={"p": PAD}, visitor_id=7,
        device="desktop", browser="Firefox", os="Linux", country="NL", ts=datetime.now(UTC),
        minted=not client_id,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def database(admin_dsn: str, upto: str | None) -> AsyncIterator[asyncpg.Pool]:
    """A database migrated up to `upto` (inclusive; None: every migration), with the site."""
    dsn = await create_database(admin_dsn, "sw_bench_store")
    try:
        with tempfile.TemporaryDirectory() as folder:
            for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
                if upto is None or path.name[:4] <= upto:
                    shutil.copy(path, folder)
            await migrate(dsn, Path(folder))
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        assert pool is not None
        await create_site(pool, SITE)
        try:
            yield pool
        finally:
            await pool.close()
    finally:
        await drop_database(admin_dsn, dsn)


async def round_ms(pool: asyncpg.Pool, size: int, count: int, client_ids: bool) -> float:
    batches = [[event(client_ids) for _ in range(size)] for _ in range(count)]
    started = time.perf_counter()
    for batch in batches:
        await commit(pool, batch)
    return (time.perf_counter() - started) * 1000 / count


def backend_cpu_s(pid: int) -> float | None:
    """utime + stime of a PostgreSQL backend (/proc/PID/stat); None when PostgreSQL runs on
    another host (or the process is not visible)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def ceiling(dsn: str, size: int = 400, events: int = 40_000) -> float | None:
    """Events per second one core of PostgreSQL stores through group commits of `size` events
    with client ids (the tracking script's, so each commit looks retries up): `events` stored
    back to back on one connection into a new site of `dsn`, divided by its backend's CPU
    seconds. The backend only: the WAL writer and checkpoints come on top, so PostgreSQL's
    real ceiling is lower. None when the backend's CPU cannot be read here."""
    site = f"ceiling-{uuid.uuid4().hex[:8]}.bench.example"
    conn = await asyncpg.connect(dsn)
    try:
        await create_site(conn, site)
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        batches = [[event(True, site) for _ in range(size)] for _ in range(events // size)]
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        await commit(pool, batches[0])  # warm: plans and caches
        before = backend_cpu_s(pid)
        for batch in batches[1:]:
            await commit(pool, batch)
        after = backend_cpu_s(pid)
    finally:
        await pool.close()
    if before is None or after is None or after <= before:
        return None
    return size * (len(batches) - 1) / (after - before)


async def run(admin_dsn: str, before: str) -> None:
    async with database(admin_dsn, before) as old, database(admin_dsn, None) as new:
        print(f"ms per commit, median of {ROUNDS} rounds; before = migrations up to {before}")
        print("| ids | events per commit | before | now | now / before |")
        print("|---|---|---|---|---|")
        for client_ids in (False, True):
            for size, count in SIZES:
                times: dict[str, list[float]] = {"old": [], "new": []}
                for _ in range(ROUNDS):
                    for name, pool in (("old", old), ("new", new)):
                        times[name].append(await round_ms(pool, size, count, client_ids))
                a, b = statistics.median(times["old"]), statistics.median(times["new"])
                ids = "client" if client_ids else "minted"
                print(f"| {ids} | {size} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--before", default="0008", help="the last migration of 'before'")
    args = parser.parse_args()
    dsn = os.environ.get("DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if not dsn:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            pg = EmbeddedPostgres(scratch / "postgres")
            stack.callback(pg.stop)
            dsn = pg.dsn()
        asyncio.run(run(dsn, args.before))


if __name__ == "__main__":
    main()
