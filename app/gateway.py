"""The gateway app: holds viewer connections and pushes each site's live events.

Endpoints (docs/protocol.md): `GET /v1/sites/{site}/stream` (WebSocket, served by the protocol
class of app.websocket, which uvicorn runs for every upgrade: no ASGI on that path),
`GET /v1/sites/{site}/events` (Server-Sent Events), `/history`, `/dashboard` (FastAPI).
Each connection is a `Viewer` in the hub. Caught-up WebSocket viewers get each burst as one
shared frame written straight to their transport; a viewer that is behind has a byte-capped
queue, flushed by its connection (WebSocket) or drained by its writer task (SSE). The fanout
never awaits a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from starlette.types import Message, Receive, Scope, Send

from app import tokens, viewers
from app.assets import Asset
from app.broker import REDIS_ERRORS
from app.codes import CloseCode, ErrorCode
from app.connections import Status, open_pool, probe_postgres
from app.errors import ApiError
from app.feed import Feeds
from app.health import Checks, Health
from app.history import from_postgres
from app.http import ABORT
from app.hub import Hub, Viewer, sse_chunk
from app.metrics import DeliveryStats, GatewayMetrics
from app.names import Names
from app.replay import BadStart, Replayer, StartRequest, StorageUnavailable, parse_start
from app.responses import API_OPTIONS, error_response, install_error_handlers
from app.settings import Settings
from app.shards import RedisShards
from app.sites import Site, SiteCache
from app.store import STORAGE_ERRORS
from app.websocket import Keepalive, StreamProtocol, sweep_writes
from app.wire import format_cursor, parse_cursor

log = logging.getLogger(__name__)

#: Seconds between two housekeeping passes (write timeouts, metrics).
HOUSEKEEPING_S = 0.5
#: Most events one history page returns, and most bytes of events (at least one event): a
#: page of large events ends early, with `next` where it stopped.
HISTORY_MAX_LIMIT = 1000
HISTORY_MAX_BYTES = 1024 * 1024
#: SSE comment line sent when a stream is idle, so proxies and dead peers are noticed.
SSE_HEARTBEAT_S = 15.0


@dataclass(slots=True)
class GatewayState:
    settings: Settings
    pool: asyncpg.Pool
    redis: RedisShards
    metrics: GatewayMetrics
    hub: Hub
    feeds: Feeds
    sites: SiteCache
    replayer: Replayer
    stats: DeliveryStats
    keepalive: Keepalive
    draining: bool = False
    #: Live WebSocket connections (the write-timeout sweep looks at them).
    connections: set[StreamProtocol] = field(default_factory=set)

    async def housekeeping(self) -> None:
        """Twice a second: close viewers whose write is stuck, fold hot-path counters into
        the Prometheus metrics."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            sweep_writes(self, loop.time(), self.settings.write_timeout_s)
            self.stats.flush()

    async def checks(self) -> dict[str, Status]:
        """Ready (`serving`) while either store answers and the gateway is not draining: with
        Redis away it serves from PostgreSQL (polled), with PostgreSQL away it serves live
        events and resumes within the Redis window (docs/operations.md)."""
        results: dict[str, Status] = {
            "postgres": await probe_postgres(self.pool),
            "redis": await self.redis.probe(),
        }
        either = "ok" in results.values()
        results["serving"] = "ok" if either and not self.draining else "unavailable"
        if self.draining:
            results["draining"] = "unavailable"
        return results

    async def drain(self) -> None:
        """Stop accepting viewers, tell each to reconnect elsewhere, wait (bounded) for them
        to go."""
        self.draining = True
        for viewer in self.hub.viewers():
            viewer.fail(CloseCode.SHUTTING_DOWN)
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # Polling during a bounded drain is simpler than an "empty" event on the hot path.
        while any(True for _ in self.hub.viewers()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        log.info("drained", extra={"left": sum(1 for _ in self.hub.viewers())})


class GatewayApp:
    """The gateway's ASGI entry (the FastAPI app) and what its WebSocket protocol class needs:
    the state and the token secret. WebSocket streams never reach ASGI under
    `sitewire gateway` (app.websocket); under another server an upgrade gets FastAPI's 403.
    `internal` is the internal listener's app (metrics; app.health)."""

    def __init__(self, api: FastAPI, internal: FastAPI, secret: str) -> None:
        self.api = api
        self.internal = internal
        self.secret = secret

    @property
    def state(self) -> Any:
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.api(scope, receive, send)


def create_app(settings: Settings) -> GatewayApp:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    secret = settings.require_secret()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = await open_pool(settings)
        client = RedisShards.from_settings(settings)
        hub = Hub()
        stats = DeliveryStats(metrics)
        replayer = Replayer(client, pool, Names(settings.key_prefix), metrics)
        feeds = Feeds(hub, settings, client, pool, metrics, stats, replayer)
        keepalive = Keepalive(settings.ping_interval_s, settings.ping_timeout_s)
        state = GatewayState(
            settings, pool, client, metrics, hub, feeds, SiteCache(pool), replayer, stats,
            keepalive,
        )  # fmt: skip
        metrics.queue_bytes.set_function(hub.queued_bytes)
        app.state.gateway = state
        feeds.start()
        housekeeping = asyncio.create_task(state.housekeeping(), name="housekeeping")
        try:
            yield
        finally:
            if not state.draining:
                await state.drain()
            housekeeping.cancel()
            keepalive.close()
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
        site_info = await viewers.authorize(state, secret, site, _token(request))
        query = request.query_params
        # A browser's EventSource reconnects with its first URL (`last=`, `minutes=`) plus
        # Last-Event-ID, which wins; in the query itself, two start positions are an error.
        resumed = request.headers.get("last-event-id")
        try:
            if resumed:
                req = parse_start(resumed, None, None)
            else:
                req = parse_start(query.get("since"), query.get("last"), query.get("minutes"))
        except BadStart as exc:
            raise ApiError(ErrorCode.INVALID_REQUEST, str(exc), "since") from None
        return SseStream(state, site_info, req)

    dashboard = Asset.load("dashboard.html", "text/html; charset=utf-8", max_age=300)

    @app.get("/dashboard/{site}", include_in_schema=False)
    async def dashboard_page(request: Request, site: str) -> Response:
        """The live dashboard; it reads its token from its own ?token= and connects back."""
        response = dashboard.response(request)
        # The page carries a token in its URL: never send it on as a Referer.
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.get("/v1/sites/{site}/history")
    async def history(request: Request, site: str) -> Response:
        """Stored events, paged by cursor (`after`) or starting at a time (`from`)."""
        state: GatewayState = app.state.gateway
        site_info = await viewers.authorize(state, secret, site, _token(request))
        return await _history_page(state, site_info, request.query_params)

    return GatewayApp(app, health.internal_app(), secret)


def _token(request: Request) -> str | None:
    """Browsers send the token in the query (EventSource cannot set headers); others may use
    an Authorization header."""
    return request.query_params.get("token") or tokens.bearer(request.headers.get("authorization"))


async def _history_page(state: GatewayState, site: Site, query: Mapping[str, str]) -> Response:
    try:
        limit = int(query.get("limit", "100"))
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise ValueError
    except ValueError:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"limit is 1..{HISTORY_MAX_LIMIT}", "limit"
        ) from None
    after = 0
    before = _timestamp(query, "to")
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
    except ValueError:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"{name} must be an ISO 8601 time", name
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- Server-Sent Events -------------------------------------------------------------------


