"""Where a resume starts, judged against what is committed; replays that never close a reader
that reads; and a gateway that serves from PostgreSQL while its Redis is away (issue #15).
The fault scenarios with every process running are in tests/chaos."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from app.broker.redis import RedisBroker
from app.codes import CloseCode
from app.gateway.hub import Viewer
from app.gateway.metrics import GatewayMetrics
from app.gateway.replay import Replayer, Start, StartRequest, StorageUnavailable, run_replay
from app.names import Names
from app.servers.redis import RedisShards
from app.settings import Settings
from app.store.sites import create_site
from app.store.writes import commit
from tests.clients import SseViewer, WsViewer, post_events, post_large
from tests.disposable import DisposablePostgres
from tests.processes import AppProcess
from tests.support import FAST, env_for, epoch_of, eventually, new, token
from workers.embedded import EmbeddedRedis


@pytest.fixture
async def replayer(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Replayer]:
    shards = RedisShards(settings.require_redis())
    broker = RedisBroker(shards, Names(settings.key_prefix), settings.replay_window)
    yield Replayer(broker, pool, GatewayMetrics(CollectorRegistry()))
    await shards.aclose()


async def test_a_cursor_past_the_live_feed_but_committed_resumes_exactly(
    replayer: Replayer, pool: asyncpg.Pool, site: str
) -> None:
    """The race of issue #15: an event acknowledged a moment ago is beyond where this
    gateway's live feed has got. Its cursor is valid: every event after it, nothing before."""
    await commit(pool, [new(site, n=i) for i in range(5)])
    epoch = await epoch_of(pool, site)
    start = await replayer.resolve(site, epoch, 2, StartRequest(since=(epoch, 4)))
    assert (start.after, start.recovered, start.reason, start.head) == (4, True, None, 5)
    start = await replayer.resolve(site, epoch, 2, StartRequest(since=(epoch, 5)))
    assert (start.after, start.recovered, start.head) == (5, True, 5)
    # Beyond the committed head: no such event was ever acknowledged.
    start = await replayer.resolve(site, epoch, 2, StartRequest(since=(epoch, 9)))
    assert (start.after, start.recovered, start.reason) == (5, False, "cursor_ahead")


async def test_a_start_at_a_time_begins_at_the_lowest_offset_of_that_time(
    replayer: Replayer, pool: asyncpg.Pool, site: str
) -> None:
    """A batch's events share one timestamp: "the last N minutes" must begin at the batch's
    first event (an outside test saw a stats count and a `minutes=` stream begin mid-batch)."""
    when = datetime.now(UTC).replace(microsecond=0)
    await commit(pool, [new(site, n=i, ts=when) for i in range(300)])
    await commit(pool, [new(site, n=i, ts=when + timedelta(seconds=1)) for i in range(5)])
    assert await replayer.offset_at(site, when - timedelta(minutes=1)) == 1
    assert await replayer.offset_at(site, when + timedelta(milliseconds=1)) == 301
    assert await replayer.offset_at(site, when + timedelta(minutes=1)) is None


async def test_pages_past_a_hole_do_not_depend_on_who_asked_first(
    replayer: Replayer, pool: asyncpg.Pool, site: str
) -> None:
    """Retention left offsets 1001-1010 of 1010. A page read past the hole for one caller
    must not answer another whose bound ends inside the hole, nor the reverse (a review found
    the second caller given the first one's empty page: a resume skipped stored events)."""
    await commit(pool, [new(site, n=i) for i in range(1010)])
    await pool.execute("DELETE FROM events WHERE site = $1 AND site_offset <= 1000", site)
    epoch = await epoch_of(pool, site)
    remaining = list(range(1001, 1011))
    for order in ((1000, 1010), (1010, 1000), (1010, 1005)):
        replayer._recent.clear()  # each order from a cold start
        for until in order:  # one after the other, then at once
            page = await replayer.page(site, epoch, 0, until)
            assert [o for o, _ in page] == [o for o in remaining if o <= until], (order, until)
        replayer._recent.clear()
        pages = await asyncio.gather(*(replayer.page(site, epoch, 0, u) for u in order))
        for until, page in zip(order, pages, strict=True):
            assert [o for o, _ in page] == [o for o in remaining if o <= until], (order, until)


