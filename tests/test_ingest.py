"""Ingest against real PostgreSQL and Redis (the app in-process, over ASGI)."""

from __future__ import annotations

import asyncio
import gzip
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from app.ingest.app import DROPPED_HEADER, create_app
from app.names import Names
from app.settings import Settings
from app.store.sites import create_site
from tests.support import BROWSER, event

CLIENT_IP = "203.0.113.7"

Ingest = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_ingest(settings: Settings) -> AsyncIterator[Ingest]:
    """make_ingest(**settings_changes) -> an httpx client talking to a live in-process app."""
    stack: list[Any] = []

    async def make(**changes: Any) -> httpx.AsyncClient:
        app = create_app(settings.with_(**changes))
        lifespan = app.api.router.lifespan_context(app.api)
        await lifespan.__aenter__()
        transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40000))
        client = httpx.AsyncClient(
            transport=transport, base_url="http://ingest", headers={"User-Agent": BROWSER}
        )
        # The internal listener's app (metrics), as `sitewire ingest --internal-port` serves it.
        internal = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app.internal), base_url="http://internal"
        )
        INTERNAL[client] = internal
        stack.append((lifespan, client))
        stack.append((None, internal))
        return client

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)


#: Each test client's client of the same app's internal listener.
INTERNAL: dict[httpx.AsyncClient, httpx.AsyncClient] = {}


async def metrics_text(ingest: httpx.AsyncClient) -> str:
    return (await INTERNAL[ingest].get("/metrics")).text


@pytest.fixture
async def ingest(make_ingest: Ingest) -> httpx.AsyncClient:
    return await make_ingest()


async def rows(pool: asyncpg.Pool, site: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM events WHERE site = $1 ORDER BY site_offset", site)


async def window(rclient: aioredis.Redis, names: Names, site: str) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in await rclient.zrange(names.window(site), 0, -1)]


