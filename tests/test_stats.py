"""Live aggregates (#18): counted from the stream by every gateway alike, equal to a SQL
recomputation over the events table, pushed as `stats` frames, and apart from the fan-out."""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client import CollectorRegistry

from app.broker.memory import MemoryBroker
from app.gateway import aggregates
from app.gateway import analytics as analytics_module
from app.gateway.aggregates import SiteStats
from app.gateway.analytics import Analytics, StatsBusy
from app.gateway.feed import Feeds
from app.gateway.hub import EVENT, Hub, Viewer
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from app.gateway.replay import Replayer, StartRequest
from app.settings import Settings
from app.store.sites import get_site
from app.store.writes import commit
from tests.clients import SseViewer, WsViewer
from tests.processes import AppProcess
from tests.support import FAST, eventually, new, token

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
)
CHROME_MAC = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
)
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0"
#: Senders: (IP seen through the trusted proxy, User-Agent). The IPs have known countries.
SENDERS = [
    ("81.2.69.160", IPHONE),  # GB
    ("8.8.8.8", CHROME_MAC),  # US
    ("2a00:1450:4001:80b::200e", FIREFOX),  # DE
    ("81.2.69.161", CHROME_MAC),  # GB
    ("8.8.4.4", IPHONE),  # US
]


def mix(site: str) -> list[tuple[int, dict[str, Any]]]:
    """A known mix: (sender index, event) pairs; pageviews, sources, goals with props."""
    events: list[tuple[int, dict[str, Any]]] = []
    for i in range(60):
        sender = i % len(SENDERS)
        path = ["/", "/pricing", "/docs", "/blog/launch"][i % 4]
        url = f"https://{site}{path}" + ("?utm_source=Newsletter" if i % 7 == 0 else "")
        # The last: a link between the site's own pages, which is no source.
        referrers = [None, "https://news.ycombinator.com/", "https://www.google.com/"]
        referrer = [*referrers, f"https://www.{site}/"][i % 4 if i % 5 == 0 else i % 3]
        events.append((sender, {"site": site, "name": "pageview", "url": url,
                                "referrer": referrer}))  # fmt: skip
        if i % 6 == 0:
            props = {"plan": ["pro", "team"][i % 2 == 0 and i % 12 == 0], "seats": i % 3}
            events.append((sender, {"site": site, "name": "Signup", "url": url, "props": props}))
    return events


async def post_mix(ingest: str, site: str) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        for sender, body in mix(site):
            ip, agent = SENDERS[sender]
            headers = {"User-Agent": agent, "X-Forwarded-For": ip}
            r = await client.post(f"{ingest}/api/event", json=body, headers=headers)
            assert r.status_code == 202, r.text
    return len(mix(site))


def source(row: asyncpg.Record) -> str | None:
    utm = parse_qs(urlsplit(row["url"]).query).get("utm_source")
    if utm:
        return str(utm[0].lower())
    if row["referrer"] and urlsplit(row["referrer"]).hostname in (
        row["site"],
        f"www.{row['site']}",
    ):
        return None  # a move between the site's own pages
    return str(row["referrer_host"] or "(direct)")


async def recomputed(
    pool: asyncpg.Pool, site: str, filters: dict[str, str] | None = None
) -> dict[str, Any]:
    """The same aggregates, recomputed with SQL over the events table (of the events whose
    path, source or country equal `filters`)."""
    since = datetime.now(UTC) - timedelta(minutes=29)
    since = since.replace(second=0, microsecond=0)
    rows = await pool.fetch(
        "SELECT * FROM events WHERE site = $1 AND ts >= $2 ORDER BY site_offset", site, since
    )
    labels = {"page": lambda r: r["path"], "source": source, "country": lambda r: r["country"]}
    for name, value in (filters or {}).items():
        rows = [r for r in rows if labels[name](r) == value]
    views = [r for r in rows if r["name"] == "pageview"]

    def top(values: list[Any]) -> list[dict[str, Any]]:
        counts = Counter(v if v is not None else "(unknown)" for v in values)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        return [{"value": v, "count": n} for v, n in ranked]

    goals = Counter(r["name"] for r in rows if r["name"] != "pageview")
    return {
        "sources": top([s for s in map(source, views) if s is not None]),
        "events": len(rows),
        "pageviews": len(views),
        "visitors": len({r["visitor_id"] for r in rows}),
        "pages": top([r["path"] for r in views]),
        "countries": top([r["country"] for r in views]),
        "devices": top([r["device"] for r in views]),
        "browsers": top([r["browser"] for r in views]),
        "os": top([r["os"] for r in views]),
        "goals": {name: n for name, n in goals.items()},
    }