async def test_a_hole_inside_a_replayed_page_is_reported(
    replayer: Replayer, pool: asyncpg.Pool, site: str
) -> None:
    """What is stored of a site is one contiguous range, except where an event with a clock
    hours off went with its month (app.store.partitions): the replay says where it skipped,
    as for the start of a page."""
    await commit(pool, [new(site, n=i) for i in range(10)])
    await pool.execute("DELETE FROM events WHERE site = $1 AND site_offset = 6", site)
    epoch = await epoch_of(pool, site)
    viewer = Viewer(site, epoch, 1 << 20, lambda: None)
    gaps: list[int] = []
    await run_replay(
        replayer, viewer, Start(2, True, head=10), asyncio.Event(), lambda _, a: gaps.append(a)
    )
    assert [offset for _, offset, _ in viewer.take() if offset] == [3, 4, 5, 7, 8, 9, 10]
    assert gaps == [5]


async def test_a_resume_that_storage_cannot_judge_is_refused_for_later(
    replayer: Replayer, pool: asyncpg.Pool, site: str
) -> None:
    epoch = await epoch_of(pool, site)
    await pool.close()  # every read now fails as PostgreSQL being away does
    with pytest.raises(StorageUnavailable):
        await replayer.resolve(site, epoch, None, StartRequest(since=(epoch, 3)))
    with pytest.raises(StorageUnavailable):
        await replayer.resolve(site, epoch, 1, StartRequest(since=(epoch, 3)))
    # Not a resume: it starts live (nothing was promised).
    start = await replayer.resolve(site, epoch, None, StartRequest(last=10))
    assert (start.after, start.recovered) == (None, None)


