"""The gateway app: holds viewer connections and pushes each site's live events.

Endpoints (docs/protocol.md): `GET /v1/sites/{site}/stream` (WebSocket: app.gateway.transports
.websocket, a protocol class uvicorn runs for every upgrade, no ASGI on that path),
`GET /v1/sites/{site}/events` (Server-Sent Events: app.gateway.transports.sse), `/history`,
`/dashboard`.
Each connection is a `Viewer` in the hub. Caught-up WebSocket viewers get each burst as one
shared frame written straight to their transport; a viewer that is behind has a byte-capped
queue, flushed by its connection (WebSocket) or drained by its writer task (SSE). The fanout
never awaits a socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from starlette.types import Receive, Scope, Send

from app import tokens
from app.broker.redis import RedisBroker
from app.codes import ErrorCode
from app.errors import ApiError
from app.gateway import viewers
from app.gateway.aggregates import BadFilter, parse_filters
from app.gateway.analytics import Analytics, StatsBusy, StatsUnavailable
from app.gateway.feed import Feeds
from app.gateway.hub import Hub
from app.gateway.metrics import DeliveryStats, GatewayMetrics
from app.gateway.replay import BadStart, Replayer, parse_start
from app.gateway.state import GatewayState
from app.gateway.transports.sse import SseStream
from app.gateway.transports.websocket import WebSocketTransport
from app.names import Names
from app.servers.postgres import STORAGE_ERRORS, open_pool
from app.servers.redis import RedisShards
from app.settings import Settings
from app.store.reads import from_postgres
from app.store.sites import Site, SiteCache
from app.web.assets import Asset
from app.web.health import Checks, Health
from app.web.responses import API_OPTIONS, install_error_handlers, json_response
from app.wire import format_cursor, parse_cursor, parse_whole

log = logging.getLogger(__name__)

#: Seconds between two housekeeping passes (write timeouts, metrics).
HOUSEKEEPING_S = 0.5
#: Most events one history page returns, and most bytes of events (at least one event): a
#: page of large events ends early, with `next` where it stopped.
HISTORY_MAX_LIMIT = 1000
HISTORY_MAX_BYTES = 1024 * 1024


class GatewayApp:
    """The gateway's ASGI entry (the FastAPI app), the internal listener's app (metrics:
    app.web.health) and the WebSocket transport, whose protocol class uvicorn runs for every
    upgrade: WebSocket streams never reach ASGI under `sitewire gateway`; under another server
    an upgrade gets FastAPI's 403."""

    def __init__(self, api: FastAPI, internal: FastAPI, websockets: WebSocketTransport) -> None:
        self.api = api
        self.internal = internal
        self.websockets = websockets

    @property
    def state(self) -> Any:
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.api(scope, receive, send)


def create_app(settings: Settings) -> GatewayApp:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    secret = settings.require_secret()
    websockets = WebSocketTransport(secret, settings.ping_interval_s, settings.ping_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(settings)
        client = RedisShards.from_settings(settings)
        broker = RedisBroker(
            client, Names(settings.key_prefix), settings.replay_window, settings.replay_window_ttl_s
        )
        hub = Hub()
        stats = DeliveryStats(metrics)
        replayer = Replayer(broker, pool, metrics)
        feeds = Feeds(hub, settings, broker, pool, metrics, stats, replayer)
        analytics = Analytics(feeds, replayer, settings.viewer_queue_bytes)
        sites = SiteCache(pool, settings.site_cache_ttl_s)
        state = GatewayState(
            settings, pool, broker, metrics, hub, feeds, sites, replayer, stats, analytics,
        )  # fmt: skip
        metrics.queue_bytes.set_function(hub.queued_bytes)
        app.state.gateway = state
        websockets.start(state)
        feeds.start()
        analytics.start()
        chores = asyncio.create_task(housekeeping(state, websockets), name="housekeeping")
        try:
            yield
        finally:
            if not state.draining:
                await state.drain()
            chores.cancel()
            await analytics.close()
            websockets.close()
            await feeds.close()
            await client.aclose()
            await pool.close()

    app = FastAPI(title="Sitewire gateway", lifespan=lifespan, **API_OPTIONS)

    def checks() -> Checks:
        state: GatewayState = app.state.gateway
        return state.checks

    health = Health("gateway", checks, frozenset({"serving"}), registry)
    app.include_router(health.public_router())

    install_error_handlers(app)

    @app.get("/v1/sites/{site}/events")
    async def events(request: Request, site: str) -> Response:
        state: GatewayState = app.state.gateway
        query = _single_values(request)
        site_info = await viewers.authorize(state, secret, site, _token(request))
        # A browser's EventSource reconnects with its first URL (`last=`, `minutes=`) plus
        # Last-Event-ID, which wins; in the query itself, two start positions are an error.
        resumed_all = request.headers.getlist("last-event-id")
        if len(resumed_all) > 1:  # as for Authorization: which one would the client mean?
            message = "Last-Event-ID is given more than once"
            raise ApiError(ErrorCode.INVALID_REQUEST, message, "last-event-id")
        resumed = resumed_all[0].strip() if resumed_all else None
        try:
            if resumed:
                req = parse_start(resumed, None, None)
            else:
                req = parse_start(query.get("since"), query.get("last"), query.get("minutes"))
        except BadStart as exc:
            raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), exc.field) from None
        try:
            options = viewers.parse_options(query)
        except viewers.BadOption as exc:
            raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), exc.field) from None
        return SseStream(state, site_info, req, options)

    dashboard = Asset.load("dashboard.html", "text/html; charset=utf-8", max_age=300)

    @app.get("/dashboard/{site}", include_in_schema=False)
    async def dashboard_page(request: Request, site: str) -> Response:
        """The live dashboard; it reads its token from its own ?token= and connects back."""
        response = dashboard.response(request)
        # The page carries a token in its URL: never send it on as a Referer.
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.get("/v1/sites/{site}/stats")
    async def site_stats(request: Request, site: str) -> Response:
        """The site's live aggregates of the last 30 minutes (docs/protocol.md, "Stats")."""
        state: GatewayState = app.state.gateway
        query = _single_values(request)
        site_info = await viewers.authorize(state, secret, site, _token(request))
        try:
            filters = parse_filters(query)
        except BadFilter as exc:
            raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), exc.field) from None
        try:
            body = await state.analytics.body(site_info, filters)
        except StatsBusy as exc:
            raise ApiError(ErrorCode.BUSY, str(exc), retry_after=5) from None
        except StatsUnavailable as exc:
            raise ApiError(ErrorCode.STORAGE_UNAVAILABLE, str(exc), retry_after=2) from None
        return json_response(body, headers={"Cache-Control": "no-store"})

    @app.get("/v1/sites/{site}/history")
    async def history(request: Request, site: str) -> Response:
        """Stored events, paged by cursor (`after`) or starting at a time (`from`)."""
        state: GatewayState = app.state.gateway
        query = _single_values(request, viewers.HISTORY_PARAMETERS)
        site_info = await viewers.authorize(state, secret, site, _token(request))
        return await _history_page(state, site_info, query)

    return GatewayApp(app, health.internal_app(), websockets)


