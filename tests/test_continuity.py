"""Viewers never miss an event: resume across disconnects, gateway kills and restarts, Redis
trouble, windows and protocols. Every test counts what was ingested and what each viewer got."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.settings import Settings
from tests.clients import SseViewer, Steady, Watcher, WsViewer, post_batches, post_events
from tests.processes import AppProcess
from tests.support import BROWSER, FAST, cover, env_for, epoch_of, metric, token
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow


async def test_viewer_resumes_on_another_gateway_after_a_disconnect(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST)
    g1, g2 = spawn("gateway", **FAST), spawn("gateway", **FAST)
    epoch = await epoch_of(pool, site)
    first = Watcher.start([g1.ws_url], site, since=f"{epoch}-0")
    await first.wait_welcome()
    steady = Steady(ingest.url, site).start()
    await first.wait_for_offset(20)  # live for a while
    await first.close()  # gone for a while, under steady ingest: 50 events missed at least
    await steady.posted(len(steady.cursors) + 50)
    second = Watcher.start([g2.ws_url], site, since=first.client.cursor or "")
    await second.wait_for_offset(len(steady.cursors) + 20)  # caught up, and live under load
    total = await steady.stop()
    await second.wait_for_offset(total)
    combined = first.offsets + second.offsets
    assert combined == list(range(1, total + 1))  # no loss, no duplicate, in order
    assert second.notices[0]["recovered"] is True
    await second.close()


async def test_gateways_killed_and_restarted_under_load(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST)
    g1, g2, g3 = (spawn("gateway", **FAST) for _ in range(3))
    epoch = await epoch_of(pool, site)
    urls = [g1.ws_url, g2.ws_url, g3.ws_url]
    # Every viewer starts on g1, then moves to g2 (g1 killed), then g3 (g2 drained).
    watchers = [Watcher.start(urls, site, since=f"{epoch}-0") for _ in range(6)]
    for w in watchers:
        await w.wait_welcome()
    steady = Steady(ingest.url, site, rate=150).start()

    async def all_reach(offset: int) -> None:
        for w in watchers:
            await w.wait_for_offset(offset)

    await all_reach(50)  # live on g1
    g1.kill()  # SIGKILL: no close frame, no drain
    await all_reach(len(steady.cursors) + 50)  # moved to g2, and live there
    # SIGTERM: drained with 4000, reconnect elsewhere (off the loop, which the viewers need).
    assert await asyncio.to_thread(g2.stop, 15) == 0
    await all_reach(len(steady.cursors) + 50)  # moved to g3, and live there
    total = await steady.stop()
    for w in watchers:
        await w.wait_for_offset(total)
        assert w.offsets == list(range(1, total + 1))
        assert w.client.connections >= 3
        assert all(n.get("recovered") is not False for n in w.notices)
    for w in watchers:
        await w.close()


async def test_resume_older_than_the_redis_window_comes_from_postgres(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST, SITEWIRE_REPLAY_WINDOW="10")
    gateway = spawn("gateway", **FAST)
    await post_events(ingest.url, site, 60)
    epoch = await epoch_of(pool, site)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-5")
    await viewer.wait_for(55)
    assert viewer.offsets == list(range(6, 61))
    assert viewer.notices[0]["recovered"] is True and viewer.notices[0]["cursor"] == f"{epoch}-5"
    assert (
        await metric(gateway.internal_url, 'sitewire_gateway_replay_reads_total{source="postgres"}')
        > 0
    )
    await post_events(ingest.url, site, 5, start=60)
    await viewer.wait_for(60)  # then live, seamlessly
    assert viewer.offsets == list(range(6, 66))
    # Within the window, the replay comes from Redis.
    recent = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-60")
    await recent.wait_for(5)
    assert recent.offsets == list(range(61, 66))
    assert (
        await metric(gateway.internal_url, 'sitewire_gateway_replay_reads_total{source="redis"}')
        > 0
    )
    await viewer.close()
    await recent.close()


async def test_resume_after_redis_lost_its_data(
    settings: Settings, site: str, tmp_path: Path, pool: asyncpg.Pool, private_redis: EmbeddedRedis
) -> None:
    env = env_for(settings.with_(redis_url=private_redis.url), **FAST)
    ingest = AppProcess("ingest", env, tmp_path).start()
    gateway = AppProcess("gateway", env, tmp_path).start()
    epoch = await epoch_of(pool, site)
    try:
        await post_events(ingest.url, site, 10)
        private_redis.stop()
        await post_events(ingest.url, site, 10, start=10)  # stored, never published
        private_redis.start()  # empty window, epoch of the offsets unchanged (PostgreSQL)
        await asyncio.to_thread(gateway.wait_ready)
        viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-3")
        await viewer.wait_for(17)
        assert viewer.offsets == list(range(4, 21))
        assert viewer.notices[0]["recovered"] is True
        await viewer.close()
    finally:
        gateway.stop()
        ingest.stop()


async def test_sse_resumes_with_last_event_id(spawn: Callable[..., AppProcess], site: str) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    cursors = await post_events(ingest.url, site, 20)
    sse = await SseViewer.open(
        gateway.url, site, token(site), headers={"Last-Event-ID": cursors[11]}
    )
    await sse.wait_for(8)
    assert sse.offsets == list(range(13, 21))
    assert sse.ids == cursors[12:]
    welcome = await sse.wait_notice("welcome")
    assert welcome["recovered"] is True and welcome["cursor"] == cursors[11]
    await sse.close()


async def test_last_n_and_last_minutes_then_live(
    spawn: Callable[..., AppProcess], site: str
) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    await post_events(ingest.url, site, 30)
    last5 = await WsViewer.open(gateway.ws_url, site, token(site), "&last=5")
    recent = await WsViewer.open(gateway.ws_url, site, token(site), "&minutes=5")
    await last5.wait_for(5)
    await recent.wait_for(30)
    await post_events(ingest.url, site, 2, start=30)
    await last5.wait_for(7)
    await recent.wait_for(32)
    assert last5.offsets == list(range(26, 33))
    assert recent.offsets == list(range(1, 33))
    assert last5.notices[0]["recovered"] is None
    bad = await WsViewer.open(gateway.ws_url, site, token(site), "&last=many")
    assert await bad.wait_closed() == 4502
    for v in (last5, recent):
        await v.close()


async def test_incomplete_recovery_is_explicit(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST, SITEWIRE_REPLAY_WINDOW="10")
    gateway = spawn("gateway", **FAST)
    await post_events(ingest.url, site, 40)
    epoch = await epoch_of(pool, site)
    wrong = await WsViewer.open(gateway.ws_url, site, token(site), "&since=00000000-3")
    welcome = await wrong.wait_notice("welcome")
    assert welcome["recovered"] is False and welcome["reason"] == "epoch_changed"
    # Retention removed offsets 1-20: a resume from 5 cannot be complete, and says so.
    await pool.execute("DELETE FROM events WHERE site = $1 AND site_offset <= 20", site)
    expired = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-5")
    welcome = await expired.wait_notice("welcome")
    assert welcome["recovered"] is False and welcome["reason"] == "expired"
    await expired.wait_for(20)
    assert expired.offsets == list(range(21, 41))
    gap = await expired.wait_notice("gap")
    assert gap == {"type": "gap", "after": f"{epoch}-5", "recovered": False}
    for v in (wrong, expired):
        await v.close()


async def test_a_resume_across_a_hole_longer_than_a_page_gets_what_remains(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    """An outside test: retention removed 500 events (more than a replay page, 200) after a
    viewer's cursor, and the resume came back `expired`, a gap notice, and then nothing of the
    100 events still stored. Both transports, and `last=` reaching into the hole, get them."""
    ingest = spawn("ingest", **FAST, SITEWIRE_REPLAY_WINDOW="10")
    gateway = spawn("gateway", **FAST)
    await post_batches(ingest.url, site, 600)
    epoch = await epoch_of(pool, site)
    await pool.execute("DELETE FROM events WHERE site = $1 AND site_offset <= 500", site)
    ws = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-3")
    deep = await WsViewer.open(gateway.ws_url, site, token(site), "&last=400")
    sse = await SseViewer.open(gateway.url, site, token(site), query={"since": f"{epoch}-3"})
    for viewer in (ws, deep, sse):
        await viewer.wait_for(100)
        assert viewer.offsets == list(range(501, 601))
        gap = await viewer.wait_notice("gap")
        assert gap["recovered"] is False and gap["after"] in (f"{epoch}-3", f"{epoch}-200")
        await viewer.close()


async def test_replay_is_paged_within_the_viewer_queue(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST, SITEWIRE_REPLAY_WINDOW="10")
    gateway = spawn("gateway", **FAST, SITEWIRE_VIEWER_QUEUE_BYTES=str(64 * 1024))
    async with httpx.AsyncClient(headers={"User-Agent": BROWSER}, timeout=30) as client:
        for batch in range(30):
            events = [
                {"site": site, "name": "pageview", "url": f"https://{site}/{batch}/{i}"}
                for i in range(100)
            ]
            r = await client.post(f"{ingest.url}/api/events", json=events)
            assert r.status_code == 202
    epoch = await epoch_of(pool, site)
    # 3,000 events (~1 MB) replayed through a 64 KiB queue: paged, never closed as slow.
    viewer = await WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0")
    await viewer.wait_for(3000, timeout=30)
    assert viewer.offsets == list(range(1, 3001))
    assert viewer.close_code is None
    assert (
        await metric(gateway.internal_url, 'sitewire_gateway_closes_total{reason="slow_consumer"}')
        == 0
    )
    await viewer.close()


async def test_reconnect_storm_shares_postgres_reads(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST, SITEWIRE_REPLAY_WINDOW="10")
    gateway = spawn("gateway", **FAST)
    await post_events(ingest.url, site, 300)
    epoch = await epoch_of(pool, site)
    viewers = await asyncio.gather(
        *(WsViewer.open(gateway.ws_url, site, token(site), f"&since={epoch}-0") for _ in range(40))
    )
    for v in viewers:
        await v.wait_for(300)
        assert v.offsets == list(range(1, 301))
    reads = await metric(
        gateway.internal_url, 'sitewire_gateway_replay_reads_total{source="postgres"}'
    )
    shared = await metric(
        gateway.internal_url, 'sitewire_gateway_replay_reads_total{source="shared"}'
    )
    # 40 viewers x 2 pages each would be 80 reads without sharing.
    assert shared > 0 and reads < 80, (reads, shared)
    for v in viewers:
        await v.close()


async def test_history_pages_by_cursor_and_time(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool
) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    cursors = await post_events(ingest.url, site, 25)
    url = f"{gateway.url}/v1/sites/{site}/history"
    async with httpx.AsyncClient() as client:
        seen: list[int] = []
        params: dict[str, str] = {"token": token(site), "limit": "10"}
        while True:
            page = (await client.get(url, params=params)).json()
            seen += [e["offset"] for e in page["events"]]
            if page["next"] is None:
                break
            params["after"] = page["next"]
        assert seen == list(range(1, 26))
        ts = (await client.get(url, params={"token": token(site), "after": cursors[19]})).json()
        when = ts["events"][0]["ts"]
        by_time = (await client.get(url, params={"token": token(site), "from": when})).json()
        assert by_time["events"][0]["offset"] <= 21 and by_time["events"][-1]["offset"] == 25
        header = await client.get(url, headers={"Authorization": f"Bearer {token(site)}"})
        assert header.status_code == 200 and len(header.json()["events"]) == 25
        assert (await client.get(url)).status_code == 401
        other = await client.get(url, params={"token": token("other.example.com")})
        assert other.status_code == 401
        bad = await client.get(url, params={"token": token(site), "limit": "0"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "limit"
        bad = await client.get(url, params={"token": token(site), "after": "nope"})
        assert bad.status_code == 400
        both = await client.get(
            url, params={"token": token(site), "after": cursors[3], "from": when}
        )
        assert both.status_code == 400 and both.json()["error"]["field"] == "from"
        # Each parameter once, as on the streams (an outside test: the last of two won).
        for name, value in (("token", token(site)), ("after", cursors[3]), ("limit", "5")):
            twice = await client.get(f"{url}?token={token(site)}&{name}={value}&{name}={value}")
            assert twice.status_code == 400 and twice.json()["error"]["field"] == name
        # A client's mistake is a 400 naming the parameter, never storage's 503 (an outside
        # test: a time past year 9999 in UTC was answered "history is unavailable").
        for name, value in (
            ("to", "9999-12-31T23:59:59-14:00"),
            ("from", "0001-01-01T00:00:00+14:00"),
            ("limit", "+5"),
            ("limit", "1_0"),
            ("limit", "\u0663"),  # an Arabic-Indic 3, which int() takes
        ):
            wrong = await client.get(url, params={"token": token(site), name: value})
            assert wrong.status_code == 400, (name, value, wrong.text)
            assert wrong.json()["error"]["field"] == name
        # Two Last-Event-ID headers on the SSE stream: refused, as two Authorization are.
        stream = f"{gateway.url}/v1/sites/{site}/events?token={token(site)}"
        two = [("Last-Event-ID", cursors[1]), ("Last-Event-ID", cursors[2])]
        refused = await client.get(stream, headers=two)
        assert refused.status_code == 400
        assert refused.json()["error"]["field"] == "last-event-id"


async def test_history_page_is_indexed_on_a_big_site(pool: asyncpg.Pool, site: str) -> None:
    """Read by offset through every monthly partition's primary key, merged in offset order:
    a page costs the same on any size of site, and no sort or scan of a partition."""
    await cover(pool, datetime.now(UTC) - timedelta(seconds=300000), datetime.now(UTC))
    await pool.execute(
        """INSERT INTO events (site, site_offset, event_id, name, url, path, visitor_id, device, ts)
           SELECT $1, g, gen_random_uuid(), 'pageview', 'https://x/', '/', 0, 'desktop',
                  now() - interval '1 second' * (300000 - g)
           FROM generate_series(1, 300000) AS g""",
        site,
    )
    await pool.execute("ANALYZE events")
    from app.store.reads import EVENTS_AFTER_SQL, from_postgres

    plan = "\n".join(
        r[0]
        for r in await pool.fetch("EXPLAIN " + EVENTS_AFTER_SQL, site, 150000, 2**62, None, 100)
    )
    assert re.search(r"Index Scan using events_\w+_pkey", plan), plan
    assert "Sort  (" not in plan and "Seq Scan" not in plan, plan
    page = await from_postgres(pool, site, "e", 250000, 100)
    assert [o for o, _ in page] == list(range(250001, 250101))
    await pool.execute("DELETE FROM events WHERE site = $1", site)


async def _lose_one_publication(pool: asyncpg.Pool, rclient: Any, names: Any, site: str) -> int:
    """Store an event and put it in the window, but never PUBLISH it: what Redis pub/sub does
    silently to a subscriber across a reconnect."""
    from app.store.reads import encode_row

    epoch = await epoch_of(pool, site)
    async with pool.acquire() as conn, conn.transaction():
        offset = await conn.fetchval(
            "UPDATE sites SET next_offset = next_offset + 1 WHERE id = $1 "
            "RETURNING next_offset - 1",
            site,
        )
        row = await conn.fetchrow(
            """INSERT INTO events (site, site_offset, event_id, name, url, path, visitor_id,
                                   device, ts)
               VALUES ($1, $2, gen_random_uuid(), 'lost', 'https://x/', '/', 0, 'desktop', now())
               RETURNING *""",
            site,
            offset,
        )
    await rclient.zadd(names.window(site), {encode_row(epoch, row): offset})
    return int(offset)


async def test_a_silently_lost_publication_is_repaired(
    spawn: Callable[..., AppProcess], site: str, pool: asyncpg.Pool, rclient: Any, names: Any
) -> None:
    ingest = spawn("ingest", **FAST)
    gateway = spawn("gateway", **FAST)
    viewer = await WsViewer.open(gateway.ws_url, site, token(site))
    await viewer.wait_notice("welcome")
    await post_events(ingest.url, site, 2)
    lost = await _lose_one_publication(pool, rclient, names, site)
    await post_events(ingest.url, site, 2, start=3)  # offset 4 reveals that 3 never came
    await viewer.wait_for(5)
    assert lost == 3 and viewer.offsets == [1, 2, 3, 4, 5]
    assert viewer.events[2]["name"] == "lost"
    # A lost *last* publication has no successor to reveal it: the position check finds it.
    await _lose_one_publication(pool, rclient, names, site)
    await viewer.wait_for(6, timeout=10)
    assert viewer.offsets == [1, 2, 3, 4, 5, 6]
    assert [n["type"] for n in viewer.notices] == ["welcome"]  # repaired, nothing to report
    await viewer.close()