@pytest.mark.slow
@pytest.mark.parametrize(("count", "size"), [(300, 6000), (2000, 16000)])
async def test_replays_of_large_events_reach_a_reader_that_reads(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool, count: int, size: int
) -> None:
    """300 events of 6 KB are 1.8 MB, 2,000 of 16 KB 32 MB, both over the 1 MiB queue: the
    replay is paced by what the queue can take, so every viewer that reads gets all of them,
    whichever way it starts."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST, SITEWIRE_REPLAY_WINDOW="100")
    await post_large(ingest.url, site, count, size)
    epoch = await epoch_of(pool, site)
    viewers = [
        await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0"),
        await WsViewer.open(gateway.ws_url, site, token(site), f"&last={count}"),
        await WsViewer.open(gateway.ws_url, site, token(site), "&minutes=30"),
        await SseViewer.open(gateway.url, site, token(site), {"Last-Event-ID": f"{epoch}-0"}),
    ]
    for viewer in viewers:
        await viewer.wait_for(count, timeout=60)
        assert viewer.offsets == list(range(1, count + 1))
        assert viewer.close_code is None
        await viewer.close()


@pytest.mark.slow
async def test_a_gateway_started_while_redis_is_down_serves_from_storage(
    settings: Settings, site: str, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    """Redis is down before the gateway starts: viewers are served from PostgreSQL (and told
    so), then live once Redis is back, without a gap or a duplicate."""
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    env = env_for(settings.with_(redis_url=redis.url), **FAST)
    redis.stop()
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()  # ready: PostgreSQL answers
    epoch = await epoch_of(pool, site)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0")
    try:
        welcome = await viewer.wait_notice("welcome")
        assert welcome["delivery"] == "storage" and welcome["recovered"] is True
        await post_events(ingest.url, site, 20)  # acknowledged, never published
        await viewer.wait_for(20, timeout=10)
        redis.start()
        await eventually(
            lambda: any(n.get("mode") == "live" for n in viewer.notices), 15, what="live again"
        )
        await post_events(ingest.url, site, 20, start=20)
        await viewer.wait_for(40, timeout=10)
        assert viewer.offsets == list(range(1, 41))
        assert viewer.close_code is None
        assert all(n.get("recovered") is not False for n in viewer.notices)
    finally:
        await viewer.close()
        gateway.stop()
        ingest.stop()
        redis.stop()


@pytest.mark.slow
async def test_a_hung_redis_holds_neither_acks_nor_viewers(
    settings: Settings, site: str, tmp_path: Path, pool: asyncpg.Pool
) -> None:
    """SIGSTOP: Redis accepts connections and answers nothing. Ingest still acknowledges
    every event at once (rate limits fail open after 0.2 s, publication is off the commit
    path), and the gateway finds the stalled link and serves the viewer from storage."""
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    env = env_for(settings.with_(redis_url=redis.url), SITEWIRE_UNSUBSCRIBE_DELAY_S="0.3")
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    epoch = await epoch_of(pool, site)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0")
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        welcome = await viewer.wait_notice("welcome")
        async with asyncio.timeout(20):  # a bound, not a speed check: the chaos suite times
            await post_events(ingest.url, site, 30)
        await viewer.wait_for(30, timeout=15)
        assert viewer.offsets == list(range(1, 31))
        # Told, in a notice or already in the welcome (when the stall was found before it).
        told = [welcome.get("delivery"), *(n.get("mode") for n in viewer.notices)]
        assert "storage" in told
    finally:
        os.kill(redis.pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            await viewer.close()
        gateway.stop()
        ingest.stop()
        redis.stop()


async def test_a_hung_redis_costs_the_rate_limiter_one_short_wait(
    settings: Settings, names: Names, private_redis: EmbeddedRedis
) -> None:
    """A hung Redis answers nothing and refuses nothing: the first check gives up after 0.2 s,
    and the checks after it pass at once (one probe at a time) until Redis answers again."""
    from app.ingest.metrics import IngestMetrics
    from app.ingest.ratelimit import CHECK_BACKOFF_S, RateLimiter

    shards = RedisShards((private_redis.url,))
    metrics = IngestMetrics(CollectorRegistry())
    limiter = RateLimiter(
        shards, names, settings.with_(rate_site_per_sec=1000, rate_ip_per_min=1000), metrics
    )
    loop = asyncio.get_running_loop()
    try:
        await limiter.check("a.example", "ip", 1)  # healthy: counted in Redis
        os.kill(private_redis.pid, signal.SIGSTOP)
        try:
            began = loop.time()
            await limiter.check("a.example", "ip", 1)
            assert loop.time() - began < 1.5  # bounds, not speed goals: 0.2 s, then none
            began = loop.time()
            await asyncio.gather(*(limiter.check("a.example", "ip", 1) for _ in range(50)))
            assert loop.time() - began < 0.5
            await asyncio.sleep(CHECK_BACKOFF_S)  # the back-off runs out: the point of the test
            await asyncio.gather(*(limiter.check("a.example", "ip", 1) for _ in range(50)))
        finally:
            os.kill(private_redis.pid, signal.SIGCONT)
        await asyncio.sleep(CHECK_BACKOFF_S)  # as above: a timer of the breaker, not a wait
        await limiter.check("a.example", "ip", 1)  # a probe that succeeds closes the breaker
        await limiter.check("a.example", "ip", 1)
        now = int(time.time())
        client = shards.clients[0]
        seconds = (now - 1, now)  # the second may have turned since the check
        assert any([await client.get(names.rate_site("a.example", s)) for s in seconds])
    finally:
        await shards.aclose()


@pytest.mark.slow
async def test_a_resume_postgresql_must_serve_waits_for_it(
    settings: Settings, tmp_path: Path, private_postgres: DisposablePostgres
) -> None:
    """PostgreSQL down, the cursor older than the Redis window: the resume is closed with 4004
    (reconnect later), never started live with the missed events lost. Once PostgreSQL is back
    the same cursor resumes exactly."""
    pg = private_postgres
    site = "pgdown-resume.example.com"
    epoch = await _register(pg, site)
    env = env_for(settings.with_(database_url=pg.dsn), **FAST, SITEWIRE_REPLAY_WINDOW="10")
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    watching = await WsViewer.open(gateway.ws_url, site, token(site))  # the site is now known
    try:
        await post_events(ingest.url, site, 60)
        await watching.wait_for(60)
        await asyncio.to_thread(pg.stop)
        late = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-5")
        assert await late.wait_closed(timeout=20) == 4004
        assert late.events == []
        await asyncio.to_thread(pg.start)
        again = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-5")
        await again.wait_for(55, timeout=20)
        assert again.offsets == list(range(6, 61))
        assert (await again.wait_notice("welcome"))["recovered"] is True
        await again.close()
    finally:
        await watching.close()
        gateway.stop()
        ingest.stop()


@pytest.mark.slow
async def test_viewers_of_a_known_site_are_admitted_while_postgresql_is_down(
    settings: Settings, tmp_path: Path, private_postgres: DisposablePostgres
) -> None:
    """An outside test: once the site registry's cache entry expired (30 s), a gateway whose
    PostgreSQL was down refused every new viewer (4002; SSE 503, which ends an EventSource),
    though operations.md promises resumes inside the Redis window. A site known before the
    outage is served from the cache for as long as the registry cannot be read."""
    pg = private_postgres
    site = "pgdown-known.example.com"
    epoch = await _register(pg, site)
    env = env_for(settings.with_(database_url=pg.dsn), **FAST, SITEWIRE_SITE_CACHE_TTL_S="0.5")
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    watching = await WsViewer.open(gateway.ws_url, site, token(site))  # the site is now known
    viewers: list[WsViewer | SseViewer] = []
    try:
        await post_events(ingest.url, site, 10)
        await watching.wait_for(10)
        await asyncio.to_thread(pg.stop)
        await asyncio.sleep(2.0)  # four times the cache's lifetime
        viewers.append(await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-4"))
        viewers.append(await SseViewer.open(gateway.url, site, token(site), query={"last": "3"}))
        viewers.append(await WsViewer.open(gateway.ws_url, site, token(site)))
        await viewers[0].wait_for(6)
        await viewers[1].wait_for(3)
        assert viewers[0].offsets == list(range(5, 11))
        assert viewers[1].offsets == [8, 9, 10]
        assert (await viewers[2].wait_notice("welcome"))["type"] == "welcome"
        other = "never-seen.example.com"
        unknown = await WsViewer.open(gateway.ws_url, other, token(other))
        assert await unknown.wait_closed(timeout=30) == CloseCode.INTERNAL  # cannot be checked
        await asyncio.to_thread(pg.start)
        await post_events(ingest.url, site, 2, start=10)
        await watching.wait_for(12, timeout=20)
        await viewers[0].wait_for(8)
        await viewers[2].wait_for(2)
        assert viewers[0].offsets == list(range(5, 13)) and viewers[2].offsets == [11, 12]
    finally:
        for viewer in (watching, *viewers):
            await viewer.close()
        gateway.stop()
        ingest.stop()


async def test_sse_last_event_id_wins_over_the_first_urls_start(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    """An EventSource opened with `?minutes=30` reconnects with that URL plus Last-Event-ID:
    the header wins (it was a 400, and the browser gave up). Two starts in the query are
    still refused, as on the WebSocket."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    cursors = await post_events(ingest.url, site, 3)
    url = f"{gateway.url}/v1/sites/{site}/events"
    async with httpx.AsyncClient(timeout=10) as client:
        both = {"token": token(site), "last": "5", "since": cursors[0]}
        refused = await client.get(url, params=both)
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "invalid_request"
        first_url = {"token": token(site), "minutes": "30"}
        resumed = {"Last-Event-ID": cursors[0]}
        async with client.stream("GET", url, params=first_url, headers=resumed) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async with asyncio.timeout(10):
                async for line in lines:
                    if line.startswith("data: ") and '"welcome"' in line:
                        welcome = orjson.loads(line[6:])
                        break
    assert welcome["cursor"] == cursors[0] and welcome["recovered"] is True


