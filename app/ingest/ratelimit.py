"""Per-site and per-IP rate limits that hold across every ingest replica (Redis counters).

Fixed windows: a site may send `rate_site_per_sec` events per wall-clock second, a client IP
`rate_ip_per_min` per minute to one site. One Lua script checks both and counts only when both
allow, so a rejected request does not eat into the budget. When Redis is unreachable the limiter
lets requests through (counted): storing events matters more than limiting them. A Redis that
does not answer (hung, cut off) is given CHECK_TIMEOUT_S, then skipped for CHECK_BACKOFF_S,
during which one request at a time probes it: acknowledgements never wait on it for longer.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.codes import ErrorCode
from app.errors import ApiError
from app.ingest.metrics import IngestMetrics
from app.names import Names
from app.servers.redis import REDIS_ERRORS, Breaker, RedisShards
from app.settings import Settings

log = logging.getLogger(__name__)

#: KEYS = site counter, ip counter; ARGV = n, site limit, ip limit.
#: Returns 0 (allowed), 1 (site over limit) or 2 (IP over limit).
CHECK_SCRIPT = """
local n = tonumber(ARGV[1])
local site_limit, ip_limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if site_limit > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') + n > site_limit then
  return 1
end
if ip_limit > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') + n > ip_limit then
  return 2
end
if site_limit > 0 then
  redis.call('INCRBY', KEYS[1], n)
  redis.call('EXPIRE', KEYS[1], 2)
end
if ip_limit > 0 then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[2], 61)
end
return 0
"""


#: The longest one limit check may wait for Redis (it answers in well under 1 ms).
CHECK_TIMEOUT_S = 0.2
#: After a failed or slow check, that server is skipped (requests allowed) for this long.
CHECK_BACKOFF_S = 1.0


class RateLimiter:
    def __init__(
        self, shards: RedisShards, names: Names, settings: Settings, metrics: IngestMetrics
    ) -> None:
        self._names = names
        self._site_limit = settings.rate_site_per_sec
        self._ip_limit = settings.rate_ip_per_min
        self._metrics = metrics
        self._shards = shards
        self._scripts = [c.register_script(CHECK_SCRIPT) for c in shards.clients]
        self._breaker = Breaker(len(shards.clients), CHECK_BACKOFF_S)

    @property
    def enabled(self) -> bool:
        return self._site_limit > 0 or self._ip_limit > 0

    async def check(self, site: str, ip_key: str, n: int) -> None:
        """Count `n` events; raise ApiError(RATE_LIMITED) with Retry-After when over a limit."""
        if not self.enabled:
            return
        now = time.time()
        minute = int(now // 60)
        keys = [self._names.rate_site(site, int(now)), self._names.rate_ip(site, ip_key, minute)]
        index = self._shards.index(site)
        try:
            with self._breaker.call(index) as allowed:
                if not allowed:
                    self._metrics.ratelimit_unavailable.inc()
                    return
                # Both counters live in the site's hash slot on the site's server: one script,
                # one round trip, and in a Cluster one node.
                async with asyncio.timeout(CHECK_TIMEOUT_S):
                    script = self._scripts[index]
                    verdict = await script(keys=keys, args=[n, self._site_limit, self._ip_limit])
        except REDIS_ERRORS:  # TimeoutError included
            self._metrics.ratelimit_unavailable.inc()
            return
        if verdict == 1:
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"site {site} is over {self._site_limit} events per second",
                retry_after=1,
            )
        if verdict == 2:
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"this client is over {self._ip_limit} events per minute",
                retry_after=max(1, 60 - int(now % 60)),
            )
