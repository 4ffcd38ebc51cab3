"""Shared fixtures: real servers, a fresh migrated database per session, a Redis key prefix
per test, and real app processes on free ports."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from app.names import Names
from app.servers.postgres import drop_database
from app.settings import Settings
from app.store.sites import create_site
from tests.disposable import DisposablePostgres
from tests.processes import AppProcess
from tests.servers import Servers, choose_servers, create_database, postgres_root
from tests.support import SECRET, env_for
from workers.embedded import EmbeddedRedis

_chosen: list[str] = []


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with choose_servers(tmp_path_factory.mktemp("servers")) as chosen:
        _chosen.append(chosen.how)
        yield chosen


@pytest.fixture(scope="session")
def database_url(servers: Servers) -> Iterator[str]:
    dsn = asyncio.run(create_database(servers.admin_dsn))
    yield dsn
    asyncio.run(drop_database(servers.admin_dsn, dsn))


@pytest.fixture
def prefix(servers: Servers) -> Iterator[str]:
    """A Redis key/channel prefix of this test's own; its keys are deleted afterwards."""
    value = f"swt{secrets.token_hex(5)}"
    yield value
    client = redis.Redis.from_url(servers.redis_url)
    try:
        keys = list(client.scan_iter(match=Names(value).pattern(), count=1000))
        if keys:
            client.delete(*keys)
    except redis.exceptions.ConnectionError:
        pass  # a test that stopped its own Redis leaves nothing here to clean
    finally:
        client.close()


@pytest.fixture
def settings(database_url: str, servers: Servers, prefix: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=servers.redis_url,
        key_prefix=prefix,
        secret=SECRET,
    )


@pytest.fixture
def names(prefix: str) -> Names:
    return Names(prefix)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert p is not None
    yield p
    await p.close()


@pytest.fixture
async def own_pool(servers: Servers) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a freshly migrated database of this test's own, dropped afterwards: for tests
    that drop partitions, or that must see no other test's rows."""
    dsn = await create_database(servers.admin_dsn, "sw_own")
    p = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    assert p is not None
    yield p
    await p.close()
    await drop_database(servers.admin_dsn, dsn)


@pytest.fixture
async def rclient(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def site(pool: asyncpg.Pool) -> str:
    """A freshly registered site of this test's own."""
    site_id = f"t{secrets.token_hex(4)}.example.com"
    await create_site(pool, site_id)
    return site_id


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of this test's own, which it may stop and restart (empty: no data is
    kept). Never the shared one."""
    server = EmbeddedRedis(tmp_path / "private-redis", persist=False)
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[DisposablePostgres]:
    """A PostgreSQL server of this test's own (migrated database at `.dsn`), which it may stop
    and start. Never the shared one."""
    with postgres_root() as root:
        pg = DisposablePostgres(root)
        try:
            yield pg
        finally:
            pg.close()


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., AppProcess]]:
    """spawn("ingest", SITEWIRE_X="1") starts a real process; all are stopped afterwards."""
    started: list[AppProcess] = []

    def start(role: str, settings_: Settings | None = None, **extra: str) -> AppProcess:
        proc = AppProcess(role, env_for(settings_ or settings, **extra), tmp_path)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _chosen:
        terminalreporter.write_line(f"servers: {_chosen[0]}")
