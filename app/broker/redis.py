"""The Redis broker: publication as one Lua script per site, a sorted-set window as history,
and pub/sub for live delivery (app.broker.pubsub, app.broker.cluster).

Publication of a site's events is one Lua script, so it is atomic: each event is added to the
site's replay window (a sorted set scored by offset, capped to the newest N) and PUBLISHed on
the site's channel. Offsets come from PostgreSQL (app.store.writes), so publishing is
idempotent: a retried publish re-adds the same member and viewers drop offsets they already
have. Sites are spread over servers by app.servers.redis.RedisShards; every key and channel
name comes from app.names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.broker.base import (
    BrokerUnavailable,
    OnBurst,
    OnReconnect,
    Publication,
    PublishResult,
    Subscriptions,
)
from app.broker.cluster import CLUSTER_CLIENT_ERRORS, ShardedSubscriber
from app.broker.pubsub import Subscriber
from app.names import Names
from app.servers import Status
from app.servers.redis import REDIS_ERRORS, Breaker, RedisShards
from app.wire import Event

log = logging.getLogger(__name__)

#: The longest a window read may take before the reader goes to PostgreSQL instead.
WINDOW_TIMEOUT_S = 0.5
#: After a failed or slow window read, skip that server's windows for this long.
WINDOW_BACKOFF_S = 2.0


class RedisBroker:
    """`Broker` (app.broker.base) on Redis: one server, several (sites spread by hash), or a
    Cluster. The shards are the caller's: the rate limiter shares them."""

    def __init__(
        self, shards: RedisShards, names: Names, window: int, window_ttl_s: int = 3600
    ) -> None:
        self.shards = shards
        self._names = names
        self._publisher = Publisher(shards, names, window, window_ttl_s)
        #: Redis servers whose windows are skipped for a while after a failure.
        self._windows = Breaker(len(shards.clients), WINDOW_BACKOFF_S)

    async def publish(self, events: Sequence[Publication]) -> PublishResult:
        return await self._publisher.publish(events)

    async def window(self, site: str, first: int, last: int) -> list[Event] | None:
        if last < first:
            return []
        key = self._names.window(site)
        members = await self._ask(
            site, lambda client: client.zrangebyscore(key, first, last, withscores=True)
        )
        if members is None:
            return None
        events = [(int(score), payload) for payload, score in members]
        # The window is capped and Redis may have lost it: only a complete range is proof,
        # each offset once (two members at one offset: storage went back and reused it).
        if len(events) != last - first + 1 or any(
            offset != first + i for i, (offset, _) in enumerate(events)
        ):
            return None
        return events

    async def went_back(self, site: str) -> tuple[int, int] | None:
        key = self._names.went_back(site)
        value = await self._ask(site, lambda client: client.get(key))
        if value is None:
            return None
        after, through = value.split()
        return int(after), int(through)

    async def _ask(self, site: str, ask: Callable[[Any], Awaitable[Any]]) -> Any:
        """`ask(client)` on the site's server, within WINDOW_TIMEOUT_S, and not while that
        server is skipped after a failure; None when it did not answer (the caller reads
        storage instead)."""
        index = self.shards.index(site)
        try:
            with self._windows.call(index) as allowed:
                if not allowed:
                    return None
                async with asyncio.timeout(WINDOW_TIMEOUT_S):
                    return await ask(self.shards.clients[index])
        except (*REDIS_ERRORS, *CLUSTER_CLIENT_ERRORS):  # TimeoutError included
            return None

    async def forget(self, site: str, after: int) -> bool:
        index = self.shards.index(site)
        try:
            async with asyncio.timeout(WINDOW_TIMEOUT_S):
                await self.shards.clients[index].zremrangebyscore(
                    self._names.window(site), f"({after}", "+inf"
                )
        except (*REDIS_ERRORS, *CLUSTER_CLIENT_ERRORS):  # TimeoutError included
            return False
        return True

    def subscriptions(
        self, on_burst: OnBurst, on_reconnect: OnReconnect, on_reconnect_attempt: Callable[[], None]
    ) -> Subscriptions:
        if self.shards.cluster:
            cluster = self.shards.clients[0]
            assert isinstance(cluster, RedisCluster)
            sharded = ShardedSubscriber(
                cluster, self.shards.urls[0], self._names, on_burst, on_reconnect,
                on_reconnect_attempt,
            )  # fmt: skip
            return _Translated([sharded], self.shards)
        servers = [
            Subscriber(url, self._names, on_burst, on_reconnect, on_reconnect_attempt)
            for url in self.shards.urls
        ]
        return _Translated(servers, self.shards)

    async def probe(self) -> Status:
        return await self.shards.probe()


