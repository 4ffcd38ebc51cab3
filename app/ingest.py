"""The ingest ASGI app: validates events, stores them durably, publishes them per site."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
import redis.asyncio as aioredis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app.connections import Status, open_pool, open_redis, probe_postgres, probe_redis
from app.health import Checks, health_router
from app.settings import Settings


@dataclass(slots=True)
class IngestState:
    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis

    async def checks(self) -> dict[str, Status]:
        return {"postgres": await probe_postgres(self.pool), "redis": await probe_redis(self.redis)}


def create_app(settings: Settings) -> FastAPI:
    registry = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(settings)
        client = open_redis(settings)
        app.state.ingest = IngestState(settings, pool, client)
        try:
            yield
        finally:
            await client.aclose()
            await pool.close()

    app = FastAPI(title="Sitewire ingest", lifespan=lifespan)

    def checks() -> Checks:
        state: IngestState = app.state.ingest
        return state.checks

    # Ingest needs only PostgreSQL to acknowledge events; Redis is reported but optional.
    app.include_router(health_router("ingest", checks, frozenset({"postgres"}), registry))
    return app
