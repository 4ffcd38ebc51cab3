"""Schema changes beside live traffic: each waits at most LOCK_TIMEOUT_MS for its locks, and is
tried again later when it did not get them.

PostgreSQL grants a table's locks in arrival order, so a DDL statement waiting for its lock
behind a long query holds up every commit that arrives after it, for as long as it waits. With
a short lock timeout that stall is bounded (one online migration step, one partition attached
or dropped); the statement fails, nothing of it is kept, and it is retried with backoff, each
attempt logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy

#: The longest a schema change may make inserts and reads of its table queue behind it.
LOCK_TIMEOUT_MS = 500
#: Attempts before giving up (about two minutes of waiting with the backoff below).
ATTEMPTS = 40
#: Backoff between attempts: doubling from the first, capped, with jitter.
FIRST_RETRY_S = 0.1
MAX_RETRY_S = 5.0


async def with_short_locks(
    conn: Conn,
    work: Callable[[], Awaitable[T]],
    what: str,
    *,
    transaction: bool = True,
    attempts: int | None = None,
) -> T:
    """Run `work` (statements on `conn`) with a lock timeout, in a transaction of its own unless
    `transaction` is False (a step that commits by itself: then the timeout is set for the
    session and reset after). Raises asyncpg.LockNotAvailableError after `attempts` tries
    (ATTEMPTS by default)."""
    attempt = 1
    while True:
        try:
            return await _once(conn, work, transaction)
        except asyncpg.LockNotAvailableError:
            if attempt >= (attempts or ATTEMPTS):
                raise
            delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            log.warning(
                "lock not granted in time; trying again",
                extra={"what": what, "attempt": attempt, "retry_in_s": round(delay, 2)},
            )
            await asyncio.sleep(delay)
            attempt += 1


async def _once(conn: Conn, work: Callable[[], Awaitable[T]], transaction: bool) -> T:
    if transaction:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
            return await work()
    await conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
    try:
        return await work()
    finally:
        await conn.execute("RESET lock_timeout")
