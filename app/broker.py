"""Redis side of the stream: publishing (ingest) and, later, subscribing (gateway).

Publication of a site's events is one Lua script, so it is atomic: each event is added to the
site's replay window (a sorted set scored by offset, capped to the newest N) and PUBLISHed on
the site's channel. Offsets come from PostgreSQL (app.store), so publishing is idempotent: a
retried publish re-adds the same member and viewers drop offsets they already have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.metrics import IngestMetrics
from app.names import Names
from app.store import Stored

if TYPE_CHECKING:
    from app.shards import RedisShards

log = logging.getLogger(__name__)

#: Everything a Redis call may raise when Redis, or a Cluster's slot map, is unavailable.
REDIS_ERRORS = (
    OSError,
    TimeoutError,
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
)

#: KEYS[1] = window; ARGV[1] = channel, ARGV[2] = window size, then offset/payload pairs.
#: The channel shares the window's hash tag, so in a Cluster both are in the script's slot.
_SCRIPT = """
local n = 0
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('%s', ARGV[1], ARGV[i + 1])
  n = n + 1
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1)
return n
"""
PUBLISH_SCRIPT = _SCRIPT % "PUBLISH"
#: In a Cluster, classic PUBLISH is broadcast to every node; SPUBLISH stays in the slot's shard.
SHARDED_PUBLISH_SCRIPT = _SCRIPT % "SPUBLISH"

#: Subscriber reconnect backoff: base * 2**attempt, capped, with full jitter.
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 5.0

#: After a failed publish, skip a site's Redis for this long instead of stalling every commit.
BACKOFF_S = 1.0

#: A site's events of one commit, as the publish script's ARGV tail: offset, payload, ...
Pairs = dict[str, list[bytes | int]]


class Publisher:
    """Best-effort publisher: events are already durable when they get here. A failure is
    counted as a gap (viewers recover it from history) and never reaches the client.

    A commit's sites are published in groups, concurrently: one pipeline per server, or in a
    Cluster one script call per site (redis-py cannot pipeline scripts there, and each call
    must follow its own slot's MOVED/ASK redirections). A failed group marks its sites as
    skipped for BACKOFF_S, so one dead server or node does not hold up the others' sites.
    """

    def __init__(
        self, shards: RedisShards, names: Names, window: int, metrics: IngestMetrics
    ) -> None:
        self._shards = shards
        self._names = names
        self._window = window
        self._metrics = metrics
        script = SHARDED_PUBLISH_SCRIPT if shards.cluster else PUBLISH_SCRIPT
        self._scripts = [c.register_script(script) for c in shards.clients]
        self._skip_until: dict[str, float] = {}

    async def publish(self, stored: list[Stored]) -> None:
        by_site: Pairs = defaultdict(list)
        for s in stored:
            assert s.payload is not None
            by_site[s.event.site] += [s.offset, s.payload]
        skipped = self._take_skipped(by_site)
        if skipped:
            self._gap(skipped, "redis marked unavailable")
        groups = self._groups(by_site)
        results = await asyncio.gather(
            *(self._publish_group(group, by_site) for group in groups), return_exceptions=True
        )
        failed, published, why = 0, 0, ""
        for group, result in zip(groups, results, strict=True):
            events = sum(len(by_site[site]) // 2 for site in group)
            if result is None:
                published += events
                continue
            if not isinstance(result, REDIS_ERRORS):
                raise result
            failed, why = failed + events, type(result).__name__
            for site in group:
                self._skip_until[site] = time.monotonic() + BACKOFF_S
        self._metrics.published.inc(published)
        if failed:
            self._gap(failed, why)

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

    async def _publish_group(self, sites: list[str], by_site: Pairs) -> None:
        index = self._shards.index(sites[0])
        client, script = self._shards.clients[index], self._scripts[index]
        if isinstance(client, RedisCluster):
            site = sites[0]
            await script(keys=[self._names.window(site)], args=self._args(site, by_site))
            return
        async with client.pipeline(transaction=False) as pipe:
            for site in sites:
                keys = [self._names.window(site)]
                await script(keys=keys, args=self._args(site, by_site), client=pipe)
            await pipe.execute()

    def _args(self, site: str, by_site: Pairs) -> list[bytes | int | str]:
        return [self._names.channel(site), self._window, *by_site[site]]

    def _gap(self, count: int, why: str) -> None:
        self._metrics.publish_gap.inc(count)
        log.warning("events stored but not published", extra={"events": count, "error": why})


class Subscriber:
    """The gateway's one Redis pub/sub connection, carrying every site it has viewers for.

    It owns reconnection (docs/decisions.md): redis-py's own retries are disabled on this
    connection because a silent reconnect hides a gap. On any connection error it waits with
    exponential backoff and jitter, logs each attempt, opens a new connection, resubscribes every
    channel it held, and calls `on_reconnect(sites)` so the gateway can repair and report the gap.
    `subscribe` returns once Redis has confirmed the subscription.
    """

    def __init__(
        self,
        redis_url: str,
        names: Names,
        on_message: Callable[[str, bytes], None],
        on_reconnect: Callable[[list[str]], Awaitable[None]],
        on_reconnect_attempt: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = redis_url
        self._names = names
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._on_attempt = on_reconnect_attempt
        self._client = self._new_client()
        self._pubsub = self._client.pubsub()
        self._channels: dict[str, str] = {}  # channel -> site
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._connected = asyncio.Event()
        # Commands on the one pub/sub connection must not interleave: redis-py opens the
        # connection lazily, and two first SUBSCRIBEs at once would open two (one orphaned,
        # its confirmation never read).
        self._commands = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def _new_client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self._url,
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            health_check_interval=5,
        )

    @property
    def sites(self) -> list[str]:
        return list(self._channels.values())

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever(), name="redis-subscriber")
        self._task.add_done_callback(_log_crash)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*REDIS_ERRORS):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._client.aclose()

    async def subscribe(self, site: str, confirm_within: float = 5.0) -> None:
        """SUBSCRIBE to the site's channel and wait for Redis to confirm it."""
        channel = self._names.channel(site)
        self._channels[channel] = site
        future = self._confirm.setdefault(channel, asyncio.get_running_loop().create_future())
        try:
            async with self._commands:
                await self._pubsub.subscribe(channel)
            self._connected.set()
            async with asyncio.timeout(confirm_within):
                await asyncio.shield(future)
        except BaseException:
            self._channels.pop(channel, None)
            self._confirm.pop(channel, None)
            raise

    async def unsubscribe(self, site: str) -> None:
        channel = self._names.channel(site)
        self._channels.pop(channel, None)
        self._confirm.pop(channel, None)
        with contextlib.suppress(*REDIS_ERRORS):  # a dead connection unsubscribes everything
            async with self._commands:
                await self._pubsub.unsubscribe(channel)

    async def _read_forever(self) -> None:
        attempt = 0
        while not self._closing:
            if attempt:
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(attempt, 10))
                delay = random.uniform(delay / 2, delay)
                log.warning(
                    "redis pub/sub reconnecting",
                    extra={"attempt": attempt, "delay_s": round(delay, 3)},
                )
                self._on_attempt()
                await asyncio.sleep(delay)
                attempt = 0 if await self._resubscribe() else attempt + 1
                continue
            try:
                await self._connected.wait()
                await self._read()
            except REDIS_ERRORS as exc:
                log.warning("redis pub/sub connection lost", extra={"error": repr(exc)})
                attempt = 1

    async def _read(self) -> None:
        received = 0
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            received += 1
            if received % 64 == 0:
                # A burst already buffered is read without suspending; let writers drain.
                await asyncio.sleep(0)
            kind = message["type"]
            channel = message["channel"].decode()
            if kind == "message":
                site = self._channels.get(channel)
                if site is not None:
                    self._on_message(site, message["data"])
            elif kind == "subscribe":
                future = self._confirm.pop(channel, None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def _resubscribe(self) -> bool:
        """A fresh connection subscribed to every channel held; False if Redis is still down."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
        self._client = self._new_client()
        self._pubsub = self._client.pubsub()
        sites = self.sites
        if not self._channels:
            self._connected.clear()  # nothing to read until the next subscribe
            return True
        try:
            async with self._commands:
                await self._pubsub.subscribe(*self._channels)
        except REDIS_ERRORS as exc:
            log.warning("redis resubscribe failed", extra={"error": repr(exc)})
            return False
        log.info("redis pub/sub reconnected", extra={"sites": len(sites)})
        await self._on_reconnect(sites)
        return True


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("redis subscriber stopped", exc_info=task.exception())