class _Translated:
    """One `Subscriptions` over one subscriber per Redis server (or one for a whole Cluster):
    each site goes to its server's, and Redis errors become `BrokerUnavailable`."""

    def __init__(
        self, subscribers: list[Subscriber] | list[ShardedSubscriber], shards: RedisShards
    ):
        self._subscribers = subscribers
        self._shards = shards

    def _for(self, site: str) -> Subscriber | ShardedSubscriber:
        return self._subscribers[0 if self._shards.cluster else self._shards.index(site)]

    @property
    def sites(self) -> list[str]:
        return [site for s in self._subscribers for site in s.sites]

    def start(self) -> None:
        for subscriber in self._subscribers:
            subscriber.start()

    async def close(self) -> None:
        for subscriber in self._subscribers:
            await subscriber.close()

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        try:
            await self._for(site).subscribe(site, confirm_within)
        except TimeoutError:
            raise
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(repr(exc)) from exc

    async def unsubscribe(self, site: str) -> None:
        await self._for(site).unsubscribe(site)

    def holds(self, site: str) -> bool:
        return self._for(site).holds(site)


#: KEYS[1] = window, KEYS[2] = the site's went-back marker; ARGV[1] = channel, ARGV[2] =
#: window size, ARGV[3] = window TTL in seconds, then offset/payload pairs. Every key and the
#: channel share the site's hash tag, so in a Cluster they are in the script's slot. The TTL is
#: renewed by every publication: only the windows of sites that received an event lately stay
#: in memory.
#:
#: An offset the window already holds is a publication again (the same payload: harmless) or
#: an offset handed out again by a PostgreSQL that went back to an earlier point (another
#: payload). Then the window is no longer storage's and goes whole; the marker says which
#: offsets changed ("R O": after R, up to the newest the window held), for resumes to read; and
#: a control message `{"went_back":R,"through":O}` goes out on the channel ahead of the new
#: events, for gateways to act on at once. One ZRANGE per call tells the usual case (every
#: offset past the window's newest) at once. Returns {events published, 1 if reused else 0}.
_SCRIPT = """
local first = tonumber(ARGV[4])
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
local reused = nil
if first ~= nil and newest ~= nil and tonumber(newest) >= first then
  for i = 4, #ARGV, 2 do
    local held = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[i], ARGV[i], 'LIMIT', 0, 1)[1]
    local offset = tonumber(ARGV[i])
    if held ~= nil and held ~= ARGV[i + 1] and (reused == nil or offset < reused) then
      reused = offset
    end
  end
  if reused ~= nil then
    local through = tonumber(newest)
    redis.call('DEL', KEYS[1])
    redis.call('SET', KEYS[2], (reused - 1) .. ' ' .. through, 'EX', 86400)
    redis.call('%s', ARGV[1], '{"went_back":' .. (reused - 1) .. ',"through":' .. through .. '}')
  end
end
local n = 0
for i = 4, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('%s', ARGV[1], ARGV[i + 1])
  n = n + 1
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if reused ~= nil then
  return {n, 1}
end
return {n, 0}
"""
PUBLISH_SCRIPT = _SCRIPT % ("PUBLISH", "PUBLISH")
#: In a Cluster, classic PUBLISH is broadcast to every node; SPUBLISH stays in the slot's shard.
SHARDED_PUBLISH_SCRIPT = _SCRIPT % ("SPUBLISH", "SPUBLISH")


def script_keys(names: Names, site: str) -> list[str]:
    """The publish script's KEYS (see `_SCRIPT`)."""
    return [names.window(site), names.went_back(site)]


def script_args(
    channel: str, window: int, window_ttl_s: int, pairs: Sequence[bytes | int | str]
) -> list[bytes | int | str]:
    """The publish script's ARGV (see `_SCRIPT`), for the publisher and for anything else that
    publishes as ingest does (the bench, tests)."""
    return [channel, window, window_ttl_s, *pairs]


#: After a failed publish, skip a site's Redis for this long instead of stalling every commit.
BACKOFF_S = 1.0

#: The longest one commit's publication may take before its sites count as a gap. Every
#: site waits for it (the next publication follows this one, in commit order): an outside
#: test hung a Cluster master and sites on the healthy ones were delivered 2.5-4 s late with
#: 2 s. Redis answers a publication in well under a millisecond.
PUBLISH_TIMEOUT_S = 0.5

#: A site's events of one commit, as the publish script's ARGV tail: offset, payload, ...
Pairs = dict[str, list[bytes | int]]


