"""Redis side of the stream: publishing (ingest) and, later, subscribing (gateway).

Publication of a site's events is one Lua script, so it is atomic: each event is added to the
site's replay window (a sorted set scored by offset, capped to the newest N) and PUBLISHed on
the site's channel. Offsets come from PostgreSQL (app.store), so publishing is idempotent: a
retried publish re-adds the same member and viewers drop offsets they already have.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import redis.asyncio as aioredis
import redis.exceptions

from app.metrics import IngestMetrics
from app.names import Names
from app.store import Stored

log = logging.getLogger(__name__)

REDIS_ERRORS = (OSError, TimeoutError, redis.exceptions.RedisError)

#: KEYS[1] = window; ARGV[1] = channel, ARGV[2] = window size, then offset/payload pairs.
PUBLISH_SCRIPT = """
local n = 0
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('PUBLISH', ARGV[1], ARGV[i + 1])
  n = n + 1
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
return n
"""

#: After a failed publish, skip Redis for this long instead of stalling every commit on it.
BACKOFF_S = 1.0


class Publisher:
    """Best-effort publisher: events are already durable when they get here. A failure is
    counted as a gap (viewers recover it from history) and never reaches the client."""

    def __init__(
        self, client: aioredis.Redis, names: Names, window: int, metrics: IngestMetrics
    ) -> None:
        self._client = client
        self._names = names
        self._window = window
        self._metrics = metrics
        self._script = client.register_script(PUBLISH_SCRIPT)
        self._skip_until = 0.0

    async def publish(self, stored: list[Stored]) -> None:
        if time.monotonic() < self._skip_until:
            self._gap(len(stored), "redis marked unavailable")
            return
        by_site: dict[str, list[bytes | int]] = defaultdict(list)
        for s in stored:
            assert s.payload is not None
            by_site[s.event.site] += [s.offset, s.payload]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for site, args in by_site.items():
                    channel = self._names.channel(site)
                    await self._script(
                        keys=[self._names.window(site)],
                        args=[channel, self._window, *args],
                        client=pipe,
                    )
                await pipe.execute()
        except REDIS_ERRORS as exc:
            self._skip_until = time.monotonic() + BACKOFF_S
            self._gap(len(stored), type(exc).__name__)
            return
        self._metrics.published.inc(len(stored))

    def _gap(self, count: int, why: str) -> None:
        self._metrics.publish_gap.inc(count)
        log.warning("events stored but not published", extra={"events": count, "error": why})