def comparable(stats: dict[str, Any]) -> dict[str, Any]:
    keep = ("events", "pageviews", "visitors", "pages", "sources", "countries", "devices")
    keep += ("browsers", "os")
    return {
        **{k: stats[k] for k in keep},
        "goals": {g["value"]: g["count"] for g in stats["goals"]},
    }


@pytest.fixture
def stack(
    spawn: Callable[..., AppProcess], settings: Settings
) -> tuple[AppProcess, AppProcess, AppProcess]:
    proxied = {**FAST, "SITEWIRE_TRUSTED_PROXIES": "127.0.0.1,::1"}
    ingest = spawn("ingest", **proxied)
    return ingest, spawn("gateway", **FAST), spawn("gateway", **FAST)


async def get_stats(
    gateway: AppProcess, site: str, filters: dict[str, str] | None = None
) -> dict[str, Any]:
    params = {"token": token(site), **(filters or {})}
    async with httpx.AsyncClient(timeout=15) as client:
        r = await client.get(f"{gateway.url}/v1/sites/{site}/stats", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body: dict[str, Any] = r.json()
    return body


async def test_stats_equal_a_sql_recomputation_on_every_gateway(
    stack: tuple[AppProcess, AppProcess, AppProcess], pool: asyncpg.Pool, site: str
) -> None:
    ingest, g1, g2 = stack
    first = await get_stats(g1, site)  # watched from now on: counted from the stream
    assert first["events"] == 0 and len(first["per_minute"]) == 30
    count = await post_mix(ingest.url, site)
    expected = await recomputed(pool, site)
    assert expected["events"] == count

    async def settled(gateway: AppProcess) -> dict[str, Any]:
        return await eventually(
            lambda: _at_offset(gateway, site, count), timeout=10, what="stats caught up"
        )

    s1, s2 = await settled(g1), await settled(g2)  # g2: counted from storage on first ask
    assert comparable(s1) == expected
    assert comparable(s2) == expected
    assert s1["visitors_now"] == expected["visitors"] == len(SENDERS)
    assert sum(m["events"] for m in s1["per_minute"]) == count
    assert {"value": "newsletter", "count": 9} in s1["sources"]  # utm_source wins
    [signup] = s1["goals"]
    plans = {p["value"]: p["count"] for p in signup["props"]["plan"]}
    assert sum(plans.values()) == 10 and set(plans) == {"pro", "team"}
    assert s1["complete"] is True and s1["site"] == site


async def _at_offset(
    gateway: AppProcess, site: str, offset: int, filters: dict[str, str] | None = None
) -> dict[str, Any] | None:
    body = await get_stats(gateway, site, filters)
    return body if body["offset"] == offset else None


async def test_filtered_stats_equal_a_filtered_sql_recomputation(
    stack: tuple[AppProcess, AppProcess, AppProcess], pool: asyncpg.Pool, site: str
) -> None:
    """Click a page, a source or a country: the panels count only the matching events, on the
    stream and in `GET /stats`, the same on every gateway."""
    ingest, g1, g2 = stack
    pricing = {"page": "/pricing"}
    watching = await WsViewer.open(g1.ws_url, site, token(site), "&stats=only&page=%2Fpricing")
    try:
        count = await post_mix(ingest.url, site)
        for filters in (pricing, {"country": "GB", "source": "(direct)"}, {"page": "/nowhere"}):
            expected = await recomputed(pool, site, filters)
            for gateway in (g1, g2):
                body = await eventually(
                    lambda g=gateway, f=filters: _at_offset(g, site, count, f),  # type: ignore[misc]
                    timeout=10,
                    what=f"stats of {filters}",
                )
                assert comparable(body) == expected and body["filters"] == filters
        assert expected["events"] == 0  # /nowhere: nothing matches, every offset counted
        frame = await eventually(
            lambda: [f for f in _stats_frames(watching) if f["offset"] == count],
            timeout=10,
            what="filtered stats frame",
        )
        assert comparable(frame[-1]) == await recomputed(pool, site, pricing)
        assert frame[-1]["filters"] == pricing and frame[-1]["pages"][0]["value"] == "/pricing"
    finally:
        await watching.close()


async def test_stats_frames_on_the_stream_and_stats_only(
    stack: tuple[AppProcess, AppProcess, AppProcess], site: str
) -> None:
    ingest, g1, _ = stack
    both = await WsViewer.open(g1.ws_url, site, token(site), "&stats=1")
    only = await WsViewer.open(g1.ws_url, site, token(site), "&stats=only")
    sse = await SseViewer.open(g1.url, site, token(site), query={"stats": "only"})
    try:
        for viewer in (both, only, sse):
            await eventually(lambda v=viewer: _stats_frames(v), timeout=10, what="first stats")
        assert only.notices[0]["type"] == "welcome" and only.notices[0]["stats"] == "only"
        await post_mix(ingest.url, site)
        count = len(mix(site))
        for viewer in (both, only, sse):
            await eventually(
                lambda v=viewer: _stats_frames(v) and _stats_frames(v)[-1]["offset"] == count,
                timeout=10,
                what="stats frame with every event",
            )
        assert len(both.events) == count  # stats beside the events
        assert only.events == [] and sse.events == []  # stats only: one frame a second at most
        frames = _stats_frames(only)
        assert len(frames) <= 12  # pushed at most once a second, not once per event
    finally:
        for viewer in (both, only, sse):
            await viewer.close()


def _stats_frames(viewer: WsViewer | SseViewer) -> list[dict[str, Any]]:
    return [n["stats"] for n in viewer.notices if n.get("type") == "stats"]


async def test_stats_survive_a_gateway_restart(
    stack: tuple[AppProcess, AppProcess, AppProcess], site: str
) -> None:
    ingest, g1, _ = stack
    count = await post_mix(ingest.url, site)
    before = await eventually(lambda: _at_offset(g1, site, count), timeout=10, what="counted")
    g1.stop()
    again = g1.restarted()
    try:
        after = await eventually(
            lambda: _at_offset(again, site, count), timeout=10, what="recounted"
        )
    finally:
        again.stop()
    assert comparable(after) == comparable(before)


async def test_a_draining_gateway_sends_stats_only_viewers_elsewhere(
    stack: tuple[AppProcess, AppProcess, AppProcess], site: str
) -> None:
    """Stats-only viewers are not in the hub, so the drain reaches them through the stats
    service: 4000, like every other viewer, not the 1012 of a gateway that just stopped."""
    _, g1, _ = stack
    only = await WsViewer.open(g1.ws_url, site, token(site), "&stats=only")
    try:
        await eventually(lambda: _stats_frames(only), timeout=10, what="first stats")
        g1.signal(signal.SIGTERM)
        assert await only.wait_closed() == 4000
    finally:
        await only.close()


async def test_a_bad_stats_parameter_is_refused(
    stack: tuple[AppProcess, AppProcess, AppProcess], site: str
) -> None:
    _, g1, _ = stack
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"{g1.url}/v1/sites/{site}/events", params={"token": token(site), "stats": "yes"}
        )
    assert r.status_code == 400 and r.json()["error"]["field"] == "stats"
    ws = await WsViewer.open(g1.ws_url, site, token(site), "&stats=yes")
    assert await ws.wait_closed() == 4502
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"{g1.url}/v1/sites/{site}/stats", params={"token": token(site), "country": ""}
        )
    assert r.status_code == 400 and r.json()["error"]["field"] == "country"


