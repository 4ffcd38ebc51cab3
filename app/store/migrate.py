"""The migration runner: applies `migrations/NNNN_name.sql` in order, once each.

It records each applied file with its SHA-256, refuses to continue when an applied file has
changed since (ChecksumMismatch), and holds a PostgreSQL advisory lock for the whole run so two
processes migrating at once apply each file exactly once.

A file runs in one transaction, unless it is cut into steps by `-- step: NAME` lines (an
online migration, run while ingest commits: 0009). Then each step runs in a transaction of its
own, or in none when its name ends with "(outside a transaction)" (a procedure that commits as
it goes), with a short lock timeout and retries (app.store.locking), so no step holds up
ingest for long. The file is recorded once its last step is done; a run that stopped half-way
starts again at the first step, so every step must find out whether its work is done.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.errors import ChecksumMismatch, MigrationError
from app.store.locking import with_short_locks

log = logging.getLogger(__name__)

#: Default location: the repository's migrations/ folder (next to app/) in a checkout, else
#: ./migrations (the container image copies them to its working directory).
_REPO_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
MIGRATIONS_DIR = _REPO_MIGRATIONS if _REPO_MIGRATIONS.is_dir() else Path("migrations")
#: Arbitrary constant identifying Sitewire's migration lock (pg_advisory_lock key).
LOCK_KEY = 0x5173_7769_7265
#: Where an online migration's steps begin.
_STEP = re.compile(r"^-- step: (?P<name>.+)$", re.MULTILINE)
_OUTSIDE = " (outside a transaction)"


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    sql: str
    #: False for a step that must not run inside a transaction block (CALL of a procedure that
    #: commits, VACUUM, CREATE INDEX CONCURRENTLY).
    transaction: bool


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def steps(self) -> list[Step]:
        """The steps of an online migration, in order; empty for a one-transaction file. What
        comes before the first step (its comments) is not run."""
        marks = list(_STEP.finditer(self.sql))
        ends = [m.start() for m in marks[1:]] + [len(self.sql)] if marks else []
        steps = []
        for mark, end in zip(marks, ends, strict=True):
            name = mark["name"].strip()
            body = self.sql[mark.end() : end]
            outside = name.endswith(_OUTSIDE)
            steps.append(Step(name.removesuffix(_OUTSIDE), body.strip(), not outside))
        return steps


def load(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Migrations in `directory`, ordered by file name."""
    if not directory.is_dir():
        raise MigrationError(f"migrations folder {directory} does not exist")
    files = sorted(directory.glob("*.sql"))
    return [Migration(f.name, f.read_text()) for f in files]


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply every pending migration; return the names applied by this call."""
    migrations = load(directory)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        try:
            return await _apply_pending(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               name text PRIMARY KEY,
               checksum text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    rows = await conn.fetch("SELECT name, checksum FROM schema_migrations")
    applied = {r["name"]: r["checksum"] for r in rows}
    done: list[str] = []
    for m in migrations:
        if m.name in applied:
            if applied[m.name] != m.checksum:
                raise ChecksumMismatch(m.name)
            continue
        if m.steps:
            await _apply_online(conn, m)
        else:
            async with conn.transaction():
                await conn.execute(m.sql)
                await _record(conn, m)
        log.info("applied migration %s", m.name)
        done.append(m.name)
    return done


async def _apply_online(conn: asyncpg.Connection, m: Migration) -> None:
    for number, step in enumerate(m.steps, 1):
        log.info("migration %s: step %d, %s", m.name, number, step.name)

        async def run(sql: str = step.sql) -> None:
            await conn.execute(sql)

        what = f"{m.name} step {number} ({step.name})"
        try:
            await with_short_locks(conn, run, what, transaction=step.transaction)
        except asyncpg.LockNotAvailableError:
            raise MigrationError(
                f"{what} never got its lock in time; nothing of that step was kept (the steps "
                "before it were). Run the migration again: each step finds its work done or "
                "does it."
            ) from None
    await _record(conn, m)


async def _record(conn: asyncpg.Connection, m: Migration) -> None:
    await conn.execute(
        "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)", m.name, m.checksum
    )
