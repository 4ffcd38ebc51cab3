"""Several independent Redis servers (REDIS_URL=a,b): each site lives on one, same code path."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from app.names import Names
from app.settings import Settings
from app.shards import RedisShards
from app.sites import create_site, get_site
from tests.clients import WsViewer, post_events
from tests.conftest import env_for
from tests.processes import AppProcess
from tests.test_gateway import FAST, token
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow


def test_settings_accept_several_redis_urls() -> None:
    s = Settings.from_env({"REDIS_URL": "redis://a:1/0, redis://b:2/0"})
    assert s.require_redis() == ("redis://a:1/0", "redis://b:2/0")
    with pytest.raises(Exception, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "redis://a:1/0,http://b"})


def test_a_site_always_maps_to_the_same_server() -> None:
    shards = RedisShards(("redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"))
    assert shards.index("example.com") == shards.index("example.com")
    spread = {shards.index(f"s{i}.example.com") for i in range(50)}
    assert spread == {0, 1}


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
