"""Several independent Redis servers (REDIS_URL=a,b): each site lives on one, same code path."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from app.broker.redis import Publisher
from app.names import Names
from app.servers.redis import RedisShards
from app.settings import Settings
from app.store.sites import create_site, get_site
from tests.clients import WsViewer, post_events
from tests.processes import AppProcess
from tests.servers import Servers
from tests.support import FAST, env_for, eventually, token
from workers.embedded import EmbeddedRedis, free_port

pytestmark = pytest.mark.slow


def test_settings_accept_several_redis_urls() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://a:1/0, redis://b:2/0"})
    assert s.require_redis() == ("redis://a:1/0", "redis://b:2/0")
    with pytest.raises(Exception, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "redis://a:1/0,http://b"})


def test_every_process_maps_a_site_to_the_same_server() -> None:
    """Ingest publishes a site's events where gateways subscribe to them: the mapping must not
    depend on the process (Python's own str hash is salted per process)."""
    urls = ("redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0")
    sites = [f"s{i}.example.com" for i in range(50)]
    ours = [RedisShards(urls).index(s) for s in sites]
    assert set(ours) == {0, 1}  # both servers are used
    program = (
        "import sys; from app.servers.redis import RedisShards; "
        f"shards = RedisShards({urls!r}); "
        "print(' '.join(str(shards.index(s)) for s in sys.argv[1:]))"
    )
    for seed in ("1", "2"):
        other = subprocess.run(
            [sys.executable, "-c", program, *sites],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        assert [int(i) for i in other.stdout.split()] == ours


@pytest.fixture
def two_redis(tmp_path: Path) -> Iterator[tuple[EmbeddedRedis, EmbeddedRedis]]:
    a = EmbeddedRedis(tmp_path / "a", persist=False)
    b = EmbeddedRedis(tmp_path / "b", persist=False)
    yield a, b
    a.stop()
    b.stop()


async def test_sites_stream_and_resume_from_their_own_server(
    two_redis: tuple[EmbeddedRedis, EmbeddedRedis],
    settings: Settings,
    pool: asyncpg.Pool,
    tmp_path: Path,
    names: Names,
) -> None:
    a, b = two_redis
    shards = RedisShards((a.url, b.url))
    by_shard: dict[int, str] = {}
    while len(by_shard) < 2:
        candidate = f"s{secrets.token_hex(4)}.example.com"
        by_shard.setdefault(shards.index(candidate), candidate)
    for site in by_shard.values():
        await create_site(pool, site)
    env = env_for(settings.with_(redis_url=f"{a.url},{b.url}"), **FAST)
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    try:
        viewers = {i: await WsViewer.open(gateway.ws_url, s, token(s)) for i, s in by_shard.items()}
        for i, site in by_shard.items():
            await viewers[i].wait_notice("welcome")
            await post_events(ingest.url, site, 5)
        for i in by_shard:
            await viewers[i].wait_for(5)
            assert viewers[i].offsets == [1, 2, 3, 4, 5]
        for i, site in by_shard.items():  # each site's keys live on its own server only
            own = redis.Redis.from_url((a.url, b.url)[i])
            other = redis.Redis.from_url((a.url, b.url)[1 - i])
            assert own.zcard(names.window(site)) == 5
            assert other.zcard(names.window(site)) == 0
            own.close()
            other.close()
        found = await get_site(pool, by_shard[1])
        assert found is not None
        resumed = await WsViewer.open(
            gateway.ws_url, by_shard[1], token(by_shard[1]), f"&since={found.epoch}-2"
        )
        await resumed.wait_for(3)
        assert resumed.offsets == [3, 4, 5]
        for v in [*viewers.values(), resumed]:
            await v.close()
    finally:
        gateway.stop()
        ingest.stop()


async def test_a_dead_server_holds_up_only_its_own_sites(
    servers: Servers, names: Names, rclient: aioredis.Redis
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    shards = RedisShards((servers.redis_url, dead))
    live_site, dead_site = (site_on_shard(shards, i) for i in (0, 1))
    publisher = Publisher(shards, names, 100)
    try:
        results = [
            await publisher.publish(
                [publication(live_site, offset), publication(dead_site, offset)]
            )
            for offset in (1, 2)  # the second commit skips the dead server without trying it
        ]
        assert await rclient.zcard(names.window(live_site)) == 2
        assert [(r.published, r.lost) for r in results] == [(1, 1), (1, 1)]
        assert results[1].why == "redis marked unavailable"
    finally:
        await shards.aclose()


async def test_a_hung_server_holds_up_the_others_sites_for_at_most_the_publish_timeout(
    two_redis: tuple[EmbeddedRedis, EmbeddedRedis], names: Names
) -> None:
    """An outside test hung a Cluster master: sites on the healthy ones were delivered 2.5-4 s
    late for the whole failure, each commit's publication waiting out the hung server's 2 s.
    The wait is PUBLISH_TIMEOUT_S (0.5 s), then the hung server's sites are skipped a while."""
    a, b = two_redis
    shards = RedisShards((a.url, b.url))
    healthy, hung = (site_on_shard(shards, i) for i in (0, 1))
    publisher = Publisher(shards, names, 100)
    client = aioredis.Redis.from_url(a.url)
    try:
        await publisher.publish([publication(healthy, 1), publication(hung, 1)])  # connected
        os.kill(b.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            first = await publisher.publish([publication(healthy, 2), publication(hung, 2)])
            waited = time.monotonic() - started
            second = await publisher.publish([publication(healthy, 3), publication(hung, 3)])
        finally:
            os.kill(b.pid, signal.SIGCONT)
        assert waited < 0.9  # not 2 s
        assert [(r.published, r.lost) for r in (first, second)] == [(1, 1), (1, 1)]
        assert await client.zcard(names.window(healthy)) == 3
    finally:
        await client.aclose()
        await shards.aclose()


async def test_several_sites_publish_after_the_server_forgot_the_script(
    private_redis: EmbeddedRedis, names: Names
) -> None:
    """A commit's sites on one server go in one pipeline of EVALSHA (no SCRIPT EXISTS first).
    A server that lost its script cache (restarted, SCRIPT FLUSH) answers NOSCRIPT: the script
    is loaded and the group sent again, so nothing becomes a gap."""
    shards = RedisShards((private_redis.url,))
    publisher = Publisher(shards, names, 100)
    direct = aioredis.Redis.from_url(private_redis.url)
    try:
        results = []
        for offset in (1, 2):
            await direct.script_flush()
            pair = [publication("a.example", offset), publication("b.example", offset)]
            results.append(await publisher.publish(pair))
            await direct.script_flush()
            # One site: one call.
            results.append(await publisher.publish([publication("c.example", offset)]))
        for site in ("a.example", "b.example", "c.example"):
            assert await direct.zcard(names.window(site)) == 2
        assert sum(r.published for r in results) == 6 and sum(r.lost for r in results) == 0
    finally:
        await direct.aclose()
        await shards.aclose()


def site_on_shard(shards: RedisShards, index: int) -> str:
    while True:
        site = f"s{secrets.token_hex(4)}.example.com"
        if shards.index(site) == index:
            return site


def publication(site: str, offset: int) -> tuple[str, int, bytes]:
    return (site, offset, f"event {offset}".encode())


async def test_a_window_expires_after_its_sites_last_event(
    servers: Servers, names: Names, rclient: aioredis.Redis
) -> None:
    """Redis holds the windows of recently active sites only: each publication renews its
    window's TTL, and an idle site's window goes (its replays read PostgreSQL, as for any
    range the window does not hold whole)."""
    shards = RedisShards((servers.redis_url,))
    site = site_on_shard(shards, 0)
    try:
        await Publisher(shards, names, 100, window_ttl_s=3600).publish([publication(site, 1)])
        assert 3590 <= await rclient.ttl(names.window(site)) <= 3600
        await Publisher(shards, names, 100, window_ttl_s=1).publish([publication(site, 2)])
        assert await rclient.zcard(names.window(site)) == 2  # renewed, not reset

        async def gone() -> bool:
            return await rclient.exists(names.window(site)) == 0

        await eventually(gone, timeout=5, what="window expired")
    finally:
        await shards.aclose()
