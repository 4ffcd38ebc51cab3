"""The ingest ASGI app: validates events, stores them durably, publishes them per site.

Request path (docs/ingest.md): read a size-capped body -> validate (400) -> known site (404)
-> allowed origin (403) -> bot check (202 dropped) -> rate limit (429) -> enrich -> group
commit (202 only after COMMIT; 503 if PostgreSQL did not confirm) -> publish (best effort).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from app.broker.redis import RedisBroker
from app.codes import ErrorCode
from app.errors import ApiError, StorageUnavailable, unknown_site
from app.ingest import enrich
from app.ingest.committer import Committer
from app.ingest.drops import DropCounts
from app.ingest.events import (
    EventIn,
    check_content_encoding,
    check_media_type,
    check_transfer_encoding,
    decode_json,
    parse_batch,
    validate,
)
from app.ingest.geo import Countries
from app.ingest.metrics import IngestMetrics
from app.ingest.publication import PublishQueue
from app.ingest.ratelimit import Counted, RateLimiter
from app.names import Names
from app.schema import NewEvent
from app.servers import Status
from app.servers.postgres import (
    STORAGE_ERRORS,
    close_pool,
    open_pool,
    probe_postgres,
    why_unavailable,
)
from app.servers.redis import RedisShards
from app.settings import Settings
from app.store.salts import SaltKeeper
from app.store.sites import Site, SiteCache
from app.store.writes import Outcome, Stored
from app.web.assets import Asset
from app.web.health import Checks, Health
from app.web.http import Answer, Direct
from app.web.responses import API_OPTIONS, install_error_handlers
from app.wire import format_cursor

#: Response header naming why an event was dropped on purpose (still a 202).
DROPPED_HEADER = "X-Sitewire-Dropped"
#: Seconds a client should wait after a 503 before retrying.
STORAGE_RETRY_AFTER = 2
#: Events of a batch handled between two turns given to the rest of the process. The loop
#: reads PostgreSQL's and Redis's replies only between steps, and 16 batches of 50 arriving
#: together were one 7 ms step: a commit's reply waited behind all of them (docs/performance.md).
YIELD_EVERY = 25

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Client:
    """What ingest knows about the sender of one request. The IP never leaves this process."""

    ip: str
    user_agent: str
    origin: str | None


@dataclass(slots=True)
class IngestState:
    settings: Settings
    pool: asyncpg.Pool
    redis: RedisShards
    metrics: IngestMetrics
    sites: SiteCache
    salts: SaltKeeper
    bots: enrich.BotDetector
    countries: Countries
    limiter: RateLimiter
    committer: Committer
    drops: DropCounts

    async def checks(self) -> dict[str, Status]:
        return {"postgres": await probe_postgres(self.pool), "redis": await self.redis.probe()}


def create_app(settings: Settings) -> IngestApp:
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)

    @asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        pool = await open_pool(settings, connect_timeout=2.0)
        client = RedisShards.from_settings(settings)
        names = Names(settings.key_prefix)
        broker = RedisBroker(client, names, settings.replay_window, settings.replay_window_ttl_s)
        publications = PublishQueue(broker, metrics)
        committer = Committer(
            pool,
            metrics,
            max_events=settings.commit_max_events,
            after_commit=publications.put,
            timeout_s=settings.commit_timeout_s,
            max_queued=settings.commit_queue_events,
        )
        api.state.ingest = IngestState(
            settings=settings,
            pool=pool,
            redis=client,
            metrics=metrics,
            sites=SiteCache(pool, settings.site_cache_ttl_s),
            salts=SaltKeeper(pool),
            bots=enrich.BotDetector(),
            countries=Countries(),
            limiter=RateLimiter(client, names, settings, metrics),
            committer=committer,
            drops=DropCounts(pool),
        )
        publications.start()
        committer.start()
        api.state.ingest.drops.start()
        await _report_unreachable(api.state.ingest)
        try:
            yield
        finally:
            try:
                await committer.close()  # commit (and ack) what was accepted before stopping
            finally:
                try:
                    await publications.close()
                finally:
                    await api.state.ingest.drops.close()
                    await client.aclose()
                    await close_pool(pool)

    api = FastAPI(title="Sitewire ingest", lifespan=lifespan, **API_OPTIONS)

    def checks() -> Checks:
        state: IngestState = api.state.ingest
        return state.checks

    # Ready whatever its servers say (both are reported): every replica shares one PostgreSQL,
    # and while it is down each answers 503 with Retry-After, which the tracker follows. Made
    # unready, every replica left its Service at once: publishers got the load balancer's bare
    # 503 and SitewireIngestRefusing saw no request to count (an outside operator's test).
    health = Health("ingest", checks, frozenset(), registry)
    api.include_router(health.public_router())
    install_error_handlers(api)
    _install_routes(api)
    return IngestApp(api, health.internal_app())


async def _report_unreachable(state: IngestState) -> None:
    """Say at startup which server is not there: otherwise the first sign would be the 503s
    (PostgreSQL) or the unpublished events (Redis) of the first requests."""
    for server, status in (await state.checks()).items():
        if status == "ok":
            continue
        if server == "postgres":
            why = await why_unavailable(state.pool) or "it answered again since"
            log.warning(
                "postgres is unreachable at startup (%s); events are refused with 503 until it "
                "is back",
                why,
            )
        else:
            log.warning(
                "%s is unreachable at startup; events are stored but not published, and not "
                "rate limited, until it is back",
                server,
            )


class IngestApp:
    """The ingest ASGI entry. `POST /api/event` and `POST /api/events` are served as raw ASGI:
    they are the whole point of the process, and FastAPI's routing and middleware cost three
    times the handler itself (profiled; docs/performance.md). Everything else (preflight, the
    script, health, 404s) goes to the FastAPI app. `internal` is the internal listener's app
    (metrics; app.web.health)."""

    def __init__(self, api: FastAPI, internal: FastAPI) -> None:
        self.api = api
        self.internal = internal

    @property
    def state(self) -> Any:
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = _POSTS.get(scope["path"])
            if handler is not None:
                client = scope.get("client")
                incoming = Incoming(scope["headers"], client[0] if client else None, receive)
                status, headers, body = await _answer(self.api.state.ingest, handler, incoming)
                headers.append((b"content-length", b"%d" % len(body)))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.api(scope, receive, send)

    def direct(self) -> dict[bytes, Direct]:
        """The event endpoints, for the HTTP protocol to serve without ASGI (app.web.http):
        the same answers as through `__call__`, without the ASGI layer's cost."""

        def route(handler: Handler) -> Direct:
            async def serve(
                headers: list[tuple[bytes, bytes]], peer: str | None, receive: Receive
            ) -> Answer:
                incoming = Incoming(headers, peer, receive)
                return await _answer(self.api.state.ingest, handler, incoming)

            return serve

        return {path.encode(): route(handler) for path, handler in _POSTS.items()}


