"""PostgreSQL: opening the pool, probing it, and what its failures look like."""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from app.servers import PROBE_TIMEOUT_S, Status
from app.settings import Settings

#: Failures that mean "PostgreSQL did not confirm"; anything else is a bug and propagates.
STORAGE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def open_pool(settings: Settings, *, connect_timeout: float = 5.0) -> asyncpg.Pool:
    """A PostgreSQL pool. It opens lazily (min_size=0) so a process can start, and answer
    /readyz with 503, while PostgreSQL is down."""
    pool = await asyncpg.create_pool(
        settings.require_database(),
        min_size=0,
        max_size=settings.db_pool_size,
        timeout=connect_timeout,
        command_timeout=10,
        reset=_keep_session,
    )
    assert pool is not None
    return pool


#: How long closing a pool waits for its connections to be given back before dropping them.
POOL_CLOSE_S = 5.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close `pool`; connections still held past POOL_CLOSE_S (a query on a hung PostgreSQL)
    are dropped rather than waited for (asyncpg's `close` waits for every one)."""
    try:
        async with asyncio.timeout(POOL_CLOSE_S):
            await pool.close()
    except TimeoutError:
        pool.terminate()


async def _keep_session(_: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset query on every release to the pool (`RESET ALL`, `UNLISTEN *`,
    `CLOSE ALL`, advisory unlock): one more round trip per checkout, for session state Sitewire
    never sets on a pooled connection. An open transaction is still rolled back by asyncpg
    before this runs. Measured: a one-event commit ~0.2 ms faster (docs/performance.md)."""


async def probe_postgres(pool: asyncpg.Pool) -> Status:
    return "ok" if await why_unavailable(pool) is None else "unavailable"


async def why_unavailable(pool: asyncpg.Pool) -> str | None:
    """None when PostgreSQL answers a query within PROBE_TIMEOUT_S, else what went wrong, in
    PostgreSQL's or the network's words ("too many clients already", "Connection refused"):
    what an operator's runbook looks for in the logs."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await pool.fetchval("SELECT 1")
        return None
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    except STORAGE_ERRORS as exc:
        return describe_error(exc)


def describe_error(exc: BaseException) -> str:
    """A storage error's kind and its own words ("TooManyConnectionsError: sorry, too many
    clients already"), for a log line an operator searches."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def with_database(dsn: str, name: str) -> str:
    """`dsn` pointed at database `name` (its query, a socket directory included, kept)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


async def create_database(admin_dsn: str, prefix: str) -> str:
    """A new, empty database named `prefix_<random>` on the server of `admin_dsn`; its DSN.
    For tests and the bench, which each want a database of their own."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    """Drop the database of `dsn`, closing its connections."""
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
