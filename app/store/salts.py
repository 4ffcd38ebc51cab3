"""Daily salts for visitor ids, shared by all ingest replicas through PostgreSQL.

The salt of a UTC day is created by whichever replica needs it first (INSERT ... ON CONFLICT DO
NOTHING, then read back, so every replica uses the same one). `delete_expired` removes salts
older than 48 hours; the retention worker calls it, and so does ingest when the day changes.
"""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, date, datetime, timedelta

import asyncpg

log = logging.getLogger(__name__)

SALT_TTL = timedelta(hours=48)


def utc_today() -> date:
    return datetime.now(UTC).date()


class SaltKeeper:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._day: date | None = None
        self._salt = b""

    async def current(self) -> bytes:
        today = utc_today()
        if self._day != today:
            self._salt = await get_or_create(self._pool, today)
            self._day = today
            await delete_expired(self._pool)
        return self._salt


async def get_or_create(pool: asyncpg.Pool, day: date) -> bytes:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO salts (day, salt) VALUES ($1, $2) ON CONFLICT (day) DO NOTHING",
            day,
            secrets.token_bytes(32),
        )
        salt: bytes = await conn.fetchval("SELECT salt FROM salts WHERE day = $1", day)
        return salt


async def delete_expired(pool: asyncpg.Pool, now: datetime | None = None) -> int:
    """Delete salts created more than 48 hours ago; return how many."""
    cutoff = (now or datetime.now(UTC)) - SALT_TTL
    result = await pool.execute("DELETE FROM salts WHERE created_at < $1", cutoff)
    deleted = int(result.split()[-1])
    if deleted:
        log.info("deleted expired salts", extra={"count": deleted})
    return deleted