def _install_routes(app: FastAPI) -> None:
    script = Asset.load("script.js", "application/javascript; charset=utf-8", max_age=3600)

    @app.get("/script.js", include_in_schema=False)
    async def tracking_script(request: Request) -> Response:
        """The tracking script, served first-party from the ingest host."""
        return script.response(request)

    @app.options("/api/event")
    @app.options("/api/events")
    async def preflight(request: Request) -> Response:
        # The site is in the body, unknown at preflight: allow the method here and check the
        # origin against the site's domains on the real request.
        origin = request.headers.get("origin")
        headers = {
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "86400",
            "Vary": "Origin",
        }
        if origin:
            headers["Access-Control-Allow-Origin"] = origin
        return Response(status_code=204, headers=headers)


class Incoming:
    """The parts of an ASGI request the ingest handlers read."""

    __slots__ = ("headers", "peer", "receive")

    def __init__(
        self, headers: list[tuple[bytes, bytes]], peer: str | None, receive: Receive
    ) -> None:
        self.headers: dict[str, str] = {}
        for key, value in headers:
            name, text = key.decode("latin-1"), value.decode("latin-1")
            # A header given twice is one list (RFC 9110, 5.3): the last must not hide the
            # first (`Content-Encoding: gzip` then `identity` was taken as not compressed).
            known = self.headers.get(name)
            self.headers[name] = text if known is None else f"{known}, {text}"
        self.peer = peer
        self.receive = receive


Reply = tuple[int, Any, dict[str, str]]
Handler = Callable[[IngestState, Incoming], Awaitable[Reply]]


async def _answer(state: IngestState, handler: Handler, incoming: Incoming) -> Answer:
    """The handler's reply (or its refusal) as an HTTP response with content-type and, for a
    browser, CORS headers; Content-Length is the caller's to add."""
    cors = _cors_headers(incoming)
    try:
        status, body, headers = await handler(state, incoming)
        headers = {**cors, **headers}
    except ApiError as exc:
        state.metrics.rejected.labels(exc.code.code).inc()
        status, body, headers = exc.code.status, exc.body(), dict(cors)
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()]
    return status, raw_headers, orjson.dumps(body)