async def _register(pg: DisposablePostgres, site: str) -> str:
    """`site` registered on the private PostgreSQL; its epoch."""
    conn = await asyncpg.connect(pg.dsn)
    try:
        await create_site(conn, site)
        epoch: str = await conn.fetchval("SELECT epoch FROM sites WHERE id = $1", site)
        return epoch
    finally:
        await conn.close()


async def _restore(pool: asyncpg.Pool, site: str, to: int) -> None:
    """What restoring PostgreSQL to an earlier point leaves: the site's events after `to`
    gone, their offsets to be handed out again."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM events WHERE site = $1 AND site_offset > $2", site, to)
        await conn.execute("DELETE FROM event_ids WHERE site = $1 AND site_offset > $2", site, to)
        await conn.execute("UPDATE sites SET next_offset = $2 WHERE id = $1", site, to + 1)


async def test_a_busy_site_whose_postgresql_went_back_is_found_and_its_viewers_told(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    """PostgreSQL restored to an earlier point hands the lost events' offsets to new events,
    which gateways took for repeats and dropped, silently. A review found a first fix (the
    gateway's position check) blind to a busy site: its head passed the old one before the
    second check. Ingest's publication now sees the reused offsets in the window at once: the
    viewers are closed with 4006, and a resume from a cursor in the changed range replays the
    new events from where storage went back, saying so."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    epoch = await epoch_of(pool, site)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0")
    fresh: WsViewer | None = None
    again: WsViewer | None = None
    try:
        await post_events(ingest.url, site, 30)
        await viewer.wait_for(30)
        await _restore(pool, site, 20)
        await post_events(ingest.url, site, 15, start=100)  # offsets 21-35: past the old head
        assert await viewer.wait_closed(timeout=15) == CloseCode.STORAGE_BEHIND
        assert viewer.offsets == list(range(1, 31))  # no repeat of an offset, no new one

        again = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-30")
        welcome = await again.wait_notice("welcome")
        assert (welcome["recovered"], welcome["reason"]) == (False, "storage_behind")
        assert welcome["cursor"] == f"{epoch}-20"
        await again.wait_for(15)
        assert again.offsets == list(range(21, 36))
        assert [e["path"] for e in again.events] == [f"/p/{i}" for i in range(100, 115)]

        # From before the restore point: storage's events, whatever the window held.
        fresh = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-18")
        await fresh.wait_for(17)
        assert fresh.offsets == list(range(19, 36))
        paths = [e["path"] for e in fresh.events]
        assert paths == ["/p/18", "/p/19", *(f"/p/{i}" for i in range(100, 115))]
        async with httpx.AsyncClient(timeout=5) as client:
            metrics = (await client.get(f"{gateway.internal_url}/metrics")).text
            found = (await client.get(f"{ingest.internal_url}/metrics")).text
        assert "sitewire_gateway_storage_behind_total 1.0" in metrics
        assert 'sitewire_gateway_closes_total{reason="storage_behind"} 1.0' in metrics
        assert "sitewire_ingest_storage_behind_total 1.0" in found
    finally:
        for v in (viewer, again, fresh):
            if v is not None:
                await v.close()


