"""Where each site's Redis data lives: one server, several independent servers, or a Cluster.

`REDIS_URL` may list several servers (comma-separated). A site's channel, replay window and
rate counters all live on the server chosen by a stable hash of the site id (CRC-32: the same in
every process and across restarts), so a site's publication stays one atomic script on one
server. Adding a server moves sites: their windows start empty there, and viewers resume from
PostgreSQL (docs/operations.md). With one URL this is simply one client.

With `REDIS_CLUSTER=true` the URLs are seed nodes of one Redis Cluster, reached through one
cluster client that routes each command by hash slot; every site key carries the hash tag
`{site}` (app/names.py), so the same single-script publication holds (app/broker/cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Iterator
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster

from app.servers import PROBE_TIMEOUT_S, Status
from app.settings import Settings

#: A client for a site's Redis data: a plain server or a Cluster (same command API).
RedisClient = aioredis.Redis | RedisCluster

#: Everything a Redis call may raise when Redis, or a Cluster's slot map, is unavailable.
REDIS_ERRORS = (
    OSError,
    TimeoutError,
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
)


class Breaker:
    """Per Redis server: after a failure, calls skip it for `backoff_s`; then one call at a
    time probes it while the others still skip, until a call succeeds. A hung server (which
    answers nothing and refuses nothing) so costs about one timed-out call per `backoff_s`,
    not every caller's full timeout. Callers bound their own calls (`asyncio.timeout`)."""

    def __init__(self, servers: int, backoff_s: float) -> None:
        self.backoff_s = backoff_s
        #: Skipped until this monotonic time (0.0: healthy), and whether a probe is in flight.
        self._skip_until = [0.0] * servers
        self._probing = [False] * servers

    @contextlib.contextmanager
    def call(self, index: int) -> Iterator[bool]:
        """`with breaker.call(i) as allowed:` make the call only if `allowed`; an exception
        of REDIS_ERRORS leaving the block trips the breaker (and propagates)."""
        probe = bool(self._skip_until[index])  # tripped: this call probes, alone
        if probe and (self._probing[index] or self._skip_until[index] > time.monotonic()):
            yield False
            return
        self._probing[index] = probe
        try:
            yield True
        except REDIS_ERRORS:  # TimeoutError included
            self._skip_until[index] = time.monotonic() + self.backoff_s
            raise
        finally:
            if probe:
                self._probing[index] = False
        self._skip_until[index] = 0.0


CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0


class RedisShards:
    def __init__(self, urls: tuple[str, ...], *, cluster: bool = False) -> None:
        self.urls = urls
        self.cluster = cluster
        self.clients: list[RedisClient] = (
            [cluster_client(urls)]
            if cluster
            else [
                aioredis.Redis.from_url(
                    url,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=COMMAND_TIMEOUT_S,
                    health_check_interval=10,
                )
                for url in urls
            ]
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisShards:
        return cls(settings.require_redis(), cluster=settings.redis_cluster)

    def index(self, site: str) -> int:
        return zlib.crc32(site.encode()) % len(self.clients)

    def for_site(self, site: str) -> RedisClient:
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


def cluster_client(urls: tuple[str, ...]) -> RedisCluster:
    """One cluster client seeded with every URL given (any live one is enough to start)."""
    seeds = [urlsplit(url) for url in urls[1:]]
    return RedisCluster.from_url(
        urls[0],
        startup_nodes=[ClusterNode(s.hostname or "127.0.0.1", s.port or 6379) for s in seeds],
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S,
    )


async def probe_redis(client: RedisClient) -> Status:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await client.ping()
        return "ok"
    except REDIS_ERRORS:
        return "unavailable"