async def post_event(state: IngestState, incoming: Incoming) -> Reply:
    """One event. Body: a JSON object, sent as application/json or text/plain."""
    doc = await _read_json(incoming, state.settings.max_event_bytes)
    event = validate(doc)
    site = await _known_site(state, event.site)
    client = _client(incoming, state.settings)
    _check_origin(client, site)
    salt = await _salt(state)
    # Limited before any work on the User-Agent: a client over its limit costs one counter.
    await state.limiter.check(site.id, enrich.ip_key(salt, client.ip), 1)
    reason = state.bots.reason(client.user_agent)
    if reason is not None:
        state.metrics.dropped.labels(reason).inc()
        state.drops.count(site.id, reason)
        return 202, {"ok": True, "dropped": reason}, {DROPPED_HEADER: reason}
    [outcome] = await _store(state, _enriched([event], client, salt, state.countries))
    if outcome is None:
        raise unknown_site(event.site)
    return 202, {"ok": True, **_accepted(outcome)}, {}


async def post_events(state: IngestState, incoming: Incoming) -> Reply:
    """A batch: a JSON array of up to SITEWIRE_MAX_BATCH_EVENTS events, one result each."""
    doc = await _read_json(incoming, state.settings.max_batch_bytes)
    items = parse_batch(doc, state.settings.max_batch_events)
    client = _client(incoming, state.settings)
    results, reason = await _store_batch(state, items, client)
    return 202, {"results": results}, {DROPPED_HEADER: reason} if reason else {}


_POSTS: dict[str, Handler] = {"/api/event": post_event, "/api/events": post_events}


async def _store_batch(
    state: IngestState, items: list[Any], client: Client
) -> tuple[list[dict[str, Any]], str | None]:
    """Validate each item on its own (one bad event never poisons the others), then store the
    good ones in one submission; with the reason when the client's events are dropped."""
    results: list[dict[str, Any] | None] = [None] * len(items)
    valid: list[tuple[int, EventIn]] = []
    limit = state.settings.max_event_bytes
    for i, item in enumerate(items):
        if i and i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        try:
            # The single endpoint's body limit, per event: an event refused there is refused
            # here too (compact JSON, so whitespace in the batch does not count).
            if len(orjson.dumps(item)) > limit:
                raise ApiError(ErrorCode.TOO_LARGE, f"event is over {limit} bytes")
            valid.append((i, validate(item)))
        except ApiError as exc:
            results[i] = _rejected(state, exc)
    refused = await _refused_sites(state, client, {e.site for _, e in valid})
    good: list[tuple[int, EventIn]] = []
    for i, event in valid:
        problem = refused.get(event.site)
        if problem is None:
            good.append((i, event))
        else:
            results[i] = _rejected(state, problem)
    if good:
        salt = await _salt(state)
        key = enrich.ip_key(salt, client.ip)
        await _check_limits(state, key, Counter(e.site for _, e in good))
        reason = state.bots.reason(client.user_agent)
        if reason is not None:
            state.metrics.dropped.labels(reason).inc(len(good))
            for site_id, count in Counter(e.site for _, e in good).items():
                state.drops.count(site_id, reason, count)
            for i, _ in good:
                results[i] = {"status": 202, "ok": True, "dropped": reason}
            return [r for r in results if r is not None], reason
        if len(items) > YIELD_EVERY:
            await asyncio.sleep(0)
        outcomes = await _store(
            state, _enriched([e for _, e in good], client, salt, state.countries)
        )
        for (i, event), outcome in zip(good, outcomes, strict=True):
            results[i] = _result(event, outcome)
    return [r for r in results if r is not None], None


async def _check_limits(state: IngestState, ip_key: str, sites: Counter[str]) -> None:
    """Each site's limit, one after the other; when one refuses the batch, what the sites
    before it counted is given back: a refused batch changes no budget."""
    counted: list[Counted] = []
    try:
        for site_id, count in sites.items():
            receipt = await state.limiter.check(site_id, ip_key, count)
            if receipt is not None:
                counted.append(receipt)
    except ApiError:
        await state.limiter.refund(counted)
        raise


async def _refused_sites(
    state: IngestState, client: Client, sites: set[str]
) -> dict[str, ApiError]:
    """Why each refused site of a batch is refused (unknown, origin not allowed). Checked once
    per distinct site: the answer is the same for every event of the batch naming it."""
    refused: dict[str, ApiError] = {}
    known = state.sites.cached(sites)
    missing = [s for s in sites if s not in known]
    if missing:
        try:
            known.update(await _guard_storage(state.sites.read_many(missing)))
        except ApiError as exc:  # the registry cannot be read: only these sites wait
            refused.update(dict.fromkeys(missing, exc))
    for site_id, site in known.items():
        try:
            if site is None:
                raise unknown_site(site_id)
            _check_origin(client, site)
        except ApiError as exc:
            refused[site_id] = exc
    return refused