class SseStream(Response):
    """A Server-Sent Events response fed by one viewer's queue.

    Written as a raw ASGI response (not a StreamingResponse) so every write has a timeout and a
    client that stops reading is closed as slow, like a WebSocket viewer.
    """

    media_type = "text/event-stream"

    def __init__(self, state: GatewayState, site: Site, req: StartRequest) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.state = state
        self.site = site
        self.req = req
        self._scope: Scope = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        state = self.state
        wake, drained = asyncio.Event(), asyncio.Event()
        try:
            viewer, start = await viewers.join(state, self.site, self.req, wake.set)
        except StorageUnavailable:
            # A stream that ends with a close event, not an HTTP error: EventSource gives up
            # on an error status, but reconnects (with Last-Event-ID) after a stream ends.
            await self._refuse(send, CloseCode.STORAGE_UNAVAILABLE)
            return
        except (TimeoutError, *REDIS_ERRORS, *STORAGE_ERRORS):
            error = ApiError(ErrorCode.STORAGE_UNAVAILABLE, "subscription failed", retry_after=1)
            await error_response(error)(scope, receive, send)
            return
        state.metrics.connections.labels("sse").inc()
        try:
            await send(_SSE_START)
            disconnected = asyncio.create_task(_wait_disconnect(receive, viewer))
            replay = asyncio.create_task(viewers.replay(state, viewer, start, drained))
            try:
                await self._write(send, viewer, wake, drained, b"retry: 2000\n\n")
            finally:
                disconnected.cancel()
                replay.cancel()
                await asyncio.gather(disconnected, replay, return_exceptions=True)
        finally:
            state.feeds.leave(viewer)
            state.metrics.connections.labels("sse").dec()

    async def _write(
        self, send: Send, viewer: Viewer, wake: asyncio.Event, drained: asyncio.Event, first: bytes
    ) -> None:
        state = self.state
        timeout = state.settings.write_timeout_s
        pending = first
        try:
            while True:
                if pending:
                    async with asyncio.timeout(timeout):
                        await send(
                            {"type": "http.response.body", "body": pending, "more_body": True}
                        )
                    drained.set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SSE_HEARTBEAT_S):
                        await wake.wait()
                wake.clear()
                if viewer.close_code is not None:
                    await self._close(send, viewer.close_code)
                    return
                if viewer.closed:
                    return
                items = viewer.take()
                pending = sse_chunk(items, viewer.epoch) if items else b": ping\n\n"
                if items:
                    state.stats.count(items)
                    state.stats.frames += 1
        except TimeoutError:
            if viewer.fail(CloseCode.SLOW_CONSUMER):  # not already closed as slow: count it
                state.metrics.closes.labels("write_timeout").inc()
            self._abort()  # the client does not read: nothing more can reach it
        except OSError:
            viewer.release()

    def _abort(self) -> None:
        """Drop the connection at once, write buffer and all (app.http.ABORT): a close would
        wait for a client that does not read."""
        abort = self._scope.get("extensions", {}).get(ABORT, {}).get("abort")
        if abort is not None:
            abort()

    async def _refuse(self, send: Send, code: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await send(_SSE_START)
                body = {"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True}
                await send(body)
        await self._close(send, code)

    async def _close(self, send: Send, code: int) -> None:
        body = orjson.dumps({"type": "close", "code": code, "reason": CloseCode(code).name.lower()})
        try:
            async with asyncio.timeout(1.0):
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"event: close\ndata: " + body + b"\n\n",
                        "more_body": False,
                    }
                )
        except Exception:  # the close event could not be written (the client does not read)
            self._abort()


_SSE_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),  # nginx: do not buffer the stream
    ],
}


async def _wait_disconnect(receive: Receive, viewer: Viewer) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            viewer.release()
            viewer.wake()
            return
