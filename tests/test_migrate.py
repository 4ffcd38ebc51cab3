import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from app.errors import ChecksumMismatch, MigrationError
from app.servers.postgres import create_database, drop_database, with_database
from app.store.migrate import MIGRATIONS_DIR, load, migrate
from tests.servers import Servers


@pytest.fixture
async def empty_db(servers: Servers) -> AsyncIterator[str]:
    """A database with nothing in it (not even migrated)."""
    dsn = await create_database(servers.admin_dsn, "sw_mig")
    yield dsn
    await drop_database(servers.admin_dsn, dsn)


def write(folder: Path, name: str, sql: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(sql)


async def test_applies_in_order_once(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0002_b.sql", "INSERT INTO t VALUES (2);")
    write(tmp_path, "0001_a.sql", "CREATE TABLE t (v int);")
    assert await migrate(empty_db, tmp_path) == ["0001_a.sql", "0002_b.sql"]
    assert await migrate(empty_db, tmp_path) == []
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
        names = await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")
        assert [r["name"] for r in names] == ["0001_a.sql", "0002_b.sql"]
    finally:
        await conn.close()


async def test_refuses_a_changed_applied_file(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "CREATE TABLE t (v int);")
    await migrate(empty_db, tmp_path)
    write(tmp_path, "0001_a.sql", "CREATE TABLE t (v bigint);")
    write(tmp_path, "0002_b.sql", "CREATE TABLE u (v int);")
    with pytest.raises(ChecksumMismatch, match=r"0001_a\.sql was changed"):
        await migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:  # nothing after the changed file was applied
        assert await conn.fetchval("SELECT to_regclass('u')") is None
    finally:
        await conn.close()


async def test_failed_migration_is_rolled_back(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_a.sql", "CREATE TABLE t (v int); SELECT 1/0;")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('t')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_file_once(empty_db: str, tmp_path: Path) -> None:
    # The sleep widens the race window: without the advisory lock both runners would see
    # 0001 as pending and the second CREATE TABLE would fail.
    write(tmp_path, "0001_a.sql", "SELECT pg_sleep(0.5); CREATE TABLE t (v int);")
    write(tmp_path, "0002_b.sql", "INSERT INTO t VALUES (1);")
    results = await asyncio.gather(*(migrate(empty_db, tmp_path) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, 2]
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await conn.close()


def test_repository_migrations_are_numbered_without_gaps_or_strays() -> None:
    """Every .sql file in migrations/ is loaded, numbered 0001, 0002, ... with no gap or
    repeat (two branches adding the same number would apply in name order, silently)."""
    on_disk = sorted(p.name for p in MIGRATIONS_DIR.iterdir() if p.suffix == ".sql")
    names = [m.name for m in load()]
    assert names == on_disk
    assert [int(n[:4]) for n in names] == list(range(1, len(names) + 1))
    assert all(n[4] == "_" for n in names)


def test_with_database_keeps_query() -> None:
    dsn = "postgresql://postgres:@/postgres?host=/tmp/x"
    assert with_database(dsn, "db1") == "postgresql://postgres:@/db1?host=/tmp/x"


ONLINE = """-- An online migration: each step in a transaction of its own.
-- step: make the table
CREATE TABLE IF NOT EXISTS t (v int);
-- step: fill it once
INSERT INTO t SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM t);
"""


async def test_an_online_migration_commits_step_by_step(empty_db: str, tmp_path: Path) -> None:
    """A failed step keeps the steps before it and leaves the file unrecorded; the next run
    starts again at the first step, which finds its work done."""
    write(tmp_path, "0001_online.sql", ONLINE + "SELECT 1/0;\n")
    assert [s.name for s in load(tmp_path)[0].steps] == ["make the table", "fill it once"]
    with pytest.raises(asyncpg.DivisionByZeroError):
        await migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM t") == 0  # step 2 rolled back whole
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
        write(tmp_path, "0001_online.sql", ONLINE)
        assert await migrate(empty_db, tmp_path) == ["0001_online.sql"]
        assert await conn.fetchval("SELECT count(*) FROM t") == 1
    finally:
        await conn.close()


async def test_a_step_can_run_outside_a_transaction(empty_db: str, tmp_path: Path) -> None:
    write(tmp_path, "0001_online.sql", ONLINE + "-- step: vacuum (outside a transaction)\n"
                                                "VACUUM t;\n")  # fmt: skip
    [m] = load(tmp_path)
    assert [(s.name, s.transaction) for s in m.steps][-1] == ("vacuum", False)
    assert await migrate(empty_db, tmp_path) == ["0001_online.sql"]  # VACUUM refuses a block


async def test_a_step_waits_briefly_for_its_lock_and_tries_again(
    empty_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A long reader holds the table: the step's ACCESS EXCLUSIVE request would queue every
    writer behind it for as long. With the lock timeout a writer waits at most ~0.5 s at a
    time, and the step gets its lock once the reader is gone."""
    write(tmp_path, "0001_online.sql", ONLINE)
    await migrate(empty_db, tmp_path)
    write(tmp_path, "0002_alter.sql", "-- step: add a column\nALTER TABLE t ADD COLUMN w int;\n")
    reader, writer = await asyncpg.connect(empty_db), await asyncpg.connect(empty_db)
    waits: list[float] = []

    async def hold() -> None:
        async with reader.transaction():
            await reader.execute("SELECT * FROM t")
            await asyncio.sleep(2.5)

    async def write_rows() -> None:
        loop = asyncio.get_running_loop()
        while not migrating.done():
            started = loop.time()
            await writer.execute("INSERT INTO t VALUES (2)")
            waits.append(loop.time() - started)
            await asyncio.sleep(0.02)

    try:
        holding = asyncio.create_task(hold())
        await asyncio.sleep(0.2)
        migrating = asyncio.create_task(migrate(empty_db, tmp_path))
        await asyncio.gather(holding, write_rows(), migrating)
        assert migrating.result() == ["0002_alter.sql"]
        assert "lock not granted in time" in caplog.text
        assert max(waits) < 1.0, max(waits)  # without the timeout: the reader's 2.5 s
        assert await writer.fetchval("SELECT count(*) FROM t WHERE w IS NULL") > 10
    finally:
        await reader.close()
        await writer.close()


async def test_a_step_that_never_gets_its_lock_fails_with_advice(
    empty_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.store.locking.ATTEMPTS", 2)
    write(tmp_path, "0001_online.sql", ONLINE)
    await migrate(empty_db, tmp_path)
    write(tmp_path, "0002_alter.sql", "-- step: add a column\nALTER TABLE t ADD COLUMN w int;\n")
    reader = await asyncpg.connect(empty_db)
    try:
        async with reader.transaction():
            await reader.execute("SELECT * FROM t")
            with pytest.raises(MigrationError, match=r"0002_alter\.sql step 1 .*again"):
                await migrate(empty_db, tmp_path)
    finally:
        await reader.close()