def _rejected(state: IngestState, exc: ApiError) -> dict[str, Any]:
    state.metrics.rejected.labels(exc.code.code).inc()
    return {"status": exc.code.status, **exc.body()}


def _result(event: EventIn, outcome: Outcome) -> dict[str, Any]:
    if outcome is None:
        return {"status": 404, **unknown_site(event.site).body()}
    return {"status": 202, "ok": True, **_accepted(outcome)}


def _accepted(outcome: Stored) -> dict[str, Any]:
    return {
        "id": str(outcome.event.event_id),
        "cursor": format_cursor(outcome.epoch, outcome.offset),
        "duplicate": outcome.duplicate,
    }


async def _read_json(incoming: Incoming, limit: int) -> Any:
    """The body, refused before it is read in full when it is over `limit` bytes."""
    check_media_type(incoming.headers.get("content-type"))
    check_content_encoding(incoming.headers.get("content-encoding"))
    check_transfer_encoding(incoming.headers.get("transfer-encoding"))
    declared = incoming.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(ErrorCode.INVALID_REQUEST, "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(ErrorCode.TOO_LARGE, f"body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await incoming.receive()
        if message["type"] == "http.disconnect":
            raise ApiError(ErrorCode.INVALID_REQUEST, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(ErrorCode.TOO_LARGE, f"body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return decode_json(b"".join(chunks))


async def _known_site(state: IngestState, site_id: str) -> Site:
    site = await _guard_storage(state.sites.get(site_id))
    if site is None:
        raise unknown_site(site_id)
    return site


async def _salt(state: IngestState) -> bytes:
    return await _guard_storage(state.salts.current())


async def _store(state: IngestState, events: list[NewEvent]) -> list[Outcome]:
    try:
        return await state.committer.submit(events)
    except StorageUnavailable as exc:
        raise _storage_unavailable(maybe_stored=exc.maybe_stored) from None


async def _guard_storage(step: Awaitable[T]) -> T:
    try:
        return await step
    except STORAGE_ERRORS:
        raise _storage_unavailable() from None


def _storage_unavailable(*, maybe_stored: bool = False) -> ApiError:
    """503: nothing was stored, or (`maybe_stored`) a commit was sent and not confirmed."""
    message = (
        "storage did not confirm the commit; the event may have been stored: retry with the "
        "same id (a stored event is answered as a duplicate)"
        if maybe_stored
        else "storage is unavailable; the event was not stored, retry later"
    )
    return ApiError(ErrorCode.STORAGE_UNAVAILABLE, message, retry_after=STORAGE_RETRY_AFTER)


def _client(incoming: Incoming, settings: Settings) -> Client:
    headers = incoming.headers
    return Client(
        ip=enrich.client_ip(
            incoming.peer, headers.get("x-forwarded-for"), settings.trusted_proxies
        ),
        user_agent=headers.get("user-agent", "")[:1000],
        origin=headers.get("origin"),
    )


def _check_origin(client: Client, site: Site) -> None:
    """A browser page may post only for a site whose domains include the page's host.
    Requests without an Origin (servers, curl, sendBeacon from old browsers) are allowed."""
    if client.origin is None:
        return
    try:
        host = urlsplit(client.origin).hostname
    except ValueError:
        host = None
    if host is None or host.removeprefix("www.") not in site.origins_hosts:
        raise ApiError(
            ErrorCode.FORBIDDEN, f"origin {client.origin[:200]} may not post for {site.id}", "site"
        )


def _cors_headers(incoming: Incoming) -> dict[str, str]:
    origin = incoming.headers.get("origin")
    if not origin:
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _enriched(
    events: list[EventIn], client: Client, salt: bytes, countries: Countries
) -> list[NewEvent]:
    """The request's events, ready to store. What depends only on the sender (device, browser,
    OS, country, time, visitor id per site, minted ids) is computed once per request, not per
    event."""
    ts = datetime.now(UTC)
    agent = enrich.describe(client.user_agent)
    country = countries.code(client.ip)
    visitors: dict[str, int] = {}
    minted = iter(enrich.new_event_ids(sum(1 for e in events if e.id is None)))
    enriched = []
    for e in events:
        visitor = visitors.get(e.site)
        if visitor is None:
            visitor = enrich.visitor_id(salt, e.site, client.ip, client.user_agent)
            visitors[e.site] = visitor
        enriched.append(
            NewEvent(
                site=e.site,
                event_id=e.id or next(minted),
                name=e.name,
                url=e.url,
                path=e.path,
                referrer=e.referrer,
                referrer_host=e.referrer_host,
                props=e.props,
                visitor_id=visitor,
                device=agent.device,
                browser=agent.browser,
                os=agent.os,
                country=country,
                ts=ts,
                minted=e.id is None,
            )
        )
    return enriched
