"""A gateway's feed (app.gateway.feed) with real Redis and PostgreSQL but no sockets: how live
events become frames in order, and how gaps and reconnects are repaired from storage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from app.broker.redis import RedisBroker
from app.gateway import feed as feed_module
from app.gateway.feed import Feeds
from app.gateway.hub import EVENT, Hub, Viewer
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from app.gateway.replay import Replayer
from app.names import Names
from app.servers.redis import RedisShards
from app.settings import Settings
from app.store.writes import commit
from tests.support import eventually, new


@pytest.fixture
async def feeds(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Feeds]:
    metrics = GatewayMetrics(CollectorRegistry())
    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    replayer = Replayer(broker, pool, metrics)
    feeds = Feeds(Hub(), settings, broker, pool, metrics, DeliveryStats(metrics), replayer)
    feeds.start()
    yield feeds
    await feeds.close()
    await shards.aclose()


async def live_viewer(feeds: Feeds, site: str) -> Viewer:
    viewer = Viewer(site, "e1e2e3e4", 1 << 20, lambda: None)
    await feeds.join(viewer)
    return viewer


def event(offset: int) -> bytes:
    return b'{"cursor":"e1e2e3e4-%d","offset":%d,"ts":"2026-01-01T00:00:00.000Z"}' % (
        offset,
        offset,
    )


def queued(viewer: Viewer) -> list[int | str]:
    """The viewer's queue: offsets for events, "notice" for notices."""
    return [offset if kind == EVENT else "notice" for kind, offset, _ in viewer.take()]


async def test_every_burst_goes_out_at_once_in_order_before_a_notice(
    feeds: Feeds, site: str
) -> None:
    viewer = await live_viewer(feeds, site)
    feeds.on_messages(site, [event(1)])
    feeds.on_messages(site, [event(3)])  # out of order: held by the sequencer
    assert queued(viewer) == [1]
    feeds.on_messages(site, [event(2), event(4)])  # 2, 3 and 4 now ready: sent together
    feeds.notice(site, {"type": "gap", "after": None, "recovered": True})
    assert queued(viewer) == [2, 3, 4, "notice"]


async def test_a_page_just_read_from_postgres_is_reused(
    settings: Settings, pool: asyncpg.Pool, site: str
) -> None:
    """A reconnect storm's viewers ask for the same replay pages a few milliseconds apart: a
    page read from PostgreSQL is kept briefly, and the next viewer asking gets it without a
    read (committed events never change)."""
    from app.gateway import replay
    from app.store.writes import commit

    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)

    def reads(source: str) -> float | None:
        return registry.get_sample_value("sitewire_gateway_replay_reads_total", {"source": source})

    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    replayer = Replayer(broker, pool, metrics)
    epoch = await pool.fetchval("SELECT epoch FROM sites WHERE id = $1", site)
    try:
        # A read without a committed bound (a catch-up) may come before its range is stored:
        # it is neither kept nor handed to a bounded reader of the same range.
        assert await replayer.page(site, epoch, 0, replay.UNBOUNDED) == []
        # Committed but never published, so not in the Redis window: pages come from PostgreSQL.
        stored = await commit(pool, [new(site, n=n) for n in range(250)])
        assert all(o is not None for o in stored)
        first = await replayer.page(site, epoch, 0, 250)  # the same range (1..200), bounded
        again = await replayer.page(site, epoch, 0, 250)
        assert [o for o, _ in first] == list(range(1, 201)) and again == first
        assert (reads("postgres"), reads("shared")) == (2, 1)
        replay.RECENT_PAGE_S, kept = 0.0, replay.RECENT_PAGE_S
        try:
            await replayer.page(site, epoch, 0, 4)  # read, and expired at once
            await replayer.page(site, epoch, 0, 4)
        finally:
            replay.RECENT_PAGE_S = kept
        assert reads("postgres") == 4
    finally:
        await shards.aclose()


async def test_a_storm_of_resumes_reads_each_window_page_once(
    settings: Settings, pool: asyncpg.Pool, site: str
) -> None:
    """A reconnect storm's viewers resume at nearly the same cursor: they ask for the same
    pages of the Redis window, and whether the event after their cursor is still stored.
    Concurrent callers share one read of each, and a page bounded by a committed offset is kept
    for the callers just after, as for PostgreSQL pages (each read once cost the gateway a pool
    connection in a storm: docs/performance.md, finding 23)."""
    from app.gateway import replay

    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)

    def reads(source: str) -> float:
        value = registry.get_sample_value("sitewire_gateway_replay_reads_total", {"source": source})
        return value or 0.0

    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    replayer = Replayer(broker, pool, metrics)
    try:
        await broker.publish([(site, n, event(n)) for n in range(1, 11)])
        pages = await asyncio.gather(*(replayer.page(site, "e1e2e3e4", 4, 10) for _ in range(50)))
        assert all([o for o, _ in page] == list(range(5, 11)) for page in pages)
        assert (reads("redis"), reads("postgres"), reads("shared")) == (1, 0, 49)
        again = await replayer.page(site, "e1e2e3e4", 4, 10)  # just after: kept
        assert again == pages[0] and reads("redis") == 1
        checks = await asyncio.gather(*(replayer.stored(site, 5) for _ in range(50)))
        assert all(checks) and reads("shared") == 50  # checks are not page reads
        # Without a committed bound (a catch-up), a page is shared in flight but not kept.
        await replayer.page(site, "e1e2e3e4", 4, replay.UNBOUNDED)
        await replayer.page(site, "e1e2e3e4", 4, replay.UNBOUNDED)
        assert reads("redis") + reads("postgres") == 3
    finally:
        await shards.aclose()