def test_site_stats_count_a_known_mix() -> None:
    stats = SiteStats()
    now = datetime(2026, 11, 29, 12, 30, 10, tzinfo=UTC)

    def event(offset: int, ago: int, visitor: str, name: str = "pageview", **f: Any) -> None:
        ts = (now - timedelta(minutes=ago)).isoformat().replace("+00:00", "Z")
        stats.add({"ts": ts, "visitor": visitor, "name": name, "path": "/", **f}, offset)

    event(1, 40, "old")  # outside the window: not counted
    event(2, 20, "a", path="/a", country="GB")
    event(3, 3, "a", path="/b", country="GB")  # a's second pageview: /a was its entry
    event(4, 1, "b", path="/b", referrer_host="news.ycombinator.com")
    # b's next page, by a link on the site: no source ("referrer_host" is null: ingest drops it)
    event(5, 1, "b", path="/c", referrer="https://example.com/b")
    event(6, 0, "b", name="Signup", props={"plan": "pro"})
    event(6, 0, "b", name="Signup", props={"plan": "pro"})  # the same offset again: ignored
    body = stats.snapshot(now)
    assert (body["events"], body["pageviews"], body["visitors"], body["visitors_now"]) == (
        5,
        4,
        2,
        2,
    )
    assert body["entry_pages"] == [{"value": "/a", "count": 1}, {"value": "/b", "count": 1}]
    assert body["pages"] == [
        {"value": "/b", "count": 2},
        {"value": "/a", "count": 1},
        {"value": "/c", "count": 1},
    ]
    assert body["sources"] == [  # the move to /c is in none
        {"value": "(direct)", "count": 2},
        {"value": "news.ycombinator.com", "count": 1},
    ]
    # A source filter never matches it; "(direct)" means no referrer at all.
    direct = SiteStats(filters=(("source", "(direct)"),))
    for offset, ev in enumerate(
        [{"path": "/b", "referrer": "https://example.com/"}, {"path": "/"}], 1
    ):
        direct.add({"ts": "2026-11-29T12:30:00Z", "visitor": "c", "name": "pageview", **ev}, offset)
    assert direct.snapshot(now)["pages"] == [{"value": "/", "count": 1}]
    assert body["goals"] == [
        {"value": "Signup", "count": 1, "props": {"plan": [{"value": "pro", "count": 1}]}}
    ]
    assert body["per_minute"][-1] == {
        "minute": "2026-11-29T12:30:00Z",
        "visitors": 1,
        "pageviews": 0,
        "events": 1,
    }
    assert stats.snapshot(now + timedelta(minutes=10))["visitors_now"] == 0


