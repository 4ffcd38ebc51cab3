"""What every part of a running gateway shares: its servers, the hub and feeds, metrics, and
whether it is draining. Built by the app's lifespan (app.gateway.app); the transports and
app.gateway.viewers use it."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg

from app.broker.base import Broker
from app.codes import CloseCode
from app.gateway.analytics import Analytics
from app.gateway.feed import Feeds
from app.gateway.hub import Hub
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from app.gateway.replay import Replayer
from app.servers import Status
from app.servers.postgres import probe_postgres
from app.settings import Settings
from app.store.sites import SiteCache

log = logging.getLogger(__name__)


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    pool: asyncpg.Pool
    broker: Broker
    metrics: GatewayMetrics
    hub: Hub
    feeds: Feeds
    sites: SiteCache
    replayer: Replayer
    stats: DeliveryStats
    analytics: Analytics
    draining: bool = False

    async def checks(self) -> dict[str, Status]:
        """Ready (`serving`) while either store answers and the gateway is not draining: with
        Redis away it serves from PostgreSQL (polled), with PostgreSQL away it serves live
        events and resumes within the Redis window (docs/operations.md)."""
        results: dict[str, Status] = {
            "postgres": await probe_postgres(self.pool),
            "redis": await self.broker.probe(),
        }
        either = "ok" in results.values()
        results["serving"] = "ok" if either and not self.draining else "unavailable"
        if self.draining:
            results["draining"] = "unavailable"
        return results

    async def drain(self) -> None:
        """Stop accepting viewers, tell each to reconnect elsewhere, wait (bounded) for them
        to go."""
        self.draining = True
        await self.analytics.close()  # its internal viewers would only join again
        for viewer in self.hub.viewers():
            viewer.fail(CloseCode.SHUTTING_DOWN)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # Polling during a bounded drain is simpler than an "empty" event on the hot path.
        while any(True for _ in self.hub.viewers()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        log.info("drained", extra={"left": sum(1 for _ in self.hub.viewers())})