class Publisher:
    """Best-effort publisher: events are already durable when they get here. A failure is
    returned as lost events (gateways recover them from PostgreSQL), never raised.

    A commit's sites are published in groups, concurrently: one pipeline per server, or in a
    Cluster one script call per site (redis-py cannot pipeline scripts there, and each call
    must follow its own slot's MOVED/ASK redirections). A failed group marks its sites as
    skipped for BACKOFF_S, so one dead server or node does not hold up the others' sites.
    """

    def __init__(
        self, shards: RedisShards, names: Names, window: int, window_ttl_s: int = 3600
    ) -> None:
        self._shards = shards
        self._names = names
        self._window = window
        self._window_ttl_s = window_ttl_s
        script = SHARDED_PUBLISH_SCRIPT if shards.cluster else PUBLISH_SCRIPT
        self._scripts = [c.register_script(script) for c in shards.clients]
        self._skip_until: dict[str, float] = {}

    async def publish(self, events: Sequence[Publication]) -> PublishResult:
        by_site: Pairs = defaultdict(list)
        for site, offset, payload in events:
            by_site[site] += [offset, payload]
        lost, why = self._take_skipped(by_site), "redis marked unavailable"
        groups = self._groups(by_site)
        results = await asyncio.gather(
            *(self._publish_group(group, by_site) for group in groups), return_exceptions=True
        )
        published, reused = 0, []
        for group, result in zip(groups, results, strict=True):
            count = sum(len(by_site[site]) // 2 for site in group)
            if isinstance(result, list):
                published += count
                reused += result
                continue
            if not isinstance(result, REDIS_ERRORS) and not (
                self._shards.cluster and isinstance(result, CLUSTER_CLIENT_ERRORS)
            ):
                raise result
            lost, why = lost + count, type(result).__name__
            for site in group:
                self._skip_until[site] = time.monotonic() + BACKOFF_S
        return PublishResult(published, lost, why if lost else "", tuple(reused))

    def _take_skipped(self, by_site: Pairs) -> int:
        """Drop the sites still marked unavailable; return how many events that left out."""
        now, skipped = time.monotonic(), 0
        for site, until in list(self._skip_until.items()):
            if until <= now:
                del self._skip_until[site]
            elif site in by_site:
                skipped += len(by_site.pop(site)) // 2
        return skipped

    def _groups(self, by_site: Pairs) -> list[list[str]]:
        if self._shards.cluster:
            return [[site] for site in by_site]
        by_shard: dict[int, list[str]] = defaultdict(list)
        for site in by_site:
            by_shard[self._shards.index(site)].append(site)
        return list(by_shard.values())

    async def _publish_group(self, sites: list[str], by_site: Pairs) -> list[str]:
        """Publish the group's sites; return those whose offsets were found reused."""
        # Bounded: the commit loop waits for this, and a Cluster client retries a dead node
        # (reloading the slot map each time) far longer than a commit should wait.
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            try:
                replies = await self._publish_unbounded(sites, by_site)
            except redis.exceptions.ConnectionError:
                # A pooled connection that died with a server restart fails its first use;
                # the pool opens a fresh one for the retry (publishing again is safe: viewers
                # take each offset once). The first publication after a restart was lost, and
                # the site skipped for BACKOFF_S, though Redis was back.
                replies = await self._publish_unbounded(sites, by_site)
        # Each reply is the script's {published, reused}.
        return [site for site, (_, reused) in zip(sites, replies, strict=True) if reused]

    async def _publish_unbounded(self, sites: list[str], by_site: Pairs) -> list[list[int]]:
        index = self._shards.index(sites[0])
        client, script = self._shards.clients[index], self._scripts[index]
        if len(sites) == 1 or isinstance(client, RedisCluster):
            # One call: EVALSHA, and EVAL only if the server lost its script cache.
            site = sites[0]
            keys = script_keys(self._names, site)
            reply = await script(keys=keys, args=self._args(site, by_site))
            return [cast(list[int], reply)]
        # Not redis-py's script-in-pipeline support: it asks SCRIPT EXISTS before every
        # pipeline, one more round trip per commit (profiled). Load only when told NOSCRIPT;
        # publishing is idempotent, so sending the whole group again is safe.
        try:
            return await self._evalsha_pipeline(client, script.sha, sites, by_site)
        except redis.exceptions.NoScriptError:
            await client.script_load(script.script)
            return await self._evalsha_pipeline(client, script.sha, sites, by_site)

    async def _evalsha_pipeline(
        self, client: Redis, sha: str, sites: list[str], by_site: Pairs
    ) -> list[list[int]]:
        async with client.pipeline(transaction=False) as pipe:
            for site in sites:
                pipe.evalsha(sha, 2, *script_keys(self._names, site), *self._args(site, by_site))
            return cast(list[list[int]], await pipe.execute())

    def _args(self, site: str, by_site: Pairs) -> list[bytes | int | str]:
        return script_args(
            self._names.channel(site), self._window, self._window_ttl_s, by_site[site]
        )