async def test_accepts_stores_and_publishes(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    pubsub = rclient.pubsub()
    await pubsub.subscribe(names.channel(site))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    r = await ingest.post(
        "/api/event",
        content=orjson.dumps(event(site, referrer="https://news.ycombinator.com/", props={"a": 1})),
        headers={"Content-Type": "text/plain"},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["ok"] is True and body["duplicate"] is False
    uuid.UUID(body["id"])  # the server minted a UUID (v7)
    assert uuid.UUID(body["id"]).version == 7
    [row] = await rows(pool, site)
    assert row["site_offset"] == 1 and str(row["event_id"]) == body["id"]
    assert row["referrer_host"] == "news.ycombinator.com" and row["device"] == "desktop"
    assert CLIENT_IP not in str(dict(row))  # the raw IP is never stored
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None
    published = orjson.loads(message["data"])
    assert published["cursor"] == body["cursor"] and published["offset"] == 1
    assert CLIENT_IP not in message["data"].decode()
    assert await window(rclient, names, site) == [published]
    await pubsub.aclose()


async def test_retry_is_stored_once(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    e = event(site, id=str(uuid.uuid4()))
    first = await ingest.post("/api/event", json=e)
    second = await ingest.post("/api/event", json=e)
    assert first.status_code == second.status_code == 202
    assert first.json()["duplicate"] is False and second.json()["duplicate"] is True
    assert first.json()["cursor"] == second.json()["cursor"]
    batch = await ingest.post("/api/events", json=[e, e, event(site)])
    assert [r.get("duplicate") for r in batch.json()["results"]] == [True, True, False]
    assert len(await rows(pool, site)) == 2
    assert [w["offset"] for w in await window(rclient, names, site)] == [1, 2]


async def test_batch_has_a_result_per_item_and_bad_items_do_not_poison_it(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    items = [
        event(site),
        {"site": site, "name": 5, "url": "https://x/"},
        event("unknown-site.example"),
        "not an object",
        event(site, props={"plan": "pro"}),
    ]
    r = await ingest.post("/api/events", json=items)
    assert r.status_code == 202
    results = r.json()["results"]
    assert [x["status"] for x in results] == [202, 400, 404, 400, 202]
    # A success is the single endpoint's success object plus its status (docs/ingest.md).
    assert set(results[0]) == {"status", "ok", "id", "cursor", "duplicate"} and results[0]["ok"]
    assert results[1]["error"] == {
        "code": "invalid_event",
        "message": "name is required and must be a non-empty string",
        "field": "name",
    }
    assert results[2]["error"]["code"] == "unknown_site"
    stored = await rows(pool, site)
    assert [r["site_offset"] for r in stored] == [1, 2]
    assert orjson.loads(stored[1]["props"]) == {"plan": "pro"}


async def test_one_per_event_size_limit_on_both_endpoints(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    """An event over SITEWIRE_MAX_EVENT_BYTES (16 KiB) is 413 alone and 413 in a batch (it
    was stored from a batch), and nothing of it is stored."""
    big = event(site, props={f"k{i}": "x" * 2000 for i in range(10)})  # ~20 KB
    assert (await ingest.post("/api/event", json=big)).status_code == 413
    r = await ingest.post("/api/events", json=[big, event(site)])
    assert [x["status"] for x in r.json()["results"]] == [413, 202]
    assert r.json()["results"][0]["error"]["code"] == "too_large"
    assert [row["site_offset"] for row in await rows(pool, site)] == [1]


async def test_group_commit_shares_transactions(ingest: httpx.AsyncClient, site: str) -> None:
    n = 200
    responses = await asyncio.gather(
        *(ingest.post("/api/event", json=event(site)) for _ in range(n))
    )
    assert all(r.status_code == 202 for r in responses)
    offsets = sorted(int(r.json()["cursor"].split("-")[1]) for r in responses)
    assert offsets == list(range(1, n + 1))
    metrics = await metrics_text(ingest)
    commits = _metric(metrics, "sitewire_ingest_commit_batch_events_count")
    assert commits < n / 4, f"{commits} commits for {n} concurrent requests"
    assert _metric(metrics, "sitewire_ingest_accepted_events_total") == n


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


@pytest.mark.parametrize(
    ("path", "content", "content_type", "status", "code"),
    [
        ("/api/event", b'{"site": "x', "application/json", 400, "invalid_json"),
        ("/api/event", b'{"site": 1}', "application/json", 400, "invalid_event"),
        ("/api/event", b"[]", "application/json", 400, "invalid_event"),
        ("/api/event", b"x" * 20_000, "application/json", 413, "too_large"),
        ("/api/events", b"[" + b"{}," * 200_000 + b"{}]", "text/plain", 413, "too_large"),
        ("/api/event", b"{}", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        ("/api/events", b"{}", "application/json", 400, "invalid_request"),
    ],
)
async def test_rejections_store_nothing(
    ingest: httpx.AsyncClient,
    pool: asyncpg.Pool,
    path: str,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    before = await pool.fetchval("SELECT count(*) FROM events")
    r = await ingest.post(path, content=content, headers={"Content-Type": content_type})
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM events") == before


@pytest.mark.parametrize("compressed", [True, False])
async def test_a_compressed_body_is_refused_415_and_stores_nothing(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str, compressed: bool
) -> None:
    """From an outside test: a gzip body was refused as invalid JSON (surrogates), and a plain
    one labelled gzip was stored. Neither is decoded: both are 415."""
    body = orjson.dumps(event(site))
    content = gzip.compress(body) if compressed else body
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    r = await ingest.post("/api/event", content=content, headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "Content-Encoding" in r.json()["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE site = $1", site) == 0
    identity = {**headers, "Content-Encoding": "identity"}
    assert (await ingest.post("/api/event", content=body, headers=identity)).status_code == 202
    # Given twice, the first is not hidden by the second.
    twice = [("Content-Type", "application/json")]
    twice += [("Content-Encoding", "gzip"), ("Content-Encoding", "identity")]
    assert (await ingest.post("/api/event", content=content, headers=twice)).status_code == 415


async def test_unknown_site_is_404_and_stores_nothing(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    r = await ingest.post("/api/event", json=event("never-registered.example"))
    assert r.status_code == 404
    assert r.json()["error"] == {
        "code": "unknown_site",
        "message": "site never-registered.example is not registered",
        "field": "site",
    }
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM events WHERE site = $1", "never-registered.example"
        )
        == 0
    )


async def test_rate_limits_per_ip(
    make_ingest: Ingest, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    ingest = await make_ingest(rate_ip_per_min=3)
    for _ in range(3):
        assert (await ingest.post("/api/event", json=event(site))).status_code == 202
    limited = await ingest.post("/api/event", json=event(site))
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert len(await rows(pool, site)) == 3
    assert len(await window(rclient, names, site)) == 3


async def test_rate_limits_per_site_hold_across_replicas(
    make_ingest: Ingest, pool: asyncpg.Pool, site: str
) -> None:
    # Two app instances share the Redis counters, as two replicas would.
    a = await make_ingest(rate_site_per_sec=5, rate_ip_per_min=0)
    b = await make_ingest(rate_site_per_sec=5, rate_ip_per_min=0)
    statuses = []
    for i in range(12):
        statuses.append(
            (await (a if i % 2 else b).post("/api/event", json=event(site))).status_code
        )
    accepted = statuses.count(202)
    # The 12 requests may straddle a second boundary: at most two windows' worth pass.
    assert 5 <= accepted <= 10 and statuses.count(429) == 12 - accepted
    assert len(await rows(pool, site)) == accepted


async def test_a_batch_refused_by_a_later_sites_limit_gives_back_what_the_others_counted(
    make_ingest: Ingest, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    """Sites are checked one after the other: the first one's events were counted when the
    second refused the batch. A refused batch changes nothing, its budgets included."""
    full = f"full-{uuid.uuid4().hex[:8]}.example.com"
    await create_site(pool, full)
    ingest = await make_ingest(rate_ip_per_min=3)
    if 60 - time.time() % 60 < 10:  # all in one minute's window: a new one resets the budgets
        await asyncio.sleep(60 - time.time() % 60 + 0.1)
    for _ in range(3):  # this client's budget for `full` is spent
        assert (await ingest.post("/api/event", json=event(full))).status_code == 202
    # Sites are checked in the order the batch names them: `site` first, then `full`.
    r = await ingest.post("/api/events", json=[event(site), event(site), event(full)])
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert await rows(pool, site) == []
    pattern = names.rate_ip(site, "*", 0).rsplit(":", 1)[0] + ":*"
    counters = [k async for k in rclient.scan_iter(match=pattern)]
    assert counters  # `site` was counted 2 ...
    assert [int(await rclient.get(k) or 0) for k in counters] == [0] * len(counters)  # given back
    # And the whole budget is there: three events of `site` pass.
    for _ in range(3):
        assert (await ingest.post("/api/event", json=event(site))).status_code == 202
    assert (await ingest.post("/api/event", json=event(site))).status_code == 429


@pytest.mark.parametrize(
    ("user_agent", "reason"),
    [
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        (
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/120.0 Safari/537.36",
            "automation",
        ),
        ("curl/8.5.0", "bot"),
        ("", "no_user_agent"),
    ],
)
async def test_bots_are_dropped_with_a_reason(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str, user_agent: str, reason: str
) -> None:
    r = await ingest.post("/api/event", json=event(site), headers={"User-Agent": user_agent})
    assert r.status_code == 202
    assert r.headers[DROPPED_HEADER] == reason
    assert r.json() == {"ok": True, "dropped": reason}
    assert await rows(pool, site) == []
    metrics = await metrics_text(ingest)
    assert f'sitewire_ingest_dropped_events_total{{reason="{reason}"}} 1.0' in metrics


async def test_a_bot_over_its_rate_limit_is_refused_before_its_user_agent_is_read(
    make_ingest: Ingest, pool: asyncpg.Pool, site: str
) -> None:
    """The limit comes first: a client over it costs a Redis counter, never pattern matching."""
    ingest = await make_ingest(rate_ip_per_min=2)
    crawler = {"User-Agent": "curl/8.5.0"}
    for _ in range(2):
        r = await ingest.post("/api/event", json=event(site), headers=crawler)
        assert r.status_code == 202 and r.json()["dropped"] == "bot"
    r = await ingest.post("/api/event", json=event(site), headers=crawler)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    r = await ingest.post("/api/events", json=[event(site)], headers=crawler)
    assert r.status_code == 429
    assert await rows(pool, site) == []


async def test_a_bot_batch_is_validated_and_its_valid_events_dropped(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    batch = [event(site), {"site": site, "name": ""}, event(site)]
    r = await ingest.post("/api/events", json=batch, headers={"User-Agent": "curl/8.5.0"})
    assert r.status_code == 202 and r.headers[DROPPED_HEADER] == "bot"
    results = r.json()["results"]
    assert results[0] == results[2] == {"status": 202, "ok": True, "dropped": "bot"}
    assert results[1]["status"] == 400
    assert await rows(pool, site) == []


async def test_cors(ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str) -> None:
    pre = await ingest.options(
        "/api/event",
        headers={
            "Origin": f"https://{site}",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == f"https://{site}"
    assert "Content-Type" in pre.headers["Access-Control-Allow-Headers"]
    ok = await ingest.post(
        "/api/event", json=event(site), headers={"Origin": f"https://www.{site}"}
    )
    assert ok.status_code == 202
    assert ok.headers["Access-Control-Allow-Origin"] == f"https://www.{site}"
    evil = await ingest.post(
        "/api/event", json=event(site), headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "forbidden"
    assert len(await rows(pool, site)) == 1


async def test_visitor_id_is_stable_within_a_day_and_distinct_per_ip(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    for _ in range(2):
        await ingest.post("/api/event", json=event(site))
    stored = await rows(pool, site)
    assert stored[0]["visitor_id"] == stored[1]["visitor_id"]
    # Forwarded-For from an untrusted peer is ignored: same visitor.
    await ingest.post("/api/event", json=event(site), headers={"X-Forwarded-For": "198.51.100.9"})
    assert (await rows(pool, site))[2]["visitor_id"] == stored[0]["visitor_id"]


async def test_trusted_proxy_forwarded_for_is_used(
    make_ingest: Ingest, pool: asyncpg.Pool, site: str
) -> None:
    import ipaddress

    ingest = await make_ingest(trusted_proxies=(ipaddress.ip_network("203.0.113.0/24"),))
    await ingest.post("/api/event", json=event(site), headers={"X-Forwarded-For": "198.51.100.9"})
    await ingest.post("/api/event", json=event(site), headers={"X-Forwarded-For": "198.51.100.10"})
    stored = await rows(pool, site)
    assert stored[0]["visitor_id"] != stored[1]["visitor_id"]


async def test_the_country_comes_from_the_client_ip_which_is_not_stored(
    make_ingest: Ingest, pool: asyncpg.Pool, rclient: aioredis.Redis, names: Names, site: str
) -> None:
    import ipaddress

    ingest = await make_ingest(trusted_proxies=(ipaddress.ip_network("203.0.113.0/24"),))
    senders = ["81.2.69.160", "2a00:1450:4001:80b::200e", "8.8.8.8", "10.1.2.3"]
    for ip in senders:
        r = await ingest.post("/api/event", json=event(site), headers={"X-Forwarded-For": ip})
        assert r.status_code == 202, r.text
    # The proxy's own address (TEST-NET) has no country: null, as for private addresses.
    assert (await ingest.post("/api/event", json=event(site))).status_code == 202
    stored = await rows(pool, site)
    assert [r["country"] for r in stored] == ["GB", "DE", "US", None, None]
    assert [e["country"] for e in await window(rclient, names, site)] == [
        "GB",
        "DE",
        "US",
        None,
        None,
    ]
    for row in stored:  # no column holds the address
        assert not any(ip in str(value) for ip in senders for value in row.values())


async def test_device_browser_and_os_come_from_one_user_agent_parse(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    iphone = (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"
    )
    await ingest.post("/api/event", json=event(site))  # the client's default: Firefox on Linux
    await ingest.post("/api/event", json=event(site), headers={"User-Agent": iphone})
    await ingest.post("/api/event", json=event(site), headers={"User-Agent": "Mozilla/5.0 (X)"})
    stored = [(r["device"], r["browser"], r["os"]) for r in await rows(pool, site)]
    assert stored == [
        ("desktop", "Firefox", "Linux"),
        ("mobile", "Mobile Safari", "iOS"),
        ("other", None, None),
    ]


async def test_unknown_route_is_a_json_error(ingest: httpx.AsyncClient) -> None:
    r = await ingest.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_batch_checks_each_site_and_origin_for_its_own_events(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    """Sites and origins are looked up once per distinct site of a batch; every event still gets
    its own verdict, in order, and events of a refused site store nothing."""
    other = f"o{uuid.uuid4().hex[:8]}.example.com"
    await pool.execute("INSERT INTO sites (id, epoch) VALUES ($1, 'abcd0123')", other)
    items = [event(site), event(other), event("nowhere.example"), event(site), event(other)]
    r = await ingest.post("/api/events", json=items, headers={"Origin": f"https://{site}"})
    results = r.json()["results"]
    assert [x["status"] for x in results] == [202, 403, 404, 202, 403]
    assert results[1]["error"]["code"] == "forbidden"
    stored = await rows(pool, site)
    assert [s["site_offset"] for s in stored] == [1, 2]
    assert await rows(pool, other) == []
    # Enriched once per request: one time and one visitor for the sender.
    assert stored[0]["ts"] == stored[1]["ts"]
    assert stored[0]["visitor_id"] == stored[1]["visitor_id"]
    assert stored[0]["event_id"] != stored[1]["event_id"]


def test_minted_ids_are_distinct_uuid7_with_the_current_time() -> None:
    import time

    from app.ingest.enrich import new_event_ids

    before = time.time_ns() // 1_000_000
    ids = new_event_ids(500)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 500
    for minted in ids:
        assert minted.version == 7 and minted.variant == uuid.RFC_4122
        assert before <= minted.int >> 80 <= after
    assert new_event_ids(0) == []


async def test_a_new_event_repeated_in_one_batch_is_stored_once(
    ingest: httpx.AsyncClient, pool: asyncpg.Pool, site: str
) -> None:
    e = event(site, id=str(uuid.uuid4()))
    r = await ingest.post("/api/events", json=[event(site), e, e, event(site)])
    results = r.json()["results"]
    assert [x["duplicate"] for x in results] == [False, False, True, False]
    assert results[1]["cursor"] == results[2]["cursor"]
    assert [int(x["cursor"].split("-")[1]) for x in results] == [1, 2, 2, 3]
    assert [s["site_offset"] for s in await rows(pool, site)] == [1, 2, 3]