async def test_a_viewer_joining_while_the_last_ones_unsubscribe_runs_is_subscribed_again(
    settings: Settings, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    """The race the per-site lock exists for: the linger has expired and UNSUBSCRIBE is on its
    way when a new viewer arrives. It must wait, then subscribe afresh, and get live events."""
    metrics = GatewayMetrics(CollectorRegistry())
    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    replayer = Replayer(broker, pool, metrics)
    quick = dataclasses.replace(settings, unsubscribe_delay_s=0.0)
    feeds = Feeds(Hub(), quick, broker, pool, metrics, DeliveryStats(metrics), replayer)
    feeds.start()
    subscriber = feeds.subscriptions
    unsubscribing, go_on = asyncio.Event(), asyncio.Event()
    real_unsubscribe = subscriber.unsubscribe

    async def held_unsubscribe(s: str) -> None:  # the real one, once the test lets it go
        unsubscribing.set()
        await go_on.wait()
        await real_unsubscribe(s)

    subscriber.unsubscribe = held_unsubscribe  # type: ignore[method-assign]
    channel = names.channel(site)
    try:
        first = await live_viewer(feeds, site)
        feeds.leave(first)
        await asyncio.wait_for(unsubscribing.wait(), 5)
        second = Viewer(site, "e1e2e3e4", 1 << 20, lambda: None)
        joining = asyncio.create_task(feeds.join(second))
        await asyncio.sleep(0.05)
        assert not joining.done()  # waiting for the unsubscribe to finish
        go_on.set()
        await asyncio.wait_for(joining, 5)
        assert (await rclient.pubsub_numsub(channel))[0][1] == 1
        await rclient.publish(channel, event(1))
        async with asyncio.timeout(5):
            while not second.queued_bytes:
                await asyncio.sleep(0.01)
        assert queued(second) == [1]
    finally:
        go_on.set()
        await feeds.close()
        await shards.aclose()


async def test_a_gap_storage_cannot_fill_is_counted_as_unrecovered(
    settings: Settings, pool: asyncpg.Pool, site: str
) -> None:
    """Most gap notices say `recovered: true`; the alert on lost events needs the others
    counted apart (deploy/prometheus/alerts.yml, SitewireGapsNotRecovered)."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    feeds = Feeds(
        Hub(), settings, broker, pool, metrics, DeliveryStats(metrics),
        Replayer(broker, pool, metrics),
    )  # fmt: skip
    feeds.start()

    def count(name: str) -> float | None:
        return registry.get_sample_value(name)

    try:
        viewer = await live_viewer(feeds, site)
        feeds.on_messages(site, [event(1)])
        feeds.on_messages(site, [event(3)])  # 2 was never stored: neither store can fill it
        await eventually(lambda: count("sitewire_gateway_unrecovered_gaps_total") == 1)
        assert count("sitewire_gateway_gap_notices_total") == 1
        assert queued(viewer) == [1, "notice", 3]
    finally:
        await feeds.close()
        await shards.aclose()


async def test_a_catch_up_past_a_hole_storage_cannot_fill_gives_it_up(
    feeds: Feeds, pool: asyncpg.Pool, site: str
) -> None:
    """A catch-up (after a pub/sub reconnect, or while a site is polled from storage) that
    reads past a hole retention left: a review found the events after it held for ever
    (nothing comes to repair a polled site). The gap is given up with a notice, the events go
    out, and the catch-up says it was not complete."""
    viewer = await live_viewer(feeds, site)
    await commit(pool, [new(site, n=i) for i in range(300)])
    await pool.execute("DELETE FROM events WHERE site = $1 AND site_offset <= 250", site)
    queued(viewer)  # whatever the join queued (its welcome is the transport's)
    assert await feeds.catch_up(site) is False
    assert queued(viewer) == ["notice", *range(251, 301)]
    assert await feeds.catch_up(site) is True  # nothing more


async def test_a_gap_filled_while_its_repair_waits_on_storage_is_not_given_up(
    feeds: Feeds, pool: asyncpg.Pool, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside test (pooled connections gone stale): a repair's read hung until storage
    patience ran out, while a catch-up delivered the missing events meanwhile; the repair then
    gave up the gap anyway, and viewers were told events were missing after receiving them."""
    viewer = await live_viewer(feeds, site)
    await commit(pool, [new(site, n=i) for i in range(3)])
    epoch = await pool.fetchval("SELECT epoch FROM sites WHERE id = $1", site)
    stored = {o: p for o, p in await feeds._replayer.page(site, epoch, 0, 3)}
    queued(viewer)
    real_read = feeds._read
    reading = asyncio.Event()

    async def stalled_read(site_: str, after: int, until: int, *, window: bool = True) -> None:
        reading.set()
        await asyncio.sleep(0.5)  # storage does not answer; meanwhile the gap is filled
        return None

    monkeypatch.setattr(feed_module, "REPAIR_PATIENCE_S", 0.2)  # outlasted by the read
    feeds._read = stalled_read  # type: ignore[method-assign, assignment]
    feeds.on_messages(site, [stored[1]])
    feeds.on_messages(site, [stored[3]])  # 2 missing: a repair starts, and its read stalls
    await asyncio.wait_for(reading.wait(), 5)
    feeds._read = real_read  # type: ignore[method-assign]
    feeds.on_messages(site, [stored[2]])  # arrives late: the gap is filled
    await asyncio.sleep(1.0)
    assert queued(viewer) == [1, 2, 3]  # and no notice
