"""The rate limiter against a Redis of the test's own: checks that arrive together share script
calls, and are decided one by one in arrival order, exactly as separate calls would be."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from app.errors import ApiError
from app.ingest.metrics import IngestMetrics
from app.ingest.ratelimit import CHECK_SCRIPT, Counted, RateLimiter
from app.names import Names
from app.servers.redis import RedisShards
from app.settings import Settings
from workers.embedded import EmbeddedRedis

SITE = "limits.example"


@pytest.fixture
async def shards(private_redis: EmbeddedRedis) -> AsyncIterator[RedisShards]:
    shards = RedisShards((private_redis.url,))
    yield shards
    await shards.aclose()


def limiter(shards: RedisShards, names: Names, settings: Settings, **limits: int) -> RateLimiter:
    return RateLimiter(shards, names, settings.with_(**limits), IngestMetrics(CollectorRegistry()))


async def verdicts(limiter: RateLimiter, checks: list[tuple[str, int]]) -> list[bool]:
    """Whether each check passed; all started together, in this order."""

    async def one(ip_key: str, n: int) -> bool:
        try:
            await limiter.check(SITE, ip_key, n)
        except ApiError:
            return False
        return True

    return list(await asyncio.gather(*(one(ip_key, n) for ip_key, n in checks)))


async def script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def wait_for_fresh(period: int, ahead: float) -> None:
    """Sleep, if need be, until the current fixed window has `ahead` seconds left, so that a
    test's checks all fall in one window (a boundary between them would reset the counts)."""
    left = period - time.time() % period
    if left < ahead:
        await asyncio.sleep(left + 0.01)


async def test_checks_arriving_together_share_calls_and_keep_their_order(
    shards: RedisShards, names: Names, settings: Settings
) -> None:
    rate = limiter(shards, names, settings, rate_site_per_sec=0, rate_ip_per_min=30)
    client = shards.clients[0]
    await rate.check(SITE, "warm", 1)  # loads the script: later calls are one EVALSHA each
    before = await script_calls(client)
    await wait_for_fresh(60, 2.0)
    # Two clients interleaved, and a third whose first check alone is over its limit.
    checks = [("a", 1), ("b", 1)] * 40 + [("c", 40), ("c", 1)]
    passed = await verdicts(rate, checks)
    a = [ok for (ip, _), ok in zip(checks, passed, strict=True) if ip == "a"]
    b = [ok for (ip, _), ok in zip(checks, passed, strict=True) if ip == "b"]
    assert a == [True] * 30 + [False] * 10  # the first 30 to arrive, as with one call each
    assert b == [True] * 30 + [False] * 10
    assert passed[-2:] == [False, True]  # a refused check takes nothing from the budget
    minute = int(time.time() // 60)
    for ip_key, count in (("a", 30), ("b", 30), ("c", 1)):
        assert await client.get(names.rate_ip(SITE, ip_key, minute)) == str(count).encode()
    assert await script_calls(client) - before < len(checks) / 4


async def test_a_sites_limit_holds_within_one_shared_call(
    shards: RedisShards, names: Names, settings: Settings
) -> None:
    rate = limiter(shards, names, settings, rate_site_per_sec=10, rate_ip_per_min=0)
    await rate.check("other.example", "warm", 1)  # loads the script
    await wait_for_fresh(1, 0.5)
    passed = await verdicts(rate, [(f"ip{i}", 1) for i in range(25)])
    assert passed == [True] * 10 + [False] * 15


async def test_a_cancelled_check_leaves_the_others_decided(
    shards: RedisShards, names: Names, settings: Settings
) -> None:
    """A request that goes away while its check is queued (client gone, shutdown) must not
    strand the checks queued with it, and its own check counts nothing."""
    rate = limiter(shards, names, settings, rate_site_per_sec=0, rate_ip_per_min=1000)
    await wait_for_fresh(60, 2.0)
    tasks = [asyncio.create_task(rate.check(SITE, "ip", 1)) for _ in range(20)]
    await asyncio.sleep(0)  # all queued, none sent yet
    tasks[5].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[5], asyncio.CancelledError)
    assert all(isinstance(r, Counted) for i, r in enumerate(results) if i != 5)
    await rate.check(SITE, "ip", 1)  # and the site's next check starts a call of its own
    counted = await shards.clients[0].get(names.rate_ip(SITE, "ip", int(time.time() // 60)))
    assert counted == b"20"


async def test_limits_hold_with_a_slow_redis_that_answers(
    private_redis: EmbeddedRedis, names: Names, settings: Settings
) -> None:
    """Redis answering each call in 0.12 s (a far region, a loaded server): checks queued
    behind a call wait for it and the next, and are still decided by Redis, not waved through
    as unavailable (a bound on the whole wait of one call's length did that)."""
    delay = {"s": 0.0}  # answers are held this long once the connection is up

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if slow:
                    await asyncio.sleep(delay["s"])
                writer.write(data)
        writer.close()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", private_redis.port)
        await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    slow = RedisShards((f"redis://127.0.0.1:{port}",))
    try:
        rate = limiter(slow, names, settings, rate_site_per_sec=10, rate_ip_per_min=0)
        direct = aioredis.Redis.from_url(private_redis.url)
        await direct.script_load(CHECK_SCRIPT)  # loading it through the delay would time out
        await direct.aclose()
        await rate.check("warm.example", "ip", 1)  # connects
        delay["s"] = 0.12
        await wait_for_fresh(1, 0.9)

        async def one(i: int) -> bool:
            await asyncio.sleep(i * 0.005)  # a busy site: checks arrive while calls are out
            try:
                await rate.check(SITE, f"ip{i}", 1)
            except ApiError:
                return False
            return True

        second = int(time.time())
        passed = await asyncio.gather(*(one(i) for i in range(40)))
        # Every check decided by Redis: the second's 10 (two seconds' worth if the burst
        # crossed into the next one), none waved through for waiting too long.
        assert sum(passed) == 10 or (int(time.time()) > second and sum(passed) <= 20)
    finally:
        await slow.aclose()
        proxy.close()