async def housekeeping(state: GatewayState, websockets: WebSocketTransport) -> None:
    """Twice a second: close viewers whose write is stuck, fold hot-path counters into the
    Prometheus metrics."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(HOUSEKEEPING_S)
        websockets.sweep(loop.time(), state.settings.write_timeout_s)
        state.stats.flush()


def _single_values(
    request: Request, names: frozenset[str] = viewers.STREAM_PARAMETERS
) -> dict[str, str]:
    """The query, each of `names` given once (viewers.single_values), or a 400."""
    try:
        return viewers.single_values(request.query_params.multi_items(), names)
    except viewers.BadOption as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), exc.field) from None


def _token(request: Request) -> str | None:
    """Browsers send the token in the query (EventSource cannot set headers); others may use
    an Authorization header, once (as on the WebSocket: two are a 400)."""
    authorization = request.headers.getlist("authorization")
    if len(authorization) > 1:
        message = "Authorization is given more than once"
        raise ApiError(ErrorCode.INVALID_REQUEST, message, "authorization")
    header = authorization[0] if authorization else None
    return request.query_params.get("token") or tokens.bearer(header)


async def _history_page(state: GatewayState, site: Site, query: Mapping[str, str]) -> Response:
    try:
        limit = parse_whole(query.get("limit", "100"))
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise ValueError
    except ValueError:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"limit is 1..{HISTORY_MAX_LIMIT}", "limit"
        ) from None
    after = 0
    before = _timestamp(query, "to")
    if "after" in query and "from" in query:
        raise ApiError(ErrorCode.INVALID_REQUEST, "give after or from, not both", "from")
    try:
        if "after" in query:
            epoch, after = parse_cursor(query["after"])
            if epoch != site.epoch:
                raise ApiError(ErrorCode.INVALID_REQUEST, "cursor is for another epoch", "after")
        elif "from" in query:
            start = _timestamp(query, "from")
            assert start is not None
            first = await state.replayer.offset_at(site.id, start)
            after = (first - 1) if first is not None else 2**62
        events = await from_postgres(state.pool, site.id, site.epoch, after, limit, before=before)
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), "after") from None
    except STORAGE_ERRORS:
        raise ApiError(
            ErrorCode.STORAGE_UNAVAILABLE, "history is unavailable", retry_after=2
        ) from None
    full = len(events) == limit
    size = 0
    for kept, (_, payload) in enumerate(events):
        size += len(payload) + 1
        if size > HISTORY_MAX_BYTES and kept:
            events, full = events[:kept], True
            break
    next_cursor = format_cursor(site.epoch, events[-1][0]) if full else None
    body = (
        b'{"events":['
        + b",".join(p for _, p in events)
        + b'],"next":'
        + orjson.dumps(next_cursor)
        + b"}"
    )
    return Response(body, media_type="application/json")


def _timestamp(query: Mapping[str, str], name: str) -> datetime | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        # In UTC now: a time that is not a UTC time (9999-12-31T23:59:59-14:00) is the
        # client's error, not storage's (it failed in the query, answered 503).
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"{name} must be an ISO 8601 time", name
        ) from None
