"""Several independent Redis servers, each site on one of them.

`REDIS_URL` may list several servers (comma-separated). A site's channel, replay window and
rate counters all live on the server chosen by a stable hash of the site id (CRC-32: the same in
every process and across restarts), so a site's publication stays one atomic script on one
server. Adding a server moves sites: their windows start empty there, and viewers resume from
PostgreSQL (docs/operations.md). With one URL this is simply one client.
"""

from __future__ import annotations

import zlib

import redis.asyncio as aioredis

from app.connections import Status, probe_redis


class RedisShards:
    def __init__(self, urls: tuple[str, ...]) -> None:
        self.urls = urls
        self.clients = [
            aioredis.Redis.from_url(
                url, socket_connect_timeout=1.0, socket_timeout=2.0, health_check_interval=10
            )
            for url in urls
        ]

    def index(self, site: str) -> int:
        return zlib.crc32(site.encode()) % len(self.clients)

    def for_site(self, site: str) -> aioredis.Redis:
        return self.clients[self.index(site)]

    async def probe(self) -> Status:
        """ "ok" only when every server answers (a site on a dead one has no live stream)."""
        for client in self.clients:
            if await probe_redis(client) != "ok":
                return "unavailable"
        return "ok"

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