def test_goal_props_are_bounded_and_the_most_used_come_first() -> None:
    """A test from outside: one visitor's 130 events of one goal, each with 30 new props of
    ~280 bytes, made every stats frame 1.2 MB and every stats viewer a slow consumer; spread
    over 30 minutes, a snapshot took 1.3 s. Props are now counted up to MAX_PROP_ENTRIES a
    minute, MAX_GOAL_PROPS per goal, and a goal shows its TOP props."""
    stats = SiteStats()
    now = datetime(2026, 11, 29, 12, 30, 10, tzinfo=UTC)
    ts = now.isoformat().replace("+00:00", "Z")
    offset = 0

    def goal(props: dict[str, Any], name: str = "Signup") -> None:
        nonlocal offset
        offset += 1
        stats.add({"ts": ts, "visitor": "v", "name": name, "path": "/", "props": props}, offset)

    for _ in range(3):
        goal({"plan": "pro", "seats": 5})
    goal({"plan": "free"})
    for i in range(600):  # 18,000 new props of 280 characters: MAX_GOAL_PROPS are counted
        goal({f"{i}-{j}-{'k' * 270}": "v" * 300 for j in range(30)})
    for i in range(40):  # other goals' props, until the minute's budget is spent
        goal({f"{i}-{j}": "v" for j in range(30)}, name=f"Other{i}")
    goal({"plan": "team", "seats": 9})  # past the budget: a new value of a counted prop
    body = stats.snapshot(now)
    signup = body["goals"][0]
    assert signup["value"] == "Signup" and signup["count"] == 605
    props = signup["props"]
    assert list(props)[:2] == ["plan", "seats"] and len(props) == aggregates.TOP
    assert props["plan"] == [
        {"value": "pro", "count": 3},
        {"value": "(other)", "count": 1},
        {"value": "free", "count": 1},
    ]
    assert all(len(name) <= aggregates.PROP_VALUE_CHARS for name in props)
    assert len(orjson.dumps(body)) < 60_000
    minute = next(iter(stats._minutes.values()))
    assert minute.prop_entries == aggregates.MAX_PROP_ENTRIES
    assert len(minute.goal_props["Signup"]) == aggregates.MAX_GOAL_PROPS
    # A goal counted as "(other)" (past MAX_VALUES names in a minute) keeps no props.
    for i in range(aggregates.MAX_VALUES + 5):
        goal({"x": "y"}, name=f"g{i}")
    assert len(minute.goal_props) <= aggregates.MAX_VALUES


def test_filtered_site_stats_count_only_the_matching_events() -> None:
    stats = SiteStats(filters=(("page", "/a"), ("country", "GB")))
    now = datetime(2026, 11, 29, 12, 30, 10, tzinfo=UTC)
    ts = now.isoformat().replace("+00:00", "Z")
    rows = [("/a", "GB", "pageview"), ("/a", "US", "pageview"), ("/b", "GB", "pageview")]
    rows += [("/a", "GB", "Signup"), ("/a", None, "pageview")]
    for offset, (path, country, name) in enumerate(rows, start=1):
        event = {"ts": ts, "visitor": str(offset), "name": name, "path": path}
        stats.add({**event, "country": country}, offset)
    body = stats.snapshot(now)
    assert (body["events"], body["pageviews"], body["visitors"]) == (2, 1, 2)
    assert body["offset"] == 5  # every event moves the offset, matched or not
    assert body["filters"] == {"page": "/a", "country": "GB"}
    assert body["countries"] == [{"value": "GB", "count": 1}]


