"""Per-site and per-IP rate limits that hold across every ingest replica (Redis counters).

Fixed windows: a site may send `rate_site_per_sec` events per wall-clock second, a client IP
`rate_ip_per_min` per minute to one site. One Lua script checks both and counts only when both
allow, so a rejected request does not eat into the budget. When Redis is unreachable the limiter
lets requests through (counted): storing events matters more than limiting them. A Redis that
does not answer (hung, cut off) is given CHECK_TIMEOUT_S, then skipped for CHECK_BACKOFF_S,
during which one request at a time probes it: acknowledgements never wait on it for longer.

A batch naming several sites is checked site by site; when a later site refuses it, what the
sites before counted is given back (`refund`), so a refused batch leaves every budget as it was
(best effort: a Redis that fails then keeps the count).

Checks are grouped per site, like commits (app.ingest.committer): while one script call for a
site is at Redis, that site's next checks queue, and go together in the next call, which
decides them one by one in arrival order, exactly as separate calls would have. One call per
request was 40 % of a hot site's single-event throughput (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from app.codes import ErrorCode
from app.errors import ApiError
from app.ingest.metrics import IngestMetrics
from app.names import Names
from app.servers.redis import REDIS_ERRORS, Breaker, RedisShards
from app.settings import Settings

log = logging.getLogger(__name__)

#: KEYS = the site's counter, then one IP counter per check (repeats allowed);
#: ARGV = site limit, IP limit, then each check's event count.
#: Returns one verdict per check, in order: 0 (allowed), 1 (site over limit), 2 (IP over limit).
#: A check is decided on the counts the checks before it left, as if each were its own call.
CHECK_SCRIPT = """
local site_limit, ip_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local site_count = tonumber(redis.call('GET', KEYS[1]) or '0')
local site_added = 0
local ip_count, ip_added = {}, {}
local verdicts = {}
for i = 2, #KEYS do
  local key, n = KEYS[i], tonumber(ARGV[i + 1])
  if ip_count[key] == nil then
    ip_count[key] = tonumber(redis.call('GET', key) or '0')
    ip_added[key] = 0
  end
  if site_limit > 0 and site_count + n > site_limit then
    verdicts[i - 1] = 1
  elseif ip_limit > 0 and ip_count[key] + n > ip_limit then
    verdicts[i - 1] = 2
  else
    verdicts[i - 1] = 0
    site_count, site_added = site_count + n, site_added + n
    ip_count[key], ip_added[key] = ip_count[key] + n, ip_added[key] + n
  end
end
if site_limit > 0 and site_added > 0 then
  redis.call('INCRBY', KEYS[1], site_added)
  redis.call('EXPIRE', KEYS[1], 2)
end
if ip_limit > 0 then
  for key, added in pairs(ip_added) do
    if added > 0 then
      redis.call('INCRBY', key, added)
      redis.call('EXPIRE', key, 61)
    end
  end
end
return verdicts
"""

#: Gives back what a check counted: KEYS = the site's counter, the IP's counter; ARGV = site
#: limit, IP limit, events. A counter is only lowered while it exists (its window is still
#: open: an expired one is not brought back below zero) and never below zero.
REFUND_SCRIPT = """
local n = tonumber(ARGV[3])
for i = 1, 2 do
  if tonumber(ARGV[i]) > 0 then
    local count = tonumber(redis.call('GET', KEYS[i]) or '0')
    if count > 0 then
      redis.call('DECRBY', KEYS[i], math.min(n, count))
    end
  end
