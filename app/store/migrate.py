"""The migration runner: applies `migrations/NNNN_name.sql` in order, once each.

It records each applied file with its SHA-256, refuses to continue when an applied file has
changed since (ChecksumMismatch), and holds a PostgreSQL advisory lock for the whole run so two
processes migrating at once apply each file exactly once.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from app.errors import ChecksumMismatch, MigrationError

log = logging.getLogger(__name__)

#: Default location: the repository's migrations/ folder (next to app/) in a checkout, else
#: ./migrations (the container image copies them to its working directory).
_REPO_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
MIGRATIONS_DIR = _REPO_MIGRATIONS if _REPO_MIGRATIONS.is_dir() else Path("migrations")
#: Arbitrary constant identifying Sitewire's migration lock (pg_advisory_lock key).
LOCK_KEY = 0x5173_7769_7265


@dataclass(frozen=True, slots=True)
class Migration:
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


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
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (name, checksum) VALUES ($1, $2)",
                m.name,
                m.checksum,
            )
        log.info("applied migration %s", m.name)
        done.append(m.name)
    return done