@dataclasses.dataclass
class Gateway:
    feeds: Feeds
    broker: MemoryBroker
    replayer: Replayer


@pytest.fixture
async def gateway(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Gateway]:
    """A gateway's feed on the in-process broker: no Redis, real PostgreSQL."""
    metrics = GatewayMetrics(CollectorRegistry())
    broker = MemoryBroker()
    replayer = Replayer(broker, pool, metrics)
    quick = dataclasses.replace(settings, unsubscribe_delay_s=0.0)
    feeds = Feeds(Hub(), quick, broker, pool, metrics, DeliveryStats(metrics), replayer)
    feeds.start()
    yield Gateway(feeds, broker, replayer)
    await feeds.close()


async def test_a_failure_in_counting_stops_the_stats_not_the_stream(
    gateway: Gateway, pool: asyncpg.Pool, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting runs apart from the fan-out: a bug in it ends that site's statistics, and
    viewers of the site go on receiving every event."""
    feeds = gateway.feeds
    analytics = Analytics(feeds, gateway.replayer, 1 << 20)
    analytics.start()
    found = await get_site(pool, site)
    assert found is not None
    viewer = Viewer(site, found.epoch, 1 << 20, lambda: None)
    await feeds.admit(viewer, StartRequest())
    viewer.go_live()
    try:
        await analytics.body(found)

        def broken(self: SiteStats, event: dict[str, Any], offset: int) -> None:
            raise RuntimeError("a bug in counting")

        monkeypatch.setattr(SiteStats, "add", broken)
        stored = await commit(pool, [new(site, n=i) for i in range(3)])
        publications = [(site, s.offset, s.payload) for s in stored if s and s.payload]
        await gateway.broker.publish(publications)  # as ingest would
        seen: list[int] = []

        def delivered() -> bool:
            seen.extend(offset for kind, offset, _ in viewer.take() if kind == EVENT)
            return len(seen) == 3

        await eventually(delivered, timeout=5, what="events reached the viewer")
        with pytest.raises(Exception, match="failed"):
            await analytics.body(found)
    finally:
        await analytics.close()
        feeds.leave(viewer)


async def test_filtered_stats_are_bounded_per_gateway(
    gateway: Gateway, pool: asyncpg.Pool, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_FILTERED filtered watches: an unused one makes room, one that a viewer
    subscribes to does not, and then a new filter is refused (busy) until one is free."""
    monkeypatch.setattr(analytics_module, "MAX_FILTERED", 1)
    analytics = Analytics(gateway.feeds, gateway.replayer, 1 << 20)
    analytics.start()
    found = await get_site(pool, site)
    assert found is not None
    a, b = (("page", "/a"),), (("page", "/b"),)
    viewer = Viewer(site, found.epoch, 1 << 20, lambda: None)
    try:
        assert (await analytics.body(found, a))["filters"] == {"page": "/a"}
        assert (await analytics.body(found, b))["filters"] == {"page": "/b"}  # /a made room
        analytics.subscribe(found, viewer, b)
        with pytest.raises(StatsBusy):
            await analytics.body(found, a)
        with pytest.raises(StatsBusy):
            analytics.check_room(found, a)
        analytics.check_room(found, b)  # the one in use is served
        assert (await analytics.body(found))["filters"] == {}  # unfiltered: never bounded here
    finally:
        await analytics.close()


async def test_new_filters_are_paced(
    gateway: Gateway, pool: asyncpg.Pool, site: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each new filter reads 30 minutes from storage: a client cycling through filters gets
    `busy` past the burst, while filters already counted keep answering."""
    monkeypatch.setattr(analytics_module, "NEW_FILTERED_BURST", 2.0)
    monkeypatch.setattr(analytics_module, "NEW_FILTERED_PER_S", 0.01)
    analytics = Analytics(gateway.feeds, gateway.replayer, 1 << 20)
    analytics.start()
    found = await get_site(pool, site)
    assert found is not None
    try:
        await analytics.body(found, (("page", "/1"),))
        await analytics.body(found, (("page", "/2"),))
        with pytest.raises(StatsBusy):
            await analytics.body(found, (("page", "/3"),))
        await analytics.body(found, (("page", "/1"),))  # already counted: served
    finally:
        await analytics.close()