end
return 0
"""

#: The longest one limit check may wait for Redis (it answers in well under 1 ms).
CHECK_TIMEOUT_S = 0.2
#: After a failed or slow check, that server is skipped (requests allowed) for this long.
CHECK_BACKOFF_S = 1.0
#: Most checks one script call decides (a hot site's queue goes out in pieces of this size).
GROUP_CHECKS = 256

#: A check's verdicts: counted, over the site's limit, over the IP's, let through unchecked
#: (Redis not there to ask: nothing was counted).
ALLOWED, SITE_OVER, IP_OVER, UNCHECKED = 0, 1, 2, -1

#: A verdict and the wall-clock time it was decided at (for Retry-After, and the windows a
#: refund goes back to).
Verdict = tuple[int, float]


@dataclass(frozen=True, slots=True)
class Counted:
    """What an allowed check counted, and when: enough to give it back (`refund`)."""

    site: str
    ip_key: str
    events: int
    at: float


@dataclass(slots=True)
class _Waiting:
    """One site's checks waiting for their script call: (IP key, events, the verdict's future)."""

    checks: list[tuple[str, int, asyncio.Future[Verdict]]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


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
        self._refunds = [c.register_script(REFUND_SCRIPT) for c in shards.clients]
        self._breaker = Breaker(len(shards.clients), CHECK_BACKOFF_S)
        #: Sites with a script call at Redis, and the checks queued behind it.
        self._waiting: dict[str, _Waiting] = {}

    @property
    def enabled(self) -> bool:
        return self._site_limit > 0 or self._ip_limit > 0

    async def check(self, site: str, ip_key: str, n: int) -> Counted | None:
        """Count `n` events; raise ApiError(RATE_LIMITED) with Retry-After when over a limit.
        Returns what was counted (None: nothing, the limiter is off or Redis did not answer)."""
        if not self.enabled:
            return None
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.get(site)
        if waiting is None:  # no call for this site at Redis: start one
            waiting = self._waiting[site] = _Waiting()
            # It ends when the site's queue is empty (held here: the loop holds tasks weakly).
            waiting.task = asyncio.create_task(self._send(site, waiting), name="rate-limit")
        waiting.checks.append((ip_key, n, future))
        try:
            # Queued behind the site's call, then its own: each bounded by CHECK_TIMEOUT_S (a
            # longer one trips the breaker). A Redis answering in 0.15 s still decides.
            async with asyncio.timeout(2 * CHECK_TIMEOUT_S):
                verdict, now = await future
        except TimeoutError:
            self._metrics.ratelimit_unavailable.inc()
            return None
        if verdict == UNCHECKED:
            return None
        if verdict == SITE_OVER:
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"site {site} is over {self._site_limit} events per second",
                retry_after=1,
            )
        if verdict == IP_OVER:
            raise ApiError(
                ErrorCode.RATE_LIMITED,
                f"this client is over {self._ip_limit} events per minute",
                retry_after=max(1, 60 - int(now % 60)),
            )
        return Counted(site, ip_key, n, now)

    async def refund(self, counted: list[Counted]) -> None:
        """Give back what these checks counted (a batch refused by a later site's check).
        Best effort and bounded as a check is: a Redis that fails or is slow keeps the count."""
        await asyncio.gather(*(self._refund(c) for c in counted))

    async def _refund(self, c: Counted) -> None:
        index = self._shards.index(c.site)
        try:
            with self._breaker.call(index) as allowed:
                if allowed:
                    async with asyncio.timeout(CHECK_TIMEOUT_S):
                        keys = self._keys(c.site, c.at, [c.ip_key])
                        args = [self._site_limit, self._ip_limit, c.events]
                        await self._refunds[index](keys=keys, args=args)
        except REDIS_ERRORS:  # TimeoutError included
            log.info("rate-limit refund failed; the count stays", extra={"site": c.site})

    def _keys(self, site: str, now: float, ip_keys: list[str]) -> list[str]:
        """The site's counter for the second of `now`, then each IP's for its minute."""
        minute = int(now // 60)
        keys = [self._names.rate_site(site, int(now))]
        return keys + [self._names.rate_ip(site, ip_key, minute) for ip_key in ip_keys]

    async def _send(self, site: str, waiting: _Waiting) -> None:
        """Decide the site's queued checks, a group per call, until none is left."""
        group: list[tuple[str, int, asyncio.Future[Verdict]]] = []
        try:
            while waiting.checks:
                group = waiting.checks[:GROUP_CHECKS]
                del waiting.checks[:GROUP_CHECKS]
                # A check whose request went away (or gave up waiting) counts nothing.
                group = [check for check in group if not check[2].done()]
                if not group:
                    continue
                now = time.time()
                try:
                    decided = await self._decide(site, [(ip, n) for ip, n, _ in group], now)
                except Exception:  # a bug: let the group through rather than hold its requests
                    log.exception("rate-limit check failed; its requests pass")
                    decided = None
                if decided is None:  # allowed unchecked: counted once per waiting request
                    waiting_now = sum(1 for _, _, future in group if not future.done())
                    self._metrics.ratelimit_unavailable.inc(waiting_now)
                verdicts = decided if decided is not None else [UNCHECKED] * len(group)
                for (_, _, future), verdict in zip(group, verdicts, strict=True):
                    if not future.done():  # its request may have been cancelled meanwhile
                        future.set_result((verdict, now))
                group = []
        finally:
            del self._waiting[site]
            for _, _, future in [*group, *waiting.checks]:  # this task was cancelled
                future.cancel()

    async def _decide(
        self, site: str, checks: list[tuple[str, int]], now: float
    ) -> list[int] | None:
        """One script call's verdicts; None when Redis is not there to ask."""
        keys = self._keys(site, now, [ip_key for ip_key, _ in checks])
        index = self._shards.index(site)
        try:
            with self._breaker.call(index) as allowed:
                if allowed:
                    # Every counter lives in the site's hash slot on the site's server: one
                    # script, one round trip, and in a Cluster one node.
                    async with asyncio.timeout(CHECK_TIMEOUT_S):
                        args = [self._site_limit, self._ip_limit, *(n for _, n in checks)]
                        verdicts: list[int] = await self._scripts[index](keys=keys, args=args)
                        return verdicts
        except REDIS_ERRORS:  # TimeoutError included
            pass
        return None