async def test_a_quiet_site_whose_postgresql_went_back_without_its_window_is_found_too(
    spawn: Callable[..., AppProcess],
    site: str,
    pool: asyncpg.Pool,
    rclient: aioredis.Redis,
    names: Names,
) -> None:
    """With the window gone too (Redis restarted), ingest cannot tell: the gateway's position
    check sees the site's head below what it delivered, twice, and does the same; the resume
    of a cursor beyond the head says `cursor_ahead`."""
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    epoch = await epoch_of(pool, site)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0")
    again: WsViewer | None = None
    try:
        await post_events(ingest.url, site, 30)
        await viewer.wait_for(30)
        await _restore(pool, site, 20)
        await rclient.delete(names.window(site))
        await post_events(ingest.url, site, 5, start=100)  # offsets 21-25, again
        assert await viewer.wait_closed(timeout=15) == CloseCode.STORAGE_BEHIND
        assert viewer.offsets == list(range(1, 31))
        again = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-30")
        welcome = await again.wait_notice("welcome")
        assert (welcome["recovered"], welcome["reason"]) == (False, "cursor_ahead")
        assert welcome["cursor"] == f"{epoch}-25"
        await post_events(ingest.url, site, 5, start=200)
        await again.wait_for(5)
        assert [e["path"] for e in again.events] == [f"/p/{i}" for i in range(200, 205)]
    finally:
        for v in (viewer, again):
            if v is not None:
                await v.close()


async def test_a_reconnect_while_postgresql_is_down_is_checked_before_viewers_are_told(
    settings: Settings, tmp_path: Path, private_postgres: DisposablePostgres
) -> None:
    """An outside test: Redis restarted while PostgreSQL was down, and every viewer was told
    at once that events may be missing (`recovered: false`), though nothing could have been
    committed. The reconnect's catch-up now tries storage again for a while, and viewers are
    told once it could be read. The pub/sub reconnects counter counts the reconnection, not
    each attempt (~40 in one outage paged as "flapping")."""
    pg = private_postgres
    site = "reconnect-pgdown.example.com"
    await _register(pg, site)
    redis = EmbeddedRedis(tmp_path / "redis", persist=False)
    env = env_for(settings.with_(database_url=pg.dsn, redis_url=redis.url), **FAST)
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    viewer = await WsViewer.open(gateway.ws_url, site, token(site))
    try:
        await post_events(ingest.url, site, 5)
        await viewer.wait_for(5)
        await asyncio.to_thread(pg.stop)
        redis.stop()
        await asyncio.sleep(3.0)  # several reconnect attempts
        redis.start()
        await eventually(lambda: _reconnects(gateway) == 1.0, 15, what="one reconnection")
        await asyncio.sleep(1.0)
        assert not [n for n in viewer.notices if n["type"] == "gap"]  # not told anything yet
        await asyncio.to_thread(pg.start)
        gap = await viewer.wait_notice("gap", timeout=15)
        assert gap["recovered"] is True and gap["reason"] == "redis_reconnect"
        assert _metric(gateway, "sitewire_gateway_redis_reconnect_attempts_total") >= 2
        assert _metric(gateway, "sitewire_gateway_unrecovered_gaps_total") == 0
        await post_events(ingest.url, site, 2, start=5)
        await viewer.wait_for(7)
        assert viewer.offsets == list(range(1, 8))
    finally:
        await viewer.close()
        gateway.stop()
        ingest.stop()
        redis.stop()


def _metric(process: AppProcess, name: str) -> float:
    text = httpx.get(f"{process.internal_url}/metrics", timeout=5).text
    found = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(found[0]) if found else 0.0


def _reconnects(process: AppProcess) -> float:
    return _metric(process, "sitewire_gateway_redis_reconnects_total")
